//! The sampling engine as environment models: [`EngineSession`] implements the env's
//! [`Policy`] (sampling) and [`LogProbModel`] (frozen reference) over rows of a KV cache;
//! [`Tokenizer`] is the env's [`Detokenizer`].

use std::sync::Arc;

use rand::{rngs::StdRng, SeedableRng};
use rayon::prelude::*;
use rlhf_envs::{Action, Detokenizer, EnvError, LogProbModel, Policy};
use serde::{Deserialize, Serialize};

use crate::config::Dims;
use crate::device_decode::DeviceSession;
use crate::error::PolicyError;
use crate::fused::FusedOps;
use crate::infer::{InferenceModel, KvCache, LogitsAt};
use crate::model::CausalLm;
use crate::nucleus::{Nucleus, NucleusMaskedSession, RowLogits};
use crate::sampling::{logprob_at_temperature, row_seed, sample_from_logits, SamplingConfig};
use crate::tokenizer::Tokenizer;

/// Rows of token streams decoded by one [`InferenceModel`], each with its own KV-cache row,
/// next-token logits, response length and RNG.
///
/// As a [`Policy`] it samples with `sampling` (temperature, top-k, top-p; EOS/stop ids masked
/// until `min_new_tokens`); as a [`LogProbModel`] it returns `log_softmax(logits / T)` of the
/// given tokens — the reference's log-prob at the sampling temperature.
#[derive(Debug)]
pub struct EngineSession<E: RowEngine = InferenceModel> {
    engine: Arc<E>,
    cache: E::Cache,
    logits: Vec<Vec<f32>>,
    steps: Vec<usize>,
    rngs: Vec<StdRng>,
    sampling: SamplingConfig,
}

/// A KV-cached forward over rows of a cache: what an [`EngineSession`] decodes with — the
/// host engine ([`InferenceModel`]), or in CUDA builds the fused GPU engine
/// (`rlhf_policies::cuda_engine::CudaEngine`).
pub trait RowEngine: std::fmt::Debug + Send + Sync {
    /// The KV cache.
    type Cache: std::fmt::Debug + Send + Sync;
    /// Sizes.
    fn dims(&self) -> &Dims;
    /// An empty cache of `rows` rows of at most `cap` columns.
    fn row_cache(&self, rows: usize, cap: usize) -> Self::Cache;
    /// Feeds `n` columns of `ids` to the cache rows `rows`; the logits `at` those rows
    /// ([`InferenceModel::forward_rows`]).
    fn forward_rows(
        &self,
        cache: &mut Self::Cache,
        rows: &[usize],
        ids: &[u32],
        n: usize,
        at: LogitsAt,
    ) -> Result<Vec<f32>, PolicyError>;
    /// Empties `row` for a sequence with `pad` left-pad columns.
    fn reset_row(&self, cache: &mut Self::Cache, row: usize, pad: usize);
    /// Makes row `dst` a copy of row `src`.
    fn copy_row(&self, cache: &mut Self::Cache, src: usize, dst: usize) -> Result<(), PolicyError>;
}

impl RowEngine for InferenceModel {
    type Cache = KvCache;
    fn dims(&self) -> &Dims {
        &self.dims
    }
    fn row_cache(&self, rows: usize, cap: usize) -> KvCache {
        KvCache::new(&self.dims, vec![0; rows], cap)
    }
    fn forward_rows(
        &self,
        cache: &mut KvCache,
        rows: &[usize],
        ids: &[u32],
        n: usize,
        at: LogitsAt,
    ) -> Result<Vec<f32>, PolicyError> {
        InferenceModel::forward_rows(self, cache, rows, ids, n, at)
    }
    fn reset_row(&self, cache: &mut KvCache, row: usize, pad: usize) {
        cache.reset_row(row, pad);
    }
    fn copy_row(&self, cache: &mut KvCache, src: usize, dst: usize) -> Result<(), PolicyError> {
        cache.copy_row(src, dst);
        Ok(())
    }
}

/// Rows from which per-row sampling and log-prob work is spread over threads.
const PAR_ROWS: usize = 8;

