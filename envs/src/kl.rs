//! Reward shaping: per-token KL penalties against the frozen reference and the processed
//! reward-model score (`../shared/docs/rlhf-formulas.md` §1; fixtures in `shared/fixtures/ppo`).
//!
//! Per response token t (valid tokens only; the last valid token is the EOS, or the last token
//! of a truncated response):
//!
//! ```text
//! r_t = −β · k(t)  +  [t = last] · R
//! ```
//! where `k` is one of the estimators below and `R` the processed score.

use serde::{Deserialize, Serialize};

/// Per-token estimator of KL(π‖π_ref) from `logprob = log π(a_t)` and
/// `ref_logprob = log π_ref(a_t)` (Schulman, "Approximating KL divergence", 2020).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `k1 = log π − log π_ref` (unbiased; can be negative). The default, as in InstructGPT.
    #[default]
    K1,
    /// `k2 = ½ (log π_ref − log π)²` (biased, ≥ 0).
    K2,
    /// `k3 = (ρ − 1) − log ρ` with `ρ = π_ref / π` (unbiased, ≥ 0).
    K3,
    /// `|log π − log π_ref|` (biased, ≥ 0; TRL's `kl_penalty = "abs"`).
    Abs,
}

impl KlEstimator {
    /// The estimate at one token.
    pub fn estimate(self, logprob: f32, ref_logprob: f32) -> f32 {
        let log_r = (ref_logprob - logprob) as f64; // log π_ref/π
        let k = match self {
            // log π/π_ref subtracted that way round: −log_r would be −0.0 at equality, a
            // "negative KL" in the logs
            KlEstimator::K1 => (logprob - ref_logprob) as f64,
            KlEstimator::K2 => 0.5 * log_r * log_r,
            KlEstimator::K3 => log_r.exp_m1() - log_r,
            KlEstimator::Abs => log_r.abs(),
        };
        k as f32
    }
}

/// How the raw reward-model score becomes the terminal reward `R`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConfig {
    /// Normalise first: `(score − mean) / std` (e.g. the reward model's stored statistics).
    /// Default: none.
    pub normalize: Option<ScoreNorm>,
    /// Or normalise by running statistics of every raw score so far ([`RunningNorm`]; not
    /// with `normalize`). Default: none.
    pub running_norm: Option<RunningNorm>,
    /// Then clip to `[−clip, clip]`. Default: none.
    pub clip: Option<f32>,
    /// What a response that never emitted EOS (truncated) gets. Default: nothing.
    pub missing_eos: MissingEos,
    /// DAPO's overlong reward shaping (Yu et al. 2025, eq. 13), applied last: a response of
    /// |y| tokens within `overlong_cache` tokens of the limit L_max (`max_new_tokens`) loses
    /// `(|y| − (L_max − cache)) / cache`, rising linearly to 1 at the limit. Default: none.
    pub overlong_cache: Option<usize>,
}

/// Mean and standard deviation used to normalise scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreNorm {
    /// Subtracted.
    pub mean: f32,
    /// Divided by (must be > 0).
    pub std: f32,
}

/// Normalisation by running statistics of the raw scores (trlx's `scale_reward: "running"`,
/// TRL's `use_score_scaling`; the fix for DeepSpeedExamples#556's ever-growing critic loss):
/// each training batch's raw scores first update the [`RunningMoments`], then every score of
/// the batch is divided by their standard deviation — after subtracting their mean too with
/// `center` (TRL's `use_score_norm`). Held-out evaluations use the statistics without adding
/// to them. Until two scores differ, scores pass unscaled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunningNorm {
    /// Subtract the running mean as well. Default `false` (trlx's scaling only, which keeps
    /// each score's sign).
    pub center: bool,
}

/// Count, mean and sum of squared deviations `M2` of the scores seen, in f64, one batch at a
/// time (the parallel update of Chan, Golub & LeVeque, 1979).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningMoments {
    /// Scores seen.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// Σ (x − mean)² over them.
    pub m2: f64,
}

impl RunningMoments {
    /// Adds a batch `xs`: with its size n, mean x̄ and `M2_B = Σ (x − x̄)²`, `δ = x̄ − mean`
    /// and `N = count + n`: `mean += δ·n/N`, `M2 += M2_B + δ²·count·n/N`.
    pub fn update(&mut self, xs: &[f32]) {
        if xs.is_empty() {
            return;
        }
        let n = xs.len() as f64;
        let batch_mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let batch_m2 = xs.iter().map(|&x| (x as f64 - batch_mean).powi(2)).sum::<f64>();
        let (count, total) = (self.count as f64, self.count as f64 + n);
        let delta = batch_mean - self.mean;
        self.mean += delta * n / total;
        self.m2 += batch_m2 + delta * delta * count * n / total;
        self.count += xs.len() as u64;
    }

