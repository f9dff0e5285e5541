//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

/// Linear warm-up then cosine decay to `min_lr` (nanoGPT's `get_lr`), or constant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The same rate at every step.
    Constant {
        /// Learning rate.
        lr: f64,
    },
    /// `lr·(s+1)/warmup` for `s < warmup`; then cosine from `lr` to `min_lr` at `decay_steps`;
    /// `min_lr` after that.
    WarmupCosine {
        /// Peak learning rate.
        lr: f64,
        /// Final learning rate.
        min_lr: f64,
        /// Warm-up steps.
        warmup: usize,
        /// Step at which the decay reaches `min_lr` (usually the total number of steps).
        decay_steps: usize,
    },
}

impl LrSchedule {
    /// The learning rate at 0-based optimizer step `step`.
    pub fn at(&self, step: usize) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupCosine { lr, min_lr, warmup, decay_steps } => {
                if step < warmup {
                    return lr * (step + 1) as f64 / warmup as f64;
                }
                if step >= decay_steps || decay_steps <= warmup {
                    return min_lr;
                }
                let ratio = (step - warmup) as f64 / (decay_steps - warmup) as f64;
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
                min_lr + coeff * (lr - min_lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_at_chosen_steps() {
        let s = LrSchedule::WarmupCosine { lr: 1e-3, min_lr: 1e-4, warmup: 10, decay_steps: 110 };
        assert!((s.at(0) - 1e-4).abs() < 1e-15);
        assert!((s.at(4) - 5e-4).abs() < 1e-15);
        assert!((s.at(9) - 1e-3).abs() < 1e-15);
        assert!((s.at(10) - 1e-3).abs() < 1e-15, "cosine starts at the peak");
        assert!((s.at(60) - 5.5e-4).abs() < 1e-12, "halfway: (lr + min_lr) / 2");
        assert!((s.at(110) - 1e-4).abs() < 1e-15);
        assert!((s.at(500) - 1e-4).abs() < 1e-15);
        assert_eq!(LrSchedule::Constant { lr: 0.5 }.at(1000), 0.5);
        // monotone after warm-up
        for st in 10..110 {
            assert!(s.at(st + 1) <= s.at(st));
        }
    }
}
