//! The reward model: Bradley–Terry math equals TRL's (fixture), scores are read at the last
//! real token whatever the padding, a tiny model learns a marker word, hh-rlhf conversations
//! split at the last shared assistant turn, and the trained checkpoint loads back as a
//! normalised `RewardModel` for the env.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf::math::preference::{bradley_terry_loss, preference_stats};
use rlhf::preference::TokComparison;
use rlhf::preference::{read_comparisons, PreferenceFormat};
use rlhf::stages::reward::{reward_loss, train};
use rlhf_envs::{RewardInput, RewardModel};
use rlhf_policies::{Batch, CausalLm, LearnedReward, ModelConfig, Tokenizer};

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

#[test]
fn bradley_terry_equals_the_trl_fixture() {
    let f = read_json(&fixture("preference/expected.json"))["bradley_terry"].clone();
    let v = |k: &str| -> Vec<f64> { f32s(&f["inputs"][k]).iter().map(|&x| x as f64).collect() };
    let out = |k: &str| f["outputs"][k].as_f64().unwrap();
    let (rc, rr, m) = (v("rewards_chosen"), v("rewards_rejected"), v("margin"));
    let eta = f["params"]["center_rewards_coefficient"].as_f64().unwrap();
    let w = vec![1.0 / rc.len() as f64; rc.len()];
    let plain = bradley_terry_loss(&rc, &rr, &[], &w, 0.0);
    for (g, want) in plain.per_pair_loss.iter().zip(f32s(&f["outputs"]["per_pair_loss"])) {
        assert!(close(*g, want as f64), "{g} vs {want}");
    }
    let margin = bradley_terry_loss(&rc, &rr, &m, &w, 0.0);
    for (g, want) in margin.per_pair_loss.iter().zip(f32s(&f["outputs"]["per_pair_loss_margin"])) {
        assert!(close(*g, want as f64), "{g} vs {want}");
    }
    let cases = [
        (plain.loss, "loss"),
        (margin.loss, "loss_margin"),
        (bradley_terry_loss(&rc, &rr, &[], &w, eta).loss, "loss_center"),
        (bradley_terry_loss(&rc, &rr, &m, &w, eta).loss, "loss_margin_center"),
    ];
    for (got, key) in cases {
        assert!(close(got, out(key)), "{key}: {got} vs {}", out(key));
    }
    let s = preference_stats(&rc, &rr);
    assert_eq!(s.accuracy, 2.0 / 6.0, "the exact tie counts as wrong");
    for (got, key) in [
        (s.margin_mean, "margin_mean"),
        (s.center_penalty, "center_penalty"),
        (s.reward_min, "min_reward"),
        (s.reward_mean, "mean_reward"),
        (s.reward_max, "max_reward"),
    ] {
        assert!(close(got, out(key)), "{key}: {got} vs {}", out(key));
    }
}

fn tiny_rm(vocab: usize, seed: u64) -> LearnedReward<Cpu> {
    let model = CausalLm::new(ModelConfig::gpt2_preset(vocab, 32, 2, 2, 64), &Cpu::default(), seed).unwrap();
    LearnedReward::from_backbone(model, 1, seed)
}

#[test]
fn the_score_is_read_at_the_last_real_token_under_left_and_right_padding() {
    let rm = tiny_rm(20, 4);
    let seqs = vec![vec![3, 4, 5, 6, 7, 8], vec![9, 10], vec![11, 12, 13, 2]];
    let right = rm.forward(&Batch::right_padded(&seqs, 1).unwrap(), NoneTape).unwrap().as_vec();
    let left = rm.forward(&Batch::left_padded(&seqs, 1).unwrap(), NoneTape).unwrap().as_vec();
    for (i, s) in seqs.iter().enumerate() {
        let alone = rm.forward(&Batch::unpadded(std::slice::from_ref(s)).unwrap(), NoneTape).unwrap().as_vec()[0];
        assert!(
            (right[i] - alone).abs() < 1e-5 && (left[i] - alone).abs() < 1e-5,
            "{i}: {} {} {alone}",
            right[i],
            left[i]
        );
    }
}

