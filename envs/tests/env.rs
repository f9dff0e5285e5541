//! Environment semantics: step/reset rules, reward shaping against the PPO fixture, the
//! equivalence of token-by-token stepping and the batched rollout, and KL 0 against itself.

mod common;

use common::*;
use rlhf_envs::kl::{kl_terms, shaped_rewards};
use rlhf_envs::*;

fn cfg(max_new: usize, eos: u32) -> TextEnvConfig {
    TextEnvConfig {
        vocab: 12,
        max_new_tokens: max_new,
        eos_ids: vec![eos],
        stop_ids: vec![],
        kl: KlConfig { beta: 0.1, estimator: KlEstimator::K1 },
        score: ScoreConfig::default(),
    }
}

/// Reward: 0.5 per token of response plus 3 if it ends on EOS (id 0).
fn rule() -> FnReward<impl FnMut(&RewardInput) -> f32> {
    FnReward::new("rule", |x: &RewardInput| {
        0.5 * x.response_ids.len() as f32 + if x.response_ids.last() == Some(&0) { 3.0 } else { 0.0 }
    })
}

fn env(max_new: usize) -> TextGenEnv<Bigram, FnReward<impl FnMut(&RewardInput) -> f32>> {
    TextGenEnv::new(
        cfg(max_new, 0),
        PromptSource::new(prompts(4), 1).unwrap(),
        Bigram::new(12, 0.3, 1, 0),
        rule(),
        Box::new(Letters),
    )
    .unwrap()
}

/// An env over two prompts with `c`.
fn env_with(c: TextEnvConfig) -> Result<TextGenEnv<Bigram, FnReward<impl FnMut(&RewardInput) -> f32>>, EnvError> {
    TextGenEnv::new(c, PromptSource::new(prompts(2), 1).unwrap(), Bigram::new(12, 0.3, 1, 0), rule(), Box::new(Letters))
}

/// `n` environments over `prompts` against the bigram reference, scored by [`rule`].
fn vec_env(
    n: usize,
    c: TextEnvConfig,
    prompts: PromptSource,
) -> VecEnv<Bigram, FnReward<impl FnMut(&RewardInput) -> f32>> {
    VecEnv::new(n, c, prompts, Bigram::new(12, 0.3, n, 0), rule(), Box::new(Letters)).unwrap()
}

fn act(tok: u32) -> Action {
    Action { token: tok, logprob: -1.0 }
}

#[test]
fn terminated_on_eos_and_score_on_that_token() {
    let mut e = env(10);
    let (obs, info) = e.reset(Some(3)).unwrap();
    assert_eq!(obs.ids.len(), obs.prompt_len);
    assert_eq!(info.prompt, format!("prompt {}", info.prompt_index));
    let s = e.step(act(5)).unwrap();
    assert!(!s.terminated && !s.truncated && s.info.score.is_none());
    assert_eq!(s.obs.ids.len(), obs.prompt_len + 1);
    let s = e.step(act(0)).unwrap();
    assert!(s.terminated && !s.truncated && s.info.eos);
    // reward = -β·k1 + score, score = 0.5·2 + 3
    assert!((s.reward - (-0.1 * s.info.kl + 4.0)).abs() < 1e-6);
    let ep = s.info.episode.unwrap();
    assert_eq!(ep.response_ids, vec![5, 0]);
    assert_eq!(ep.rewards.len(), 2);
    assert!((ep.rewards[0] + 0.1 * ep.kl[0]).abs() < 1e-6, "no score before the last token");
    assert!(matches!(e.step(act(3)), Err(EnvError::EpisodeDone { .. })));
}

#[test]
fn truncated_at_max_new_tokens_with_score_on_the_last_token() {
    let mut e = env(3);
    e.reset(None).unwrap();
    for _ in 0..2 {
        let s = e.step(act(4)).unwrap();
        assert!(!s.terminated && !s.truncated);
    }
    let s = e.step(act(4)).unwrap();
    assert!(s.truncated && !s.terminated);
    assert_eq!(s.info.raw_score, Some(1.5));
    assert!(matches!(e.step(act(4)), Err(EnvError::EpisodeDone { .. })));
}

