//! `rlhf eval`: a checkpoint measured on a data file, without training — a causal LM's
//! next-token loss on text, or its response loss on {prompt, response} JSONL (SFT's loss); a
//! reward model's held-out accuracy, margin and Bradley–Terry loss on preference JSONL (the
//! reward stage's evaluation).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dfdx::prelude::NoneTape;
use rlhf_policies::{CausalLm, FusedOps, LearnedReward, Tokenizer};
use serde_json::{json, Value};

use crate::preference::{chat_for, read_comparisons, PreferenceFormat, RewardTruncation};
use crate::prompt_format::{conversation_template, ChatPrompt, PromptFormat};
use crate::stages::common::Checkpointable;
use crate::stages::reward::{self, RewardConfig};
use crate::stages::{pretrain, sft};

/// What to evaluate on, and how to read it.
#[derive(Debug, Clone)]
pub struct EvalData {
    /// The data file: text, `.jsonl` {prompt, response} records, or (for a reward model)
    /// preference JSONL.
    pub data: PathBuf,
    /// Tokens per block (text; default: the model's positions, at most 256).
    pub block: Option<usize>,
    /// Blocks, records or comparisons per forward.
    pub batch: usize,
    /// JSONL {prompt, response}: the two field names.
    pub fields: (String, String),
    /// JSONL: each record's conversation is in this field instead (SFT's `messages_field`).
    pub messages_field: Option<String>,
    /// With `messages_field`: the loss on the last assistant message or on all of them (SFT's
    /// `assistant_turns`).
    pub assistant_turns: crate::stages::sft::AssistantTurns,
    /// The prompt template (`{prompt}` is replaced).
    pub prompt_template: String,
    /// Put prompts in the model's chat template.
    pub chat: bool,
    /// A reward model's preference records.
    pub format: PreferenceFormat,
}

/// Whether the folder `dir` holds a reward model (an HF `*ForSequenceClassification`).
pub fn is_reward_model(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false); // a GGUF file is always a causal LM
    }
    if rlhf_policies::peft::is_adapter(dir) {
        // PEFT names a reward model's adapter by its task (its base may be a causal LM)
        let cfg = rlhf_policies::peft::AdapterConfig::read(&dir.join(rlhf_policies::peft::ADAPTER_CONFIG))?;
        return Ok(cfg.task_type.as_deref() == Some("SEQ_CLS"));
    }
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).with_context(|| format!("{}: cannot read", config.display()))?;
    Ok(text.contains("ForSequenceClassification"))
}

/// Evaluates the checkpoint `model` (a causal LM or a reward model) on `d`; the report as JSON.
pub fn evaluate<D: FusedOps>(model: &Path, d: &EvalData, dev: &D) -> Result<Value> {
    if is_reward_model(model)? {
        let (rm, tok) = LearnedReward::load_dir(model, dev)?;
        return preferences(&rm, &tok, model, d);
    }
    let (lm, tok) = rlhf_policies::checkpoint::load_with_tokenizer(model, dev)?;
    if d.data.extension().is_some_and(|e| e == "jsonl") {
        responses(&lm, &tok, model, d)
    } else {
        text(&lm, &tok, d)
    }
}

/// Next-token loss over non-overlapping blocks of the text file, tokenized as transformers'
/// `tokenizer(text)` does (the BOS of a tokenizer that adds one in front: Llama's first
/// prediction is conditioned on it, as in HF's perplexity recipe).
fn text<D: FusedOps>(model: &CausalLm<D>, tok: &Tokenizer, d: &EvalData) -> Result<Value> {
    let text = crate::data::read_corpus(std::slice::from_ref(&d.data))?;
    let ids = tok.encode_prompt(&text)?;
    let block = d.block.unwrap_or(model.dims.usable_positions().min(256)).max(1);
    if ids.len() <= block {
        bail!("{}: {} tokens, need more than one block of {block}", d.data.display(), ids.len());
    }
    // non-overlapping windows of block + 1 tokens (inputs and shifted targets)
    let windows: Vec<&[u32]> = ids.windows(block + 1).step_by(block).collect();
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in windows.chunks(d.batch.max(1)) {
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|w| w[..block].to_vec()).collect();
        let targets: Vec<usize> = chunk.iter().flat_map(|w| w[1..].iter().map(|&t| t as usize)).collect();
        let loss = pretrain::lm_loss(model, &inputs, &targets, NoneTape)?;
        total += loss.as_vec()[0] as f64 * targets.len() as f64;
        count += targets.len();
    }
    let loss = total / count as f64;
    Ok(json!({"data": d.data, "tokens": count, "block": block, "loss": loss, "perplexity": loss.exp()}))
}

