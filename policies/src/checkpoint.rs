//! Checkpoints in Hugging Face layout: a folder with `config.json`, `model.safetensors` and
//! (optionally) `tokenizer.json`.
//!
//! Tensor names follow transformers exactly, per family: GPT-2's fused `c_attn` (Conv1D,
//! `(in, out)`) is split into our q/k/v on load and re-fused on save; Llama's `nn.Linear`
//! weights (`(out, in)`) are transposed into our `(in, out)` layout and back. So a folder
//! written here loads with `AutoModelForCausalLM.from_pretrained`, and an HF folder loads here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use dfdx::prelude::*;

use crate::config::{Family, ModelConfig};
use crate::error::PolicyError;
use crate::model::CausalLm;
use crate::params::ParamMut;
use crate::tokenizer::Tokenizer;

/// Where one of our parameters lives in an HF state dict.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// Same layout.
    Same(String),
    /// Stored transposed (`nn.Linear`'s `(out, in)`).
    Transposed(String),
    /// Columns `part·w .. (part+1)·w` of a fused tensor with `parts` equal column blocks.
    Columns { name: String, part: usize, parts: usize },
}

impl Source {
    fn name(&self) -> &str {
        match self {
            Source::Same(n) | Source::Transposed(n) | Source::Columns { name: n, .. } => n,
        }
    }
}

/// Maps a canonical parameter name (see [`CausalLm::params`]) to its HF source; `post_norms`:
/// Gemma's four norms per block, whose names move the pre-MLP norm off Llama's
/// `post_attention_layernorm`.
fn hf_source(family: Family, post_norms: bool, canonical: &str) -> Source {
    let mut parts = canonical.splitn(3, '.');
    let (head, layer, rest) = (parts.next().unwrap_or(""), parts.next(), parts.next());
    match family {
        Family::Gpt2 => match (head, layer, rest) {
            ("wte", None, None) => Source::Same("transformer.wte.weight".into()),
            ("wpe", None, None) => Source::Same("transformer.wpe.weight".into()),
            ("ln_f", Some(x), None) => Source::Same(format!("transformer.ln_f.{x}")),
            ("blocks", Some(i), Some(rest)) => {
                let p = format!("transformer.h.{i}");
                let (module, x) = rest.rsplit_once('.').unwrap_or((rest, ""));
                match module {
                    "ln1" => Source::Same(format!("{p}.ln_1.{x}")),
                    "ln2" => Source::Same(format!("{p}.ln_2.{x}")),
                    "attn.q" | "attn.k" | "attn.v" => Source::Columns {
                        name: format!("{p}.attn.c_attn.{x}"),
                        part: ["attn.q", "attn.k", "attn.v"].iter().position(|m| *m == module).unwrap_or(0),
                        parts: 3,
                    },
                    "attn.o" => Source::Same(format!("{p}.attn.c_proj.{x}")),
                    "mlp.fc" => Source::Same(format!("{p}.mlp.c_fc.{x}")),
                    "mlp.proj" => Source::Same(format!("{p}.mlp.c_proj.{x}")),
                    _ => Source::Same(canonical.into()),
                }
            }
            _ => Source::Same(canonical.into()),
        },
        Family::Llama => match (head, layer, rest) {
            ("wte", None, None) => Source::Same("model.embed_tokens.weight".into()),
            ("lm_head", None, None) => Source::Same("lm_head.weight".into()),
            ("ln_f", Some(x), None) => Source::Same(format!("model.norm.{x}")),
            ("blocks", Some(i), Some(rest)) => {
                let p = format!("model.layers.{i}");
                let (module, x) = rest.rsplit_once('.').unwrap_or((rest, ""));
                // weights are stored (out, in); biases (Qwen2's q/k/v) as they are
                let lin = |n: &str| match x {
                    "bias" => Source::Same(format!("{p}.{n}.{x}")),
                    _ => Source::Transposed(format!("{p}.{n}.{x}")),
                };
                match module {
                    "ln1" => Source::Same(format!("{p}.input_layernorm.{x}")),
                    "ln2" if post_norms => Source::Same(format!("{p}.pre_feedforward_layernorm.{x}")),
                    "ln2" => Source::Same(format!("{p}.post_attention_layernorm.{x}")),
                    "attn.post_norm" => Source::Same(format!("{p}.post_attention_layernorm.{x}")),
                    "mlp.post_norm" => Source::Same(format!("{p}.post_feedforward_layernorm.{x}")),
                    "attn.q" => lin("self_attn.q_proj"),
                    "attn.k" => lin("self_attn.k_proj"),
                    "attn.v" => lin("self_attn.v_proj"),
                    "attn.o" => lin("self_attn.o_proj"),
                    "attn.q_norm" => Source::Same(format!("{p}.self_attn.q_norm.{x}")),
                    "attn.k_norm" => Source::Same(format!("{p}.self_attn.k_norm.{x}")),
                    "mlp.gate" => lin("mlp.gate_proj"),
                    "mlp.up" => lin("mlp.up_proj"),
                    "mlp.down" => lin("mlp.down_proj"),
                    _ => Source::Same(canonical.into()),
                }
            }
            _ => Source::Same(canonical.into()),
        },
    }
}

