//! KTO's data and batch loss for `rlhf dpo` with `loss.kind = "kto"` (Ethayarajh et al. 2024,
//! as TRL's `KTOTrainer` computes it). Each example is a (prompt, completion) labelled
//! desirable or not; its reference point comes from *mismatched* pairs — prompt i with another
//! example's completion — whose log-ratio, averaged over the batch and clamped at 0, estimates
//! `z₀ = KL(π_θ‖π_ref)`. As in TRL the mismatch is fixed once (here: the previous example of a
//! seeded permutation whose prompt differs), the reference's log-probs of both sequences are
//! computed once, and the policy's mismatched log-probs get no gradient.

use std::path::Path;

use anyhow::Result;
use dfdx::prelude::*;
use rlhf_policies::fused::host_loss;
use rlhf_policies::{CausalLm, FusedOps, Tokenizer};

use crate::data::{epoch_permutation, held_out_count};
use crate::math::dpo::{kto_loss, KtoBatch};
use crate::preference::{chat_for, read_labelled, tokenize_with, Comparison, TokenizeSpec};
use crate::stages::dpo::{seq_logps, sums, DpoConfig};
use crate::stages::ppo_models::Seq;
use rlhf_policies::chat::ChatTemplate;

/// One tokenized KTO example with its mismatched sequence and the reference's log-probs.
#[derive(Debug, Clone)]
pub struct KtoExample {
    /// Line of the record in its file (a pair's two halves share it).
    pub line: usize,
    /// Prompt ⧺ completion.
    pub seq: Seq,
    /// Prompt ⧺ another example's completion.
    pub kl_seq: Seq,
    /// `true` = desirable.
    pub desirable: bool,
    /// log π_ref of `seq` and of `kl_seq`.
    pub ref_logps: (f64, f64),
}

/// A labelled (prompt ids, completion ids) before the mismatch is drawn.
#[derive(Debug, Clone)]
pub struct TokLabelled {
    /// Line of the record.
    pub line: usize,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Completion ids (EOS included).
    pub completion: Vec<u32>,
    /// `true` = desirable.
    pub desirable: bool,
}

/// KTO's data for `rlhf dpo`: the labelled records of `cfg.data` tokenized as `spec` says,
/// split (the last `val_fraction` held out, a pair's two halves on the same side; or
/// `cfg.val_data`'s records held out), each with its mismatch and the reference's log-probs;
/// also the (skipped, truncated) counts.
pub fn load_kto<D: FusedOps>(
    cfg: &DpoConfig,
    spec: TokenizeSpec<'_>,
    reference: &CausalLm<D>,
    tok: &Tokenizer,
    (eos, pad): (u32, u32),
) -> Result<(Vec<KtoExample>, Vec<KtoExample>, usize, usize)> {
    let template = chat_for(&cfg.format, spec.prompt)?;
    let read = |file: &Path| tokenize_labelled(file, cfg, spec, (tok, template.as_ref()), eos);
    let (mut set, mut skipped, mut truncated) = read(&cfg.data)?;
    let cut = match &cfg.val_data {
        None => {
            // a pair's two halves stay on the same side of the split
            let cut = set.len() - held_out_count(set.len(), cfg.val_fraction);
            crate::stages::common::group_boundary(&set, cut, |a, b| a.line == b.line)
        }
        Some(v) => {
            let (val, s, t) = read(v)?;
            (skipped, truncated) = (skipped + s, truncated + t);
            let cut = set.len();
            set.extend(crate::stages::common::held_out_from("dpo", v, val, "records")?);
            cut
        }
    };
    let train = kto_examples(reference, &set[..cut], pad, (cfg.batch_size, cfg.max_len), cfg.seed)?;
    let val = kto_examples(reference, &set[cut..], pad, (cfg.batch_size, cfg.max_len), cfg.seed ^ 0x7a1)?;
    Ok((train, val, skipped, truncated))
}

