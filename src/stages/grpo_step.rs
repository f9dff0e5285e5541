//! One iteration of the critic-free trainers — grouped rollout, scoring pass, baseline
//! advantages, `num_iterations` passes of the clipped token loss — as a [`GroupTrainer`], so
//! `rlhf grpo` and `rlhf bench grpo` run the same code.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dfdx::prelude::*;
use rlhf_envs::{
    Detokenizer, EnvError, Episode, KlConfig, KlEstimator, NoReference, PromptSource, RewardModel, Rollout,
    RunningMoments, TextEnvConfig, VecEnv,
};
use rlhf_policies::fused::host_loss;
use rlhf_policies::{policy_sessions, AdamW, CausalLm, FusedOps, GradBuffers, SamplingConfig};
use serde::{Deserialize, Serialize};

use crate::data::mix;
use crate::math::group::{
    clipped_token_loss, dynamic_batch, grpo_advantages, is_informative, reinforce_pp_advantages, remax_advantages,
    rloo_advantages, RewardScale, TokenBatch, Whitening,
};
use crate::stages::common::{
    frozen_names, optimizer_step, or_skip_non_finite, running_score_metrics, share_frozen, shuffled_minibatches,
    untape_frozen, LossOn,
};
use crate::stages::grpo::{Algo, GrpoConfig};
use crate::stages::online_dpo;
use crate::stages::ppo::OnNonFinite;
use crate::stages::ppo_models::{logprobs_and_entropy, policy_and_reference_logprobs, Seq};
use crate::stages::prompts::Prompts;

/// What a checkpoint stores besides the policy and the optimizer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupState {
    /// Prompts drawn so far (the data cursor).
    pub prompt_draws: usize,
    /// Batches skipped for non-finite values.
    pub skipped_batches: usize,
    /// The running statistics of the training scores (`score.running_norm`).
    #[serde(default)]
    pub score_moments: RunningMoments,
}

/// The policy, reference, optimizer and env of a critic-free run, on device `D`; the rollout
/// decodes where `cfg.rollout_engine` says ([`policy_sessions`]).
#[derive(Debug)]
pub struct GroupTrainer<M, D: FusedOps = Cpu> {
    /// The configuration.
    pub cfg: GrpoConfig,
    /// π_θ.
    pub policy: CausalLm<D>,
    /// The frozen π_ref; `None` when β = 0 (no reference forward at all).
    pub reference: Option<CausalLm<D>>,
    /// AdamW over the policy.
    pub opt: AdamW<D>,
    /// The environment (no reference inside: the KL is taken in the scoring pass).
    pub env: VecEnv<NoReference, M>,
    /// The data cursor and skipped batches.
    pub state: GroupState,
    /// ReMax: a copy of the prompts its greedy baselines decode (the env's cursor untouched).
    greedy_prompts: Option<PromptSource>,
    /// Leading blocks the policy keeps frozen and shares, bitwise, with the reference: the
    /// scoring pass runs them once for both (found in [`GroupTrainer::new`]).
    shared_bottom: usize,
    /// The ids that end a completion (none: every completion runs to `max_new_tokens`).
    eos_ids: Vec<u32>,
    pad: u32,
}

/// What one iteration produced.
#[derive(Debug, Clone)]
pub struct GroupOutput {
    /// The rollouts, group-major.
    pub episodes: Vec<Episode>,
    /// Each completion's advantage (its first token's, for REINFORCE++ and ReMax); for online
    /// DPO, +1 for a chosen completion and −1 for a rejected one.
    pub advantages: Vec<f32>,
    /// The `metrics.jsonl` record.
    pub record: serde_json::Value,
    /// Per-phase wall time: rollout, scoring (with advantages), update.
    pub timing: [Duration; 3],
}

