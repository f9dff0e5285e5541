//! The training forward's affine maps, `y = x·W (+ b) (+ r)`, as one op with its own backward
//! pass. dfdx's composition (kept as [`linear_composed`] for other devices and as the tests'
//! reference) runs its matmul through the gemm release it links and adds the broadcast bias
//! and the residual with single-threaded element-wise kernels, each a full pass over the
//! activations forward and backward. Here the bias and the residual seed the output buffer and
//! the product accumulates onto them; the backward pass is two multi-threaded gemm calls
//! (`dx += dy·Wᵀ`, `dW += xᵀ·dy`), a column sum for `db` and one add for `dr`.

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::strided::{add_into, gemm_into, gemm_new, host_vec, row_major, View};

type A2<D, T> = Tensor<(usize, usize), f32, D, T>;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `(in, out)`: `y = x·W` (GPT-2's Conv1D layout, every [`crate::model::Linear`]).
    InOut,
    /// `(out, in)`: `y = x·Wᵀ` (an LM head reading the `(V, C)` token embedding).
    OutIn,
}

impl WeightLayout {
    /// `(in, out)` of a weight with this layout.
    fn dims(self, w: &Tensor<(usize, usize), f32, impl Storage<f32>>) -> (usize, usize) {
        let (r, c) = *w.shape();
        match self {
            WeightLayout::InOut => (r, c),
            WeightLayout::OutIn => (c, r),
        }
    }

    /// The stored weight as an `(in × out)` view.
    fn view(self, w: &[f32], (i, o): (usize, usize)) -> View<'_> {
        match self {
            WeightLayout::InOut => View::rows(w, o),
            WeightLayout::OutIn => View::rows(w, i).t(),
        }
    }
}

/// The operands of one affine map besides its input: weight, optional bias `(out,)` and
/// optional residual `(N, out)` added to the result. Gradients of all three are recorded by
/// id (parameters, and a residual stream whose own tape travels down the branch).
#[derive(Debug)]
pub struct Affine<'a, D: Storage<f32>> {
    /// The weight, stored row-major as every parameter this crate builds or loads is (the
    /// CPU op writes its gradient in that layout; debug builds check).
    pub w: &'a Tensor<(usize, usize), f32, D>,
    /// How `w` is stored.
    pub layout: WeightLayout,
    /// Bias (row-major like `w`).
    pub b: Option<&'a Tensor<(usize,), f32, D>>,
    /// Residual.
    pub residual: Option<&'a A2<D, NoneTape>>,
    /// The weight and bias get no gradient (a LoRA layer's frozen base, [`crate::lora`]): the
    /// backward pass skips `dW = xᵀ·dy` and `db`.
    pub frozen: bool,
}

// by hand: a derive would ask `D: Copy`
impl<D: Storage<f32>> Clone for Affine<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D: Storage<f32>> Copy for Affine<'_, D> {}

impl<'a, D: Storage<f32>> Affine<'a, D> {
    /// An LM head: `h·wᵀ` for a `(V, C)` weight (HF's `lm_head.weight`, or a tied `wte`), no
    /// bias, no residual.
    pub fn lm_head(w: &'a Tensor<(usize, usize), f32, D>) -> Self {
        Affine { w, layout: WeightLayout::OutIn, b: None, residual: None, frozen: false }
    }
}

/// dfdx's composition: `x (N, in) → x·W + b + r (N, out)`.
pub fn linear_composed<D: Device<f32>, T: Tape<f32, D>>(x: A2<D, T>, a: Affine<'_, D>) -> A2<D, T> {
    let n = x.shape().0;
    let y = match (a.layout, a.frozen) {
        (WeightLayout::InOut, false) => x.matmul(a.w.retaped::<T>()),
        (WeightLayout::OutIn, false) => x.matmul(a.w.retaped::<T>().permute::<_, Axes2<1, 0>>()),
        (WeightLayout::InOut, true) => x.matmul(a.w.clone()),
        (WeightLayout::OutIn, true) => x.matmul(a.w.clone().permute::<_, Axes2<1, 0>>()),
    };
    let o = y.shape().1;
    let y = match (a.b, a.frozen) {
        (Some(b), false) => y + b.retaped::<T>().broadcast_like::<_, Axis<0>>(&(n, o)),
        (Some(b), true) => y + b.clone().broadcast_like::<_, Axis<0>>(&(n, o)),
        (None, _) => y,
    };
    match a.residual {
        Some(r) => y + r.clone(),
        None => y,
    }
}

/// Rows per parallel chunk of an element-wise pass over `(N, cols)`.
pub(crate) fn rows_per(cols: usize) -> usize {
    ((1 << 13) / cols.max(1)).max(1)
}