/// A model error as the env's error (the sessions' shared conversion).
pub(crate) fn model_err(e: crate::error::PolicyError) -> EnvError {
    EnvError::Model(e.to_string())
}

impl<E: RowEngine> EngineSession<E> {
    /// `rows` streams of at most `capacity` tokens each (prompt + response).
    pub fn new(engine: Arc<E>, rows: usize, capacity: usize, sampling: SamplingConfig) -> Self {
        let cache = engine.row_cache(rows, capacity);
        let rngs = (0..rows).map(|r| StdRng::seed_from_u64(row_seed(sampling.seed, r))).collect();
        EngineSession { engine, cache, logits: vec![vec![]; rows], steps: vec![0; rows], rngs, sampling }
    }

    /// Replaces the weights (after an optimizer step); rows must be begun again.
    pub fn set_engine(&mut self, engine: Arc<E>) {
        self.engine = engine;
    }

    /// Prefills `rows` with their prompts as one left-padded batch. A prompt given to several
    /// rows (GRPO's groups) is computed once and its cache row copied to the others.
    fn prefill(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        if rows.len() != prompts.len() {
            return Err(EnvError::Count { what: "prompts", expected: rows.len(), got: prompts.len() });
        }
        let mut first_of: std::collections::HashMap<&[u32], usize> = Default::default();
        let (mut unique, mut copies) = (vec![], vec![]);
        for (&r, &p) in rows.iter().zip(prompts) {
            match first_of.get(p) {
                Some(&src) => copies.push((src, r)),
                None => {
                    first_of.insert(p, r);
                    unique.push((r, p));
                }
            }
        }
        let (rows, prompts): (Vec<usize>, Vec<&[u32]>) = unique.into_iter().unzip();
        if rows.is_empty() {
            return Ok(());
        }
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * t);
        for (&r, p) in rows.iter().zip(&prompts) {
            if p.is_empty() {
                return Err(EnvError::Model(format!("row {r}: empty prompt")));
            }
            self.engine.reset_row(&mut self.cache, r, t - p.len());
            ids.extend(std::iter::repeat_n(0, t - p.len()));
            ids.extend_from_slice(p);
            self.steps[r] = 0;
        }
        let logits = self.engine.forward_rows(&mut self.cache, &rows, &ids, t, LogitsAt::Last).map_err(model_err)?;
        self.store(&rows, logits);
        for (src, dst) in copies {
            self.engine.copy_row(&mut self.cache, src, dst).map_err(model_err)?;
            self.logits[dst] = self.logits[src].clone();
            self.steps[dst] = 0;
        }
        Ok(())
    }

    fn store(&mut self, rows: &[usize], logits: Vec<f32>) {
        let v = self.engine.dims().vocab;
        for (i, &r) in rows.iter().enumerate() {
            self.logits[r] = logits[i * v..(i + 1) * v].to_vec();
        }
    }

    fn feed(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError> {
        if rows.len() != tokens.len() {
            return Err(EnvError::Count { what: "tokens", expected: rows.len(), got: tokens.len() });
        }
        let logits = self.engine.forward_rows(&mut self.cache, rows, tokens, 1, LogitsAt::Last).map_err(model_err)?;
        self.store(rows, logits);
        for &r in rows {
            self.steps[r] += 1;
        }
        Ok(())
    }

    fn current(&self, r: usize) -> Result<&[f32], EnvError> {
        let l = self.logits.get(r).ok_or_else(|| EnvError::Model(format!("row {r} out of range")))?;
        if l.is_empty() {
            return Err(EnvError::Model(format!("row {r} has not begun")));
        }
        Ok(l)
    }
}

