//! Rotary position embedding tables (NeoX / rotate_half layout): transformers' "default" rope
//! type, Llama 3's frequency scaling (`rope_type: "llama3"`), LongRoPE's within the pretrained
//! context (`rope_type: "longrope"`: Phi-3's 128k models, Phi-3.5, Phi-4-mini), YaRN's
//! (`rope_type: "yarn"`, [`crate::yarn`]) and a linear stretch.

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;
pub use crate::longrope::LongRope;
pub use crate::yarn::Yarn;

/// [`tables`] kept together: `(N, Dh)` cos and sin, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTables {
    /// `cos(pos · inv_freq)`, 1 past the turned dimensions.
    pub cos: Vec<f32>,
    /// `sin(pos · inv_freq)`, 0 past the turned dimensions.
    pub sin: Vec<f32>,
}

/// `cos` and `sin` tables, `(N, Dh)` row-major for `N` positions, computed in f32 as transformers
/// does: `angle = pos · inv_freq[i]` ([`inv_freq`]), both halves repeated over the
/// [`Dims::rotary_dim`] turned dimensions and multiplied by the [`attention_factor`]; a
/// dimension past them (partial rotary) has `cos = 1`, `sin = 0` and passes through.
pub fn tables(positions: &[usize], dims: &Dims) -> (Vec<f32>, Vec<f32>) {
    let (head_dim, rotary) = (dims.head_dim, dims.rotary_dim());
    let half = rotary / 2;
    let (inv_freq, scale) = (inv_freq(dims), attention_factor(dims));
    let (mut cos, mut sin) = (vec![1.0; positions.len() * head_dim], vec![0.0; positions.len() * head_dim]);
    for (n, &p) in positions.iter().enumerate() {
        for i in 0..half {
            let ang = p as f32 * inv_freq[i];
            let (s, c) = ang.sin_cos();
            let (s, c) = (s * scale, c * scale);
            cos[n * head_dim + i] = c;
            cos[n * head_dim + i + half] = c;
            sin[n * head_dim + i] = s;
            sin[n * head_dim + i + half] = s;
        }
    }
    (cos, sin)
}

/// The model's frequencies: `1 / theta^(2i / r)` for `i < r/2` with `r` the
/// [`Dims::rotary_dim`] (the head width but for a partial rotary), then the config's scaling:
/// Llama 3's, LongRoPE's short factors, YaRN's, or a linear stretch.
pub fn inv_freq(dims: &Dims) -> Vec<f32> {
    let (rotary, theta) = (dims.rotary_dim(), dims.rope_theta);
    match &dims.rope_scaling {
        None => unscaled_inv_freq(rotary, theta),
        Some(RopeScaling::Llama3(s)) => {
            let mut f = unscaled_inv_freq(rotary, theta);
            s.apply(&mut f);
            f
        }
        Some(RopeScaling::LongRope(l)) => l.inv_freq(rotary, theta),
        Some(RopeScaling::Yarn(y)) => y.inv_freq(rotary, theta),
        Some(RopeScaling::Linear { factor }) => {
            unscaled_inv_freq(rotary, theta).into_iter().map(|f| f / factor).collect()
        }
    }
}

/// What cos and sin are multiplied by (transformers' `attention_scaling`): LongRoPE's
/// [`LongRope::attention_factor`], YaRN's [`Yarn::attention_factor`], 1 otherwise.
pub fn attention_factor(dims: &Dims) -> f32 {
    match &dims.rope_scaling {
        Some(RopeScaling::LongRope(l)) => l.attention_factor,
        Some(RopeScaling::Yarn(y)) => y.attention_factor,
        _ => 1.0,
    }
}

/// A config's RoPE scaling.
// LongRoPE's factors sit inline (half a kilobyte) so that `Dims` stays `Copy`; a `Dims` is
// copied at most once per layer of a forward, nanoseconds beside the layer itself.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "llama3"`.
    Llama3(Llama3Scaling),
    /// `rope_type: "longrope"`.
    LongRope(LongRope),
    /// `rope_type: "yarn"`.
    Yarn(Yarn),
    /// `rope_type: "linear"` (position interpolation; Gemma 3's 4B–27B models on their global
    /// layers): every frequency divided by `factor`.
    Linear {
        /// The stretch of the context.
        factor: f32,
    },
}

