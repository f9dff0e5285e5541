//! Stage 3a, the reward model: a transformer with a scalar head read at the last token (EOS)
//! of prompt + response, trained on human choices with the Bradley–Terry loss
//!
//! ```text
//! L = −E[ log σ(r(x, y_w) − r(x, y_l) − m) ] + η · E[(r(x, y_w) + r(x, y_l))²]
//! ```
//! ([`crate::math::preference::bradley_terry_loss`]). After training, the scores of a
//! reference set fix a gain and bias (`r' = g·r + b`, target mean 0 and std 1 by default) that
//! go into the checkpoint's `config.json`; the learned-reward adapter applies them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::fused::host_loss;
use rlhf_policies::{
    generate_from, AdamWConfig, Batch, CausalLm, FusedOps, GradBuffers, LearnedReward, RewardNormalization,
    SamplingConfig, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::data::{epochs_seen, EpochOrder};
use crate::device::DeviceKind;
use crate::math::preference::{bradley_terry_loss, preference_stats, PreferenceStats};
use crate::preference::{
    chat_for, read_comparisons, tokenize_with, Comparison, PreferenceFormat, RewardTruncation, TokComparison,
    TokenizeSpec,
};
use crate::prompt_format::{ChatPrompt, PromptFormat};
use crate::run::{JsonlWriter, RunDir};
use crate::schedule::LrSchedule;
use crate::stages::common::{
    announce_best, held_out, optimizer_step, record_config, require_fits, restore_or_init, save, save_with,
    steps_for_epochs, Checkpointable, HeldOut, HoldOut, LossOn, Restored,
};

/// Where the normalisation's reference scores come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NormReference {
    /// Every response of the held-out comparisons (the training ones if none are held out).
    EvalResponses {},
    /// Responses sampled from a policy (lm-human-preferences: the reference policy) for the
    /// held-out prompts.
    PolicySamples {
        /// The policy checkpoint. Default: `init`.
        #[serde(default)]
        policy: Option<PathBuf>,
        /// Samples per prompt. Default `1`.
        #[serde(default = "one")]
        per_prompt: usize,
        /// Tokens per sample. Default `64`.
        #[serde(default = "sixty_four")]
        max_new_tokens: usize,
        /// Sampling temperature. Default `1.0`.
        #[serde(default = "unit")]
        temperature: f32,
    },
}

fn one() -> usize {
    1
}
fn sixty_four() -> usize {
    64
}
fn unit() -> f32 {
    1.0
}

/// The normalisation fitted after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormalizeConfig {
    /// Reference set. Default: the eval responses.
    pub reference: NormReference,
    /// Target mean μ_T. Default `0`.
    pub target_mean: f32,
    /// Target standard deviation σ_T. Default `1`.
    pub target_std: f32,
}

impl Default for NormalizeConfig {
    fn default() -> Self {
        NormalizeConfig { reference: NormReference::EvalResponses {}, target_mean: 0.0, target_std: 1.0 }
    }
}

