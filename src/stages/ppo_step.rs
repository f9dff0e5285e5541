//! One PPO iteration — rollout, scoring pass, update, KL-controller step — as a
//! [`PpoTrainer`] that owns the models, the optimizer and the env, so `rlhf ppo` (with its run
//! folder) and the benchmarks run exactly the same code.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use rlhf_envs::kl::kl_terms;
use rlhf_envs::{
    Detokenizer, EnvError, Episode, KlConfig, NoReference, RewardModel, Rollout, RunningMoments, TextEnvConfig, VecEnv,
};
use rlhf_policies::fused::host_loss;
use rlhf_policies::{policy_session, AdamW, CausalLm, FusedOps, GradBuffers, SamplingConfig, TokenMask};
use serde::{Deserialize, Serialize};

use crate::data::{mix, sample_blocks};
use crate::math::ppo::{explained_variance, gae, ppo_policy_loss, ppo_value_loss, whiten, KlController};
use crate::stages::common::{
    accumulate_grads, apply_grads_with, frozen_names, or_skip_non_finite, running_score_metrics, share_frozen,
    shuffled_minibatches, untape_frozen, LossOn,
};
use crate::stages::nlpo;
use crate::stages::ppo::{KlUnit, OnNonFinite, PpoConfig};
use crate::stages::ppo_models::{full_kl_terms, Critic, PpoModels, Seq, SharedBottoms};
use crate::stages::prompts::Prompts;

/// What a checkpoint stores besides the models and the optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpoState {
    /// The KL controller (β).
    pub kl: KlController,
    /// Prompts drawn so far (the data cursor).
    pub prompt_draws: usize,
    /// Batches skipped for non-finite values.
    pub skipped_batches: usize,
    /// The running statistics of the training scores (`score.running_norm`).
    #[serde(default)]
    pub score_moments: RunningMoments,
}

/// The models, optimizer, env and controller of a PPO run, on device `D`. The rollout decodes
/// where `cfg.rollout_engine` says ([`policy_session`]).
#[derive(Debug)]
pub struct PpoTrainer<M, D: FusedOps = Cpu> {
    /// The configuration.
    pub cfg: PpoConfig,
    /// Policy and critic.
    pub models: PpoModels<D>,
    /// The frozen reference π_ref (never updated).
    pub reference: CausalLm<D>,
    /// AdamW over policy and critic.
    pub opt: AdamW<D>,
    /// The environment. It rolls out without a reference: the scoring pass computes π_ref's
    /// log-probs with the same training forward as the policy's (so iteration 0's KL is
    /// exactly 0), and a second reference pass in the env's KV-cache engine would be thrown
    /// away.
    pub env: VecEnv<NoReference, M>,
    /// β, the data cursor, skipped batches.
    pub state: PpoState,
    /// Token ids of the PPO-ptx corpus.
    pub ptx: Option<Vec<u32>>,
    /// NLPO's masking policy π_ψ (with `cfg.nlpo`): a frozen copy of the policy, taken at the
    /// iterations [`NlpoConfig::syncs_at`](crate::stages::nlpo::NlpoConfig::syncs_at) names (a
    /// resumed run loads the checkpoint's).
    pub mask_policy: Option<CausalLm<D>>,
    /// The ids that end a response (none: every response runs to `max_new_tokens`).
    eos_ids: Vec<u32>,
    pad: u32,
}

/// What one iteration produced.
#[derive(Debug, Clone)]
pub struct IterationOutput {
    /// The rollouts (without a reference: their `kl` terms are 0 and `ref_logprobs` repeat
    /// the policy's; π_ref's log-probs and the KL are in `scored`).
    pub episodes: Vec<Episode>,
    /// After the scoring pass.
    pub scored: Scored,
    /// The `metrics.jsonl` record.
    pub record: serde_json::Value,
    /// Per-phase wall time: rollout, scoring, update.
    pub timing: [Duration; 3],
}

