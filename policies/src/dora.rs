//! DoRA's output scaling (Liu et al. 2024, eq. 5; see [`crate::lora`]): `y = z ⊙ m / n + b + r`
//! for the adapted layer's `z = x·W + s·(x·A)·B` `(N, out)`, its magnitude `m` (a parameter),
//! the column norms `n = ‖W + s·A·B‖_c` (a constant: the paper's §4.3 takes no gradient through
//! them), the frozen bias `b` and the residual stream `r`. The backward pass:
//! `dz = dy ⊙ m / n`, `dm = Σ_rows dy ⊙ z / n`, `dr = dy`.
//!
//! dfdx's composition of this (the default, used on CUDA) runs five single-threaded
//! element-wise passes over `(N, out)` forward and as many backward; the CPU op makes one
//! parallel pass each way.

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::linear::rows_per;
use crate::strided::{host_vec, row_major};

type A2<D, T> = Tensor<(usize, usize), f32, D, T>;
type V1<D> = Tensor<(usize,), f32, D>;

/// What [`crate::FusedOps::dora_scale`] applies to `z`.
#[derive(Debug)]
pub struct DoraScale<'a, D: Storage<f32>> {
    /// The magnitude `m` `(out,)`: its gradient is recorded by id.
    pub m: &'a V1<D>,
    /// The column norms `n` `(out,)`, constant.
    pub norms: &'a V1<D>,
    /// The layer's bias, frozen.
    pub b: Option<&'a V1<D>>,
    /// The residual `r` `(N, out)`: its gradient is recorded by id.
    pub residual: Option<&'a A2<D, NoneTape>>,
}

// by hand: a derive would ask `D: Copy` of the device
impl<D: Storage<f32>> Clone for DoraScale<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D: Storage<f32>> Copy for DoraScale<'_, D> {}

/// dfdx's composition: `z · (m / n) + b + r`, the factor a division so that it is exactly 1
/// where `m = n` (a fresh update).
pub fn dora_scale_composed<D: Device<f32>, T: Tape<f32, D>>(z: A2<D, T>, a: DoraScale<'_, D>) -> A2<D, T> {
    let s = *z.shape();
    let factor = a.m.clone().retaped::<T>() / a.norms.clone();
    let y = z * factor.broadcast_like::<_, Axis<0>>(&s);
    let y = match a.b {
        Some(b) => y + b.clone().broadcast_like::<_, Axis<0>>(&s),
        None => y,
    };
    match a.residual {
        // the residual's gradient is recorded under its id, as the fused ops record it
        Some(r) => y + r.clone().retaped::<T>(),
        None => y,
    }
}

/// `‖w_j‖` of each column of the row-major `(in, o)` matrix `w`, from per-chunk partial sums
/// in a fixed order (the same numbers on every call and thread count).
pub(crate) fn column_norms(w: &[f32], o: usize) -> Vec<f32> {
    let rows = ((1 << 14) / o.max(1)).max(1);
    let parts: Vec<Vec<f32>> = w
        .par_chunks(rows * o)
        .map(|blk| {
            let mut s = vec![0.0f32; o];
            blk.chunks(o).for_each(|row| s.iter_mut().zip(row).for_each(|(s, v)| *s += v * v));
            s
        })
        .collect();
    let mut total = vec![0.0f32; o];
    parts.iter().for_each(|p| total.iter_mut().zip(p).for_each(|(t, s)| *t += s));
    total.iter().map(|t| t.sqrt()).collect()
}

/// DoRA's merge (eq. 5, PEFT's `dora_factor`): scales output `j`'s weights by `m_j / ‖w_j‖`,
/// `w_j` its weights over all inputs — column `j` of an `(in, out)` matrix (`columns`), else
/// row `j` of an `(out, in)` one.
pub(crate) fn rescale_outputs(w: &mut [f32], m: &[f32], columns: bool) {
    let o = m.len();
    let norms = match columns {
        true => column_norms(w, o),
        false => w.chunks(w.len() / o).map(|row| row.iter().map(|v| v * v).sum::<f32>().sqrt()).collect(),
    };
    let factor: Vec<f32> = m.iter().zip(&norms).map(|(m, n)| m / n).collect();
    match columns {
        true => w.chunks_mut(o).for_each(|row| row.iter_mut().zip(&factor).for_each(|(v, f)| *v *= f)),
        false => w.chunks_mut(w.len() / o).zip(&factor).for_each(|(row, f)| row.iter_mut().for_each(|v| *v *= f)),
    }
}

