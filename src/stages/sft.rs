//! Stage 2, supervised fine-tuning on `{prompt, response}` pairs:
//!
//! ```text
//! x = template(prompt) ⧺ response ⧺ EOS,   L = −(1/|R|) Σ_{t∈R} log p(x_t | x_{<t})
//! ```
//! where `R` is the response tokens and the EOS (prompt tokens and padding are masked). The
//! result is the initial policy and the frozen reference of RLHF.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use dfdx::prelude::*;
use rlhf_policies::chat::ChatTemplate;
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::{generate_from, AdamWConfig, Batch, CausalLm, FusedOps, GradBuffers, SamplingConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::data::{epochs_seen, EpochOrder};
use crate::device::DeviceKind;
use crate::prompt_format::{conversation_template, split_reply, ChatPrompt, PromptFormat};
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{
    self, announce_best, held_out, optimizer_step, require_fits, restore_or_init, save, HeldOut, HoldOut, Restored,
};

/// What to do with an example longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Leave it out (counted and reported).
    #[default]
    Skip,
    /// Cut the response (the EOS is then missing: the model learns to continue).
    TruncateResponse,
    /// Stop with an error naming the record.
    Error,
}

/// `rlhf sft` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Run folder. Default `runs/sft`.
    pub out_dir: PathBuf,
    /// Seed of the example order and the samples. Default `1337`.
    pub seed: u64,
    /// The model to fine-tune: a pretrain checkpoint or any HF folder with a tokenizer.
    /// Required.
    pub init: PathBuf,
    /// JSONL file of examples. Required.
    pub data: PathBuf,
    /// Field holding the prompt. Default `prompt`.
    pub prompt_field: String,
    /// Field holding the response. Default `response`.
    pub response_field: String,
    /// Read each record's conversation from this field instead (TRL's conversational format:
    /// `[{"role": "system" | "user" | "assistant", "content": …}, …]`, ending with the assistant's
    /// message): the last message is the response, the ones before it the prompt, rendered
    /// with the model's chat template up to the assistant's turn. `prompt_template` and `chat`
    /// then do not apply. Default: none (`prompt_field` and `response_field`).
    pub messages_field: Option<String>,
    /// With `messages_field`: which assistant messages the loss is on — `last` (default) or
    /// `all` (TRL's `assistant_only_loss`: every assistant turn, each with the conversation
    /// before it as its prompt; a conversation of n assistant turns becomes n examples, so
    /// each assistant token is trained once, in its full context). `val_fraction` keeps each
    /// conversation's examples on one side of the split (the held-out part begins with a whole
    /// conversation).
    pub assistant_turns: AssistantTurns,
    /// Fraction of the records (the last ones) held out for evaluation. Default `0.05`.
    pub val_fraction: f64,
    /// A separate JSONL file of held-out examples (same fields): when given, every record of
    /// `data` trains and `val_fraction` is not used. Default: none.
    pub val_data: Option<PathBuf>,
    /// Prompt template; `{prompt}` is replaced by the prompt. Default `{prompt}`.
    pub prompt_template: String,
    /// Present: each templated prompt becomes the user turn of the model's own chat template,
    /// with the assistant's turn opened (see [`crate::prompt_format`]). Default: none.
    pub chat: Option<ChatPrompt>,
    /// Longest example in tokens (prompt + response + EOS). Default `256`.
    pub max_len: usize,
    /// Longer examples are skipped (default), truncated, or an error.
    pub truncation: Truncation,
    /// Pack consecutive examples of the shuffled stream into each row, up to `max_len` input
    /// tokens (attention and positions restart at each example, so each is trained on as if
    /// alone, with less padding); `batch_size` then counts rows. Default `false`.
    pub packing: bool,
    /// Examples (rows, when packing) per micro-batch, right-padded. Default `8`.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default `1`.
    pub grad_accum: usize,
    /// Optimizer steps (unless `epochs` is set). Default `200`.
    pub steps: usize,
    /// Passes over the training examples instead of `steps`: the run takes enough whole steps
    /// to cover them (rows, when packing) and `config.json` records that number as `steps`.
    /// Default: none.
    pub epochs: Option<f64>,
    /// AdamW; `lr` is the peak learning rate. Default lr 1e-4, no weight decay.
    pub optim: AdamWConfig,
    /// Shape of the learning rate over the steps (peak `optim.lr`). Default: warm-up 10, then
    /// cosine to `optim.lr / 10` at the last step.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
    /// Evaluate every this many steps (and at the end). Default `50`.
    pub eval_every: usize,
    /// Checkpoint every this many steps (and at the end). Default `100`.
    pub checkpoint_every: usize,
    /// Keep only the newest this many checkpoints, and the one with the lowest held-out loss
    /// (recorded when a checkpoint's step is an evaluation's), deleting older ones as new ones
    /// are written (0 keeps every one). Default `0`.
    pub keep_checkpoints: usize,
    /// Validation prompts sampled at each evaluation. Default `3`.
    pub sample_count: usize,
    /// Tokens per sample. Default `48`.
    pub sample_tokens: usize,
    /// Device: `cpu` (default) or `cuda` (GPU 0, a build with `--features cuda`).
    pub device: DeviceKind,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            out_dir: "runs/sft".into(),
            seed: 1337,
            init: PathBuf::new(),
            data: PathBuf::new(),
            prompt_field: "prompt".into(),
            response_field: "response".into(),
            messages_field: None,
            assistant_turns: AssistantTurns::Last,
            val_fraction: 0.05,
            val_data: None,
            prompt_template: "{prompt}".into(),
            chat: None,
            max_len: 256,
            truncation: Truncation::Skip,
            packing: false,
            batch_size: 8,
            grad_accum: 1,
            steps: 200,
            epochs: None,
            optim: AdamWConfig { lr: 1e-4, ..Default::default() },
            schedule: LrSchedule::warmup_cosine(10),
            grad_clip: 1.0,
            eval_every: 50,
            checkpoint_every: 100,
            keep_checkpoints: 0,
            sample_count: 3,
            sample_tokens: 48,
            device: DeviceKind::Cpu,
        }
    }
}

