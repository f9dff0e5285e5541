//! LayerNorm over rows of `(N, C)` as one CPU op with its own backward pass, and dfdx's
//! composition (the reference it is tested against, and the fallback on other devices).

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::strided::host_vec;

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
    let bv = b.map_or_else(|| vec![0.0f32; c], host_vec);
    // forward, keeping x and (mean, rstd) per row for the backward pass, which recomputes
    // x̂ = (x − mean)·rstd row by row (cheaper than a stored N×C x̂)
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    let mut y = vec![0.0f32; rows * c];
    let rows_per = (CHUNK / c).max(1);
    y.par_chunks_mut(rows_per * c).zip(stats.par_chunks_mut(rows_per)).zip(xv.par_chunks(rows_per * c)).for_each(
        |((y, st), x)| {
            for (r, st) in st.iter_mut().enumerate() {
                let xr = &x[r * c..(r + 1) * c];
                let mean = xr.iter().sum::<f32>() / c as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let rs = 1.0 / (var + eps).sqrt();
                *st = (mean, rs);
                for j in 0..c {
                    y[r * c + j] = (xr[j] - mean) * rs * gv[j] + bv[j];
                }
            }
        },
    );
    let out = x.device().tensor_from_vec(y, (rows, c));
    if T::OWNS_TAPE {
        let (xg, gg, bg, og) = (x.ghost(), g.ghost(), b.map(|b| b.ghost()), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            // dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)),  dx̂ = dy·g;  per-block partial dg, db
            let partials: Vec<(Vec<f32>, Vec<f32>)> = {
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&xg)?;
                dx.par_chunks_mut(rows_per * c)
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
                    .collect()
            };
            let dgv: &mut Vec<f32> = grads.get_or_alloc_mut(&gg)?;
            for (dg, _) in &partials {
                dgv.iter_mut().zip(dg).for_each(|(a, v)| *a += v);
            }
            if let Some(bg) = &bg {
                let dbv: &mut Vec<f32> = grads.get_or_alloc_mut(bg)?;
                for (_, db) in &partials {
                    dbv.iter_mut().zip(db).for_each(|(a, v)| *a += v);
                }
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
