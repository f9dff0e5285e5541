//! The PPO trainer end to end on a tiny pretrained policy: the invariants (ratio exactly 1 and
//! approx-KL 0 on the first minibatch, KL 0 at iteration 0, the reference unchanged), learning
//! a rule-based reward with bounded KL, exact resume, both critics, and the guards.

mod common;

use common::{comparable_metrics, ppo_config};
use rlhf::stages::ppo::{train, train_with_reward};
use rlhf::stages::ppo_models::ValueModelConfig;
use rlhf::stages::reward_spec::RewardSpec;
use rlhf_envs::FnReward;
use rlhf_policies::RolloutEngine;

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("ppo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn invariants_hold_and_the_reward_is_learned_with_bounded_kl() {
    let d = tempfile::tempdir().unwrap();
    let c = ppo_config(d.path(), 12);
    let ref_dir = c.policy.clone();
    let before = std::fs::read(ref_dir.join("model.safetensors")).unwrap();
    let report = train(c, false).unwrap();
    let m = metrics(d.path());
    assert_eq!(m.len(), 12);
    // iteration 0: the policy is the reference, so the KL is exactly 0
    assert_eq!(m[0]["objective/kl"].as_f64().unwrap(), 0.0);
    for (i, r) in m.iter().enumerate() {
        assert_eq!(r["debug/first_minibatch_ratio"].as_f64().unwrap(), 1.0, "iteration {i}");
        assert_eq!(r["debug/first_minibatch_approxkl"].as_f64().unwrap(), 0.0, "iteration {i}");
        for k in ["loss/policy_avg", "loss/value_avg", "val/ratio", "policy/entropy_avg"] {
            assert!(r[k].as_f64().unwrap().is_finite(), "{k} at {i}");
        }
    }
    // the reward rises clearly while the KL stays bounded
    let first: f64 = report.scores[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = report.scores[9..].iter().sum::<f64>() / 3.0;
    assert!(last > first + 1.0, "mean score {first:.2} -> {last:.2}: {:?}", report.scores);
    // a bound against runaway, not a pinned value: after ~6 iterations at this learning rate
    // the trajectory follows float rounding (the per-op and the fused-block forward, equal to
    // 1e-5, end at 25.5 and 30.5 nats with scores 8.5 and 9.6)
    assert!(report.kl.iter().all(|&k| k.is_finite() && k < 40.0), "{:?}", report.kl);
    // the reference (the SFT checkpoint) is never written
    assert_eq!(std::fs::read(ref_dir.join("model.safetensors")).unwrap(), before);
    let ckpt = d.path().join("ppo/checkpoints/step-12");
    assert!(ckpt.join("value_head.safetensors").is_file() && ckpt.join("ppo_state.json").is_file());
}

#[test]
fn resume_gives_the_same_metrics_with_a_separate_critic() {
    let run = |dir: &std::path::Path| {
        let mut c = ppo_config(dir, 4);
        c.value_model = ValueModelConfig::Separate { init: None };
        (c.val_fraction, c.eval_every) = (0.34, 2);
        // resumed at step 3, the policy's first step needs its own Adam step count back
        c.critic_warmup_iterations = 3;
        c.kl_control =
            serde_json::from_str(r#"{"kind": "adaptive", "target": 0.5, "gain": {"form": "paper", "k_beta": 0.1}}"#)
                .unwrap();
        c
    };
    let a = tempfile::tempdir().unwrap();
    train(run(a.path()), false).unwrap();
    let b = tempfile::tempdir().unwrap();
    train(run(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("ppo/checkpoints/step-4")).unwrap();
    train(run(b.path()), true).unwrap();
    let (ma, mb) = (comparable_metrics(&a.path().join("ppo")), comparable_metrics(&b.path().join("ppo")));
    assert_eq!(ma.len(), 5, "four iterations and the evaluation before them");
    assert!(ma[4].get("eval/scores").is_some());
    assert_eq!(ma, mb);
    assert_ne!(ma[4]["objective/beta"], ma[1]["objective/beta"], "the adaptive β moved");
    assert!(a.path().join("ppo/checkpoints/step-4/value/config.json").is_file());
}

#[test]
fn a_non_finite_reward_stops_with_the_iteration_or_is_skipped() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 2);
    c.reward = None;
    let nan = || Box::new(FnReward::new("nan", |_x: &rlhf_envs::RewardInput| f32::NAN));
    let e = format!("{:#}", train_with_reward(c.clone(), false, nan()).unwrap_err());
    assert!(e.contains("iteration 1") && e.contains("NaN"), "{e}");
    c.on_nonfinite = rlhf::stages::ppo::OnNonFinite::Skip;
    c.out_dir = d.path().join("ppo-skip");
    let r = train_with_reward(c, false, nan()).unwrap();
    assert_eq!(r.skipped_batches, 2);
    assert!(r.scores.is_empty());
    assert!(d.path().join("ppo-skip/checkpoints/step-2/ppo_state.json").is_file());
}

#[test]
fn reference_answers_reach_the_reward_and_the_samples() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 1);
    // each prompt's reference is its own text reversed: the reward checks the pairing
    let lines: Vec<String> = std::fs::read_to_string(&c.prompts)
        .unwrap()
        .lines()
        .map(|l| {
            let p = serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"].as_str().unwrap().to_string();
            serde_json::json!({"prompt": p, "answer": p.chars().rev().collect::<String>()}).to_string()
        })
        .collect();
    c.prompts = d.path().join("with_answers.jsonl");
    std::fs::write(&c.prompts, lines.join("\n")).unwrap();
    c.reward = Some(RewardSpec::Answer { extraction: Default::default(), score: 1.0, format_score: 0.0 });
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("reference_field"), "{e}");
    c.reference_field = Some("answer".into());
    c.reward = None;
    c.sample_every = 1;
    let paired = |x: &rlhf_envs::RewardInput| {
        let want: String = x.prompt.chars().rev().collect();
        (x.reference.as_deref() == Some(want.as_str())) as i32 as f32
    };
    let r = train_with_reward(c, false, Box::new(FnReward::new("paired", paired))).unwrap();
    assert_eq!(r.scores, vec![1.0], "every rollout's reference is its own prompt's");
    let samples = std::fs::read_to_string(d.path().join("ppo/samples.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    let prompt: String = row["prompt"].as_str().unwrap().chars().rev().collect();
    assert_eq!(row["reference"].as_str(), Some(prompt.as_str()), "{row}");
}

fn samples(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("ppo/samples.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The eval keys of a metrics record (without the wall time).
fn eval_part(r: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    let obj = r.as_object().unwrap();
    obj.iter().filter(|(k, _)| k.starts_with("eval/")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[test]
fn held_out_prompts_are_evaluated_on_the_same_draws_and_never_trained_on() {
    // both decoders: the host engine, and the model's own KV-cached decode (CUDA's default),
    // which begins all of a session's rows together — the last held-out chunk is narrower
    for engine in [RolloutEngine::Host, RolloutEngine::Device] {
        evaluations_repeat_with_a_fixed_policy(engine);
    }
}

fn evaluations_repeat_with_a_fixed_policy(engine: RolloutEngine) {
    // learning rate 0: the policy never moves, so every evaluation must repeat the first one
    // exactly (the same random numbers each time) and its KL to the reference is exactly 0
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 4);
    c.rollout_engine = engine;
    c.optim.lr = 0.0;
    (c.val_fraction, c.eval_every, c.sample_every, c.sample_count) = (1.0 / 3.0, 3, 1, 16);
    c.score.missing_eos = rlhf_envs::MissingEos::Subtract(1.0);
    train(c, false).unwrap();
    let m = metrics(d.path());
    let steps: Vec<u64> = m.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4], "a record before the first iteration");
    assert!(m[0].get("objective/scores").is_none() && m[1].get("eval/scores").is_none());
    let first = eval_part(&m[0]);
    assert_eq!(first.len(), 6, "{first:?}");
    for r in [&m[3], &m[4]] {
        assert_eq!(eval_part(r), first, "evaluated at 0, every 3, and at the end");
    }
    assert_eq!(m[0]["eval/kl"].as_f64(), Some(0.0));
    assert!(m[0]["eval/response_length"].as_f64().unwrap() > 0.0);
    // the processed score is the raw one less 1 for each response without EOS
    let get = |k: &str| m[0][k].as_f64().unwrap();
    let (raw, eos_rate) = (get("eval/raw_scores"), get("eval/eos_rate"));
    assert!(eos_rate < 1.0 && (get("eval/scores") - (raw - (1.0 - eos_rate))).abs() < 1e-6);
    // the last third of the prompts ("sat ", "the mat") is evaluated, in order, and never trained on
    let (eval, train): (Vec<_>, Vec<_>) = samples(d.path()).into_iter().partition(|s| s["split"] == "eval");
    assert_eq!(eval.len(), 3 * 2);
    let held = ["sat ", "the mat"];
    assert!(eval.chunks(2).all(|e| e[0]["prompt"] == held[0] && e[1]["prompt"] == held[1]));
    assert!(!train.is_empty() && train.iter().all(|s| !held.contains(&s["prompt"].as_str().unwrap())));
}

#[test]
fn the_held_out_score_rises_as_the_reward_is_learned() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 12);
    let held_out = d.path().join("held_out.jsonl");
    std::fs::write(&held_out, "{\"prompt\": \"the cat \"}\n{\"prompt\": \"a rat \"}\n{\"prompt\": \"to the \"}\n")
        .unwrap();
    (c.val_prompts, c.eval_every) = (Some(held_out), 6);
    let report = train(c, false).unwrap();
    let m = metrics(d.path());
    let evals: Vec<&serde_json::Value> = m.iter().filter(|r| r.get("eval/scores").is_some()).collect();
    assert_eq!(evals.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 6, 12]);
    // the report lists the same evaluations
    assert_eq!(report.evaluations.len(), 3);
    for (summary, r) in report.evaluations.iter().zip(&evals) {
        for k in ["step", "eval/scores", "eval/kl"] {
            assert_eq!(summary[k], r[k], "{k}");
        }
    }
    let (start, end) = (evals[0]["eval/scores"].as_f64().unwrap(), evals[2]["eval/scores"].as_f64().unwrap());
    assert!(end > start + 1.0, "held-out score {start:.2} -> {end:.2}");
    let kl = evals[2]["eval/kl"].as_f64().unwrap();
    assert!(kl > 0.0 && kl.is_finite(), "{kl}");
    // eval/scores_std: the sample standard deviation of the three held-out scores (all in
    // samples.jsonl: sample_count 4 ≥ 3)
    let scores: Vec<f64> = samples(d.path())
        .iter()
        .filter(|r| r["split"] == "eval" && r["step"] == 12)
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    let mean = scores.iter().sum::<f64>() / 3.0;
    let std = (scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    assert!((evals[2]["eval/scores_std"].as_f64().unwrap() - std).abs() < 1e-9, "{scores:?}");
}

