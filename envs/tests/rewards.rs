//! The rule-based reward adapters, weighted sums, dense rewards and the checks on what reward
//! models return.

mod common;

use common::*;
use rlhf_envs::*;

fn input(response: &str, ids: Vec<u32>) -> RewardInput {
    RewardInput {
        prompt: "p".into(),
        response: response.into(),
        prompt_ids: vec![1],
        response_ids: ids,
        reference: None,
    }
}

#[test]
fn rule_rewards() {
    let batch = vec![input("the cat and the hat", vec![5, 6, 7, 0]), input("no", vec![8, 9, 9, 9, 9, 9])];
    let mut len = LengthReward { target: 4, scale: 0.5, eos_id: Some(0) };
    assert_eq!(len.score(&batch).unwrap(), vec![-0.5, -1.0]);
    let mut kw = KeywordReward { keywords: vec!["the".into(), "hat".into()], weight: 2.0 };
    assert_eq!(kw.score(&batch).unwrap(), vec![6.0, 0.0]);
    let mut re = RegexReward::new(r"\bc?at\b|\bh\w+", 1.0).unwrap();
    assert_eq!(re.score(&batch).unwrap(), vec![2.0, 0.0]);
    assert!(RegexReward::new("(unclosed", 1.0).is_err());
    let mut sum = Weighted::new().with(1.0, len).with(-0.5, kw);
    assert_eq!(sum.score(&batch).unwrap(), vec![-3.5, -1.0]);
}

/// A reward with per-token (dense) rewards and configurable misbehaviour.
struct Dense {
    bad: Option<&'static str>,
}

impl RewardModel for Dense {
    fn name(&self) -> String {
        "dense".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        Ok(match self.bad {
            Some("nan") => vec![f32::NAN; batch.len()],
            Some("count") => vec![1.0],
            _ => vec![1.0; batch.len()],
        })
    }
    fn dense(&mut self, batch: &[RewardInput]) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        Ok(Some(batch.iter().map(|x| x.response_ids.iter().map(|&t| t as f32 * 0.01).collect()).collect()))
    }
}

fn cfg() -> TextEnvConfig {
    TextEnvConfig {
        vocab: 12,
        max_new_tokens: 3,
        eos_ids: vec![0],
        stop_ids: vec![],
        kl: KlConfig { beta: 0.0, estimator: KlEstimator::K1 },
        score: ScoreConfig::default(),
    }
}

#[test]
fn dense_rewards_add_per_token_and_bad_scores_are_errors() {
    let mut v = VecEnv::new(
        2,
        cfg(),
        PromptSource::new(prompts(2), 0).unwrap(),
        Bigram::new(12, 0.1, 2, 0),
        Dense { bad: None },
        Box::new(Letters),
    )
    .unwrap();
    for ep in v.rollout(&mut Bigram::new(12, 0.5, 2, 3)).unwrap() {
        let n = ep.response_ids.len();
        for (t, (&r, &tok)) in ep.rewards.iter().zip(&ep.response_ids).enumerate() {
            let want = tok as f32 * 0.01 + if t == n - 1 { 1.0 } else { 0.0 };
            assert!((r - want).abs() < 1e-6, "token {t}: {r} vs {want}");
        }
    }
    for bad in ["nan", "count"] {
        let mut v = VecEnv::new(
            2,
            cfg(),
            PromptSource::new(prompts(2), 0).unwrap(),
            Bigram::new(12, 0.1, 2, 0),
            Dense { bad: Some(bad) },
            Box::new(Letters),
        )
        .unwrap();
        let e = v.rollout(&mut Bigram::new(12, 0.5, 2, 3)).unwrap_err().to_string();
        assert!(e.contains("dense") && (e.contains("not finite") || e.contains("returned 1 scores")), "{e}");
    }
}
