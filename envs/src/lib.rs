//! `rlhf-envs`: the gym-like side of RLHF, with no autodiff dependency.
//!
//! A language model is a policy whose action space is the vocabulary ([`Discrete`]) and whose
//! observation is the token sequence so far ([`TokenSeq`]).
//!
//! - [`TextGenEnv`]: one environment with gymnasium semantics ([`Env::reset`], [`Env::step`]);
//!   per-token reward `−β·k(t)` against a frozen reference ([`LogProbModel`]) and the
//!   processed reward-model score at the last response token ([`kl`]).
//! - [`VecEnv`]: B environments stepped together (batched reference and reward calls),
//!   auto-reset, and [`VecEnv::rollout`], the batched path trainers and benchmarks use.
//! - [`RewardModel`]: closures ([`FnReward`]), rules ([`LengthReward`], [`KeywordReward`],
//!   [`RegexReward`]), verifiable answers against each prompt's reference ([`AnswerReward`]),
//!   external processes ([`CommandReward`]), sums ([`Weighted`]) and ensembles against
//!   over-optimisation ([`Ensemble`]).
//!
//! Models reach this crate only through the small traits [`LogProbModel`], [`Policy`] and
//! [`Detokenizer`]; `rlhf-policies` implements them for its dfdx models.
//!
//! ```
//! use rlhf_envs::kl::shaped_rewards;
//! use rlhf_envs::{FnReward, KlConfig, KlEstimator, RewardInput, RewardModel};
//! // a reward from a closure
//! let mut polite = FnReward::new("polite", |x: &RewardInput| x.response.contains("please") as i32 as f32);
//! let input = RewardInput { prompt: "Ask".into(), response: "please pass the salt".into(), prompt_ids: vec![1], response_ids: vec![2, 3], reference: None };
//! let score = polite.score(&[input]).unwrap()[0];
//! // per-token rewards: -β·k1(t), plus the score at the last token
//! let kl = KlConfig { beta: 0.1, estimator: KlEstimator::K1 };
//! let rewards = shaped_rewards(&[-1.0, -2.0], &[-1.5, -2.0], &kl, score);
//! assert_eq!(rewards, vec![-0.05, 1.0]);
//! ```
#![deny(missing_docs)]

pub mod answer;
pub mod command;
pub mod ensemble;
pub mod error;
pub mod kl;
pub mod reward;
pub mod spaces;
pub mod text_env;
pub mod vec_env;

pub use answer::{AnswerExtraction, AnswerReward};
pub use command::CommandReward;
pub use ensemble::{Combine, Ensemble};
pub use error::EnvError;
pub use kl::{KlConfig, KlEstimator, MissingEos, RunningMoments, RunningNorm, ScoreConfig, ScoreNorm};
pub use reward::{FnReward, KeywordReward, LengthReward, RegexReward, RewardInput, RewardModel, Weighted};
pub use spaces::{Discrete, Space, TokenSeq};
pub use text_env::{
    Action, Detokenizer, Env, Episode, LogProbModel, Obs, PromptSource, Step, StepInfo, TextEnvConfig, TextGenEnv,
};
pub use vec_env::{NoReference, Policy, Rollout, VecEnv};