#[test]
fn errors_before_reset_and_for_invalid_actions() {
    let mut e = env(3);
    assert!(matches!(e.step(act(1)), Err(EnvError::NotReset { .. })));
    e.reset(None).unwrap();
    assert!(matches!(e.step(act(99)), Err(EnvError::InvalidAction { action: 99, n: 12 })));
}

#[test]
fn missing_eos_penalty_applies_only_to_truncated_episodes() {
    let mut c = cfg(2, 0);
    c.score.missing_eos = MissingEos::Subtract(1.0);
    let mut e = env_with(c).unwrap();
    e.reset(None).unwrap();
    e.step(act(4)).unwrap();
    let s = e.step(act(4)).unwrap();
    assert_eq!((s.info.raw_score, s.info.score), (Some(1.0), Some(0.0)));
    e.reset(None).unwrap();
    let s = e.step(act(0)).unwrap();
    assert_eq!((s.info.raw_score, s.info.score), (Some(3.5), Some(3.5)));
}

#[test]
fn overlong_shaping_reaches_the_episode_s_score() {
    // L_max 4, cache 2: responses of 1–2 tokens keep their score, 3 loses 0.5, 4 loses 1
    let mut c = cfg(4, 0);
    c.score.overlong_cache = Some(2);
    let mut e = env_with(c).unwrap();
    for (tokens, want) in [(vec![0], 3.5), (vec![4, 0], 4.0), (vec![4, 4, 0], 4.5 - 0.5), (vec![4, 4, 4, 4], 2.0 - 1.0)]
    {
        e.reset(None).unwrap();
        let last = tokens.iter().map(|&t| e.step(act(t)).unwrap()).last().unwrap();
        assert_eq!(last.info.score, Some(want), "{tokens:?}");
    }
    let mut c = cfg(4, 0);
    c.score.overlong_cache = Some(5);
    let err = env_with(c).err().unwrap().to_string();
    assert!(err.contains("score.overlong_cache") && err.contains("1..=max_new_tokens (4), got 5"), "{err}");
}

#[test]
fn seeded_prompt_order_and_epochs() {
    let mut a = PromptSource::new(prompts(5), 9).unwrap();
    let mut b = PromptSource::new(prompts(5), 9).unwrap();
    let xs: Vec<usize> = (0..10).map(|_| a.next_index()).collect();
    let ys: Vec<usize> = (0..10).map(|_| b.next_index()).collect();
    assert_eq!(xs, ys);
    let mut first: Vec<usize> = xs[..5].to_vec();
    first.sort();
    assert_eq!(first, vec![0, 1, 2, 3, 4], "each prompt once per epoch");
    a.reseed(9);
    assert_eq!((0..10).map(|_| a.next_index()).collect::<Vec<_>>(), xs);
    let mut c = PromptSource::new(prompts(5), 10).unwrap();
    assert_ne!((0..10).map(|_| c.next_index()).collect::<Vec<_>>(), xs);
}

#[test]
fn vec_env_auto_resets_finished_rows() {
    let mut v = vec_env(3, cfg(2, 0), PromptSource::new(prompts(6), 2).unwrap());
    let obs = v.reset(Some(2)).unwrap();
    assert_eq!(obs.len(), 3);
    // row 1 ends on EOS; rows 0 and 2 continue
    let steps = v.step(&[act(4), act(0), act(5)]).unwrap();
    assert!(steps[1].terminated && steps[1].info.episode.is_some());
    assert_eq!(steps[1].obs.ids.len(), steps[1].obs.prompt_len, "row 1 already shows its next prompt");
    assert_eq!(steps[0].obs.ids.len(), steps[0].obs.prompt_len + 1);
    // next step: rows 0 and 2 truncate at 2 tokens, row 1 takes its first token of episode 2
    let steps = v.step(&[act(4), act(6), act(5)]).unwrap();
    assert!(steps[0].truncated && steps[2].truncated && !steps[1].truncated && !steps[1].terminated);
    assert_eq!(steps[0].info.episode.as_ref().unwrap().response_ids, vec![4, 4]);
    assert!(v.step(&[act(1)]).is_err(), "one action per env");
}