/// The labelled records of `file`, tokenized as `spec` says; with the (skipped, truncated)
/// counts.
fn tokenize_labelled(
    file: &Path,
    cfg: &DpoConfig,
    spec: TokenizeSpec<'_>,
    (tok, template): (&Tokenizer, Option<&ChatTemplate>),
    eos: u32,
) -> Result<(Vec<TokLabelled>, usize, usize)> {
    let labelled = read_labelled(file, &cfg.format, template)?;
    let (mut set, mut skipped, mut truncated) = (vec![], 0, 0);
    for l in &labelled {
        let (line, prompt, rendered) = (l.line, l.prompt.clone(), l.rendered);
        let c = Comparison { line, prompt, rendered, responses: vec![l.completion.clone()], margin: None };
        let (mut t, s, k) = tokenize_with(TokenizeSpec { data: file, ..spec }, tok, eos, &[c])?;
        (skipped, truncated) = (skipped + s, truncated + k);
        if let Some(t) = t.pop() {
            let completion = t.responses.into_iter().next().expect("one response");
            set.push(TokLabelled { line: t.line, prompt: t.prompt_ids, completion, desirable: l.desirable });
        }
    }
    Ok((set, skipped, truncated))
}

/// The examples of `set` with their mismatched sequences (drawn with `seed`; each at most
/// `max_len` tokens) and the reference's log-probs (`batch` sequences per forward).
pub fn kto_examples<D: FusedOps>(
    reference: &CausalLm<D>,
    set: &[TokLabelled],
    pad: u32,
    (batch, max_len): (usize, usize),
    seed: u64,
) -> Result<Vec<KtoExample>> {
    let partner = partners(set, max_len, seed);
    let seq = |p: &TokLabelled, c: &TokLabelled| {
        let room = max_len.saturating_sub(p.prompt.len()).max(1);
        let completion = &c.completion[..c.completion.len().min(room)];
        Seq { ids: [p.prompt.as_slice(), completion].concat(), prompt_len: p.prompt.len() }
    };
    let mut out: Vec<KtoExample> = set
        .iter()
        .zip(&partner)
        .map(|(e, &j)| KtoExample {
            line: e.line,
            seq: seq(e, e),
            kl_seq: seq(e, &set[j]),
            desirable: e.desirable,
            ref_logps: (0.0, 0.0),
        })
        .collect();
    for chunk in out.chunks_mut(batch.max(1)) {
        let seqs: Vec<&Seq> = chunk.iter().flat_map(|e| [&e.seq, &e.kl_seq]).collect();
        let s = sums(&seq_logps(reference, &seqs, pad, NoneTape)?.as_vec(), &seqs);
        for (k, e) in chunk.iter_mut().enumerate() {
            e.ref_logps = (s[2 * k], s[2 * k + 1]);
        }
    }
    Ok(out)
}

/// For each example, the one whose completion forms its mismatched pair: the nearest earlier
/// example (cyclically, in a permutation drawn with `seed`) with a different prompt whose
/// completion fits after this prompt in `max_len` tokens; failing that, one with a different
/// prompt (its completion is then cut to fit); failing that (a single prompt), itself.
pub fn partners(set: &[TokLabelled], max_len: usize, seed: u64) -> Vec<usize> {
    let n = set.len();
    let order = epoch_permutation(n, seed, 0);
    let mut partner = vec![0; n];
    for k in 0..n {
        let i = order[k];
        let earlier = || (1..n).map(|d| order[(k + n - d) % n]).filter(|&j| set[j].prompt != set[i].prompt);
        partner[i] = earlier()
            .find(|&j| set[i].prompt.len() + set[j].completion.len() <= max_len)
            .or_else(|| earlier().next())
            .unwrap_or(i);
    }
    partner
}

/// What one KTO batch gives besides its loss.
#[derive(Debug, Clone, Default)]
pub struct KtoBatchOut {
    /// Mean loss over the batch.
    pub loss: f64,
    /// `β·log π_θ/π_ref` per example.
    pub rewards: Vec<f64>,
    /// The batch's reference point `z₀`.
    pub z0: f64,
}

