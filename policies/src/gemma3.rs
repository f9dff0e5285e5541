//! Gemma 3's text config (`model_type: "gemma3_text"`, transformers' `Gemma3TextConfig`: the
//! gemma-3-270m and gemma-3-1b checkpoints, `Gemma3ForCausalLM`).
//!
//! Gemma 3 is the Llama layout with six changes, each a field of [`Dims`]: the token embedding
//! is multiplied by `√hidden_size` ([`Dims::embed_scale`]); every RMSNorm's gain is `1 + w`
//! with `w` the stored weight ([`Dims::norm_unit_offset`]); each block has four norms, a second
//! one on each branch's output before the residual add ([`Dims::post_norms`]); each head's
//! queries and keys pass an RMSNorm (as Qwen3's); the gated MLP uses the tanh GELU
//! ([`Glu::GeluTanh`]); attention scores are scaled by `query_pre_attn_scalar^-½` instead of
//! `head_dim^-½` ([`Dims::query_scale`]). And most layers are local (`layer_types`): they
//! attend to the last `sliding_window` positions only, with their own RoPE base
//! ([`Dims::sliding_window`], [`Dims::rope_local_theta`]); the rest attend to everything.
//!
//! Both config layouts load: transformers 5's `rope_parameters` with one entry per layer type,
//! and transformers 4's `rope_theta` / `rope_local_base_freq` with `sliding_window_pattern`
//! where `layer_types` is absent. Every default is transformers'.

use serde::{Deserialize, Serialize};

use crate::config::{Dims, Family, GeluKind, Glu, TokenIds};
use crate::error::PolicyError;
use crate::rope::RopeScaling;

/// `Gemma3TextConfig` fields (transformers names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma3Config {
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
    #[serde(default = "default_kv_heads")]
    pub num_key_value_heads: usize,
    /// Per-head width. Defaults to `256`.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// The MLP gate's activation: the tanh GELU (`gelu_pytorch_tanh`, the default, or
    /// `gelu_new`).
    #[serde(default = "default_activation")]
    pub hidden_activation: String,
    /// Maximum sequence length. Defaults to `131072`.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon. Defaults to `1e-6`.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE per layer type (transformers 5): `{"full_attention": {"rope_type": "default",
    /// "rope_theta": …}, "sliding_attention": {…}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// The full-attention layers' RoPE base (transformers 4). Defaults to `1e6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// The sliding layers' RoPE base (transformers 4). Defaults to `1e4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// RoPE scaling (transformers 4). Must be `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// The attention scores are scaled by its inverse square root. Defaults to `256`.
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: usize,
    /// How many positions a sliding layer's query sees, itself included. Defaults to `4096`.
    #[serde(default = "default_window")]
    pub sliding_window: Option<usize>,
    /// `"sliding_attention"` or `"full_attention"` per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Without `layer_types`, every `n`-th layer is full, the rest sliding. Defaults to `6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// The same, as transformers 5 writes it.
    #[serde(default, rename = "_sliding_window_pattern", skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern_: Option<usize>,
    /// Gemma 2's tanh capping of the logits. Must be `null` (as every Gemma 3 config has it).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2's tanh capping of the attention scores. Must be `null`.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// EmbeddingGemma's bidirectional attention. Must be `false`.
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
    #[serde(default = "default_bos")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id or ids. Defaults to `1`.
    #[serde(default = "default_eos")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id. Defaults to `0`.
    #[serde(default = "default_pad")]
    pub pad_token_id: Option<u32>,
    /// Class names transformers uses to pick the model class when loading.
    #[serde(default = "architectures")]
    pub architectures: Vec<String>,
}