/// One tokenized example: `ids = prompt ⧺ response ⧺ EOS`, loss on `ids[prompt_len..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// All token ids.
    pub ids: Vec<u32>,
    /// How many of them are prompt.
    pub prompt_len: usize,
    /// The 1-based line of its record (a conversation's examples share it).
    pub line: usize,
}

/// One {prompt, response} example as read, before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftRecord {
    /// The 1-based line of the record in its file.
    pub line: usize,
    /// The prompt text (before the prompt template).
    pub prompt: String,
    /// Whether `prompt` is already chat-template text (a conversation's), which the prompt
    /// format leaves as it is ([`PromptFormat::input`]).
    pub rendered: bool,
    /// The response text.
    pub response: String,
}

/// The `{prompt_field, response_field}` records of a JSONL file (errors naming the file, line
/// and field).
pub fn read_records(file: &Path, prompt_field: &str, response_field: &str) -> Result<Vec<SftRecord>> {
    let read = |r: &crate::data::JsonRecord<'_>| {
        let (prompt, response) = (r.str(prompt_field)?, r.str(response_field)?);
        Ok(SftRecord { line: r.line, prompt, rendered: false, response })
    };
    crate::data::read_jsonl(file)?.iter().map(read).collect()
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SftReport {
    /// Steps done.
    pub steps: usize,
    /// Examples used for training / evaluation.
    pub train_examples: usize,
    /// Held-out examples.
    pub val_examples: usize,
    /// Examples skipped for being longer than `max_len`.
    pub skipped_too_long: usize,
    /// Examples whose response was truncated.
    pub truncated: usize,
    /// Last training loss.
    pub train_loss: f32,
    /// Last validation loss.
    pub val_loss: Option<f32>,
}

