//! NLPO's action masks (Ramamurthy et al. 2023, "Is Reinforcement Learning (Not) for Natural
//! Language Processing?", RL4LMs): a masking policy π_ψ — a copy of the policy, synced every
//! few iterations — restricts each step's action set to its top-p nucleus
//!
//! ```text
//! V_p(s) = the smallest set of most likely tokens with Σ_{a ∈ V_p} π_ψ(a|s) ≥ p, at least
//!          `min_tokens_to_keep` of them, the end-of-sequence ids always in it;
//! π_θ^mask(a|s) = π_θ(a|s)·1[a ∈ V_p(s)] / Σ_{b ∈ V_p(s)} π_θ(b|s)
//! ```
//!
//! and PPO runs on π_θ^mask. [`TokenMask`] is one step's V_p, [`nucleus_mask`] builds it, and
//! [`NucleusMaskedSession`] samples from π_θ^mask, decoding the policy and the masking policy
//! in lockstep and keeping every step's mask for the training forward
//! ([`crate::FusedOps::lm_logprobs_and_entropy_masked`]).

use rand::{rngs::StdRng, SeedableRng};
use rayon::prelude::*;
use rlhf_envs::{Action, EnvError, Policy};

use crate::kernels::exp_inplace;
use crate::sampling::{row_seed, SamplingConfig};
use crate::session::sample_rows;

/// The logit a masked-out token gets in the training forward: finite, so that `p·log p` of a
/// masked token is `0·(−10⁹) = 0` rather than `0·(−∞) = NaN`, and far enough below any real
/// logit that `exp` of it is exactly 0 (the result equals a softmax over the allowed tokens).
pub const MASKED_LOGIT: f32 = -1e9;

/// A set of token ids of a vocabulary (a bit per token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u64>,
    vocab: usize,
}

impl TokenMask {
    /// No token of a `vocab`-token vocabulary.
    pub fn none(vocab: usize) -> Self {
        TokenMask { words: vec![0; vocab.div_ceil(64)], vocab }
    }

    /// Every token of a `vocab`-token vocabulary.
    pub fn all(vocab: usize) -> Self {
        let mut m = TokenMask::none(vocab);
        (0..vocab).for_each(|t| m.allow(t));
        m
    }

    /// Adds token `t` (ids outside the vocabulary are ignored).
    pub fn allow(&mut self, t: usize) {
        if t < self.vocab {
            self.words[t / 64] |= 1 << (t % 64);
        }
    }

    /// Whether token `t` is in the set.
    pub fn allows(&self, t: usize) -> bool {
        t < self.vocab && self.words[t / 64] >> (t % 64) & 1 == 1
    }

    /// How many tokens are in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Sets every logit of a token outside the set to `value`.
    pub fn apply(&self, logits: &mut [f32], value: f32) {
        assert_eq!(logits.len(), self.vocab, "a mask over {} tokens applied to {} logits", self.vocab, logits.len());
        logits.iter_mut().enumerate().filter(|(t, _)| !self.allows(*t)).for_each(|(_, l)| *l = value);
    }
}

/// NLPO's nucleus of one step: the most likely tokens of `softmax(logits / temperature)`, in
/// order of probability (ties: the lower id first), until their mass reaches `top_p`, and at
/// least `min_keep` of them (all of them when the vocabulary is smaller); the ids in `always`
/// (EOS and stop ids, RL4LMs' special tokens) are added. `top_p ≥ 1` keeps every token, as
/// [`SamplingConfig::top_p`] does.
pub fn nucleus_mask(logits: &[f32], temperature: f32, top_p: f32, min_keep: usize, always: &[u32]) -> TokenMask {
    let v = logits.len();
    if top_p >= 1.0 || min_keep >= v {
        return TokenMask::all(v);
    }
    let inv_t = 1.0 / temperature;
    let z: Vec<f32> = logits.iter().map(|&l| l * inv_t).collect();
    let (lo, hi) = z.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let mut w: Vec<f32> = z.iter().map(|&x| x - hi).collect();
    exp_inplace(&mut w);
    let target = top_p as f64 * w.iter().map(|&x| x as f64).sum::<f64>();
    // Instead of sorting the vocabulary: buckets of equal width in z, highest first; the walk
    // down the order can only stop inside the first bucket after which both limits are met,
    // so only that bucket's tokens are sorted.
    let scale = if hi > lo { BUCKETS as f32 / (hi - lo) } else { 0.0 };
    let buckets: Vec<u16> = z.iter().map(|&x| (((hi - x) * scale) as usize).min(BUCKETS - 1) as u16).collect();
    let (mut count, mut mass) = (vec![0usize; BUCKETS], vec![0f64; BUCKETS]);
    for (&b, &wt) in buckets.iter().zip(&w) {
        count[b as usize] += 1;
        mass[b as usize] += wt as f64;
    }
    let (mut n, mut m, mut last) = (0, 0.0, BUCKETS - 1);
    for b in 0..BUCKETS {
        if n + count[b] >= min_keep && m + mass[b] >= target {
            last = b;
            break;
        }
        (n, m) = (n + count[b], m + mass[b]);
    }
    let mut mask = TokenMask::none(v);
    let mut members = vec![];
    for (t, &b) in buckets.iter().enumerate() {
        match (b as usize).cmp(&last) {
            std::cmp::Ordering::Less => mask.allow(t),
            std::cmp::Ordering::Equal => members.push(t),
            std::cmp::Ordering::Greater => {}
        }
    }
    members.sort_unstable_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    for (k, &t) in members.iter().enumerate() {
        if n + k >= min_keep && m >= target {
            break;
        }
        mask.allow(t);
        m += w[t] as f64;
    }
    always.iter().for_each(|&t| mask.allow(t as usize));
    mask
}