/// `rlhf reward` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Run folder. Default `runs/reward`.
    pub out_dir: PathBuf,
    /// Seed of the comparison order and the head init. Default `1337`.
    pub seed: u64,
    /// The backbone: an SFT/pretrain checkpoint or any HF folder with a tokenizer (a fresh
    /// score head is added), or a reward model to train further. Required.
    pub init: PathBuf,
    /// JSONL (or `.jsonl.gz`) preference file. Required.
    pub data: PathBuf,
    /// Record layout. Default: `{"kind": "pairs"}` with fields prompt / chosen / rejected.
    pub format: PreferenceFormat,
    /// Fraction of the comparisons (the last ones) held out for evaluation. Default `0.1`.
    pub val_fraction: f64,
    /// A separate preference file of held-out comparisons (same format): when given, every
    /// comparison of `data` trains and `val_fraction` is not used. Default: none.
    pub val_data: Option<PathBuf>,
    /// Prompt template; `{prompt}` is replaced by the prompt. Default `{prompt}`.
    pub prompt_template: String,
    /// Present: each templated prompt becomes the user turn of the model's own chat template,
    /// with the assistant's turn opened (see [`crate::prompt_format`]). Default: none.
    pub chat: Option<ChatPrompt>,
    /// Longest sequence in tokens (prompt + response + EOS). Default `256`.
    pub max_len: usize,
    /// Longer comparisons are skipped (default), their prompts cut, or an error.
    pub truncation: RewardTruncation,
    /// Comparisons per micro-batch. Default `8`.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default `1`.
    pub grad_accum: usize,
    /// Optimizer steps (unless `epochs` is set). Default `200`.
    pub steps: usize,
    /// Passes over the training comparisons instead of `steps`: the run takes enough whole steps
    /// to cover them and `config.json` records that number as `steps`. Default: none.
    pub epochs: Option<f64>,
    /// AdamW; `lr` is the peak learning rate. Default lr 1e-4, no weight decay.
    pub optim: AdamWConfig,
    /// Shape of the learning rate over the steps (peak `optim.lr`). Default: warm-up 10, then
    /// cosine to `optim.lr / 10` at the last step.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
    /// Centering coefficient η (TRL's `center_rewards_coefficient`). Default `0.01`.
    pub center_coef: f64,
    /// Evaluate every this many steps (and at the end). Default `50`.
    pub eval_every: usize,
    /// Checkpoint every this many steps (and at the end). Default `100`.
    pub checkpoint_every: usize,
    /// Keep only the newest this many checkpoints, and the one with the lowest held-out loss
    /// (recorded when a checkpoint's step is an evaluation's), deleting older ones as new ones
    /// are written (0 keeps every one). Default `0`.
    pub keep_checkpoints: usize,
    /// Held-out comparisons written to `samples.jsonl` with their scores at each evaluation.
    /// Default `3`.
    pub sample_count: usize,
    /// Normalisation fitted after training; `null` for none. Default: eval responses to
    /// mean 0, std 1.
    pub normalize: Option<NormalizeConfig>,
    /// Device: `cpu` (default) or `cuda` (GPU 0, a build with `--features cuda`).
    pub device: DeviceKind,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            out_dir: "runs/reward".into(),
            seed: 1337,
            init: PathBuf::new(),
            data: PathBuf::new(),
            format: PreferenceFormat::default(),
            val_fraction: 0.1,
            val_data: None,
            prompt_template: "{prompt}".into(),
            chat: None,
            max_len: 256,
            truncation: RewardTruncation::Skip,
            batch_size: 8,
            grad_accum: 1,
            steps: 200,
            epochs: None,
            optim: AdamWConfig { lr: 1e-4, ..Default::default() },
            schedule: LrSchedule::warmup_cosine(10),
            grad_clip: 1.0,
            center_coef: 0.01,
            eval_every: 50,
            checkpoint_every: 100,
            keep_checkpoints: 0,
            sample_count: 3,
            normalize: Some(NormalizeConfig::default()),
            device: DeviceKind::Cpu,
        }
    }
}

/// A taped scalar on device `D`.
pub type Scalar<T, D = Cpu> = Tensor<Rank0, f32, D, T>;

