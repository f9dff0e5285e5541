//! Reward-model ensembles against over-optimisation (Coste et al. 2024, "Reward Model
//! Ensembles Help Mitigate Overoptimization"): k rewards — typically reward models trained on
//! the same preferences with different seeds — score each response, and their scores
//! `r_1 … r_k` combine into one:
//!
//! ```text
//! mean:  R = r̄ = (1/k) Σ_i r_i                       (mean optimisation)
//! min:   R = min_i r_i                              (worst-case optimisation, WCO)
//! uwo:   R = r̄ − λ · (1/k) Σ_i (r_i − r̄)²           (uncertainty-weighted optimisation, UWO)
//! ```
//!
//! The conservative forms (`min`, `uwo`) pay less where the members disagree — where a policy
//! is exploiting one member's errors. Members should score on one scale (reward models with
//! their stored normalisation do). The disagreement itself, the members' standard deviation
//! `√((1/k) Σ_i (r_i − r̄)²)` averaged over responses, is logged as `reward/ensemble_std`
//! ([`RewardModel::take_stats`]): rising, it says the policy is reaching where the members
//! part ways.

use serde::{Deserialize, Serialize};

use crate::error::EnvError;
use crate::reward::{check_scores, RewardInput, RewardModel};

/// How an ensemble's member scores combine (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Combine {
    /// The members' mean.
    Mean,
    /// The members' minimum (WCO).
    Min,
    /// The mean minus `lambda` times the members' (population) variance (UWO).
    Uwo {
        /// λ ≥ 0, the weight of the disagreement.
        lambda: f32,
    },
}

impl Combine {
    /// The combined score of one response's member scores `r` (at least one).
    pub fn apply(self, r: &[f32]) -> f32 {
        let k = r.len() as f64;
        let mean = r.iter().map(|&x| x as f64).sum::<f64>() / k;
        match self {
            Combine::Mean => mean as f32,
            Combine::Min => r.iter().copied().fold(f32::INFINITY, f32::min),
            Combine::Uwo { lambda } => {
                let var = r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / k;
                (mean - lambda as f64 * var) as f32
            }
        }
    }

    /// The short name used in [`Ensemble`]'s name.
    fn label(self) -> String {
        match self {
            Combine::Mean => "mean".into(),
            Combine::Min => "min".into(),
            Combine::Uwo { lambda } => format!("uwo(λ={lambda})"),
        }
    }
}

/// An ensemble of rewards combined per response by [`Combine`].
pub struct Ensemble {
    members: Vec<Box<dyn RewardModel>>,
    combine: Combine,
    /// Σ over the responses scored since the last [`RewardModel::take_stats`] of the
    /// members' standard deviation, and their count.
    disagreement: (f64, usize),
}

impl std::fmt::Debug for Ensemble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ensemble")
            .field("combine", &self.combine)
            .field("members", &self.members.iter().map(|m| m.name()).collect::<Vec<_>>())
            .finish()
    }
}

impl Ensemble {
    /// `members` (at least one) combined by `combine` (UWO's λ finite and ≥ 0).
    pub fn new(members: Vec<Box<dyn RewardModel>>, combine: Combine) -> Result<Self, EnvError> {
        if members.is_empty() {
            return Err(EnvError::Config { field: "members", msg: "an ensemble needs at least one member".into() });
        }
        if let Combine::Uwo { lambda } = combine {
            if !(lambda.is_finite() && lambda >= 0.0) {
                return Err(EnvError::Config { field: "combine.lambda", msg: format!("must be >= 0, got {lambda}") });
            }
        }
        Ok(Ensemble { members, combine, disagreement: (0.0, 0) })
    }
}

impl RewardModel for Ensemble {
    fn name(&self) -> String {
        let names: Vec<String> = self.members.iter().map(|m| m.name()).collect();
        format!("{}[{}]", self.combine.label(), names.join(", "))
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        let mut by_member = Vec::with_capacity(self.members.len());
        for m in &mut self.members {
            let s = m.score(batch)?;
            check_scores(&m.name(), &s, batch.len())?;
            by_member.push(s);
        }
        let mut row = vec![0.0; by_member.len()];
        Ok((0..batch.len())
            .map(|i| {
                row.iter_mut().zip(&by_member).for_each(|(r, s)| *r = s[i]);
                let mean = Combine::Mean.apply(&row) as f64;
                let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / row.len() as f64;
                self.disagreement.0 += var.sqrt();
                self.disagreement.1 += 1;
                self.combine.apply(&row)
            })
            .collect())
    }

