//! GRPO, RLOO and REINFORCE++ end to end on a tiny pretrained policy: the rule-based reward
//! rises, the invariants hold (ratio exactly 1 on the first minibatch, KL 0 at iteration 0,
//! groups share prompts), β = 0 needs no reference, and a resumed run logs the same metrics.

mod common;

use common::{comparable_metrics, pretrained_policy};
use rlhf::schedule::LrSchedule;
use rlhf::stages::grpo::{train, Algo, GrpoConfig};
use rlhf::stages::reward_spec::RewardSpec;

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
    learns_with(algo, |_| {});
}

fn learns_with(algo: Algo, tweak: impl Fn(&mut GrpoConfig)) {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), algo, 12);
    tweak(&mut c);
    let before = std::fs::read(c.policy.join("model.safetensors")).unwrap();
    let report = train(c.clone(), false).unwrap();
    let m = metrics(d.path());
    assert_eq!(m.len(), 12);
    assert_eq!(m[0]["kl_seq"].as_f64(), Some(0.0), "the policy is the reference at iteration 0");
    assert!(m[11]["kl_seq"].as_f64().unwrap() > 0.0, "then it moved away: {:?}", m[11]["kl_seq"]);
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

/// GSPO: one clipped ratio per completion (TRL's `importance_sampling_level = sequence`).
/// Only the top block and the final norm train; the reference's log-probs come from the
/// bottom the two models share, run once (KL exactly 0 at iteration 0, then rising).
#[test]
fn grpo_learns_the_rule_with_only_the_top_block() {
    learns_with(GRPO, |c| c.optim.num_layers_unfrozen = Some(1));
}

#[test]
fn gspo_learns_the_rule_with_sequence_ratios() {
    learns_with(GRPO, |c| c.importance_sampling_level = rlhf::math::group::ImportanceLevel::Sequence);
}

#[test]
fn rloo_learns_the_rule() {
    learns(Algo::Rloo { normalize_advantages: false, normalize_eps: 1e-4 });
}

#[test]
fn reinforce_pp_learns_the_rule() {
    learns(Algo::ReinforcePp {
        gamma: 1.0,
        whitening: rlhf::math::group::Whitening::Biased,
        whiten_eps: 1e-8,
        baseline: false,
    });
}

#[test]
fn reinforce_pp_baseline_learns_the_rule() {
    let whitening = rlhf::math::group::Whitening::Biased;
    learns(Algo::ReinforcePp { gamma: 1.0, whitening, whiten_eps: 1e-8, baseline: true });
}

#[test]
fn remax_learns_the_rule() {
    learns(Algo::Remax {});
}