/// KTO's loss on `batch` through the policy's taped forward; the mismatched sequences go
/// through an untaped forward (`z₀` is detached).
pub fn kto_batch_loss<D: FusedOps, T: Tape<f32, D>>(
    policy: &CausalLm<D>,
    batch: &[&KtoExample],
    pad: u32,
    (beta, desirable_weight, undesirable_weight): (f64, f64, f64),
    tape: T,
) -> Result<(Tensor<Rank0, f32, D, T>, KtoBatchOut)> {
    let kl_seqs: Vec<&Seq> = batch.iter().map(|e| &e.kl_seq).collect();
    let policy_kl_logps = sums(&seq_logps(policy, &kl_seqs, pad, NoneTape)?.as_vec(), &kl_seqs);
    let seqs: Vec<&Seq> = batch.iter().map(|e| &e.seq).collect();
    let lpe = seq_logps(policy, &seqs, pad, tape)?;
    let labels: Vec<bool> = batch.iter().map(|e| e.desirable).collect();
    let (ref_logps, ref_kl_logps): (Vec<f64>, Vec<f64>) = batch.iter().map(|e| e.ref_logps).unzip();
    let mut out = KtoBatchOut::default();
    let loss = host_loss(lpe, |x| {
        let policy_logps = sums(x, &seqs);
        let k = kto_loss(
            KtoBatch {
                labels: &labels,
                policy_logps: &policy_logps,
                ref_logps: &ref_logps,
                policy_kl_logps: &policy_kl_logps,
                ref_kl_logps: &ref_kl_logps,
            },
            beta,
            desirable_weight,
            undesirable_weight,
        );
        // every token of a sequence gets its sequence's gradient; entropies get none
        let mut grad: Vec<f64> =
            seqs.iter().zip(&k.d_policy).flat_map(|(s, &g)| std::iter::repeat_n(g, s.resp_len())).collect();
        grad.resize(x.len(), 0.0);
        out = KtoBatchOut { loss: k.loss, rewards: k.rewards, z0: k.z0 };
        (k.loss, grad)
    });
    Ok((loss, out))
}

/// Held-out pair accuracy for examples unpaired from pairs: over the lines holding exactly
/// one desirable and one undesirable example, how often the desirable one's implicit reward
/// is strictly higher. `None` when no line holds such a pair (genuinely unpaired data).
pub fn pair_accuracy(examples: &[KtoExample], rewards: &[f64]) -> Option<f64> {
    let mut by_line: std::collections::BTreeMap<usize, Vec<(bool, f64)>> = Default::default();
    for (e, &r) in examples.iter().zip(rewards) {
        by_line.entry(e.line).or_default().push((e.desirable, r));
    }
    let (mut right, mut n) = (0, 0);
    for v in by_line.values() {
        if let [(a, ra), (b, rb)] = v.as_slice() {
            if a != b {
                let (good, bad) = if *a { (ra, rb) } else { (rb, ra) };
                n += 1;
                right += usize::from(good > bad);
            }
        }
    }
    (n > 0).then(|| right as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(line: usize, desirable: bool) -> KtoExample {
        let seq = Seq { ids: vec![1, 2], prompt_len: 1 };
        KtoExample { line, seq: seq.clone(), kl_seq: seq, desirable, ref_logps: (0.0, 0.0) }
    }

    #[test]
    fn mismatched_partners_have_other_prompts_and_fit() {
        let ex =
            |p: u32, c: usize| TokLabelled { line: 0, prompt: vec![p; 3], completion: vec![9; c], desirable: true };
        // two examples per prompt; the completion of length 9 fits only after nothing (max 10)
        let set = [ex(1, 2), ex(1, 3), ex(2, 9), ex(2, 2), ex(3, 4), ex(3, 1)];
        for seed in 0..20 {
            let p = partners(&set, 10, seed);
            for (i, &j) in p.iter().enumerate() {
                assert_ne!(set[i].prompt, set[j].prompt, "seed {seed}: {i} → {j}");
                assert!(set[i].prompt.len() + set[j].completion.len() <= 10, "seed {seed}: {i} → {j}");
            }
        }
        assert_eq!(partners(&set[..2], 10, 0), vec![0, 1], "a single prompt pairs with itself");
    }

    #[test]
    fn pair_accuracy_counts_only_complete_pairs() {
        let e = [ex(1, true), ex(1, false), ex(2, false), ex(2, true), ex(3, true)];
        assert_eq!(pair_accuracy(&e, &[1.0, 0.5, 2.0, 1.0, 9.0]), Some(0.5));
        assert_eq!(pair_accuracy(&e[4..], &[1.0]), None);
    }
}