/// Tokenizes the records; returns the examples and the (skipped, truncated) counts.
pub fn tokenize(
    cfg: &SftConfig,
    format: &PromptFormat,
    tok: &Tokenizer,
    eos: u32,
    (file, records): (&Path, &[SftRecord]),
) -> Result<(Vec<Example>, usize, usize)> {
    let (mut out, mut skipped, mut truncated) = (Vec::new(), 0, 0);
    for rec in records {
        let prompt = tok.encode_prompt(&format.input(&rec.prompt, rec.rendered)?)?;
        let mut ids = prompt.clone();
        ids.extend(tok.encode(format.response(&rec.response))?);
        ids.push(eos);
        let line = rec.line;
        if prompt.is_empty() {
            bail!("{}: line {line}: the prompt encodes to no tokens", file.display());
        }
        if ids.len() > cfg.max_len {
            match cfg.truncation {
                Truncation::Skip => {
                    skipped += 1;
                    continue;
                }
                Truncation::TruncateResponse if prompt.len() < cfg.max_len => {
                    ids.truncate(cfg.max_len);
                    truncated += 1;
                }
                _ => bail!("{}: line {line}: {} tokens exceed max_len {}", file.display(), ids.len(), cfg.max_len),
            }
        }
        out.push(Example { ids, prompt_len: prompt.len(), line });
    }
    Ok((out, skipped, truncated))
}

/// Mean negative log-likelihood of the response tokens (and EOS) of `examples`, prompt and
/// padding masked out: `−(Σ_{t∈R} log p(x_t | x_<t)) / |R|`.
pub fn sft_loss<D: FusedOps, T: Tape<f32, D>>(
    model: &CausalLm<D>,
    examples: &[&Example],
    pad: u32,
    tape: T,
) -> Result<Tensor<Rank0, f32, D, T>> {
    let rows: Vec<Vec<&Example>> = examples.iter().map(|&e| vec![e]).collect();
    sft_loss_packed(model, &rows, pad, tape)
}

/// [`sft_loss`] over packed rows ([`Batch::packed`]): each row holds several examples one
/// after another, each attended to and positioned as if alone; the mean runs over every
/// response token (and EOS) of every row, as if the examples came one per row.
pub fn sft_loss_packed<D: FusedOps, T: Tape<f32, D>>(
    model: &CausalLm<D>,
    rows: &[Vec<&Example>],
    pad: u32,
    tape: T,
) -> Result<Tensor<Rank0, f32, D, T>> {
    // inputs are ids[..n-1], targets ids[1..]; target j is a response token iff j + 1 >= prompt_len
    let inputs: Vec<Vec<&[u32]>> = rows.iter().map(|r| r.iter().map(|e| &e.ids[..e.ids.len() - 1]).collect()).collect();
    let batch = Batch::packed(&inputs, pad)?;
    let (mut targets, mut weights) = (Vec::with_capacity(batch.b * batch.t), Vec::with_capacity(batch.b * batch.t));
    for row in rows {
        for e in row {
            for j in 0..e.ids.len() - 1 {
                targets.push(e.ids[j + 1] as usize);
                weights.push(if j + 1 >= e.prompt_len { 1.0f32 } else { 0.0 });
            }
        }
        let pad_to = targets.len().next_multiple_of(batch.t);
        targets.resize(pad_to, 0);
        weights.resize(pad_to, 0.0);
    }
    let n_resp: f32 = weights.iter().sum();
    if n_resp == 0.0 {
        bail!("a batch with no response tokens");
    }
    // only the response positions reach the LM head (and the last block's MLP)
    let rows: Vec<usize> = (0..weights.len()).filter(|&r| weights[r] > 0.0).collect();
    let h = model.forward_hidden_rows(&batch, &rows, tape)?;
    let targets: Vec<usize> = rows.iter().map(|&r| targets[r]).collect();
    let weights: Vec<f32> = rows.iter().map(|&r| weights[r] / n_resp).collect();
    Ok(model.weighted_nll(h, &targets, &weights))
}

/// The training stream's rows: one example each, or packed — consecutive examples of the
/// shuffled stream while their inputs fit in `max_len` tokens (at most 255 per row, the
/// packed mask's limit). A row's examples depend only on the seed and its index, so a
/// resumed run packs as the uninterrupted one did.
enum Rows {
    Single(EpochOrder),
    Packed { order: EpochOrder, next: usize, rows: Vec<Vec<usize>>, max_len: usize },
}

impl Rows {
    fn new(cfg: &SftConfig, n: usize) -> Self {
        let order = EpochOrder::new(n, cfg.seed);
        if cfg.packing {
            Rows::Packed { order, next: 0, rows: vec![], max_len: cfg.max_len }
        } else {
            Rows::Single(order)
        }
    }

