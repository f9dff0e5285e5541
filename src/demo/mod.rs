//! `rlhf demo`: the whole seed on an embedded task, with the real stage code — pretrain → SFT →
//! preference pairs labelled by a hidden gold reward → reward model (the proxy) → PPO — then
//! SFT vs PPO (and DPO on the same pairs, GRPO against the same proxy, best-of-n) on held-out
//! prompts: gold reward, proxy reward, KL, length.

mod measure;
pub mod world;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use dfdx::prelude::*;
use rlhf_envs::{EnvError, RewardInput, RewardModel};
use rlhf_policies::{CausalLm, LearnedReward, ModelConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::schedule::LrSchedule;
use crate::stages::ppo::{self, PpoConfig};
use crate::stages::ppo_models::ValueModelConfig;
use crate::stages::pretrain::{self, PretrainConfig, TokenizerSpec};
use crate::stages::reward::{self, RewardConfig};
use crate::stages::reward_spec::RewardSpec;
use crate::stages::sft::{self, SftConfig};
use measure::{best_of_n, evaluate, gold_accuracy, labelled_pairs};
use world::{gold_reward, World};

/// How big the demo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// A few minutes on 2 cores.
    Quick,
    /// Longer training and PPO, to show over-optimisation.
    Full,
    /// Seconds: the CI smoke test.
    Test,
}

/// Sizes of one preset.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Pretraining corpus lines.
    pub corpus_lines: usize,
    /// Model width, layers, heads.
    pub model: (usize, usize, usize),
    /// BPE vocabulary.
    pub vocab: usize,
    /// Pretraining steps.
    pub pretrain_steps: usize,
    /// SFT pairs and steps.
    pub sft: (usize, usize),
    /// Preference prompts (two samples each) and reward-model steps.
    pub reward: (usize, usize),
    /// PPO iterations and rollouts per iteration.
    pub ppo: (usize, usize),
    /// PPO learning rate and KL coefficient β.
    pub ppo_lr_beta: (f64, f64),
    /// DPO steps (on the reward model's pairs, 16 per step; β 0.1).
    pub dpo_steps: usize,
    /// Held-out evaluation prompts.
    pub eval_prompts: usize,
    /// Largest best-of-n.
    pub bon_max: usize,
}

impl Preset {
    /// The sizes.
    pub fn plan(self) -> Plan {
        match self {
            Preset::Test => Plan {
                corpus_lines: 600,
                model: (32, 2, 2),
                vocab: 300,
                pretrain_steps: 30,
                sft: (200, 20),
                reward: (64, 20),
                ppo: (3, 8),
                ppo_lr_beta: (5e-5, 0.1),
                dpo_steps: 4,
                eval_prompts: 8,
                bon_max: 4,
            },
            Preset::Quick => Plan {
                corpus_lines: 8000,
                model: (64, 2, 4),
                vocab: 700,
                pretrain_steps: 600,
                sft: (3000, 300),
                reward: (6000, 1500),
                ppo: (60, 32),
                ppo_lr_beta: (5e-5, 0.1),
                dpo_steps: 300,
                eval_prompts: 256,
                bon_max: 32,
            },
            // the quick preset's models, then a longer, less constrained PPO run that pushes
            // the policy far from the SFT model, where the proxy and the gold reward part ways
            Preset::Full => Plan {
                corpus_lines: 8000,
                model: (64, 2, 4),
                vocab: 700,
                pretrain_steps: 600,
                sft: (3000, 300),
                reward: (6000, 1500),
                ppo: (150, 32),
                ppo_lr_beta: (1e-4, 0.02),
                dpo_steps: 600,
                eval_prompts: 256,
                bon_max: 64,
            },
        }
    }
}

/// One policy on the held-out prompts.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyEval {
    /// `sft`, `ppo`, `best-of-N`.
    pub name: String,
    /// Mean gold reward.
    pub gold: f64,
    /// Mean proxy (reward-model, normalised) score.
    pub proxy: f64,
    /// KL to the SFT policy (sampled estimate; analytic for best-of-n).
    pub kl: f64,
    /// Mean response length in tokens.
    pub length: f64,
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// The preset's sizes.
    pub plan: Plan,
    /// Held-out accuracy of the reward model against the gold ordering (ties left out).
    pub rm_gold_accuracy: f64,
    /// SFT, PPO and best-of-n.
    pub policies: Vec<PolicyEval>,
    /// Per PPO iteration: (mean gold, mean proxy, KL) of its rollouts.
    pub ppo_curve: PpoCurve,
    /// A few held-out prompts with the SFT and PPO responses.
    pub samples: Vec<(String, String, String)>,
}

/// Per PPO iteration: (mean gold, mean proxy, KL) of its rollouts.
pub type PpoCurve = Vec<(f64, f64, f64)>;

