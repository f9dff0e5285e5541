//! The attention core of the training forward, `softmax(q·kᵀ/√Dh + mask)·v` per (batch,
//! head), as one op with its own backward pass. dfdx's composition (kept as
//! [`attention_composed`] for other devices and as the tests' reference) materialises two
//! permuted copies and a broadcast mask, and runs its batched matmuls as a
//! loop of tiny products; here each (batch, head) pair is one task on the thread pool that
//! reads q, k and v in the projections' own `(B·T, heads·Dh)` layout through strided gemm
//! calls and keeps its softmax for the backward pass. Gemma 2's soft cap on the scores
//! ([`crate::softcap`]) is part of the op: `softmax(c·tanh(q·kᵀ/(c·√Dh)) + mask)·v`.

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::kernels::exp_inplace;
use crate::softcap::{softcap_backward, softcap_inplace, softcap_tensor};
use crate::strided::{add_into, gemm_into, host_vec, zeros, View};

/// `(B·T, C)` tensors.
type A2<D, T> = Tensor<(usize, usize), f32, D, T>;

/// Sizes of an attention call: batch, time, query heads, key/value heads, head width; and the
/// scores' soft cap, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Batch rows B.
    pub b: usize,
    /// Time steps T.
    pub t: usize,
    /// Query heads H.
    pub nh: usize,
    /// Key/value heads (H divisible by it; query head j reads KV head j / (H / Hkv)).
    pub nkv: usize,
    /// Head width Dh.
    pub dh: usize,
    /// Gemma 2's cap `c` on the scaled scores, `c·tanh(s/c)` before the mask ([`crate::softcap`]);
    /// `None`: uncapped.
    pub softcap: Option<f32>,
}

/// dfdx's composition: q `(B·T, H·Dh)`, k and v `(B·T, Hkv·Dh)`, additive `mask` `(B, T, T)`
/// → `(B·T, H·Dh)`.
///
/// GQA groups the queries by KV head — `(B, Hkv, rep·T, Dh)` against k and v
/// `(B, Hkv, T, Dh)`, `rep = H/Hkv` — instead of repeating k and v. Besides not copying
/// them, that keeps CUDA's gradients right: dfdx 0.13's CUDA `reshape` backward loops over
/// the input's *stored* elements, so a reshape of a broadcast tensor (the obvious
/// `broadcast_like(..).reshape_like(..)` repeat) loses most of its gradient there, while
/// the CPU kernel walks the logical shape. Measured on an H200: Llama-tiny's embedding
/// gradient and training steps differed from the CPU's until this change.
pub fn attention_composed<D: Device<f32>, T: Tape<f32, D>>(
    q: A2<D, T>,
    k: A2<D, T>,
    v: A2<D, T>,
    mask: &Tensor<(usize, usize, usize), f32, D>,
    s: AttnShape,
) -> A2<D, T> {
    let AttnShape { b, t, nh, nkv, dh, softcap } = s;
    let rep = nh / nkv;
    // query head j = g·rep + r reads KV head g
    let q = q.reshape_like(&(b, t, nkv, rep, dh)).permute::<_, Axes5<0, 2, 3, 1, 4>>();
    let q = q.reshape_like(&(b, nkv, rep * t, dh));
    let k = k.reshape_like(&(b, t, nkv, dh)).permute::<_, Axes4<0, 2, 3, 1>>(); // (B, Hkv, Dh, T)
    let v = v.reshape_like(&(b, t, nkv, dh)).permute::<_, Axes4<0, 2, 1, 3>>(); // (B, Hkv, T, Dh)
    let scores = softcap_tensor(q.matmul(k) * (1.0 / (dh as f32).sqrt()), softcap); // (B, Hkv, rep·T, T)
    let scores =
        scores.reshape_like(&(b, nkv, rep, t, t)) + mask.clone().broadcast_like::<_, Axes2<1, 2>>(&(b, nkv, rep, t, t));
    let probs = scores.softmax::<Axis<4>>().reshape_like(&(b, nkv, rep * t, t));
    let y = probs.matmul(v).reshape_like(&(b, nkv, rep, t, dh)); // (B, Hkv, rep, T, Dh)
    y.permute::<_, Axes5<0, 3, 1, 2, 4>>().reshape_like(&(b * t, nh * dh))
}

/// `dst = alpha · a · b` for one (batch, head) pair, on the calling thread (the callers
/// parallelise over heads).
fn matmul(dst: &mut [f32], dims: (usize, usize, usize), a: View<'_>, b: View<'_>, alpha: f32) {
    gemm_into(dst, dims, a, b, alpha, false, 1);
}

/// What the backward pass needs of one (batch, head) pair's forward: the softmax
/// probabilities `P` (T×T) and, with a soft cap, the capped scores (T×T).
pub(crate) struct HeadProbs {
    p: Vec<f32>,
    capped: Option<Vec<f32>>,
}

/// Per (batch, head) [`HeadProbs`], kept for [`attn_backward`].
pub(crate) type Probs = Vec<HeadProbs>;