impl<M: RewardModel, D: FusedOps + GradBuffers> PpoTrainer<M, D> {
    /// Builds the env over `prompts` (`(ids, text)`) with `reward`; any of `eos_ids` ends a
    /// response (none: always `max_new_tokens`), `pad` pads batches.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: PpoConfig,
        mut models: PpoModels<D>,
        mut reference: CausalLm<D>,
        mut opt: AdamW<D>,
        state: PpoState,
        prompts: Prompts,
        reward: M,
        detok: Box<dyn Detokenizer>,
        eos_ids: Vec<u32>,
        pad: u32,
    ) -> Result<Self> {
        let env_cfg = TextEnvConfig {
            vocab: reference.dims.vocab as u32,
            max_new_tokens: cfg.max_new_tokens,
            eos_ids: eos_ids.clone(),
            stop_ids: vec![],
            // the env rolls out without a reference: its estimator is never used
            kl: KlConfig { beta: cfg.beta as f32, estimator: cfg.kl_estimator.sampled().unwrap_or_default() },
            score: cfg.score.clone(),
        };
        let source = prompts.source(cfg.seed)?;
        let mut env = VecEnv::new(cfg.batch_size, env_cfg, source, NoReference, reward, detok)?;
        env.prompts_mut().seek(state.prompt_draws);
        env.set_score_moments(state.score_moments);
        untape_frozen(&mut models, &mut opt, |_| true)?;
        // one copy of the weights frozen in the policy serves the reference (and a critic
        // started from the policy) ...
        let frozen = frozen_names(&models, &mut opt)?;
        let policy_frozen = |n: &str| frozen.contains(&format!("policy.{n}"));
        share_frozen(("ppo", "the reference"), &mut reference, &models.policy, policy_frozen);
        if let Critic::Separate(c) = &mut models.critic {
            let both = |n: &str| policy_frozen(n) && frozen.contains(&format!("value.{n}"));
            share_frozen(("ppo", "the critic"), &mut c.model, &models.policy, both);
        }
        // ... and a frozen bottom they share runs once per batch (it stays equal all run)
        models.shares = SharedBottoms::of(&models, &reference);
        Ok(PpoTrainer { cfg, models, reference, opt, env, state, ptx: None, mask_policy: None, eos_ids, pad })
    }

    /// Iteration `it` (0-based): rollout → scoring → update → KL control. `None` when the
    /// batch was skipped for a non-finite value (`on_nonfinite = skip`).
    pub fn iteration(&mut self, it: usize) -> Result<Option<IterationOutput>> {
        let out = self.iteration_inner(it);
        self.state.prompt_draws = self.env.prompts().draws();
        self.state.score_moments = self.env.score_moments();
        out
    }

    fn iteration_inner(&mut self, it: usize) -> Result<Option<IterationOutput>> {
        // ALGO: rollout with the current policy (sampling engine with its KV cache; NLPO: masked)
        let t0 = Instant::now();
        // the reward's statistics of this rollout alone (not of an evaluation before it)
        let _ = self.env.take_reward_stats();
        let (rolled, nlpo_metrics) = self.rollout(it)?;
        let reward_stats = self.env.take_reward_stats();
        let cfg = &self.cfg;
        let (episodes, masks) = match rolled {
            Ok(e) => e,
            Err(EnvError::NonFinite { .. }) if cfg.on_nonfinite == OnNonFinite::Skip => {
                self.state.skipped_batches += 1;
                return Ok(None);
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("iteration {}: rollout", it + 1))),
        };
        let t_rollout = t0.elapsed();
        // ALGO: scoring pass — log-probs, values, rewards, GAE, whitening
        let t1 = Instant::now();
        let layout = minibatches(cfg, it, 0);
        let scored =
            score(cfg, &self.models, &self.reference, (&episodes, masks), &layout, self.pad, self.state.kl.beta)?;
        let t_scoring = t1.elapsed();
        if let Some(what) = non_finite(&scored) {
            if cfg.on_nonfinite == OnNonFinite::Stop {
                bail!("iteration {}: {what} is not finite", it + 1);
            }
            self.state.skipped_batches += 1;
            return Ok(None);
        }
        // ALGO: ppo_epochs passes of clipped policy + value loss over shuffled minibatches
        let t2 = Instant::now();
        let lr = rates(cfg, it);
        let upd = update(
            cfg,
            &mut self.models,
            &mut self.opt,
            &scored,
            it,
            lr,
            self.pad,
            self.ptx.as_deref(),
            &mut self.state,
        )?;
        let t_update = t2.elapsed();
        // ALGO: KL control on the KL the rewards used
        let (kl_seq, kl_tok) = kl_means(&scored);
        let beta = self.state.kl.beta;
        self.state.kl.update(if cfg.kl_unit == KlUnit::SequenceSum { kl_seq } else { kl_tok }, cfg.batch_size);
        let timing = [t_rollout, t_scoring, t_update];
        let policy_lr = lr.0.unwrap_or(0.0);
        let mut record = iteration_metrics(it + 1, &scored, &upd, (beta, kl_seq), policy_lr, &self.eos_ids, &timing);
        if cfg.critic_lr.is_some() || cfg.critic_warmup_iterations > 0 {
            record["lr_critic"] = lr.1.into();
        }
        if cfg.target_kl.is_some() {
            record["policy/early_stop"] = f64::from(u8::from(upd.early_stopped)).into();
            record["policy/minibatches"] = upd.minibatches.into();
        }
        running_score_metrics(&cfg.score, &self.env.score_moments(), &mut record);
        for (k, v) in nlpo_metrics.into_iter().flatten() {
            record[k] = v.into();
        }
        for (k, v) in reward_stats {
            record[k] = v.into();
        }
        Ok(Some(IterationOutput { episodes, scored, record, timing }))
    }

    /// The iteration's rollout with the current policy (the sampling engine with its KV cache),
    /// or with NLPO's π_θ^mask and its per-token masks (syncing π_ψ first when due); the
    /// `nlpo/…` metrics with it. The env's error is handed back for `on_nonfinite`.
    #[allow(clippy::type_complexity)]
    fn rollout(&mut self, it: usize) -> Result<(Result<(Vec<Episode>, Option<Masks>), EnvError>, Option<NlpoMetrics>)> {
        let cfg = &self.cfg;
        let sampler = sampling(cfg, self.eos_ids.clone(), mix(cfg.seed, it as u64, 1));
        let (policy, engine) = (&self.models.policy, cfg.rollout_engine);
        let Some(n) = cfg.nlpo else {
            // the session borrows the policy, which the update changes: dropped here
            let mut session = policy_session(policy, cfg.batch_size, capacity(cfg), sampler, engine)?;
            let rolled = self.env.rollout_with(session.as_mut(), Rollout { group_size: 1, reference: false });
            return Ok((rolled.map(|e| (e, None)), None));
        };
        let synced = n.syncs_at(it);
        if synced {
            self.mask_policy = Some(policy.frozen_copy());
        }
        let mask_policy = self.mask_policy.as_ref().context("NLPO: no masking policy to roll out with")?;
        // just synced, π_ψ's logits are π_θ's: no second decode
        let mask_policy = (!synced).then_some(mask_policy);
        let rolled = nlpo::rollout(&mut self.env, policy, mask_policy, &n, capacity(cfg), sampler, engine);
        let metrics = rolled.as_ref().ok().map(|r| nlpo::metrics(r, synced));
        Ok((rolled.map(|r| (r.episodes, Some(r.masks))), metrics))
    }
}

