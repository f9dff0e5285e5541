//! Benchmarks on the fixed peer workload (`shared/peers/workload.json`): exactly its shapes,
//! sampling settings, warm-up and repeat counts, so numbers compare with the PyTorch baseline.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use dfdx::prelude::{Cpu, HasShape, MeanTo, NoneTape, Rank0, Synchronize};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_policies::{
    generate, Batch, CausalLm, Decode, FusedOps, GradBuffers, InferenceModel, ModelConfig, RolloutEngine,
    SamplingConfig, WeightDtype,
};
use serde::{Deserialize, Serialize};

use crate::device::DeviceKind;

/// The parts of the workload file the benchmarks use (other sections are ignored here).
#[derive(Debug, Clone, Deserialize)]
pub struct Workload {
    /// Threads both sides use.
    pub threads: usize,
    /// Seed for weights and prompts.
    pub seed: u64,
    /// Model configs in HF GPT-2 fields, keyed by name (`tiny`, `small`).
    pub models: BTreeMap<String, serde_json::Value>,
    /// The rollout benchmark.
    pub rollout: RolloutSpec,
    /// The PPO iteration's shapes (the env benchmark uses its rollout part).
    pub ppo: PpoSpec,
    /// One training step.
    pub train_step: TrainStepSpec,
    /// One no-grad forward with full logits.
    pub scoring: ScoringSpec,
    /// TRL's GRPO / RLOO iteration.
    pub trl_grpo: GrpoSpec,
}

/// `workload.trl_grpo` (the fields the benchmark uses).
#[derive(Debug, Clone, Deserialize)]
pub struct GrpoSpec {
    /// Prompts per generation.
    pub prompts_per_step: usize,
    /// Completions per prompt.
    pub num_generations: usize,
    /// Prompt length (random ids).
    pub prompt_len_words: usize,
    /// Completion length (EOS suppressed).
    pub max_completion_length: usize,
    /// β.
    pub beta: f64,
    /// Completions per optimizer step.
    pub per_device_train_batch_size: usize,
    /// Passes over each generation.
    pub num_iterations: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Untimed iterations.
    pub warmup_iterations: usize,
    /// Timed iterations.
    pub repeats: usize,
}

/// `workload.train_step`.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainStepSpec {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Untimed steps.
    pub warmup: usize,
    /// Timed steps.
    pub repeats: usize,
}

/// `workload.scoring`: one no-grad forward over `batch × seq_len` tokens returning the full
/// logits (the cost of a reference, reward or critic pass in PPO).
#[derive(Debug, Clone, Deserialize)]
pub struct ScoringSpec {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Untimed forwards.
    pub warmup: usize,
    /// Timed forwards.
    pub repeats: usize,
}

/// Timing of the training step or the scoring forward.
#[derive(Debug, Clone, Serialize)]
pub struct TrainStepResult {
    /// Model name.
    pub model: String,
    /// Where it ran.
    pub device: DeviceKind,
    /// Tokens per step (batch · seq_len).
    pub tokens: usize,
    /// Median tokens/s.
    pub tokens_per_s: f64,
    /// Slowest / fastest step's tokens/s.
    pub range: [f64; 2],
    /// Last loss (a sanity check that it trains; for scoring, the mean logit).
    pub loss: f32,
}

/// The workload's training step: forward, causal-LM cross-entropy over the batch·(seq−1)
/// predicted positions, backward, AdamW (no clipping) — the pretrain stage's own step.
#[derive(Debug)]
pub struct TrainStepBench<D: FusedOps = Cpu> {
    model: CausalLm<D>,
    opt: rlhf_policies::AdamW<D>,
    inputs: Vec<Vec<u32>>,
    targets: Vec<usize>,
    lr: f64,
    /// Tokens per step (batch · seq_len).
    pub tokens: usize,
}

impl<D: FusedOps + GradBuffers> TrainStepBench<D> {
    /// The seeded model and random token batch of `workload.train_step`, on `dev`.
    pub fn new(w: &Workload, model: &str, dev: &D) -> anyhow::Result<Self> {
        let t = &w.train_step;
        let lm = CausalLm::new(w.model_config(model)?, dev, w.seed)?;
        let seqs = random_batch(w.seed, t.batch, t.seq_len, lm.dims.vocab);
        let optim = rlhf_policies::AdamWConfig {
            lr: t.lr,
            betas: t.betas,
            eps: t.eps,
            weight_decay: t.weight_decay,
            no_decay_1d: false,
            ..Default::default()
        };
        Ok(TrainStepBench {
            model: lm,
            opt: rlhf_policies::AdamW::new(optim),
            inputs: seqs.iter().map(|s| s[..t.seq_len - 1].to_vec()).collect(),
            targets: seqs.iter().flat_map(|s| s[1..].iter().map(|&x| x as usize)).collect(),
            lr: t.lr,
            tokens: t.batch * t.seq_len,
        })
    }

