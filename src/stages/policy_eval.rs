//! Held-out evaluation of the online RL policies (PPO, GRPO, RLOO, REINFORCE++). Before the
//! first iteration and every `eval_every` iterations after it, each held-out prompt is sampled
//! (`eval_samples_per_prompt` times, default once) by the current policy — at the training
//! temperature and with the same random numbers every time, so two evaluations differ only by
//! the policy — and scored by the run's reward
//! through the env (the same score processing as training); with a reference model, the
//! sampled KL of each completion,
//!
//! ```text
//! KL̂(x) = Σ_t log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t),   y ~ π_θ(· | x)
//! ```
//! (both from `logits / temperature`, the training forward), is averaged too: an unbiased
//! estimate of KL(π_θ‖π_ref) on the held-out prompts (Ziegler et al. 2019's `objective/kl`
//! with k1). With `eval_greedy` the prompts are decoded greedily instead (verl's validation
//! default), and no KL is reported. The held-out prompts are the last `val_fraction` of the
//! prompt file or a separate `val_prompts` file, and are never trained on.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rlhf_envs::{Episode, NoReference, PromptSource, RewardModel, Rollout, VecEnv};
use rlhf_policies::{CausalLm, FusedOps, PolicySnapshot, RolloutEngine, SamplingConfig, Tokenizer};

use crate::data::{held_out_count, mix};
use crate::prompt_format::{ChatPrompt, PromptFormat};
use crate::run::JsonlWriter;
use crate::stages::common::held_out_from;
use crate::stages::ppo_models::{sequence_log_ratios, Seq};
use crate::stages::prompts::{check_fits, read_prompts, with_reference, PromptSpec, Prompts};

/// The training prompts and the held-out ones (`None`: no evaluation), and the number of
/// prompts skipped as too long. Held out: all of `val_prompts` (read like the training prompts
/// by `spec`), or else the last `val_fraction` (rounded) of the training file.
pub fn load_prompts(
    spec: PromptSpec<'_>,
    val_prompts: Option<&Path>,
    val_fraction: f64,
    tok: &Tokenizer,
    stage: &str,
) -> Result<(Prompts, Option<Prompts>, usize)> {
    let (mut train, mut skipped) = read_prompts(spec, tok, stage)?;
    let val = match val_prompts {
        Some(path) => {
            let (val, s) = read_prompts(PromptSpec { path, ..spec }, tok, stage)?;
            skipped += s;
            let references = val.references;
            let prompts = held_out_from(stage, path, val.prompts, "prompts")?;
            Some(Prompts { prompts, references })
        }
        None => {
            let n_val = held_out_count(train.prompts.len(), val_fraction);
            (n_val > 0).then(|| {
                let keep = train.prompts.len() - n_val;
                let prompts = train.prompts.split_off(keep);
                let references = train.references.as_mut().map(|r| r.split_off(keep));
                eprintln!("{stage}: the last {n_val} prompts of {} held out for evaluation", spec.path.display());
                Prompts { prompts, references }
            })
        }
    };
    if train.prompts.is_empty() {
        bail!("{}: no training prompts left after holding out {val_fraction} of them", spec.path.display());
    }
    Ok((train, val, skipped))
}

/// What the configs of PPO and the critic-free trainers say about prompts and evaluation; their
/// fields share these names, and the crate's `online_prompts!` macro reads them from either.
#[derive(Debug, Clone, Copy)]
pub struct OnlinePrompts<'a> {
    /// The stage's name, for messages.
    pub stage: &'a str,
    /// The policy checkpoint (for the chat-template error message).
    pub policy: &'a Path,
    /// The prompt file.
    pub prompts: &'a Path,
    /// Its prompt field.
    pub prompt_field: &'a str,
    /// Its reference-answer field.
    pub reference_field: Option<&'a str>,
    /// Prompt template.
    pub prompt_template: &'a str,
    /// The chat template's use, if any.
    pub chat: Option<&'a ChatPrompt>,
    /// Longer prompts are skipped.
    pub max_prompt_len: usize,
    /// Response length limit.
    pub max_new_tokens: usize,
    /// Held-out prompt file.
    pub val_prompts: Option<&'a Path>,
    /// Held-out fraction of the prompt file (without `val_prompts`).
    pub val_fraction: f64,
    /// When to evaluate.
    pub schedule: EvalSchedule,
    /// Decode the held-out prompts greedily.
    pub greedy: bool,
    /// Samples per held-out prompt.
    pub samples_per_prompt: usize,
    /// Where rollouts decode.
    pub engine: RolloutEngine,
}

