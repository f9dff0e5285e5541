//! The inference matmul's panel kernel ([`super::matmul`]) for AVX-512 cores: a 16-column
//! panel row is one 16-wide register, so a register block holds 12 rows of `y` (12
//! accumulators) where the AVX2 kernel holds 6 (in 12 eight-wide halves). Each element is
//! summed in the same order as there — its k index in chunks of 256, by fused multiply-adds
//! onto the running value — so the two kernels give the same bits.

use super::PanelElem;
use std::arch::x86_64::*;

/// Rows of `y` per register block.
const R: usize = 12;
/// Depth of one K-chunk (a `256 × 16` panel chunk, 16 KiB of f32, stays in L1).
const KC: usize = 256;

/// `y[.., j0..j0+16] (+)= x · panel` for all `m` rows; see [`super::panel`].
///
/// # Safety
/// The CPU has AVX-512F (and AVX2, FMA, F16C); `x: (m,k)` row-major, `wp: (k,16)`, `y` valid
/// for reads and writes of columns `j0..j0+16` of `m` rows of stride `n`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel<W: PanelElem>(
    x: *const f32,
    wp: *const W,
    y: *mut f32,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    accumulate: bool,
) {
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        let chunk = Chunk { x, wp, y, k0, k1, k, n, j0, accumulate: accumulate || k0 > 0 };
        let mut r = 0;
        while r + R <= m {
            block::<R, W>(&chunk, r);
            r += R;
        }
        macro_rules! rest {
            ($($rows:literal)*) => {
                match m - r {
                    $($rows => block::<$rows, W>(&chunk, r),)*
                    _ => {}
                }
            };
        }
        rest!(1 2 3 4 5 6 7 8 9 10 11);
        k0 = k1;
    }
}

/// One K-chunk `k0..k1` of a panel applied to `y` (added to it when `accumulate`).
struct Chunk<W> {
    x: *const f32,
    wp: *const W,
    y: *mut f32,
    k0: usize,
    k1: usize,
    k: usize,
    n: usize,
    j0: usize,
    accumulate: bool,
}

/// Rows `r0..r0+ROWS` of `y` through one chunk, in `ROWS` accumulators.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn block<const ROWS: usize, W: PanelElem>(c: &Chunk<W>, r0: usize) {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    if c.accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(c.y.add((r0 + i) * c.n + c.j0));
        }
    }
    let step = |acc: &mut [__m512; ROWS], kk: usize| {
        let w = W::load16(c.wp.add(kk * 16));
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*c.x.add((r0 + i) * c.k + kk)), w, *a);
        }
    };
    // unrolled four times, as the AVX2 kernel
    let mut kk = c.k0;
    while kk + 4 <= c.k1 {
        for u in 0..4 {
            step(&mut acc, kk + u);
        }
        kk += 4;
    }
    for kk in kk..c.k1 {
        step(&mut acc, kk);
    }
    for (i, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.y.add((r0 + i) * c.n + c.j0), *a);
    }
}