    /// The sample standard deviation `√(M2 / (count − 1))` (Bessel-corrected, as trlx's);
    /// `None` below two scores.
    pub fn std(&self) -> Option<f64> {
        (self.count >= 2).then(|| (self.m2.max(0.0) / (self.count - 1) as f64).sqrt())
    }

    /// The normalisation they give — `(x − mean) / std` with `center`, else `x / std` — or
    /// `None` (scores unscaled) while the standard deviation is undefined or 0.
    pub fn norm(&self, center: bool) -> Option<ScoreNorm> {
        let std = self.std().filter(|&s| s > 0.0 && s.is_finite())?;
        Some(ScoreNorm { mean: if center { self.mean as f32 } else { 0.0 }, std: std as f32 })
    }
}

/// The missing-EOS rule, applied last (after normalisation and clipping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum MissingEos {
    /// Keep the score.
    #[default]
    Keep,
    /// Replace the score by this value (TRL's early `penalty_reward_value`).
    Replace(f32),
    /// Subtract this penalty (TRL's `missing_eos_penalty`).
    Subtract(f32),
}

impl ScoreConfig {
    /// The normalisation in force: `normalize`, or what `running_norm` takes from `moments`.
    pub fn normalization(&self, moments: &RunningMoments) -> Option<ScoreNorm> {
        match self.running_norm {
            Some(r) => moments.norm(r.center),
            None => self.normalize,
        }
    }

    /// The terminal reward for a raw score of a response of `len` tokens (the limit being
    /// `max_len`) that did or did not end with EOS, normalised by `norm` (see
    /// [`ScoreConfig::normalization`]).
    pub fn process(&self, norm: Option<ScoreNorm>, raw: f32, has_eos: bool, (len, max_len): (usize, usize)) -> f32 {
        let s = self.process_score(norm, raw, has_eos);
        match self.overlong_cache {
            Some(cache) if cache > 0 && len + cache > max_len => {
                let over = (len + cache - max_len).min(cache);
                s - over as f32 / cache as f32
            }
            _ => s,
        }
    }

    /// Normalisation, clipping and the missing-EOS rule.
    fn process_score(&self, norm: Option<ScoreNorm>, raw: f32, has_eos: bool) -> f32 {
        let mut s = raw;
        if let Some(n) = norm {
            s = (s - n.mean) / n.std;
        }
        if let Some(c) = self.clip {
            s = s.clamp(-c, c);
        }
        match (has_eos, self.missing_eos) {
            (true, _) | (false, MissingEos::Keep) => s,
            (false, MissingEos::Replace(v)) => v,
            (false, MissingEos::Subtract(p)) => s - p,
        }
    }
}

/// KL penalty and score placement for one response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlConfig {
    /// β, the KL coefficient. Default `0.05`.
    pub beta: f32,
    /// The estimator in the reward. Default `k1`.
    pub estimator: KlEstimator,
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig { beta: 0.05, estimator: KlEstimator::K1 }
    }
}

/// The per-token KL terms `k(t)` of one response.
pub fn kl_terms(logprobs: &[f32], ref_logprobs: &[f32], estimator: KlEstimator) -> Vec<f32> {
    logprobs.iter().zip(ref_logprobs).map(|(&lp, &rlp)| estimator.estimate(lp, rlp)).collect()
}

