//! The training path's gemm (`policies/src/sgemm.rs`, cut into one band per thread) against
//! the `gemm` crate cut the same way (what the training path ran before), at the training
//! step's shapes: 768 rows (8 × 96 tokens) through the tiny model's linears — forward
//! `X·W`, input gradient `dY·Wᵀ`, weight gradient `Xᵀ·dY` — and the tied LM head at 512
//! response rows. Two threads, as in the workload.
//!
//! `cargo bench --bench gemm` (on an AVX-512 CPU the training path runs its 12 × 32 tile;
//! `RLHF_NO_AVX512=1 cargo bench --bench gemm` measures the 6 × 16 AVX2 tile instead)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;

/// The `gemm` crate, one single-threaded call per band along the output's longer side.
fn gemm_crate_bands(c: &mut [f32], (m, n, k): (usize, usize, usize), (a, at): (&[f32], bool), (b, bt): (&[f32], bool)) {
    let (ars, acs) = if at { (1, m as isize) } else { (k as isize, 1) };
    let (brs, bcs) = if bt { (1, k as isize) } else { (n as isize, 1) };
    let along_m = m >= n;
    let len = if along_m { m } else { n };
    let per = len.div_ceil(16).div_ceil(rayon::current_num_threads()) * 16;
    let cp = c.as_mut_ptr() as usize;
    (0..len.div_ceil(per)).into_par_iter().for_each(|i| {
        let (lo, hi) = (i * per, ((i + 1) * per).min(len));
        // SAFETY: band i writes rows (or columns) lo..hi of c, no other band does; the
        // operands are in bounds for their shapes.
        unsafe {
            let (mm, nn, c0, a0, b0) = if along_m {
                (hi - lo, n, lo * n, lo as isize * ars, 0)
            } else {
                (m, hi - lo, lo, 0, lo as isize * bcs)
            };
            gemm::gemm(
                mm,
                nn,
                k,
                (cp as *mut f32).add(c0),
                1,
                n as isize,
                false,
                a.as_ptr().offset(a0),
                acs,
                ars,
                b.as_ptr().offset(b0),
                bcs,
                brs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
}

fn gemm(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("thread pool");
    let rows = 768;
    let mut shapes = vec![];
    for (name, i, o) in [("qkv", 256, 768), ("o", 256, 256), ("fc", 256, 1024), ("proj", 1024, 256)] {
        shapes.push((format!("{name} fwd"), (rows, o, i), false, false));
        shapes.push((format!("{name} dx"), (rows, i, o), false, true));
        shapes.push((format!("{name} dw"), (i, o, rows), true, false));
    }
    shapes.push(("head fwd".into(), (512, 4096, 256), false, true));
    shapes.push(("head dx".into(), (512, 256, 4096), false, false));
    shapes.push(("head dw".into(), (4096, 256, 512), true, false));
    let mut group = c.benchmark_group("gemm");
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(1));
    group.warm_up_time(std::time::Duration::from_millis(300));
    for (name, (m, n, k), at, bt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 50.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 50.0).collect();
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new("sgemm", &name), |bn| {
            bn.iter(|| pool.install(|| rlhf_policies::training_gemm(&mut out, (m, n, k), (&a, at), (&b, bt))))
        });
        group.bench_function(BenchmarkId::new("gemm-crate", &name), |bn| {
            bn.iter(|| pool.install(|| gemm_crate_bands(&mut out, (m, n, k), (&a, at), (&b, bt))))
        });
    }
    group.finish();
}

criterion_group!(benches, gemm);
criterion_main!(benches);
