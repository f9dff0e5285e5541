//! An external reward process (`examples/external_reward.py`) driven through `CommandReward`
//! and the environment.
//!
//! `cargo run --release --example external_reward` (needs `python3` on PATH)

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use dfdx::prelude::*;
use rlhf_envs::{CommandReward, KlConfig, PromptSource, TextEnvConfig, VecEnv};
use rlhf_policies::{CausalLm, EngineSession, InferenceModel, ModelConfig, SamplingConfig, Tokenizer};

fn main() -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/external_reward.py");
    let reward = CommandReward::spawn("python3", &[script], Duration::from_secs(10))?;
    let tok = Tokenizer::byte_level()?;
    let model = CausalLm::new(ModelConfig::gpt2_preset(tok.vocab_size(), 64, 2, 4, 128), &Cpu::default(), 0)?;
    let engine = Arc::new(InferenceModel::from_model(&model));
    let sampling = SamplingConfig { seed: 2, ..Default::default() };
    let prompts = ["Once upon a time", "My favourite food"]
        .iter()
        .map(|t| Ok((tok.encode(t)?, t.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let cfg = TextEnvConfig {
        vocab: tok.vocab_size() as u32,
        max_new_tokens: 24,
        eos_ids: vec![0],
        stop_ids: vec![],
        kl: KlConfig::default(),
        score: Default::default(),
    };
    let reference = EngineSession::new(engine.clone(), 2, 64, sampling.clone());
    let mut env = VecEnv::new(2, cfg, PromptSource::new(prompts, 0)?, reference, reward, Box::new(tok.clone()))?;
    let mut policy = EngineSession::new(engine, 2, 64, sampling);
    for ep in env.rollout(&mut policy)? {
        println!(
            "{:?}: raw score {:.3}, per-token rewards {:?}",
            tok.decode(&ep.response_ids)?,
            ep.raw_score,
            &ep.rewards[ep.rewards.len().saturating_sub(3)..]
        );
    }
    Ok(())
}
