//! The tensor names of llama.cpp's Llama-style files under transformers' names, and the q/k row
//! order its converter gives Llama files, undone ([`crate::gguf::hf_tensors`]).

use crate::gguf::Arch;

/// llama.cpp tensor name → transformers name (the q/k/v biases only for Qwen2, the q/k norms
/// for Qwen3, Gemma 3 and OLMo 2, the norms after each branch for Gemma 2 and 3 (whose norm
/// before the MLP transformers calls `pre_feedforward_layernorm`) and OLMo 2, Phi-3's fused
/// projections).
pub(crate) fn hf_name(gguf: &str, arch: Arch) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_qkv.weight" if arch == Arch::Phi3 => "self_attn.qkv_proj.weight",
        "ffn_up.weight" if arch == Arch::Phi3 => "mlp.gate_up_proj.weight",
        "ffn_norm.weight" if arch.gemma() => "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight" if arch.post_norms() => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" if arch.post_norms() => "post_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_q.bias" if arch == Arch::Qwen2 => "self_attn.q_proj.bias",
        "attn_k.bias" if arch == Arch::Qwen2 => "self_attn.k_proj.bias",
        "attn_v.bias" if arch == Arch::Qwen2 => "self_attn.v_proj.bias",
        "attn_q_norm.weight" if matches!(arch, Arch::Qwen3 | Arch::Gemma3 | Arch::Olmo2) => "self_attn.q_norm.weight",
        "attn_k_norm.weight" if matches!(arch, Arch::Qwen3 | Arch::Gemma3 | Arch::Olmo2) => "self_attn.k_norm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes the converter's interleaving of each head's rows (`cols` values per row).
pub(crate) fn unpermute_rows(w: &[f32], cols: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for (h, head) in w.chunks(hd * cols).enumerate() {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (src, dst) = (2 * i + j, j * hd / 2 + i);
                let at = h * hd * cols + dst * cols;
                out[at..at + cols].copy_from_slice(&head[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_inverts_the_converter() {
        // the converter's permute: HF row j·hd/2 + i → GGUF row 2i + j
        let (hd, cols) = (4, 2);
        let hf: Vec<f32> = (0..2 * hd * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..2 {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let (src, dst) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                    gguf[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, cols, hd), hf);
    }
}
