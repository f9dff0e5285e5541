//! A whole GPT-2 block — `x₂ = x + attn(LN₁(x))`, `y = x₂ + proj(gelu(fc(LN₂(x₂))))` — as one
//! CPU op with its own backward pass; also GPT-NeoX's, whose queries and keys are turned by
//! RoPE and whose MLP, with the parallel residual, reads `LN₂(x)` instead of `LN₂(x₂)`.
//!
//! The per-op path (`Block::forward_ops` in `model.rs`) runs ten fused ops per block, and
//! each one copies its inputs out of dfdx's storage (tensors cannot lend their buffers),
//! allocates its output gradient zeroed and accumulates into its input's. Here every
//! intermediate lives in a host buffer this op owns: the block input is copied once, the
//! weights once per step, and the backward pass writes each intermediate gradient directly
//! (`dx = dy·Wᵀ` overwrites instead of accumulating into a zeroed buffer), so the only
//! gradient buffers dfdx sees are the block input's and the parameters'. The kernels are the
//! per-op path's own (LayerNorm rows, the attention core, the gated GELU, the gemm calls),
//! and a test pins the two paths to each other, values and every gradient.

use dfdx::prelude::*;
use dfdx::tensor::CpuError;

use crate::attention::{attn_backward, attn_forward, AttnShape, Probs};
use crate::config::{GeluKind, NormKind};
use crate::gelu::{gated_backward_inplace, gated_forward, gelu_gate, GateDerivative};
use crate::layer_norm::{ln_backward_rows, ln_forward_rows};
use crate::linear::{affine_output, colsum_into};
use crate::model::{Block, Linear, Mlp, Norm};
use crate::rope::{self, RopeTables};
use crate::strided::{add_into, add_rows, gather_rows, gemm_into, gemm_new, host_vec, par_copy, zeros, View};
use std::sync::Arc;

type A2<T> = Tensor<(usize, usize), f32, Cpu, T>;

/// What a whole-block op reads besides the block and its input.
#[derive(Debug, Clone, Copy)]
pub struct BlockInputs<'a> {
    /// The additive `(B, T, T)` attention mask, row-major.
    pub mask: &'a [f32],
    /// The attention's sizes.
    pub shape: AttnShape,
    /// The MLP's GELU.
    pub gelu: GeluKind,
    /// RoPE (GPT-NeoX's): the `(B·T, Dh)` [`rope::tables`] of the rows' positions, and how
    /// many of each head's dimensions turn ([`crate::Dims::rotary_dim`]).
    pub rope: Option<(&'a Arc<RopeTables>, usize)>,
    /// GPT-NeoX's parallel residual ([`crate::Dims::parallel_residual`]).
    pub parallel: bool,
}

/// A linear layer's weight `(in, out)` and bias, copied to the host once per call.
struct HostLinear {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    i: usize,
    o: usize,
}

impl HostLinear {
    fn new(l: &Linear<Cpu>) -> Self {
        let (i, o) = *l.w.shape();
        HostLinear { w: host_vec(&l.w), b: l.b.as_ref().map(host_vec), i, o }
    }

    /// `x (n, in) → x·W + b (+ residual)`.
    fn forward(&self, x: &[f32], n: usize, residual: Option<Vec<f32>>) -> Vec<f32> {
        let (xv, wv) = (View::rows(x, self.i), View::rows(&self.w, self.o));
        affine_output((n, self.i, self.o), xv, wv, self.b.as_deref(), residual, threads())
    }

    /// `dx = dy·Wᵀ` for `dy (n, out)`, in a new buffer.
    fn input_grad(&self, dy: &[f32], n: usize) -> Vec<f32> {
        let (dyv, wt) = (View::rows(dy, self.o), View::rows(&self.w, self.o).t());
        gemm_new((n, self.i, self.o), dyv, wt, 1.0, threads())
    }

    /// `dx += dy·Wᵀ` for `dy (n, out)`.
    fn add_input_grad(&self, dx: &mut [f32], dy: &[f32], n: usize) {
        let (dyv, wt) = (View::rows(dy, self.o), View::rows(&self.w, self.o).t());
        gemm_into(dx, (n, self.i, self.o), dyv, wt, 1.0, true, threads());
    }
}

