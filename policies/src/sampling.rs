//! Batched generation with a KV cache: temperature, top-k, top-p, EOS and stop ids, a per-row
//! finished mask, and the log-prob of every sampled token under the distribution it was drawn
//! from.

use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::Dims;
use crate::device_decode::DeviceKv;
use crate::error::PolicyError;
use crate::fused::FusedOps;
use crate::infer::{InferenceModel, KvCache, LogitsAt};
use crate::kernels::{exp_inplace, WeightDtype};
use crate::model::CausalLm;
use crate::session::RolloutEngine;

/// A model [`generate`] can sample from: a KV cache per batch, and a forward that feeds the next
/// columns and returns each row's last logits.
pub trait Decode {
    /// The cache type.
    type Cache;
    /// Sizes.
    fn dims(&self) -> &Dims;
    /// An empty cache for `pad.len()` rows of at most `cap` columns, row `r` left-padded by
    /// `pad[r]`.
    fn new_cache(&self, pad: Vec<usize>, cap: usize) -> Self::Cache;
    /// Feeds `ids` `(B, n)`; returns the last column's logits `(B, V)` on the host.
    fn feed(&self, cache: &mut Self::Cache, ids: &[u32], n: usize) -> Result<Vec<f32>, PolicyError>;
}

/// The host engine: the CPU's rollout path.
impl Decode for InferenceModel {
    type Cache = KvCache;
    fn dims(&self) -> &Dims {
        &self.dims
    }
    fn new_cache(&self, pad: Vec<usize>, cap: usize) -> KvCache {
        KvCache::new(&self.dims, pad, cap)
    }
    fn feed(&self, cache: &mut KvCache, ids: &[u32], n: usize) -> Result<Vec<f32>, PolicyError> {
        self.forward(cache, ids, n, LogitsAt::Last)
    }
}

/// The model itself, on its device ([`CausalLm::decode`]): the rollout path on a GPU.
impl<D: FusedOps> Decode for CausalLm<D> {
    type Cache = DeviceKv<D>;
    fn dims(&self) -> &Dims {
        &self.dims
    }
    fn new_cache(&self, pad: Vec<usize>, cap: usize) -> DeviceKv<D> {
        DeviceKv::new(self.dims.n_layer, pad, cap)
    }
    fn feed(&self, cache: &mut DeviceKv<D>, ids: &[u32], n: usize) -> Result<Vec<f32>, PolicyError> {
        self.decode(cache, ids, n, LogitsAt::Last)
    }
}

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Maximum number of new tokens per row. Default `64`.
    pub max_new_tokens: usize,
    /// EOS and stop ids are forbidden before this many new tokens (transformers'
    /// `min_new_tokens`). Default `0`.
    pub min_new_tokens: usize,
    /// Logits are divided by this before filtering. Default `1.0`.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `0` disables. Default `0`.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `p`; `1.0` disables.
    /// Default `1.0`.
    pub top_p: f32,
    /// Take the argmax instead of sampling. Default `false`.
    pub greedy: bool,
    /// Ids that end a row (appended to its tokens). Default: none.
    pub eos_ids: Vec<u32>,
    /// Extra ids that also end a row. Default: none.
    pub stop_ids: Vec<u32>,
    /// Seed; row `r` draws from its own RNG seeded from `(seed, r)`, so results do not depend
    /// on thread scheduling. Default `0`.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            min_new_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            greedy: false,
            eos_ids: vec![],
            stop_ids: vec![],
            seed: 0,
        }
    }
}

