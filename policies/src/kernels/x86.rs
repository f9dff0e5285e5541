//! AVX2 + FMA versions of the hot loops, eight lanes wide: `dot`, `axpy`, the inference
//! matmul's panel kernel, and the vectorised `exp` and `Φ` behind the activations. The parent module
//! picks them at run time (`has_fma`); `avx512` holds the 16-wide panel kernel.

use super::{depths4, KChunk, PanelElem, PanelProduct};
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
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
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

/// Row blocks of 6 (12 accumulators) over the product's K-chunks; see [`super::panel`].
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the operands are as [`PanelProduct`] states.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panel<W: PanelElem>(p: &PanelProduct<W>) {
    for c in p.chunks() {
        let mut r = 0;
        while r + 6 <= p.m {
            block::<6, W>(p, c, r);
            r += 6;
        }
        match p.m - r {
            5 => block::<5, W>(p, c, r),
            4 => block::<4, W>(p, c, r),
            3 => block::<3, W>(p, c, r),
            2 => block::<2, W>(p, c, r),
            1 => block::<1, W>(p, c, r),
            _ => {}
        }
    }
}

/// Rows `r0..r0+R` of `y` through one chunk, in `R` pairs of 8-wide accumulators.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block<const R: usize, W: PanelElem>(p: &PanelProduct<W>, c: KChunk, r0: usize) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if c.accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            let yr = p.y.add((r0 + i) * p.n + p.j0);
            a[0] = _mm256_loadu_ps(yr);
            a[1] = _mm256_loadu_ps(yr.add(8));
        }
    }
    depths4(c, |kk| {
        let wr = p.wp.add(kk * 16);
        let (w0, w1) = (W::load8(wr), W::load8(wr.add(8)));
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_set1_ps(*p.x.add((r0 + i) * p.k + kk));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
    });
    for (i, a) in acc.iter().enumerate() {
        let yr = p.y.add((r0 + i) * p.n + p.j0);
        _mm256_storeu_ps(yr, a[0]);
        _mm256_storeu_ps(yr.add(8), a[1]);
    }
}

/// Vectorised `exp` of 8 lanes (same polynomial as [`super::exp_fast`]).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: __m256) -> __m256 {
    use super::activation::{EXP_C, LN2_HI, LN2_LO};
    // below the smallest normal result: exactly 0 (so exp(-inf) = 0 for masked tokens)
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.33));
    let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.72)), _mm256_set1_ps(-87.33));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_C[0]);
    for c in &EXP_C[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)))
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn map_with_exp(xs: &mut [f32], pre: impl Fn(f32) -> f32 + Copy, post: impl Fn(f32, f32) -> f32 + Copy) {
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0.0f32; 8];
        for (a, x) in a.iter_mut().zip(c.iter()) {
            *a = pre(*x);
        }
        let mut e = [0.0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), exp8(_mm256_loadu_ps(a.as_ptr())));
        for (x, e) in c.iter_mut().zip(e) {
            *x = post(*x, e);
        }
    }
    for x in chunks.into_remainder() {
        *x = post(*x, super::exp_fast(pre(*x)));
    }
}

/// `x ← Φ(x)`, or `x ← x·Φ(x)` (the exact GELU) with `gelu`, 8 lanes at a time: the forms and
/// polynomials of [`super::activation`]'s scalar `normal_cdf`, selected per lane.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn normal_cdf(xs: &mut [f32], gelu: bool) {
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        let x = _mm256_loadu_ps(c.as_ptr());
        let phi = normal_cdf8(x);
        _mm256_storeu_ps(c.as_mut_ptr(), if gelu { _mm256_mul_ps(x, phi) } else { phi });
    }
    for x in chunks.into_remainder() {
        *x = if gelu { *x * super::activation::normal_cdf(*x) } else { super::activation::normal_cdf(*x) };
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn normal_cdf8(x: __m256) -> __m256 {
    use super::activation::{CDF_FAR, CDF_NEAR, CDF_Z_MAX, CDF_Z_NEAR};
    let set = _mm256_set1_ps;
    let horner = |c: &[f32], v: __m256| {
        c[..c.len() - 1].iter().rev().fold(set(c[c.len() - 1]), |a, &c| _mm256_fmadd_ps(a, v, set(c)))
    };
    let abs = _mm256_andnot_ps(set(-0.0), x);
    let z = _mm256_min_ps(_mm256_mul_ps(abs, set(std::f32::consts::FRAC_1_SQRT_2)), set(CDF_Z_MAX));
    let t = _mm256_div_ps(set(1.0), _mm256_fmadd_ps(set(0.5), z, set(1.0)));
    let zz = _mm256_mul_ps(z, z);
    let e = exp8(_mm256_sub_ps(horner(&CDF_FAR, _mm256_fmsub_ps(set(2.4), t, set(1.4))), zz));
    let half_erfc = _mm256_mul_ps(set(0.5), _mm256_mul_ps(t, e));
    let half_erf = _mm256_mul_ps(set(0.5), _mm256_mul_ps(z, horner(&CDF_NEAR, zz)));
    let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
    let near = _mm256_blendv_ps(_mm256_add_ps(set(0.5), half_erf), _mm256_sub_ps(set(0.5), half_erf), negative);
    let far = _mm256_blendv_ps(_mm256_sub_ps(set(1.0), half_erfc), half_erfc, negative);
    _mm256_blendv_ps(far, near, _mm256_cmp_ps::<_CMP_LT_OQ>(z, set(CDF_Z_NEAR)))
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