/// The [`OnlinePrompts`] of a PPO or critic-free config, `$stage` naming it.
macro_rules! online_prompts {
    ($cfg:expr, $stage:expr) => {
        $crate::stages::policy_eval::OnlinePrompts {
            stage: $stage,
            policy: &$cfg.policy,
            prompts: &$cfg.prompts,
            prompt_field: &$cfg.prompt_field,
            reference_field: $cfg.reference_field.as_deref(),
            prompt_template: &$cfg.prompt_template,
            chat: $cfg.chat.as_ref(),
            max_prompt_len: $cfg.max_prompt_len,
            max_new_tokens: $cfg.max_new_tokens,
            val_prompts: $cfg.val_prompts.as_deref(),
            val_fraction: $cfg.val_fraction,
            schedule: $crate::stages::policy_eval::EvalSchedule {
                every: $cfg.eval_every,
                last: $cfg.iterations,
                seed: $cfg.seed,
                sample_count: $cfg.sample_count,
            },
            greedy: $cfg.eval_greedy,
            samples_per_prompt: $cfg.eval_samples_per_prompt,
            engine: $cfg.rollout_engine,
        }
    };
}
pub(crate) use online_prompts;

/// The training prompts, the held-out evaluation (one that never evaluates when `p` names no
/// held-out prompts) sampling with `sampling` and logging under `names`, and the number of
/// prompts skipped as too long. Every prompt must leave room for the response in the policy.
pub fn prompts_and_eval<D: FusedOps>(
    p: OnlinePrompts<'_>,
    tok: &Tokenizer,
    policy: &CausalLm<D>,
    sampling: SamplingConfig,
    pad: u32,
    names: EvalNames,
) -> Result<(Prompts, Evaluator, usize)> {
    let format = PromptFormat::new(p.prompt_template, p.chat, tok, &policy.config, p.policy)?;
    let spec = PromptSpec {
        path: p.prompts,
        field: p.prompt_field,
        reference_field: p.reference_field,
        format: &format,
        max_len: p.max_prompt_len,
    };
    let (prompts, val, skipped) = load_prompts(spec, p.val_prompts, p.val_fraction, tok, p.stage)?;
    for set in std::iter::once(&prompts).chain(&val) {
        check_fits(set.prompts.iter().map(|(ids, _)| ids.as_slice()), p.max_new_tokens, &policy.dims)?;
    }
    let sampling = SamplingConfig { greedy: p.greedy, ..sampling };
    let capacity = p.max_prompt_len + p.max_new_tokens;
    let setup = EvalSetup { sampling, capacity, engine: p.engine, pad, samples_per_prompt: p.samples_per_prompt };
    Ok((prompts, Evaluator::new(val, p.schedule, setup, names)?, skipped))
}

/// Checks `eval_samples_per_prompt`: at most the `rows` of a rollout, and 1 when decoding
/// greedily (every sample would be the same).
pub fn check_samples_per_prompt(k: usize, rows: usize, greedy: bool) -> Result<()> {
    ensure!(k <= rows, "eval_samples_per_prompt ({k}) must not exceed the {rows} rollout rows");
    ensure!(k == 1 || !greedy, "eval_samples_per_prompt ({k}) with eval_greedy would repeat one response");
    Ok(())
}

/// How an evaluation samples: the training sampler (its seed is replaced by the evaluation's
/// own), the KV-cache rows, the decode engine and the padding id.
#[derive(Debug, Clone)]
pub struct EvalSetup {
    /// Sampling (length, temperature, EOS).
    pub sampling: SamplingConfig,
    /// KV-cache capacity per row (longest prompt + `max_new_tokens`).
    pub capacity: usize,
    /// Where the rollout decodes.
    pub engine: RolloutEngine,
    /// Padding id of the scoring forward.
    pub pad: u32,
    /// Samples per held-out prompt (consecutive episodes).
    pub samples_per_prompt: usize,
}

