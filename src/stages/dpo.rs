//! Direct preference optimisation: the policy learns from preference pairs against the frozen
//! SFT reference, with no reward model and no rollouts (Rafailov et al. 2023):
//!
//! ```text
//! h = log π_θ/π_ref(y_w|x) − log π_θ/π_ref(y_l|x),   L = −log σ(β·h)   (or cDPO, robust, hinge, IPO)
//! ```
//! Sequence log-probs are sums over the response tokens (EOS included); the reference's are
//! computed once before training (SimPO and ORPO need none: they are reference-free). The losses are [`crate::math::dpo`]; with
//! `loss.kind = "kto"` the same loop trains KTO on unpaired examples ([`crate::stages::kto`]).
//! Each evaluation also samples completions of held-out prompts and logs the sampled KL to the
//! reference (`eval/sample_kl`), writing the samples to `samples.jsonl`. Reading the data and
//! the reference's log-probs is [`crate::stages::dpo_data`].

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use dfdx::prelude::*;
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::fused::host_loss;
use rlhf_policies::{generate_from, AdamWConfig, CausalLm, FusedOps, GradBuffers, SamplingConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::data::{epochs_seen, mix, EpochOrder};
use crate::device::DeviceKind;
use crate::math::dpo::{dpo_loss, DpoLoss, DpoOutput, PairLogps};
use crate::preference::{PreferenceFormat, RewardTruncation};
use crate::prompt_format::ChatPrompt;
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{
    announce_best, frozen_names, held_out, optimizer_step, record_config, require_counts, require_epochs,
    require_fraction, restore_or_init, save, share_frozen, steps_for_epochs, LossOn, Restored,
};
use crate::stages::dpo_data::{kl_sample_prompts, load_examples};
pub use crate::stages::dpo_data::{Examples, Pair};
use crate::stages::kto::{kto_batch_loss, pair_accuracy, KtoExample};
use crate::stages::ppo_models::{logprobs_and_entropy, sequence_log_ratios, Seq};

/// `rlhf dpo` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// Run folder. Default `runs/dpo`.
    pub out_dir: PathBuf,
    /// Seed of the pair order. Default `1337`.
    pub seed: u64,
    /// The SFT checkpoint: the initial policy and the frozen reference. Required.
    pub init: PathBuf,
    /// Preference JSONL (or `.jsonl.gz`). Required.
    pub data: PathBuf,
    /// Record layout (rankings give all their pairs; `unpaired` is for KTO, which also takes
    /// pairs and conversations, unpaired). Default: pairs.
    pub format: PreferenceFormat,
    /// The loss: `sigmoid` (DPO), `cdpo`, `robust`, `hinge`, `ipo`, `simpo`, `orpo` or `kto`.
    /// Default `{"kind": "sigmoid"}` (DPO).
    pub loss: DpoLoss,
    /// β (for IPO the loss's own τ is used; β still scales the logged implicit rewards; KTO
    /// uses β).
    /// Default `0.1`.
    pub beta: f64,
    /// Fraction of the pairs (the last ones) held out. Default `0.1`.
    pub val_fraction: f64,
    /// A separate preference file of held-out records (same format): when given, every
    /// record of `data` trains and `val_fraction` is not used. Default: none.
    pub val_data: Option<PathBuf>,
    /// Prompt template; `{prompt}` is replaced. Default `{prompt}`.
    pub prompt_template: String,
    /// Present: each templated prompt becomes the user turn of the model's own chat template,
    /// with the assistant's turn opened (see [`crate::prompt_format`]). Default: none.
    pub chat: Option<ChatPrompt>,
    /// Longest sequence (prompt + response + EOS). Default `256`.
    pub max_len: usize,
    /// Longer pairs are skipped (default), their prompts cut, or an error.
    pub truncation: RewardTruncation,
    /// Pairs per micro-batch. Default `8`.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default `1`.
    pub grad_accum: usize,
    /// Optimizer steps (unless `epochs` is set). Default `200`.
    pub steps: usize,
    /// Passes over the training pairs (examples, for KTO) instead of `steps`: the run takes
    /// enough whole steps to cover them and `config.json` records that number as `steps`.
    /// Default: none.
    pub epochs: Option<f64>,
    /// AdamW; `lr` is the peak learning rate. Default lr 1e-5, no weight decay.
    pub optim: AdamWConfig,
    /// Shape of the learning rate over the steps (peak `optim.lr`). Default: constant.
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
    /// Held-out prompts sampled at each evaluation for the KL estimate (0 = none). Default `8`.
    pub eval_samples: usize,
    /// New tokens per evaluation sample (temperature 1). Default `64`.
    pub sample_tokens: usize,
    /// Device of the policy and the reference: `cpu` (default) or `cuda` (GPU 0, a build with
    /// `--features cuda`).
    pub device: DeviceKind,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            out_dir: "runs/dpo".into(),
            seed: 1337,
            init: PathBuf::new(),
            data: PathBuf::new(),
            format: PreferenceFormat::default(),
            loss: DpoLoss::Sigmoid {},
            beta: 0.1,
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
            optim: AdamWConfig { lr: 1e-5, ..Default::default() },
            schedule: LrSchedule::constant(),
            grad_clip: 1.0,
            eval_every: 50,
            checkpoint_every: 100,
            keep_checkpoints: 0,
            eval_samples: 8,
            sample_tokens: 64,
            device: DeviceKind::Cpu,
        }
    }
}

