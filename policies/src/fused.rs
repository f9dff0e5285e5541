//! Fused CPU ops with their own backward pass, for the training forward (dfdx's element-wise
//! ops are single-threaded scalar loops, and its tanh-GELU costs ~20 ns per element).
//!
//! Model code calls them through [`FusedOps`], so it stays generic over the device: the CPU
//! implementation is fused; other devices use dfdx's composition. Each op is tested against
//! that composition (forward and gradient).

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::kernels::gelu_tanh_with_gate;

/// Ops the model uses that a device may fuse.
pub trait FusedOps: Device<f32> {
    /// GPT-2's `gelu_new` on `(N, C)`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    fn gelu_tanh<T: Tape<f32, Self>>(x: Tensor<(usize, usize), f32, Self, T>) -> Tensor<(usize, usize), f32, Self, T>;
}

#[cfg(feature = "cuda")]
impl FusedOps for Cuda {
    fn gelu_tanh<T: Tape<f32, Self>>(x: Tensor<(usize, usize), f32, Self, T>) -> Tensor<(usize, usize), f32, Self, T> {
        x.fast_gelu()
    }
}

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 13;

impl FusedOps for Cpu {
    fn gelu_tanh<T: Tape<f32, Self>>(x: Tensor<(usize, usize), f32, Self, T>) -> Tensor<(usize, usize), f32, Self, T> {
        // a permuted/broadcast input becomes a row-major taped copy first (same id if already
        // row-major), so our gradient buffer has the layout we write
        let x = x.contiguous();
        let shape = *x.shape();
        let (x, mut tape) = x.split_tape();
        let mut xv = vec![0.0f32; shape.0 * shape.1];
        x.copy_into(&mut xv);
        // y = x·s with s = σ(2u), u = √(2/π)(x + 0.044715x³); s is kept for the backward pass
        let mut y = vec![0.0f32; xv.len()];
        let mut s = vec![0.0f32; xv.len()];
        y.par_chunks_mut(CHUNK)
            .zip(s.par_chunks_mut(CHUNK))
            .zip(xv.par_chunks(CHUNK))
            .for_each(|((y, s), x)| gelu_tanh_with_gate(x, y, s));
        let out = x.device().tensor_from_vec(y, shape);
        if T::OWNS_TAPE {
            let (xg, og) = (x.ghost(), out.ghost());
            tape.add_backward_op(move |grads| {
                // one &mut into Gradients at a time: move dy out, then put it back
                let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
                {
                    let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&xg)?;
                    dx.par_chunks_mut(CHUNK)
                        .zip(dy.par_chunks(CHUNK))
                        .zip(xv.par_chunks(CHUNK).zip(s.par_chunks(CHUNK)))
                        .for_each(|((dx, dy), (x, s))| {
                            const C: f32 = 0.797_884_6; // √(2/π)
                            for i in 0..dx.len() {
                                // d/dx [x·σ(2u)] = σ + x·σ(1−σ)·2u',  u' = C(1 + 3·0.044715·x²)
                                let (xi, si) = (x[i], s[i]);
                                let du = C * (1.0 + 3.0 * 0.044715 * xi * xi);
                                dx[i] += dy[i] * (si + xi * si * (1.0 - si) * 2.0 * du);
                            }
                        });
                }
                **grads.get_or_alloc_mut(&og)? = dy;
                Ok(())
            });
        }
        out.put_tape(tape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
    }

    #[test]
    fn fused_gelu_matches_dfdx_forward_and_gradient() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(0);
        for shape in [(7usize, 5usize), (64, 300), (96, 1024)] {
            let n = shape.0 * shape.1;
            let xs: Vec<f32> = (0..n).map(|_| rng.gen_range(-6.0..6.0)).collect();
            let up: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(xs, shape);
            let upstream = dev.tensor_from_vec(up, shape);
            // ours
            let y = Cpu::gelu_tanh(x.leaky_trace());
            let y_vals = y.retaped::<NoneTape>().as_vec();
            let g1 = (y * upstream.clone()).sum::<Rank0, _>().backward();
            // dfdx
            let y2 = x.leaky_trace().fast_gelu();
            let y2_vals = y2.retaped::<NoneTape>().as_vec();
            let g2 = (y2 * upstream).sum::<Rank0, _>().backward();
            assert!(max_rel(&y_vals, &y2_vals) < 2e-6, "{shape:?} forward");
            assert!(max_rel(&g1.get(&x).as_vec(), &g2.get(&x).as_vec()) < 1e-5, "{shape:?} gradient");
            // no tape: same values
            assert!(max_rel(&Cpu::gelu_tanh(x.clone()).as_vec(), &y2_vals) < 2e-6);
        }
    }

    #[test]
    fn fused_gelu_accumulates_into_a_permuted_input() {
        // x used twice (fused gelu of its transpose + itself): gradients must add up
        let dev = Cpu::default();
        let x: Tensor<(usize, usize), f32, Cpu> =
            dev.tensor_from_vec((0..12).map(|i| i as f32 * 0.3 - 1.5).collect(), (3, 4));
        let (xt, tape) = x.leaky_trace().split_tape();
        let a = Cpu::gelu_tanh(xt.clone().put_tape(tape).permute::<_, Axes2<1, 0>>()).sum::<Rank0, _>();
        let b = xt.retaped::<OwnedTape<f32, Cpu>>().sum::<Rank0, _>();
        let g = (a + b).backward();
        let want = x.leaky_trace().fast_gelu().sum::<Rank0, _>().backward();
        let got = g.get(&x).as_vec();
        let ref_plus_one: Vec<f32> = want.get(&x).as_vec().iter().map(|v| v + 1.0).collect();
        assert!(max_rel(&got, &ref_plus_one) < 1e-5, "{got:?} vs {ref_plus_one:?}");
    }
}
