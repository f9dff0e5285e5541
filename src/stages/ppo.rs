//! Stage 3b, PPO: the policy π_θ (from the SFT checkpoint) is updated to score high on the
//! reward while a per-token KL penalty keeps it near the frozen SFT model π_ref:
//!
//! ```text
//! r_t = −β·k(t) (+ R at the last response token),   A = GAE(γ, λ),
//! L = L^CLIP(θ) + c_v·L^V(φ) − c_H·H(π_θ) (+ γ_ptx · L_LM on a text corpus)
//! ```
//! (Ziegler et al. 2019; Ouyang et al. 2022; the math is in [`crate::math::ppo`]). One
//! iteration: **rollout** B prompts through the env's batched path (KV cache) → **scoring**
//! (log-probs of π_θ and π_ref and values with the training forward, rewards, GAE,
//! whitening) → **update** (`ppo_epochs` × minibatches) → KL-controller step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use rlhf_envs::kl::shaped_rewards;
use rlhf_envs::{
    Episode, KeywordReward, KlConfig, KlEstimator, LengthReward, PromptSource, RewardModel, ScoreConfig, TextEnvConfig,
    VecEnv,
};
use rlhf_policies::fused::host_loss;
use rlhf_policies::{
    AdamW, AdamWConfig, CausalLm, EngineSession, InferenceModel, LearnedReward, SamplingConfig, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::data::{mix, read_corpus, read_jsonl, sample_blocks};
use crate::math::ppo::{explained_variance, gae, ppo_policy_loss, ppo_value_loss, whiten, KlControl, KlController};
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{optimizer_step, restore_latest, save_with, Checkpointable, NonFinite};
use crate::stages::ppo_models::{logprobs_and_entropy, PpoModels, Seq, ValueModelConfig};

/// The reward: a trained reward model, a rule, or an external command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// A checkpoint from `rlhf reward` (or any HF sequence-classification folder).
    Model {
        /// Its folder.
        path: PathBuf,
        /// Apply its stored normalisation (gain and bias). Default `true`.
        #[serde(default = "yes")]
        normalize: bool,
    },
    /// `weight ·` occurrences of the keywords in the response text.
    Keywords {
        /// Words or phrases.
        keywords: Vec<String>,
        /// Reward per occurrence. Default `1`.
        #[serde(default = "unit")]
        weight: f32,
    },
    /// `−scale · |length − target|` in tokens.
    Length {
        /// Preferred length.
        target: usize,
        /// Penalty per token. Default `0.1`.
        #[serde(default = "tenth")]
        scale: f32,
    },
    /// A long-lived process speaking JSON lines (see `rlhf_envs::CommandReward`).
    Command {
        /// Program.
        program: String,
        /// Arguments.
        #[serde(default)]
        args: Vec<String>,
        /// Seconds to wait for each reply. Default `60`.
        #[serde(default = "sixty")]
        timeout_s: u64,
    },
}

fn yes() -> bool {
    true
}
fn unit() -> f32 {
    1.0
}
fn tenth() -> f32 {
    0.1
}
fn sixty() -> u64 {
    60
}

/// The unit of the KL the adaptive controller compares with its target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlUnit {
    /// Per-sequence sum, averaged over the batch (Ziegler et al.; TRL's `objective/kl`).
    #[default]
    SequenceSum,
    /// Mean over all response tokens.
    TokenMean,
}

/// What to do when a loss, reward or advantage is NaN or infinite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop with an error naming the iteration and the quantity.
    #[default]
    Stop,
    /// Skip that batch (or minibatch) and count it in `skipped_batches`.
    Skip,
}

/// PPO-ptx (InstructGPT): `γ_ptx ·` next-token loss on random blocks of a text corpus, added to
/// every minibatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtxConfig {
    /// γ_ptx.
    pub coef: f64,
    /// Text files.
    pub files: Vec<PathBuf>,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks per minibatch.
    pub batch_size: usize,
}

