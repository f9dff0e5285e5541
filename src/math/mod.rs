//! The algorithms' scalar math as pure functions over slices, each next to its paper equation
//! and tested against the fixtures computed by TRL / PyTorch. The stages wire them into the
//! tape with [`rlhf_policies::fused::host_loss`].

pub mod dpo;
pub mod group;
pub mod ppo;
pub mod preference;

/// `log σ(x)` without overflow: `−ln(1 + e^{−x})` for `x ≥ 0`, `x − ln(1 + e^{x})` below.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// The logistic function `σ(x) = 1 / (1 + e^{−x})`, without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_is_stable_and_matches_the_definition() {
        for x in [-800.0, -30.0, -1.5, 0.0, 0.3, 4.0, 800.0] {
            let l = log_sigmoid(x);
            assert!(l.is_finite() && l <= 0.0, "{x}: {l}");
            if x.abs() < 30.0 {
                assert!((l - sigmoid(x).ln()).abs() < 1e-12, "{x}");
            }
        }
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert_eq!(sigmoid(0.0), 0.5);
    }
}