/// The fused CPU op (the same contract as [`dora_scale_composed`]).
pub fn dora_scale_cpu<T: Tape<f32, Cpu>>(z: A2<Cpu, T>, a: DoraScale<'_, Cpu>) -> A2<Cpu, T> {
    if a.residual.is_some_and(|r| !row_major(r)) {
        return dora_scale_composed(z, a);
    }
    let z = z.contiguous();
    let (n, o) = *z.shape();
    let (z, mut tape) = z.split_tape();
    let (m, norms) = (host_vec(a.m), host_vec(a.norms));
    assert!(
        m.len() == o && norms.len() == o,
        "dora_scale: {o} outputs, m and norms of {} and {}",
        m.len(),
        norms.len()
    );
    let factor: Vec<f32> = m.iter().zip(&norms).map(|(m, n)| m / n).collect();
    let bias = a.b.map(host_vec);
    let zv = host_vec(&z);
    let mut y = match a.residual {
        Some(r) => {
            assert_eq!(*r.shape(), (n, o), "dora_scale: residual shape");
            host_vec(r)
        }
        None => vec![0.0; n * o],
    };
    let chunk = rows_per(o) * o;
    y.par_chunks_mut(chunk).zip(zv.par_chunks(chunk)).for_each(|(yb, zb)| {
        for (yr, zr) in yb.chunks_mut(o).zip(zb.chunks(o)) {
            for (j, (y, z)) in yr.iter_mut().zip(zr).enumerate() {
                *y += z * factor[j] + bias.as_ref().map_or(0.0, |b| b[j]);
            }
        }
    });
    let out = z.device().tensor_from_vec(y, (n, o));
    if T::OWNS_TAPE {
        let (zg, og, mg, rg) = (z.ghost(), out.ghost(), a.m.ghost(), a.residual.map(|r| r.ghost()));
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            // dm_j = Σ_rows dy·z / n_j, from per-chunk partial sums
            let parts: Vec<Vec<f32>> = dy
                .par_chunks(chunk)
                .zip(zv.par_chunks(chunk))
                .map(|(db, zb)| {
                    let mut s = vec![0.0f32; o];
                    for (dr, zr) in db.chunks(o).zip(zb.chunks(o)) {
                        s.iter_mut().zip(dr.iter().zip(zr)).for_each(|(s, (d, z))| *s += d * z);
                    }
                    s
                })
                .collect();
            let dm = grads.get_or_alloc_mut(&mg)?;
            for p in &parts {
                dm.iter_mut().zip(p.iter().zip(&norms)).for_each(|(g, (s, n))| *g += s / n);
            }
            let dz = grads.get_or_alloc_mut(&zg)?;
            dz.par_chunks_mut(chunk).zip(dy.par_chunks(chunk)).for_each(|(zb, db)| {
                for (zr, dr) in zb.chunks_mut(o).zip(db.chunks(o)) {
                    zr.iter_mut().zip(dr.iter().zip(&factor)).for_each(|(g, (d, f))| *g += d * f);
                }
            });
            if let Some(rg) = &rg {
                crate::strided::add_into(grads.get_or_alloc_mut(rg)?, &dy);
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

    /// The fused op against dfdx's composition: values, and the gradients of `z`, `m` and the
    /// residual, with and without bias and residual.
    #[test]
    fn fused_dora_scale_matches_the_composition() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(5);
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (n, o) = (37, 300);
        let z0 = dev.tensor_from_vec(rand(n * o), (n, o));
        let m = dev.tensor_from_vec(rand(o), (o,));
        let norms = dev.tensor_from_vec(rand(o).iter().map(|v| 1.0 + v.abs()).collect(), (o,));
        let b = dev.tensor_from_vec(rand(o), (o,));
        let r = dev.tensor_from_vec(rand(n * o), (n, o));
        let up = dev.tensor_from_vec(rand(n * o), (n, o));
        for (bias, residual) in [(false, false), (true, true), (true, false)] {
            let a = DoraScale { m: &m, norms: &norms, b: bias.then_some(&b), residual: residual.then_some(&r) };
            let run = |fused: bool| {
                let z = z0.leaky_trace();
                let y = if fused { dora_scale_cpu(z, a) } else { dora_scale_composed(z, a) };
                let values = y.retaped::<NoneTape>().as_vec();
                let g = (y * up.clone()).sum::<Rank0, _>().backward();
                let dr = residual.then(|| g.get(&r).as_vec());
                (values, g.get(&z0).as_vec(), g.get(&m).as_vec(), dr)
            };
            let (f, c) = (run(true), run(false));
            assert!(max_rel(&f.0, &c.0) < 1e-6, "values");
            assert!(max_rel(&f.1, &c.1) < 1e-6, "dz");
            assert!(max_rel(&f.2, &c.2) < 1e-5, "dm");
            assert_eq!(f.3, c.3, "dr");
        }
    }

    /// The CPU's column norms (host, multi-threaded) against dfdx's composition.
    #[test]
    fn host_column_norms_match_the_composition() {
        use crate::lora::{column_norms_host, Lora};
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(6);
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (i, r, o) = (700, 5, 90);
        let w = dev.tensor_from_vec(rand(i * o), (i, o));
        let lora = Lora {
            a: dev.tensor_from_vec(rand(i * r), (i, r)),
            b: dev.tensor_from_vec(rand(r * o), (r, o)),
            scale: 0.7,
            magnitude: None,
        };
        let (host, composed) = (column_norms_host(&w, &lora), lora.column_norms(&w).as_vec());
        assert!(max_rel(&host, &composed) < 1e-5, "{}", max_rel(&host, &composed));
    }
}