/// Tensors HF checkpoints may carry that are buffers, not parameters (safe to ignore).
fn is_known_buffer(family: Family, name: &str, tied: bool) -> bool {
    match family {
        Family::Gpt2 => name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight",
        Family::Llama => name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight"),
    }
}

/// A dense f32 tensor read from a weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A sharded checkpoint's index (transformers' layout for large models: `weight_map` names each
/// tensor's shard file).
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Every tensor of an HF folder's weights, with the file to name in errors:
/// `model.safetensors`, or else the shards [`SHARD_INDEX`] lists (each read once; every tensor
/// the index names must be in its shard).
pub fn read_weights(dir: &Path) -> Result<(PathBuf, BTreeMap<String, HostTensor>), PolicyError> {
    let single = dir.join("model.safetensors");
    let index = dir.join(SHARD_INDEX);
    if single.is_file() || !index.is_file() {
        return Ok((single.clone(), read_safetensors(&single)?));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| PolicyError::io(&index, e))?;
    let bad = |msg: String| PolicyError::tensor(&index, "weight_map", msg);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map: BTreeMap<String, String> = serde_json::from_value(v["weight_map"].clone())
        .map_err(|e| bad(format!("must map tensor names to shard files: {e}")))?;
    let mut out = BTreeMap::new();
    for shard in map.values().collect::<BTreeSet<_>>() {
        out.extend(read_safetensors(&dir.join(shard))?);
    }
    if let Some((name, shard)) = map.iter().find(|(name, _)| !out.contains_key(*name)) {
        return Err(PolicyError::tensor(
            &dir.join(shard),
            name,
            format!("listed in {SHARD_INDEX} but not in the shard"),
        ));
    }
    Ok((index, out))
}