/// The reward the PPO stage sees — the proxy — with the gold score of every rollout recorded
/// on the side, so gold can be tracked along training.
struct GoldTracked {
    proxy: LearnedReward<Cpu>,
    gold: Arc<Mutex<Vec<f64>>>,
}

impl RewardModel for GoldTracked {
    fn name(&self) -> String {
        "proxy (gold tracked)".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        let g: f64 = batch.iter().map(|x| gold_reward(&x.prompt, &x.response) as f64).sum::<f64>() / batch.len() as f64;
        self.gold.lock().expect("not poisoned").push(g);
        self.proxy.score(batch)
    }
}

/// The demo's stage folders inside its output folder, in the order it runs them.
pub const STAGES: [&str; 6] = ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"];

/// Runs the demo into `out` (its data, every stage's run folder, `summary.json`). A previous
/// demo's stage folders there are replaced.
pub fn run(out: &Path, preset: Preset, seed: u64) -> Result<DemoSummary> {
    let plan = preset.plan();
    for stage in STAGES {
        crate::run::RunDir::clear(&out.join(stage))?;
    }
    let demo = Demo { out, data: out.join("data"), plan: &plan, seed };
    let mut w = World::new(seed);
    let eval_prompts = demo.write_data(&mut w)?;
    eprintln!("demo: 1/4 pretraining");
    let pre = demo.pretrain()?;
    eprintln!("demo: 2/4 supervised fine-tuning");
    let sft_dir = demo.sft(pre)?;
    let (sft_model, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&sft_dir, &Cpu::default())?;
    eprintln!("demo: 3/4 reward model on gold-labelled pairs");
    let rm_dir = demo.reward(&sft_model, &tok, &mut w, &sft_dir)?;
    let mut rm = load_proxy(&rm_dir)?;
    let held_out = labelled_pairs(&sft_model, &tok, &mut w, 512, seed ^ 0xfeed)?;
    let rm_gold_accuracy = gold_accuracy(&mut rm, &tok, &held_out)?;
    eprintln!("demo: 4/4 PPO");
    let (ppo_dir, ppo_curve) = demo.ppo(&sft_dir, &rm_dir)?;
    // EVALUATION: SFT, PPO and best-of-n on held-out prompts
    let (ppo_model, _) = rlhf_policies::checkpoint::load_with_tokenizer(&ppo_dir, &Cpu::default())?;
    let prompts: Vec<Vec<u32>> = eval_prompts.iter().map(|p| tok.encode(p)).collect::<Result<_, _>>()?;
    let (sft_eval, sft_texts) = evaluate("sft", &sft_model, &sft_model, &mut rm, &tok, &eval_prompts, &prompts, seed)?;
    let (ppo_eval, ppo_texts) = evaluate("ppo", &ppo_model, &sft_model, &mut rm, &tok, &eval_prompts, &prompts, seed)?;
    eprintln!("demo: DPO on the same pairs");
    let dpo_dir = demo.dpo(&sft_dir)?;
    let (dpo_model, _) = rlhf_policies::checkpoint::load_with_tokenizer(&dpo_dir, &Cpu::default())?;
    let (dpo_eval, _) = evaluate("dpo", &dpo_model, &sft_model, &mut rm, &tok, &eval_prompts, &prompts, seed)?;
    eprintln!("demo: GRPO against the same proxy");
    let grpo_dir = demo.grpo(&sft_dir, &rm_dir)?;
    let (grpo_model, _) = rlhf_policies::checkpoint::load_with_tokenizer(&grpo_dir, &Cpu::default())?;
    let (grpo_eval, _) = evaluate("grpo", &grpo_model, &sft_model, &mut rm, &tok, &eval_prompts, &prompts, seed)?;
    let mut policies = vec![sft_eval, ppo_eval, dpo_eval, grpo_eval];
    policies.extend(best_of_n(&sft_model, &mut rm, &tok, &eval_prompts, &prompts, plan.bon_max, seed)?);
    let samples = (0..4.min(eval_prompts.len()))
        .map(|i| (eval_prompts[i].clone(), sft_texts[i].clone(), ppo_texts[i].clone()))
        .collect();
    let summary = DemoSummary { plan, rm_gold_accuracy, policies, ppo_curve, samples };
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// The reward model as the demo scores with it: normalised as it was trained.
fn load_proxy(rm_dir: &Path) -> Result<LearnedReward<Cpu>> {
    crate::stages::reward_spec::load_reward_model(rm_dir, true, &Cpu::default())
}

/// One demo's output folder, sizes and seed; each stage method runs the real stage and
/// returns its final checkpoint folder.
struct Demo<'a> {
    out: &'a Path,
    data: PathBuf,
    plan: &'a Plan,
    seed: u64,
}

