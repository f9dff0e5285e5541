//! Stage 1, pretraining: a text corpus → tokenizer → token stream → random blocks of
//! `block_size` → next-token cross-entropy, `L = −(1/BT) Σ log p(x_{t+1} | x_{≤t})`.
//!
//! AdamW with linear warm-up and cosine decay, grad-norm clipping, gradient accumulation, a
//! held-out validation split with periodic `val_loss`, samples at eval time, and checkpoints
//! that resume exactly (batches are drawn from `(seed, step, micro-batch)`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use dfdx::prelude::*;
use rlhf_policies::{
    generate_from, AdamW, AdamWConfig, Batch, CausalLm, FusedOps, GradBuffers, ModelConfig, SamplingConfig, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::data::{read_corpus, sample_blocks, TokenSplit};
use crate::device::DeviceKind;
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{announce_best, held_out, optimizer_step, restore_latest, save};

/// How to get the tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenizerSpec {
    /// One token per character of the corpus (nanoGPT's Shakespeare), plus `<|endoftext|>`.
    Char {},
    /// A byte-level BPE trained on the corpus.
    Bpe {
        /// Vocabulary size, special tokens included.
        vocab_size: usize,
        /// Minimum pair frequency for a merge. Default 2.
        #[serde(default = "two")]
        min_frequency: u64,
    },
    /// An existing `tokenizer.json`.
    File {
        /// Its path.
        path: PathBuf,
    },
}

fn two() -> u64 {
    2
}

/// `rlhf pretrain` configuration. Defaults are nanoGPT's character-level Shakespeare on CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Run folder. Default `runs/pretrain`.
    pub out_dir: PathBuf,
    /// Seed of the init and of every batch. Default `1337`.
    pub seed: u64,
    /// Corpus files (UTF-8 text), concatenated. Required.
    pub files: Vec<PathBuf>,
    /// Fraction of the token stream (its end) held out for validation. Default `0.1`.
    pub val_fraction: f64,
    /// Separate validation files (UTF-8 text, concatenated): when given, all of `files`
    /// trains and `val_fraction` is not used; a built tokenizer sees both. Default: none.
    pub val_files: Vec<PathBuf>,
    /// Tokenizer. Default: character level.
    pub tokenizer: TokenizerSpec,
    /// Model config (HF fields; `vocab_size` is set from the tokenizer). Default: GPT-2 with
    /// 4 layers, 4 heads, width 128, 64 positions.
    pub model: ModelConfig,
    /// Tokens per training sequence. Default `64`.
    pub block_size: usize,
    /// Sequences per micro-batch. Default `12`.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default `1`.
    pub grad_accum: usize,
    /// Optimizer steps. Default `2000`.
    pub steps: usize,
    /// AdamW; `lr` is the peak learning rate. Default lr 1e-3, betas (0.9, 0.99), weight decay
    /// 0.1 (not on biases and norms).
    pub optim: AdamWConfig,
    /// Shape of the learning rate over the steps (peak `optim.lr`). Default: warm-up 100,
    /// then cosine to `optim.lr / 10` at the last step.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
    /// Evaluate every this many steps (and at the end). Default `250`.
    pub eval_every: usize,
    /// Validation batches per evaluation. Default `20`.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the end). Default `500`.
    pub checkpoint_every: usize,
    /// Keep only the newest this many checkpoints, and the one with the lowest held-out loss
    /// (recorded when a checkpoint's step is an evaluation's), deleting older ones as new ones
    /// are written (0 keeps every one). Default `0`.
    pub keep_checkpoints: usize,
    /// Tokens sampled at each evaluation. Default `100`.
    pub sample_tokens: usize,
    /// Prompt of the samples. Default `"\n"`.
    pub sample_prompt: String,
    /// Device: `cpu` (default) or `cuda` (GPU 0, a build with `--features cuda`).
    pub device: DeviceKind,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            out_dir: "runs/pretrain".into(),
            seed: 1337,
            files: vec![],
            val_fraction: 0.1,
            val_files: vec![],
            tokenizer: TokenizerSpec::Char {},
            model: ModelConfig::gpt2_preset(65, 128, 4, 4, 64),
            block_size: 64,
            batch_size: 12,
            grad_accum: 1,
            steps: 2000,
            optim: AdamWConfig { lr: 1e-3, betas: [0.9, 0.99], weight_decay: 0.1, ..Default::default() },
            schedule: LrSchedule::warmup_cosine(100),
            grad_clip: 1.0,
            eval_every: 250,
            eval_batches: 20,
            checkpoint_every: 500,
            keep_checkpoints: 0,
            sample_tokens: 100,
            sample_prompt: "\n".into(),
            device: DeviceKind::Cpu,
        }
    }
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainReport {
    /// Steps done (in total, across resumes).
    pub steps: usize,
    /// Last training loss.
    pub train_loss: f32,
    /// Last validation loss.
    pub val_loss: Option<f32>,
    /// Wall seconds of this invocation.
    pub wall_s: f64,
}

