//! GGUF files of architecture `gptneox` (llama.cpp's GPT-NeoX: Pythia, RedPajama-INCITE) as a
//! transformers `GPTNeoXForCausalLM` ([`crate::gpt_neox`]).
//!
//! llama.cpp's converter writes `query_key_value` as `attn_qkv` with all query rows first, then
//! the keys, then the values (transformers keeps each head's q, k and v together: undone on
//! load, [`heads_together`]), and records neither the GELU (its graph runs the tanh
//! approximation whatever the checkpoint says) nor, before the converter writes one, the RoPE
//! base. Read here as the exact GELU of Pythia and GPT-NeoX's default and transformers' base
//! of 10000 when `rope.freq_base` is absent.

use crate::error::PolicyError;
use crate::gguf::{Gguf, Value};

/// The HF config of a `gptneox` file: sizes from its metadata, the rotated share from
/// `rope.dimension_count`, the residual from `use_parallel_residual` (llama.cpp's default,
/// parallel, when absent), a tied head when there is no `output.weight`, and `special`'s
/// ids (`bos_token_id`, `eos_token_id`, `pad_token_id`).
pub(crate) fn model_config(g: &Gguf, special: serde_json::Value) -> Result<serde_json::Value, PolicyError> {
    let vocab = g.vocab_size()?;
    let (hidden, n_head) = (g.int("gptneox.embedding_length")?, g.int("gptneox.attention.head_count")?);
    if n_head == 0 || !hidden.is_multiple_of(n_head) {
        return Err(g.err("metadata", format!("{hidden} wide in {n_head} heads: not a whole head width")));
    }
    let head_dim = hidden / n_head;
    let rotary = g.int_opt("gptneox.rope.dimension_count")?.unwrap_or(head_dim);
    let pct = crate::dims::rotary_share(rotary, head_dim).map_err(|e| g.err("metadata", e))?;
    let parallel = match g.metadata.get("gptneox.use_parallel_residual") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(g.err("metadata", format!("`gptneox.use_parallel_residual` {other:?} is not a bool")))
        }
    };
    let mut cfg = serde_json::json!({
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.int("gptneox.feed_forward_length")?,
        "num_hidden_layers": g.int("gptneox.block_count")?,
        "num_attention_heads": n_head,
        "hidden_act": "gelu",
        "max_position_embeddings": g.int("gptneox.context_length")?,
        "layer_norm_eps": g.float("gptneox.attention.layer_norm_epsilon")? as f32 as f64,
        "rotary_pct": pct,
        "rotary_emb_base": g.float_opt("gptneox.rope.freq_base")?.unwrap_or(10000.0),
        "use_parallel_residual": parallel,
        "tie_word_embeddings": !g.tensors.iter().any(|t| t.name == "output.weight"),
    });
    let obj = cfg.as_object_mut().expect("a JSON object");
    obj.extend(special.as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
    Ok(cfg)
}

/// llama.cpp tensor name → transformers name.
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("gpt_neox.embed_in.weight"),
        "output_norm.weight" => Some("gpt_neox.final_layer_norm.weight"),
        "output_norm.bias" => Some("gpt_neox.final_layer_norm.bias"),
        "output.weight" => Some("embed_out.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let (layer, part) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_qkv" => "attention.query_key_value",
        "attn_output" => "attention.dense",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_up" => "mlp.dense_h_to_4h",
        "ffn_down" => "mlp.dense_4h_to_h",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("gpt_neox.layers.{layer}.{hf}.{kind}"))
}

/// `attn_qkv`'s rows (`cols` values each; 1 for the bias) from the converter's order — every
/// head's query rows, then the keys, then the values — to transformers': head by head, its q,
/// k and v rows together.
pub(crate) fn heads_together(w: &[f32], cols: usize, n_head: usize, head_dim: usize) -> Vec<f32> {
    let block = head_dim * cols;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for part in 0..3 {
            let at = (part * n_head + h) * block;
            out.extend_from_slice(&w[at..at + block]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Undoes the converter's reordering (`reshape(n_head, 3, hd, cols)`, then q, k and v
    /// stacked), for a weight and a bias.
    #[test]
    fn heads_together_inverts_the_converter() {
        let (n_head, hd) = (3, 2);
        for cols in [4, 1] {
            // transformers' layout: row (h, part, r) holds 100·h + 10·part + r in every column
            let hf: Vec<f32> = (0..n_head)
                .flat_map(|h| (0..3).flat_map(move |p| (0..hd).map(move |r| (100 * h + 10 * p + r) as f32)))
                .flat_map(|v| std::iter::repeat_n(v, cols))
                .collect();
            let block = hd * cols;
            let converted: Vec<f32> = (0..3)
                .flat_map(|p| (0..n_head).flat_map(move |h| (h * 3 + p) * block..(h * 3 + p + 1) * block))
                .map(|i| hf[i])
                .collect();
            assert_eq!(heads_together(&converted, cols, n_head, hd), hf, "cols {cols}");
        }
    }

    #[test]
    fn names_follow_the_converter() {
        assert_eq!(hf_name("blk.3.attn_qkv.bias").unwrap(), "gpt_neox.layers.3.attention.query_key_value.bias");
        assert_eq!(hf_name("blk.0.ffn_up.weight").unwrap(), "gpt_neox.layers.0.mlp.dense_h_to_4h.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "embed_out.weight");
        assert!(hf_name("blk.0.attn_q.weight").is_none() && hf_name("blk.0.attn_qkv.scale").is_none());
    }
}
