//! The token-level text-generation environment.
//!
//! The language model is the policy: its action is one token id (with the log-prob the policy
//! sampled it with), its observation the prompt plus the response so far. Each step pays
//! `−β·k(t)`, the KL estimate against the frozen reference; the step that ends the episode
//! (EOS or a stop id: `terminated`; `max_new_tokens` reached: `truncated`) also pays the
//! processed reward-model score `R`. So the score lands on the last response token — the EOS,
//! or the last token of a truncated response — as in `shared/fixtures/ppo`.

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::EnvError;
use crate::kl::{KlConfig, RunningMoments, ScoreConfig, ScoreNorm};
use crate::reward::{score_checked, RewardInput, RewardModel};
use crate::spaces::{Discrete, Space, TokenSeq};

/// What the environment needs from the frozen reference model: log-probs of the tokens the
/// policy chose, one row per environment, incrementally (implementations keep a KV cache).
pub trait LogProbModel {
    /// Starts each row in `rows` on its prompt (forgetting what the row held).
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError>;
    /// `log p(tokens[i] | row rows[i] so far)` for each i, then appends `tokens[i]` to the row.
    fn logprob_and_push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>, EnvError>;

    /// Teacher-forced log-probs of every response token given its prompt and the earlier
    /// response tokens, in one batched pass (rows may be used as scratch). It must give what
    /// `begin` + `logprob_and_push` give; [`crate::VecEnv::rollout`] uses it when available.
    /// Default: `None` (the rollout then calls the reference step by step).
    fn score_responses(
        &mut self,
        rows: &[usize],
        prompts: &[&[u32]],
        responses: &[&[u32]],
    ) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        let _ = (rows, prompts, responses);
        Ok(None)
    }
}

/// Token ids → text, for reward models that read text (implemented by tokenizers).
pub trait Detokenizer {
    /// The text of `ids`.
    fn decode(&self, ids: &[u32]) -> Result<String, EnvError>;
}

/// Prompts (token ids and text, and optionally a reference answer each), drawn by a seeded
/// sampler: a fresh shuffle per epoch, so every prompt is used once before any repeats.
#[derive(Debug, Clone)]
pub struct PromptSource {
    ids: Vec<Vec<u32>>,
    texts: Vec<String>,
    references: Option<Vec<String>>,
    order: Vec<usize>,
    cursor: usize,
    rng: StdRng,
    seed: u64,
    draws: usize,
}

impl PromptSource {
    /// Prompts as `(ids, text)` pairs; at least one, none empty.
    pub fn new(prompts: Vec<(Vec<u32>, String)>, seed: u64) -> Result<Self, EnvError> {
        if prompts.is_empty() {
            return Err(EnvError::Config { field: "prompts", msg: "no prompts".into() });
        }
        if let Some(i) = prompts.iter().position(|(ids, _)| ids.is_empty()) {
            return Err(EnvError::Config { field: "prompts", msg: format!("prompt {i} has no tokens") });
        }
        let (ids, texts) = prompts.into_iter().unzip();
        let rng = StdRng::seed_from_u64(seed);
        let mut s = PromptSource { ids, texts, references: None, order: vec![], cursor: 0, rng, seed, draws: 0 };
        s.reseed(seed);
        Ok(s)
    }

    /// Attaches one reference answer per prompt, in prompt order (e.g. GSM8K's `answer`); the
    /// env hands prompt `i`'s to the reward model as [`RewardInput::reference`].
    pub fn with_references(mut self, references: Vec<String>) -> Result<Self, EnvError> {
        if references.len() != self.ids.len() {
            return Err(EnvError::Count { what: "reference answers", expected: self.ids.len(), got: references.len() });
        }
        self.references = Some(references);
        Ok(self)
    }