/// Iteration `it`'s (policy, critic) learning rates: the schedule at `optim.lr` and at
/// `critic_lr` (or `optim.lr`); the policy has none during the critic warm-up, when its
/// parameters sit the steps out (OpenRLHF's frozen actor: not stepped, not in the gradient
/// norm, their Adam moments untouched; logged as rate 0).
fn rates(cfg: &PpoConfig, it: usize) -> (Option<f64>, f64) {
    let at = |peak| cfg.schedule.at(peak, cfg.iterations, it);
    let policy = (it >= cfg.critic_warmup_iterations).then(|| at(cfg.optim.lr));
    (policy, at(cfg.critic_lr.unwrap_or(cfg.optim.lr)))
}

fn capacity(cfg: &PpoConfig) -> usize {
    cfg.max_prompt_len + cfg.max_new_tokens
}

/// One iteration's rollouts after the scoring pass (per episode, valid tokens only).
#[derive(Debug, Clone)]
pub struct Scored {
    /// Prompt ⧺ response of each episode.
    pub seqs: Vec<Seq>,
    /// log π_θ_old of each response token (training forward).
    pub old_logprobs: Vec<Vec<f32>>,
    /// log π_ref of each response token (training forward of the frozen copy).
    pub ref_logprobs: Vec<Vec<f32>>,
    /// V_old.
    pub values: Vec<Vec<f32>>,
    /// Per-token KL terms `k(t)`.
    pub kl: Vec<Vec<f32>>,
    /// Per-token rewards (after optional whitening).
    pub rewards: Vec<Vec<f32>>,
    /// Advantages (whitened if configured).
    pub advantages: Vec<Vec<f32>>,
    /// Returns.
    pub returns: Vec<Vec<f32>>,
    /// Processed scores R.
    pub scores: Vec<f32>,
    /// NLPO: each response token's nucleus V_p, over which `old_logprobs` (and the update's
    /// log-probs) are taken.
    pub masks: Option<Masks>,
}

