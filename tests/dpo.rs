//! DPO end to end on a tiny model: pairs whose chosen response says "good" and rejected one
//! "bad" — the policy learns to prefer the marker, the loss starts at log 2 (policy =
//! reference), and a resumed run logs the same metrics.

mod common;

use common::comparable_metrics;
use dfdx::prelude::*;
use rlhf::schedule::LrSchedule;
use rlhf::stages::dpo::{train, DpoConfig};
use rlhf::stages::ppo_models::{logprobs_and_entropy, Seq};
use rlhf_policies::{CausalLm, ModelConfig, Tokenizer};

fn cfg(dir: &std::path::Path, steps: usize) -> DpoConfig {
    let tok = Tokenizer::char_level("abcdefghijklmnopqrstuvwxyz :.").unwrap();
    let model = CausalLm::new(ModelConfig::gpt2_preset(tok.vocab_size(), 32, 2, 2, 48), &Cpu::default(), 4).unwrap();
    model.save_pretrained(&dir.join("init"), Some(&tok)).unwrap();
    let things = ["food", "room", "view", "staff", "music", "price"];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let t = things[i % things.len()];
            serde_json::json!({"prompt": format!("the {t}:"), "chosen": " good.", "rejected": " bad."}).to_string()
        })
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), lines.join("\n")).unwrap();
    DpoConfig {
        out_dir: dir.join("run"),
        init: dir.join("init"),
        data: dir.join("pairs.jsonl"),
        max_len: 32,
        batch_size: 6,
        steps,
        optim: rlhf_policies::AdamWConfig { lr: 3e-3, ..Default::default() },
        schedule: LrSchedule::Constant { lr: 3e-3 },
        eval_every: 10,
        checkpoint_every: 10,
        ..Default::default()
    }
}

fn logp(model: &CausalLm<Cpu>, tok: &Tokenizer, prompt: &str, response: &str) -> f32 {
    let p = tok.encode(prompt).unwrap();
    let s = Seq { ids: [p.clone(), tok.encode(response).unwrap()].concat(), prompt_len: p.len() };
    let lpe = logprobs_and_entropy(model, &[&s], 0, 1.0, NoneTape).unwrap().as_vec();
    lpe[..s.resp_len()].iter().sum()
}

#[test]
fn dpo_raises_the_marker_and_starts_at_log_2() {
    let d = tempfile::tempdir().unwrap();
    let report = train(cfg(d.path(), 20), false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    let first = m[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "the first loss is log 2 (policy = reference): {first}");
    let ev = report.eval.unwrap();
    assert!(ev.accuracy >= 0.99 && ev.margin > 0.0, "{ev:?}");
    let (reference, tok) =
        rlhf_policies::checkpoint::load_with_tokenizer(&d.path().join("init"), &Cpu::default()).unwrap();
    let (policy, _) =
        rlhf_policies::checkpoint::load_with_tokenizer(&d.path().join("run/checkpoints/step-20"), &Cpu::default())
            .unwrap();
    let gain = logp(&policy, &tok, "the desk:", " good.") - logp(&reference, &tok, "the desk:", " good.");
    let drop = logp(&policy, &tok, "the desk:", " bad.") - logp(&reference, &tok, "the desk:", " bad.");
    assert!(gain > drop + 1.0, "log-ratio of the marker {gain}, of the other {drop}");
}

#[test]
fn dpo_resume_gives_the_same_metrics() {
    let a = tempfile::tempdir().unwrap();
    train(cfg(a.path(), 20), false).unwrap();
    let b = tempfile::tempdir().unwrap();
    train(cfg(b.path(), 20), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-20")).unwrap();
    train(cfg(b.path(), 20), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&a.path().join("run")));
}