    /// Members' dense (per-token) rewards have no combination here: one that gives them is an
    /// error, not dropped.
    fn dense(&mut self, batch: &[RewardInput]) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
        for m in &mut self.members {
            if m.dense(batch)?.is_some() {
                let msg = "gives per-token rewards, and an ensemble combines sequence scores only; add it beside \
                           the ensemble in a sum instead";
                return Err(EnvError::reward(m.name(), msg));
            }
        }
        Ok(None)
    }

    /// `reward/ensemble_std` (the members' standard deviation, averaged over the responses
    /// scored since the last call), then the members' own statistics; none if nothing was
    /// scored.
    fn take_stats(&mut self) -> Vec<(String, f64)> {
        let (sum, n) = std::mem::take(&mut self.disagreement);
        let own = (n > 0).then(|| ("reward/ensemble_std".to_string(), sum / n as f64));
        own.into_iter().chain(self.members.iter_mut().flat_map(|m| m.take_stats())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FnReward;
    use proptest::prelude::*;

    proptest! {
        /// min ≤ mean and UWO ≤ mean (UWO may fall below the min); UWO with λ = 0 is the mean;
        /// members that agree give their score under every combination.
        #[test]
        fn the_combinations_order_as_their_definitions_say(r in proptest::collection::vec(-20.0f32..20.0, 1..7), lambda in 0.0f32..4.0) {
            let (mean, min, uwo) = (Combine::Mean.apply(&r), Combine::Min.apply(&r), Combine::Uwo { lambda }.apply(&r));
            prop_assert!(min <= mean + 1e-4 && uwo <= mean + 1e-4, "{min} {uwo} {mean}");
            prop_assert_eq!(Combine::Uwo { lambda: 0.0 }.apply(&r), mean);
            let same = vec![r[0]; r.len()];
            for c in [Combine::Mean, Combine::Min, Combine::Uwo { lambda }] {
                prop_assert!((c.apply(&same) - r[0]).abs() <= 1e-5 * (1.0 + r[0].abs()), "{c:?}");
            }
        }
    }

    #[test]
    fn closed_forms_and_the_member_scores_of_each_row() {
        // members 1, 2, 6: mean 3, variance (4 + 1 + 9) / 3 = 14/3
        assert_eq!(Combine::Mean.apply(&[1.0, 2.0, 6.0]), 3.0);
        assert_eq!(Combine::Min.apply(&[1.0, 2.0, 6.0]), 1.0);
        assert!((Combine::Uwo { lambda: 0.5 }.apply(&[1.0, 2.0, 6.0]) - (3.0 - 7.0 / 3.0)).abs() < 1e-6);
        let len = |x: &RewardInput| x.response.len() as f32;
        let members: Vec<Box<dyn RewardModel>> = vec![
            Box::new(FnReward::new("len", len)),
            Box::new(FnReward::new("minus", move |x: &RewardInput| 10.0 - len(x))),
        ];
        let mut e = Ensemble::new(members, Combine::Min).unwrap();
        let input = |s: &str| RewardInput {
            prompt: String::new(),
            response: s.into(),
            prompt_ids: vec![],
            response_ids: vec![1],
            reference: None,
        };
        assert_eq!(e.score(&[input("ab"), input("abcdefgh")]).unwrap(), [2.0, 2.0]);
        assert_eq!(e.name(), "min[len, minus]");
        // members (2, 8) and (8, 2): standard deviation 3 each; taken, the sums restart
        assert_eq!(e.take_stats(), [("reward/ensemble_std".to_string(), 3.0)]);
        assert_eq!(e.take_stats(), []);
        e.score(&[input("abcde")]).unwrap();
        assert_eq!(e.take_stats(), [("reward/ensemble_std".to_string(), 0.0)]);
        assert_eq!(e.dense(&[input("ab")]).unwrap(), None);
    }

    #[test]
    fn bad_ensembles_are_errors() {
        let e = Ensemble::new(vec![], Combine::Mean).unwrap_err().to_string();
        assert!(e.contains("at least one member"), "{e}");
        let one = || -> Vec<Box<dyn RewardModel>> { vec![Box::new(FnReward::new("one", |_: &RewardInput| 1.0))] };
        let e = Ensemble::new(one(), Combine::Uwo { lambda: -1.0 }).unwrap_err().to_string();
        assert!(e.contains("combine.lambda"), "{e}");
        // a member with per-token rewards
        struct Dense;
        impl RewardModel for Dense {
            fn name(&self) -> String {
                "dense".into()
            }
            fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
                Ok(vec![0.0; batch.len()])
            }
            fn dense(&mut self, batch: &[RewardInput]) -> Result<Option<Vec<Vec<f32>>>, EnvError> {
                Ok(Some(batch.iter().map(|x| vec![1.0; x.response_ids.len()]).collect()))
            }
        }
        let x = RewardInput {
            prompt: String::new(),
            response: String::new(),
            prompt_ids: vec![],
            response_ids: vec![1],
            reference: None,
        };
        let mut e = Ensemble::new(vec![one().remove(0), Box::new(Dense)], Combine::Mean).unwrap();
        let err = e.dense(std::slice::from_ref(&x)).unwrap_err().to_string();
        assert!(err.contains("dense") && err.contains("sequence scores only"), "{err}");
        let nan = Box::new(FnReward::new("nan", |_: &RewardInput| f32::NAN));
        let mut e = Ensemble::new(vec![nan], Combine::Mean).unwrap();
        let err = e.score(&[x]).unwrap_err().to_string();
        assert!(err.contains("nan"), "the member's non-finite score names it: {err}");
    }
}
