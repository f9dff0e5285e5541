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
pub(crate) fn has_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// Whether the CPU runs AVX-512F (and AVX2 + FMA: every AVX-512 core does), unless the
/// environment variable `RLHF_NO_AVX512` is set to anything but `0` (to compare the AVX2
/// kernels on the same machine; the results are the same bits either way).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let off = std::env::var_os("RLHF_NO_AVX512").is_some_and(|v| !v.is_empty() && v != "0");
        !off && has_fma() && is_x86_feature_detected!("avx512f")
    })
}

/// The operands of one panel product `y[.., j0..j0+16] (+)= x · panel` ([`panel`]): `x`
/// `(m, k)` row-major, the panel `wp` `(k, 16)`, `y` `m` rows of stride `n`.
struct PanelProduct<W> {
    x: *const f32,
    wp: *const W,
    y: *mut f32,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    accumulate: bool,
}

/// One K-chunk `k0..k1` of a [`PanelProduct`]; `accumulate`: add onto `y` (every chunk after
/// the first, and the first when the product accumulates).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct KChunk {
    k0: usize,
    k1: usize,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl<W> PanelProduct<W> {
    /// The product's K-chunks in order, 256 deep: a `256 × 16` chunk of the panel (16 KiB of
    /// f32) stays in L1 while every row block uses it.
    #[inline(always)]
    fn chunks(&self) -> impl Iterator<Item = KChunk> + '_ {
        const KC: usize = 256;
        (0..self.k).step_by(KC).map(|k0| KChunk {
            k0,
            k1: (k0 + KC).min(self.k),
            accumulate: self.accumulate || k0 > 0,
        })
    }
}

/// `step(kk)` for every depth `kk` of the chunk in order, unrolled four times (as the
/// training gemm's kernel, `crate::sgemm`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn depths4(c: KChunk, mut step: impl FnMut(usize)) {
    let mut kk = c.k0;
    while kk + 4 <= c.k1 {
        for u in 0..4 {
            step(kk + u);
        }
        kk += 4;
    }
    for kk in kk..c.k1 {
        step(kk);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod x86;

mod activation;
pub use activation::{
    exp_fast, exp_inplace, gelu_erf_derivative, gelu_erf_inplace, gelu_erf_with_gate, gelu_tanh, gelu_tanh_derivative,
    gelu_tanh_inplace, gelu_tanh_with_gate, silu_inplace,
};

/// Columns per packed panel (two AVX2 registers, one AVX-512 register).
pub const PANEL: usize = 16;

/// Weight elements above which even a one-row matmul uses all threads: streaming the weight
/// is bound by memory bandwidth, and two cores draw more of it than one.
const STREAM_PAR_MIN: usize = 1 << 17;

/// A `(k, n)` weight matrix stored as column panels: panel `p` holds columns
/// `16p .. 16p+16` as a contiguous `(k, 16)` block (the last panel zero-padded). Packed once
/// when the inference snapshot is taken, so every matmul streams its weight sequentially —
/// the packing `gemm` would otherwise redo on every decoding step.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    /// Rows (input features).
    pub k: usize,
    /// Columns (output features).
    pub n: usize,
    data: Panels,
}

/// Storage precision of packed weights. Arithmetic is always f32; `F16` halves the bytes a
/// memory-bound decoding step streams, at about 3 significant digits per weight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// Exact weights (default).
    #[default]
    F32,
    /// IEEE half precision, converted to f32 in registers (F16C).
    F16,
}

#[derive(Debug, Clone)]
enum Panels {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl PackedMatrix {
    /// Packs a row-major `(k, n)` matrix in f32.
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        Self::with_dtype(w, k, n, WeightDtype::F32)
    }