impl<E: RowEngine> LogProbModel for EngineSession<E> {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        self.prefill(rows, prompts)
    }

    fn score_responses(
        &mut self,
        rows: &[usize],
        prompts: &[&[u32]],
        responses: &[&[u32]],
    ) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        if rows.len() != prompts.len() || rows.len() != responses.len() {
            return Err(EnvError::Count {
                what: "prompts and responses",
                expected: rows.len(),
                got: prompts.len().min(responses.len()),
            });
        }
        let v = self.engine.dims().vocab as u32;
        if let Some(&tok) = responses.iter().flat_map(|r| r.iter()).find(|&&t| t >= v) {
            return Err(EnvError::InvalidAction { action: tok, n: v });
        }
        self.score_batch(rows, prompts, responses).map(Some)
    }

    fn logprob_and_push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>, EnvError> {
        if rows.len() != tokens.len() {
            return Err(EnvError::Count { what: "tokens", expected: rows.len(), got: tokens.len() });
        }
        for (&r, &tok) in rows.iter().zip(tokens) {
            let n = self.current(r)?.len();
            if tok as usize >= n {
                return Err(EnvError::InvalidAction { action: tok, n: n as u32 });
            }
        }
        let t = self.sampling.temperature;
        let one = |(&r, &tok): (&usize, &u32)| logprob_at_temperature(&self.logits[r], t, tok as usize);
        let out: Vec<f32> = if rows.len() >= PAR_ROWS {
            rows.par_iter().zip(tokens).map(one).collect()
        } else {
            rows.iter().zip(tokens).map(one).collect()
        };
        self.feed(rows, tokens)?;
        Ok(out)
    }
}

impl<E: RowEngine> EngineSession<E> {
    /// Teacher-forced log-probs (at the sampling temperature) of each response token, rows
    /// processed in left-padded chunks that keep the logits buffer under ~128 MiB.
    fn score_batch(
        &mut self,
        rows: &[usize],
        prompts: &[&[u32]],
        responses: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, EnvError> {
        let v = self.engine.dims().vocab;
        // inputs: prompt + all response tokens but the last (nothing is predicted from it)
        let seqs: Vec<Vec<u32>> =
            prompts.iter().zip(responses).map(|(p, r)| [*p, &r[..r.len().saturating_sub(1)]].concat()).collect();
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let chunk = ((32usize << 20) / (longest * v)).clamp(1, rows.len().max(1));
        let mut out = Vec::with_capacity(rows.len());
        for start in (0..rows.len()).step_by(chunk) {
            let end = (start + chunk).min(rows.len());
            let t = seqs[start..end].iter().map(Vec::len).max().unwrap_or(0);
            let mut ids = Vec::with_capacity((end - start) * t);
            for i in start..end {
                if prompts[i].is_empty() {
                    return Err(EnvError::Model(format!("row {}: empty prompt", rows[i])));
                }
                self.engine.reset_row(&mut self.cache, rows[i], t - seqs[i].len());
                ids.extend(std::iter::repeat_n(0, t - seqs[i].len()));
                ids.extend_from_slice(&seqs[i]);
            }
            let logits = self
                .engine
                .forward_rows(&mut self.cache, &rows[start..end], &ids, t, LogitsAt::All)
                .map_err(model_err)?;
            for i in start..end {
                let pad = t - seqs[i].len();
                let base = (i - start) * t + pad + prompts[i].len() - 1;
                let lps = responses[i]
                    .iter()
                    .enumerate()
                    .map(|(k, &tok)| {
                        let row = &logits[(base + k) * v..(base + k + 1) * v];
                        logprob_at_temperature(row, self.sampling.temperature, tok as usize)
                    })
                    .collect();
                out.push(lps);
            }
        }
        for &r in rows {
            self.logits[r].clear(); // the rows were scratch: they must be begun again
        }
        Ok(out)
    }
}

impl<E: RowEngine> RowLogits for EngineSession<E> {
    fn row_logits(&self, row: usize) -> Result<&[f32], EnvError> {
        self.current(row)
    }
}

impl<E: RowEngine> Policy for EngineSession<E> {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        self.prefill(rows, prompts)
    }

    fn act(&mut self, rows: &[usize]) -> Result<Vec<Action>, EnvError> {
        for &r in rows {
            self.current(r)?;
        }
        sample_rows(rows, &self.logits, &self.steps, &mut self.rngs, &self.sampling)
    }

