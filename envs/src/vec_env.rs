//! `VecEnv`: B text-generation environments stepped together, so that the reference model and
//! the reward model are called once per step for all rows; auto-reset; and the batched
//! rollout that trainers and benchmarks use.

use crate::error::EnvError;
use crate::kl::RunningMoments;
use crate::reward::{score_checked, RewardModel};
use crate::spaces::{Discrete, Space};
use crate::text_env::{
    learn_scores, validate, Action, Detokenizer, Episode, LogProbModel, Obs, PromptSource, ResetInfo, Row, Step,
    StepInfo, TextEnvConfig,
};

/// A policy over rows of token streams (implemented by the sampling engine in
/// `rlhf-policies`; tests use lookup tables).
pub trait Policy {
    /// Starts each row in `rows` on its prompt.
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError>;
    /// Samples the next token of each row in `rows`, with its sampling log-prob.
    fn act(&mut self, rows: &[usize]) -> Result<Vec<Action>, EnvError>;
    /// Appends `tokens[i]` to row `rows[i]`.
    fn push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError>;
}

/// The reference of an environment built without one: trainers that take the KL themselves
/// roll out with `Rollout { reference: false, .. }`; any call here is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReference;

impl LogProbModel for NoReference {
    fn begin(&mut self, _: &[usize], _: &[&[u32]]) -> Result<(), EnvError> {
        Err(EnvError::Model("this environment has no reference model (roll out with `reference: false`)".into()))
    }

    fn logprob_and_push(&mut self, _: &[usize], _: &[u32]) -> Result<Vec<f32>, EnvError> {
        Err(EnvError::Model("this environment has no reference model (roll out with `reference: false`)".into()))
    }
}

/// Options of [`VecEnv::rollout_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Consecutive rows sharing a prompt (G). Default `1`.
    pub group_size: usize,
    /// Take the reference's log-probs (the KL terms). Default `true`.
    pub reference: bool,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout { group_size: 1, reference: true }
    }
}

/// B environments sharing one reference model (one row each) and one reward model.
pub struct VecEnv<R, M> {
    cfg: TextEnvConfig,
    prompts: PromptSource,
    reference: R,
    reward: M,
    detok: Box<dyn Detokenizer>,
    rows: Vec<Option<Row>>,
    moments: RunningMoments,
}

impl<R, M> std::fmt::Debug for VecEnv<R, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VecEnv").field("cfg", &self.cfg).field("rows", &self.rows.len()).finish()
    }
}

impl<R: LogProbModel, M: RewardModel> VecEnv<R, M> {
    /// `num_envs` environments over `prompts`; `reference` must hold at least `num_envs` rows.
    pub fn new(
        num_envs: usize,
        cfg: TextEnvConfig,
        prompts: PromptSource,
        reference: R,
        reward: M,
        detok: Box<dyn Detokenizer>,
    ) -> Result<Self, EnvError> {
        validate(&cfg)?;
        if num_envs == 0 {
            return Err(EnvError::Config { field: "num_envs", msg: "must be at least 1".into() });
        }
        let rows = (0..num_envs).map(|_| None).collect();
        Ok(VecEnv { cfg, prompts, reference, reward, detok, rows, moments: RunningMoments::default() })
    }

    /// Number of environments.
    pub fn num_envs(&self) -> usize {
        self.rows.len()
    }

    /// The configuration.
    pub fn config(&self) -> &TextEnvConfig {
        &self.cfg
    }

    /// The prompt sampler (its cursor is what a checkpoint saves).
    pub fn prompts(&self) -> &PromptSource {
        &self.prompts
    }

    /// The prompt sampler, to seek it on resume.
    pub fn prompts_mut(&mut self) -> &mut PromptSource {
        &mut self.prompts
    }

    /// The statistics of the training scores seen (`score.running_norm`), for a checkpoint.
    pub fn score_moments(&self) -> RunningMoments {
        self.moments
    }

    /// Restores [`VecEnv::score_moments`].
    pub fn set_score_moments(&mut self, moments: RunningMoments) {
        self.moments = moments;
    }

    /// The reward's statistics since the last call ([`RewardModel::take_stats`]).
    pub fn take_reward_stats(&mut self) -> Vec<(String, f64)> {
        self.reward.take_stats()
    }

