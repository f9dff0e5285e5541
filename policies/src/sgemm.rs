//! The training path's f32 matrix product on AVX2 + FMA and AVX-512 cores: a packed gemm in
//! the Goto–van de Geijn layout ("Anatomy of high-performance matrix multiplication", 2008).
//!
//! `C (m×n) = [C +] α·A·B` is computed block by block: a `KC × NC` block of B is packed into
//! `NR`-column panels (`KC × NR`: 16 KiB for 16 columns, 32 KiB for 32; one panel stays in L1
//! while it is used), an `MC × KC` block of A into `MR`-row panels (96 KiB: the block stays in
//! L2), and an `MR × NR` tile of C is accumulated in registers over the whole `KC` depth
//! before it touches memory: 6 × 16 in twelve AVX registers, or, where the CPU has AVX-512F,
//! 12 × 32 in twenty-four of its 32 registers ([`Isa`], chosen at run time). Packing reads A
//! and B through any strides — row-major, transposed (the backward pass's `Xᵀ·dY` and
//! `dY·Wᵀ`) or a column slice of a wider matrix (the attention heads' views into the fused QKV
//! buffer) — with 8 × 8 register transposes or masked loads where the stored layout is the
//! transpose of the packed one.
//!
//! One call runs on the calling thread; [`crate::strided`] cuts the output into bands and runs
//! one call per band. Every output element is summed in the same order (its k index in
//! blocks of `KC`, each block from zero by fused multiply-adds and added to the running
//! value), whatever the band cut and whichever kernel, so results depend neither on the thread
//! count nor on the instruction set.
//!
//! Why not the `gemm` crate (which this replaced on AVX2 cores, and which remains the
//! fallback): at the workload's 15 training-step shapes (768 rows × 256…4096, forward, input
//! and weight gradients, cut in two bands as [`crate::strided`] does; `cargo bench --bench
//! gemm`) the AVX2 kernel measured 1.23× its f32 throughput on an AVX2-only host (geometric
//! mean; up to ~150 GFLOP/s on two cores whose FMA peak is ~170), from the packing of
//! transposed operands and a depth loop unrolled four times (1.12× over no unrolling; two:
//! 0.98×, eight: 0.92×, both against four). On a host with full-width AVX-512 (Zen 5) the
//! 12 × 32 kernel made the whole training step 1.6× faster than the 6 × 16 one
//! (`docs/BENCHMARKS.md`).

use std::arch::x86_64::*;
use std::cell::RefCell;

/// Depth of one packed block.
const KC: usize = 256;
/// Rows of A per packed block (a multiple of every kernel's `MR`).
const MC: usize = 96;
/// Columns of B per packed block.
const NC: usize = 1024;
/// Floats the 8-wide stores of an A panel may write past its end.
const SLACK: usize = 8;
/// The widest B panel of any kernel (columns).
const NR_MAX: usize = 32;

/// A read-only matrix operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Operand {
    /// The operand starting `i` rows and `j` columns further on.
    ///
    /// # Safety
    /// The result must point into the same allocation.
    unsafe fn shifted(self, i: usize, j: usize) -> Operand {
        Operand { ptr: self.at(i, j), ..self }
    }

    /// The address of element `(i, j)`.
    ///
    /// # Safety
    /// The element must lie in the operand's allocation.
    unsafe fn at(self, i: usize, j: usize) -> *const f32 {
        self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// 64-byte aligned storage for packed panels (a panel row of B is one cache line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Per-thread packing buffers, grown once to their fixed maximum sizes.
struct Packs {
    a: Vec<Line>,
    b: Vec<Line>,
}

thread_local! {
    static PACKS: RefCell<Packs> = const { RefCell::new(Packs { a: Vec::new(), b: Vec::new() }) };
}

/// The register-tile kernels, by instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 + FMA: a 6 × 16 tile in twelve 8-wide accumulators.
    Avx2,
    /// AVX-512F: a 12 × 32 tile in twenty-four 16-wide accumulators.
    Avx512,
}

