//! `rlhf generate --prompts FILE.jsonl`: completions of every prompt of a JSONL file (several
//! per prompt if asked), sampled in batches, written as JSONL — optionally scored as PPO's
//! rollouts are, by a reward model or any of PPO's rewards (a rule, a verifiable answer
//! against the records' reference answers, an external command).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Result};
use rlhf_envs::{RewardInput, RewardModel};
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::{generate_from_with, FusedOps, SamplingConfig, Tokenizer, WeightDtype};
use serde_json::json;

use crate::prompt_format::{ChatPrompt, PromptFormat};
use crate::stages::prompts::{check_fits, read_prompts, PromptSpec};
use crate::stages::reward_spec::{build_reward, check_reward_inputs, RewardSpec};

/// What to generate from.
#[derive(Debug, Clone)]
pub struct FileGeneration {
    /// JSONL file of prompt records.
    pub prompts: PathBuf,
    /// The records' prompt field.
    pub field: String,
    /// The records' reference-answer field, if any (handed to the reward, and written out).
    pub reference_field: Option<String>,
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
    /// The reward to score each completion with, as PPO's `reward`; a reward model reads the
    /// texts in its own tokens, so it need not share the policy's vocabulary.
    pub reward: Option<RewardSpec>,
    /// Prompts longer than this (in the model's tokens, after the template) are skipped and
    /// counted; without it, a prompt that leaves no room for `max_new_tokens` is an error.
    pub max_prompt_len: Option<usize>,
    /// Write only each prompt's highest-reward completion of its `samples` (the first of
    /// equals), marked `"best_of": samples` — rejection-sampling data (Llama 2's rejection
    /// sampling, RAFT) that `rlhf sft` reads with `response_field = completion`. Needs `reward`.
    pub best_of: bool,
}

/// Totals of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSummary {
    /// Prompt records read.
    pub prompts: usize,
    /// Of those, skipped as longer than `max_prompt_len`.
    pub skipped_prompts: usize,
    /// Completions written.
    pub completions: usize,
    /// New tokens sampled.
    pub tokens: usize,
    /// Mean reward over every completion, when scored.
    pub mean_reward: Option<f64>,
    /// With `best_of`: the mean reward of the completions written (each prompt's best).
    pub mean_best_reward: Option<f64>,
}

/// Where the completion lines go: every one, or (best-of) each record's highest-reward one,
/// held until the record's last sample has been seen (a record's samples are consecutive).
struct Sink<'a> {
    out: &'a mut dyn Write,
    best_of: Option<usize>,
    held: Option<(usize, f64, serde_json::Value)>,
    written: Vec<Option<f64>>,
}

impl Sink<'_> {
    /// Takes sample line `line` of `record` with its `reward`.
    fn put(&mut self, record: usize, reward: Option<f64>, mut line: serde_json::Value) -> Result<()> {
        let Some(n) = self.best_of else { return self.write(reward, line) };
        let reward = reward.expect("best-of needs a reward (checked before sampling)");
        if self.held.as_ref().is_some_and(|h| h.0 != record) {
            self.flush()?;
        }
        if self.held.as_ref().is_none_or(|h| reward > h.1) {
            line["best_of"] = n.into();
            self.held = Some((record, reward, line));
        }
        Ok(())
    }

    /// Writes the held line, if any.
    fn flush(&mut self) -> Result<()> {
        match self.held.take() {
            Some((_, reward, line)) => self.write(Some(reward), line),
            None => Ok(()),
        }
    }

    fn write(&mut self, reward: Option<f64>, line: serde_json::Value) -> Result<()> {
        writeln!(self.out, "{line}")?;
        self.written.push(reward);
        Ok(())
    }
}

/// Which record, and which of its samples, a row of a batch is.
struct Row {
    record: usize,
    sample: usize,
}

