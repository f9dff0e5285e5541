//! Critic-free online RL's scalar math (fixtures `shared/fixtures/group`): GRPO's group
//! baselines, RLOO's leave-one-out baseline, REINFORCE++'s returns with global whitening, and
//! the clipped token loss all three optimise, with its aggregations. Completions are
//! group-major — completion `j` of prompt `p` is index `p·k + j` — and per-token inputs hold the
//! valid tokens only.

use serde::{Deserialize, Serialize};

/// How GRPO scales the group-centred rewards (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardScale {
    /// Divide by the group's unbiased std (+ ε): DeepSeekMath's GRPO.
    #[default]
    Group,
    /// Divide by the whole batch's unbiased std (+ ε).
    Batch,
    /// Do not divide: Dr. GRPO (Liu et al. 2025).
    None,
}

/// How the per-token losses of a batch become one loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Mean over sequences of each sequence's token mean (DeepSeekMath).
    Grpo,
    /// Token mean over the micro-batch.
    Bnpo,
    /// Sum over tokens / (sequences · `max_completion_length`) (Dr. GRPO).
    DrGrpo,
    /// Token mean over the optimizer step's whole batch (DAPO; TRL's default).
    #[default]
    Dapo,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Unbiased (Bessel-corrected) standard deviation; 0 for fewer than two values.
fn std_unbiased(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// GRPO's advantages (Shao et al. 2024, §4.1.2): `(r − mean_group) / (std + ε)`, with the std
/// of the group, of the whole batch, or none (Dr. GRPO). A group of equal rewards gets
/// advantages of exactly 0.
///
/// # Panics
/// If `k` is 0 or does not divide the number of rewards.
pub fn grpo_advantages(rewards: &[f32], k: usize, scale: RewardScale, std_eps: f64) -> Vec<f32> {
    assert!(k > 0 && rewards.len().is_multiple_of(k), "grpo_advantages: {} rewards in groups of {k}", rewards.len());
    let r: Vec<f64> = rewards.iter().map(|&x| x as f64).collect();
    let batch_std = std_unbiased(&r);
    r.chunks(k)
        .flat_map(|g| {
            let (m, s) = (mean(g), std_unbiased(g));
            g.iter().map(move |&x| match scale {
                RewardScale::Group => (x - m) / (s + std_eps),
                RewardScale::Batch => (x - m) / (batch_std + std_eps),
                RewardScale::None => x - m,
            })
        })
        .map(|a| a as f32)
        .collect()
}

/// RLOO's quantities for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Rloo {
    /// `R = r − β·Σ_t (log π_old − log π_ref)`.
    pub rewards_with_kl: Vec<f32>,
    /// Mean of the other `k − 1` completions' `R`.
    pub baseline: Vec<f32>,
    /// `R − baseline` (optionally normalised over the batch).
    pub advantages: Vec<f32>,
}

/// RLOO (Ahmadian et al. 2024, Eq. 4, as TRL's `RLOOTrainer`): the sequence KL is folded into
/// the reward (no gradient through it) and each completion's baseline is the mean of the other
/// `k − 1` of its prompt; `normalize` standardises the advantages over the batch with the
/// unbiased std (+ ε).
///
/// # Panics
/// If `k < 2` or `k` does not divide the number of rewards, or `kl_seq` differs in length.
pub fn rloo_advantages(rewards: &[f32], kl_seq: &[f32], beta: f64, k: usize, normalize: Option<f64>) -> Rloo {
    assert!(k >= 2 && rewards.len().is_multiple_of(k), "rloo: {} rewards in groups of {k} (k ≥ 2)", rewards.len());
    assert_eq!(kl_seq.len(), rewards.len(), "rloo: one sequence KL per reward");
    let big_r: Vec<f64> = rewards.iter().zip(kl_seq).map(|(&r, &kl)| r as f64 - beta * kl as f64).collect();
    let baseline: Vec<f64> = big_r
        .chunks(k)
        .flat_map(|g| {
            let sum: f64 = g.iter().sum();
            g.iter().map(move |&x| (sum - x) / (k - 1) as f64)
        })
        .collect();
    let mut adv: Vec<f64> = big_r.iter().zip(&baseline).map(|(r, b)| r - b).collect();
    if let Some(eps) = normalize {
        let (m, s) = (mean(&adv), std_unbiased(&adv));
        adv.iter_mut().for_each(|a| *a = (*a - m) / (s + eps));
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    Rloo { rewards_with_kl: f(big_r), baseline: f(baseline), advantages: f(adv) }
}

/// The variance REINFORCE++ whitens with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Whitening {
    /// `(x − mean) / √max(var_biased, ε)` (OpenRLHF).
    #[default]
    Biased,
    /// `(x − mean) / √(var_unbiased + ε)` (verl's `masked_whiten`).
    Unbiased,
}

