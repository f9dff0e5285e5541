//! Direct preference optimisation losses over sequence log-prob sums
//! (`../shared/docs/rlhf-formulas.md` §1.11; fixtures `shared/fixtures/preference`): DPO,
//! conservative DPO, TRL's robust DPO, hinge (SLiC), IPO and KTO, each with its gradient with
//! respect to the policy's log-probs.

use serde::{Deserialize, Serialize};

use super::{log_sigmoid, sigmoid};

/// The loss: the pairwise DPO family (through [`dpo_loss`]) or unpaired KTO (through
/// [`kto_loss`]). Parameters left out take the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DpoLoss {
    /// `−log σ(β·h)` (Rafailov et al. 2023, Eq. 7).
    Sigmoid {},
    /// Conservative DPO: `−(1−ε)·log σ(β·h) − ε·log σ(−β·h)` (labels flipped with prob. ε).
    Cdpo {
        /// ε. Default `0.1`.
        #[serde(default = "default_smoothing")]
        label_smoothing: f64,
    },
    /// TRL's robust DPO: `(−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε)`.
    Robust {
        /// ε. Default `0.1`.
        #[serde(default = "default_smoothing")]
        label_smoothing: f64,
    },
    /// `max(0, 1 − β·h)` (SLiC-style hinge).
    Hinge {},
    /// IPO (Azar et al. 2023): `(h̄ − 1/(2τ))²` with per-token averaged log-ratios, τ = `tau`.
    Ipo {
        /// τ. Default `0.1`.
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// SimPO (Meng et al. 2024, eq. 6), reference-free:
    /// `−log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)`, γ = `gamma` (TRL's
    /// `simpo_gamma`). The paper's β is larger than DPO's (2–2.5).
    Simpo {
        /// γ, the target reward margin. Default `0.5` (TRL).
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
    /// ORPO (Hong et al. 2024, eq. 6–7), reference-free, with β as its λ:
    /// `NLL(y_w) − β·log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x))`, where
    /// `odds(y|x) = P/(1 − P)` with `P = exp(mean token log π_θ(y|x))`, and the NLL is the mean
    /// over the batch's chosen tokens (TRL's `ORPOTrainer`).
    Orpo {},
    /// KTO (Ethayarajh et al. 2024) on unpaired `{prompt, completion, label}` examples (pairs
    /// are unpaired: chosen desirable, rejected undesirable); see [`kto_loss`].
    Kto {
        /// `λ_D`. Default `1.0`.
        #[serde(default = "one")]
        desirable_weight: f64,
        /// `λ_U`. Default `1.0`.
        #[serde(default = "one")]
        undesirable_weight: f64,
    },
}

impl DpoLoss {
    /// The variant's config name.
    pub fn name(&self) -> &'static str {
        match self {
            DpoLoss::Sigmoid {} => "sigmoid",
            DpoLoss::Cdpo { .. } => "cdpo",
            DpoLoss::Robust { .. } => "robust",
            DpoLoss::Hinge {} => "hinge",
            DpoLoss::Ipo { .. } => "ipo",
            DpoLoss::Simpo { .. } => "simpo",
            DpoLoss::Orpo {} => "orpo",
            DpoLoss::Kto { .. } => "kto",
        }
    }

    /// Whether the loss leaves the reference model out (SimPO, ORPO): its sequence log-probs
    /// are then never computed.
    pub fn reference_free(&self) -> bool {
        matches!(self, DpoLoss::Simpo { .. } | DpoLoss::Orpo {})
    }
}

fn default_gamma() -> f64 {
    0.5
}

fn default_smoothing() -> f64 {
    0.1
}
fn default_tau() -> f64 {
    0.1
}
fn one() -> f64 {
    1.0
}