/// Means of the loss and TRL's implicit-reward metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DpoStats {
    /// Loss.
    pub loss: f64,
    /// `rewards/chosen` (KTO: mean over desirable examples).
    pub rewards_chosen: f64,
    /// `rewards/rejected` (KTO: mean over undesirable examples).
    pub rewards_rejected: f64,
    /// `rewards/accuracies` (strict); for KTO over the pairs it was unpaired from, if any.
    pub accuracy: Option<f64>,
    /// `rewards/margins` (KTO: difference of the two means).
    pub margin: f64,
    /// KTO's reference point `z₀` (`kl`), averaged over batches.
    pub kl: Option<f64>,
    /// Sampled KL to the reference, `Σ_t log π_θ/π_ref` per held-out sample, averaged.
    pub sample_kl: Option<f64>,
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct DpoReport {
    /// Steps done.
    pub steps: usize,
    /// Training / held-out pairs (KTO: examples).
    pub pairs: (usize, usize),
    /// Records skipped as too long, prompts cut.
    pub skipped_truncated: (usize, usize),
    /// Last training loss.
    pub train_loss: f32,
    /// Last evaluation.
    pub eval: Option<DpoStats>,
}

/// Sequence log-prob sums of `seqs` under `model` (temperature 1), taped.
pub(crate) fn seq_logps<D: FusedOps, T: Tape<f32, D>>(
    model: &CausalLm<D>,
    seqs: &[&Seq],
    pad: u32,
    tape: T,
) -> Result<Tensor<(usize,), f32, D, T>> {
    logprobs_and_entropy(model, seqs, pad, 1.0, tape)
}

/// Sums the per-token entries of `lpe` (`[logprobs…, entropies…]`) per sequence.
pub(crate) fn sums(lpe: &[f32], seqs: &[&Seq]) -> Vec<f64> {
    let mut off = 0;
    seqs.iter()
        .map(|s| {
            let n = s.resp_len();
            off += n;
            lpe[off - n..off].iter().map(|&x| x as f64).sum()
        })
        .collect()
}