impl Isa {
    /// The widest kernel this CPU runs (`None` without AVX2 + FMA).
    pub(crate) fn best() -> Option<Isa> {
        if crate::kernels::has_avx512() {
            Some(Isa::Avx512)
        } else if crate::kernels::has_fma() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] alpha · a (m×k) · b (k×n)`, on the calling thread,
/// with the kernel for `isa`. With `accumulate == false` the destination is never read (it may
/// be uninitialised).
///
/// # Safety
/// The CPU supports `isa` (AVX2 and FMA always); `k > 0`; `a` and `b` are valid for reads of
/// every `(i, p)` with `i < m, p < k` and `(p, j)` with `p < k, j < n`; `dst` is valid for
/// writes (and reads when `accumulate`) at `i·dst_rs + j` for `i < m, j < n`; `dst` overlaps
/// neither operand.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    isa: Isa,
    dst: *mut f32,
    dst_rs: usize,
    shape: (usize, usize, usize),
    a: Operand,
    b: Operand,
    alpha: f32,
    accumulate: bool,
) {
    let out = Out { dst, rs: dst_rs, alpha, accumulate };
    match isa {
        Isa::Avx2 => blocked::<6, 16>(out, shape, a, b, kernel_avx2),
        Isa::Avx512 => blocked::<12, 32>(out, shape, a, b, kernel_avx512),
    }
}

/// The destination of [`gemm`]: `dst` with row stride `rs`, scaled by `alpha`, added to when
/// `accumulate`.
#[derive(Clone, Copy)]
struct Out {
    dst: *mut f32,
    rs: usize,
    alpha: f32,
    accumulate: bool,
}

/// A register-tile kernel over `kc` depths of an `MR`-row A panel and an `NR`-column B panel.
type Kernel = unsafe fn(usize, *const f32, *const f32, Tile);

/// The blocking loops of [`gemm`] around the `MR × NR` kernel `kernel`.
///
/// # Safety
/// As [`gemm`]'s, for the instruction set `kernel` is compiled for.
unsafe fn blocked<const MR: usize, const NR: usize>(
    out: Out,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    kernel: Kernel,
) {
    const { assert!(MC.is_multiple_of(MR) && NR.is_multiple_of(8) && NR <= NR_MAX) };
    // an empty product is the caller's (`strided`): with k = 0 nothing here would write
    debug_assert!(k > 0, "sgemm: k = 0");
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let Packs { a: pa, b: pb } = &mut *packs;
        let need_a = (MC * KC + SLACK).div_ceil(16);
        let need_b = (NC.div_ceil(NR_MAX) * NR_MAX * KC).div_ceil(16);
        if pa.len() < need_a {
            pa.resize(need_a, Line([0.0; 16]));
        }
        if pb.len() < need_b {
            pb.resize(need_b, Line([0.0; 16]));
        }
        let (pa, pb) = (pa.as_mut_ptr() as *mut f32, pb.as_mut_ptr() as *mut f32);
        for j0 in (0..n).step_by(NC) {
            let nc = (n - j0).min(NC);
            for p0 in (0..k).step_by(KC) {
                let kc = (k - p0).min(KC);
                pack_b::<NR>(pb, b.shifted(p0, j0), kc, nc);
                // later depth blocks add to what the earlier ones stored
                let load_c = out.accumulate || p0 > 0;
                for i0 in (0..m).step_by(MC) {
                    let mc = (m - i0).min(MC);
                    pack_a::<MR>(pa, a.shifted(i0, p0), (mc, m - i0), kc);
                    for jq in 0..nc.div_ceil(NR) {
                        let cols = (nc - jq * NR).min(NR);
                        for iq in 0..mc.div_ceil(MR) {
                            let rows = (mc - iq * MR).min(MR);
                            let c = out.dst.add((i0 + iq * MR) * out.rs + j0 + jq * NR);
                            let tile = Tile { c, rs: out.rs, rows, cols, alpha: out.alpha, load_c };
                            kernel(kc, pa.add(iq * MR * kc), pb.add(jq * NR * kc), tile);
                        }
                    }
                }
            }
        }
    });
}

/// Packs the `mc × kc` block at `a` into `MR`-row panels: panel `q`, depth `p`, row `r` at
/// `q·MR·kc + MR·p + r`; rows past `mc` are zero. Rows up to `m_left` exist in `a` (reads past
/// `mc` but below `m_left` are in bounds).
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a<const MR: usize>(dst: *mut f32, a: Operand, (mc, m_left): (usize, usize), kc: usize) {
    if a.rs == 1 && a.cs != 1 {
        return pack_a_depth_major::<MR>(dst, a, (mc, m_left), kc);
    }
    for q in 0..mc.div_ceil(MR) {
        let d = dst.add(q * MR * kc);
        let rows = (mc - q * MR).min(MR);
        let panel = a.shifted(q * MR, 0);
        let mut p = 0;
        if a.cs == 1 {
            // rows stored contiguously: transpose 8-deep strips of each 8 rows of the panel
            while p + 8 <= kc {
                let mut groups = [[_mm256_setzero_ps(); 8]; 2];
                for (g, group) in groups.iter_mut().enumerate().take(MR.div_ceil(8)) {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, v) in r.iter_mut().enumerate().take(rows.saturating_sub(8 * g).min(8)) {
                        *v = _mm256_loadu_ps(panel.at(8 * g + i, p));
                    }
                    *group = transpose8(r);
                }
                // each store writes 8 lanes; past the panel's MR rows they spill into the
                // next depth, which the next store overwrites
                for j in 0..8 {
                    for (g, group) in groups.iter().enumerate().take(MR.div_ceil(8)) {
                        _mm256_storeu_ps(d.add((p + j) * MR + 8 * g), group[j]);
                    }
                }
                p += 8;
            }
        }
        for p in p..kc {
            for r in 0..MR {
                *d.add(p * MR + r) = if r < rows { *panel.at(r, p) } else { 0.0 };
            }
        }
    }
}

/// [`pack_a`] for an A whose columns are contiguous (a transposed view, as `Xᵀ` in a weight
/// gradient): walks the stored rows in order — one sequential read per depth — and copies
/// `MR` of them to each panel.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a_depth_major<const MR: usize>(dst: *mut f32, a: Operand, (mc, m_left): (usize, usize), kc: usize) {
    for p in 0..kc {
        let s = a.at(0, p);
        for q in 0..mc.div_ceil(MR) {
            let rows = (mc - q * MR).min(MR);
            for g in 0..MR.div_ceil(8) {
                let first = q * MR + 8 * g;
                // 8 lanes are read where 8 rows exist, else only the panel's
                let v = if first + 8 <= m_left {
                    _mm256_loadu_ps(s.add(first))
                } else {
                    _mm256_maskload_ps(s.add(first), lanes(rows.saturating_sub(8 * g).min(8)))
                };
                let d = dst.add(q * MR * kc + p * MR + 8 * g);
                // lanes past the panel's MR rows spill into the next depth, written next; the
                // last depth's would land in the next panel, so it stores only the panel's
                if 8 * g + 8 > MR && p + 1 == kc {
                    _mm256_maskstore_ps(d, lanes(MR - 8 * g), v);
                } else {
                    _mm256_storeu_ps(d, v);
                }
            }
        }
    }
}

/// Packs the `kc × nc` block at `b` into `NR`-column panels: panel `q`, depth `p`, column `c`
/// at `q·NR·kc + NR·p + c`; columns past `nc` are zero.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b<const NR: usize>(dst: *mut f32, b: Operand, kc: usize, nc: usize) {
    if b.cs == 1 {
        // rows stored contiguously: walk them in order, NR columns to each panel
        let full = nc / NR;
        let rest = nc - full * NR;
        for p in 0..kc {
            let s = b.at(p, 0);
            for q in 0..full {
                let d = dst.add(q * NR * kc + p * NR);
                for h in 0..NR / 8 {
                    _mm256_store_ps(d.add(8 * h), _mm256_loadu_ps(s.add(q * NR + 8 * h)));
                }
            }
            if rest > 0 {
                let d = dst.add(full * NR * kc + p * NR);
                for h in 0..NR / 8 {
                    let m = lanes(rest.saturating_sub(8 * h).min(8));
                    _mm256_store_ps(d.add(8 * h), _mm256_maskload_ps(s.add(full * NR + 8 * h), m));
                }
            }
        }
        return;
    }
    for q in 0..nc.div_ceil(NR) {
        let d = dst.add(q * NR * kc);
        let cols = (nc - q * NR).min(NR);
        let panel = b.shifted(0, q * NR);
        let mut p = 0;
        if b.rs == 1 {
            // columns stored contiguously (B is a transposed view): 8 × 8 transposes
            while p + 8 <= kc {
                for h in 0..NR / 8 {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, v) in r.iter_mut().enumerate().take(cols.saturating_sub(8 * h).min(8)) {
                        *v = _mm256_loadu_ps(panel.at(p, 8 * h + i));
                    }
                    for (j, v) in transpose8(r).into_iter().enumerate() {
                        _mm256_store_ps(d.add((p + j) * NR + 8 * h), v);
                    }
                }
                p += 8;
            }
        }
        for p in p..kc {
            for c in 0..NR {
                *d.add(p * NR + c) = if c < cols { *panel.at(p, c) } else { 0.0 };
            }
        }
    }
}

/// A mask selecting the first `n ≤ 8` lanes.
#[inline(always)]
unsafe fn lanes(n: usize) -> __m256i {
    const ONES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    _mm256_loadu_si256(ONES.as_ptr().add(8 - n) as *const __m256i)
}

/// The transpose of the 8 × 8 matrix whose rows are `r`.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // pairs of rows interleaved, then quads, then the 128-bit halves exchanged
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Where one register tile of C goes: `rows × cols` valid elements at `c` with row stride
/// `rs`, scaled by `alpha`, added to what is there when `load_c`.
struct Tile {
    c: *mut f32,
    rs: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    load_c: bool,
}

impl Tile {
    /// Prefetches the tile's rows of `width` floats: they are written after ~1,500 cycles of
    /// arithmetic. (An edge tile's row may end before `width`: a prefetch never faults, and
    /// the address is formed with wrapping arithmetic.)
    #[inline(always)]
    unsafe fn prefetch(&self, width: usize) {
        for r in 0..self.rows {
            for j in (0..width).step_by(16).chain([width - 1]) {
                _mm_prefetch::<_MM_HINT_T0>(self.c.wrapping_add(r * self.rs + j) as *const i8);
            }
        }
    }
}

/// `step(acc, a, b)` over the `kc` depths of an `MR`-row A panel at `a` and an `NR`-column B
/// panel at `b`, unrolled four times (measured best: see the module notes).
#[inline(always)]
unsafe fn depths<const MR: usize, const NR: usize, A>(
    kc: usize,
    mut a: *const f32,
    mut b: *const f32,
    acc: &mut A,
    step: impl Fn(&mut A, *const f32, *const f32),
) {
    for _ in 0..kc / 4 {
        for u in 0..4 {
            step(acc, a.add(u * MR), b.add(u * NR));
        }
        a = a.add(4 * MR);
        b = b.add(4 * NR);
    }
    for _ in 0..kc % 4 {
        step(acc, a, b);
        a = a.add(MR);
        b = b.add(NR);
    }
}

/// The AVX2 register tile: 6 × 16, twelve accumulators over `kc` depths of one A panel and
/// one B panel.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(kc: usize, a: *const f32, b: *const f32, t: Tile) {
    const MR: usize = 6;
    const NR: usize = 16;
    t.prefetch(NR);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // one depth: two B vectors, six broadcasts of A, twelve FMAs
    let step = |acc: &mut [[__m256; 2]; MR], a: *const f32, b: *const f32| {
        let b0 = _mm256_load_ps(b);
        let b1 = _mm256_load_ps(b.add(8));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*a.add(r));
            row[0] = _mm256_fmadd_ps(x, b0, row[0]);
            row[1] = _mm256_fmadd_ps(x, b1, row[1]);
        }
    };
    depths::<MR, NR, _>(kc, a, b, &mut acc, step);
    let alpha = _mm256_set1_ps(t.alpha);
    if t.rows == MR && t.cols == NR {
        for (r, row) in acc.iter().enumerate() {
            let d = t.c.add(r * t.rs);
            for (h, v) in row.iter().enumerate() {
                let mut v = _mm256_mul_ps(*v, alpha);
                if t.load_c {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(d.add(8 * h)));
                }
                _mm256_storeu_ps(d.add(8 * h), v);
            }
        }
    } else {
        // an edge tile: only its valid part is read and written
        let mut full = [0.0f32; MR * NR];
        for (r, row) in acc.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                _mm256_storeu_ps(full.as_mut_ptr().add(r * NR + 8 * h), _mm256_mul_ps(*v, alpha));
            }
        }
        for r in 0..t.rows {
            let d = t.c.add(r * t.rs);
            for (j, &v) in full[r * NR..r * NR + t.cols].iter().enumerate() {
                *d.add(j) = if t.load_c { *d.add(j) + v } else { v };
            }
        }
    }
}

/// The AVX-512 register tile: 12 × 32, twenty-four accumulators (of the 32 registers) over
/// `kc` depths of one A panel and one B panel; edge tiles are read and written with masks.
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(kc: usize, a: *const f32, b: *const f32, t: Tile) {
    const MR: usize = 12;
    const NR: usize = 32;
    t.prefetch(NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // one depth: two B vectors, twelve broadcasts of A, twenty-four FMAs
    let step = |acc: &mut [[__m512; 2]; MR], a: *const f32, b: *const f32| {
        let b0 = _mm512_load_ps(b);
        let b1 = _mm512_load_ps(b.add(16));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(r));
            row[0] = _mm512_fmadd_ps(x, b0, row[0]);
            row[1] = _mm512_fmadd_ps(x, b1, row[1]);
        }
    };
    depths::<MR, NR, _>(kc, a, b, &mut acc, step);
    let alpha = _mm512_set1_ps(t.alpha);
    for (r, row) in acc.iter().enumerate().take(t.rows) {
        let d = t.c.add(r * t.rs);
        for (h, v) in row.iter().enumerate() {
            let n = t.cols.saturating_sub(16 * h).min(16);
            let mask = ((1u32 << n) - 1) as __mmask16;
            let mut v = _mm512_mul_ps(*v, alpha);
            if t.load_c {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, d.add(16 * h)));
            }
            _mm512_mask_storeu_ps(d.add(16 * h), mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Layout = (usize, usize);

    /// `A·B` in f64, and `Σ_p |a_ip·b_pj|` (an f32 sum of k terms is within k·2⁻²⁴ of it).
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        (ars, acs): Layout,
        b: &[f32],
        (brs, bcs): Layout,
    ) -> Vec<(f64, f64)> {
        let mut c = vec![(0.0, 0.0); m * n];
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64);
                c[i * n + j] = terms.fold((0.0, 0.0), |(s, abs), t| (s + t, abs + t.abs()));
            }
        }
        c
    }

    #[test]
    fn matches_f64_reference_for_every_layout_edge_and_depth_block() {
        let isas: Vec<Isa> = match Isa::best() {
            None => return,
            Some(Isa::Avx2) => vec![Isa::Avx2],
            Some(Isa::Avx512) => vec![Isa::Avx2, Isa::Avx512],
        };
        // edges in m (mod 6 and 12), n (mod 16 and 32), k (mod 8), several depth blocks,
        // several column blocks, and a strided operand that is neither row- nor
        // column-contiguous; each kernel this CPU runs
        let shapes = [
            (1, 1, 1),
            (6, 16, 8),
            (7, 17, 9),
            (12, 32, 16),
            (13, 33, 31),
            (101, 37, 19),
            (13, 40, 600),
            (12, 1100, 20),
            (200, 33, 257),
        ];
        for (m, n, k) in shapes {
            let a: Vec<f32> = (0..2 * m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..2 * k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let a_layouts = [(k, 1), (1, m), (2 * k, 2)];
            let b_layouts = [(n, 1), (1, k), (2, 2 * k)];
            for a_s in a_layouts {
                for b_s in b_layouts {
                    let want = reference(m, n, k, &a, a_s, &b, b_s);
                    let op =
                        |ptr: *const f32, (rs, cs): (usize, usize)| Operand { ptr, rs: rs as isize, cs: cs as isize };
                    let (ao, bo) = (op(a.as_ptr(), a_s), op(b.as_ptr(), b_s));
                    let mut first: Option<Vec<u32>> = None;
                    for &isa in &isas {
                        // accumulate into a destination with a wider row stride
                        let rs = n + 3;
                        let mut c = vec![0.25f32; m * rs];
                        unsafe { gemm(isa, c.as_mut_ptr(), rs, (m, n, k), ao, bo, -0.5, true) };
                        let mut fresh = vec![f32::NAN; m * rs];
                        unsafe { gemm(isa, fresh.as_mut_ptr(), rs, (m, n, k), ao, bo, 1.0, false) };
                        for i in 0..m {
                            for j in 0..n {
                                let (w, abs) = want[i * n + j];
                                let tol = (k as f64 + 2.0) * 6e-8 * (abs + 0.25);
                                let got = c[i * rs + j] as f64;
                                assert!(
                                    (got - (0.25 - 0.5 * w)).abs() < tol,
                                    "{isa:?} {m}x{n}x{k} {a_s:?} {b_s:?} ({i},{j}): {got} vs {w}"
                                );
                                let f = fresh[i * rs + j] as f64;
                                assert!((f - w).abs() < tol, "{isa:?} {m}x{n}x{k} fresh ({i},{j})");
                            }
                            // the padding columns are never written
                            assert!(c[i * rs + n..(i + 1) * rs].iter().all(|&v| v == 0.25));
                            assert!(fresh[i * rs + n..(i + 1) * rs].iter().all(|v| v.is_nan()));
                        }
                        // every kernel sums each element in the same order: equal bits
                        let bits: Vec<u32> = c.iter().chain(&fresh).map(|v| v.to_bits()).collect();
                        match &first {
                            None => first = Some(bits),
                            Some(f) => assert!(*f == bits, "{isa:?} {m}x{n}x{k} {a_s:?} {b_s:?}: bits differ"),
                        }
                    }
                }
            }
        }
    }
}