/// NLPO's nucleus of every response token of every episode.
pub type Masks = Vec<Vec<TokenMask>>;

/// The `nlpo/…` metrics of an iteration.
type NlpoMetrics = [(&'static str, f64); 3];

/// The masks of the response tokens of episodes `micro`, in the training forward's order.
fn gather_masks(masks: Option<&Masks>, micro: &[usize]) -> Option<Vec<TokenMask>> {
    masks.map(|m| micro.iter().flat_map(|&i| m[i].iter().cloned()).collect())
}

/// The rollout sampler of `cfg` with `seed`.
pub(crate) fn sampling(cfg: &PpoConfig, eos_ids: Vec<u32>, seed: u64) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        eos_ids,
        seed,
        ..Default::default()
    }
}

/// Minibatches of epoch `epoch` of iteration `it` ([`shuffled_minibatches`]).
fn minibatches(cfg: &PpoConfig, it: usize, epoch: usize) -> Vec<Vec<Vec<usize>>> {
    shuffled_minibatches(cfg.batch_size, cfg.minibatch_size, cfg.grad_accum, mix(cfg.seed, it as u64, 2 + epoch as u64))
}

/// The scoring pass over `episodes`, micro-batch by micro-batch in `layout`.
fn score<D: FusedOps>(
    cfg: &PpoConfig,
    models: &PpoModels<D>,
    reference: &CausalLm<D>,
    (episodes, masks): (&[Episode], Option<Masks>),
    layout: &[Vec<Vec<usize>>],
    pad: u32,
    beta: f64,
) -> Result<Scored> {
    let n = episodes.len();
    let seqs: Vec<Seq> = episodes
        .iter()
        .map(|e| Seq { ids: [e.prompt_ids.as_slice(), &e.response_ids].concat(), prompt_len: e.prompt_ids.len() })
        .collect();
    let mut s = Scored {
        seqs,
        old_logprobs: vec![vec![]; n],
        ref_logprobs: vec![vec![]; n],
        values: vec![vec![]; n],
        kl: vec![],
        rewards: vec![],
        advantages: vec![],
        returns: vec![],
        scores: episodes.iter().map(|e| e.score).collect(),
        masks,
    };
    // kl_estimator = full: the exact per-token KL of π_θ (over each token's nucleus, with
    // NLPO) to π_ref, from both models' logits
    let full = cfg.kl_estimator.sampled().is_none();
    let mut full_kl = vec![vec![]; if full { n } else { 0 }];
    for micro in layout.iter().flatten() {
        let batch: Vec<&Seq> = micro.iter().map(|&i| &s.seqs[i]).collect();
        let masks = gather_masks(s.masks.as_ref(), micro);
        let (lpe, values, ref_lpe) =
            models.forward_with(Some(reference), &batch, masks.as_deref(), (pad, cfg.temperature), NoneTape)?;
        let (lpe, values, ref_lpe) = (lpe.as_vec(), values.as_vec(), ref_lpe.expect("asked for"));
        let kl = full
            .then(|| full_kl_terms(&models.policy, reference, &batch, masks.as_deref(), pad, cfg.temperature))
            .transpose()?;
        let mut off = 0;
        for &i in micro {
            let len = s.seqs[i].resp_len();
            s.old_logprobs[i] = lpe[off..off + len].to_vec();
            s.ref_logprobs[i] = ref_lpe[off..off + len].to_vec();
            s.values[i] = values[off..off + len].to_vec();
            if let Some(kl) = &kl {
                full_kl[i] = kl[off..off + len].to_vec();
            }
            off += len;
        }
    }
    s.kl = match cfg.kl_estimator.sampled() {
        Some(e) => (0..n).map(|i| kl_terms(&s.old_logprobs[i], &s.ref_logprobs[i], e)).collect(),
        None => full_kl,
    };
    // r_t = −β·k(t), plus the score at the last token
    s.rewards = (0..n)
        .map(|i| {
            let mut r: Vec<f32> = s.kl[i].iter().map(|k| -(beta as f32) * k).collect();
            *r.last_mut().expect("a response has a token") += s.scores[i];
            r
        })
        .collect();
    if cfg.whiten_rewards {
        s.rewards = unflatten(&whiten(&s.rewards.concat(), true, 1e-8, false), &s.rewards);
    }
    for i in 0..n {
        let (a, r) = gae(&s.rewards[i], &s.values[i], 0.0, cfg.gamma, cfg.lam);
        s.advantages.push(a);
        s.returns.push(r);
    }
    if cfg.whiten_advantages {
        s.advantages = unflatten(&whiten(&s.advantages.concat(), true, 1e-8, true), &s.advantages);
    }
    Ok(s)
}

