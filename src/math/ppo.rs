//! PPO's scalar math (`../shared/docs/rlhf-formulas.md` §1; fixtures `shared/fixtures/ppo`):
//! GAE, whitening, the clipped policy and value losses with their gradients, and the
//! adaptive KL controller. Per-token inputs are the **valid** tokens only (response tokens up
//! to and including EOS), so every mean here is the masked mean of the write-ups.

use serde::{Deserialize, Serialize};

/// Generalised advantage estimation over one response (Schulman et al. 2016, Eq. 16):
///
/// ```text
/// δ_t = r_t + γ·V_{t+1} − V_t,    A_t = δ_t + γλ·A_{t+1},    returns_t = A_t + V_t
/// ```
///
/// `next_value` is `V` after the last token: `0` when the episode terminated (EOS — and, by
/// the RLHF convention the fixtures follow, also at truncation), or a bootstrap value.
/// Returns `(advantages, returns)`.
pub fn gae(rewards: &[f32], values: &[f32], next_value: f32, gamma: f32, lam: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len(), "gae: one value per reward");
    let n = rewards.len();
    let mut advantages = vec![0.0f32; n];
    let mut last = 0.0f32;
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] } else { next_value };
        let delta = rewards[t] + gamma * next_v - values[t];
        last = delta + gamma * lam * last;
        advantages[t] = last;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Whitening over all given entries: `(x − mean) / √(var + eps)`, with the unbiased (Bessel,
/// TRL's `masked_whiten`) or the biased variance; `shift_mean = false` adds the mean back.
pub fn whiten(x: &[f32], unbiased: bool, eps: f64, shift_mean: bool) -> Vec<f32> {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let mut var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    if unbiased && x.len() > 1 {
        var *= n / (n - 1.0);
    }
    let scale = 1.0 / (var + eps).sqrt();
    x.iter()
        .map(|&v| {
            let w = (v as f64 - mean) * scale;
            (if shift_mean { w } else { w + mean }) as f32
        })
        .collect()
}

/// The clipped policy loss, its gradient with respect to the new log-probs, and diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyLoss {
    /// `Σ max(pg_losses, pg_losses2) / denom`.
    pub loss: f64,
    /// `∂loss/∂logprobs`.
    pub grad: Vec<f64>,
    /// Fraction of tokens where the clipped branch is larger (strict).
    pub clipfrac: f64,
    /// Mean ratio.
    pub ratio_mean: f64,
    /// Variance of the ratio.
    pub ratio_var: f64,
    /// `½·mean((logprobs − old_logprobs)²)`.
    pub approx_kl: f64,
}

/// PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise:
///
/// ```text
/// ratio = exp(logprobs − old_logprobs)
/// pg_losses  = −A·ratio,   pg_losses2 = −A·clip(ratio, 1 − ε, 1 + ε)
/// L = Σ_t max(pg_losses, pg_losses2) / denom
/// ```
///
/// The sum is divided by `denom`: the slice length for a plain masked mean, or the share of a
/// minibatch's token count that a micro-batch's loss stands for. The statistics are over the
/// slice.
pub fn ppo_policy_loss(
    logprobs: &[f32],
    old_logprobs: &[f32],
    advantages: &[f32],
    cliprange: f64,
    denom: f64,
) -> PolicyLoss {
    let n = logprobs.len();
    assert!(old_logprobs.len() == n && advantages.len() == n, "ppo_policy_loss: equal lengths");
    let mut out = PolicyLoss {
        loss: 0.0,
        grad: Vec::with_capacity(n),
        clipfrac: 0.0,
        ratio_mean: 0.0,
        ratio_var: 0.0,
        approx_kl: 0.0,
    };
    let mut ratios = Vec::with_capacity(n);
    for t in 0..n {
        let logratio = logprobs[t] as f64 - old_logprobs[t] as f64;
        let ratio = logratio.exp();
        let adv = advantages[t] as f64;
        let pg_losses = -adv * ratio;
        let clipped = ratio.clamp(1.0 - cliprange, 1.0 + cliprange);
        let pg_losses2 = -adv * clipped;
        out.loss += pg_losses.max(pg_losses2) / denom;
        // the clipped branch has no gradient once the ratio is outside [1 − ε, 1 + ε]
        let g = if pg_losses2 > pg_losses && clipped != ratio { 0.0 } else { -adv * ratio };
        out.grad.push(g / denom);
        out.clipfrac += f64::from(u8::from(pg_losses2 > pg_losses));
        out.approx_kl += 0.5 * logratio * logratio;
        ratios.push(ratio);
    }
    let nf = n.max(1) as f64;
    out.clipfrac /= nf;
    out.approx_kl /= nf;
    out.ratio_mean = ratios.iter().sum::<f64>() / nf;
    out.ratio_var = ratios.iter().map(|r| (r - out.ratio_mean).powi(2)).sum::<f64>() / nf;
    out
}