/// The batched rollout and token-by-token stepping of single environments give exactly the
/// same per-token rewards (same prompts, same actions).
#[test]
fn stepping_equals_batched_rollout() {
    let n = 4;
    let mut v = vec_env(n, cfg(8, 0), PromptSource::new(prompts(7), 5).unwrap());
    let mut policy = Bigram::new(12, 0.9, n, 42);
    let episodes = v.rollout(&mut policy).unwrap();
    assert!(
        episodes.iter().any(|e| e.terminated) && episodes.iter().any(|e| e.truncated),
        "both endings are exercised"
    );
    // the same prompt order, row by row, through one TextGenEnv
    let mut src = PromptSource::new(prompts(7), 5).unwrap();
    for ep in &episodes {
        let i = src.next_index();
        assert_eq!(ep.prompt_index, i);
        let mut one = TextGenEnv::new(
            cfg(8, 0),
            PromptSource::new(vec![(ep.prompt_ids.clone(), format!("prompt {i}"))], 0).unwrap(),
            Bigram::new(12, 0.3, 1, 0),
            rule(),
            Box::new(Letters),
        )
        .unwrap();
        one.reset(None).unwrap();
        let mut rewards = vec![];
        let mut last = None;
        for (&t, &lp) in ep.response_ids.iter().zip(&ep.logprobs) {
            let s = one.step(Action { token: t, logprob: lp }).unwrap();
            rewards.push(s.reward);
            last = s.info.episode;
        }
        assert_eq!(rewards, ep.rewards, "per-token rewards");
        let mut last = *last.expect("the episode ended");
        last.prompt_index = ep.prompt_index; // the single env's source holds just this prompt
        assert_eq!(&last, ep, "whole episode");
    }
}

#[test]
fn kl_is_zero_when_the_policy_is_the_reference() {
    let n = 3;
    let mut v = vec_env(n, cfg(6, 0), PromptSource::new(prompts(3), 1).unwrap());
    let mut same = Bigram::new(12, 0.3, n, 7);
    for ep in v.rollout(&mut same).unwrap() {
        assert!(ep.kl.iter().all(|&k| k == 0.0), "{:?}", ep.kl);
        assert_eq!(ep.logprobs, ep.ref_logprobs);
        let last = ep.rewards.len() - 1;
        assert!(ep.rewards[..last].iter().all(|&r| r == 0.0));
        assert_eq!(ep.rewards[last], ep.score);
    }
}

/// Grouped rollouts: G consecutive rows share a prompt (group-major), the groups draw
/// prompts in the source's order, the G samples differ; without the reference pass every KL
/// term is exactly 0 and the reference's log-probs are the sampling ones.
#[test]
fn grouped_rollout_shares_prompts_and_can_skip_the_reference() {
    let (n, g) = (6, 3);
    let mut v = vec_env(n, cfg(8, 0), PromptSource::new(prompts(7), 5).unwrap());
    let mut policy = Bigram::new(12, 0.9, n, 42);
    let eps = v.rollout_with(&mut policy, Rollout { group_size: g, reference: false }).unwrap();
    let mut src = PromptSource::new(prompts(7), 5).unwrap();
    for group in eps.chunks(g) {
        let i = src.next_index();
        assert!(group.iter().all(|e| e.prompt_index == i && e.prompt_ids == group[0].prompt_ids));
        assert!(group.iter().any(|e| e.response_ids != group[0].response_ids), "the samples of a group differ");
    }
    for ep in &eps {
        assert_eq!(ep.ref_logprobs, ep.logprobs);
        assert!(ep.kl.iter().all(|&k| k == 0.0));
        assert_eq!(*ep.rewards.last().unwrap(), ep.score);
    }
    assert_eq!(v.prompts().draws(), n / g);
    // an env built without a reference rolls out without one, and refuses to step
    let mut bare =
        VecEnv::new(n, cfg(8, 0), PromptSource::new(prompts(7), 5).unwrap(), NoReference, rule(), Box::new(Letters))
            .unwrap();
    assert_eq!(bare.rollout_with(&mut policy, Rollout { group_size: g, reference: false }).unwrap().len(), n);
    assert!(bare.reset(None).unwrap_err().to_string().contains("no reference model"));
    let e = v.rollout_with(&mut policy, Rollout { group_size: 4, reference: true }).unwrap_err().to_string();
    assert!(e.contains("group_size"), "{e}");
}

