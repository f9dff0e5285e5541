//! The environment benchmark (`env_step`) on the workload's PPO rollout shapes: the batched
//! `VecEnv::rollout` (policy stepped token by token, one teacher-forced reference pass, the
//! per-token reward math, one reward call) and plain `VecEnv::step` (reference every step),
//! against the raw batched generation plus one batched reference pass.

use std::sync::Arc;
use std::time::Instant;

use dfdx::prelude::Cpu;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_envs::{
    Detokenizer, EnvError, Episode, KlConfig, KlEstimator, LengthReward, PromptSource, TextEnvConfig, VecEnv,
};
use rlhf_policies::sampling::logprob_at_temperature;
use rlhf_policies::{generate, CausalLm, EngineSession, InferenceModel, KvCache, LogitsAt, SamplingConfig};
use serde::Serialize;

use crate::bench::{median, Workload};

/// Ids rendered as numbers (the benchmark's prompts are random ids, not text).
#[derive(Debug)]
struct IdText;

impl Detokenizer for IdText {
    fn decode(&self, ids: &[u32]) -> Result<String, EnvError> {
        Ok(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "))
    }
}

/// One configured environment benchmark.
#[derive(Debug)]
pub struct EnvBench {
    engine: Arc<InferenceModel>,
    prompts: Vec<Vec<u32>>,
    sampling: SamplingConfig,
    cfg: TextEnvConfig,
}

/// Timings of both paths, tokens/s (median and range over the repeats).
#[derive(Debug, Clone, Serialize)]
pub struct EnvResult {
    /// Model name.
    pub model: String,
    /// Rows × new tokens per run.
    pub tokens: usize,
    /// `VecEnv::rollout` (policy + reference + reward every step), tokens/s: median, min, max.
    pub env_tokens_per_s: [f64; 3],
    /// `generate` + one teacher-forced reference pass, tokens/s: median, min, max.
    pub raw_tokens_per_s: [f64; 3],
    /// `VecEnv::step` token by token (incremental reference every step), tokens/s.
    pub step_tokens_per_s: [f64; 3],
    /// env wall / raw wall (medians); the target is ≤ 1.10.
    pub slowdown: f64,
}

impl EnvBench {
    /// The workload's PPO rollout shapes for `model`: policy = reference (the initial policy,
    /// as at PPO's first iteration), a rule-based reward, EOS suppressed for all tokens.
    pub fn new(w: &Workload, model: &str) -> anyhow::Result<Self> {
        let cfg = w.model_config(model)?;
        let lm = CausalLm::new(cfg, &Cpu::default(), w.seed)?;
        let vocab = lm.dims.vocab as u32;
        let mut rng = StdRng::seed_from_u64(w.seed);
        let p = &w.ppo;
        let prompts = (0..p.batch).map(|_| (0..p.prompt_len).map(|_| rng.gen_range(1..vocab)).collect()).collect();
        let sampling = SamplingConfig {
            max_new_tokens: p.response_len,
            min_new_tokens: p.response_len,
            temperature: w.rollout.temperature,
            eos_ids: vec![0],
            seed: w.seed,
            ..Default::default()
        };
        let cfg = TextEnvConfig {
            vocab,
            max_new_tokens: p.response_len,
            eos_ids: vec![0],
            stop_ids: vec![],
            kl: KlConfig { beta: p.kl_coef, estimator: KlEstimator::K1 },
            score: Default::default(),
        };
        Ok(EnvBench { engine: Arc::new(InferenceModel::from_model(&lm)), prompts, sampling, cfg })
    }

    fn capacity(&self) -> usize {
        self.prompts[0].len() + self.cfg.max_new_tokens
    }

    /// A fresh environment (reference = the engine, length reward) and policy session.
    fn setup(&self) -> anyhow::Result<(VecEnv<EngineSession, LengthReward>, EngineSession)> {
        let b = self.prompts.len();
        let texts = self.prompts.iter().map(|p| (p.clone(), IdText.decode(p).unwrap_or_default())).collect();
        let reference = EngineSession::new(self.engine.clone(), b, self.capacity(), self.sampling.clone());
        let reward = LengthReward { target: 32, scale: 0.01, eos_id: Some(0) };
        let env = VecEnv::new(b, self.cfg.clone(), PromptSource::new(texts, 0)?, reference, reward, Box::new(IdText))?;
        let policy = EngineSession::new(self.engine.clone(), b, self.capacity(), self.sampling.clone());
        Ok((env, policy))
    }

