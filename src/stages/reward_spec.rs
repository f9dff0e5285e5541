//! The reward a PPO or critic-free run is given by its config: a trained reward model (a
//! checkpoint folder, or a run folder for its newest checkpoint), a rule (keywords, length,
//! a verifiable answer), or an external command; built into the env's [`RewardModel`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rlhf_envs::{
    AnswerExtraction, AnswerReward, Combine, Ensemble, KeywordReward, LengthReward, RewardModel, Weighted,
};
use rlhf_policies::{FusedOps, LearnedReward, Retokenized, Tokenizer};
use serde::{Deserialize, Serialize};

/// The reward: a trained reward model, a rule, or an external command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// A checkpoint from `rlhf reward` (or any HF sequence-classification folder).
    Model {
        /// Its folder.
        path: PathBuf,
        /// Apply its stored normalisation (gain and bias). Default `true`.
        #[serde(default = "yes")]
        normalize: bool,
    },
    /// `weight ·` occurrences of the keywords in the response text.
    Keywords {
        /// Words or phrases.
        keywords: Vec<String>,
        /// Reward per occurrence. Default `1`.
        #[serde(default = "unit")]
        weight: f32,
    },
    /// `−scale · |length − target|` in tokens.
    Length {
        /// Preferred length.
        target: usize,
        /// Penalty per token. Default `0.1`.
        #[serde(default = "tenth")]
        scale: f32,
    },
    /// A verifiable reward: `score` when the response's final answer equals the prompt's
    /// reference answer (read from `reference_field`), `format_score` when an answer was found
    /// but is wrong, 0 when none was (verl's GSM8K rule; see `rlhf_envs::answer`).
    Answer {
        /// `strict` (the number after `####`, GSM8K's answer line; default) or `flexible`
        /// (the last number in the response).
        #[serde(default)]
        extraction: AnswerExtraction,
        /// Reward for a right answer. Default `1`.
        #[serde(default = "unit")]
        score: f32,
        /// Reward for a wrong answer in the expected form. Default `0`.
        #[serde(default)]
        format_score: f32,
    },
    /// A weighted sum of rewards, e.g. a reward model plus a length penalty against its length
    /// bias, or a verifiable answer plus a format reward; each term is any reward here
    /// (`rlhf_envs::Weighted`).
    Sum {
        /// The terms.
        terms: Vec<RewardTerm>,
    },
    /// An ensemble against over-optimisation (Coste et al. 2024; `rlhf_envs::ensemble`):
    /// every member — typically reward models trained with different seeds, each with its
    /// stored normalisation so they share a scale — scores each response, and `combine` makes
    /// one score of theirs: `{"kind": "mean"}`, `{"kind": "min"}` (worst-case optimisation) or
    /// `{"kind": "uwo", "lambda": λ}` (the mean minus λ · the members' variance).
    Ensemble {
        /// The members (any rewards here).
        members: Vec<RewardSpec>,
        /// How their scores combine.
        combine: Combine,
    },
    /// A long-lived process speaking JSON lines (see `rlhf_envs::CommandReward`); it also
    /// receives each prompt's reference answer when `reference_field` is set.
    Command {
        /// Program.
        program: String,
        /// Arguments.
        #[serde(default)]
        args: Vec<String>,
        /// Seconds to wait for each reply. Default `60`.
        #[serde(default = "sixty")]
        timeout_s: u64,
    },
}

/// One term of [`RewardSpec::Sum`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    /// Its weight. Default `1`.
    #[serde(default = "unit")]
    pub weight: f32,
    /// The reward.
    pub reward: RewardSpec,
}

impl RewardSpec {
    /// This reward and every term inside it.
    fn walk<'a>(&'a self, out: &mut Vec<&'a RewardSpec>) {
        out.push(self);
        match self {
            RewardSpec::Sum { terms } => terms.iter().for_each(|t| t.reward.walk(out)),
            RewardSpec::Ensemble { members, .. } => members.iter().for_each(|m| m.walk(out)),
            _ => {}
        }
    }

    /// Every learned reward model's folder in it.
    fn model_paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            RewardSpec::Model { path, .. } => vec![path],
            RewardSpec::Sum { terms } => terms.iter_mut().flat_map(|t| t.reward.model_paths_mut()).collect(),
            RewardSpec::Ensemble { members, .. } => members.iter_mut().flat_map(|m| m.model_paths_mut()).collect(),
            _ => vec![],
        }
    }
}