    /// Starts a new episode in every row (prompts drawn in row order); `seed` restarts the
    /// prompt sampler. Returns the prompts as observations.
    pub fn reset(&mut self, seed: Option<u64>) -> Result<Vec<(Obs, ResetInfo)>, EnvError> {
        if let Some(s) = seed {
            self.prompts.reseed(s);
        }
        let all: Vec<usize> = (0..self.rows.len()).collect();
        self.start_rows(&all)?;
        Ok(self
            .rows
            .iter()
            .map(|r| {
                let row = r.as_ref().expect("just started");
                (
                    row.obs(),
                    ResetInfo {
                        prompt_index: row.prompt_index,
                        prompt: self.prompts.text(row.prompt_index).to_string(),
                    },
                )
            })
            .collect())
    }

    fn start_rows(&mut self, rows: &[usize]) -> Result<(), EnvError> {
        self.draw_prompts(rows);
        let prompts: Vec<&[u32]> =
            rows.iter().map(|&r| self.rows[r].as_ref().expect("started").prompt.as_slice()).collect();
        self.reference.begin(rows, &prompts)
    }

    fn draw_prompts(&mut self, rows: &[usize]) {
        for &r in rows {
            let i = self.prompts.next_index();
            self.rows[r] = Some(Row::new(i, self.prompts.ids(i).to_vec()));
        }
    }

    fn prompts_of(&self, rows: &[usize]) -> Vec<&[u32]> {
        rows.iter().map(|&r| self.rows[r].as_ref().expect("started").prompt.as_slice()).collect()
    }

    /// Steps every row with its action (gymnasium's same-step auto-reset): a row whose episode
    /// ends reports it in `info.episode` and its `obs` is already the next episode's prompt.
    pub fn step(&mut self, actions: &[Action]) -> Result<Vec<Step>, EnvError> {
        if actions.len() != self.rows.len() {
            return Err(EnvError::Count { what: "actions", expected: self.rows.len(), got: actions.len() });
        }
        let all: Vec<usize> = (0..self.rows.len()).collect();
        let mut steps = self.step_rows(&all, actions)?;
        let finished: Vec<usize> =
            all.iter().copied().filter(|&r| self.rows[r].as_ref().is_some_and(|row| row.done)).collect();
        if !finished.is_empty() {
            self.start_rows(&finished)?;
            for &r in &finished {
                steps[r].obs = self.rows[r].as_ref().expect("restarted").obs();
            }
        }
        Ok(steps)
    }

    /// Steps the given (unfinished) rows: one batched reference call, then one batched reward
    /// call for the rows whose episodes end here.
    fn step_rows(&mut self, rows: &[usize], actions: &[Action]) -> Result<Vec<Step>, EnvError> {
        let space = Discrete { n: self.cfg.vocab };
        for (&r, a) in rows.iter().zip(actions) {
            if !space.contains(&a.token) {
                return Err(EnvError::InvalidAction { action: a.token, n: self.cfg.vocab });
            }
            match &self.rows[r] {
                None => return Err(EnvError::NotReset { row: r }),
                Some(row) if row.done => return Err(EnvError::EpisodeDone { row: r }),
                Some(_) => {}
            }
        }
        let tokens: Vec<u32> = actions.iter().map(|a| a.token).collect();
        let ref_lps = self.reference.logprob_and_push(rows, &tokens)?;
        if ref_lps.len() != rows.len() {
            return Err(EnvError::Count { what: "reference log-probs", expected: rows.len(), got: ref_lps.len() });
        }
        let mut steps = Vec::with_capacity(rows.len());
        let mut ending = Vec::new();
        for (i, (&r, a)) in rows.iter().zip(actions).enumerate() {
            let row = self.rows[r].as_mut().expect("checked above");
            let pushed = row.push(*a, ref_lps[i], &self.cfg);
            if row.done {
                ending.push(i);
            }
            let info = StepInfo {
                kl: pushed.kl,
                ref_logprob: ref_lps[i],
                eos: pushed.terminated,
                raw_score: None,
                score: None,
                episode: None,
            };
            steps.push(Step {
                obs: row.obs(),
                reward: *row.ep.rewards.last().expect("pushed"),
                terminated: pushed.terminated,
                truncated: pushed.truncated,
                info,
            });
        }
        if !ending.is_empty() {
            self.score_rows(rows, &ending, &mut steps)?;
        }
        Ok(steps)
    }

    fn score_rows(&mut self, rows: &[usize], ending: &[usize], steps: &mut [Step]) -> Result<(), EnvError> {
        let ended: Vec<usize> = ending.iter().map(|&i| rows[i]).collect();
        let scores = self.finish_rows(&ended, true)?;
        for (&i, (raw, score)) in ending.iter().zip(scores) {
            let row = self.rows[rows[i]].as_ref().expect("stepped");
            let s = &mut steps[i];
            s.reward = *row.ep.rewards.last().expect("non-empty");
            s.info.raw_score = Some(raw);
            s.info.score = Some(score);
            s.info.episode = Some(Box::new(row.ep.clone()));
        }
        Ok(())
    }

