//! Where each of our parameters lives in a Hugging Face state dict, per family, and the
//! reshaping between the two: GPT-2's fused `c_attn` (Conv1D, `(in, out)`) split into our q/k/v
//! by columns, GPT-NeoX's `query_key_value` by head groups of rows, Phi-3's `qkv_proj` and
//! `gate_up_proj` by blocks of rows, `nn.Linear`'s `(out, in)` weights (Llama, GPT-NeoX, Phi-3)
//! transposed into our `(in, out)`; and back for saving.

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::HostTensor;
use crate::config::{Dims, Family};
use crate::error::PolicyError;

/// Where one of our parameters lives in an HF state dict.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// Same layout.
    Same(String),
    /// Stored transposed (`nn.Linear`'s `(out, in)`).
    Transposed(String),
    /// Columns `part·w .. (part+1)·w` of a fused tensor with `parts` equal column blocks.
    Columns { name: String, part: usize, parts: usize },
    /// GPT-NeoX's `query_key_value`: rows (entries of a bias) in head groups of `parts` blocks
    /// of `head_dim`, `[q₀ k₀ v₀ q₁ k₁ v₁ …]`; ours is block `part` of every group, a weight
    /// then transposed.
    HeadRows { name: String, part: usize, parts: usize, head_dim: usize },
    /// Phi-3's fused `nn.Linear`s: rows stacked in blocks of `rows[0]`, `rows[1]`, … (`q | k | v`,
    /// `gate | up`); ours is block `part`, transposed.
    Rows { name: String, part: usize, rows: Vec<usize> },
}

impl Source {
    pub(crate) fn name(&self) -> &str {
        match self {
            Source::Same(n)
            | Source::Transposed(n)
            | Source::Columns { name: n, .. }
            | Source::HeadRows { name: n, .. }
            | Source::Rows { name: n, .. } => n,
        }
    }

    /// Where the parameters of several sources are gathered into one tensor on save: the
    /// tensor's name, the part and the number of parts.
    pub(crate) fn fused(&self) -> Option<(&str, usize, usize)> {
        match self {
            Source::Columns { name, part, parts } | Source::HeadRows { name, part, parts, .. } => {
                Some((name, *part, *parts))
            }
            Source::Rows { name, part, rows } => Some((name, *part, rows.len())),
            _ => None,
        }
    }

    /// Our parameter from the HF tensor `t` it lives in (`file` names it in errors).
    pub(crate) fn to_ours(&self, file: &Path, t: HostTensor) -> Result<HostTensor, PolicyError> {
        let name = self.name();
        Ok(match self {
            Source::Same(_) => t,
            Source::Transposed(_) => {
                check_rank(file, name, &t, 2)?;
                transpose(&t)
            }
            Source::Columns { part, parts, .. } => split_columns(file, name, &t, *part, *parts)?,
            Source::HeadRows { part, parts, head_dim, .. } => {
                let rows = head_rows(file, name, &t, *part, *parts, *head_dim)?;
                if rows.shape.len() == 2 {
                    transpose(&rows)
                } else {
                    rows
                }
            }
            Source::Rows { part, rows, .. } => {
                check_rank(file, name, &t, 2)?;
                transpose(&row_block(file, name, &t, *part, rows)?)
            }
        })
    }

    /// The HF tensor of our parameters `parts`: the one parameter of [`Source::Same`] and
    /// [`Source::Transposed`], or those gathered in order (the others, see [`Source::fused`]).
    pub(crate) fn to_hf(&self, mut parts: Vec<HostTensor>) -> HostTensor {
        match self {
            Source::Same(_) => parts.swap_remove(0),
            Source::Transposed(_) => transpose(&parts[0]),
            Source::Columns { .. } => concat_columns(&parts),
            Source::HeadRows { head_dim, .. } => {
                // our weights are (in, out): back to nn.Linear's (out, in) before the rows interleave
                let rows: Vec<HostTensor> =
                    parts.iter().map(|p| if p.shape.len() == 2 { transpose(p) } else { p.clone() }).collect();
                interleave_head_rows(&rows, *head_dim)
            }
            Source::Rows { .. } => {
                let rows: Vec<HostTensor> = parts.iter().map(transpose).collect();
                let shape = vec![rows.iter().map(|r| r.shape[0]).sum(), rows[0].shape[1]];
                HostTensor { shape, data: rows.into_iter().flat_map(|r| r.data).collect() }
            }
        }
    }
}

