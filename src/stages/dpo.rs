//! Direct preference optimisation: the policy learns from preference pairs against the frozen
//! SFT reference, with no reward model and no rollouts (Rafailov et al. 2023):
//!
//! ```text
//! h = log π_θ/π_ref(y_w|x) − log π_θ/π_ref(y_l|x),   L = −log σ(β·h)   (or cDPO, robust, hinge, IPO)
//! ```
//! Sequence log-probs are sums over the response tokens (EOS included); the reference's are
//! computed once before training. The losses are [`crate::math::dpo`].

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use dfdx::prelude::*;
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::fused::host_loss;
use rlhf_policies::{AdamW, AdamWConfig, CausalLm, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::data::epoch_index;
use crate::math::dpo::{dpo_loss, DpoLoss, PairLogps};
use crate::preference::{read_comparisons, PreferenceFormat};
use crate::run::RunDir;
use crate::schedule::LrSchedule;
use crate::stages::common::{optimizer_step, require_counts, require_fraction, restore_latest, save, Loss};
use crate::stages::ppo_models::{logprobs_and_entropy, Seq};
use crate::stages::reward::{tokenize_with, RewardTruncation, TokComparison, TokenizeSpec};

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
    /// Record layout (rankings give all their pairs). Default: pairs.
    pub format: PreferenceFormat,
    /// The loss. Default `{"kind": "sigmoid"}` (DPO).
    pub loss: DpoLoss,
    /// β (for IPO the loss's own τ is used; β still scales the logged implicit rewards).
    /// Default `0.1`.
    pub beta: f64,
    /// Fraction of the pairs (the last ones) held out. Default `0.1`.
    pub val_fraction: f64,
    /// Prompt template; `{prompt}` is replaced. Default `{prompt}`.
    pub prompt_template: String,
    /// Longest sequence (prompt + response + EOS). Default `256`.
    pub max_len: usize,
    /// Longer pairs are skipped (default), their prompts cut, or an error.
    pub truncation: RewardTruncation,
    /// Pairs per micro-batch. Default `8`.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default `1`.
    pub grad_accum: usize,
    /// Optimizer steps. Default `200`.
    pub steps: usize,
    /// AdamW. Default lr 1e-5, no weight decay.
    pub optim: AdamWConfig,
    /// Learning rate per step. Default: constant 1e-5.
    pub schedule: LrSchedule,
    /// Global grad-norm clip. Default `1.0`.
    pub grad_clip: f64,
    /// Evaluate every this many steps (and at the end). Default `50`.
    pub eval_every: usize,
    /// Checkpoint every this many steps (and at the end). Default `100`.
    pub checkpoint_every: usize,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            out_dir: "runs/dpo".into(),
            seed: 1337,
            init: PathBuf::new(),
            data: PathBuf::new(),
            format: PreferenceFormat::default(),
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            val_fraction: 0.1,
            prompt_template: "{prompt}".into(),
            max_len: 256,
            truncation: RewardTruncation::Skip,
            batch_size: 8,
            grad_accum: 1,
            steps: 200,
            optim: AdamWConfig { lr: 1e-5, ..Default::default() },
            schedule: LrSchedule::Constant { lr: 1e-5 },
            grad_clip: 1.0,
            eval_every: 50,
            checkpoint_every: 100,
        }
    }
}

/// A pair in tokens with the reference's sequence log-probs.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Prompt ⧺ chosen.
    pub chosen: Seq,
    /// Prompt ⧺ rejected.
    pub rejected: Seq,
    /// log π_ref of (chosen, rejected).
    pub ref_logps: (f64, f64),
}