    /// One step; returns the loss.
    pub fn step(&mut self) -> anyhow::Result<f32> {
        let (inputs, targets) = (&self.inputs, &self.targets);
        let (loss, _) = crate::stages::common::optimizer_step(
            &mut self.model,
            &mut self.opt,
            self.lr,
            f64::INFINITY,
            1,
            |m, _, tape| crate::stages::pretrain::lm_loss(m, inputs, targets, tape),
        )?;
        Ok(loss)
    }
}

/// `batch` rows of `len` uniform random ids below `vocab`, drawn from `seed`.
fn random_batch(seed: u64, batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..batch).map(|_| (0..len).map(|_| rng.gen_range(0..vocab as u32)).collect()).collect()
}

/// Times `workload.train_step` for `model` on `device` (warm-up, then timed repeats).
pub fn train_step(w: &Workload, model: &str, device: DeviceKind) -> anyhow::Result<TrainStepResult> {
    crate::on_device!(device, dev => {
        let mut bench = TrainStepBench::new(w, model, dev)?;
        let (walls, loss) = time_units(dev, w.train_step.warmup, w.train_step.repeats, || bench.step())?;
        Ok(rate_result(model, device, bench.tokens, walls, loss))
    })
}

/// Times `workload.scoring` for `model` on `device`: the full-logits forward without a tape.
pub fn scoring(w: &Workload, model: &str, device: DeviceKind) -> anyhow::Result<TrainStepResult> {
    let s = &w.scoring;
    crate::on_device!(device, dev => {
        let lm = CausalLm::new(w.model_config(model)?, dev, w.seed)?;
        let batch = Batch::unpadded(&random_batch(w.seed, s.batch, s.seq_len, lm.dims.vocab))?;
        // what the PyTorch baseline times: the forward, its logits left on the device
        let (walls, logits) = time_units(dev, s.warmup, s.repeats, || Ok(lm.forward(&batch, NoneTape)?))?;
        anyhow::ensure!(*logits.shape() == (s.batch * s.seq_len, lm.dims.vocab), "scoring: logits shape");
        let mean = logits.mean::<Rank0, _>().as_vec()[0];
        Ok(rate_result(model, device, s.batch * s.seq_len, walls, mean))
    })
}

