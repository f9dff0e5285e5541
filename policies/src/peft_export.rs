//! A model's LoRA updates ([`crate::lora`]) as a PEFT adapter folder: `adapter_config.json` and
//! `adapter_model.safetensors` that PEFT's `PeftModel.from_pretrained(base, folder)` (and
//! [`crate::peft`]) load onto the base model.
//!
//! Our update of a layer is `s·(x·A)·B` with `A` `(in, r)`, `B` `(r, out)`; PEFT's is
//! `s·(x·A_pᵀ)·B_pᵀ` with `lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)`, so
//! `A_p = Aᵀ` and `B_p = Bᵀ` in transformers' row order. Where transformers fuses several of our
//! layers into one module (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`, Phi-3's `qkv_proj`
//! and `gate_up_proj`), the module gets the pairs stacked: `A_p` is the parts' `Aᵀ` one above
//! the other and `B_p` block-diagonal (each part's output rows read only its own rank rows),
//! a rank `Σ r` pair whose `rank_pattern`/`alpha_pattern` entry keeps the scale `s` — exactly
//! the sum of the parts' updates. The output rows are placed by the same code that fuses the
//! weights on save, so the rows land where the module's own weights do. DoRA's magnitudes
//! (`lora_magnitude_vector`, one per output) are laid out the same way; a fused module's part
//! without an update gets its weight's column norms, which leave it as it is.

use std::collections::BTreeMap;

use dfdx::prelude::*;
use serde_json::{json, Value};

use crate::checkpoint::HostTensor;
use crate::config::Family;
use crate::error::PolicyError;
use crate::hf_names::{hf_source, Source};
use crate::model::CausalLm;

/// One transformers module: where its weight lives, each part's output width (every part's,
/// adapted or not) and the adapted parts' updates.
struct Module {
    src: Source,
    widths: Vec<usize>,
    /// Each part's DoRA magnitude: its update's, or its weight's column norms.
    magnitudes: Vec<Vec<f32>>,
    /// `(part, rank, A (in, r) row-major, B (r, out) row-major)`, in part order.
    updates: Vec<(usize, usize, Vec<f32>, Vec<f32>)>,
    /// The layers' input width.
    input: usize,
}

/// The PEFT adapter of `model`'s updates over the base model at `base`: the tensors of
/// `adapter_model.safetensors` and the `adapter_config.json` text. With `head` (a reward model's
/// `score` tensors by HF name) it is a `SEQ_CLS` adapter holding the head whole
/// (`modules_to_save`), as TRL's reward trainer leaves one. An error when `model` has no
/// update or its updates' scales differ.
pub fn adapter_of<D: Device<f32>>(
    model: &CausalLm<D>,
    base: &str,
    head: Option<BTreeMap<String, HostTensor>>,
) -> Result<(BTreeMap<String, HostTensor>, String), PolicyError> {
    let d = &model.dims;
    let dora = model.linears().iter().any(|(_, l)| l.lora.as_ref().is_some_and(|l| l.magnitude.is_some()));
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut scale = None;
    for (name, lin) in model.linears() {
        let src = hf_source(d, &format!("{name}.weight"));
        let (weight, part, parts) = match src.fused() {
            Some((n, part, parts)) => (n.to_string(), part, parts),
            None => (src.name().to_string(), 0, 1),
        };
        let (input, out) = *lin.w.shape();
        let m = modules.entry(weight).or_insert_with(|| Module {
            src,
            widths: vec![0; parts],
            magnitudes: vec![vec![]; parts],
            updates: vec![],
            input,
        });
        m.widths[part] = out;
        m.magnitudes[part] = match lin.lora.as_ref().and_then(|l| l.magnitude.as_ref()) {
            Some(mag) => mag.as_vec(),
            None if dora => crate::dora::column_norms(&lin.w.as_vec(), out),
            None => vec![],
        };
        let Some(lora) = &lin.lora else { continue };
        if scale.is_some_and(|s| s != lora.scale) {
            return Err(PolicyError::Input("LoRA updates with different scales cannot share one adapter".into()));
        }
        scale = Some(lora.scale);
        m.updates.push((part, lora.a.shape().1, lora.a.as_vec(), lora.b.as_vec()));
    }
    let Some(s) = scale else { return Err(PolicyError::Input("the model has no LoRA update to export".into())) };
    modules.retain(|_, m| !m.updates.is_empty());
    let mut tensors = BTreeMap::new();
    let (mut rank_pattern, mut alpha_pattern, mut targets) = (json!({}), json!({}), vec![]);
    let r0 = modules.values().map(|m| m.updates[0].1).min().unwrap_or(1);
    for (weight, Module { src, widths, magnitudes, updates, input: i }) in modules {
        let module = weight.strip_suffix(".weight").unwrap_or(&weight).to_string();
        let rank: usize = updates.iter().map(|u| u.1).sum();
        // A_p: each part's Aᵀ, stacked
        let mut a = Vec::with_capacity(rank * i);
        for (_, r, av, _) in &updates {
            a.extend((0..*r).flat_map(|k| (0..i).map(move |q| av[q * r + k])));
        }
        // B_p: each part as a pseudo weight (rank, out_j) holding its B in its own rank rows,
        // fused and laid out as the module's weight is
        let mut pseudo: Vec<HostTensor> =
            widths.iter().map(|&o| HostTensor { shape: vec![rank, o], data: vec![0.0; rank * o] }).collect();
        let mut offset = 0;
        for (part, r, _, bv) in &updates {
            let o = widths[*part];
            pseudo[*part].data[offset * o..(offset + r) * o].copy_from_slice(bv);
            offset += r;
        }
        let hf = src.to_hf(pseudo);
        // GPT-2's Conv1D modules store (in, out): their B_p is the transpose
        let b = match matches!(src, Source::Same(_) | Source::Columns { .. }) {
            true => crate::hf_names::transpose(&hf),
            false => hf,
        };
        tensors
            .insert(format!("base_model.model.{module}.lora_A.weight"), HostTensor { shape: vec![rank, i], data: a });
        tensors.insert(format!("base_model.model.{module}.lora_B.weight"), b);
        if dora {
            // each part's (1, out) laid out as the module's weight is: the outputs in its order
            let parts = magnitudes.into_iter().map(|m| HostTensor { shape: vec![1, m.len()], data: m }).collect();
            let m = src.to_hf(parts).data;
            tensors.insert(
                format!("base_model.model.{module}.lora_magnitude_vector"),
                HostTensor { shape: vec![m.len()], data: m },
            );
        }
        if rank != r0 {
            let key = module.replace('.', r"\.");
            rank_pattern[&key] = rank.into();
            alpha_pattern[&key] = (s as f64 * rank as f64).into();
        }
        targets.push(module);
    }
    let task = if head.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" };
    let mut whole = vec![];
    for (name, t) in head.into_iter().flatten() {
        whole.push(name.split('.').next().unwrap_or(&name).to_string());
        tensors.insert(format!("base_model.model.{name}"), t);
    }
    whole.dedup();
    let config = json!({
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base,
        "r": r0,
        "lora_alpha": s as f64 * r0 as f64,
        "use_rslora": false,
        "use_dora": dora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": d.family == Family::Gpt2,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": if whole.is_empty() { Value::Null } else { json!(whole) },
        "revision": Value::Null,
    });
    Ok((tensors, serde_json::to_string_pretty(&config).expect("JSON values serialise")))
}
