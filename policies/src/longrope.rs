//! LongRoPE (Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million
//! Tokens"; transformers' `_compute_longrope_parameters`), the RoPE scaling of Phi-3's 128k
//! models, Phi-3.5 and Phi-4-mini, within the context the model was pretrained on.

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;

/// The most frequencies a [`LongRope`] holds: a 256-wide head's (kept inline so that
/// [`Dims`] stays `Copy`).
pub const MAX_FREQUENCIES: usize = 128;

/// LongRoPE within the pretrained context `L = original_max_position_embeddings`: frequency
/// `i` of a head turning `r` dimensions is `1 / (short_factor[i] · theta^(2i / r))`, and cos
/// and sin are multiplied by [`LongRope::attention_factor`] (each attention logit by its
/// square).
///
/// Past `L`, transformers switches every frequency to `long_factor` for any forward whose
/// positions reach beyond `L` — a decode step too, whose earlier keys stay cached at the short
/// frequencies, so a rollout and the training forward over the same sequence would see
/// different rotations (and PPO's first ratio would not be 1). rlhf stops at `L` instead
/// ([`Dims::position_limit`]): the long factors are checked but not used.
#[derive(Clone, Copy)]
pub struct LongRope {
    short_factor: [f32; MAX_FREQUENCIES],
    len: usize,
    /// The config's `attention_factor`, or by default `√(1 + ln s / ln L)` with
    /// `s = factor` (`max_position_embeddings / L` when unset), 1 when `s ≤ 1`.
    pub attention_factor: f32,
    /// `L`: the top-level `original_max_position_embeddings` (Phi-3's, 4096 when absent), else
    /// the scaling's own, else `max_position_embeddings`.
    pub original_max_position_embeddings: usize,
    /// Where the config keeps it (`rope_parameters` or `rope_scaling`), for errors.
    pub(crate) field: &'static str,
}

/// Equal scalings: the same factors, attention factor and context, wherever the config kept them.
impl PartialEq for LongRope {
    fn eq(&self, other: &Self) -> bool {
        (self.short_factor(), self.attention_factor, self.original_max_position_embeddings)
            == (other.short_factor(), other.attention_factor, other.original_max_position_embeddings)
    }
}

impl std::fmt::Debug for LongRope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongRope")
            .field("short_factor", &self.short_factor())
            .field("attention_factor", &self.attention_factor)
            .field("original_max_position_embeddings", &self.original_max_position_embeddings)
            .finish()
    }
}

/// A scaling's optional positive number `key` (`null` as absent); an error names `field.key`.
pub(crate) fn positive(
    params: &serde_json::Map<String, serde_json::Value>,
    field: &str,
    key: &str,
) -> Result<Option<f64>, PolicyError> {
    match params.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(PolicyError::config(format!("{field}.{key}"), format!("{v} is not a positive number"))),
        },
    }
}

/// The context a scaled RoPE was pretrained on, as transformers resolves it: the config's
/// top-level `original_max_position_embeddings` (Phi-3 keeps it there), else the scaling's,
/// else `max_position_embeddings`.
pub(crate) fn original_context(
    params: &serde_json::Map<String, serde_json::Value>,
    field: &str,
    c: &LlamaConfig,
) -> Result<usize, PolicyError> {
    let in_params = positive(params, field, "original_max_position_embeddings")?.map(|x| x as usize);
    match c.original_max_position_embeddings.or(in_params).unwrap_or(c.max_position_embeddings) {
        0 => Err(PolicyError::config(format!("{field}.original_max_position_embeddings"), "must be > 0".into())),
        n => Ok(n),
    }
}

