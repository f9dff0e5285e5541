//! SmolLM3 (`SmolLM3ForCausalLM`, `model_type: "smollm3"`: HuggingFaceTB/SmolLM3-3B): Llama's
//! network with RoPE left out on some layers (NoPE): `no_rope_layers[i]` is 1 where layer `i`
//! rotates its queries and keys and 0 where it attends by content alone — by default every
//! fourth layer (`no_rope_layer_interval`). The config is Llama's ([`LlamaConfig`]) with
//! transformers' SmolLM3 defaults (4 KV heads, a tied head, Llama 3's special ids).
//!
//! Left out: `use_sliding_window` (SmolLM3's windows sit on the NoPE layers; its released
//! configs leave them off), refused as for Llama.

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;

/// transformers' `SmolLM3Config` defaults that differ from Llama's (`num_key_value_heads` is
/// the attention heads' count there, the head untied, no special ids).
const DEFAULTS: [(&str, u32); 6] = [
    ("num_key_value_heads", 4),
    ("max_position_embeddings", 32768),
    ("pad_token_id", 128_004),
    ("bos_token_id", 128_000),
    ("eos_token_id", 128_001),
    ("no_rope_layer_interval", 4),
];

/// Writes transformers' SmolLM3 defaults into a `smollm3` config object where it leaves them out.
pub(crate) fn fill_defaults(config: &mut serde_json::Value) {
    crate::config::fill_defaults(config, DEFAULTS, "SmolLM3ForCausalLM");
    crate::config::fill_defaults(config, [("tie_word_embeddings", true)], "SmolLM3ForCausalLM");
}

/// Whether each layer rotates its queries and keys: `no_rope_layers` (1: RoPE, 0: NoPE), or
/// NoPE on every `no_rope_layer_interval`-th layer; errors name the field.
pub(crate) fn layer_ropes(c: &LlamaConfig, dims: &Dims) -> Result<Vec<bool>, PolicyError> {
    match (&c.no_rope_layers, c.no_rope_layer_interval) {
        (Some(flags), _) => {
            if flags.len() != dims.n_layer {
                let msg = format!("{} flags for {} layers", flags.len(), dims.n_layer);
                return Err(PolicyError::config("no_rope_layers", msg));
            }
            flags
                .iter()
                .enumerate()
                .map(|(i, &f)| match f {
                    0 => Ok(false),
                    1 => Ok(true),
                    other => Err(PolicyError::config(format!("no_rope_layers[{i}]"), format!("{other} is not 0 or 1"))),
                })
                .collect()
        }
        (None, Some(0)) => Err(PolicyError::config("no_rope_layer_interval", "must be > 0".into())),
        (None, interval) => {
            let n = interval.unwrap_or(4);
            Ok((0..dims.n_layer).map(|i| (i + 1) % n != 0).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// A config shaped as HuggingFaceTB/SmolLM3-3B's (its sizes, RoPE base and NoPE interval).
    const SMOLLM3_3B: &str = r#"{"model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"],
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 65536,
        "rope_theta": 5000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": true,
        "use_sliding_window": false, "sliding_window": null, "no_rope_layer_interval": 4,
        "bos_token_id": null, "eos_token_id": 128012, "pad_token_id": 128004}"#;

    /// Every fourth layer without RoPE when the list is absent; a listed pattern as it says; the
    /// defaults transformers fills in; bad lists refused by name.
    #[test]
    fn smollm3_3b_config_and_its_nope_layers() {
        let cfg = ModelConfig::from_json_str(SMOLLM3_3B).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.n_head, d.n_kv_head, d.head_dim, d.rope_theta), (16, 4, 128, 5e6));
        assert!(d.tied && d.rotary());
        let ropes = cfg.layer_ropes().unwrap();
        assert_eq!(ropes.iter().filter(|r| !**r).count(), 9);
        assert!(!ropes[3] && !ropes[35] && ropes[0] && ropes[4]);
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids()), (None, vec![128012]));
        let listed =
            SMOLLM3_3B.replace(r#""num_hidden_layers": 36"#, r#""num_hidden_layers": 3, "no_rope_layers": [1, 0, 1]"#);
        assert_eq!(ModelConfig::from_json_str(&listed).unwrap().layer_ropes().unwrap(), [true, false, true]);
        // left out: transformers' SmolLM3 defaults, not Llama's
        let bare =
            SMOLLM3_3B.replace(r#""num_key_value_heads": 4,"#, "").replace(r#""tie_word_embeddings": true,"#, "");
        let d = ModelConfig::from_json_str(&bare).unwrap().dims().unwrap();
        assert!(d.tied && d.n_kv_head == 4);
        for (list, field) in [("[1, 0]", "no_rope_layers"), ("[1, 2, 1]", "no_rope_layers[1]")] {
            let text = SMOLLM3_3B
                .replace(r#""num_hidden_layers": 36"#, &format!(r#""num_hidden_layers": 3, "no_rope_layers": {list}"#));
            let e = ModelConfig::from_json_str(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