// transformers' defaults, Gemma 2's as well (`crate::gemma2` reads them from here)
pub(crate) fn default_kv_heads() -> usize {
    4
}
pub(crate) fn default_head_dim() -> usize {
    256
}
pub(crate) fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_max_pos() -> usize {
    131_072
}
pub(crate) fn default_eps() -> f64 {
    1e-6
}
pub(crate) fn default_query_pre_attn_scalar() -> usize {
    256
}
pub(crate) fn default_window() -> Option<usize> {
    Some(4096)
}
pub(crate) fn default_bos() -> Option<u32> {
    Some(2)
}
pub(crate) fn default_eos() -> Option<TokenIds> {
    Some(TokenIds::One(1))
}
pub(crate) fn default_pad() -> Option<u32> {
    Some(0)
}
fn architectures() -> Vec<String> {
    vec!["Gemma3ForCausalLM".into()]
}

/// `n` layers in periods of `pattern` (> 0): `pattern − 1` sliding layers, then a full one
/// (transformers' `sliding_window_pattern`, llama.cpp's default for Gemma 3 files).
pub(crate) fn periodic_sliding(n: usize, pattern: usize) -> Vec<bool> {
    (0..n).map(|i| (i + 1) % pattern != 0).collect()
}

/// transformers' RoPE bases when a config names none: full layers, sliding layers.
const DEFAULT_THETAS: (f64, f64) = (1_000_000.0, 10_000.0);

/// Each layer's attention window from a Gemma config's `layer_types` (`"sliding_attention"` or
/// `"full_attention"` per layer) or, without them, the `periodic` sliding flags; `window` is
/// `sliding_window`.
pub(crate) fn windows_of(
    layer_types: Option<&[String]>,
    n: usize,
    periodic: impl FnOnce() -> Result<Vec<bool>, PolicyError>,
    window: Option<usize>,
) -> Result<Vec<Option<usize>>, PolicyError> {
    let sliding: Vec<bool> = match layer_types {
        Some(types) => {
            if types.len() != n {
                let msg = format!("{} entries for {n} layers", types.len());
                return Err(PolicyError::config("layer_types", msg));
            }
            let kind = |(i, t): (usize, &String)| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(PolicyError::config(
                    format!("layer_types[{i}]"),
                    format!("{other:?} (\"sliding_attention\" or \"full_attention\")"),
                )),
            };
            types.iter().enumerate().map(kind).collect::<Result<_, _>>()?
        }
        None => periodic()?,
    };
    match (window, sliding.contains(&true)) {
        (Some(0), true) => Err(PolicyError::config("sliding_window", "must be > 0".into())),
        (None, true) => Err(PolicyError::config("sliding_window", "null, but some layers are sliding".into())),
        (w, _) => Ok(sliding.into_iter().map(|s| if s { w } else { None }).collect()),
    }
}

/// The fields Gemma 2's and Gemma 3's configs share, under transformers' names.
pub(crate) struct GemmaSizes<'a> {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_activation: &'a str,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: usize,
    pub use_bidirectional_attention: Option<bool>,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
}