/// Wall seconds of `repeats` calls of `unit` after `warmup` untimed ones, in run order, and
/// the last value it returned. The device is synchronised before each clock stop (a GPU runs
/// its queue asynchronously).
fn time_units<D: Synchronize, R>(
    dev: &D,
    warmup: usize,
    repeats: usize,
    mut unit: impl FnMut() -> anyhow::Result<R>,
) -> anyhow::Result<(Vec<f64>, R)> {
    let mut walls = Vec::new();
    let mut last = None;
    for i in 0..warmup + repeats.max(1) {
        let t0 = Instant::now();
        last = Some(unit()?);
        dev.try_synchronize().map_err(|e| anyhow::anyhow!("synchronising the device: {e:?}"))?;
        if i >= warmup {
            walls.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok((walls, last.expect("at least one run")))
}

fn rate_result(model: &str, device: DeviceKind, tokens: usize, mut walls: Vec<f64>, loss: f32) -> TrainStepResult {
    walls.sort_by(f64::total_cmp);
    TrainStepResult {
        model: model.into(),
        device,
        tokens,
        tokens_per_s: tokens as f64 / median(&walls),
        range: [tokens as f64 / walls[walls.len() - 1], tokens as f64 / walls[0]],
        loss,
    }
}

/// `workload.ppo` (the fields the benchmarks use so far).
#[derive(Debug, Clone, Deserialize)]
pub struct PpoSpec {
    /// Prompts per iteration.
    pub batch: usize,
    /// Prompt length.
    pub prompt_len: usize,
    /// Response length (EOS suppressed).
    pub response_len: usize,
    /// β of the k1 KL penalty.
    pub kl_coef: f32,
    /// GAE γ.
    pub gamma: f32,
    /// GAE λ.
    pub lam: f32,
    /// Passes over the batch.
    pub ppo_epochs: usize,
    /// Sequences per minibatch.
    pub minibatch_size: usize,
    /// Policy ratio clip.
    pub cliprange: f64,
    /// Value clip.
    pub cliprange_value: f64,
    /// Value-loss coefficient.
    pub vf_coef: f64,
    /// Grad-norm clip.
    pub max_grad_norm: f64,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Untimed runs.
    pub warmup: usize,
    /// Timed runs.
    pub repeats: usize,
}

/// `workload.rollout`.
#[derive(Debug, Clone, Deserialize)]
pub struct RolloutSpec {
    /// Batch sizes to run.
    pub batch_sizes: Vec<usize>,
    /// Prompt length (uniform random ids).
    pub prompt_len: usize,
    /// New tokens per row.
    pub max_new_tokens: usize,
    /// EOS is suppressed for this many tokens.
    pub min_new_tokens: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs.
    pub repeats: usize,
}

impl Workload {
    /// Reads a workload file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), e.line()))
    }

    /// The model config named `name`, as an HF config (`architecture` becomes `model_type`).
    pub fn model_config(&self, name: &str) -> anyhow::Result<ModelConfig> {
        let mut v = self
            .models
            .get(name)
            .ok_or_else(|| {
                anyhow::anyhow!("workload has no model {name:?} (has {:?})", self.models.keys().collect::<Vec<_>>())
            })?
            .clone();
        let arch = v.get("architecture").cloned().unwrap_or_else(|| "gpt2".into());
        v["model_type"] = arch;
        Ok(ModelConfig::from_json_str(&v.to_string())?)
    }
}

/// Timing summary of one benchmark cell.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutResult {
    /// Model name.
    pub model: String,
    /// Where it ran.
    pub device: DeviceKind,
    /// What decoded: host (the CPU engine), device (the model's decode), fused (CUDA).
    pub rollout_engine: RolloutEngine,
    /// Batch size.
    pub batch: usize,
    /// Generated tokens per timed run (batch · max_new_tokens).
    pub tokens: usize,
    /// Median tokens/s.
    pub tokens_per_s: f64,
    /// Slowest run's tokens/s.
    pub tokens_per_s_min: f64,
    /// Fastest run's tokens/s.
    pub tokens_per_s_max: f64,
    /// Wall seconds of each timed run.
    pub wall_s: Vec<f64>,
    /// Threads used.
    pub threads: usize,
    /// Storage precision of the rollout weights.
    pub weights: WeightDtype,
}

/// A rollout benchmark instance: the model snapshot, prompts and sampling settings.
#[derive(Debug, Clone)]
pub struct RolloutBench {
    /// The inference snapshot of a freshly initialised model.
    pub engine: InferenceModel,
    /// `batch` prompts of uniform random ids.
    pub prompts: Vec<Vec<u32>>,
    /// The workload's sampling settings.
    pub sampling: SamplingConfig,
}

impl RolloutBench {
    /// Builds the model (seeded init) and prompts for one batch size.
    pub fn new(w: &Workload, model: &str, batch: usize, weights: WeightDtype) -> anyhow::Result<Self> {
        let (cfg, prompts, sampling) = rollout_inputs(w, model, batch)?;
        let lm = CausalLm::new(cfg, &Cpu::default(), w.seed)?;
        Ok(RolloutBench { engine: InferenceModel::from_model_with(&lm, weights), prompts, sampling })
    }

    /// One `generate` call (the timed unit); returns the number of generated tokens.
    pub fn run_once(&self) -> anyhow::Result<usize> {
        let out = generate(&self.engine, &self.prompts, 0, &self.sampling)?;
        Ok(out.tokens.iter().map(Vec::len).sum())
    }
}

/// The model config, `batch` prompts of uniform random ids and the sampling settings of
/// `workload.rollout`.
fn rollout_inputs(
    w: &Workload,
    model: &str,
    batch: usize,
) -> anyhow::Result<(ModelConfig, Vec<Vec<u32>>, SamplingConfig)> {
    let cfg = w.model_config(model)?;
    let r = &w.rollout;
    let prompts = random_batch(w.seed, batch, r.prompt_len, cfg.dims()?.vocab);
    let sampling = SamplingConfig {
        max_new_tokens: r.max_new_tokens,
        min_new_tokens: r.min_new_tokens,
        temperature: r.temperature,
        top_k: r.top_k,
        top_p: r.top_p,
        eos_ids: cfg.eos_token_id().into_iter().collect(),
        seed: w.seed,
        ..SamplingConfig::default()
    };
    Ok((cfg, prompts, sampling))
}

