//! OLMo 2 (`Olmo2ForCausalLM`, `model_type: "olmo2"`: AllenAI's OLMo-2-0425-1B, -1124-7B and
//! -13B, and their -SFT, -DPO and -Instruct checkpoints): Llama's config ([`LlamaConfig`]) and
//! network with its norms moved. No norm sits on a branch's input; each branch's output passes
//! an RMSNorm before the residual add, `x + norm(attn(x))` then `x + norm(mlp(x))`
//! ([`Dims::pre_norms`] off, [`Dims::post_norms`] on); and the queries and keys pass an RMSNorm
//! over each row's whole projection, `(H·Dh,)` and `(Hkv·Dh,)` gains, before the split into
//! heads and RoPE ([`Dims::qk_norm_full`]). transformers' defaults: pad 1, EOS 50279, no BOS,
//! RMSNorm epsilon 1e-5.

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;

/// Writes transformers' `Olmo2Config` defaults into an `olmo2` config object where it leaves
/// them out.
pub(crate) fn fill_defaults(config: &mut serde_json::Value) {
    let defaults: [(&str, serde_json::Value); 3] =
        [("pad_token_id", 1.into()), ("eos_token_id", 50279.into()), ("rms_norm_eps", 1e-5.into())];
    crate::config::fill_defaults(config, defaults, "Olmo2ForCausalLM");
}

/// Llama's sizes with OLMo 2's norms.
pub(crate) fn dims(c: &LlamaConfig) -> Result<Dims, PolicyError> {
    let d = crate::config::llama_dims(c, false, true)?;
    Ok(Dims { pre_norms: false, post_norms: true, qk_norm_full: true, ..d })
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// OLMo-2-0425-1B-Instruct's `config.json` (transformers 4.52).
    const OLMO2_1B: &str = r#"{"architectures": ["Olmo2ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 100257, "eos_token_id": 100257, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16,
        "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
        "rope_scaling": null, "rope_theta": 500000, "tie_word_embeddings": false, "torch_dtype": "float32",
        "transformers_version": "4.52.0.dev0", "use_cache": true, "vocab_size": 100352}"#;

    #[test]
    fn reads_olmo2_1b_config() {
        let cfg = ModelConfig::from_json_str(OLMO2_1B).unwrap();
        let d = cfg.dims().unwrap();
        assert_eq!((d.vocab, d.d_model, d.n_layer, d.n_head, d.n_kv_head, d.head_dim), (100352, 2048, 16, 16, 16, 128));
        assert!(!d.pre_norms && d.post_norms && d.qk_norm && d.qk_norm_full && !d.tied && !d.norm_unit_offset);
        assert_eq!(
            (cfg.bos_token_id(), cfg.eos_token_ids(), cfg.pad_token_id()),
            (Some(100257), vec![100257], Some(100277))
        );
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
        let bare = r#"{"model_type": "olmo2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#;
        let cfg = ModelConfig::from_json_str(bare).unwrap();
        assert_eq!((cfg.bos_token_id(), cfg.eos_token_ids(), cfg.pad_token_id()), (None, vec![50279], Some(1)));
    }
}