/// Loss and statistics of a set of comparisons.
#[derive(Debug, Clone, Serialize)]
pub struct RewardEval {
    /// Bradley–Terry loss (incl. centering), weighted as in training.
    pub loss: f64,
    /// Accuracy, margin and reward statistics over all pairs.
    pub stats: PreferenceStats,
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RewardReport {
    /// Steps done.
    pub steps: usize,
    /// Training comparisons.
    pub train_comparisons: usize,
    /// Held-out comparisons.
    pub val_comparisons: usize,
    /// Comparisons skipped for being longer than `max_len`.
    pub skipped_too_long: usize,
    /// Comparisons whose prompt was cut.
    pub truncated: usize,
    /// Last training loss.
    pub train_loss: f32,
    /// Last evaluation.
    pub eval: Option<RewardEval>,
    /// The fitted normalisation.
    pub normalization: Option<RewardNormalization>,
}

/// Tokenizes the comparisons of `file` as `cfg` says; returns them with the (skipped,
/// truncated) counts.
pub fn tokenize(
    cfg: &RewardConfig,
    prompt: &PromptFormat,
    tok: &Tokenizer,
    eos: u32,
    (file, comparisons): (&Path, &[Comparison]),
) -> Result<(Vec<TokComparison>, usize, usize)> {
    let spec = TokenizeSpec { prompt, max_len: cfg.max_len, truncation: cfg.truncation, data: file };
    tokenize_with(spec, tok, eos, comparisons)
}

/// The scores of every sequence of `comps` (one taped forward, right-padded) and the
/// Bradley–Terry loss over all their pairs; each comparison weighs `1/len(comps)`, shared by
/// its pairs. Also returns the raw scores.
pub fn reward_loss<D: FusedOps, T: Tape<f32, D>>(
    rm: &LearnedReward<D>,
    comps: &[&TokComparison],
    center_coef: f64,
    tape: T,
) -> Result<(Scalar<T, D>, Vec<f32>)> {
    let seqs: Vec<Vec<u32>> = comps.iter().flat_map(|c| c.sequences()).collect();
    let scores = rm.forward(&Batch::right_padded(&seqs, rm.pad_id)?, tape)?;
    let raw = scores.as_vec();
    let pairs = pair_layout(comps);
    let loss = host_loss(scores, |r| {
        let (rc, rr, m, w) = pairs.gather(r);
        let bt = bradley_terry_loss(&rc, &rr, &m, &w, center_coef);
        let mut grad = vec![0.0; r.len()];
        for (p, &(i, j)) in pairs.index.iter().enumerate() {
            grad[i] += bt.d_chosen[p];
            grad[j] += bt.d_rejected[p];
        }
        (bt.loss, grad)
    });
    Ok((loss, raw))
}

/// Where each pair's two scores sit in the flat score vector, with its margin and weight.
struct PairLayout {
    index: Vec<(usize, usize)>,
    margins: Vec<f64>,
    weights: Vec<f64>,
}

fn pair_layout(comps: &[&TokComparison]) -> PairLayout {
    let mut out = PairLayout { index: vec![], margins: vec![], weights: vec![] };
    let mut offset = 0;
    let has_margin = comps.iter().any(|c| c.margin.is_some());
    for c in comps {
        let k = c.responses.len();
        let n_pairs = k * (k - 1) / 2;
        for i in 0..k {
            for j in i + 1..k {
                out.index.push((offset + i, offset + j));
                out.weights.push(1.0 / (n_pairs * comps.len()) as f64);
                if has_margin {
                    out.margins.push(c.margin.unwrap_or(0.0) as f64);
                }
            }
        }
        offset += k;
    }
    out
}

impl PairLayout {
    /// (chosen, rejected, margins, weights) of every pair, from the flat scores.
    fn gather(&self, r: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let rc = self.index.iter().map(|&(i, _)| r[i] as f64).collect();
        let rr = self.index.iter().map(|&(_, j)| r[j] as f64).collect();
        (rc, rr, self.margins.clone(), self.weights.clone())
    }
}

/// Runs (or, with `resume`, continues) reward-model training as configured.
pub fn train(mut cfg: RewardConfig, resume: bool) -> Result<RewardReport> {
    validate(&cfg)?;
    crate::run::resolve_model_in(&mut cfg.init)?;
    if let Some(NormalizeConfig { reference: NormReference::PolicySamples { policy: Some(p), .. }, .. }) =
        cfg.normalize.as_mut()
    {
        crate::run::resolve_model_in(p)?;
    }
    crate::on_device!(cfg.device, dev => train_on(&cfg, resume, dev))
}

impl RewardReport {
    /// The report of a run of `steps` on `data` before its first step.
    fn before_training(steps: usize, data: &HeldOut<TokComparison>) -> Self {
        let (train, val) = data.split();
        RewardReport {
            steps,
            train_comparisons: train.len(),
            val_comparisons: val.len(),
            skipped_too_long: data.skipped,
            truncated: data.truncated,
            train_loss: f32::NAN,
            eval: None,
            normalization: None,
        }
    }
}

fn train_on<D: FusedOps + GradBuffers>(cfg: &RewardConfig, resume: bool, dev: &D) -> Result<RewardReport> {
    let run = RunDir::open(&cfg.out_dir, resume)?.keep_last(cfg.keep_checkpoints);
    // BOILERPLATE: backbone + head, tokenizer, optimizer (from init, or the run's checkpoint)
    let Restored { model: mut rm, tok, mut opt, step: start } =
        restore_or_init(&run, resume, (&cfg.optim, cfg.seed), dev, || initial_model(cfg, dev))?;
    require_fits(cfg.max_len, &rm.model.dims, &cfg.init)?;
    let eos = tok
        .eos_for(&rm.model.config)
        .ok_or_else(|| anyhow::anyhow!("{}: the tokenizer has no EOS token", cfg.init.display()))?;
    // DATA: records → comparisons → tokens → train / validation
    let data = load_data(cfg, &tok, &rm.model.config, eos)?;
    let (train_set, val_set) = data.split();
    let steps =
        steps_for_epochs("reward", (cfg.epochs, cfg.steps), train_set.len(), cfg.batch_size * cfg.grad_accum, |k| k);
    let cfg = &record_config(&run, resume, RewardConfig { steps, ..cfg.clone() })?;
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut bar = crate::progress::bar(cfg.steps as u64, "reward");
    bar.set_position(start as u64);
    let mut report = RewardReport::before_training(cfg.steps, &data);
    let mut order = EpochOrder::new(train_set.len(), cfg.seed);
    for step in start..cfg.steps {
        // ALGO: Bradley–Terry over grad_accum micro-batches of comparisons, one AdamW step
        let t0 = Instant::now();
        let lr = cfg.schedule.at(cfg.optim.lr, cfg.steps, step);
        let (mut tokens, mut batch_scores) = (0usize, Vec::new());
        let (loss, grad_norm) =
            optimizer_step(&mut rm, &mut opt, lr, cfg.grad_clip, cfg.grad_accum, |m, micro, tape| {
                let first = (step * cfg.grad_accum + micro) * cfg.batch_size;
                let batch: Vec<&TokComparison> =
                    (first..first + cfg.batch_size).map(|i| &train_set[order.index(i)]).collect();
                tokens += batch.iter().flat_map(|c| c.sequences()).map(|s| s.len()).sum::<usize>();
                let (loss, scores): (LossOn<D>, _) = reward_loss(m, &batch, cfg.center_coef, tape)?;
                batch_scores.push((batch, scores));
                Ok(loss)
            })?;
        report.train_loss = loss;
        let done = step + 1;
        let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
        let mut record = serde_json::json!({
            "step": done, "epoch": epochs_seen(done * cfg.grad_accum * cfg.batch_size, train_set.len()),
            "loss": loss, "accuracy": train_accuracy(&batch_scores),
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
        });
        if done % cfg.eval_every == 0 || done == cfg.steps {
            let (eval_set, _) = eval_split(train_set, val_set);
            report.eval = Some(periodic_eval(cfg, &rm, &tok, eval_set, done, &mut record, &mut samples)?);
        }
        metrics.write(&record)?;
        // without held-out comparisons the evaluation is on the training ones: not held out
        let held_out_loss = if val_set.is_empty() { None } else { held_out(&record, "eval/loss") };
        bar.set_message(format!(
            "loss {loss:.3}{} | {tok_s:.0} tok/s",
            report.eval.as_ref().map(|e| format!(" acc {:.3}", e.stats.accuracy)).unwrap_or_default()
        ));
        bar.inc(1);
        crate::stop::end_step("reward", &run, (done, cfg.steps, cfg.checkpoint_every), || {
            if done < cfg.steps {
                return save(&run, (done, held_out_loss), &rm, &tok, &mut opt);
            }
            // ALGO: fit the normalisation on the reference set; it goes into the final config
            report.normalization =
                cfg.normalize.as_ref().map(|n| fit_normalization(cfg, n, &rm, eos, train_set, val_set)).transpose()?;
            let norm = report.normalization.clone();
            save_with(&run, (done, held_out_loss), &rm, &mut opt, |dir| {
                Ok(rm.save_pretrained(dir, Some(&tok), norm.as_ref())?)
            })
        })?;
    }
    bar.finish();
    announce_best(&run, "reward")?;
    Ok(report)
}

/// The comparisons of `data` (and `val_data`) tokenized, with the held-out ones split off.
fn load_data(
    cfg: &RewardConfig,
    tok: &Tokenizer,
    config: &rlhf_policies::ModelConfig,
    eos: u32,
) -> Result<HeldOut<TokComparison>> {
    let format = PromptFormat::new(&cfg.prompt_template, cfg.chat.as_ref(), tok, config, &cfg.init)?;
    let hold = HoldOut {
        stage: "reward",
        what: "comparisons",
        data: &cfg.data,
        val_data: cfg.val_data.as_deref(),
        val_fraction: cfg.val_fraction,
        max_len: cfg.max_len,
    };
    let template = chat_for(&cfg.format, &format)?;
    HeldOut::load(hold, |file| {
        let records = read_comparisons(file, &cfg.format, template.as_ref())?;
        Ok((records.len(), tokenize(cfg, &format, tok, eos, (file, &records))?))
    })
}

/// The backbone and tokenizer of `init` with a fresh head, or a reward model to continue.
fn initial_model<D: FusedOps>(cfg: &RewardConfig, dev: &D) -> Result<(LearnedReward<D>, Tokenizer)> {
    // a folder may hold a reward model already
    if crate::eval::is_reward_model(&cfg.init)? {
        return LearnedReward::load_dir(&cfg.init, dev);
    }
    let (model, tok): (CausalLm<D>, Tokenizer) = load_with_tokenizer(&cfg.init, dev)?;
    let pad = model.config.pad_token_id().or(tok.pad_id()).or(tok.eos_for(&model.config)).unwrap_or(0);
    Ok((LearnedReward::from_backbone(model, pad, cfg.seed), tok))
}

/// The evaluation at step `done`: its `eval/*` fields go into the step's metrics `record`,
/// the first `sample_count` comparisons with their scores into `samples.jsonl`.
fn periodic_eval<D: FusedOps>(
    cfg: &RewardConfig,
    rm: &LearnedReward<D>,
    tok: &Tokenizer,
    eval_set: &[TokComparison],
    done: usize,
    record: &mut serde_json::Value,
    samples: &mut JsonlWriter,
) -> Result<RewardEval> {
    let (ev, scores) = evaluate(rm, eval_set, cfg.center_coef, cfg.batch_size)?;
    for (k, v) in [
        ("eval/loss", ev.loss),
        ("eval/accuracy", ev.stats.accuracy),
        ("eval/margin_mean", ev.stats.margin_mean),
        ("eval/reward_mean", ev.stats.reward_mean),
        ("eval/reward_std", ev.stats.reward_std),
    ] {
        record[k] = v.into();
    }
    for s in sample_records(tok, eval_set, &scores, cfg.sample_count, done)? {
        samples.write(&s)?;
    }
    Ok(ev)
}

/// The evaluation set: the held-out comparisons, or the training ones if none are held out.
fn eval_split<'a>(train: &'a [TokComparison], val: &'a [TokComparison]) -> (&'a [TokComparison], &'static str) {
    if val.is_empty() {
        (train, "training")
    } else {
        (val, "eval")
    }
}