/// SFT's loss (response tokens and EOS) over every {prompt, response} record; records longer
/// than the model's positions are skipped and counted.
fn responses<D: FusedOps>(model: &CausalLm<D>, tok: &Tokenizer, dir: &Path, d: &EvalData) -> Result<Value> {
    // the template is the format's; the config gives the length and the skip rule
    let cfg = sft::SftConfig {
        max_len: model.dims.usable_positions(),
        truncation: sft::Truncation::Skip,
        ..Default::default()
    };
    let chat = d.chat.then(ChatPrompt::default);
    let format = PromptFormat::new(&d.prompt_template, chat.as_ref(), tok, &model.config, dir)?;
    let eos = tok.eos_for(&model.config).with_context(|| format!("{}: no EOS token", dir.display()))?;
    let records = match &d.messages_field {
        Some(field) => {
            let chat = conversation_template(true, &format)?;
            sft::read_conversations(&d.data, field, &chat.expect("asked for"), d.assistant_turns)?
        }
        None => sft::read_records(&d.data, &d.fields.0, &d.fields.1)?,
    };
    let (examples, skipped, _) = sft::tokenize(&cfg, &format, tok, eos, (&d.data, &records))?;
    if examples.is_empty() {
        bail!("{}: no record fits the model's {} positions ({skipped} skipped)", d.data.display(), cfg.max_len);
    }
    let pad = tok.pad_id().unwrap_or(eos);
    let loss = sft::eval_loss(model, &examples, pad, d.batch.max(1))? as f64;
    let tokens: usize = examples.iter().map(|e| e.ids.len() - e.prompt_len).sum();
    Ok(json!({"data": d.data, "examples": examples.len(), "skipped": skipped,
        "tokens": tokens, "loss": loss, "perplexity": loss.exp()}))
}

/// A reward model's accuracy, margin, reward statistics (raw head outputs, before the
/// checkpoint's normalisation) and Bradley–Terry loss over every pair of the preference
/// records; comparisons longer than the model's positions are skipped and counted.
fn preferences<D: FusedOps>(rm: &LearnedReward<D>, tok: &Tokenizer, dir: &Path, d: &EvalData) -> Result<Value> {
    let cfg = RewardConfig {
        data: d.data.clone(),
        format: d.format.clone(),
        max_len: rm.model.dims.usable_positions(),
        truncation: RewardTruncation::Skip,
        ..Default::default()
    };
    let chat = d.chat.then(ChatPrompt::default);
    let format = PromptFormat::new(&d.prompt_template, chat.as_ref(), tok, &rm.model.config, dir)?;
    let eos = tok.eos_for(&rm.model.config).with_context(|| format!("{}: no EOS token", dir.display()))?;
    let template = chat_for(&d.format, &format)?;
    let records = read_comparisons(&d.data, &d.format, template.as_ref())?;
    let (comps, skipped, _) = reward::tokenize(&cfg, &format, tok, eos, (&d.data, &records))?;
    if comps.is_empty() {
        bail!("{}: no comparison fits the model's {} positions ({skipped} skipped)", d.data.display(), cfg.max_len);
    }
    let (ev, _) = reward::evaluate(rm, &comps, 0.0, d.batch.max(1))?;
    let pairs: usize = comps.iter().map(|c| c.responses.len() * (c.responses.len() - 1) / 2).sum();
    Ok(json!({"data": d.data, "comparisons": comps.len(), "pairs": pairs, "skipped": skipped,
        "loss": ev.loss, "stats": ev.stats}))
}
