//! NLPO: the nucleus-masked rollout samples inside each step's mask with log-probs of π_θ^mask
//! that the masked training forward reproduces; a nucleus of the whole vocabulary is plain
//! PPO bit for bit; PPO's invariants hold on the masked policy; the masking policy is synced on
//! schedule and resumed exactly from a checkpoint taken between syncs.

mod common;

use common::comparable_metrics;
use dfdx::prelude::*;
use rlhf::stages::nlpo::NlpoConfig;
use rlhf::stages::ppo::{train, PpoConfig};
use rlhf_envs::Policy;
use rlhf_policies::{
    nucleus_masked_session, policy_session, Batch, CausalLm, ModelConfig, Nucleus, RolloutEngine, SamplingConfig,
};

fn model(seed: u64) -> CausalLm<Cpu> {
    let mut cfg = ModelConfig::gpt2_preset(50, 16, 2, 2, 64);
    if let ModelConfig::Gpt2(c) = &mut cfg {
        c.initializer_range = 0.3;
    }
    CausalLm::new(cfg, &Cpu::default(), seed).unwrap()
}

const PROMPTS: [&[u32]; 4] = [&[1, 2, 3], &[4, 5], &[6, 7, 8, 9], &[4, 5]];
const STEPS: usize = 10;

/// Decodes every row `STEPS` tokens with `policy`; the actions per row.
fn decode(policy: &mut dyn Policy) -> Vec<Vec<rlhf_envs::Action>> {
    let rows: Vec<usize> = (0..PROMPTS.len()).collect();
    policy.begin(&rows, &PROMPTS).unwrap();
    let mut out = vec![vec![]; rows.len()];
    for _ in 0..STEPS {
        let actions = policy.act(&rows).unwrap();
        let tokens: Vec<u32> = actions.iter().map(|a| a.token).collect();
        for (o, a) in out.iter_mut().zip(actions) {
            o.push(a);
        }
        policy.push(&rows, &tokens).unwrap();
    }
    out
}

#[test]
fn masked_rollouts_sample_inside_the_nucleus_with_the_training_forward_s_log_probs() {
    let (policy, mask_policy) = (model(1), model(2));
    let sampling = SamplingConfig { temperature: 0.8, seed: 5, eos_ids: vec![0], ..Default::default() };
    let nucleus = Nucleus { top_p: 0.6, min_keep: 3 };
    for engine in [RolloutEngine::Host, RolloutEngine::Device] {
        let mut session =
            nucleus_masked_session(&policy, Some(&mask_policy), (4, 32), nucleus, sampling.clone(), engine).unwrap();
        let actions = decode(&mut session);
        let masks = session.take_masks();
        let masses = session.take_masses();
        let sizes: Vec<usize> = masks.iter().flatten().map(|m| m.count()).collect();
        assert!(sizes.iter().all(|&s| (3..50).contains(&s)), "{engine:?}: {sizes:?}");
        assert!(masses.iter().flatten().all(|&m| m > 0.0 && m < 1.0), "{engine:?}");
        for (r, (acts, ms)) in actions.iter().zip(&masks).enumerate() {
            assert_eq!(ms.len(), STEPS);
            assert!(ms.iter().all(|m| m.allows(0)), "EOS is always allowed");
            assert!(acts.iter().zip(ms).all(|(a, m)| m.allows(a.token as usize)), "row {r}: outside the nucleus");
            // the training forward of π_θ^mask gives the sampler's log-probs
            let ids: Vec<u32> = PROMPTS[r].iter().copied().chain(acts.iter().map(|a| a.token)).collect();
            let batch = Batch::unpadded(&[ids[..ids.len() - 1].to_vec()]).unwrap();
            let rows: Vec<usize> = (PROMPTS[r].len() - 1..ids.len() - 1).collect();
            let targets: Vec<usize> = ids[PROMPTS[r].len()..].iter().map(|&t| t as usize).collect();
            let h = policy.forward_hidden_rows(&batch, &rows, NoneTape).unwrap();
            let lpe = policy.logprobs_and_entropy_masked(h, &targets, 0.8, ms).as_vec();
            for (k, a) in acts.iter().enumerate() {
                assert!((lpe[k] - a.logprob).abs() < 1e-4, "{engine:?} row {r} step {k}: {} vs {}", lpe[k], a.logprob);
            }
        }
    }
    // a masking policy that is a copy of the policy: the same as none (its own logits)
    let copy = policy.frozen_copy();
    let mut by_copy =
        nucleus_masked_session(&policy, Some(&copy), (4, 32), nucleus, sampling.clone(), RolloutEngine::Host).unwrap();
    let mut by_itself =
        nucleus_masked_session(&policy, None, (4, 32), nucleus, sampling.clone(), RolloutEngine::Host).unwrap();
    assert_eq!(decode(&mut by_copy), decode(&mut by_itself));
    assert_eq!(by_copy.take_masks(), by_itself.take_masks());
    // the whole vocabulary: exactly the policy's own samples
    let all = Nucleus { top_p: 1.0, min_keep: 1 };
    let mut masked =
        nucleus_masked_session(&policy, Some(&mask_policy), (4, 32), all, sampling.clone(), RolloutEngine::Host)
            .unwrap();
    let mut plain = policy_session(&policy, 4, 32, sampling, RolloutEngine::Host).unwrap();
    assert_eq!(decode(&mut masked), decode(plain.as_mut()));
}

