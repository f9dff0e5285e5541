//! Strided matrix views and one gemm call over them, shared by the fused training ops
//! ([`crate::attention`], [`crate::linear`]). On AVX2 + FMA cores the product is
//! [`crate::sgemm`]'s packed kernel; elsewhere the `gemm` crate (a newer release than the one
//! dfdx 0.13 links, 0.18 against 0.15: its f32 kernels measured 15–25% faster than 0.15's).

use dfdx::prelude::*;
use gemm::Parallelism;

use crate::kernels::SendPtr;

/// A strided matrix view: offset, row stride, column stride.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [f32], off: usize, rs: usize, cs: usize) -> Self {
        View { data, off, rs, cs }
    }

    /// A row-major matrix with `cols` columns starting at element 0.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        View { data, off: 0, rs: cols, cs: 1 }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        View { rs: self.cs, cs: self.rs, ..self }
    }

    /// Index of the last element of an `r × c` matrix read through this view.
    fn last(&self, r: usize, c: usize) -> usize {
        self.off + (r - 1) * self.rs + (c - 1) * self.cs
    }
}

/// Work (multiply-adds) below which a gemm runs on the calling thread: the `gemm` crate's
/// own default threading threshold (48·48·256).
const PAR_MIN_MACS: usize = 48 * 48 * 256;

/// `dst (m×n, row-major) = [dst +] alpha · a (m×k) · b (k×n)`, on `threads` rayon threads
/// (1: the calling thread only).
///
/// With several threads the output is cut into `threads` bands along its longer side, each
/// computed by a single-threaded gemm on its own rayon task. The `gemm` crate's own rayon
/// mode synchronises its threads inside every packed block; measured on this machine's two
/// cores at the training step's shapes (768 × 256…1024 × 256…1024), the bands ran 2–20%
/// faster (1.8–2.0× one thread, against 1.4–1.9×), and a PPO iteration's update 5% faster.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    assert!(dst.len() >= m * n, "gemm: destination smaller than {m}×{n}");
    if k == 0 && !accumulate {
        dst[..m * n].fill(0.0);
    }
    // SAFETY: `dst` holds at least m·n elements (asserted above).
    unsafe { gemm_bands(dst.as_mut_ptr(), (m, n, k), a, b, alpha, accumulate, threads) }
}

/// `alpha · a (m×k) · b (k×n)` in a new row-major buffer, written once by the gemm — no zero
/// fill first (zero-filling buffers that were overwritten right after held 2.45% of the main
/// thread's samples in a GRPO iteration). Threads as in [`gemm_into`].
pub(crate) fn gemm_new(
    (m, n, k): (usize, usize, usize),
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
    threads: usize,
) -> Vec<f32> {
    if k == 0 {
        return zeros(m * n);
    }
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: the buffer has room for m·n elements. With `accumulate = false` both kernels
    // (`sgemm`, and the gemm crate, which treats the destination's coefficient as 0) store
    // every element of the m×n output without loading it (k > 0 here), so all m·n elements
    // are initialised when it returns.
    unsafe {
        gemm_bands(dst.as_mut_ptr(), (m, n, k), a, b, alpha, false, threads);
        dst.set_len(m * n);
    }
    dst
}

/// The banded gemm behind [`gemm_into`] and [`gemm_new`].
///
/// # Safety
/// `dst` is valid for writes of `m·n` elements (and reads, when `accumulate`).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bands(
    dst: *mut f32,
    (m, n, k): (usize, usize, usize),
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a.last(m, k) < a.data.len() && b.last(k, n) < b.data.len(), "gemm: view out of bounds");
    let parts = if m * n * k < PAR_MIN_MACS { 1 } else { threads.max(1) };
    // Bands of whole 16-row (or 16-column) strips, the kernels' register tile.
    let along_m = m >= n;
    let strips = (if along_m { m } else { n }).div_ceil(16);
    let per = strips.div_ceil(parts) * 16;
    let bands = (if along_m { m } else { n }).div_ceil(per);
    let dp = SendPtr(dst);
    let band = |i: usize| {
        let lo = i * per;
        let hi = (lo + per).min(if along_m { m } else { n });
        // SAFETY: the assert above bounds every element both views are read at, and the
        // caller's contract the m×n destination; band i writes rows (or columns) lo..hi of
        // it, which no other band touches; the slices outlive the call.
        unsafe {
            if along_m {
                let a = View { off: a.off + lo * a.rs, ..a };
                gemm_raw(dp.get().add(lo * n), n, (hi - lo, n, k), a, b, alpha, accumulate);
            } else {
                let b = View { off: b.off + lo * b.cs, ..b };
                gemm_raw(dp.get().add(lo), n, (m, hi - lo, k), a, b, alpha, accumulate);
            }
        }
    };
    if bands > 1 {
        use rayon::prelude::*;
        (0..bands).into_par_iter().for_each(band);
    } else {
        band(0);
    }
}

