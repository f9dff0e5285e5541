//! GRPO / Dr. GRPO, the clipped token loss and its four aggregations, RLOO and REINFORCE++
//! against `shared/fixtures/group` (TRL 1.16 / OpenRLHF / verl formulas, computed in float64).

mod common;

use common::*;
use rlhf::math::group::{
    clipped_token_loss, grpo_advantages, reinforce_pp_advantages, rloo_advantages, ImportanceLevel, LossAggregation,
    RewardScale, TokenBatch, Whitening,
};
use serde_json::Value;

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

fn assert_all(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g as f64, *w as f64), "{what}[{i}]: {g} vs {w}");
    }
}

/// `[N, T]` per-token values cut to each sequence's valid tokens.
fn valid(v: &Value, lengths: &[usize]) -> Vec<Vec<f32>> {
    f32s_2d(v).into_iter().zip(lengths).map(|(row, &n)| row[..n].to_vec()).collect()
}

struct Inputs {
    k: usize,
    lengths: Vec<usize>,
    rewards: Vec<f32>,
    old: Vec<Vec<f32>>,
    reference: Vec<Vec<f32>>,
    new: Vec<Vec<f32>>,
}

fn load() -> (Value, Inputs) {
    let f = read_json(&fixture("group/expected.json"));
    let i = &f["inputs"];
    let lengths: Vec<usize> = u32s(&i["lengths"]).iter().map(|&n| n as usize).collect();
    let inputs = Inputs {
        k: i["k"].as_u64().unwrap() as usize,
        rewards: f32s(&i["rewards"]),
        old: valid(&i["old_logps"], &lengths),
        reference: valid(&i["ref_logps"], &lengths),
        new: valid(&i["new_logps"], &lengths),
        lengths,
    };
    (f, inputs)
}

#[test]
fn grpo_advantages_with_group_batch_and_no_std_match() {
    let (f, x) = load();
    let eps = f["grpo"]["params"]["std_eps"].as_f64().unwrap();
    for (case, rewards) in
        [("grpo", x.rewards.clone()), ("grpo_degenerate_group", f32s(&f["grpo_degenerate_group"]["rewards"]))]
    {
        let g = &f[case];
        for (field, scale) in [
            ("advantages_scale_group", RewardScale::Group),
            ("advantages_scale_batch", RewardScale::Batch),
            ("advantages_dr_grpo", RewardScale::None),
        ] {
            assert_all(&grpo_advantages(&rewards, x.k, scale, eps), &f32s(&g[field]), &format!("{case}.{field}"));
        }
    }
    // a group of equal rewards: exactly zero
    let deg = grpo_advantages(&f32s(&f["grpo_degenerate_group"]["rewards"]), x.k, RewardScale::Group, eps);
    assert!(deg[..4].iter().all(|&a| a == 0.0));
}

#[test]
fn the_clipped_token_loss_and_its_four_aggregations_match() {
    let (f, x) = load();
    let g = &f["grpo_loss"];
    let p = &g["params"];
    let (eps_low, eps_high, beta) =
        (p["epsilon_low"].as_f64().unwrap(), p["epsilon_high"].as_f64().unwrap(), p["beta"].as_f64().unwrap());
    let adv_seq = f32s(&f["grpo"]["advantages_scale_group"]);
    let adv: Vec<Vec<f32>> = adv_seq.iter().zip(&x.lengths).map(|(&a, &n)| vec![a; n]).collect();
    let batch =
        TokenBatch { logprobs: &x.new, old_logprobs: &x.old, ref_logprobs: Some(&x.reference), advantages: &adv };
    let n_valid: usize = x.lengths.iter().sum();
    let l_max = p["max_completion_length"].as_u64().unwrap() as usize;
    for (field, agg) in [
        ("loss_grpo", LossAggregation::Grpo),
        ("loss_bnpo", LossAggregation::Bnpo),
        ("loss_dr_grpo", LossAggregation::DrGrpo),
        ("loss_dapo", LossAggregation::Dapo),
    ] {
        let out =
            clipped_token_loss(batch, (eps_low, eps_high, beta), (agg, ImportanceLevel::Token), l_max, n_valid as f64);
        let want = g[field].as_f64().unwrap();
        assert!(close(out.loss, want), "{field}: {} vs {want}", out.loss);
        let per_token: Vec<f32> = out.per_token_loss.concat().iter().map(|&v| v as f32).collect();
        assert_all(&per_token, &valid(&g["per_token_loss"], &x.lengths).concat(), "per_token_loss");
        let m = &g["metrics"];
        assert!(close(out.kl, m["kl"].as_f64().unwrap()), "kl {}", out.kl);
        assert!(close(out.clip_low, m["clip_ratio/low_mean"].as_f64().unwrap()), "low {}", out.clip_low);
        assert!(close(out.clip_high, m["clip_ratio/high_mean"].as_f64().unwrap()), "high {}", out.clip_high);
    }
}

#[test]
fn rloo_plain_and_normalised_match() {
    let (f, x) = load();
    let r = &f["rloo"];
    let (beta, eps) = (r["params"]["beta"].as_f64().unwrap(), r["params"]["normalize_eps"].as_f64().unwrap());
    let kl_seq: Vec<f32> = x
        .old
        .iter()
        .zip(&x.reference)
        .map(|(o, rf)| o.iter().zip(rf).map(|(&a, &b)| a as f64 - b as f64).sum::<f64>() as f32)
        .collect();
    assert_all(&kl_seq, &f32s(&r["kl_seq"]), "kl_seq");
    let plain = rloo_advantages(&x.rewards, &kl_seq, beta, x.k, None);
    assert_all(&plain.rewards_with_kl, &f32s(&r["rewards_with_kl"]), "rewards_with_kl");
    assert_all(&plain.baseline, &f32s(&r["baseline"]), "baseline");
    assert_all(&plain.advantages, &f32s(&r["advantages"]), "advantages");
    let norm = rloo_advantages(&x.rewards, &kl_seq, beta, x.k, Some(eps));
    assert_all(&norm.advantages, &f32s(&r["advantages_normalized"]), "advantages_normalized");
}

#[test]
fn reinforce_pp_returns_and_both_whitenings_match() {
    let (f, x) = load();
    let r = &f["reinforce_pp"];
    let p = &r["params"];
    let (beta, gamma, eps) =
        (p["beta"].as_f64().unwrap(), p["gamma"].as_f64().unwrap(), p["whiten_eps"].as_f64().unwrap());
    for (field, w) in
        [("advantages_whitened_biased", Whitening::Biased), ("advantages_whitened_unbiased", Whitening::Unbiased)]
    {
        let out = reinforce_pp_advantages(&x.old, &x.reference, &x.rewards, beta, gamma, w, eps);
        assert_all(&out.token_rewards.concat(), &valid(&r["token_rewards"], &x.lengths).concat(), "token_rewards");
        assert_all(&out.returns.concat(), &valid(&r["returns"], &x.lengths).concat(), "returns");
        assert_all(&out.advantages.concat(), &valid(&r[field], &x.lengths).concat(), field);
    }
}