    /// The env path: one `VecEnv::rollout`.
    pub fn run_env(&self) -> anyhow::Result<Vec<Episode>> {
        let (mut env, mut policy) = self.setup()?;
        Ok(env.rollout(&mut policy)?)
    }

    /// The gym path: `VecEnv::reset` then `VecEnv::step` for every token (reference log-probs
    /// one token at a time, auto-reset at the end); returns the number of tokens stepped.
    pub fn run_steps(&self) -> anyhow::Result<usize> {
        let (mut env, mut policy) = self.setup()?;
        let b = self.prompts.len();
        let rows: Vec<usize> = (0..b).collect();
        let obs = env.reset(None)?;
        let prompts: Vec<&[u32]> = obs.iter().map(|(o, _)| o.ids.as_slice()).collect();
        rlhf_envs::Policy::begin(&mut policy, &rows, &prompts)?;
        let mut stepped = 0;
        for t in 0..self.cfg.max_new_tokens {
            let actions = rlhf_envs::Policy::act(&mut policy, &rows)?;
            let steps = env.step(&actions)?;
            stepped += steps.len();
            if t + 1 < self.cfg.max_new_tokens {
                let tokens: Vec<u32> = actions.iter().map(|a| a.token).collect();
                rlhf_envs::Policy::push(&mut policy, &rows, &tokens)?;
            }
        }
        Ok(stepped)
    }

    /// The raw path: `generate`, then one batched teacher-forced reference pass over
    /// prompt + response, returning the reference log-probs of the response tokens.
    pub fn run_raw(&self) -> anyhow::Result<Vec<Vec<f32>>> {
        let out = generate(self.engine.as_ref(), &self.prompts, 0, &self.sampling)?;
        let b = self.prompts.len();
        let seqs: Vec<Vec<u32>> =
            self.prompts.iter().zip(&out.tokens).map(|(p, r)| [p.as_slice(), r].concat()).collect();
        let t = seqs[0].len();
        let mut cache = KvCache::new(&self.engine.dims, vec![0; b], t);
        let logits = self.engine.forward(&mut cache, &seqs.concat(), t, LogitsAt::All)?;
        let v = self.engine.dims.vocab;
        let p = self.prompts[0].len();
        Ok((0..b)
            .map(|r| {
                (p - 1..t - 1)
                    .map(|j| {
                        let row = &logits[(r * t + j) * v..(r * t + j + 1) * v];
                        logprob_at_temperature(row, self.sampling.temperature, seqs[r][j + 1] as usize)
                    })
                    .collect()
            })
            .collect())
    }
}

/// Times both paths (interleaved, warm-up first) for `model`.
pub fn env_step(w: &Workload, model: &str) -> anyhow::Result<EnvResult> {
    let bench = EnvBench::new(w, model)?;
    for _ in 0..w.ppo.warmup {
        bench.run_env()?;
        bench.run_raw()?;
    }
    let (mut env, mut raw, mut step) = (vec![], vec![], vec![]);
    for _ in 0..w.ppo.repeats.max(1) {
        let t0 = Instant::now();
        bench.run_steps()?;
        step.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        bench.run_env()?;
        env.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        bench.run_raw()?;
        raw.push(t0.elapsed().as_secs_f64());
    }
    let tokens = bench.prompts.len() * bench.cfg.max_new_tokens;
    let rates = |walls: &mut Vec<f64>| {
        walls.sort_by(f64::total_cmp);
        let m = median(walls);
        [tokens as f64 / m, tokens as f64 / walls[walls.len() - 1], tokens as f64 / walls[0]]
    };
    let (e, r, st) = (rates(&mut env), rates(&mut raw), rates(&mut step));
    Ok(EnvResult {
        model: model.into(),
        tokens,
        env_tokens_per_s: e,
        raw_tokens_per_s: r,
        step_tokens_per_s: st,
        slowdown: r[0] / e[0],
    })
}
