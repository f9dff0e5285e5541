//! The fields a `gemma2` or `gemma3` GGUF file adds to the Llama ones ([`crate::gguf`]), as
//! llama.cpp reads them: the local layers' window and pattern (an array of per-layer flags, or a
//! period), the query scale it derives from the layer count, and the soft caps.

use crate::error::PolicyError;
use crate::gguf::{Gguf, Value};

/// Which of `layers` layers attend through the window, as llama.cpp's `load_swa_pattern`
/// reads `<arch>.attention.sliding_window_pattern`: one bool per layer, or a period `n`
/// (`default_period` when absent) of `n − 1` local layers then a global one, 0 for every
/// layer local.
fn local_layers(g: &Gguf, arch: &str, layers: usize, default_period: usize) -> Result<Vec<bool>, PolicyError> {
    let key = format!("{arch}.attention.sliding_window_pattern");
    match g.metadata.get(&key) {
        Some(Value::Array(flags)) if flags.len() == layers => flags
            .iter()
            .map(|f| if let Value::Bool(b) = f { Ok(*b) } else { Err(()) })
            .collect::<Result<_, _>>()
            .map_err(|_| g.err("metadata", format!("`{key}` must hold bools"))),
        Some(Value::Array(_)) => Err(g.err("metadata", format!("`{key}` must have one bool per layer"))),
        _ => Ok(match g.int_opt(&key)?.unwrap_or(default_period) {
            0 => vec![true; layers],
            n => crate::gemma3::periodic_sliding(layers, n),
        }),
    }
}

/// transformers' `layer_types` for the local flags.
fn layer_types(local: &[bool]) -> Vec<&'static str> {
    local.iter().map(|&l| if l { "sliding_attention" } else { "full_attention" }).collect()
}

/// `query_pre_attn_scalar` as llama.cpp derives it: `n_embd / n_head` for the 27B models
/// (`big_layers` layers), the head width otherwise.
fn query_pre_attn_scalar(g: &Gguf, arch: &str, head_dim: usize, big_layers: usize) -> Result<usize, PolicyError> {
    let layers = g.int(&format!("{arch}.block_count"))?;
    let width_per_head =
        g.int(&format!("{arch}.embedding_length"))? / g.int(&format!("{arch}.attention.head_count"))?;
    Ok(if layers == big_layers { width_per_head } else { head_dim })
}

/// A `gemma3` file's own fields on top of the Llama ones in `cfg`: `gemma3_text`, the tanh GELU,
/// the local layers' window and RoPE base (`rope.freq_base_swa`, llama.cpp's 10000 when absent),
/// the layer pattern (period 6) and query scale as llama.cpp derives them
/// ([`crate::gguf::Arch::Gemma3`]), and a final logit softcap if the file has one (which the
/// Gemma 3 config then refuses by name).
pub(crate) fn gemma3_fields(g: &Gguf, head_dim: usize, cfg: &mut serde_json::Value) -> Result<(), PolicyError> {
    let layers = g.int("gemma3.block_count")?;
    let window = g.int_opt("gemma3.attention.sliding_window")?.filter(|&w| w > 0);
    let local = match window {
        None => vec![false; layers],
        Some(_) => local_layers(g, "gemma3", layers, 6)?,
    };
    let obj = cfg.as_object_mut().expect("a JSON object");
    obj.insert("model_type".into(), "gemma3_text".into());
    obj.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    obj.insert("sliding_window".into(), window.into());
    obj.insert("layer_types".into(), layer_types(&local).into());
    let local_base = g.float_opt("gemma3.rope.freq_base_swa")?.unwrap_or(10000.0);
    obj.insert("rope_local_base_freq".into(), local_base.into());
    obj.insert("query_pre_attn_scalar".into(), query_pre_attn_scalar(g, "gemma3", head_dim, 62)?.into());
    // llama.cpp reads 0 as no softcap
    if let Some(cap) = g.float_opt("gemma3.final_logit_softcapping")?.filter(|&c| c != 0.0) {
        obj.insert("final_logit_softcapping".into(), cap.into());
    }
    Ok(())
}

/// A `gemma2` file's own fields on top of the Llama ones in `cfg`: the tanh GELU, the window
/// (llama.cpp's 4096 when absent) and layer pattern (period 2: local, global, …), the query
/// scale as llama.cpp derives it, and the two soft caps (llama.cpp's 50 and 30 when absent).
/// One RoPE base serves every layer: a `rope.freq_base_swa` apart from it is refused.
pub(crate) fn gemma2_fields(g: &Gguf, head_dim: usize, cfg: &mut serde_json::Value) -> Result<(), PolicyError> {
    let layers = g.int("gemma2.block_count")?;
    let window = g.int_opt("gemma2.attention.sliding_window")?.unwrap_or(4096);
    let local = local_layers(g, "gemma2", layers, 2)?;
    let base = g.float_opt("gemma2.rope.freq_base")?.unwrap_or(10000.0);
    if let Some(swa) = g.float_opt("gemma2.rope.freq_base_swa")?.filter(|&b| b != base) {
        let msg = format!("a local RoPE base ({swa}) apart from the global one ({base}) is not Gemma 2's");
        return Err(g.err("gemma2.rope.freq_base_swa", msg));
    }
    let cap = |key: &str, default: f64| -> Result<f64, PolicyError> {
        Ok(g.float_opt(&format!("gemma2.{key}"))?.unwrap_or(default))
    };
    let obj = cfg.as_object_mut().expect("a JSON object");
    obj.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    obj.insert("sliding_window".into(), window.into());
    obj.insert("layer_types".into(), layer_types(&local).into());
    obj.insert("query_pre_attn_scalar".into(), query_pre_attn_scalar(g, "gemma2", head_dim, 46)?.into());
    obj.insert("attn_logit_softcapping".into(), cap("attn_logit_softcapping", 50.0)?.into());
    obj.insert("final_logit_softcapping".into(), cap("final_logit_softcapping", 30.0)?.into());
    Ok(())
}