#[test]
fn held_out_settings_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 1);
    c.val_fraction = 1.0;
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("val_fraction"), "{e}");
    (c.val_fraction, c.eval_every) = (0.2, 0);
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("eval_every"), "{e}");
    c.eval_every = 1;
    // every held-out prompt longer than max_prompt_len (16)
    let long = d.path().join("long.jsonl");
    std::fs::write(&long, "{\"prompt\": \"the cat sat on the mat and the rat\"}\n").unwrap();
    c.val_prompts = Some(long);
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("long.jsonl") && e.contains("no prompts left"), "{e}");
    c.val_prompts = Some(d.path().join("missing.jsonl"));
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("missing.jsonl"), "{e}");
    (c.val_prompts, c.eval_samples_per_prompt) = (None, 17); // the batch is 16 rollouts
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("eval_samples_per_prompt (17)") && e.contains("16 rollout rows"), "{e}");
    (c.eval_samples_per_prompt, c.eval_greedy) = (2, true);
    let e = train(c, false).unwrap_err().to_string();
    assert!(e.contains("repeat one response"), "{e}");
}

#[test]
fn several_samples_per_held_out_prompt() {
    // 2 held-out prompts × 5 samples on a batch of 16 rows: 3 prompts fit one chunk, so one
    // chunk of 2 prompts (10 rows); each prompt's samples are consecutive and differ
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 1);
    (c.val_fraction, c.eval_samples_per_prompt, c.sample_count) = (1.0 / 3.0, 5, 16);
    let report = train(c, false).unwrap();
    let eval0: Vec<serde_json::Value> =
        samples(d.path()).into_iter().filter(|s| s["split"] == "eval" && s["step"] == 0).collect();
    assert_eq!(eval0.len(), 10);
    for (group, prompt) in eval0.chunks(5).zip(["sat ", "the mat"]) {
        assert!(group.iter().all(|s| s["prompt"] == prompt), "{group:?}");
        assert!(group.iter().any(|s| s["response"] != group[0]["response"]), "the samples of a prompt differ");
    }
    // the mean is over all ten samples
    let mean = eval0.iter().map(|s| s["score"].as_f64().unwrap()).sum::<f64>() / 10.0;
    assert!((report.evaluations[0]["eval/scores"].as_f64().unwrap() - mean).abs() < 1e-9);
}

