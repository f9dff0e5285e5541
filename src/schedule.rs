//! Learning-rate schedules.
//!
//! The peak rate is the optimizer's `optim.lr`; a schedule only shapes it over the stage's
//! steps (iterations for the online trainers), so `--set optim.lr=…` and `--set steps=…`
//! change what they say and the decay still ends at the last step.

use serde::{Deserialize, Serialize};

/// The shape of the rate over the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrShape {
    /// `optim.lr` at every step.
    Constant,
    /// Linear warm-up, then cosine down to `min_lr` (nanoGPT's `get_lr`).
    WarmupCosine,
    /// Linear warm-up, then a straight line down to `min_lr` (HF's and TRL's default `linear`,
    /// cleanrl's `anneal_lr`).
    Linear,
}

/// A learning-rate schedule: `lr·(s+1)/warmup` for `s < warmup`; then the `kind`'s decay from
/// `lr` (= `optim.lr`) to `min_lr` at `decay_steps`; `min_lr` after that. `constant` takes none
/// of the other fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// `constant`, `warmup_cosine` or `linear`.
    pub kind: LrShape,
    /// Warm-up steps. Default `0`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup: usize,
    /// Warm-up as a fraction of the stage's steps, rounded up (TRL's `warmup_ratio`), in place
    /// of `warmup`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Final learning rate. Default `lr / 10` for `warmup_cosine` (nanoGPT's and Chinchilla's
    /// rule), `0` for `linear` (HF's and TRL's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// Step at which the decay reaches `min_lr`. Default: the stage's last step (so a run
    /// resumed with more `steps` stretches its remaining decay; set this to keep the curve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_steps: Option<usize>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl LrSchedule {
    /// `optim.lr` at every step.
    pub fn constant() -> Self {
        LrSchedule { kind: LrShape::Constant, warmup: 0, warmup_ratio: None, min_lr: None, decay_steps: None }
    }

    /// Warm-up over `warmup` steps, then cosine to `lr / 10` at the stage's last step.
    pub fn warmup_cosine(warmup: usize) -> Self {
        LrSchedule { kind: LrShape::WarmupCosine, warmup, ..Self::constant() }
    }

    /// Checks that `constant` has no other field, the warm-up is given one way (steps or a
    /// ratio in [0, 1]) and `min_lr`, if given, is finite and non-negative.
    pub fn validate(&self) -> Result<(), String> {
        let shaped =
            self.warmup > 0 || self.warmup_ratio.is_some() || self.min_lr.is_some() || self.decay_steps.is_some();
        if self.kind == LrShape::Constant && shaped {
            return Err("schedule: constant takes no warmup, warmup_ratio, min_lr or decay_steps".into());
        }
        match self.warmup_ratio {
            Some(_) if self.warmup > 0 => return Err("schedule: give warmup or warmup_ratio, not both".into()),
            Some(r) if !(0.0..=1.0).contains(&r) => {
                return Err(format!("schedule.warmup_ratio must be in [0, 1], got {r}"))
            }
            _ => {}
        }
        match self.min_lr {
            Some(m) if !(m.is_finite() && m >= 0.0) => Err(format!("schedule.min_lr must be non-negative, got {m}")),
            _ => Ok(()),
        }
    }

    /// The learning rate at 0-based step `step` of a stage of `total` steps whose peak rate
    /// is `lr`.
    pub fn at(&self, lr: f64, total: usize, step: usize) -> f64 {
        let min_lr = match self.kind {
            LrShape::Constant => return lr,
            LrShape::WarmupCosine => self.min_lr.unwrap_or(lr / 10.0),
            LrShape::Linear => self.min_lr.unwrap_or(0.0),
        };
        let warmup = self.warmup_ratio.map_or(self.warmup, |r| (r * total as f64).ceil() as usize);
        let decay_steps = self.decay_steps.unwrap_or(total);
        if step < warmup {
            return lr * (step + 1) as f64 / warmup as f64;
        }
        if step >= decay_steps || decay_steps <= warmup {
            return min_lr;
        }
        let ratio = (step - warmup) as f64 / (decay_steps - warmup) as f64;
        let coeff = match self.kind {
            LrShape::WarmupCosine => 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()),
            _ => 1.0 - ratio,
        };
        min_lr + coeff * (lr - min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_at_chosen_steps() {
        let s = LrSchedule { min_lr: Some(1e-4), decay_steps: Some(110), ..LrSchedule::warmup_cosine(10) };
        let at = |step| s.at(1e-3, 500, step);
        assert!((at(0) - 1e-4).abs() < 1e-15);
        assert!((at(4) - 5e-4).abs() < 1e-15);
        assert!((at(9) - 1e-3).abs() < 1e-15);
        assert!((at(10) - 1e-3).abs() < 1e-15, "cosine starts at the peak");
        assert!((at(60) - 5.5e-4).abs() < 1e-12, "halfway: (lr + min_lr) / 2");
        assert!((at(110) - 1e-4).abs() < 1e-15);
        assert!((at(500) - 1e-4).abs() < 1e-15);
        // monotone after warm-up
        for st in 10..110 {
            assert!(at(st + 1) <= at(st));
        }
        assert_eq!(LrSchedule::constant().at(0.5, 10, 1000), 0.5);
    }

    #[test]
    fn defaults_follow_the_peak_rate_and_the_stage_length() {
        let s = LrSchedule::warmup_cosine(10);
        // min_lr = lr/10, decay to the stage's last step: halfway at 10 + (1010 − 10)/2
        assert!((s.at(2e-3, 1010, 510) - 1.1e-3).abs() < 1e-15);
        assert!((s.at(2e-3, 1010, 1010) - 2e-4).abs() < 1e-18);
        assert!(s.at(2e-3, 1010, 1009) > 2e-4, "still decaying one step before the end");
        // the same schedule over 110 steps at lr 1e-3 is the explicit one above
        let explicit = LrSchedule { min_lr: Some(1e-4), decay_steps: Some(110), ..LrSchedule::warmup_cosine(10) };
        for st in 0..120 {
            assert_eq!(s.at(1e-3, 110, st), explicit.at(1e-3, 110, st), "step {st}");
        }
    }

    #[test]
    fn linear_decays_to_zero_by_default_as_cleanrl_anneals() {
        let s: LrSchedule = serde_json::from_str(r#"{"kind": "linear"}"#).unwrap();
        // cleanrl: lr · (1 − (update − 1) / num_updates) at 1-based update = step + 1
        for step in 0..=100 {
            let want = 3e-4 * (1.0 - step as f64 / 100.0);
            assert!((s.at(3e-4, 100, step) - want).abs() < 1e-15, "step {step}");
        }
        let w = LrSchedule {
            kind: LrShape::Linear,
            min_lr: Some(1e-5),
            decay_steps: Some(24),
            ..LrSchedule::warmup_cosine(4)
        };
        assert!((w.at(1e-4, 50, 1) - 5e-5).abs() < 1e-15, "warm-up as the cosine's");
        assert!((w.at(1e-4, 50, 4) - 1e-4).abs() < 1e-15);
        assert!((w.at(1e-4, 50, 14) - 5.5e-5).abs() < 1e-15, "halfway");
        assert_eq!(w.at(1e-4, 50, 30), 1e-5);
    }

    #[test]
    fn a_warmup_ratio_is_the_rounded_up_share_of_the_stage() {
        let r: LrSchedule = serde_json::from_str(r#"{"kind": "warmup_cosine", "warmup_ratio": 0.1}"#).unwrap();
        assert_eq!(r.validate(), Ok(()));
        // 10% of 95 steps, rounded up: 10 warm-up steps, as `warmup: 10`
        let steps = LrSchedule::warmup_cosine(10);
        for st in 0..100 {
            assert_eq!(r.at(1e-3, 95, st), steps.at(1e-3, 95, st), "step {st}");
        }
        let both: LrSchedule = serde_json::from_str(r#"{"kind": "linear", "warmup": 3, "warmup_ratio": 0.1}"#).unwrap();
        assert!(both.validate().unwrap_err().contains("not both"));
        let big: LrSchedule = serde_json::from_str(r#"{"kind": "linear", "warmup_ratio": 1.5}"#).unwrap();
        assert!(big.validate().unwrap_err().contains("[0, 1]"));
        let neg: LrSchedule = serde_json::from_str(r#"{"kind": "linear", "min_lr": -1}"#).unwrap();
        assert!(neg.validate().unwrap_err().contains("min_lr"));
        let shaped: LrSchedule = serde_json::from_str(r#"{"kind": "constant", "warmup": 3}"#).unwrap();
        assert!(shaped.validate().unwrap_err().contains("constant takes no warmup"));
    }

    #[test]
    fn reads_its_json_and_refuses_the_old_per_schedule_rate() {
        let s: LrSchedule = serde_json::from_str(r#"{"kind": "warmup_cosine", "warmup": 5}"#).unwrap();
        assert_eq!(s, LrSchedule::warmup_cosine(5));
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"kind":"warmup_cosine","warmup":5}"#);
        let c: LrSchedule = serde_json::from_str(r#"{"kind": "constant"}"#).unwrap();
        assert_eq!(c, LrSchedule::constant());
        let e = serde_json::from_str::<LrSchedule>(r#"{"kind": "constant", "lr": 1e-5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `lr`"), "{e}");
        let e =
            serde_json::from_str::<LrSchedule>(r#"{"kind": "warmup_cosine", "lr": 1e-3, "warmup": 5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `lr`"), "{e}");
    }
}