impl RopeScaling {
    /// Linear scaling from a config object (named `field` in errors): its positive `factor`.
    pub(crate) fn linear(
        params: &serde_json::Map<String, serde_json::Value>,
        field: &str,
    ) -> Result<Self, PolicyError> {
        match params.get("factor").and_then(serde_json::Value::as_f64) {
            Some(f) if f.is_finite() && f > 0.0 => Ok(RopeScaling::Linear { factor: f as f32 }),
            _ => Err(PolicyError::config(
                format!("{field}.factor"),
                "rope_type linear needs it as a positive number".into(),
            )),
        }
    }
}

/// RoPE's frequencies before any scaling: `1 / theta^(2i / head_dim)` for `i < head_dim / 2`.
pub fn unscaled_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
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

    /// The scaling that divides each of `inv_freq` by the matching `factors` (llama.cpp's
    /// `rope_freqs.weight`, the only trace of the scaling its converter writes), or `None` when
    /// every factor is 1.
    ///
    /// The factors fix `factor` (the largest) and, through `x = L / wavelength`, the band edges
    /// `low_freq_factor` and `high_freq_factor` on the x axis, where the smoothing weight
    /// `s = (x − low) / (high − low)` is linear. Only `L / low` and `L / high` are determined,
    /// so `L` is set to 8192 (Meta's, and the converter's default). Two or more smoothed
    /// frequencies give the line; with one or none the edges are placed anywhere consistent
    /// between the neighbouring kept and divided frequencies, which gives the same factors. The
    /// result is checked to reproduce every factor (to 1e-5); factors that Llama 3's rule
    /// cannot give are an error.
    pub fn from_freq_factors(inv_freq: &[f32], factors: &[f32]) -> Result<Option<Self>, String> {
        if factors.len() != inv_freq.len() {
            return Err(format!("{} factors for a head with {} frequencies", factors.len(), inv_freq.len()));
        }
        if let Some(r) = factors.iter().find(|r| !(r.is_finite() && **r >= 1.0 - 1e-6)) {
            return Err(format!("factor {r} is not a finite number ≥ 1 (Llama 3's scaling only divides)"));
        }
        let factor = factors.iter().copied().fold(1.0f32, f32::max);
        if factor <= 1.0 + 1e-6 {
            return Ok(None);
        }
        const L: f64 = 8192.0;
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b;
        // x of each frequency, and the smoothing weight of those strictly between the bands
        let xs: Vec<f64> = inv_freq.iter().map(|&f| L * f as f64 / std::f64::consts::TAU).collect();
        let (mut kept_min, mut divided_max, mut band) = (f64::INFINITY, 0.0f64, vec![]);
        for (&x, &r) in xs.iter().zip(factors) {
            if close(r, 1.0) {
                kept_min = kept_min.min(x);
            } else if close(r, factor) {
                divided_max = divided_max.max(x);
            } else {
                let s = (1.0 / r as f64 - 1.0 / factor as f64) / (1.0 - 1.0 / factor as f64);
                band.push((x, s));
            }
        }
        band.sort_by(|a, b| a.0.total_cmp(&b.0));
        // (low, width) of the band on the x axis
        let (low, width) = match band.as_slice() {
            [] if kept_min.is_finite() => {
                let gap = kept_min - divided_max;
                (divided_max + gap / 3.0, gap / 3.0)
            }
            [] => (2.0 * divided_max, 2.0 * divided_max),
            [(x, s)] => {
                let room = ((x - divided_max) / s).min((kept_min - x) / (1.0 - s));
                let width = if room.is_finite() { room / 2.0 } else { *x };
                (x - s * width, width)
            }
            [(x0, s0), .., (x1, s1)] => {
                let width = (x1 - x0) / (s1 - s0);
                (x0 - s0 * width, width)
            }
        };
        let snap = |v: f64| if (v - v.round()).abs() < 1e-4 * v.abs().max(1.0) { v.round() } else { v };
        let scaling = Llama3Scaling {
            factor,
            low_freq_factor: snap(low) as f32,
            high_freq_factor: snap(low + width) as f32,
            original_max_position_embeddings: L as f32,
        };
        let mut scaled = inv_freq.to_vec();
        scaling.apply(&mut scaled);
        let reproduced =
            scaled.iter().zip(inv_freq).zip(factors).all(|((s, f), r)| (s - f / r).abs() <= 1e-5 * (f / r));
        if !(width > 0.0 && low > 0.0 && reproduced) {
            return Err(format!("the factors {factors:?} do not follow Llama 3's RoPE scaling"));
        }
        Ok(Some(scaling))
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
pub(crate) fn base_and_scaling(c: &LlamaConfig) -> Result<(f64, Option<RopeScaling>), PolicyError> {
    type Params = serde_json::Map<String, serde_json::Value>;
    let scaling = |kind: &str, params: &Params, field: &'static str| match kind {
        "default" => Ok(None),
        "llama3" => Llama3Scaling::from_json(params, field).map(|s| Some(RopeScaling::Llama3(s))),
        "longrope" => LongRope::from_json(params, field, c).map(|s| Some(RopeScaling::LongRope(s))),
        "yarn" => Yarn::from_json(params, field, c).map(|s| Some(RopeScaling::Yarn(s))),
        "linear" => RopeScaling::linear(params, field).map(Some),
        other => Err(PolicyError::config(
            format!("{field}.rope_type"),
            format!("{other:?} is not supported (\"default\", \"linear\", \"llama3\", \"longrope\" and \"yarn\" are)"),
        )),
    };
    // transformers reads `type` where `rope_type` is absent
    let kind_of = |v: &Params| v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()).map(str::to_owned);
    match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) => {
            let kind = if p.rope_type == "default" { kind_of(&p.scaling) } else { None };
            Ok((p.rope_theta, scaling(kind.as_deref().unwrap_or(&p.rope_type), &p.scaling, "rope_parameters")?))
        }
        (None, None | Some(serde_json::Value::Null)) => Ok((c.rope_theta.unwrap_or(10000.0), None)),
        (None, Some(serde_json::Value::Object(v))) => {
            let kind = kind_of(v).unwrap_or_else(|| "default".into());
            Ok((c.rope_theta.unwrap_or(10000.0), scaling(&kind, v, "rope_scaling")?))
        }
        (None, Some(other)) => Err(PolicyError::config("rope_scaling", format!("{other} is not an object"))),
    }
}

