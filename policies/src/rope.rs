//! Rotary position embedding tables (NeoX / rotate_half layout): transformers' "default" rope
//! type, and Llama 3's frequency scaling (`rope_type: "llama3"`).

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;

/// `cos` and `sin` tables, `(N, Dh)` row-major for `N` positions, computed in f32 as transformers
/// does: `angle = pos · inv_freq[i]` ([`inv_freq`]), both halves repeated.
pub fn tables(positions: &[usize], dims: &Dims) -> (Vec<f32>, Vec<f32>) {
    let head_dim = dims.head_dim;
    let half = head_dim / 2;
    let inv_freq = inv_freq(dims);
    let (mut cos, mut sin) = (vec![0.0; positions.len() * head_dim], vec![0.0; positions.len() * head_dim]);
    for (n, &p) in positions.iter().enumerate() {
        for i in 0..half {
            let ang = p as f32 * inv_freq[i];
            let (s, c) = ang.sin_cos();
            cos[n * head_dim + i] = c;
            cos[n * head_dim + i + half] = c;
            sin[n * head_dim + i] = s;
            sin[n * head_dim + i + half] = s;
        }
    }
    (cos, sin)
}

/// The model's frequencies: `1 / theta^(2i / Dh)` for `i < Dh/2`, then Llama 3's scaling when
/// the config has it.
pub fn inv_freq(dims: &Dims) -> Vec<f32> {
    let (head_dim, theta) = (dims.head_dim, dims.rope_theta);
    let mut f: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    if let Some(s) = &dims.rope_scaling {
        s.apply(&mut f);
    }
    f
}

/// Llama 3's RoPE scaling (Meta's Llama 3.1 release; transformers' `_compute_llama3_parameters`):
/// with `L = original_max_position_embeddings`, a frequency whose wavelength `2π / f` is shorter
/// than `L / high_freq_factor` is kept, one longer than `L / low_freq_factor` is divided by
/// `factor`, and one between is interpolated: `(1 − s)·f / factor + s·f` with
/// `s = (L / wavelength − low_freq_factor) / (high_freq_factor − low_freq_factor)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// How far the long wavelengths are stretched.
    pub factor: f32,
    /// `L / low_freq_factor`: the wavelength above which frequencies are divided by `factor`.
    pub low_freq_factor: f32,
    /// `L / high_freq_factor`: the wavelength below which frequencies are kept.
    pub high_freq_factor: f32,
    /// `L`, the context the model was pretrained on.
    pub original_max_position_embeddings: f32,
}

impl Llama3Scaling {
    /// Reads the four numbers from a config object (`rope_parameters`, or transformers 4's
    /// `rope_scaling`, named `field` in errors).
    pub fn from_json(v: &serde_json::Map<String, serde_json::Value>, field: &str) -> Result<Self, PolicyError> {
        let num = |key: &str| match v.get(key).and_then(serde_json::Value::as_f64) {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x as f32),
            _ => Err(PolicyError::config(
                format!("{field}.{key}"),
                "rope_type llama3 needs it as a positive number".into(),
            )),
        };
        let s = Llama3Scaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        };
        if s.high_freq_factor <= s.low_freq_factor {
            return Err(PolicyError::config(
                format!("{field}.high_freq_factor"),
                format!("{} must be above low_freq_factor {}", s.high_freq_factor, s.low_freq_factor),
            ));
        }
        Ok(s)
    }

    /// Scales `inv_freq` in place, in f32 as transformers does.
    pub fn apply(&self, inv_freq: &mut [f32]) {
        let l = self.original_max_position_embeddings;
        let (low_wavelen, high_wavelen) = (l / self.low_freq_factor, l / self.high_freq_factor);
        for f in inv_freq {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= self.factor;
            } else if wavelen >= high_wavelen {
                let s = (l / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
                *f = (1.0 - s) * *f / self.factor + s * *f;
            }
        }
    }
}

/// RoPE's base and scaling: transformers 5's `rope_parameters`, or transformers 4's top-level
/// `rope_theta` (default 10000) with `rope_scaling`.
pub(crate) fn base_and_scaling(c: &LlamaConfig) -> Result<(f64, Option<Llama3Scaling>), PolicyError> {
    let scaling = |kind: &str, params: &serde_json::Map<String, serde_json::Value>, field: &str| match kind {
        "default" => Ok(None),
        "llama3" => Llama3Scaling::from_json(params, field).map(Some),
        other => Err(PolicyError::config(
            format!("{field}.rope_type"),
            format!("{other:?} is not supported (\"default\" and \"llama3\" are)"),
        )),
    };
    match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) => Ok((p.rope_theta, scaling(&p.rope_type, &p.scaling, "rope_parameters")?)),
        (None, None | Some(serde_json::Value::Null)) => Ok((c.rope_theta.unwrap_or(10000.0), None)),
        (None, Some(serde_json::Value::Object(v))) => {
            let kind = v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            Ok((c.rope_theta.unwrap_or(10000.0), scaling(kind, v, "rope_scaling")?))
        }
        (None, Some(other)) => Err(PolicyError::config("rope_scaling", format!("{other} is not an object"))),
    }
}

/// Rotates one head vector in place: `x·cos + rotate_half(x)·sin`.
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Meta's Llama 3.1 settings on a 128-wide head: the short wavelengths kept, the long ones
    /// divided by 8, the band between interpolated (so the result falls between the two).
    #[test]
    fn llama3_scaling_keeps_divides_and_interpolates() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base: Vec<f32> = (0..64).map(|i| 1.0 / 500000f32.powf((2 * i) as f32 / 128.0)).collect();
        let mut scaled = base.clone();
        s.apply(&mut scaled);
        let mut bands = [0; 3];
        for (b, f) in base.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / b;
            if wavelen < 2048.0 {
                assert_eq!(f, b);
                bands[0] += 1;
            } else if wavelen > 8192.0 {
                assert_eq!(*f, b / 8.0);
                bands[2] += 1;
            } else {
                assert!(*f < *b && *f > b / 8.0, "{f} between {b} and {}", b / 8.0);
                bands[1] += 1;
            }
        }
        assert!(bands.iter().all(|&n| n > 0), "{bands:?}");
    }

    /// A transformers 4 Llama 3.2 config (`rope_scaling` beside a top-level `rope_theta`) reads
    /// as transformers 5's `rope_parameters` do; other scalings are refused by name.
    #[test]
    fn transformers_4_rope_scaling_reads_and_other_kinds_are_refused() {
        let config = |scaling: &str| {
            crate::ModelConfig::from_json_str(&format!(
                r#"{{"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
                    "eos_token_id": [128001, 128008, 128009], "rope_scaling": {scaling}}}"#
            ))
        };
        let c = config(
            r#"{"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
        )
        .unwrap();
        let d = c.dims().unwrap();
        assert_eq!(d.rope_theta, 500000.0);
        assert_eq!(
            d.rope_scaling,
            Some(Llama3Scaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            })
        );
        assert_eq!(c.eos_token_ids(), [128001, 128008, 128009]);
        assert!(config("null").unwrap().dims().unwrap().rope_scaling.is_none());
        let e = config(r#"{"type": "yarn", "factor": 4.0}"#).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");
        let e = config(r#"{"rope_type": "llama3", "factor": 8.0}"#).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    }
}
