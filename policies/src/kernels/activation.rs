//! Element-wise kernels with an `exp` inside: `exp` itself, SiLU and the two GELUs, each
//! applied to a slice and vectorised (8 lanes of AVX2+FMA, chosen at run time) with a portable
//! fallback. The GELUs also write the gate `s` (`y = x·s`) their backward passes read.

use std::mem::MaybeUninit;

/// `e^x` for f32 to about 2 ulp (Cephes `expf`: range reduction by ln 2, degree-6
/// polynomial, exponent by integer add). Inputs below −87.3 give 0, above 88.7 give +∞.
#[inline]
pub fn exp_fast(x: f32) -> f32 {
    if x < -87.33 {
        return 0.0;
    }
    if x > 88.72 {
        return f32::INFINITY;
    }
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = exp_poly(r);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
pub(super) const EXP_C: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

#[inline]
fn exp_poly(r: f32) -> f32 {
    let mut p = EXP_C[0];
    for c in &EXP_C[1..] {
        p = p * r + c;
    }
    p * r * r + r + 1.0
}

/// GPT-2's `gelu_new`, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, written as
/// `x · σ(2·√(2/π)·(x + 0.044715·x³))` (the same function, with no cancellation) and applied
/// in place with the vectorised [`exp_fast`].
pub fn gelu_tanh_inplace(xs: &mut [f32]) {
    const C2: f32 = 2.0 * 0.797_884_6; // 2·sqrt(2/pi)
    map_with_exp(xs, |x| -C2 * (x + 0.044715 * x * x * x), |x, e| x / (1.0 + e));
}

/// `gelu_new` of `x` into `y`, also writing the gate `s = σ(2u)` (so `y = x·s`) that the
/// backward pass needs. All slices have the same length; `y` and `s` need not be initialised
/// (every element is written).
pub fn gelu_tanh_with_gate(x: &[f32], y: &mut [MaybeUninit<f32>], s: &mut [MaybeUninit<f32>]) {
    const C2: f32 = 2.0 * 0.797_884_6; // 2·sqrt(2/pi)
    let s = write_copy(s, x);
    map_with_exp(s, |x| -C2 * (x + 0.044715 * x * x * x), |_, e| 1.0 / (1.0 + e));
    y.iter_mut().zip(x.iter().zip(s.iter())).for_each(|(y, (x, s))| _ = y.write(x * s));
}

/// The exact GELU `x·Φ(x)`, `Φ(x) = (1 + erf(x/√2))/2`, of `x` into `y`, also writing the
/// gate `s = Φ(x)` for the backward pass. All slices have the same length; `y` and `s` need
/// not be initialised.
pub fn gelu_erf_with_gate(x: &[f32], y: &mut [MaybeUninit<f32>], s: &mut [MaybeUninit<f32>]) {
    assert!(y.len() == x.len() && s.len() == x.len(), "gelu: lengths differ");
    let s = write_copy(s, x);
    normal_cdf_map(s, false);
    y.iter_mut().zip(x.iter().zip(s.iter())).for_each(|(y, (x, s))| _ = y.write(x * s));
}

/// Copies `src` into the (possibly uninitialised) `dst` of the same length and returns it as
/// initialised.
fn write_copy<'a>(dst: &'a mut [MaybeUninit<f32>], src: &[f32]) -> &'a mut [f32] {
    assert_eq!(dst.len(), src.len(), "write_copy: lengths differ");
    dst.iter_mut().zip(src).for_each(|(d, &v)| _ = d.write(v));
    // SAFETY: every element of `dst` was written just above; `MaybeUninit<f32>` has the
    // layout of `f32`.
    unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The exact GELU in place.
pub fn gelu_erf_inplace(xs: &mut [f32]) {
    normal_cdf_map(xs, true);
}

/// The exact GELU's derivative `d/dx [x·Φ(x)] = Φ(x) + x·φ(x)`, `φ(x) = exp(−x²/2)/√(2π)`,
/// into `g`, given the gate `s = Φ(x)`. All slices have the same length.
pub fn gelu_erf_derivative(x: &[f32], s: &[f32], g: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    g.copy_from_slice(x);
    map_with_exp(g, |x| -0.5 * x * x, |x, e| x * INV_SQRT_2PI * e);
    g.iter_mut().zip(s).for_each(|(g, s)| *g += s);
}

/// `gelu_new`'s derivative into `g`, given the gate `s = σ(2u)`, `u = √(2/π)(x + 0.044715x³)`:
/// `d/dx [x·σ(2u)] = σ + x·σ(1−σ)·2u'`, `u' = √(2/π)(1 + 3·0.044715·x²)`. All slices have the
/// same length.
pub fn gelu_tanh_derivative(x: &[f32], s: &[f32], g: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for ((g, &x), &s) in g.iter_mut().zip(x).zip(s) {
        let du = C * (1.0 + 3.0 * 0.044715 * x * x);
        *g = s + x * s * (1.0 - s) * 2.0 * du;
    }
}