/// Rotates one head vector in place: `x·cos + rotate_half(x)·sin` (with partial rotary, pass
/// the turned dimensions only).
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// The transpose of [`apply`] (its inverse too, a rotation, unless LongRoPE's attention factor
/// scales the tables): the gradient of the input from the gradient `dy` of the output, in place.
pub fn apply_transposed(dy: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = dy.len() / 2;
    for i in 0..half {
        let (a, b) = (dy[i], dy[i + half]);
        dy[i] = a * cos[i] + b * sin[i + half];
        dy[i + half] = b * cos[i + half] - a * sin[i];
    }
}

/// [`apply`] (or with `transposed` [`apply_transposed`]) on every head of `x`'s rows `(N, H·Dh)`:
/// row `n` at the angles of row `n` of the `(N, Dh)` [`tables`], over each head's first
/// `rotary` dimensions.
pub fn apply_rows(x: &mut [f32], (cos, sin): (&[f32], &[f32]), dh: usize, rotary: usize, transposed: bool) {
    use rayon::prelude::*;
    let rows = cos.len() / dh;
    let width = x.len() / rows.max(1);
    x.par_chunks_mut(width).enumerate().for_each(|(n, row)| {
        let (c, s) = (&cos[n * dh..n * dh + rotary], &sin[n * dh..n * dh + rotary]);
        for head in row.chunks_mut(dh) {
            match transposed {
                false => apply(&mut head[..rotary], c, s),
                true => apply_transposed(&mut head[..rotary], c, s),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposed rotation undoes the rotation, and is its transpose: `⟨apply(x), y⟩ =
    /// ⟨x, apply_transposed(y)⟩`, for whole and partial heads, and stays the transpose of
    /// scaled tables.
    #[test]
    fn transposed_rotation_is_the_inverse_and_the_adjoint() {
        let dims = Dims { head_dim: 8, rope_theta: 100.0, partial_rotary: Some(4), ..Dims::PLAIN };
        for dims in [dims, Dims { partial_rotary: None, ..dims }] {
            let (cos, sin) = tables(&[0, 3, 7], &dims);
            let x: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
            let y: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.91).cos()).collect();
            let r = dims.rotary_dim();
            let (mut rx, mut ty) = (x.clone(), y.clone());
            apply_rows(&mut rx, (&cos, &sin), 8, r, false);
            apply_rows(&mut ty, (&cos, &sin), 8, r, true);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f32>();
            assert!((dot(&rx, &y) - dot(&x, &ty)).abs() < 1e-5, "adjoint, rotary {r}");
            apply_rows(&mut rx, (&cos, &sin), 8, r, true);
            assert!(rx.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-6), "inverse, rotary {r}");
            // position 0 and the dimensions past `rotary` are left as they are
            let mut first = x[..16].to_vec();
            apply_rows(&mut first, (&cos[..8], &sin[..8]), 8, r, false);
            assert_eq!(first, x[..16]);
            // tables scaled as LongRoPE's attention factor scales them (the turned dimensions
            // only): still the adjoint, which is what the backward pass needs
            let scaled = |t: &[f32]| -> Vec<f32> {
                t.iter().enumerate().map(|(i, v)| if i % 8 < r { v * 1.19 } else { *v }).collect()
            };
            let (cos, sin) = (scaled(&cos), scaled(&sin));
            let (mut rx, mut ty) = (x.clone(), y.clone());
            apply_rows(&mut rx, (&cos, &sin), 8, r, false);
            apply_rows(&mut ty, (&cos, &sin), 8, r, true);
            assert!((dot(&rx, &y) - dot(&x, &ty)).abs() < 1e-5, "scaled adjoint, rotary {r}");
        }
    }

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
    /// as transformers 5's `rope_parameters` do, `type` naming the kind as `rope_type` does;
    /// unknown kinds are refused by name.
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
            Some(RopeScaling::Llama3(Llama3Scaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            }))
        );
        assert_eq!(c.eos_token_ids(), [128001, 128008, 128009]);
        assert!(config("null").unwrap().dims().unwrap().rope_scaling.is_none());
        // linear: every frequency divided by the factor
        let d = config(r#"{"type": "linear", "factor": 4.0}"#).unwrap().dims().unwrap();
        assert_eq!(d.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));
        let plain = unscaled_inv_freq(d.head_dim, d.rope_theta);
        assert!(inv_freq(&d).iter().zip(&plain).all(|(f, p)| *f == p / 4.0));
        // transformers 4's `type` names YaRN too; an unknown kind is refused by name
        let d = config(r#"{"type": "yarn", "factor": 4.0}"#).unwrap().dims().unwrap();
        assert!(matches!(d.rope_scaling, Some(RopeScaling::Yarn(Yarn { factor: 4.0, .. }))));
        let e = config(r#"{"type": "dynamic", "factor": 4.0}"#).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("dynamic"), "{e}");
        let e = config(r#"{"rope_type": "llama3", "factor": 8.0}"#).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    }

    /// llama.cpp's converter: the divisor of each frequency, computed in f64 from the
    /// scaling's four numbers (`convert_hf_to_gguf.py`, `generate_extra_tensors`).
    fn converter_factors(inv_freq: &[f32], factor: f64, low: f64, high: f64, l: f64) -> Vec<f32> {
        let (low_wavelen, high_wavelen) = (l / low, l / high);
        let factor_of = |f: f32| {
            let wavelen = std::f64::consts::TAU / f as f64;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (l / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        };
        inv_freq.iter().map(|&f| factor_of(f) as f32).collect()
    }

    /// Meta's Llama 3.1 numbers come back from the factors alone; tiny heads with one or no
    /// smoothed frequency give a scaling that reproduces the factors; all ones is no scaling.
    #[test]
    fn llama3_scaling_is_recovered_from_the_converter_s_factors() {
        let inv = unscaled_inv_freq(128, 500000.0);
        let got = Llama3Scaling::from_freq_factors(&inv, &converter_factors(&inv, 8.0, 1.0, 4.0, 8192.0)).unwrap();
        let meta = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!(got, Some(meta));
        // a 16-wide head: one smoothed frequency (L = 64), none (L = 20), no divided one (L = 10⁶)
        for (l, factor) in [(64.0, 8.0), (20.0, 8.0), (1.0e6, 32.0), (64.0, 1.5)] {
            let inv = unscaled_inv_freq(16, 500000.0);
            let factors = converter_factors(&inv, factor, 1.0, 4.0, l);
            let s = Llama3Scaling::from_freq_factors(&inv, &factors).unwrap().unwrap();
            let mut scaled = inv.clone();
            s.apply(&mut scaled);
            for ((a, f), r) in scaled.iter().zip(&inv).zip(&factors) {
                assert!((a - f / r).abs() <= 1e-6 * (f / r), "L {l}: {a} vs {}", f / r);
            }
        }
        assert_eq!(Llama3Scaling::from_freq_factors(&inv, &[1.0; 64]).unwrap(), None);
        for bad in [vec![1.0; 63], vec![0.5; 64], [vec![2.0; 32], vec![1.0; 32]].concat()] {
            assert!(Llama3Scaling::from_freq_factors(&inv, &bad).is_err(), "{bad:?}");
        }
    }
}