/// `x·W (+ bias) (+ residual)`, `(n, o)` row-major, for `x` `(n, i)`: the product is
/// accumulated onto the residual (if any) plus the bias rows, or written into a fresh buffer
/// when neither is given — no zero fill and no second pass in any case.
pub(crate) fn affine_output(
    (n, i, o): (usize, usize, usize),
    x: View<'_>,
    w: View<'_>,
    bias: Option<&[f32]>,
    residual: Option<Vec<f32>>,
    threads: usize,
) -> Vec<f32> {
    let mut y = match (residual, bias) {
        (None, None) => return gemm_new((n, o, i), x, w, 1.0, threads),
        (Some(mut y), bias) => {
            assert_eq!(y.len(), n * o, "linear: residual shape");
            if let Some(bv) = bias {
                y.par_chunks_mut(rows_per(o) * o).for_each(|blk| {
                    blk.chunks_mut(o).for_each(|row| row.iter_mut().zip(bv).for_each(|(y, b)| *y += b));
                });
            }
            y
        }
        // in parallel: a serial `bv.repeat(n)` of a (768, 1024) output kept the other core
        // waiting for ~1% of a GRPO iteration
        (None, Some(bv)) => {
            let mut y = Vec::with_capacity(n * o);
            y.spare_capacity_mut()[..n * o].par_chunks_mut(rows_per(o) * o).for_each(|blk| {
                blk.chunks_mut(o).for_each(|row| row.iter_mut().zip(bv).for_each(|(y, b)| _ = y.write(*b)));
            });
            // SAFETY: the chunks above cover all n·o elements, and each row wrote all o of its own.
            unsafe { y.set_len(n * o) };
            y
        }
    };
    gemm_into(&mut y, (n, o, i), x, w, 1.0, true, threads);
    y
}

/// `db += Σ_rows dy` for `dy` `(N, o)` (a bias gradient), with per-chunk partial sums.
pub(crate) fn colsum_into(db: &mut [f32], dy: &[f32]) {
    let o = db.len();
    let parts: Vec<Vec<f32>> = dy
        .par_chunks(rows_per(o) * o)
        .map(|blk| {
            let mut s = vec![0.0f32; o];
            blk.chunks(o).for_each(|row| s.iter_mut().zip(row).for_each(|(s, d)| *s += d));
            s
        })
        .collect();
    parts.iter().for_each(|p| db.iter_mut().zip(p).for_each(|(a, d)| *a += d));
}

