//! A verifiable reward: the response's final answer checked against the prompt's reference
//! answer, as in GRPO's maths runs (Shao et al. 2024, DeepSeekMath) on GSM8K-style data, where
//! a solution ends in an answer line `#### 42`.
//!
//! The scoring follows verl's `gsm8k` reward (`verl/utils/reward_score/gsm8k.py`):
//!
//! ```text
//! r = score         if the extracted answer equals the reference
//!     format_score  if an answer was extracted but differs
//!     0             if no answer could be extracted
//! ```
//!
//! with two extraction methods: `strict` (the number after the first `####`) and `flexible`
//! (the last number anywhere in the response). Numbers are normalised before comparing: `,`
//! and `$` dropped (`$1,000` is `1000`), then compared as numbers when both parse (`18.0` is
//! `18`; verl compares the strings).

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::EnvError;
use crate::reward::{RewardInput, RewardModel};

/// How the answer is found in a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerExtraction {
    /// The number after the first `####` (GSM8K's answer line); without one, no answer.
    #[default]
    Strict,
    /// The last number anywhere in the response.
    Flexible,
}

/// 1 for a right final answer (see the module docs for the exact rule).
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerReward {
    /// How the response's answer is found.
    pub extraction: AnswerExtraction,
    /// Reward for a right answer (verl: `score`, 1).
    pub score: f32,
    /// Reward for a wrong answer in the expected form (verl: `format_score`, 0).
    pub format_score: f32,
}

impl Default for AnswerReward {
    fn default() -> Self {
        AnswerReward { extraction: AnswerExtraction::Strict, score: 1.0, format_score: 0.0 }
    }
}

/// A number as GSM8K writes one: optional sign and `$`, digits with `,` separators, decimals.
const NUMBER: &str = r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?";

fn number_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(NUMBER).expect("valid pattern"))
}

fn answer_line_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(&format!(r"####\s*({NUMBER})")).expect("valid pattern"))
}

/// The answer extracted from `response` by `method`, normalised (see [`normalize`]).
pub fn extract_answer(response: &str, method: AnswerExtraction) -> Option<String> {
    let raw = match method {
        AnswerExtraction::Strict => answer_line_re().captures(response).map(|c| c[1].to_string()),
        AnswerExtraction::Flexible => number_re().find_iter(response).last().map(|m| m.as_str().to_string()),
    };
    raw.map(|r| normalize(&r))
}

/// The reference answer of a reference text: the number after its last `####` when it has
/// one (a whole GSM8K `answer` field), else the whole text; normalised.
pub fn reference_answer(reference: &str) -> String {
    match reference.rfind("####") {
        Some(at) => normalize(&reference[at + 4..]),
        None => normalize(reference),
    }
}

/// Drops `,` and `$` and surrounding white space, and a trailing `.` (the end of a sentence).
pub fn normalize(answer: &str) -> String {
    let s: String = answer.chars().filter(|c| *c != ',' && *c != '$').collect();
    s.trim().trim_end_matches('.').trim().to_string()
}

/// Whether two normalised answers agree: equal as numbers when both parse, else as text.
pub fn same_answer(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

impl AnswerReward {
    /// The reward of `response` against `reference` (a reference text, see
    /// [`reference_answer`]).
    pub fn score_one(&self, response: &str, reference: &str) -> f32 {
        match extract_answer(response, self.extraction) {
            None => 0.0,
            Some(a) if same_answer(&a, &reference_answer(reference)) => self.score,
            Some(_) => self.format_score,
        }
    }
}

impl RewardModel for AnswerReward {
    fn name(&self) -> String {
        format!("answer({})", if self.extraction == AnswerExtraction::Strict { "strict" } else { "flexible" })
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        batch
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let reference = x.reference.as_deref().ok_or_else(|| {
                    EnvError::reward(
                        self.name(),
                        format!("input {i} has no reference answer (its prompts need one, e.g. `reference_field`)"),
                    )
                })?;
                Ok(self.score_one(&x.response, reference))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_reference_answers() {
        let answer = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 \
                      every day at the farmer’s market.\n#### 18";
        assert_eq!(reference_answer(answer), "18");
        assert_eq!(reference_answer("#### 1,200"), "1200");
        assert_eq!(reference_answer(" 42 "), "42");
        assert_eq!(reference_answer("-3"), "-3");
    }

    #[test]
    fn extraction_strict_and_flexible() {
        let r = "She makes 9 * 2 = 18 dollars.\n#### $1,018.\nThen 7 more";
        assert_eq!(extract_answer(r, AnswerExtraction::Strict).as_deref(), Some("1018"));
        assert_eq!(extract_answer(r, AnswerExtraction::Flexible).as_deref(), Some("7"));
        assert_eq!(extract_answer("the answer is 12", AnswerExtraction::Strict), None);
        assert_eq!(extract_answer("the answer is 12.", AnswerExtraction::Flexible).as_deref(), Some("12"));
        assert_eq!(extract_answer("#### -0.5", AnswerExtraction::Strict).as_deref(), Some("-0.5"));
        assert_eq!(extract_answer("#### 3\n#### 4", AnswerExtraction::Strict).as_deref(), Some("3"), "the first");
        assert_eq!(extract_answer("no digits", AnswerExtraction::Flexible), None);
    }

    #[test]
    fn scores_right_wrong_and_missing() {
        let mut rm = AnswerReward { format_score: 0.1, ..AnswerReward::default() };
        assert_eq!(rm.score_one("so #### 18", "... #### 18"), 1.0);
        assert_eq!(rm.score_one("so #### 18.00", "#### 18"), 1.0, "equal as numbers");
        assert_eq!(rm.score_one("so #### 17", "#### 18"), 0.1);
        assert_eq!(rm.score_one("so 18", "#### 18"), 0.0, "strict wants the answer line");
        let flexible = AnswerReward { extraction: AnswerExtraction::Flexible, ..AnswerReward::default() };
        assert_eq!(flexible.score_one("so it is 18", "#### 18"), 1.0);
        let input = |reference: Option<&str>| RewardInput {
            prompt: "q".into(),
            response: "#### 5".into(),
            prompt_ids: vec![1],
            response_ids: vec![2],
            reference: reference.map(str::to_string),
        };
        assert_eq!(rm.score(&[input(Some("#### 5")), input(Some("#### 6"))]).unwrap(), vec![1.0, 0.1]);
        let e = rm.score(&[input(Some("5")), input(None)]).unwrap_err().to_string();
        assert!(e.contains("input 1 has no reference answer"), "{e}");
    }
}