    fn push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError> {
        self.feed(rows, tokens)
    }
}

/// Where a trainer's rollouts decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutEngine {
    /// The device's own choice ([`FusedOps::HOST_ROLLOUT`]): the host engine on the CPU, the
    /// model's decode on a GPU.
    #[default]
    Auto,
    /// The host engine ([`EngineSession`]) over a snapshot of the weights, on any device (a
    /// GPU's weights are copied to the host once per rollout).
    Host,
    /// The model's own KV-cached decode ([`DeviceSession`]) where its weights live.
    Device,
    /// The fused CUDA engine (`cuda_engine::CudaEngine`, CUDA builds): custom kernels and
    /// cuBLAS over a GPU copy of the weights, made once per rollout, sampling on the host as
    /// the host engine does.
    Fused,
}

impl RolloutEngine {
    /// The engine that decodes for a model on device `D`: [`RolloutEngine::Auto`] becomes
    /// `Host` where [`FusedOps::HOST_ROLLOUT`] says so (the CPU) and `Device` elsewhere; the
    /// others stay as they are.
    pub fn resolved<D: FusedOps>(self) -> RolloutEngine {
        match self {
            RolloutEngine::Auto if D::HOST_ROLLOUT => RolloutEngine::Host,
            RolloutEngine::Auto => RolloutEngine::Device,
            engine => engine,
        }
    }
}

/// The env's [`Policy`] for a training model: an [`EngineSession`] over a host snapshot of the
/// weights (or, [`RolloutEngine::Fused`], a GPU copy), or a [`DeviceSession`] on the model
/// itself, as `engine` says. `rows` streams of at most `capacity` tokens.
pub fn policy_session<'m, D: FusedOps>(
    model: &'m CausalLm<D>,
    rows: usize,
    capacity: usize,
    sampling: SamplingConfig,
    engine: RolloutEngine,
) -> Result<Box<dyn Policy + 'm>, PolicyError> {
    Ok(policy_sessions(model, rows, capacity, vec![sampling], engine)?.remove(0))
}

/// [`policy_session`]s with different samplers (e.g. sampled and greedy) over one snapshot of
/// the weights: the host or GPU copy is made once and shared.
pub fn policy_sessions<'m, D: FusedOps>(
    model: &'m CausalLm<D>,
    rows: usize,
    capacity: usize,
    samplings: Vec<SamplingConfig>,
    engine: RolloutEngine,
) -> Result<Vec<Box<dyn Policy + 'm>>, PolicyError> {
    let sessions = logits_sessions(model, rows, capacity, samplings, engine)?;
    Ok(sessions.into_iter().map(|s| s as Box<dyn Policy + 'm>).collect())
}

/// [`policy_sessions`] whose next-token logits can be read ([`RowLogits`]).
pub fn logits_sessions<'m, D: FusedOps>(
    model: &'m CausalLm<D>,
    rows: usize,
    capacity: usize,
    samplings: Vec<SamplingConfig>,
    engine: RolloutEngine,
) -> Result<Vec<Box<dyn RowLogits + 'm>>, PolicyError> {
    let snapshot = PolicySnapshot::new(model, engine)?;
    Ok(samplings.into_iter().map(|s| snapshot.session(rows, capacity, s)).collect())
}

/// The weights a training model decodes with, taken once: the host engine's copy, the fused
/// CUDA engine's GPU copy, or the model itself for its own KV-cached decode (as `engine`
/// resolves on `D`). Sessions of any size are made from it without copying again (e.g. one
/// per chunk of held-out prompts).
pub struct PolicySnapshot<'m> {
    make: Box<dyn Fn(usize, usize, SamplingConfig) -> Box<dyn RowLogits + 'm> + 'm>,
}

impl std::fmt::Debug for PolicySnapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicySnapshot")
    }
}

