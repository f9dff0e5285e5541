//! The inference matmul's panel kernel ([`super::matmul`]) for AVX-512 cores: a 16-column
//! panel row is one 16-wide register, so a register block holds 12 rows of `y` (12
//! accumulators) where the AVX2 kernel holds 6 (in 12 eight-wide halves). Each element is
//! summed in the same order as there — its k index in chunks of 256, by fused multiply-adds
//! onto the running value — so the two kernels give the same bits.

use super::{depths4, KChunk, PanelElem, PanelProduct};
use std::arch::x86_64::*;

/// Rows of `y` per register block.
const R: usize = 12;

/// Row blocks of 12 (12 accumulators) over the product's K-chunks; see [`super::panel`].
///
/// # Safety
/// The CPU has AVX-512F (and AVX2, FMA, F16C); the operands are as [`PanelProduct`] states.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn panel<W: PanelElem>(p: &PanelProduct<W>) {
    for c in p.chunks() {
        let mut r = 0;
        while r + R <= p.m {
            block::<R, W>(p, c, r);
            r += R;
        }
        macro_rules! rest {
            ($($rows:literal)*) => {
                match p.m - r {
                    $($rows => block::<$rows, W>(p, c, r),)*
                    _ => {}
                }
            };
        }
        rest!(1 2 3 4 5 6 7 8 9 10 11);
    }
}

/// Rows `r0..r0+ROWS` of `y` through one chunk, in `ROWS` accumulators.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn block<const ROWS: usize, W: PanelElem>(p: &PanelProduct<W>, c: KChunk, r0: usize) {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    if c.accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(p.y.add((r0 + i) * p.n + p.j0));
        }
    }
    depths4(c, |kk| {
        let w = W::load16(p.wp.add(kk * 16));
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*p.x.add((r0 + i) * p.k + kk)), w, *a);
        }
    });
    for (i, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(p.y.add((r0 + i) * p.n + p.j0), *a);
    }
}