    /// Restarts the sampler from `seed` (same seed → same prompt order).
    pub fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
        self.order = (0..self.ids.len()).collect();
        self.order.shuffle(&mut self.rng);
        self.cursor = 0;
        self.seed = seed;
        self.draws = 0;
    }

    /// How many prompts were drawn since the last (re)seed: the data cursor of a checkpoint.
    pub fn draws(&self) -> usize {
        self.draws
    }

    /// Puts the sampler where it is after `draws` draws from its seed (exact resume).
    pub fn seek(&mut self, draws: usize) {
        self.reseed(self.seed);
        for _ in 0..draws {
            self.next_index();
        }
    }

    /// The next prompt index.
    pub fn next_index(&mut self) -> usize {
        self.draws += 1;
        if self.cursor == self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.cursor = 0;
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }

    /// Ids of prompt `i`.
    pub fn ids(&self, i: usize) -> &[u32] {
        &self.ids[i]
    }

    /// Text of prompt `i`.
    pub fn text(&self, i: usize) -> &str {
        &self.texts[i]
    }

    /// Reference answer of prompt `i`, if the source has them.
    pub fn reference(&self, i: usize) -> Option<&str> {
        self.references.as_ref().map(|r| r[i].as_str())
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no prompts (never true for a constructed source).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Episode settings shared by [`TextGenEnv`] and [`crate::VecEnv`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEnvConfig {
    /// Vocabulary size (the action space). Required.
    pub vocab: u32,
    /// Response length limit; reaching it truncates the episode. Required.
    pub max_new_tokens: usize,
    /// Ids that terminate the episode (EOS). Required (may be empty).
    pub eos_ids: Vec<u32>,
    /// Extra ids that also terminate it. Default: none.
    #[serde(default)]
    pub stop_ids: Vec<u32>,
    /// KL penalty. Default β 0.05, k1.
    #[serde(default)]
    pub kl: KlConfig,
    /// Score processing. Default: raw score.
    #[serde(default)]
    pub score: ScoreConfig,
}

/// An action: the token and the log-prob the policy sampled it with (for the KL term).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Action {
    /// Token id.
    pub token: u32,
    /// `log π(token | observation)` under the sampling distribution.
    pub logprob: f32,
}

/// The observation: prompt and response ids so far (a cheap copy of ids, never re-decoded text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obs {
    /// Prompt ids followed by response ids.
    pub ids: Vec<u32>,
    /// Length of the prompt part.
    pub prompt_len: usize,
}

/// Diagnostics of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    /// The KL estimate `k(t)` of this token.
    pub kl: f32,
    /// `log π_ref(token)`.
    pub ref_logprob: f32,
    /// Whether the token was an EOS or stop id.
    pub eos: bool,
    /// On the final step: the reward model's raw score.
    pub raw_score: Option<f32>,
    /// On the final step: the processed score `R` (included in `reward`).
    pub score: Option<f32>,
    /// On the final step: the whole finished episode. With auto-reset this is how the episode
    /// that just ended is reported, since `obs` already belongs to the next one.
    pub episode: Option<Box<Episode>>,
}

/// The result of one step (gymnasium's five-tuple).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The next observation.
    pub obs: Obs,
    /// `−β·k(t)`, plus `R` on the final step.
    pub reward: f32,
    /// Ended on an EOS or stop id.
    pub terminated: bool,
    /// Ended at `max_new_tokens`.
    pub truncated: bool,
    /// Diagnostics.
    pub info: StepInfo,
}

/// A finished episode: everything PPO needs from a rollout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Episode {
    /// Which prompt of the source.
    pub prompt_index: usize,
    /// Prompt ids.
    pub prompt_ids: Vec<u32>,
    /// Response ids (EOS included when the episode terminated on it).
    pub response_ids: Vec<u32>,
    /// Sampling log-probs of the response tokens.
    pub logprobs: Vec<f32>,
    /// Reference log-probs of the response tokens.
    pub ref_logprobs: Vec<f32>,
    /// KL estimates `k(t)`.
    pub kl: Vec<f32>,
    /// Per-token rewards: `−β·k(t)` (+ dense rewards, if the reward model gives them), with
    /// `R` added at the last token.
    pub rewards: Vec<f32>,
    /// The reward model's raw score.
    pub raw_score: f32,
    /// The processed score `R`.
    pub score: f32,
    /// Ended on EOS / a stop id.
    pub terminated: bool,
    /// Ended at `max_new_tokens`.
    pub truncated: bool,
}

/// One environment's state: the math of a step lives here, shared by [`TextGenEnv`] and
/// [`crate::VecEnv`] (which only batch the model calls).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) prompt_index: usize,
    pub(crate) prompt: Vec<u32>,
    pub(crate) ep: Episode,
    pub(crate) done: bool,
}

/// What a pushed token did to its row.
pub(crate) struct Pushed {
    pub(crate) kl: f32,
    pub(crate) terminated: bool,
    pub(crate) truncated: bool,
}

impl Row {
    pub(crate) fn new(prompt_index: usize, prompt: Vec<u32>) -> Self {
        let ep = Episode {
            prompt_index,
            prompt_ids: prompt.clone(),
            response_ids: vec![],
            logprobs: vec![],
            ref_logprobs: vec![],
            kl: vec![],
            rewards: vec![],
            raw_score: 0.0,
            score: 0.0,
            terminated: false,
            truncated: false,
        };
        Row { prompt_index, prompt, ep, done: false }
    }

