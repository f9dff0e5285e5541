//! The `rlhf` binary as a user runs it: init → generate → pretrain (with --set) → eval, and
//! the errors a user sees for bad input.

use std::process::Command;

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf")).args(args).output().expect("run rlhf");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn init_generate_pretrain_eval() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).display().to_string();
    let (ok, _, err) = rlhf(&["init", "--preset", "tiny", "--out", &p("m"), "--seed", "1"]);
    assert!(ok, "{err}");
    let (ok, out, err) = rlhf(&["generate", "--model", &p("m"), "--prompt", "Hi", "--max-new-tokens", "5", "--greedy"]);
    assert!(ok && out.starts_with("Hi") && err.contains("5 new tokens"), "{out} {err}");

    std::fs::write(d.path().join("c.txt"), "to be or not to be, that is the question.\n".repeat(30)).unwrap();
    let cfg = serde_json::json!({
        "out_dir": p("run"), "files": [p("c.txt")],
        "model": {"model_type": "gpt2", "vocab_size": 1, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2},
        "block_size": 16, "batch_size": 4, "steps": 4, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "sample_tokens": 5
    });
    std::fs::write(d.path().join("cfg.json"), cfg.to_string()).unwrap();
    let (ok, out, err) = rlhf(&["pretrain", "--config", &p("cfg.json"), "--set", "steps=6"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["steps"], 6);
    let resolved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("run/config.json")).unwrap()).unwrap();
    assert_eq!(resolved["steps"], 6, "the resolved config is saved");

    let (ok, out, err) =
        rlhf(&["eval", "--model", &p("run/checkpoints/step-6"), "--data", &p("c.txt"), "--block", "16"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (loss, ppl) = (v["loss"].as_f64().unwrap(), v["perplexity"].as_f64().unwrap());
    assert!(loss > 0.0 && (ppl - loss.exp()).abs() < 1e-6 * ppl);
}

#[test]
fn user_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"files": ["x.txt"], "stepz": 3}"#).unwrap();
    let (ok, _, err) = rlhf(&["pretrain", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("cfg.json") && err.contains("stepz"), "{err}");
    let (ok, _, err) = rlhf(&["pretrain", "--set", "steps"]);
    assert!(!ok && err.contains("key.path=value"), "{err}");
    let (ok, _, err) = rlhf(&["generate", "--model", d.path().to_str().unwrap(), "--prompt", "x"]);
    assert!(!ok && err.contains("config.json"), "{err}");
    let (ok, out, _) = rlhf(&["--help"]);
    assert!(ok && out.contains("pretrain") && out.contains("generate") && out.contains("bench"));
}