fn train_accuracy(batches: &[(Vec<&TokComparison>, Vec<f32>)]) -> f64 {
    let (mut right, mut total) = (0usize, 0usize);
    for (comps, scores) in batches {
        for (i, j) in pair_layout(comps).index {
            right += usize::from(scores[i] > scores[j]);
            total += 1;
        }
    }
    right as f64 / total.max(1) as f64
}

/// Loss and statistics on `set` (no tape), and the raw scores of every sequence in order.
pub fn evaluate<D: FusedOps>(
    rm: &LearnedReward<D>,
    set: &[TokComparison],
    center_coef: f64,
    batch: usize,
) -> Result<(RewardEval, Vec<f32>)> {
    let mut scores = Vec::new();
    for chunk in set.chunks(batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().flat_map(|c| c.sequences()).collect();
        scores.extend(rm.forward(&Batch::right_padded(&seqs, rm.pad_id)?, NoneTape)?.as_vec());
    }
    let refs: Vec<&TokComparison> = set.iter().collect();
    let layout = pair_layout(&refs);
    let (rc, rr, m, w) = layout.gather(&scores);
    let loss = bradley_terry_loss(&rc, &rr, &m, &w, center_coef).loss;
    Ok((RewardEval { loss, stats: preference_stats(&rc, &rr) }, scores))
}

