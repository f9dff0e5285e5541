//! One query's softmax attention over its cached keys and values: the attention of the
//! sampling engine's decode steps ([`crate::infer`]).
//!
//! With AVX2+FMA and a head width that is a multiple of 8, the scores come four keys at a
//! time (one pass over the query, one horizontal reduction for four dot products), and the
//! weighted sum of the values keeps 64 output columns in registers across all keys instead
//! of loading and storing the output once per key. On the workload's batch-32 rollout the
//! per-key `dot`/`axpy` calls this replaces took ~18% of the time.

use crate::kernels::{axpy, dot, exp_inplace};

/// `out = Σ_j softmax_j(scale · q·k_j) · v_j` over the `n = keys.len() / q.len()` keys (the
/// rows of `keys` and `values`, each `q.len()` wide), the scaled scores soft-capped first with
/// a `softcap` (Gemma 2, [`crate::softcap`]). `scores` is scratch of at least `n` elements.
pub(crate) fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    (scale, softcap): (f32, Option<f32>),
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dh = q.len();
    let n = keys.len() / dh.max(1);
    assert!(
        n > 0 && keys.len() == n * dh && values.len() == n * dh && out.len() == dh && scores.len() >= n,
        "attend: shapes"
    );
    let p = &mut scores[..n];
    dots(q, keys, p);
    let mut max = f32::NEG_INFINITY;
    for s in p.iter_mut() {
        *s *= scale;
        if let Some(c) = softcap {
            *s = crate::softcap::softcap(*s, c);
        }
        max = max.max(*s);
    }
    p.iter_mut().for_each(|s| *s -= max);
    exp_inplace(p);
    let inv = 1.0 / p.iter().sum::<f32>();
    p.iter_mut().for_each(|s| *s *= inv);
    weighted_sum(p, values, out);
}

/// `s[j] = q·k_j` for the rows `k_j` of `keys`.
fn dots(q: &[f32], keys: &[f32], s: &mut [f32]) {
    let dh = q.len();
    #[cfg(target_arch = "x86_64")]
    if dh.is_multiple_of(8) && crate::kernels::has_fma() {
        // SAFETY: AVX2 and FMA are available (checked above); `keys` holds s.len() rows of
        // dh, a multiple of 8 (checked by the caller and above).
        return unsafe { x86::dots(q, keys, s) };
    }
    for (s, k) in s.iter_mut().zip(keys.chunks_exact(dh)) {
        *s = dot(q, k);
    }
}

/// `out = Σ_j p[j] · v_j` for the rows `v_j` of `values`.
fn weighted_sum(p: &[f32], values: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if out.len().is_multiple_of(64) && crate::kernels::has_fma() {
        // SAFETY: AVX2 and FMA are available (checked above); `values` holds p.len() rows of
        // out.len(), a multiple of 64 (checked above).
        return unsafe { x86::weighted_sum(p, values, out) };
    }
    out.fill(0.0);
    for (&w, v) in p.iter().zip(values.chunks_exact(out.len())) {
        axpy(w, v, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Four keys per pass: four accumulators over the head width, then one reduction tree
    /// (`hadd`, `hadd`, add the halves) that yields the four sums side by side.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(q: &[f32], keys: &[f32], s: &mut [f32]) {
        let (dh, n) = (q.len(), s.len());
        let (pq, pk) = (q.as_ptr(), keys.as_ptr());
        let mut j = 0;
        while j + 4 <= n {
            let mut a = [_mm256_setzero_ps(); 4];
            let mut d = 0;
            while d < dh {
                let qv = _mm256_loadu_ps(pq.add(d));
                for (g, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(pk.add((j + g) * dh + d)), *a);
                }
                d += 8;
            }
            let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            _mm_storeu_ps(s.as_mut_ptr().add(j), r);
            j += 4;
        }
        for (jj, s) in s.iter_mut().enumerate().skip(j) {
            *s = super::dot(q, &keys[jj * dh..(jj + 1) * dh]);
        }
    }

    /// 64 output columns at a time, held in eight registers across all keys.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(p: &[f32], values: &[f32], out: &mut [f32]) {
        let dh = out.len();
        let pv = values.as_ptr();
        for d0 in (0..dh).step_by(64) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &w) in p.iter().enumerate() {
                let (w, row) = (_mm256_set1_ps(w), pv.add(j * dh + d0));
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * c), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], keys: &[f32], values: &[f32], scale: f32, cap: Option<f32>) -> Vec<f32> {
        let dh = q.len();
        let capped = |s: f64| cap.map_or(s, |c| c as f64 * (s / c as f64).tanh());
        let s: Vec<f64> = keys
            .chunks(dh)
            .map(|k| capped(q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64))
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut out = vec![0.0f64; dh];
        for (w, v) in e.iter().zip(values.chunks(dh)) {
            out.iter_mut().zip(v).for_each(|(o, &v)| *o += w / z * v as f64);
        }
        out.into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn attend_matches_a_naive_softmax_attention() {
        // widths: the vector paths (64, 128), scores only (16), neither (24); key counts
        // around the groups of four
        for dh in [64, 128, 16, 24] {
            for n in [1, 3, 4, 7, 96] {
                let f = |len: usize, seed: usize| -> Vec<f32> {
                    (0..len).map(|i| (((i * 2654435761 + seed) >> 7) % 1000) as f32 / 250.0 - 2.0).collect()
                };
                let (q, keys, values) = (f(dh, 1), f(n * dh, 2), f(n * dh, 3));
                let scale = 1.0 / (dh as f32).sqrt();
                // uncapped, and Gemma 2's cap tight enough to bend most scores
                for cap in [None, Some(1.0)] {
                    let mut scores = vec![0.0; n + 5];
                    let mut out = vec![f32::NAN; dh];
                    attend(&q, &keys, &values, (scale, cap), &mut scores, &mut out);
                    for (got, want) in out.iter().zip(naive(&q, &keys, &values, scale, cap)) {
                        let msg = format!("dh {dh}, n {n}, cap {cap:?}: {got} vs {want}");
                        assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "{msg}");
                    }
                }
            }
        }
    }
}
