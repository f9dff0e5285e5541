//! Helpers shared by the integration tests: where `../shared` is, and JSON fixture readers.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

pub mod models;

/// `../shared` beside the checkout (override with `RLHF_SHARED`).
pub fn shared() -> PathBuf {
    std::env::var_os("RLHF_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// A fixture (folder or file): this repository's `tests/fixtures/NAME` (made by `scripts/fixtures`) when
/// there is one — found from the checkout the tests were built in, or from the working
/// directory (a test binary carried to another machine runs in its copy of the repository) —
/// else `shared/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    let local = |root: PathBuf| Some(root.join("tests/fixtures").join(name)).filter(|p| p.exists());
    local(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .or_else(|| local(PathBuf::new()))
        .unwrap_or_else(|| shared().join("fixtures").join(name))
}

/// Every HF transformers fixture (a folder with `config.json`, `model.safetensors` and
/// `expected.json`): the two in `shared/fixtures` and those `scripts/fixtures/hf_tiny.py` writes.
pub const HF_FIXTURES: [&str; 17] = [
    "hf-gpt2-tiny",
    "hf-llama-tiny",
    "hf-qwen2-tiny",
    "hf-llama3-tiny",
    "hf-qwen3-tiny",
    "hf-qwen3-yarn-tiny",
    "hf-gemma3-tiny",
    "hf-gemma2-tiny",
    "hf-mistral-tiny",
    "hf-pythia-tiny",
    "hf-gpt-neox-seq-tiny",
    "hf-phi3-tiny",
    "hf-phi4-mini-tiny",
    "hf-smollm3-tiny",
    "hf-granite-tiny",
    "hf-olmo2-tiny",
    "hf-olmo3-tiny",
];

/// Parses a JSON file.
pub fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

pub fn f32s_2d(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().expect("array").iter().map(f32s).collect()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("int") as u32).collect()
}

pub fn u32s_2d(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().expect("array").iter().map(u32s).collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// log_softmax of one row, in f64 for the reference.
pub fn log_softmax_ref(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// A run's `metrics.jsonl` records without the wall-clock fields (`tokens_per_s`, `timing/*`),
/// for comparing a resumed run with an uninterrupted one.
pub fn comparable_metrics(run_dir: &std::path::Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{}: {e}", run_dir.display()));
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("a JSON record");
            v.as_object_mut().expect("an object").retain(|k, _| k != "tokens_per_s" && !k.starts_with("timing/"));
            v
        })
        .collect()
}

const POLICY_TEXT: &str = "the cat sat on the mat. a bat and a cat sat. the rat ran to the hat.\n";

/// A char-level GPT-2 pretrained for a few steps on a rhyme, and a prompt file: the small
/// policy the online-RL tests (PPO, GRPO, …) start from. Returns (checkpoint, prompts).
pub fn pretrained_policy(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let checkpoint = dir.join("pre/checkpoints/step-40");
    // a second config for the same folder (a resumed run) reuses the policy
    if !checkpoint.join(rlhf::run::MARKER).is_file() {
        pretrain_policy(dir);
    }
    let prompts = dir.join("prompts.jsonl");
    let lines: Vec<String> = ["the ", "a cat ", "the rat ", "on the ", "sat ", "the mat"]
        .iter()
        .map(|p| serde_json::json!({"prompt": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    (checkpoint, prompts)
}

fn pretrain_policy(dir: &std::path::Path) {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, POLICY_TEXT.repeat(30)).unwrap();
    rlhf::stages::pretrain::train(
        rlhf::stages::pretrain::PretrainConfig {
            out_dir: dir.join("pre"),
            files: vec![corpus],
            model: rlhf_policies::ModelConfig::gpt2_preset(1, 32, 2, 2, 48),
            block_size: 24,
            batch_size: 8,
            steps: 40,
            optim: rlhf_policies::AdamWConfig { lr: 1e-2, ..rlhf::stages::pretrain::PretrainConfig::default().optim },
            schedule: rlhf::schedule::LrSchedule::warmup_cosine(3),
            eval_every: 40,
            eval_batches: 1,
            checkpoint_every: 40,
            sample_tokens: 4,
            ..Default::default()
        },
        false,
    )
    .unwrap();
}

/// The PPO tests' run: the tiny pretrained policy ([`pretrained_policy`]) learning to write
/// "a" (a keyword reward) with a shared critic, 16 rollouts of 12 tokens per iteration.
pub fn ppo_config(dir: &std::path::Path, iterations: usize) -> rlhf::stages::ppo::PpoConfig {
    let (policy, prompts) = pretrained_policy(dir);
    rlhf::stages::ppo::PpoConfig {
        out_dir: dir.join("ppo"),
        policy,
        prompts,
        reward: Some(rlhf::stages::reward_spec::RewardSpec::Keywords { keywords: vec!["a".into()], weight: 1.0 }),
        value_model: rlhf::stages::ppo_models::ValueModelConfig::Shared {},
        batch_size: 16,
        minibatch_size: 8,
        max_new_tokens: 12,
        max_prompt_len: 16,
        iterations,
        ppo_epochs: 2,
        optim: rlhf_policies::AdamWConfig { lr: 3e-3, ..Default::default() },
        checkpoint_every: 3,
        sample_every: 3,
        ..Default::default()
    }
}

/// Reward-model data: comparisons whose chosen response contains the word "good" and rejected
/// one does not (five words each: length gives nothing away).
pub fn marker_data(path: &std::path::Path, n: usize) {
    use rand::{Rng, SeedableRng};
    let words = ["the", "food", "was", "fine", "cold", "hot", "nice", "slow", "fast", "ok"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let phrase =
        |rng: &mut rand::rngs::StdRng| -> Vec<&str> { (0..5).map(|_| words[rng.gen_range(0..words.len())]).collect() };
    let lines: Vec<String> = (0..n)
        .map(|_| {
            let mut chosen = phrase(&mut rng);
            chosen[rng.gen_range(0..5)] = "good";
            let rejected = phrase(&mut rng);
            serde_json::json!({"prompt": "review:", "chosen": format!(" {}", chosen.join(" ")), "rejected": format!(" {}", rejected.join(" "))})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// The reward tests' run: a tiny char-level GPT-2 learning [`marker_data`]'s word.
pub fn marker_cfg(dir: &std::path::Path, steps: usize) -> rlhf::stages::reward::RewardConfig {
    let data = dir.join("prefs.jsonl");
    marker_data(&data, 240);
    let tok = rlhf_policies::Tokenizer::char_level("abcdefghijklmnopqrstuvwxyz :").unwrap();
    let model = rlhf_policies::CausalLm::new(
        rlhf_policies::ModelConfig::gpt2_preset(tok.vocab_size(), 32, 2, 2, 64),
        &dfdx::prelude::Cpu::default(),
        3,
    )
    .unwrap();
    let init = dir.join("init");
    model.save_pretrained(&init, Some(&tok)).unwrap();
    rlhf::stages::reward::RewardConfig {
        out_dir: dir.join("run"),
        init,
        data,
        val_fraction: 0.25,
        max_len: 48,
        batch_size: 8,
        steps,
        optim: rlhf_policies::AdamWConfig { lr: 3e-3, ..Default::default() },
        schedule: rlhf::schedule::LrSchedule::warmup_cosine(5),
        eval_every: 40,
        checkpoint_every: 40,
        ..Default::default()
    }
}
