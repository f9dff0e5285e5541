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

use anyhow::{bail, Context, Result};
use rlhf_envs::{PromptSource, RewardModel, ScoreConfig};
use rlhf_policies::{AdamW, AdamWConfig, CausalLm, FusedOps, GradBuffers, RolloutEngine, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::data::read_corpus;
use crate::device::DeviceKind;
use crate::math::ppo::{KlControl, KlController, KlPenalty};
use crate::prompt_format::ChatPrompt;
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{read_state, restore_latest, save_with, Checkpointable};
use crate::stages::nlpo::{self, NlpoConfig};
use crate::stages::policy_eval::{online_prompts, prompts_and_eval, EvalNames};
use crate::stages::ppo_models::{PpoModels, ValueModelConfig};
use crate::stages::ppo_step::{self, IterationOutput, PpoState, PpoTrainer};
use crate::stages::prompts::with_reference;
use crate::stages::reward_spec::{
    build_reward, check_reward_inputs, check_same_vocabulary, resolve_models, Reward, RewardSpec,
};

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
    /// Field holding each prompt's reference answer (e.g. `answer` in GSM8K), handed to the
    /// reward; required by the `answer` reward. Default: none.
    pub reference_field: Option<String>,
    /// Prompt template; `{prompt}` is replaced. Default `{prompt}`.
    pub prompt_template: String,
    /// Present: each templated prompt becomes the user turn of the policy's own chat template,
    /// with the assistant's turn opened (as `rlhf generate --chat`). Prompts that are
    /// conversations (lists of `{role, content}`) take the chat template with or without it;
    /// its `system` is added to those without a system message. Default: none.
    pub chat: Option<ChatPrompt>,
    /// Longer prompts are skipped (counted and reported). Default `64`.
    pub max_prompt_len: usize,
    /// Held-out prompts (JSONL, read like `prompts`: the same field, template, chat and
    /// length limit), sampled at every evaluation and never trained on. Default: none.
    pub val_prompts: Option<PathBuf>,
    /// Without `val_prompts`: hold out the last this fraction of `prompts` (rounded). Default
    /// `0`, no evaluation (holding prompts out changes which ones train).
    pub val_fraction: f64,
    /// Evaluate on the held-out prompts before the first iteration, every this many
    /// iterations and after the last. Default `10`.
    pub eval_every: usize,
    /// Decode the held-out prompts greedily (argmax; verl's validation default) instead of
    /// sampling at the training temperature. `eval/kl` is then left out: the log-ratio of a
    /// greedy response is not a KL estimate. Default `false`.
    pub eval_greedy: bool,
    /// Samples per held-out prompt at each evaluation (the means are over all of them; more
    /// samples, less noise). At most the rollout batch; 1 with `eval_greedy`. Default `1`.
    pub eval_samples_per_prompt: usize,
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
    /// Early stopping (SB3's `target_kl`, TRL's `early_stopping`): a minibatch whose approximate
    /// KL to π_old, `½·mean((log π_θ − log π_old)²)` over its tokens before its step, exceeds
    /// 1.5 × this is not stepped, and the iteration's remaining minibatches and epochs are
    /// skipped (`policy/early_stop`, `policy/minibatches` in the metrics). Default: none.
    pub target_kl: Option<f64>,
    /// c_H, the entropy bonus. Default `0`.
    pub ent_coef: f64,
    /// γ. Default `1`.
    pub gamma: f32,
    /// λ. Default `0.95`.
    pub lam: f32,
    /// Initial β. Default `0.05`.
    pub beta: f64,
    /// The per-token KL term in the reward: `k1`, `k2`, `k3`, `abs` (from the sampled token's
    /// log-probs) or `full` (the exact KL over the vocabulary, TRL's `kl_penalty = "full"`;
    /// see [`KlPenalty`]). Default `k1`.
    pub kl_estimator: KlPenalty,
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
    /// AdamW; `lr` is the peak learning rate. Default lr 1e-5 (TRL), no weight decay.
    pub optim: AdamWConfig,
    /// The critic's own peak learning rate (its parameters, `value.*`: a separate critic's
    /// whole model, or a shared critic's head), on the same schedule — OpenRLHF's and verl's
    /// separate critic rate (e.g. 9e-6 beside the policy's 5e-7). Default: `optim.lr`.
    pub critic_lr: Option<f64>,
    /// Critic warm-up (verl's `critic_warmup`, OpenRLHF's `freezing_actor_steps`): for this
    /// many first iterations only the critic learns, so the rollouts keep coming from the SFT
    /// policy while the values catch up. The policy's parameters sit the steps out as
    /// OpenRLHF's frozen actor does: not stepped, not in the gradient norm, their Adam moments
    /// and step count untouched, so its first step after is Adam's first. (With a shared
    /// critic only its head, `value.*`, learns meanwhile: the trunk is the policy's.) The
    /// logged `lr` is 0 meanwhile. Default `0`.
    pub critic_warmup_iterations: usize,
    /// Shape of the learning rate over the iterations (peak `optim.lr`; one rate for every
    /// minibatch of an iteration). Default: constant.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
    /// PPO-ptx. Default: off.
    pub ptx: Option<PtxConfig>,
    /// NLPO: sample and train within the top-p nucleus of a periodically synced copy of the
    /// policy ([`crate::stages::nlpo`]); `{}` takes RL4LMs' settings. Default: off (PPO).
    pub nlpo: Option<NlpoConfig>,
    /// NaN/Inf policy. Default `stop`.
    pub on_nonfinite: OnNonFinite,
    /// Checkpoint every this many iterations (and at the end). Default `20`.
    pub checkpoint_every: usize,
    /// Keep only the newest this many checkpoints, deleting older ones as new ones are
    /// written (0 keeps every one). Default `0`.
    pub keep_checkpoints: usize,
    /// Write samples every this many iterations. Default `10`.
    pub sample_every: usize,
    /// Samples written each time. Default `4`.
    pub sample_count: usize,
    /// Device of the models (policy, reference, critic, learned reward): `cpu` (default) or
    /// `cuda` (GPU 0, a build with `--features cuda`; the rollout then decodes there too).
    pub device: DeviceKind,
    /// Where rollouts decode: `auto` (default: the host engine on the CPU, the model's own
    /// KV-cached decode on a GPU), `host` (the CPU engine from a copy of the weights, also on a
    /// GPU), `device`, or `fused` (the CUDA engine: custom kernels and cuBLAS over a GPU copy of
    /// the weights; CUDA builds).
    pub rollout_engine: RolloutEngine,
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
            reference_field: None,
            prompt_template: "{prompt}".into(),
            chat: None,
            max_prompt_len: 64,
            val_prompts: None,
            val_fraction: 0.0,
            eval_every: 10,
            eval_greedy: false,
            eval_samples_per_prompt: 1,
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
            target_kl: None,
            ent_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            beta: 0.05,
            kl_estimator: KlPenalty::K1,
            kl_control: KlControl::Fixed {},
            kl_unit: KlUnit::SequenceSum,
            score: ScoreConfig::default(),
            whiten_rewards: false,
            whiten_advantages: true,
            optim: AdamWConfig { lr: 1e-5, ..Default::default() },
            critic_lr: None,
            critic_warmup_iterations: 0,
            schedule: LrSchedule::constant(),
            grad_clip: 1.0,
            ptx: None,
            nlpo: None,
            on_nonfinite: OnNonFinite::Stop,
            checkpoint_every: 20,
            keep_checkpoints: 0,
            sample_every: 10,
            sample_count: 4,
            device: DeviceKind::Cpu,
            rollout_engine: RolloutEngine::Auto,
        }
    }
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
    /// The held-out evaluations of this process: `step` and the `eval/…` means.
    pub evaluations: Vec<serde_json::Value>,
}