/// One generation after the scoring pass (per completion, valid tokens only).
#[derive(Debug, Clone)]
pub(crate) struct Scored {
    pub(crate) seqs: Vec<Seq>,
    pub(crate) old_logprobs: Vec<Vec<f32>>,
    /// Empty when there is no reference.
    pub(crate) ref_logprobs: Vec<Vec<f32>>,
    advantages: Vec<Vec<f32>>,
    /// Mean over completions of `Σ_t (log π_old − log π_ref)` (0 without a reference).
    kl_seq: f64,
    /// Per completion: left out of the loss (`mask_truncated_completions` and no EOS).
    masked: Vec<bool>,
    /// Online DPO: whether each completion is its pair's chosen one (empty otherwise).
    pub(crate) chosen: Vec<bool>,
}

impl Scored {
    /// Tokens the loss counts: those of the completions not masked.
    fn loss_tokens(&self, rows: impl Iterator<Item = usize>) -> usize {
        rows.filter(|&i| !self.masked[i]).map(|i| self.seqs[i].resp_len()).sum()
    }
}

impl<M: RewardModel, D: FusedOps + GradBuffers> GroupTrainer<M, D> {
    /// Builds the env over `prompts` (`(ids, text)`) with `reward`; `eos` ends responses
    /// (`None`: always `max_new_tokens`), `pad` pads batches.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: GrpoConfig,
        mut policy: CausalLm<D>,
        mut reference: Option<CausalLm<D>>,
        mut opt: AdamW<D>,
        state: GroupState,
        prompts: Prompts,
        reward: M,
        detok: Box<dyn Detokenizer>,
        eos_ids: Vec<u32>,
        pad: u32,
    ) -> Result<Self> {
        let env_cfg = TextEnvConfig {
            vocab: policy.dims.vocab as u32,
            max_new_tokens: cfg.max_new_tokens,
            eos_ids: eos_ids.clone(),
            stop_ids: vec![],
            // the KL is the trainer's (scoring pass), not the env's per-token reward
            kl: KlConfig { beta: 0.0, estimator: KlEstimator::K1 },
            score: cfg.score.clone(),
        };
        let source = prompts.source(cfg.seed)?;
        let mut env = VecEnv::new(cfg.batch_size(), env_cfg, source, NoReference, reward, detok)?;
        env.prompts_mut().seek(state.prompt_draws);
        env.set_score_moments(state.score_moments);
        let greedy_prompts = matches!(cfg.algo, Algo::Remax {}).then(|| env.prompts().clone());
        untape_frozen(&mut policy, &mut opt, |_| true)?;
        // one copy of the weights frozen in the policy serves the reference, and a frozen
        // bottom they share runs once per batch (it stays equal all run)
        if let Some(r) = reference.as_mut() {
            let frozen = frozen_names(&policy, &mut opt)?;
            share_frozen((cfg.algo.name(), "the reference"), r, &policy, |n| frozen.contains(n));
        }
        let shared_bottom = reference.as_ref().map_or(0, |r| r.shared_bottom(&policy, policy.frozen_blocks()));
        Ok(GroupTrainer { cfg, policy, reference, opt, env, state, greedy_prompts, shared_bottom, eos_ids, pad })
    }

    /// Iteration `it` (0-based). `None` when the batch was skipped for a non-finite value
    /// (`on_nonfinite = skip`).
    pub fn iteration(&mut self, it: usize) -> Result<Option<GroupOutput>> {
        let out = self.iteration_inner(it);
        self.state.prompt_draws = self.env.prompts().draws();
        self.state.score_moments = self.env.score_moments();
        out
    }

    fn iteration_inner(&mut self, it: usize) -> Result<Option<GroupOutput>> {
        // ALGO: G completions per prompt with the current policy (KV cache, shared prefill)
        let t0 = Instant::now();
        let Some((episodes, generated)) = self.generate(it)? else { return Ok(None) };
        let t_rollout = t0.elapsed();
        let cfg = &self.cfg;
        // ALGO: scoring pass (log π_old, log π_ref) and the algorithm's baseline advantages
        let t1 = Instant::now();
        let greedy = generated.greedy.as_deref();
        let models = (&self.policy, self.reference.as_ref(), self.shared_bottom);
        let scored = score(cfg, models, (&episodes, greedy), self.pad, it)?;
        if scored.advantages.iter().flatten().any(|a| !a.is_finite()) {
            if cfg.on_nonfinite == OnNonFinite::Stop {
                bail!("iteration {}: an advantage is not finite (check the reward)", it + 1);
            }
            self.state.skipped_batches += 1;
            return Ok(None);
        }
        let t_scoring = t1.elapsed();
        // ALGO: num_iterations passes of the clipped token loss over shuffled minibatches
        let t2 = Instant::now();
        let lr = cfg.schedule.at(cfg.optim.lr, cfg.iterations, it);
        let upd = update(cfg, &mut self.policy, &mut self.opt, &scored, it, lr, self.pad, &mut self.state)?;
        let timing = [t_rollout, t_scoring, t2.elapsed()];
        let mut record = metrics(cfg, it + 1, &episodes, &scored, &upd, lr, &self.eos_ids, &timing);
        generated.record(cfg, &timing[0], &mut record);
        running_score_metrics(&cfg.score, &self.env.score_moments(), &mut record);
        let advantages = scored.advantages.iter().map(|a| a.first().copied().unwrap_or(0.0)).collect();
        Ok(Some(GroupOutput { episodes, advantages, record, timing }))
    }

    /// The iteration's groups: one rollout of `prompts_per_step` prompts, or with dynamic
    /// sampling as many as it takes (up to its limit) to hold that many informative groups, of
    /// which the batch is made ([`dynamic_batch`]); for ReMax, also each group's greedy score.
    /// `None` when a rollout was skipped for a non-finite value.
    fn generate(&mut self, it: usize) -> Result<Option<(Vec<Episode>, Generated)>> {
        let cfg = &self.cfg;
        let eos_ids = self.env.config().eos_ids.clone();
        // the sampler (later rollouts of the iteration continue its random streams) and, for
        // ReMax, a greedy one over the same snapshot of the weights
        let mut samplers = vec![sampling(cfg, eos_ids.clone(), mix(cfg.seed, it as u64, 1))];
        if self.greedy_prompts.is_some() {
            samplers.push(SamplingConfig { greedy: true, ..sampling(cfg, eos_ids, 0) });
        }
        let capacity = cfg.max_prompt_len + cfg.max_new_tokens;
        let mut sessions = policy_sessions(&self.policy, cfg.batch_size(), capacity, samplers, cfg.rollout_engine)?;
        // the reward's statistics of the sampled rollouts alone (no evaluation, no greedy decode)
        let _ = self.env.take_reward_stats();
        let opts = Rollout { group_size: cfg.num_generations, reference: false };
        let (g, needed) = (cfg.num_generations, cfg.prompts_per_step);
        let (mut episodes, mut informative) = (vec![], vec![]);
        for _ in 0..cfg.dynamic_sampling.map_or(1, |d| d.max_generation_batches) {
            let rolled = self.env.rollout_with(sessions[0].as_mut(), opts);
            let Some(e) = or_skip(rolled, cfg, &mut self.state, it)? else { return Ok(None) };
            let scores: Vec<f32> = e.iter().map(|e| e.score).collect();
            informative.extend(scores.chunks(g).map(is_informative));
            episodes.extend(e);
            if informative.iter().filter(|&&i| i).count() >= needed {
                break;
            }
        }
        let mut generated = Generated {
            groups: informative.len(),
            informative: informative.iter().filter(|&&i| i).count(),
            tokens: episodes.iter().map(|e| e.response_ids.len()).sum(),
            mean_reward: episodes.iter().map(|e| e.score as f64).sum::<f64>() / episodes.len().max(1) as f64,
            greedy: None,
            reward_stats: self.env.take_reward_stats(),
        };
        if cfg.dynamic_sampling.is_some() {
            let batch = dynamic_batch(&informative, needed);
            episodes = batch.into_iter().flat_map(|k| episodes[k * g..(k + 1) * g].to_vec()).collect();
        }
        if let (Some(source), Some(session)) = (self.greedy_prompts.as_mut(), sessions.get_mut(1)) {
            // ReMax's baselines: each trained group's prompt decoded greedily
            let indices: Vec<usize> = episodes.chunks(g).map(|grp| grp[0].prompt_index).collect();
            let greedy = Rollout { group_size: 1, reference: false };
            let rolled = self.env.rollout_prompts(session.as_mut(), source, &indices, greedy);
            let Some(e) = or_skip(rolled, cfg, &mut self.state, it)? else { return Ok(None) };
            generated.greedy = Some(e.iter().map(|e| e.score).collect());
        }
        Ok(Some((episodes, generated)))
    }
}

