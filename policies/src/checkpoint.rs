//! Checkpoints in Hugging Face layout: a folder with `config.json`, `model.safetensors` and
//! (optionally) `tokenizer.json`.
//!
//! Tensor names follow transformers exactly, per family (the `hf_names` module): fused q/k/v
//! tensors are split on load and re-fused on save, `nn.Linear` weights transposed into our
//! `(in, out)` layout and back. So a folder written here loads with
//! `AutoModelForCausalLM.from_pretrained`, and an HF folder loads here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use dfdx::prelude::*;

use crate::config::ModelConfig;
use crate::error::PolicyError;
use crate::hf_names::{hf_source, is_known_buffer, normalise_names, Source};
use crate::model::CausalLm;
use crate::params::ParamMut;
use crate::tokenizer::Tokenizer;

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

/// The folder whose `config.json` describes the model in `dir`: `dir`, or a PEFT adapter's base.
pub fn config_dir(dir: &Path) -> Result<PathBuf, PolicyError> {
    match crate::peft::is_adapter(dir) {
        true => {
            crate::peft::resolve_base(dir, &crate::peft::AdapterConfig::read(&dir.join(crate::peft::ADAPTER_CONFIG))?)
        }
        false => Ok(dir.to_path_buf()),
    }
}

/// A model folder's weights: the file to name in errors and the HF state dict ([`read_weights`],
/// or a PEFT adapter's merged into its base's, [`crate::peft::read_merged`]).
pub fn read_model(dir: &Path) -> Result<(PathBuf, BTreeMap<String, HostTensor>), PolicyError> {
    match crate::peft::is_adapter(dir) {
        true => crate::peft::read_merged(dir),
        false => read_weights(dir),
    }
}

/// The folder holding a model folder's tokenizer files: the folder, or for a PEFT adapter saved
/// without them, its base's.
pub fn tokenizer_dir(dir: &Path) -> Result<PathBuf, PolicyError> {
    match dir.join("tokenizer.json").is_file() {
        true => Ok(dir.to_path_buf()),
        false => config_dir(dir),
    }
}

/// Whether the parameter `name` is a LoRA update's `A` or `B`, or DoRA's magnitude
/// ([`crate::lora`]).
pub fn is_lora(name: &str) -> bool {
    name.ends_with(".lora_a") || name.ends_with(".lora_b") || name.ends_with(".lora_magnitude")
}

/// Whether `name` is a causal-mask buffer older transformers saved with the weights (GPT-2's
/// `attn.bias`, GPT-NeoX's `attention.bias` and `masked_bias`): the masks are built per
/// forward here, so these are never read, whatever their dtype (Pythia's are bool or uint8).
fn is_mask_buffer(name: &str) -> bool {
    [".attn.bias", ".attention.bias", ".attn.masked_bias", ".attention.masked_bias"].iter().any(|s| name.ends_with(s))
}

/// Reads every tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted); a
/// causal-mask buffer of another dtype (bool, integers) is left out, any other such tensor is
/// an error.
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
            _ if is_mask_buffer(&name) => continue,
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
    write_safetensors_as(path, tensors, WeightDtype::F32)
}

/// The number format of a written safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// 32-bit floats, exact.
    #[default]
    F32,
    /// IEEE half precision (rounded to nearest even; a value beyond ±65504 is an error).
    F16,
    /// bfloat16 (rounded to nearest even).
    Bf16,
}

impl WeightDtype {
    /// transformers' name of the dtype (`config.json`'s `torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::F16 => "float16",
            WeightDtype::Bf16 => "bfloat16",
        }
    }

    /// Sets a `config.json` value's `torch_dtype` to this dtype, unless it is f32 (the files
    /// rlhf writes otherwise, which leave it out).
    pub fn mark(self, config: &mut serde_json::Value) {
        if self != WeightDtype::F32 {
            config["torch_dtype"] = self.torch_name().into();
        }
    }
}