#[test]
fn a_ranking_weighs_as_one_comparison_of_all_its_pairs() {
    let rm = tiny_rm(20, 5);
    let ranked = TokComparison {
        line: 1,
        prompt_ids: vec![3, 4],
        responses: vec![vec![5, 0], vec![6, 7, 0], vec![8, 0]],
        margin: None,
    };
    let pair = TokComparison { line: 2, prompt_ids: vec![9], responses: vec![vec![10, 0], vec![11, 0]], margin: None };
    let (loss, scores) = reward_loss(&rm, &[&ranked, &pair], 0.01, NoneTape).unwrap();
    let s: Vec<f64> = scores.iter().map(|&x| x as f64).collect();
    let bt = |c: f64, r: f64| bradley_terry_loss(&[c], &[r], &[], &[1.0], 0.01).loss;
    let want = 0.5 * (bt(s[0], s[1]) + bt(s[0], s[2]) + bt(s[1], s[2])) / 3.0 + 0.5 * bt(s[3], s[4]);
    assert!((loss.array() as f64 - want).abs() < 1e-5, "{} vs {want}", loss.array());
}

#[test]
fn the_loss_gradient_reaches_the_backbone_and_the_head() {
    let rm = tiny_rm(20, 6);
    let c =
        TokComparison { line: 1, prompt_ids: vec![3, 4], responses: vec![vec![5, 0], vec![6, 0]], margin: Some(0.5) };
    let anchor: Tensor<Rank0, f32, Cpu> = Cpu::default().zeros();
    let (_, tape) = anchor.traced(Gradients::leaky()).split_tape();
    let (loss, _) = reward_loss(&rm, &[&c], 0.01, tape).unwrap();
    let grads = loss.backward();
    let gw = grads.get(&rm.head.w).as_vec();
    assert!(grads.get(&rm.model.wte).as_vec().iter().any(|&g| g != 0.0), "the backbone gets a gradient");
    // finite difference on one head weight
    let h = 1e-2f32;
    let mut bumped = LearnedReward { model: rm.model.clone(), head: rm.head.clone(), norm: None, pad_id: 1 };
    let mut w = rm.head.w.as_vec();
    w[3] += h;
    bumped.head.w = Cpu::default().tensor_from_vec(w, (32, 1));
    let up = reward_loss(&bumped, &[&c], 0.01, NoneTape).unwrap().0.array();
    let base = reward_loss(&rm, &[&c], 0.01, NoneTape).unwrap().0.array();
    assert!(((up - base) / h - gw[3]).abs() < 2e-3, "{} vs {}", (up - base) / h, gw[3]);
}

