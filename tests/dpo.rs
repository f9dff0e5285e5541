//! DPO and KTO end to end on a tiny model: pairs whose chosen response says "good" and
//! rejected one "bad" (or the same as unpaired labelled examples) — the policy learns to prefer
//! the marker, the losses start at their closed-form values (policy = reference: log 2 for
//! DPO, λ/2 for KTO with z₀ = 0), the sampled KL of an unchanged policy is exactly 0, and a
//! resumed run logs the same metrics and samples.

mod common;

use common::comparable_metrics;
use dfdx::prelude::*;
use rlhf::math::dpo::DpoLoss;
use rlhf::preference::PreferenceFormat;
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
        eval_every: 10,
        checkpoint_every: 10,
        sample_tokens: 8,
        ..Default::default()
    }
}

fn logp(model: &CausalLm<Cpu>, tok: &Tokenizer, prompt: &str, response: &str) -> f32 {
    let p = tok.encode(prompt).unwrap();
    let s = Seq { ids: [p.clone(), tok.encode(response).unwrap()].concat(), prompt_len: p.len() };
    let lpe = logprobs_and_entropy(model, &[&s], 0, 1.0, NoneTape).unwrap().as_vec();
    lpe[..s.resp_len()].iter().sum()
}

/// On an unseen prompt, the policy at `step` raised " good." against the reference by more
/// than 1 nat beyond " bad.".
fn assert_marker_learned(dir: &std::path::Path, step: usize) {
    let (reference, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&dir.join("init"), &Cpu::default()).unwrap();
    let ckpt = dir.join(format!("run/checkpoints/step-{step}"));
    let (policy, _) = rlhf_policies::checkpoint::load_with_tokenizer(&ckpt, &Cpu::default()).unwrap();
    let gain = logp(&policy, &tok, "the desk:", " good.") - logp(&reference, &tok, "the desk:", " good.");
    let drop = logp(&policy, &tok, "the desk:", " bad.") - logp(&reference, &tok, "the desk:", " bad.");
    assert!(gain > drop + 1.0, "log-ratio of the marker {gain}, of the other {drop}");
}