impl Demo<'_> {
    /// DATA: the world's corpus, SFT pairs and RL prompts, written under `data/`; returns the
    /// held-out evaluation prompts.
    fn write_data(&self, w: &mut World) -> Result<Vec<String>> {
        let data = &self.data;
        std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
        std::fs::write(data.join("corpus.txt"), w.corpus(self.plan.corpus_lines))?;
        write_jsonl(
            &data.join("sft.jsonl"),
            w.sft_pairs(self.plan.sft.0).iter().map(|(p, r)| serde_json::json!({"prompt": p, "response": r})),
        )?;
        write_jsonl(&data.join("prompts.jsonl"), w.prompts(256).iter().map(|p| serde_json::json!({"prompt": p})))?;
        Ok(w.prompts(self.plan.eval_prompts))
    }

    fn checkpoint(&self, stage: &str, step: usize) -> PathBuf {
        self.out.join(format!("{stage}/checkpoints/step-{step}"))
    }

    /// STAGE 1: pretraining (BPE on the corpus).
    fn pretrain(&self) -> Result<PathBuf> {
        let (plan, (d, layers, heads)) = (self.plan, self.plan.model);
        pretrain::train(
            PretrainConfig {
                out_dir: self.out.join("pretrain"),
                seed: self.seed,
                files: vec![self.data.join("corpus.txt")],
                val_fraction: 0.05,
                tokenizer: TokenizerSpec::Bpe { vocab_size: plan.vocab, min_frequency: 2 },
                model: ModelConfig::gpt2_preset(plan.vocab, d, layers, heads, 64),
                block_size: 48,
                batch_size: 16,
                steps: plan.pretrain_steps,
                optim: rlhf_policies::AdamWConfig { lr: 3e-3, ..PretrainConfig::default().optim },
                // 3e-4, not the default 3e-3 / 10 (one ulp away), keeps the demo's numbers
                schedule: LrSchedule { min_lr: Some(3e-4), ..LrSchedule::warmup_cosine(20) },
                eval_every: plan.pretrain_steps,
                checkpoint_every: plan.pretrain_steps,
                sample_prompt: "review of the".into(),
                sample_tokens: 20,
                ..Default::default()
            },
            false,
        )?;
        Ok(self.checkpoint("pretrain", plan.pretrain_steps))
    }

    /// STAGE 2: SFT on (prompt → one sentence + EOS).
    fn sft(&self, init: PathBuf) -> Result<PathBuf> {
        let steps = self.plan.sft.1;
        sft::train(
            SftConfig {
                out_dir: self.out.join("sft"),
                seed: self.seed,
                init,
                data: self.data.join("sft.jsonl"),
                max_len: 48,
                batch_size: 16,
                steps,
                optim: rlhf_policies::AdamWConfig { lr: 1e-3, ..Default::default() },
                schedule: LrSchedule::warmup_cosine(10),
                eval_every: steps,
                checkpoint_every: steps,
                ..Default::default()
            },
            false,
        )?;
        Ok(self.checkpoint("sft", steps))
    }

    /// STAGE 3a: preference pairs from the SFT policy, labelled by Bradley–Terry on the gold
    /// reward (written to `data/prefs.jsonl`), and the reward model trained on them.
    fn reward(&self, sft_model: &CausalLm<Cpu>, tok: &Tokenizer, w: &mut World, sft_dir: &Path) -> Result<PathBuf> {
        let (pairs, steps) = self.plan.reward;
        let pairs = labelled_pairs(sft_model, tok, w, pairs, self.seed)?;
        write_jsonl(
            &self.data.join("prefs.jsonl"),
            pairs.iter().map(|p| serde_json::json!({"prompt": p.0, "chosen": p.1, "rejected": p.2})),
        )?;
        reward::train(
            RewardConfig {
                out_dir: self.out.join("reward"),
                seed: self.seed,
                init: sft_dir.to_path_buf(),
                data: self.data.join("prefs.jsonl"),
                max_len: 64,
                batch_size: 16,
                steps,
                optim: rlhf_policies::AdamWConfig { lr: 1e-3, ..Default::default() },
                schedule: LrSchedule::warmup_cosine(10),
                eval_every: steps,
                checkpoint_every: steps,
                ..Default::default()
            },
            false,
        )?;
        Ok(self.checkpoint("reward", steps))
    }

    /// STAGE 3b: PPO against the proxy, gold tracked on the side; returns the final
    /// checkpoint and the (gold, proxy, KL) curve per iteration.
    fn ppo(&self, sft_dir: &Path, rm_dir: &Path) -> Result<(PathBuf, PpoCurve)> {
        let (iterations, batch_size) = self.plan.ppo;
        let (lr, beta) = self.plan.ppo_lr_beta;
        let gold_log = Arc::new(Mutex::new(Vec::new()));
        let proxy = load_proxy(rm_dir)?;
        let ppo_cfg = PpoConfig {
            out_dir: self.out.join("ppo"),
            seed: self.seed,
            policy: sft_dir.to_path_buf(),
            reward: Some(RewardSpec::Model { path: rm_dir.to_path_buf(), normalize: true }),
            value_model: ValueModelConfig::Separate { init: None },
            prompts: self.data.join("prompts.jsonl"),
            max_prompt_len: 16,
            batch_size,
            max_new_tokens: 24,
            iterations,
            minibatch_size: 8,
            optim: rlhf_policies::AdamWConfig { lr, ..Default::default() },
            schedule: LrSchedule::constant(),
            beta,
            checkpoint_every: iterations,
            sample_every: 10,
            ..Default::default()
        };
        let report = ppo::train_with_reward(ppo_cfg, false, Box::new(GoldTracked { proxy, gold: gold_log.clone() }))?;
        let gold_curve = gold_log.lock().expect("not poisoned").clone();
        let curve = gold_curve.iter().zip(&report.scores).zip(&report.kl).map(|((g, p), k)| (*g, *p, *k)).collect();
        Ok((self.checkpoint("ppo", iterations), curve))
    }

    /// GRPO against the same proxy as PPO, with PPO's budget: as many iterations and rollouts
    /// (groups of 4), passes, minibatches, learning rate and β (here the k3 loss term's), and no
    /// critic.
    fn grpo(&self, sft_dir: &Path, rm_dir: &Path) -> Result<PathBuf> {
        let (iterations, batch_size) = self.plan.ppo;
        let (lr, beta) = self.plan.ppo_lr_beta;
        crate::stages::grpo::train(
            crate::stages::grpo::GrpoConfig {
                out_dir: self.out.join("grpo"),
                seed: self.seed,
                policy: sft_dir.to_path_buf(),
                reward: Some(RewardSpec::Model { path: rm_dir.to_path_buf(), normalize: true }),
                prompts: self.data.join("prompts.jsonl"),
                max_prompt_len: 16,
                prompts_per_step: batch_size / 4,
                num_generations: 4,
                max_new_tokens: 24,
                iterations,
                num_iterations: 4,
                minibatch_size: 8,
                beta,
                optim: rlhf_policies::AdamWConfig { lr, ..Default::default() },
                checkpoint_every: iterations,
                sample_every: 10,
                ..Default::default()
            },
            false,
        )?;
        Ok(self.checkpoint("grpo", iterations))
    }

    /// DPO on the same gold-labelled pairs the reward model learned from: no reward model, no
    /// rollouts.
    fn dpo(&self, sft_dir: &Path) -> Result<PathBuf> {
        let steps = self.plan.dpo_steps;
        crate::stages::dpo::train(
            crate::stages::dpo::DpoConfig {
                out_dir: self.out.join("dpo"),
                seed: self.seed,
                init: sft_dir.to_path_buf(),
                data: self.data.join("prefs.jsonl"),
                max_len: 64,
                batch_size: 16,
                steps,
                optim: rlhf_policies::AdamWConfig { lr: 1e-4, ..Default::default() },
                schedule: LrSchedule::constant(),
                eval_every: steps,
                checkpoint_every: steps,
                // the stage's own sampled-KL check, at the demo's response length (its default
                // 64 leaves no room after any prompt in this model's 64 positions)
                sample_tokens: 24,
                ..Default::default()
            },
            false,
        )?;
        Ok(self.checkpoint("dpo", steps))
    }
}

fn write_jsonl(path: &Path, rows: impl Iterator<Item = serde_json::Value>) -> Result<()> {
    let text: Vec<String> = rows.map(|r| r.to_string()).collect();
    std::fs::write(path, text.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))
}

/// The final table as text.
pub fn table(s: &DemoSummary) -> String {
    let mut t = format!("reward model: {:.3} held-out accuracy against the gold ordering\n\n", s.rm_gold_accuracy);
    t += "| policy | gold reward | proxy reward | KL to SFT | response length |\n| --- | --- | --- | --- | --- |\n";
    for p in &s.policies {
        t += &format!("| {} | {:.3} | {:.3} | {:.3} | {:.1} |\n", p.name, p.gold, p.proxy, p.kl, p.length);
    }
    t += "\n| prompt | SFT | PPO |\n| --- | --- | --- |\n";
    for (p, a, b) in &s.samples {
        t += &format!("| {p} | {} | {} |\n", a.trim(), b.trim());
    }
    t
}

/// Where `rlhf demo` writes by default.
pub fn default_out() -> PathBuf {
    PathBuf::from("runs/demo")
}