/// [`write_safetensors`] in `dtype`. A finite value that F16 cannot hold is an error naming
/// the tensor (it would turn into infinity).
pub fn write_safetensors_as(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: WeightDtype,
) -> Result<(), PolicyError> {
    for (name, t) in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            let why = format!("{} values for shape {:?}", t.data.len(), t.shape);
            return Err(PolicyError::tensor(path, name, why));
        }
        if dtype == WeightDtype::F16 {
            if let Some(v) = t.data.iter().find(|v| v.is_finite() && v.abs() > 65504.0) {
                return Err(PolicyError::tensor(path, name, format!("{v} is beyond F16's range (±65504)")));
            }
        }
    }
    let views = tensors.iter().map(|(n, t)| (n.as_str(), F32View(t, dtype)));
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let tmp = path.with_extension("tmp");
    ::safetensors::serialize_to_file(views, &meta, &tmp).map_err(|e| match e {
        ::safetensors::SafeTensorError::IoError(e) => PolicyError::io(&tmp, e),
        e => PolicyError::tensor(path, "<all>", format!("serialising failed: {e:?}")),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| PolicyError::io(path, e))
}

/// An f32 [`HostTensor`] as safetensors writes it in a dtype: its little-endian bytes, made
/// when the writer reaches it.
struct F32View<'a>(&'a HostTensor, WeightDtype);

