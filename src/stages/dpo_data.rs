//! DPO's data (and KTO's, through [`crate::stages::kto`]): preference records read,
//! tokenized and split, each comparison's pairs with the frozen reference's sequence log-probs
//! computed once, and the held-out prompts the sampled KL is measured on.

use std::path::Path;

use anyhow::{bail, Result};
use dfdx::prelude::*;
use rlhf_policies::{CausalLm, FusedOps, Tokenizer};

use crate::data::held_out_count;
use crate::math::dpo::DpoLoss;
use crate::preference::{chat_for, read_comparisons, tokenize_with, TokComparison, TokenizeSpec};
use crate::prompt_format::PromptFormat;
use crate::stages::common::held_out_from;
use crate::stages::dpo::{seq_logps, sums, DpoConfig};
use crate::stages::kto::{load_kto, KtoExample};
use crate::stages::ppo_models::Seq;

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

/// A split of the data in the loss's shape.
#[derive(Debug, Clone)]
pub enum Examples {
    /// Preference pairs (the DPO family).
    Pairs(Vec<Pair>),
    /// Labelled completions (KTO).
    Kto(Vec<KtoExample>),
}

impl Examples {
    /// Number of pairs or examples.
    pub fn len(&self) -> usize {
        match self {
            Examples::Pairs(p) => p.len(),
            Examples::Kto(e) => e.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct prompts in order.
    pub(crate) fn prompts(&self) -> Vec<Vec<u32>> {
        let seqs: Vec<&Seq> = match self {
            Examples::Pairs(p) => p.iter().map(|p| &p.chosen).collect(),
            Examples::Kto(e) => e.iter().map(|e| &e.seq).collect(),
        };
        let mut seen = std::collections::HashSet::new();
        seqs.into_iter().map(|s| &s.ids[..s.prompt_len]).filter(|p| seen.insert(*p)).map(<[u32]>::to_vec).collect()
    }
}

/// The data of a run, split and with the reference's log-probs.
pub(crate) struct Data {
    pub(crate) train: Examples,
    pub(crate) val: Examples,
    pub(crate) skipped_truncated: (usize, usize),
}

/// Reads, tokenizes and splits the data (the last `val_fraction` held out, or `val_data`),
/// then computes the reference's log-probs once.
pub(crate) fn load_examples<D: FusedOps>(
    cfg: &DpoConfig,
    reference: &CausalLm<D>,
    tok: &Tokenizer,
    eos: u32,
    pad: u32,
) -> Result<Data> {
    let prompt = PromptFormat::new(&cfg.prompt_template, cfg.chat.as_ref(), tok, &reference.config, &cfg.init)?;
    let spec = TokenizeSpec { prompt: &prompt, max_len: cfg.max_len, truncation: cfg.truncation, data: &cfg.data };
    let (train, val, skipped, truncated) = if let DpoLoss::Kto { .. } = cfg.loss {
        let (train, val, skipped, truncated) = load_kto(cfg, spec, reference, tok, (eos, pad))?;
        (Examples::Kto(train), Examples::Kto(val), skipped, truncated)
    } else {
        let template = chat_for(&cfg.format, &prompt)?;
        let pairs_of = |file: &Path| -> Result<(Vec<Pair>, usize, usize)> {
            let comparisons = read_comparisons(file, &cfg.format, template.as_ref())?;
            let (comps, skipped, truncated) =
                tokenize_with(TokenizeSpec { data: file, ..spec }, tok, eos, &comparisons)?;
            let reference = (!cfg.loss.reference_free()).then_some(reference);
            Ok((reference_pairs(reference, &comps, pad, cfg.batch_size)?, skipped, truncated))
        };
        let (mut pairs, mut skipped, mut truncated) = pairs_of(&cfg.data)?;
        let val = match &cfg.val_data {
            None => pairs.split_off(pairs.len() - held_out_count(pairs.len(), cfg.val_fraction)),
            Some(v) => {
                let (val, s, t) = pairs_of(v)?;
                (skipped, truncated) = (skipped + s, truncated + t);
                held_out_from("dpo", v, val, "pairs")?
            }
        };
        (Examples::Pairs(pairs), Examples::Pairs(val), skipped, truncated)
    };
    if train.is_empty() {
        bail!("{}: no training examples left ({skipped} skipped as too long)", cfg.data.display());
    }
    if skipped + truncated > 0 {
        eprintln!("dpo: {skipped} records skipped and {truncated} prompts truncated (max_len {})", cfg.max_len);
    }
    Ok(Data { train, val, skipped_truncated: (skipped, truncated) })
}

/// Every comparison's (better, worse) pairs with the reference's sequence log-probs (0 for a
/// reference-free loss: `None`, no forward).
fn reference_pairs<D: FusedOps>(
    reference: Option<&CausalLm<D>>,
    comps: &[TokComparison],
    pad: u32,
    batch: usize,
) -> Result<Vec<Pair>> {
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
    let Some(reference) = reference else { return Ok(pairs) };
    for chunk in pairs.chunks_mut(batch.max(1)) {
        let seqs: Vec<&Seq> = chunk.iter().flat_map(|p| [&p.chosen, &p.rejected]).collect();
        let s = sums(&seq_logps(reference, &seqs, pad, NoneTape)?.as_vec(), &seqs);
        for (k, p) in chunk.iter_mut().enumerate() {
            p.ref_logps = (s[2 * k], s[2 * k + 1]);
        }
    }
    Ok(pairs)
}

/// The held-out prompts `eval/sample_kl` samples from: the first `eval_samples` that leave
/// room for `sample_tokens` within the model's positions (a shortfall is reported).
pub(crate) fn kl_sample_prompts(cfg: &DpoConfig, val_prompts: Vec<Vec<u32>>, max_positions: usize) -> Vec<Vec<u32>> {
    let n_val_prompts = val_prompts.len();
    let chosen: Vec<Vec<u32>> = val_prompts
        .into_iter()
        .filter(|p| p.len() + cfg.sample_tokens <= max_positions)
        .take(cfg.eval_samples)
        .collect();
    if chosen.len() < cfg.eval_samples.min(n_val_prompts) {
        eprintln!(
            "dpo: only {} held-out prompts leave room for sample_tokens {} within the model's {} positions; \
             eval/sample_kl uses those",
            chosen.len(),
            cfg.sample_tokens,
            max_positions
        );
    }
    chosen
}
