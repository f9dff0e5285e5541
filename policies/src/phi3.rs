//! Phi-3 (`Phi3ForCausalLM`, `model_type: "phi3"`: Phi-3-mini-4k, Phi-3-medium-4k, Phi-4-mini's
//! network): Llama's network — RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases — stored
//! with q, k and v fused into one `qkv_proj` and the MLP's gate and up into one `gate_up_proj`
//! ([`Dims::fused_projections`]), every layer attending to its last `sliding_window` positions
//! when the config sets one (as Mistral's; Phi-3-mini-4k's is 2047), and RoPE on the first
//! `partial_rotary_factor · head_dim` dimensions of each head ([`Dims::partial_rotary`];
//! Phi-4-mini's 0.75), scaled by LongRoPE where the config says `longrope` (the 128k Phi-3
//! models, Phi-3.5, Phi-4-mini: [`crate::rope::LongRope`], up to the pretrained 4096 positions).
//! The config is Llama's ([`LlamaConfig`]) with transformers' Phi-3 defaults (`rms_norm_eps`
//! 1e-5, no window, `original_max_position_embeddings` 4096).

use crate::config::{mistral_dims, Dims, LlamaConfig};
use crate::dims::partial_rotary;
use crate::error::PolicyError;

/// transformers' `Phi3Config.rms_norm_eps` default (Llama's is 1e-6).
const RMS_NORM_EPS: f64 = 1e-5;

/// transformers' `Phi3Config.original_max_position_embeddings` default.
const ORIGINAL_MAX_POSITIONS: usize = 4096;

/// Writes transformers' Phi-3 defaults into a `phi3` config object where it leaves them out, and
/// reads the early 128k configs' scaling kinds `su` and `yarn` as `longrope`, as transformers'
/// `Phi3Config` does.
pub(crate) fn fill_defaults(config: &mut serde_json::Value) {
    for field in ["rope_scaling", "rope_parameters"] {
        let Some(scaling) = config.get_mut(field).and_then(|s| s.as_object_mut()) else { continue };
        for key in ["type", "rope_type"] {
            if scaling.get(key).and_then(|t| t.as_str()).is_some_and(|t| t == "su" || t == "yarn") {
                scaling.insert(key.into(), "longrope".into());
            }
        }
    }
    if config.get("rms_norm_eps").is_none() {
        config["rms_norm_eps"] = RMS_NORM_EPS.into();
    }
    if config.get("original_max_position_embeddings").is_none() {
        config["original_max_position_embeddings"] = ORIGINAL_MAX_POSITIONS.into();
    }
}

/// Phi-3's sizes: Llama's, with the fused checkpoint layout, the window and the partial RoPE.
pub(crate) fn dims(c: &LlamaConfig) -> Result<Dims, PolicyError> {
    // Mistral's: Llama's with the window on every layer
    let d = mistral_dims(c)?;
    // transformers 5 keeps it in `rope_parameters`, transformers 4 at the top level
    let in_params = c.rope_parameters.as_ref().and_then(|p| p.scaling.get("partial_rotary_factor"));
    let (pct, field) = match (in_params, c.partial_rotary_factor) {
        (Some(v), _) => {
            let field = "rope_parameters.partial_rotary_factor";
            (v.as_f64().ok_or_else(|| PolicyError::config(field, format!("{v} is not a number")))?, field)
        }
        (None, Some(pct)) => (pct, "partial_rotary_factor"),
        (None, None) => (1.0, "partial_rotary_factor"),
    };
    Ok(Dims { partial_rotary: partial_rotary(d.head_dim, pct, field)?, fused_projections: true, ..d })
}

/// A `phi3` file's own fields on top of the Llama ones in `cfg`: the window (none for 0, as
/// the converter writes Phi-4-mini's), the share of each head RoPE turns, the pretrained context
/// `rope.scaling.original_context_length` (the context length when absent, as llama.cpp reads
/// it), and LongRoPE where the file has its `rope_factors_short.weight` and
/// `rope_factors_long.weight` tensors, with `rope.scaling.attn_factor` (1 when absent, as
/// llama.cpp reads it).
pub(crate) fn gguf_fields(
    g: &crate::gguf::Gguf,
    head_dim: usize,
    rotary: Option<usize>,
    cfg: &mut serde_json::Value,
) -> Result<(), PolicyError> {
    let window = g.int_opt("phi3.attention.sliding_window")?.filter(|&w| w > 0);
    let original = match g.int_opt("phi3.rope.scaling.original_context_length")? {
        Some(n) => n,
        None => g.int("phi3.context_length")?,
    };
    let longrope = longrope_scaling(g)?;
    let obj = cfg.as_object_mut().expect("a JSON object");
    obj.insert("sliding_window".into(), window.into());
    obj.insert("original_max_position_embeddings".into(), original.into());
    if let Some(rot) = rotary {
        let pct = crate::dims::rotary_share(rot, head_dim).map_err(|e| g.err("metadata", e))?;
        obj.insert("partial_rotary_factor".into(), pct.into());
    }
    if let Some(scaling) = longrope {
        obj.insert("rope_scaling".into(), scaling);
    }
    Ok(())
}