/// The clipped value loss and its gradient with respect to the new values.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueLoss {
    /// `½·Σ max(vf_losses1, vf_losses2) / denom`.
    pub loss: f64,
    /// `∂loss/∂values`.
    pub grad: Vec<f64>,
    /// Fraction of tokens where the clipped branch is larger (strict).
    pub clipfrac: f64,
}

/// PPO's clipped value loss (the OpenAI baselines / TRL form):
///
/// ```text
/// v_clipped = V_old + clip(V − V_old, −ε_v, ε_v)
/// L_V = ½ · Σ_t max((V − R)², (v_clipped − R)²) / denom
/// ```
/// (`denom` as in [`ppo_policy_loss`].)
pub fn ppo_value_loss(
    values: &[f32],
    old_values: &[f32],
    returns: &[f32],
    cliprange_value: f64,
    denom: f64,
) -> ValueLoss {
    let n = values.len();
    assert!(old_values.len() == n && returns.len() == n, "ppo_value_loss: equal lengths");
    let mut out = ValueLoss { loss: 0.0, grad: Vec::with_capacity(n), clipfrac: 0.0 };
    for t in 0..n {
        let (v, v_old, ret) = (values[t] as f64, old_values[t] as f64, returns[t] as f64);
        let step = v - v_old;
        let v_clipped = v_old + step.clamp(-cliprange_value, cliprange_value);
        let (l1, l2) = ((v - ret).powi(2), (v_clipped - ret).powi(2));
        out.loss += 0.5 * l1.max(l2) / denom;
        let g = if l2 > l1 {
            // d/dv of the clipped branch: 1 inside the clip range, 0 outside
            if step.abs() < cliprange_value {
                v_clipped - ret
            } else {
                0.0
            }
        } else {
            v - ret
        };
        out.grad.push(g / denom);
        out.clipfrac += f64::from(u8::from(l2 > l1));
    }
    out.clipfrac /= n.max(1) as f64;
    out
}

/// `1 − Var(returns − values) / Var(returns)` (NaN when the returns are constant).
pub fn explained_variance(values: &[f32], returns: &[f32]) -> f64 {
    let var = |x: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = x.collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / v.len() as f64
    };
    let var_y = var(&mut returns.iter().map(|&r| r as f64));
    let var_diff = var(&mut returns.iter().zip(values).map(|(&r, &v)| r as f64 - v as f64));
    1.0 - var_diff / var_y
}

/// Entropy of `softmax(logits)`: `logsumexp(l) − Σ_v softmax(l)_v·l_v`.
pub fn entropy(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + z.ln();
    lse - logits.iter().map(|&l| (l as f64 - max).exp() / z * l as f64).sum::<f64>()
}

/// The per-token KL term `k(t)` of PPO's reward: one of Schulman's estimators from the sampled
/// token's log-probs (`k1` = log π/π_ref, `k2`, `k3`, `abs`; see `rlhf_envs::KlEstimator`), or
/// `full`, the exact `KL(π(·|s_t) ‖ π_ref(·|s_t))` over the vocabulary ([`full_kl`]; TRL's
/// `kl_penalty = "full"`): never negative, with no sampling noise, at the cost of both
/// models' logits at every response token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlPenalty {
    /// `log π − log π_ref` of the sampled token (InstructGPT's).
    #[default]
    K1,
    /// `½(log π_ref − log π)²`.
    K2,
    /// `(ρ − 1) − log ρ`, `ρ = π_ref/π`.
    K3,
    /// `|log π − log π_ref|`.
    Abs,
    /// The exact KL over the vocabulary.
    Full,
}