/// Mean next-token cross-entropy of `inputs` (rows of `block` ids) against `targets`,
/// recorded on `tape`.
pub fn lm_loss<D: FusedOps, T: Tape<f32, D>>(
    model: &CausalLm<D>,
    inputs: &[Vec<u32>],
    targets: &[usize],
    tape: T,
) -> Result<Tensor<Rank0, f32, D, T>> {
    let h = model.forward_hidden(&Batch::unpadded(inputs)?, tape)?;
    let w = vec![1.0 / targets.len() as f32; targets.len()];
    Ok(model.weighted_nll(h, targets, &w))
}

/// Runs (or, with `resume`, continues) pretraining as configured.
pub fn train(cfg: PretrainConfig, resume: bool) -> Result<PretrainReport> {
    validate(&cfg)?;
    crate::on_device!(cfg.device, dev => train_on(&cfg, resume, dev))
}

fn train_on<D: FusedOps + GradBuffers>(cfg: &PretrainConfig, resume: bool, dev: &D) -> Result<PretrainReport> {
    let run = RunDir::open(&cfg.out_dir, resume)?.keep_last(cfg.keep_checkpoints);
    // BOILERPLATE: data, tokenizer, model, optimizer (fresh or from the last checkpoint)
    let text = read_corpus(&cfg.files)?;
    let val_text = if cfg.val_files.is_empty() { None } else { Some(read_corpus(&cfg.val_files)?) };
    let (mut model, tok, mut opt, start) = if resume {
        let r = restore_latest(&run, &cfg.optim, dev)?;
        (r.model, r.tok, r.opt, r.step)
    } else {
        // a built tokenizer sees the validation text too, as with the fraction split
        let tok = match &val_text {
            None => build_tokenizer(cfg, &text)?,
            Some(v) => build_tokenizer(cfg, &format!("{text}{v}"))?,
        };
        let mut model_cfg = cfg.model.clone();
        model_cfg.set_vocab_size(tok.vocab_size());
        run.write_config(cfg)?;
        (CausalLm::new(model_cfg, dev, cfg.seed)?, tok, AdamW::new(cfg.optim.clone()), 0)
    };
    let split = match &val_text {
        None => TokenSplit::new(tok.encode(&text)?, cfg.val_fraction, cfg.block_size, &cfg.files[0])?,
        Some(v) => {
            TokenSplit::held_out(tok.encode(&text)?, tok.encode(v)?, cfg.block_size, &cfg.files[0], &cfg.val_files[0])?
        }
    };
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut bar = crate::progress::bar(cfg.steps as u64, "pretrain");
    bar.set_position(start as u64);
    let t_run = Instant::now();
    let (mut train_loss, mut val_loss) = (f32::NAN, None);
    for step in start..cfg.steps {
        // ALGO: one optimizer step over grad_accum micro-batches
        let t0 = Instant::now();
        let lr = cfg.schedule.at(cfg.optim.lr, cfg.steps, step);
        let (loss_sum, grad_norm) =
            optimizer_step(&mut model, &mut opt, lr, cfg.grad_clip, cfg.grad_accum, |m, micro, tape| {
                let (x, y) =
                    sample_blocks(&split.train, cfg.block_size, cfg.batch_size, cfg.seed, step as u64, micro as u64);
                lm_loss(m, &x, &y, tape)
            })?;
        train_loss = loss_sum;
        let tokens = cfg.grad_accum * cfg.batch_size * cfg.block_size;
        let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
        let done = step + 1;
        let mut record = serde_json::json!({"step": done, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s});
        if done % cfg.eval_every == 0 || done == cfg.steps {
            // val_fraction 0 (and no val_files) means no validation split: samples only
            if !split.val.is_empty() {
                let v = eval_loss(&model, &split.val, cfg)?;
                val_loss = Some(v);
                record["val_loss"] = v.into();
            }
            let text = sample(&model, &tok, cfg, done)?;
            samples.write(&serde_json::json!({"step": done, "prompt": cfg.sample_prompt, "sample": text}))?;
        }
        metrics.write(&record)?;
        bar.set_message(format!(
            "loss {train_loss:.3}{} | {tok_s:.0} tok/s",
            val_loss.map(|v| format!(" val {v:.3}")).unwrap_or_default()
        ));
        bar.inc(1);
        crate::stop::end_step("pretrain", &run, (done, cfg.steps, cfg.checkpoint_every), || {
            save(&run, (done, held_out(&record, "val_loss")), &model, &tok, &mut opt)
        })?;
    }
    bar.finish();
    announce_best(&run, "pretrain")?;
    Ok(PretrainReport { steps: cfg.steps, train_loss, val_loss, wall_s: t_run.elapsed().as_secs_f64() })
}