/// ReMax in the paper's setting, one sample per prompt against the greedy response: the
/// baseline is logged, a resumed run logs the same metrics, and the env's prompt cursor only
/// counts the sampled prompts (the greedy decode reuses them). With `score.running_norm` the
/// statistics travel in the checkpoint and count the sampled scores only (the greedy ones are
/// scaled by them, not added).
#[test]
fn remax_with_one_sample_per_prompt_resumes_exactly() {
    let run = |dir: &std::path::Path| {
        let mut c = GrpoConfig { num_generations: 1, prompts_per_step: 8, ..cfg(dir, Algo::Remax {}, 4) };
        c.score.running_norm = Some(rlhf_envs::RunningNorm { center: false });
        c
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(run(a.path()), false).unwrap();
    train(run(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-4")).unwrap();
    train(run(b.path()), true).unwrap();
    let m = comparable_metrics(&a.path().join("run"));
    assert_eq!(m, comparable_metrics(&b.path().join("run")));
    assert!(m.iter().all(|r| r["remax/greedy_reward"].as_f64().is_some_and(f64::is_finite)), "{m:?}");
    let state = common::read_json(&a.path().join("run/checkpoints/step-4/grpo_state.json"));
    assert_eq!(state["prompt_draws"].as_u64(), Some(4 * 8));
    assert_eq!(state["score_moments"]["count"].as_u64(), Some(4 * 8));
    assert!(m.iter().all(|r| r["score/running_std"].as_f64().is_some_and(|s| s > 0.0)), "{m:?}");
}

/// Online DPO: pairs of completions ranked by the reward, the DPO loss against the reference.
/// At the first iteration the policy is the reference, so the loss is exactly log 2 and the
/// implicit rewards 0; the reward then rises; a resumed run logs the same metrics; shapes
/// that would split pairs are errors.
#[test]
fn online_dpo_starts_at_log_2_and_learns_the_rule() {
    let online = Algo::OnlineDpo { loss: rlhf::math::dpo::DpoLoss::Sigmoid {} };
    let run = |dir: &std::path::Path, iterations: usize| GrpoConfig {
        num_generations: 2,
        prompts_per_step: 8,
        minibatch_size: 16,
        num_iterations: 1,
        beta: 0.1,
        ..cfg(dir, online, iterations)
    };
    let d = tempfile::tempdir().unwrap();
    train(run(d.path(), 12), false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-9, "{}", m[0]);
    assert_eq!((m[0]["rewards/chosen"].as_f64(), m[0]["rewards/margins"].as_f64()), (Some(0.0), Some(0.0)));
    assert!(m.iter().all(|r| r["debug/first_minibatch_ratio"].as_f64() == Some(1.0)), "{m:?}");
    let reward: Vec<f64> = m.iter().map(|r| r["reward"].as_f64().unwrap()).collect();
    let (first, last) = (reward[..3].iter().sum::<f64>() / 3.0, reward[9..].iter().sum::<f64>() / 3.0);
    assert!(last > first + 1.0, "reward {first:.2} -> {last:.2}: {reward:?}");
    assert!(m[11]["rewards/margins"].as_f64().unwrap() > 0.0, "{}", m[11]);
    // resume
    let b = tempfile::tempdir().unwrap();
    train(run(b.path(), 4), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-4")).unwrap();
    train(run(b.path(), 4), true).unwrap();
    let c = tempfile::tempdir().unwrap();
    train(run(c.path(), 4), false).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&c.path().join("run")));
    // pairs stay whole, and only pairwise losses apply
    let e = tempfile::tempdir().unwrap();
    let err = |c: GrpoConfig| train(c, false).unwrap_err().to_string();
    assert!(err(GrpoConfig { num_generations: 4, ..run(e.path(), 1) }).contains("num_generations must be 2"));
    assert!(err(GrpoConfig { minibatch_size: 8, grad_accum: 8, ..run(e.path(), 1) }).contains("pairs whole"));
    let kto =
        Algo::OnlineDpo { loss: rlhf::math::dpo::DpoLoss::Kto { desirable_weight: 1.0, undesirable_weight: 1.0 } };
    assert!(err(GrpoConfig { algo: kto, ..run(e.path(), 1) }).contains("not kto"));
}

#[test]
fn resume_gives_the_same_metrics_and_beta_zero_needs_no_reference() {
    let run = |dir: &std::path::Path| {
        let mut c = cfg(dir, GRPO, 4);
        c.beta = 0.0;
        c.epsilon_high = 0.28;
        c.loss_type = rlhf::math::group::LossAggregation::DrGrpo;
        (c.val_fraction, c.eval_every) = (0.34, 3);
        c
    };
    let a = tempfile::tempdir().unwrap();
    train(run(a.path()), false).unwrap();
    let b = tempfile::tempdir().unwrap();
    train(run(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-4")).unwrap();
    train(run(b.path()), true).unwrap();
    let (ma, mb) = (comparable_metrics(&a.path().join("run")), comparable_metrics(&b.path().join("run")));
    assert_eq!(ma.len(), 5, "four iterations and the evaluation before them");
    assert_eq!(ma, mb);
    let evaluated: Vec<u64> =
        ma.iter().filter(|r| r.get("eval/reward").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(evaluated, [0, 3, 4]);
    // β = 0: no reference forward, so no KL is measured at all
    assert!(ma[1..].iter().all(|r| r["kl"].as_f64() == Some(0.0) && r["kl_seq"].as_f64() == Some(0.0)));
    assert!(ma.iter().all(|r| r.get("eval/kl").is_none()));
    assert!(a.path().join("run/checkpoints/step-4/grpo_state.json").is_file());
}

#[test]
fn masked_truncated_completions_leave_the_policy_as_it_was() {
    // the char-level policy has no EOS: every completion runs to max_new_tokens
    let d = tempfile::tempdir().unwrap();
    let c = GrpoConfig { mask_truncated_completions: true, checkpoint_every: 2, ..cfg(d.path(), GRPO, 2) };
    let read =
        |p: std::path::PathBuf| rlhf_policies::checkpoint::read_safetensors(&p.join("model.safetensors")).unwrap();
    let before = read(c.policy.clone());
    train(c, false).unwrap();
    for m in metrics(d.path()) {
        assert_eq!(m["completions/clipped_ratio"], 1.0, "{m}");
        assert_eq!((m["loss"].as_f64(), m["debug/first_minibatch_ratio"].as_f64()), (Some(0.0), None), "{m}");
    }
    let after = read(d.path().join("run/checkpoints/step-2"));
    assert!(before.iter().all(|(k, t)| after[k].data == t.data), "no completion counted: no update");
    // without the mask the same completions train the policy
    let e = tempfile::tempdir().unwrap();
    train(GrpoConfig { checkpoint_every: 2, ..cfg(e.path(), GRPO, 2) }, false).unwrap();
    let trained = read(e.path().join("run/checkpoints/step-2"));
    assert!(before.iter().any(|(k, t)| trained[k].data != t.data));
}

#[test]
fn bad_shapes_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), GRPO, 1);
    c.minibatch_size = 5;
    assert!(train(c.clone(), false).unwrap_err().to_string().contains("multiple of minibatch_size"));
    c.minibatch_size = 8;
    c.max_new_tokens = 48; // the policy has 48 positions
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("longest prompt") && e.contains("48 positions"), "{e}");
    c.max_new_tokens = 12;
    c.algo = Algo::Rloo { normalize_advantages: true, normalize_eps: 1e-4 };
    c.num_generations = 1;
    c.prompts_per_step = 8;
    assert!(train(c.clone(), false).unwrap_err().to_string().contains("num_generations"));
    c.algo = GRPO;
    assert!(train(c.clone(), false).unwrap_err().to_string().contains("GRPO needs num_generations ≥ 2"));
    let whitening = rlhf::math::group::Whitening::Biased;
    c.algo = Algo::ReinforcePp { gamma: 1.0, whitening, whiten_eps: 1e-8, baseline: true };
    assert!(train(c.clone(), false).unwrap_err().to_string().contains("REINFORCE++-baseline needs num_generations"));
    c.algo = GRPO;
    c.dynamic_sampling = Some(rlhf::stages::grpo::DynamicSampling { max_generation_batches: 0 });
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("dynamic_sampling.max_generation_batches must be at least 1"), "{e}");
    c.dynamic_sampling = Some(rlhf::stages::grpo::DynamicSampling { max_generation_batches: 2 });
    c.algo = Algo::Remax {};
    let e = train(c, false).unwrap_err().to_string();
    assert!(e.contains("dynamic_sampling needs num_generations ≥ 2"), "{e}");
    let e = serde_json::from_str::<GrpoConfig>(r#"{"dynamic_sampling": {"max_batches": 4}}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `max_batches`"), "{e}");
}

const ANSWERS: [(&str, u32); 4] = [("a", 3), ("b", 5), ("c", 8), ("d", 1)];

/// A char-level policy pretrained on lines `x #### N` ending in a uniformly random digit (so
/// it answers right ~1 time in 10), in `dir/pre`, and the four questions with their
/// reference answers (GSM8K's form) as JSONL lines.
fn answer_policy(dir: &std::path::Path) -> (std::path::PathBuf, Vec<String>) {
    let answers = ANSWERS;
    let mut corpus = String::new();
    for i in 0..600 {
        corpus += &format!("{} #### {}\n", answers[i % 4].0, (i * 7 + i / 4) % 10);
    }
    std::fs::write(dir.join("corpus.txt"), corpus).unwrap();
    rlhf::stages::pretrain::train(
        rlhf::stages::pretrain::PretrainConfig {
            out_dir: dir.join("pre"),
            files: vec![dir.join("corpus.txt")],
            tokenizer: rlhf::stages::pretrain::TokenizerSpec::Char {},
            model: rlhf_policies::ModelConfig::gpt2_preset(1, 32, 2, 2, 32),
            block_size: 16,
            batch_size: 8,
            steps: 60,
            optim: rlhf_policies::AdamWConfig { lr: 1e-2, ..rlhf::stages::pretrain::PretrainConfig::default().optim },
            schedule: LrSchedule::warmup_cosine(3),
            eval_every: 60,
            eval_batches: 1,
            checkpoint_every: 60,
            sample_tokens: 4,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    let prompts: Vec<String> = answers
        .iter()
        .map(|(q, a)| serde_json::json!({"prompt": format!("{q} #### "), "answer": format!("#### {a}")}).to_string())
        .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts.join("\n")).unwrap();
    (dir.join("pre/checkpoints/step-60"), prompts)
}

/// A verifiable reward: prompts `x #### ` with reference answers in their own field (GSM8K's
/// form, `#### N`); the policy, pretrained on lines ending in a uniformly random digit, answers
/// right ~1 time in 10, and GRPO teaches it each prompt's answer. Also: the answer reward
/// without `reference_field` is a clear error.
#[test]
fn grpo_learns_verifiable_answers_from_the_reference_field() {
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = answer_policy(d.path());
    let answers = ANSWERS;
    let c = GrpoConfig {
        out_dir: d.path().join("run"),
        policy,
        prompts: d.path().join("prompts.jsonl"),
        reward: Some(RewardSpec::Answer {
            extraction: rlhf_envs::AnswerExtraction::Flexible,
            score: 1.0,
            format_score: 0.0,
        }),
        prompts_per_step: 4,
        num_generations: 16,
        minibatch_size: 32,
        max_new_tokens: 2,
        iterations: 40,
        beta: 0.04,
        optim: rlhf_policies::AdamWConfig { lr: 2e-3, ..Default::default() },
        checkpoint_every: 40,
        sample_every: 40,
        val_prompts: Some(d.path().join("held_out.jsonl")),
        eval_every: 20,
        ..Default::default()
    };
    // the same four questions, four times each, as the held-out set (one sample per line)
    std::fs::write(d.path().join("held_out.jsonl"), vec![prompts.join("\n"); 4].join("\n")).unwrap();
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("reference_field"), "{e}");
    let report = train(GrpoConfig { reference_field: Some("answer".into()), ..c }, false).unwrap();
    let samples = std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    let q = &row["prompt"].as_str().unwrap()[..1];
    let a = answers.iter().find(|(p, _)| *p == q).unwrap().1;
    assert_eq!(row["reference"], format!("#### {a}"), "samples show each prompt's reference: {row}");
    let r = &report.rewards;
    // accuracy over iterations 1–3 → 36–40: 0.14 → 0.94 at the default seed; 0.16–0.21 →
    // 0.92–0.97 at seeds 1–5
    let (first, last) = (r[..3].iter().sum::<f64>() / 3.0, r[35..].iter().sum::<f64>() / 5.0);
    assert!(first < 0.3 && last > 0.8, "accuracy {first:.2} -> {last:.2}: {r:?}");
    // the held-out accuracy (one sample per line) at 0, 20 and 40 iterations, and its samples
    let evals: Vec<f64> = metrics(d.path()).iter().filter_map(|r| r["eval/reward"].as_f64()).collect();
    assert!(evals.len() == 3 && evals[0] < 0.3 && evals[2] > 0.7, "held-out accuracy {evals:?}");
    let mut rows = samples.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    let eval_row = rows.rfind(|r| r["split"] == "eval").unwrap();
    assert!(eval_row["reference"].as_str().unwrap().starts_with("#### ") && eval_row["step"] == 40, "{eval_row}");
}

/// `chat`: prompts become the user turn of the policy's own chat template (here one written
/// beside the tiny char-level policy, in its few characters), with an optional system
/// message; a policy without a template is a clear error.
#[test]
fn chat_prompts_use_the_policy_s_template() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), GRPO, 1);
    c.chat = Some(rlhf::prompt_format::ChatPrompt { system: Some("a cat".into()), ..Default::default() });
    (c.max_prompt_len, c.max_new_tokens) = (44, 4); // the policy has 48 positions
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("chat_template") && e.contains(&c.policy.display().to_string()), "{e}");
    let template = "{% for m in messages %}{% if m.role == 'system' %}the hat. {% else %}the bat. {% endif %}\
                    {{ m.content }}. {% endfor %}{% if add_generation_prompt %}a rat. {% endif %}";
    std::fs::write(c.policy.join("chat_template.jinja"), template).unwrap();
    train(c.clone(), false).unwrap();
    let samples = std::fs::read_to_string(d.path().join("run/samples.jsonl")).unwrap();
    let prompts = ["the ", "a cat ", "the rat ", "on the ", "sat ", "the mat"];
    assert!(samples.lines().count() > 0);
    for line in samples.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = row["prompt"].as_str().unwrap();
        let user = p.strip_prefix("the hat. a cat. the bat. ").and_then(|p| p.strip_suffix(". a rat. "));
        assert!(user.is_some_and(|u| prompts.contains(&u)), "{p:?}");
    }
    // the same prompts as conversations (TRL's conversational prompts): the same run
    let chats = d.path().join("chats.jsonl");
    let lines: Vec<String> =
        prompts.iter().map(|p| serde_json::json!({"prompt": [{"role": "user", "content": p}]}).to_string()).collect();
    std::fs::write(&chats, lines.join("\n")).unwrap();
    let conversational = GrpoConfig { prompts: chats, out_dir: d.path().join("chats"), ..c.clone() };
    train(conversational.clone(), false).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("chats")), comparable_metrics(&d.path().join("run")));
    // without `chat`, conversations still take the template (as TRL renders them), with no
    // system message of the config's
    let plain = GrpoConfig { chat: None, out_dir: d.path().join("plain"), ..conversational };
    train(plain.clone(), false).unwrap();
    for line in std::fs::read_to_string(d.path().join("plain/samples.jsonl")).unwrap().lines() {
        let p = serde_json::from_str::<serde_json::Value>(line).unwrap()["prompt"].as_str().unwrap().to_string();
        let user = p.strip_prefix("the bat. ").and_then(|p| p.strip_suffix(". a rat. "));
        assert!(user.is_some_and(|u| prompts.contains(&u)), "{p:?}");
    }
    // a policy without a chat template: an error naming the line and the template
    std::fs::remove_file(plain.policy.join("chat_template.jinja")).unwrap();
    let e = train(GrpoConfig { out_dir: d.path().join("none"), ..plain }, false).unwrap_err().to_string();
    assert!(e.contains("chats.jsonl: line 1") && e.contains("chat template") && e.contains("chat_template"), "{e}");
}