    /// Appends an action with its reference log-prob: `r_t = −β·k(t)`.
    pub(crate) fn push(&mut self, a: Action, ref_logprob: f32, cfg: &TextEnvConfig) -> Pushed {
        let (terminated, truncated) = cfg.ends(a.token, self.ep.response_ids.len() + 1);
        let kl = cfg.kl.estimator.estimate(a.logprob, ref_logprob);
        let ep = &mut self.ep;
        ep.response_ids.push(a.token);
        ep.logprobs.push(a.logprob);
        ep.ref_logprobs.push(ref_logprob);
        ep.kl.push(kl);
        ep.rewards.push(-cfg.kl.beta * kl);
        ep.terminated = terminated;
        ep.truncated = truncated;
        self.done = terminated || truncated;
        Pushed { kl, terminated, truncated }
    }

    /// The reward model's view of this (finished) row.
    /// The response ids whose text a reward model reads: without the terminating EOS / stop id.
    fn text_ids(&self) -> &[u32] {
        let ids = &self.ep.response_ids;
        if self.ep.terminated {
            &ids[..ids.len().saturating_sub(1)]
        } else {
            ids
        }
    }

    pub(crate) fn reward_input(
        &self,
        prompts: &PromptSource,
        detok: &dyn Detokenizer,
    ) -> Result<RewardInput, EnvError> {
        let i = self.prompt_index;
        Ok(RewardInput {
            prompt: prompts.text(i).to_string(),
            response: detok.decode(self.text_ids())?,
            prompt_ids: self.prompt.clone(),
            response_ids: self.ep.response_ids.clone(),
            reference: prompts.reference(i).map(str::to_string),
        })
    }

    /// Adds the processed score (normalised by `norm`) at the last token, and dense rewards if
    /// any; returns `R`.
    pub(crate) fn finish(
        &mut self,
        raw: f32,
        dense: Option<&[f32]>,
        cfg: &TextEnvConfig,
        norm: Option<ScoreNorm>,
    ) -> f32 {
        let len = (self.ep.response_ids.len(), cfg.max_new_tokens);
        let score = cfg.score.process(norm, raw, self.ep.terminated, len);
        self.ep.raw_score = raw;
        self.ep.score = score;
        if let Some(d) = dense {
            self.ep.rewards.iter_mut().zip(d).for_each(|(r, d)| *r += d);
        }
        if let Some(last) = self.ep.rewards.last_mut() {
            *last += score;
        }
        score
    }

    pub(crate) fn obs(&self) -> Obs {
        let mut ids = self.prompt.clone();
        ids.extend_from_slice(&self.ep.response_ids);
        Obs { ids, prompt_len: self.prompt.len() }
    }
}

/// What `reset` reports besides the observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetInfo {
    /// Which prompt of the source was drawn.
    pub prompt_index: usize,
    /// Its text.
    pub prompt: String,
}

/// The gymnasium-style interface.
pub trait Env {
    /// Starts a new episode; `seed` restarts the prompt sampler.
    fn reset(&mut self, seed: Option<u64>) -> Result<(Obs, ResetInfo), EnvError>;
    /// Takes one action.
    fn step(&mut self, action: Action) -> Result<Step, EnvError>;
}

/// One text-generation environment (one row of the reference model).
pub struct TextGenEnv<R, M> {
    cfg: TextEnvConfig,
    prompts: PromptSource,
    reference: R,
    reward: M,
    detok: Box<dyn Detokenizer>,
    row: Option<Row>,
    moments: RunningMoments,
}

impl<R, M> std::fmt::Debug for TextGenEnv<R, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextGenEnv").field("cfg", &self.cfg).field("prompts", &self.prompts.len()).finish()
    }
}

impl<R: LogProbModel, M: RewardModel> TextGenEnv<R, M> {
    /// An environment over `prompts`, scoring with `reward` against `reference` (row 0).
    pub fn new(
        cfg: TextEnvConfig,
        prompts: PromptSource,
        reference: R,
        reward: M,
        detok: Box<dyn Detokenizer>,
    ) -> Result<Self, EnvError> {
        validate(&cfg)?;
        Ok(TextGenEnv { cfg, prompts, reference, reward, detok, row: None, moments: RunningMoments::default() })
    }

    /// The action space: the vocabulary.
    pub fn action_space(&self) -> Discrete {
        Discrete { n: self.cfg.vocab }
    }

    /// The statistics of the scores seen (`score.running_norm`), for a checkpoint.
    pub fn score_moments(&self) -> RunningMoments {
        self.moments
    }

    /// Restores [`TextGenEnv::score_moments`].
    pub fn set_score_moments(&mut self, moments: RunningMoments) {
        self.moments = moments;
    }