/// Sequence log-prob sums of a batch of pairs, and their token counts.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps<'a> {
    /// log π_θ(y_w|x).
    pub policy_chosen: &'a [f64],
    /// log π_θ(y_l|x).
    pub policy_rejected: &'a [f64],
    /// log π_ref(y_w|x).
    pub ref_chosen: &'a [f64],
    /// log π_ref(y_l|x).
    pub ref_rejected: &'a [f64],
    /// Tokens in each chosen sum.
    pub chosen_tokens: &'a [usize],
    /// Tokens in each rejected sum.
    pub rejected_tokens: &'a [usize],
}

/// A pairwise loss, its gradients and TRL's implicit rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoOutput {
    /// Mean of `per_pair_loss`.
    pub loss: f64,
    /// Loss of each pair.
    pub per_pair_loss: Vec<f64>,
    /// `∂loss/∂ log π_θ(y_w|x)` per pair.
    pub d_policy_chosen: Vec<f64>,
    /// `∂loss/∂ log π_θ(y_l|x)` per pair.
    pub d_policy_rejected: Vec<f64>,
    /// `β·(log π_θ − log π_ref)(y_w)`; reference-free losses: `β·log π_θ(y_w|x)/|y_w|` (TRL's).
    pub chosen_rewards: Vec<f64>,
    /// `β·(log π_θ − log π_ref)(y_l)`; reference-free losses: `β·log π_θ(y_l|x)/|y_l|`.
    pub rejected_rewards: Vec<f64>,
}

/// The DPO family on a batch: with `h = (log π_θ/π_ref)(y_w) − (log π_θ/π_ref)(y_l)`, each
/// pairwise variant of [`DpoLoss`], averaged over pairs (ORPO's NLL term over the batch's
/// chosen tokens). The implicit rewards always use `beta`. The reference-free variants ignore
/// `ref_chosen` and `ref_rejected`.
///
/// # Panics
/// If the slices' lengths differ, or for [`DpoLoss::Kto`], which is not pairwise (its batches
/// are [`KtoBatch`]es: use [`kto_loss`]).
pub fn dpo_loss(x: PairLogps<'_>, beta: f64, variant: DpoLoss) -> DpoOutput {
    let n = x.policy_chosen.len();
    for len in [
        x.policy_rejected.len(),
        x.ref_chosen.len(),
        x.ref_rejected.len(),
        x.chosen_tokens.len(),
        x.rejected_tokens.len(),
    ] {
        assert_eq!(len, n, "dpo_loss: one entry per pair in every slice");
    }
    let mut out = DpoOutput {
        loss: 0.0,
        per_pair_loss: vec![],
        d_policy_chosen: vec![],
        d_policy_rejected: vec![],
        chosen_rewards: vec![],
        rejected_rewards: vec![],
    };
    let chosen_tokens = x.chosen_tokens.iter().map(|&t| t.max(1)).sum::<usize>() as f64;
    for i in 0..n {
        if variant.reference_free() {
            let (nc, nr) = (x.chosen_tokens[i].max(1) as f64, x.rejected_tokens[i].max(1) as f64);
            let chosen = (x.policy_chosen[i], nc);
            let (l, dc, dr) =
                reference_free(variant, beta, chosen, (x.policy_rejected[i], nr), n as f64 / chosen_tokens);
            out.loss += l / n as f64;
            out.per_pair_loss.push(l);
            out.d_policy_chosen.push(dc / n as f64);
            out.d_policy_rejected.push(dr / n as f64);
            out.chosen_rewards.push(beta * x.policy_chosen[i] / nc);
            out.rejected_rewards.push(beta * x.policy_rejected[i] / nr);
            continue;
        }
        let chosen_logratio = x.policy_chosen[i] - x.ref_chosen[i];
        let rejected_logratio = x.policy_rejected[i] - x.ref_rejected[i];
        let h = beta * (chosen_logratio - rejected_logratio);
        // (loss, ∂loss/∂chosen_logratio, ∂loss/∂rejected_logratio)
        let (l, dc, dr) = match variant {
            DpoLoss::Sigmoid {} => (-log_sigmoid(h), -beta * sigmoid(-h), beta * sigmoid(-h)),
            DpoLoss::Cdpo { label_smoothing: e } => {
                let l = -(1.0 - e) * log_sigmoid(h) - e * log_sigmoid(-h);
                let g = -beta * ((1.0 - e) * sigmoid(-h) - e * sigmoid(h));
                (l, g, -g)
            }
            DpoLoss::Robust { label_smoothing: e } => {
                let l = (-(1.0 - e) * log_sigmoid(h) + e * log_sigmoid(-h)) / (1.0 - 2.0 * e);
                let g = beta * (-(1.0 - e) * sigmoid(-h) - e * sigmoid(h)) / (1.0 - 2.0 * e);
                (l, g, -g)
            }
            DpoLoss::Hinge {} => {
                let g = if h < 1.0 { -beta } else { 0.0 };
                ((1.0 - h).max(0.0), g, -g)
            }
            DpoLoss::Ipo { tau } => {
                let (nc, nr) = (x.chosen_tokens[i].max(1) as f64, x.rejected_tokens[i].max(1) as f64);
                let d = chosen_logratio / nc - rejected_logratio / nr - 1.0 / (2.0 * tau);
                (d * d, 2.0 * d / nc, -2.0 * d / nr)
            }
            DpoLoss::Simpo { .. } | DpoLoss::Orpo {} => unreachable!("reference-free losses are above"),
            DpoLoss::Kto { .. } => panic!("dpo_loss: KTO is not a pairwise loss, use kto_loss"),
        };
        out.loss += l / n as f64;
        out.per_pair_loss.push(l);
        out.d_policy_chosen.push(dc / n as f64);
        out.d_policy_rejected.push(dr / n as f64);
        out.chosen_rewards.push(beta * chosen_logratio);
        out.rejected_rewards.push(beta * rejected_logratio);
    }
    out
}