fn yes() -> bool {
    true
}
fn unit() -> f32 {
    1.0
}
fn tenth() -> f32 {
    0.1
}
fn sixty() -> u64 {
    60
}

/// A reward as built from a config: a learned reward model, which reads the policy's tokens
/// or the texts depending on the policy's tokenizer ([`Reward::for_policy`]), or any other
/// [`RewardModel`].
pub enum Reward<D: FusedOps> {
    /// A reward model, with its folder's `tokenizer.json` when it has one.
    Learned {
        /// The model.
        rm: Box<LearnedReward<D>>,
        /// Its tokenizer.
        tok: Option<Box<Tokenizer>>,
        /// Its folder (for messages).
        path: PathBuf,
    },
    /// Rules, commands, closures: they read what the env hands them.
    Other(Box<dyn RewardModel>),
    /// A weighted sum.
    Sum(Vec<(f32, Reward<D>)>),
    /// An ensemble.
    Ensemble(Vec<Reward<D>>, Combine),
}

impl<D: FusedOps> std::fmt::Debug for Reward<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reward::Learned { path, .. } => write!(f, "Reward::Learned({})", path.display()),
            Reward::Other(r) => write!(f, "Reward::Other({})", r.name()),
            Reward::Sum(terms) => f.debug_list().entries(terms).finish(),
            Reward::Ensemble(members, combine) => write!(f, "Reward::Ensemble({combine:?}, {members:?})"),
        }
    }
}

impl<D: FusedOps> Reward<D> {
    /// The env's reward for a policy with tokenizer `tok` whose responses end on `end_ids`: a
    /// reward model with the policy's vocabulary reads the policy's token ids (as TRL and
    /// OpenRLHF do); one with another tokenizer reads prompt and response as text in its own
    /// tokens ([`Retokenized`]), announced on stderr. A reward model without a tokenizer must
    /// be able to read the policy's ids, and is assumed to share its vocabulary (said on
    /// stderr: nothing here can check it).
    pub fn for_policy(self, tok: &Tokenizer, end_ids: &[u32]) -> Result<Box<dyn RewardModel>> {
        Ok(match self {
            Reward::Other(reward) => reward,
            Reward::Sum(terms) => {
                let mut sum = Weighted::new();
                for (w, r) in terms {
                    sum = sum.with_boxed(w, r.for_policy(tok, end_ids)?);
                }
                Box::new(sum)
            }
            Reward::Ensemble(members, combine) => {
                let members = members.into_iter().map(|m| m.for_policy(tok, end_ids)).collect::<Result<_>>()?;
                Box::new(Ensemble::new(members, combine)?)
            }
            Reward::Learned { rm, tok: Some(own), path } if !own.same_vocabulary(tok) => {
                eprintln!(
                    "reward model {}: its tokenizer is not the policy's, so it reads prompts and responses as \
                     text in its own tokens",
                    path.display()
                );
                Box::new(Retokenized::new(*rm, *own, end_ids.to_vec()))
            }
            Reward::Learned { rm, tok: None, path } if rm.model.dims.vocab < tok.vocab_size() => bail!(
                "reward model {}: no tokenizer.json, and its {} token ids cannot read the policy's {}; put its \
                 tokenizer.json in the folder",
                path.display(),
                rm.model.dims.vocab,
                tok.vocab_size()
            ),
            Reward::Learned { rm, tok: None, path } => {
                eprintln!(
                    "reward model {}: no tokenizer.json; it reads the policy's token ids as if it shared the \
                     policy's vocabulary",
                    path.display()
                );
                rm
            }
            Reward::Learned { rm, .. } => rm,
        })
    }
}

/// Fails when the checkpoint `dir` has a `tokenizer.json` whose vocabulary is not `tok`'s: a
/// model that reads the policy's token ids (the critic) must share it. `what` names it.
pub fn check_same_vocabulary(dir: &Path, tok: &Tokenizer, what: &str) -> Result<()> {
    let file = rlhf_policies::checkpoint::tokenizer_dir(dir)?.join("tokenizer.json");
    if file.is_file() && !Tokenizer::from_file(&file)?.same_vocabulary(tok) {
        bail!(
            "{what} {}: its tokenizer is not the policy's, and it would read the policy's tokens; start it \
             from a checkpoint with the policy's tokenizer (value_model.init, e.g. the policy itself) or use \
             {{\"kind\": \"shared\"}}",
            dir.display()
        );
    }
    Ok(())
}

