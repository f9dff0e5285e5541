//! Token log-probabilities and entropies of `softmax(logits / T)` — what every policy-gradient
//! and preference loss reads — as CPU ops with their own backward pass: one from given logits,
//! and one that also runs the LM head, so the `(N, V)` logits never become a dfdx tensor.
//!
//! For `x = logits / T` per row: `lse = log Σ exp x`, `log p[t] = x[t] − lse` and the entropy
//! `H = lse − Σ p·x`. The gradients with respect to `x`: `∂ log p[t] = onehot(t) − p` and
//! `∂H = −p·(log p + H)`, then `× 1/T` for the logits.
//!
//! The fused LM-head op saves, per optimizer step at the workload's shapes (512 response rows
//! × 4096 tokens), a copy of the 8 MB logits into the log-prob op, dfdx's zeroed 8 MB
//! gradient buffer for them, and a second host copy of the head's weight in the backward pass:
//! serial memory passes during which the other core waits.

use std::sync::Arc;

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::kernels::exp_inplace;
use crate::strided::{gemm_into, host_vec, zeros, View};

type A2<T> = Tensor<(usize, usize), f32, Cpu, T>;
type A1<T> = Tensor<(usize,), f32, Cpu, T>;

/// `(lse, H)` of one row of `x = logits / T`.
fn row_stats(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e: Vec<f32> = row.iter().map(|x| x - max).collect();
    exp_inplace(&mut e);
    let z: f64 = e.iter().map(|&x| x as f64).sum();
    let px: f64 = e.iter().zip(row).map(|(&e, &x)| e as f64 * x as f64).sum::<f64>() / z;
    let lse = max as f64 + z.ln();
    (lse as f32, (lse - px) as f32)
}

/// Per row of `x` `(n, v)`: `(lse, H)`, and the output `[log p[targets]…, H…]` `(2n,)`.
fn forward(x: &[f32], v: usize, targets: &[usize]) -> (Vec<(f32, f32)>, Vec<f32>) {
    let stats: Vec<(f32, f32)> = x.par_chunks(v).map(row_stats).collect();
    let mut y: Vec<f32> = targets.iter().enumerate().map(|(i, &t)| x[i * v + t] - stats[i].0).collect();
    y.extend(stats.iter().map(|s| s.1));
    (stats, y)
}

/// `d(g_lp·log p[t] + g_h·H)/d logits` for one row `x` of `logits / T`; written over `d`, or
/// added to it with `accumulate`. `d` may be `x` itself (`x = None` then: the row is read
/// from `d` before each element is overwritten).
#[allow(clippy::too_many_arguments)] // one row's inputs and the two upstream gradients
fn row_grad(
    d: &mut [f32],
    x: Option<&[f32]>,
    (lse, h): (f32, f32),
    t: usize,
    (g_lp, g_h): (f32, f32),
    inv_t: f32,
    accumulate: bool,
) {
    if g_lp == 0.0 && g_h == 0.0 {
        if !accumulate {
            d.fill(0.0);
        }
        return;
    }
    let mut p: Vec<f32> = x.unwrap_or(d).iter().map(|x| x - lse).collect();
    // p holds log p; keep it, then exponentiate a copy for p
    let log_p = p.clone();
    exp_inplace(&mut p);
    for ((d, &p), &lp) in d.iter_mut().zip(&p).zip(&log_p) {
        let g = inv_t * (-g_lp * p - g_h * p * (lp + h));
        *d = if accumulate { *d + g } else { g };
    }
    d[t] += inv_t * g_lp;
}

