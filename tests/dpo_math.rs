//! The DPO family and KTO against `shared/fixtures/preference` (TRL 1.16's formulas, computed
//! in float64): per-pair losses, means, implicit rewards, accuracies and margins, z₀.

mod common;

use common::*;
use rlhf::math::dpo::{dpo_loss, kto_loss, DpoLoss, KtoBatch, PairLogps};

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    f32s(v).iter().map(|&x| x as f64).collect()
}

fn assert_all(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn dpo_cdpo_robust_hinge_and_ipo_match() {
    let f = read_json(&fixture("preference/expected.json"))["dpo"].clone();
    let (i, o, p) = (&f["inputs"], &f["outputs"], &f["params"]);
    let (pc, pr, rc, rr) = (
        f64s(&i["policy_chosen_logps"]),
        f64s(&i["policy_rejected_logps"]),
        f64s(&i["ref_chosen_logps"]),
        f64s(&i["ref_rejected_logps"]),
    );
    let toks = |k: &str| -> Vec<usize> { u32s(&i[k]).iter().map(|&t| t as usize).collect() };
    let (ct, rt) = (toks("chosen_num_tokens"), toks("rejected_num_tokens"));
    let x = PairLogps {
        policy_chosen: &pc,
        policy_rejected: &pr,
        ref_chosen: &rc,
        ref_rejected: &rr,
        chosen_tokens: &ct,
        rejected_tokens: &rt,
    };
    let beta = p["beta"].as_f64().unwrap();
    let eps = p["label_smoothing"].as_f64().unwrap();
    let cases = [
        ("sigmoid", beta, DpoLoss::Sigmoid {}),
        ("cdpo", beta, DpoLoss::Cdpo { label_smoothing: eps }),
        ("robust", beta, DpoLoss::Robust { label_smoothing: eps }),
        ("hinge", beta, DpoLoss::Hinge {}),
        ("ipo", p["ipo_tau"].as_f64().unwrap(), DpoLoss::Ipo { tau: p["ipo_tau"].as_f64().unwrap() }),
    ];
    for (name, b, v) in cases {
        let out = dpo_loss(x, b, v);
        assert_all(&out.per_pair_loss, &f64s(&o[name]["per_pair_loss"]), name);
        assert!(close(out.loss, o[name]["loss"].as_f64().unwrap()), "{name} loss {}", out.loss);
    }
    let out = dpo_loss(x, beta, DpoLoss::Sigmoid {});
    assert_all(&out.chosen_rewards, &f64s(&o["chosen_rewards"]), "chosen_rewards");
    assert_all(&out.rejected_rewards, &f64s(&o["rejected_rewards"]), "rejected_rewards");
    let n = pc.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let m = &o["metrics"];
    assert!(close(mean(&out.chosen_rewards), m["rewards/chosen"].as_f64().unwrap()));
    assert!(close(mean(&out.rejected_rewards), m["rewards/rejected"].as_f64().unwrap()));
    let acc = out.chosen_rewards.iter().zip(&out.rejected_rewards).filter(|(c, r)| c > r).count() as f64 / n;
    assert!(close(acc, m["rewards/accuracies"].as_f64().unwrap()));
    let margin: Vec<f64> = out.chosen_rewards.iter().zip(&out.rejected_rewards).map(|(c, r)| c - r).collect();
    assert!(close(mean(&margin), m["rewards/margins"].as_f64().unwrap()));
}

#[test]
fn kto_plain_clamped_and_weighted_match() {
    let all = read_json(&fixture("preference/expected.json"));
    for name in ["kto", "kto_clamped_z0", "kto_weighted"] {
        let f = &all[name];
        let (i, o, p) = (&f["inputs"], &f["outputs"], &f["params"]);
        let labels: Vec<bool> = i["labels"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let (pl, rl, pk, rk) =
            (f64s(&i["policy_logps"]), f64s(&i["ref_logps"]), f64s(&i["policy_KL_logps"]), f64s(&i["ref_KL_logps"]));
        let out = kto_loss(
            KtoBatch { labels: &labels, policy_logps: &pl, ref_logps: &rl, policy_kl_logps: &pk, ref_kl_logps: &rk },
            p["beta"].as_f64().unwrap(),
            p["desirable_weight"].as_f64().unwrap(),
            p["undesirable_weight"].as_f64().unwrap(),
        );
        assert!(close(out.z0, o["z0"].as_f64().unwrap()), "{name} z0 {}", out.z0);
        assert!(close(out.kl_mean_unclamped, o["kl_mean_unclamped"].as_f64().unwrap()), "{name}");
        assert_all(&out.per_example_loss, &f64s(&o["per_example_loss"]), name);
        assert!(close(out.loss, o["loss"].as_f64().unwrap()), "{name} loss {}", out.loss);
        assert_all(&out.rewards, &f64s(&o["rewards"]), name);
    }
}
