//! Critic-free online RL on the PPO environment — GRPO, RLOO, REINFORCE++ and ReMax (`rlhf
//! grpo`, `rlhf rloo`, `rlhf reinforce-pp`, `rlhf remax`). Each iteration samples G
//! completions for each of P prompts (group-major, the shared prompt prefilled once), scores
//! them with the reward, replaces the critic with a baseline, and takes `num_iterations`
//! passes of the clipped token loss over minibatches:
//!
//! ```text
//! GRPO:        A_i = (r_i − mean_group) / (std_group + ε),  loss term β·k3(π_θ‖π_ref)
//! RLOO:        A_i = R_i − mean_{j≠i} R_j,   R = r − β·Σ_t (log π_old − log π_ref)
//! REINFORCE++: A_t = whiten(Σ_{s≥t} γ^{s−t}(−β·k1_s + r·[s = last]))   (−baseline: r − mean_group)
//! ReMax:       A_t = Σ_{s≥t} (−β·k1_s + r·[s = last]) − r(x, ȳ_greedy)
//! Online DPO:  the better-scored of 2 completions chosen, −log σ(β·h) (no advantages)
//! ```
//! With DAPO's dynamic sampling, groups whose rewards are all equal are replaced by more
//! prompts' groups. The math is [`crate::math::group`]; the iteration is
//! [`crate::stages::grpo_step`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rlhf_envs::{RewardModel, ScoreConfig};
use rlhf_policies::{AdamW, AdamWConfig, CausalLm, FusedOps, GradBuffers, RolloutEngine};
use serde::{Deserialize, Serialize};

use crate::device::DeviceKind;
use crate::math::dpo::DpoLoss;
use crate::math::group::{ImportanceLevel, LossAggregation, RewardScale, Whitening};
use crate::prompt_format::ChatPrompt;
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{read_state, require_counts, restore_latest, save_with};
use crate::stages::grpo_step::{self, GroupState, GroupTrainer};
use crate::stages::policy_eval::{online_prompts, prompts_and_eval, EvalNames};
use crate::stages::ppo::OnNonFinite;
use crate::stages::prompts::with_reference;
use crate::stages::reward_spec::{build_reward, check_reward_inputs, resolve_models, Reward, RewardSpec};

/// The algorithm and its own parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Algo {
    /// GRPO (Shao et al. 2024) / Dr. GRPO (`scale_rewards: none`).
    Grpo {
        /// Divide the centred rewards by the group's std, the batch's, or not. Default `group`.
        #[serde(default)]
        scale_rewards: RewardScale,
        /// ε added to the std. Default `1e-4`.
        #[serde(default = "std_eps")]
        std_eps: f64,
    },
    /// RLOO (Ahmadian et al. 2024).
    Rloo {
        /// Standardise the advantages over the batch. Default `false` (TRL's default).
        #[serde(default)]
        normalize_advantages: bool,
        /// ε of that standardisation. Default `1e-4`.
        #[serde(default = "std_eps")]
        normalize_eps: f64,
    },
    /// REINFORCE++ (Hu 2025).
    ReinforcePp {
        /// γ of the returns. Default `1`.
        #[serde(default = "one")]
        gamma: f64,
        /// Biased (OpenRLHF, default) or unbiased (verl) whitening.
        #[serde(default)]
        whitening: Whitening,
        /// ε of the whitening. Default `1e-8`.
        #[serde(default = "whiten_eps")]
        whiten_eps: f64,
        /// REINFORCE++-baseline (OpenRLHF's `reinforce_baseline`): each score minus its
        /// group's mean before the KL shaping and the global whitening. Needs
        /// `num_generations` ≥ 2. Default `false`.
        #[serde(default)]
        baseline: bool,
    },
    /// ReMax (Li et al. 2023): the baseline of a prompt's completions is the reward of its
    /// greedy response, decoded by the current policy each iteration (one more rollout of
    /// `prompts_per_step` rows); per-token returns of the KL-shaped reward (as REINFORCE++'s,
    /// γ = 1) minus it, not whitened. Works with `num_generations` 1 (the paper's setting).
    Remax {},
    /// Online DPO (Guo et al. 2024; TRL's `OnlineDPOTrainer`): `num_generations` 2, the
    /// better-scored completion chosen, and `loss` (any pairwise loss of `rlhf dpo`; `beta` is
    /// its β — TRL's default is 0.1) against the frozen reference instead of the clipped token
    /// loss ([`crate::stages::online_dpo`]). TRL takes one step per generation:
    /// `num_iterations` 1 and `minibatch_size` the whole batch.
    OnlineDpo {
        /// The pairwise loss. Default `{"kind": "sigmoid"}` (DPO).
        #[serde(default = "sigmoid")]
        loss: DpoLoss,
    },
}