/// The LongRoPE tensors and attention factor of a `phi3` file, as the config's `rope_scaling`;
/// `None` without the tensors.
fn longrope_scaling(g: &crate::gguf::Gguf) -> Result<Option<serde_json::Value>, PolicyError> {
    let has = |name: &str| g.tensors.iter().any(|t| t.name == name);
    match (has(LONGROPE_TENSORS[0]), has(LONGROPE_TENSORS[1])) {
        (false, false) => return Ok(None),
        (true, true) => {}
        _ => return Err(g.err("rope_factors_long.weight", "LongRoPE needs both the short and the long factors")),
    }
    let [short, long] = LONGROPE_TENSORS.map(|name| g.tensor(name).map(|t| t.data));
    let attention_factor = g.float_opt("phi3.rope.scaling.attn_factor")?.unwrap_or(1.0);
    Ok(Some(serde_json::json!({"rope_type": "longrope", "short_factor": short?, "long_factor": long?,
        "attention_factor": attention_factor})))
}

/// The tensors llama.cpp's converter writes LongRoPE's factors in: short, long.
pub(crate) const LONGROPE_TENSORS: [&str; 2] = ["rope_factors_short.weight", "rope_factors_long.weight"];

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// microsoft/Phi-3-mini-4k-instruct's config.json (transformers 4 layout), abridged to the
    /// fields that matter here.
    const PHI3_MINI: &str = r#"{"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": 32064,
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false, "bos_token_id": 1,
        "eos_token_id": 32000, "pad_token_id": 32000, "resid_pdrop": 0.0, "embd_pdrop": 0.0}"#;

    #[test]
    fn phi3_mini_config() {
        let d = ModelConfig::from_json_str(PHI3_MINI).unwrap().dims().unwrap();
        assert_eq!((d.d_model, d.head_dim, d.n_kv_head, d.d_ff), (3072, 96, 32, 8192));
        assert_eq!((d.sliding_window, d.partial_rotary, d.rope_theta, d.norm_eps), (Some(2047), None, 10000.0, 1e-5));
        assert!(d.fused_projections && !d.tied && !d.bias);
        // transformers' Phi-3 defaults when the file leaves them out
        let bare = PHI3_MINI.replace(r#""rms_norm_eps": 1e-05,"#, "").replace(r#""sliding_window": 2047,"#, "");
        let d = ModelConfig::from_json_str(&bare).unwrap().dims().unwrap();
        assert_eq!((d.norm_eps, d.sliding_window), (1e-5, None));
    }

    /// Phi-4-mini's partial RoPE, in either layout; bad shares and windows are refused by name.
    #[test]
    fn partial_rotary_and_refusals() {
        let t4 =
            PHI3_MINI.replace(r#""rope_theta": 10000.0,"#, r#""rope_theta": 10000.0, "partial_rotary_factor": 0.75,"#);
        let t5 = PHI3_MINI.replace(
            r#""rope_theta": 10000.0,"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 0.75},"#,
        );
        for (text, theta) in [(t4, 10000.0), (t5, 250000.0)] {
            let d = ModelConfig::from_json_str(&text).unwrap().dims().unwrap();
            assert_eq!((d.partial_rotary, d.rotary_dim(), d.rope_theta), (Some(72), 72, theta));
        }
        for (from, to, field) in [
            (
                r#""rope_theta": 10000.0,"#,
                r#""rope_theta": 10000.0, "partial_rotary_factor": 0.01,"#,
                "partial_rotary_factor",
            ),
            (r#""sliding_window": 2047"#, r#""sliding_window": 0"#, "sliding_window"),
        ] {
            let err = ModelConfig::from_json_str(&PHI3_MINI.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
