//! Token log-probabilities and entropies of `softmax(logits / T)` — what every policy-gradient
//! and preference loss reads — and the weighted next-token NLL of pretraining and SFT, as CPU
//! ops with their own backward pass: each from given logits, and each with the LM head folded
//! in, so the `(N, V)` logits never become a dfdx tensor.
//!
//! For `x = logits / T` per row: `lse = log Σ exp x`, `log p[t] = x[t] − lse` and the entropy
//! `H = lse − Σ p·x`. The gradients with respect to `x`: `∂ log p[t] = onehot(t) − p` and
//! `∂H = −p·(log p + H)`, then `× 1/T` for the logits.
//!
//! Folding the head in saves, per optimizer step, a copy of the logits into the loss op,
//! dfdx's zeroed gradient buffer for them, and a second host copy of the head's weight in the
//! backward pass: serial memory passes during which the other core waits (8 MB each for a
//! GRPO micro-batch's 512 response rows × 4096 tokens, 50 MB for the pretraining step's 3072
//! rows).

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::kernels::exp_inplace;
use crate::nucleus::{TokenMask, MASKED_LOGIT};
use crate::softcap::{softcap_backward, softcap_inplace};
use crate::strided::{gemm_into, gemm_new, host_vec, View};

type A2<T> = Tensor<(usize, usize), f32, Cpu, T>;
type A1<T> = Tensor<(usize,), f32, Cpu, T>;
type A0<T> = Tensor<Rank0, f32, Cpu, T>;

/// The LM head as the head ops take it: its `(V, C)` weight (HF's `lm_head.weight` layout, or
/// the tied `wte`) and whether that weight trains. A frozen head gets no weight gradient: the
/// CPU ops skip `dW += dlogitsᵀ·h`, one of the head's three `N·V·C` products (dfdx's
/// composition, the other devices' path, computes it anyway; nothing steps a frozen weight).
#[derive(Debug)]
pub struct Head<'a, D: Storage<f32>> {
    /// The weight `(V, C)`.
    pub w: &'a Tensor<(usize, usize), f32, D>,
    /// Whether the backward pass writes the weight's gradient.
    pub trains: bool,
    /// Multiplier on the logits `h·wᵀ` (Granite's `1 / logits_scaling`; 1 elsewhere).
    pub scale: f32,
    /// Gemma 2's cap on the logits, `c·tanh(z/c)` before the temperature ([`crate::softcap`]);
    /// `None`: uncapped.
    pub softcap: Option<f32>,
}

// by hand: a derive would ask `D: Copy`
impl<D: Storage<f32>> Clone for Head<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D: Storage<f32>> Copy for Head<'_, D> {}

impl<'a, D: Storage<f32>> Head<'a, D> {
    /// A head whose weight trains.
    pub fn training(w: &'a Tensor<(usize, usize), f32, D>) -> Self {
        Head { w, trains: true, scale: 1.0, softcap: None }
    }
}

/// `(max, exp(x − max), Σ exp(x − max))` of one row (the sum in f64).
fn shifted_exp(row: &[f32]) -> (f32, Vec<f32>, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e: Vec<f32> = row.iter().map(|x| x - max).collect();
    exp_inplace(&mut e);
    let z = e.iter().map(|&x| x as f64).sum();
    (max, e, z)
}

/// `log Σ exp x` of one row.
fn row_lse(row: &[f32]) -> f32 {
    let (max, _, z) = shifted_exp(row);
    (max as f64 + z.ln()) as f32
}