fn unflatten(flat: &[f32], like: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut off = 0;
    like.iter()
        .map(|r| {
            off += r.len();
            flat[off - r.len()..off].to_vec()
        })
        .collect()
}

fn non_finite(s: &Scored) -> Option<&'static str> {
    let bad = |x: &[Vec<f32>]| x.iter().flatten().any(|v| !v.is_finite());
    if s.scores.iter().any(|v| !v.is_finite()) {
        Some("the reward score")
    } else if bad(&s.rewards) {
        Some("a per-token reward")
    } else if bad(&s.advantages) || bad(&s.returns) {
        Some("an advantage")
    } else {
        None
    }
}

/// Token-weighted sums of the update's statistics.
#[derive(Debug, Clone, Default)]
pub struct UpdateStats {
    /// Σ over minibatches of the policy loss.
    pub pg_loss: f64,
    /// Σ over minibatches of the value loss.
    pub vf_loss: f64,
    /// Σ over minibatches of the PPO-ptx loss.
    pub ptx_loss: f64,
    /// Minibatches done.
    pub minibatches: usize,
    /// Token-weighted sums: clipfrac, value clipfrac, approx-KL, ratio, ratio², entropy.
    pub sums: [f64; 6],
    /// Tokens seen.
    pub tokens: usize,
    /// (ratio mean, approx-KL) of the first minibatch of the first epoch.
    pub first: Option<(f64, f64)>,
    /// The update stopped early (`target_kl`).
    pub early_stopped: bool,
}