fn sigmoid() -> DpoLoss {
    DpoLoss::Sigmoid {}
}

fn std_eps() -> f64 {
    1e-4
}
fn one() -> f64 {
    1.0
}
fn whiten_eps() -> f64 {
    1e-8
}

impl Algo {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            Algo::Grpo { .. } => "grpo",
            Algo::Rloo { .. } => "rloo",
            Algo::ReinforcePp { .. } => "reinforce-pp",
            Algo::Remax {} => "remax",
            Algo::OnlineDpo { .. } => "online-dpo",
        }
    }
}

/// DAPO's dynamic sampling (Yu et al. 2025, §3.2; verl's `filter_groups`): an iteration keeps
/// rolling out `prompts_per_step` more prompts until it has that many groups whose rewards are
/// not all equal, and trains on those (the first ones, in generation order).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicSampling {
    /// The most rollouts of `prompts_per_step` prompts an iteration makes (verl's
    /// `max_num_gen_batches`; DAPO's recipe uses 10). When they hold too few informative groups,
    /// the earliest uninformative ones fill the batch (counted in
    /// `dynamic_sampling/uninformative_groups`) — where verl stops the run with an error, this
    /// trains on the batch plain GRPO would. Default `10`.
    #[serde(default = "ten")]
    pub max_generation_batches: usize,
}

fn ten() -> usize {
    10
}

/// `rlhf grpo` / `rloo` / `reinforce-pp` configuration. Defaults follow the workload's
/// `trl_grpo` shapes and TRL's `GRPOConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Run folder. Default `runs/grpo`.
    pub out_dir: PathBuf,
    /// Seed of prompts, sampling and minibatch order. Default `1337`.
    pub seed: u64,
    /// The algorithm. Default GRPO.
    pub algo: Algo,
    /// The SFT checkpoint: the initial policy and the frozen reference. Required.
    pub policy: PathBuf,
    /// The reward. Required.
    pub reward: Option<RewardSpec>,
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
    /// Prompts per iteration, P. Default `8`.
    pub prompts_per_step: usize,
    /// Completions per prompt, G (k). Default `4`.
    pub num_generations: usize,
    /// Response length limit. Default `64`.
    pub max_new_tokens: usize,
    /// Sampling temperature; log-probs everywhere use `logits / temperature`. Default `1.0`.
    pub temperature: f32,
    /// Iterations (generations). Default `100`.
    pub iterations: usize,
    /// Passes over each generation's completions (TRL's `num_iterations`). Default `4`.
    pub num_iterations: usize,
    /// Completions per optimizer step. Default `8`.
    pub minibatch_size: usize,
    /// Micro-batches per optimizer step. Default `1`.
    pub grad_accum: usize,
    /// ε_low of the ratio clip. Default `0.2`.
    pub epsilon_low: f64,
    /// ε_high (clip-higher: DAPO uses 0.28). Default `0.2`.
    pub epsilon_high: f64,
    /// β of the KL to the reference (GRPO: k3 loss term; RLOO: sequence k1 in the reward;
    /// REINFORCE++: per-token k1 in the reward). `0`: no reference forward at all. Default `0.04`.
    pub beta: f64,
    /// How per-token losses are aggregated. Default `dapo` (TRL's default).
    pub loss_type: LossAggregation,
    /// The importance ratio of the clipped loss: `token` (default) or `sequence` (GSPO, TRL's
    /// `importance_sampling_level`: one length-normalised ratio per completion; the paper
    /// clips it with ε_low 3e-4 and ε_high 4e-4).
    pub importance_sampling_level: ImportanceLevel,
    /// Leave completions that hit `max_new_tokens` without EOS out of the loss (DAPO's overlong
    /// filtering, TRL's `mask_truncated_completions`): their tokens count nowhere, not even in
    /// the normalisers; they still take part in their group's baseline. Default `false`.
    pub mask_truncated_completions: bool,
    /// Present: DAPO's dynamic sampling, e.g. `{}` or `{"max_generation_batches": 4}`: groups
    /// whose completions all score the same (all right or all wrong) are replaced by fresh
    /// prompts' groups. Each rollout draws from the prompt data. Default: none.
    pub dynamic_sampling: Option<DynamicSampling>,
    /// Score processing (normalise, clip, missing-EOS rule). Default: raw score.
    pub score: ScoreConfig,
    /// AdamW; `lr` is the peak learning rate. Default lr 1e-6 (TRL), no weight decay.
    pub optim: AdamWConfig,
    /// Shape of the learning rate over the iterations (peak `optim.lr`; one rate for every
    /// step of an iteration). Default: constant.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
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
    /// Device of the policy, the reference and a learned reward: `cpu` (default) or `cuda` (GPU
    /// 0, a build with `--features cuda`; the rollout then decodes there too).
    pub device: DeviceKind,
    /// Where rollouts decode: `auto` (default: the host engine on the CPU, the model's own
    /// KV-cached decode on a GPU), `host` (the CPU engine from a copy of the weights, also on a
    /// GPU), `device`, or `fused` (the CUDA engine: custom kernels and cuBLAS over a GPU copy of
    /// the weights; CUDA builds).
    pub rollout_engine: RolloutEngine,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            out_dir: "runs/grpo".into(),
            seed: 1337,
            algo: Algo::Grpo { scale_rewards: RewardScale::Group, std_eps: 1e-4 },
            policy: PathBuf::new(),
            reward: None,
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
            prompts_per_step: 8,
            num_generations: 4,
            max_new_tokens: 64,
            temperature: 1.0,
            iterations: 100,
            num_iterations: 4,
            minibatch_size: 8,
            grad_accum: 1,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.04,
            loss_type: LossAggregation::Dapo,
            importance_sampling_level: ImportanceLevel::Token,
            mask_truncated_completions: false,
            dynamic_sampling: None,
            score: ScoreConfig::default(),
            optim: AdamWConfig { lr: 1e-6, ..Default::default() },
            schedule: LrSchedule::constant(),
            grad_clip: 1.0,
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