/// Runs (or, with `resume`, continues) PPO with the reward given in the config; a learned
/// reward model runs on the trainer's device (one device instance, one stream, on a GPU).
pub fn train(mut cfg: PpoConfig, resume: bool) -> Result<PpoReport> {
    prepare(&mut cfg)?;
    crate::on_device!(cfg.device, dev => {
        let reward = build_reward(cfg.reward.as_ref(), dev)?;
        train_on(cfg, resume, reward, dev)
    })
}

/// Runs PPO with any [`RewardModel`] (closures, rules, learned, external) as the reward.
pub fn train_with_reward(mut cfg: PpoConfig, resume: bool, reward: Box<dyn RewardModel>) -> Result<PpoReport> {
    prepare(&mut cfg)?;
    crate::on_device!(cfg.device, dev => train_on(cfg, resume, Reward::Other(reward), dev))
}

/// Validates the config and turns run folders among its model paths into their newest
/// checkpoints ([`crate::run::resolve_model`]).
fn prepare(cfg: &mut PpoConfig) -> Result<()> {
    validate(cfg)?;
    resolve_models(&mut cfg.policy, cfg.reward.as_mut())?;
    if let ValueModelConfig::Separate { init: Some(init) } = &mut cfg.value_model {
        crate::run::resolve_model_in(init)?;
    }
    Ok(())
}

