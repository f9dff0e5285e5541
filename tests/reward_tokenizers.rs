//! A reward model with its own tokenizer: PPO and GRPO hand it the prompt and response as text
//! in its tokens (closed by its EOS when the response ended), a reward model with the policy's
//! vocabulary reads the policy's ids, a critic that would read the policy's ids from another
//! vocabulary is refused, and a reward model without a tokenizer must fit the policy's ids.

mod common;

use common::pretrained_policy;
use dfdx::prelude::*;
use rlhf::stages::ppo::{train, PpoConfig};
use rlhf::stages::ppo_models::ValueModelConfig;
use rlhf::stages::reward_spec::{build_reward, RewardSpec};
use rlhf_envs::RewardInput;
use rlhf_policies::{checkpoint::load_with_tokenizer, CausalLm, LearnedReward, ModelConfig, ScalarHead, Tokenizer};

/// A random reward model over `tok`'s vocabulary saved in `dir` (with `tok`, or without any
/// tokenizer and `vocab` ids).
fn reward_model(dir: &std::path::Path, tok: Option<&Tokenizer>, vocab: usize) -> LearnedReward<Cpu> {
    let dev = Cpu::default();
    let model = CausalLm::new(ModelConfig::gpt2_preset(vocab, 16, 1, 2, 64), &dev, 3).unwrap();
    let rm = LearnedReward { model, head: ScalarHead::new(&dev, 16, 0.5, 4), norm: None, pad_id: 0 };
    rm.save_pretrained(dir, tok, None).unwrap();
    rm
}

fn input(prompt: &str, response: &str, response_ids: Vec<u32>, policy: &Tokenizer) -> RewardInput {
    RewardInput {
        prompt: prompt.into(),
        response: response.into(),
        prompt_ids: policy.encode(prompt).unwrap(),
        response_ids,
        reference: None,
    }
}

#[test]
fn a_reward_model_with_another_tokenizer_reads_the_text_in_its_own_tokens() {
    let d = tempfile::tempdir().unwrap();
    let (policy_dir, _) = pretrained_policy(d.path());
    let (_, policy_tok) = load_with_tokenizer(&policy_dir, &Cpu::default()).unwrap();
    let bytes = Tokenizer::byte_level().unwrap();
    let rm_dir = d.path().join("rm-bytes");
    let rm = reward_model(&rm_dir, Some(&bytes), 258);
    let spec = RewardSpec::Model { path: rm_dir.clone(), normalize: false };
    let mut reward = build_reward(Some(&spec), &Cpu::default()).unwrap().for_policy(&policy_tok, &[0]).unwrap();
    let cat = policy_tok.encode("cat").unwrap();
    let inputs = [
        input("the ", "cat", [cat.clone(), vec![0]].concat(), &policy_tok), // ended on EOS
        input("the ", "cat", cat.clone(), &policy_tok),                     // cut at the length limit
    ];
    let got = reward.score(&inputs).unwrap();
    let seq = |eos: bool| {
        let mut ids = [bytes.encode("the ").unwrap(), bytes.encode("cat").unwrap()].concat();
        ids.extend(eos.then_some(0));
        ids
    };
    let want = rm.score_ids(&[seq(true), seq(false)]).unwrap();
    assert_eq!(got, want);
    assert_ne!(got[0], got[1], "the EOS is read");
    // with the policy's own tokenizer it reads the policy's ids as they are (not the text)
    let same_dir = d.path().join("rm-same");
    let rm = reward_model(&same_dir, Some(&policy_tok), policy_tok.vocab_size());
    let spec = RewardSpec::Model { path: same_dir, normalize: false };
    let mut reward = build_reward(Some(&spec), &Cpu::default()).unwrap().for_policy(&policy_tok, &[0]).unwrap();
    let x = input("the ", "not the ids", cat.clone(), &policy_tok);
    let want = rm.score_ids(&[[x.prompt_ids.clone(), cat].concat()]).unwrap();
    assert_eq!(reward.score(&[x]).unwrap(), want);
}

#[test]
fn a_reward_model_without_a_tokenizer_must_fit_the_policy_s_ids() {
    let d = tempfile::tempdir().unwrap();
    let (policy_dir, _) = pretrained_policy(d.path());
    let (_, policy_tok) = load_with_tokenizer(&policy_dir, &Cpu::default()).unwrap();
    let rm_dir = d.path().join("rm-small");
    reward_model(&rm_dir, None, 4);
    let spec = RewardSpec::Model { path: rm_dir, normalize: false };
    let Err(e) = build_reward(Some(&spec), &Cpu::default()).unwrap().for_policy(&policy_tok, &[0]) else {
        panic!("4 token ids cannot read the policy's")
    };
    assert!(e.to_string().contains("no tokenizer.json") && e.to_string().contains("rm-small"), "{e}");
}

#[test]
fn ppo_trains_on_it_and_refuses_a_critic_that_would_read_the_wrong_vocabulary() {
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = pretrained_policy(d.path());
    let rm_dir = d.path().join("rm-bytes");
    reward_model(&rm_dir, Some(&Tokenizer::byte_level().unwrap()), 258);
    let cfg = PpoConfig {
        out_dir: d.path().join("ppo"),
        policy,
        prompts,
        reward: Some(RewardSpec::Model { path: rm_dir, normalize: false }),
        batch_size: 8,
        minibatch_size: 4,
        max_new_tokens: 8,
        max_prompt_len: 16,
        iterations: 2,
        ppo_epochs: 1,
        ..Default::default()
    };
    // the default critic starts from the reward model
    let e = format!("{:#}", train(cfg.clone(), false).unwrap_err());
    assert!(e.contains("value model") && e.contains("tokenizer is not the policy's"), "{e}");
    let report = train(PpoConfig { value_model: ValueModelConfig::Shared {}, ..cfg }, false).unwrap();
    assert!(report.scores.iter().all(|s| s.is_finite()) && report.scores.len() == 2, "{report:?}");
}

#[test]
fn grpo_scores_its_samples_in_the_reward_model_s_tokens() {
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = pretrained_policy(d.path());
    let bytes = Tokenizer::byte_level().unwrap();
    let rm_dir = d.path().join("rm-bytes");
    let rm = reward_model(&rm_dir, Some(&bytes), 258);
    let cfg = rlhf::stages::grpo::GrpoConfig {
        out_dir: d.path().join("grpo"),
        policy,
        prompts,
        reward: Some(RewardSpec::Model { path: rm_dir, normalize: false }),
        prompts_per_step: 2,
        num_generations: 4,
        minibatch_size: 8,
        max_new_tokens: 8,
        max_prompt_len: 16,
        iterations: 1,
        sample_every: 1,
        sample_count: 8,
        ..Default::default()
    };
    rlhf::stages::grpo::train(cfg, false).unwrap();
    let text = std::fs::read_to_string(d.path().join("grpo/samples.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 8);
    for r in rows {
        let completion = r["completion"].as_str().unwrap();
        let (text, finished) = match completion.strip_suffix(rlhf_policies::tokenizer::EOS_TOKEN) {
            Some(t) => (t, true),
            None => (completion, false),
        };
        let mut ids = [bytes.encode(r["prompt"].as_str().unwrap()).unwrap(), bytes.encode(text).unwrap()].concat();
        ids.extend(finished.then_some(0));
        let want = rm.score_ids(&[ids]).unwrap()[0] as f64;
        assert!((r["reward"].as_f64().unwrap() - want).abs() < 1e-5, "{r} vs {want}");
    }
}
