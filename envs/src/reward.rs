//! The `RewardModel` trait and its adapters: closures, rule-based rewards and weighted sums.
//! The learned reward model lives in `rlhf-policies`; external processes in [`crate::command`].

use serde::Serialize;

use crate::error::EnvError;

/// One finished response as a reward model sees it (also the JSON a [`crate::CommandReward`]
/// process receives).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardInput {
    /// Prompt text.
    pub prompt: String,
    /// Response text, without the EOS / stop token that ended it (text rewards should not see
    /// `<|endoftext|>`); `response_ids` keep it.
    pub response: String,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Response token ids (EOS included when the response ended on it).
    pub response_ids: Vec<u32>,
    /// The prompt's reference answer, when the prompts carry one
    /// ([`PromptSource::with_references`](crate::PromptSource::with_references)): what a
    /// verifiable reward such as [`AnswerReward`](crate::AnswerReward) checks against. In a
    /// [`crate::CommandReward`] request only when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A batched, fallible scorer of finished responses.
pub trait RewardModel {
    /// A short name for errors and logs.
    fn name(&self) -> String;

    /// One scalar score per input.
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError>;

    /// Optional dense rewards: one value per response token of each input, added to the
    /// shaped per-token rewards. Default: none.
    fn dense(&mut self, batch: &[RewardInput]) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        let _ = batch;
        Ok(None)
    }

    /// Statistics of the scores given since the last call, as `(metric name, value)` (e.g. an
    /// [`Ensemble`](crate::Ensemble)'s disagreement); the trainers take them around their
    /// training rollouts and log them with the iteration. Default: none.
    fn take_stats(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

impl<R: RewardModel + ?Sized> RewardModel for Box<R> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        (**self).score(batch)
    }
    fn dense(&mut self, batch: &[RewardInput]) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        (**self).dense(batch)
    }
    fn take_stats(&mut self) -> Vec<(String, f64)> {
        (**self).take_stats()
    }
}

/// Scores and optional dense rewards, as checked by [`score_checked`].
pub type CheckedScores = (Vec<f32>, Option<Vec<Vec<f32>>>);

/// Calls `model` and checks what it returned: one finite score per input, and dense rewards
/// (if any) of one finite value per response token. Nothing is zeroed or dropped.
pub fn score_checked<R: RewardModel + ?Sized>(model: &mut R, batch: &[RewardInput]) -> Result<CheckedScores, EnvError> {
    let scores = model.score(batch)?;
    check_scores(&model.name(), &scores, batch.len())?;
    let dense = model.dense(batch)?;
    if let Some(d) = &dense {
        if d.len() != batch.len() {
            return Err(EnvError::Count { what: "dense reward rows", expected: batch.len(), got: d.len() });
        }
        for (row, (values, input)) in d.iter().zip(batch).enumerate() {
            if values.len() != input.response_ids.len() {
                return Err(EnvError::reward(
                    model.name(),
                    format!(
                        "dense rewards of row {row}: {} values for {} tokens",
                        values.len(),
                        input.response_ids.len()
                    ),
                ));
            }
            check_scores(&model.name(), values, values.len())?;
        }
    }
    Ok((scores, dense))
}

/// Count and finiteness check of a score vector.
pub fn check_scores(model: &str, scores: &[f32], expected: usize) -> Result<(), EnvError> {
    if scores.len() != expected {
        return Err(EnvError::reward(model, format!("returned {} scores for {expected} responses", scores.len())));
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(EnvError::NonFinite { model: model.into(), index, value });
    }
    Ok(())
}

/// A reward from a closure over one input.
pub struct FnReward<F> {
    name: String,
    f: F,
}

impl<F: FnMut(&RewardInput) -> f32> FnReward<F> {
    /// Wraps `f` under `name`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        FnReward { name: name.into(), f }
    }
}

impl<F> std::fmt::Debug for FnReward<F> {
    fn fmt(&self, fm: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fm.debug_struct("FnReward").field("name", &self.name).finish()
    }
}

impl<F: FnMut(&RewardInput) -> f32> RewardModel for FnReward<F> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        Ok(batch.iter().map(&mut self.f).collect())
    }
}

/// `−scale · |len − target|` over response tokens (EOS excluded): prefers a target length.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthReward {
    /// Preferred response length in tokens.
    pub target: usize,
    /// Penalty per token of distance.
    pub scale: f32,
    /// The EOS id (not counted), if any.
    pub eos_id: Option<u32>,
}

