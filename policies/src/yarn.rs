//! YaRN's RoPE scaling (`rope_type: "yarn"`; Peng et al., "YaRN: Efficient Context Window
//! Extension of Large Language Models", 2023: "NTK-by-parts" interpolation and the attention
//! temperature; transformers' `_compute_yarn_parameters`): Qwen3's and OLMo 3's long-context
//! configs among others.
//!
//! With `L = original_max_position_embeddings`, `s = factor` and `r` turned dimensions, the
//! frequencies whose index lies below `low = r·ln(L / (2π·β_fast)) / (2 ln θ)` (more than
//! `β_fast` turns over `L`) are kept, those above `high` (computed with `β_slow`) are divided by
//! `s`, and those between are blended by a linear ramp ("NTK-by-parts"); `low` and `high` are
//! floored and ceiled unless `truncate` is false. cos and sin are multiplied by the attention
//! factor, `0.1·ln s + 1` by default (the paper's `√(1/t)`). The scaling does not depend on the
//! sequence length, so one table serves every position.

use crate::config::LlamaConfig;
use crate::error::PolicyError;
use crate::longrope::{original_context, positive};

/// YaRN's numbers, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// `s`: how far the context is stretched.
    pub factor: f32,
    /// `L`, the context the model was pretrained on.
    pub original_max_position_embeddings: usize,
    /// Frequencies with more than this many turns over `L` are kept (32 by default).
    pub beta_fast: f32,
    /// Frequencies with fewer than this many turns are divided by `factor` (1 by default).
    pub beta_slow: f32,
    /// Whether the ramp's ends are rounded to whole dimensions (transformers' default).
    pub truncate: bool,
    /// What cos and sin are multiplied by.
    pub attention_factor: f32,
}

impl Yarn {
    /// Reads the scaling from a config object (`rope_parameters` or `rope_scaling`, named
    /// `field` in errors) of the Llama-style config `c`.
    pub(crate) fn from_json(
        params: &serde_json::Map<String, serde_json::Value>,
        field: &str,
        c: &LlamaConfig,
    ) -> Result<Self, PolicyError> {
        let number = |key: &str| positive(params, field, key);
        let original = original_context(params, field, c)?;
        let factor = number("factor")?.unwrap_or(c.max_position_embeddings as f64 / original as f64);
        // transformers: 0.1·m·ln s + 1 for s > 1, else 1
        let mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
        let attention_factor = match (number("attention_factor")?, number("mscale")?, number("mscale_all_dim")?) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) => mscale(m) / mscale(all),
            (None, _, _) => mscale(1.0),
        };
        let truncate = match params.get("truncate") {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(v) => return Err(PolicyError::config(format!("{field}.truncate"), format!("{v} is not a bool"))),
        };
        Ok(Yarn {
            factor: factor as f32,
            original_max_position_embeddings: original,
            beta_fast: number("beta_fast")?.unwrap_or(32.0) as f32,
            beta_slow: number("beta_slow")?.unwrap_or(1.0) as f32,
            truncate,
            attention_factor: attention_factor as f32,
        })
    }

    /// The scaled frequencies of `rotary` turned dimensions with base `theta`, in f32 as
    /// transformers computes them.
    pub fn inv_freq(&self, rotary: usize, theta: f32) -> Vec<f32> {
        let (r, base) = (rotary as f64, theta as f64);
        // the dimension index at which a frequency turns `turns` times over L
        let dim_of = |turns: f64| {
            r * (self.original_max_position_embeddings as f64 / (turns * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (dim_of(self.beta_fast as f64), dim_of(self.beta_slow as f64));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0) as f32, high.min(r - 1.0) as f32);
        if low == high {
            high += 0.001; // transformers' guard against a zero-width ramp
        }
        crate::rope::unscaled_inv_freq(rotary, theta)
            .into_iter()
            .enumerate()
            .map(|(i, extrapolated)| {
                let kept = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                extrapolated / self.factor * (1.0 - kept) + extrapolated * kept
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;
    use crate::rope::RopeScaling;

    /// Qwen3-8B's YaRN block as its model card gives it (transformers 4 layout).
    const QWEN3_YARN: &str = r#"{"model_type": "qwen3", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16, "max_position_embeddings": 40960,
        "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 32768}}"#;

    #[test]
    fn reads_qwen3_yarn_and_derives_the_attention_factor() {
        let d = ModelConfig::from_json_str(QWEN3_YARN).unwrap().dims().unwrap();
        let Some(RopeScaling::Yarn(y)) = d.rope_scaling else { panic!("{:?}", d.rope_scaling) };
        assert_eq!((y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow), (4.0, 32768, 32.0, 1.0));
        assert!((y.attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
        assert!(y.truncate && crate::rope::attention_factor(&d) == y.attention_factor);
        assert_eq!(d.position_limit(), None, "YaRN does not depend on the length: no limit");
        // the fastest frequency is kept, the slowest divided by the factor
        let (f, plain) = (crate::rope::inv_freq(&d), crate::rope::unscaled_inv_freq(16, 1e6));
        assert_eq!(f[0], plain[0]);
        assert!((f[7] - plain[7] / 4.0).abs() <= 1e-6 * plain[7]);
        // DeepSeek's mscale pair; a given attention_factor wins
        let with = |extra: &str| {
            let text = QWEN3_YARN.replace(r#""factor": 4.0,"#, &format!(r#""factor": 4.0, {extra},"#));
            match ModelConfig::from_json_str(&text).unwrap().dims().unwrap().rope_scaling {
                Some(RopeScaling::Yarn(y)) => y.attention_factor,
                other => panic!("{other:?}"),
            }
        };
        let m = |m: f32| 0.1 * m * 4f32.ln() + 1.0;
        assert!((with(r#""mscale": 0.707, "mscale_all_dim": 1.0"#) - m(0.707) / m(1.0)).abs() < 1e-6);
        assert_eq!(with(r#""attention_factor": 1.5, "mscale": 2.0, "mscale_all_dim": 1.0"#), 1.5);
        let bad = QWEN3_YARN.replace(r#""factor": 4.0"#, r#""factor": -4.0"#);
        let e = ModelConfig::from_json_str(&bad).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.factor"), "{e}");
    }
}
