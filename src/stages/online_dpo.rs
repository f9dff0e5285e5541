//! Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", as
//! TRL's `OnlineDPOTrainer` computes it) on the critic-free trainers' loop (`rlhf online-dpo`,
//! `algo.kind = online_dpo`): each prompt's two completions are sampled from the current
//! policy, the better-scored one is chosen (a tie goes to the first, as TRL's `>=`), and a
//! pairwise loss of [`crate::math::dpo`] against the frozen reference replaces the clipped
//! token loss:
//!
//! ```text
//! h = log π_θ/π_ref(y_w|x) − log π_θ/π_ref(y_l|x),   L = −log σ(β·h)   (or any pairwise DPO loss)
//! ```
//! Minibatches hold whole pairs; the rollout, scoring pass and bookkeeping are
//! [`crate::stages::grpo_step`]'s.

use anyhow::Result;
use dfdx::prelude::*;
use rlhf_policies::fused::host_loss;
use rlhf_policies::{CausalLm, FusedOps};

use crate::math::dpo::DpoLoss;
use crate::stages::common::{shuffled_minibatches, LossOn};
use crate::stages::dpo::pairwise_loss;
use crate::stages::grpo::GrpoConfig;
use crate::stages::grpo_step::{Scored, UpdateStats};
use crate::stages::ppo_models::{logprobs_and_entropy, Seq};

/// [`shuffled_minibatches`] over the `pairs` pairs (completions `2k`, `2k + 1`): minibatches of
/// `minibatch` completions, each in `accum` micro-batches, a pair never split.
pub fn pair_minibatches(pairs: usize, minibatch: usize, accum: usize, seed: u64) -> Vec<Vec<Vec<usize>>> {
    let pair = |k: usize| [2 * k, 2 * k + 1];
    shuffled_minibatches(pairs, minibatch / 2, accum, seed)
        .into_iter()
        .map(|mb| mb.into_iter().map(|micro| micro.into_iter().flat_map(pair).collect()).collect())
        .collect()
}

/// Whether each completion is its pair's chosen one: the higher score, the first on a tie.
pub fn chosen(scores: &[f32]) -> Vec<bool> {
    scores
        .chunks(2)
        .flat_map(|p| {
            let first = p[0] >= p[1];
            [first, !first]
        })
        .collect()
}

/// The pairwise loss of one micro-batch (whole pairs, adjacent), scaled by `1/grad_accum` so
/// a minibatch's gradient is its pairs' mean; `st` gathers the loss, tokens, entropy and
/// ratio sums.
#[allow(clippy::too_many_arguments)]
pub(crate) fn micro_loss<D: FusedOps>(
    cfg: &GrpoConfig,
    loss: DpoLoss,
    policy: &CausalLm<D>,
    s: &Scored,
    micro: &[usize],
    pad: u32,
    st: &mut UpdateStats,
    tape: OwnedTape<f32, D>,
) -> Result<LossOn<D>> {
    let seqs: Vec<&Seq> = micro.iter().map(|&i| &s.seqs[i]).collect();
    let all: usize = seqs.iter().map(|q| q.resp_len()).sum();
    // (chosen, rejected) positions in the micro-batch, and the reference's sums
    let pairs: Vec<(usize, usize)> = (0..micro.len() / 2)
        .map(|j| if s.chosen[micro[2 * j]] { (2 * j, 2 * j + 1) } else { (2 * j + 1, 2 * j) })
        .collect();
    let ref_sum = |k: usize| s.ref_logprobs[micro[k]].iter().map(|&v| v as f64).sum::<f64>();
    let ref_logps: Vec<(f64, f64)> = pairs.iter().map(|&(c, r)| (ref_sum(c), ref_sum(r))).collect();
    let lpe = logprobs_and_entropy(policy, &seqs, pad, cfg.temperature, tape)?;
    let scale = 1.0 / cfg.grad_accum as f64;
    Ok(host_loss(lpe, |x| {
        let (out, grad) = pairwise_loss(x, &seqs, &pairs, &ref_logps, (cfg.beta, loss, scale));
        st.loss += out.loss * scale;
        st.tokens += all;
        st.sums[3] += x[all..].iter().map(|&h| h as f64).sum::<f64>();
        let old = micro.iter().flat_map(|&i| &s.old_logprobs[i]);
        st.sums[4] += x[..all].iter().zip(old).map(|(&l, &o)| ((l - o) as f64).exp()).sum::<f64>();
        (out.loss * scale, grad)
    }))
}

/// TRL's implicit-reward metrics of the generation (π_θ = π_old, before the update):
/// `rewards/chosen`, `rewards/rejected` (β × the sequence log-ratio), their margin and the
/// fraction of pairs the policy already ranks as the reward did.
pub(crate) fn reward_metrics(beta: f64, s: &Scored, record: &mut serde_json::Value) {
    let ratio =
        |i: usize| beta * s.old_logprobs[i].iter().zip(&s.ref_logprobs[i]).map(|(&o, &r)| (o - r) as f64).sum::<f64>();
    let pairs: Vec<(f64, f64)> = (0..s.seqs.len() / 2)
        .map(|j| if s.chosen[2 * j] { (ratio(2 * j), ratio(2 * j + 1)) } else { (ratio(2 * j + 1), ratio(2 * j)) })
        .collect();
    let n = pairs.len().max(1) as f64;
    let chosen = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let rejected = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    record["rewards/chosen"] = chosen.into();
    record["rewards/rejected"] = rejected.into();
    record["rewards/margins"] = (chosen - rejected).into();
    record["rewards/accuracies"] = (pairs.iter().filter(|p| p.0 > p.1).count() as f64 / n).into();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_stay_whole_and_every_completion_comes_once() {
        let mbs = pair_minibatches(6, 4, 2, 7);
        let mut seen: Vec<usize> = mbs.iter().flatten().flatten().copied().collect();
        for micro in mbs.iter().flatten() {
            assert_eq!(micro.len(), 2);
            assert!(micro[0] % 2 == 0 && micro[1] == micro[0] + 1, "{micro:?}");
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        assert_eq!(chosen(&[1.0, 2.0, 3.0, 3.0, 0.5, -1.0]), [false, true, true, false, true, false]);
    }
}