/// The fused CPU affine map (same contract as [`linear_composed`]).
pub fn linear_cpu<T: Tape<f32, Cpu>>(x: A2<Cpu, T>, a: Affine<'_, Cpu>) -> A2<Cpu, T> {
    // parameters are row-major by construction (checking costs a gradient-sized buffer, too
    // dear for every call on a weight); a strided residual would need its gradient written
    // strided: leave such (never seen in this crate's models) to dfdx
    debug_assert!(row_major(a.w) && a.b.is_none_or(row_major), "linear: a strided weight or bias");
    if a.residual.is_some_and(|r| !row_major(r)) {
        return linear_composed(x, a);
    }
    let x = x.contiguous();
    let (n, i) = *x.shape();
    let (wi, o) = a.layout.dims(a.w);
    assert_eq!(wi, i, "linear: input width {i} against a weight of shape {:?}", a.w.shape());
    let (x, mut tape) = x.split_tape();
    let xv = host_vec(&x);
    let bv = a.b.map(host_vec);
    assert!(bv.as_ref().is_none_or(|b| b.len() == o), "linear: bias length");
    let residual = a.residual.map(|r| {
        assert_eq!(*r.shape(), (n, o), "linear: residual shape");
        host_vec(r)
    });
    let threads = rayon::current_num_threads();
    let y = {
        let wv = host_vec(a.w);
        affine_output((n, i, o), View::rows(&xv, i), a.layout.view(&wv, (i, o)), bv.as_deref(), residual, threads)
    };
    let out = x.device().tensor_from_vec(y, (n, o));
    if T::OWNS_TAPE {
        let (xg, og, layout, frozen) = (x.ghost(), out.ghost(), a.layout, a.frozen);
        // the weight's data is shared, not copied, until the backward pass reads it
        let w = a.w.clone();
        let bg = a.b.map(|b| b.ghost());
        let rg = a.residual.map(|r| r.ghost());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let threads = rayon::current_num_threads();
            let (dyv, xm) = (View::rows(&dy, o), View::rows(&xv, i));
            let wv = host_vec(&w);
            // dx += dy·Wᵀ
            gemm_into(grads.get_or_alloc_mut(&xg)?, (n, i, o), dyv, layout.view(&wv, (i, o)).t(), 1.0, true, threads);
            drop(wv);
            if !frozen {
                // dW += xᵀ·dy, stored in the weight's own layout
                let dw: &mut Vec<f32> = grads.get_or_alloc_mut(&w.ghost())?;
                match layout {
                    WeightLayout::InOut => gemm_into(dw, (i, o, n), xm.t(), dyv, 1.0, true, threads),
                    WeightLayout::OutIn => gemm_into(dw, (o, i, n), dyv.t(), xm, 1.0, true, threads),
                }
                if let Some(bg) = &bg {
                    colsum_into(grads.get_or_alloc_mut(bg)?, &dy);
                }
            }
            if let Some(rg) = &rg {
                add_into(grads.get_or_alloc_mut(rg)?, &dy);
            }
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

    fn rand(dev: &Cpu, rng: &mut StdRng, shape: (usize, usize)) -> Tensor<(usize, usize), f32, Cpu> {
        dev.tensor_from_vec((0..shape.0 * shape.1).map(|_| rng.gen_range(-1.0..1.0)).collect(), shape)
    }

    #[test]
    fn fused_linear_matches_dfdx_forward_and_gradients() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(11);
        let (n, i, o) = (13, 24, 40);
        let x = rand(&dev, &mut rng, (n, i));
        let up = rand(&dev, &mut rng, (n, o));
        let r = rand(&dev, &mut rng, (n, o));
        let b: Tensor<(usize,), f32, Cpu> =
            dev.tensor_from_vec((0..o).map(|_| rng.gen_range(-1.0..1.0)).collect(), (o,));
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let w = rand(&dev, &mut rng, if layout == WeightLayout::InOut { (i, o) } else { (o, i) });
            for (bias, res) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = Affine { w: &w, layout, b: bias.then_some(&b), residual: res.then_some(&r), frozen: false };
                let run = |fused: bool| {
                    let y = if fused { linear_cpu(x.leaky_trace(), a) } else { linear_composed(x.leaky_trace(), a) };
                    let yv = y.retaped::<NoneTape>().as_vec();
                    let g = (y * up.clone()).sum::<Rank0, _>().backward();
                    let db = if bias { g.get(&b).as_vec() } else { vec![] };
                    let dr = if res { g.get(&r).as_vec() } else { vec![] };
                    (yv, g.get(&x).as_vec(), g.get(&w).as_vec(), db, dr)
                };
                let (f, c) = (run(true), run(false));
                let case = format!("{layout:?} bias {bias} residual {res}");
                assert!(max_rel(&f.0, &c.0) < 1e-5, "{case}: values");
                assert!(max_rel(&f.1, &c.1) < 1e-5, "{case}: dx");
                assert!(max_rel(&f.2, &c.2) < 1e-5, "{case}: dW");
                assert!(max_rel(&f.3, &c.3) < 1e-5, "{case}: db");
                assert!(max_rel(&f.4, &c.4) < 1e-5, "{case}: dr");
            }
        }
    }

    #[test]
    fn fused_linear_accepts_a_permuted_input() {
        // x arrives transposed (a strided view): the op copies it row-major on the tape
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(12);
        let xt = rand(&dev, &mut rng, (6, 5));
        let w = rand(&dev, &mut rng, (6, 3));
        let a = Affine { w: &w, layout: WeightLayout::InOut, b: None, residual: None, frozen: false };
        let run = |fused: bool| {
            let x = xt.leaky_trace().permute::<_, Axes2<1, 0>>();
            let y = if fused { linear_cpu(x, a) } else { linear_composed(x, a) };
            let g = y.sum::<Rank0, _>().backward();
            (g.get(&xt).as_vec(), g.get(&w).as_vec())
        };
        let (f, c) = (run(true), run(false));
        assert!(max_rel(&f.0, &c.0) < 1e-5 && max_rel(&f.1, &c.1) < 1e-5);
    }

    #[test]
    fn fused_linear_falls_back_for_a_strided_residual() {
        // a transposed residual is not row-major: dfdx's composition takes over, same results
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(13);
        let x = rand(&dev, &mut rng, (4, 3));
        let w = rand(&dev, &mut rng, (3, 5));
        let r = rand(&dev, &mut rng, (5, 4)).permute::<_, Axes2<1, 0>>();
        let a = Affine { w: &w, layout: WeightLayout::InOut, b: None, residual: Some(&r), frozen: false };
        let run = |fused: bool| {
            let y = if fused { linear_cpu(x.leaky_trace(), a) } else { linear_composed(x.leaky_trace(), a) };
            let yv = y.retaped::<NoneTape>().as_vec();
            let g = (y * 2.0).sum::<Rank0, _>().backward();
            (yv, g.get(&r).as_vec(), g.get(&w).as_vec())
        };
        let (f, c) = (run(true), run(false));
        assert!(max_rel(&f.0, &c.0) < 1e-6 && max_rel(&f.1, &c.1) < 1e-6 && max_rel(&f.2, &c.2) < 1e-6);
        assert!(f.1.iter().all(|&d| d == 2.0), "dr = dy");
    }
}