/// One pair's SimPO or ORPO loss and its gradients with respect to `log π_θ(y_w|x)` and
/// `log π_θ(y_l|x)`, from each sum and its token count; `nll_share` is ORPO's weight of the
/// chosen sum in the batch's NLL (pairs / chosen tokens), so the pairs' mean is the NLL.
fn reference_free(
    variant: DpoLoss,
    beta: f64,
    (sc, nc): (f64, f64),
    (sr, nr): (f64, f64),
    nll_share: f64,
) -> (f64, f64, f64) {
    let (ac, ar) = (sc / nc, sr / nr);
    match variant {
        DpoLoss::Simpo { gamma } => {
            let h = beta * (ac - ar) - gamma;
            let g = beta * sigmoid(-h);
            (-log_sigmoid(h), -g / nc, g / nr)
        }
        DpoLoss::Orpo {} => {
            // log odds = a − log(1 − e^a), whose derivative is 1/(1 − e^a)
            let log_odds = |a: f64| a - (-a.exp()).ln_1p();
            let z = log_odds(ac) - log_odds(ar);
            let g = beta * sigmoid(-z);
            let l = -sc * nll_share - beta * log_sigmoid(z);
            (l, -g / (1.0 - ac.exp()) / nc - nll_share, g / (1.0 - ar.exp()) / nr)
        }
        _ => unreachable!("reference_free: {variant:?} uses the reference"),
    }
}

/// Unpaired examples for KTO: sequence log-prob sums of each (prompt, completion) and of the
/// mismatched pair (prompt i, completion i−1) that estimates the reference point.
#[derive(Debug, Clone, Copy)]
pub struct KtoBatch<'a> {
    /// `true` = desirable.
    pub labels: &'a [bool],
    /// log π_θ(y|x).
    pub policy_logps: &'a [f64],
    /// log π_ref(y|x).
    pub ref_logps: &'a [f64],
    /// log π_θ of the mismatched completions.
    pub policy_kl_logps: &'a [f64],
    /// log π_ref of the mismatched completions.
    pub ref_kl_logps: &'a [f64],
}