/// REINFORCE++'s per-sequence quantities.
#[derive(Debug, Clone, PartialEq)]
pub struct ReinforcePp {
    /// `−β·(log π_old − log π_ref)` per token, plus the score at the last token.
    pub token_rewards: Vec<Vec<f32>>,
    /// Discounted returns-to-go.
    pub returns: Vec<Vec<f32>>,
    /// The returns whitened over every token of the batch.
    pub advantages: Vec<Vec<f32>>,
}

/// REINFORCE++ (Hu 2025; OpenRLHF): per-token k1 KL in the reward, returns
/// `G_t = Σ_{s≥t} γ^{s−t} r_s`, and advantages = returns whitened over all tokens of the batch
/// (no critic, no per-prompt baseline).
pub fn reinforce_pp_advantages(
    old_logprobs: &[Vec<f32>],
    ref_logprobs: &[Vec<f32>],
    scores: &[f32],
    beta: f64,
    gamma: f64,
    whitening: Whitening,
    eps: f64,
) -> ReinforcePp {
    let token_rewards: Vec<Vec<f64>> = old_logprobs
        .iter()
        .zip(ref_logprobs)
        .zip(scores)
        .map(|((old, r), &score)| {
            let mut tr: Vec<f64> = old.iter().zip(r).map(|(&o, &r)| -beta * (o as f64 - r as f64)).collect();
            if let Some(last) = tr.last_mut() {
                *last += score as f64;
            }
            tr
        })
        .collect();
    let returns: Vec<Vec<f64>> = token_rewards
        .iter()
        .map(|tr| {
            let mut g = 0.0;
            let mut out: Vec<f64> = tr
                .iter()
                .rev()
                .map(|&r| {
                    g = r + gamma * g;
                    g
                })
                .collect();
            out.reverse();
            out
        })
        .collect();
    let flat: Vec<f64> = returns.concat();
    let n = flat.len() as f64;
    let m = mean(&flat);
    let var_biased = flat.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n.max(1.0);
    let scale = match whitening {
        Whitening::Biased => 1.0 / var_biased.max(eps).sqrt(),
        Whitening::Unbiased => 1.0 / (var_biased * n / (n - 1.0).max(1.0) + eps).sqrt(),
    };
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    ReinforcePp {
        advantages: returns.iter().map(|r| r.iter().map(|&x| ((x - m) * scale) as f32).collect()).collect(),
        token_rewards: token_rewards.iter().map(|v| f(v)).collect(),
        returns: returns.iter().map(|v| f(v)).collect(),
    }
}

/// ReMax's advantages (Li et al. 2023, Alg. 1, as verl's `compute_remax_outcome_advantage`):
/// each token's return of the KL-shaped reward ([`reinforce_pp_advantages`]' `returns`, γ = 1)
/// minus its completion's baseline `b(x)`, the score of the prompt's greedy response; no
/// whitening. A sampled completion that scores as the greedy one (with no KL) gets 0.
pub fn remax_advantages(returns: &[Vec<f32>], baselines: &[f32]) -> Vec<Vec<f32>> {
    assert_eq!(returns.len(), baselines.len(), "remax_advantages: one baseline per completion");
    returns.iter().zip(baselines).map(|(r, &b)| r.iter().map(|&g| g - b).collect()).collect()
}

/// Whether a group can teach anything: DAPO's dynamic-sampling condition (Yu et al. 2025,
/// eq. 11: `0 < |{o_i : is_equivalent(a, o_i)}| < G`, generalised to any reward as verl's
/// `filter_groups` does): not all of its rewards are equal. A group of equal rewards has
/// GRPO advantages of exactly 0.
pub fn is_informative(group_rewards: &[f32]) -> bool {
    group_rewards.iter().any(|&r| r != group_rewards[0])
}