#[test]
fn learns_a_marker_word_and_loads_back_as_a_normalised_reward_model() {
    let d = tempfile::tempdir().unwrap();
    let report = train(marker_cfg(d.path(), 120), false).unwrap();
    let ev = report.eval.as_ref().unwrap();
    assert_eq!(report.val_comparisons, 60);
    let last = comparable_metrics(&d.path().join("run")).pop().unwrap();
    assert_eq!(last["epoch"].as_f64(), Some(120.0 * 8.0 / report.train_comparisons as f64), "120 steps of 8");
    let marker = read_json(&d.path().join("run/checkpoints/step-120/checkpoint.json"));
    assert_eq!(marker["meta"]["held_out_loss"], last["eval/loss"], "the held-out loss in the marker");
    assert!(ev.stats.accuracy >= 0.95, "held-out accuracy {}", ev.stats.accuracy);
    let norm = report.normalization.clone().unwrap();
    // the final checkpoint is an HF sequence-classification folder with the normalisation
    let ckpt = d.path().join("run/checkpoints/step-120");
    let cfg_json = read_json(&ckpt.join("config.json"));
    assert_eq!(cfg_json["architectures"][0], "GPT2ForSequenceClassification");
    assert_eq!(cfg_json["reward_normalization"]["gain"].as_f64().unwrap() as f32, norm.gain);
    let tensors = rlhf_policies::checkpoint::read_safetensors(&ckpt.join("model.safetensors")).unwrap();
    assert_eq!(tensors["score.weight"].shape, vec![1, 32]);
    assert!(!tensors.contains_key("score.bias") && !tensors.contains_key("lm_head.weight"));
    // loaded with its normalisation, the reference responses score mean 0 and std 1
    let (mut rm, stored) = LearnedReward::load_pretrained(&ckpt, &Cpu::default()).unwrap();
    assert_eq!(stored.as_ref(), Some(&norm));
    rm.norm = Some(norm.as_score_norm());
    let tok = Tokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let comps = read_comparisons(&d.path().join("prefs.jsonl"), &PreferenceFormat::default(), None).unwrap();
    let inputs: Vec<RewardInput> = comps[180..]
        .iter()
        .flat_map(|c| c.responses.iter().map(|r| (c.prompt.clone(), r.clone())))
        .map(|(p, r)| RewardInput {
            prompt_ids: tok.encode(&p).unwrap(),
            response_ids: [tok.encode(&r).unwrap(), vec![0]].concat(),
            prompt: p,
            response: r,
            reference: None,
        })
        .collect();
    let scores = rm.score(&inputs).unwrap();
    let mean = scores.iter().sum::<f32>() / scores.len() as f32;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / scores.len() as f32).sqrt();
    assert!(mean.abs() < 1e-3 && (std - 1.0).abs() < 1e-3, "mean {mean} std {std}");
    // and the chosen response (with the marker) outscores the rejected one
    assert!(scores.chunks(2).filter(|p| p[0] > p[1]).count() as f64 >= 0.95 * 60.0);
    // `rlhf eval` on the held-out records gives the run's last evaluation
    let val = d.path().join("val.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(d.path().join("prefs.jsonl")).unwrap().lines().map(String::from).collect();
    std::fs::write(&val, lines[180..].join("\n")).unwrap();
    let data = rlhf::eval::EvalData {
        data: val,
        block: None,
        batch: 8,
        fields: ("prompt".into(), "response".into()),
        messages_field: None,
        assistant_turns: Default::default(),
        prompt_template: "{prompt}".into(),
        chat: false,
        format: PreferenceFormat::default(),
    };
    let got = rlhf::eval::evaluate(&ckpt, &data, &Cpu::default()).unwrap();
    assert_eq!((got["comparisons"].as_u64(), got["pairs"].as_u64()), (Some(60), Some(60)));
    assert_eq!(got["stats"]["accuracy"].as_f64(), Some(ev.stats.accuracy));
    assert!((got["stats"]["margin_mean"].as_f64().unwrap() - ev.stats.margin_mean).abs() < 1e-5, "{got}");
}

/// `optim.num_layers_unfrozen: 1` on the 2-block backbone: the embeddings and block 0 stay
/// as they were (their backward pass skipped), block 1, the final norm and the head train.
#[test]
fn only_the_top_block_and_the_head_train_with_num_layers_unfrozen() {
    use rlhf_policies::checkpoint::read_safetensors;
    let d = tempfile::tempdir().unwrap();
    let mut c = marker_cfg(d.path(), 3);
    (c.optim.num_layers_unfrozen, c.checkpoint_every) = (Some(1), 3);
    train(c.clone(), false).unwrap();
    let before = read_safetensors(&c.init.join("model.safetensors")).unwrap();
    let after = read_safetensors(&d.path().join("run/checkpoints/step-3/model.safetensors")).unwrap();
    let bottom = |n: &str| n.contains(".wte.") || n.contains(".wpe.") || n.contains(".h.0.");
    for (name, t) in &before {
        assert_eq!(after[name].data == t.data, bottom(name), "{name}");
    }
    assert_eq!(before.keys().filter(|n| bottom(n)).count(), 2 + 12);
    assert!(after.contains_key("score.weight"));
}

#[test]
fn a_separate_held_out_file_replaces_the_fraction_split() {
    let d = tempfile::tempdir().unwrap();
    let mut c = marker_cfg(d.path(), 2);
    let val = d.path().join("val.jsonl");
    marker_data(&val, 7);
    c.val_data = Some(val);
    let report = train(c, false).unwrap();
    assert_eq!((report.train_comparisons, report.val_comparisons), (240, 7));
    assert!(report.eval.is_some());
}