/// When a run evaluates, and what it writes.
#[derive(Debug, Clone, Copy)]
pub struct EvalSchedule {
    /// Evaluate every this many iterations (and before the first).
    pub every: usize,
    /// The last iteration (always evaluated).
    pub last: usize,
    /// The run's seed (the evaluation's sampling seed comes from it alone).
    pub seed: u64,
    /// Samples written to `samples.jsonl` per evaluation.
    pub sample_count: usize,
}

/// A run's held-out evaluation: the prompts (none: the run does not evaluate), the schedule,
/// the sampler and the stage's metric names.
#[derive(Debug)]
pub struct Evaluator {
    prompts: Option<PromptSource>,
    schedule: EvalSchedule,
    setup: EvalSetup,
    names: EvalNames,
    done: Vec<serde_json::Value>,
}

/// The names one stage logs an evaluation under: its training metrics' names with `eval/`.
#[derive(Debug, Clone, Copy)]
pub struct EvalNames {
    /// The mean processed score (PPO's `scores`, GRPO's `reward`).
    pub score: &'static str,
    /// The mean raw score: the reward's own output, before the config's `score` processing
    /// (normalise, clip, the missing-EOS rule).
    pub raw_score: &'static str,
    /// The mean response length.
    pub length: &'static str,
    /// A sample's response field in `samples.jsonl`.
    pub response: &'static str,
    /// A sample's score field in `samples.jsonl`.
    pub sample_score: &'static str,
}

/// What one evaluation gave: an episode per held-out prompt, in order, and each one's sampled
/// KL when there is a reference.
#[derive(Debug, Clone)]
pub struct PolicyEval {
    /// The episodes (processed score, EOS, tokens).
    pub episodes: Vec<Episode>,
    /// `Σ_t log π_θ/π_ref` per episode.
    pub kls: Option<Vec<f64>>,
    /// Wall time.
    pub seconds: f64,
}

impl Evaluator {
    /// An evaluator over `prompts` (`None`: one that never evaluates).
    pub fn new(prompts: Option<Prompts>, schedule: EvalSchedule, setup: EvalSetup, names: EvalNames) -> Result<Self> {
        let prompts = prompts.map(|p| p.source(schedule.seed)).transpose()?;
        Ok(Evaluator { prompts, schedule, setup, names, done: vec![] })
    }

    /// Whether iteration count `step` (0: before the first) is evaluated: every `every`-th,
    /// and the last one.
    pub fn due(&self, step: usize) -> bool {
        self.prompts.is_some() && (step.is_multiple_of(self.schedule.every) || step == self.schedule.last)
    }

    /// `record` (an iteration's metrics; `None` for a skipped one) with the evaluation after
    /// `step` iterations added when one is due (a record of its own when there is none), and
    /// its first samples written to `samples`.
    #[allow(clippy::too_many_arguments)]
    pub fn record<M: RewardModel, D: FusedOps>(
        &mut self,
        step: usize,
        record: Option<serde_json::Value>,
        env: &mut VecEnv<NoReference, M>,
        policy: &CausalLm<D>,
        reference: Option<&CausalLm<D>>,
        tok: &Tokenizer,
        samples: &mut JsonlWriter,
    ) -> Result<Option<serde_json::Value>> {
        if !self.due(step) {
            return Ok(record);
        }
        let eval = self.run(env, policy, reference).with_context(|| format!("evaluation after {step} iterations"))?;
        let mut summary = serde_json::json!({"step": step});
        eval.put(&mut summary, &self.names);
        let mut record = record.unwrap_or_else(|| serde_json::json!({"step": step}));
        for (k, v) in summary.as_object().expect("an object") {
            record[k] = v.clone();
        }
        self.done.push(summary);
        samples.write_all(&self.sample_rows(&eval, step, tok)?)?;
        Ok(Some(record))
    }

    /// The evaluations this process made, in order: `step` and the `eval/…` means (the run's
    /// report lists them).
    pub fn into_summaries(self) -> Vec<serde_json::Value> {
        self.done
    }

