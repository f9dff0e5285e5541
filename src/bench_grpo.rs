//! The workload's critic-free iteration (`workload.trl_grpo`): 8 random prompts of 32 tokens
//! × 4 completions of exactly 64 tokens (KV cache, shared prefill) → scoring pass (policy,
//! reference, reward model) → advantages → 4 passes × 4 optimizer steps of 8 — run by the
//! trainer `rlhf grpo` uses.

use std::collections::BTreeMap;

use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_policies::{AdamW, AdamWConfig, CausalLm, FusedOps, GradBuffers, LearnedReward};
use serde::Serialize;

use crate::bench::{PhaseTimes, Workload};
use crate::bench_ppo::NoText;
use crate::device::DeviceKind;
use crate::schedule::LrSchedule;
use crate::stages::grpo::{Algo, GrpoConfig};
use crate::stages::grpo_step::{GroupState, GroupTrainer};

/// Seconds per iteration and its phases.
#[derive(Debug, Clone, Serialize)]
pub struct GrpoBenchResult {
    /// Model name.
    pub model: String,
    /// `grpo`, `rloo` or `reinforce-pp`.
    pub algo: String,
    /// Where the models train and score.
    pub device: DeviceKind,
    /// Median seconds per iteration.
    pub seconds: f64,
    /// Fastest and slowest iteration.
    pub range: [f64; 2],
    /// Median seconds of each phase (rollout, scoring incl. advantages, update).
    pub phases: BTreeMap<String, f64>,
    /// Mean reward of the last iteration (a sanity check).
    pub reward_mean: f64,
}

/// A trainer on the workload's models: policy (seed), frozen reference, reward model (GPT-2
/// seed + 1 with a score head), as `trl_grpo.py` builds them.
pub fn grpo_trainer<D: FusedOps + GradBuffers>(
    w: &Workload,
    model: &str,
    algo: Algo,
    dev: &D,
) -> Result<GroupTrainer<LearnedReward<D>, D>> {
    let g = &w.trl_grpo;
    let policy = CausalLm::new(w.model_config(model)?, dev, w.seed)?;
    let reference = policy.frozen_copy();
    let rm = LearnedReward::from_backbone(CausalLm::new(w.model_config(model)?, dev, w.seed + 1)?, 0, w.seed + 1);
    let optim = AdamWConfig { lr: g.learning_rate, weight_decay: 0.0, ..Default::default() };
    let cfg = GrpoConfig {
        seed: w.seed,
        algo,
        prompts_per_step: g.prompts_per_step,
        num_generations: g.num_generations,
        max_new_tokens: g.max_completion_length,
        max_prompt_len: g.prompt_len_words,
        num_iterations: g.num_iterations,
        minibatch_size: g.per_device_train_batch_size,
        beta: g.beta,
        optim: optim.clone(),
        schedule: LrSchedule::constant(),
        ..Default::default()
    };
    let vocab = policy.dims.vocab as u32;
    let mut rng = StdRng::seed_from_u64(w.seed);
    let prompts: Vec<(Vec<u32>, String)> = (0..g.prompts_per_step * 8)
        .map(|_| ((0..g.prompt_len_words).map(|_| rng.gen_range(0..vocab)).collect(), String::new()))
        .collect();
    let prompts = prompts.into();
    // EOS suppressed: every completion has exactly max_completion_length tokens
    let state = GroupState::default();
    GroupTrainer::new(cfg, policy, Some(reference), AdamW::new(optim), state, prompts, rm, Box::new(NoText), vec![], 0)
}

/// Times `workload.trl_grpo` for `model` with `algo` on `device`.
pub fn grpo_iteration(w: &Workload, model: &str, algo: Algo, device: DeviceKind) -> Result<GrpoBenchResult> {
    let g = &w.trl_grpo;
    let (times, reward_mean) = crate::on_device!(device, dev => {
        let mut t = grpo_trainer(w, model, algo, dev)?;
        let mut times = PhaseTimes::default();
        let mut reward_mean = f64::NAN;
        for it in 0..g.warmup_iterations + g.repeats.max(1) {
            let out = t.iteration(it)?.ok_or_else(|| anyhow::anyhow!("iteration {it} skipped"))?;
            if it >= g.warmup_iterations {
                times.push(&out.timing);
            }
            reward_mean = out.record["reward"].as_f64().unwrap_or(f64::NAN);
        }
        Ok::<_, anyhow::Error>((times, reward_mean))
    })?;
    let (seconds, range, phases) = times.summary();
    Ok(GrpoBenchResult { model: model.into(), algo: algo.name().into(), device, seconds, range, phases, reward_mean })
}