#[test]
fn greedy_evaluation_gives_the_policy_s_own_greedy_responses() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 1);
    (c.val_fraction, c.eval_greedy, c.sample_count) = (1.0 / 3.0, true, 16);
    let policy = c.policy.clone();
    let report = train(c, false).unwrap();
    assert_eq!(report.evaluations.len(), 2);
    assert!(report.evaluations.iter().all(|e| e.get("eval/kl").is_none()), "no KL estimate from argmax responses");
    // before the first update the evaluated policy is the SFT checkpoint: its responses are
    // that model's greedy completions from the sampler, independently of the env
    let dev = dfdx::prelude::Cpu::default();
    let (model, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&policy, &dev).unwrap();
    let eos = tok.eos_for(&model.config).unwrap();
    let prompts: Vec<Vec<u32>> = ["sat ", "the mat"].iter().map(|p| tok.encode(p).unwrap()).collect();
    let greedy =
        rlhf_policies::SamplingConfig { max_new_tokens: 12, greedy: true, eos_ids: vec![eos], ..Default::default() };
    let engine = rlhf_policies::InferenceModel::from_model(&model);
    let g = rlhf_policies::generate(&engine, &prompts, tok.pad_id().unwrap_or(eos), &greedy).unwrap();
    let eval0: Vec<serde_json::Value> =
        samples(d.path()).into_iter().filter(|s| s["split"] == "eval" && s["step"] == 0).collect();
    assert_eq!(eval0.len(), 2);
    for (row, tokens) in eval0.iter().zip(&g.tokens) {
        assert_eq!(row["response"].as_str(), Some(tok.decode(tokens).unwrap().as_str()), "{row}");
    }
}