    /// Samples every held-out prompt once with `policy` (`env.num_envs()` at a time) through
    /// `env`'s reward, and takes each sample's KL to `reference`.
    pub fn run<M: RewardModel, D: FusedOps>(
        &mut self,
        env: &mut VecEnv<NoReference, M>,
        policy: &CausalLm<D>,
        reference: Option<&CausalLm<D>>,
    ) -> Result<PolicyEval> {
        let t0 = Instant::now();
        let (setup, rows) = (&self.setup, env.num_envs());
        let source = self.prompts.as_mut().context("this run has no held-out prompts")?;
        let k = setup.samples_per_prompt;
        ensure!((1..=rows).contains(&k), "eval_samples_per_prompt ({k}) must be 1 to the {rows} rollout rows");
        let indices: Vec<usize> = (0..source.len()).collect();
        let mut episodes = Vec::with_capacity(indices.len() * k);
        let snapshot = PolicySnapshot::new(policy, setup.engine)?;
        for (c, chunk) in indices.chunks(rows / k).enumerate() {
            // a session per chunk, as wide as the chunk (the device decode begins all of its
            // rows together), seeded by the chunk's index: fresh random streams per sample
            let seed = mix(self.schedule.seed, 0xe7a1, 11 + c as u64);
            let sampling = SamplingConfig { seed, ..setup.sampling.clone() };
            let mut session = snapshot.session(chunk.len() * k, setup.capacity, sampling);
            let opts = Rollout { group_size: k, reference: false };
            episodes.extend(env.rollout_prompts(session.as_mut(), source, chunk, opts).context("evaluation rollout")?);
        }
        // a greedy response's log-ratio is no KL estimate
        let kls = reference
            .filter(|_| !setup.sampling.greedy)
            .map(|r| {
                let seqs: Vec<Seq> = episodes
                    .iter()
                    .map(|e| Seq {
                        ids: [e.prompt_ids.as_slice(), &e.response_ids].concat(),
                        prompt_len: e.prompt_ids.len(),
                    })
                    .collect();
                let refs: Vec<&Seq> = seqs.iter().collect();
                let chunks =
                    refs.chunks(rows).map(|c| sequence_log_ratios(policy, r, c, setup.pad, setup.sampling.temperature));
                chunks.collect::<Result<Vec<_>>>().map(|k| k.concat())
            })
            .transpose()?;
        Ok(PolicyEval { episodes, kls, seconds: t0.elapsed().as_secs_f64() })
    }

    /// The first `sample_count` evaluated samples as `samples.jsonl` rows (`"split": "eval"`).
    fn sample_rows(&self, eval: &PolicyEval, step: usize, tok: &Tokenizer) -> Result<Vec<serde_json::Value>> {
        let (names, source) = (&self.names, self.prompts.as_ref().context("no held-out prompts")?);
        eval.episodes
            .iter()
            .enumerate()
            .take(self.schedule.sample_count)
            .map(|(i, ep)| {
                let mut row = serde_json::json!({"step": step, "split": "eval", "prompt": tok.decode(&ep.prompt_ids)?});
                row[names.response] = tok.decode(&ep.response_ids)?.into();
                row[names.sample_score] = ep.score.into();
                if let Some(k) = &eval.kls {
                    row["kl"] = k[i].into();
                }
                Ok(with_reference(row, source, ep.prompt_index))
            })
            .collect()
    }
}

impl PolicyEval {
    /// Adds the means to a metrics record: `eval/<score>` and its sample standard deviation
    /// `eval/<score>_std` (the mean's standard error is that over √n), `eval/<raw_score>`,
    /// `eval/kl` (with a reference), `eval/<length>`, `eval/eos_rate`, and the wall time as
    /// `timing/eval`.
    pub fn put(&self, record: &mut serde_json::Value, names: &EvalNames) {
        let n = self.episodes.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Episode) -> f64| self.episodes.iter().map(f).sum::<f64>() / n;
        let score = mean(&|e| e.score as f64);
        let var = mean(&|e| (e.score as f64 - score).powi(2)) * n / (n - 1.0).max(1.0);
        record[format!("eval/{}", names.score)] = score.into();
        record[format!("eval/{}_std", names.score)] = var.sqrt().into();
        record[format!("eval/{}", names.raw_score)] = mean(&|e| e.raw_score as f64).into();
        if let Some(k) = &self.kls {
            record["eval/kl"] = (k.iter().sum::<f64>() / n).into();
        }
        record[format!("eval/{}", names.length)] = mean(&|e| e.response_ids.len() as f64).into();
        record["eval/eos_rate"] = mean(&|e| f64::from(u8::from(e.terminated))).into();
        record["timing/eval"] = self.seconds.into();
    }
}