    /// Packs a row-major `(k, n)` matrix, stored as `dtype`.
    pub fn with_dtype(w: &[f32], k: usize, n: usize, dtype: WeightDtype) -> Self {
        assert_eq!(w.len(), k * n, "PackedMatrix shape");
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0.0f32; panels * k * PANEL];
        for p in 0..panels {
            let width = PANEL.min(n - p * PANEL);
            for kk in 0..k {
                let dst = (p * k + kk) * PANEL;
                data[dst..dst + width].copy_from_slice(&w[kk * n + p * PANEL..kk * n + p * PANEL + width]);
            }
        }
        let data = match dtype {
            WeightDtype::F32 => Panels::F32(data),
            WeightDtype::F16 => Panels::F16(data.iter().map(|&v| crate::half::f32_to_f16(v)).collect()),
        };
        PackedMatrix { k, n, data }
    }

    /// The row-major `(k, n)` matrix back (as stored: f16 weights come back rounded).
    pub fn unpack(&self) -> Vec<f32> {
        let data: Vec<f32> = match &self.data {
            Panels::F32(d) => d.clone(),
            Panels::F16(d) => d.iter().map(|&h| crate::half::f16_to_f32(h)).collect(),
        };
        let mut w = vec![0.0f32; self.k * self.n];
        for p in 0..self.n.div_ceil(PANEL) {
            let width = PANEL.min(self.n - p * PANEL);
            for kk in 0..self.k {
                let src = (p * self.k + kk) * PANEL;
                w[kk * self.n + p * PANEL..kk * self.n + p * PANEL + width].copy_from_slice(&data[src..src + width]);
            }
        }
        w
    }
}