fn sample_records(
    tok: &Tokenizer,
    set: &[TokComparison],
    scores: &[f32],
    count: usize,
    step: usize,
) -> Result<Vec<serde_json::Value>> {
    let mut offset = 0;
    let mut out = Vec::new();
    for c in set.iter().take(count) {
        let k = c.responses.len();
        let responses: Vec<String> = c.responses.iter().map(|r| tok.decode(r)).collect::<Result<_, _>>()?;
        out.push(serde_json::json!({
            "step": step, "line": c.line, "prompt": tok.decode(&c.prompt_ids)?,
            "responses": responses, "scores": &scores[offset..offset + k],
        }));
        offset += k;
    }
    Ok(out)
}

/// Scores the reference set and fits `r' = g·r + b` to the target mean and std.
fn fit_normalization<D: FusedOps>(
    cfg: &RewardConfig,
    n: &NormalizeConfig,
    rm: &LearnedReward<D>,
    eos: u32,
    train: &[TokComparison],
    val: &[TokComparison],
) -> Result<RewardNormalization> {
    let (set, name) = eval_split(train, val);
    let (seqs, reference): (Vec<Vec<u32>>, String) = match &n.reference {
        NormReference::EvalResponses {} => {
            (set.iter().flat_map(|c| c.sequences()).collect(), format!("{name} chosen and rejected responses"))
        }
        NormReference::PolicySamples { policy, per_prompt, max_new_tokens, temperature } => {
            let path = policy.as_ref().unwrap_or(&cfg.init);
            let (model, _) = load_with_tokenizer(path, &rm.model.dev)
                .with_context(|| format!("normalize.reference.policy {}", path.display()))?;
            // each distinct prompt once, in order of first appearance
            let mut seen = std::collections::HashSet::new();
            let prompts: Vec<Vec<u32>> =
                set.iter().map(|c| c.prompt_ids.clone()).filter(|p| seen.insert(p.clone())).collect();
            let prompts: Vec<Vec<u32>> =
                prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), *per_prompt)).collect();
            let room = model.dims.usable_positions().saturating_sub(prompts.iter().map(Vec::len).max().unwrap_or(0));
            let sampling = SamplingConfig {
                max_new_tokens: (*max_new_tokens).min(room).max(1),
                temperature: *temperature,
                eos_ids: vec![eos],
                seed: cfg.seed,
                ..Default::default()
            };
            let mut seqs = Vec::new();
            for chunk in prompts.chunks(cfg.batch_size.max(8)) {
                let out = generate_from(&model, chunk, rm.pad_id, &sampling)?;
                seqs.extend(chunk.iter().zip(&out.tokens).map(|(p, r)| [p.as_slice(), r].concat()));
            }
            let what = format!("{} samples of {} on the {name} prompts", seqs.len(), path.display());
            (seqs, what)
        }
    };
    let mut scores = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(cfg.batch_size * 2) {
        scores.extend(rm.forward(&Batch::right_padded(chunk, rm.pad_id)?, NoneTape)?.as_vec());
    }
    Ok(RewardNormalization::fit(&scores, n.target_mean, n.target_std, &reference)?)
}

fn validate(cfg: &RewardConfig) -> Result<()> {
    crate::stages::common::require_counts(&[
        ("batch_size", cfg.batch_size),
        ("grad_accum", cfg.grad_accum),
        ("steps", cfg.steps),
        ("eval_every", cfg.eval_every),
        ("checkpoint_every", cfg.checkpoint_every),
        ("max_len", cfg.max_len),
    ])?;
    if cfg.data.as_os_str().is_empty() || cfg.init.as_os_str().is_empty() {
        bail!("data and init are required (a preference JSONL file and a checkpoint folder)");
    }
    crate::stages::common::require_fraction("val_fraction", cfg.val_fraction)?;
    crate::stages::common::require_positive(&[("grad_clip", cfg.grad_clip)])?;
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    crate::stages::common::require_epochs(cfg.epochs)?;
    if let Some(n) = &cfg.normalize {
        if n.target_std.is_nan() || n.target_std <= 0.0 {
            bail!("normalize.target_std must be positive, got {}", n.target_std);
        }
    }
    Ok(())
}