/// Samples `g.samples` completions of every prompt in `g.prompts` from the checkpoint `model`
/// (folder or GGUF file) on `dev`, writing one JSON line per completion to `out`: `record`
/// (1-based), `sample`, the formatted `prompt`, `completion` (without its EOS), `tokens`,
/// `logprob` (summed), `finished` (stopped at EOS), `reference` when the records have one, and
/// `reward` when a reward is given.
/// The same seed and batch size give the same output.
pub fn generate_file<D: FusedOps>(
    model: &Path,
    g: &FileGeneration,
    out: &mut dyn Write,
    dev: &D,
) -> Result<GenerationSummary> {
    check_reward_inputs(g.reward.as_ref(), g.reference_field.as_deref())?;
    ensure!(!g.best_of || g.reward.is_some(), "best-of needs a reward to choose by (--reward-model or --reward)");
    let (lm, tok) = load_with_tokenizer(model, dev)?;
    let (ids, texts, references, kept) = read_records(g, &tok, &lm, model)?;
    let eos_ids = tok.eos_ids_for(&lm.config);
    let pad = tok.pad_id().or(lm.config.pad_token_id()).or(eos_ids.first().copied()).unwrap_or(0);
    // completions stop at the model's EOS (and any stop ids given)
    let mut base = g.sampling.clone();
    base.eos_ids.extend(eos_ids.into_iter().filter(|e| !g.sampling.eos_ids.contains(e)));
    let end_ids = [base.eos_ids.as_slice(), &base.stop_ids].concat();
    let mut scorer = g.reward.as_ref().map(|spec| scorer(spec, dev, &tok, &end_ids)).transpose()?;
    let rows: Vec<Row> =
        kept.iter().flat_map(|&record| (0..g.samples).map(move |sample| Row { record, sample })).collect();
    let mut bar = crate::progress::bar(rows.len() as u64, "generate");
    let (t0, mut tokens, mut rewards) = (Instant::now(), 0usize, Vec::new());
    let mut sink = Sink { out, best_of: g.best_of.then_some(g.samples), held: None, written: vec![] };
    for (b, chunk) in rows.chunks(g.batch.max(1)).enumerate() {
        let cfg = SamplingConfig { seed: crate::data::mix(base.seed, b as u64, 0), ..base.clone() };
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|r| ids[r.record].clone()).collect();
        let gen = generate_from_with(&lm, &prompts, pad, &cfg, g.weights)?;
        let completions: Vec<String> = (0..chunk.len())
            .map(|i| tok.decode(&gen.tokens[i][..gen.tokens[i].len() - gen.finished[i] as usize]))
            .collect::<Result<_, _>>()?;
        let reference = |r: &Row| references.as_ref().map(|a| a[r.record].clone());
        let scores = match scorer.as_mut() {
            Some(s) => {
                let inputs =
                    chunk.iter().zip(&completions).zip(&gen.tokens).map(|((r, completion), response)| RewardInput {
                        prompt: texts[r.record].clone(),
                        response: completion.clone(),
                        prompt_ids: ids[r.record].clone(),
                        response_ids: response.clone(),
                        reference: reference(r),
                    });
                Some(s.score(&inputs.collect::<Vec<_>>())?)
            }
            None => None,
        };
        for (i, r) in chunk.iter().enumerate() {
            let mut line = json!({"record": r.record + 1, "sample": r.sample, "prompt": texts[r.record],
                "completion": completions[i], "tokens": gen.tokens[i].len(),
                "logprob": gen.logprobs[i].iter().map(|&l| l as f64).sum::<f64>(), "finished": gen.finished[i]});
            if let Some(answer) = reference(r) {
                line["reference"] = answer.into();
            }
            let reward = scores.as_ref().map(|s| s[i] as f64);
            if let Some(s) = reward {
                let (file, record, sample) = (g.prompts.display(), r.record + 1, r.sample);
                ensure!(s.is_finite(), "{file}: record {record}, sample {sample}: the reward is {s}");
                line["reward"] = s.into();
                rewards.push(s);
            }
            sink.put(r.record, reward, line)?;
            tokens += gen.tokens[i].len();
        }
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / t0.elapsed().as_secs_f64()));
        bar.inc(chunk.len() as u64);
    }
    sink.flush()?;
    sink.out.flush()?;
    bar.finish();
    let mean = |r: &[f64]| (!r.is_empty()).then(|| r.iter().sum::<f64>() / r.len() as f64);
    let best: Vec<f64> = sink.written.iter().flatten().copied().collect();
    Ok(GenerationSummary {
        prompts: texts.len(),
        skipped_prompts: texts.len() - kept.len(),
        completions: sink.written.len(),
        tokens,
        mean_reward: mean(&rewards),
        mean_best_reward: if g.best_of { mean(&best) } else { None },
    })
}

/// Every record's prompt ids and text (record k of the file is prompt k), their reference
/// answers if asked for, and the records whose prompts are within `g.max_prompt_len`; those
/// must leave room for the completion in the model.
#[allow(clippy::type_complexity)]
fn read_records<D: FusedOps>(
    g: &FileGeneration,
    tok: &Tokenizer,
    lm: &rlhf_policies::CausalLm<D>,
    model: &Path,
) -> Result<(Vec<Vec<u32>>, Vec<String>, Option<Vec<String>>, Vec<usize>)> {
    let format = PromptFormat::new(&g.template, g.chat.as_ref(), tok, &lm.config, model)?;
    // PPO's prompt reader, skipping none, so that records keep their numbers
    let spec = PromptSpec {
        path: &g.prompts,
        field: &g.field,
        reference_field: g.reference_field.as_deref(),
        format: &format,
        max_len: usize::MAX,
    };
    let (prompts, _) = read_prompts(spec, tok, "generate")?;
    let limit = g.max_prompt_len.unwrap_or(usize::MAX);
    let kept: Vec<usize> = (0..prompts.prompts.len()).filter(|&k| prompts.prompts[k].0.len() <= limit).collect();
    let skipped = prompts.prompts.len() - kept.len();
    if skipped > 0 {
        eprintln!("generate: {skipped} prompts longer than --max-prompt-len {limit} skipped");
    }
    ensure!(!kept.is_empty(), "{}: no prompt within --max-prompt-len {limit}", g.prompts.display());
    check_fits(kept.iter().map(|&k| prompts.prompts[k].0.as_slice()), g.sampling.max_new_tokens, &lm.dims)?;
    let (ids, texts) = prompts.prompts.into_iter().unzip();
    Ok((ids, texts, prompts.references, kept))
}

/// What scores the completions: the reward as PPO would see it
/// ([`Reward::for_policy`](crate::stages::reward_spec::Reward::for_policy)) — a
/// reward model with the policy's vocabulary reads its ids, one with its own tokenizer the
/// texts in its tokens, closed by its EOS when the completion ended on one of `end_ids`.
fn scorer<D: FusedOps>(spec: &RewardSpec, dev: &D, tok: &Tokenizer, end_ids: &[u32]) -> Result<Box<dyn RewardModel>> {
    build_reward(Some(spec), dev)?.for_policy(tok, end_ids)
}
