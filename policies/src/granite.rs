//! Granite (`GraniteForCausalLM`, `model_type: "granite"`: IBM's granite-3.0/3.1/3.2/3.3
//! dense models): Llama's network and config ([`LlamaConfig`]) with four multipliers, each a
//! field of [`Dims`]:
//!
//! - `embedding_multiplier` on the token embeddings ([`Dims::embed_scale`]);
//! - `attention_multiplier` as the attention scores' scale in place of `head_dim^-½`
//!   ([`Dims::query_scale`] `= attention_multiplier·√head_dim`);
//! - `residual_multiplier` on each branch's output before its residual add
//!   ([`Dims::residual_scale`]);
//! - `logits_scaling`, which divides the logits ([`Dims::logit_scale`] `= 1 / logits_scaling`).
//!
//! transformers' `GraniteConfig` defaults each to 1 (plain Llama) and Llama's special ids to
//! BOS 1 and EOS 2. transformers has no Granite sequence-classification class: a Granite reward
//! model rlhf saves (`GraniteForSequenceClassification`, Llama's `score` head) loads back in
//! rlhf, not in transformers.

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;

/// Writes transformers' Granite defaults into a `granite` config object where it leaves them out.
pub(crate) fn fill_defaults(config: &mut serde_json::Value) {
    crate::config::fill_defaults(config, [("bos_token_id", 1), ("eos_token_id", 2)], "GraniteForCausalLM");
}

/// Llama's sizes with Granite's multipliers; an error names a multiplier that is not a positive
/// number.
pub(crate) fn dims(c: &LlamaConfig) -> Result<Dims, PolicyError> {
    let d = crate::config::llama_dims(c, false, false)?;
    let multiplier = |field: &str, v: Option<f64>| -> Result<f64, PolicyError> {
        match v.unwrap_or(1.0) {
            m if m > 0.0 && m.is_finite() => Ok(m),
            m => Err(PolicyError::config(field, format!("{m} must be a positive number"))),
        }
    };
    let embed = multiplier("embedding_multiplier", c.embedding_multiplier)?;
    let residual = multiplier("residual_multiplier", c.residual_multiplier)?;
    let attention = multiplier("attention_multiplier", c.attention_multiplier)?;
    let logits = multiplier("logits_scaling", c.logits_scaling)?;
    Ok(Dims {
        embed_scale: embed as f32,
        query_scale: (attention * (d.head_dim as f64).sqrt()) as f32,
        residual_scale: residual as f32,
        logit_scale: (1.0 / logits) as f32,
        ..d
    })
}

/// A `granite` GGUF file's multipliers on top of the Llama fields in `cfg`, as llama.cpp reads
/// them: `granite.logit_scale` required, the others optional with 0 or absence meaning none —
/// for `attention.scale` that is the usual `head_dim^-½`, not transformers' default of 1.
pub(crate) fn gguf_fields(
    g: &crate::gguf::Gguf,
    head_dim: usize,
    cfg: &mut serde_json::Value,
) -> Result<(), PolicyError> {
    let set = |key: &str| -> Result<Option<f64>, PolicyError> {
        Ok(g.float_opt(&format!("granite.{key}"))?.filter(|&v| v != 0.0))
    };
    let attention = set("attention.scale")?.unwrap_or(1.0 / (head_dim as f64).sqrt());
    cfg["attention_multiplier"] = attention.into();
    cfg["embedding_multiplier"] = set("embedding_scale")?.unwrap_or(1.0).into();
    cfg["residual_multiplier"] = set("residual_scale")?.unwrap_or(1.0).into();
    cfg["logits_scaling"] = g.float("granite.logit_scale")?.into();
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// granite-3.3-2b-instruct's `config.json` (transformers 4.49).
    const GRANITE_3_3_2B: &str = r#"{"architectures": ["GraniteForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.1, "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "logits_scaling": 8.0, "max_position_embeddings": 131072, "mlp_bias": false,
        "model_type": "granite", "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8,
        "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "rope_theta": 10000000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0", "use_cache": true, "vocab_size": 49159}"#;

    #[test]
    fn reads_granite_3_3_2b_config() {
        let cfg = ModelConfig::from_json_str(GRANITE_3_3_2B).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.vocab, d.d_model, d.n_layer, d.n_head, d.n_kv_head, d.head_dim), (49159, 2048, 40, 32, 8, 64));
        // 0.015625 = 1/64 against the usual 1/√64 = 1/8: queries × 1/8
        assert_eq!((d.embed_scale, d.query_scale, d.residual_scale, d.logit_scale), (12.0, 0.125, 0.22, 0.125));
        assert!(d.tied && !d.qk_norm && !d.post_norms && d.rope_theta == 1e7);
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids()), (Some(0), vec![0]));
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
        // transformers' defaults: every multiplier 1, BOS 1, EOS 2
        let bare = r#"{"model_type": "granite", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#;
        let cfg = ModelConfig::from_json_str(bare).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.embed_scale, d.query_scale, d.residual_scale, d.logit_scale), (1.0, 8f32.sqrt(), 1.0, 1.0));
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids()), (Some(1), vec![2]));
        for field in ["embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"] {
            let bad = bare.replace(r#""model_type""#, &format!(r#""{field}": 0, "model_type""#));
            let e = ModelConfig::from_json_str(&bad).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
