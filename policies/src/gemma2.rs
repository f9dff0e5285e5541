//! Gemma 2 (`model_type: "gemma2"`, transformers' `Gemma2Config`: gemma-2-2b, -9b and -27b and
//! their `-it` versions, `Gemma2ForCausalLM`).
//!
//! Gemma 2 is Gemma 3's network ([`crate::gemma3`]: the `√d` embedding scale, `1 + w` RMSNorm
//! gains, four norms per block, the tanh-GELU gated MLP, `query_pre_attn_scalar`) without the
//! q/k head norms, with one RoPE base for every layer, local and global layers alternating
//! (layer 0 local, `sliding_window` 4096), and tanh soft caps ([`crate::softcap`]) on the
//! attention scores (`attn_logit_softcapping`, 50) and on the logits
//! (`final_logit_softcapping`, 30): [`Dims::attn_softcap`], [`Dims::final_softcap`].
//!
//! Both config layouts load: transformers 4's `rope_theta` and transformers 5's
//! `rope_parameters`; without `layer_types` the layers alternate as transformers has them.
//! Every default is transformers'. A cap of `null` turns that cap off, as in transformers.

use serde::{Deserialize, Serialize};

use crate::config::{Dims, TokenIds};
use crate::error::PolicyError;
use crate::gemma3::{full_scaling, periodic_sliding, windows_of, GemmaSizes};
use crate::rope::RopeScaling;

/// `Gemma2Config` fields (transformers names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma2Config {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// Gated MLP width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads. Defaults to `4`.
    #[serde(default = "crate::gemma3::default_kv_heads")]
    pub num_key_value_heads: usize,
    /// Per-head width. Defaults to `256`.
    #[serde(default = "crate::gemma3::default_head_dim")]
    pub head_dim: usize,
    /// The MLP gate's activation: the tanh GELU (`gelu_pytorch_tanh`, the default, or
    /// `gelu_new`).
    #[serde(default = "crate::gemma3::default_activation")]
    pub hidden_activation: String,
    /// Maximum sequence length. Defaults to `8192`.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon. Defaults to `1e-6`.
    #[serde(default = "crate::gemma3::default_eps")]
    pub rms_norm_eps: f64,
    /// The RoPE base (transformers 4). Defaults to `10000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE (transformers 5): `{"rope_type": "default" or "linear", "rope_theta": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// RoPE scaling (transformers 4): `null`, or `linear`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// The attention scores are scaled by its inverse square root. Defaults to `256`.
    #[serde(default = "crate::gemma3::default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: usize,
    /// How many positions a sliding layer's query sees, itself included. Defaults to `4096`.
    #[serde(default = "crate::gemma3::default_window")]
    pub sliding_window: Option<usize>,
    /// `"sliding_attention"` or `"full_attention"` per layer; without it, even layers slide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// The logits' soft cap `c` (`c·tanh(z/c)`). Defaults to `30`; `null`: none.
    #[serde(default = "default_final_cap")]
    pub final_logit_softcapping: Option<f64>,
    /// The attention scores' soft cap. Defaults to `50`; `null`: none.
    #[serde(default = "default_attn_cap")]
    pub attn_logit_softcapping: Option<f64>,
    /// Bidirectional attention. Must be `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
    /// Biases on q/k/v/o. Must be `false`.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the LM head shares the embedding. Defaults to `true`.
    #[serde(default = "crate::config::default_true")]
    pub tie_word_embeddings: bool,
    /// Std of the normal init. Defaults to `0.02`.
    #[serde(default = "crate::config::default_init")]
    pub initializer_range: f64,
    /// Beginning-of-sequence id. Defaults to `2`.
    #[serde(default = "crate::gemma3::default_bos")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id or ids. Defaults to `1`.
    #[serde(default = "crate::gemma3::default_eos")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id. Defaults to `0`.
    #[serde(default = "crate::gemma3::default_pad")]
    pub pad_token_id: Option<u32>,
    /// Class names transformers uses to pick the model class when loading.
    #[serde(default = "architectures")]
    pub architectures: Vec<String>,
}

fn default_max_pos() -> usize {
    8192
}
fn default_final_cap() -> Option<f64> {
    Some(30.0)
}
fn default_attn_cap() -> Option<f64> {
    Some(50.0)
}
fn architectures() -> Vec<String> {
    vec!["Gemma2ForCausalLM".into()]
}

/// transformers' RoPE base when a config names none.
const DEFAULT_THETA: f64 = 10_000.0;

impl Gemma2Config {
    /// Each layer's attention window: `Some(sliding_window)` for a sliding layer, `None` for a
    /// full one.
    pub fn layer_windows(&self) -> Result<Vec<Option<usize>>, PolicyError> {
        let n = self.num_hidden_layers;
        windows_of(self.layer_types.as_deref(), n, || Ok(periodic_sliding(n, 2)), self.sliding_window)
    }