impl GemmaSizes<'_> {
    /// The [`Dims`] both generations share (no q/k norms, no sliding window, one RoPE base,
    /// which the callers set); the error names the offending field.
    pub(crate) fn dims(&self, rope_theta: f64, rope_scaling: Option<RopeScaling>) -> Result<Dims, PolicyError> {
        if !matches!(self.hidden_activation, "gelu_pytorch_tanh" | "gelu_new") {
            let msg = format!("{:?} is not supported (gelu_pytorch_tanh)", self.hidden_activation);
            return Err(PolicyError::config("hidden_activation", msg));
        }
        for (field, set) in [
            ("use_bidirectional_attention", self.use_bidirectional_attention == Some(true)),
            ("attention_bias", self.attention_bias),
        ] {
            if set {
                return Err(PolicyError::config(field, "is not supported (Gemma's causal LMs leave it off)".into()));
            }
        }
        let (n_head, n_kv, head_dim) = (self.num_attention_heads, self.num_key_value_heads, self.head_dim);
        if n_head == 0 || n_kv == 0 || !n_head.is_multiple_of(n_kv) {
            let msg = format!("num_attention_heads {n_head} must be a positive multiple of num_key_value_heads {n_kv}");
            return Err(PolicyError::config("num_key_value_heads", msg));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(PolicyError::config("head_dim", format!("{head_dim} must be even and > 0 for RoPE")));
        }
        if self.query_pre_attn_scalar == 0 {
            return Err(PolicyError::config("query_pre_attn_scalar", "must be > 0".into()));
        }
        Ok(Dims {
            family: Family::Llama,
            vocab: self.vocab_size,
            d_model: self.hidden_size,
            n_layer: self.num_hidden_layers,
            n_head,
            n_kv_head: n_kv,
            head_dim,
            d_ff: self.intermediate_size,
            max_positions: self.max_position_embeddings,
            norm_eps: self.rms_norm_eps as f32,
            rope_theta: rope_theta as f32,
            rope_scaling,
            tied: self.tie_word_embeddings,
            init_std: self.initializer_range as f32,
            gelu: GeluKind::Tanh,
            // transformers: `torch.tensor(hidden_size ** 0.5)`, the f32 nearest √d, as here
            embed_scale: (self.hidden_size as f32).sqrt(),
            norm_unit_offset: true,
            post_norms: true,
            glu: Glu::GeluTanh,
            query_scale: (head_dim as f64 / self.query_pre_attn_scalar as f64).sqrt() as f32,
            ..Dims::PLAIN
        })
    }
}

impl Gemma3Config {
    /// Each layer's attention window: `Some(sliding_window)` for a sliding layer, `None` for a
    /// full one.
    pub fn layer_windows(&self) -> Result<Vec<Option<usize>>, PolicyError> {
        let n = self.num_hidden_layers;
        let periodic = || {
            let pattern = self.sliding_window_pattern.or(self.sliding_window_pattern_).unwrap_or(6);
            if pattern == 0 {
                return Err(PolicyError::config("sliding_window_pattern", "must be > 0".into()));
            }
            Ok(periodic_sliding(n, pattern))
        };
        windows_of(self.layer_types.as_deref(), n, periodic, self.sliding_window)
    }

    /// The RoPE bases of the full and the sliding layers, from either layout, and the full
    /// layers' linear scaling (gemma-3-4b and up; transformers scales those layers only).
    fn rope_bases(&self) -> Result<(f64, Option<RopeScaling>, f64), PolicyError> {
        let Some(params) = &self.rope_parameters else {
            let scaling = match &self.rope_scaling {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Object(s)) => full_scaling(s, "rope_scaling")?,
                Some(other) => return Err(PolicyError::config("rope_scaling", format!("{other} is not an object"))),
            };
            let (full, local) = DEFAULT_THETAS;
            return Ok((self.rope_theta.unwrap_or(full), scaling, self.rope_local_base_freq.unwrap_or(local)));
        };
        let obj = params.as_object().filter(|o| o.keys().all(|k| k == "full_attention" || k == "sliding_attention"));
        let Some(obj) = obj else {
            let msg = format!("{params}: expected an object of \"full_attention\" and \"sliding_attention\" entries");
            return Err(PolicyError::config("rope_parameters", msg));
        };
        let base = |kind: &str, default: f64| -> Result<(f64, Option<RopeScaling>), PolicyError> {
            let Some(entry) = obj.get(kind).and_then(|e| e.as_object()) else { return Ok((default, None)) };
            let field = format!("rope_parameters.{kind}");
            let scaling = match kind {
                "full_attention" => full_scaling(entry, &field)?,
                _ => match entry.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default") {
                    "default" => None,
                    other => {
                        let msg = format!("{other:?} is not supported for Gemma 3's sliding layers (only \"default\")");
                        return Err(PolicyError::config(format!("{field}.rope_type"), msg));
                    }
                },
            };
            let theta = match entry.get("rope_theta") {
                None => default,
                Some(t) => t.as_f64().filter(|t| *t > 0.0).ok_or_else(|| {
                    PolicyError::config(format!("{field}.rope_theta"), format!("{t} is not a positive number"))
                })?,
            };
            Ok((theta, scaling))
        };
        let ((full, scaling), (local, _)) =
            (base("full_attention", DEFAULT_THETAS.0)?, base("sliding_attention", DEFAULT_THETAS.1)?);
        Ok((full, scaling, local))
    }

    /// The resolved sizes; the error names the offending field.
    pub(crate) fn dims(&self) -> Result<Dims, PolicyError> {
        for (field, set) in [
            ("final_logit_softcapping", self.final_logit_softcapping.is_some()),
            ("attn_logit_softcapping", self.attn_logit_softcapping.is_some()),
        ] {
            if set {
                return Err(PolicyError::config(field, "is not supported (Gemma 3's configs leave it off)".into()));
            }
        }
        let (theta, rope_scaling, local_theta) = self.rope_bases()?;
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
            qk_norm: true,
            sliding_window: windows.iter().flatten().next().copied(),
            rope_local_theta: Some(local_theta as f32),
            ..sizes.dims(theta, rope_scaling)?
        })
    }
}