impl SamplingConfig {
    fn validate(&self) -> Result<(), PolicyError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(PolicyError::Input(format!("temperature must be > 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(PolicyError::Input(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }

    fn ends_row(&self, id: u32) -> bool {
        self.eos_ids.contains(&id) || self.stop_ids.contains(&id)
    }
}

/// What [`generate`] returns, per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens of each row, up to and including its EOS/stop token.
    pub tokens: Vec<Vec<u32>>,
    /// `log p(token)` of each new token under the distribution it was sampled from (after
    /// temperature, top-k, top-p and the min-new-tokens mask). Greedy rows report
    /// `log_softmax(logits / T)` at the argmax.
    pub logprobs: Vec<Vec<f32>>,
    /// Whether the row ended on an EOS or stop id (false: it hit `max_new_tokens`).
    pub finished: Vec<bool>,
}

/// Samples continuations of `prompts` (left-padded with `pad_id` into one batch).
pub fn generate<M: Decode>(
    model: &M,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
) -> Result<Generation, PolicyError> {
    generate_observed(model, prompts, pad_id, cfg, &mut |_| {})
}

/// [`generate`], calling `on_step` with the generation so far after every decode step (to
/// stream the text as it comes).
pub fn generate_observed<M: Decode>(
    model: &M,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    on_step: &mut dyn FnMut(&Generation),
) -> Result<Generation, PolicyError> {
    cfg.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(PolicyError::Input("every prompt needs at least one token".into()));
    }
    let b = prompts.len();
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let d = model.dims();
    if let Some(limit) = d.position_limit().filter(|&l| t + cfg.max_new_tokens > l) {
        return Err(PolicyError::Input(format!(
            "prompt of {t} tokens + max_new_tokens {} exceeds the model's {limit} positions ({})",
            cfg.max_new_tokens,
            d.position_limit_field()
        )));
    }
    let pad: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
    let ids: Vec<u32> =
        prompts.iter().zip(&pad).flat_map(|(p, &k)| std::iter::repeat_n(pad_id, k).chain(p.iter().copied())).collect();
    let mut cache = model.new_cache(pad, t + cfg.max_new_tokens);
    let v = d.vocab;
    let mut rngs: Vec<StdRng> = (0..b).map(|r| StdRng::seed_from_u64(row_seed(cfg.seed, r))).collect();
    let mut out = Generation { tokens: vec![vec![]; b], logprobs: vec![vec![]; b], finished: vec![false; b] };
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut logits = model.feed(&mut cache, &ids, t)?;
    for step in 0..cfg.max_new_tokens {
        let forbid_end = step < cfg.min_new_tokens;
        let picks: Vec<(u32, f32)> = if b >= 8 {
            logits
                .par_chunks_mut(v)
                .zip(rngs.par_iter_mut())
                .map(|(l, rng)| sample_from_logits(l, cfg, forbid_end, rng))
                .collect()
        } else {
            logits
                .chunks_mut(v)
                .zip(rngs.iter_mut())
                .map(|(l, rng)| sample_from_logits(l, cfg, forbid_end, rng))
                .collect()
        };
        let mut next = Vec::with_capacity(b);
        for (r, &(tok, lp)) in picks.iter().enumerate() {
            if out.finished[r] {
                next.push(pad_id);
                continue;
            }
            out.tokens[r].push(tok);
            out.logprobs[r].push(lp);
            out.finished[r] = cfg.ends_row(tok);
            next.push(tok);
        }
        on_step(&out);
        if step + 1 == cfg.max_new_tokens || out.finished.iter().all(|&f| f) {
            break;
        }
        logits = model.feed(&mut cache, &next, 1)?;
    }
    Ok(out)
}

/// [`generate`] from a training model on its device's rollout path
/// ([`RolloutEngine::Auto`]): the host engine from a snapshot of the weights on the CPU, the
/// model's own KV-cached decode elsewhere.
pub fn generate_from<D: FusedOps>(
    model: &CausalLm<D>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
) -> Result<Generation, PolicyError> {
    generate_from_with(model, prompts, pad_id, cfg, WeightDtype::F32)
}

/// [`generate_from`] with the host engine's weights stored as `weights` (the device decode
/// runs in f32 whatever it says).
pub fn generate_from_with<D: FusedOps>(
    model: &CausalLm<D>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    weights: WeightDtype,
) -> Result<Generation, PolicyError> {
    if RolloutEngine::Auto.resolved::<D>() == RolloutEngine::Host {
        generate(&InferenceModel::from_model_with(model, weights), prompts, pad_id, cfg)
    } else {
        generate(model, prompts, pad_id, cfg)
    }
}

/// The seed of row `row`'s RNG: splitmix64 of `(seed, row)`.
pub fn row_seed(seed: u64, row: usize) -> u64 {
    // splitmix64 of (seed, row): distinct, well-mixed streams per row.
    let mut z = seed.wrapping_add((row as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Picks one token from a row of raw logits (modified in place: mask, temperature) and returns
/// it with its log-prob under the distribution it was drawn from. `forbid_end` masks the EOS
/// and stop ids (the min-new-tokens rule). This is the per-row step of [`generate`].
pub fn sample_from_logits(logits: &mut [f32], cfg: &SamplingConfig, forbid_end: bool, rng: &mut StdRng) -> (u32, f32) {
    if forbid_end {
        for &id in cfg.eos_ids.iter().chain(&cfg.stop_ids) {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let inv_t = 1.0 / cfg.temperature;
    logits.iter_mut().for_each(|l| *l *= inv_t);
    if cfg.greedy {
        let (id, _) = argmax(logits);
        return (id as u32, log_softmax_at(logits, id));
    }
    if (cfg.top_k > 0 && cfg.top_k < logits.len()) || cfg.top_p < 1.0 {
        let lps = filtered_logprobs(logits, cfg.top_k, cfg.top_p);
        logits.copy_from_slice(&lps);
    }
    // logits are now the log-weights z of the sampling distribution (-inf: excluded)
    let (weights, max, ln_total) = softmax_weights(logits);
    let target = rng.gen::<f64>() * ln_total.exp();
    let mut acc = 0.0f64;
    let mut chosen = None;
    for (i, &w) in weights.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        chosen = Some(i);
        acc += w as f64;
        if acc > target {
            break;
        }
    }
    let id = chosen.expect("at least one token has positive weight");
    (id as u32, logprob_from(logits[id], max, ln_total))
}

/// `w = exp(z − max)` with one vectorised exp pass, and `ln Σ w` (in f64).
fn softmax_weights(z: &[f32]) -> (Vec<f32>, f32, f64) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut w: Vec<f32> = z.iter().map(|&l| l - max).collect();
    exp_inplace(&mut w);
    let total: f64 = w.iter().map(|&x| x as f64).sum();
    (w, max, total.ln())
}

/// `log softmax(z)[i]` from `z[i]`, the max and `ln Σ exp(z − max)`: exact for tokens whose
/// weight underflows, unlike `ln(w[i] / Σw)`.
fn logprob_from(z_i: f32, max: f32, ln_total: f64) -> f32 {
    ((z_i - max) as f64 - ln_total) as f32
}

/// `log_softmax(logits / temperature)[token]`, computed exactly as [`sample_from_logits`]
/// computes the log-prob of the token it samples (no mask, no filtering): a reference model
/// identical to the policy gives the same number bit for bit, so its KL is exactly 0.
pub fn logprob_at_temperature(logits: &[f32], temperature: f32, token: usize) -> f32 {
    let inv_t = 1.0 / temperature;
    let z: Vec<f32> = logits.iter().map(|&l| l * inv_t).collect();
    let (_, max, ln_total) = softmax_weights(&z);
    logprob_from(z[token], max, ln_total)
}

/// Log-probs of the distribution after top-k and top-p filtering of `logits` (already divided
/// by the temperature); filtered-out tokens get `-inf`. This is the distribution [`generate`]
/// samples from, exposed for tests and for scoring.
pub fn filtered_logprobs(logits: &[f32], top_k: usize, top_p: f32) -> Vec<f32> {
    let mut keep: Vec<bool> = logits.iter().map(|l| *l > f32::NEG_INFINITY).collect();
    let k_active = top_k > 0 && top_k < logits.len();
    if k_active || top_p < 1.0 {
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| keep[i]).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if k_active {
            for &i in order.iter().skip(top_k) {
                keep[i] = false;
            }
            order.truncate(top_k);
        }
        if top_p < 1.0 {
            let lse = logsumexp(order.iter().map(|&i| logits[i]));
            let mut mass = 0.0f32;
            for (rank, &i) in order.iter().enumerate() {
                if mass >= top_p && rank > 0 {
                    keep[i] = false;
                } else {
                    mass += (logits[i] - lse).exp();
                }
            }
        }
    }
    let lse = logsumexp(logits.iter().zip(&keep).filter(|(_, &k)| k).map(|(l, _)| *l));
    logits.iter().zip(&keep).map(|(l, &k)| if k { l - lse } else { f32::NEG_INFINITY }).collect()
}

fn logsumexp(xs: impl Iterator<Item = f32> + Clone) -> f32 {
    let max = xs.clone().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + xs.map(|x| (x - max).exp()).sum::<f32>().ln()
}

fn log_softmax_at(logits: &[f32], id: usize) -> f32 {
    logits[id] - logsumexp(logits.iter().copied())
}

/// Index and value of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(xs: &[f32]) -> (usize, f32) {
    xs.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
}