fn validate(cfg: &PretrainConfig) -> Result<()> {
    if cfg.optim.lora.is_some() {
        anyhow::bail!("optim.lora: LoRA adapts a trained model; pretraining trains every weight from scratch");
    }
    if cfg.files.is_empty() {
        bail!("files: give at least one corpus file");
    }
    crate::stages::common::require_counts(&[
        ("block_size", cfg.block_size),
        ("batch_size", cfg.batch_size),
        ("grad_accum", cfg.grad_accum),
        ("steps", cfg.steps),
        ("eval_every", cfg.eval_every),
        ("eval_batches", cfg.eval_batches),
        ("checkpoint_every", cfg.checkpoint_every),
    ])?;
    crate::stages::common::require_positive(&[("grad_clip", cfg.grad_clip)])?;
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    let dims = cfg.model.dims()?;
    if let Some(limit) = dims.position_limit().filter(|&l| l < cfg.block_size) {
        bail!("model.n_positions {limit} is smaller than block_size {}", cfg.block_size);
    }
    Ok(())
}

fn build_tokenizer(cfg: &PretrainConfig, text: &str) -> Result<Tokenizer> {
    Ok(match &cfg.tokenizer {
        TokenizerSpec::Char {} => Tokenizer::char_level(text)?,
        TokenizerSpec::Bpe { vocab_size, min_frequency } => {
            Tokenizer::train_bpe(text.lines(), *vocab_size, *min_frequency)?
        }
        TokenizerSpec::File { path } => Tokenizer::from_file(path)?,
    })
}

/// Mean loss over `eval_batches` fixed validation batches (the same ones at every evaluation).
fn eval_loss<D: FusedOps>(model: &CausalLm<D>, val: &[u32], cfg: &PretrainConfig) -> Result<f32> {
    let mut total = 0.0;
    for i in 0..cfg.eval_batches {
        let (x, y) = sample_blocks(val, cfg.block_size, cfg.batch_size, cfg.seed, u64::MAX, i as u64);
        total += lm_loss(model, &x, &y, NoneTape)?.as_vec()[0];
    }
    Ok(total / cfg.eval_batches as f32)
}

fn sample<D: FusedOps>(model: &CausalLm<D>, tok: &Tokenizer, cfg: &PretrainConfig, step: usize) -> Result<String> {
    let prompt = tok.encode(&cfg.sample_prompt)?;
    if prompt.is_empty() || cfg.sample_tokens == 0 {
        return Ok(String::new());
    }
    let max_new = cfg.sample_tokens.min(model.dims.usable_positions().saturating_sub(prompt.len()));
    let sampling = SamplingConfig {
        max_new_tokens: max_new,
        temperature: 0.8,
        seed: cfg.seed ^ step as u64,
        ..Default::default()
    };
    let out = generate_from(model, &[prompt], 0, &sampling)?;
    Ok(tok.decode(&out.tokens[0])?)
}