/// The attention core on host buffers: q `(B·T, H·Dh)`, k and v `(B·T, Hkv·Dh)`, additive
/// mask `(B, T, T)` → `(P per (batch, head), y (B·T, H·Dh))`, one (batch, head) pair per task.
pub(crate) fn attn_forward(qv: &[f32], kv: &[f32], vv: &[f32], mv: &[f32], s: AttnShape) -> (Probs, Vec<f32>) {
    let AttnShape { b, t, nh, nkv, dh, softcap } = s;
    let (hq, hk, rep, scale) = (nh * dh, nkv * dh, nh / nkv, 1.0 / (dh as f32).sqrt());
    let heads: Vec<(HeadProbs, Vec<f32>)> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / nh, bh % nh);
            let qh = View::new(qv, bi * t * hq + h * dh, hq, 1);
            let kh = View::new(kv, bi * t * hk + (h / rep) * dh, hk, 1);
            let vh = View::new(vv, bi * t * hk + (h / rep) * dh, hk, 1);
            let mut p = vec![0.0f32; t * t];
            matmul(&mut p, (t, t, dh), qh, kh.t(), scale);
            let capped = softcap.map(|c| {
                softcap_inplace(&mut p, c);
                p.clone()
            });
            for (row, m) in p.chunks_mut(t).zip(mv[bi * t * t..(bi + 1) * t * t].chunks(t)) {
                row.iter_mut().zip(m).for_each(|(x, m)| *x += m);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|x| *x -= max);
                exp_inplace(row); // the vectorised exp; masked keys (−1e9) underflow to 0
                let inv = 1.0 / row.iter().sum::<f32>();
                row.iter_mut().for_each(|x| *x *= inv);
            }
            let mut o = vec![0.0f32; t * dh];
            matmul(&mut o, (t, dh, t), View::new(&p, 0, t, 1), vh, 1.0);
            (HeadProbs { p, capped }, o)
        })
        .collect();
    // each batch row's block of y gathers its heads' outputs (one task per batch row)
    let mut y = zeros(b * t * hq);
    y.par_chunks_mut(t * hq).enumerate().for_each(|(bi, yb)| {
        for (h, (_, o)) in heads[bi * nh..(bi + 1) * nh].iter().enumerate() {
            for (i, row) in o.chunks(dh).enumerate() {
                yb[i * hq + h * dh..][..dh].copy_from_slice(row);
            }
        }
    });
    (heads.into_iter().map(|(p, _)| p).collect(), y)
}

/// The attention core's backward pass on host buffers, given the forward's inputs, its `P`
/// and `dy` `(B·T, H·Dh)`: accumulates into `dq` `(B·T, H·Dh)`, `dk` and `dv` `(B·T, Hkv·Dh)`.
#[allow(clippy::too_many_arguments)] // the three inputs and three outputs of one op
pub(crate) fn attn_backward(
    probs: &Probs,
    (qv, kv, vv): (&[f32], &[f32], &[f32]),
    dy: &[f32],
    s: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttnShape { b, t, nh, nkv, dh, softcap } = s;
    let (hq, hk, rep, scale) = (nh * dh, nkv * dh, nh / nkv, 1.0 / (dh as f32).sqrt());
    // per (batch, head): dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − rowsum(dP∘P)) (times
    // 1 − (Y/c)² of the capped scores Y with a soft cap), dQ = scale·dS·K, dK = scale·dSᵀ·Q
    let parts: Vec<[Vec<f32>; 3]> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / nh, bh % nh);
            let HeadProbs { p, capped } = &probs[bh];
            let qh = View::new(qv, bi * t * hq + h * dh, hq, 1);
            let kh = View::new(kv, bi * t * hk + (h / rep) * dh, hk, 1);
            let vh = View::new(vv, bi * t * hk + (h / rep) * dh, hk, 1);
            let doh = View::new(dy, bi * t * hq + h * dh, hq, 1);
            let mut dv = vec![0.0f32; t * dh];
            matmul(&mut dv, (t, dh, t), View::new(p, 0, t, 1).t(), doh, 1.0);
            let mut ds = vec![0.0f32; t * t];
            matmul(&mut ds, (t, t, dh), doh, vh.t(), 1.0);
            for (dr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
                let dot: f32 = dr.iter().zip(pr).map(|(d, p)| d * p).sum();
                dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - dot));
            }
            if let (Some(y), Some(c)) = (capped, softcap) {
                softcap_backward(&mut ds, y, c);
            }
            let (mut dq, mut dk) = (vec![0.0f32; t * dh], vec![0.0f32; t * dh]);
            matmul(&mut dq, (t, dh, t), View::new(&ds, 0, t, 1), kh, scale);
            matmul(&mut dk, (t, dh, t), View::new(&ds, 0, t, 1).t(), qh, scale);
            [dq, dk, dv]
        })
        .collect();
    // each batch row's block of dq, dk, dv gathers its heads' parts (one task per batch row)
    for (which, (dst, width)) in [(dq, hq), (dk, hk), (dv, hk)].into_iter().enumerate() {
        dst.par_chunks_mut(t * width).enumerate().for_each(|(bi, db)| {
            for (h, part) in parts[bi * nh..(bi + 1) * nh].iter().enumerate() {
                let col = if which == 0 { h } else { h / rep } * dh;
                for (i, row) in part[which].chunks(dh).enumerate() {
                    db[i * width + col..][..dh].iter_mut().zip(row).for_each(|(a, r)| *a += r);
                }
            }
        });
    }
}