impl KlPenalty {
    /// The sampled-token estimator, `None` for `Full`.
    pub fn sampled(self) -> Option<rlhf_envs::KlEstimator> {
        match self {
            KlPenalty::K1 => Some(rlhf_envs::KlEstimator::K1),
            KlPenalty::K2 => Some(rlhf_envs::KlEstimator::K2),
            KlPenalty::K3 => Some(rlhf_envs::KlEstimator::K3),
            KlPenalty::Abs => Some(rlhf_envs::KlEstimator::Abs),
            KlPenalty::Full => None,
        }
    }
}

/// `KL(p ‖ q) = Σ_v p_v·(log p_v − log q_v)` for `p = softmax(policy_logits / T)` and
/// `q = softmax(ref_logits / T)`, in f64. Tokens with `−∞` policy logits (NLPO's masked ones)
/// have `p_v = 0` and add nothing.
pub fn full_kl(policy_logits: &[f32], ref_logits: &[f32], temperature: f32) -> f64 {
    assert_eq!(policy_logits.len(), ref_logits.len(), "full_kl: the two rows differ in length");
    let inv_t = 1.0 / temperature as f64;
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let z: Vec<f64> = row.iter().map(|&l| l as f64 * inv_t).collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        z.iter().map(|&x| x - lse).collect()
    };
    let (lp, lq) = (log_softmax(policy_logits), log_softmax(ref_logits));
    lp.iter().zip(&lq).filter(|(p, _)| p.is_finite()).map(|(&p, &q)| p.exp() * (p - q)).sum()
}

/// How β, the KL coefficient, evolves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum KlControl {
    /// β stays at its initial value. (Struct variants throughout: serde lets a unit variant of
    /// an internally tagged enum ignore unknown fields.)
    Fixed {},
    /// Ziegler et al. 2019 §2.2: `e = clip(KL/target − 1, −0.2, 0.2)` and
    /// `β ← β·(1 + K_β·e)`, where `K_β` is `k_beta` (paper form) or `n_steps/horizon` (the
    /// form in lm-human-preferences, TRL 0.x and OpenRLHF code; `n_steps` = rollouts per
    /// iteration).
    Adaptive {
        /// Target KL (in the unit of `PpoConfig::kl_unit`).
        target: f64,
        /// The gain.
        gain: AdaptiveGain,
    },
}

/// The gain of the adaptive controller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdaptiveGain {
    /// `K_β` fixed (the paper uses 0.1).
    Paper {
        /// `K_β`.
        k_beta: f64,
    },
    /// `K_β = n_steps / horizon`.
    Code {
        /// The horizon (10000 in lm-human-preferences).
        horizon: f64,
    },
}

/// The controller's state: β now (saved in checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    /// The rule.
    pub control: KlControl,
    /// Current β.
    pub beta: f64,
}

impl KlController {
    /// Starts at `beta0`.
    pub fn new(control: KlControl, beta0: f64) -> Self {
        KlController { control, beta: beta0 }
    }

