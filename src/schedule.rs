//! Learning-rate schedules.
//!
//! The peak rate is the optimizer's `optim.lr`; a schedule only shapes it over the stage's
//! steps (iterations for the online trainers), so `--set optim.lr=…` and `--set steps=…`
//! change what they say and the decay still ends at the last step.

use serde::{Deserialize, Serialize};

/// Constant, or linear warm-up then cosine (nanoGPT's `get_lr`) or linear (HF's and TRL's
/// default `linear`, cleanrl's `anneal_lr`) decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// `optim.lr` at every step. (A struct variant: serde lets a unit variant of an internally
    /// tagged enum ignore unknown fields, such as the `lr` these schedules once had.)
    Constant {},
    /// `lr·(s+1)/warmup` for `s < warmup`; then cosine from `lr` to `min_lr` at `decay_steps`;
    /// `min_lr` after that (`lr` = `optim.lr`).
    WarmupCosine {
        /// Warm-up steps. Default `0`.
        #[serde(default)]
        warmup: usize,
        /// Warm-up as a fraction of the stage's steps, rounded up (TRL's `warmup_ratio`), in
        /// place of `warmup`. Default: none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warmup_ratio: Option<f64>,
        /// Final learning rate. Default `lr / 10` (nanoGPT's and Chinchilla's rule).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_lr: Option<f64>,
        /// Step at which the decay reaches `min_lr`. Default: the stage's last step (so a run
        /// resumed with more `steps` stretches its remaining decay; set this to keep the curve).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decay_steps: Option<usize>,
    },
    /// `lr·(s+1)/warmup` for `s < warmup`; then a straight line from `lr` to `min_lr` at
    /// `decay_steps`; `min_lr` after that. With the defaults, `lr·(1 − s/steps)`.
    Linear {
        /// Warm-up steps. Default `0`.
        #[serde(default)]
        warmup: usize,
        /// Warm-up as a fraction of the stage's steps, rounded up, in place of `warmup`.
        /// Default: none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warmup_ratio: Option<f64>,
        /// Final learning rate. Default `0` (HF's and TRL's `linear`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_lr: Option<f64>,
        /// Step at which the decay reaches `min_lr`. Default: the stage's last step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decay_steps: Option<usize>,
    },
}

impl LrSchedule {
    /// Warm-up over `warmup` steps, then cosine to `lr / 10` at the stage's last step.
    pub fn warmup_cosine(warmup: usize) -> Self {
        LrSchedule::WarmupCosine { warmup, warmup_ratio: None, min_lr: None, decay_steps: None }
    }

    /// Checks that the warm-up is given one way (steps or a ratio in [0, 1]) and `min_lr`, if
    /// given, is finite and non-negative.
    pub fn validate(&self) -> Result<(), String> {
        let (LrSchedule::WarmupCosine { warmup, warmup_ratio, min_lr, .. }
        | LrSchedule::Linear { warmup, warmup_ratio, min_lr, .. }) = *self
        else {
            return Ok(());
        };
        match warmup_ratio {
            Some(_) if warmup > 0 => return Err("schedule: give warmup or warmup_ratio, not both".into()),
            Some(r) if !(0.0..=1.0).contains(&r) => {
                return Err(format!("schedule.warmup_ratio must be in [0, 1], got {r}"))
            }
            _ => {}
        }
        match min_lr {
            Some(m) if !(m.is_finite() && m >= 0.0) => Err(format!("schedule.min_lr must be non-negative, got {m}")),
            _ => Ok(()),
        }
    }

    /// The learning rate at 0-based step `step` of a stage of `total` steps whose peak rate
    /// is `lr`.
    pub fn at(&self, lr: f64, total: usize, step: usize) -> f64 {
        let (warmup, ratio, min_lr, decay_steps, cosine) = match *self {
            LrSchedule::Constant {} => return lr,
            LrSchedule::WarmupCosine { warmup, warmup_ratio, min_lr, decay_steps } => {
                (warmup, warmup_ratio, min_lr.unwrap_or(lr / 10.0), decay_steps, true)
            }
            LrSchedule::Linear { warmup, warmup_ratio, min_lr, decay_steps } => {
                (warmup, warmup_ratio, min_lr.unwrap_or(0.0), decay_steps, false)
            }
        };
        let warmup = ratio.map_or(warmup, |r| (r * total as f64).ceil() as usize);
        let decay_steps = decay_steps.unwrap_or(total);
        if step < warmup {
            return lr * (step + 1) as f64 / warmup as f64;
        }
        if step >= decay_steps || decay_steps <= warmup {
            return min_lr;
        }
        let ratio = (step - warmup) as f64 / (decay_steps - warmup) as f64;
        let coeff = if cosine { 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) } else { 1.0 - ratio };
        min_lr + coeff * (lr - min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_at_chosen_steps() {
        let s = LrSchedule::WarmupCosine { warmup: 10, warmup_ratio: None, min_lr: Some(1e-4), decay_steps: Some(110) };
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
        assert_eq!(LrSchedule::Constant {}.at(0.5, 10, 1000), 0.5);
    }

    #[test]
    fn defaults_follow_the_peak_rate_and_the_stage_length() {
        let s = LrSchedule::warmup_cosine(10);
        // min_lr = lr/10, decay to the stage's last step: halfway at 10 + (1010 − 10)/2
        assert!((s.at(2e-3, 1010, 510) - 1.1e-3).abs() < 1e-15);
        assert!((s.at(2e-3, 1010, 1010) - 2e-4).abs() < 1e-18);
        assert!(s.at(2e-3, 1010, 1009) > 2e-4, "still decaying one step before the end");
        // the same schedule over 110 steps at lr 1e-3 is the explicit one above
        let explicit =
            LrSchedule::WarmupCosine { warmup: 10, warmup_ratio: None, min_lr: Some(1e-4), decay_steps: Some(110) };
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
        let w = LrSchedule::Linear { warmup: 4, warmup_ratio: None, min_lr: Some(1e-5), decay_steps: Some(24) };
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
    }

    #[test]
    fn reads_its_json_and_refuses_the_old_per_schedule_rate() {
        let s: LrSchedule = serde_json::from_str(r#"{"kind": "warmup_cosine", "warmup": 5}"#).unwrap();
        assert_eq!(s, LrSchedule::warmup_cosine(5));
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"kind":"warmup_cosine","warmup":5}"#);
        let c: LrSchedule = serde_json::from_str(r#"{"kind": "constant"}"#).unwrap();
        assert_eq!(c, LrSchedule::Constant {});
        let e = serde_json::from_str::<LrSchedule>(r#"{"kind": "constant", "lr": 1e-5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `lr`"), "{e}");
        let e =
            serde_json::from_str::<LrSchedule>(r#"{"kind": "warmup_cosine", "lr": 1e-3, "warmup": 5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `lr`"), "{e}");
    }
}