/// A pairwise loss of [`dpo_loss`] over sequences whose per-token log-probs lie back to back
/// in `lpe` (as [`sums`] reads them): pair `j` is the sequences `pairs[j]` = (chosen,
/// rejected), with the reference's sums `ref_logps[j]`. Returns the loss's output and its
/// gradient with respect to `lpe`: every token its sequence's derivative times `scale`, the
/// entropies none.
pub(crate) fn pairwise_loss(
    lpe: &[f32],
    seqs: &[&Seq],
    pairs: &[(usize, usize)],
    ref_logps: &[(f64, f64)],
    (beta, loss, scale): (f64, DpoLoss, f64),
) -> (DpoOutput, Vec<f64>) {
    let s = sums(lpe, seqs);
    let (pc, pr): (Vec<f64>, Vec<f64>) = pairs.iter().map(|&(c, r)| (s[c], s[r])).unzip();
    let (rc, rr): (Vec<f64>, Vec<f64>) = ref_logps.iter().copied().unzip();
    let (ct, rt): (Vec<usize>, Vec<usize>) =
        pairs.iter().map(|&(c, r)| (seqs[c].resp_len(), seqs[r].resp_len())).unzip();
    let x_pairs = PairLogps {
        policy_chosen: &pc,
        policy_rejected: &pr,
        ref_chosen: &rc,
        ref_rejected: &rr,
        chosen_tokens: &ct,
        rejected_tokens: &rt,
    };
    let out = dpo_loss(x_pairs, beta, loss);
    let mut d = vec![0.0; seqs.len()];
    for (j, &(c, r)) in pairs.iter().enumerate() {
        (d[c], d[r]) = (out.d_policy_chosen[j] * scale, out.d_policy_rejected[j] * scale);
    }
    let mut grad: Vec<f64> = seqs.iter().zip(&d).flat_map(|(q, &g)| std::iter::repeat_n(g, q.resp_len())).collect();
    grad.resize(lpe.len(), 0.0);
    (out, grad)
}

/// Per batch: the loss and, per item, its implicit rewards.
#[derive(Debug, Clone, Default)]
pub struct BatchOut {
    /// Mean loss.
    pub loss: f64,
    /// Pairs: `(chosen, rejected)` rewards; KTO: `(reward, label)` as `(r, 1.0 | 0.0)`.
    pub rewards: Vec<(f64, f64)>,
    /// KTO's `z₀`.
    pub z0: Option<f64>,
    /// Tokens in the batch's sequences.
    pub tokens: usize,
}

/// The loss of `pairs` with the policy's taped forward, and the pairs' implicit rewards.
pub fn pair_loss<D: FusedOps, T: Tape<f32, D>>(
    cfg: &DpoConfig,
    policy: &CausalLm<D>,
    pairs: &[&Pair],
    pad: u32,
    tape: T,
) -> Result<(Tensor<Rank0, f32, D, T>, BatchOut)> {
    let seqs: Vec<&Seq> = pairs.iter().flat_map(|p| [&p.chosen, &p.rejected]).collect();
    let lpe = seq_logps(policy, &seqs, pad, tape)?;
    let mut res = BatchOut::default();
    let loss = host_loss(lpe, |x| {
        let chosen_rejected: Vec<(usize, usize)> = (0..pairs.len()).map(|j| (2 * j, 2 * j + 1)).collect();
        let ref_logps: Vec<(f64, f64)> = pairs.iter().map(|p| p.ref_logps).collect();
        let (out, grad) = pairwise_loss(x, &seqs, &chosen_rejected, &ref_logps, (cfg.beta, cfg.loss, 1.0));
        res = BatchOut {
            loss: out.loss,
            rewards: out.chosen_rewards.iter().copied().zip(out.rejected_rewards.iter().copied()).collect(),
            z0: None,
            tokens: seqs.iter().map(|s| s.ids.len()).sum(),
        };
        (out.loss, grad)
    });
    Ok((loss, res))
}