    /// Examples of the stream taken by the first `rows` rows (all asked for already).
    fn examples_in(&self, rows: usize) -> usize {
        match self {
            Rows::Single(_) => rows,
            Rows::Packed { rows: built, .. } => built[..rows].iter().map(Vec::len).sum(),
        }
    }

    /// The examples of row `k`, as indices into `set`.
    fn row(&mut self, k: usize, set: &[Example]) -> Vec<usize> {
        match self {
            Rows::Single(order) => vec![order.index(k)],
            Rows::Packed { order, next, rows, max_len } => {
                while rows.len() <= k {
                    let (mut row, mut len) = (vec![], 0);
                    loop {
                        let i = order.index(*next);
                        let l = set[i].ids.len() - 1;
                        if !row.is_empty() && (len + l > *max_len || row.len() == u8::MAX as usize) {
                            break;
                        }
                        (len, *next) = (len + l, *next + 1);
                        row.push(i);
                    }
                    rows.push(row);
                }
                rows[k].clone()
            }
        }
    }
}

/// The run's steps: `steps`, or those `epochs` take (see [`common::steps_for_epochs`]).
fn steps_for_epochs(cfg: &SftConfig, train_set: &[Example]) -> usize {
    let mut rows = Rows::new(cfg, train_set.len());
    let rows_taking = |records: usize| {
        let mut k = 0;
        while rows.examples_in(k) < records {
            rows.row(k, train_set);
            k += 1;
        }
        k
    };
    let per_step = cfg.batch_size * cfg.grad_accum;
    common::steps_for_epochs("sft", (cfg.epochs, cfg.steps), train_set.len(), per_step, rows_taking)
}

/// Runs (or, with `resume`, continues) supervised fine-tuning as configured.
pub fn train(mut cfg: SftConfig, resume: bool) -> Result<SftReport> {
    validate(&cfg)?;
    crate::run::resolve_model_in(&mut cfg.init)?;
    crate::on_device!(cfg.device, dev => train_on(&cfg, resume, dev))
}