    /// Updates β after observing `kl` over `n_steps` rollouts; returns the proportional error.
    pub fn update(&mut self, kl: f64, n_steps: usize) -> f64 {
        let KlControl::Adaptive { target, gain } = self.control else { return 0.0 };
        let e = (kl / target - 1.0).clamp(-0.2, 0.2);
        let k = match gain {
            AdaptiveGain::Paper { k_beta } => k_beta,
            AdaptiveGain::Code { horizon } => n_steps as f64 / horizon,
        };
        self.beta *= 1.0 + k * e;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_full_kl_is_nonnegative_zero_at_equality_and_the_expected_k1(
            pq in proptest::collection::vec((-4.0f32..4.0, -4.0f32..4.0), 2..40),
            t in 0.5f32..2.0,
        ) {
            let (p, q): (Vec<f32>, Vec<f32>) = pq.into_iter().unzip();
            let kl = full_kl(&p, &q, t);
            prop_assert!(kl >= -1e-12);
            prop_assert!(full_kl(&p, &p, t).abs() < 1e-12);
            // E_{a~p}[log p(a) − log q(a)], written out with the estimator the env uses
            let lsm = |row: &[f32]| -> Vec<f32> {
                let z: Vec<f32> = row.iter().map(|x| x / t).collect();
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
                z.iter().map(|x| x - lse).collect()
            };
            let (lp, lq) = (lsm(&p), lsm(&q));
            let expected_k1: f64 = (0..p.len())
                .map(|a| lp[a].exp() as f64 * rlhf_envs::KlEstimator::K1.estimate(lp[a], lq[a]) as f64)
                .sum();
            prop_assert!((kl - expected_k1).abs() < 1e-4 * (1.0 + kl));
        }
    }

    #[test]
    fn masked_policy_tokens_add_nothing_to_the_full_kl() {
        // p restricted to the first two tokens: KL of the renormalised distribution
        let (p, q) = ([1.0f32, 0.0, f32::NEG_INFINITY], [0.5f32, 0.5, 2.0]);
        let (p2, q3) = (softmax(&[1.0, 0.0]), softmax(&[0.5, 0.5, 2.0]));
        let want: f64 = (0..2).map(|i| p2[i] * (p2[i].ln() - q3[i].ln())).sum();
        assert!((full_kl(&p, &q, 1.0) - want).abs() < 1e-12);
    }

    fn softmax(x: &[f64]) -> Vec<f64> {
        let z: f64 = x.iter().map(|v| v.exp()).sum();
        x.iter().map(|v| v.exp() / z).collect()
    }

    fn discounted(r: &[f32], gamma: f32, next_value: f32, t: usize) -> f32 {
        let tail = r[t..].iter().enumerate().map(|(k, x)| gamma.powi(k as i32) * x).sum::<f32>();
        tail + gamma.powi((r.len() - t) as i32) * next_value
    }

    proptest! {
        #[test]
        fn gae_with_lambda_one_is_the_discounted_return_minus_v(
            rv in proptest::collection::vec((-2.0f32..2.0, -2.0f32..2.0), 1..12),
            gamma in 0.8f32..1.0,
            boot in -1.0f32..1.0,
        ) {
            let (r, v): (Vec<f32>, Vec<f32>) = rv.into_iter().unzip();
            let (a, ret) = gae(&r, &v, boot, gamma, 1.0);
            for t in 0..r.len() {
                prop_assert!((a[t] - (discounted(&r, gamma, boot, t) - v[t])).abs() < 1e-4);
                prop_assert!((ret[t] - discounted(&r, gamma, boot, t)).abs() < 1e-4);
            }
        }

        #[test]
        fn gae_with_lambda_zero_is_the_td_error(
            rv in proptest::collection::vec((-2.0f32..2.0, -2.0f32..2.0), 1..12),
            gamma in 0.8f32..1.0,
        ) {
            let (r, v): (Vec<f32>, Vec<f32>) = rv.into_iter().unzip();
            let (a, _) = gae(&r, &v, 0.0, gamma, 0.0);
            for t in 0..r.len() {
                let next = if t + 1 < r.len() { v[t + 1] } else { 0.0 };
                prop_assert!((a[t] - (r[t] + gamma * next - v[t])).abs() < 1e-5);
            }
        }

        #[test]
        fn a_terminal_step_cuts_the_bootstrap(
            rv in proptest::collection::vec((-2.0f32..2.0, -2.0f32..2.0), 1..10),
            boot in -3.0f32..3.0,
        ) {
            let (r, v): (Vec<f32>, Vec<f32>) = rv.into_iter().unzip();
            let n = r.len();
            let (terminal, _) = gae(&r, &v, 0.0, 0.99, 0.95);
            prop_assert!((terminal[n - 1] - (r[n - 1] - v[n - 1])).abs() < 1e-6);
            // a bootstrap value enters every advantage only through γ·V_next, decayed by (γλ)^k
            let (boot_a, _) = gae(&r, &v, boot, 0.99, 0.95);
            for t in 0..n {
                let want = 0.99f32 * boot * (0.99f32 * 0.95).powi((n - 1 - t) as i32);
                prop_assert!((boot_a[t] - terminal[t] - want).abs() < 1e-4);
            }
        }

        #[test]
        fn whitening_gives_mean_zero_and_std_one(x in proptest::collection::vec(-10.0f32..10.0, 3..40)) {
            prop_assume!(x.iter().any(|&v| (v - x[0]).abs() > 1e-2));
            let w = whiten(&x, false, 0.0, true);
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            prop_assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3);
        }

