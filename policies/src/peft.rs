//! PEFT LoRA adapters (Hu et al. 2021, "LoRA"), read as their base model with the adapter
//! merged in: `W' = W + s·B·A` for each adapted layer (`A` `(r, in)`, `B` `(out, r)`,
//! `s = lora_alpha / r`, or `lora_alpha / √r` with rsLoRA), which is what PEFT's
//! `merge_and_unload()` computes and what its unmerged forward `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` equals.
//! A DoRA adapter (`use_dora`; Liu et al. 2024, "DoRA", eq. 5) also holds each layer's magnitude
//! vector `m` (one number per output): `W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c`, each output's
//! row of weights rescaled to norm `m_j` (the norm over that output's inputs), as PEFT merges it.
//!
//! A folder holding `adapter_config.json` and `adapter_model.safetensors` but no weights of its
//! own is such an adapter. Its base is `base_model_name_or_path`: a folder (as given, or relative
//! to the adapter's folder), or a Hub id found in the local Hugging Face cache
//! (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`; at the adapter's `revision`,
//! else `main`). Nothing is downloaded.
//!
//! The merge works on the HF state dict, before our own names and layouts: a fused tensor (GPT-2's
//! `c_attn`) takes its delta whole, a Conv1D weight (`fan_in_fan_out`) its transpose, an embedding
//! (`lora_embedding_A/B`) `(B·A)ᵀ`. Whole tensors in the adapter (`modules_to_save`, such as a new
//! `lm_head` or a reward model's `score`; biases trained under `bias: "all"/"lora_only"`, stored as
//! `….base_layer.bias`) replace the base's. What PEFT cannot merge, or what this does not read,
//! is refused by name: aLoRA, layer replication, QA-LoRA, trainable tokens, other PEFT types,
//! pickled `.bin` files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::{read_safetensors, read_weights, HostTensor, SHARD_INDEX};
use crate::error::PolicyError;
use crate::strided::{gemm_into, View};

/// The adapter's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Whether `dir` is a PEFT adapter folder: an `adapter_config.json` and no weights of its own
/// (a folder with both is read as the full model it holds).
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file() && !dir.join("model.safetensors").is_file() && !dir.join(SHARD_INDEX).is_file()
}

/// What an adapter's config says about merging it.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// `base_model_name_or_path`.
    pub base: String,
    /// `revision` of a Hub base.
    pub revision: Option<String>,
    /// `task_type`: `CAUSAL_LM`, or `SEQ_CLS` for a reward model's adapter.
    pub task_type: Option<String>,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `use_rslora`: the scale is `alpha / √r`.
    pub rslora: bool,
    /// `fan_in_fan_out`: the adapted weights are stored `(in, out)` (GPT-2's Conv1D).
    pub fan_in_fan_out: bool,
    /// `use_dora`: every adapted module has a magnitude vector (DoRA).
    pub dora: bool,
    /// `alpha_pattern`: per-module alphas, each key compiled as PEFT matches it against a
    /// module's name: `(.*\.)?(key)$`.
    pub alpha_pattern: Vec<(fancy_regex::Regex, f64)>,
}

impl AdapterConfig {
    /// Reads and checks `adapter_config.json`.
    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
        let err = |field: &str, msg: String| PolicyError::config(field, msg).in_file(path);
        let v: Value = serde_json::from_str(&text).map_err(|e| err("(file)", format!("not valid JSON: {e}")))?;
        let peft_type = v["peft_type"].as_str().unwrap_or("");
        if peft_type != "LORA" {
            return Err(err("peft_type", format!("{:?}: only LoRA adapters (\"LORA\") are read", v["peft_type"])));
        }
        let truthy = |f: &str| !matches!(&v[f], Value::Null | Value::Bool(false));
        for (field, why) in [
            ("alora_invocation_tokens", "an aLoRA adapter, active only after its invocation tokens"),
            ("layer_replication", "replicated layers"),
            ("use_qalora", "QA-LoRA's pooled inputs"),
            ("trainable_token_indices", "trainable-token deltas"),
        ] {
            if truthy(field) {
                return Err(err(
                    field,
                    format!("{why}: not supported here (merge it with PEFT's `merge_and_unload()` and save the model)"),
                ));
            }
        }
        let base = v["base_model_name_or_path"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err("base_model_name_or_path", "missing: the adapter must name its base model".into()))?;
        let alpha = v["lora_alpha"].as_f64().ok_or_else(|| err("lora_alpha", "missing or not a number".into()))?;
        let flag = |f: &str| match &v[f] {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            other => Err(err(f, format!("{other}: expected true or false"))),
        };
        let alpha_pattern = match &v["alpha_pattern"] {
            Value::Null => vec![],
            Value::Object(m) => m
                .iter()
                .map(|(k, a)| {
                    let re = fancy_regex::Regex::new(&format!(r"^(.*\.)?({k})$"))
                        .map_err(|e| err("alpha_pattern", format!("{k}: {e}")))?;
                    Ok((re, a.as_f64().ok_or_else(|| err("alpha_pattern", format!("{k}: {a} is not a number")))?))
                })
                .collect::<Result<_, PolicyError>>()?,
            other => return Err(err("alpha_pattern", format!("{other}: expected an object"))),
        };
        Ok(AdapterConfig {
            base: base.to_string(),
            revision: v["revision"].as_str().map(str::to_string),
            task_type: v["task_type"].as_str().map(str::to_string),
            alpha,
            rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            dora: flag("use_dora")?,
            alpha_pattern,
        })
    }

    /// The scale `s` of the module `module` (its name in the base model) with rank `r`: PEFT's
    /// `alpha_pattern` lookup (the first key whose pattern matches), then `alpha / r` or
    /// rsLoRA's `alpha / √r`.
    pub fn scale(&self, module: &str, r: usize) -> f64 {
        let alpha =
            self.alpha_pattern.iter().find(|(re, _)| re.is_match(module).unwrap_or(false)).map_or(self.alpha, |p| p.1);
        match self.rslora {
            true => alpha / (r as f64).sqrt(),
            false => alpha / r as f64,
        }
    }
}