/// Buckets of [`nucleus_mask`]'s partial order.
const BUCKETS: usize = 1024;

/// The nucleus settings of [`NucleusMaskedSession`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nucleus {
    /// p of V_p (RL4LMs' `top_mask`).
    pub top_p: f32,
    /// The smallest V_p (RL4LMs' `min_tokens_to_keep`).
    pub min_keep: usize,
}

/// A decoding session whose current next-token logits can be read: what
/// [`NucleusMaskedSession`] decodes the policy and the masking policy with (every session of
/// [`crate::policy_sessions`] is one).
pub trait RowLogits: Policy {
    /// Row `row`'s logits for its next token (raw, before temperature).
    fn row_logits(&self, row: usize) -> Result<&[f32], EnvError>;
}

/// The env's [`Policy`] for NLPO: samples each token from π_θ^mask — the policy's logits with
/// every token outside the masking policy's nucleus removed — at the sampling temperature,
/// with the same per-row RNG streams (and min-new-tokens rule) as the plain sessions, so that
/// a nucleus of the whole vocabulary samples exactly what the policy alone would. Each action's
/// log-prob is under π_θ^mask; each row keeps its steps' masks until it begins again.
pub struct NucleusMaskedSession<'m> {
    policy: Box<dyn RowLogits + 'm>,
    mask_policy: Option<Box<dyn RowLogits + 'm>>,
    nucleus: Nucleus,
    sampling: SamplingConfig,
    rngs: Vec<StdRng>,
    steps: Vec<usize>,
    masks: Vec<Vec<TokenMask>>,
    masses: Vec<Vec<f32>>,
}

impl std::fmt::Debug for NucleusMaskedSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NucleusMaskedSession").field("nucleus", &self.nucleus).field("rows", &self.steps.len()).finish()
    }
}

impl<'m> NucleusMaskedSession<'m> {
    /// `rows` rows decoded by `policy` and `mask_policy` (sessions of the same vocabulary and
    /// rows), sampled with `sampling`. `mask_policy: None`: the masking policy is the policy
    /// itself (NLPO's sync iterations), whose logits serve both without a second decode.
    pub fn new(
        policy: Box<dyn RowLogits + 'm>,
        mask_policy: Option<Box<dyn RowLogits + 'm>>,
        rows: usize,
        nucleus: Nucleus,
        sampling: SamplingConfig,
    ) -> Self {
        let rngs = (0..rows).map(|r| StdRng::seed_from_u64(row_seed(sampling.seed, r))).collect();
        NucleusMaskedSession {
            policy,
            mask_policy,
            nucleus,
            sampling,
            rngs,
            steps: vec![0; rows],
            masks: vec![vec![]; rows],
            masses: vec![vec![]; rows],
        }
    }

    /// Each row's masks, one per token it sampled since it began (taken: the rows keep none).
    pub fn take_masks(&mut self) -> Vec<Vec<TokenMask>> {
        self.masks.iter_mut().map(std::mem::take).collect()
    }

    /// Each row's π_θ(V_p) per sampled token: the probability mass the policy (at the sampling
    /// temperature) puts inside the step's nucleus (taken, like [`Self::take_masks`]).
    pub fn take_masses(&mut self) -> Vec<Vec<f32>> {
        self.masses.iter_mut().map(std::mem::take).collect()
    }

