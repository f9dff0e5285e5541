//! PPO's math against `shared/fixtures/ppo` (computed in float64 by the fixture generator,
//! checked against TRL): GAE, whitening, clipped policy and value losses, approx-KL, entropy,
//! and both forms of the adaptive KL controller.

mod common;

use common::*;
use rlhf::math::ppo::{entropy, gae, ppo_policy_loss, ppo_value_loss, whiten, AdaptiveGain, KlControl, KlController};
use rlhf_envs::kl::shaped_rewards;
use rlhf_envs::{KlConfig, KlEstimator};
use serde_json::Value;

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g as f64, *w as f64), "{what}[{i}]: {g} vs {w}");
    }
}

struct Fx {
    f: Value,
    lengths: Vec<usize>,
}

impl Fx {
    fn load() -> Self {
        let f = read_json(&fixture("ppo/expected.json"));
        let lengths = u32s(&f["inputs"]["lengths"]).iter().map(|&l| l as usize).collect();
        Fx { f, lengths }
    }
    fn p(&self, k: &str) -> f64 {
        self.f["params"][k].as_f64().unwrap()
    }
    /// The valid part of each row of a [B, T] array.
    fn rows(&self, v: &Value) -> Vec<Vec<f32>> {
        f32s_2d(v).into_iter().zip(&self.lengths).map(|(r, &n)| r[..n].to_vec()).collect()
    }
    fn flat(&self, v: &Value) -> Vec<f32> {
        self.rows(v).concat()
    }
}

#[test]
fn gae_returns_and_whitening_match() {
    let fx = Fx::load();
    let f = &fx.f;
    let old = fx.rows(&f["inputs"]["old_logprobs"]);
    let refs = fx.rows(&f["inputs"]["ref_logprobs"]);
    let values = fx.rows(&f["inputs"]["old_values"]);
    let scores = f32s(&f["inputs"]["scores"]);
    let kl = KlConfig { beta: fx.p("beta") as f32, estimator: KlEstimator::K1 };
    let (mut advantages, mut returns) = (vec![], vec![]);
    for b in 0..4 {
        let rewards = shaped_rewards(&old[b], &refs[b], &kl, scores[b]);
        let (a, r) = gae(&rewards, &values[b], 0.0, fx.p("gamma") as f32, fx.p("lam") as f32);
        advantages.extend(a);
        returns.extend(r);
    }
    assert_close(&advantages, &fx.flat(&f["gae"]["advantages"]), "advantages");
    assert_close(&returns, &fx.flat(&f["gae"]["returns"]), "returns");
    let eps = fx.p("whiten_eps");
    assert_close(
        &whiten(&advantages, true, eps, true),
        &fx.flat(&f["whiten"]["advantages_whitened_unbiased"]),
        "unbiased",
    );
    assert_close(
        &whiten(&advantages, false, eps, true),
        &fx.flat(&f["whiten"]["advantages_whitened_biased"]),
        "biased",
    );
}

#[test]
fn clipped_losses_and_stats_match() {
    let fx = Fx::load();
    let f = &fx.f;
    let n = 30.0;
    let adv = fx.flat(&f["whiten"]["advantages_whitened_unbiased"]);
    let pl = ppo_policy_loss(
        &fx.flat(&f["inputs"]["new_logprobs"]),
        &fx.flat(&f["inputs"]["old_logprobs"]),
        &adv,
        fx.p("cliprange"),
        n,
    );
    assert!(close(pl.loss, f["policy"]["pg_loss"].as_f64().unwrap()), "pg_loss {}", pl.loss);
    assert_eq!(pl.clipfrac, 4.0 / 30.0);
    assert!(close(pl.clipfrac, f["policy"]["pg_clipfrac"].as_f64().unwrap()));
    assert!(close(pl.ratio_mean, f["policy"]["ratio_mean"].as_f64().unwrap()));
    assert!(close(pl.approx_kl, f["stats"]["approx_kl"].as_f64().unwrap()));
    let vl = ppo_value_loss(
        &fx.flat(&f["inputs"]["new_values"]),
        &fx.flat(&f["inputs"]["old_values"]),
        &fx.flat(&f["gae"]["returns"]),
        fx.p("cliprange_value"),
        n,
    );
    assert!(close(vl.loss, f["value"]["vf_loss"].as_f64().unwrap()), "vf_loss {}", vl.loss);
    assert!(close(vl.clipfrac, f["value"]["vf_clipfrac"].as_f64().unwrap()));
    let total = pl.loss + fx.p("vf_coef") * vl.loss;
    assert!(close(total, f["loss"].as_f64().unwrap()), "loss {total}");
}

#[test]
fn entropy_matches_at_every_position() {
    let fx = Fx::load();
    let logits = &fx.f["inputs"]["logits"];
    let want = f32s_2d(&fx.f["stats"]["entropy"]);
    let (mut masked, mut all, mut n_valid) = (0.0, 0.0, 0);
    for b in 0..4 {
        for (t, row) in f32s_2d(&logits[b]).iter().enumerate() {
            let h = entropy(row);
            assert!(close(h, want[b][t] as f64), "[{b},{t}] {h} vs {}", want[b][t]);
            all += h;
            if t < fx.lengths[b] {
                masked += h;
                n_valid += 1;
            }
        }
    }
    assert!(close(masked / n_valid as f64, fx.f["stats"]["entropy_mean_masked"].as_f64().unwrap()));
    assert!(close(all / 40.0, fx.f["stats"]["entropy_mean_all_positions"].as_f64().unwrap()));
}

#[test]
fn adaptive_kl_controller_follows_both_forms() {
    let f = read_json(&fixture("ppo/expected.json"))["kl_controller"].clone();
    let g = |k: &str| f[k].as_f64().unwrap();
    let observed = f32s(&f["observed_kl"]);
    let n_steps = f["n_steps"].as_u64().unwrap() as usize;
    let forms = [
        (AdaptiveGain::Code { horizon: g("horizon") }, "betas_code_form"),
        (AdaptiveGain::Paper { k_beta: g("k_beta") }, "betas_paper_form"),
    ];
    for (gain, key) in forms {
        let mut c = KlController::new(KlControl::Adaptive { target: g("target"), gain }, g("beta0"));
        let mut betas = vec![c.beta as f32];
        let mut errors = vec![];
        for &kl in &observed {
            errors.push(c.update(kl as f64, n_steps) as f32);
            betas.push(c.beta as f32);
        }
        assert_close(&betas, &f32s(&f[key]), key);
        assert_close(&errors, &f32s(&f["proportional_error"]), "proportional_error");
    }
    let mut fixed = KlController::new(KlControl::Fixed {}, 0.1);
    fixed.update(100.0, 512);
    assert_eq!(fixed.beta, 0.1);
}