/// A rollout's episodes; `None` (the batch counted as skipped) for a non-finite value under
/// `on_nonfinite = skip`; an error otherwise.
fn or_skip(
    rolled: Result<Vec<Episode>, EnvError>,
    cfg: &GrpoConfig,
    state: &mut GroupState,
    it: usize,
) -> Result<Option<Vec<Episode>>> {
    match rolled {
        Ok(e) => Ok(Some(e)),
        Err(EnvError::NonFinite { .. }) if cfg.on_nonfinite == OnNonFinite::Skip => {
            state.skipped_batches += 1;
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("iteration {}: rollout", it + 1))),
    }
}

/// What an iteration's rollouts generated, trained on or not.
#[derive(Debug, Clone)]
struct Generated {
    groups: usize,
    informative: usize,
    /// Response tokens of every rollout.
    tokens: usize,
    /// The mean reward of every completion (`reward` is the trained batch's).
    mean_reward: f64,
    /// The reward's statistics over every completion ([`rlhf_envs::RewardModel::take_stats`]).
    reward_stats: Vec<(String, f64)>,
    /// ReMax: each trained group's greedy score.
    greedy: Option<Vec<f32>>,
}

impl Generated {
    /// The rollout throughput over everything generated (with dynamic sampling, more than the
    /// batch), the reward's statistics, ReMax's greedy reward and dynamic sampling's counts.
    fn record(&self, cfg: &GrpoConfig, rollout: &Duration, record: &mut serde_json::Value) {
        record["timing/rollout_tokens_per_s"] = (self.tokens as f64 / rollout.as_secs_f64().max(1e-9)).into();
        for (k, v) in &self.reward_stats {
            record[k] = (*v).into();
        }
        if let Some(g) = &self.greedy {
            record["remax/greedy_reward"] = (g.iter().map(|&x| x as f64).sum::<f64>() / g.len().max(1) as f64).into();
        }
        if cfg.dynamic_sampling.is_some() {
            let trained_informative = self.informative.min(cfg.prompts_per_step);
            record["dynamic_sampling/generation_batches"] = (self.groups / cfg.prompts_per_step).into();
            record["dynamic_sampling/informative_fraction"] = (self.informative as f64 / self.groups as f64).into();
            record["dynamic_sampling/uninformative_groups"] = (cfg.prompts_per_step - trained_informative).into();
            record["dynamic_sampling/generated_reward"] = self.mean_reward.into();
        }
    }
}

