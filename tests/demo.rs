//! The main job end to end on the `test` preset: every stage runs, the summary's numbers are
//! finite, and `report.html` holds the table and the plots.

use rlhf::demo::{run, table, Preset};

#[test]
fn the_demo_runs_every_stage_and_writes_the_report() {
    let d = tempfile::tempdir().unwrap();
    let s = run(d.path(), Preset::Test, 1).unwrap();
    assert!(s.rm_gold_accuracy.is_finite());
    let names: Vec<&str> = s.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names[..5], ["sft", "ppo", "dpo", "grpo", "best-of-1"]);
    for p in &s.policies {
        for v in [p.gold, p.proxy, p.kl, p.length] {
            assert!(v.is_finite(), "{p:?}");
        }
    }
    assert_eq!(s.policies[0].kl, 0.0, "the SFT policy is the reference");
    assert_eq!(s.ppo_curve.len(), s.plan.ppo.0);
    assert!(s.ppo_curve.iter().all(|(g, p, k)| g.is_finite() && p.is_finite() && k.is_finite()));
    let t = table(&s);
    for field in ["gold reward", "proxy reward", "KL to SFT", "response length", "| sft |", "| ppo |"] {
        assert!(t.contains(field), "{field} missing from\n{t}");
    }
    for stage in ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"] {
        assert!(d.path().join(stage).join("metrics.jsonl").is_file(), "{stage}");
    }
    let report = rlhf::report::write_report(d.path()).unwrap();
    let html = std::fs::read_to_string(report).unwrap();
    assert!(html.contains("gold reward") && html.contains("reward vs √KL"));
    assert!(html.matches("<svg").count() >= 8, "{} plots", html.matches("<svg").count());
    assert!(!html.contains("NaN"));
}
