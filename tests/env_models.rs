//! The environment driven by real models: the sampling engine as policy and reference, the
//! learned reward, and the tokenizer as detokenizer.

mod common;

use std::sync::Arc;

use common::*;
use dfdx::prelude::*;
use rlhf_envs::*;
use rlhf_policies::{
    Batch, CausalLm, EngineSession, InferenceModel, LearnedReward, ModelConfig, SamplingConfig, ScalarHead, Tokenizer,
};

fn lm(seed: u64) -> CausalLm<Cpu> {
    let mut cfg = ModelConfig::gpt2_preset(258, 32, 2, 2, 64);
    if let ModelConfig::Gpt2(c) = &mut cfg {
        c.initializer_range = 0.2;
    }
    CausalLm::new(cfg, &Cpu::default(), seed).unwrap()
}

fn env_cfg(max_new: usize) -> TextEnvConfig {
    TextEnvConfig {
        vocab: 258,
        max_new_tokens: max_new,
        eos_ids: vec![0],
        stop_ids: vec![b'.' as u32 + 2],
        kl: KlConfig { beta: 0.05, estimator: KlEstimator::K1 },
        score: ScoreConfig::default(),
    }
}

fn source(tok: &Tokenizer) -> PromptSource {
    let texts = ["The cat", "A dog sat", "Hello", "Once upon a time", "Why"];
    PromptSource::new(texts.iter().map(|t| (tok.encode(t).unwrap(), t.to_string())).collect(), 3).unwrap()
}

fn session(m: &CausalLm<Cpu>, rows: usize, seed: u64) -> EngineSession {
    let sampling = SamplingConfig { temperature: 0.9, seed, ..Default::default() };
    EngineSession::new(Arc::new(InferenceModel::from_model(m)), rows, 64, sampling)
}

fn length_reward() -> LengthReward {
    LengthReward { target: 5, scale: 0.2, eos_id: Some(0) }
}

#[test]
fn kl_is_exactly_zero_against_an_identical_reference() {
    let tok = Tokenizer::byte_level().unwrap();
    let m = lm(1);
    let mut v =
        VecEnv::new(4, env_cfg(12), source(&tok), session(&m, 4, 0), length_reward(), Box::new(tok.clone())).unwrap();
    let episodes = v.rollout(&mut session(&m, 4, 99)).unwrap();
    for ep in &episodes {
        assert_eq!(ep.logprobs, ep.ref_logprobs);
        assert!(ep.kl.iter().all(|&k| k == 0.0));
    }
    assert!(episodes.iter().map(|e| e.response_ids.len()).sum::<usize>() > 8);
}

#[test]
fn token_by_token_stepping_equals_the_batched_rollout_with_real_models() {
    let tok = Tokenizer::byte_level().unwrap();
    let (policy, reference) = (lm(1), lm(2));
    let n = 5;
    let mut v =
        VecEnv::new(n, env_cfg(10), source(&tok), session(&reference, n, 0), length_reward(), Box::new(tok.clone()))
            .unwrap();
    let episodes = v.rollout(&mut session(&policy, n, 7)).unwrap();
    assert!(episodes.iter().any(|e| e.kl.iter().any(|&k| k != 0.0)));
    for ep in &episodes {
        let one_src = PromptSource::new(vec![(ep.prompt_ids.clone(), tok.decode(&ep.prompt_ids).unwrap())], 0).unwrap();
        let mut one =
            TextGenEnv::new(env_cfg(10), one_src, session(&reference, 1, 0), length_reward(), Box::new(tok.clone()))
                .unwrap();
        one.reset(None).unwrap();
        let rewards: Vec<f32> = ep
            .response_ids
            .iter()
            .zip(&ep.logprobs)
            .map(|(&t, &lp)| one.step(Action { token: t, logprob: lp }).unwrap().reward)
            .collect();
        assert_eq!(rewards, ep.rewards, "prompt {:?}", ep.prompt_ids);
    }
}

