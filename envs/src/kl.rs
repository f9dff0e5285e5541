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
            KlEstimator::K1 => -log_r,
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
    /// The terminal reward for a raw score of a response of `len` tokens (the limit being
    /// `max_len`) that did or did not end with EOS.
    pub fn process(&self, raw: f32, has_eos: bool, (len, max_len): (usize, usize)) -> f32 {
        let s = self.process_score(raw, has_eos);
        match self.overlong_cache {
            Some(cache) if cache > 0 && len + cache > max_len => {
                let over = (len + cache - max_len).min(cache);
                s - over as f32 / cache as f32
            }
            _ => s,
        }
    }

    /// Normalisation, clipping and the missing-EOS rule.
    fn process_score(&self, raw: f32, has_eos: bool) -> f32 {
        let mut s = raw;
        if let Some(n) = self.normalize {
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
                prop_assert_eq!(e.estimate(lp, lp), 0.0);
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

    #[test]
    fn score_processing_order() {
        let cfg = ScoreConfig {
            normalize: Some(ScoreNorm { mean: 1.0, std: 2.0 }),
            clip: Some(1.0),
            missing_eos: MissingEos::Subtract(0.5),
            overlong_cache: None,
        };
        let len = (3, 64);
        assert_eq!(cfg.process(2.0, true, len), 0.5);
        assert_eq!(cfg.process(9.0, true, len), 1.0);
        assert_eq!(cfg.process(9.0, false, len), 0.5);
        let replace = ScoreConfig { missing_eos: MissingEos::Replace(-1.0), ..Default::default() };
        assert_eq!(replace.process(3.0, false, len), -1.0);
        assert_eq!(replace.process(3.0, true, len), 3.0);
    }

    #[test]
    fn overlong_shaping_is_dapo_s_linear_ramp_over_the_cache() {
        // DAPO eq. 13 with L_max = 20, L_cache = 4: 0 up to 16 tokens, then (16 − |y|) / 4
        let cfg = ScoreConfig { overlong_cache: Some(4), ..Default::default() };
        let dapo = |len: usize| if len <= 16 { 0.0 } else { (16.0 - len as f32) / 4.0 };
        for len in 0..=20 {
            assert_eq!(cfg.process(1.0, true, (len, 20)), 1.0 + dapo(len), "|y| = {len}");
        }
        // after the missing-EOS rule: a truncated response at the limit loses both
        let both = ScoreConfig { missing_eos: MissingEos::Replace(-1.0), ..cfg };
        assert_eq!(both.process(5.0, false, (20, 20)), -2.0);
        assert_eq!(ScoreConfig::default().process(1.0, true, (20, 20)), 1.0);
    }
}