/// The rollout sampler of `cfg` with `seed`.
pub(crate) fn sampling(cfg: &GrpoConfig, eos_ids: Vec<u32>, seed: u64) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        eos_ids,
        seed,
        ..Default::default()
    }
}

/// Minibatches of epoch `epoch` of iteration `it`.
fn minibatches(cfg: &GrpoConfig, it: usize, epoch: usize) -> Vec<Vec<Vec<usize>>> {
    let seed = mix(cfg.seed, it as u64, 2 + epoch as u64);
    if let Algo::OnlineDpo { .. } = cfg.algo {
        return online_dpo::pair_minibatches(cfg.prompts_per_step, cfg.minibatch_size, cfg.grad_accum, seed);
    }
    shuffled_minibatches(cfg.batch_size(), cfg.minibatch_size, cfg.grad_accum, seed)
}

/// Old and reference log-probs (training forward, epoch 0's micro-batches) and advantages.
fn score<D: FusedOps>(
    cfg: &GrpoConfig,
    (policy, reference, shared): (&CausalLm<D>, Option<&CausalLm<D>>, usize),
    (episodes, greedy): (&[Episode], Option<&[f32]>),
    pad: u32,
    it: usize,
) -> Result<Scored> {
    let n = episodes.len();
    let seqs: Vec<Seq> = episodes
        .iter()
        .map(|e| Seq { ids: [e.prompt_ids.as_slice(), &e.response_ids].concat(), prompt_len: e.prompt_ids.len() })
        .collect();
    let (mut old, mut refl) = (vec![vec![]; n], vec![vec![]; if reference.is_some() { n } else { 0 }]);
    for micro in minibatches(cfg, it, 0).iter().flatten() {
        let batch: Vec<&Seq> = micro.iter().map(|&i| &seqs[i]).collect();
        let (lp, rl) = policy_and_reference_logprobs(policy, reference, shared, &batch, pad, cfg.temperature)?;
        let mut off = 0;
        for &i in micro {
            let len = seqs[i].resp_len();
            old[i] = lp[off..off + len].to_vec();
            if let Some(rl) = &rl {
                refl[i] = rl[off..off + len].to_vec();
            }
            off += len;
        }
    }
    let kl_each: Vec<f32> = (0..n)
        .map(|i| if refl.is_empty() { 0.0 } else { old[i].iter().zip(&refl[i]).map(|(o, r)| o - r).sum() })
        .collect();
    let scores: Vec<f32> = episodes.iter().map(|e| e.score).collect();
    let chosen = if let Algo::OnlineDpo { .. } = cfg.algo { online_dpo::chosen(&scores) } else { vec![] };
    let g = cfg.num_generations;
    let broadcast =
        |a: Vec<f32>| -> Vec<Vec<f32>> { a.iter().zip(&seqs).map(|(&a, s)| vec![a; s.resp_len()]).collect() };
    // the one place the algorithms differ
    let advantages = match cfg.algo {
        Algo::Grpo { scale_rewards, std_eps } => broadcast(grpo_advantages(&scores, g, scale_rewards, std_eps)),
        Algo::Rloo { normalize_advantages, normalize_eps } => {
            let eps = normalize_advantages.then_some(normalize_eps);
            broadcast(rloo_advantages(&scores, &kl_each, cfg.beta, g, eps).advantages)
        }
        Algo::ReinforcePp { gamma, whitening, whiten_eps, baseline } => {
            let r = if refl.is_empty() { &old } else { &refl };
            // the baseline variant: scores centred in their group (GRPO's advantages unscaled)
            let scores = if baseline { grpo_advantages(&scores, g, RewardScale::None, 0.0) } else { scores };
            reinforce_pp_advantages(&old, r, &scores, cfg.beta, gamma, whitening, whiten_eps).advantages
        }
        Algo::Remax {} => {
            let r = if refl.is_empty() { &old } else { &refl };
            let returns = reinforce_pp_advantages(&old, r, &scores, cfg.beta, 1.0, Whitening::Biased, 1e-8).returns;
            let greedy: Vec<f32> =
                greedy.expect("ReMax decodes its baselines").iter().flat_map(|&b| vec![b; g]).collect();
            remax_advantages(&returns, &greedy)
        }
        // no advantages: the sign marks the chosen (+1) and rejected (−1) completions
        Algo::OnlineDpo { .. } => broadcast(chosen.iter().map(|&c| if c { 1.0 } else { -1.0 }).collect()),
    };
    let kl_seq = kl_each.iter().map(|&k| k as f64).sum::<f64>() / n.max(1) as f64;
    let masked = episodes.iter().map(|e| cfg.mask_truncated_completions && !e.terminated).collect();
    Ok(Scored { seqs, old_logprobs: old, ref_logprobs: refl, advantages, kl_seq, masked, chosen })
}