#[test]
fn evaluating_does_not_change_training() {
    // with a separate held-out file the training prompts are the same, and the evaluation
    // draws nothing from the training's random streams: every training metric is identical
    let training = |dir: &std::path::Path, held_out: Option<std::path::PathBuf>| {
        let mut c = ppo_config(dir, 3);
        (c.val_prompts, c.eval_every) = (held_out, 1);
        train(c, false).unwrap();
        let mut m = comparable_metrics(&dir.join("ppo"));
        m.retain(|r| r["step"] != 0);
        m.iter_mut().for_each(|r| r.as_object_mut().unwrap().retain(|k, _| !k.starts_with("eval/")));
        m
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let held_out = b.path().join("held_out.jsonl");
    std::fs::write(&held_out, "{\"prompt\": \"the cat \"}\n{\"prompt\": \"a rat \"}\n").unwrap();
    let (plain, evaluated) = (training(a.path(), None), training(b.path(), Some(held_out)));
    assert_eq!(plain.len(), 3);
    assert_eq!(plain, evaluated);
}

#[test]
fn target_kl_stops_an_iteration_s_update_early() {
    let run = |dir: &std::path::Path, target_kl: Option<f64>| {
        let mut c = ppo_config(dir, 3);
        c.target_kl = target_kl;
        train(c, false).unwrap();
        comparable_metrics(&dir.join("ppo"))
    };
    let (a, b, t) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // a target never reached changes nothing: 2 epochs × 2 minibatches, as without one
    let plain = run(a.path(), None);
    let mut loose = run(b.path(), Some(1e9));
    for r in &mut loose {
        assert_eq!((r["policy/early_stop"].as_f64(), r["policy/minibatches"].as_u64()), (Some(0.0), Some(4)));
        r.as_object_mut().unwrap().retain(|k, _| !matches!(k.as_str(), "policy/early_stop" | "policy/minibatches"));
    }
    assert_eq!(plain, loose);
    // a tiny one: the first minibatch steps (its ratio is exactly 1, its approx KL 0), the
    // second sees the moved policy and stops the update before its own step
    for r in run(t.path(), Some(1e-9)) {
        assert_eq!((r["policy/early_stop"].as_f64(), r["policy/minibatches"].as_u64()), (Some(1.0), Some(1)), "{r}");
    }
    let mut c = ppo_config(t.path(), 1);
    (c.target_kl, c.out_dir) = (Some(0.0), t.path().join("bad"));
    assert!(train(c, false).unwrap_err().to_string().contains("target_kl"));
}

/// `critic_lr`: the critic's parameters step at their own rate, the policy's as before. One
/// minibatch, so one Adam step: its first update is `−lr·g/(|g| + ε)`, proportional to the
/// rate — 0 leaves the critic as it started, twice the rate moves it twice as far.
#[test]
fn critic_lr_sets_the_critic_s_step_and_leaves_the_policy_s() {
    use rlhf_policies::checkpoint::read_safetensors;
    let run = |dir: &std::path::Path, critic_lr: Option<f64>| {
        let mut c = ppo_config(dir, 1);
        (c.value_model, c.ppo_epochs, c.minibatch_size, c.critic_lr) =
            (ValueModelConfig::Separate { init: None }, 1, 16, critic_lr);
        train(c, false).unwrap();
        let step = dir.join("ppo/checkpoints/step-1");
        (
            read_safetensors(&step.join("model.safetensors")).unwrap(),
            read_safetensors(&step.join("value/model.safetensors")).unwrap(),
        )
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (policy, critic) = run(dirs[0].path(), None); // optim.lr = 3e-3
    let (policy_0, critic_0) = run(dirs[1].path(), Some(0.0));
    let (policy_2, critic_2) = run(dirs[2].path(), Some(6e-3));
    assert_eq!(policy, policy_0);
    assert_eq!(policy, policy_2);
    // the critic started as the policy's backbone (the SFT checkpoint) and a zero head
    let start = read_safetensors(&dirs[1].path().join("pre/checkpoints/step-40/model.safetensors")).unwrap();
    let (mut moved, mut checked) = (0.0f32, 0);
    // (a zero score.bias is not written)
    let get = |m: &std::collections::BTreeMap<String, rlhf_policies::checkpoint::HostTensor>, name: &str, n: usize| {
        m.get(name).map_or(vec![0.0; n], |t| t.data.clone())
    };
    for (name, t) in &critic {
        let n = t.data.len();
        let (t0, t2, init) = (get(&critic_0, name, n), get(&critic_2, name, n), get(&start, name, n));
        assert_eq!(t0, init, "{name}: critic_lr 0 leaves it");
        for ((&a, &b), &i) in t.data.iter().zip(&t2).zip(&init) {
            assert!(((b - i) - 2.0 * (a - i)).abs() <= 1e-6 + 1e-5 * (a - i).abs(), "{name}: {a} {b} from {i}");
            moved = moved.max((a - i).abs());
        }
        checked += 1;
    }
    assert!(checked > 5 && moved > 1e-4, "{checked} tensors, largest step {moved}");
}

/// `critic_warmup_iterations`: the policy keeps the SFT weights through the warm-up (so the
/// KL is exactly 0 up to the first rollout after it) while the critic learns; then PPO goes on.
#[test]
fn the_critic_warms_up_alone_then_the_policy_trains() {
    use rlhf_policies::checkpoint::read_safetensors;
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 4);
    (c.value_model, c.critic_warmup_iterations, c.checkpoint_every) = (ValueModelConfig::Separate { init: None }, 2, 2);
    let sft = read_safetensors(&c.policy.join("model.safetensors")).unwrap();
    train(c.clone(), false).unwrap();
    let m = metrics(d.path());
    let f = |i: usize, k: &str| m[i][k].as_f64().unwrap_or_else(|| panic!("{k} at {i}"));
    assert_eq!((f(0, "lr"), f(1, "lr")), (0.0, 0.0));
    assert!(f(2, "lr") > 0.0 && (0..4).all(|i| f(i, "lr_critic") > 0.0));
    assert_eq!([f(0, "objective/kl"), f(1, "objective/kl"), f(2, "objective/kl")], [0.0; 3]);
    assert!(f(3, "objective/kl") > 0.0, "the policy moved at iteration 3");
    let step =
        |s: usize, file: &str| read_safetensors(&d.path().join(format!("ppo/checkpoints/step-{s}/{file}"))).unwrap();
    let weights = |t: &std::collections::BTreeMap<String, rlhf_policies::checkpoint::HostTensor>| {
        t.iter().map(|(k, v)| (k.clone(), v.data.clone())).collect::<Vec<_>>()
    };
    assert_eq!(weights(&step(2, "model.safetensors")), weights(&sft), "the policy is the SFT model after the warm-up");
    // the policy sat the steps out: its moments untouched, its own step count 0 (OpenRLHF's
    // frozen actor); the critic took every step
    let opt = step(2, "optimizer.safetensors");
    let (mut waited, mut moments) = (0, 0);
    for (k, v) in &opt {
        if let Some(name) = k.strip_prefix("step.") {
            assert!(name.starts_with("policy.") && v.data == [0.0], "{k}: {:?}", v.data);
            waited += 1;
        } else if k.starts_with("exp_avg.policy.") || k.starts_with("exp_avg_sq.policy.") {
            assert!(v.data.iter().all(|&x| x == 0.0), "{k}");
            moments += 1;
        }
    }
    assert!(waited > 3 && moments == 2 * waited, "{waited} waiting, {moments} moments");
    // then it stepped: its own count is the steps since, one for all its parameters
    let counts: Vec<f32> = step(4, "optimizer.safetensors")
        .iter()
        .filter(|(k, _)| k.starts_with("step."))
        .map(|(k, v)| {
            assert!(k.starts_with("step.policy."), "{k}");
            v.data[0]
        })
        .collect();
    assert!(counts.len() == waited && counts[0] > 0.0 && counts.iter().all(|&c| c == counts[0]), "{counts:?}");
    assert_ne!(weights(&step(4, "model.safetensors")), weights(&sft));
    assert!(step(2, "value/model.safetensors")["score.weight"].data.iter().any(|&w| w != 0.0), "the critic learned");
    c.critic_warmup_iterations = 4;
    assert!(train(c, false).unwrap_err().to_string().contains("critic_warmup_iterations"));
}

/// `kl_estimator: full`: the exact per-token KL over the vocabulary is exactly 0 while the
/// policy is the reference, never negative, and grows as the policy learns (that it is k1's
/// expectation is `math::ppo`'s property test); `abs` alike.
#[test]
fn the_full_and_abs_kl_penalties_are_zero_at_the_start_and_never_negative() {
    for estimator in ["full", "abs"] {
        let d = tempfile::tempdir().unwrap();
        let mut c = ppo_config(d.path(), 6);
        c.kl_estimator = serde_json::from_str(&format!("\"{estimator}\"")).unwrap();
        train(c, false).unwrap();
        let m = metrics(d.path());
        let kl: Vec<f64> = m.iter().map(|r| r["objective/kl"].as_f64().unwrap()).collect();
        assert_eq!(kl[0], 0.0, "{estimator}: {kl:?}");
        assert!(kl.iter().all(|&k| k >= 0.0) && kl[5] > 0.01, "{estimator}: {kl:?}");
    }
}

/// `score.running_norm`: with `center`, the first batch's scores are its own z-scores (mean
/// 0); the statistics are in the metrics and the report and travel in the checkpoint, so a
/// resumed run equals an uninterrupted one.
#[test]
fn running_score_norm_is_logged_and_resumes_exactly() {
    let run = |dir: &std::path::Path| {
        let mut c = ppo_config(dir, 4);
        c.score.running_norm = Some(rlhf_envs::RunningNorm { center: true });
        c
    };
    let a = tempfile::tempdir().unwrap();
    train(run(a.path()), false).unwrap();
    let m = metrics(a.path());
    let f = |i: usize, k: &str| m[i][k].as_f64().unwrap_or_else(|| panic!("{k} at {i}: {}", m[i]));
    assert!(f(0, "objective/scores").abs() < 1e-6, "z-scores of the first batch: {}", f(0, "objective/scores"));
    assert!(f(0, "score/running_std") > 0.0 && f(3, "score/running_std") > 0.0);
    assert_ne!(f(0, "score/running_mean"), f(3, "score/running_mean"), "every batch adds to them");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("ppo/checkpoints/step-3/ppo_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["score_moments"]["count"], 48, "three batches of 16");
    let html = std::fs::read_to_string(rlhf::report::write_report(&a.path().join("ppo")).unwrap()).unwrap();
    assert!(html.contains("running score statistics"), "the report plots them");
    let b = tempfile::tempdir().unwrap();
    train(run(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("ppo/checkpoints/step-4")).unwrap();
    train(run(b.path()), true).unwrap();
    assert_eq!(comparable_metrics(&a.path().join("ppo")), comparable_metrics(&b.path().join("ppo")));
}

/// A reward ensemble drives PPO: each sampled response is scored by the members' minimum
/// (here the counts of "a" and of "e" in its text; the unit tests check each combination),
/// and each iteration logs the members' disagreement.
#[test]
fn ppo_trains_on_an_ensemble_s_combined_score() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ppo_config(d.path(), 3);
    c.reward = Some(
        serde_json::from_str(
            r#"{"kind": "ensemble", "combine": {"kind": "min"}, "members": [
                {"kind": "keywords", "keywords": ["a"]}, {"kind": "keywords", "keywords": ["e"]}]}"#,
        )
        .unwrap(),
    );
    train(c, false).unwrap();
    let (rows, mut kinds) = (samples(d.path()), [false; 2]);
    for row in &rows {
        let text = row["response"].as_str().unwrap().replace(rlhf_policies::tokenizer::EOS_TOKEN, "");
        let (a, e) = (text.matches('a').count(), text.matches('e').count());
        assert_eq!(row["score"].as_f64(), Some(a.min(e) as f64), "{row}");
        kinds[usize::from(a > 0 && e == 0)] = true;
    }
    assert_eq!(kinds, [true; 2], "rows with \"a\" but no \"e\" (one member pays, the minimum does not), and others");
    let m = metrics(d.path());
    assert!(m.iter().all(|r| r["reward/ensemble_std"].as_f64().is_some_and(|s| s > 0.0)), "{m:?}");
}
