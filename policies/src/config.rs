//! Model configuration: one serde type that reads Hugging Face `config.json` files directly.
//!
//! The `model_type` field selects the family (`"gpt2"`, or `"llama"`, `"qwen2"`, `"qwen3"`,
//! `"mistral"`, `"gemma2"`, `"gemma3_text"`, `"gpt_neox"`, `"phi3"`, `"smollm3"`, `"granite"` and
//! `"olmo2"`:
//! Qwen2 is Llama with biases on the q, k and v projections, Qwen3 Llama with an RMSNorm over each
//! head's queries and keys, Mistral Llama with a sliding attention window, Gemma 2 and 3 see
//! [`crate::gemma2`] and [`crate::gemma3`], SmolLM3 see [`crate::smollm3`], Granite see
//! [`crate::granite`], OLMo 2 see [`crate::olmo2`], GPT-NeoX (Pythia) see
//! [`crate::gpt_neox`], Phi-3 see [`crate::phi3`]); every other field keeps the
//! name transformers uses, so an HF config deserialises unchanged and our saved configs load back
//! in transformers. Unknown HF fields (`architectures`, `torch_dtype`, …) are accepted and ignored
//! on purpose: they describe the checkpoint, not the network.

use serde::{Deserialize, Serialize};

pub use crate::dims::{Dims, Family, GeluKind, Glu, NormKind};
use crate::error::PolicyError;
pub use crate::gemma2::Gemma2Config;
pub use crate::gemma3::Gemma3Config;
pub use crate::gpt2::Gpt2Config;
pub use crate::gpt_neox::GptNeoxConfig;

/// A model configuration in Hugging Face's `config.json` shape, tagged by `model_type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type")]
pub enum ModelConfig {
    /// GPT-2 family (`GPT2LMHeadModel`).
    #[serde(rename = "gpt2")]
    Gpt2(Gpt2Config),
    /// Llama family (`LlamaForCausalLM`), also SmolLM2.
    #[serde(rename = "llama")]
    Llama(LlamaConfig),
    /// Qwen2 family (`Qwen2ForCausalLM`, Qwen2.5): Llama's fields and layout, with biases on the
    /// q, k and v projections.
    #[serde(rename = "qwen2")]
    Qwen2(LlamaConfig),
    /// Qwen3 family (`Qwen3ForCausalLM`): Llama's fields and layout, with an RMSNorm over each
    /// head's queries and keys before RoPE (`q_norm`, `k_norm`).
    #[serde(rename = "qwen3")]
    Qwen3(LlamaConfig),
    /// Mistral (`MistralForCausalLM`): Llama's fields and layout, every layer attending to its
    /// last `sliding_window` positions (none when `null`; transformers' 4096 when absent).
    #[serde(rename = "mistral")]
    Mistral(LlamaConfig),
    /// Gemma 2 (`Gemma2ForCausalLM`): see [`crate::gemma2`].
    #[serde(rename = "gemma2")]
    Gemma2(Gemma2Config),
    /// Gemma 3's text model (`Gemma3ForCausalLM`): see [`crate::gemma3`].
    #[serde(rename = "gemma3_text")]
    Gemma3Text(Gemma3Config),
    /// GPT-NeoX (`GPTNeoXForCausalLM`: Pythia): see [`crate::gpt_neox`].
    #[serde(rename = "gpt_neox")]
    GptNeox(GptNeoxConfig),
    /// Phi-3 (`Phi3ForCausalLM`): Llama's fields and network in a fused checkpoint layout, see
    /// [`crate::phi3`].
    #[serde(rename = "phi3")]
    Phi3(LlamaConfig),
    /// SmolLM3 (`SmolLM3ForCausalLM`): Llama's fields and network, RoPE left out on some
    /// layers; see [`crate::smollm3`].
    #[serde(rename = "smollm3")]
    Smollm3(LlamaConfig),
    /// Granite (`GraniteForCausalLM`: IBM's granite-3.x): Llama's fields and network with four
    /// multipliers; see [`crate::granite`].
    #[serde(rename = "granite")]
    Granite(LlamaConfig),
    /// OLMo 2 (`Olmo2ForCausalLM`): Llama's fields, its norms on the branches' outputs; see
    /// [`crate::olmo2`].
    #[serde(rename = "olmo2")]
    Olmo2(LlamaConfig),
    /// OLMo 3 (`Olmo3ForCausalLM`): OLMo 2 with local layers; see [`crate::olmo3`].
    #[serde(rename = "olmo3")]
    Olmo3(crate::olmo3::Olmo3Config),
}