/// Token-weighted sums of the update's statistics.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpdateStats {
    pub(crate) loss: f64,
    minibatches: usize,
    /// Token-weighted sums: k3 KL, clip low, clip high, entropy, ratio.
    pub(crate) sums: [f64; 5],
    pub(crate) tokens: usize,
    first_ratio: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
fn update<D: FusedOps + GradBuffers>(
    cfg: &GrpoConfig,
    policy: &mut CausalLm<D>,
    opt: &mut AdamW<D>,
    s: &Scored,
    it: usize,
    lr: f64,
    pad: u32,
    state: &mut GroupState,
) -> Result<UpdateStats> {
    // DAPO's normaliser: the valid tokens of the whole generation (TRL's num_items_in_batch)
    let gen_tokens = s.loss_tokens(0..s.seqs.len()) as f64;
    let mut st = UpdateStats::default();
    for epoch in 0..cfg.num_iterations {
        for (m, mb) in minibatches(cfg, it, epoch).iter().enumerate() {
            let mut local = UpdateStats::default();
            let step = optimizer_step(policy, opt, lr, cfg.grad_clip, mb.len(), |p, k, tape| match cfg.algo {
                Algo::OnlineDpo { loss } => online_dpo::micro_loss(cfg, loss, p, s, &mb[k], pad, &mut local, tape),
                _ => micro_loss(cfg, p, s, &mb[k], gen_tokens / cfg.grad_accum as f64, pad, &mut local, tape),
            });
            let skip = cfg.on_nonfinite == OnNonFinite::Skip;
            let stepped = or_skip_non_finite(step, skip, &mut state.skipped_batches)
                .map_err(|e| e.context(format!("iteration {}, pass {}, minibatch {}", it + 1, epoch + 1, m + 1)))?;
            if stepped.is_none() {
                continue;
            }
            if epoch == 0 && m == 0 && local.tokens > 0 {
                st.first_ratio = Some(local.sums[4] / local.tokens as f64);
            }
            st.loss += local.loss;
            st.minibatches += 1;
            st.tokens += local.tokens;
            for (a, b) in st.sums.iter_mut().zip(local.sums) {
                *a += b;
            }
        }
    }
    Ok(st)
}