fn train_on<D: FusedOps + GradBuffers>(cfg: &SftConfig, resume: bool, dev: &D) -> Result<SftReport> {
    let run = RunDir::open(&cfg.out_dir, resume)?.keep_last(cfg.keep_checkpoints);
    // BOILERPLATE: model, tokenizer, optimizer (from init, or from the run's last checkpoint)
    let Restored { mut model, tok, mut opt, step: start } =
        restore_or_init(&run, resume, (&cfg.optim, cfg.seed), dev, || Ok(load_with_tokenizer(&cfg.init, dev)?))?;
    require_fits(cfg.max_len, &model.dims, &cfg.init)?;
    let eos = tok
        .eos_for(&model.config)
        .ok_or_else(|| anyhow::anyhow!("{}: the tokenizer has no EOS token", cfg.init.display()))?;
    let pad = tok.pad_id().unwrap_or(eos);
    // DATA: records → examples → train / validation
    let data = load_data(cfg, &tok, &model.config, eos)?;
    let (train_set, val_set) = data.split();
    let cfg =
        &common::record_config(&run, resume, SftConfig { steps: steps_for_epochs(cfg, train_set), ..cfg.clone() })?;
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut bar = crate::progress::bar(cfg.steps as u64, "sft");
    bar.set_position(start as u64);
    let (mut train_loss, mut val_loss) = (f32::NAN, None);
    let mut stream = Rows::new(cfg, train_set.len());
    for step in start..cfg.steps {
        // ALGO: masked cross-entropy over grad_accum micro-batches, one AdamW step
        let t0 = Instant::now();
        let lr = cfg.schedule.at(cfg.optim.lr, cfg.steps, step);
        let mut tokens = 0usize;
        let (loss, grad_norm) =
            optimizer_step(&mut model, &mut opt, lr, cfg.grad_clip, cfg.grad_accum, |m, micro, tape| {
                let first = (step * cfg.grad_accum + micro) * cfg.batch_size;
                let rows: Vec<Vec<&Example>> = (first..first + cfg.batch_size)
                    .map(|k| stream.row(k, train_set).into_iter().map(|i| &train_set[i]).collect())
                    .collect();
                tokens += rows.iter().flatten().map(|e| e.ids.len()).sum::<usize>();
                sft_loss_packed(m, &rows, pad, tape)
            })?;
        train_loss = loss;
        let done = step + 1;
        let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
        let epoch = epochs_seen(stream.examples_in(done * cfg.grad_accum * cfg.batch_size), train_set.len());
        let mut record = serde_json::json!({"step": done, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": tok_s});
        if (done % cfg.eval_every == 0 || done == cfg.steps) && !val_set.is_empty() {
            let v = eval_loss(&model, val_set, pad, cfg.batch_size)?;
            val_loss = Some(v);
            record["val_loss"] = v.into();
            for s in sample(&model, &tok, val_set, cfg, eos, done)? {
                samples.write(&s)?;
            }
        }
        metrics.write(&record)?;
        bar.set_message(format!(
            "loss {loss:.3}{} | {tok_s:.0} tok/s",
            val_loss.map(|v| format!(" val {v:.3}")).unwrap_or_default()
        ));
        bar.inc(1);
        crate::stop::end_step("sft", &run, (done, cfg.steps, cfg.checkpoint_every), || {
            save(&run, (done, held_out(&record, "val_loss")), &model, &tok, &mut opt)
        })?;
    }
    bar.finish();
    announce_best(&run, "sft")?;
    Ok(SftReport {
        steps: cfg.steps,
        train_examples: train_set.len(),
        val_examples: val_set.len(),
        skipped_too_long: data.skipped,
        truncated: data.truncated,
        train_loss,
        val_loss,
    })
}

/// The examples of `data` (and `val_data`) tokenized, with the held-out ones split off.
fn load_data(
    cfg: &SftConfig,
    tok: &Tokenizer,
    config: &rlhf_policies::ModelConfig,
    eos: u32,
) -> Result<HeldOut<Example>> {
    let format = PromptFormat::new(&cfg.prompt_template, cfg.chat.as_ref(), tok, config, &cfg.init)?;
    let hold = HoldOut {
        stage: "sft",
        what: "examples",
        data: &cfg.data,
        val_data: cfg.val_data.as_deref(),
        val_fraction: cfg.val_fraction,
        max_len: cfg.max_len,
    };
    let chat = conversation_template(cfg.messages_field.is_some(), &format)?;
    let data = HeldOut::load(hold, |file| {
        let records = match (&cfg.messages_field, &chat) {
            (Some(field), Some(chat)) => read_conversations(file, field, chat, cfg.assistant_turns)?,
            _ => read_records(file, &cfg.prompt_field, &cfg.response_field)?,
        };
        Ok((records.len(), tokenize(cfg, &format, tok, eos, (file, &records))?))
    })?;
    // a conversation's examples (assistant_turns all) stay on one side of the split
    data.keep_groups_whole(|e| e.line, &cfg.data, "examples")
}

/// Which assistant messages of a conversation SFT trains on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AssistantTurns {
    /// The last message (the conversation must end with it).
    #[default]
    Last,
    /// Every assistant message after the first message.
    All,
}

/// Each record's conversation in `field` as {prompt, response} examples: the messages before an
/// assistant message rendered with `chat` up to the assistant's turn, and that message's text —
/// for the last message, or (`AssistantTurns::All`) for every assistant message (the examples
/// of one conversation share its line).
pub fn read_conversations(
    file: &Path,
    field: &str,
    chat: &ChatTemplate,
    turns: AssistantTurns,
) -> Result<Vec<SftRecord>> {
    let mut out = vec![];
    for r in crate::data::read_jsonl(file)? {
        let messages: Vec<rlhf_policies::chat::ChatMessage> = r.parse(field)?;
        if messages.len() < 2 || messages[messages.len() - 1].role != "assistant" {
            return Err(r.error(format!("field `{field}` must end with an assistant message after at least one other")));
        }
        // each conversation prefix that ends with a trained assistant message, after another
        let ends = match turns {
            AssistantTurns::Last => messages.len()..=messages.len(),
            AssistantTurns::All => 2..=messages.len(),
        };
        for (before, reply) in ends.filter_map(|k| split_reply(messages[..k].to_vec()).filter(|(m, _)| !m.is_empty())) {
            let prompt = chat.render(&before, true).map_err(|e| r.error(format!("field `{field}`: {e}")))?;
            out.push(SftRecord { line: r.line, prompt, rendered: true, response: reply });
        }
    }
    Ok(out)
}

fn validate(cfg: &SftConfig) -> Result<()> {
    crate::stages::common::require_counts(&[
        ("batch_size", cfg.batch_size),
        ("grad_accum", cfg.grad_accum),
        ("steps", cfg.steps),
        ("eval_every", cfg.eval_every),
        ("checkpoint_every", cfg.checkpoint_every),
        ("max_len", cfg.max_len),
    ])?;
    if cfg.assistant_turns == AssistantTurns::All && cfg.messages_field.is_none() {
        bail!("assistant_turns applies to conversations: set messages_field");
    }
    if cfg.data.as_os_str().is_empty() || cfg.init.as_os_str().is_empty() {
        bail!("data and init are required (a JSONL file and a checkpoint folder)");
    }
    crate::stages::common::require_fraction("val_fraction", cfg.val_fraction)?;
    crate::stages::common::require_positive(&[("grad_clip", cfg.grad_clip)])?;
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    crate::stages::common::require_epochs(cfg.epochs)
}

/// Response-token-weighted mean loss over `val` (the held-out split, or `rlhf eval` on JSONL).
pub fn eval_loss<D: FusedOps>(model: &CausalLm<D>, val: &[Example], pad: u32, batch: usize) -> Result<f32> {
    let (mut total, mut count) = (0.0f64, 0.0f64);
    for chunk in val.chunks(batch) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let n: usize = chunk.iter().map(|e| e.ids.len() - e.prompt_len).sum();
        total += sft_loss(model, &refs, pad, NoneTape)?.as_vec()[0] as f64 * n as f64;
        count += n as f64;
    }
    Ok((total / count) as f32)
}