    /// One batched reward call for rows whose episodes just ended; adds the processed scores,
    /// the raw ones first adding to the running statistics if `learn` (training, not held-out
    /// evaluation). Returns `(raw, processed)` per row.
    fn finish_rows(&mut self, rows: &[usize], learn: bool) -> Result<Vec<(f32, f32)>, EnvError> {
        let inputs = rows
            .iter()
            .map(|&r| {
                let row = self.rows[r].as_ref().expect("stepped");
                row.reward_input(&self.prompts, self.detok.as_ref())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (scores, dense) = score_checked(&mut self.reward, &inputs)?;
        let norm = match learn {
            true => learn_scores(&self.cfg.score, &mut self.moments, &scores),
            false => self.cfg.score.normalization(&self.moments),
        };
        Ok(rows
            .iter()
            .enumerate()
            .map(|(k, &r)| {
                let row = self.rows[r].as_mut().expect("stepped");
                (scores[k], row.finish(scores[k], dense.as_ref().map(|d| d[k].as_slice()), &self.cfg, norm))
            })
            .collect())
    }

    /// The batched rollout: starts every row on a new prompt, samples all rows together with
    /// `policy` until each has ended (no auto-reset), then takes the reference log-probs in one
    /// teacher-forced pass when the reference offers it (else step by step), applies the same
    /// per-token math as [`VecEnv::step`], and scores all responses in one reward call.
    /// Returns one episode per row, in row order.
    pub fn rollout<P: Policy + ?Sized>(&mut self, policy: &mut P) -> Result<Vec<Episode>, EnvError> {
        self.rollout_with(policy, Rollout::default())
    }

    /// [`VecEnv::rollout`] with options: groups of `group_size` consecutive rows share one
    /// prompt (group-major: row `g·G + j` is completion `j` of prompt `g`), and without the
    /// reference pass the policy's own sampling log-probs stand in for the reference's, so
    /// every KL term (and the KL part of the per-token reward) is exactly 0 — for trainers that
    /// take the KL elsewhere (GRPO's loss term, RLOO's sequence KL) or use none.
    pub fn rollout_with<P: Policy + ?Sized>(
        &mut self,
        policy: &mut P,
        opts: Rollout,
    ) -> Result<Vec<Episode>, EnvError> {
        let groups = self.groups(opts.group_size)?;
        let indices: Vec<usize> = (0..groups).map(|_| self.prompts.next_index()).collect();
        self.rollout_rows(policy, &indices, opts, true)
    }

    /// [`VecEnv::rollout_with`] over chosen prompts of another source instead of draws from the
    /// env's own sampler (whose cursor is left as it was): prompt `indices[k]` of `prompts` on
    /// rows `k·G .. (k+1)·G`, so at most `num_envs / G` prompts per call (G need not divide
    /// `num_envs` here). The episodes'
    /// `prompt_index` refers to `prompts`, and the reward sees its texts and reference answers.
    /// For held-out evaluation; `prompts` is swapped in for the call and handed back unchanged,
    /// and the scores do not add to the running statistics (`score.running_norm`).
    pub fn rollout_prompts<P: Policy + ?Sized>(
        &mut self,
        policy: &mut P,
        prompts: &mut PromptSource,
        indices: &[usize],
        opts: Rollout,
    ) -> Result<Vec<Episode>, EnvError> {
        let g = opts.group_size;
        if g == 0 {
            return Err(EnvError::Config { field: "group_size", msg: "must be at least 1".into() });
        }
        if indices.len() * g > self.rows.len() {
            return Err(EnvError::Config {
                field: "indices",
                msg: format!("{} prompts of {g} rows each do not fit {} environments", indices.len(), self.rows.len()),
            });
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= prompts.len()) {
            return Err(EnvError::Config { field: "indices", msg: format!("prompt {i} of {}", prompts.len()) });
        }
        std::mem::swap(&mut self.prompts, prompts);
        let out = self.rollout_rows(policy, indices, opts, false);
        std::mem::swap(&mut self.prompts, prompts);
        out
    }

    /// How many groups of `g` rows the environments hold (`g` must divide them).
    fn groups(&self, g: usize) -> Result<usize, EnvError> {
        if g == 0 || !self.rows.len().is_multiple_of(g) {
            return Err(EnvError::Config {
                field: "group_size",
                msg: format!("must divide the {} environments, got {g}", self.rows.len()),
            });
        }
        Ok(self.rows.len() / g)
    }

    /// The rollout of prompts `indices` of the current source, `opts.group_size` rows each;
    /// `learn`: its scores add to the running statistics.
    fn rollout_rows<P: Policy + ?Sized>(
        &mut self,
        policy: &mut P,
        indices: &[usize],
        opts: Rollout,
        learn: bool,
    ) -> Result<Vec<Episode>, EnvError> {
        let g = opts.group_size;
        let rows: Vec<usize> = (0..indices.len() * g).collect();
        for &r in &rows {
            let i = indices[r / g];
            self.rows[r] = Some(Row::new(i, self.prompts.ids(i).to_vec()));
        }
        policy.begin(&rows, &self.prompts_of(&rows))?;
        let mut actions = self.sample_all(policy, &rows)?;
        actions.truncate(rows.len());
        let ref_lps = if opts.reference {
            let responses: Vec<Vec<u32>> = actions.iter().map(|a| a.iter().map(|x| x.token).collect()).collect();
            let resp_refs: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
            let prompts: Vec<Vec<u32>> = self.prompts_of(&rows).iter().map(|p| p.to_vec()).collect();
            let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            match self.reference.score_responses(&rows, &prompt_refs, &resp_refs)? {
                Some(lps) => lps,
                None => self.reference_step_by_step(&rows, &prompt_refs, &resp_refs)?,
            }
        } else {
            actions.iter().map(|a| a.iter().map(|x| x.logprob).collect()).collect()
        };
        if ref_lps.len() != rows.len() {
            return Err(EnvError::Count { what: "reference log-prob rows", expected: rows.len(), got: ref_lps.len() });
        }
        for (r, (acts, lps)) in actions.iter().zip(&ref_lps).enumerate() {
            if lps.len() != acts.len() {
                return Err(EnvError::Count { what: "reference log-probs", expected: acts.len(), got: lps.len() });
            }
            let row = self.rows[r].as_mut().expect("drawn");
            for (a, &lp) in acts.iter().zip(lps) {
                row.push(*a, lp, &self.cfg);
            }
        }
        self.finish_rows(&rows, learn)?;
        Ok(rows.iter().map(|&r| self.rows[r].as_ref().expect("finished").ep.clone()).collect())
    }

    /// Samples every row to its end (EOS/stop id or `max_new_tokens`).
    fn sample_all<P: Policy + ?Sized>(&self, policy: &mut P, rows: &[usize]) -> Result<Vec<Vec<Action>>, EnvError> {
        let mut actions: Vec<Vec<Action>> = vec![vec![]; self.rows.len()];
        let mut active = rows.to_vec();
        while !active.is_empty() {
            let acts = policy.act(&active)?;
            if acts.len() != active.len() {
                return Err(EnvError::Count { what: "policy actions", expected: active.len(), got: acts.len() });
            }
            let (mut still, mut tokens) = (vec![], vec![]);
            for (&r, a) in active.iter().zip(&acts) {
                if a.token >= self.cfg.vocab {
                    return Err(EnvError::InvalidAction { action: a.token, n: self.cfg.vocab });
                }
                actions[r].push(*a);
                let (terminated, truncated) = self.cfg.ends(a.token, actions[r].len());
                if !(terminated || truncated) {
                    still.push(r);
                    tokens.push(a.token);
                }
            }
            if !still.is_empty() {
                policy.push(&still, &tokens)?;
            }
            active = still;
        }
        Ok(actions)
    }

    /// Reference log-probs through `begin` + `logprob_and_push`, all rows in lockstep.
    fn reference_step_by_step(
        &mut self,
        rows: &[usize],
        prompts: &[&[u32]],
        responses: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, EnvError> {
        self.reference.begin(rows, prompts)?;
        let mut out: Vec<Vec<f32>> = vec![vec![]; rows.len()];
        let longest = responses.iter().map(|r| r.len()).max().unwrap_or(0);
        for t in 0..longest {
            let idx: Vec<usize> = (0..rows.len()).filter(|&i| responses[i].len() > t).collect();
            let (rs, toks): (Vec<usize>, Vec<u32>) = idx.iter().map(|&i| (rows[i], responses[i][t])).unzip();
            let lps = self.reference.logprob_and_push(&rs, &toks)?;
            if lps.len() != idx.len() {
                return Err(EnvError::Count { what: "reference log-probs", expected: idx.len(), got: lps.len() });
            }
            for (&i, lp) in idx.iter().zip(lps) {
                out[i].push(lp);
            }
        }
        Ok(out)
    }
}