/// Shaped per-token rewards of one response: `r_t = −β·k(t)`, plus `score` at the last token.
/// `logprobs` and `ref_logprobs` cover exactly the valid response tokens (EOS included).
pub fn shaped_rewards(logprobs: &[f32], ref_logprobs: &[f32], kl: &KlConfig, score: f32) -> Vec<f32> {
    let mut r: Vec<f32> = kl_terms(logprobs, ref_logprobs, kl.estimator).iter().map(|k| -kl.beta * k).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn k2_k3_and_abs_are_nonnegative_and_all_vanish_at_equality(lp in -20.0f32..0.0, rlp in -20.0f32..0.0) {
            prop_assert!(KlEstimator::K2.estimate(lp, rlp) >= 0.0);
            prop_assert!(KlEstimator::K3.estimate(lp, rlp) >= 0.0);
            prop_assert_eq!(KlEstimator::Abs.estimate(lp, rlp), KlEstimator::K1.estimate(lp, rlp).abs());
            for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3, KlEstimator::Abs] {
                prop_assert_eq!(e.estimate(lp, lp).to_bits(), 0, "{:?}: +0, never -0", e);
            }
        }

        #[test]
        fn rewards_sum_to_score_minus_beta_kl(lps in proptest::collection::vec((-10.0f32..0.0, -10.0f32..0.0), 1..20), score in -5.0f32..5.0) {
            let (lp, rlp): (Vec<f32>, Vec<f32>) = lps.into_iter().unzip();
            let kl = KlConfig { beta: 0.1, estimator: KlEstimator::K1 };
            let r = shaped_rewards(&lp, &rlp, &kl, score);
            let total_kl: f32 = kl_terms(&lp, &rlp, KlEstimator::K1).iter().sum();
            prop_assert!((r.iter().sum::<f32>() - (score - 0.1 * total_kl)).abs() < 1e-3);
        }
    }

    proptest! {
        /// Batch by batch, the running moments are the two-pass mean and sample standard
        /// deviation of everything seen, however it was split into batches.
        #[test]
        fn running_moments_equal_the_statistics_of_all_scores(
            batches in proptest::collection::vec(proptest::collection::vec(-50.0f32..50.0, 0..9), 1..8),
        ) {
            let mut m = RunningMoments::default();
            for b in &batches {
                m.update(b);
            }
            let all: Vec<f64> = batches.concat().iter().map(|&x| x as f64).collect();
            let n = all.len() as f64;
            prop_assert_eq!(m.count, all.len() as u64);
            if all.is_empty() {
                return Ok(());
            }
            let mean = all.iter().sum::<f64>() / n;
            prop_assert!((m.mean - mean).abs() < 1e-9 * (1.0 + mean.abs()), "{} against {mean}", m.mean);
            let std = (all.len() >= 2).then(|| (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
            match (m.std(), std) {
                (Some(a), Some(b)) => prop_assert!((a - b).abs() < 1e-9 * (1.0 + b), "{a} against {b}"),
                (a, b) => prop_assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn running_norm_scales_by_the_running_std_and_centres_on_request() {
        let mut m = RunningMoments::default();
        let scaled = ScoreConfig { running_norm: Some(RunningNorm { center: false }), ..Default::default() };
        let centred = ScoreConfig { running_norm: Some(RunningNorm { center: true }), ..Default::default() };
        // nothing seen, one score, equal scores: unscaled
        for batch in [&[][..], &[3.0], &[3.0]] {
            m.update(batch);
            assert_eq!(scaled.normalization(&m), None, "after {batch:?}");
        }
        m.update(&[5.0, 7.0]); // 3, 3, 5, 7: mean 4.5, sample variance 11/3
        let std = (11.0f64 / 3.0).sqrt() as f32;
        let norm = scaled.normalization(&m);
        assert_eq!(norm, Some(ScoreNorm { mean: 0.0, std }));
        assert_eq!(scaled.process(norm, 2.0 * std, true, (1, 8)), 2.0);
        let norm = centred.normalization(&m);
        assert_eq!(norm, Some(ScoreNorm { mean: 4.5, std }));
        assert_eq!(centred.process(norm, 4.5, true, (1, 8)), 0.0);
        // a fixed normalisation ignores the moments
        let fixed = ScoreConfig { normalize: Some(ScoreNorm { mean: 1.0, std: 2.0 }), ..Default::default() };
        assert_eq!(fixed.normalization(&m), fixed.normalize);
    }

    #[test]
    fn score_processing_order() {
        let cfg = ScoreConfig {
            normalize: Some(ScoreNorm { mean: 1.0, std: 2.0 }),
            clip: Some(1.0),
            missing_eos: MissingEos::Subtract(0.5),
            overlong_cache: None,
            running_norm: None,
        };
        let (len, norm) = ((3, 64), cfg.normalization(&RunningMoments::default()));
        assert_eq!(cfg.process(norm, 2.0, true, len), 0.5);
        assert_eq!(cfg.process(norm, 9.0, true, len), 1.0);
        assert_eq!(cfg.process(norm, 9.0, false, len), 0.5);
        let replace = ScoreConfig { missing_eos: MissingEos::Replace(-1.0), ..Default::default() };
        assert_eq!(replace.process(None, 3.0, false, len), -1.0);
        assert_eq!(replace.process(None, 3.0, true, len), 3.0);
    }

    #[test]
    fn overlong_shaping_is_dapo_s_linear_ramp_over_the_cache() {
        // DAPO eq. 13 with L_max = 20, L_cache = 4: 0 up to 16 tokens, then (16 − |y|) / 4
        let cfg = ScoreConfig { overlong_cache: Some(4), ..Default::default() };
        let dapo = |len: usize| if len <= 16 { 0.0 } else { (16.0 - len as f32) / 4.0 };
        for len in 0..=20 {
            assert_eq!(cfg.process(None, 1.0, true, (len, 20)), 1.0 + dapo(len), "|y| = {len}");
        }
        // after the missing-EOS rule: a truncated response at the limit loses both
        let both = ScoreConfig { missing_eos: MissingEos::Replace(-1.0), ..cfg };
        assert_eq!(both.process(None, 5.0, false, (20, 20)), -2.0);
        assert_eq!(ScoreConfig::default().process(None, 1.0, true, (20, 20)), 1.0);
    }
}