#[test]
fn rollout_logprobs_match_the_training_forward() {
    let tok = Tokenizer::byte_level().unwrap();
    let (policy, reference) = (lm(3), lm(4));
    let mut v =
        VecEnv::new(3, env_cfg(8), source(&tok), session(&reference, 3, 0), length_reward(), Box::new(tok.clone()))
            .unwrap();
    let episodes = v.rollout(&mut session(&policy, 3, 5)).unwrap();
    let vsz = 258;
    for ep in &episodes {
        let seq = [ep.prompt_ids.as_slice(), &ep.response_ids].concat();
        for (model, got) in [(&policy, &ep.logprobs), (&reference, &ep.ref_logprobs)] {
            let logits =
                model.forward(&Batch::unpadded(std::slice::from_ref(&seq)).unwrap(), NoneTape).unwrap().as_vec();
            for (t, &lp) in got.iter().enumerate() {
                let pos = ep.prompt_ids.len() - 1 + t;
                let row: Vec<f32> = logits[pos * vsz..(pos + 1) * vsz].iter().map(|l| l / 0.9).collect();
                let want = log_softmax_ref(&row)[seq[pos + 1] as usize];
                assert!((lp - want).abs() < 1e-4, "t {t}: {lp} vs {want}");
            }
        }
    }
}

/// Grouped rollouts prefill each shared prompt once and copy its cache row: every row's
/// sampling and reference log-probs still equal the training forward's.
#[test]
fn grouped_rollouts_with_a_shared_prefill_match_the_training_forward() {
    let tok = Tokenizer::byte_level().unwrap();
    let (policy, reference) = (lm(3), lm(4));
    let mut v =
        VecEnv::new(6, env_cfg(8), source(&tok), session(&reference, 6, 0), length_reward(), Box::new(tok.clone()))
            .unwrap();
    let episodes = v.rollout_with(&mut session(&policy, 6, 5), Rollout { group_size: 3, reference: true }).unwrap();
    assert!(episodes[0].prompt_ids == episodes[2].prompt_ids && episodes[3].prompt_ids == episodes[5].prompt_ids);
    assert!(episodes[..3].iter().any(|e| e.response_ids != episodes[0].response_ids));
    for ep in &episodes {
        let seq = [ep.prompt_ids.as_slice(), &ep.response_ids].concat();
        for (model, got) in [(&policy, &ep.logprobs), (&reference, &ep.ref_logprobs)] {
            let logits =
                model.forward(&Batch::unpadded(std::slice::from_ref(&seq)).unwrap(), NoneTape).unwrap().as_vec();
            for (t, &lp) in got.iter().enumerate() {
                let pos = ep.prompt_ids.len() - 1 + t;
                let row: Vec<f32> = logits[pos * 258..(pos + 1) * 258].iter().map(|l| l / 0.9).collect();
                let want = log_softmax_ref(&row)[seq[pos + 1] as usize];
                assert!((lp - want).abs() < 1e-4, "t {t}: {lp} vs {want}");
            }
        }
    }
}

#[test]
fn learned_reward_scores_the_last_token_of_prompt_and_response() {
    let dev = Cpu::default();
    let m = lm(5);
    let head = ScalarHead::new(&dev, 32, 0.3, 1);
    let mut rm = LearnedReward {
        model: m.clone(),
        head: head.clone(),
        norm: Some(ScoreNorm { mean: 0.5, std: 2.0 }),
        pad_id: 1,
    };
    let inputs = vec![
        RewardInput {
            prompt: "ab".into(),
            response: "c".into(),
            prompt_ids: vec![3, 4],
            response_ids: vec![5],
            reference: None,
        },
        RewardInput {
            prompt: "a".into(),
            response: "bcde".into(),
            prompt_ids: vec![3],
            response_ids: vec![4, 5, 6, 7],
            reference: None,
        },
    ];
    let got = rm.score(&inputs).unwrap();
    for (x, g) in inputs.iter().zip(&got) {
        let seq = [x.prompt_ids.as_slice(), &x.response_ids].concat();
        let h = m.forward_hidden(&Batch::unpadded(std::slice::from_ref(&seq)).unwrap(), NoneTape).unwrap();
        let raw = head.read_at(h, &[seq.len() - 1]).unwrap().as_vec()[0];
        assert!((g - (raw - 0.5) / 2.0).abs() < 1e-5);
    }
}