#[test]
fn dpo_raises_the_marker_and_starts_at_log_2() {
    let d = tempfile::tempdir().unwrap();
    let report = train(cfg(d.path(), 20), false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    let first = m[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "the first loss is log 2 (policy = reference): {first}");
    assert_eq!(m[19]["epoch"].as_f64(), Some(20.0 * 6.0 / report.pairs.0 as f64), "20 steps of 6 pairs");
    let marker = common::read_json(&d.path().join("run/checkpoints/step-20/checkpoint.json"));
    assert_eq!(marker["meta"]["held_out_loss"], m[19]["eval/loss"], "the held-out loss in the marker");
    let ev = report.eval.unwrap();
    assert!(ev.accuracy.unwrap() >= 0.99 && ev.margin > 0.0, "{ev:?}");
    assert_marker_learned(d.path(), 20);
}

/// The reference-free losses learn the marker too; their implicit rewards are β × the mean
/// token log-prob (negative), and ORPO's NLL term makes the chosen response likelier in
/// absolute terms, not only relative to the rejected one.
#[test]
fn simpo_and_orpo_raise_the_marker_without_a_reference() {
    for (loss, beta) in [(DpoLoss::Simpo { gamma: 0.5 }, 2.0), (DpoLoss::Orpo {}, 0.1)] {
        let d = tempfile::tempdir().unwrap();
        let report = train(DpoConfig { loss, beta, ..cfg(d.path(), 20) }, false).unwrap();
        let m = comparable_metrics(&d.path().join("run"));
        assert!(m.iter().all(|r| r["rewards/chosen"].as_f64().unwrap() < 0.0), "{loss:?}: {m:?}");
        assert!(report.eval.unwrap().accuracy.unwrap() >= 0.99, "{loss:?}");
        assert_marker_learned(d.path(), 20);
        if loss == (DpoLoss::Orpo {}) {
            let (first, last) = (m[0]["rewards/chosen"].as_f64().unwrap(), m[19]["rewards/chosen"].as_f64().unwrap());
            assert!(last > first + 0.05, "the chosen mean log-prob rises: {first} -> {last}");
        }
    }
    let e = train(
        DpoConfig { loss: DpoLoss::Simpo { gamma: f64::NAN }, ..cfg(tempfile::tempdir().unwrap().path(), 1) },
        false,
    );
    assert!(e.unwrap_err().to_string().contains("loss.gamma"));
}

#[test]
fn one_epoch_is_as_many_steps_as_the_training_pairs_fill() {
    let d = tempfile::tempdir().unwrap();
    let report = train(DpoConfig { epochs: Some(1.0), eval_every: 100, ..cfg(d.path(), 1) }, false).unwrap();
    // 60 pairs, 6 held out: 54 in steps of 6
    assert_eq!((report.pairs.0, report.steps), (54, 9));
    assert_eq!(comparable_metrics(&d.path().join("run")).last().unwrap()["epoch"].as_f64(), Some(1.0));
    assert_eq!(common::read_json(&d.path().join("run/config.json"))["steps"].as_u64(), Some(9));
}

#[test]
fn conversational_pairs_train_as_the_same_pairs_in_the_chat_template() {
    let d = tempfile::tempdir().unwrap();
    let base = cfg(d.path(), 4);
    let template = "{% for m in messages %}:{{ m.content }}{% endfor %}{% if add_generation_prompt %}:{% endif %}";
    std::fs::write(base.init.join("chat_template.jinja"), template).unwrap();
    let pairs: Vec<serde_json::Value> =
        std::fs::read_to_string(&base.data).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let as_chat = |p: &serde_json::Value, r: &str| serde_json::json!([{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[r]}]);
    let lines: Vec<String> = pairs
        .iter()
        .map(|p| serde_json::json!({"chosen": as_chat(p, "chosen"), "rejected": as_chat(p, "rejected")}).to_string())
        .collect();
    let chats = d.path().join("chats.jsonl");
    std::fs::write(&chats, lines.join("\n")).unwrap();
    let run = |sub: &str, c: DpoConfig| {
        train(DpoConfig { out_dir: d.path().join(sub), ..c }, false).unwrap();
        comparable_metrics(&d.path().join(sub))
    };
    let plain = run("plain", DpoConfig { chat: Some(Default::default()), ..base.clone() });
    let messages = serde_json::from_str(r#"{"kind": "messages"}"#).unwrap();
    let conversational = DpoConfig { data: chats, format: messages, ..base.clone() };
    assert_eq!(run("chats", conversational.clone()), plain);
    // `chat` with no system message or transcript (only template variables) changes nothing;
    // a system message is for text prompts
    assert_eq!(run("chats_chat", DpoConfig { chat: Some(Default::default()), ..conversational.clone() }), plain);
    let system = rlhf::prompt_format::ChatPrompt { system: Some("S".into()), ..Default::default() };
    let e = train(DpoConfig { chat: Some(system), out_dir: d.path().join("x"), ..conversational }, false);
    assert!(e.unwrap_err().to_string().contains("chat's system and transcript"));
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
    let samples = |d: &tempfile::TempDir| std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    assert_eq!(samples(&b), samples(&a));
    assert_eq!(samples(&a).lines().count(), 2 * 6, "6 held-out prompts sampled at steps 10 and 20");
}

/// The same data as unpaired KTO examples: "good." desirable, "bad." undesirable, each its
/// own record.
fn kto_cfg(dir: &std::path::Path, steps: usize) -> DpoConfig {
    let mut c = cfg(dir, steps);
    let things = ["food", "room", "view", "staff", "music", "price"];
    let lines: Vec<String> = (0..120)
        .map(|i| {
            let (completion, label) = if i % 2 == 0 { (" good.", true) } else { (" bad.", false) };
            let prompt = format!("the {}:", things[(i / 2) % things.len()]);
            serde_json::json!({"prompt": prompt, "completion": completion, "label": label}).to_string()
        })
        .collect();
    std::fs::write(dir.join("unpaired.jsonl"), lines.join("\n")).unwrap();
    c.data = dir.join("unpaired.jsonl");
    c.format = serde_json::from_str(r#"{"kind": "unpaired"}"#).unwrap();
    c.loss = DpoLoss::Kto { desirable_weight: 1.0, undesirable_weight: 1.0 };
    c.beta = 0.5;
    c
}

#[test]
fn kto_on_unpaired_examples_raises_the_marker_and_starts_at_half_its_weight() {
    let d = tempfile::tempdir().unwrap();
    let report = train(kto_cfg(d.path(), 20), false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    // policy = reference: every log-ratio and z₀ are 0, so each example costs λ·(1 − σ(0))
    assert!((m[0]["loss"].as_f64().unwrap() - 0.5).abs() < 1e-6, "{}", m[0]);
    assert_eq!(m[0]["kl"].as_f64(), Some(0.0));
    let ev = report.eval.unwrap();
    assert!(ev.accuracy.is_none(), "unpaired records form no pairs: {ev:?}");
    assert!(ev.margin > 0.0 && ev.rewards_chosen > 0.0, "{ev:?}");
    assert_marker_learned(d.path(), 20);
}

/// TRL's conversational unpaired records (kto-mix's layout) train exactly as the same records
/// as text under `chat: {}`; a completion that is not one assistant message is an error
/// naming its line.
#[test]
fn kto_on_conversational_unpaired_records_is_the_same_run_in_the_chat_template() {
    let d = tempfile::tempdir().unwrap();
    let base = kto_cfg(d.path(), 4);
    let template = "{% for m in messages %}:{{ m.content }}{% endfor %}{% if add_generation_prompt %}:{% endif %}";
    std::fs::write(base.init.join("chat_template.jinja"), template).unwrap();
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&base.data).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let as_chat = |r: &serde_json::Value| {
        serde_json::json!({"prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]})
    };
    let chats = d.path().join("chats.jsonl");
    std::fs::write(&chats, records.iter().map(|r| as_chat(r).to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    let run = |sub: &str, c: DpoConfig| {
        train(DpoConfig { out_dir: d.path().join(sub), ..c }, false).unwrap();
        comparable_metrics(&d.path().join(sub))
    };
    let plain = run("plain", DpoConfig { chat: Some(Default::default()), ..base.clone() });
    let format: PreferenceFormat = serde_json::from_str(r#"{"kind": "unpaired_messages"}"#).unwrap();
    let conversational = DpoConfig { data: chats.clone(), format, ..base.clone() };
    assert_eq!(run("chats", conversational.clone()), plain);
    // a completion of two messages, and the format under a pairwise loss
    let mut bad = records.iter().map(|r| as_chat(r).to_string()).collect::<Vec<_>>();
    bad[2] = serde_json::json!({"prompt": [{"role": "user", "content": "the food:"}], "label": true,
        "completion": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " good."}]})
    .to_string();
    std::fs::write(&chats, bad.join("\n")).unwrap();
    let e =
        format!("{:#}", train(DpoConfig { out_dir: d.path().join("x"), ..conversational.clone() }, false).unwrap_err());
    assert!(e.contains("chats.jsonl") && e.contains("line 3") && e.contains("one assistant message"), "{e}");
    let pairwise = DpoConfig { loss: DpoLoss::Sigmoid {}, out_dir: d.path().join("y"), ..conversational };
    assert!(train(pairwise, false).unwrap_err().to_string().contains("KTO"));
}

#[test]
fn kto_unpairs_pairs_and_keeps_their_halves_together_for_accuracy() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 10);
    c.loss = DpoLoss::Kto { desirable_weight: 1.0, undesirable_weight: 1.33 };
    c.val_fraction = 0.15;
    let report = train(c, false).unwrap();
    // 60 pairs → 120 examples; 18 held out (9 whole pairs)
    assert_eq!(report.pairs, (102, 18));
    let ev = report.eval.unwrap();
    assert!(ev.accuracy.unwrap() >= 0.99, "{ev:?}");
    // rankings have unlabelled middles: a clear error
    let mut c = cfg(d.path(), 10);
    c.loss = DpoLoss::Kto { desirable_weight: 1.0, undesirable_weight: 1.0 };
    c.format = serde_json::from_str(r#"{"kind": "ranking"}"#).unwrap();
    c.out_dir = d.path().join("ranking");
    let e = train(c, false).unwrap_err().to_string();
    assert!(e.contains("rankings") && e.contains("pairs.jsonl"), "{e}");
    // unpaired records with a pairwise loss: a clear error
    let mut c = kto_cfg(d.path(), 10);
    c.loss = DpoLoss::Sigmoid {};
    c.out_dir = d.path().join("unpaired");
    let e = train(c, false).unwrap_err().to_string();
    assert!(e.contains("unpaired.jsonl") && e.contains("KTO"), "{e}");
}

#[test]
fn a_separate_held_out_file_replaces_the_fraction_split() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 2);
    let val = d.path().join("val.jsonl");
    let pair = |t: &str| serde_json::json!({"prompt": format!("the {t}:"), "chosen": " good.", "rejected": " bad."});
    std::fs::write(&val, ["food", "room", "view"].map(|t| pair(t).to_string()).join("\n")).unwrap();
    c.val_data = Some(val);
    assert_eq!(train(c, false).unwrap().pairs, (60, 3));
    // KTO: every training record trains, the held-out file's records evaluate
    let mut c = kto_cfg(d.path(), 2);
    let val = d.path().join("val-unpaired.jsonl");
    let rec = |c: &str, l: bool| serde_json::json!({"prompt": "the food:", "completion": c, "label": l}).to_string();
    std::fs::write(&val, [rec(" good.", true), rec(" bad.", false)].join("\n")).unwrap();
    c.val_data = Some(val);
    c.out_dir = d.path().join("kto");
    assert_eq!(train(c, false).unwrap().pairs, (120, 2));
}

#[test]
fn unpaired_records_with_a_bad_label_name_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("u.jsonl");
    std::fs::write(&p, "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\n{\"prompt\": \"a\", \"completion\": \"b\", \"label\": 1}\n").unwrap();
    let format: PreferenceFormat = serde_json::from_str(r#"{"kind": "unpaired"}"#).unwrap();
    let e = rlhf::preference::read_labelled(&p, &format, None).unwrap_err().to_string();
    assert!(e.contains("u.jsonl") && e.contains("line 2") && e.contains("`label`"), "{e}");
}

#[test]
fn an_unchanged_policy_samples_with_zero_kl_and_samples_are_logged() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 2);
    c.optim.lr = 0.0;
    c.eval_every = 1;
    c.eval_samples = 3;
    c.sample_tokens = 8;
    train(c, false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    for r in &m {
        assert_eq!(r["eval/sample_kl"].as_f64(), Some(0.0), "{r}");
        assert_eq!(r["eval/loss"].as_f64().map(|l| (l - std::f64::consts::LN_2).abs() < 1e-6), Some(true));
    }
    let samples = std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = samples.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6, "3 prompts at each of 2 evaluations");
    assert!(rows.iter().all(|r| r["prompt"].as_str().unwrap().starts_with("the ") && r["tokens"].as_u64() <= Some(8)));
}

#[test]
fn chat_prompts_reach_the_pairs_and_the_samples() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 1);
    c.chat = Some(rlhf::prompt_format::ChatPrompt { system: Some("be brief".into()), ..Default::default() });
    (c.max_len, c.eval_every, c.eval_samples) = (48, 1, 2);
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("chat_template") && e.contains(&c.init.display().to_string()), "{e}");
    let template = "{% for m in messages %}{{ m.role[:1] }}: {{ m.content }} {% endfor %}\
                    {% if add_generation_prompt %}a:{% endif %}";
    std::fs::write(c.init.join("chat_template.jinja"), template).unwrap();
    train(c, false).unwrap();
    let samples = std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 2);
    for line in samples.lines() {
        let p = serde_json::from_str::<serde_json::Value>(line).unwrap()["prompt"].as_str().unwrap().to_string();
        assert!(p.starts_with("s: be brief u: the ") && p.ends_with(": a:"), "{p:?}");
    }
}

#[test]
fn a_beta_or_clip_that_would_train_nothing_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = train(DpoConfig { beta: 0.0, ..cfg(d.path(), 1) }, false).unwrap_err().to_string();
    assert!(e.contains("beta must be positive, got 0"), "{e}");
    let e = train(DpoConfig { grad_clip: f64::NAN, ..cfg(d.path(), 1) }, false).unwrap_err().to_string();
    assert!(e.contains("grad_clip must be positive, got NaN"), "{e}");
}
