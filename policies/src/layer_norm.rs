//! LayerNorm over rows of `(N, C)` as one CPU op with its own backward pass, and dfdx's
//! composition (the reference it is tested against, and the fallback on other devices).

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::strided::{add_into, host_vec};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 13;

/// dfdx's composition of LayerNorm (the reference the fused op is tested against, and the
/// fallback on devices without a fused kernel).
pub fn layer_norm_composed<D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<(usize, usize), f32, D, T>,
    g: &Tensor<(usize,), f32, D>,
    b: Option<&Tensor<(usize,), f32, D>>,
    eps: f32,
) -> Tensor<(usize, usize), f32, D, T> {
    let s = *x.shape();
    let y = x.normalize::<Axis<1>>(eps) * g.retaped::<T>().broadcast_like::<_, Axis<0>>(&s);
    match b {
        Some(b) => y + b.retaped::<T>().broadcast_like::<_, Axis<0>>(&s),
        None => y,
    }
}

/// LayerNorm of the rows of `xv` `(rows, c)` on the host: `y = (x − mean)·rstd·g + b` and the
/// per-row `(mean, rstd)` that [`ln_backward_rows`] needs (it recomputes x̂ row by row, which
/// is cheaper than keeping an N×C x̂).
pub(crate) fn ln_forward_rows(
    xv: &[f32],
    c: usize,
    gv: &[f32],
    bv: Option<&[f32]>,
    eps: f32,
) -> (Vec<f32>, Vec<(f32, f32)>) {
    let rows = xv.len() / c;
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    let mut y = Vec::with_capacity(rows * c);
    let rows_per = (CHUNK / c).max(1);
    y.spare_capacity_mut()[..rows * c]
        .par_chunks_mut(rows_per * c)
        .zip(stats.par_chunks_mut(rows_per))
        .zip(xv.par_chunks(rows_per * c))
        .for_each(|((y, st), x)| {
            for (r, st) in st.iter_mut().enumerate() {
                let xr = &x[r * c..(r + 1) * c];
                let mean = xr.iter().sum::<f32>() / c as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let rs = 1.0 / (var + eps).sqrt();
                *st = (mean, rs);
                let yr = &mut y[r * c..(r + 1) * c];
                match bv {
                    Some(bv) => (0..c).for_each(|j| _ = yr[j].write((xr[j] - mean) * rs * gv[j] + bv[j])),
                    None => (0..c).for_each(|j| _ = yr[j].write((xr[j] - mean) * rs * gv[j])),
                }
            }
        });
    // SAFETY: the chunks cover all rows·c elements, and every row wrote all c of its own.
    unsafe { y.set_len(rows * c) };
    (y, stats)
}

/// LayerNorm's backward pass over rows: `dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` with
/// `dx̂ = dy·g`, accumulated into `dx`; returns `(dg, db)` summed over the rows.
pub(crate) fn ln_backward_rows(
    dy: &[f32],
    xv: &[f32],
    stats: &[(f32, f32)],
    gv: &[f32],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let c = gv.len();
    let rows_per = (CHUNK / c).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(rows_per * c)
        .zip(dy.par_chunks(rows_per * c))
        .zip(xv.par_chunks(rows_per * c).zip(stats.par_chunks(rows_per)))
        .map(|((dx, dy), (x, st))| {
            let (mut dg, mut db, mut xhr) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
            for (r, &(mean, rs)) in st.iter().enumerate() {
                let dyr = &dy[r * c..(r + 1) * c];
                xhr.iter_mut().zip(&x[r * c..(r + 1) * c]).for_each(|(h, x)| *h = (x - mean) * rs);
                let (mut m1, mut m2) = (0.0f32, 0.0f32);
                for j in 0..c {
                    let d = dyr[j] * gv[j];
                    m1 += d;
                    m2 += d * xhr[j];
                    dg[j] += dyr[j] * xhr[j];
                    db[j] += dyr[j];
                }
                let (m1, m2) = (m1 / c as f32, m2 / c as f32);
                for j in 0..c {
                    dx[r * c + j] += rs * (dyr[j] * gv[j] - m1 - xhr[j] * m2);
                }
            }
            (dg, db)
        })
        .collect();
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (pg, pb) in &partials {
        dg.iter_mut().zip(pg).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
    }
    (dg, db)
}