/// Runs the rollout benchmark for `model` at each batch size (warm-up, then timed repeats) on
/// `device` with the rollout `engine` (as PPO's `rollout_engine`): auto is the host engine
/// ([`InferenceModel`], f32 or f16 weights) on the CPU and the model's own KV-cached decode
/// ([`CausalLm::decode`], f32) on a GPU; fused is the CUDA engine (CUDA builds).
pub fn rollout(
    w: &Workload,
    model: &str,
    batches: &[usize],
    weights: WeightDtype,
    (device, engine): (DeviceKind, RolloutEngine),
) -> anyhow::Result<Vec<RolloutResult>> {
    anyhow::ensure!(w.rollout.repeats > 0, "workload rollout.repeats must be at least 1");
    let mut results = Vec::new();
    for &batch in batches {
        let (wall, tokens, engine) =
            crate::on_device!(device, dev => rollout_cell(w, model, batch, weights, engine, dev))?;
        let mut rates: Vec<f64> = wall.iter().map(|s| tokens as f64 / s).collect();
        rates.sort_by(f64::total_cmp);
        results.push(RolloutResult {
            model: model.to_string(),
            device,
            rollout_engine: engine,
            batch,
            tokens,
            tokens_per_s: median(&rates),
            tokens_per_s_min: rates[0],
            tokens_per_s_max: rates[rates.len() - 1],
            wall_s: wall,
            threads: rayon::current_num_threads(),
            weights,
        });
    }
    Ok(results)
}

/// One rollout cell: wall seconds of the timed runs, the tokens of one run and the engine
/// that ran (auto resolved).
fn rollout_cell<D: FusedOps + Synchronize>(
    w: &Workload,
    model: &str,
    batch: usize,
    weights: WeightDtype,
    engine: RolloutEngine,
    dev: &D,
) -> anyhow::Result<(Vec<f64>, usize, RolloutEngine)> {
    let (cfg, prompts, sampling) = rollout_inputs(w, model, batch)?;
    let lm = CausalLm::new(cfg, dev, w.seed)?;
    let engine = engine.resolved::<D>();
    anyhow::ensure!(
        engine == RolloutEngine::Host || weights == WeightDtype::F32,
        "--weights {weights:?} is the host engine's option; the {engine:?} engine decodes in f32"
    );
    let (wall, tokens) = match engine {
        RolloutEngine::Host => {
            time_generate(dev, w, &InferenceModel::from_model_with(&lm, weights), &prompts, &sampling)
        }
        RolloutEngine::Fused => {
            #[cfg(feature = "cuda")]
            {
                let fused = rlhf_policies::cuda_engine::CudaEngine::from_model(&lm)?;
                time_generate(dev, w, &fused, &prompts, &sampling)
            }
            #[cfg(not(feature = "cuda"))]
            Err(crate::device::no_cuda())
        }
        _ => time_generate(dev, w, &lm, &prompts, &sampling),
    }?;
    Ok((wall, tokens, engine))
}

/// The workload's warm-up and timed `generate` calls on `model`: wall seconds of the timed
/// runs and the tokens of one.
fn time_generate<M: Decode>(
    dev: &impl Synchronize,
    w: &Workload,
    model: &M,
    prompts: &[Vec<u32>],
    sampling: &SamplingConfig,
) -> anyhow::Result<(Vec<f64>, usize)> {
    time_units(dev, w.rollout.warmup, w.rollout.repeats, || {
        Ok(generate(model, prompts, 0, sampling)?.tokens.iter().map(Vec::len).sum::<usize>())
    })
}

/// Median of a sorted slice.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Per-phase wall times of timed iterations (rollout, scoring, update), summarised.
#[derive(Debug, Clone, Default)]
pub struct PhaseTimes {
    walls: Vec<f64>,
    phases: [Vec<f64>; 3],
}

impl PhaseTimes {
    /// Records one iteration's phases.
    pub fn push(&mut self, timing: &[std::time::Duration; 3]) {
        self.walls.push(timing.iter().map(|d| d.as_secs_f64()).sum());
        for (p, d) in self.phases.iter_mut().zip(timing) {
            p.push(d.as_secs_f64());
        }
    }

    /// (median seconds, [fastest, slowest], median of each phase by name).
    pub fn summary(mut self) -> (f64, [f64; 2], std::collections::BTreeMap<String, f64>) {
        self.walls.sort_by(f64::total_cmp);
        let phases = ["rollout", "scoring", "update"]
            .iter()
            .zip(self.phases.iter_mut())
            .map(|(n, v)| {
                v.sort_by(f64::total_cmp);
                (n.to_string(), median(v))
            })
            .collect();
        (median(&self.walls), [self.walls[0], self.walls[self.walls.len() - 1]], phases)
    }
}
