//! The `rlhf` binary as a user runs it: init → generate → pretrain (with --set) → eval, and
//! the errors a user sees for bad input.

use std::process::Command;

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf")).args(args).output().expect("run rlhf");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Writes `dir/c.txt` (a short corpus) and `dir/cfg.json`: a 1-layer char-level GPT-2
/// pretraining into `dir/run` for (steps, eval_every, checkpoint_every).
fn tiny_pretrain_config(dir: &std::path::Path, (steps, eval_every, checkpoint_every): (u64, u64, u64)) {
    let p = |s: &str| dir.join(s).display().to_string();
    std::fs::write(dir.join("c.txt"), "to be or not to be, that is the question.\n".repeat(30)).unwrap();
    let cfg = serde_json::json!({
        "out_dir": p("run"), "files": [p("c.txt")],
        "model": {"model_type": "gpt2", "vocab_size": 1, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2},
        "block_size": 16, "batch_size": 4, "steps": steps, "eval_every": eval_every, "eval_batches": 1,
        "checkpoint_every": checkpoint_every, "sample_tokens": 5
    });
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
}

#[test]
fn init_generate_pretrain_eval() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).display().to_string();
    let (ok, _, err) = rlhf(&["init", "--preset", "tiny", "--out", &p("m"), "--seed", "1"]);
    assert!(ok, "{err}");
    let (ok, out, err) = rlhf(&["generate", "--model", &p("m"), "--prompt", "Hi", "--max-new-tokens", "5", "--greedy"]);
    assert!(ok && out.starts_with("Hi") && err.contains("5 new tokens"), "{out} {err}");

    tiny_pretrain_config(d.path(), (4, 2, 2));
    let (ok, out, err) = rlhf(&["pretrain", "--config", &p("cfg.json"), "--set", "steps=6"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["steps"], 6);
    let resolved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("run/config.json")).unwrap()).unwrap();
    assert_eq!(resolved["steps"], 6, "the resolved config is saved");

    // a fresh run into the same folder is refused (it would mix two runs' metrics and
    // checkpoints); --overwrite replaces the run, and the metrics then hold one run only
    let (ok, _, err) = rlhf(&["pretrain", "--config", &p("cfg.json"), "--set", "steps=2"]);
    assert!(!ok && err.contains("run") && err.contains("--overwrite"), "{err}");
    let (ok, _, err) = rlhf(&["pretrain", "--config", &p("cfg.json"), "--set", "steps=2", "--overwrite"]);
    assert!(ok, "{err}");
    let metrics = std::fs::read_to_string(d.path().join("run/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert!(steps.iter().all(|&s| s <= 2), "only the new run's steps: {steps:?}");
    assert!(!d.path().join("run/checkpoints/step-6").exists(), "the old run's checkpoints are gone");
    let (ok, _, err) = rlhf(&["pretrain", "--config", &p("cfg.json"), "--set", "steps=6", "--overwrite"]);
    assert!(ok, "{err}");
    // an --overwrite run that stops before its first step leaves the previous run in place
    let missing = format!("files=[{:?}]", p("missing.txt"));
    let (ok, _, err) = rlhf(&["pretrain", "--config", &p("cfg.json"), "--set", &missing, "--overwrite"]);
    assert!(!ok && err.contains("missing.txt") && err.contains("holds the previous run again"), "{err}");
    assert!(d.path().join("run/checkpoints/step-6").is_dir() && !d.path().join("run/.overwritten").exists());
    let resolved = std::fs::read_to_string(d.path().join("run/config.json")).unwrap();
    assert!(!resolved.contains("missing.txt"), "the previous run's config is back");

    let (ok, out, err) =
        rlhf(&["eval", "--model", &p("run/checkpoints/step-6"), "--data", &p("c.txt"), "--block", "16"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (loss, ppl) = (v["loss"].as_f64().unwrap(), v["perplexity"].as_f64().unwrap());
    assert!(loss > 0.0 && (ppl - loss.exp()).abs() < 1e-6 * ppl);

    // completions of a prompts file, scored by a rule reward, each with its record's reference
    let prompts_json = ["to be", "that is"].map(|q| serde_json::json!({"q": q, "ans": "#### 4"}).to_string());
    std::fs::write(d.path().join("prompts.jsonl"), prompts_json.join("\n")).unwrap();
    let (model, prompts) = (p("run/checkpoints/step-6"), p("prompts.jsonl"));
    let generate = |extra: &[&str]| {
        let base =
            ["generate", "--model", &model, "--prompts", &prompts, "--prompt-field", "q", "--max-new-tokens", "8"];
        rlhf(&[&base[..], extra].concat())
    };
    let keywords = r#"{"kind": "keywords", "keywords": ["e"], "weight": 0.5}"#;
    let (ok, out, err) = generate(&["--reference-field", "ans", "--samples", "2", "--reward", keywords]);
    assert!(ok && err.contains("4 completions of 2 prompts"), "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["record"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 1, 2, 2]);
    for l in &lines {
        let want = 0.5 * l["completion"].as_str().unwrap().matches('e').count() as f64;
        assert_eq!((l["reward"].as_f64(), l["reference"].as_str()), (Some(want), Some("#### 4")), "{l}");
    }
    // best-of: the same samples (same seed and batch), each prompt's first highest-reward one
    let all = |extra: &[&str]| -> Vec<serde_json::Value> {
        let (ok, out, err) = generate(&[&["--samples", "3", "--reward", keywords], extra].concat());
        assert!(ok, "{err}");
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (every, best) = (all(&[]), all(&["--best-of"]));
    assert_eq!(best.len(), 2, "one line per prompt");
    for (record, b) in [1u64, 2].iter().zip(&best) {
        let samples: Vec<&serde_json::Value> = every.iter().filter(|l| l["record"] == *record).collect();
        let top = samples.iter().map(|l| l["reward"].as_f64().unwrap()).fold(f64::MIN, f64::max);
        let mut want = (*samples.iter().find(|l| l["reward"].as_f64() == Some(top)).unwrap()).clone();
        want["best_of"] = 3.into();
        assert_eq!(b, &want);
    }
    let (ok, _, err) = generate(&["--best-of", "--samples", "2"]);
    assert!(!ok && err.contains("best-of needs a reward"), "{err}");
    // the answer reward without reference answers is refused
    let (ok, _, err) = generate(&["--reward", r#"{"kind": "answer"}"#]);
    assert!(!ok && err.contains("reference_field"), "{err}");
    // a prompt that leaves no room in the model's 32 positions: an error, or with
    // --max-prompt-len skipped and counted, the others keeping their record numbers
    let long = serde_json::json!({"q": "to be or not to be, that is the question"}).to_string();
    std::fs::write(d.path().join("long.jsonl"), [long.as_str(), &prompts_json[0]].join("\n")).unwrap();
    let base = ["generate", "--model", &model, "--prompts", &p("long.jsonl"), "--prompt-field", "q"];
    let (ok, _, err) = rlhf(&[&base[..], &["--max-new-tokens", "16"]].concat());
    assert!(!ok && err.contains("32 positions"), "{err}");
    let (ok, out, err) = rlhf(&[&base[..], &["--max-new-tokens", "16", "--max-prompt-len", "16"]].concat());
    assert!(ok && err.contains("1 completions of 2 prompts (1 skipped as too long)"), "{err}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((line["record"].as_u64(), line["prompt"].as_str()), (Some(2), Some("to be")), "{line}");

    // JSONL: SFT's loss on the responses; a record beyond the model's 32 positions is skipped
    let records = [("to be", " or not"), ("that is", " the question."), ("to be", &" or not".repeat(9))];
    let lines: Vec<String> = records.iter().map(|(p, r)| serde_json::json!({"q": p, "a": r}).to_string()).collect();
    std::fs::write(d.path().join("pairs.jsonl"), lines.join("\n")).unwrap();
    let (ok, out, err) = rlhf(&[
        "eval",
        "--model",
        &p("run/checkpoints/step-6"),
        "--data",
        &p("pairs.jsonl"),
        "--prompt-field",
        "q",
        "--response-field",
        "a",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tok = rlhf_policies::Tokenizer::from_file(&d.path().join("run/checkpoints/step-6/tokenizer.json")).unwrap();
    let response_tokens: usize = records[..2].iter().map(|(_, r)| tok.encode(r).unwrap().len() + 1).sum();
    assert_eq!((v["examples"].as_u64(), v["skipped"].as_u64()), (Some(2), Some(1)), "{v}");
    assert_eq!(v["tokens"].as_u64(), Some(response_tokens as u64), "response tokens and EOS only");
    assert!(v["loss"].as_f64().unwrap() > 0.0);
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
    std::fs::write(&cfg, r#"{"files": ["x.txt"]}"#).unwrap();
    let (ok, _, err) = rlhf(&["pretrain", "--config", cfg.to_str().unwrap(), "--set", "device=gpu"]);
    assert!(!ok && err.contains("device") && err.contains("cuda"), "{err}");
    let (ok, _, err) = rlhf(&["report", d.path().to_str().unwrap()]);
    assert!(!ok && err.contains("not a run folder"), "{err}");
    assert!(!d.path().join("report.html").exists(), "no empty report");
    let (ok, _, err) = rlhf(&["sft", "--resume", d.path().to_str().unwrap()]);
    assert!(!ok && err.contains("--resume") && err.contains("not a run folder"), "{err}");
    let (ok, _, err) = rlhf(&["pretrain", "--config", cfg.to_str().unwrap(), "--set", "stepz=3"]);
    assert!(!ok && err.contains("--set stepz=3") && err.contains("unknown field"), "{err}");
    #[cfg(not(feature = "cuda"))]
    {
        let (ok, _, err) = rlhf(&["pretrain", "--config", cfg.to_str().unwrap(), "--set", "device=cuda"]);
        assert!(!ok && err.contains("without the `cuda` feature"), "{err}");
    }
}

#[test]
fn reward_then_ppo_with_reward_model_then_report() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).display().to_string();
    // a tiny char-level policy
    std::fs::write(d.path().join("c.txt"), "review: good food. review: bad food.\n".repeat(30)).unwrap();
    let pre = serde_json::json!({
        "out_dir": p("pre"), "files": [p("c.txt")], "tokenizer": {"kind": "char"},
        "model": {"model_type": "gpt2", "vocab_size": 1, "n_positions": 48, "n_embd": 32, "n_layer": 1, "n_head": 2},
        "block_size": 16, "batch_size": 4, "steps": 2, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "sample_tokens": 4
    });
    std::fs::write(d.path().join("pre.json"), pre.to_string()).unwrap();
    let (ok, _, err) = rlhf(&["pretrain", "--config", &p("pre.json")]);
    assert!(ok, "{err}");
    let prefs: Vec<String> = (0..8)
        .map(|_| {
            serde_json::json!({"prompt": "review:", "chosen": " good food.", "rejected": " bad food."}).to_string()
        })
        .collect();
    std::fs::write(d.path().join("prefs.jsonl"), prefs.join("\n")).unwrap();
    // a run folder as the model: its newest checkpoint, named in the new run's config
    let rm = serde_json::json!({"out_dir": p("rm"), "init": p("pre"), "data": p("prefs.jsonl"),
        "val_fraction": 0.25, "max_len": 32, "batch_size": 2, "steps": 2, "eval_every": 2, "checkpoint_every": 2});
    std::fs::write(d.path().join("rm.json"), rm.to_string()).unwrap();
    let (ok, out, err) = rlhf(&["reward", "--config", &p("rm.json")]);
    assert!(ok && err.contains("a run folder; using its newest checkpoint"), "{err}");
    let resolved = |run: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.path().join(run).join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(resolved("rm")["init"].as_str(), Some(p("pre/checkpoints/step-2").as_str()));
    // the library's loader, given the run folder itself, says what to pass
    let e = rlhf_policies::checkpoint::load_with_tokenizer(&d.path().join("pre"), &dfdx::tensor::Cpu::default())
        .map(|_: (rlhf_policies::CausalLm<dfdx::tensor::Cpu>, _)| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type") && e.contains("checkpoints/step-N"), "{e}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["normalization"]["gain"].is_number(), "{out}");
    assert!(d.path().join("rm/report.html").is_file(), "every stage writes its report");

    std::fs::write(d.path().join("prompts.jsonl"), "{\"prompt\": \"review:\"}\n").unwrap();
    let ppo = serde_json::json!({"out_dir": p("ppo"), "policy": p("pre/checkpoints/step-2"), "prompts": p("prompts.jsonl"),
        "batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6, "max_prompt_len": 16, "iterations": 2, "ppo_epochs": 1,
        "checkpoint_every": 2, "sample_every": 1});
    std::fs::write(d.path().join("ppo.json"), ppo.to_string()).unwrap();
    let (ok, _, err) = rlhf(&["ppo", "--config", &p("ppo.json")]);
    assert!(!ok && err.contains("reward is required"), "{err}");
    let (ok, out, err) = rlhf(&["ppo", "--config", &p("ppo.json"), "--reward-model", &p("rm")]);
    assert!(ok, "{err}");
    assert_eq!(resolved("ppo")["reward"]["path"].as_str(), Some(p("rm/checkpoints/step-2").as_str()));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["scores"].as_array().unwrap().len(), 2);
    assert!(d.path().join("ppo/checkpoints/step-2/value/config.json").is_file(), "critic from the reward model");
    let (ok, out, err) = rlhf(&["report", &p("ppo")]);
    assert!(ok && out.trim().ends_with("report.html"), "{out} {err}");
    let html = std::fs::read_to_string(d.path().join("ppo/report.html")).unwrap();
    assert!(html.contains("KL to the reference") && html.contains("<svg"));
    // two runs on one page: each line named by its run
    let (ok, out, err) = rlhf(&["report", &p("pre"), &p("rm"), "--out", &p("cmp.html")]);
    assert!(ok && out.trim().ends_with("cmp.html"), "{out} {err}");
    let html = std::fs::read_to_string(d.path().join("cmp.html")).unwrap();
    assert!(html.contains("pre: loss") && html.contains("rm: loss") && html.contains("<svg"));
    let (ok, _, err) = rlhf(&["report", &p("pre"), &p("nope"), "--out", &p("cmp2.html")]);
    assert!(!ok && err.contains("nope") && err.contains("not a run folder"), "{err}");
    let (ok, _, err) = rlhf(&["ppo", "--config", &p("ppo.json"), "--set", "cliprange_typo=0.1"]);
    assert!(!ok && err.contains("cliprange_typo"), "{err}");

    // the reward model on its preference file: every pair counted, accuracy in [0, 1]
    let (ok, out, err) = rlhf(&["eval", "--model", &p("rm/checkpoints/step-2"), "--data", &p("prefs.jsonl")]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["comparisons"].as_u64(), v["pairs"].as_u64(), v["skipped"].as_u64()), (Some(8), Some(8), Some(0)));
    assert!((0.0..=1.0).contains(&v["stats"]["accuracy"].as_f64().unwrap()), "{v}");

    // the PPO policy's completions of a prompts file, scored by the reward model
    let gen = |out: &str| {
        rlhf(&[
            "generate",
            "--model",
            &p("ppo/checkpoints/step-2"),
            "--prompts",
            &p("prompts.jsonl"),
            "--samples",
            "3",
            "--batch",
            "2",
            "--max-new-tokens",
            "6",
            "--seed",
            "5",
            "--reward-model",
            &p("rm/checkpoints/step-2"),
            "--out",
            &p(out),
        ])
    };
    let (ok, _, err) = gen("gen.jsonl");
    assert!(ok && err.contains("3 completions of 1 prompts"), "{err}");
    let text = std::fs::read_to_string(d.path().join("gen.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["sample"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    // each reward is the reward model's normalised score of prompt ⧺ completion (⧺ EOS if it
    // stopped there), in the reward model's own tokens
    let rm_dir = d.path().join("rm/checkpoints/step-2");
    let (mut rm, norm) =
        rlhf_policies::LearnedReward::load_pretrained(&rm_dir, &dfdx::prelude::Cpu::default()).unwrap();
    rm.norm = norm.map(|n| n.as_score_norm());
    let tok = rlhf_policies::Tokenizer::from_file(&rm_dir.join("tokenizer.json")).unwrap();
    let eos = tok.eos_for(&rm.model.config).unwrap();
    for l in &lines {
        assert_eq!((l["record"].as_u64(), l["prompt"].as_str()), (Some(1), Some("review:")), "{l}");
        let completion = l["completion"].as_str().unwrap();
        let mut response_ids = tok.encode(completion).unwrap();
        response_ids.extend(l["finished"].as_bool().unwrap().then_some(eos));
        let input = rlhf_envs::RewardInput {
            prompt: "review:".into(),
            response: completion.into(),
            prompt_ids: tok.encode("review:").unwrap(),
            response_ids,
            reference: None,
        };
        let want = rlhf_envs::RewardModel::score(&mut rm, &[input]).unwrap()[0] as f64;
        assert!((l["reward"].as_f64().unwrap() - want).abs() < 1e-5, "{l} vs {want}");
    }
    // the same seed and batch size give the same lines
    let (ok, _, err) = gen("gen2.jsonl");
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(d.path().join("gen2.jsonl")).unwrap(), text);
    // --reward takes run folders inside a spec too: an ensemble of the run twice, its mean the
    // same rewards
    let spec = format!(
        r#"{{"kind": "ensemble", "combine": {{"kind": "mean"}}, "members": [{{"kind": "model", "path": {0:?}}},
            {{"kind": "model", "path": {0:?}}}]}}"#,
        p("rm")
    );
    let args = [&p("ppo/checkpoints/step-2"), "--prompts", &p("prompts.jsonl"), "--samples", "3", "--batch", "2"];
    let more = ["--max-new-tokens", "6", "--seed", "5", "--reward", &spec, "--out", &p("gen3.jsonl")];
    let (ok, _, err) = rlhf(&[&["generate", "--model"], &args[..], &more[..]].concat());
    assert!(ok && err.contains("a run folder; using its newest checkpoint"), "{err}");
    let rewards = |f: &str| -> Vec<f64> {
        let text = std::fs::read_to_string(d.path().join(f)).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(rewards("gen3.jsonl"), rewards("gen.jsonl"));
}

#[test]
fn print_config_shows_the_resolved_config_and_runs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("never");
    let (ok, out, err) = rlhf(&[
        "ppo",
        "--print-config",
        "--set",
        &format!("out_dir={}", out_dir.display()),
        "--set",
        "optim.lr=3e-6",
        "--reward-model",
        "rm_dir",
    ]);
    assert!(ok, "{err}");
    let cfg: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cfg["optim"]["lr"], 3e-6, "--set applies");
    assert_eq!(cfg["cliprange"], 0.2, "the documented default");
    assert!(out.contains("rm_dir"), "the command's own flags are in it: {out}");
    assert!(!out_dir.exists(), "nothing ran");
}

#[test]
fn algorithm_commands_and_loss_flags_pick_their_variant() {
    for (command, kind) in
        [("rloo", "rloo"), ("reinforce-pp", "reinforce_pp"), ("remax", "remax"), ("online-dpo", "online_dpo")]
    {
        let (ok, out, err) = rlhf(&[command, "--print-config"]);
        assert!(ok, "{command}: {err}");
        let cfg: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(cfg["algo"]["kind"], kind, "{command}");
    }
    for loss in ["simpo", "orpo", "ipo"] {
        let (ok, out, err) = rlhf(&["dpo", "--loss", loss, "--print-config"]);
        assert!(ok, "{loss}: {err}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["loss"]["kind"], loss);
    }
    // rlhf nlpo: PPO with NLPO's defaults, or the settings given
    let nlpo = |extra: &[&str]| {
        let (ok, out, err) = rlhf(&[&["nlpo", "--print-config"], extra].concat());
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["nlpo"].clone()
    };
    assert_eq!(nlpo(&[])["top_mask"], 0.9);
    assert_eq!(nlpo(&["--set", r#"nlpo={"top_mask": 0.5}"#])["top_mask"], 0.5);
    let (ok, out, _) = rlhf(&["ppo", "--print-config"]);
    assert!(ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["nlpo"].is_null());
}

/// `rlhf chat`: each input line is a user message answered in the model's chat template, the
/// conversation carried from turn to turn (here visible as a growing prompt that eventually
/// no longer fits and loses its oldest exchange); `/reset` forgets it, a message too long for
/// the model is an error that leaves the conversation going, and a model without a template
/// is an error.
#[test]
fn chat_answers_line_by_line_in_the_template() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let (ok, _, err) = rlhf(&["init", "--preset", "tiny", "--out", &m.display().to_string(), "--seed", "1"]);
    assert!(ok, "{err}");
    let chat = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args(["chat", "--model", &m.display().to_string(), "--greedy", "--max-new-tokens", "8"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, err) = chat("hi\n");
    assert!(!ok && err.contains("chat_template"), "{err}");
    let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    std::fs::write(m.join("chat_template.jinja"), template).unwrap();
    let long = "x".repeat(300);
    let turn = "a message of about sixty characters, to fill the positions..";
    let input = format!("hi\n/reset\n{long}\nhello\n{}/quit\nnever read\n", format!("{turn}\n").repeat(4));
    let (ok, out, err) = chat(&input);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 6, "one reply per message that fits: {out:?}");
    assert!(err.contains("[the conversation is forgotten]"), "{err}");
    assert!(err.contains("error: the message takes") && err.contains("256 positions"), "{err}");
    assert!(err.contains("[the oldest exchange is forgotten"), "the growing conversation outgrew 256 positions: {err}");
    assert_eq!(err.matches(" tok/s").count(), 6, "{err}");
}

/// Starts `rlhf pretrain` with `args`, waits until its metrics log has a line, sends `signal`,
/// and returns (exit status, stderr).
#[cfg(unix)]
fn signalled_pretrain(args: &[&str], metrics: &std::path::Path, signal: i32) -> (Option<i32>, String) {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .arg("pretrain")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run rlhf");
    let lines = || std::fs::read_to_string(metrics).map(|t| t.lines().count()).unwrap_or(0);
    let start = (lines(), Instant::now());
    // a step past the ones already logged: the loop (and the handler installed before it) runs
    while lines() <= start.0 {
        assert!(child.try_wait().unwrap().is_none(), "rlhf ended before it was signalled");
        assert!(start.1.elapsed() < Duration::from_secs(300), "no step logged in 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's pid, which is still ours to wait for
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

/// Ctrl-C (SIGINT) or SIGTERM: the step finishes, a checkpoint is written there, the process
/// exits with 130 and says how to continue; `--resume` then carries on from that step.
#[cfg(unix)]
#[test]
fn a_signal_stops_a_run_at_a_checkpoint_and_resume_carries_on() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).display().to_string();
    tiny_pretrain_config(d.path(), (100_000_000, 1000, 1_000_000));
    let metrics = d.path().join("run/metrics.jsonl");
    let stopped_at = |err: &str| -> usize {
        let (_, rest) = err.split_once("stopped after step ").unwrap_or_else(|| panic!("{err}"));
        rest.split(' ').next().unwrap().parse().unwrap()
    };
    let run = rlhf::run::RunDir::create(d.path().join("run")).unwrap();
    let mut last = 0;
    for (signal, args) in [(libc::SIGINT, ["--config", &p("cfg.json")]), (libc::SIGTERM, ["--resume", &p("run")])] {
        let (code, err) = signalled_pretrain(&args, &metrics, signal);
        assert_eq!(code, Some(130), "{err}");
        assert!(err.contains(&format!("continue it with: rlhf pretrain --resume {}", p("run"))), "{err}");
        let step = stopped_at(&err);
        assert!(step > last, "{step} after {last}");
        assert_eq!(run.latest_checkpoint().unwrap().map(|c| c.0), Some(step));
        let logged: Vec<u64> = std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(logged, (1..=step as u64).collect::<Vec<_>>(), "one line per step, resumed where it stopped");
        last = step;
    }
}