    /// The observation space.
    pub fn observation_space(&self) -> TokenSeq {
        let longest = (0..self.prompts.len()).map(|i| self.prompts.ids(i).len()).max().unwrap_or(0);
        TokenSeq { max_len: longest + self.cfg.max_new_tokens, vocab: self.cfg.vocab }
    }
}

impl<R: LogProbModel, M: RewardModel> Env for TextGenEnv<R, M> {
    fn reset(&mut self, seed: Option<u64>) -> Result<(Obs, ResetInfo), EnvError> {
        if let Some(s) = seed {
            self.prompts.reseed(s);
        }
        let i = self.prompts.next_index();
        let row = Row::new(i, self.prompts.ids(i).to_vec());
        self.reference.begin(&[0], &[&row.prompt])?;
        let obs = row.obs();
        self.row = Some(row);
        Ok((obs, ResetInfo { prompt_index: i, prompt: self.prompts.text(i).to_string() }))
    }

    fn step(&mut self, action: Action) -> Result<Step, EnvError> {
        if !self.action_space().contains(&action.token) {
            return Err(EnvError::InvalidAction { action: action.token, n: self.cfg.vocab });
        }
        let row = self.row.as_mut().ok_or(EnvError::NotReset { row: 0 })?;
        if row.done {
            return Err(EnvError::EpisodeDone { row: 0 });
        }
        let ref_lp = self.reference.logprob_and_push(&[0], &[action.token])?;
        let ref_lp = *ref_lp.first().ok_or(EnvError::Count { what: "reference log-probs", expected: 1, got: 0 })?;
        let pushed = row.push(action, ref_lp, &self.cfg);
        let mut reward = *row.ep.rewards.last().expect("just pushed");
        let mut info = StepInfo {
            kl: pushed.kl,
            ref_logprob: ref_lp,
            eos: pushed.terminated,
            raw_score: None,
            score: None,
            episode: None,
        };
        if row.done {
            let input = row.reward_input(&self.prompts, self.detok.as_ref())?;
            let (scores, dense) = score_checked(&mut self.reward, std::slice::from_ref(&input))?;
            let norm = learn_scores(&self.cfg.score, &mut self.moments, &scores);
            let score = row.finish(scores[0], dense.as_ref().map(|d| d[0].as_slice()), &self.cfg, norm);
            reward = *row.ep.rewards.last().expect("non-empty"); // −β·k(t) (+ dense) + R
            info.raw_score = Some(scores[0]);
            info.score = Some(score);
            info.episode = Some(Box::new(row.ep.clone()));
        }
        Ok(Step { obs: row.obs(), reward, terminated: pushed.terminated, truncated: pushed.truncated, info })
    }
}

impl TextEnvConfig {
    /// Whether a response whose `len`-th token is `token` ends: `(terminated, truncated)`.
    pub fn ends(&self, token: u32, len: usize) -> (bool, bool) {
        let terminated = self.eos_ids.contains(&token) || self.stop_ids.contains(&token);
        (terminated, !terminated && len >= self.max_new_tokens)
    }
}

/// Adds a training batch's raw scores (finite: [`score_checked`]) to `moments` when
/// `score.running_norm` asks for them; returns the normalisation for the batch.
pub(crate) fn learn_scores(score: &ScoreConfig, moments: &mut RunningMoments, raw: &[f32]) -> Option<ScoreNorm> {
    if score.running_norm.is_some() {
        moments.update(raw);
    }
    score.normalization(moments)
}

pub(crate) fn validate(cfg: &TextEnvConfig) -> Result<(), EnvError> {
    if cfg.max_new_tokens == 0 {
        return Err(EnvError::Config { field: "max_new_tokens", msg: "must be at least 1".into() });
    }
    if !(cfg.kl.beta.is_finite() && cfg.kl.beta >= 0.0) {
        return Err(EnvError::Config {
            field: "kl.beta",
            msg: format!("must be finite and >= 0, got {}", cfg.kl.beta),
        });
    }
    if let Some(n) = cfg.score.normalize {
        if !(n.std > 0.0 && n.std.is_finite()) {
            return Err(EnvError::Config { field: "score.normalize.std", msg: format!("must be > 0, got {}", n.std) });
        }
        if cfg.score.running_norm.is_some() {
            let msg = "set `normalize` (fixed statistics) or `running_norm`, not both".into();
            return Err(EnvError::Config { field: "score.running_norm", msg });
        }
    }
    if let Some(cache) = cfg.score.overlong_cache.filter(|&c| c == 0 || c > cfg.max_new_tokens) {
        let msg = format!("must be in 1..=max_new_tokens ({}), got {cache}", cfg.max_new_tokens);
        return Err(EnvError::Config { field: "score.overlong_cache", msg });
    }
    Ok(())
}
