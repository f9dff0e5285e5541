//! A custom Rust reward (the fraction of vowels) run through the env on a fresh byte-level
//! model. `cargo run --release --example custom_reward`

use std::sync::Arc;

use anyhow::Result;
use dfdx::prelude::*;
use rlhf_envs::{FnReward, KlConfig, PromptSource, RewardInput, TextEnvConfig, VecEnv};
use rlhf_policies::{CausalLm, EngineSession, InferenceModel, ModelConfig, SamplingConfig, Tokenizer};

fn main() -> Result<()> {
    let vowels = FnReward::new("vowels", |x: &RewardInput| {
        x.response.chars().filter(|c| "aeiou".contains(*c)).count() as f32 / x.response.len().max(1) as f32
    });

    let tok = Tokenizer::byte_level()?;
    let model = CausalLm::new(ModelConfig::gpt2_preset(tok.vocab_size(), 64, 2, 4, 128), &Cpu::default(), 0)?;
    let engine = Arc::new(InferenceModel::from_model(&model));
    let sampling = SamplingConfig { seed: 1, ..Default::default() };
    let prompts = ["Tell me a story", "The weather is", "Rust is"]
        .iter()
        .map(|t| Ok((tok.encode(t)?, t.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let cfg = TextEnvConfig {
        vocab: tok.vocab_size() as u32,
        max_new_tokens: 16,
        eos_ids: vec![0],
        stop_ids: vec![],
        kl: KlConfig::default(),
        score: Default::default(),
    };
    let reference = EngineSession::new(engine.clone(), 3, 64, sampling.clone());
    let mut env = VecEnv::new(3, cfg, PromptSource::new(prompts, 0)?, reference, vowels, Box::new(tok.clone()))?;
    let mut policy = EngineSession::new(engine, 3, 64, sampling);
    for ep in env.rollout(&mut policy)? {
        println!(
            "{:?} -> {:?}: score {:.3}, KL {:.3}",
            tok.decode(&ep.prompt_ids)?,
            tok.decode(&ep.response_ids)?,
            ep.score,
            ep.kl.iter().sum::<f32>()
        );
    }
    Ok(())
}