impl<'m> PolicySnapshot<'m> {
    /// The snapshot of `model` for `engine`.
    pub fn new<D: FusedOps>(model: &'m CausalLm<D>, engine: RolloutEngine) -> Result<Self, PolicyError> {
        fn over<'m, E: RowEngine + 'static>(engine: Arc<E>) -> PolicySnapshot<'m> {
            let make = move |rows, capacity, s| {
                Box::new(EngineSession::new(engine.clone(), rows, capacity, s)) as Box<dyn RowLogits + 'm>
            };
            PolicySnapshot { make: Box::new(make) }
        }
        Ok(match engine.resolved::<D>() {
            RolloutEngine::Fused => over(fused_engine(model)?),
            RolloutEngine::Host => over(Arc::new(InferenceModel::from_model(model))),
            _ => PolicySnapshot {
                make: Box::new(move |rows, capacity, s| Box::new(DeviceSession::new(model, rows, capacity, s))),
            },
        })
    }

    /// A session of `rows` streams of at most `capacity` tokens, sampling with `sampling`.
    pub fn session(&self, rows: usize, capacity: usize, sampling: SamplingConfig) -> Box<dyn RowLogits + 'm> {
        (self.make)(rows, capacity, sampling)
    }
}

/// NLPO's rollout policy ([`NucleusMaskedSession`]): `policy` samples within the nucleus of
/// `mask_policy` (`None`: of its own distribution), both decoding on `engine`.
pub fn nucleus_masked_session<'m, D: FusedOps>(
    policy: &'m CausalLm<D>,
    mask_policy: Option<&'m CausalLm<D>>,
    (rows, capacity): (usize, usize),
    nucleus: Nucleus,
    sampling: SamplingConfig,
    engine: RolloutEngine,
) -> Result<NucleusMaskedSession<'m>, PolicyError> {
    let session = |m| PolicySnapshot::new(m, engine).map(|s| s.session(rows, capacity, sampling.clone()));
    let mask = mask_policy.map(session).transpose()?;
    Ok(NucleusMaskedSession::new(session(policy)?, mask, rows, nucleus, sampling))
}

#[cfg(feature = "cuda")]
fn fused_engine<D: FusedOps>(model: &CausalLm<D>) -> Result<Arc<crate::cuda_engine::CudaEngine>, PolicyError> {
    Ok(Arc::new(crate::cuda_engine::CudaEngine::from_model(model)?))
}

#[cfg(not(feature = "cuda"))]
fn fused_engine<D: FusedOps>(_: &CausalLm<D>) -> Result<Arc<InferenceModel>, PolicyError> {
    Err(PolicyError::Input("rollout_engine \"fused\" needs a build with `--features cuda`".into()))
}

/// One token for each row in `rows` from its current `logits[r]`, drawn with the row's own RNG
/// (so the result does not depend on threading); EOS/stop ids are masked while `steps[r]` is
/// below `min_new_tokens`. The sessions' shared [`Policy::act`].
pub(crate) fn sample_rows(
    rows: &[usize],
    logits: &[Vec<f32>],
    steps: &[usize],
    rngs: &mut [StdRng],
    sampling: &SamplingConfig,
) -> Result<Vec<Action>, EnvError> {
    let mut slots: Vec<Option<&mut StdRng>> = rngs.iter_mut().map(Some).collect();
    let rngs: Vec<&mut StdRng> = rows
        .iter()
        .map(|&r| {
            slots
                .get_mut(r)
                .and_then(Option::take)
                .ok_or_else(|| EnvError::Model(format!("row {r} repeated or out of range")))
        })
        .collect::<Result<_, _>>()?;
    let one = |(&r, rng): (&usize, &mut StdRng)| {
        let mut l = logits[r].clone();
        let (token, logprob) = sample_from_logits(&mut l, sampling, steps[r] < sampling.min_new_tokens, rng);
        Action { token, logprob }
    };
    Ok(if rows.len() >= PAR_ROWS {
        rows.par_iter().zip(rngs.into_par_iter()).map(one).collect()
    } else {
        rows.iter().zip(rngs).map(one).collect()
    })
}

impl Detokenizer for Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, EnvError> {
        Tokenizer::decode(self, ids).map_err(|e| EnvError::Model(e.to_string()))
    }
}
