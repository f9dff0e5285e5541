//! GGUF files (llama.cpp's format): header, metadata, tensor table, and the tensors
//! dequantised to f32 ([`crate::gguf_quants`]: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the
//! K-quants Q2_K–Q6_K, IQ4_NL and IQ4_XS). A `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`,
//! `phi3`, `smollm3`, `granite`, `olmo2` or `gptneox` file ([`Arch`]) becomes an HF state dict ([`hf_tensors`]) and
//! config ([`model_config`]), so
//! [`crate::CausalLm::load_gguf`] goes through the same loader as safetensors folders; its
//! vocabulary becomes a `tokenizer.json` ([`tokenizer_json`]).
//!
//! Every count and offset read from the file is checked against the bytes that remain before
//! it sizes anything: a malformed or truncated file is an error naming what is wrong (and the
//! tensor, where there is one), never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::HostTensor;
use crate::config::ModelConfig;
use crate::error::PolicyError;
use crate::gguf_quants::{block_layout, dequantize, SUPPORTED};
pub use crate::gguf_tokenizer::{chat_template, tokenizer_json};
use crate::gguf_tokenizer::{SENTENCEPIECE_BOS, SENTENCEPIECE_EOS};
use crate::rope::Llama3Scaling;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any integer type.
    Int(i128),
    /// f32 or f64.
    Float(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced).
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, fastest-varying first (ggml's `ne`).
    pub ne: Vec<u64>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file held in memory.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
    path: String,
}