    /// The RoPE base and scaling, from either layout.
    fn rope(&self) -> Result<(f64, Option<RopeScaling>), PolicyError> {
        let (params, field) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => (p, "rope_parameters"),
            (None, Some(s)) if !s.is_null() => (s, "rope_scaling"),
            _ => return Ok((self.rope_theta.unwrap_or(DEFAULT_THETA), None)),
        };
        let Some(obj) = params.as_object() else {
            return Err(PolicyError::config(field, format!("{params} is not an object")));
        };
        let theta = match (field, obj.get("rope_theta")) {
            ("rope_parameters", Some(t)) => t.as_f64().filter(|t| *t > 0.0).ok_or_else(|| {
                PolicyError::config("rope_parameters.rope_theta", format!("{t} is not a positive number"))
            })?,
            _ => self.rope_theta.unwrap_or(DEFAULT_THETA),
        };
        Ok((theta, full_scaling(obj, field)?))
    }

    /// The resolved sizes; the error names the offending field.
    pub(crate) fn dims(&self) -> Result<Dims, PolicyError> {
        let cap = |field: &str, c: Option<f64>| match c {
            Some(c) if !(c > 0.0 && c.is_finite()) => {
                Err(PolicyError::config(field, format!("{c} must be a positive number (or null for none)")))
            }
            c => Ok(c.map(|c| c as f32)),
        };
        let attn_softcap = cap("attn_logit_softcapping", self.attn_logit_softcapping)?;
        let final_softcap = cap("final_logit_softcapping", self.final_logit_softcapping)?;
        let (theta, rope_scaling) = self.rope()?;
        let windows = self.layer_windows()?;
        let sizes = GemmaSizes {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            hidden_activation: &self.hidden_activation,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            query_pre_attn_scalar: self.query_pre_attn_scalar,
            use_bidirectional_attention: self.use_bidirectional_attention,
            attention_bias: self.attention_bias,
            tie_word_embeddings: self.tie_word_embeddings,
            initializer_range: self.initializer_range,
        };
        Ok(Dims {
            sliding_window: windows.iter().flatten().next().copied(),
            attn_softcap,
            final_softcap,
            ..sizes.dims(theta, rope_scaling)?
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// gemma-2-2b-it's `config.json` (transformers 4.42 wrote it: `rope_theta`, no
    /// `layer_types`, `cache_implementation`).
    const GEMMA2_2B_IT: &str = r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "transformers_version": "4.42.4", "use_cache": true, "vocab_size": 256000}"#;

    #[test]
    fn reads_gemma2_2b_it_config() {
        let cfg = ModelConfig::from_json_str(GEMMA2_2B_IT).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.vocab, d.d_model, d.n_layer, d.n_head, d.n_kv_head, d.head_dim), (256000, 2304, 26, 8, 4, 256));
        assert_eq!((d.rope_theta, d.rope_local_theta, d.rope_scaling, d.sliding_window), (1e4, None, None, Some(4096)));
        assert_eq!((d.attn_softcap, d.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!((d.query_scale, d.embed_scale), (1.0, 2304f32.sqrt()));
        assert!(d.tied && !d.qk_norm && d.post_norms && d.norm_unit_offset);
        // layer 0 slides, layer 1 sees everything, and so on
        let windows = cfg.layer_windows().unwrap();
        assert!(windows.iter().enumerate().all(|(i, w)| *w == (i % 2 == 0).then_some(4096)));
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids(), cfg.pad_token_id()), (Some(2), vec![1, 107], Some(0)));
        // what we save reads back the same
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
    }

    /// Absent caps take transformers' defaults; `null` turns one off; transformers 5's
    /// `rope_parameters` and `layer_types` are read.
    #[test]
    fn defaults_nulls_and_the_transformers_5_layout() {
        let without = GEMMA2_2B_IT
            .replace(r#""attn_logit_softcapping": 50.0,"#, "")
            .replace(r#""final_logit_softcapping": 30.0,"#, "");
        let d = ModelConfig::from_json_str(&without).unwrap().dims().unwrap();
        assert_eq!((d.attn_softcap, d.final_softcap), (Some(50.0), Some(30.0)));
        let off = GEMMA2_2B_IT.replace(r#""final_logit_softcapping": 30.0"#, r#""final_logit_softcapping": null"#);
        let cfg = ModelConfig::from_json_str(&off).unwrap();
        assert_eq!(cfg.dims().unwrap().final_softcap, None);
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg, "null is saved, not dropped");
        let tf5 = GEMMA2_2B_IT
            .replace(
                r#""rope_theta": 10000.0"#,
                r#""rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}"#,
            )
            .replace(
                r#""num_hidden_layers": 26"#,
                r#""num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]"#,
            );
        let cfg = ModelConfig::from_json_str(&tf5).unwrap();
        assert_eq!(cfg.dims().unwrap().rope_theta, 2e4);
        assert_eq!(cfg.layer_windows().unwrap(), [None, Some(4096)]);
    }

    #[test]
    fn refuses_what_it_does_not_run() {
        for (from, to, field) in [
            (r#""final_logit_softcapping": 30.0"#, r#""final_logit_softcapping": -1.0"#, "final_logit_softcapping"),
            (r#""attn_logit_softcapping": 50.0"#, r#""attn_logit_softcapping": 0.0"#, "attn_logit_softcapping"),
            (r#""rope_theta": 10000.0"#, r#""rope_scaling": {"rope_type": "yarn", "factor": 8.0}"#, "rope_scaling"),
            (r#""hidden_activation": "gelu_pytorch_tanh""#, r#""hidden_activation": "silu""#, "hidden_activation"),
            (r#""sliding_window": 4096"#, r#""sliding_window": null"#, "sliding_window"),
            (r#""attention_bias": false"#, r#""attention_bias": true"#, "attention_bias"),
            (r#""num_key_value_heads": 4"#, r#""num_key_value_heads": 3"#, "num_key_value_heads"),
        ] {
            let err = ModelConfig::from_json_str(&GEMMA2_2B_IT.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