/// DAPO's dynamic sampling: which of the generated groups (in generation order,
/// `informative[g]` from [`is_informative`]) make a batch of `needed` groups. The first
/// `needed` informative ones; when there are fewer, the earliest uninformative ones fill the
/// rest (the batch plain GRPO would train on, where DAPO's sampler gave up). The chosen
/// indices come back in generation order, so when every group is chosen the batch is exactly
/// the generated one.
pub fn dynamic_batch(informative: &[bool], needed: usize) -> Vec<usize> {
    let mut chosen = vec![false; informative.len()];
    let mut left = needed;
    for want in [true, false] {
        for (g, _) in informative.iter().enumerate().filter(|&(_, &i)| i == want) {
            if left == 0 {
                break;
            }
            chosen[g] = true;
            left -= 1;
        }
    }
    (0..informative.len()).filter(|&g| chosen[g]).collect()
}

/// Which importance ratio the clipped loss uses (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceLevel {
    /// Each token's own `exp(log π_θ − log π_old)` (GRPO, PPO).
    #[default]
    Token,
    /// GSPO (Zheng et al. 2025, eq. 7): one ratio per sequence, the geometric mean of its
    /// tokens' `exp(mean_t(log π_θ − log π_old))`, clipped as a whole (the paper's ε are ~1e-4
    /// wide).
    Sequence,
}

/// One batch of sequences for [`clipped_token_loss`]: per sequence, the valid tokens' values.
#[derive(Debug, Clone, Copy)]
pub struct TokenBatch<'a> {
    /// log π_θ (current).
    pub logprobs: &'a [Vec<f32>],
    /// log π_θ_old (rollout policy).
    pub old_logprobs: &'a [Vec<f32>],
    /// log π_ref; `None` when β = 0 (no KL term).
    pub ref_logprobs: Option<&'a [Vec<f32>]>,
    /// Advantages per token.
    pub advantages: &'a [Vec<f32>],
}

/// The loss of a batch, its gradient and TRL's diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLoss {
    /// The aggregated loss.
    pub loss: f64,
    /// `∂loss/∂logprobs`, per sequence and token.
    pub grad: Vec<Vec<f64>>,
    /// Per-token loss (before aggregation).
    pub per_token_loss: Vec<Vec<f64>>,
    /// Mean over tokens of the k3 KL (0 without a reference).
    pub kl: f64,
    /// Token fractions: ratio below 1 − ε_low with A < 0; above 1 + ε_high with A > 0.
    pub clip_low: f64,
    /// See `clip_low`.
    pub clip_high: f64,
}

