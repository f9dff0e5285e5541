//! A LoRA run (`optim.lora`, `rlhf_policies::lora`) in its checkpoints. The model folder holds
//! the merged weights `W + s·A·B` — a plain model for every later stage and for transformers —
//! which cannot give back `W` exactly; so each checkpoint also keeps `lora.safetensors`: every
//! update's `A` and `B` (and DoRA's magnitude) and the frozen base weight of each adapted
//! layer, by parameter name (`policy.blocks.0.attn.q.lora_a`, `….weight`). Resuming loads the merged folder, puts the
//! updates back on the same layers and restores those tensors, so the run continues bit for bit.
//! The language model's updates are also written as a PEFT adapter (`adapter/`, see
//! `rlhf_policies::peft_export`) over the model the run started from.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use rlhf_policies::checkpoint::{is_lora, read_safetensors, write_safetensors, HostTensor};
use rlhf_policies::reward_model::{ADAPTER_NORMALIZATION, NORMALIZATION_KEY};
use rlhf_policies::{AdamWConfig, FusedOps, HasParams, ParamMut};

/// The checkpoint file with the updates and the adapted layers' base weights.
pub const LORA_STATE: &str = "lora.safetensors";

/// Adds `optim.lora`'s update to every transformer `model` trains (the `i`-th's `A` drawn from
/// `seed + i`; with `optim.num_layers_unfrozen`, in its top blocks only); nothing without
/// `optim.lora`. Says on stderr how many layers each got.
pub fn attach<D: FusedOps, M: HasParams<D>>(model: &mut M, optim: &AdamWConfig, seed: u64) -> Result<()> {
    let Some(lora) = &optim.lora else { return Ok(()) };
    for (i, (prefix, lm)) in model.trunks_mut().into_iter().enumerate() {
        let cfg = lora.within_top(optim.num_layers_unfrozen, lm.blocks.len())?;
        let n = lm.add_lora(&cfg, seed.wrapping_add(i as u64))?;
        let which =
            if prefix.is_empty() { "the model".to_string() } else { format!("`{}`", prefix.trim_end_matches('.')) };
        let kind = if cfg.use_dora { "DoRA" } else { "LoRA" };
        eprintln!("{kind}: rank {} on {n} linear layers of {which} (scale {})", cfg.r, cfg.scale());
    }
    Ok(())
}

/// What [`LORA_STATE`] holds for `model` (empty without updates).
fn state<D: Device<f32>>(model: &impl HasParams<D>) -> BTreeMap<String, HostTensor> {
    let params = model.params();
    let adapted: Vec<&str> = params.iter().filter_map(|(n, _)| n.strip_suffix(".lora_a")).collect();
    let keep = |n: &str| is_lora(n) || n.strip_suffix(".weight").is_some_and(|m| adapted.contains(&m));
    params
        .iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, p)| (n.clone(), HostTensor { shape: p.shape(), data: p.to_vec() }))
        .collect()
}

/// Writes [`LORA_STATE`] into the checkpoint folder `dir` when `model` carries updates, and the
/// language model's updates as a PEFT adapter in [`ADAPTER_DIR`] when its base is a model
/// folder (a GGUF file is not a base PEFT loads): a reward model's as a `SEQ_CLS` adapter
/// with its head, and its normalisation beside it.
pub fn save<D: Device<f32>>(model: &impl HasParams<D>, dir: &Path) -> Result<()> {
    let tensors = state(model);
    if tensors.is_empty() {
        return Ok(());
    }
    write_safetensors(&dir.join(LORA_STATE), &tensors)?;
    let Some(lm) = model.language_model().filter(|m| m.has_lora()) else { return Ok(()) };
    let Some(base) = lm.origin.as_deref().filter(|b| b.is_dir()) else { return Ok(()) };
    let base = std::fs::canonicalize(base).with_context(|| format!("{}: the LoRA base", base.display()))?;
    let head = model.adapter_head();
    let (tensors, config) = rlhf_policies::peft_export::adapter_of(lm, &base.display().to_string(), head)?;
    let out = dir.join(ADAPTER_DIR);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(rlhf_policies::peft::ADAPTER_CONFIG), config)?;
    write_safetensors(&out.join(rlhf_policies::peft::ADAPTER_WEIGHTS), &tensors)?;
    // a reward model's normalisation, written into the checkpoint's config.json
    let written: serde_json::Value = match std::fs::read(dir.join("config.json")) {
        Ok(text) => serde_json::from_slice(&text).context("the checkpoint's config.json")?,
        Err(_) => serde_json::Value::Null,
    };
    if let Some(n) = written.get(NORMALIZATION_KEY).filter(|n| !n.is_null()) {
        std::fs::write(out.join(ADAPTER_NORMALIZATION), serde_json::to_string_pretty(n)?)?;
    }
    Ok(())
}

/// The checkpoint's PEFT adapter folder (the language model's updates over its base).
pub const ADAPTER_DIR: &str = "adapter";

/// Puts a resumed LoRA run's updates back: `model` as read from the checkpoint `dir` (merged
/// weights) gets `optim.lora`'s layers, and their `A`, `B` and base weights from [`LORA_STATE`].
/// Every tensor of the file must find its parameter, and every update its tensors.
pub fn restore<D: FusedOps, M: HasParams<D>>(model: &mut M, optim: &AdamWConfig, dir: &Path) -> Result<()> {
    if optim.lora.is_none() {
        return Ok(());
    }
    let file = dir.join(LORA_STATE);
    let mut tensors = read_safetensors(&file).with_context(|| format!("resuming a LoRA run from {}", dir.display()))?;
    // the adapter's base is the run's, not this checkpoint (its weights are merged)
    let adapter = dir.join(ADAPTER_DIR).join(rlhf_policies::peft::ADAPTER_CONFIG);
    let base = match adapter.is_file() {
        true => Some(rlhf_policies::peft::AdapterConfig::read(&adapter)?.base.into()),
        false => None,
    };
    if let Some((_, lm)) = model.trunks_mut().into_iter().next() {
        lm.origin = base;
    }
    attach(model, optim, 0)?;
    for (name, p) in model.params_mut() {
        let Some(t) = tensors.remove(&name) else {
            if is_lora(&name) {
                bail!("{}: tensor `{name}` is missing (written by another optim.lora?)", file.display());
            }
            continue;
        };
        let shape = match &p {
            ParamMut::M(w) => vec![w.shape().0, w.shape().1],
            ParamMut::V(v) => vec![v.shape().0],
        };
        if t.shape != shape {
            bail!(
                "{}: `{name}` has shape {:?}, the model's is {shape:?} (another optim.lora?)",
                file.display(),
                t.shape
            );
        }
        match p {
            ParamMut::M(w) => *w = w.device().tensor_from_vec(t.data, *w.shape()),
            ParamMut::V(v) => *v = v.device().tensor_from_vec(t.data, *v.shape()),
        }
    }
    if let Some(name) = tensors.keys().next() {
        bail!(
            "{}: tensor `{name}` matches no parameter of the model (another optim.lora.target_modules?)",
            file.display()
        );
    }
    Ok(())
}