#[test]
fn resume_gives_the_same_metrics_as_an_uninterrupted_run() {
    let a = tempfile::tempdir().unwrap();
    train(marker_cfg(a.path(), 50), false).unwrap();
    let b = tempfile::tempdir().unwrap();
    train(marker_cfg(b.path(), 50), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-50")).unwrap();
    train(marker_cfg(b.path(), 50), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&a.path().join("run")));
    let norm =
        |p: &std::path::Path| read_json(&p.join("run/checkpoints/step-50/config.json"))["reward_normalization"].clone();
    assert_eq!(norm(a.path()), norm(b.path()));
}

#[test]
fn conversations_are_split_and_a_bad_record_is_named_by_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("hh.jsonl");
    let ok = serde_json::json!({"chosen": "\n\nHuman: hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."});
    let bad = serde_json::json!({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: x"});
    let format: PreferenceFormat = serde_json::from_str(r#"{"kind": "conversations"}"#).unwrap();
    std::fs::write(&p, format!("{ok}\n")).unwrap();
    let c = read_comparisons(&p, &format, None).unwrap();
    assert_eq!(c[0].prompt, "\n\nHuman: hi\n\nAssistant:");
    assert_eq!(c[0].responses, vec![" Hello there.", " Go away."]);
    std::fs::write(&p, format!("{ok}\n{bad}\n")).unwrap();
    let e = read_comparisons(&p, &format, None).unwrap_err().to_string();
    assert!(e.contains("hh.jsonl: line 2") && e.contains("cannot be split"), "{e}");
}

#[test]
fn conversational_pairs_render_their_shared_turns_as_the_prompt() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("chats.jsonl");
    let chat = rlhf_policies::chat::ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        "",
        "",
    )
    .unwrap();
    let msg = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let (user, sys) = (msg("user", "hi"), msg("system", "be kind"));
    let implicit = serde_json::json!({"chosen": [sys, user, msg("assistant", " Hello.")],
        "rejected": [sys, user, msg("assistant", "Go away.")]});
    let explicit =
        serde_json::json!({"q": [user], "chosen": [msg("assistant", "Hello.")], "rejected": [msg("assistant", "No.")]});
    std::fs::write(&p, implicit.to_string()).unwrap();
    let format: PreferenceFormat = serde_json::from_str(r#"{"kind": "messages"}"#).unwrap();
    let c = read_comparisons(&p, &format, Some(&chat)).unwrap();
    assert_eq!(
        (c[0].prompt.as_str(), &c[0].responses[..]),
        ("<system>be kind<user>hi<assistant>", &["Hello.".to_string(), "Go away.".to_string()][..])
    );
    std::fs::write(&p, explicit.to_string()).unwrap();
    let with_prompt: PreferenceFormat = serde_json::from_str(r#"{"kind": "messages", "prompt_field": "q"}"#).unwrap();
    let c = read_comparisons(&p, &with_prompt, Some(&chat)).unwrap();
    assert_eq!((c[0].prompt.as_str(), c[0].responses[1].as_str()), ("<user>hi<assistant>", "No."));
    // errors name the file, line and field
    let cases = [
        (
            &format,
            serde_json::json!({"chosen": [user, msg("assistant", "a")], "rejected": [msg("user", "yo"), msg("assistant", "b")]}),
            "must share every message but their last",
        ),
        (
            &format,
            serde_json::json!({"chosen": [user], "rejected": [user]}),
            "`chosen` must end with an assistant message",
        ),
        (
            &with_prompt,
            serde_json::json!({"q": [user], "chosen": [user, msg("assistant", "a")], "rejected": [msg("assistant", "b")]}),
            "hold one assistant message each",
        ),
    ];
    for (f, record, want) in cases {
        std::fs::write(&p, format!("\n{record}")).unwrap();
        let e = read_comparisons(&p, f, Some(&chat)).unwrap_err().to_string();
        assert!(e.contains("chats.jsonl: line 2") && e.contains(want), "{e}");
    }
}

#[test]
fn the_real_hh_rlhf_file_splits_cleanly() {
    let path = shared().join("data/hh-rlhf/helpful-base/test.jsonl.gz");
    let format: PreferenceFormat = serde_json::from_str(r#"{"kind": "conversations"}"#).unwrap();
    let c = read_comparisons(&path, &format, None).unwrap();
    assert_eq!(c.len(), 2354);
    assert!(c.iter().all(|c| c.prompt.ends_with("\n\nAssistant:") && c.prompt.starts_with("\n\nHuman:")));
}

#[test]
fn malformed_preference_records_name_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.jsonl");
    let margin: PreferenceFormat = serde_json::from_str(r#"{"kind": "pairs", "margin_field": "m"}"#).unwrap();
    let ranking: PreferenceFormat = serde_json::from_str(r#"{"kind": "ranking"}"#).unwrap();
    let cases: [(&str, &PreferenceFormat, &str); 4] = [
        ("{\"prompt\": \"a\", \"chosen\": \"b\"}", &PreferenceFormat::default(), "line 1: field `rejected` is missing"),
        (
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"m\": \"x\"}",
            &margin,
            "field `m` must be a finite number",
        ),
        ("{\"prompt\": \"a\", \"responses\": [\"b\"]}", &ranking, "at least 2 ranked responses"),
        ("{\"prompt\": \"a\", \"responses\": [\"b\", 3]}", &ranking, "field `responses`[1] must be a string"),
    ];
    for (text, format, want) in cases {
        std::fs::write(&p, text).unwrap();
        let e = read_comparisons(&p, format, None).unwrap_err().to_string();
        assert!(e.contains("p.jsonl") && e.contains(want), "{e}");
    }
    let e = serde_json::from_str::<PreferenceFormat>(r#"{"kind": "pairs", "chosen": "x"}"#).unwrap_err().to_string();
    assert!(e.contains("unknown field"), "{e}");
}

#[test]
fn normalisation_on_policy_samples_and_the_checkpoint_as_ppo_critic() {
    let d = tempfile::tempdir().unwrap();
    let mut c = marker_cfg(d.path(), 10);
    c.normalize = Some(
        serde_json::from_str(r#"{"reference": {"kind": "policy_samples", "per_prompt": 4, "max_new_tokens": 8}}"#)
            .unwrap(),
    );
    let report = train(c, false).unwrap();
    let n = report.normalization.unwrap();
    // 60 held-out comparisons share one prompt: 4 samples of it from the init policy
    assert_eq!(n.count, 4);
    assert!(n.reference.contains("samples") && n.gain > 0.0, "{n:?}");
    // the reward checkpoint initialises PPO's separate critic (N+ / InstructGPT)
    let ckpt = d.path().join("run/checkpoints/step-10");
    let (policy, _) = rlhf_policies::checkpoint::load_with_tokenizer(&d.path().join("init"), &Cpu::default()).unwrap();
    let models = rlhf::stages::ppo_models::PpoModels::new(
        policy,
        &rlhf::stages::ppo_models::ValueModelConfig::Separate { init: None },
        Some(&ckpt),
    )
    .unwrap();
    let (rm, _) = LearnedReward::load_pretrained(&ckpt, &Cpu::default()).unwrap();
    let rlhf::stages::ppo_models::Critic::Separate(critic) = &models.critic else { panic!("separate critic") };
    assert_eq!(critic.head.w.as_vec(), rm.head.w.as_vec());
    assert_eq!(critic.model.wte.as_vec(), rm.model.wte.as_vec());
}

#[test]
fn chat_prompts_need_the_model_s_chat_template() {
    let d = tempfile::tempdir().unwrap();
    let mut c = marker_cfg(d.path(), 1);
    c.chat = Some(rlhf::prompt_format::ChatPrompt::default());
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("chat_template") && e.contains(&c.init.display().to_string()), "{e}");
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %} ok:{% endif %}";
    std::fs::write(c.init.join("chat_template.jinja"), template).unwrap();
    c.eval_every = 1;
    train(c, false).unwrap();
    // the prompt as the template lays it out; responses without their leading space
    let samples = std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    assert!(samples.lines().count() > 0);
    for line in samples.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["prompt"], "review: ok:", "{row}");
        assert!(row["responses"].as_array().unwrap().iter().all(|r| !r.as_str().unwrap().starts_with(' ')), "{row}");
    }
}