/// The loss of the items `idx` of `set` (pairs or KTO examples), and their rewards.
pub fn batch_loss<D: FusedOps, T: Tape<f32, D>>(
    cfg: &DpoConfig,
    policy: &CausalLm<D>,
    set: &Examples,
    idx: &[usize],
    pad: u32,
    tape: T,
) -> Result<(Tensor<Rank0, f32, D, T>, BatchOut)> {
    match (set, cfg.loss) {
        (Examples::Pairs(p), _) => {
            let batch: Vec<&Pair> = idx.iter().map(|&i| &p[i]).collect();
            pair_loss(cfg, policy, &batch, pad, tape)
        }
        (Examples::Kto(e), DpoLoss::Kto { desirable_weight, undesirable_weight }) => {
            let batch: Vec<&KtoExample> = idx.iter().map(|&i| &e[i]).collect();
            let tokens = batch.iter().map(|e| e.seq.ids.len() + e.kl_seq.ids.len()).sum();
            let weights = (cfg.beta, desirable_weight, undesirable_weight);
            let (loss, k) = kto_batch_loss(policy, &batch, pad, weights, tape)?;
            let rewards = k.rewards.iter().zip(&batch).map(|(&r, e)| (r, f64::from(u8::from(e.desirable)))).collect();
            Ok((loss, BatchOut { loss: k.loss, rewards, z0: Some(k.z0), tokens }))
        }
        (Examples::Kto(_), _) => bail!("KTO examples need the KTO loss"),
    }
}

/// Statistics of batches' outputs: means over all items (not over batches).
fn stats_of(set: &Examples, outs: &[BatchOut]) -> DpoStats {
    let n_items: usize = outs.iter().map(|o| o.rewards.len()).sum();
    let loss = outs.iter().map(|o| o.loss * o.rewards.len() as f64).sum::<f64>() / n_items.max(1) as f64;
    let all: Vec<(f64, f64)> = outs.iter().flat_map(|o| o.rewards.iter().copied()).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let z0s: Vec<f64> = outs.iter().filter_map(|o| o.z0).collect();
    let (chosen, rejected, accuracy): (Vec<f64>, Vec<f64>, Option<f64>) = match set {
        Examples::Pairs(_) => {
            let acc = all.iter().filter(|(c, r)| c > r).count() as f64 / all.len().max(1) as f64;
            (all.iter().map(|p| p.0).collect(), all.iter().map(|p| p.1).collect(), Some(acc))
        }
        Examples::Kto(e) => {
            let rewards: Vec<f64> = all.iter().map(|p| p.0).collect();
            let pick = |label: f64| all.iter().filter(|p| p.1 == label).map(|p| p.0).collect();
            (pick(1.0), pick(0.0), pair_accuracy(e, &rewards))
        }
    };
    DpoStats {
        loss,
        rewards_chosen: mean(&chosen),
        rewards_rejected: mean(&rejected),
        accuracy,
        margin: mean(&chosen) - mean(&rejected),
        kl: (!z0s.is_empty()).then(|| mean(&z0s)),
        sample_kl: None,
    }
}

/// Runs (or, with `resume`, continues) DPO (or KTO) as configured.
pub fn train(mut cfg: DpoConfig, resume: bool) -> Result<DpoReport> {
    validate(&cfg)?;
    crate::run::resolve_model_in(&mut cfg.init)?;
    crate::on_device!(cfg.device, dev => train_on(&cfg, resume, dev))
}

