//! The sampling engine as environment models: [`EngineSession`] implements the env's
//! [`Policy`] (sampling) and [`LogProbModel`] (frozen reference) over rows of a KV cache;
//! [`LearnedReward`] turns a transformer with a [`ScalarHead`] into a [`RewardModel`];
//! [`Tokenizer`] is the env's [`Detokenizer`].

use std::sync::Arc;

use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use rlhf_envs::{Action, Detokenizer, EnvError, LogProbModel, Policy, RewardInput, RewardModel, ScoreNorm};

use crate::batch::Batch;
use crate::heads::ScalarHead;
use crate::infer::{InferenceModel, KvCache, LogitsAt};
use crate::model::CausalLm;
use crate::sampling::{logprob_at_temperature, row_seed, sample_from_logits, SamplingConfig};
use crate::tokenizer::Tokenizer;

/// Rows of token streams decoded by one [`InferenceModel`], each with its own KV-cache row,
/// next-token logits, response length and RNG.
///
/// As a [`Policy`] it samples with `sampling` (temperature, top-k, top-p; EOS/stop ids masked
/// until `min_new_tokens`); as a [`LogProbModel`] it returns `log_softmax(logits / T)` of the
/// given tokens — the reference's log-prob at the sampling temperature.
#[derive(Debug)]
pub struct EngineSession {
    engine: Arc<InferenceModel>,
    cache: KvCache,
    logits: Vec<Vec<f32>>,
    steps: Vec<usize>,
    rngs: Vec<StdRng>,
    sampling: SamplingConfig,
}

fn model_err(e: crate::error::PolicyError) -> EnvError {
    EnvError::Model(e.to_string())
}

impl EngineSession {
    /// `rows` streams of at most `capacity` tokens each (prompt + response).
    pub fn new(engine: Arc<InferenceModel>, rows: usize, capacity: usize, sampling: SamplingConfig) -> Self {
        let cache = KvCache::new(&engine.dims, vec![0; rows], capacity);
        let rngs = (0..rows).map(|r| StdRng::seed_from_u64(row_seed(sampling.seed, r))).collect();
        EngineSession { engine, cache, logits: vec![vec![]; rows], steps: vec![0; rows], rngs, sampling }
    }

    /// Replaces the weights (after an optimizer step); rows must be begun again.
    pub fn set_engine(&mut self, engine: Arc<InferenceModel>) {
        self.engine = engine;
    }

    /// Prefills `rows` with their prompts as one left-padded batch.
    fn prefill(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        if rows.len() != prompts.len() {
            return Err(EnvError::Count { what: "prompts", expected: rows.len(), got: prompts.len() });
        }
        if rows.is_empty() {
            return Ok(());
        }
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * t);
        for (&r, p) in rows.iter().zip(prompts) {
            if p.is_empty() {
                return Err(EnvError::Model(format!("row {r}: empty prompt")));
            }
            self.cache.reset_row(r, t - p.len());
            ids.extend(std::iter::repeat(0).take(t - p.len()));
            ids.extend_from_slice(p);
            self.steps[r] = 0;
        }
        let logits = self.engine.forward_rows(&mut self.cache, rows, &ids, t, LogitsAt::Last).map_err(model_err)?;
        self.store(rows, logits);
        Ok(())
    }

    fn store(&mut self, rows: &[usize], logits: Vec<f32>) {
        let v = self.engine.dims.vocab;
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

impl LogProbModel for EngineSession {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        self.prefill(rows, prompts)
    }

    fn logprob_and_push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>, EnvError> {
        let mut out = Vec::with_capacity(rows.len());
        for (&r, &tok) in rows.iter().zip(tokens) {
            let l = self.current(r)?;
            if tok as usize >= l.len() {
                return Err(EnvError::InvalidAction { action: tok, n: l.len() as u32 });
            }
            out.push(logprob_at_temperature(l, self.sampling.temperature, tok as usize));
        }
        self.feed(rows, tokens)?;
        Ok(out)
    }
}

impl Policy for EngineSession {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        self.prefill(rows, prompts)
    }

    fn act(&mut self, rows: &[usize]) -> Result<Vec<Action>, EnvError> {
        let mut out = Vec::with_capacity(rows.len());
        for &r in rows {
            let mut l = self.current(r)?.to_vec();
            let forbid_end = self.steps[r] < self.sampling.min_new_tokens;
            let (token, logprob) = sample_from_logits(&mut l, &self.sampling, forbid_end, &mut self.rngs[r]);
            out.push(Action { token, logprob });
        }
        Ok(out)
    }

    fn push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError> {
        self.feed(rows, tokens)
    }
}

impl Detokenizer for Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, EnvError> {
        Tokenizer::decode(self, ids).map_err(|e| EnvError::Model(e.to_string()))
    }
}

/// A learned reward model: a transformer backbone and a scalar head read at the last token of
/// prompt + response, optionally normalised (`(r − mean) / std`, lm-human-preferences' gain
/// and bias).
#[derive(Debug)]
pub struct LearnedReward<D: Device<f32>> {
    /// Backbone.
    pub model: CausalLm<D>,
    /// Score head.
    pub head: ScalarHead<D>,
    /// Optional normalisation.
    pub norm: Option<ScoreNorm>,
    /// Pad id for batching.
    pub pad_id: u32,
}

impl<D: Device<f32>> LearnedReward<D> {
    /// Scores of token sequences (prompt + response each), read at each row's last token.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>, crate::error::PolicyError> {
        let batch = Batch::right_padded(seqs, self.pad_id)?;
        let rows: Vec<usize> =
            batch.last_real_index().iter().enumerate().map(|(r, j)| r * batch.t + j.unwrap_or(0)).collect();
        let h = self.model.forward_hidden(&batch, NoneTape)?;
        let raw = self.head.read_at(h, &rows)?.as_vec();
        Ok(match self.norm {
            Some(n) => raw.iter().map(|r| (r - n.mean) / n.std).collect(),
            None => raw,
        })
    }
}

impl<D: Device<f32>> RewardModel for LearnedReward<D> {
    fn name(&self) -> String {
        "learned".into()
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        let seqs: Vec<Vec<u32>> = batch.iter().map(|x| [x.prompt_ids.as_slice(), &x.response_ids].concat()).collect();
        self.score_ids(&seqs).map_err(|e| EnvError::reward("learned", e.to_string()))
    }
}