fn cfg(dir: &std::path::Path, iterations: usize, nlpo: Option<NlpoConfig>) -> PpoConfig {
    PpoConfig { nlpo, ..common::ppo_config(dir, iterations) }
}

fn without_nlpo(mut m: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    m.iter_mut().for_each(|r| r.as_object_mut().unwrap().retain(|k, _| !k.starts_with("nlpo/")));
    m
}

#[test]
fn a_nucleus_of_the_whole_vocabulary_is_plain_ppo() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(cfg(a.path(), 3, None), false).unwrap();
    let whole = NlpoConfig { top_mask: 1.0, min_tokens_to_keep: 1, target_update_iterations: 2 };
    train(cfg(b.path(), 3, Some(whole)), false).unwrap();
    let (ma, mb) = (comparable_metrics(&a.path().join("ppo")), comparable_metrics(&b.path().join("ppo")));
    let vocab = mb[0]["nlpo/mask_size"].as_f64().unwrap();
    assert!(vocab > 10.0 && mb.iter().all(|r| r["nlpo/mask_size"].as_f64() == Some(vocab)));
    assert!(mb.iter().all(|r| r["nlpo/mask_mass"].as_f64() == Some(1.0)));
    assert_eq!(ma, without_nlpo(mb));
}

#[test]
fn nlpo_keeps_ppo_s_invariants_learns_and_resumes_exactly_between_syncs() {
    let nlpo = NlpoConfig { top_mask: 0.5, min_tokens_to_keep: 2, target_update_iterations: 2 };
    let d = tempfile::tempdir().unwrap();
    let report = train(cfg(d.path(), 10, Some(nlpo)), false).unwrap();
    let m = comparable_metrics(&d.path().join("ppo"));
    for (i, r) in m.iter().enumerate() {
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} at {i}"));
        assert_eq!(f("debug/first_minibatch_ratio"), 1.0, "iteration {i}");
        assert_eq!(f("debug/first_minibatch_approxkl"), 0.0, "iteration {i}");
        assert_eq!(f("nlpo/mask_synced"), if i % 2 == 0 { 1.0 } else { 0.0 }, "iteration {i}");
        assert!(f("nlpo/mask_size") >= 2.0 && f("nlpo/mask_mass") < 1.0, "iteration {i}: {r}");
        // log π^mask ≥ log π = log π_ref at iteration 1: the k1 KL is KL(π^mask ‖ π_ref) > 0
        assert!(i > 0 || f("objective/kl") > 0.0);
    }
    let first: f64 = report.scores[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = report.scores[7..].iter().sum::<f64>() / 3.0;
    assert!(last > first + 1.0, "mean score {first:.2} -> {last:.2}: {:?}", report.scores);
    assert!(d.path().join("ppo/checkpoints/step-9/nlpo_mask_policy/model.safetensors").is_file());
    // resume from step 3 (π_ψ synced before iteration 3, 0-based 2) to 5 = uninterrupted 5
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(cfg(a.path(), 5, Some(nlpo)), false).unwrap();
    train(cfg(b.path(), 5, Some(nlpo)), false).unwrap();
    std::fs::remove_dir_all(b.path().join("ppo/checkpoints/step-5")).unwrap();
    train(cfg(b.path(), 5, Some(nlpo)), true).unwrap();
    assert_eq!(comparable_metrics(&a.path().join("ppo")), comparable_metrics(&b.path().join("ppo")));
}