/// A canonical parameter name's parts: `(head, layer, rest)` of `head.layer.rest`.
fn split_name(canonical: &str) -> (&str, Option<&str>, Option<&str>) {
    let mut parts = canonical.splitn(3, '.');
    (parts.next().unwrap_or(""), parts.next(), parts.next())
}

/// Maps a canonical parameter name (see [`crate::CausalLm::params`]) to its HF source for a
/// model of sizes `d` (Gemma's four norms per block move the pre-MLP norm off Llama's
/// `post_attention_layernorm`; GPT-NeoX's `query_key_value` is in head groups; Phi-3 fuses
/// projections).
pub(crate) fn hf_source(d: &Dims, canonical: &str) -> Source {
    let named = match d.family {
        Family::Gpt2 => gpt2_source(canonical),
        Family::Llama => llama_source(d, canonical),
        Family::GptNeox => neox_source(d.head_dim, canonical),
    };
    named.unwrap_or_else(|| Source::Same(canonical.into()))
}

/// A block parameter's `(module, weight or bias)` from the rest of its name after
/// `blocks.{i}.`: `attn.q.weight` is `("attn.q", "weight")`.
fn block_param(rest: &str) -> (&str, &str) {
    rest.rsplit_once('.').unwrap_or((rest, ""))
}

/// Which of q, k and v `module` (`attn.q`, …) is, in a fused tensor's order.
fn qkv_part(module: &str) -> usize {
    ["attn.q", "attn.k", "attn.v"].iter().position(|m| *m == module).unwrap_or(0)
}

/// An `nn.Linear`'s tensor `{p}.{n}.{x}`: the weight stored `(out, in)`, the bias as it is.
fn linear(p: &str, n: &str, x: &str) -> Source {
    match x {
        "bias" => Source::Same(format!("{p}.{n}.{x}")),
        _ => Source::Transposed(format!("{p}.{n}.{x}")),
    }
}