/// A weight element the kernels can load: f32, or f16 bits.
pub trait PanelElem: Copy + Send + Sync + 'static {
    /// As f32.
    fn to_f32(self) -> f32;
    /// Eight consecutive elements as f32 lanes.
    ///
    /// # Safety
    /// `p` is valid for 8 reads; the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive elements as f32 lanes.
    ///
    /// # Safety
    /// `p` is valid for 16 reads; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl PanelElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl PanelElem for u16 {
    fn to_f32(self) -> f32 {
        crate::half::f16_to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// A raw pointer that may cross threads; each thread writes a disjoint part of one output
/// (the column panels of [`matmul`], the bands of the training gemm).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to write disjoint parts of one output from several threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method call makes closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y = x·W (+ y if accumulate)` for `x: (m, k)` and `y: (m, n)` row-major, `W` packed.
///
/// Register-blocked: a 6×16 block of `y` (12×16 on AVX-512 cores, see `kernels/avx512.rs`;
/// same bits) stays in registers while a K-chunk of one panel (256×16 floats, 16 KiB, in L1)
/// is applied to it; row groups reuse the chunk from L1.
/// Panels are split over the rayon threads when the work is large.
pub fn matmul(x: &[f32], w: &PackedMatrix, y: &mut [f32], m: usize, accumulate: bool) {
    let (k, n) = (w.k, w.n);
    assert!(x.len() == m * k && y.len() == m * n, "matmul shapes");
    let panels = n.div_ceil(PANEL);
    let big = m * n * k >= PAR_MIN_WORK / 4 || k * n >= STREAM_PAR_MIN;
    let parts = if big { rayon::current_num_threads().min(panels) } else { 1 };
    let yp = SendPtr(y.as_mut_ptr());
    let run = |part: usize| {
        let per = panels.div_ceil(parts);
        for p in (part * per).min(panels)..((part + 1) * per).min(panels) {
            // SAFETY: panel p writes columns 16p..min(16p+16, n) of the m rows of y, which no
            // other part touches; x and the panel have the asserted shapes.
            let span = p * k * PANEL..(p + 1) * k * PANEL;
            unsafe {
                let (x, y, j0) = (x.as_ptr(), yp.get(), p * PANEL);
                match &w.data {
                    Panels::F32(d) => panel(&PanelProduct { x, wp: d[span].as_ptr(), y, m, k, n, j0, accumulate }),
                    Panels::F16(d) => panel(&PanelProduct { x, wp: d[span].as_ptr(), y, m, k, n, j0, accumulate }),
                }
            };
        }
    };
    if parts > 1 {
        (0..parts).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// `y[.., j0..j0+16] (+)= x · panel` for all `m` rows (columns past `n` are not written).
///
/// # Safety
/// `p.x: (m,k)` row-major, `p.wp: (k,16)`, `p.y` valid for writes of `m` rows of stride `n`.
unsafe fn panel<W: PanelElem>(p: &PanelProduct<W>) {
    let &PanelProduct { x, wp, y, m, k, n, j0, accumulate } = p;
    let width = PANEL.min(n - j0);
    #[cfg(target_arch = "x86_64")]
    if has_fma() && width == PANEL {
        // SAFETY: the CPU features are checked; the caller's contract is the product's.
        return if has_avx512() { avx512::panel(p) } else { x86::panel(p) };
    }
    let (x, wp) = (std::slice::from_raw_parts(x, m * k), std::slice::from_raw_parts(wp, k * PANEL));
    for r in 0..m {
        let mut acc = [0.0f32; PANEL];
        if accumulate {
            for (c, a) in acc.iter_mut().enumerate().take(width) {
                *a = *y.add(r * n + j0 + c);
            }
        }
        for kk in 0..k {
            let xv = x[r * k + kk];
            for (a, wv) in acc.iter_mut().zip(&wp[kk * PANEL..(kk + 1) * PANEL]) {
                *a += xv * wv.to_f32();
            }
        }
        for (c, a) in acc.iter().enumerate().take(width) {
            *y.add(r * n + j0 + c) = *a;
        }
    }
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
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn packed_matmul_matches_naive() {
        for &(m, k, n) in &[
            (1, 37, 19),
            (3, 64, 130),
            (9, 33, 70),
            (40, 65, 129),
            (7, 600, 4096),
            (70, 40, 96),
            (5, 1000, 33),
            (1, 512, 1024),
            (13, 300, 48),
        ] {
            let (x, w) = (data(m * k, 1), data(k * n, 2));
            let packed = PackedMatrix::new(&w, k, n);
            assert_eq!(packed.unpack(), w);
            let want = naive(&x, &w, m, k, n);
            let mut y = vec![0.0; m * n];
            matmul(&x, &packed, &mut y, m, false);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
            }
            // accumulate adds onto y
            let mut y2 = vec![1.0; m * n];
            matmul(&x, &packed, &mut y2, m, true);
            for (a, b) in y2.iter().zip(&want) {
                assert!((a - (b + 1.0)).abs() < 1e-3 * (1.0 + b.abs()));
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_panel_kernel_gives_the_avx2_kernels_bits() {
        if !has_avx512() {
            return;
        }
        // row counts around the blocks (12 and 6), depths around the chunk (256) and the
        // unrolling (4); f32 and f16 panels; written into a wider y (stride 21)
        let n = 21;
        for (m, k) in [(1, 1), (5, 7), (12, 256), (13, 300), (25, 600), (32, 37)] {
            let x = data(m * k, 3);
            let w32 = data(k * PANEL, 4);
            let w16: Vec<u16> = w32.iter().map(|&v| crate::half::f32_to_f16(v)).collect();
            for accumulate in [false, true] {
                let run = |avx512: bool, f16: bool| {
                    let mut y = data(m * n, 5);
                    // SAFETY: AVX-512F (checked above); x is (m, k), the panels (k, 16), y
                    // has m rows of stride n ≥ 16.
                    unsafe {
                        let (x, y) = (x.as_ptr(), y.as_mut_ptr());
                        let p32 = PanelProduct { x, wp: w32.as_ptr(), y, m, k, n, j0: 0, accumulate };
                        let p16 = PanelProduct { x, wp: w16.as_ptr(), y, m, k, n, j0: 0, accumulate };
                        match (avx512, f16) {
                            (false, false) => x86::panel(&p32),
                            (false, true) => x86::panel(&p16),
                            (true, false) => avx512::panel(&p32),
                            (true, true) => avx512::panel(&p16),
                        }
                    }
                    y.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                };
                for f16 in [false, true] {
                    assert!(run(false, f16) == run(true, f16), "{m}x{k} f16 {f16} accumulate {accumulate}");
                }
            }
        }
    }

    #[test]
    fn f16_panels_match_rounded_weights() {
        for &(m, k, n) in &[(1, 100, 48), (7, 300, 70), (20, 64, 4096)] {
            let (x, w) = (data(m * k, 7), data(k * n, 8));
            let packed = PackedMatrix::with_dtype(&w, k, n, WeightDtype::F16);
            let rounded = packed.unpack();
            assert!(rounded.iter().zip(&w).all(|(a, b)| (a - b).abs() <= 1e-3 * b.abs().max(1e-2)));
            let want = naive(&x, &rounded, m, k, n);
            let mut y = vec![0.0; m * n];
            matmul(&x, &packed, &mut y, m, false);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
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