/// The reward a config names (shared with the critic-free trainers); a learned one on `dev`.
pub fn build_reward<D: FusedOps>(spec: Option<&RewardSpec>, dev: &D) -> Result<Reward<D>> {
    let other = |r: Box<dyn RewardModel>| Reward::Other(r);
    Ok(match spec.context("reward is required (e.g. {\"kind\": \"model\", \"path\": ...})")? {
        RewardSpec::Model { path, normalize } => {
            let file = rlhf_policies::checkpoint::tokenizer_dir(path)?.join("tokenizer.json");
            let tok = file.is_file().then(|| Tokenizer::from_file(&file).map(Box::new)).transpose()?;
            Reward::Learned { rm: Box::new(load_reward_model(path, *normalize, dev)?), tok, path: path.clone() }
        }
        RewardSpec::Keywords { keywords, weight } => {
            other(Box::new(KeywordReward { keywords: keywords.clone(), weight: *weight }))
        }
        RewardSpec::Length { target, scale } => {
            other(Box::new(LengthReward { target: *target, scale: *scale, eos_id: None }))
        }
        RewardSpec::Answer { extraction, score, format_score } => {
            other(Box::new(AnswerReward { extraction: *extraction, score: *score, format_score: *format_score }))
        }
        RewardSpec::Command { program, args, timeout_s } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            other(Box::new(rlhf_envs::CommandReward::spawn(program, &args, Duration::from_secs(*timeout_s))?))
        }
        RewardSpec::Sum { terms } => {
            if terms.is_empty() {
                bail!("reward.kind = sum needs at least one term");
            }
            let built = terms.iter().map(|t| Ok((t.weight, build_reward(Some(&t.reward), dev)?)));
            Reward::Sum(built.collect::<Result<_>>()?)
        }
        RewardSpec::Ensemble { members, combine } => {
            if members.is_empty() {
                bail!("reward.kind = ensemble needs at least one member");
            }
            let built = members.iter().map(|m| build_reward(Some(m), dev));
            Reward::Ensemble(built.collect::<Result<_>>()?, *combine)
        }
    })
}

/// The reward model in the folder `path` on `dev`, applying the normalisation stored with it
/// when `normalize` says so.
pub fn load_reward_model<D: FusedOps>(path: &Path, normalize: bool, dev: &D) -> Result<LearnedReward<D>> {
    let (mut rm, norm) =
        LearnedReward::load_pretrained(path, dev).with_context(|| format!("reward model {}", path.display()))?;
    if normalize {
        rm.norm = norm.map(|n| n.as_score_norm());
    }
    Ok(rm)
}

/// The policy and a learned reward's folder through [`crate::run::resolve_model`] (shared with
/// the critic-free trainers).
pub fn resolve_models(policy: &mut PathBuf, reward: Option<&mut RewardSpec>) -> Result<()> {
    crate::run::resolve_model_in(policy)?;
    reward.map(resolve_reward_models).transpose()?;
    Ok(())
}

/// Every reward model's folder in `reward` (a sum's terms and an ensemble's members too)
/// through [`crate::run::resolve_model`]: a run folder becomes its newest checkpoint.
pub fn resolve_reward_models(reward: &mut RewardSpec) -> Result<()> {
    for path in reward.model_paths_mut() {
        crate::run::resolve_model_in(path)?;
    }
    Ok(())
}

/// Checks that a reward that needs reference answers gets them.
pub fn check_reward_inputs(reward: Option<&RewardSpec>, reference_field: Option<&str>) -> Result<()> {
    let mut all = vec![];
    reward.inspect(|r| r.walk(&mut all));
    if all.iter().any(|r| matches!(r, RewardSpec::Answer { .. })) && reference_field.is_none() {
        bail!(
            "reward.kind = answer needs reference_field: the prompt records' field holding the reference \
             answer (e.g. \"answer\" for GSM8K)"
        );
    }
    Ok(())
}