/// Means over pairs of the loss and TRL's implicit-reward metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DpoStats {
    /// Loss.
    pub loss: f64,
    /// `rewards/chosen`.
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/accuracies` (strict).
    pub accuracy: f64,
    /// `rewards/margins`.
    pub margin: f64,
}

/// The final numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct DpoReport {
    /// Steps done.
    pub steps: usize,
    /// Training / held-out pairs.
    pub pairs: (usize, usize),
    /// Pairs skipped as too long, prompts cut.
    pub skipped_truncated: (usize, usize),
    /// Last training loss.
    pub train_loss: f32,
    /// Last evaluation.
    pub eval: Option<DpoStats>,
}

/// Sequence log-prob sums of `seqs` under `model` (temperature 1), taped.
fn seq_logps<T: Tape<f32, Cpu>>(
    model: &CausalLm<Cpu>,
    seqs: &[&Seq],
    pad: u32,
    tape: T,
) -> Result<Tensor<(usize,), f32, Cpu, T>> {
    logprobs_and_entropy(model, seqs, pad, 1.0, tape)
}

/// Sums the per-token entries of `lpe` (`[logprobs…, entropies…]`) per sequence.
fn sums(lpe: &[f32], seqs: &[&Seq]) -> Vec<f64> {
    let mut off = 0;
    seqs.iter()
        .map(|s| {
            let n = s.resp_len();
            off += n;
            lpe[off - n..off].iter().map(|&x| x as f64).sum()
        })
        .collect()
}

/// The loss of `pairs` with the policy's taped forward; also their statistics.
pub fn pair_loss<T: Tape<f32, Cpu>>(
    cfg: &DpoConfig,
    policy: &CausalLm<Cpu>,
    pairs: &[&Pair],
    pad: u32,
    tape: T,
) -> Result<(Tensor<Rank0, f32, Cpu, T>, DpoStats)> {
    let seqs: Vec<&Seq> = pairs.iter().flat_map(|p| [&p.chosen, &p.rejected]).collect();
    let lpe = seq_logps(policy, &seqs, pad, tape)?;
    let mut stats = DpoStats::default();
    let loss = host_loss(lpe, |x| {
        let s = sums(x, &seqs);
        let (pc, pr): (Vec<f64>, Vec<f64>) =
            (s.iter().step_by(2).copied().collect(), s.iter().skip(1).step_by(2).copied().collect());
        let (rc, rr): (Vec<f64>, Vec<f64>) = pairs.iter().map(|p| p.ref_logps).unzip();
        let (ct, rt): (Vec<usize>, Vec<usize>) =
            pairs.iter().map(|p| (p.chosen.resp_len(), p.rejected.resp_len())).unzip();
        let x_pairs = PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_tokens: &ct,
            rejected_tokens: &rt,
        };
        let out = dpo_loss(x_pairs, cfg.beta, cfg.loss);
        stats = stats_of(&out.chosen_rewards, &out.rejected_rewards, out.loss);
        // every token of a sequence gets its sequence's gradient; entropies get none
        let mut grad = Vec::with_capacity(x.len());
        for (k, seq) in seqs.iter().enumerate() {
            let g = if k % 2 == 0 { out.d_policy_chosen[k / 2] } else { out.d_policy_rejected[k / 2] };
            grad.extend(std::iter::repeat_n(g, seq.resp_len()));
        }
        grad.resize(x.len(), 0.0);
        (out.loss, grad)
    });
    Ok((loss, stats))
}

fn stats_of(chosen: &[f64], rejected: &[f64], loss: f64) -> DpoStats {
    let n = chosen.len().max(1) as f64;
    DpoStats {
        loss,
        rewards_chosen: chosen.iter().sum::<f64>() / n,
        rewards_rejected: rejected.iter().sum::<f64>() / n,
        accuracy: chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n,
        margin: chosen.iter().zip(rejected).map(|(c, r)| c - r).sum::<f64>() / n,
    }
}

/// Runs (or, with `resume`, continues) DPO as configured.
pub fn train(cfg: DpoConfig, resume: bool) -> Result<DpoReport> {
    validate(&cfg)?;
    let run = RunDir::create(&cfg.out_dir)?;
    // BOILERPLATE: policy (fresh or restored), the frozen reference, optimizer
    let (reference, tok): (CausalLm<Cpu>, Tokenizer) = load_with_tokenizer(&cfg.init, &Cpu::default())?;
    let (mut policy, mut opt, start) = if resume {
        let r = restore_latest::<CausalLm<Cpu>>(&run, &cfg.optim)?;
        (r.model, r.opt, r.step)
    } else {
        run.write_config(&cfg)?;
        (reference.frozen_copy(), AdamW::new(cfg.optim.clone()), 0)
    };
    let eos = tok
        .eos_id()
        .or(reference.config.eos_token_id())
        .ok_or_else(|| anyhow::anyhow!("{}: no EOS token", cfg.init.display()))?;
    let pad = tok.pad_id().unwrap_or(eos);
    // DATA: comparisons → pairs → reference log-probs (once)
    let comparisons = read_comparisons(&cfg.data, &cfg.format)?;
    let spec = TokenizeSpec {
        template: &cfg.prompt_template,
        max_len: cfg.max_len,
        truncation: cfg.truncation,
        data: &cfg.data,
    };
    let (comps, skipped, truncated) = tokenize_with(spec, &tok, eos, &comparisons)?;
    let pairs = reference_pairs(&reference, &comps, pad, cfg.batch_size)?;
    let n_val = ((pairs.len() as f64) * cfg.val_fraction).round() as usize;
    let (train_set, val_set) = pairs.split_at(pairs.len() - n_val);
    if train_set.is_empty() {
        bail!("{}: no training pairs left ({skipped} skipped as too long)", cfg.data.display());
    }
    let mut metrics = run.metrics()?;
    let bar = crate::progress::bar(cfg.steps as u64, "dpo");
    bar.set_position(start as u64);
    let mut report = DpoReport {
        steps: cfg.steps,
        pairs: (train_set.len(), val_set.len()),
        skipped_truncated: (skipped, truncated),
        train_loss: f32::NAN,
        eval: None,
    };
    for step in start..cfg.steps {
        // ALGO: the pairwise loss over grad_accum micro-batches, one AdamW step
        let t0 = Instant::now();
        let lr = cfg.schedule.at(step);
        let (mut tokens, mut batch_stats) = (0usize, vec![]);
        let (loss, grad_norm) =
            optimizer_step(&mut policy, &mut opt, lr, cfg.grad_clip, cfg.grad_accum, |m, micro, tape| {
                let first = (step * cfg.grad_accum + micro) * cfg.batch_size;
                let batch: Vec<&Pair> = (first..first + cfg.batch_size)
                    .map(|i| &train_set[epoch_index(train_set.len(), cfg.seed, i)])
                    .collect();
                tokens += batch.iter().map(|p| p.chosen.ids.len() + p.rejected.ids.len()).sum::<usize>();
                let (loss, stats): (Loss, _) = pair_loss(&cfg, m, &batch, pad, tape)?;
                batch_stats.push(stats);
                Ok(loss)
            })?;
        report.train_loss = loss;
        let done = step + 1;
        let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
        let acc = batch_stats.iter().map(|s| s.accuracy).sum::<f64>() / batch_stats.len() as f64;
        let mut record = serde_json::json!({"step": done, "loss": loss, "rewards/accuracies": acc, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": tok_s});
        if (done % cfg.eval_every == 0 || done == cfg.steps) && !val_set.is_empty() {
            let ev = evaluate(&cfg, &policy, val_set, pad)?;
            for (k, v) in [
                ("eval/loss", ev.loss),
                ("eval/rewards/chosen", ev.rewards_chosen),
                ("eval/rewards/rejected", ev.rewards_rejected),
                ("eval/rewards/accuracies", ev.accuracy),
                ("eval/rewards/margins", ev.margin),
            ] {
                record[k] = v.into();
            }
            report.eval = Some(ev);
        }
        metrics.write(&record)?;
        bar.set_message(format!("loss {loss:.3} acc {acc:.2} | {tok_s:.0} tok/s"));
        bar.inc(1);
        if done % cfg.checkpoint_every == 0 || done == cfg.steps {
            save(&run, done, &policy, &tok, &mut opt)?;
        }
    }
    bar.finish();
    Ok(report)
}

/// Every comparison's (better, worse) pairs with the reference's sequence log-probs.
fn reference_pairs(reference: &CausalLm<Cpu>, comps: &[TokComparison], pad: u32, batch: usize) -> Result<Vec<Pair>> {
    let seq = |c: &TokComparison, k: usize| Seq {
        ids: [c.prompt_ids.as_slice(), &c.responses[k]].concat(),
        prompt_len: c.prompt_ids.len(),
    };
    let mut pairs: Vec<Pair> = comps
        .iter()
        .flat_map(|c| {
            let k = c.responses.len();
            (0..k).flat_map(move |i| (i + 1..k).map(move |j| (i, j))).map(move |(i, j)| Pair {
                chosen: seq(c, i),
                rejected: seq(c, j),
                ref_logps: (0.0, 0.0),
            })
        })
        .collect();
    for chunk in pairs.chunks_mut(batch.max(1)) {
        let seqs: Vec<&Seq> = chunk.iter().flat_map(|p| [&p.chosen, &p.rejected]).collect();
        let s = sums(&seq_logps(reference, &seqs, pad, NoneTape)?.as_vec(), &seqs);
        for (k, p) in chunk.iter_mut().enumerate() {
            p.ref_logps = (s[2 * k], s[2 * k + 1]);
        }
    }
    Ok(pairs)
}

/// Loss and implicit-reward statistics over `set` (no tape): every statistic is a mean over
/// pairs, so the chunks' means weighted by their sizes give the set's.
pub fn evaluate(cfg: &DpoConfig, policy: &CausalLm<Cpu>, set: &[Pair], pad: u32) -> Result<DpoStats> {
    let mut total = DpoStats::default();
    for chunk in set.chunks(cfg.batch_size) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let (_, st) = pair_loss(cfg, policy, &refs, pad, NoneTape)?;
        let w = chunk.len() as f64 / set.len() as f64;
        total.loss += w * st.loss;
        total.rewards_chosen += w * st.rewards_chosen;
        total.rewards_rejected += w * st.rewards_rejected;
        total.accuracy += w * st.accuracy;
        total.margin += w * st.margin;
    }
    Ok(total)
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
    require_fraction("val_fraction", cfg.val_fraction)?;
    if cfg.data.as_os_str().is_empty() || cfg.init.as_os_str().is_empty() {
        bail!("data and init are required (a preference JSONL file and an SFT checkpoint folder)");
    }
    Ok(())
}