/// The CPU LayerNorm (same contract as [`crate::fused::FusedOps::layer_norm`]).
pub fn layer_norm_cpu<T: Tape<f32, Cpu>>(
    x: Tensor<(usize, usize), f32, Cpu, T>,
    g: &Tensor<(usize,), f32, Cpu>,
    b: Option<&Tensor<(usize,), f32, Cpu>>,
    eps: f32,
) -> Tensor<(usize, usize), f32, Cpu, T> {
    let x = x.contiguous();
    let (rows, c) = *x.shape();
    let (x, mut tape) = x.split_tape();
    let (xv, gv) = (host_vec(&x), host_vec(g));
    let bv = b.map(host_vec);
    let (y, stats) = ln_forward_rows(&xv, c, &gv, bv.as_deref(), eps);
    let out = x.device().tensor_from_vec(y, (rows, c));
    if T::OWNS_TAPE {
        let (xg, gg, bg, og) = (x.ghost(), g.ghost(), b.map(|b| b.ghost()), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            let (dg, db) = ln_backward_rows(&dy, &xv, &stats, &gv, grads.get_or_alloc_mut(&xg)?);
            add_into(grads.get_or_alloc_mut(&gg)?, &dg);
            if let Some(bg) = &bg {
                add_into(grads.get_or_alloc_mut(bg)?, &db);
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

    #[test]
    fn fused_layer_norm_matches_dfdx_forward_and_gradients() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(1);
        for shape in [(7usize, 5usize), (64, 256), (300, 384)] {
            let (n, c) = (shape.0 * shape.1, shape.1);
            let x: Tensor<(usize, usize), f32, Cpu> =
                dev.tensor_from_vec((0..n).map(|_| rng.gen_range(-3.0..3.0)).collect(), shape);
            let g: Tensor<(usize,), f32, Cpu> =
                dev.tensor_from_vec((0..c).map(|_| rng.gen_range(0.5..1.5)).collect(), (c,));
            let b: Tensor<(usize,), f32, Cpu> =
                dev.tensor_from_vec((0..c).map(|_| rng.gen_range(-0.5..0.5)).collect(), (c,));
            let up = dev.tensor_from_vec((0..n).map(|_| rng.gen_range(-1.0..1.0)).collect::<Vec<f32>>(), shape);
            let y1 = layer_norm_cpu(x.leaky_trace(), &g, Some(&b), 1e-5);
            let v1 = y1.retaped::<NoneTape>().as_vec();
            let g1 = (y1 * up.clone()).sum::<Rank0, _>().backward();
            let y2 = layer_norm_composed(x.leaky_trace(), &g, Some(&b), 1e-5);
            let v2 = y2.retaped::<NoneTape>().as_vec();
            let g2 = (y2 * up).sum::<Rank0, _>().backward();
            assert!(max_rel(&v1, &v2) < 2e-6, "{shape:?} forward");
            for (name, a, bb) in [
                ("x", g1.get(&x).as_vec(), g2.get(&x).as_vec()),
                ("g", g1.get(&g).as_vec(), g2.get(&g).as_vec()),
                ("b", g1.get(&b).as_vec(), g2.get(&b).as_vec()),
            ] {
                // dg/db sum over rows: f32 summation order differs (dfdx sums in one pass)
                assert!(max_rel(&a, &bb) < 2e-4, "{shape:?} d{name}: {}", max_rel(&a, &bb));
            }
            assert!(max_rel(&layer_norm_cpu(x.clone(), &g, Some(&b), 1e-5).as_vec(), &v2) < 2e-6);
        }
    }
}