impl GrpoConfig {
    /// Completions per iteration, `P · G`.
    pub fn batch_size(&self) -> usize {
        self.prompts_per_step * self.num_generations
    }
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct GrpoReport {
    /// Iterations done.
    pub iterations: usize,
    /// Mean reward of each iteration's completions.
    pub rewards: Vec<f64>,
    /// Batches skipped for non-finite values.
    pub skipped_batches: usize,
    /// Prompts skipped for being longer than `max_prompt_len`.
    pub skipped_prompts: usize,
    /// The held-out evaluations of this process: `step` and the `eval/…` means.
    pub evaluations: Vec<serde_json::Value>,
}

/// Runs (or, with `resume`, continues) the configured algorithm with the config's reward; a
/// learned reward model runs on the trainer's device.
pub fn train(mut cfg: GrpoConfig, resume: bool) -> Result<GrpoReport> {
    validate(&cfg)?;
    resolve_models(&mut cfg.policy, cfg.reward.as_mut())?;
    crate::on_device!(cfg.device, dev => {
        let reward = build_reward(cfg.reward.as_ref(), dev)?;
        train_on(cfg, resume, reward, dev)
    })
}

/// Runs with any [`RewardModel`] as the reward.
pub fn train_with_reward(mut cfg: GrpoConfig, resume: bool, reward: Box<dyn RewardModel>) -> Result<GrpoReport> {
    validate(&cfg)?;
    resolve_models(&mut cfg.policy, cfg.reward.as_mut())?;
    crate::on_device!(cfg.device, dev => train_on(cfg, resume, Reward::Other(reward), dev))
}

fn train_on<D: FusedOps + GradBuffers>(
    cfg: GrpoConfig,
    resume: bool,
    reward: Reward<D>,
    dev: &D,
) -> Result<GrpoReport> {
    let run = RunDir::open(&cfg.out_dir, resume)?.keep_last(cfg.keep_checkpoints);
    let stage = cfg.algo.name();
    // BOILERPLATE: policy, frozen reference (only when β > 0), optimizer (fresh or restored)
    let (reference, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&cfg.policy, dev)
        .with_context(|| format!("policy {}", cfg.policy.display()))?;
    let (policy, opt, start, state) = if resume {
        let r = restore_latest::<_, CausalLm<D>>(&run, &cfg.optim, dev)?;
        let state: GroupState = read_state(&run.checkpoint_dir(r.step), "grpo_state.json")?;
        (r.model, r.opt, r.step, state)
    } else {
        let mut policy = reference.frozen_copy();
        crate::stages::lora_state::attach(&mut policy, &cfg.optim, cfg.seed)?;
        run.write_config(&cfg)?;
        (policy, AdamW::new(cfg.optim.clone()), 0, GroupState::default())
    };
    let eos = tok.eos_for(&reference.config).context("the policy's tokenizer has no EOS token")?;
    let (eos_ids, pad) = (tok.eos_ids_for(&reference.config), tok.pad_id().unwrap_or(eos));
    let sampling = grpo_step::sampling(&cfg, eos_ids.clone(), 0);
    let (prompts, mut eval, skipped_prompts) =
        prompts_and_eval(online_prompts!(cfg, stage), &tok, &reference, sampling, pad, EVAL_NAMES)?;
    let reference = (cfg.beta != 0.0).then_some(reference);
    let (iterations, every, sample_every, sample_count) =
        (cfg.iterations, cfg.checkpoint_every, cfg.sample_every, cfg.sample_count);
    let detok = Box::new(tok.clone());
    let reward = reward.for_policy(&tok, &eos_ids)?;
    let mut trainer = GroupTrainer::new(cfg, policy, reference, opt, state, prompts, reward, detok, eos_ids, pad)?;
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut report =
        GrpoReport { iterations, rewards: vec![], skipped_batches: 0, skipped_prompts, evaluations: vec![] };
    let mut bar = crate::progress::bar(iterations as u64, stage);
    bar.set_position(start as u64);
    if start == 0 {
        let t = &mut trainer;
        let record = eval.record(0, None, &mut t.env, &t.policy, t.reference.as_ref(), &tok, &mut samples)?;
        record.map(|r| metrics.write(&r)).transpose()?;
    }
    for it in start..iterations {
        let out = trainer.iteration(it)?;
        let (t, record) = (&mut trainer, out.as_ref().map(|o| o.record.clone()));
        let record = eval.record(it + 1, record, &mut t.env, &t.policy, t.reference.as_ref(), &tok, &mut samples)?;
        record.map(|r| metrics.write(&r)).transpose()?;
        if let Some(out) = out {
            // BOILERPLATE: samples, progress
            let reward = out.record["reward"].as_f64().unwrap_or(f64::NAN);
            report.rewards.push(reward);
            if (it + 1) % sample_every == 0 || it == start {
                for (ep, adv) in out.episodes.iter().zip(&out.advantages).take(sample_count) {
                    let row = serde_json::json!({"step": it + 1, "prompt": tok.decode(&ep.prompt_ids)?,
                        "completion": tok.decode(&ep.response_ids)?, "reward": ep.score, "advantage": adv});
                    samples.write(&with_reference(row, trainer.env.prompts(), ep.prompt_index))?;
                }
            }
            let rollout = out.record["timing/rollout_tokens_per_s"].as_f64().unwrap_or(0.0);
            let kl = out.record["kl"].as_f64().unwrap_or(0.0);
            bar.set_message(format!("reward {reward:.3} kl {kl:.3} | rollout {rollout:.0} tok/s"));
        }
        bar.inc(1);
        crate::stop::end_step(stage, &run, (it + 1, iterations, every), || {
            let st = trainer.state.clone();
            save_with(&run, (it + 1, None), &trainer.policy, &mut trainer.opt, |dir| {
                trainer.policy.save_pretrained(dir, Some(&tok))?;
                std::fs::write(dir.join("grpo_state.json"), serde_json::to_string_pretty(&st)?)?;
                Ok(())
            })
        })?;
    }
    bar.finish();
    report.skipped_batches = trainer.state.skipped_batches;
    report.evaluations = eval.into_summaries();
    Ok(report)
}

/// How the critic-free trainers name their held-out evaluation (TRL's GRPO names under
/// `eval/`).
const EVAL_NAMES: EvalNames = EvalNames {
    score: "reward",
    raw_score: "raw_reward",
    length: "completions/mean_length",
    response: "completion",
    sample_score: "reward",
};

fn validate(cfg: &GrpoConfig) -> Result<()> {
    require_counts(&[
        ("prompts_per_step", cfg.prompts_per_step),
        ("num_generations", cfg.num_generations),
        ("minibatch_size", cfg.minibatch_size),
        ("grad_accum", cfg.grad_accum),
        ("num_iterations", cfg.num_iterations),
        ("iterations", cfg.iterations),
        ("max_new_tokens", cfg.max_new_tokens),
        ("checkpoint_every", cfg.checkpoint_every),
        ("sample_every", cfg.sample_every),
        ("eval_every", cfg.eval_every),
        ("eval_samples_per_prompt", cfg.eval_samples_per_prompt),
        ("dynamic_sampling.max_generation_batches", cfg.dynamic_sampling.map_or(1, |d| d.max_generation_batches)),
    ])?;
    crate::stages::policy_eval::check_samples_per_prompt(
        cfg.eval_samples_per_prompt,
        cfg.batch_size(),
        cfg.eval_greedy,
    )?;
    crate::stages::common::require_fraction("val_fraction", cfg.val_fraction)?;
    crate::stages::common::require_positive(&[("grad_clip", cfg.grad_clip)])?;
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    let b = cfg.batch_size();
    if !b.is_multiple_of(cfg.minibatch_size) || !cfg.minibatch_size.is_multiple_of(cfg.grad_accum) {
        bail!(
            "prompts_per_step × num_generations ({b}) must be a multiple of minibatch_size ({}), and that of \
             grad_accum ({})",
            cfg.minibatch_size,
            cfg.grad_accum
        );
    }
    if matches!(cfg.algo, Algo::Rloo { .. }) && cfg.num_generations < 2 {
        bail!("RLOO needs num_generations ≥ 2 (the baseline is the mean of the other completions)");
    }
    if matches!(cfg.algo, Algo::ReinforcePp { baseline: true, .. }) && cfg.num_generations < 2 {
        bail!(
            "REINFORCE++-baseline needs num_generations ≥ 2 (a group of one is its own mean: every score would be 0)"
        );
    }
    if cfg.dynamic_sampling.is_some() && cfg.num_generations < 2 {
        bail!("dynamic_sampling needs num_generations ≥ 2 (a group of one never has two different rewards)");
    }
    if let Algo::OnlineDpo { loss } = cfg.algo {
        validate_online_dpo(cfg, loss)?;
    }
    if matches!(cfg.algo, Algo::Grpo { .. }) && cfg.num_generations < 2 {
        bail!("GRPO needs num_generations ≥ 2 (a group of one is its own mean: every advantage would be 0)");
    }
    if cfg.policy.as_os_str().is_empty() || cfg.prompts.as_os_str().is_empty() {
        bail!("policy and prompts are required (an SFT checkpoint folder and a JSONL file)");
    }
    if cfg.temperature <= 0.0 || cfg.temperature.is_nan() {
        bail!("temperature must be positive, got {}", cfg.temperature);
    }
    if cfg.beta < 0.0 || cfg.epsilon_low < 0.0 || cfg.epsilon_high < 0.0 || cfg.epsilon_low >= 1.0 {
        bail!("beta and the clip ranges must be non-negative (and epsilon_low below 1)");
    }
    check_reward_inputs(cfg.reward.as_ref(), cfg.reference_field.as_deref())
}

fn validate_online_dpo(cfg: &GrpoConfig, loss: DpoLoss) -> Result<()> {
    if cfg.num_generations != 2 {
        bail!("online DPO compares two completions per prompt: num_generations must be 2, got {}", cfg.num_generations);
    }
    if !cfg.minibatch_size.is_multiple_of(2 * cfg.grad_accum) {
        bail!("online DPO keeps pairs whole: minibatch_size must be a multiple of 2 × grad_accum");
    }
    if matches!(loss, DpoLoss::Kto { .. }) {
        bail!("online DPO takes a pairwise loss (sigmoid, cdpo, robust, hinge, ipo, simpo, orpo), not kto");
    }
    if cfg.beta <= 0.0 || cfg.mask_truncated_completions {
        bail!("online DPO needs beta > 0 (DPO's β) and no mask_truncated_completions (use score.missing_eos)");
    }
    Ok(())
}