/// The fused CPU attention (same contract as [`attention_composed`]).
pub fn attention_cpu<T: Tape<f32, Cpu>>(
    q: A2<Cpu, T>,
    k: A2<Cpu, T>,
    v: A2<Cpu, T>,
    mask: &Tensor<(usize, usize, usize), f32, Cpu>,
    s: AttnShape,
) -> A2<Cpu, T> {
    let AttnShape { b, t, nh, nkv, dh, .. } = s;
    // row-major copies (the same tensors if already contiguous), tapes merged
    let (q, tq) = q.contiguous().split_tape();
    let (k, tk) = k.contiguous().split_tape();
    let (v, tv) = v.contiguous().split_tape();
    let mut tape = tq.merge(tk).merge(tv);
    let mask = mask.clone().contiguous();
    let (qv, kv, vv, mv) = (host_vec(&q), host_vec(&k), host_vec(&v), host_vec(&mask));
    let (probs, y) = attn_forward(&qv, &kv, &vv, &mv, s);
    let out = q.device().tensor_from_vec(y, (b * t, nh * dh));
    if T::OWNS_TAPE {
        let (qg, kg, vg, og) = (q.ghost(), k.ghost(), v.ghost(), out.ghost());
        let n_kv = b * t * nkv * dh;
        tape.add_backward_op(move |grads| {
            // one &mut into Gradients at a time: move dy out, then put it back
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let (mut dk, mut dv) = (zeros(n_kv), zeros(n_kv));
            attn_backward(&probs, (&qv, &kv, &vv), &dy, s, grads.get_or_alloc_mut(&qg)?, &mut dk, &mut dv);
            add_into(grads.get_or_alloc_mut(&kg)?, &dk);
            add_into(grads.get_or_alloc_mut(&vg)?, &dv);
            **grads.get_or_alloc_mut(&og)? = dy;
            Ok(())
        });
    }
    out.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::max_rel;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn fused_attention_matches_dfdx_forward_and_gradients() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(5);
        // MHA, GQA, and a left-padded row (its first two keys masked); Gemma 2's soft cap,
        // tight enough to bend most scores
        for s in [
            AttnShape { b: 2, t: 5, nh: 2, nkv: 2, dh: 4, softcap: None },
            AttnShape { b: 3, t: 7, nh: 4, nkv: 2, dh: 8, softcap: None },
            AttnShape { b: 1, t: 9, nh: 3, nkv: 1, dh: 16, softcap: None },
            AttnShape { b: 2, t: 6, nh: 4, nkv: 2, dh: 8, softcap: Some(0.8) },
        ] {
            let AttnShape { b, t, nh, nkv, dh, .. } = s;
            let mut rand = |n: usize| -> Tensor<(usize, usize), f32, Cpu> {
                dev.tensor_from_vec((0..n).map(|_| rng.gen_range(-1.5..1.5)).collect(), (b * t, n / (b * t)))
            };
            let (q, k, v) = (rand(b * t * nh * dh), rand(b * t * nkv * dh), rand(b * t * nkv * dh));
            let up = rand(b * t * nh * dh);
            let mut m = vec![0.0f32; b * t * t];
            for r in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        if j > i || (r == 0 && j < 2) {
                            m[(r * t + i) * t + j] = crate::model::MASKED;
                        }
                    }
                }
            }
            let mask = dev.tensor_from_vec(m, (b, t, t));
            let run = |fused: bool| {
                let (qt, kt, vt) = (q.leaky_trace(), k.leaky_trace(), v.leaky_trace());
                let y =
                    if fused { attention_cpu(qt, kt, vt, &mask, s) } else { attention_composed(qt, kt, vt, &mask, s) };
                let yv = y.retaped::<NoneTape>().as_vec();
                let g = (y * up.clone()).sum::<Rank0, _>().backward();
                (yv, g.get(&q).as_vec(), g.get(&k).as_vec(), g.get(&v).as_vec())
            };
            let (a, b_) = (run(true), run(false));
            assert!(max_rel(&a.0, &b_.0) < 1e-5, "{s:?}: values");
            assert!(max_rel(&a.1, &b_.1) < 1e-5, "{s:?}: dq");
            assert!(max_rel(&a.2, &b_.2) < 1e-5, "{s:?}: dk");
            assert!(max_rel(&a.3, &b_.3) < 1e-5, "{s:?}: dv");
        }
    }
}