/// `LlamaConfig` fields (transformers names; `rope_theta` top-level as in transformers 4, or inside
/// `rope_parameters` as in transformers 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`. Left out of a saved
    /// config when unset: transformers' Qwen2 takes a `null` for a width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Must be `silu`.
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// RMSNorm epsilon. Defaults to `1e-6`.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE parameters (transformers 5 layout). Only `rope_type = "default"` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE scaling (transformers 4): `null`, or Llama 3's (`rope_type` or `type` `"llama3"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Maximum sequence length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// The context a `longrope` model was pretrained on (Phi-3 keeps it here; 4096 when a
    /// `phi3` config leaves it out, as in transformers), which rlhf does not run past
    /// ([`crate::rope::LongRope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Whether `lm_head` shares `embed_tokens`. Defaults to `false`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o. Must be `false` (Qwen2's q/k/v biases come with its `model_type`).
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen2's sliding-window attention. Must be `false` (what Qwen2.5's configs say).
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_sliding_window: bool,
    /// Mistral's and Phi-3's attention window (every layer): a query sees its last `w`
    /// positions. Read for `model_type: mistral` and `phi3` only (Qwen2 and Qwen3 configs carry
    /// one that `use_sliding_window: false` switches off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// The share of each head RoPE turns, for `model_type: phi3` (transformers 4 layout; in
    /// `rope_parameters` in transformers 5); the other families turn the whole head, as
    /// transformers' do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// SmolLM3's layers with RoPE (1) and without (0), for `model_type: smollm3`
    /// ([`crate::smollm3`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layers: Option<Vec<u8>>,
    /// SmolLM3: without `no_rope_layers`, every `n`-th layer has no RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layer_interval: Option<usize>,
    /// Biases on the MLP. Must be `false`.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Granite's multiplier on the token embeddings, for `model_type: granite` only (as are the
    /// next three; [`crate::granite`]). Defaults to `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_multiplier: Option<f64>,
    /// Granite's multiplier on each branch's output before its residual add. Defaults to `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_multiplier: Option<f64>,
    /// Granite's attention score scale, in place of `head_dim^-½`. Defaults to `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_multiplier: Option<f64>,
    /// Granite divides the logits by it. Defaults to `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_scaling: Option<f64>,
    /// Std of the normal init. Defaults to `0.02`.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id, or ids (Llama 3's configs list each token that ends a turn).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Class names transformers uses to pick the model class when loading.
    #[serde(default = "llama_architectures")]
    pub architectures: Vec<String>,
}

/// One token id or several, as HF configs give `eos_token_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list (the first is the main one).
    Many(Vec<u32>),
}

impl TokenIds {
    /// Every id, in order.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// transformers 5 `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `"default"`, or `"llama3"` (Llama 3.1+: [`crate::rope::Llama3Scaling`], whose numbers
    /// are in `scaling`).
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    /// RoPE base.
    pub rope_theta: f64,
    /// The scaling's parameters (`factor`, `low_freq_factor`, …), kept as they are.
    #[serde(flatten)]
    pub scaling: serde_json::Map<String, serde_json::Value>,
}

fn default_silu() -> String {
    "silu".into()
}
fn default_rope_type() -> String {
    "default".into()
}
pub(crate) fn default_ln_eps() -> f64 {
    1e-5
}
fn default_rms_eps() -> f64 {
    1e-6
}
pub(crate) fn default_init() -> f64 {
    0.02
}
fn is_false(b: &bool) -> bool {
    !*b
}

pub(crate) fn default_true() -> bool {
    true
}
pub(crate) fn default_max_pos() -> usize {
    2048
}
fn llama_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}

