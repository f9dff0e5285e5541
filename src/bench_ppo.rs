//! The workload's PPO iteration (`workload.ppo`): 32 random prompts of 32 tokens → exactly 64
//! sampled tokens each (KV cache) → scoring pass (policy, reference, critic, reward model) →
//! GAE and whitening → 4 epochs × 4 minibatches of 8 — run by the trainer `rlhf ppo` uses.

use std::collections::BTreeMap;

use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_envs::{Detokenizer, EnvError};
use rlhf_policies::{AdamW, AdamWConfig, CausalLm, FusedOps, GradBuffers, LearnedReward, RolloutEngine, ScalarHead};
use serde::Serialize;

use crate::bench::{PhaseTimes, Workload};
use crate::device::DeviceKind;
use crate::math::ppo::{KlControl, KlController};
use crate::schedule::LrSchedule;
use crate::stages::ppo::PpoConfig;
use crate::stages::ppo_models::{Critic, PpoModels, ValueModelConfig};
use crate::stages::ppo_step::{PpoState, PpoTrainer};

/// Random-id prompts have no text: the benchmark's reward model reads ids.
#[derive(Debug)]
pub(crate) struct NoText;

impl Detokenizer for NoText {
    fn decode(&self, _ids: &[u32]) -> Result<String, EnvError> {
        Ok(String::new())
    }
}

/// Seconds per PPO iteration and its phases.
#[derive(Debug, Clone, Serialize)]
pub struct PpoBenchResult {
    /// Model name.
    pub model: String,
    /// `shared` or `separate`.
    pub value_model: String,
    /// Where the models run.
    pub device: DeviceKind,
    /// Where the rollout decodes.
    pub rollout_engine: RolloutEngine,
    /// Median seconds per iteration.
    pub seconds: f64,
    /// Fastest and slowest iteration.
    pub range: [f64; 2],
    /// Median seconds of each phase (rollout, scoring incl. advantages, update).
    pub phases: BTreeMap<String, f64>,
    /// Mean score of the last iteration (a sanity check).
    pub score_mean: f64,
}

/// A trainer on the workload's models: policy (seed), frozen reference, reward model (GPT-2
/// seed + 1 with a score head) and a shared value head or a critic copied from the reward model,
/// all on `dev`.
pub fn ppo_trainer<D: FusedOps + GradBuffers>(
    w: &Workload,
    model: &str,
    shared: bool,
    dev: &D,
) -> Result<PpoTrainer<LearnedReward<D>, D>> {
    let p = &w.ppo;
    let policy = CausalLm::new(w.model_config(model)?, dev, w.seed)?;
    let reference = policy.frozen_copy();
    let rm = LearnedReward::from_backbone(CausalLm::new(w.model_config(model)?, dev, w.seed + 1)?, 0, w.seed + 1);
    let critic = if shared {
        let c = policy.dims.d_model;
        Critic::Shared(ScalarHead::new(dev, c, 1.0 / ((c + 1) as f32).sqrt(), w.seed + 2))
    } else {
        Critic::Separate(Box::new(LearnedReward::with_head(rm.model.frozen_copy(), rm.head.clone(), 0)))
    };
    let optim = AdamWConfig {
        lr: p.lr,
        betas: p.betas,
        eps: p.eps,
        weight_decay: p.weight_decay,
        no_decay_1d: false,
        ..Default::default()
    };
    let cfg = PpoConfig {
        seed: w.seed,
        batch_size: p.batch,
        max_new_tokens: p.response_len,
        max_prompt_len: p.prompt_len,
        ppo_epochs: p.ppo_epochs,
        minibatch_size: p.minibatch_size,
        cliprange: p.cliprange,
        cliprange_value: p.cliprange_value,
        vf_coef: p.vf_coef,
        gamma: p.gamma,
        lam: p.lam,
        beta: p.kl_coef as f64,
        kl_estimator: crate::math::ppo::KlPenalty::K1,
        grad_clip: p.max_grad_norm,
        optim: optim.clone(),
        schedule: LrSchedule::constant(),
        value_model: if shared { ValueModelConfig::Shared {} } else { ValueModelConfig::Separate { init: None } },
        ..Default::default()
    };
    let vocab = policy.dims.vocab as u32;
    let mut rng = StdRng::seed_from_u64(w.seed);
    let prompts: Vec<(Vec<u32>, String)> = (0..p.batch * 8)
        .map(|_| ((0..p.prompt_len).map(|_| rng.gen_range(0..vocab)).collect(), String::new()))
        .collect();
    let state = PpoState {
        kl: KlController::new(KlControl::Fixed {}, p.kl_coef as f64),
        prompt_draws: 0,
        skipped_batches: 0,
        score_moments: Default::default(),
    };
    let models = PpoModels { policy, critic, shares: Default::default() };
    // EOS suppressed: every response has exactly response_len tokens
    PpoTrainer::new(cfg, models, reference, AdamW::new(optim), state, prompts.into(), rm, Box::new(NoText), vec![], 0)
}

/// Times `workload.ppo` for `model` with a shared or separate critic on `device`.
pub fn ppo_iteration(
    w: &Workload,
    model: &str,
    shared: bool,
    (device, rollout_engine): (DeviceKind, RolloutEngine),
) -> Result<PpoBenchResult> {
    let (times, score_mean) = crate::on_device!(device, dev => {
        let mut t = ppo_trainer(w, model, shared, dev)?;
        t.cfg.rollout_engine = rollout_engine;
        let mut times = PhaseTimes::default();
        let mut score_mean = f64::NAN;
        for it in 0..w.ppo.warmup + w.ppo.repeats.max(1) {
            let out = t.iteration(it)?.ok_or_else(|| anyhow::anyhow!("iteration {it} skipped"))?;
            if it >= w.ppo.warmup {
                times.push(&out.timing);
            }
            score_mean = out.record["objective/scores"].as_f64().unwrap_or(f64::NAN);
        }
        Ok::<_, anyhow::Error>((times, score_mean))
    })?;
    let (seconds, range, phases) = times.summary();
    Ok(PpoBenchResult {
        model: model.into(),
        value_model: if shared { "shared" } else { "separate" }.into(),
        device,
        rollout_engine,
        seconds,
        range,
        phases,
        score_mean,
    })
}