impl RewardModel for LengthReward {
    fn name(&self) -> String {
        format!("length(target={})", self.target)
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        Ok(batch
            .iter()
            .map(|x| {
                let len = x.response_ids.iter().filter(|&&t| Some(t) != self.eos_id).count();
                -self.scale * (len as f32 - self.target as f32).abs()
            })
            .collect())
    }
}

/// `weight ·` (number of occurrences of the keywords in the response text).
#[derive(Debug, Clone, PartialEq)]
pub struct KeywordReward {
    /// Words or phrases to count (non-overlapping occurrences, case-sensitive).
    pub keywords: Vec<String>,
    /// Reward per occurrence (negative to penalise).
    pub weight: f32,
}

impl RewardModel for KeywordReward {
    fn name(&self) -> String {
        format!("keywords({})", self.keywords.join(","))
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        Ok(batch
            .iter()
            .map(|x| {
                self.weight
                    * self
                        .keywords
                        .iter()
                        .filter(|k| !k.is_empty())
                        .map(|k| x.response.matches(k.as_str()).count())
                        .sum::<usize>() as f32
            })
            .collect())
    }
}

/// `weight ·` (number of non-overlapping matches of a regular expression in the response).
#[derive(Debug, Clone)]
pub struct RegexReward {
    /// The pattern.
    pub pattern: regex::Regex,
    /// Reward per match.
    pub weight: f32,
}

impl RegexReward {
    /// Compiles `pattern`.
    pub fn new(pattern: &str, weight: f32) -> Result<Self, EnvError> {
        let pattern =
            regex::Regex::new(pattern).map_err(|e| EnvError::Config { field: "pattern", msg: e.to_string() })?;
        Ok(RegexReward { pattern, weight })
    }
}

impl RewardModel for RegexReward {
    fn name(&self) -> String {
        format!("regex({})", self.pattern.as_str())
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        Ok(batch.iter().map(|x| self.weight * self.pattern.find_iter(&x.response).count() as f32).collect())
    }
}

/// `Σ wᵢ · rᵢ`: a weighted composition of reward models (dense rewards combine the same way).
pub struct Weighted {
    parts: Vec<(f32, Box<dyn RewardModel>)>,
}

impl std::fmt::Debug for Weighted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.parts.iter().map(|(w, m)| (w, m.name()))).finish()
    }
}

impl Weighted {
    /// An empty sum (scores 0 until parts are added).
    pub fn new() -> Self {
        Weighted { parts: Vec::new() }
    }
    /// Adds `weight · model`.
    pub fn with(mut self, weight: f32, model: impl RewardModel + 'static) -> Self {
        self.parts.push((weight, Box::new(model)));
        self
    }
    /// Adds `weight · model` for a model already boxed.
    pub fn with_boxed(mut self, weight: f32, model: Box<dyn RewardModel>) -> Self {
        self.parts.push((weight, model));
        self
    }
}

impl Default for Weighted {
    fn default() -> Self {
        Self::new()
    }
}

impl RewardModel for Weighted {
    fn name(&self) -> String {
        let parts: Vec<String> = self.parts.iter().map(|(w, m)| format!("{w}·{}", m.name())).collect();
        parts.join(" + ")
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        let mut total = vec![0.0f32; batch.len()];
        for (w, m) in &mut self.parts {
            let s = m.score(batch)?;
            check_scores(&m.name(), &s, batch.len())?;
            total.iter_mut().zip(s).for_each(|(t, s)| *t += *w * s);
        }
        Ok(total)
    }
    fn dense(&mut self, batch: &[RewardInput]) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        let mut total: Option<Vec<Vec<f32>>> = None;
        for (w, m) in &mut self.parts {
            if let Some(d) = m.dense(batch)? {
                let acc = total.get_or_insert_with(|| batch.iter().map(|x| vec![0.0; x.response_ids.len()]).collect());
                for (a, d) in acc.iter_mut().zip(d) {
                    a.iter_mut().zip(d).for_each(|(a, d)| *a += *w * d);
                }
            }
        }
        Ok(total)
    }
    fn take_stats(&mut self) -> Vec<(String, f64)> {
        self.parts.iter_mut().flat_map(|(_, m)| m.take_stats()).collect()
    }
}