/// `(lse, H)` of one row of `x = logits / T`.
fn row_stats(row: &[f32]) -> (f32, f32) {
    let (max, e, z) = shifted_exp(row);
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

/// `log p = x − lse` of a row: `x`, or `d` itself when `x` is `None` (in place).
fn log_p(d: &[f32], x: Option<&[f32]>, lse: f32) -> Vec<f32> {
    x.unwrap_or(d).iter().map(|x| x - lse).collect()
}

/// Writes `g` over `d`, or adds it with `accumulate`.
fn put(d: &mut [f32], g: impl Iterator<Item = f32>, accumulate: bool) {
    if accumulate {
        d.iter_mut().zip(g).for_each(|(d, g)| *d += g);
    } else {
        d.iter_mut().zip(g).for_each(|(d, g)| *d = g);
    }
}

/// `d(g_lp·log p[t] + g_h·H)/d logits` for one row `x` of `logits / T`, over or onto `d`
/// (`x = None`: the row is `d` itself, turned into its gradient in place).
fn row_grad(
    d: &mut [f32],
    x: Option<&[f32]>,
    (lse, h): (f32, f32),
    t: usize,
    (g_lp, g_h): (f32, f32),
    inv_t: f32,
    acc: bool,
) {
    if g_lp == 0.0 && g_h == 0.0 {
        if !acc {
            d.fill(0.0);
        }
        return;
    }
    let lp = log_p(d, x, lse);
    let mut p = lp.clone();
    exp_inplace(&mut p);
    put(d, p.iter().zip(&lp).map(|(&p, &lp)| inv_t * (-g_lp * p - g_h * p * (lp + h))), acc);
    d[t] += inv_t * g_lp;
}

/// `d(−s·log p[t])/d logits = s·(p − onehot(t))` for one row, over or onto `d` (as
/// [`row_grad`]).
fn nll_row_grad(d: &mut [f32], x: Option<&[f32]>, lse: f32, t: usize, s: f32, acc: bool) {
    if s == 0.0 {
        if !acc {
            d.fill(0.0);
        }
        return;
    }
    let mut p = log_p(d, x, lse);
    exp_inplace(&mut p);
    put(d, p.iter().map(|&p| s * p), acc);
    d[t] -= s;
}

/// `−Σᵢ wᵢ·(xᵢ[tᵢ] − lseᵢ)` and the rows' `lse`.
fn nll_forward(x: &[f32], v: usize, targets: &[usize], weights: &[f32]) -> (f64, Vec<f32>) {
    let lse: Vec<f32> = x.par_chunks(v).map(row_lse).collect();
    let loss = targets.iter().enumerate().map(|(i, &t)| weights[i] as f64 * (lse[i] - x[i * v + t]) as f64).sum();
    (loss, lse)
}

fn check_targets(op: &str, n: usize, v: usize, targets: &[usize], weights: Option<&[f32]>) {
    assert!(targets.len() == n, "{op}: {n} rows need {n} targets");
    assert!(weights.is_none_or(|w| w.len() == n), "{op}: {n} rows need {n} weights");
    assert!(targets.iter().all(|&t| t < v), "{op}: target outside the vocabulary");
}

/// The CPU op from given logits `(N, V)`; see [`crate::FusedOps::weighted_nll`].
pub fn weighted_nll_cpu<T: Tape<f32, Cpu>>(logits: A2<T>, targets: &[usize], weights: &[f32]) -> A0<T> {
    let logits = logits.contiguous();
    let (n, v) = *logits.shape();
    check_targets("weighted_nll", n, v, targets, Some(weights));
    let (logits, mut tape) = logits.split_tape();
    let xv = host_vec(&logits);
    let (loss, lse) = nll_forward(&xv, v, targets, weights);
    let out = logits.device().tensor_from_vec(vec![loss as f32], ());
    if T::OWNS_TAPE {
        let (lg, og, targets, weights) = (logits.ghost(), out.ghost(), targets.to_vec(), weights.to_vec());
        tape.add_backward_op(move |grads| {
            let g = grads.get_or_alloc_mut(&og)?[0];
            let dl: &mut Vec<f32> = grads.get_or_alloc_mut(&lg)?;
            dl.par_chunks_mut(v).zip(xv.par_chunks(v)).enumerate().for_each(|(i, (d, row))| {
                nll_row_grad(d, Some(row), lse[i], targets[i], g * weights[i], true);
            });
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// The CPU op from given logits `(N, V)`; see [`crate::FusedOps::logprobs_and_entropy`].
pub fn logprobs_and_entropy_cpu<T: Tape<f32, Cpu>>(logits: A2<T>, targets: &[usize], temperature: f32) -> A1<T> {
    let logits = logits.contiguous();
    let (n, v) = *logits.shape();
    check_targets("logprobs_and_entropy", n, v, targets, None);
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

/// What a loss over the LM head's logits hands back: its output, the output's shape, and its
/// backward pass, which turns the logits buffer into their gradient in place given the
/// output's gradient.
type HeadLoss<S, B> = (Vec<f32>, S, B);

/// The LM head followed by a loss, as one op: `x = alpha·h·wᵀ` `(N, V)` for hidden states `h`
/// `(N, C)` and the head's weight `w` `(V, C)` goes to `loss` in a host buffer this op owns
/// (which `loss` may change first, e.g. to mask tokens); the backward pass has `loss`'s
/// closure turn it into `dlogits` in place, then `dh += dlogits·w` and, when the head
/// trains, `dw += dlogitsᵀ·h`. With the head's scale `s` and soft cap `c` the logits are
/// `x = alpha·c·tanh(s·h·wᵀ/c)` (`alpha·s·h·wᵀ` without a cap), and the op keeps the capped
/// logits (one more `(N, V)` buffer) for the chain rule.
fn lm_head_op<T, S, B>(
    h: A2<T>,
    head: Head<'_, Cpu>,
    alpha: f32,
    loss: impl FnOnce(&mut [f32]) -> HeadLoss<S, B>,
) -> Tensor<S, f32, Cpu, T>
where
    T: Tape<f32, Cpu>,
    S: Shape,
    B: FnOnce(&mut [f32], &[f32]) + 'static,
{
    let (h, w) = (h.contiguous(), head.w);
    let ((n, c), (v, wc)) = (*h.shape(), *w.shape());
    assert_eq!(c, wc, "lm head: hidden width {c} against a weight of shape {:?}", w.shape());
    let (h, mut tape) = h.split_tape();
    let (hv, wv) = (host_vec(&h), host_vec(w));
    let threads = rayon::current_num_threads();
    let (cap, s) = (head.softcap, head.scale);
    let mut x = gemm_new(
        (n, v, c),
        View::rows(&hv, c),
        View::rows(&wv, c).t(),
        if cap.is_some() { s } else { alpha * s },
        threads,
    );
    let capped = cap.map(|c| {
        softcap_inplace(&mut x, c);
        let capped = x.clone();
        if alpha != 1.0 {
            x.par_chunks_mut(1 << 13).for_each(|ch| ch.iter_mut().for_each(|x| *x *= alpha));
        }
        capped
    });
    let (y, shape, backward) = loss(&mut x);
    let out = h.device().tensor_from_vec(y, shape);
    if T::OWNS_TAPE {
        let (hg, og, wg) = (h.ghost(), out.ghost(), head.trains.then(|| w.ghost()));
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = grads.get_or_alloc_mut(&og)?.to_vec();
            backward(&mut x, &dy);
            if let (Some(y), Some(c)) = (&capped, cap) {
                x.par_chunks_mut(1 << 13).zip(y.par_chunks(1 << 13)).for_each(|(d, y)| softcap_backward(d, y, c));
            }
            // the loss closures' gradient is that of `s·h·wᵀ`: `s` joins the products
            let dl = View::rows(&x, v);
            gemm_into(grads.get_or_alloc_mut(&hg)?, (n, c, v), dl, View::rows(&wv, c), s, true, threads);
            if let Some(wg) = &wg {
                gemm_into(grads.get_or_alloc_mut(wg)?, (v, c, n), dl.t(), View::rows(&hv, c), s, true, threads);
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// [`logprobs_and_entropy_cpu`] of the LM head's logits `h·wᵀ` (see `lm_head_op`):
/// `[log p[targets]…, H…]` `(2N,)` of `softmax(h·wᵀ / T)`.
pub fn lm_logprobs_and_entropy_cpu<T: Tape<f32, Cpu>>(
    h: A2<T>,
    head: Head<'_, Cpu>,
    targets: &[usize],
    temperature: f32,
) -> A1<T> {
    let (n, v) = (h.shape().0, head.w.shape().0);
    check_targets("logprobs_and_entropy", n, v, targets, None);
    let (inv_t, targets) = (1.0 / temperature, targets.to_vec());
    lm_head_op(h, head, inv_t, |x| {
        let (stats, y) = forward(x, v, &targets);
        let backward = move |d: &mut [f32], dy: &[f32]| {
            d.par_chunks_mut(v).enumerate().for_each(|(i, d)| {
                row_grad(d, None, stats[i], targets[i], (dy[i], dy[n + i]), inv_t, false);
            });
        };
        (y, (2 * n,), backward)
    })
}

/// [`lm_logprobs_and_entropy_cpu`] of π^mask (NLPO): each row's logits outside its mask are
/// set to [`MASKED_LOGIT`] before the softmax, so the log-probs and entropies are those of the
/// softmax over the allowed tokens, and the masked logits get no gradient.
pub fn lm_logprobs_and_entropy_masked_cpu<T: Tape<f32, Cpu>>(
    h: A2<T>,
    head: Head<'_, Cpu>,
    targets: &[usize],
    temperature: f32,
    masks: &[TokenMask],
) -> A1<T> {
    let (n, v) = (h.shape().0, head.w.shape().0);
    check_targets("logprobs_and_entropy", n, v, targets, None);
    check_masks(v, targets, masks);
    let (inv_t, targets) = (1.0 / temperature, targets.to_vec());
    lm_head_op(h, head, inv_t, |x| {
        x.par_chunks_mut(v).zip(masks).for_each(|(row, m)| m.apply(row, MASKED_LOGIT));
        let (stats, y) = forward(x, v, &targets);
        let backward = move |d: &mut [f32], dy: &[f32]| {
            d.par_chunks_mut(v).enumerate().for_each(|(i, d)| {
                row_grad(d, None, stats[i], targets[i], (dy[i], dy[n + i]), inv_t, false);
            });
        };
        (y, (2 * n,), backward)
    })
}

/// One mask per row, over the vocabulary, each allowing its row's target.
pub(crate) fn check_masks(v: usize, targets: &[usize], masks: &[TokenMask]) {
    assert!(masks.len() == targets.len(), "masked log-probs: {} rows need {} masks", targets.len(), masks.len());
    assert!(masks.iter().all(|m| m.vocab() == v), "masked log-probs: a mask is not over the {v}-token vocabulary");
    let outside = targets.iter().zip(masks).position(|(&t, m)| !m.allows(t));
    assert!(outside.is_none(), "masked log-probs: row {outside:?}'s target is outside its mask");
}

/// [`weighted_nll_cpu`] of the LM head's logits `h·wᵀ` (see `lm_head_op`).
pub fn lm_weighted_nll_cpu<T: Tape<f32, Cpu>>(
    h: A2<T>,
    head: Head<'_, Cpu>,
    targets: &[usize],
    weights: &[f32],
) -> A0<T> {
    let (n, v) = (h.shape().0, head.w.shape().0);
    check_targets("weighted_nll", n, v, targets, Some(weights));
    let (targets, weights) = (targets.to_vec(), weights.to_vec());
    lm_head_op(h, head, 1.0, |x| {
        let (loss, lse) = nll_forward(x, v, &targets, &weights);
        let backward = move |d: &mut [f32], dy: &[f32]| {
            d.par_chunks_mut(v).enumerate().for_each(|(i, d)| {
                nll_row_grad(d, None, lse[i], targets[i], dy[0] * weights[i], false);
            });
        };
        (vec![loss as f32], (), backward)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::max_rel;
    use crate::fused::{logprobs_and_entropy_composed, weighted_nll_composed};
    use crate::linear::{linear_composed, Affine};
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

    #[test]
    fn weighted_nll_matches_dfdx_log_softmax_select() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(2);
        for (n, v) in [(3usize, 7usize), (50, 4096)] {
            let logits: Tensor<(usize, usize), f32, Cpu> =
                dev.tensor_from_vec((0..n * v).map(|_| rng.gen_range(-8.0..8.0)).collect(), (n, v));
            let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
            let weights: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { rng.gen_range(0.0..1.0) }).collect();
            let a = weighted_nll_cpu(logits.leaky_trace(), &targets, &weights) * 1.5;
            let av = a.retaped::<NoneTape>().array();
            let ga = a.backward();
            let b = weighted_nll_composed(logits.leaky_trace(), &targets, &weights) * 1.5;
            let bv = b.retaped::<NoneTape>().array();
            let gb = b.backward();
            assert!((av - bv).abs() <= 1e-5 * (1.0 + bv.abs()), "{n}x{v}: {av} vs {bv}");
            assert!(max_rel(&ga.get(&logits).as_vec(), &gb.get(&logits).as_vec()) < 1e-5, "{n}x{v} gradient");
        }
    }

    /// The fused head against dfdx's linear map then its log-prob (and NLL) composition: values
    /// and the gradients of `h` and of the weight, with a row whose upstream gradients are zero
    /// (its logits' gradient must be written as zeros, not left as logits); and with Gemma 2's
    /// soft cap, tight enough to bend most logits, against `softcap_tensor`'s composition, and
    /// Granite's logit scale, with and without a cap.
    #[test]
    fn fused_lm_head_losses_match_the_composition() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(5);
        let cases = [
            (3usize, 8usize, 11usize, 1.0f32, 1.0f32, None),
            (37, 32, 700, 0.7, 1.0, None),
            (6, 16, 90, 0.8, 1.0, Some(1.5f32)),
            (9, 16, 60, 1.3, 0.125, None),
            (5, 8, 40, 0.9, 3.0, Some(2.0)),
        ];
        for (n, c, v, temp, scale, cap) in cases {
            let head = |w| Head { w, trains: true, scale, softcap: cap };
            let composed_logits =
                |h, w| crate::softcap::softcap_tensor(linear_composed(h, Affine::lm_head(w)) * scale, cap);
            let h = rand(&dev, &mut rng, (n, c), 1.0);
            let w = rand(&dev, &mut rng, (v, c), 1.0);
            let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
            let mut upv: Vec<f32> = (0..2 * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            (upv[1], upv[n + 1]) = (0.0, 0.0);
            let up: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(upv, (2 * n,));
            let run = |fused: bool| {
                let y = if fused {
                    lm_logprobs_and_entropy_cpu(h.leaky_trace(), head(&w), &targets, temp)
                } else {
                    logprobs_and_entropy_composed(composed_logits(h.leaky_trace(), &w), &targets, temp)
                };
                let yv = y.retaped::<NoneTape>().as_vec();
                let g = (y * up.clone()).sum::<Rank0, _>().backward();
                (yv, g.get(&h).as_vec(), g.get(&w).as_vec())
            };
            let (f, r) = (run(true), run(false));
            assert!(max_rel(&f.0, &r.0) < 1e-5, "{n}x{v}: values {}", max_rel(&f.0, &r.0));
            assert!(max_rel(&f.1, &r.1) < 1e-5, "{n}x{v}: dh {}", max_rel(&f.1, &r.1));
            assert!(max_rel(&f.2, &r.2) < 1e-5, "{n}x{v}: dw {}", max_rel(&f.2, &r.2));
            // the weighted NLL through the same head, a zero weight included
            let weights: Vec<f32> = (0..n).map(|i| if i == 1 { 0.0 } else { rng.gen_range(0.0..1.0) }).collect();
            let run = |fused: bool| {
                let y = if fused {
                    lm_weighted_nll_cpu(h.leaky_trace(), head(&w), &targets, &weights)
                } else {
                    weighted_nll_composed(composed_logits(h.leaky_trace(), &w), &targets, &weights)
                };
                let yv = y.retaped::<NoneTape>().array();
                let g = (y * 1.5).backward();
                (yv, g.get(&h).as_vec(), g.get(&w).as_vec())
            };
            let (f, r) = (run(true), run(false));
            assert!((f.0 - r.0).abs() <= 1e-5 * (1.0 + r.0.abs()), "{n}x{v}: NLL {} vs {}", f.0, r.0);
            assert!(max_rel(&f.1, &r.1) < 1e-5, "{n}x{v}: NLL dh {}", max_rel(&f.1, &r.1));
            assert!(max_rel(&f.2, &r.2) < 1e-5, "{n}x{v}: NLL dw {}", max_rel(&f.2, &r.2));
        }
    }

    /// A frozen head changes no bit of the values or of `dh`, and leaves the weight without a
    /// gradient (its buffer is only allocated, as zeros, when asked for), for each head op.
    #[test]
    fn a_frozen_head_writes_no_weight_gradient() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(6);
        let (n, c, v) = (9usize, 16usize, 300usize);
        let h = rand(&dev, &mut rng, (n, c), 1.0);
        let w = rand(&dev, &mut rng, (v, c), 1.0);
        let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
        let weights: Vec<f32> = (0..n).map(|_| rng.gen_range(0.0..1.0)).collect();
        let masks = random_masks(&mut rng, v, &targets);
        for op in 0..3 {
            let run = |trains: bool| {
                let head = Head { w: &w, trains, scale: 1.0, softcap: None };
                let y = match op {
                    0 => lm_logprobs_and_entropy_cpu(h.leaky_trace(), head, &targets, 0.7),
                    1 => lm_logprobs_and_entropy_masked_cpu(h.leaky_trace(), head, &targets, 0.7, &masks),
                    _ => lm_weighted_nll_cpu(h.leaky_trace(), head, &targets, &weights).broadcast_like(&(1,)),
                };
                let yv = y.retaped::<NoneTape>().as_vec();
                let mut g = (y * 0.5).sum::<Rank0, _>().backward();
                let dw = g.get_or_alloc_mut(&w).unwrap().clone();
                (yv, g.get(&h).as_vec(), dw)
            };
            let (trained, frozen) = (run(true), run(false));
            assert_eq!((&trained.0, &trained.1), (&frozen.0, &frozen.1), "op {op}: values and dh");
            assert!(trained.2.iter().any(|&g| g != 0.0), "op {op}: a training head gets a gradient");
            assert!(frozen.2.iter().all(|&g| g == 0.0), "op {op}: a frozen head gets none");
        }
    }

    /// Random masks (about half the vocabulary) that allow each row's target.
    fn random_masks(rng: &mut StdRng, v: usize, targets: &[usize]) -> Vec<TokenMask> {
        targets
            .iter()
            .map(|&t| {
                let mut m = TokenMask::none(v);
                (0..v).filter(|_| rng.gen_bool(0.5)).for_each(|i| m.allow(i));
                m.allow(t);
                m
            })
            .collect()
    }

    #[test]
    fn masked_logprobs_are_the_softmax_over_the_allowed_tokens() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(11);
        for (n, c, v, temp) in [(3usize, 8usize, 11usize, 1.0f32), (29, 32, 700, 0.7)] {
            let h = rand(&dev, &mut rng, (n, c), 1.0);
            let w = rand(&dev, &mut rng, (v, c), 1.0);
            let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
            let masks = random_masks(&mut rng, v, &targets);
            let up: Tensor<(usize,), f32, Cpu> =
                dev.tensor_from_vec((0..2 * n).map(|_| rng.gen_range(-1.0..1.0)).collect(), (2 * n,));
            let run = |fused: bool| {
                let y = if fused {
                    lm_logprobs_and_entropy_masked_cpu(h.leaky_trace(), Head::training(&w), &targets, temp, &masks)
                } else {
                    crate::fused::lm_logprobs_and_entropy_masked_composed(
                        h.leaky_trace(),
                        Head::training(&w),
                        &targets,
                        temp,
                        &masks,
                    )
                };
                let yv = y.retaped::<NoneTape>().as_vec();
                let g = (y * up.clone()).sum::<Rank0, _>().backward();
                (yv, g.get(&h).as_vec(), g.get(&w).as_vec())
            };
            let (f, r) = (run(true), run(false));
            assert!(max_rel(&f.0, &r.0) < 1e-5, "{n}x{v}: values {}", max_rel(&f.0, &r.0));
            assert!(max_rel(&f.1, &r.1) < 1e-5, "{n}x{v}: dh {}", max_rel(&f.1, &r.1));
            assert!(max_rel(&f.2, &r.2) < 1e-5, "{n}x{v}: dw {}", max_rel(&f.2, &r.2));
            // against f64 arithmetic over the allowed tokens only
            let (hv, wv) = (h.as_vec(), w.as_vec());
            for i in 0..n {
                let z: Vec<f64> = (0..v)
                    .filter(|&t| masks[i].allows(t))
                    .map(|t| (0..c).map(|k| hv[i * c + k] as f64 * wv[t * c + k] as f64).sum::<f64>() / temp as f64)
                    .collect();
                let ids: Vec<usize> = (0..v).filter(|&t| masks[i].allows(t)).collect();
                let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
                let lp = z[ids.iter().position(|&t| t == targets[i]).unwrap()] - lse;
                let entropy = -z.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>();
                assert!((f.0[i] as f64 - lp).abs() < 1e-5, "row {i}: log p {} vs {lp}", f.0[i]);
                assert!((f.0[n + i] as f64 - entropy).abs() < 1e-5, "row {i}: H {} vs {entropy}", f.0[n + i]);
            }
        }
    }

    #[test]
    fn a_mask_of_every_token_changes_no_bit() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(12);
        let (n, c, v, temp) = (17usize, 16usize, 300usize, 0.8f32);
        let h = rand(&dev, &mut rng, (n, c), 1.0);
        let w = rand(&dev, &mut rng, (v, c), 1.0);
        let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
        let masks = vec![TokenMask::all(v); n];
        let run = |masked: bool| {
            let y = if masked {
                lm_logprobs_and_entropy_masked_cpu(h.leaky_trace(), Head::training(&w), &targets, temp, &masks)
            } else {
                lm_logprobs_and_entropy_cpu(h.leaky_trace(), Head::training(&w), &targets, temp)
            };
            let yv = y.retaped::<NoneTape>().as_vec();
            let g = (y * 0.5).sum::<Rank0, _>().backward();
            (yv, g.get(&h).as_vec(), g.get(&w).as_vec())
        };
        assert_eq!(run(true), run(false));
    }
}