/// Cursor over the file with bounds-checked reads.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> PolicyError {
        PolicyError::tensor(self.path, "header", format!("{} (at byte {})", msg.into(), self.at))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], PolicyError> {
        if n > self.b.len() - self.at {
            return Err(self.err(format!("truncated file: {n} bytes needed, {} left", self.b.len() - self.at)));
        }
        self.at += n;
        Ok(&self.b[self.at - n..self.at])
    }
    fn u32(&mut self) -> Result<u32, PolicyError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, PolicyError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count of items of at least `min_size` bytes each, checked against the bytes left.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, PolicyError> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(
                self.err(format!("truncated file or bad {what} count: {n} cannot fit in the {left} bytes left"))
            );
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, PolicyError> {
        let n = self.count(1, "string length")?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, PolicyError> {
        let int = |b: &[u8], signed: bool| -> i128 {
            let mut v = [0u8; 16];
            v[..b.len()].copy_from_slice(b);
            if signed && b[b.len() - 1] & 0x80 != 0 {
                v[b.len()..].fill(0xff);
            }
            i128::from_le_bytes(v)
        };
        Ok(match ty {
            0 | 2 | 4 | 10 => {
                let n = [1, 0, 2, 0, 4, 0, 0, 0, 0, 0, 8][ty as usize];
                Value::Int(int(self.take(n)?, false))
            }
            1 | 3 | 5 | 11 => {
                let n = [0, 1, 0, 2, 0, 4, 0, 0, 0, 0, 0, 8][ty as usize];
                Value::Int(int(self.take(n)?, true))
            }
            6 => Value::Float(f32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as f64),
            12 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.count(1, "array")?;
                Value::Array((0..n).map(|_| self.value(item, depth + 1)).collect::<Result<_, _>>()?)
            }
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}

/// ggml's name for a type id (for error messages).
fn type_name(ggml_type: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16",
        "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(ggml_type as usize).map_or_else(|| format!("type {ggml_type}"), |n| n.to_string())
}

impl Gguf {
    /// Reads and parses `path` (the tensor data stays as bytes until [`Gguf::tensor`]).
    pub fn open(path: &Path) -> Result<Self, PolicyError> {
        let bytes = std::fs::read(path).map_err(|e| PolicyError::io(path, e))?;
        Self::parse(bytes, path)
    }

    /// Parses a file already in memory (`path` names it in errors).
    pub fn parse(bytes: Vec<u8>, path: &Path) -> Result<Self, PolicyError> {
        let mut r = Reader { b: &bytes, at: 0, path };
        if r.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(PolicyError::tensor(path, "header", "not a GGUF file (the magic bytes are not \"GGUF\")"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        // a tensor entry takes at least 8 + 4 + 8 + 4 + 8 bytes, a metadata entry 8 + 4 + 1
        let n_tensors = r.count(32, "tensor")?;
        let n_kv = r.count(13, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(PolicyError::tensor(path, name, format!("{n_dims} dimensions (1 to 4 expected)")));
            }
            let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let (ggml_type, offset) = (r.u32()?, r.u64()?);
            tensors.push(TensorInfo { name, ne, ggml_type, offset });
        }
        let align = match metadata.get("general.alignment") {
            Some(Value::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() && *a <= 1 << 20 => *a as usize,
            None => 32,
            Some(other) => return Err(r.err(format!("general.alignment {other:?} is not a power of two"))),
        };
        let data_start = r.at.div_ceil(align) * align;
        let g = Gguf { version, metadata, tensors, data_start, path: path.display().to_string(), bytes: vec![] };
        // every tensor's bytes must lie inside the file
        for t in &g.tensors {
            g.byte_range(t, bytes.len())?;
        }
        Ok(Gguf { bytes, ..g })
    }

    pub(crate) fn err(&self, tensor: &str, msg: impl Into<String>) -> PolicyError {
        PolicyError::tensor(Path::new(&self.path), tensor, msg)
    }

    /// Element count and byte range of `t`'s data, checked against a file of `len` bytes.
    fn byte_range(&self, t: &TensorInfo, len: usize) -> Result<(usize, std::ops::Range<usize>), PolicyError> {
        let (block_bytes, block_vals) = block_layout(t.ggml_type).ok_or_else(|| {
            self.err(&t.name, format!("tensor type {} is not supported ({SUPPORTED} are)", type_name(t.ggml_type)))
        })?;
        let n = t.ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n > 0 && n < 1 << 40);
        let n = n.ok_or_else(|| self.err(&t.name, format!("bad dimensions {:?}", t.ne)))?;
        if !t.ne[0].is_multiple_of(block_vals as u64) {
            return Err(self.err(&t.name, format!("row of {} values is not a whole number of blocks", t.ne[0])));
        }
        let size = n / block_vals as u64 * block_bytes as u64;
        let start = (self.data_start as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= len as u64 => Ok((n as usize, s as usize..e as usize)),
            _ => Err(self.err(
                &t.name,
                format!("data (offset {}, {size} bytes) runs past the end of the file ({len} bytes)", t.offset),
            )),
        }
    }

    /// The tensor `name` dequantised to f32, row-major with the shape reversed from `ne`.
    pub fn tensor(&self, name: &str) -> Result<HostTensor, PolicyError> {
        let t = self.tensors.iter().find(|t| t.name == name).ok_or_else(|| self.err(name, "not in the file"))?;
        let (n, range) = self.byte_range(t, self.bytes.len())?;
        let data = dequantize(t.ggml_type, &self.bytes[range], n);
        Ok(HostTensor { shape: t.ne.iter().rev().map(|&d| d as usize).collect(), data })
    }

    /// A required integer metadata value.
    pub fn int(&self, key: &str) -> Result<usize, PolicyError> {
        match self.metadata.get(key) {
            Some(Value::Int(v)) if *v >= 0 && *v < 1 << 40 => Ok(*v as usize),
            other => Err(self.err("metadata", format!("`{key}` must be a non-negative integer, found {other:?}"))),
        }
    }

    /// A required float metadata value.
    pub fn float(&self, key: &str) -> Result<f64, PolicyError> {
        match self.metadata.get(key) {
            Some(Value::Float(v)) => Ok(*v),
            Some(Value::Int(v)) => Ok(*v as f64),
            other => Err(self.err("metadata", format!("`{key}` must be a number, found {other:?}"))),
        }
    }
}

/// The architectures read from GGUF files (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama`: Llama 1–3, SmolLM, Mistral-style dense models. llama.cpp's converter interleaves
    /// the q/k rows of each head (its RoPE rotates adjacent pairs), undone on load.
    Llama,
    /// `qwen2`: Qwen2/Qwen2.5, Llama with q/k/v biases. llama.cpp rotates Qwen2 in the NeoX
    /// layout, transformers' own, so nothing is permuted.
    Qwen2,
    /// `qwen3`: Qwen3, Llama with RMSNorms over each head's queries and keys; NeoX layout too.
    Qwen3,
    /// `gemma2`: Gemma 2 ([`crate::gemma2`]). As `gemma3`, the gains stored as `1 + w` and the
    /// layer pattern (here alternating, local first) and query scale left to llama.cpp; the soft
    /// caps in `attn_logit_softcapping` and `final_logit_softcapping` (50 and 30 when absent).
    Gemma2,
    /// `gemma3`: Gemma 3's text model. The converter stores each RMSNorm's gain `1 + w` (undone on
    /// load) and leaves out what llama.cpp derives: the layer pattern (five sliding-window layers,
    /// then a full one, unless `attention.sliding_window_pattern` says otherwise) and the query
    /// scale (`head_dim^-½`, the 27B's `(hidden / heads)^-½`).
    Gemma3,
    /// `phi3`: Phi-3 and Phi-4-mini ([`crate::phi3`]): q|k|v fused in `attn_qkv` and gate|up in
    /// `ffn_up`, as transformers stores them; NeoX layout; Phi-4-mini's partial RoPE in
    /// `rope.dimension_count`; an `attention.sliding_window` of 0 for none; the `longrope`
    /// scaling of the 128k models, Phi-3.5 and Phi-4-mini in `rope_factors_short.weight`,
    /// `rope_factors_long.weight` and `rope.scaling.*`.
    Phi3,
    /// `smollm3`: SmolLM3 ([`crate::smollm3`]): Llama's file (q/k rows interleaved) whose every
    /// fourth layer has no RoPE, which llama.cpp fixes rather than records.
    Smollm3,
    /// `granite`: Granite ([`crate::granite`]): Llama's file (q/k rows interleaved) with the
    /// four multipliers in `attention.scale`, `embedding_scale`, `residual_scale` and
    /// `logit_scale`, read as llama.cpp does.
    Granite,
    /// `olmo2`: OLMo 2 ([`crate::olmo2`]): no `attn_norm` or `ffn_norm`, the branches' output
    /// norms in `post_attention_norm` and `post_ffw_norm`, whole-row q/k norms; NeoX layout.
    /// OLMo 3's files (the same arch with `attention.sliding_window`) are refused.
    Olmo2,
    /// `gptneox`: GPT-NeoX (Pythia, RedPajama-INCITE; `gguf_neox.rs`): LayerNorms and
    /// biases, q|k|v in `attn_qkv` with the heads apart, partial RoPE.
    GptNeox,
}

impl Arch {
    /// Gemma 2 or 3: RMSNorm gains stored as `1 + w`, a norm after each branch.
    pub(crate) fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// A norm after each branch: Gemma 2 and 3, OLMo 2.
    pub(crate) fn post_norms(self) -> bool {
        self.gemma() || self == Arch::Olmo2
    }

    /// The metadata key prefix (`llama.block_count`).
    fn prefix(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Smollm3 => "smollm3",
            Arch::Granite => "granite",
            Arch::Olmo2 => "olmo2",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
            Arch::GptNeox => "gptneox",
        }
    }
}

impl Gguf {
    /// The file's architecture, an error for one not supported.
    pub fn arch(&self) -> Result<Arch, PolicyError> {
        match self.metadata.get("general.architecture") {
            Some(Value::Str(a)) if a == "llama" => Ok(Arch::Llama),
            Some(Value::Str(a)) if a == "smollm3" => Ok(Arch::Smollm3),
            Some(Value::Str(a)) if a == "granite" => Ok(Arch::Granite),
            Some(Value::Str(a)) if a == "olmo2" => Ok(Arch::Olmo2),
            Some(Value::Str(a)) if a == "qwen2" => Ok(Arch::Qwen2),
            Some(Value::Str(a)) if a == "qwen3" => Ok(Arch::Qwen3),
            Some(Value::Str(a)) if a == "gemma2" => Ok(Arch::Gemma2),
            Some(Value::Str(a)) if a == "gemma3" => Ok(Arch::Gemma3),
            Some(Value::Str(a)) if a == "phi3" => Ok(Arch::Phi3),
            Some(Value::Str(a)) if a == "gptneox" => Ok(Arch::GptNeox),
            other => {
                let msg = format!(
                    "general.architecture {other:?} is not supported (llama, qwen2, qwen3, gemma2, gemma3, phi3, \
                     smollm3, granite, olmo2 and gptneox are)"
                );
                Err(self.err("metadata", msg))
            }
        }
    }

    /// The vocabulary size: the rows of `token_embd.weight`.
    pub(crate) fn vocab_size(&self) -> Result<u64, PolicyError> {
        let embd = self.tensors.iter().find(|t| t.name == "token_embd.weight");
        let embd = embd.ok_or_else(|| self.err("token_embd.weight", "missing"))?;
        embd.ne.get(1).copied().ok_or_else(|| self.err("token_embd.weight", "must have 2 dimensions"))
    }

    /// An optional integer metadata value (present but not an integer is an error).
    pub(crate) fn int_opt(&self, key: &str) -> Result<Option<usize>, PolicyError> {
        self.metadata.get(key).map(|_| self.int(key)).transpose()
    }

    /// An optional number (present but not a number is an error).
    pub(crate) fn float_opt(&self, key: &str) -> Result<Option<f64>, PolicyError> {
        self.metadata.get(key).map(|_| self.float(key)).transpose()
    }
}

/// The HF config (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
/// `Gemma2ForCausalLM`, `Gemma3ForCausalLM`, `Phi3ForCausalLM` or `GPTNeoXForCausalLM`, whose
/// own fields [`Arch::Gemma2`], [`Arch::Gemma3`], [`Arch::Phi3`] and [`Arch::GptNeox`] describe) of a file: sizes from the
/// `<arch>.*` metadata, the head width from `attention.key_length` when given, tied embeddings
/// when there is no `output.weight`, the special ids from `tokenizer.ggml.*` (EOS together with
/// the end-of-turn and end-of-message ids, which end a generation in llama.cpp too; a
/// SentencePiece vocabulary's BOS 1 and EOS 2 unless named), and Llama 3's RoPE scaling
/// recovered from a `rope_freqs.weight` tensor ([`crate::rope::Llama3Scaling::from_freq_factors`]).
pub fn model_config(g: &Gguf) -> Result<ModelConfig, PolicyError> {
    let arch = g.arch()?;
    if arch == Arch::GptNeox {
        return checked_config(g, arch, crate::gguf_neox::model_config(g, special_ids(g)?)?);
    }
    let key = |k: &str| format!("{}.{k}", arch.prefix());
    let vocab = g.vocab_size()?;
    let (hidden, n_head) = (g.int(&key("embedding_length"))?, g.int(&key("attention.head_count"))?);
    if n_head == 0 {
        return Err(g.err("metadata", format!("`{}` must be positive", key("attention.head_count"))));
    }
    let head_dim = g.int_opt(&key("attention.key_length"))?.unwrap_or(hidden / n_head);
    let rotary = g.int_opt(&key("rope.dimension_count"))?.filter(|&r| r != head_dim);
    if let Some(rot) = rotary.filter(|_| arch != Arch::Phi3) {
        let msg = format!("RoPE on {rot} of each head's {head_dim} dimensions (partial rotary) is not supported");
        return Err(g.err("metadata", msg));
    }
    let rope_theta = g.float_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
    // linear scaling (gemma-3-4b and up: llama.cpp, as transformers, leaves the sliding layers
    // unscaled)
    let scaling = match g.metadata.get(&key("rope.scaling.type")) {
        None => None,
        Some(Value::Str(t)) if t == "none" => None,
        Some(Value::Str(t)) if t == "linear" => {
            Some(serde_json::json!({"rope_type": "linear", "factor": g.float(&key("rope.scaling.factor"))?}))
        }
        // Gemma's configs take linear scaling only
        Some(Value::Str(t)) if t == "yarn" && !arch.gemma() => Some(yarn_scaling(g, &key)?),
        Some(other) => {
            let msg = format!("RoPE scaling {other:?} (`{}`) is not supported", key("rope.scaling.type"));
            return Err(g.err("metadata", msg));
        }
    };
    let special = special_ids(g)?;
    let mut cfg = serde_json::json!({
        "model_type": arch.prefix(),
        "architectures": [match arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Smollm3 => "SmolLM3ForCausalLM",
            Arch::Granite => "GraniteForCausalLM",
            Arch::Olmo2 => "Olmo2ForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::GptNeox => unreachable!("read by gguf_neox::model_config"),
        }],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.int(&key("feed_forward_length"))?,
        "num_hidden_layers": g.int(&key("block_count"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": g.int_opt(&key("attention.head_count_kv"))?.unwrap_or(n_head),
        "head_dim": head_dim,
        "rms_norm_eps": g.float(&key("attention.layer_norm_rms_epsilon"))? as f32 as f64,
        "rope_theta": rope_theta,
        "max_position_embeddings": g.int(&key("context_length"))?,
        "tie_word_embeddings": !g.tensors.iter().any(|t| t.name == "output.weight"),
    });
    cfg.as_object_mut().expect("a JSON object").extend(special.as_object().expect("an object").clone());
    match arch {
        Arch::Gemma2 => crate::gguf_gemma::gemma2_fields(g, head_dim, &mut cfg)?,
        Arch::Gemma3 => crate::gguf_gemma::gemma3_fields(g, head_dim, &mut cfg)?,
        Arch::Granite => crate::granite::gguf_fields(g, head_dim, &mut cfg)?,
        Arch::Olmo2 if g.metadata.contains_key("olmo2.attention.sliding_window") => {
            let msg = "OLMo 3 (local layers) is not read from GGUF files; its HF checkpoints load";
            return Err(g.err("olmo2.attention.sliding_window", msg));
        }
        _ => {}
    }
    if arch == Arch::Phi3 {
        crate::phi3::gguf_fields(g, head_dim, rotary, &mut cfg)?;
    }
    if arch == Arch::Smollm3 {
        cfg["no_rope_layer_interval"] = 4.into(); // llama.cpp's, fixed
    }
    let scaled = scaling.is_some();
    if let Some(scaling) = scaling {
        cfg["rope_scaling"] = scaling;
    }
    if let Some(s) = rope_scaling(g, head_dim, rope_theta as f32)?.filter(|_| !scaled) {
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings});
    }
    checked_config(g, arch, cfg)
}

