//! Trains a reward model on a synthetic preference set — the chosen response always contains
//! the word "good" — from a fresh tiny character-level model, then scores two new responses.
//!
//! ```text
//! cargo run --release --example 04_reward_model
//! ```

use anyhow::Result;
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf::schedule::LrSchedule;
use rlhf::stages::reward::{train, RewardConfig};
use rlhf_envs::{RewardInput, RewardModel};
use rlhf_policies::{AdamWConfig, CausalLm, LearnedReward, ModelConfig, Tokenizer};

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join("rlhf-example-04");
    std::fs::create_dir_all(&dir)?;
    // DATA: 300 comparisons "review: <5 words>", only the chosen one with the marker word (the
    // same length on both sides, so length cannot give the answer away)
    let words = ["the", "food", "was", "fine", "cold", "hot", "nice", "slow", "fast", "ok"];
    let mut rng = StdRng::seed_from_u64(0);
    let mut phrase = |marker: bool| {
        let mut w: Vec<&str> = (0..5).map(|_| words[rng.gen_range(0..words.len())]).collect();
        if marker {
            w[rng.gen_range(0..5)] = "good";
        }
        format!(" {}", w.join(" "))
    };
    let lines: Vec<String> = (0..300)
        .map(|_| {
            serde_json::json!({"prompt": "review:", "chosen": phrase(true), "rejected": phrase(false)}).to_string()
        })
        .collect();
    std::fs::write(dir.join("prefs.jsonl"), lines.join("\n"))?;
    // MODEL: a fresh 2-layer GPT-2 with a character tokenizer
    let tok = Tokenizer::char_level("abcdefghijklmnopqrstuvwxyz :")?;
    let model = CausalLm::new(ModelConfig::gpt2_preset(tok.vocab_size(), 32, 2, 2, 64), &Cpu::default(), 0)?;
    model.save_pretrained(&dir.join("init"), Some(&tok))?;
    let _ = std::fs::remove_dir_all(dir.join("run"));
    let report = train(
        RewardConfig {
            out_dir: dir.join("run"),
            init: dir.join("init"),
            data: dir.join("prefs.jsonl"),
            max_len: 48,
            steps: 120,
            optim: AdamWConfig { lr: 3e-3, ..Default::default() },
            schedule: LrSchedule::warmup_cosine(5),
            eval_every: 40,
            ..Default::default()
        },
        false,
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    // USE: the checkpoint as the env's RewardModel, with its stored normalisation
    let ckpt = dir.join("run/checkpoints/step-120");
    let (mut rm, norm) = LearnedReward::load_pretrained(&ckpt, &Cpu::default())?;
    rm.norm = norm.map(|n| n.as_score_norm());
    let input = |response: &str| -> Result<RewardInput> {
        Ok(RewardInput {
            prompt: "review:".into(),
            response: response.into(),
            prompt_ids: tok.encode("review:")?,
            response_ids: [tok.encode(response)?, vec![0]].concat(),
            reference: None,
        })
    };
    let scores = rm.score(&[input(" the food was good ok")?, input(" the food was cold ok")?])?;
    println!("score(with \"good\") = {:.2}, score(without) = {:.2}", scores[0], scores[1]);
    Ok(())
}