        #[test]
        fn loss_gradients_match_finite_differences(
            xs in proptest::collection::vec((-1.0f32..1.0, -0.5f32..0.5, -2.0f32..2.0), 1..8),
        ) {
            let lp: Vec<f32> = xs.iter().map(|x| x.0 - 2.0).collect();
            let old: Vec<f32> = xs.iter().map(|x| x.0 - 2.0 + x.1).collect();
            let adv: Vec<f32> = xs.iter().map(|x| x.2).collect();
            let out = ppo_policy_loss(&lp, &old, &adv, 0.2, lp.len() as f64);
            let h = 1e-3f32;
            for t in 0..lp.len() {
                let (mut up, mut dn) = (lp.clone(), lp.clone());
                up[t] += h;
                dn[t] -= h;
                // skip points next to a kink of the max / clip
                let r = ((lp[t] - old[t]) as f64).exp();
                prop_assume!((r - 0.8).abs() > 0.01 && (r - 1.2).abs() > 0.01);
                let fd = (ppo_policy_loss(&up, &old, &adv, 0.2, lp.len() as f64).loss - ppo_policy_loss(&dn, &old, &adv, 0.2, lp.len() as f64).loss) / (2.0 * h as f64);
                prop_assert!((fd - out.grad[t]).abs() < 1e-3, "t {}: {} vs {}", t, fd, out.grad[t]);
            }
            let v: Vec<f32> = xs.iter().map(|x| x.1 * 3.0).collect();
            let v_old: Vec<f32> = xs.iter().map(|x| x.0).collect();
            let ret: Vec<f32> = xs.iter().map(|x| x.2).collect();
            let out = ppo_value_loss(&v, &v_old, &ret, 0.2, v.len() as f64);
            for t in 0..v.len() {
                prop_assume!(((v[t] - v_old[t]).abs() - 0.2).abs() > 0.01);
                // and next to the kink of the max, where both branches are equal
                let clipped = v_old[t] + (v[t] - v_old[t]).clamp(-0.2, 0.2);
                prop_assume!(((v[t] - ret[t]).powi(2) - (clipped - ret[t]).powi(2)).abs() > 0.01);
                let (mut up, mut dn) = (v.clone(), v.clone());
                up[t] += h;
                dn[t] -= h;
                let fd = (ppo_value_loss(&up, &v_old, &ret, 0.2, v.len() as f64).loss - ppo_value_loss(&dn, &v_old, &ret, 0.2, v.len() as f64).loss) / (2.0 * h as f64);
                prop_assert!((fd - out.grad[t]).abs() < 1e-3, "value t {}: {} vs {}", t, fd, out.grad[t]);
            }
        }
    }

    #[test]
    fn on_the_first_minibatch_the_ratio_is_one_and_approx_kl_zero() {
        let lp = [-1.0f32, -2.5, -0.3];
        let out = ppo_policy_loss(&lp, &lp, &[0.5, -1.0, 2.0], 0.2, 3.0);
        assert_eq!((out.ratio_mean, out.ratio_var, out.approx_kl, out.clipfrac), (1.0, 0.0, 0.0, 0.0));
        assert!((out.loss - (-(0.5 - 1.0 + 2.0) / 3.0)).abs() < 1e-12);
    }
}
