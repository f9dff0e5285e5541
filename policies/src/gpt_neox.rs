//! GPT-NeoX's config (`model_type: "gpt_neox"`, transformers' `GPTNeoXConfig`: EleutherAI's
//! Pythia suite, the models of "The N Implementation Details of RLHF with PPO", and
//! RedPajama-INCITE, `GPTNeoXForCausalLM`).
//!
//! GPT-NeoX is GPT-2's block (LayerNorms with biases, a GELU MLP, biases on every linear) with
//! rotary positions instead of a learned table, and two changes, each a field of [`Dims`]: RoPE
//! turns only the first `partial_rotary_factor · head_dim` dimensions of each head (Pythia's
//! `rotary_pct` 0.25, [`Dims::partial_rotary`]), and with `use_parallel_residual` (Pythia's) the
//! MLP reads the block's input instead of the attention's output:
//! `y = x + attn(ln₁(x)) + mlp(ln₂(x))` ([`Dims::parallel_residual`]). The checkpoint fuses q, k
//! and v into one `query_key_value` whose rows go head by head (`[q₀ k₀ v₀ q₁ k₁ v₁ …]`), and
//! its untied LM head is `embed_out` (see [`crate::checkpoint`]).
//!
//! Both config layouts load: transformers 4's `rotary_pct` / `rotary_emb_base` (the Hub's Pythia
//! files) and transformers 5's `rope_parameters`. Every default is transformers'.

use serde::{Deserialize, Serialize};

use crate::config::{Dims, Family, GeluKind, TokenIds};
use crate::dims::partial_rotary;
use crate::error::PolicyError;

/// `GPTNeoXConfig` fields (transformers names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptNeoxConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (head width `hidden_size / num_attention_heads`).
    pub num_attention_heads: usize,
    /// The MLP's activation: `gelu` (exact, the default and Pythia's) or the tanh GELU
    /// (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Maximum sequence length. Defaults to `2048`.
    #[serde(default = "crate::config::default_max_pos")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon. Defaults to `1e-5`.
    #[serde(default = "crate::config::default_ln_eps")]
    pub layer_norm_eps: f64,
    /// The share of each head's dimensions RoPE turns (transformers 4). Defaults to `0.25`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_pct: Option<f64>,
    /// RoPE base (transformers 4). Defaults to `10000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_emb_base: Option<f64>,
    /// RoPE (transformers 5): `{"rope_type": "default", "rope_theta": …,
    /// "partial_rotary_factor": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// RoPE scaling (transformers 4). Must be `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// `y = x + attn(ln₁(x)) + mlp(ln₂(x))` instead of the sequential block. Defaults to `true`.
    #[serde(default = "crate::config::default_true")]
    pub use_parallel_residual: bool,
    /// Whether the LM head shares the embedding. Defaults to `false`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on `query_key_value` and `dense`. Must be `true` (the default).
    #[serde(default = "crate::config::default_true")]
    pub attention_bias: bool,
    /// Std of the normal init. Defaults to `0.02`.
    #[serde(default = "crate::config::default_init")]
    pub initializer_range: f64,
    /// Beginning-of-sequence id. Defaults to `0`.
    #[serde(default = "default_bos")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id or ids. Defaults to `2`.
    #[serde(default = "default_eos")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Class names transformers uses to pick the model class when loading.
    #[serde(default = "architectures")]
    pub architectures: Vec<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_bos() -> Option<u32> {
    Some(0)
}
fn default_eos() -> Option<TokenIds> {
    Some(TokenIds::One(2))
}
fn architectures() -> Vec<String> {
    vec!["GPTNeoXForCausalLM".into()]
}

/// transformers' RoPE base and rotated share when a config names neither.
const DEFAULT_ROPE: (f64, f64) = (10_000.0, 0.25);