// ---- reward shaping against shared/fixtures/ppo ----

fn fixture() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/ppo/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn rows_f32(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

#[test]
fn kl_estimators_and_shaped_rewards_match_the_ppo_fixture() {
    let f = fixture();
    let inp = &f["inputs"];
    let lengths: Vec<usize> = inp["lengths"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let has_eos: Vec<bool> = inp["has_eos"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
    let scores: Vec<f32> = inp["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let (old, refl) = (rows_f32(&inp["old_logprobs"]), rows_f32(&inp["ref_logprobs"]));
    let beta = f["params"]["beta"].as_f64().unwrap() as f32;
    for (name, est) in [("k1", KlEstimator::K1), ("k2", KlEstimator::K2), ("k3", KlEstimator::K3)] {
        let want = rows_f32(&f["kl"][name]);
        for b in 0..lengths.len() {
            let got = kl_terms(&old[b][..lengths[b]], &refl[b][..lengths[b]], est);
            for t in 0..want[b].len() {
                let g = if t < lengths[b] { got[t] } else { 0.0 };
                assert!(close(g, want[b][t]), "{name}[{b},{t}]: {g} vs {}", want[b][t]);
            }
        }
    }
    let kl = KlConfig { beta, estimator: KlEstimator::K1 };
    let variants = [
        ("rewards_k1", MissingEos::Keep),
        (
            "rewards_k1_missing_eos_replace",
            MissingEos::Replace(f["params"]["missing_eos_score"].as_f64().unwrap() as f32),
        ),
        (
            "rewards_k1_missing_eos_subtract",
            MissingEos::Subtract(f["params"]["missing_eos_penalty_subtract"].as_f64().unwrap() as f32),
        ),
    ];
    for (field, missing) in variants {
        let sc = ScoreConfig { missing_eos: missing, ..Default::default() };
        let want = rows_f32(&f["rewards"][field]);
        for b in 0..lengths.len() {
            let score = sc.process(None, scores[b], has_eos[b], (lengths[b], usize::MAX));
            let got = shaped_rewards(&old[b][..lengths[b]], &refl[b][..lengths[b]], &kl, score);
            for t in 0..want[b].len() {
                let g = if t < lengths[b] { got[t] } else { 0.0 };
                assert!(close(g, want[b][t]), "{field}[{b},{t}]: {g} vs {}", want[b][t]);
            }
        }
    }
}

#[test]
fn prompt_source_seek_replays_the_draws_of_its_seed() {
    let prompts: Vec<(Vec<u32>, String)> = (0..5).map(|i| (vec![i + 1], format!("p{i}"))).collect();
    let mut a = rlhf_envs::PromptSource::new(prompts.clone(), 9).unwrap();
    let first: Vec<usize> = (0..13).map(|_| a.next_index()).collect();
    assert_eq!(a.draws(), 13);
    let mut b = rlhf_envs::PromptSource::new(prompts, 9).unwrap();
    b.next_index();
    b.seek(7);
    let rest: Vec<usize> = (0..6).map(|_| b.next_index()).collect();
    assert_eq!(rest, first[7..]);
}

#[test]
fn the_reward_reads_the_response_text_without_its_eos() {
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    let reward = FnReward::new("text", move |x: &RewardInput| {
        log.borrow_mut().push((x.response.clone(), x.response_ids.clone()));
        0.0
    });
    let mut e = TextGenEnv::new(
        cfg(3, 0),
        PromptSource::new(prompts(2), 1).unwrap(),
        Bigram::new(12, 0.3, 1, 0),
        reward,
        Box::new(Letters),
    )
    .unwrap();
    e.reset(Some(1)).unwrap();
    e.step(act(5)).unwrap();
    e.step(act(0)).unwrap(); // EOS: terminated
    e.reset(None).unwrap();
    for t in [5, 6, 7] {
        e.step(act(t)).unwrap(); // truncated at 3 tokens
    }
    let seen = seen.borrow();
    assert_eq!(seen[0], ("f".to_string(), vec![5, 0]), "the EOS is in the ids, not the text");
    assert_eq!(seen[1], ("fgh".to_string(), vec![5, 6, 7]), "a truncated response keeps every token");
}

#[test]
fn each_prompt_s_reference_answer_reaches_the_reward() {
    // the reward sees prompt i's reference answer "ref i", through stepping and the rollout
    let refs = |n: usize| (0..n).map(|i| format!("ref {i}")).collect::<Vec<_>>();
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    let reward = FnReward::new("refs", move |x: &RewardInput| {
        log.borrow_mut().push((x.prompt.clone(), x.reference.clone()));
        0.0
    });
    let source = PromptSource::new(prompts(5), 3).unwrap().with_references(refs(5)).unwrap();
    assert_eq!(source.reference(4), Some("ref 4"));
    let (n, g) = (4, 2);
    let mut v = VecEnv::new(n, cfg(3, 0), source, Bigram::new(12, 0.3, n, 0), reward, Box::new(Letters)).unwrap();
    let mut policy = Bigram::new(12, 0.9, n, 7);
    let eps = v.rollout_with(&mut policy, Rollout { group_size: g, reference: true }).unwrap();
    let texts: Vec<String> = prompts(5).into_iter().map(|(_, t)| t).collect();
    let seen = seen.borrow();
    assert_eq!(seen.len(), eps.len());
    for (ep, (prompt, reference)) in eps.iter().zip(seen.iter()) {
        assert_eq!(prompt, &texts[ep.prompt_index]);
        assert_eq!(reference.as_deref(), Some(format!("ref {}", ep.prompt_index).as_str()));
    }
    // without references the field is empty; a count that does not match is an error
    assert_eq!(PromptSource::new(prompts(2), 0).unwrap().reference(1), None);
    let e = PromptSource::new(prompts(2), 0).unwrap().with_references(refs(3)).unwrap_err().to_string();
    assert!(e.contains("reference answers"), "{e}");
}

/// Held-out rollouts: chosen prompts of another source, in order, on the first rows; the
/// reward sees that source's texts and references; the env's own sampler does not move.
#[test]
fn rollout_prompts_takes_the_given_prompts_and_leaves_the_sampler_alone() {
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    let reward = FnReward::new("refs", move |x: &RewardInput| {
        log.borrow_mut().push((x.prompt.clone(), x.reference.clone()));
        1.0
    });
    let (n, g) = (6, 2);
    let train = || PromptSource::new(prompts(7), 5).unwrap();
    let mut v = VecEnv::new(n, cfg(4, 0), train(), Bigram::new(12, 0.3, n, 0), reward, Box::new(Letters)).unwrap();
    let held: Vec<(Vec<u32>, String)> = (0..4).map(|i| (vec![3, 4 + i], format!("held {i}"))).collect();
    let refs = (0..4).map(|i| format!("answer {i}")).collect();
    let mut held = PromptSource::new(held, 0).unwrap().with_references(refs).unwrap();
    let mut policy = Bigram::new(12, 0.9, n, 42);
    let eps = v.rollout_prompts(&mut policy, &mut held, &[3, 1], Rollout { group_size: g, reference: true }).unwrap();
    assert_eq!(eps.len(), 4, "two prompts of two rows each");
    let indices: Vec<usize> = eps.iter().map(|e| e.prompt_index).collect();
    assert_eq!(indices, [3, 3, 1, 1]);
    assert_eq!(eps[0].prompt_ids, vec![3, 7]);
    let seen_now: Vec<(String, Option<String>)> = seen.borrow().clone();
    assert_eq!(seen_now[0], ("held 3".to_string(), Some("answer 3".to_string())));
    assert_eq!(seen_now[3], ("held 1".to_string(), Some("answer 1".to_string())));
    assert_eq!((v.prompts().draws(), held.draws()), (0, 0), "neither sampler moved");
    assert_eq!(held.text(2), "held 2", "the held-out source is handed back");
    // training rollouts draw exactly as they would have without the evaluation
    let after: Vec<usize> = v.rollout(&mut policy).unwrap().iter().map(|e| e.prompt_index).collect();
    let mut src = train();
    assert_eq!(after, (0..n).map(|_| src.next_index()).collect::<Vec<_>>());
    // a group size that does not divide the rows is fine here: one prompt on 4 of the 6 rows
    let eps = v.rollout_prompts(&mut policy, &mut held, &[2], Rollout { group_size: 4, reference: true }).unwrap();
    assert!(eps.len() == 4 && eps.iter().all(|e| e.prompt_index == 2));
    // too many prompts for the rows, an index out of range, an empty group
    let opts = Rollout { group_size: g, reference: true };
    let e = v.rollout_prompts(&mut policy, &mut held, &[0, 1, 2, 3], opts).unwrap_err().to_string();
    assert!(e.contains("do not fit"), "{e}");
    let e = v.rollout_prompts(&mut policy, &mut held, &[4], opts).unwrap_err().to_string();
    assert!(e.contains("prompt 4 of 4"), "{e}");
    let e = v.rollout_prompts(&mut policy, &mut held, &[0], Rollout { group_size: 0, reference: true });
    assert!(e.unwrap_err().to_string().contains("group_size"));
}

/// `score.running_norm`: each training batch's raw scores join the running statistics before
/// the batch is scaled by them; held-out rollouts use them without adding to them; the single
/// env learns episode by episode (its first score passes unscaled). (Restoring them is tested
/// by PPO's and ReMax's exact resume.)
#[test]
fn running_norm_scales_each_batch_by_the_statistics_of_every_training_score_so_far() {
    let mut c = cfg(4, 0);
    c.score.running_norm = Some(RunningNorm { center: true });
    let n = 6;
    let mut v = vec_env(n, c.clone(), PromptSource::new(prompts(7), 5).unwrap());
    let mut policy = Bigram::new(12, 0.9, n, 42);
    let (mut all, mut raw_seen) = (RunningMoments::default(), Vec::<f32>::new());
    for _ in 0..3 {
        let eps = v.rollout(&mut policy).unwrap();
        let raw: Vec<f32> = eps.iter().map(|e| e.raw_score).collect();
        raw_seen.extend(&raw);
        all.update(&raw);
        assert_eq!(v.score_moments(), all);
        let (mean, std) = (all.mean as f32, all.std().unwrap() as f32);
        assert!(std > 0.0, "the rule's scores vary: {raw_seen:?}");
        for e in &eps {
            assert_eq!(e.score, (e.raw_score - mean) / std);
            assert_eq!(*e.rewards.last().unwrap(), e.score - 0.1 * e.kl.last().unwrap());
        }
        // held-out: scaled by the same statistics, not added to them
        let mut held = PromptSource::new(prompts(3), 0).unwrap();
        let eps = v.rollout_prompts(&mut policy, &mut held, &[0, 1], Rollout::default()).unwrap();
        assert_eq!(v.score_moments(), all);
        assert!(eps.iter().all(|e| e.score == (e.raw_score - mean) / std));
    }
    // one env, episode by episode: k tokens, then EOS (raw 3.5, 4, 4.5)
    let mut e = env_with(c.clone()).unwrap();
    let mut seen = RunningMoments::default();
    for k in 0..3 {
        e.reset(None).unwrap();
        for _ in 0..k {
            assert!(e.step(act(5)).unwrap().info.score.is_none());
        }
        let s = e.step(act(0)).unwrap();
        let (raw, score) = (s.info.raw_score.unwrap(), s.info.score.unwrap());
        seen.update(&[raw]);
        assert_eq!(e.score_moments(), seen);
        if k == 0 {
            assert_eq!(score, raw, "one score seen: unscaled");
        } else {
            let n = seen.norm(true).unwrap();
            assert_eq!(score, (raw - n.mean) / n.std);
        }
    }
    // not with a fixed normalisation
    c.score.normalize = Some(ScoreNorm { mean: 0.0, std: 1.0 });
    let err = env_with(c).unwrap_err().to_string();
    assert!(err.contains("score.running_norm") && err.contains("not both"), "{err}");
}