/// `rlhf ppo` configuration. Defaults follow the workload's PPO shapes and TRL's PPO defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Run folder. Default `runs/ppo`.
    pub out_dir: PathBuf,
    /// Seed of prompts, sampling and minibatch order. Default `1337`.
    pub seed: u64,
    /// The SFT checkpoint: the initial policy and the frozen reference. Required.
    pub policy: PathBuf,
    /// The reward. Required.
    pub reward: Option<RewardSpec>,
    /// The critic. Default: separate, from the reward model.
    pub value_model: ValueModelConfig,
    /// JSONL prompts. Required.
    pub prompts: PathBuf,
    /// Field holding the prompt. Default `prompt`.
    pub prompt_field: String,
    /// Prompt template; `{prompt}` is replaced. Default `{prompt}`.
    pub prompt_template: String,
    /// Longer prompts are skipped (counted and reported). Default `64`.
    pub max_prompt_len: usize,
    /// Rollouts per iteration, B. Default `32`.
    pub batch_size: usize,
    /// Response length limit. Default `64`.
    pub max_new_tokens: usize,
    /// Sampling temperature; log-probs everywhere use `logits / temperature`. Default `1.0`.
    pub temperature: f32,
    /// Iterations. Default `100`.
    pub iterations: usize,
    /// Passes over each batch. Default `4`.
    pub ppo_epochs: usize,
    /// Rollouts per minibatch. Default `8`.
    pub minibatch_size: usize,
    /// Micro-batches per minibatch (gradient accumulation). Default `1`.
    pub grad_accum: usize,
    /// ε of the policy ratio clip. Default `0.2`.
    pub cliprange: f64,
    /// ε_v of the value clip. Default `0.2`.
    pub cliprange_value: f64,
    /// c_v. Default `0.1`.
    pub vf_coef: f64,
    /// c_H, the entropy bonus. Default `0`.
    pub ent_coef: f64,
    /// γ. Default `1`.
    pub gamma: f32,
    /// λ. Default `0.95`.
    pub lam: f32,
    /// Initial β. Default `0.05`.
    pub beta: f64,
    /// KL estimator in the reward. Default `k1`.
    pub kl_estimator: KlEstimator,
    /// Fixed β (default) or the adaptive controller.
    pub kl_control: KlControl,
    /// Unit of the KL the controller sees. Default `sequence_sum`.
    pub kl_unit: KlUnit,
    /// Score processing (normalise, clip, missing-EOS rule). Default: raw score.
    pub score: ScoreConfig,
    /// Whiten the per-token rewards (TRL's `whiten_rewards`, mean kept). Default `false`.
    pub whiten_rewards: bool,
    /// Whiten the advantages over the batch. Default `true`.
    pub whiten_advantages: bool,
    /// AdamW. Default lr 1e-5 (TRL), no weight decay.
    pub optim: AdamWConfig,
    /// Learning rate per optimizer step. Default: constant 1e-5.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
    /// PPO-ptx. Default: off.
    pub ptx: Option<PtxConfig>,
    /// NaN/Inf policy. Default `stop`.
    pub on_nonfinite: OnNonFinite,
    /// Checkpoint every this many iterations (and at the end). Default `20`.
    pub checkpoint_every: usize,
    /// Write samples every this many iterations. Default `10`.
    pub sample_every: usize,
    /// Samples written each time. Default `4`.
    pub sample_count: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            out_dir: "runs/ppo".into(),
            seed: 1337,
            policy: PathBuf::new(),
            reward: None,
            value_model: ValueModelConfig::default(),
            prompts: PathBuf::new(),
            prompt_field: "prompt".into(),
            prompt_template: "{prompt}".into(),
            max_prompt_len: 64,
            batch_size: 32,
            max_new_tokens: 64,
            temperature: 1.0,
            iterations: 100,
            ppo_epochs: 4,
            minibatch_size: 8,
            grad_accum: 1,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ent_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            beta: 0.05,
            kl_estimator: KlEstimator::K1,
            kl_control: KlControl::Fixed,
            kl_unit: KlUnit::SequenceSum,
            score: ScoreConfig::default(),
            whiten_rewards: false,
            whiten_advantages: true,
            optim: AdamWConfig { lr: 1e-5, ..Default::default() },
            schedule: LrSchedule::Constant { lr: 1e-5 },
            grad_clip: 1.0,
            ptx: None,
            on_nonfinite: OnNonFinite::Stop,
            checkpoint_every: 20,
            sample_every: 10,
            sample_count: 4,
        }
    }
}