/// The CPU op from given logits `(N, V)`; see [`crate::FusedOps::logprobs_and_entropy`].
pub fn logprobs_and_entropy_cpu<T: Tape<f32, Cpu>>(logits: A2<T>, targets: &[usize], temperature: f32) -> A1<T> {
    let logits = logits.contiguous();
    let (n, v) = *logits.shape();
    assert!(targets.len() == n, "logprobs_and_entropy: {n} rows need {n} targets");
    assert!(targets.iter().all(|&t| t < v), "logprobs_and_entropy: target outside the vocabulary");
    let (logits, mut tape) = logits.split_tape();
    let mut xv = host_vec(&logits);
    let inv_t = 1.0 / temperature;
    xv.par_chunks_mut(1 << 13).for_each(|c| c.iter_mut().for_each(|x| *x *= inv_t));
    let (stats, y) = forward(&xv, v, targets);
    let out = logits.device().tensor_from_vec(y, (2 * n,));
    if T::OWNS_TAPE {
        let (lg, og, targets) = (logits.ghost(), out.ghost(), targets.to_vec());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = grads.get_or_alloc_mut(&og)?.to_vec();
            let dl: &mut Vec<f32> = grads.get_or_alloc_mut(&lg)?;
            dl.par_chunks_mut(v).zip(xv.par_chunks(v)).enumerate().for_each(|(i, (d, row))| {
                row_grad(d, Some(row), stats[i], targets[i], (dy[i], dy[n + i]), inv_t, true);
            });
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// The LM head and [`logprobs_and_entropy_cpu`] as one op: hidden states `h` `(N, C)` and the
/// head's weight `w` `(V, C)` (HF's `lm_head.weight` layout, or the tied `wte`) give
/// `[log p[targets]…, H…]` `(2N,)` of `softmax(h·wᵀ / T)`. The logits live in a host buffer
/// this op owns; the backward pass turns them into their gradient in place, then
/// `dh += dlogits·w` and `dw += dlogitsᵀ·h`.
pub fn lm_logprobs_and_entropy_cpu<T: Tape<f32, Cpu>>(
    h: A2<T>,
    w: &Tensor<(usize, usize), f32, Cpu>,
    targets: &[usize],
    temperature: f32,
) -> A1<T> {
    let h = h.contiguous();
    let ((n, c), (v, wc)) = (*h.shape(), *w.shape());
    assert_eq!(c, wc, "lm head: hidden width {c} against a weight of shape {:?}", w.shape());
    assert!(targets.len() == n, "logprobs_and_entropy: {n} rows need {n} targets");
    assert!(targets.iter().all(|&t| t < v), "logprobs_and_entropy: target outside the vocabulary");
    let (h, mut tape) = h.split_tape();
    let (hv, wv) = (host_vec(&h), Arc::new(host_vec(w)));
    let inv_t = 1.0 / temperature;
    let threads = rayon::current_num_threads();
    // x = h·wᵀ / T in one product (alpha = 1/T)
    let mut x = zeros(n * v);
    gemm_into(&mut x, (n, v, c), View::rows(&hv, c), View::rows(&wv, c).t(), inv_t, false, threads);
    let (stats, y) = forward(&x, v, targets);
    let out = h.device().tensor_from_vec(y, (2 * n,));
    if T::OWNS_TAPE {
        let (hg, og, wg, targets) = (h.ghost(), out.ghost(), w.ghost(), targets.to_vec());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = grads.get_or_alloc_mut(&og)?.to_vec();
            // x becomes dlogits row by row
            x.par_chunks_mut(v).enumerate().for_each(|(i, d)| {
                row_grad(d, None, stats[i], targets[i], (dy[i], dy[n + i]), inv_t, false);
            });
            let dl = View::rows(&x, v);
            gemm_into(grads.get_or_alloc_mut(&hg)?, (n, c, v), dl, View::rows(&wv, c), 1.0, true, threads);
            gemm_into(grads.get_or_alloc_mut(&wg)?, (v, c, n), dl.t(), View::rows(&hv, c), 1.0, true, threads);
            Ok(())
        });
    }
    out.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::logprobs_and_entropy_composed;
    use crate::fused::tests::max_rel;
    use crate::linear::{linear_composed, Affine, WeightLayout};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand(dev: &Cpu, rng: &mut StdRng, shape: (usize, usize), scale: f32) -> Tensor<(usize, usize), f32, Cpu> {
        dev.tensor_from_vec((0..shape.0 * shape.1).map(|_| rng.gen_range(-scale..scale)).collect(), shape)
    }

    #[test]
    fn logprobs_and_entropy_match_dfdx() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(3);
        for (n, v, temp) in [(3usize, 7usize, 1.0f32), (40, 4096, 0.7)] {
            let logits = rand(&dev, &mut rng, (n, v), 6.0);
            let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
            let up: Tensor<(usize,), f32, Cpu> =
                dev.tensor_from_vec((0..2 * n).map(|_| rng.gen_range(-1.0..1.0)).collect(), (2 * n,));
            let a = logprobs_and_entropy_cpu(logits.leaky_trace(), &targets, temp);
            let av = a.retaped::<NoneTape>().as_vec();
            let ga = (a * up.clone()).sum::<Rank0, _>().backward();
            let b = logprobs_and_entropy_composed(logits.leaky_trace(), &targets, temp);
            let bv = b.retaped::<NoneTape>().as_vec();
            let gb = (b * up.clone()).sum::<Rank0, _>().backward();
            assert!(max_rel(&av, &bv) < 1e-5, "{n}x{v}: values");
            assert!(max_rel(&ga.get(&logits).as_vec(), &gb.get(&logits).as_vec()) < 1e-5, "{n}x{v}: gradient");
        }
    }

    /// The fused head against dfdx's linear map then its log-prob composition: values and
    /// the gradients of `h` and of the weight, with a row whose upstream gradients are zero
    /// (its logits' gradient must be written as zeros, not left as logits).
    #[test]
    fn fused_lm_head_logprobs_match_the_composition() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(5);
        for (n, c, v, temp) in [(3usize, 8usize, 11usize, 1.0f32), (37, 32, 700, 0.7)] {
            let h = rand(&dev, &mut rng, (n, c), 1.0);
            let w = rand(&dev, &mut rng, (v, c), 1.0);
            let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
            let mut upv: Vec<f32> = (0..2 * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            (upv[1], upv[n + 1]) = (0.0, 0.0);
            let up: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(upv, (2 * n,));
            let run = |fused: bool| {
                let y = if fused {
                    lm_logprobs_and_entropy_cpu(h.leaky_trace(), &w, &targets, temp)
                } else {
                    let a = Affine { w: &w, layout: WeightLayout::OutIn, b: None, residual: None };
                    logprobs_and_entropy_composed(linear_composed(h.leaky_trace(), a), &targets, temp)
                };
                let yv = y.retaped::<NoneTape>().as_vec();
                let g = (y * up.clone()).sum::<Rank0, _>().backward();
                (yv, g.get(&h).as_vec(), g.get(&w).as_vec())
            };
            let (f, r) = (run(true), run(false));
            assert!(max_rel(&f.0, &r.0) < 1e-5, "{n}x{v}: values {}", max_rel(&f.0, &r.0));
            assert!(max_rel(&f.1, &r.1) < 1e-5, "{n}x{v}: dh {}", max_rel(&f.1, &r.1));
            assert!(max_rel(&f.2, &r.2) < 1e-5, "{n}x{v}: dw {}", max_rel(&f.2, &r.2));
        }
    }
}