/// The clipped token loss of one micro-batch (GRPO adds β·k3; the others fold the KL into
/// their rewards).
#[allow(clippy::too_many_arguments)]
fn micro_loss<D: FusedOps>(
    cfg: &GrpoConfig,
    policy: &CausalLm<D>,
    s: &Scored,
    micro: &[usize],
    normalizer: f64,
    pad: u32,
    st: &mut UpdateStats,
    tape: OwnedTape<f32, D>,
) -> Result<LossOn<D>> {
    let seqs: Vec<&Seq> = micro.iter().map(|&i| &s.seqs[i]).collect();
    // a masked completion enters the loss with no tokens (its rows of the gradient stay 0)
    let pick = |x: &[Vec<f32>]| -> Vec<Vec<f32>> {
        micro.iter().map(|&i| if s.masked[i] { vec![] } else { x[i].clone() }).collect()
    };
    let (old, adv) = (pick(&s.old_logprobs), pick(&s.advantages));
    let kl_in_loss = matches!(cfg.algo, Algo::Grpo { .. }) && !s.ref_logprobs.is_empty();
    let refl = kl_in_loss.then(|| pick(&s.ref_logprobs));
    let lens: Vec<usize> = seqs.iter().map(|q| q.resp_len()).collect();
    let lpe = logprobs_and_entropy(policy, &seqs, pad, cfg.temperature, tape)?;
    Ok(host_loss(lpe, |x| {
        let (all, n) = (lens.iter().sum::<usize>(), old.iter().map(Vec::len).sum::<usize>());
        let starts: Vec<usize> = lens.iter().scan(0, |o, &l| Some(std::mem::replace(o, *o + l))).collect();
        let logprobs: Vec<Vec<f32>> = old.iter().zip(&starts).map(|(o, &at)| x[at..at + o.len()].to_vec()).collect();
        let batch =
            TokenBatch { logprobs: &logprobs, old_logprobs: &old, ref_logprobs: refl.as_deref(), advantages: &adv };
        let beta = if kl_in_loss { cfg.beta } else { 0.0 };
        let out = clipped_token_loss(
            batch,
            (cfg.epsilon_low, cfg.epsilon_high, beta),
            (cfg.loss_type, cfg.importance_sampling_level),
            cfg.max_new_tokens,
            normalizer,
        );
        let nf = n as f64;
        st.loss += out.loss / cfg.grad_accum as f64;
        st.sums[0] += out.kl * nf;
        st.sums[1] += out.clip_low * nf;
        st.sums[2] += out.clip_high * nf;
        let entropy = &x[all..];
        st.sums[3] +=
            old.iter().zip(&starts).flat_map(|(o, &at)| &entropy[at..at + o.len()]).map(|&h| h as f64).sum::<f64>();
        st.sums[4] += logprobs.concat().iter().zip(old.concat()).map(|(&l, o)| ((l - o) as f64).exp()).sum::<f64>();
        st.tokens += n;
        let mut grad = vec![0.0; x.len()];
        for (g, &at) in out.grad.iter().zip(&starts) {
            grad[at..at + g.len()].copy_from_slice(g);
        }
        (out.loss, grad)
    }))
}