#[allow(clippy::too_many_arguments)]
fn update<D: FusedOps + GradBuffers>(
    cfg: &PpoConfig,
    models: &mut PpoModels<D>,
    opt: &mut AdamW<D>,
    s: &Scored,
    it: usize,
    lr: (Option<f64>, f64),
    pad: u32,
    ptx: Option<&[u32]>,
    state: &mut PpoState,
) -> Result<UpdateStats> {
    let mut st = UpdateStats::default();
    // no policy rate (critic warm-up): its parameters sit the steps out
    let lr_of = |name: &str| if name.starts_with("value.") { Some(lr.1) } else { lr.0 };
    untape_frozen(models, opt, |name| lr_of(name).is_some())?;
    'epochs: for epoch in 0..cfg.ppo_epochs {
        for (m, mb) in minibatches(cfg, it, epoch).iter().enumerate() {
            let mb_tokens: usize = mb.iter().flatten().map(|&i| s.seqs[i].resp_len()).sum();
            let denom = mb_tokens as f64 / cfg.grad_accum as f64;
            let mut local = UpdateStats::default();
            let grads = accumulate_grads(models, mb.len(), |models, k, tape| {
                minibatch_loss(cfg, models, s, &mb[k], denom, pad, ptx, (it, epoch, m, k), &mut local, tape)
            });
            // early stopping (target_kl): this minibatch is not stepped, nor any after it
            let approx_kl = local.sums[2] / local.tokens.max(1) as f64;
            if grads.is_ok() && cfg.target_kl.is_some_and(|t| approx_kl > 1.5 * t) {
                st.early_stopped = true;
                break 'epochs;
            }
            let step = grads.and_then(|(g, loss)| Ok((loss, apply_grads_with(models, opt, g, lr_of, cfg.grad_clip)?)));
            let skip = cfg.on_nonfinite == OnNonFinite::Skip;
            let stepped = or_skip_non_finite(step, skip, &mut state.skipped_batches)
                .map_err(|e| e.context(format!("iteration {}, epoch {}, minibatch {}", it + 1, epoch + 1, m + 1)))?;
            if stepped.is_none() {
                continue;
            }
            if epoch == 0 && m == 0 {
                st.first = Some((local.sums[3] / local.tokens as f64, local.sums[2] / local.tokens as f64));
            }
            st.pg_loss += local.pg_loss;
            st.vf_loss += local.vf_loss;
            st.ptx_loss += local.ptx_loss;
            st.minibatches += 1;
            st.tokens += local.tokens;
            for (a, b) in st.sums.iter_mut().zip(local.sums) {
                *a += b;
            }
        }
    }
    Ok(st)
}

/// The loss of one micro-batch: clipped policy loss − entropy bonus + c_v · clipped value loss
/// (+ γ_ptx · LM loss), each sum divided by `denom`.
#[allow(clippy::too_many_arguments)]
fn minibatch_loss<D: FusedOps>(
    cfg: &PpoConfig,
    models: &PpoModels<D>,
    s: &Scored,
    micro: &[usize],
    denom: f64,
    pad: u32,
    ptx: Option<&[u32]>,
    (it, epoch, m, k): (usize, usize, usize, usize),
    st: &mut UpdateStats,
    tape: OwnedTape<f32, D>,
) -> Result<LossOn<D>> {
    let seqs: Vec<&Seq> = micro.iter().map(|&i| &s.seqs[i]).collect();
    let gather = |x: &[Vec<f32>]| -> Vec<f32> { micro.iter().flat_map(|&i| x[i].iter().copied()).collect() };
    let (old, adv, old_v, ret) =
        (gather(&s.old_logprobs), gather(&s.advantages), gather(&s.values), gather(&s.returns));
    let n = old.len();
    let masks = gather_masks(s.masks.as_ref(), micro);
    let (lpe, values) = models.forward(&seqs, masks.as_deref(), pad, cfg.temperature, tape)?;
    let pg = host_loss(lpe, |x| {
        let pl = ppo_policy_loss(&x[..n], &old, &adv, cfg.cliprange, denom);
        let entropy: f64 = x[n..].iter().map(|&h| h as f64).sum();
        let mut grad = pl.grad;
        grad.extend(std::iter::repeat_n(-cfg.ent_coef / denom, n));
        st.pg_loss += pl.loss / cfg.grad_accum as f64;
        st.sums[0] += pl.clipfrac * n as f64;
        st.sums[2] += pl.approx_kl * n as f64;
        st.sums[3] += pl.ratio_mean * n as f64;
        st.sums[4] += (pl.ratio_var + pl.ratio_mean * pl.ratio_mean) * n as f64;
        st.sums[5] += entropy;
        (pl.loss - cfg.ent_coef * entropy / denom, grad)
    });
    let vf = host_loss(values, |v| {
        let vl = ppo_value_loss(v, &old_v, &ret, cfg.cliprange_value, denom);
        st.vf_loss += vl.loss / cfg.grad_accum as f64;
        st.sums[1] += vl.clipfrac * n as f64;
        (vl.loss, vl.grad)
    });
    st.tokens += n;
    let loss = pg + vf * cfg.vf_coef as f32;
    let (Some(p), Some(corpus)) = (&cfg.ptx, ptx) else { return Ok(loss) };
    // PPO-ptx: the pretraining loss continues on the same tape
    let (loss, tape) = loss.split_tape();
    let (inputs, targets) = sample_blocks(
        corpus,
        p.block_size,
        p.batch_size,
        cfg.seed,
        (it * cfg.ppo_epochs + epoch) as u64,
        (m * 1000 + k) as u64,
    );
    let lm = crate::stages::pretrain::lm_loss(&models.policy, &inputs, &targets, tape)?;
    st.ptx_loss += lm.as_vec()[0] as f64 / cfg.grad_accum as f64;
    Ok(lm * p.coef as f32 + loss.retaped::<OwnedTape<f32, D>>())
}