/// KTO's loss, its gradient with respect to `policy_logps`, and the reference point.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoOutput {
    /// Mean of `per_example_loss` over all examples.
    pub loss: f64,
    /// Weighted loss of each example.
    pub per_example_loss: Vec<f64>,
    /// `∂loss/∂ log π_θ(y|x)`.
    pub d_policy: Vec<f64>,
    /// `z₀ = max(0, mean(policy_kl_logps − ref_kl_logps))`, detached.
    pub z0: f64,
    /// The mean before the clamp.
    pub kl_mean_unclamped: f64,
    /// `β·(log π_θ − log π_ref)` per example.
    pub rewards: Vec<f64>,
}

/// KTO (Ethayarajh et al. 2024, as TRL's `KTOTrainer` computes it): with
/// `r = log π_θ/π_ref`, desirable examples cost `w_d·(1 − σ(β(r − z₀)))`, undesirable ones
/// `w_u·(1 − σ(β(z₀ − r)))`; the mean is over all examples; z₀ gets no gradient.
pub fn kto_loss(x: KtoBatch<'_>, beta: f64, desirable_weight: f64, undesirable_weight: f64) -> KtoOutput {
    let n = x.labels.len();
    let kl_mean_unclamped =
        x.policy_kl_logps.iter().zip(x.ref_kl_logps).map(|(p, r)| p - r).sum::<f64>() / n.max(1) as f64;
    let z0 = kl_mean_unclamped.max(0.0);
    let mut out =
        KtoOutput { loss: 0.0, per_example_loss: vec![], d_policy: vec![], z0, kl_mean_unclamped, rewards: vec![] };
    for i in 0..n {
        let logratio = x.policy_logps[i] - x.ref_logps[i];
        let (l, g) = if x.labels[i] {
            let s = sigmoid(beta * (logratio - z0));
            (desirable_weight * (1.0 - s), -desirable_weight * beta * s * (1.0 - s))
        } else {
            let s = sigmoid(beta * (z0 - logratio));
            (undesirable_weight * (1.0 - s), undesirable_weight * beta * s * (1.0 - s))
        };
        out.loss += l / n as f64;
        out.per_example_loss.push(l);
        out.d_policy.push(g / n as f64);
        out.rewards.push(beta * logratio);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs<'a>(c: &'a [f64], r: &'a [f64], rc: &'a [f64], rr: &'a [f64], t: &'a [usize]) -> PairLogps<'a> {
        PairLogps {
            policy_chosen: c,
            policy_rejected: r,
            ref_chosen: rc,
            ref_rejected: rr,
            chosen_tokens: t,
            rejected_tokens: t,
        }
    }

    #[test]
    fn with_the_policy_at_the_reference_dpo_is_log_2_and_rewards_are_zero() {
        let lp = [-3.0, -7.5];
        let out = dpo_loss(pairs(&lp, &lp, &lp, &lp, &[3, 4]), 0.1, DpoLoss::Sigmoid {});
        assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-12);
        assert!(out.chosen_rewards.iter().chain(&out.rejected_rewards).all(|&r| r == 0.0));
    }

    #[test]
    fn the_dpo_gradient_is_the_closed_form() {
        // ∂L/∂h_logratio = −β·σ(−β·h) for one pair
        let (beta, c, r) = (0.3, [-2.0], [-4.5]);
        let out = dpo_loss(pairs(&c, &r, &[-2.5], &[-3.0], &[1]), beta, DpoLoss::Sigmoid {});
        let h = (c[0] - -2.5) - (r[0] - -3.0);
        assert!((out.d_policy_chosen[0] - (-beta * sigmoid(-beta * h))).abs() < 1e-12);
        assert!((out.d_policy_rejected[0] - beta * sigmoid(-beta * h)).abs() < 1e-12);
    }

    #[test]
    fn simpo_and_orpo_are_their_closed_forms_without_a_reference() {
        // y_w: sum −2 over 2 tokens (mean −1); y_l: sum −6 over 3 tokens (mean −2); the
        // reference values are garbage that must not matter
        let x = PairLogps {
            policy_chosen: &[-2.0],
            policy_rejected: &[-6.0],
            ref_chosen: &[123.0],
            ref_rejected: &[-77.0],
            chosen_tokens: &[2],
            rejected_tokens: &[3],
        };
        let simpo = dpo_loss(x, 2.0, DpoLoss::Simpo { gamma: 0.5 });
        let want = (1.0 + (-(2.0 * (-1.0 - -2.0) - 0.5f64)).exp()).ln();
        assert!((simpo.loss - want).abs() < 1e-12, "{} vs {want}", simpo.loss);
        assert_eq!((simpo.chosen_rewards[0], simpo.rejected_rewards[0]), (-2.0, -4.0), "β × mean log-prob");
        let odds = |a: f64| a.exp() / (1.0 - a.exp());
        let ratio = (odds(-1.0) / odds(-2.0)).ln();
        let want = 1.0 + 0.1 * (1.0 + (-ratio).exp()).ln(); // NLL −(−2)/2, then −λ·log σ
        let orpo = dpo_loss(x, 0.1, DpoLoss::Orpo {});
        assert!((orpo.loss - want).abs() < 1e-12, "{} vs {want}", orpo.loss);
        // equal means and γ = 0: log 2, as DPO at the reference
        let same = PairLogps { policy_rejected: &[-3.0], rejected_tokens: &[3], ..x };
        assert!((dpo_loss(same, 2.0, DpoLoss::Simpo { gamma: 0.0 }).loss - std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn every_gradient_matches_finite_differences() {
        let (c, r, rc, rr, t) =
            ([-5.0, -9.0, -3.0], [-6.0, -8.0, -7.0], [-5.5, -8.0, -3.5], [-5.0, -9.5, -6.0], [4usize, 7, 2]);
        let variants = [
            DpoLoss::Sigmoid {},
            DpoLoss::Cdpo { label_smoothing: 0.1 },
            DpoLoss::Robust { label_smoothing: 0.1 },
            DpoLoss::Hinge {},
            DpoLoss::Ipo { tau: 0.1 },
            DpoLoss::Simpo { gamma: 0.5 },
            DpoLoss::Orpo {},
        ];
        let h = 1e-6;
        for v in variants {
            let out = dpo_loss(pairs(&c, &r, &rc, &rr, &t), 0.5, v);
            for i in 0..3 {
                let (mut up, mut dn) = (c, c);
                up[i] += h;
                dn[i] -= h;
                let fd = (dpo_loss(pairs(&up, &r, &rc, &rr, &t), 0.5, v).loss
                    - dpo_loss(pairs(&dn, &r, &rc, &rr, &t), 0.5, v).loss)
                    / (2.0 * h);
                assert!(
                    (fd - out.d_policy_chosen[i]).abs() < 1e-6,
                    "{v:?} chosen {i}: {fd} vs {}",
                    out.d_policy_chosen[i]
                );
                let (mut up, mut dn) = (r, r);
                up[i] += h;
                dn[i] -= h;
                let fd = (dpo_loss(pairs(&c, &up, &rc, &rr, &t), 0.5, v).loss
                    - dpo_loss(pairs(&c, &dn, &rc, &rr, &t), 0.5, v).loss)
                    / (2.0 * h);
                assert!((fd - out.d_policy_rejected[i]).abs() < 1e-6, "{v:?} rejected {i}");
            }
        }
        let labels = [true, false, true];
        let kto = |p: &[f64]| {
            kto_loss(
                KtoBatch { labels: &labels, policy_logps: p, ref_logps: &rc, policy_kl_logps: &rr, ref_kl_logps: &r },
                0.5,
                1.0,
                1.3,
            )
        };
        let out = kto(&c);
        for i in 0..3 {
            let (mut up, mut dn) = (c, c);
            up[i] += h;
            dn[i] -= h;
            let fd = (kto(&up).loss - kto(&dn).loss) / (2.0 * h);
            assert!((fd - out.d_policy[i]).abs() < 1e-6, "kto {i}");
        }
    }
}