fn train_on<D: FusedOps + GradBuffers>(cfg: PpoConfig, resume: bool, reward: Reward<D>, dev: &D) -> Result<PpoReport> {
    let run = RunDir::open(&cfg.out_dir, resume)?.keep_last(cfg.keep_checkpoints);
    // BOILERPLATE: policy + critic, optimizer and controller (fresh, or the last checkpoint)
    let (reference, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&cfg.policy, dev)
        .with_context(|| format!("policy {}", cfg.policy.display()))?;
    let (models, opt, start, state, mask_policy) = if resume {
        let r = restore_latest::<_, PpoModels<D>>(&run, &cfg.optim, dev)?;
        let state: PpoState = read_state(&run.checkpoint_dir(r.step), "ppo_state.json")?;
        let mask_policy =
            cfg.nlpo.is_some().then(|| nlpo::load_mask_policy(&run.checkpoint_dir(r.step), dev)).transpose()?;
        (r.model, r.opt, r.step, state, mask_policy)
    } else {
        let mut models = new_models(&cfg, &reference, &tok)?;
        crate::stages::lora_state::attach(&mut models, &cfg.optim, cfg.seed)?;
        run.write_config(&cfg)?;
        let kl = KlController::new(cfg.kl_control, cfg.beta);
        (
            models,
            AdamW::new(cfg.optim.clone()),
            0,
            PpoState { kl, prompt_draws: 0, skipped_batches: 0, score_moments: Default::default() },
            None,
        )
    };
    let eos = tok.eos_for(&reference.config).context("the policy's tokenizer has no EOS token")?;
    let (eos_ids, pad) = (tok.eos_ids_for(&reference.config), tok.pad_id().unwrap_or(eos));
    // DATA: prompts (and held-out ones), the PPO-ptx corpus
    let sampling = ppo_step::sampling(&cfg, eos_ids.clone(), 0);
    let (prompts, mut eval, skipped_prompts) =
        prompts_and_eval(online_prompts!(cfg, "ppo"), &tok, &reference, sampling, pad, EVAL_NAMES)?;
    let ptx = cfg.ptx.as_ref().map(|p| read_corpus(&p.files).and_then(|t| Ok(tok.encode(&t)?))).transpose()?;
    let (iterations, every, sample_every, sample_count) =
        (cfg.iterations, cfg.checkpoint_every, cfg.sample_every, cfg.sample_count);
    let detok = Box::new(tok.clone());
    let reward = reward.for_policy(&tok, &eos_ids)?;
    let mut trainer = PpoTrainer::new(cfg, models, reference, opt, state, prompts, reward, detok, eos_ids, pad)?;
    (trainer.ptx, trainer.mask_policy) = (ptx, mask_policy);
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut report =
        PpoReport { iterations, scores: vec![], kl: vec![], skipped_batches: 0, skipped_prompts, evaluations: vec![] };
    let mut bar = crate::progress::bar(iterations as u64, "ppo");
    bar.set_position(start as u64);
    if start == 0 {
        let t = &mut trainer;
        let record = eval.record(0, None, &mut t.env, &t.models.policy, Some(&t.reference), &tok, &mut samples)?;
        record.map(|r| metrics.write(&r)).transpose()?;
    }
    for it in start..iterations {
        let out = trainer.iteration(it)?;
        let (t, record) = (&mut trainer, out.as_ref().map(|o| o.record.clone()));
        let record =
            eval.record(it + 1, record, &mut t.env, &t.models.policy, Some(&t.reference), &tok, &mut samples)?;
        record.map(|r| metrics.write(&r)).transpose()?;
        if let Some(out) = out {
            // BOILERPLATE: samples, progress
            let score = out.record["objective/scores"].as_f64().unwrap_or(f64::NAN);
            let kl = out.record["objective/kl"].as_f64().unwrap_or(f64::NAN);
            report.scores.push(score);
            report.kl.push(kl);
            if (it + 1) % sample_every == 0 || it == start {
                samples.write_all(&sample_rows(&out, it + 1, sample_count, &tok, trainer.env.prompts())?)?;
            }
            let rollout = out.record["timing/rollout_tokens_per_s"].as_f64().unwrap_or(0.0);
            bar.set_message(format!("score {score:.3} kl {kl:.3} | rollout {rollout:.0} tok/s"));
        }
        bar.inc(1);
        crate::stop::end_step("ppo", &run, (it + 1, iterations, every), || {
            save_checkpoint(&run, it + 1, &mut trainer, &tok)
        })?;
    }
    bar.finish();
    report.skipped_batches = trainer.state.skipped_batches;
    report.evaluations = eval.into_summaries();
    Ok(report)
}

/// A fresh policy (a copy of the reference) and critic: a separate critic starts from
/// `value_model.init` or the reward model, which must then share the policy's tokenizer.
fn new_models<D: FusedOps>(cfg: &PpoConfig, reference: &CausalLm<D>, tok: &Tokenizer) -> Result<PpoModels<D>> {
    let rm_path = match &cfg.reward {
        Some(RewardSpec::Model { path, .. }) => Some(path.as_path()),
        _ => None,
    };
    if let ValueModelConfig::Separate { init } = &cfg.value_model {
        if let Some(dir) = init.as_deref().or(rm_path) {
            check_same_vocabulary(dir, tok, "the value model's initial checkpoint")?;
        }
    }
    PpoModels::new(reference.frozen_copy(), &cfg.value_model, rm_path)
}