fn train_on<D: FusedOps + GradBuffers>(cfg: &DpoConfig, resume: bool, dev: &D) -> Result<DpoReport> {
    let run = RunDir::open(&cfg.out_dir, resume)?.keep_last(cfg.keep_checkpoints);
    // BOILERPLATE: policy (fresh or restored), the frozen reference, optimizer
    let (mut reference, tok): (CausalLm<D>, Tokenizer) = load_with_tokenizer(&cfg.init, dev)?;
    let Restored { model: mut policy, mut opt, step: start, .. } =
        restore_or_init(&run, resume, (&cfg.optim, cfg.seed), dev, || Ok((reference.frozen_copy(), tok.clone())))?;
    // one copy of the weights frozen in the policy serves the reference too
    let frozen = frozen_names(&policy, &mut opt)?;
    share_frozen(("dpo", "the reference"), &mut reference, &policy, |n| frozen.contains(n));
    crate::stages::common::require_fits(cfg.max_len, &reference.dims, &cfg.init)?;
    let eos = tok.eos_for(&reference.config).ok_or_else(|| anyhow::anyhow!("{}: no EOS token", cfg.init.display()))?;
    let pad = tok.pad_id().unwrap_or(eos);
    // DATA: records → tokens → train / held-out split → reference log-probs (once)
    let data = load_examples(cfg, &reference, &tok, eos, pad)?;
    let (train_set, val_set) = (&data.train, &data.val);
    let steps = steps_for_epochs(
        cfg.loss.name(),
        (cfg.epochs, cfg.steps),
        train_set.len(),
        cfg.batch_size * cfg.grad_accum,
        |k| k,
    );
    let cfg = &record_config(&run, resume, DpoConfig { steps, ..cfg.clone() })?;
    let sample_prompts = kl_sample_prompts(cfg, val_set.prompts(), policy.dims.usable_positions());
    let mut metrics = run.metrics()?;
    let mut samples = run.samples()?;
    let mut bar = crate::progress::bar(cfg.steps as u64, cfg.loss.name());
    bar.set_position(start as u64);
    let mut report = DpoReport {
        steps: cfg.steps,
        pairs: (train_set.len(), val_set.len()),
        skipped_truncated: data.skipped_truncated,
        train_loss: f32::NAN,
        eval: None,
    };
    let mut order = EpochOrder::new(train_set.len(), cfg.seed);
    for step in start..cfg.steps {
        // ALGO: the loss over grad_accum micro-batches, one AdamW step
        let t0 = Instant::now();
        let lr = cfg.schedule.at(cfg.optim.lr, cfg.steps, step);
        let (mut tokens, mut outs) = (0usize, vec![]);
        let (loss, grad_norm) =
            optimizer_step(&mut policy, &mut opt, lr, cfg.grad_clip, cfg.grad_accum, |m, micro, tape| {
                let first = (step * cfg.grad_accum + micro) * cfg.batch_size;
                let idx: Vec<usize> = (first..first + cfg.batch_size).map(|i| order.index(i)).collect();
                let (loss, out): (LossOn<D>, _) = batch_loss(cfg, m, train_set, &idx, pad, tape)?;
                tokens += out.tokens;
                outs.push(out);
                Ok(loss)
            })?;
        report.train_loss = loss;
        let done = step + 1;
        let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
        let st = stats_of(train_set, &outs);
        let epoch = epochs_seen(done * cfg.grad_accum * cfg.batch_size, train_set.len());
        let mut record = serde_json::json!({"step": done, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": tok_s});
        put_stats(&mut record, "", &st);
        if (done % cfg.eval_every == 0 || done == cfg.steps) && !val_set.is_empty() {
            let mut ev = evaluate(cfg, &policy, val_set, pad)?;
            if !sample_prompts.is_empty() {
                let s = sample_kl(cfg, &policy, &reference, &tok, &sample_prompts, done)?;
                ev.sample_kl =
                    Some(s.iter().map(|r| r["kl"].as_f64().unwrap_or(f64::NAN)).sum::<f64>() / s.len() as f64);
                for r in s {
                    samples.write(&r)?;
                }
            }
            put_stats(&mut record, "eval/", &ev);
            report.eval = Some(ev);
        }
        metrics.write(&record)?;
        bar.set_message(format!("loss {loss:.3} margin {:.3} | {tok_s:.0} tok/s", st.margin));
        bar.inc(1);
        crate::stop::end_step("dpo", &run, (done, cfg.steps, cfg.checkpoint_every), || {
            save(&run, (done, held_out(&record, "eval/loss")), &policy, &tok, &mut opt)
        })?;
    }
    bar.finish();
    announce_best(&run, "dpo")?;
    Ok(report)
}

/// Writes the statistics into a metrics record under TRL's names.
fn put_stats(record: &mut serde_json::Value, prefix: &str, st: &DpoStats) {
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            record[format!("{prefix}{k}")] = v.into();
        }
    };
    if !prefix.is_empty() {
        put("loss", Some(st.loss));
    }
    put("rewards/chosen", Some(st.rewards_chosen));
    put("rewards/rejected", Some(st.rewards_rejected));
    put("rewards/accuracies", st.accuracy);
    put("rewards/margins", Some(st.margin));
    put("kl", st.kl);
    put("sample_kl", st.sample_kl);
}