/// What a checkpoint stores besides the models and the optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PpoState {
    /// The KL controller (β).
    kl: KlController,
    /// Prompts drawn so far (the data cursor).
    prompt_draws: usize,
    /// Batches skipped for non-finite values.
    skipped_batches: usize,
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct PpoReport {
    /// Iterations done.
    pub iterations: usize,
    /// Mean score of each iteration's rollouts.
    pub scores: Vec<f64>,
    /// `objective/kl` of each iteration.
    pub kl: Vec<f64>,
    /// Batches skipped for non-finite values.
    pub skipped_batches: usize,
    /// Prompts skipped for being longer than `max_prompt_len`.
    pub skipped_prompts: usize,
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
}

/// Runs (or, with `resume`, continues) PPO with the reward given in the config.
pub fn train(cfg: PpoConfig, resume: bool) -> Result<PpoReport> {
    let reward = build_reward(&cfg)?;
    train_with_reward(cfg, resume, reward)
}

/// Runs PPO with any [`RewardModel`] (closures, rules, learned, external) as the reward.
pub fn train_with_reward(cfg: PpoConfig, resume: bool, reward: Box<dyn RewardModel>) -> Result<PpoReport> {
    validate(&cfg)?;
    let run = RunDir::create(&cfg.out_dir)?;
    // BOILERPLATE: policy + critic, optimizer and controller (fresh, or the last checkpoint)
    let (reference, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&cfg.policy, &Cpu::default())
        .with_context(|| format!("policy {}", cfg.policy.display()))?;
    let (mut models, mut opt, start, mut state) = if resume {
        let r = restore_latest::<PpoModels>(&run, &cfg.optim)?;
        let state: PpoState = read_state(&run.checkpoint_dir(r.step))?;
        (r.model, r.opt, r.step, state)
    } else {
        let rm_path = match &cfg.reward {
            Some(RewardSpec::Model { path, .. }) => Some(path.as_path()),
            _ => None,
        };
        let models = PpoModels::new(reference.frozen_copy(), &cfg.value_model, rm_path)?;
        run.write_config(&cfg)?;
        let kl = KlController::new(cfg.kl_control, cfg.beta);
        (models, AdamW::new(cfg.optim.clone()), 0, PpoState { kl, prompt_draws: 0, skipped_batches: 0 })
    };
    let eos = tok.eos_id().or(reference.config.eos_token_id()).context("the policy's tokenizer has no EOS token")?;
    let pad = tok.pad_id().unwrap_or(eos);
    // DATA: prompts → the env (reference = the frozen SFT model's KV-cache engine)
    let (prompts, skipped_prompts) = read_prompts(&cfg, &tok)?;
    let ref_engine = Arc::new(InferenceModel::from_model(&reference));
    let capacity = cfg.max_prompt_len + cfg.max_new_tokens;
    let env_cfg = TextEnvConfig {
        vocab: reference.dims.vocab as u32,
        max_new_tokens: cfg.max_new_tokens,
        eos_ids: vec![eos],
        stop_ids: vec![],
        kl: KlConfig { beta: cfg.beta as f32, estimator: cfg.kl_estimator },
        score: cfg.score.clone(),
    };
    let ref_session = EngineSession::new(ref_engine, cfg.batch_size, capacity, sampling(&cfg, eos, 0));
    let mut env = VecEnv::new(
        cfg.batch_size,
        env_cfg,
        PromptSource::new(prompts, cfg.seed)?,
        ref_session,
        reward,
        Box::new(tok.clone()),
    )?;
    env.prompts_mut().seek(state.prompt_draws);
    let ptx = cfg.ptx.as_ref().map(|p| read_corpus(&p.files).and_then(|t| Ok(tok.encode(&t)?))).transpose()?;
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut report =
        PpoReport { iterations: cfg.iterations, scores: vec![], kl: vec![], skipped_batches: 0, skipped_prompts };
    let bar = crate::progress::bar(cfg.iterations as u64, "ppo");
    bar.set_position(start as u64);
    for it in start..cfg.iterations {
        'work: {
            // ALGO: rollout with the current policy (sampling engine with its KV cache)
            let t0 = Instant::now();
            let engine = Arc::new(InferenceModel::from_model(&models.policy));
            let seed = mix(cfg.seed, it as u64, 1);
            let mut session = EngineSession::new(engine, cfg.batch_size, capacity, sampling(&cfg, eos, seed));
            let episodes = match env.rollout(&mut session) {
                Ok(e) => e,
                Err(rlhf_envs::EnvError::NonFinite { .. }) if cfg.on_nonfinite == OnNonFinite::Skip => {
                    state.skipped_batches += 1;
                    break 'work;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("iteration {}: rollout", it + 1))),
            };
            let t_rollout = t0.elapsed();
            // ALGO: scoring pass — log-probs, values, rewards, GAE, whitening
            let t1 = Instant::now();
            let layout = minibatches(&cfg, it, 0);
            let scored = score(&cfg, &models, &reference, &episodes, &layout, pad, state.kl.beta)?;
            let t_scoring = t1.elapsed();
            if let Some(what) = non_finite(&scored) {
                if cfg.on_nonfinite == OnNonFinite::Stop {
                    bail!("iteration {}: {what} is not finite", it + 1);
                }
                state.skipped_batches += 1;
                break 'work;
            }
            // ALGO: ppo_epochs passes of clipped policy + value loss over shuffled minibatches
            let t2 = Instant::now();
            let lr = cfg.schedule.at(it);
            let upd = update(&cfg, &mut models, &mut opt, &scored, it, lr, pad, ptx.as_deref(), &mut state)?;
            let t_update = t2.elapsed();
            // ALGO: KL control
            let (kl_seq, kl_tok) = kl_means(&scored);
            let beta = state.kl.beta;
            state.kl.update(if cfg.kl_unit == KlUnit::SequenceSum { kl_seq } else { kl_tok }, cfg.batch_size);
            // BOILERPLATE: metrics and samples
            let tokens: usize = scored.seqs.iter().map(Seq::resp_len).sum();
            let timing = [(t_rollout, "rollout"), (t_scoring, "scoring"), (t_update, "update")];
            let record = iteration_metrics(it + 1, &scored, &upd, beta, lr, tokens, eos, &timing);
            metrics.write(&record)?;
            let mean_score = record["objective/scores"].as_f64().unwrap_or(f64::NAN);
            report.scores.push(mean_score);
            report.kl.push(kl_seq);
            if (it + 1) % cfg.sample_every == 0 || it == start {
                for (ep, k) in episodes.iter().zip(&scored.kl).take(cfg.sample_count) {
                    let kl: f32 = k.iter().sum();
                    samples.write(&serde_json::json!({"step": it + 1, "prompt": tok.decode(&ep.prompt_ids)?,
                        "response": tok.decode(&ep.response_ids)?, "score": ep.score, "kl": kl}))?;
                }
            }
            let rollout_tok_s = tokens as f64 / t_rollout.as_secs_f64();
            bar.set_message(format!("score {mean_score:.3} kl {kl_seq:.3} | rollout {rollout_tok_s:.0} tok/s"));
        }
        bar.inc(1);
        state.prompt_draws = env.prompts().draws();
        if (it + 1) % cfg.checkpoint_every == 0 || it + 1 == cfg.iterations {
            let st = state.clone();
            save_with(&run, it + 1, &models, &mut opt, |dir| {
                models.save_dir(dir, &tok)?;
                std::fs::write(dir.join("ppo_state.json"), serde_json::to_string_pretty(&st)?)?;
                Ok(())
            })?;
        }
    }
    bar.finish();
    report.skipped_batches = state.skipped_batches;
    Ok(report)
}