/// `cfg` read as a config and checked, its errors naming the file.
fn checked_config(g: &Gguf, arch: Arch, cfg: serde_json::Value) -> Result<ModelConfig, PolicyError> {
    let cfg: ModelConfig = serde_json::from_value(cfg)
        .map_err(|e| g.err("metadata", format!("not a valid {} config: {e}", arch.prefix())))?;
    cfg.dims().map_err(|e| g.err("metadata", e.to_string()))?;
    Ok(cfg)
}

/// `bos_token_id`, `eos_token_id` and `pad_token_id` from `tokenizer.ggml.*`: EOS together with
/// the end-of-turn and end-of-message ids (a list when more than one), and llama.cpp's
/// defaults for a SentencePiece vocabulary that names neither BOS nor EOS.
fn special_ids(g: &Gguf) -> Result<serde_json::Value, PolicyError> {
    let token = |key: &str| g.int_opt(key).map(|id| id.map(|id| id as u32));
    let mut eos: Vec<u32> = vec![];
    for k in ["eos", "eot", "eom"] {
        if let Some(id) = token(&format!("tokenizer.ggml.{k}_token_id"))?.filter(|id| !eos.contains(id)) {
            eos.push(id);
        }
    }
    let sentencepiece = crate::gguf_tokenizer::is_sentencepiece(g);
    let bos = token("tokenizer.ggml.bos_token_id")?.or(sentencepiece.then_some(SENTENCEPIECE_BOS as u32));
    if eos.is_empty() && sentencepiece {
        eos.push(SENTENCEPIECE_EOS);
    }
    Ok(serde_json::json!({
        "bos_token_id": bos,
        "eos_token_id": if eos.len() > 1 { serde_json::json!(eos) } else { serde_json::json!(eos.first()) },
        "pad_token_id": token("tokenizer.ggml.padding_token_id")?,
    }))
}