/// The full layers' RoPE scaling from a config object (named `field` in errors): none for
/// `"default"`, a stretch for `"linear"`; other kinds are errors.
pub(crate) fn full_scaling(
    params: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<RopeScaling>, PolicyError> {
    match params.get("rope_type").or(params.get("type")).and_then(|t| t.as_str()).unwrap_or("default") {
        "default" => Ok(None),
        "linear" => RopeScaling::linear(params, field).map(Some),
        other => {
            let msg = format!("{other:?} is not supported for Gemma (\"default\" and \"linear\" are)");
            Err(PolicyError::config(format!("{field}.rope_type"), msg))
        }
    }
}

/// transformers' `Gemma3TextConfig` sizes, for a multimodal config's `text_config` that leaves
/// them out (gemma-3-4b's lists only what differs).
const TEXT_DEFAULTS: [(&str, usize); 5] = [
    ("vocab_size", 262_208),
    ("hidden_size", 2304),
    ("intermediate_size", 9216),
    ("num_hidden_layers", 26),
    ("num_attention_heads", 8),
];

/// The text model of a `Gemma3ForConditionalGeneration` config (`model_type: "gemma3"`:
/// gemma-3-4b, -12b, -27b), as the `gemma3_text` config of a `Gemma3ForCausalLM`: its
/// `text_config`, with transformers' sizes where it leaves them out and the multimodal config's
/// special ids (gemma-3-4b-it's EOS list names `<end_of_turn>`) and initialisation. rlhf
/// trains the text model: the checkpoint's vision tower and projector are not loaded
/// (`hf_names::normalise_names`), and a saved checkpoint is the text model alone.
pub(crate) fn text_of_multimodal(config: &serde_json::Value) -> Result<serde_json::Value, PolicyError> {
    let Some(mut text) = config.get("text_config").and_then(|t| t.as_object()).cloned() else {
        return Err(PolicyError::config("text_config", "a gemma3 (multimodal) config needs it as an object".into()));
    };
    for (key, value) in TEXT_DEFAULTS {
        text.entry(key).or_insert(value.into());
    }
    for key in ["bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "tie_word_embeddings"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            text.insert(key.into(), v.clone());
        }
    }
    text.insert("model_type".into(), "gemma3_text".into());
    text.insert("architectures".into(), serde_json::json!(["Gemma3ForCausalLM"]));
    Ok(serde_json::Value::Object(text))
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// gemma-3-270m's `config.json` as transformers 4.55 wrote it (the transformers 4 layout:
    /// `rope_theta` and `rope_local_base_freq`, `layer_types` listed).
    const GEMMA3_270M: &str = r#"{"_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2,
        "eos_token_id": 1, "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": null, "rope_theta": 1000000.0,
        "sliding_window": 512, "torch_dtype": "bfloat16", "use_bidirectional_attention": false, "use_cache": true,
        "vocab_size": 262144}"#;

    #[test]
    fn reads_gemma3_270m_config() {
        let cfg = ModelConfig::from_json_str(GEMMA3_270M).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.d_model, d.n_head, d.n_kv_head, d.head_dim, d.d_ff), (640, 4, 1, 256, 2048));
        assert_eq!((d.rope_theta, d.rope_local_theta, d.sliding_window), (1e6, Some(1e4), Some(512)));
        assert_eq!((d.query_scale, d.embed_scale), (1.0, 640f32.sqrt()));
        assert!(d.tied && d.qk_norm && d.post_norms && d.norm_unit_offset);
        let windows = cfg.layer_windows().unwrap();
        assert_eq!(windows.iter().filter(|w| w.is_none()).count(), 3);
        assert_eq!(windows[5], None);
        assert_eq!(windows[4], Some(512));
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids(), cfg.pad_token_id()), (Some(2), vec![1], Some(0)));
        // what we save reads back the same
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
    }

    /// Without `layer_types`, every sixth layer is full (transformers' `sliding_window_pattern`).
    #[test]
    fn pattern_gives_the_layer_types() {
        let text = GEMMA3_270M.replace(r#""layer_types""#, r#""unused_layer_types""#);
        let cfg = ModelConfig::from_json_str(&text).unwrap();
        let full: Vec<usize> = (0..18).filter(|&i| cfg.layer_windows().unwrap()[i].is_none()).collect();
        assert_eq!(full, [5, 11, 17]);
    }

    #[test]
    fn refuses_what_it_does_not_run() {
        for (from, to, field) in [
            (r#""final_logit_softcapping": null"#, r#""final_logit_softcapping": 30.0"#, "final_logit_softcapping"),
            (r#""rope_scaling": null"#, r#""rope_scaling": {"rope_type": "yarn", "factor": 8.0}"#, "rope_scaling"),
            (r#""hidden_activation": "gelu_pytorch_tanh""#, r#""hidden_activation": "silu""#, "hidden_activation"),
            (r#""sliding_window": 512"#, r#""sliding_window": null"#, "sliding_window"),
            (r#""use_bidirectional_attention": false"#, r#""use_bidirectional_attention": true"#, "use_bidirectional"),
            (r#""sliding_attention", "full_attention"]"#, r#""sliding_attention", "global"]"#, "layer_types[17]"),
        ] {
            let err = ModelConfig::from_json_str(&GEMMA3_270M.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let tf5 = GEMMA3_270M.replace(r#""rope_scaling": null"#, r#""rope_parameters": {"rope_theta": 5.0}"#);
        assert!(ModelConfig::from_json_str(&tf5).unwrap_err().to_string().contains("rope_parameters"));
    }

    /// gemma-3-4b-it's `config.json` (transformers 4.50), its vision config left out: the text
    /// config lists only what differs from transformers' defaults.
    const GEMMA3_4B: &str = r#"{"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
        "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0"}"#;

    /// The multimodal config reads as its text model: transformers' defaults for the sizes it
    /// leaves out, the full layers' linear scaling, the EOS list with `<end_of_turn>`.
    #[test]
    fn reads_gemma3_4b_multimodal_config_as_its_text_model() {
        let cfg = ModelConfig::from_json_str(GEMMA3_4B).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.vocab, d.d_model, d.n_layer, d.n_head, d.n_kv_head, d.head_dim), (262208, 2560, 34, 8, 4, 256));
        assert_eq!((d.rope_theta, d.rope_local_theta, d.sliding_window), (1e6, Some(1e4), Some(1024)));
        assert_eq!(d.rope_scaling, Some(crate::rope::RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(d.local_rope().rope_scaling, None);
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids()), (Some(2), vec![1, 106]));
        assert_eq!(cfg.layer_windows().unwrap().iter().filter(|w| w.is_none()).count(), 5);
        let e = ModelConfig::from_json_str(r#"{"model_type": "gemma3"}"#).unwrap_err().to_string();
        assert!(e.contains("text_config"), "{e}");
    }
}