fn sampling(cfg: &PpoConfig, eos: u32, seed: u64) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        eos_ids: vec![eos],
        seed,
        ..Default::default()
    }
}

/// Minibatches (episode indices) of epoch `epoch` of iteration `it`, each split into
/// `grad_accum` micro-batches. The scoring pass walks epoch 0's layout, so the first
/// minibatch sees bit-identical inputs and its ratio is exactly 1.
fn minibatches(cfg: &PpoConfig, it: usize, epoch: usize) -> Vec<Vec<Vec<usize>>> {
    let mut perm: Vec<usize> = (0..cfg.batch_size).collect();
    perm.shuffle(&mut StdRng::seed_from_u64(mix(cfg.seed, it as u64, 2 + epoch as u64)));
    let micro = cfg.minibatch_size / cfg.grad_accum;
    perm.chunks(cfg.minibatch_size).map(|mb| mb.chunks(micro).map(<[usize]>::to_vec).collect()).collect()
}

/// The scoring pass over `episodes`, micro-batch by micro-batch in `layout`.
fn score(
    cfg: &PpoConfig,
    models: &PpoModels,
    reference: &CausalLm<Cpu>,
    episodes: &[Episode],
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
    };
    for micro in layout.iter().flatten() {
        let batch: Vec<&Seq> = micro.iter().map(|&i| &s.seqs[i]).collect();
        let (lpe, values) = models.forward(&batch, pad, cfg.temperature, NoneTape)?;
        let ref_lpe = logprobs_and_entropy(reference, &batch, pad, cfg.temperature, NoneTape)?.as_vec();
        let (lpe, values) = (lpe.as_vec(), values.as_vec());
        let mut off = 0;
        for &i in micro {
            let len = s.seqs[i].resp_len();
            s.old_logprobs[i] = lpe[off..off + len].to_vec();
            s.ref_logprobs[i] = ref_lpe[off..off + len].to_vec();
            s.values[i] = values[off..off + len].to_vec();
            off += len;
        }
    }
    let kl_cfg = KlConfig { beta: beta as f32, estimator: cfg.kl_estimator };
    s.kl = (0..n).map(|i| rlhf_envs::kl::kl_terms(&s.old_logprobs[i], &s.ref_logprobs[i], cfg.kl_estimator)).collect();
    s.rewards = (0..n).map(|i| shaped_rewards(&s.old_logprobs[i], &s.ref_logprobs[i], &kl_cfg, s.scores[i])).collect();
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
}