/// A `yarn` scaling's transformers config (see [`crate::yarn`]) from the converter's keys:
/// `rope.scaling.factor` and `original_context_length`, and where given the betas and the
/// attention factor (transformers' `attention_factor`, which the converter copies). An
/// extrapolation factor other than YaRN's 1 is refused, as is DeepSeek's `yarn_log_multiplier`.
fn yarn_scaling(g: &Gguf, key: &dyn Fn(&str) -> String) -> Result<serde_json::Value, PolicyError> {
    for (k, plain) in [("rope.scaling.yarn_ext_factor", 1.0), ("rope.scaling.yarn_log_multiplier", 0.0)] {
        if let Some(v) = g.float_opt(&key(k))?.filter(|&v| v != plain) {
            return Err(g.err("metadata", format!("`{}` = {v} is not supported", key(k))));
        }
    }
    let mut yarn = serde_json::json!({
        "rope_type": "yarn",
        "factor": g.float(&key("rope.scaling.factor"))?,
        "original_max_position_embeddings": g.int(&key("rope.scaling.original_context_length"))?,
    });
    for (k, hf) in
        [("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("yarn_attn_factor", "attention_factor")]
    {
        if let Some(v) = g.float_opt(&key(&format!("rope.scaling.{k}")))? {
            yarn[hf] = v.into();
        }
    }
    Ok(yarn)
}

/// Llama 3's RoPE scaling from the `rope_freqs.weight` tensor, if the file has one.
fn rope_scaling(g: &Gguf, head_dim: usize, theta: f32) -> Result<Option<Llama3Scaling>, PolicyError> {
    const NAME: &str = "rope_freqs.weight";
    if !g.tensors.iter().any(|t| t.name == NAME) {
        return Ok(None);
    }
    let factors = g.tensor(NAME)?.data;
    Llama3Scaling::from_freq_factors(&crate::rope::unscaled_inv_freq(head_dim, theta), &factors)
        .map_err(|e| g.err(NAME, e))
}

/// Every tensor under its HF name, with llama.cpp's permutation of a Llama file's q/k rows
/// undone (within each head, GGUF row `2i + j` is HF row `j·hd/2 + i`), and a GPT-NeoX file's
/// `attn_qkv` rows back head by head (`gguf_neox.rs`).
pub fn hf_tensors(g: &Gguf, cfg: &ModelConfig) -> Result<BTreeMap<String, HostTensor>, PolicyError> {
    let (dims, arch) = (cfg.dims()?, g.arch()?);
    let mut out = BTreeMap::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" || crate::phi3::LONGROPE_TENSORS.contains(&t.name.as_str()) {
            continue; // read into the config's rope_scaling by model_config
        }
        let name = match arch {
            Arch::GptNeox => crate::gguf_neox::hf_name(&t.name),
            _ => crate::gguf_names::hf_name(&t.name, arch),
        };
        let name = name.ok_or_else(|| g.err(&t.name, format!("unexpected tensor for a {} model", arch.prefix())))?;
        let mut x = g.tensor(&t.name)?;
        if arch == Arch::GptNeox && t.name.contains(".attn_qkv.") {
            let cols = if x.shape.len() == 2 { x.shape[1] } else { 1 };
            x.data = crate::gguf_neox::heads_together(&x.data, cols, dims.n_head, dims.head_dim);
        }
        let permuted = matches!(arch, Arch::Llama | Arch::Smollm3 | Arch::Granite);
        if permuted && (t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_k.weight")) {
            x.data = crate::gguf_names::unpermute_rows(&x.data, x.shape[1], dims.head_dim);
        }
        if arch.gemma() && t.name.ends_with("norm.weight") {
            x.data.iter_mut().for_each(|w| *w -= 1.0); // stored as the gain 1 + w
        }
        out.insert(name, x);
    }
    Ok(out)
}