impl ModelConfig {
    /// Reads and validates a `config.json`; errors name the file and the field.
    pub fn from_file(path: &std::path::Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            // a training run's folder also holds a config.json (the stage's): say what to pass
            PolicyError::Config { field, msg, .. }
                if field == "model_type" && path.parent().is_some_and(|d| d.join("checkpoints").is_dir()) =>
            {
                let msg = format!(
                    "{msg}: this is a training run's config; pass one of its checkpoints/step-N folders \
                     (the `rlhf` commands take the run folder for its newest)"
                );
                PolicyError::Config { file: path.display().to_string(), field, msg }
            }
            e => e.in_file(path),
        })
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self, PolicyError> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| PolicyError::config("<json>", format!("not valid JSON: {e}")))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("gpt2" | "llama" | "qwen2" | "qwen3" | "gemma2" | "gemma3_text" | "gpt_neox") => {}
            // transformers' MistralConfig has a window of 4096 unless the file says otherwise
            Some("mistral") if value.get("sliding_window").is_none() => {
                value["sliding_window"] = serde_json::json!(MISTRAL_WINDOW);
            }
            Some("mistral") => {}
            Some("phi3") => crate::phi3::fill_defaults(&mut value),
            Some("smollm3") => crate::smollm3::fill_defaults(&mut value),
            Some("granite") => crate::granite::fill_defaults(&mut value),
            Some("olmo2") => crate::olmo2::fill_defaults(&mut value),
            Some("olmo3") => crate::olmo3::fill_defaults(&mut value),
            Some("gemma3") => value = crate::gemma3::text_of_multimodal(&value)?,
            Some(other) => {
                let msg = format!(
                    "unsupported model_type {other:?} (\"gpt2\", \"llama\", \"qwen2\", \"qwen3\", \"mistral\", \
                     \"gemma2\", \"gemma3_text\", \"gemma3\" (its text model), \"gpt_neox\", \"phi3\", \"smollm3\", \
                     \"granite\", \"olmo2\" and \"olmo3\" are)"
                );
                return Err(PolicyError::config("model_type", msg));
            }
            None => return Err(PolicyError::config("model_type", "missing or not a string".into())),
        }
        let cfg: ModelConfig =
            serde_json::from_value(value).map_err(|e| PolicyError::config(field_of_serde_error(&e), e.to_string()))?;
        cfg.dims()?;
        Ok(cfg)
    }

    /// Serialises as an HF `config.json`.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("ModelConfig serialises: plain data")
    }

    /// The workload's `tiny` preset: GPT-2, d 256, 4 layers, 4 heads, vocab 4096, 256 positions.
    pub fn tiny() -> Self {
        Self::gpt2_preset(4096, 256, 4, 4, 256)
    }

    /// The workload's `small` preset: GPT-2, d 384, 6 layers, 6 heads, vocab 4096, 256 positions.
    pub fn small() -> Self {
        Self::gpt2_preset(4096, 384, 6, 6, 256)
    }

    /// A named preset (`tiny` or `small`).
    pub fn preset(name: &str) -> Result<Self, PolicyError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            other => Err(PolicyError::config("preset", format!("unknown preset {other:?} (expected tiny or small)"))),
        }
    }

    /// A GPT-2 config with the given sizes and the workload's conventions (eos = bos = pad = 0).
    pub fn gpt2_preset(vocab: usize, d: usize, layers: usize, heads: usize, positions: usize) -> Self {
        ModelConfig::Gpt2(Gpt2Config {
            vocab_size: vocab,
            n_positions: positions,
            n_embd: d,
            n_layer: layers,
            n_head: heads,
            n_inner: None,
            activation_function: crate::gpt2::default_gelu(),
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            tie_word_embeddings: true,
            bias: true,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            pad_token_id: Some(0),
            architectures: crate::gpt2::architectures(),
        })
    }

    /// Family of this config.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Gpt2(_) => Family::Gpt2,
            ModelConfig::GptNeox(_) => Family::GptNeox,
            _ => Family::Llama,
        }
    }

    /// The fields every family has, under its own names.
    fn shared(&self) -> Shared {
        let ids = |t: &Option<TokenIds>| t.as_ref().map(TokenIds::ids).unwrap_or_default();
        match self {
            ModelConfig::Gpt2(c) => Shared {
                vocab: c.vocab_size,
                bos: c.bos_token_id,
                eos: c.eos_token_id.into_iter().collect(),
                pad: c.pad_token_id,
            },
            ModelConfig::Llama(c)
            | ModelConfig::Qwen2(c)
            | ModelConfig::Qwen3(c)
            | ModelConfig::Mistral(c)
            | ModelConfig::Phi3(c)
            | ModelConfig::Smollm3(c)
            | ModelConfig::Granite(c)
            | ModelConfig::Olmo2(c) => {
                Shared { vocab: c.vocab_size, bos: c.bos_token_id, eos: ids(&c.eos_token_id), pad: c.pad_token_id }
            }
            ModelConfig::Gemma2(c) => {
                Shared { vocab: c.vocab_size, bos: c.bos_token_id, eos: ids(&c.eos_token_id), pad: c.pad_token_id }
            }
            ModelConfig::Gemma3Text(c) => {
                Shared { vocab: c.vocab_size, bos: c.bos_token_id, eos: ids(&c.eos_token_id), pad: c.pad_token_id }
            }
            ModelConfig::GptNeox(c) => {
                Shared { vocab: c.vocab_size, bos: c.bos_token_id, eos: ids(&c.eos_token_id), pad: c.pad_token_id }
            }
            ModelConfig::Olmo3(c) => {
                let c = c.olmo2();
                Shared { vocab: c.vocab_size, bos: c.bos_token_id, eos: ids(&c.eos_token_id), pad: c.pad_token_id }
            }
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.shared().vocab
    }

    /// Sets the vocabulary size (used when a tokenizer is trained for a fresh model).
    pub fn set_vocab_size(&mut self, v: usize) {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size = v,
            ModelConfig::Llama(c)
            | ModelConfig::Qwen2(c)
            | ModelConfig::Qwen3(c)
            | ModelConfig::Mistral(c)
            | ModelConfig::Phi3(c)
            | ModelConfig::Smollm3(c)
            | ModelConfig::Granite(c)
            | ModelConfig::Olmo2(c) => c.vocab_size = v,
            ModelConfig::Gemma2(c) => c.vocab_size = v,
            ModelConfig::Gemma3Text(c) => c.vocab_size = v,
            ModelConfig::GptNeox(c) => c.vocab_size = v,
            ModelConfig::Olmo3(c) => {
                c.set("vocab_size", v.into()).expect("a vocabulary size keeps the config readable")
            }
        }
    }

    /// The EOS id, if the config names one (the first, when it lists several).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_ids().first().copied()
    }

    /// Every EOS id the config names (generation stops at any of them).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.shared().eos
    }

    /// Beginning-of-sequence id, if the config names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.shared().bos
    }

    /// Pad id, if the config names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.shared().pad
    }

    /// Each layer's attention window: `None` for full attention, `Some(w)` for a layer whose
    /// queries see their last `w` positions (Gemma 2's and 3's sliding layers; every Mistral layer with
    /// a `sliding_window`).
    pub fn layer_windows(&self) -> Result<Vec<Option<usize>>, PolicyError> {
        match self {
            ModelConfig::Gemma2(c) => c.layer_windows(),
            ModelConfig::Olmo3(c) => c.layer_windows(),
            ModelConfig::Gemma3Text(c) => c.layer_windows(),
            _ => {
                let d = self.dims()?;
                Ok(vec![d.sliding_window; d.n_layer])
            }
        }
    }

    /// Whether each layer rotates its queries and keys: all of them, but SmolLM3's NoPE layers.
    pub fn layer_ropes(&self) -> Result<Vec<bool>, PolicyError> {
        let d = self.dims()?;
        match self {
            ModelConfig::Smollm3(c) => crate::smollm3::layer_ropes(c, &d),
            _ => Ok(vec![d.rotary(); d.n_layer]),
        }
    }

    /// Resolves and validates the sizes; the error names the offending field.
    pub fn dims(&self) -> Result<Dims, PolicyError> {
        let d = match self {
            ModelConfig::Gpt2(c) => crate::gpt2::dims(c)?,
            ModelConfig::Llama(c) => llama_dims(c, false, false)?,
            ModelConfig::Qwen2(c) => llama_dims(c, true, false)?,
            ModelConfig::Qwen3(c) => llama_dims(c, false, true)?,
            ModelConfig::Mistral(c) => mistral_dims(c)?,
            ModelConfig::Gemma2(c) => c.dims()?,
            ModelConfig::Gemma3Text(c) => c.dims()?,
            ModelConfig::GptNeox(c) => c.dims()?,
            ModelConfig::Phi3(c) => crate::phi3::dims(c)?,
            ModelConfig::Granite(c) => crate::granite::dims(c)?,
            ModelConfig::Olmo2(c) => crate::olmo2::dims(c)?,
            ModelConfig::Olmo3(c) => c.dims()?,
            ModelConfig::Smollm3(c) => {
                let d = llama_dims(c, false, false)?;
                crate::smollm3::layer_ropes(c, &d)?;
                d
            }
        };
        for (name, v) in [
            ("vocab_size", d.vocab),
            ("hidden size", d.d_model),
            ("number of layers", d.n_layer),
            ("number of heads", d.n_head),
            ("MLP width", d.d_ff),
            ("max positions", d.max_positions),
        ] {
            if v == 0 {
                return Err(PolicyError::config(name, "must be > 0".into()));
            }
        }
        if let Some(crate::rope::RopeScaling::LongRope(l)) = &d.rope_scaling {
            l.check(&d)?;
        }
        Ok(d)
    }
}

