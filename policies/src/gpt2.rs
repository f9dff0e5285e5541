//! GPT-2's config (`model_type: "gpt2"`, transformers' `GPT2Config`: `GPT2LMHeadModel`, and the
//! workload's `tiny` and `small` presets): learned positions, LayerNorm, a GELU MLP, biases, a
//! fused `c_attn`.

use serde::{Deserialize, Serialize};

use crate::config::{Dims, Family, GeluKind};
use crate::error::PolicyError;

/// `GPT2Config` fields (transformers names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Maximum sequence length (learned position table size).
    pub n_positions: usize,
    /// Model width d.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads (head_dim = n_embd / n_head).
    pub n_head: usize,
    /// MLP width; `null` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// `gelu_new` (tanh approximation; also `gelu_pytorch_tanh`, `gelu_fast`) or `gelu` (exact,
    /// erf).
    #[serde(default = "default_gelu")]
    pub activation_function: String,
    /// LayerNorm epsilon. Defaults to `1e-5`.
    #[serde(default = "crate::config::default_ln_eps")]
    pub layer_norm_epsilon: f64,
    /// Std of the normal init. Defaults to `0.02`.
    #[serde(default = "crate::config::default_init")]
    pub initializer_range: f64,
    /// GPT-2 always ties the LM head to `wte`. Defaults to `true`.
    #[serde(default = "crate::config::default_true")]
    pub tie_word_embeddings: bool,
    /// Biases in the linears and LayerNorms (GPT-2's; nanoGPT trains without: its `bias`
    /// flag). Not a transformers field: a folder saved with `false` has no bias tensors, and
    /// transformers, which always has them, fills them with its init (zeros) — the same
    /// function. Defaults to `true` (and is then left out of `config.json`).
    #[serde(default = "crate::config::default_true", skip_serializing_if = "is_true")]
    pub bias: bool,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Class names transformers uses to pick the model class when loading.
    #[serde(default = "architectures")]
    pub architectures: Vec<String>,
}

/// The resolved sizes; the error names the offending field.
pub(crate) fn dims(c: &Gpt2Config) -> Result<Dims, PolicyError> {
    let gelu = match c.activation_function.as_str() {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => GeluKind::Tanh,
        "gelu" => GeluKind::Erf,
        other => {
            return Err(PolicyError::config(
                "activation_function",
                format!("{other:?} is not supported (the tanh GELU gelu_new / gelu_pytorch_tanh, or the exact gelu)"),
            ))
        }
    };
    if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
        return Err(PolicyError::config(
            "n_head",
            format!("n_embd {} is not divisible by n_head {}", c.n_embd, c.n_head),
        ));
    }
    if !c.tie_word_embeddings {
        return Err(PolicyError::config(
            "tie_word_embeddings",
            "GPT-2 checkpoints with an untied head are not supported".into(),
        ));
    }
    Ok(Dims {
        family: Family::Gpt2,
        vocab: c.vocab_size,
        d_model: c.n_embd,
        n_layer: c.n_layer,
        n_head: c.n_head,
        n_kv_head: c.n_head,
        head_dim: c.n_embd / c.n_head,
        d_ff: c.n_inner.unwrap_or(4 * c.n_embd),
        max_positions: c.n_positions,
        norm_eps: c.layer_norm_epsilon as f32,
        rope_theta: 0.0,
        rope_scaling: None,
        tied: true,
        init_std: c.initializer_range as f32,
        gelu,
        bias: c.bias,
        qkv_bias: false,
        qk_norm: false,
        ..Dims::PLAIN
    })
}

pub(crate) fn default_gelu() -> String {
    "gelu_new".into()
}
fn is_true(b: &bool) -> bool {
    *b
}
pub(crate) fn architectures() -> Vec<String> {
    vec!["GPT2LMHeadModel".into()]
}