/// Loss and implicit-reward statistics over `set` (no tape), in batches of `batch_size`.
pub fn evaluate<D: FusedOps>(cfg: &DpoConfig, policy: &CausalLm<D>, set: &Examples, pad: u32) -> Result<DpoStats> {
    let idx: Vec<usize> = (0..set.len()).collect();
    let outs = idx
        .chunks(cfg.batch_size)
        .map(|chunk| Ok(batch_loss(cfg, policy, set, chunk, pad, NoneTape)?.1))
        .collect::<Result<Vec<_>>>()?;
    Ok(stats_of(set, &outs))
}

/// One sample (temperature 1) per prompt from the policy, as `samples.jsonl` records with the
/// sequence's sampled KL `Σ_t log π_θ/π_ref` (an unbiased estimate of KL(π_θ‖π_ref) on the
/// prompt). The seed depends on the step only, so a resumed run samples the same.
fn sample_kl<D: FusedOps>(
    cfg: &DpoConfig,
    policy: &CausalLm<D>,
    reference: &CausalLm<D>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    step: usize,
) -> Result<Vec<serde_json::Value>> {
    let eos_ids = tok.eos_ids_for(&policy.config);
    let pad = tok.pad_id().or(eos_ids.first().copied()).unwrap_or(0);
    let scfg = SamplingConfig {
        max_new_tokens: cfg.sample_tokens,
        eos_ids: eos_ids.clone(),
        seed: mix(cfg.seed, step as u64, 0x5a3),
        ..Default::default()
    };
    let g = generate_from(policy, prompts, pad, &scfg)?;
    let seqs: Vec<Seq> = prompts
        .iter()
        .zip(&g.tokens)
        .map(|(p, r)| Seq { ids: [p.as_slice(), r].concat(), prompt_len: p.len() })
        .collect();
    let refs: Vec<&Seq> = seqs.iter().collect();
    let kls = sequence_log_ratios(policy, reference, &refs, pad, 1.0)?;
    prompts
        .iter()
        .zip(&g.tokens)
        .zip(kls)
        .map(|((p, r), kl)| {
            let body: Vec<u32> = r.iter().copied().filter(|t| !eos_ids.contains(t)).collect();
            Ok(serde_json::json!({"step": step, "prompt": tok.decode(p)?, "completion": tok.decode(&body)?,
                "tokens": r.len(), "kl": kl}))
        })
        .collect()
}

fn validate(cfg: &DpoConfig) -> Result<()> {
    require_counts(&[
        ("batch_size", cfg.batch_size),
        ("grad_accum", cfg.grad_accum),
        ("steps", cfg.steps),
        ("eval_every", cfg.eval_every),
        ("checkpoint_every", cfg.checkpoint_every),
        ("max_len", cfg.max_len),
    ])?;
    if let DpoLoss::Ipo { tau } = cfg.loss {
        if tau <= 0.0 {
            bail!("loss.tau must be positive (IPO's target margin is 1/(2τ))");
        }
    }
    if let DpoLoss::Simpo { gamma } = cfg.loss {
        if !gamma.is_finite() {
            bail!("loss.gamma must be a finite number (SimPO's target margin)");
        }
    }
    if let DpoLoss::Cdpo { label_smoothing: e } | DpoLoss::Robust { label_smoothing: e } = cfg.loss {
        if !(0.0..0.5).contains(&e) {
            bail!("loss.label_smoothing must be in [0, 0.5)");
        }
    }
    require_fraction("val_fraction", cfg.val_fraction)?;
    crate::stages::common::require_positive(&[("beta", cfg.beta), ("grad_clip", cfg.grad_clip)])?;
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    require_epochs(cfg.epochs)?;
    if cfg.data.as_os_str().is_empty() || cfg.init.as_os_str().is_empty() {
        bail!("data and init are required (a preference JSONL file and an SFT checkpoint folder)");
    }
    Ok(())
}