/// What [`ModelConfig::shared`] gives.
struct Shared {
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
}

/// transformers' `MistralConfig.sliding_window` default.
const MISTRAL_WINDOW: usize = 4096;

/// Mistral's sizes: Llama's, with every layer's window `sliding_window` (no window when `null`);
/// Phi-3's start from them too.
pub(crate) fn mistral_dims(c: &LlamaConfig) -> Result<Dims, PolicyError> {
    if c.sliding_window == Some(0) {
        return Err(PolicyError::config("sliding_window", "must be > 0 (or null for none)".into()));
    }
    Ok(Dims { sliding_window: c.sliding_window, ..llama_dims(c, false, false)? })
}

/// Llama's sizes; `qkv_bias` for Qwen2, `qk_norm` for Qwen3.
pub(crate) fn llama_dims(c: &LlamaConfig, qkv_bias: bool, qk_norm: bool) -> Result<Dims, PolicyError> {
    if c.hidden_act != "silu" {
        return Err(PolicyError::config("hidden_act", format!("{:?} is not supported (only silu)", c.hidden_act)));
    }
    if c.attention_bias || c.mlp_bias {
        return Err(PolicyError::config("attention_bias", "Llama checkpoints with biases are not supported".into()));
    }
    if c.use_sliding_window {
        return Err(PolicyError::config("use_sliding_window", "sliding-window attention is not supported".into()));
    }
    let (theta, rope_scaling) = crate::rope::base_and_scaling(c)?;
    let n_head = c.num_attention_heads;
    let n_kv = c.num_key_value_heads.unwrap_or(n_head);
    if n_head == 0 || n_kv == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(PolicyError::config(
            "num_key_value_heads",
            format!("num_attention_heads {n_head} must be a positive multiple of num_key_value_heads {n_kv}"),
        ));
    }
    let head_dim = match c.head_dim {
        Some(h) => h,
        None if c.hidden_size.is_multiple_of(n_head) => c.hidden_size / n_head,
        None => {
            return Err(PolicyError::config(
                "num_attention_heads",
                format!("hidden_size {} is not divisible by {n_head}", c.hidden_size),
            ))
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(PolicyError::config("head_dim", format!("{head_dim} must be even and > 0 for RoPE")));
    }
    Ok(Dims {
        family: Family::Llama,
        vocab: c.vocab_size,
        d_model: c.hidden_size,
        n_layer: c.num_hidden_layers,
        n_head,
        n_kv_head: n_kv,
        head_dim,
        d_ff: c.intermediate_size,
        max_positions: c.max_position_embeddings,
        norm_eps: c.rms_norm_eps as f32,
        rope_theta: theta as f32,
        rope_scaling,
        tied: c.tie_word_embeddings,
        init_std: c.initializer_range as f32,
        gelu: GeluKind::Tanh,
        bias: false,
        qkv_bias,
        qk_norm,
        ..Dims::PLAIN
    })
}

/// Writes a family's transformers defaults that differ from Llama's into a config object where
/// it leaves them out, and `architectures` as `[architecture]` where it has none.
pub(crate) fn fill_defaults<V: Into<serde_json::Value>>(
    config: &mut serde_json::Value,
    defaults: impl IntoIterator<Item = (&'static str, V)>,
    architecture: &str,
) {
    for (key, value) in defaults {
        if config.get(key).is_none() {
            config[key] = value.into();
        }
    }
    if config.get("architectures").is_none() {
        config["architectures"] = serde_json::json!([architecture]);
    }
}

/// Best-effort field name from a serde error message ("missing field `n_embd`").
pub(crate) fn field_of_serde_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match (msg.find('`'), msg.rfind('`')) {
        (Some(a), Some(b)) if b > a => msg[a + 1..b].to_string(),
        _ => format!("line {} column {}", e.line(), e.column()),
    }
}
