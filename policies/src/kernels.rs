//! CPU kernels for the tape-free inference path: dot products, axpy, small-m matmuls and the
//! row-streaming `x·Wᵀ` the tied LM head needs (see `../shared/docs/sampling-perf.md`).
//!
//! The hot loops have an AVX2+FMA version chosen at run time (no `-C target-cpu=native`
//! needed) and a portable fallback; both are tested against a naive loop.

use rayon::prelude::*;

/// Work (m·n·k multiply-adds) below which a matmul stays on one thread: a rayon fork/join
/// costs more than it gains on the 1–4 MFLOP matmuls of batch-1 decoding.
const PAR_MIN_WORK: usize = 1 << 22;

/// `Σ a[i]·b[i]`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); lengths are equal.
        return unsafe { x86::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y[i] += a·x[i]`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); lengths are equal.
        return unsafe { x86::axpy(a, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        let mut total: f32 = lanes.iter().sum();
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        while i < n {
            *py.add(i) += a * *px.add(i);
            i += 1;
        }
    }
}

/// `y = x·W (+ y if accumulate)` for `x: (m, k)`, `W: (k, n)` row-major, `y: (m, n)`.
///
/// Small `m` streams each row of `W` once and applies it to every row of `x` (k outer, batch
/// rows inner); larger `m` goes to the `gemm` crate (dfdx's own matmul backend).
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    debug_assert!(x.len() == m * k && w.len() == k * n && y.len() == m * n);
    if m <= 4 {
        if !accumulate {
            y.fill(0.0);
        }
        for kk in 0..k {
            let wrow = &w[kk * n..(kk + 1) * n];
            for r in 0..m {
                axpy(x[r * k + kk], wrow, &mut y[r * n..(r + 1) * n]);
            }
        }
        return;
    }
    let threads = if m * n * k >= PAR_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices have exactly the row-major (m,k), (k,n), (m,n) sizes checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y = x·Wᵀ` for `x: (m, k)`, `W: (n, k)` row-major (an embedding used as LM head), `y: (m, n)`.
///
/// Blocks of `W` rows stay in cache while every row of `x` is dotted against them, so `W` is
/// read from memory once per call; blocks run in parallel when the work is large.
pub fn matmul_bt(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    debug_assert!(x.len() == m * k && w.len() == n * k && y.len() == m * n);
    const BLOCK: usize = 64;
    let block = |(bi, out): (usize, &mut [f32])| {
        // out holds y[.., bi*BLOCK .. ] for all m rows, stored block-major: (m, width)
        let start = bi * BLOCK;
        let width = BLOCK.min(n - start);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for j in 0..width {
                out[r * width + j] = dot(xr, &w[(start + j) * k..(start + j + 1) * k]);
            }
        }
    };
    let nblocks = n.div_ceil(BLOCK);
    let mut scratch = vec![0.0f32; m * n];
    // Split scratch into per-block regions of m·width each.
    let mut regions: Vec<(usize, &mut [f32])> = Vec::with_capacity(nblocks);
    let mut rest = scratch.as_mut_slice();
    for bi in 0..nblocks {
        let width = BLOCK.min(n - bi * BLOCK);
        let (head, tail) = rest.split_at_mut(m * width);
        regions.push((bi, head));
        rest = tail;
    }
    if m * n * k >= PAR_MIN_WORK && rayon::current_num_threads() > 1 {
        regions.into_par_iter().for_each(block);
    } else {
        regions.into_iter().for_each(block);
    }
    // Scatter block-major scratch into row-major y.
    let mut off = 0;
    for bi in 0..nblocks {
        let start = bi * BLOCK;
        let width = BLOCK.min(n - start);
        for r in 0..m {
            y[r * n + start..r * n + start + width]
                .copy_from_slice(&scratch[off + r * width..off + (r + 1) * width]);
        }
        off += m * width;
    }
}

/// `tanh`-approximated GELU (GPT-2's `gelu_new`): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// `x / (1 + e^{-x})`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k).map(|i| x[r * k + i] * w[i * n + c]).sum();
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_matches_naive_small_and_large_m() {
        for &(m, k, n) in &[(1, 37, 19), (3, 64, 130), (9, 33, 70), (40, 65, 129)] {
            let (x, w) = (data(m * k, 1), data(k * n, 2));
            let want = naive(&x, &w, m, k, n);
            let mut y = vec![0.0; m * n];
            matmul(&x, &w, &mut y, m, k, n, false);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
            // accumulate adds onto y
            let mut y2 = vec![1.0; m * n];
            matmul(&x, &w, &mut y2, m, k, n, true);
            for (a, b) in y2.iter().zip(&want) {
                assert!((a - (b + 1.0)).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn matmul_bt_matches_naive() {
        for &(m, k, n) in &[(1, 37, 200), (5, 64, 64), (32, 48, 130)] {
            let (x, w) = (data(m * k, 3), data(n * k, 4));
            let mut wt = vec![0.0; k * n];
            for i in 0..n {
                for j in 0..k {
                    wt[j * n + i] = w[i * k + j];
                }
            }
            let want = naive(&x, &wt, m, k, n);
            let mut y = vec![0.0; m * n];
            matmul_bt(&x, &w, &mut y, m, k, n);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn dot_and_axpy_handle_tails() {
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 100] {
            let (a, b) = (data(len, 5), data(len, 6));
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-4);
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..len {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }
}