/// Φ's polynomials (ascending powers), fitted by `scripts/kernels/fit_normal_cdf.py`. With
/// `z = min(|x|/√2, 10)` and `t = 1/(1 + z/2)`: `erfc(z) = t·exp(P(2.4t − 1.4) − z²)`
/// (`CDF_FAR`, from `z = 0.9` on; `2.4t − 1.4` spans the fitted [−1, 1] for `z` in [0, 10], and
/// erfc(10) is below f32's range), and `erf(z) = z·Q(z²)` below 0.9 (`CDF_NEAR`). Φ is then
/// `(1 ± erf)/2` or `erfc/2`, `1 − erfc/2` by the sign of `x`: within 1e-7 of Φ everywhere
/// (f32 `erff` rounds to 4e-8), tested in `normal_cdf_and_exact_gelu_match_erf`.
pub(super) const CDF_FAR: [f32; 10] = [
    -0.558_595_4,
    0.570_307_1,
    0.015_747_307,
    -0.029_470_338,
    -0.001_063_407_9,
    0.003_707_476_7,
    -0.000_225_964_16,
    -0.000_534_320_6,
    7.272_879e-5,
    5.486_024_7e-5,
];
/// `CDF_NEAR[0]` is erf'(0) = 2/√π.
pub(super) const CDF_NEAR: [f32; 7] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    -0.376_126_35,
    0.112_837_19,
    -0.026_860_708,
    0.005_204_331_6,
    -0.000_818_078_1,
    8.534_120_6e-5,
];
pub(super) const CDF_Z_NEAR: f32 = 0.9;
pub(super) const CDF_Z_MAX: f32 = 10.0;