fn sample<D: FusedOps>(
    model: &CausalLm<D>,
    tok: &Tokenizer,
    val: &[Example],
    cfg: &SftConfig,
    eos: u32,
    step: usize,
) -> Result<Vec<serde_json::Value>> {
    // the samples stop at any of the model's EOS ids (the training targets end with `eos`)
    let eos_ids = tok.eos_ids_for(&model.config);
    let prompts: Vec<Vec<u32>> = val.iter().take(cfg.sample_count).map(|e| e.ids[..e.prompt_len].to_vec()).collect();
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = model.dims.usable_positions().saturating_sub(longest);
    let sampling = SamplingConfig {
        max_new_tokens: cfg.sample_tokens.min(room),
        temperature: 0.7,
        eos_ids,
        seed: cfg.seed ^ step as u64,
        ..Default::default()
    };
    if sampling.max_new_tokens == 0 {
        return Ok(vec![]);
    }
    let out = generate_from(model, &prompts, tok.pad_id().unwrap_or(eos), &sampling)?;
    prompts
        .iter()
        .zip(&out.tokens)
        .map(|(p, r)| Ok(serde_json::json!({"step": step, "prompt": tok.decode(p)?, "response": tok.decode(r)?})))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_fill_up_to_max_len_and_cover_the_stream_in_order() {
        // inputs (ids less the last) of 9, 9, 4, 19 and 14 tokens
        let set: Vec<Example> =
            [10, 10, 5, 20, 15].iter().map(|&n| Example { ids: vec![1; n], prompt_len: 1, line: 1 }).collect();
        let cfg = SftConfig { packing: true, max_len: 20, seed: 7, ..Default::default() };
        let mut rows = Rows::new(&cfg, set.len());
        let first: Vec<Vec<usize>> = (0..8).map(|k| rows.row(k, &set)).collect();
        let mut order = EpochOrder::new(set.len(), 7);
        let stream: Vec<usize> = (0..first.iter().map(Vec::len).sum()).map(|i| order.index(i)).collect();
        assert_eq!(first.concat(), stream, "rows take the shuffled stream in order");
        let input = |i: usize| set[i].ids.len() - 1;
        for (row, next) in first.iter().zip(&first[1..]) {
            let len: usize = row.iter().map(|&i| input(i)).sum();
            assert!(len <= 20 && len + input(next[0]) > 20, "full, and the next example does not fit: {row:?}");
        }
        assert!(first.iter().any(|r| r.len() > 1), "some rows hold several examples: {first:?}");
        // a row is the same whether or not the rows before it were asked for first
        let mut again = Rows::new(&cfg, set.len());
        assert_eq!(again.row(5, &set), first[5]);
    }
}