impl LongRope {
    /// Reads the scaling object `params` (named `field` in errors) of config `c`.
    pub(crate) fn from_json(
        params: &serde_json::Map<String, serde_json::Value>,
        field: &'static str,
        c: &LlamaConfig,
    ) -> Result<Self, PolicyError> {
        let err = |key: &str, msg: String| PolicyError::config(format!("{field}.{key}"), msg);
        let factors = |key: &str| -> Result<Vec<f32>, PolicyError> {
            let list = params.get(key).and_then(|v| v.as_array()).ok_or_else(|| {
                err(key, "rope_type longrope needs it as a list of numbers, one per RoPE frequency".into())
            })?;
            list.iter()
                .map(|v| v.as_f64().filter(|x| x.is_finite() && *x > 0.0).map(|x| x as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| err(key, "every factor must be a positive number".into()))
        };
        let (short, long) = (factors("short_factor")?, factors("long_factor")?);
        if short.len() != long.len() || short.len() > MAX_FREQUENCIES {
            let msg = format!("{} short and {} long factors (at most {MAX_FREQUENCIES} each)", short.len(), long.len());
            return Err(err("long_factor", msg));
        }
        let number = |key: &str| positive(params, field, key);
        let original = original_context(params, field, c)?;
        let factor = number("factor")?.unwrap_or(c.max_position_embeddings as f64 / original as f64);
        let attention_factor = match number("attention_factor")? {
            Some(a) => a,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
        };
        let mut short_factor = [1.0; MAX_FREQUENCIES];
        short_factor[..short.len()].copy_from_slice(&short);
        Ok(LongRope {
            short_factor,
            len: short.len(),
            attention_factor: attention_factor as f32,
            original_max_position_embeddings: original,
            field,
        })
    }

    /// The factor dividing each frequency.
    pub fn short_factor(&self) -> &[f32] {
        &self.short_factor[..self.len]
    }

    /// The frequencies of a head turning `rotary` dimensions, in f32 as transformers computes
    /// them: `1 / (short_factor[i] · theta^(2i / rotary))`.
    pub fn inv_freq(&self, rotary: usize, theta: f32) -> Vec<f32> {
        let exponent = |i: usize| (2 * i) as f32 / rotary as f32;
        self.short_factor().iter().enumerate().map(|(i, f)| 1.0 / (f * theta.powf(exponent(i)))).collect()
    }

    /// Checks that there is one factor per frequency of `dims`' heads.
    pub(crate) fn check(&self, dims: &Dims) -> Result<(), PolicyError> {
        let want = dims.rotary_dim() / 2;
        if self.len != want {
            let msg = format!("{} factors for a head with {want} RoPE frequencies", self.len);
            return Err(PolicyError::config(format!("{}.short_factor", self.field), msg));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;
    use crate::rope::RopeScaling;

    /// A Phi-3.5-mini-shaped config (transformers 4 layout) with `scaling` as its
    /// `rope_scaling`: 3072 wide, 32 heads of 96, so 48 frequencies.
    fn phi35(scaling: &str) -> String {
        format!(
            r#"{{"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 262144,
                "rope_scaling": {scaling}}}"#
        )
    }

    fn list(n: usize, f: impl Fn(usize) -> f64) -> String {
        format!("[{}]", (0..n).map(|i| format!("{:?}", f(i))).collect::<Vec<_>>().join(", "))
    }

    /// Phi-3.5-mini's numbers: the attention factor `√(1 + ln 32 / ln 4096)` = 1.1902, the
    /// short factors dividing the frequencies, the context stopping at 4096.
    #[test]
    fn phi35_reads_with_the_default_attention_factor() {
        let short = |i: usize| 1.0 + i as f64 / 16.0;
        let text = phi35(&format!(
            r#"{{"type": "longrope", "short_factor": {}, "long_factor": {}}}"#,
            list(48, short),
            list(48, |i| 2.0 + i as f64)
        ));
        let d = ModelConfig::from_json_str(&text).unwrap().dims().unwrap();
        let Some(RopeScaling::LongRope(l)) = d.rope_scaling else { panic!("{:?}", d.rope_scaling) };
        let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt() as f32;
        assert_eq!((l.attention_factor, l.original_max_position_embeddings), (want, 4096));
        assert!((want - 1.1902).abs() < 1e-4);
        assert_eq!(crate::rope::attention_factor(&d), want);
        assert_eq!(d.position_limit(), Some(4096));
        let plain = crate::rope::unscaled_inv_freq(96, 10000.0);
        for (i, (f, p)) in crate::rope::inv_freq(&d).iter().zip(&plain).enumerate() {
            assert!((f * short(i) as f32 - p).abs() <= 1e-6 * p, "frequency {i}: {f} vs {p}");
        }
        // a given attention_factor and factor win; no stretch gives 1
        // the early 128k configs' name for it, read as transformers' Phi3Config reads it
        let su = ModelConfig::from_json_str(&text.replace(r#""type": "longrope""#, r#""type": "su""#)).unwrap();
        assert_eq!(su.dims().unwrap(), d);
        let explicit = text.replace(r#""type": "longrope","#, r#""type": "longrope", "attention_factor": 1.5,"#);
        let d = ModelConfig::from_json_str(&explicit).unwrap().dims().unwrap();
        assert_eq!(crate::rope::attention_factor(&d), 1.5);
        let unstretched = text.replace(r#""type": "longrope","#, r#""type": "longrope", "factor": 1.0,"#);
        let d = ModelConfig::from_json_str(&unstretched).unwrap().dims().unwrap();
        assert_eq!(crate::rope::attention_factor(&d), 1.0);
    }

    /// Missing, mis-sized and non-positive factors are errors naming the field.
    #[test]
    fn bad_factors_are_refused_by_name() {
        let ok = |i: usize| 1.0 + i as f64;
        for (scaling, field) in [
            (format!(r#"{{"type": "longrope", "short_factor": {}}}"#, list(48, ok)), "rope_scaling.long_factor"),
            (
                format!(r#"{{"type": "longrope", "short_factor": {}, "long_factor": {}}}"#, list(47, ok), list(47, ok)),
                "rope_scaling.short_factor",
            ),
            (
                format!(r#"{{"type": "longrope", "short_factor": {}, "long_factor": {}}}"#, list(48, ok), list(40, ok)),
                "rope_scaling.long_factor",
            ),
            (
                format!(
                    r#"{{"type": "longrope", "short_factor": {}, "long_factor": {}}}"#,
                    list(48, |i| i as f64),
                    list(48, ok)
                ),
                "rope_scaling.short_factor",
            ),
        ] {
            let e = ModelConfig::from_json_str(&phi35(&scaling)).and_then(|c| c.dims()).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