#[allow(clippy::too_many_arguments)]
fn update(
    cfg: &PpoConfig,
    models: &mut PpoModels,
    opt: &mut AdamW<Cpu>,
    s: &Scored,
    it: usize,
    lr: f64,
    pad: u32,
    ptx: Option<&[u32]>,
    state: &mut PpoState,
) -> Result<UpdateStats> {
    let mut st = UpdateStats::default();
    for epoch in 0..cfg.ppo_epochs {
        for (m, mb) in minibatches(cfg, it, epoch).iter().enumerate() {
            let mb_tokens: usize = mb.iter().flatten().map(|&i| s.seqs[i].resp_len()).sum();
            let denom = mb_tokens as f64 / cfg.grad_accum as f64;
            let mut local = UpdateStats::default();
            let step = optimizer_step(models, opt, lr, cfg.grad_clip, mb.len(), |models, k, tape| {
                minibatch_loss(cfg, models, s, &mb[k], denom, pad, ptx, (it, epoch, m, k), &mut local, tape)
            });
            match step {
                Ok(_) => {}
                Err(e) if cfg.on_nonfinite == OnNonFinite::Skip && e.downcast_ref::<NonFinite>().is_some() => {
                    state.skipped_batches += 1;
                    continue;
                }
                Err(e) => {
                    return Err(e.context(format!("iteration {}, epoch {}, minibatch {}", it + 1, epoch + 1, m + 1)))
                }
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
fn minibatch_loss(
    cfg: &PpoConfig,
    models: &PpoModels,
    s: &Scored,
    micro: &[usize],
    denom: f64,
    pad: u32,
    ptx: Option<&[u32]>,
    (it, epoch, m, k): (usize, usize, usize, usize),
    st: &mut UpdateStats,
    tape: OwnedTape<f32, Cpu>,
) -> Result<crate::stages::common::Loss> {
    let seqs: Vec<&Seq> = micro.iter().map(|&i| &s.seqs[i]).collect();
    let gather = |x: &[Vec<f32>]| -> Vec<f32> { micro.iter().flat_map(|&i| x[i].iter().copied()).collect() };
    let (old, adv, old_v, ret) =
        (gather(&s.old_logprobs), gather(&s.advantages), gather(&s.values), gather(&s.returns));
    let n = old.len();
    let (lpe, values) = models.forward(&seqs, pad, cfg.temperature, tape)?;
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
    st.ptx_loss += lm.array() as f64 / cfg.grad_accum as f64;
    Ok(lm * p.coef as f32 + loss.retaped::<OwnedTape<f32, Cpu>>())
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
    beta: f64,
    lr: f64,
    tokens: usize,
    eos: u32,
    timing: &[(Duration, &str)],
) -> serde_json::Value {
    let b = s.seqs.len() as f64;
    let mean_seq = |x: &[Vec<f32>]| x.iter().map(|r| r.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / b;
    let (kl, _) = kl_means(s);
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
        "val/num_eos_tokens": s.seqs.iter().filter(|q| q.ids.last() == Some(&eos)).count(),
        "val/explained_variance": explained_variance(&s.values.concat(), &s.returns.concat()),
        "val/response_length": tokens as f64 / b,
        "objective/beta": beta,
        "lr": lr,
        "debug/first_minibatch_ratio": u.first.map(|f| f.0),
        "debug/first_minibatch_approxkl": u.first.map(|f| f.1),
    });
    for (d, name) in timing {
        r[format!("timing/{name}")] = d.as_secs_f64().into();
        r[format!("timing/{name}_tokens_per_s")] = (tokens as f64 / d.as_secs_f64().max(1e-9)).into();
    }
    r
}

fn build_reward(cfg: &PpoConfig) -> Result<Box<dyn RewardModel>> {
    Ok(match cfg.reward.as_ref().context("reward is required (e.g. {\"kind\": \"model\", \"path\": ...})")? {
        RewardSpec::Model { path, normalize } => {
            let (mut rm, norm) = LearnedReward::load_pretrained(path, &Cpu::default())
                .with_context(|| format!("reward model {}", path.display()))?;
            if *normalize {
                rm.norm = norm.map(|n| n.as_score_norm());
            }
            Box::new(rm)
        }
        RewardSpec::Keywords { keywords, weight } => {
            Box::new(KeywordReward { keywords: keywords.clone(), weight: *weight })
        }
        RewardSpec::Length { target, scale } => Box::new(LengthReward { target: *target, scale: *scale, eos_id: None }),
        RewardSpec::Command { program, args, timeout_s } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Box::new(rlhf_envs::CommandReward::spawn(program, &args, Duration::from_secs(*timeout_s))?)
        }
    })
}

/// Tokenized prompts (`(ids, text)`) and the number skipped as too long.
fn read_prompts(cfg: &PpoConfig, tok: &Tokenizer) -> Result<(Vec<(Vec<u32>, String)>, usize)> {
    let (mut out, mut skipped) = (vec![], 0);
    for r in read_jsonl(&cfg.prompts)? {
        let text = cfg.prompt_template.replace("{prompt}", &r.str(&cfg.prompt_field)?);
        let ids = tok.encode(&text)?;
        if ids.is_empty() {
            return Err(r.error("the prompt encodes to no tokens"));
        }
        if ids.len() > cfg.max_prompt_len {
            skipped += 1;
            continue;
        }
        out.push((ids, text));
    }
    if skipped > 0 {
        eprintln!("ppo: {skipped} prompts longer than max_prompt_len {} skipped", cfg.max_prompt_len);
    }
    if out.is_empty() {
        bail!("{}: no prompts left ({skipped} longer than max_prompt_len)", cfg.prompts.display());
    }
    Ok((out, skipped))
}

fn read_state(dir: &std::path::Path) -> Result<PpoState> {
    let p = dir.join("ppo_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", p.display()))
}

fn validate(cfg: &PpoConfig) -> Result<()> {
    for (name, v) in [
        ("batch_size", cfg.batch_size),
        ("minibatch_size", cfg.minibatch_size),
        ("grad_accum", cfg.grad_accum),
        ("ppo_epochs", cfg.ppo_epochs),
        ("iterations", cfg.iterations),
        ("max_new_tokens", cfg.max_new_tokens),
        ("checkpoint_every", cfg.checkpoint_every),
        ("sample_every", cfg.sample_every),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    if cfg.batch_size % cfg.minibatch_size != 0 || cfg.minibatch_size % cfg.grad_accum != 0 {
        bail!(
            "batch_size ({}) must be a multiple of minibatch_size ({}), and that of grad_accum ({})",
            cfg.batch_size,
            cfg.minibatch_size,
            cfg.grad_accum
        );
    }
    if cfg.policy.as_os_str().is_empty() || cfg.prompts.as_os_str().is_empty() {
        bail!("policy and prompts are required (an SFT checkpoint folder and a JSONL file)");
    }
    if cfg.temperature <= 0.0 || cfg.temperature.is_nan() {
        bail!("temperature must be positive, got {}", cfg.temperature);
    }
    if !(0.0..=1.0).contains(&cfg.lam) || !(0.0..=1.0).contains(&cfg.gamma) {
        bail!("gamma and lam must be in [0, 1]");
    }
    Ok(())
}