/// Reads every tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, PolicyError> {
    let buf = std::fs::read(path).map_err(|e| PolicyError::io(path, e))?;
    let st = ::safetensors::SafeTensors::deserialize(&buf)
        .map_err(|e| PolicyError::tensor(path, "<header>", format!("not a valid safetensors file: {e:?}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bytes = view.data();
        let data = match view.dtype() {
            ::safetensors::Dtype::F32 => {
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            ::safetensors::Dtype::F16 => {
                bytes.chunks_exact(2).map(|c| crate::half::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
            ::safetensors::Dtype::BF16 => {
                bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            other => {
                return Err(PolicyError::tensor(
                    path,
                    &name,
                    format!("dtype {other:?} is not supported (F32, F16, BF16)"),
                ))
            }
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

/// Writes f32 tensors to a safetensors file (with transformers' `{"format": "pt"}` metadata),
/// through a temporary file and a rename so a crash never leaves a half-written file. The
/// tensors stream to the file one at a time: besides `tensors`, only the largest one's bytes
/// are held (a whole-file buffer was three copies of a model at its peak).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<(), PolicyError> {
    for (name, t) in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            let why = format!("{} values for shape {:?}", t.data.len(), t.shape);
            return Err(PolicyError::tensor(path, name, why));
        }
    }
    let views = tensors.iter().map(|(n, t)| (n.as_str(), F32View(t)));
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let tmp = path.with_extension("tmp");
    ::safetensors::serialize_to_file(views, &meta, &tmp).map_err(|e| match e {
        ::safetensors::SafeTensorError::IoError(e) => PolicyError::io(&tmp, e),
        e => PolicyError::tensor(path, "<all>", format!("serialising failed: {e:?}")),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| PolicyError::io(path, e))
}

/// An f32 [`HostTensor`] as safetensors writes it: its little-endian bytes, made when the
/// writer reaches it.
struct F32View<'a>(&'a HostTensor);

impl ::safetensors::View for F32View<'_> {
    fn dtype(&self) -> ::safetensors::Dtype {
        ::safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }
    fn data_len(&self) -> usize {
        4 * self.0.data.len()
    }
}

/// Writes `bytes` to `path` via `path.tmp` + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PolicyError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| PolicyError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PolicyError::io(path, e))
}

impl<D: crate::fused::FusedOps> CausalLm<D> {
    /// The model's weights as an HF state dict.
    pub fn to_hf_tensors(&self) -> BTreeMap<String, HostTensor> {
        let family = self.dims.family;
        let mut out: BTreeMap<String, HostTensor> = BTreeMap::new();
        let mut fused: BTreeMap<String, Vec<Option<HostTensor>>> = BTreeMap::new();
        for (name, p) in self.params() {
            let t = HostTensor { shape: p.shape(), data: p.to_vec() };
            match hf_source(family, self.dims.post_norms, &name) {
                Source::Same(n) => {
                    out.insert(n, t);
                }
                Source::Transposed(n) => {
                    out.insert(n, transpose(&t));
                }
                Source::Columns { name, part, parts } => {
                    fused.entry(name).or_insert_with(|| vec![None; parts])[part] = Some(t);
                }
            }
        }
        for (name, parts) in fused {
            let parts: Vec<HostTensor> =
                parts.into_iter().map(|p| p.expect("q, k and v are always walked together")).collect();
            out.insert(name, concat_columns(&parts));
        }
        out
    }

    /// Fills every parameter from an HF state dict read from `file`. Every tensor must be used,
    /// except known buffers; missing tensors and shape mismatches are errors naming the tensor.
    pub fn load_hf_tensors(&mut self, file: &Path, tensors: BTreeMap<String, HostTensor>) -> Result<(), PolicyError> {
        let family = self.dims.family;
        let tied = self.dims.tied;
        let mut tensors = normalise_names(family, tensors);
        let mut used = BTreeSet::new();
        let dev = self.dev.clone();
        let post_norms = self.dims.post_norms;
        let sources: Vec<Source> =
            self.params_mut().iter().map(|(name, _)| hf_source(family, post_norms, name)).collect();
        // how many parameters still read each source tensor: the last one takes it (no copy)
        let mut readers: BTreeMap<String, usize> = BTreeMap::new();
        for src in &sources {
            *readers.entry(src.name().to_string()).or_default() += 1;
        }
        for ((_, p), src) in self.params_mut().into_iter().zip(&sources) {
            let name = src.name();
            let left = readers.get_mut(name).expect("counted above");
            *left -= 1;
            let t = if *left == 0 { tensors.remove(name) } else { tensors.get(name).cloned() }
                .ok_or_else(|| PolicyError::tensor(file, name, "missing from the checkpoint"))?;
            used.insert(name.to_string());
            let value = match src {
                Source::Same(_) => t,
                Source::Transposed(_) => {
                    check_rank(file, name, &t, 2)?;
                    transpose(&t)
                }
                Source::Columns { part, parts, .. } => split_columns(file, name, &t, *part, *parts)?,
            };
            assign(file, name, p, value, &dev)?;
        }
        let unused: Vec<&String> =
            tensors.keys().filter(|n| !used.contains(*n) && !is_known_buffer(family, n, tied)).collect();
        if let Some(first) = unused.first() {
            return Err(PolicyError::tensor(
                file,
                first.as_str(),
                format!(
                    "unexpected tensor ({} unused in all: {:?})",
                    unused.len(),
                    unused.iter().take(5).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }

    /// Loads an HF-layout folder (`config.json` + `model.safetensors`, or its shards and
    /// [`SHARD_INDEX`]).
    pub fn load_pretrained(dir: &Path, dev: &D) -> Result<Self, PolicyError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut model = CausalLm::zeroed(config, dev)?;
        let (weights, tensors) = read_weights(dir)?;
        model.load_hf_tensors(&weights, tensors)?;
        Ok(model)
    }

    /// Loads a `llama`, `qwen2` or `qwen3` GGUF file (llama.cpp's format): its tensors
    /// dequantised to f32 ([`crate::gguf_quants`]), a Llama file's q/k rows un-permuted, config
    /// from the metadata ([`crate::gguf::model_config`]).
    pub fn load_gguf(path: &Path, dev: &D) -> Result<Self, PolicyError> {
        Self::from_gguf(&crate::gguf::Gguf::open(path)?, path, dev)
    }

    /// The model of an opened GGUF file (`path` names it in errors).
    pub fn from_gguf(g: &crate::gguf::Gguf, path: &Path, dev: &D) -> Result<Self, PolicyError> {
        let config = crate::gguf::model_config(g)?;
        let tensors = crate::gguf::hf_tensors(g, &config)?;
        let mut model = CausalLm::zeroed(config, dev)?;
        model.load_hf_tensors(path, tensors)?;
        Ok(model)
    }

    /// Writes `config.json`, `model.safetensors` and (if given) `tokenizer.json` into `dir`.
    pub fn save_pretrained(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<(), PolicyError> {
        std::fs::create_dir_all(dir).map_err(|e| PolicyError::io(dir, e))?;
        write_atomic(&dir.join("config.json"), self.config.to_json_pretty().as_bytes())?;
        write_safetensors(&dir.join("model.safetensors"), &self.to_hf_tensors())?;
        if let Some(tok) = tokenizer {
            tok.save(&dir.join("tokenizer.json"))?;
        }
        Ok(())
    }
}

/// Loads a checkpoint folder (or a GGUF file, [`crate::gguf`]) with its tokenizer, checking that
/// every token id the tokenizer can produce fits the model's vocabulary.
pub fn load_with_tokenizer<D: crate::fused::FusedOps>(
    dir: &Path,
    dev: &D,
) -> Result<(CausalLm<D>, Tokenizer), PolicyError> {
    let is_gguf = dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let (model, tok, tok_path) = if is_gguf {
        // a GGUF file: its own vocabulary and chat template, unless a tokenizer.json sits beside it
        let g = crate::gguf::Gguf::open(dir)?;
        let model = CausalLm::from_gguf(&g, dir, dev)?;
        let beside = dir.with_file_name("tokenizer.json");
        let (mut tok, source) = if beside.is_file() {
            (Tokenizer::from_file(&beside)?, beside)
        } else {
            let json = crate::gguf::tokenizer_json(&g)?;
            (Tokenizer::from_json(&json, &dir.display().to_string())?, dir.to_path_buf())
        };
        tok.chat_template = crate::gguf::chat_template(&g);
        (model, tok, source)
    } else {
        let model = CausalLm::load_pretrained(dir, dev)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tok = Tokenizer::from_file(&tok_path)?;
        tok.chat_template = crate::chat::ChatTemplate::source_of(dir)?;
        tok.generation = crate::tokenizer::GenerationConfig::read(dir)?;
        (model, tok, tok_path)
    };
    if let Some(&id) = tok.generation.iter().flat_map(|g| &g.eos_ids).find(|&&id| id as usize >= model.dims.vocab) {
        let file = dir.join("generation_config.json").display().to_string();
        let msg = format!("{id} is past the model's vocab_size {}", model.dims.vocab);
        return Err(PolicyError::tokenizer(file, "eos_token_id", msg));
    }
    if tok.vocab_size() > model.dims.vocab {
        return Err(PolicyError::tokenizer(
            tok_path.display().to_string(),
            "vocab_size",
            format!(
                "the tokenizer has {} tokens but the model's config.json has vocab_size {}",
                tok.vocab_size(),
                model.dims.vocab
            ),
        ));
    }
    Ok((model, tok))
}

/// Accepts the original GPT-2 names without the `transformer.` prefix.
fn normalise_names(family: Family, tensors: BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
    let needs_prefix = family == Family::Gpt2 && !tensors.keys().any(|k| k.starts_with("transformer."));
    if !needs_prefix {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| (if k.starts_with("lm_head") { k } else { format!("transformer.{k}") }, v))
        .collect()
}

fn assign<D: Device<f32>>(
    file: &Path,
    name: &str,
    p: ParamMut<'_, D>,
    t: HostTensor,
    dev: &D,
) -> Result<(), PolicyError> {
    let mismatch = |want: Vec<usize>| {
        PolicyError::tensor(file, name, format!("shape {:?}, but the config needs {want:?}", t.shape))
    };
    match p {
        ParamMut::V(p) => {
            if t.shape != [p.shape().0] {
                return Err(mismatch(vec![p.shape().0]));
            }
            *p = dev.tensor_from_vec(t.data, (t.shape[0],));
        }
        ParamMut::M(p) => {
            let (r, c) = *p.shape();
            if t.shape != [r, c] {
                return Err(mismatch(vec![r, c]));
            }
            *p = dev.tensor_from_vec(t.data, (r, c));
        }
    }
    Ok(())
}

fn check_rank(file: &Path, name: &str, t: &HostTensor, rank: usize) -> Result<(), PolicyError> {
    if t.shape.len() != rank {
        return Err(PolicyError::tensor(
            file,
            name,
            format!("rank {} (shape {:?}), expected rank {rank}", t.shape.len(), t.shape),
        ));
    }
    Ok(())
}

fn transpose(t: &HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    HostTensor { shape: vec![c, r], data: transpose_rows(&t.data, r, c) }
}

/// `(r, c)` row-major → `(c, r)` row-major, in square tiles written a row at a time: the
/// element-by-element loop strode through the output (a 49152-row LM head at 8 ns a value,
/// its stride a multiple of the page size) and took a quarter of a checkpoint's loading.
pub(crate) fn transpose_rows(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    const TILE: usize = 32;
    assert_eq!(a.len(), r * c, "transpose: {} values for {r}x{c}", a.len());
    let mut t = vec![0.0f32; r * c];
    for i0 in (0..r).step_by(TILE) {
        for j0 in (0..c).step_by(TILE) {
            for j in j0..(j0 + TILE).min(c) {
                let out = &mut t[j * r..(j + 1) * r];
                for i in i0..(i0 + TILE).min(r) {
                    out[i] = a[i * c + j];
                }
            }
        }
    }
    t
}

/// Columns `part` of `parts` equal blocks; a 1-D tensor is treated as one row.
fn split_columns(
    file: &Path,
    name: &str,
    t: &HostTensor,
    part: usize,
    parts: usize,
) -> Result<HostTensor, PolicyError> {
    let (rows, cols) = match t.shape.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        s => return Err(PolicyError::tensor(file, name, format!("shape {s:?}, expected 1-D or 2-D"))),
    };
    if cols % parts != 0 {
        return Err(PolicyError::tensor(file, name, format!("{cols} columns do not split into {parts} equal parts")));
    }
    let w = cols / parts;
    let data = (0..rows).flat_map(|r| t.data[r * cols + part * w..r * cols + (part + 1) * w].iter().copied()).collect();
    let shape = if t.shape.len() == 1 { vec![w] } else { vec![rows, w] };
    Ok(HostTensor { shape, data })
}

fn concat_columns(parts: &[HostTensor]) -> HostTensor {
    let rows = if parts[0].shape.len() == 1 { 1 } else { parts[0].shape[0] };
    let widths: Vec<usize> = parts.iter().map(|p| *p.shape.last().expect("non-empty shape")).collect();
    let mut data = Vec::with_capacity(rows * widths.iter().sum::<usize>());
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(&widths) {
            data.extend_from_slice(&p.data[r * w..(r + 1) * w]);
        }
    }
    let total: usize = widths.iter().sum();
    let shape = if parts[0].shape.len() == 1 { vec![total] } else { vec![rows, total] };
    HostTensor { shape, data }
}

#[cfg(test)]
mod tests {
    use super::transpose_rows;

    /// The tiled transpose against the definition, for shapes around and between tiles.
    #[test]
    fn transpose_rows_is_the_transpose() {
        for (r, c) in [(1, 1), (3, 70), (32, 32), (33, 31), (100, 7), (0, 5), (65, 96)] {
            let a: Vec<f32> = (0..r * c).map(|i| i as f32 * 0.5 - 3.0).collect();
            let t = transpose_rows(&a, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], a[i * c + j], "{r}x{c} at ({i}, {j})");
                }
            }
            assert_eq!(transpose_rows(&t, c, r), a, "{r}x{c} twice");
        }
    }
}