/// The base model's folder of the adapter in `dir` (see the module doc for where it is looked for).
pub fn resolve_base(dir: &Path, cfg: &AdapterConfig) -> Result<PathBuf, PolicyError> {
    let hub_cache = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HF_HOME").map(PathBuf::from);
        let home = home.or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")));
        home.map(|h| h.join("hub"))
    });
    resolve_base_in(dir, cfg, hub_cache.as_deref())
}

/// [`resolve_base`] with the Hub cache given.
pub fn resolve_base_in(dir: &Path, cfg: &AdapterConfig, hub_cache: Option<&Path>) -> Result<PathBuf, PolicyError> {
    let given = Path::new(&cfg.base);
    let mut tried = vec![given.to_path_buf()];
    if given.is_dir() {
        return Ok(given.to_path_buf());
    }
    if given.is_relative() {
        let beside = dir.join(given);
        if beside.is_dir() {
            return Ok(beside);
        }
        tried.push(beside);
    }
    if let (Some(cache), Some((org, name))) = (hub_cache, cfg.base.split_once('/')) {
        let repo = cache.join(format!("models--{org}--{name}"));
        let revision = cfg.revision.as_deref().unwrap_or("main");
        let commit = std::fs::read_to_string(repo.join("refs").join(revision)).unwrap_or_else(|_| revision.to_string());
        let snapshot = repo.join("snapshots").join(commit.trim());
        if snapshot.join("config.json").is_file() {
            return Ok(snapshot);
        }
        tried.push(snapshot);
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(PolicyError::config(
        "base_model_name_or_path",
        format!(
            "base model {:?} not found (looked at {}); download it, or set this field to its local folder",
            cfg.base,
            tried.join(", ")
        ),
    )
    .in_file(&dir.join(ADAPTER_CONFIG)))
}

/// The weights of the adapter folder `dir` merged into its base's: the adapter's weights file
/// (for errors) and the merged HF state dict. The base's `config.json` describes the model.
pub fn read_merged(dir: &Path) -> Result<(PathBuf, BTreeMap<String, HostTensor>), PolicyError> {
    let cfg = AdapterConfig::read(&dir.join(ADAPTER_CONFIG))?;
    let file = dir.join(ADAPTER_WEIGHTS);
    if !file.is_file() && dir.join("adapter_model.bin").is_file() {
        return Err(PolicyError::tensor(
            &dir.join("adapter_model.bin"),
            "(file)",
            "a pickled PyTorch file; save the adapter with safetensors (PEFT's default since 0.6)",
        ));
    }
    let base = resolve_base(dir, &cfg)?;
    let (_, mut tensors) = read_weights(&base)?;
    merge(&mut tensors, &file, read_safetensors(&file)?, &cfg)?;
    Ok((file, tensors))
}

/// Merges the adapter's tensors (read from `file`) into the base state dict `base`.
pub fn merge(
    base: &mut BTreeMap<String, HostTensor>,
    file: &Path,
    adapter: BTreeMap<String, HostTensor>,
    cfg: &AdapterConfig,
) -> Result<(), PolicyError> {
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    for (key, t) in adapter {
        let name = key.strip_prefix("base_model.model.").unwrap_or(&key).to_string();
        // DoRA's magnitude: `lora_magnitude_vector` as PEFT saves it, `.weight` as older ones did
        const PARTS: [(&str, bool, usize); 7] = [
            (".lora_A.weight", false, 0),
            (".lora_B.weight", false, 1),
            (".lora_embedding_A", true, 0),
            (".lora_embedding_B", true, 1),
            (".lora_B.bias", false, 2),
            (".lora_magnitude_vector", false, 3),
            (".lora_magnitude_vector.weight", false, 3),
        ];
        if let Some((m, embedding, part)) =
            PARTS.iter().find_map(|(suffix, e, p)| name.strip_suffix(suffix).map(|m| (m, *e, *p)))
        {
            let pair = pairs.entry(m.to_string()).or_default();
            pair.embedding |= embedding;
            *[&mut pair.a, &mut pair.b, &mut pair.bias, &mut pair.magnitude][part] = Some(t);
        } else if name.contains("lora_") || name.contains("magnitude") {
            return Err(PolicyError::tensor(file, key.as_str(), "not a LoRA A/B matrix this reads"));
        } else {
            // a whole tensor: `modules_to_save`, or a bias trained beside the adapter
            let name = name.replace(".base_layer.", ".");
            if let Some(old) = base.get(&name).filter(|old| old.shape != t.shape) {
                let msg = format!("shape {:?}, but the base model's is {:?}", t.shape, old.shape);
                return Err(PolicyError::tensor(file, key.as_str(), msg));
            }
            base.insert(name, t);
        }
    }
    for (module, pair) in pairs {
        apply_pair(base, file, &module, pair, cfg)?;
    }
    Ok(())
}

/// One adapted module's tensors.
#[derive(Debug, Default)]
struct Pair {
    a: Option<HostTensor>,
    b: Option<HostTensor>,
    bias: Option<HostTensor>,
    /// DoRA's magnitude vector `m` `(out,)`.
    magnitude: Option<HostTensor>,
    /// `lora_embedding_A/B`: the weight is `(vocab, width)`, the delta `(B·A)ᵀ`.
    embedding: bool,
}

/// `W += s·B·A`, transposed where `W` is stored `(in, out)` (a Conv1D under `fan_in_fan_out`,
/// an embedding), then with DoRA each output's weights rescaled to its magnitude; and
/// `bias += s·b` for a LoRA bias (`lora_bias`).
fn apply_pair(
    base: &mut BTreeMap<String, HostTensor>,
    file: &Path,
    module: &str,
    pair: Pair,
    cfg: &AdapterConfig,
) -> Result<(), PolicyError> {
    let bad = |msg: String| PolicyError::tensor(file, module, msg);
    let (Some(a), Some(b)) = (&pair.a, &pair.b) else {
        return Err(bad("has only one of its LoRA matrices A and B".into()));
    };
    let (Some([r, i]), Some([o, r2])) = (two(&a.shape), two(&b.shape)) else {
        return Err(bad(format!(
            "LoRA matrices of shapes {:?} and {:?}, expected (r, in) and (out, r)",
            a.shape, b.shape
        )));
    };
    if r != r2 || r == 0 {
        return Err(bad(format!("LoRA ranks differ: A {:?}, B {:?}", a.shape, b.shape)));
    }
    let name = format!("{module}.weight");
    let w = base.get_mut(&name).ok_or_else(|| bad(format!("adapts `{name}`, which the base model does not have")))?;
    let transposed = pair.embedding || cfg.fan_in_fan_out;
    let want = if transposed { [i, o] } else { [o, i] };
    if two(&w.shape) != Some(want) {
        return Err(bad(format!("a rank-{r} delta of shape {want:?} does not fit `{name}` of shape {:?}", w.shape)));
    }
    let s = cfg.scale(module, r) as f32;
    let (av, bv) = (View::rows(&a.data, i), View::rows(&b.data, r));
    let threads = rayon::current_num_threads();
    match transposed {
        false => gemm_into(&mut w.data, (o, i, r), bv, av, s, true, threads),
        true => gemm_into(&mut w.data, (i, o, r), av.t(), bv.t(), s, true, threads),
    }
    match (&pair.magnitude, cfg.dora) {
        (Some(m), true) if m.data.len() == o => crate::dora::rescale_outputs(&mut w.data, &m.data, transposed),
        (Some(m), true) => return Err(bad(format!("a DoRA magnitude of shape {:?} for {o} outputs", m.shape))),
        (None, true) => return Err(bad("has no DoRA magnitude vector, but the config says `use_dora`".into())),
        (Some(_), false) => return Err(bad("has a DoRA magnitude vector, but the config has no `use_dora`".into())),
        (None, false) => {}
    }
    if let Some(bb) = &pair.bias {
        let name = format!("{module}.bias");
        let dst = base.get_mut(&name).ok_or_else(|| bad(format!("has a LoRA bias but the base has no `{name}`")))?;
        if dst.data.len() != bb.data.len() {
            return Err(bad(format!("LoRA bias of shape {:?} for `{name}` of shape {:?}", bb.shape, dst.shape)));
        }
        dst.data.iter_mut().zip(&bb.data).for_each(|(d, v)| *d += s * v);
    }
    Ok(())
}

fn two(shape: &[usize]) -> Option<[usize; 2]> {
    <[usize; 2]>::try_from(shape).ok()
}