impl GptNeoxConfig {
    /// The RoPE base and the share of each head it turns, from either layout (transformers 5's
    /// `rope_parameters` first, as transformers reads them).
    fn rope(&self) -> Result<(f64, f64), PolicyError> {
        let (theta, pct) = (self.rotary_emb_base.unwrap_or(DEFAULT_ROPE.0), self.rotary_pct.unwrap_or(DEFAULT_ROPE.1));
        let scaling = self.rope_scaling.as_ref().filter(|s| !s.is_null());
        let (params, field) = match (&self.rope_parameters, scaling) {
            (Some(p), _) => (p, "rope_parameters"),
            (None, Some(s)) => (s, "rope_scaling"),
            (None, None) => return Ok((theta, pct)),
        };
        let Some(obj) = params.as_object() else {
            return Err(PolicyError::config(field, format!("{params} is not an object")));
        };
        match obj.get("rope_type").or(obj.get("type")).and_then(|t| t.as_str()).unwrap_or("default") {
            "default" => {}
            other => {
                let msg = format!("{other:?} is not supported for GPT-NeoX (only \"default\")");
                return Err(PolicyError::config(format!("{field}.rope_type"), msg));
            }
        }
        let number = |key: &str, default: f64| match obj.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| *x > 0.0)
                .ok_or_else(|| PolicyError::config(format!("{field}.{key}"), format!("{v} is not a positive number"))),
        };
        Ok((number("rope_theta", theta)?, number("partial_rotary_factor", pct)?))
    }

    /// The resolved sizes; the error names the offending field.
    pub(crate) fn dims(&self) -> Result<Dims, PolicyError> {
        let gelu = match self.hidden_act.as_str() {
            "gelu" => GeluKind::Erf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => GeluKind::Tanh,
            other => {
                let msg = format!("{other:?} is not supported (gelu, or the tanh GELU gelu_new / gelu_pytorch_tanh)");
                return Err(PolicyError::config("hidden_act", msg));
            }
        };
        if !self.attention_bias {
            let msg = "GPT-NeoX without attention biases is not supported (every GPT-NeoX checkpoint has them)";
            return Err(PolicyError::config("attention_bias", msg.into()));
        }
        let (d, n_head) = (self.hidden_size, self.num_attention_heads);
        if n_head == 0 || !d.is_multiple_of(n_head) {
            let msg = format!("hidden_size {d} is not divisible by num_attention_heads {n_head}");
            return Err(PolicyError::config("num_attention_heads", msg));
        }
        let head_dim = d / n_head;
        let (theta, pct) = self.rope()?;
        let field = if self.rope_parameters.is_some() { "rope_parameters.partial_rotary_factor" } else { "rotary_pct" };
        let partial_rotary = partial_rotary(head_dim, pct, field)?;
        Ok(Dims {
            family: Family::GptNeox,
            vocab: self.vocab_size,
            d_model: d,
            n_layer: self.num_hidden_layers,
            n_head,
            n_kv_head: n_head,
            head_dim,
            d_ff: self.intermediate_size,
            max_positions: self.max_position_embeddings,
            norm_eps: self.layer_norm_eps as f32,
            rope_theta: theta as f32,
            tied: self.tie_word_embeddings,
            init_std: self.initializer_range as f32,
            gelu,
            bias: true,
            partial_rotary,
            parallel_residual: self.use_parallel_residual,
            ..Dims::PLAIN
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Family, GeluKind, ModelConfig, NormKind};

    /// EleutherAI/pythia-70m's `config.json` as the Hub has it (transformers 4.24's layout:
    /// `rotary_pct`, `rotary_emb_base`).
    const PYTHIA_70M: &str = r#"{"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox",
        "num_attention_heads": 8, "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25,
        "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.24.0",
        "use_cache": true, "use_parallel_residual": true, "vocab_size": 50304}"#;

    #[test]
    fn reads_pythia_70m_config() {
        let cfg = ModelConfig::from_json_str(PYTHIA_70M).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!(d.family, Family::GptNeox);
        assert_eq!((d.d_model, d.n_head, d.n_kv_head, d.head_dim, d.d_ff, d.n_layer), (512, 8, 8, 64, 2048, 6));
        assert_eq!((d.rope_theta, d.partial_rotary, d.rotary_dim()), (10000.0, Some(16), 16));
        assert!(d.parallel_residual && !d.tied && d.bias && d.rotary());
        assert_eq!((d.gelu, d.norm(), d.position_limit()), (GeluKind::Erf, NormKind::LayerNorm, None));
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids(), cfg.pad_token_id()), (Some(0), vec![0], None));
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
    }

    /// transformers 5's layout, and its defaults (a quarter of each head turned, base 10⁴) for a
    /// config that names neither; a whole head turned is plain RoPE.
    #[test]
    fn reads_transformers_5_layout_and_defaults() {
        let tf5 = PYTHIA_70M.replace(
            r#""rotary_emb_base": 10000, "rotary_pct": 0.25"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}"#,
        );
        let d = ModelConfig::from_json_str(&tf5).unwrap().dims().unwrap();
        assert_eq!((d.rope_theta, d.partial_rotary, d.rotary_dim()), (500.0, None, 64));
        let bare = PYTHIA_70M.replace(r#""rotary_emb_base": 10000, "rotary_pct": 0.25,"#, "");
        let d = ModelConfig::from_json_str(&bare).unwrap().dims().unwrap();
        assert_eq!((d.rope_theta, d.rotary_dim()), (10000.0, 16));
        let seq = PYTHIA_70M.replace(r#""use_parallel_residual": true"#, r#""use_parallel_residual": false"#);
        assert!(!ModelConfig::from_json_str(&seq).unwrap().dims().unwrap().parallel_residual);
    }

    #[test]
    fn refuses_what_it_does_not_run() {
        for (from, to, field) in [
            (r#""hidden_act": "gelu""#, r#""hidden_act": "relu""#, "hidden_act"),
            (r#""rotary_pct": 0.25"#, r#""rotary_pct": 0.01"#, "rotary_pct"),
            (
                r#""rotary_pct": 0.25"#,
                r#""rotary_pct": 0.5, "rope_scaling": {"type": "linear", "factor": 2.0}"#,
                "rope_scaling.rope_type",
            ),
            (r#""use_cache": true"#, r#""use_cache": true, "attention_bias": false"#, "attention_bias"),
            (r#""num_attention_heads": 8"#, r#""num_attention_heads": 7"#, "num_attention_heads"),
        ] {
            let err = ModelConfig::from_json_str(&PYTHIA_70M.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
