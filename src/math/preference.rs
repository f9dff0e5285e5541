//! Preference losses over per-sequence scalars.

use super::{log_sigmoid, sigmoid};

/// The Bradley–Terry loss of a batch of comparisons and its gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct BradleyTerry {
    /// The weighted loss `L`.
    pub loss: f64,
    /// `−log σ(r_c − r_r − m)` per pair (before weights).
    pub per_pair_loss: Vec<f64>,
    /// `∂L/∂r_c` per pair.
    pub d_chosen: Vec<f64>,
    /// `∂L/∂r_r` per pair.
    pub d_rejected: Vec<f64>,
}

/// Bradley–Terry reward-model loss (Ouyang et al. 2022, InstructGPT Eq. 1; Stiennon et al.
/// 2020 Eq. 1), with TRL's optional margin and centering term:
///
/// ```text
/// L = Σ_p w_p · [ −log σ(r_c,p − r_r,p − m_p) + η · (r_c,p + r_r,p)² ]
/// ```
///
/// With `w_p = 1/P` this is TRL's `RewardTrainer` loss (mean over pairs; `η` is
/// `center_rewards_coefficient`). A K-way ranking contributes its C(K,2) pairs with weights
/// summing to its share of the batch — InstructGPT trains on all pairs of one prompt as a
/// single batch element. `margins` may be empty (no margin).
///
/// # Panics
/// If the slices' lengths differ.
pub fn bradley_terry_loss(
    rewards_chosen: &[f64],
    rewards_rejected: &[f64],
    margins: &[f64],
    weights: &[f64],
    center_coef: f64,
) -> BradleyTerry {
    let n = rewards_chosen.len();
    assert!(rewards_rejected.len() == n && weights.len() == n, "bradley_terry_loss: one reward pair per weight");
    assert!(margins.is_empty() || margins.len() == n, "bradley_terry_loss: one margin per pair");
    let mut out = BradleyTerry {
        loss: 0.0,
        per_pair_loss: Vec::with_capacity(n),
        d_chosen: Vec::with_capacity(n),
        d_rejected: Vec::with_capacity(n),
    };
    for p in 0..n {
        let (r_c, r_r, w) = (rewards_chosen[p], rewards_rejected[p], weights[p]);
        let z = r_c - r_r - margins.get(p).copied().unwrap_or(0.0);
        let pair_loss = -log_sigmoid(z);
        let center = center_coef * (r_c + r_r).powi(2);
        out.loss += w * (pair_loss + center);
        out.per_pair_loss.push(pair_loss);
        // d(−log σ(z))/dz = σ(z) − 1;  d(η(r_c + r_r)²)/dr = 2η(r_c + r_r)
        let d_center = 2.0 * center_coef * (r_c + r_r);
        out.d_chosen.push(w * (sigmoid(z) - 1.0 + d_center));
        out.d_rejected.push(w * (1.0 - sigmoid(z) + d_center));
    }
    out
}

/// What a reward model's comparisons look like, as TRL logs them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PreferenceStats {
    /// `mean(r_c > r_r)`, strict: a tie counts as wrong.
    pub accuracy: f64,
    /// `mean(r_c − r_r)`.
    pub margin_mean: f64,
    /// Mean of all chosen and rejected rewards.
    pub reward_mean: f64,
    /// Population standard deviation of all chosen and rejected rewards.
    pub reward_std: f64,
    /// Smallest reward.
    pub reward_min: f64,
    /// Largest reward.
    pub reward_max: f64,
    /// `mean((r_c + r_r)²)`, the centering penalty.
    pub center_penalty: f64,
}

/// [`PreferenceStats`] of `pairs` comparisons (unweighted, one entry per pair).
///
/// # Panics
/// If the slices are empty or of different lengths.
pub fn preference_stats(rewards_chosen: &[f64], rewards_rejected: &[f64]) -> PreferenceStats {
    let n = rewards_chosen.len();
    assert!(n > 0 && rewards_rejected.len() == n, "preference_stats: equal, non-empty reward slices");
    let all: Vec<f64> = rewards_chosen.iter().chain(rewards_rejected).copied().collect();
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let var = all.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / all.len() as f64;
    let pairs = rewards_chosen.iter().zip(rewards_rejected);
    PreferenceStats {
        accuracy: pairs.clone().filter(|(c, r)| c > r).count() as f64 / n as f64,
        margin_mean: pairs.clone().map(|(c, r)| c - r).sum::<f64>() / n as f64,
        reward_mean: mean,
        reward_std: var.sqrt(),
        reward_min: all.iter().copied().fold(f64::INFINITY, f64::min),
        reward_max: all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        center_penalty: pairs.map(|(c, r)| (c + r).powi(2)).sum::<f64>() / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The analytic gradient equals central finite differences of the loss.
        #[test]
        fn gradient_matches_finite_differences(
            pairs in proptest::collection::vec((-4.0f64..4.0, -4.0f64..4.0, 0.0f64..1.0, 0.1f64..1.0), 1..6),
            eta in 0.0f64..0.1,
        ) {
            let rc: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let rr: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            let m: Vec<f64> = pairs.iter().map(|p| p.2).collect();
            let w: Vec<f64> = pairs.iter().map(|p| p.3).collect();
            let out = bradley_terry_loss(&rc, &rr, &m, &w, eta);
            let h = 1e-6;
            for p in 0..rc.len() {
                let (mut up, mut dn) = (rc.clone(), rc.clone());
                up[p] += h;
                dn[p] -= h;
                let fd = (bradley_terry_loss(&up, &rr, &m, &w, eta).loss - bradley_terry_loss(&dn, &rr, &m, &w, eta).loss) / (2.0 * h);
                prop_assert!((fd - out.d_chosen[p]).abs() < 1e-6);
                let (mut up, mut dn) = (rr.clone(), rr.clone());
                up[p] += h;
                dn[p] -= h;
                let fd = (bradley_terry_loss(&rc, &up, &m, &w, eta).loss - bradley_terry_loss(&rc, &dn, &m, &w, eta).loss) / (2.0 * h);
                prop_assert!((fd - out.d_rejected[p]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn a_confident_correct_pair_costs_almost_nothing() {
        let out = bradley_terry_loss(&[30.0], &[-30.0], &[], &[1.0], 0.0);
        assert!(out.loss < 1e-20 && out.loss >= 0.0);
        let out = bradley_terry_loss(&[-400.0], &[400.0], &[], &[1.0], 0.0);
        assert!((out.loss - 800.0).abs() < 1e-9 && (out.d_chosen[0] + 1.0).abs() < 1e-12);
    }
}
