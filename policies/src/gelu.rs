//! GPT-2's GELU as a gated activation `y = x·s(x)` (`s` = σ(2u) for the tanh form, Φ for the
//! exact one): the CPU op with its own backward pass, the slice-level kernels the fused block
//! shares ([`crate::block`]), and the exact GELU for other devices.

use std::mem::MaybeUninit;

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::config::GeluKind;
use crate::kernels::{gelu_erf_derivative, gelu_erf_with_gate, gelu_tanh_derivative, gelu_tanh_with_gate};
use crate::strided::host_vec;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 13;

/// The exact GELU on any device, without dfdx's `accurate_gelu`, whose backward pass in 0.13
/// drops the 1/√2 of `d erf(x/√2)/dx` (its gradient is `Φ + √2·x·φ`). Values and derivatives
/// are computed on the host; the tape gets the linear surrogate `x ⊙ g + (y − x ⊙ g)` with
/// `g = Φ + x·φ`, whose value is `y` and whose gradient is `g`.
pub fn gelu_erf_composed<D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<(usize, usize), f32, D, T>,
) -> Tensor<(usize, usize), f32, D, T> {
    let shape = *x.shape();
    let xv = x.as_vec();
    let (y, s) = gated_forward(&xv, gelu_erf_with_gate);
    let mut g = vec![0.0; xv.len()];
    g.par_chunks_mut(CHUNK)
        .zip(xv.par_chunks(CHUNK).zip(s.par_chunks(CHUNK)))
        .for_each(|(g, (x, s))| gelu_erf_derivative(x, s, g));
    let c: Vec<f32> = y.iter().zip(xv.iter().zip(&g)).map(|(y, (x, g))| y - x * g).collect();
    let dev = x.device().clone();
    x * dev.tensor_from_vec(g, shape) + dev.tensor_from_vec(c, shape)
}

/// `forward` over `xv` in parallel chunks: `(y, s)`, each written once (no zero fill).
pub(crate) fn gated_forward(xv: &[f32], forward: GateForward) -> (Vec<f32>, Vec<f32>) {
    let len = xv.len();
    let (mut y, mut s) = (Vec::with_capacity(len), Vec::with_capacity(len));
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .zip(s.spare_capacity_mut()[..len].par_chunks_mut(CHUNK))
        .zip(xv.par_chunks(CHUNK))
        .for_each(|((y, s), x)| forward(x, y, s));
    // SAFETY: the chunks cover all `len` elements of both buffers, and a `GateForward` writes
    // every element of its `y` and `s`.
    unsafe {
        y.set_len(len);
        s.set_len(len);
    }
    (y, s)
}

/// `dy ← dy · dydx(x, s)` in place: a gated activation's backward pass when its output
/// gradient is not needed afterwards.
pub(crate) fn gated_backward_inplace(dy: &mut [f32], xv: &[f32], s: &[f32], dydx: GateDerivative) {
    dy.par_chunks_mut(CHUNK).zip(xv.par_chunks(CHUNK).zip(s.par_chunks(CHUNK))).for_each(|(dy, (x, s))| {
        with_derivative(x, s, dydx, |at, g| dy[at..at + g.len()].iter_mut().zip(g).for_each(|(d, g)| *d *= g));
    });
}

/// Calls `f(at, g)` for consecutive runs of at most [`RUN`] elements, with `g` the derivative
/// `dydx` over `x[at..]`, `s[at..]` (a stack buffer, so the kernel and the product each stay
/// one vectorised loop).
fn with_derivative(x: &[f32], s: &[f32], dydx: GateDerivative, mut f: impl FnMut(usize, &[f32])) {
    let mut buf = [0.0f32; RUN];
    for (i, (x, s)) in x.chunks(RUN).zip(s.chunks(RUN)).enumerate() {
        let g = &mut buf[..x.len()];
        dydx(x, s, g);
        f(i * RUN, g);
    }
}

/// Elements per derivative run in [`with_derivative`].
const RUN: usize = 512;

/// A gated activation's forward pass: writes every element of `y` and of the gate `s` from
/// `x` (neither need be initialised).
pub(crate) type GateForward = fn(&[f32], &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]);
/// A gated activation's derivative `dy/dx` from `x` and the gate `s`, written into the last
/// slice (all three of one length).
pub(crate) type GateDerivative = fn(&[f32], &[f32], &mut [f32]);

/// GPT-2's GELU as a gated activation `y = x·s(x)`: the forward kernel and the derivative.
pub(crate) fn gelu_gate(kind: GeluKind) -> (GateForward, GateDerivative) {
    match kind {
        // y = x·s with s = σ(2u), u = √(2/π)(x + 0.044715x³)
        GeluKind::Tanh => (gelu_tanh_with_gate, gelu_tanh_derivative),
        // y = x·Φ(x)
        GeluKind::Erf => (gelu_erf_with_gate, gelu_erf_derivative),
    }
}

/// The CPU GELU op: `y = x·s(x)`, whose backward pass needs only `x` and the gate `s`
/// (`dydx(x, s)` from [`gelu_gate`]).
pub(crate) fn gated<T: Tape<f32, Cpu>>(
    x: Tensor<(usize, usize), f32, Cpu, T>,
    kind: GeluKind,
) -> Tensor<(usize, usize), f32, Cpu, T> {
    let (forward, dydx) = gelu_gate(kind);
    // a permuted/broadcast input becomes a row-major taped copy first (same id if already
    // row-major), so our gradient buffer has the layout we write
    let x = x.contiguous();
    let shape = *x.shape();
    let (x, mut tape) = x.split_tape();
    let xv = host_vec(&x);
    let (y, s) = gated_forward(&xv, forward);
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
                        with_derivative(x, s, dydx, |at, g| {
                            let (dx, dy) = (&mut dx[at..at + g.len()], &dy[at..at + g.len()]);
                            dx.iter_mut().zip(dy.iter().zip(g)).for_each(|(dx, (dy, g))| *dx += dy * g);
                        });
                    });
            }
            **grads.get_or_alloc_mut(&og)? = dy;
            Ok(())
        });
    }
    out.put_tape(tape)
}