/// Checkpoint `step`: policy and critic, optimizer, `ppo_state.json` (β, data cursor) and
/// NLPO's masking policy.
fn save_checkpoint<M, D: FusedOps + GradBuffers>(
    run: &RunDir,
    step: usize,
    trainer: &mut PpoTrainer<M, D>,
    tok: &Tokenizer,
) -> Result<()> {
    let (models, st, mask_policy) = (&trainer.models, &trainer.state, trainer.mask_policy.as_ref());
    save_with(run, (step, None), models, &mut trainer.opt, |dir| {
        models.save_dir(dir, tok)?;
        mask_policy.map(|m| m.save_pretrained(&dir.join(nlpo::MASK_POLICY_DIR), None)).transpose()?;
        std::fs::write(dir.join("ppo_state.json"), serde_json::to_string_pretty(st)?)?;
        Ok(())
    })
}

/// How PPO names its held-out evaluation (TRL's training names under `eval/`).
const EVAL_NAMES: EvalNames = EvalNames {
    score: "scores",
    raw_score: "raw_scores",
    length: "response_length",
    response: "response",
    sample_score: "score",
};

/// The first `count` rollouts of an iteration as `samples.jsonl` rows.
fn sample_rows(
    out: &IterationOutput,
    step: usize,
    count: usize,
    tok: &Tokenizer,
    prompts: &PromptSource,
) -> Result<Vec<serde_json::Value>> {
    let rows = out.episodes.iter().zip(&out.scored.kl).take(count);
    rows.map(|(ep, k)| {
        let kl: f32 = k.iter().sum();
        let row = serde_json::json!({"step": step, "prompt": tok.decode(&ep.prompt_ids)?,
            "response": tok.decode(&ep.response_ids)?, "score": ep.score, "kl": kl});
        Ok(with_reference(row, prompts, ep.prompt_index))
    })
    .collect()
}

fn validate(cfg: &PpoConfig) -> Result<()> {
    crate::stages::common::require_counts(&[
        ("batch_size", cfg.batch_size),
        ("minibatch_size", cfg.minibatch_size),
        ("grad_accum", cfg.grad_accum),
        ("ppo_epochs", cfg.ppo_epochs),
        ("iterations", cfg.iterations),
        ("max_new_tokens", cfg.max_new_tokens),
        ("checkpoint_every", cfg.checkpoint_every),
        ("sample_every", cfg.sample_every),
        ("eval_every", cfg.eval_every),
        ("eval_samples_per_prompt", cfg.eval_samples_per_prompt),
    ])?;
    crate::stages::policy_eval::check_samples_per_prompt(cfg.eval_samples_per_prompt, cfg.batch_size, cfg.eval_greedy)?;
    crate::stages::common::require_fraction("val_fraction", cfg.val_fraction)?;
    crate::stages::common::require_positive(&[
        ("cliprange", cfg.cliprange),
        ("cliprange_value", cfg.cliprange_value),
        ("grad_clip", cfg.grad_clip),
    ])?;
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    if !(cfg.vf_coef >= 0.0 && cfg.ent_coef.is_finite() && cfg.beta >= 0.0) {
        bail!("vf_coef and beta must be non-negative and ent_coef finite");
    }
    if !cfg.batch_size.is_multiple_of(cfg.minibatch_size) || !cfg.minibatch_size.is_multiple_of(cfg.grad_accum) {
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
    if cfg.critic_warmup_iterations >= cfg.iterations {
        bail!(
            "critic_warmup_iterations ({}) must be below iterations ({}): the policy would never train",
            cfg.critic_warmup_iterations,
            cfg.iterations
        );
    }
    if let Some(c) = cfg.critic_lr.filter(|c| !(c.is_finite() && *c >= 0.0)) {
        bail!("critic_lr must be finite and non-negative, got {c}");
    }
    if let Some(t) = cfg.target_kl.filter(|t| !(t.is_finite() && *t > 0.0)) {
        bail!("target_kl must be positive, got {t}");
    }
    check_reward_inputs(cfg.reward.as_ref(), cfg.reference_field.as_deref())?;
    cfg.nlpo.as_ref().map(NlpoConfig::validate).transpose()?;
    if !(0.0..=1.0).contains(&cfg.lam) || !(0.0..=1.0).contains(&cfg.gamma) {
        bail!("gamma and lam must be in [0, 1]");
    }
    Ok(())
}
