//! `rlhf generate --prompts FILE.jsonl`: completions of every prompt of a JSONL file (several
//! per prompt if asked), sampled in batches, written as JSONL — optionally scored by a reward
//! model, as PPO's rollouts are.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rlhf_envs::{RewardInput, RewardModel};
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::{generate_from_with, FusedOps, LearnedReward, SamplingConfig, Tokenizer, WeightDtype};
use serde_json::json;

use crate::prompt_format::{ChatPrompt, PromptFormat};

/// What to generate from.
#[derive(Debug, Clone)]
pub struct FileGeneration {
    /// JSONL file of prompt records.
    pub prompts: PathBuf,
    /// The records' prompt field.
    pub field: String,
    /// Prompt template (`{prompt}` is replaced).
    pub template: String,
    /// Present: each templated prompt becomes the user turn of the model's chat template.
    pub chat: Option<ChatPrompt>,
    /// Completions per prompt.
    pub samples: usize,
    /// Sequences per `generate` call.
    pub batch: usize,
    /// Sampling; its seed is mixed with each batch's index, and the model's EOS is added to
    /// its stop ids.
    pub sampling: SamplingConfig,
    /// The host engine's weight precision.
    pub weights: WeightDtype,
    /// A reward model folder to score each completion with (its own tokenizer, its stored
    /// normalisation applied).
    pub reward_model: Option<PathBuf>,
}

/// Totals of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSummary {
    /// Prompt records read.
    pub prompts: usize,
    /// Completions written.
    pub completions: usize,
    /// New tokens sampled.
    pub tokens: usize,
    /// Mean reward, when scored.
    pub mean_reward: Option<f64>,
}

/// Which record, and which of its samples, a row of a batch is.
struct Row {
    record: usize,
    sample: usize,
}

/// Samples `g.samples` completions of every prompt in `g.prompts` from the checkpoint `model`
/// (folder or GGUF file) on `dev`, writing one JSON line per completion to `out`: `record`
/// (1-based), `sample`, the formatted `prompt`, `completion` (without its EOS), `tokens`,
/// `logprob` (summed), `finished` (stopped at EOS), and `reward` when a reward model is given.
/// The same seed and batch size give the same output.
pub fn generate_file<D: FusedOps>(
    model: &Path,
    g: &FileGeneration,
    out: &mut dyn Write,
    dev: &D,
) -> Result<GenerationSummary> {
    let (lm, tok) = load_with_tokenizer(model, dev)?;
    let format = PromptFormat::new(&g.template, g.chat.as_ref(), &tok, &lm.config, model)?;
    let records = crate::data::read_jsonl_fields(&g.prompts, &[&g.field])?;
    let mut texts = Vec::with_capacity(records.len());
    let mut ids = Vec::with_capacity(records.len());
    for (i, rec) in records.iter().enumerate() {
        let text = format.apply(&rec[0])?;
        let p = tok.encode(&text)?;
        let at = || format!("{}: record {}", g.prompts.display(), i + 1);
        if p.is_empty() {
            bail!("{}: the prompt encodes to no tokens", at());
        }
        if let Some(limit) = lm.dims.position_limit().filter(|&l| p.len() + g.sampling.max_new_tokens > l) {
            bail!(
                "{}: {} prompt tokens + {} new exceed the model's {limit} positions",
                at(),
                p.len(),
                g.sampling.max_new_tokens
            );
        }
        texts.push(text);
        ids.push(p);
    }
    let mut scorer = g.reward_model.as_deref().map(|dir| Scorer::load(dir, dev)).transpose()?;
    let eos = tok.eos_for(&lm.config);
    let pad = tok.pad_id().or(lm.config.pad_token_id()).or(eos).unwrap_or(0);
    // completions stop at the model's EOS (and any stop ids given)
    let mut base = g.sampling.clone();
    base.eos_ids.extend(eos.filter(|e| !g.sampling.eos_ids.contains(e)));
    let rows: Vec<Row> =
        (0..records.len()).flat_map(|record| (0..g.samples).map(move |sample| Row { record, sample })).collect();
    let bar = crate::progress::bar(rows.len() as u64, "generate");
    let (t0, mut tokens, mut rewards) = (Instant::now(), 0usize, Vec::new());
    for (b, chunk) in rows.chunks(g.batch.max(1)).enumerate() {
        let cfg = SamplingConfig { seed: crate::data::mix(base.seed, b as u64, 0), ..base.clone() };
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|r| ids[r.record].clone()).collect();
        let gen = generate_from_with(&lm, &prompts, pad, &cfg, g.weights)?;
        let completions: Vec<String> = (0..chunk.len())
            .map(|i| tok.decode(&gen.tokens[i][..gen.tokens[i].len() - gen.finished[i] as usize]))
            .collect::<Result<_, _>>()?;
        let scores = match scorer.as_mut() {
            Some(s) => Some(s.score(chunk.iter().map(|r| texts[r.record].as_str()), &completions, &gen.finished)?),
            None => None,
        };
        for (i, r) in chunk.iter().enumerate() {
            let mut line = json!({"record": r.record + 1, "sample": r.sample, "prompt": texts[r.record],
                "completion": completions[i], "tokens": gen.tokens[i].len(),
                "logprob": gen.logprobs[i].iter().map(|&l| l as f64).sum::<f64>(), "finished": gen.finished[i]});
            if let Some(s) = &scores {
                line["reward"] = s[i].into();
                rewards.push(s[i] as f64);
            }
            writeln!(out, "{line}")?;
            tokens += gen.tokens[i].len();
        }
        bar.inc(chunk.len() as u64);
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / t0.elapsed().as_secs_f64()));
    }
    out.flush()?;
    bar.finish();
    let mean_reward = (!rewards.is_empty()).then(|| rewards.iter().sum::<f64>() / rewards.len() as f64);
    Ok(GenerationSummary { prompts: records.len(), completions: rows.len(), tokens, mean_reward })
}

/// A reward model with its own tokenizer: texts are re-encoded, so it need not share the
/// policy's vocabulary.
struct Scorer<D: FusedOps> {
    rm: LearnedReward<D>,
    tok: Tokenizer,
    eos: Option<u32>,
}

impl<D: FusedOps> Scorer<D> {
    fn load(dir: &Path, dev: &D) -> Result<Self> {
        let (mut rm, norm) =
            LearnedReward::load_pretrained(dir, dev).with_context(|| format!("reward model {}", dir.display()))?;
        rm.norm = norm.map(|n| n.as_score_norm());
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let eos = tok.eos_for(&rm.model.config);
        Ok(Scorer { rm, tok, eos })
    }

    /// Scores of `prompts` ⧺ `completions`, each completion closed by the EOS when it
    /// `finished` (as the reward model was trained, and as PPO scores rollouts).
    fn score<'a>(
        &mut self,
        prompts: impl Iterator<Item = &'a str>,
        completions: &[String],
        finished: &[bool],
    ) -> Result<Vec<f32>> {
        let inputs = prompts
            .zip(completions)
            .zip(finished)
            .map(|((p, c), &done)| {
                let mut response_ids = self.tok.encode(c)?;
                response_ids.extend(self.eos.filter(|_| done));
                let prompt_ids = self.tok.encode(p)?;
                Ok(RewardInput { prompt: p.into(), response: c.clone(), prompt_ids, response_ids, reference: None })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.rm.score(&inputs)?)
    }
}