/// One single-threaded gemm into `dst` with row stride `dst_rs`: [`crate::sgemm`] on AVX2 +
/// FMA cores, the `gemm` crate elsewhere.
///
/// # Safety
/// `dst` is valid for writes at `i·dst_rs + j` for `i < m`, `j < n`; both views are in
/// bounds for `m × k` and `k × n`.
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = crate::sgemm::Isa::best() {
        use crate::sgemm::{gemm, Operand};
        let op = |v: View<'_>| Operand { ptr: v.data.as_ptr().add(v.off), rs: v.rs as isize, cs: v.cs as isize };
        // SAFETY: `best` checked the CPU for `isa`; the caller's bounds are the kernel's.
        return gemm(isa, dst, dst_rs, (m, n, k), op(a), op(b), alpha, accumulate);
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr().add(a.off),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr().add(b.off),
        b.cs as isize,
        b.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Whether `t` is stored row-major (its gradient buffer then has the layout we write).
/// dfdx keeps strides and ids private; `contiguous()` returns the same tensor (same id)
/// exactly when the strides are row-major, and a gradient map tells two ids apart.
pub(crate) fn row_major<S: Shape>(t: &Tensor<S, f32, Cpu>) -> bool {
    let c = t.clone().contiguous();
    let mut g = Gradients::<f32, Cpu>::leaky();
    let Ok(buf) = g.get_or_alloc_mut(&t.ghost()) else { return false };
    let Some(first) = buf.first_mut() else { return true };
    *first = 1.0;
    g.get_or_alloc_mut(&c.ghost()).is_ok_and(|b| b.first() == Some(&1.0))
}

/// A row-major tensor's data in one copy (dfdx's `as_vec` walks a strided index per
/// element). For tensors made row-major by `contiguous()` or checked by [`row_major`].
pub(crate) fn host_vec<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>) -> Vec<f32> {
    let mut v = zeros(t.shape().num_elements());
    t.copy_into(&mut v);
    v
}

/// Buffers at least this long are filled or copied by the helpers below in parallel.
const PAR_MIN: usize = 1 << 15;

/// `len` zeros. Large buffers are filled in parallel: glibc's `calloc` zero-fills memory it
/// reuses on the calling thread alone, while the other core waits (measured: 3 MB in 190 µs
/// against 260–380 µs).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if len < PAR_MIN {
        return vec![0.0f32; len];
    }
    rayon::iter::repeat_n(0.0f32, len).with_min_len(PAR_MIN / 2).collect()
}

/// A copy of `src`, made in parallel when large (3 MB: 240 µs against 345 µs serially).
pub(crate) fn par_copy(src: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    if src.len() < PAR_MIN {
        return src.to_vec();
    }
    src.par_iter().with_min_len(PAR_MIN / 2).copied().collect()
}

/// `dst += src` element by element, in parallel chunks.
pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "add_into: lengths differ");
    dst.par_chunks_mut(1 << 13).zip(src.par_chunks(1 << 13)).for_each(|(a, s)| {
        a.iter_mut().zip(s).for_each(|(a, s)| *a += s);
    });
}

/// Rows `rows` of the row-major `src` (rows of width `c`), in that order.
pub(crate) fn gather_rows(src: &[f32], rows: &[usize], c: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        out.extend_from_slice(&src[r * c..(r + 1) * c]);
    }
    out
}

/// `dst[rows[i]] += src[i]` for rows of width `c` (the backward pass of [`gather_rows`]).
pub(crate) fn add_rows(dst: &mut [f32], src: &[f32], rows: &[usize], c: usize) {
    for (s, &r) in src.chunks(c).zip(rows) {
        dst[r * c..(r + 1) * c].iter_mut().zip(s).for_each(|(a, s)| *a += s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: View<'_>, b: View<'_>) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a.data[a.off + i * a.rs + p * a.cs] * b.data[b.off + p * b.rs + j * b.cs];
                }
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_for_transposed_views_and_accumulation() {
        // The small shape runs on one thread; the larger two are cut into bands along m and
        // along n (uneven bands for 3 threads), with the views starting at an offset.
        for (m, n, k) in [(37, 29, 53), (150, 70, 64), (70, 150, 64)] {
            let a: Vec<f32> = (0..m * k + 3).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..k * n + 5).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = if ta { View::new(&a, 3, 1, m) } else { View::new(&a, 3, k, 1) };
                let bv = if tb { View::new(&b, 5, 1, k) } else { View::new(&b, 5, n, 1) };
                let want = naive(m, n, k, av, bv);
                for threads in [1, 2, 3] {
                    let mut c = vec![1.0f32; m * n];
                    gemm_into(&mut c, (m, n, k), av, bv, 0.5, true, threads);
                    for (got, w) in c.iter().zip(&want) {
                        assert!(
                            (got - (1.0 + 0.5 * w)).abs() < 1e-5 * (1.0 + w.abs()) * k as f32,
                            "{m}x{n}x{k} {ta} {tb} {threads}: {got} vs {w}"
                        );
                    }
                    gemm_into(&mut c, (m, n, k), av, bv, 1.0, false, threads);
                    for (got, w) in c.iter().zip(&want) {
                        assert!((got - w).abs() < 1e-5 * (1.0 + w.abs()) * k as f32);
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_new_writes_every_element_of_a_fresh_buffer() {
        for (m, n, k) in [(37, 29, 53), (150, 70, 64), (70, 150, 64), (5, 4, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let (av, bv) = (View::rows(&a, k), View::rows(&b, n));
            let want = naive(m, n, k, av, bv);
            for threads in [1, 2] {
                let got = gemm_new((m, n, k), av, bv, 2.0, threads);
                assert_eq!(got.len(), m * n);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - 2.0 * w).abs() < 1e-5 * (1.0 + w.abs()) * k.max(1) as f32, "{m}x{n}x{k}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn row_major_tells_views_from_stored_tensors() {
        let dev = Cpu::default();
        let m: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec((0..6).map(|i| i as f32).collect(), (2, 3));
        assert!(row_major(&m));
        let t = m.clone().permute::<_, Axes2<1, 0>>();
        assert!(!row_major(&t));
        assert_eq!(host_vec(&t.clone().contiguous()), t.as_vec());
        let v: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(vec![1.0, 2.0], (2,));
        assert!(!row_major(&v.broadcast_like::<_, Axis<0>>(&(3, 2))));
        assert_eq!(host_vec(&m), m.as_vec());
    }
}