/// `x ← Φ(x)`, or `x ← x·Φ(x)` with `gelu`; vectorised when AVX2+FMA is available.
fn normal_cdf_map(xs: &mut [f32], gelu: bool) {
    #[cfg(target_arch = "x86_64")]
    if super::has_fma() {
        // SAFETY: AVX2 and FMA are available (checked above).
        unsafe { super::x86::normal_cdf(xs, gelu) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = if gelu { *x * normal_cdf(*x) } else { normal_cdf(*x) });
}

/// The standard normal CDF `Φ(x) = (1 + erf(x/√2))/2` (see [`CDF_FAR`] for the method).
pub(super) fn normal_cdf(x: f32) -> f32 {
    // `mul_add` rounds once, as the 8-lane kernel's FMAs do
    let horner = |c: &[f32], v: f32| c[..c.len() - 1].iter().rev().fold(c[c.len() - 1], |a, &c| a.mul_add(v, c));
    let z = (x.abs() * std::f32::consts::FRAC_1_SQRT_2).min(CDF_Z_MAX);
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    let half_erfc = 0.5 * (t * exp_fast(horner(&CDF_FAR, 2.4f32.mul_add(t, -1.4)) - z * z));
    let half_erf = 0.5 * (z * horner(&CDF_NEAR, z * z));
    match (z < CDF_Z_NEAR, x < 0.0) {
        (true, true) => 0.5 - half_erf,
        (true, false) => 0.5 + half_erf,
        (false, true) => half_erfc,
        (false, false) => 1.0 - half_erfc,
    }
}

/// SiLU `x · σ(x)` in place.
pub fn silu_inplace(xs: &mut [f32]) {
    map_with_exp(xs, |x| -x, |x, e| x / (1.0 + e));
}

/// `x ← e^x` in place.
pub fn exp_inplace(xs: &mut [f32]) {
    map_with_exp(xs, |x| x, |_, e| e);
}

/// `x ← post(x, exp(pre(x)))`, vectorised when AVX2+FMA is available.
#[inline]
fn map_with_exp(xs: &mut [f32], pre: impl Fn(f32) -> f32 + Copy, post: impl Fn(f32, f32) -> f32 + Copy) {
    #[cfg(target_arch = "x86_64")]
    if super::has_fma() {
        // SAFETY: AVX2 and FMA are available (checked above).
        unsafe { super::x86::map_with_exp(xs, pre, post) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = post(*x, exp_fast(pre(*x))));
}

/// Scalar `gelu_new` (reference for tests).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_gelu_silu_match_libm() {
        let xs: Vec<f32> = (-2000..=2000)
            .map(|i| i as f32 * 0.01)
            .chain([-100.0, -88.0, -87.0, 0.0, 80.0, 88.0, 89.0, 100.0])
            .collect();
        for &x in &xs {
            let (got, want) = (exp_fast(x), x.exp());
            assert!(got == want || (got - want).abs() <= 4e-7 * want + 1e-37, "exp({x}) = {got}, libm {want}");
        }
        let mut e = xs.clone();
        e.push(f32::NEG_INFINITY);
        exp_inplace(&mut e);
        assert_eq!(e.pop(), Some(0.0), "exp(-inf) is exactly 0");
        for (&x, &got) in xs.iter().zip(&e) {
            let want = x.exp();
            assert!(got == want || (got - want).abs() <= 4e-7 * want + 1e-37, "exp8({x}) = {got}, libm {want}");
        }
        let mut g = xs.clone();
        gelu_tanh_inplace(&mut g);
        for (&x, &got) in xs.iter().zip(&g) {
            let want = gelu_tanh(x);
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "gelu({x}) = {got} vs {want}");
        }
        let mut si = xs.clone();
        silu_inplace(&mut si);
        for (&x, &got) in xs.iter().zip(&si) {
            let want = x / (1.0 + (-x).exp());
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "silu({x}) = {got} vs {want}");
        }
    }

    /// Φ(x) in f64 (erfc keeps the lower tail's relative accuracy).
    fn phi64(x: f32) -> f64 {
        0.5 * libm::erfc(-f64::from(x) / std::f64::consts::SQRT_2)
    }

    /// Within 1e-7 of Φ everywhere (f32 `erff`: 4e-8) and within 3e-5 of it relative to it in
    /// the lower tail (the rounding of x/√2 alone costs 2e-5 at x = −13), down to where Φ
    /// leaves the normal f32 range; the 8-lane kernel, its scalar remainder and the scalar
    /// fallback alike.
    fn assert_phi(x: f32, got: f32, what: &str) {
        let (got, want) = (f64::from(got), phi64(x));
        let tail = x >= 0.0 || (got - want).abs() <= 3e-5 * want + 1e-37;
        assert!((got - want).abs() <= 1e-7 && tail, "{what}({x}) = {got}, Φ = {want}");
    }

    #[test]
    fn normal_cdf_and_exact_gelu_match_erf() {
        // a dense grid over the whole range (both forms, the switch at |x| = 0.9·√2, the
        // clamp at |x| = 10·√2), then the far ends; 200,009 values, so the last lanes take
        // the scalar remainder
        let xs: Vec<f32> = (-150_000..=50_000)
            .map(|i| i as f32 * 1e-4)
            .chain([-1.272_792_2, 1.272_792_2, -14.142_136, -40.0, -1e30, 1e30, 40.0, f32::MAX])
            .collect();
        let (mut y, mut s) = (vec![MaybeUninit::uninit(); xs.len()], vec![MaybeUninit::uninit(); xs.len()]);
        gelu_erf_with_gate(&xs, &mut y, &mut s);
        // SAFETY: gelu_erf_with_gate writes every element.
        let (y, s): (Vec<f32>, Vec<f32>) =
            unsafe { (y.iter().map(|v| v.assume_init()).collect(), s.iter().map(|v| v.assume_init()).collect()) };
        let mut inplace = xs.clone();
        gelu_erf_inplace(&mut inplace);
        for (i, &x) in xs.iter().enumerate() {
            assert_phi(x, s[i], "Φ");
            assert_phi(x, normal_cdf(x), "scalar Φ");
            assert_eq!(y[i].to_bits(), (x * s[i]).to_bits(), "y = x·Φ at {x}");
            assert_eq!(inplace[i].to_bits(), y[i].to_bits(), "in place at {x}");
        }
        assert_eq!(normal_cdf(f32::INFINITY), 1.0);
        assert_eq!(normal_cdf(f32::NEG_INFINITY), 0.0);
        assert_eq!(normal_cdf(0.0), 0.5);
    }

    #[test]
    fn gelu_derivatives_match_closed_forms() {
        let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect();
        let n = xs.len();
        let (mut y, mut s) = (vec![MaybeUninit::uninit(); n], vec![MaybeUninit::uninit(); n]);
        let mut g = vec![0.0; n];
        for (erf, gate, derivative) in [
            (
                true,
                gelu_erf_with_gate as fn(&[f32], &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
                gelu_erf_derivative as fn(&[f32], &[f32], &mut [f32]),
            ),
            (false, gelu_tanh_with_gate, gelu_tanh_derivative),
        ] {
            gate(&xs, &mut y, &mut s);
            // SAFETY: the gate kernels write every element.
            let s: Vec<f32> = s.iter().map(|v| unsafe { v.assume_init() }).collect();
            derivative(&xs, &s, &mut g);
            for (&x, &got) in xs.iter().zip(&g) {
                let x64 = f64::from(x);
                let want = if erf {
                    phi64(x) + x64 * (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt()
                } else {
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    let th = (c * (x64 + 0.044715 * x64.powi(3))).tanh();
                    0.5 * (1.0 + th) + 0.5 * x64 * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x64 * x64)
                };
                // the tanh form's σ(1 − σ) cancels where σ → 1 (the same formula as before)
                let tol = if erf { 5e-7 } else { 3e-6 };
                assert!((f64::from(got) - want).abs() <= tol, "erf {erf}: gelu'({x}) = {got}, closed form {want}");
            }
        }
    }
}