/// [`hf_source`] for GPT-2 (`GPT2LMHeadModel`: Conv1D weights, stored `(in, out)` as ours).
fn gpt2_source(canonical: &str) -> Option<Source> {
    let same = |n: String| Some(Source::Same(n));
    match split_name(canonical) {
        ("wte", None, None) => same("transformer.wte.weight".into()),
        ("wpe", None, None) => same("transformer.wpe.weight".into()),
        ("ln_f", Some(x), None) => same(format!("transformer.ln_f.{x}")),
        ("blocks", Some(i), Some(rest)) => {
            let (p, (module, x)) = (format!("transformer.h.{i}"), block_param(rest));
            match module {
                "ln1" => same(format!("{p}.ln_1.{x}")),
                "ln2" => same(format!("{p}.ln_2.{x}")),
                "attn.q" | "attn.k" | "attn.v" => {
                    Some(Source::Columns { name: format!("{p}.attn.c_attn.{x}"), part: qkv_part(module), parts: 3 })
                }
                "attn.o" => same(format!("{p}.attn.c_proj.{x}")),
                "mlp.fc" => same(format!("{p}.mlp.c_fc.{x}")),
                "mlp.proj" => same(format!("{p}.mlp.c_proj.{x}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// [`hf_source`] for the Llama family (`LlamaForCausalLM` and the Qwen, Mistral, Gemma 3 and
/// Phi-3 layouts on it).
fn llama_source(d: &Dims, canonical: &str) -> Option<Source> {
    let same = |n: String| Some(Source::Same(n));
    let post_norms = d.post_norms;
    match split_name(canonical) {
        ("wte", None, None) => same("model.embed_tokens.weight".into()),
        ("lm_head", None, None) => same("lm_head.weight".into()),
        ("ln_f", Some(x), None) => same(format!("model.norm.{x}")),
        ("blocks", Some(i), Some(rest)) => {
            let (p, (module, x)) = (format!("model.layers.{i}"), block_param(rest));
            let lin = |n: &str| Some(linear(&p, n, x));
            let rows = |n: &str, part: usize, rows: Vec<usize>| {
                Some(Source::Rows { name: format!("{p}.{n}.{x}"), part, rows })
            };
            let (q, kv, ff) = (d.q_dim(), d.kv_dim(), d.d_ff);
            match module {
                "attn.q" | "attn.k" | "attn.v" if d.fused_projections => {
                    rows("self_attn.qkv_proj", qkv_part(module), vec![q, kv, kv])
                }
                "mlp.gate" if d.fused_projections => rows("mlp.gate_up_proj", 0, vec![ff, ff]),
                "mlp.up" if d.fused_projections => rows("mlp.gate_up_proj", 1, vec![ff, ff]),
                "ln1" => same(format!("{p}.input_layernorm.{x}")),
                "ln2" if post_norms => same(format!("{p}.pre_feedforward_layernorm.{x}")),
                "ln2" => same(format!("{p}.post_attention_layernorm.{x}")),
                "attn.post_norm" => same(format!("{p}.post_attention_layernorm.{x}")),
                "mlp.post_norm" => same(format!("{p}.post_feedforward_layernorm.{x}")),
                "attn.q" => lin("self_attn.q_proj"),
                "attn.k" => lin("self_attn.k_proj"),
                "attn.v" => lin("self_attn.v_proj"),
                "attn.o" => lin("self_attn.o_proj"),
                "attn.q_norm" => same(format!("{p}.self_attn.q_norm.{x}")),
                "attn.k_norm" => same(format!("{p}.self_attn.k_norm.{x}")),
                "mlp.gate" => lin("mlp.gate_proj"),
                "mlp.up" => lin("mlp.up_proj"),
                "mlp.down" => lin("mlp.down_proj"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// [`hf_source`] for GPT-NeoX (`GPTNeoXForCausalLM`'s names; its untied head is `embed_out`).
fn neox_source(head_dim: usize, canonical: &str) -> Option<Source> {
    let same = |n: String| Some(Source::Same(n));
    match split_name(canonical) {
        ("wte", None, None) => same("gpt_neox.embed_in.weight".into()),
        ("lm_head", None, None) => same("embed_out.weight".into()),
        ("ln_f", Some(x), None) => same(format!("gpt_neox.final_layer_norm.{x}")),
        ("blocks", Some(i), Some(rest)) => {
            let (p, (module, x)) = (format!("gpt_neox.layers.{i}"), block_param(rest));
            let lin = |n: &str| Some(linear(&p, n, x));
            match module {
                "ln1" => same(format!("{p}.input_layernorm.{x}")),
                "ln2" => same(format!("{p}.post_attention_layernorm.{x}")),
                "attn.q" | "attn.k" | "attn.v" => Some(Source::HeadRows {
                    name: format!("{p}.attention.query_key_value.{x}"),
                    part: qkv_part(module),
                    parts: 3,
                    head_dim,
                }),
                "attn.o" => lin("attention.dense"),
                "mlp.fc" => lin("mlp.dense_h_to_4h"),
                "mlp.proj" => lin("mlp.dense_4h_to_h"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Tensors HF checkpoints may carry that are buffers, not parameters (safe to ignore).
pub(crate) fn is_known_buffer(family: Family, name: &str, tied: bool) -> bool {
    match family {
        Family::Gpt2 => name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight",
        Family::Llama => name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight"),
        // transformers 4.2x wrote the causal mask and RoPE frequencies with Pythia's weights
        Family::GptNeox => {
            name.ends_with(".attention.bias")
                || name.ends_with(".attention.masked_bias")
                || name.ends_with("rotary_emb.inv_freq")
                || (tied && name == "embed_out.weight")
        }
    }
}

/// Accepts the original GPT-2 names without the `transformer.` prefix, a GPT-NeoX head named
/// `lm_head` (transformers 5's name in memory; its files keep `embed_out`), and the text model
/// of a Gemma 3 multimodal checkpoint ([`text_model_names`]).
pub(crate) fn normalise_names(
    family: Family,
    mut tensors: BTreeMap<String, HostTensor>,
) -> BTreeMap<String, HostTensor> {
    if family == Family::Llama {
        tensors = text_model_names(tensors);
    }
    if family == Family::GptNeox && !tensors.contains_key("embed_out.weight") {
        if let Some(head) = tensors.remove("lm_head.weight") {
            tensors.insert("embed_out.weight".into(), head);
        }
    }
    let needs_prefix = family == Family::Gpt2 && !tensors.keys().any(|k| k.starts_with("transformer."));
    if !needs_prefix {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| (if k.starts_with("lm_head") { k } else { format!("transformer.{k}") }, v))
        .collect()
}

/// A `Gemma3ForConditionalGeneration` checkpoint's text model under `Gemma3ForCausalLM`'s names:
/// `language_model.model.*` and `language_model.lm_head.*` (transformers 4's files) or
/// `model.language_model.*` (transformers 5's) as `model.*` and `lm_head.*`. Its vision tower
/// and projector (`vision_tower.*`, `multi_modal_projector.*`, with or without `model.`) are
/// left out: rlhf trains the text model ([`crate::gemma3::text_of_multimodal`]). A checkpoint
/// without language-model names is returned as it is.
fn text_model_names(tensors: BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
    const TEXT: [(&str, &str); 3] = [
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
    ];
    const VISION: [&str; 4] =
        ["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."];
    if !tensors.keys().any(|k| TEXT.iter().any(|(from, _)| k.starts_with(from))) {
        return tensors;
    }
    tensors
        .into_iter()
        .filter(|(k, _)| !VISION.iter().any(|v| k.starts_with(v)))
        .map(|(k, v)| match TEXT.iter().find(|(from, _)| k.starts_with(from)) {
            Some((from, to)) => (format!("{to}{}", &k[from.len()..]), v),
            None => (k, v),
        })
        .collect()
}

fn check_rank(file: &Path, name: &str, t: &HostTensor, rank: usize) -> Result<(), PolicyError> {
    if t.shape.len() != rank {
        return Err(PolicyError::tensor(
            file,
            name,
            format!("rank {} (shape {:?}), expected rank {rank}", t.shape.len(), t.shape),
        ));
    }
    Ok(())
}

pub(crate) fn transpose(t: &HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    HostTensor { shape: vec![c, r], data: transpose_rows(&t.data, r, c) }
}

/// `(r, c)` row-major → `(c, r)` row-major, in square tiles written a row at a time: the
/// element-by-element loop strode through the output (a 49152-row LM head at 8 ns a value,
/// its stride a multiple of the page size) and took a quarter of a checkpoint's loading.
pub(crate) fn transpose_rows(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    const TILE: usize = 32;
    assert_eq!(a.len(), r * c, "transpose: {} values for {r}x{c}", a.len());
    let mut t = vec![0.0f32; r * c];
    for i0 in (0..r).step_by(TILE) {
        for j0 in (0..c).step_by(TILE) {
            for j in j0..(j0 + TILE).min(c) {
                let out = &mut t[j * r..(j + 1) * r];
                for i in i0..(i0 + TILE).min(r) {
                    out[i] = a[i * c + j];
                }
            }
        }
    }
    t
}

/// Columns `part` of `parts` equal blocks; a 1-D tensor is treated as one row.
fn split_columns(
    file: &Path,
    name: &str,
    t: &HostTensor,
    part: usize,
    parts: usize,
) -> Result<HostTensor, PolicyError> {
    let (rows, cols) = match t.shape.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        s => return Err(PolicyError::tensor(file, name, format!("shape {s:?}, expected 1-D or 2-D"))),
    };
    if cols % parts != 0 {
        return Err(PolicyError::tensor(file, name, format!("{cols} columns do not split into {parts} equal parts")));
    }
    let w = cols / parts;
    let data = (0..rows).flat_map(|r| t.data[r * cols + part * w..r * cols + (part + 1) * w].iter().copied()).collect();
    let shape = if t.shape.len() == 1 { vec![w] } else { vec![rows, w] };
    Ok(HostTensor { shape, data })
}

/// Block `part` of every head group of `parts` blocks of `head_dim` along the first axis (rows
/// of a 2-D tensor, entries of a 1-D one): [`Source::HeadRows`].
fn head_rows(
    file: &Path,
    name: &str,
    t: &HostTensor,
    part: usize,
    parts: usize,
    head_dim: usize,
) -> Result<HostTensor, PolicyError> {
    let (rows, cols) = match t.shape.as_slice() {
        [n] => (*n, 1),
        [r, c] => (*r, *c),
        s => return Err(PolicyError::tensor(file, name, format!("shape {s:?}, expected 1-D or 2-D"))),
    };
    let group = parts * head_dim;
    if rows % group != 0 {
        let msg = format!("{rows} rows do not split into heads of {parts} blocks of {head_dim}");
        return Err(PolicyError::tensor(file, name, msg));
    }
    let block = head_dim * cols;
    let data: Vec<f32> =
        t.data.chunks(group * cols).flat_map(|g| g[part * block..(part + 1) * block].iter().copied()).collect();
    let mut shape = t.shape.clone();
    shape[0] = rows / parts;
    Ok(HostTensor { shape, data })
}

/// Rows block `part` of a 2-D tensor stacked from blocks of `rows[0]`, `rows[1]`, … rows:
/// [`Source::Rows`].
fn row_block(file: &Path, name: &str, t: &HostTensor, part: usize, rows: &[usize]) -> Result<HostTensor, PolicyError> {
    let (total, cols) = (t.shape[0], t.shape[1]);
    if rows.iter().sum::<usize>() != total {
        let msg = format!("{total} rows, expected {} (blocks of {rows:?})", rows.iter().sum::<usize>());
        return Err(PolicyError::tensor(file, name, msg));
    }
    let start: usize = rows[..part].iter().sum();
    let data = t.data[start * cols..(start + rows[part]) * cols].to_vec();
    Ok(HostTensor { shape: vec![rows[part], cols], data })
}

/// The inverse of [`head_rows`]: `parts` tensors of equal shape interleaved head by head.
fn interleave_head_rows(parts: &[HostTensor], head_dim: usize) -> HostTensor {
    let cols = if parts[0].shape.len() == 1 { 1 } else { parts[0].shape[1] };
    let block = head_dim * cols;
    let heads = parts[0].data.len() / block;
    let mut data = Vec::with_capacity(heads * block * parts.len());
    for h in 0..heads {
        for p in parts {
            data.extend_from_slice(&p.data[h * block..(h + 1) * block]);
        }
    }
    let mut shape = parts[0].shape.clone();
    shape[0] *= parts.len();
    HostTensor { shape, data }
}

fn concat_columns(parts: &[HostTensor]) -> HostTensor {
    let rows = if parts[0].shape.len() == 1 { 1 } else { parts[0].shape[0] };
    let widths: Vec<usize> = parts.iter().map(|p| *p.shape.last().expect("non-empty shape")).collect();
    let mut data = Vec::with_capacity(rows * widths.iter().sum::<usize>());
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(&widths) {
            data.extend_from_slice(&p.data[r * w..(r + 1) * w]);
        }
    }
    let total: usize = widths.iter().sum();
    let shape = if parts[0].shape.len() == 1 { vec![total] } else { vec![rows, total] };
    HostTensor { shape, data }
}

#[cfg(test)]
mod tests {
    use super::transpose_rows;

    /// The tiled transpose against the definition, for shapes around and between tiles.
    #[test]
    fn transpose_rows_is_the_transpose() {
        for (r, c) in [(1, 1), (3, 70), (32, 32), (33, 31), (100, 7), (0, 5), (65, 96)] {
            let a: Vec<f32> = (0..r * c).map(|i| i as f32 * 0.5 - 3.0).collect();
            let t = transpose_rows(&a, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], a[i * c + j], "{r}x{c} at ({i}, {j})");
                }
            }
            assert_eq!(transpose_rows(&t, c, r), a, "{r}x{c} twice");
        }
    }
}