/// `dW += xᵀ·dy` and `db += Σ_rows dy` into the gradients of `l`'s parameters; nothing for a
/// frozen layer ([`crate::CausalLm::set_frozen_trunk`]), as in the per-op path.
fn param_grads(grads: &mut Gradients<f32, Cpu>, l: &Linear<Cpu>, x: &[f32], dy: &[f32]) -> Result<(), CpuError> {
    if l.frozen {
        return Ok(());
    }
    let (i, o) = *l.w.shape();
    let n = x.len() / i;
    let (xt, dyv) = (View::rows(x, i).t(), View::rows(dy, o));
    gemm_into(grads.get_or_alloc_mut(&l.w)?, (i, o, n), xt, dyv, 1.0, true, threads());
    if let Some(b) = &l.b {
        colsum_into(grads.get_or_alloc_mut(b)?, dy);
    }
    Ok(())
}

/// A LayerNorm's gain and bias on the host.
struct HostNorm {
    g: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
}

impl HostNorm {
    fn new(n: &Norm<Cpu>) -> Self {
        HostNorm { g: host_vec(&n.w), b: n.b.as_ref().map(host_vec), eps: n.eps }
    }
}

/// `dg`, `db` of a LayerNorm into its parameters' gradients.
fn norm_grads(grads: &mut Gradients<f32, Cpu>, n: &Norm<Cpu>, (dg, db): (Vec<f32>, Vec<f32>)) -> Result<(), CpuError> {
    add_into(grads.get_or_alloc_mut(&n.w)?, &dg);
    if let Some(b) = &n.b {
        add_into(grads.get_or_alloc_mut(b)?, &db);
    }
    Ok(())
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// Host copies of one block's parameters.
struct HostBlock {
    ln1: HostNorm,
    q: HostLinear,
    k: HostLinear,
    v: HostLinear,
    o: HostLinear,
    ln2: HostNorm,
    fc: HostLinear,
    proj: HostLinear,
}

/// What the forward pass keeps for the backward pass (names as in the module doc; `f` is the
/// MLP's pre-activation, `gate` GELU's gate, `a = gelu(f)`).
struct Saved {
    x: Vec<f32>,
    st1: Vec<(f32, f32)>,
    h1: Vec<f32>,
    /// q (turned), k (turned) and v.
    qkv: [Vec<f32>; 3],
    probs: Probs,
    /// The attention output at the kept rows (all rows without `rows`).
    att: Vec<f32>,
    rows: Option<Vec<usize>>,
    /// `LN₂`'s input at the kept rows: `x₂`, or the block input `x` with the parallel residual.
    ln2_in: Vec<f32>,
    /// The RoPE tables and turned width ([`BlockInputs::rope`]).
    rope: Option<(Arc<RopeTables>, usize)>,
    parallel: bool,
    st2: Vec<(f32, f32)>,
    h2: Vec<f32>,
    f: Vec<f32>,
    gate: Vec<f32>,
    a: Vec<f32>,
}

/// The block as one op when it is a GPT-2 block (LayerNorms, a GELU MLP) or a GPT-NeoX one
/// (the same with [`BlockInputs::rope`] and [`BlockInputs::parallel`]); otherwise `Err(x)` hands
/// the input back for the per-op path. `x`: `(B·T, C)`. With `rows`, the output is those rows
/// only, `(rows, C)`: every row's keys and values still feed the attention, but the output
/// projection and the MLP run on the kept rows alone (the last block of a model whose caller
/// reads a few positions, like TRL's `logits_to_keep` one layer further down).
pub fn gpt2_block_cpu<T: Tape<f32, Cpu>>(
    x: A2<T>,
    blk: &Block<Cpu>,
    inputs: BlockInputs<'_>,
    rows: Option<&[usize]>,
) -> Result<A2<T>, A2<T>> {
    let Mlp::Gelu { fc, proj } = &blk.mlp else { return Err(x) };
    let (Some(ln1), Some(ln2)) = (&blk.ln1, &blk.ln2) else { return Err(x) };
    // a LoRA layer (crate::lora) runs its update in the per-op path
    let lora = [&blk.wq, &blk.wk, &blk.wv, &blk.wo, fc, proj].iter().any(|l| l.lora.is_some());
    let plain = blk.qk_norm.is_none() && blk.post_norms.is_none() && blk.window.is_none() && !lora;
    if ln1.kind != NormKind::LayerNorm || ln2.kind != NormKind::LayerNorm || !plain {
        return Err(x);
    }
    let s = inputs.shape;
    let x = x.contiguous();
    let (n, c) = *x.shape();
    assert_eq!(n, s.b * s.t, "block: {n} rows for a batch of {}×{}", s.b, s.t);
    assert!(rows.is_none_or(|r| r.iter().all(|&r| r < n)), "block: a kept row beyond the {n} of the input");
    let (x, mut tape) = x.split_tape();
    let w = HostBlock {
        ln1: HostNorm::new(ln1),
        q: HostLinear::new(&blk.wq),
        k: HostLinear::new(&blk.wk),
        v: HostLinear::new(&blk.wv),
        o: HostLinear::new(&blk.wo),
        ln2: HostNorm::new(ln2),
        fc: HostLinear::new(fc),
        proj: HostLinear::new(proj),
    };
    let (gate_fwd, dydx) = gelu_gate(inputs.gelu);
    let keep = T::OWNS_TAPE;
    let mut xv = host_vec(&x);
    let (h1, st1) = ln_forward_rows(&xv, c, &w.ln1.g, w.ln1.b.as_deref(), w.ln1.eps);
    let mut qkv = [w.q.forward(&h1, n, None), w.k.forward(&h1, n, None), w.v.forward(&h1, n, None)];
    if let Some((tab, rotary)) = inputs.rope {
        for q_or_k in &mut qkv[..2] {
            rope::apply_rows(q_or_k, (&tab.cos, &tab.sin), s.dh, rotary, false);
        }
    }
    assert_eq!(inputs.mask.len(), n * s.t, "block: the mask is not (B, T, T)");
    let (probs, att) = attn_forward(&qkv[0], &qkv[1], &qkv[2], inputs.mask, s);
    // the parallel residual's MLP reads the block input at the kept rows
    let x_par = inputs.parallel.then(|| rows.map_or_else(|| par_copy(&xv), |r| gather_rows(&xv, r, c)));
    // the residual seeds the projection's output; the backward pass needs x again
    let (att, residual) = match rows {
        Some(r) => (gather_rows(&att, r, w.o.i), gather_rows(&xv, r, c)),
        None => (att, if keep { par_copy(&xv) } else { std::mem::take(&mut xv) }),
    };
    let m = rows.map_or(n, <[usize]>::len);
    let mut x2 = w.o.forward(&att, m, Some(residual));
    let (h2, st2) = ln_forward_rows(x_par.as_deref().unwrap_or(&x2), c, &w.ln2.g, w.ln2.b.as_deref(), w.ln2.eps);
    let f = w.fc.forward(&h2, m, None);
    let (a, gate) = gated_forward(&f, gate_fwd);
    let save_x2 = keep && x_par.is_none();
    let y = w.proj.forward(&a, m, Some(if save_x2 { par_copy(&x2) } else { std::mem::take(&mut x2) }));
    let out = x.device().tensor_from_vec(y, (m, c));
    if keep {
        let rows = rows.map(<[usize]>::to_vec);
        let rope = inputs.rope.map(|(tab, r)| (Arc::clone(tab), r));
        let ln2_in = x_par.unwrap_or(x2);
        let parallel = inputs.parallel;
        let saved = Saved { x: xv, st1, h1, qkv, probs, att, rows, ln2_in, rope, parallel, st2, h2, f, gate, a };
        let (xg, og, blk) = (x.ghost(), out.ghost(), blk.clone());
        tape.add_backward_op(move |grads| {
            // one &mut into Gradients at a time: move dy out, then put it back
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let dx = backward(grads, &blk, &w, saved, &dy, s, dydx)?;
            add_into(grads.get_or_alloc_mut(&xg)?, &dx);
            **grads.get_or_alloc_mut(&og)? = dy;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// The block's backward pass: parameter gradients into `grads`; returns `dx` `(B·T, C)`.
fn backward(
    grads: &mut Gradients<f32, Cpu>,
    blk: &Block<Cpu>,
    w: &HostBlock,
    sv: Saved,
    dy: &[f32],
    s: AttnShape,
    dydx: GateDerivative,
) -> Result<Vec<f32>, CpuError> {
    let (Mlp::Gelu { fc, proj }, Some(ln1), Some(ln2)) = (&blk.mlp, &blk.ln1, &blk.ln2) else {
        unreachable!("checked in the forward pass")
    };
    let (n, c) = (s.b * s.t, w.ln1.g.len());
    let m = sv.rows.as_ref().map_or(n, Vec::len);
    // MLP (kept rows): y = x₂ + a·W_proj + b_proj, a = gelu(f), f = h₂·W_fc + b_fc
    param_grads(grads, proj, &sv.a, dy)?;
    drop(sv.a);
    let mut df = w.proj.input_grad(dy, m);
    gated_backward_inplace(&mut df, &sv.f, &sv.gate, dydx);
    drop((sv.f, sv.gate));
    param_grads(grads, fc, &sv.h2, &df)?;
    let dh = w.fc.input_grad(&df, m);
    drop(df);
    // dx₂ = dy + LN₂'s backward pass of dh₂; with the parallel residual LN₂ read the block
    // input, so that part waits for dx
    let mut dx = par_copy(dy);
    let mut dx_par = if sv.parallel { zeros(m * c) } else { vec![] };
    let ln2_dx = if sv.parallel { &mut dx_par } else { &mut dx };
    norm_grads(grads, ln2, ln_backward_rows(&dh, &sv.ln2_in, &sv.st2, &w.ln2.g, ln2_dx))?;
    drop((sv.ln2_in, sv.h2));
    // attention: x₂ = x + att·W_o + b_o (kept rows)
    param_grads(grads, &blk.wo, &sv.att, &dx)?;
    drop(sv.att);
    let mut datt = w.o.input_grad(&dx, m);
    if let Some(rows) = &sv.rows {
        // back to every row: the dropped rows' outputs had no gradient
        (datt, dx) = (scattered(&datt, rows, n, w.o.i), scattered(&dx, rows, n, c));
    }
    let [q, k, v] = &sv.qkv;
    let (mut dq, mut dk, mut dv) = (zeros(q.len()), zeros(k.len()), zeros(v.len()));
    attn_backward(&sv.probs, (q, k, v), &datt, s, &mut dq, &mut dk, &mut dv);
    drop((sv.probs, datt));
    if let Some((tab, rotary)) = &sv.rope {
        // RoPE is a rotation: its backward pass turns the gradients back
        for d in [&mut dq, &mut dk] {
            rope::apply_rows(d, (&tab.cos, &tab.sin), s.dh, *rotary, true);
        }
    }
    for (l, d) in [(&blk.wq, &dq), (&blk.wk, &dk), (&blk.wv, &dv)] {
        param_grads(grads, l, &sv.h1, d)?;
    }
    let mut dh = w.q.input_grad(&dq, n);
    w.k.add_input_grad(&mut dh, &dk, n);
    w.v.add_input_grad(&mut dh, &dv, n);
    // dx = dx₂ + LN₁'s backward pass of dh₁ (+ LN₂'s with the parallel residual)
    norm_grads(grads, ln1, ln_backward_rows(&dh, &sv.x, &sv.st1, &w.ln1.g, &mut dx))?;
    if sv.parallel {
        match &sv.rows {
            Some(rows) => add_rows(&mut dx, &dx_par, rows, c),
            None => add_into(&mut dx, &dx_par),
        }
    }
    Ok(dx)
}

/// `(n, c)` zeros with `src`'s rows added at `rows`.
fn scattered(src: &[f32], rows: &[usize], n: usize, c: usize) -> Vec<f32> {
    let mut out = zeros(n * c);
    add_rows(&mut out, src, rows, c);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::config::ModelConfig;
    use crate::fused::tests::max_rel;
    use crate::model::CausalLm;
    use crate::params::ParamRef;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The GPT-2 variants (each GELU, with and without biases) and GPT-NeoX's (RoPE on part
    /// of each head with the parallel residual; on the whole head with the sequential block).
    fn block_configs() -> Vec<(String, ModelConfig, bool)> {
        let mut out = vec![];
        for (gelu, bias) in [("gelu_new", true), ("gelu", true), ("gelu_new", false)] {
            let mut cfg = ModelConfig::gpt2_preset(50, 16, 2, 2, 32);
            if let ModelConfig::Gpt2(g) = &mut cfg {
                g.activation_function = gelu.into();
                g.bias = bias;
            }
            out.push((format!("gpt2 {gelu}, bias {bias}"), cfg, bias));
        }
        for (pct, parallel) in [(0.5, true), (1.0, false)] {
            let json = format!(
                r#"{{"model_type": "gpt_neox", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "rotary_pct": {pct}, "rotary_emb_base": 100,
                    "use_parallel_residual": {parallel}}}"#
            );
            out.push((
                format!("gpt_neox rotary {pct}, parallel {parallel}"),
                ModelConfig::from_json_str(&json).unwrap(),
                true,
            ));
        }
        out
    }

    /// A 2-block GPT-2 (or GPT-NeoX) with every parameter (gains and biases included)
    /// randomised, a left-padded batch, and the same loss `Σ y·u` through both paths: values,
    /// the input's gradient and every block parameter's gradient agree — for the whole output
    /// and for a few kept rows of the last block (against the per-op path's output, then a
    /// selection).
    #[test]
    fn fused_block_matches_the_per_op_path() {
        let dev = Cpu::default();
        for (case, cfg, bias) in block_configs() {
            let mut model = CausalLm::<Cpu>::new(cfg, &dev, 3).unwrap();
            let mut rng = StdRng::seed_from_u64(4);
            let noise = std::cell::RefCell::new(move |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.gen_range(-0.3..0.3)).collect()
            });
            let noise = |len: usize| (noise.borrow_mut())(len);
            model.map_params(
                |t| t.clone() + dev.tensor_from_vec(noise(t.shape().0), *t.shape()),
                |t| t.clone() + dev.tensor_from_vec(noise(t.shape().0 * t.shape().1), *t.shape()),
            );
            let batch = Batch::left_padded(&[vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9]], 0).unwrap();
            let (b, t, c) = (batch.b, batch.t, model.dims.d_model);
            let xs = dev.tensor_from_vec(noise(b * t * c).iter().map(|v| v * 5.0).collect(), (b * t, c));
            let ctx = model.context(&batch);
            let dims = model.dims;
            let inputs = ctx.block_inputs(&dims);
            let all: Vec<usize> = (0..b * t).collect();
            for rows in [None, Some(&[8usize, 2, 3, 11][..])] {
                let up = dev.tensor_from_vec(
                    noise(rows.map_or(b * t, <[usize]>::len) * c),
                    (rows.map_or(b * t, <[usize]>::len), c),
                );
                let run = |fused: bool| {
                    let mut h = xs.leaky_trace();
                    for (i, blk) in model.blocks.iter().enumerate() {
                        let kept = if i + 1 == model.blocks.len() { rows } else { None };
                        h = if fused {
                            gpt2_block_cpu(h, blk, inputs, kept).unwrap_or_else(|_| panic!("a whole-block op"))
                        } else {
                            blk.forward_ops(h, &dims, &ctx)
                        };
                    }
                    if !fused {
                        h = crate::embed::select_rows_composed(h, rows.unwrap_or(&all));
                    }
                    let untaped = h.retaped::<NoneTape>().as_vec();
                    let g = (h * up.clone()).sum::<Rank0, _>().backward();
                    let mut grads = vec![("x".to_string(), g.get(&xs).as_vec())];
                    for (name, p) in model.params().into_iter().filter(|(n, _)| n.starts_with("blocks.")) {
                        grads.push((
                            name,
                            match p {
                                ParamRef::V(t) => g.get(t).as_vec(),
                                ParamRef::M(t) => g.get(t).as_vec(),
                            },
                        ));
                    }
                    (untaped, grads)
                };
                let ((yf, gf), (yo, go)) = (run(true), run(false));
                let case = format!("{case}, rows {rows:?}");
                assert!(max_rel(&yf, &yo) < 1e-5, "{case}: values {}", max_rel(&yf, &yo));
                assert_eq!(gf.len(), go.len());
                assert_eq!(gf.len(), 1 + 2 * if bias { 16 } else { 8 }, "{case}: every parameter has a gradient");
                for ((name, a), (_, b)) in gf.iter().zip(&go) {
                    assert!(max_rel(a, b) < 1e-4, "{case}: d{name} {}", max_rel(a, b));
                }
                // the tape-free forward gives the same values
                let mut h = xs.clone();
                for (i, blk) in model.blocks.iter().enumerate() {
                    let kept = if i + 1 == model.blocks.len() { rows } else { None };
                    h = gpt2_block_cpu(h, blk, inputs, kept).unwrap_or_else(|_| panic!("a whole-block op"));
                }
                assert_eq!(h.as_vec(), yf, "{case}: no-tape forward");
            }
        }
    }
}