#[allow(clippy::too_many_arguments)]
fn metrics(
    cfg: &GrpoConfig,
    step: usize,
    episodes: &[Episode],
    s: &Scored,
    u: &UpdateStats,
    lr: f64,
    eos_ids: &[u32],
    timing: &[Duration; 3],
) -> serde_json::Value {
    let scores: Vec<f64> = episodes.iter().map(|e| e.score as f64).collect();
    let b = scores.len().max(1) as f64;
    let mean = scores.iter().sum::<f64>() / b;
    let std = (scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (b - 1.0).max(1.0)).sqrt();
    let zero_std = scores.chunks(cfg.num_generations).filter(|g| g.iter().all(|&x| x == g[0])).count();
    let tokens: usize = s.seqs.iter().map(Seq::resp_len).sum();
    let t = u.tokens.max(1) as f64;
    let mut r = serde_json::json!({
        "step": step,
        "reward": mean,
        "reward_std": std,
        "frac_reward_zero_std": zero_std as f64 / (b / cfg.num_generations as f64),
        "kl": if matches!(cfg.algo, Algo::Grpo { .. }) { u.sums[0] / t } else { s.kl_seq },
        "kl_seq": s.kl_seq,
        "entropy": u.sums[3] / t,
        "clip_ratio/low_mean": u.sums[1] / t,
        "clip_ratio/high_mean": u.sums[2] / t,
        "clip_ratio/region_mean": (u.sums[1] + u.sums[2]) / t,
        "loss": u.loss / u.minibatches.max(1) as f64,
        "completions/mean_length": tokens as f64 / b,
        "completions/clipped_ratio": episodes.iter().filter(|e| !e.terminated).count() as f64 / b,
        "completions/num_eos": s.seqs.iter().filter(|q| q.ids.last().is_some_and(|t| eos_ids.contains(t))).count(),
        "lr": lr,
        "debug/first_minibatch_ratio": u.first_ratio,
    });
    if let Algo::OnlineDpo { .. } = cfg.algo {
        online_dpo::reward_metrics(cfg.beta, s, &mut r);
    }
    // the rollout's throughput is over everything it generated ([`Generated::record`])
    for (d, name) in timing.iter().zip(["rollout", "scoring", "update"]) {
        r[format!("timing/{name}")] = d.as_secs_f64().into();
        if name != "rollout" {
            r[format!("timing/{name}_tokens_per_s")] = (tokens as f64 / d.as_secs_f64().max(1e-9)).into();
        }
    }
    r
}