    fn row(&self, r: usize) -> Result<(), EnvError> {
        if r < self.steps.len() {
            Ok(())
        } else {
            Err(EnvError::Model(format!("row {r} out of range")))
        }
    }
}

/// `ln Σ exp` over the logits `keep` selects, in f64.
fn lse_where(z: &[f32], keep: impl Fn(usize) -> bool) -> f64 {
    let max = z.iter().enumerate().filter(|(t, _)| keep(*t)).map(|(_, &x)| x).fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = z.iter().enumerate().filter(|(t, _)| keep(*t)).map(|(_, &x)| ((x - max) as f64).exp()).sum();
    max as f64 + s.ln()
}

impl Policy for NucleusMaskedSession<'_> {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        rows.iter().try_for_each(|&r| self.row(r))?;
        self.policy.begin(rows, prompts)?;
        if let Some(m) = &mut self.mask_policy {
            m.begin(rows, prompts)?;
        }
        for &r in rows {
            self.steps[r] = 0;
            self.masks[r].clear();
            self.masses[r].clear();
        }
        Ok(())
    }

    fn act(&mut self, rows: &[usize]) -> Result<Vec<Action>, EnvError> {
        rows.iter().try_for_each(|&r| self.row(r))?;
        let (s, nucleus) = (&self.sampling, self.nucleus);
        let always: Vec<u32> = s.eos_ids.iter().chain(&s.stop_ids).copied().collect();
        let inputs: Vec<(&[f32], &[f32], bool)> = rows
            .iter()
            .map(|&r| {
                let policy = self.policy.row_logits(r)?;
                let mask = self.mask_policy.as_ref().map_or(Ok(policy), |m| m.row_logits(r))?;
                Ok((policy, mask, self.steps[r] < s.min_new_tokens))
            })
            .collect::<Result<_, EnvError>>()?;
        let one = |&(policy, mask, forbid_end): &(&[f32], &[f32], bool)| {
            if policy.len() != mask.len() {
                return Err(EnvError::Model(format!(
                    "the policy has {} tokens and the masking policy {}",
                    policy.len(),
                    mask.len()
                )));
            }
            // while the end ids are forbidden (min_new_tokens), the nucleus is over the others
            let mut mask = std::borrow::Cow::Borrowed(mask);
            if forbid_end {
                let row = mask.to_mut();
                for &t in &always {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let m = nucleus_mask(&mask, s.temperature, nucleus.top_p, nucleus.min_keep, &always);
            let z: Vec<f32> = policy.iter().map(|&l| l / s.temperature).collect();
            let mass = (lse_where(&z, |t| m.allows(t)) - lse_where(&z, |_| true)).exp() as f32;
            let mut masked = policy.to_vec();
            m.apply(&mut masked, f32::NEG_INFINITY);
            Ok((m, mass, masked))
        };
        let done: Vec<(TokenMask, f32, Vec<f32>)> = if rows.len() >= 8 {
            inputs.par_iter().map(one).collect::<Result<_, _>>()?
        } else {
            inputs.iter().map(one).collect::<Result<_, _>>()?
        };
        let mut logits = vec![vec![]; self.steps.len()];
        for (&r, (m, mass, masked)) in rows.iter().zip(done) {
            let step = self.steps[r];
            self.masks[r].truncate(step);
            self.masses[r].truncate(step);
            self.masks[r].push(m);
            self.masses[r].push(mass);
            logits[r] = masked;
        }
        sample_rows(rows, &logits, &self.steps, &mut self.rngs, &self.sampling)
    }

    fn push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError> {
        rows.iter().try_for_each(|&r| self.row(r))?;
        self.policy.push(rows, tokens)?;
        if let Some(m) = &mut self.mask_policy {
            m.push(rows, tokens)?;
        }
        rows.iter().for_each(|&r| self.steps[r] += 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn softmax(z: &[f32]) -> Vec<f64> {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = z.iter().map(|&x| (x as f64 - max).exp()).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    #[test]
    fn the_nucleus_is_the_smallest_most_likely_set_reaching_p() {
        let mut rng = StdRng::seed_from_u64(7);
        for case in 0..200 {
            let v = rng.gen_range(2..300);
            let logits: Vec<f32> = (0..v).map(|_| rng.gen_range(-4.0..4.0)).collect();
            let (t, p, keep) = (rng.gen_range(0.5..2.0), rng.gen_range(0.05..0.99), rng.gen_range(1..20));
            let m = nucleus_mask(&logits, t, p, keep, &[]);
            let z: Vec<f32> = logits.iter().map(|l| l / t).collect();
            let probs = softmax(&z);
            let allowed: Vec<usize> = (0..v).filter(|&i| m.allows(i)).collect();
            let inside: f64 = allowed.iter().map(|&i| probs[i]).sum();
            // everything allowed is at least as likely as everything left out
            let lowest_in = allowed.iter().map(|&i| probs[i]).fold(1.0, f64::min);
            let highest_out = (0..v).filter(|&i| !m.allows(i)).map(|i| probs[i]).fold(0.0, f64::max);
            assert!(lowest_in >= highest_out, "case {case}");
            assert!(m.count() >= keep.min(v), "case {case}: at least min_keep");
            assert!(inside >= p as f64 - 1e-5, "case {case}: mass {inside} < {p}");
            // the smallest such set: without its least likely member the mass falls short
            if m.count() > keep {
                assert!(inside - lowest_in < p as f64 + 1e-5, "case {case}: not the smallest");
            }
            // the end ids join it
            let eos = rng.gen_range(0..v);
            let mut with_eos = m.clone();
            with_eos.allow(eos);
            assert_eq!(nucleus_mask(&logits, t, p, keep, &[eos as u32]), with_eos, "case {case}");
        }
    }

    /// The definition as written: sort the whole vocabulary, walk down it.
    fn by_sorting(logits: &[f32], t: f32, p: f32, min_keep: usize) -> TokenMask {
        let z: Vec<f32> = logits.iter().map(|&l| l * (1.0 / t)).collect();
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut w: Vec<f32> = z.iter().map(|&x| x - max).collect();
        exp_inplace(&mut w);
        let target = p as f64 * w.iter().map(|&x| x as f64).sum::<f64>();
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_unstable_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
        let (mut mask, mut mass) = (TokenMask::none(z.len()), 0.0);
        for (rank, &i) in order.iter().enumerate() {
            if rank >= min_keep && mass >= target {
                break;
            }
            mask.allow(i);
            mass += w[i] as f64;
        }
        mask
    }

    #[test]
    fn the_bucketed_walk_equals_sorting_the_vocabulary() {
        let mut rng = StdRng::seed_from_u64(8);
        for case in 0..300 {
            let v = rng.gen_range(2..5000);
            let spread = [0.5f32, 4.0, 30.0][case % 3];
            // ties too: logits rounded to a coarse grid in a third of the cases
            let logits: Vec<f32> = (0..v)
                .map(|_| rng.gen_range(-spread..spread))
                .map(|x: f32| if case % 3 == 1 { (x * 2.0).round() / 2.0 } else { x })
                .collect();
            let (t, p, keep) = (rng.gen_range(0.5..2.0), rng.gen_range(0.05..0.99), rng.gen_range(1..300));
            let want = if keep >= v { TokenMask::all(v) } else { by_sorting(&logits, t, p, keep) };
            assert_eq!(nucleus_mask(&logits, t, p, keep, &[]), want, "case {case}");
        }
        let flat = vec![0.25f32; 300];
        assert_eq!(nucleus_mask(&flat, 1.0, 0.5, 10, &[]), by_sorting(&flat, 1.0, 0.5, 10));
    }

    #[test]
    fn top_p_one_or_a_small_vocabulary_keeps_every_token() {
        let logits = [3.0, -50.0, 1.0, -200.0];
        assert_eq!(nucleus_mask(&logits, 1.0, 1.0, 1, &[]), TokenMask::all(4));
        assert_eq!(nucleus_mask(&logits, 1.0, 0.1, 4, &[]), TokenMask::all(4));
        let m = nucleus_mask(&logits, 1.0, 0.1, 1, &[]);
        assert_eq!((m.count(), m.allows(0)), (1, true));
        let mut x = logits;
        m.apply(&mut x, MASKED_LOGIT);
        assert_eq!(x, [3.0, MASKED_LOGIT, MASKED_LOGIT, MASKED_LOGIT]);
    }

    #[test]
    fn token_masks_count_and_ignore_ids_outside_the_vocabulary() {
        let mut m = TokenMask::none(130);
        for t in [0, 63, 64, 129, 130, 9999] {
            m.allow(t);
        }
        assert_eq!(m.count(), 4);
        assert!(m.allows(129) && !m.allows(130) && !m.allows(1));
        assert_eq!(TokenMask::all(130).count(), 130);
    }
}