/// The clipped surrogate with clip-higher (DAPO) and GRPO's KL term, per token:
///
/// ```text
/// ρ = exp(logprobs − old),   ℓ_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·k3_t,
/// k3_t = exp(ref − logprobs) − (ref − logprobs) − 1
/// ```
/// aggregated as `aggregation` says; `normalizer` is the token count of the optimizer step's
/// batch (for `dapo`) and `max_completion_length` the `L` of `dr_grpo`. At the `sequence`
/// level ρ is the sequence's `exp(mean_t(logprobs − old))` for each of its tokens (GSPO), so
/// every token's surrogate term reaches every token of its sequence through the mean.
pub fn clipped_token_loss(
    x: TokenBatch<'_>,
    (eps_low, eps_high, beta): (f64, f64, f64),
    (aggregation, level): (LossAggregation, ImportanceLevel),
    max_completion_length: usize,
    normalizer: f64,
) -> TokenLoss {
    let n_seq = x.logprobs.len();
    let n_tok: usize = x.logprobs.iter().map(Vec::len).sum();
    let mut out = TokenLoss { loss: 0.0, grad: vec![], per_token_loss: vec![], kl: 0.0, clip_low: 0.0, clip_high: 0.0 };
    for i in 0..n_seq {
        let len = x.logprobs[i].len();
        // the weight of each token's loss in the aggregate
        let w = match aggregation {
            LossAggregation::Grpo => 1.0 / (n_seq as f64 * len.max(1) as f64),
            LossAggregation::Bnpo => 1.0 / n_tok.max(1) as f64,
            LossAggregation::DrGrpo => 1.0 / (n_seq * max_completion_length).max(1) as f64,
            LossAggregation::Dapo => 1.0 / normalizer.max(1.0),
        };
        let (mut losses, mut grads) = (Vec::with_capacity(len), Vec::with_capacity(len));
        let log_ratio = |t: usize| x.logprobs[i][t] as f64 - x.old_logprobs[i][t] as f64;
        let sequence_ratio = (level == ImportanceLevel::Sequence)
            .then(|| ((0..len).map(log_ratio).sum::<f64>() / len.max(1) as f64).exp());
        // GSPO: the surrogate's gradient with respect to the sequence's mean log-ratio
        let mut sequence_grad = 0.0;
        for t in 0..len {
            let lp = x.logprobs[i][t] as f64;
            let a = x.advantages[i][t] as f64;
            let ratio = sequence_ratio.unwrap_or_else(|| log_ratio(t).exp());
            let clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
            let (unclipped_obj, clipped_obj) = (ratio * a, clipped * a);
            // −min(·): the gradient flows through the unclipped branch when it is the minimum
            let (mut l, mut g) =
                if unclipped_obj <= clipped_obj { (-unclipped_obj, -unclipped_obj) } else { (-clipped_obj, 0.0) };
            if sequence_ratio.is_some() {
                sequence_grad += w * g;
                g = 0.0;
            }
            if let Some(r) = x.ref_logprobs {
                let d = r[i][t] as f64 - lp;
                let k3 = d.exp() - d - 1.0;
                l += beta * k3;
                g += beta * (1.0 - d.exp());
                out.kl += k3 / n_tok.max(1) as f64;
            }
            out.clip_low += f64::from(u8::from(ratio < 1.0 - eps_low && a < 0.0)) / n_tok.max(1) as f64;
            out.clip_high += f64::from(u8::from(ratio > 1.0 + eps_high && a > 0.0)) / n_tok.max(1) as f64;
            out.loss += w * l;
            losses.push(l);
            grads.push(w * g);
        }
        for g in grads.iter_mut().filter(|_| sequence_ratio.is_some()) {
            *g += sequence_grad / len as f64;
        }
        out.per_token_loss.push(losses);
        out.grad.push(grads);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clipped_loss_gradient_matches_finite_differences() {
        let lp = vec![vec![-1.0f32, -2.0, -0.5], vec![-3.0, -0.1]];
        let old = vec![vec![-1.1f32, -1.7, -0.9], vec![-2.9, -0.4]];
        let rf = vec![vec![-1.3f32, -2.2, -0.4], vec![-3.5, -0.2]];
        let adv = vec![vec![0.7f32; 3], vec![-1.2; 2]];
        let aggregations =
            [LossAggregation::Grpo, LossAggregation::Bnpo, LossAggregation::DrGrpo, LossAggregation::Dapo];
        for (agg, level) in
            aggregations.into_iter().flat_map(|a| [(a, ImportanceLevel::Token), (a, ImportanceLevel::Sequence)])
        {
            let f = |lp: &[Vec<f32>]| {
                let x = TokenBatch { logprobs: lp, old_logprobs: &old, ref_logprobs: Some(&rf), advantages: &adv };
                clipped_token_loss(x, (0.2, 0.28, 0.04), (agg, level), 4, 7.0)
            };
            let out = f(&lp);
            for (i, t) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] {
                let h = 1e-3f32;
                let (mut up, mut dn) = (lp.clone(), lp.clone());
                up[i][t] += h;
                dn[i][t] -= h;
                let fd = (f(&up).loss - f(&dn).loss) / (2.0 * h as f64);
                assert!((fd - out.grad[i][t]).abs() < 1e-4, "{agg:?} {level:?} [{i},{t}]: {fd} vs {}", out.grad[i][t]);
            }
        }
    }

    #[test]
    fn sequence_ratios_are_token_ratios_for_one_token_and_share_the_gradient_at_the_start() {
        let agg = (LossAggregation::Bnpo, ImportanceLevel::Token);
        let seq = (LossAggregation::Bnpo, ImportanceLevel::Sequence);
        // one token per sequence: the two levels are the same loss
        let (lp, old, adv) =
            (vec![vec![-1.0f32], vec![-2.0]], vec![vec![-1.2f32], vec![-1.9]], vec![vec![0.5f32], vec![-1.0]]);
        let x = TokenBatch { logprobs: &lp, old_logprobs: &old, ref_logprobs: None, advantages: &adv };
        let (a, b) =
            (clipped_token_loss(x, (0.2, 0.2, 0.0), agg, 1, 2.0), clipped_token_loss(x, (0.2, 0.2, 0.0), seq, 1, 2.0));
        assert!(
            (a.loss - b.loss).abs() < 1e-12
                && a.grad.iter().flatten().zip(b.grad.iter().flatten()).all(|(g, h)| (g - h).abs() < 1e-12)
        );
        // π_θ = π_old: ratio 1 at both levels, the same loss, and the sequence level spreads each
        // sequence's gradient evenly over its tokens
        let lp = vec![vec![-1.0f32, -2.0, -0.5]];
        let adv = vec![vec![0.5f32, 1.0, 1.5]];
        let x = TokenBatch { logprobs: &lp, old_logprobs: &lp, ref_logprobs: None, advantages: &adv };
        let (a, b) =
            (clipped_token_loss(x, (0.2, 0.2, 0.0), agg, 3, 3.0), clipped_token_loss(x, (0.2, 0.2, 0.0), seq, 3, 3.0));
        assert!((a.loss - b.loss).abs() < 1e-12);
        assert!(b.grad[0].iter().all(|&g| (g - a.grad[0].iter().sum::<f64>() / 3.0).abs() < 1e-12), "{:?}", b.grad);
    }

    #[test]
    fn equal_rewards_give_zero_advantages_and_rloo_baselines_exclude_self() {
        assert!(grpo_advantages(&[0.5; 4], 4, RewardScale::Group, 1e-4).iter().all(|&a| a == 0.0));
        let r = rloo_advantages(&[1.0, 2.0, 3.0, 6.0], &[0.0; 4], 0.1, 4, None);
        assert_eq!(r.baseline, vec![11.0 / 3.0, 10.0 / 3.0, 3.0, 2.0]);
    }

    proptest::proptest! {
        #[test]
        fn dynamic_batches_prefer_informative_groups_in_generation_order(
            informative in proptest::collection::vec(proptest::bool::ANY, 0..40),
            needed in 0usize..20,
        ) {
            let chosen = dynamic_batch(&informative, needed);
            proptest::prop_assert_eq!(chosen.len(), needed.min(informative.len()));
            proptest::prop_assert!(chosen.windows(2).all(|w| w[0] < w[1]));
            let taken = chosen.iter().filter(|&&g| informative[g]).count();
            let available = informative.iter().filter(|&&i| i).count();
            proptest::prop_assert_eq!(taken, needed.min(available));
            // informative groups are taken earliest first, and so are the ones that fill up
            for want in [true, false] {
                let of: Vec<usize> = chosen.iter().copied().filter(|&g| informative[g] == want).collect();
                let first: Vec<usize> = (0..informative.len()).filter(|&g| informative[g] == want).take(of.len()).collect();
                proptest::prop_assert_eq!(of, first);
            }
        }
    }

    #[test]
    fn remax_subtracts_the_greedy_score_from_each_return() {
        // β = 0: the return of every token is the score; a completion scoring as the greedy
        // response gets advantage 0
        let old = vec![vec![-1.0f32, -2.0], vec![-0.5]];
        let rpp = reinforce_pp_advantages(&old, &old, &[1.0, 0.25], 0.0, 1.0, Whitening::Biased, 1e-8);
        assert_eq!(remax_advantages(&rpp.returns, &[0.25, 0.25]), vec![vec![0.75, 0.75], vec![0.0]]);
    }

    #[test]
    fn a_group_is_informative_unless_its_rewards_are_all_equal() {
        assert!(!is_informative(&[1.0, 1.0, 1.0]) && !is_informative(&[0.0]));
        assert!(is_informative(&[1.0, 1.0, 0.0]));
        assert_eq!(dynamic_batch(&[false, true, false, true], 4), [0, 1, 2, 3], "all chosen: the batch as generated");
        assert_eq!(dynamic_batch(&[false, true, false, true, true], 2), [1, 3]);
        assert_eq!(dynamic_batch(&[false, true, false, false], 2), [0, 1]);
    }
}