/// DAPO's dynamic sampling on the verifiable answers (at first ~2 in 3 groups of four are all
/// wrong): every iteration trains on groups that are not all right or all wrong, rolling out
/// more prompts as it must (all of them drawn from the data cursor, so a resumed run logs the
/// same metrics); with one rollout allowed it is exactly plain GRPO.
#[test]
fn dynamic_sampling_trains_on_informative_groups_only() {
    let d = tempfile::tempdir().unwrap();
    let (policy, _) = answer_policy(d.path());
    let run = |out: &str, dynamic: Option<usize>| GrpoConfig {
        out_dir: d.path().join(out),
        policy: policy.clone(),
        prompts: d.path().join("prompts.jsonl"),
        reference_field: Some("answer".into()),
        reward: Some(RewardSpec::Answer {
            extraction: rlhf_envs::AnswerExtraction::Flexible,
            score: 1.0,
            format_score: 0.0,
        }),
        prompts_per_step: 4,
        num_generations: 4,
        minibatch_size: 8,
        max_new_tokens: 2,
        iterations: 6,
        optim: rlhf_policies::AdamWConfig { lr: 2e-3, ..Default::default() },
        checkpoint_every: 3,
        dynamic_sampling: dynamic.map(|m| rlhf::stages::grpo::DynamicSampling { max_generation_batches: m }),
        ..Default::default()
    };
    train(run("dynamic", Some(8)), false).unwrap();
    let m = comparable_metrics(&d.path().join("dynamic"));
    assert_eq!(m.len(), 6);
    let batches: Vec<u64> = m.iter().map(|r| r["dynamic_sampling/generation_batches"].as_u64().unwrap()).collect();
    for r in &m {
        let uninformative = r["dynamic_sampling/uninformative_groups"].as_f64().unwrap();
        assert_eq!(r["frac_reward_zero_std"].as_f64().unwrap() * 4.0, uninformative, "{r}");
        let fraction = r["dynamic_sampling/informative_fraction"].as_f64().unwrap();
        assert!(uninformative == 0.0 || r["dynamic_sampling/generation_batches"] == 8, "{r}");
        assert!(fraction > 0.0 && fraction <= 1.0, "{r}");
    }
    assert!(batches.iter().any(|&b| b > 1), "all-wrong groups were replaced: {batches:?}");
    assert!(m.iter().filter(|r| r["frac_reward_zero_std"] == 0.0).count() >= 5, "{m:?}");
    let html = std::fs::read_to_string(rlhf::report::write_report(&d.path().join("dynamic")).unwrap()).unwrap();
    assert!(html.contains("rollouts per iteration") && html.contains("informative_fraction"));
    // every rollout drew its prompts from the data
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("dynamic/checkpoints/step-6/grpo_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["prompt_draws"].as_u64(), Some(4 * batches.iter().sum::<u64>()), "{state}");
    // resume from step 3: the same metrics
    train(run("resumed", Some(8)), false).unwrap();
    std::fs::remove_dir_all(d.path().join("resumed/checkpoints/step-6")).unwrap();
    train(run("resumed", Some(8)), true).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("resumed")), m);
    // one rollout per iteration: plain GRPO's batches, and so its metrics
    train(run("plain", None), false).unwrap();
    train(run("once", Some(1)), false).unwrap();
    let mut once = comparable_metrics(&d.path().join("once"));
    let filled: Vec<f64> = once.iter().map(|r| r["dynamic_sampling/uninformative_groups"].as_f64().unwrap()).collect();
    assert!(once.iter().zip(&filled).all(|(r, &f)| r["frac_reward_zero_std"].as_f64().unwrap() * 4.0 == f));
    assert!(filled.iter().any(|&f| f > 0.0), "the batch was filled with uninformative groups: {filled:?}");
    // one rollout: the batch is everything generated
    assert!(once.iter().all(|r| r["reward"] == r["dynamic_sampling/generated_reward"]), "{once:?}");
    for r in &mut once {
        r.as_object_mut().unwrap().retain(|k, _| !k.starts_with("dynamic_sampling/"));
    }
    assert_eq!(once, comparable_metrics(&d.path().join("plain")));
}