impl ::safetensors::View for F32View<'_> {
    fn dtype(&self) -> ::safetensors::Dtype {
        match self.1 {
            WeightDtype::F32 => ::safetensors::Dtype::F32,
            WeightDtype::F16 => ::safetensors::Dtype::F16,
            WeightDtype::Bf16 => ::safetensors::Dtype::BF16,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let d = &self.0.data;
        match self.1 {
            WeightDtype::F32 => d.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into(),
            WeightDtype::F16 => {
                d.iter().flat_map(|v| crate::half::f32_to_f16(*v).to_le_bytes()).collect::<Vec<u8>>().into()
            }
            WeightDtype::Bf16 => {
                d.iter().flat_map(|v| crate::half::f32_to_bf16(*v).to_le_bytes()).collect::<Vec<u8>>().into()
            }
        }
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * if self.1 == WeightDtype::F32 { 4 } else { 2 }
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
        let d = &self.dims;
        let mut out: BTreeMap<String, HostTensor> = BTreeMap::new();
        let mut fused: BTreeMap<String, (Source, Vec<Option<HostTensor>>)> = BTreeMap::new();
        // a LoRA layer's weight as it applies it, `W + s·A·B` (crate::lora); A and B not stored
        let merged: HashMap<String, Vec<f32>> = self
            .linears()
            .into_iter()
            .filter(|(_, l)| l.lora.is_some())
            .map(|(n, l)| (format!("{n}.weight"), l.merged_w()))
            .collect();
        for (name, p) in self.params() {
            if is_lora(&name) {
                continue;
            }
            let data = merged.get(&name).cloned().unwrap_or_else(|| p.to_vec());
            let t = HostTensor { shape: p.shape(), data };
            let src = hf_source(d, &name);
            match src.fused() {
                Some((name, part, parts)) => {
                    let entry = fused.entry(name.to_string()).or_insert_with(|| (src.clone(), vec![None; parts]));
                    entry.1[part] = Some(t);
                }
                None => {
                    out.insert(src.name().to_string(), src.to_hf(vec![t]));
                }
            }
        }
        for (name, (src, parts)) in fused {
            let parts: Vec<HostTensor> =
                parts.into_iter().map(|p| p.expect("q, k and v are always walked together")).collect();
            out.insert(name, src.to_hf(parts));
        }
        out
    }

    /// The HF state dict's name of the tensor our parameter `canonical` is read from (see
    /// [`CausalLm::params`]): `"lm_head"` is `lm_head.weight`, or GPT-NeoX's `embed_out.weight`.
    pub fn hf_name(&self, canonical: &str) -> String {
        hf_source(&self.dims, canonical).name().to_string()
    }

    /// Fills every parameter from an HF state dict read from `file`. Every tensor must be used,
    /// except known buffers; missing tensors and shape mismatches are errors naming the tensor.
    pub fn load_hf_tensors(&mut self, file: &Path, tensors: BTreeMap<String, HostTensor>) -> Result<(), PolicyError> {
        let d = self.dims;
        let (family, tied) = (d.family, d.tied);
        let mut tensors = normalise_names(family, tensors);
        let mut used = BTreeSet::new();
        let dev = self.dev.clone();
        // a LoRA update is not in an HF state dict: it keeps its values
        let sources: Vec<Option<Source>> =
            self.params_mut().iter().map(|(name, _)| (!is_lora(name)).then(|| hf_source(&d, name))).collect();
        // how many parameters still read each source tensor: the last one takes it (no copy)
        let mut readers: BTreeMap<String, usize> = BTreeMap::new();
        for src in sources.iter().flatten() {
            *readers.entry(src.name().to_string()).or_default() += 1;
        }
        for ((_, p), src) in self.params_mut().into_iter().zip(&sources) {
            let Some(src) = src else { continue };
            let name = src.name();
            let left = readers.get_mut(name).expect("counted above");
            *left -= 1;
            let t = if *left == 0 { tensors.remove(name) } else { tensors.get(name).cloned() }
                .ok_or_else(|| PolicyError::tensor(file, name, "missing from the checkpoint"))?;
            used.insert(name.to_string());
            let value = src.to_ours(file, t)?;
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
    /// [`SHARD_INDEX`]), or a PEFT LoRA adapter folder as its base with the adapter merged
    /// ([`crate::peft`]).
    pub fn load_pretrained(dir: &Path, dev: &D) -> Result<Self, PolicyError> {
        let config = ModelConfig::from_file(&config_dir(dir)?.join("config.json"))?;
        let (weights, tensors) = read_model(dir)?;
        let mut model = CausalLm::zeroed(config, dev)?;
        model.load_hf_tensors(&weights, tensors)?;
        model.origin = Some(dir.to_path_buf());
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
        model.origin = Some(path.to_path_buf());
        Ok(model)
    }

    /// Writes `config.json`, `model.safetensors` and (if given) `tokenizer.json` into `dir`.
    pub fn save_pretrained(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<(), PolicyError> {
        self.save_pretrained_as(dir, tokenizer, WeightDtype::F32)
    }

    /// [`CausalLm::save_pretrained`] with the weights in `dtype` (and `config.json`'s
    /// `torch_dtype` saying so when it is not f32).
    pub fn save_pretrained_as(
        &self,
        dir: &Path,
        tokenizer: Option<&Tokenizer>,
        dtype: WeightDtype,
    ) -> Result<(), PolicyError> {
        std::fs::create_dir_all(dir).map_err(|e| PolicyError::io(dir, e))?;
        let text = match dtype {
            // the config's own field order (a JSON value would sort the keys)
            WeightDtype::F32 => self.config.to_json_pretty(),
            _ => {
                let mut config = serde_json::to_value(&self.config).expect("ModelConfig serialises: plain data");
                dtype.mark(&mut config);
                serde_json::to_string_pretty(&config).expect("JSON value serialises")
            }
        };
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        write_safetensors_as(&dir.join("model.safetensors"), &self.to_hf_tensors(), dtype)?;
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
        let files = tokenizer_dir(dir)?;
        let tok_path = files.join("tokenizer.json");
        let mut tok = Tokenizer::from_file(&tok_path)?;
        tok.chat_template = crate::chat::ChatTemplate::source_of(&files)?;
        tok.generation = crate::tokenizer::GenerationConfig::read(&files)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// F16 and BF16 files read back as the values rounded to nearest even; a value F16 cannot
    /// hold is an error naming its tensor, not an infinity.
    #[test]
    fn half_precision_files_round_and_refuse_what_they_cannot_hold() {
        let path = std::env::temp_dir().join(format!("rlhf-half-{}.safetensors", std::process::id()));
        let values = vec![1.0f32, -2.5, 1.0 + 1.0 / 1024.0 + 1e-7, 3.0e-3, 60000.0, 0.0];
        let t = BTreeMap::from([("w".to_string(), HostTensor { shape: vec![2, 3], data: values.clone() })]);
        for (dtype, round) in [
            (WeightDtype::F16, (|v: f32| crate::half::f16_to_f32(crate::half::f32_to_f16(v))) as fn(f32) -> f32),
            (WeightDtype::Bf16, |v: f32| f32::from_bits((crate::half::f32_to_bf16(v) as u32) << 16)),
        ] {
            write_safetensors_as(&path, &t, dtype).unwrap();
            let back = read_safetensors(&path).unwrap();
            assert_eq!(back["w"].data, values.iter().map(|v| round(*v)).collect::<Vec<_>>(), "{dtype:?}");
            assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, 8 + header_len(&path) + 2 * 6);
        }
        let big = BTreeMap::from([("big".to_string(), HostTensor { shape: vec![1], data: vec![70000.0] })]);
        let err = write_safetensors_as(&path, &big, WeightDtype::F16).unwrap_err().to_string();
        assert!(err.contains("big") && err.contains("beyond F16's range"), "{err}");
        write_safetensors_as(&path, &big, WeightDtype::Bf16).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// The JSON header's length, from a safetensors file's first 8 bytes.
    fn header_len(path: &Path) -> usize {
        let b = std::fs::read(path).unwrap();
        u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
    }
}