#[test]
fn nlpo_settings_are_checked() {
    let d = tempfile::tempdir().unwrap();
    for (bad, field) in [
        (NlpoConfig { top_mask: 0.0, ..Default::default() }, "top_mask"),
        (NlpoConfig { top_mask: 1.5, ..Default::default() }, "top_mask"),
        (NlpoConfig { target_update_iterations: 0, ..Default::default() }, "target_update_iterations"),
    ] {
        let err = train(cfg(d.path(), 1, Some(bad)), false).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
    let parsed: PpoConfig = serde_json::from_str(r#"{"nlpo": {}}"#).unwrap();
    assert_eq!(parsed.nlpo, Some(NlpoConfig { top_mask: 0.9, min_tokens_to_keep: 100, target_update_iterations: 5 }));
    assert!(serde_json::from_str::<PpoConfig>(r#"{"nlpo": {"top_p": 0.9}}"#).is_err());
}

/// NLPO with the exact KL: while the policy is the reference, π_θ^mask = π_ref/π_ref(V_p) on
/// the nucleus, so each token's KL is −log π_ref(V_p) > 0: positive from the first iteration,
/// and never negative.
#[test]
fn the_full_kl_of_the_masked_policy_is_positive_from_the_start() {
    let nlpo = NlpoConfig { top_mask: 0.5, min_tokens_to_keep: 2, target_update_iterations: 2 };
    let d = tempfile::tempdir().unwrap();
    let c = PpoConfig { kl_estimator: serde_json::from_str("\"full\"").unwrap(), ..cfg(d.path(), 3, Some(nlpo)) };
    train(c, false).unwrap();
    let m = comparable_metrics(&d.path().join("ppo"));
    let kl: Vec<f64> = m.iter().map(|r| r["objective/kl"].as_f64().unwrap()).collect();
    // at most 12 tokens of −log(mass) each, the mass at least the nucleus' 0.5
    assert!(kl[0] > 0.0 && kl[0] <= 12.0 * 2f64.ln() + 1e-4, "{kl:?}");
    assert!(kl.iter().all(|&k| k > 0.0), "{kl:?}");
}

/// While `min_new_tokens` forbids the end ids, the nucleus is taken over the other tokens:
/// a nucleus of nothing but the (forbidden) EOS would leave nothing to sample.
#[test]
fn the_nucleus_leaves_something_to_sample_while_eos_is_forbidden() {
    let policy = model(1);
    // make the first step's most likely token "EOS", with a nucleus of one token
    let h = policy.forward_hidden(&Batch::unpadded(&[PROMPTS[0].to_vec()]).unwrap(), NoneTape).unwrap();
    let logits = policy.logits(h).as_vec();
    let last = &logits[logits.len() - 50..];
    let top = (0..50).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
    let sampling = SamplingConfig { eos_ids: vec![top], min_new_tokens: 3, seed: 2, ..Default::default() };
    let nucleus = Nucleus { top_p: 0.01, min_keep: 1 };
    let mut session = nucleus_masked_session(&policy, None, (4, 32), nucleus, sampling, RolloutEngine::Host).unwrap();
    let rows: Vec<usize> = (0..PROMPTS.len()).collect();
    session.begin(&rows, &PROMPTS).unwrap();
    for _ in 0..3 {
        let actions = session.act(&rows).unwrap();
        assert!(actions.iter().all(|a| a.token != top && a.logprob.is_finite()));
        session.push(&rows, &actions.iter().map(|a| a.token).collect::<Vec<_>>()).unwrap();
    }
    let masks = session.take_masks();
    assert!(masks.iter().flatten().all(|m| m.allows(top as usize) && m.count() == 2), "the top other token and EOS");
}
