//! GRPO, RLOO and REINFORCE++ end to end on a tiny pretrained policy: the rule-based reward
//! rises, the invariants hold (ratio exactly 1 on the first minibatch, KL 0 at iteration 0,
//! groups share prompts), β = 0 needs no reference, and a resumed run logs the same metrics.

mod common;

use common::{comparable_metrics, pretrained_policy};
use rlhf::schedule::LrSchedule;
use rlhf::stages::grpo::{train, Algo, GrpoConfig};
use rlhf::stages::ppo::RewardSpec;

fn cfg(dir: &std::path::Path, algo: Algo, iterations: usize) -> GrpoConfig {
    let (policy, prompts) = pretrained_policy(dir);
    GrpoConfig {
        out_dir: dir.join("run"),
        algo,
        policy,
        prompts,
        reward: Some(RewardSpec::Keywords { keywords: vec!["a".into()], weight: 1.0 }),
        prompts_per_step: 4,
        num_generations: 4,
        minibatch_size: 8,
        max_new_tokens: 12,
        max_prompt_len: 16,
        iterations,
        num_iterations: 2,
        beta: 0.04,
        optim: rlhf_policies::AdamWConfig { lr: 3e-3, ..Default::default() },
        schedule: LrSchedule::Constant { lr: 3e-3 },
        checkpoint_every: 3,
        sample_every: 3,
        ..Default::default()
    }
}

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const GRPO: Algo = Algo::Grpo { scale_rewards: rlhf::math::group::RewardScale::Group, std_eps: 1e-4 };

fn learns(algo: Algo) {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), algo, 12);
    let before = std::fs::read(c.policy.join("model.safetensors")).unwrap();
    let report = train(c.clone(), false).unwrap();
    let m = metrics(d.path());
    assert_eq!(m.len(), 12);
    assert_eq!(m[0]["kl_seq"].as_f64(), Some(0.0), "the policy is the reference at iteration 0");
    for (i, r) in m.iter().enumerate() {
        assert_eq!(r["debug/first_minibatch_ratio"].as_f64(), Some(1.0), "{algo:?} iteration {i}");
        assert!(r["loss"].as_f64().unwrap().is_finite() && r["entropy"].as_f64().unwrap() > 0.0);
    }
    // the KL-regularised objective r − β·KL rises clearly (the KL is what it costs)
    let objective: Vec<f64> =
        m.iter().map(|r| r["reward"].as_f64().unwrap() - c.beta * r["kl_seq"].as_f64().unwrap()).collect();
    let (first, last) = (objective[..3].iter().sum::<f64>() / 3.0, objective[9..].iter().sum::<f64>() / 3.0);
    assert!(last > first + 1.0, "{algo:?}: r − β·KL {first:.2} -> {last:.2}: {objective:?}");
    assert!(report.rewards.iter().all(|r| r.is_finite()));
    assert_eq!(std::fs::read(c.policy.join("model.safetensors")).unwrap(), before, "the reference is never written");
    // samples: the G completions of a group share their prompt
    let samples = std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = samples.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows[..4].iter().all(|r| r["prompt"] == rows[0]["prompt"]), "{rows:?}");
}

#[test]
fn grpo_learns_the_rule_with_its_invariants() {
    learns(GRPO);
}

#[test]
fn rloo_learns_the_rule() {
    learns(Algo::Rloo { normalize_advantages: false, normalize_eps: 1e-4 });
}

#[test]
fn reinforce_pp_learns_the_rule() {
    learns(Algo::ReinforcePp { gamma: 1.0, whitening: rlhf::math::group::Whitening::Biased, whiten_eps: 1e-8 });
}

#[test]
fn resume_gives_the_same_metrics_and_beta_zero_needs_no_reference() {
    let run = |dir: &std::path::Path| {
        let mut c = cfg(dir, GRPO, 4);
        c.beta = 0.0;
        c.epsilon_high = 0.28;
        c.loss_type = rlhf::math::group::LossAggregation::DrGrpo;
        c
    };
    let a = tempfile::tempdir().unwrap();
    train(run(a.path()), false).unwrap();
    let b = tempfile::tempdir().unwrap();
    train(run(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-4")).unwrap();
    train(run(b.path()), true).unwrap();
    let (ma, mb) = (comparable_metrics(&a.path().join("run")), comparable_metrics(&b.path().join("run")));
    assert_eq!(ma.len(), 4);
    assert_eq!(ma, mb);
    // β = 0: no reference forward, so no KL is measured at all
    assert!(ma.iter().all(|r| r["kl"].as_f64() == Some(0.0) && r["kl_seq"].as_f64() == Some(0.0)));
    assert!(a.path().join("run/checkpoints/step-4/grpo_state.json").is_file());
}

#[test]
fn bad_shapes_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), GRPO, 1);
    c.minibatch_size = 5;
    assert!(train(c.clone(), false).unwrap_err().to_string().contains("multiple of minibatch_size"));
    c.minibatch_size = 8;
    c.algo = Algo::Rloo { normalize_advantages: true, normalize_eps: 1e-4 };
    c.num_generations = 1;
    c.prompts_per_step = 8;
    assert!(train(c, false).unwrap_err().to_string().contains("num_generations"));
}