/// (mean over sequences of Σ_t k(t), mean over tokens of k(t)).
fn kl_means(s: &Scored) -> (f64, f64) {
    let seq: f64 = s.kl.iter().map(|k| k.iter().map(|&x| x as f64).sum::<f64>()).sum::<f64>() / s.kl.len() as f64;
    let n: usize = s.kl.iter().map(Vec::len).sum();
    let tok: f64 = s.kl.iter().flatten().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64;
    (seq, tok)
}

#[allow(clippy::too_many_arguments)]
fn iteration_metrics(
    step: usize,
    s: &Scored,
    u: &UpdateStats,
    (beta, kl): (f64, f64),
    lr: f64,
    eos_ids: &[u32],
    timing: &[Duration; 3],
) -> serde_json::Value {
    let tokens: usize = s.seqs.iter().map(Seq::resp_len).sum();
    let b = s.seqs.len() as f64;
    let mean_seq = |x: &[Vec<f32>]| x.iter().map(|r| r.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / b;
    let non_score = -beta * kl;
    let scores = s.scores.iter().map(|&x| x as f64).sum::<f64>() / b;
    let t = u.tokens.max(1) as f64;
    let ratio = u.sums[3] / t;
    let mb = u.minibatches.max(1) as f64;
    let mut r = serde_json::json!({
        "step": step,
        "objective/kl": kl,
        "objective/entropy": -mean_seq(&s.old_logprobs),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": scores + non_score,
        "objective/scores": scores,
        "policy/approxkl_avg": u.sums[2] / t,
        "policy/clipfrac_avg": u.sums[0] / t,
        "policy/entropy_avg": u.sums[5] / t,
        "loss/policy_avg": u.pg_loss / mb,
        "loss/value_avg": u.vf_loss / mb,
        "loss/ptx_avg": u.ptx_loss / mb,
        "val/ratio": ratio,
        "val/ratio_var": u.sums[4] / t - ratio * ratio,
        "val/clipfrac_avg": u.sums[1] / t,
        "val/num_eos_tokens": s.seqs.iter().filter(|q| q.ids.last().is_some_and(|t| eos_ids.contains(t))).count(),
        "val/explained_variance": explained_variance(&s.values.concat(), &s.returns.concat()),
        "val/response_length": tokens as f64 / b,
        "objective/beta": beta,
        "lr": lr,
        "debug/first_minibatch_ratio": u.first.map(|f| f.0),
        "debug/first_minibatch_approxkl": u.first.map(|f| f.1),
    });
    for (d, name) in timing.iter().zip(["rollout", "scoring", "update"]) {
        r[format!("timing/{name}")] = d.as_secs_f64().into();
        r[format!("timing/{name}_tokens_per_s")] = (tokens as f64 / d.as_secs_f64().max(1e-9)).into();
    }
    r
}
