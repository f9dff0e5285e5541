//! The GGUF tensor types [`crate::gguf`] reads, dequantised to f32: F32, F16, BF16, the
//! 32-value blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the 256-value "K-quant" super-blocks
//! Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (what llama.cpp's `Q4_K_M`-style files are made of), and the
//! non-linear IQ4_NL (32 values) and IQ4_XS (256, with 6-bit sub-block scales). Block
//! layouts as ggml defines them (`ggml-common.h`); the values equal those of llama.cpp's own
//! Python package (`tests/gguf.rs` against `tests/fixtures/gguf_quants.json`).
//!
//! In the K-quants a super-block of 256 values holds 16 (Q2_K, Q3_K, Q6_K) or 8 (Q4_K, Q5_K)
//! sub-blocks, each with its own scale (and, for Q2/4/5_K, minimum) quantised against the
//! super-block's f16 `d` (and `dmin`): value = d·scale·q − dmin·min.

use crate::half::f16_to_f32;

/// Values in a K-quant super-block.
const QK_K: usize = 256;

/// ggml's type ids.
mod id {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q5_1: u32 = 7;
    pub const Q8_0: u32 = 8;
    pub const Q2_K: u32 = 10;
    pub const Q3_K: u32 = 11;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const IQ4_NL: u32 = 20;
    pub const IQ4_XS: u32 = 23;
    pub const BF16: u32 = 30;
}

/// The types this module reads, for error messages.
pub const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS";

/// Bytes per block and values per block of a type we dequantise.
pub fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    Some(match ggml_type {
        id::F32 => (4, 1),
        id::F16 | id::BF16 => (2, 1),
        id::Q4_0 => (18, 32),
        id::Q4_1 => (20, 32),
        id::Q5_0 => (22, 32),
        id::Q5_1 => (24, 32),
        id::Q8_0 => (34, 32),
        id::Q2_K => (84, QK_K),
        id::Q3_K => (110, QK_K),
        id::Q4_K => (144, QK_K),
        id::Q5_K => (176, QK_K),
        id::Q6_K => (210, QK_K),
        id::IQ4_NL => (18, 32),
        id::IQ4_XS => (136, QK_K),
        _ => return None,
    })
}

fn f16(x: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([x[0], x[1]]))
}

/// Dequantises `n` values of `ggml_type` from `b`, whose length is `n` values' worth of
/// [`block_layout`] blocks (the caller checks it).
pub fn dequantize(ggml_type: u32, b: &[u8], n: usize) -> Vec<f32> {
    let (block_bytes, block_values) = block_layout(ggml_type).expect("a type block_layout accepts");
    assert_eq!(b.len(), n / block_values * block_bytes, "whole blocks");
    let mut out = Vec::with_capacity(n);
    let blocks = b.chunks_exact(block_bytes);
    match ggml_type {
        id::F32 => out.extend(blocks.map(|x| f32::from_le_bytes(x.try_into().expect("4 bytes")))),
        id::F16 => out.extend(blocks.map(f16)),
        id::BF16 => out.extend(blocks.map(|x| f32::from_bits(u32::from(u16::from_le_bytes([x[0], x[1]])) << 16))),
        // d, 16 bytes of nibbles: value j = (low nibble − 8)·d, value j + 16 = (high − 8)·d
        id::Q4_0 => blocks.for_each(|blk| {
            let d = f16(blk);
            out.extend(blk[2..].iter().map(|&q| ((q & 0xf) as i32 - 8) as f32 * d));
            out.extend(blk[2..].iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
        }),
        // d, m, 16 bytes of nibbles: value = nibble·d + m
        id::Q4_1 => blocks.for_each(|blk| {
            let (d, m) = (f16(blk), f16(&blk[2..]));
            out.extend(blk[4..].iter().map(|&q| (q & 0xf) as f32 * d + m));
            out.extend(blk[4..].iter().map(|&q| (q >> 4) as f32 * d + m));
        }),
        id::Q5_0 => blocks.for_each(|blk| five_bit(f16(blk), None, &blk[2..], &mut out)),
        id::Q5_1 => blocks.for_each(|blk| five_bit(f16(blk), Some(f16(&blk[2..])), &blk[4..], &mut out)),
        // d, 32 signed bytes: value = q·d
        id::Q8_0 => blocks.for_each(|blk| {
            let d = f16(blk);
            out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
        }),
        id::Q2_K => blocks.for_each(|blk| q2_k(blk, &mut out)),
        id::Q3_K => blocks.for_each(|blk| q3_k(blk, &mut out)),
        id::Q4_K => blocks.for_each(|blk| q4_k(blk, &mut out)),
        id::Q5_K => blocks.for_each(|blk| q5_k(blk, &mut out)),
        id::Q6_K => blocks.for_each(|blk| q6_k(blk, &mut out)),
        id::IQ4_NL => blocks.for_each(|blk| iq4_nibbles(f16(blk), &blk[2..], &mut out)),
        id::IQ4_XS => blocks.for_each(|blk| iq4_xs(blk, &mut out)),
        _ => unreachable!("block_layout accepted the type"),
    }
    out
}

/// Q5_0 (`min` None: value = (q − 16)·d) and Q5_1 (value = q·d + min): after the scales, a
/// little-endian u32 of fifth bits (bit j for value j) and 16 bytes of low nibbles (value j
/// low, value j + 16 high).
fn five_bit(d: f32, min: Option<f32>, rest: &[u8], out: &mut Vec<f32>) {
    let high = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
    let nibbles = &rest[4..20];
    for half in 0..2 {
        for (j, &byte) in nibbles.iter().enumerate() {
            let low = if half == 0 { byte & 0xf } else { byte >> 4 };
            let q = i32::from(low) | (((high >> (j + 16 * half)) & 1) << 4) as i32;
            out.push(match min {
                None => (q - 16) as f32 * d,
                Some(m) => q as f32 * d + m,
            });
        }
    }
}

/// Q2_K: 16 bytes of sub-block scales (low nibble: scale, high: min), 64 bytes of 2-bit values,
/// d, dmin. The 2-bit values of each 128-value half sit in 32 bytes, four to a byte: bits
/// 2s..2s+1 of byte i hold value 32s + i, in 16-value sub-blocks.
fn q2_k(blk: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&blk[..16], &blk[16..80]);
    let (d, dmin) = (f16(&blk[80..]), f16(&blk[82..]));
    for (half, q) in qs.chunks_exact(32).enumerate() {
        for shift in 0..4 {
            for part in 0..2 {
                let sc = scales[half * 8 + shift * 2 + part];
                let (dl, ml) = (d * f32::from(sc & 0xf), dmin * f32::from(sc >> 4));
                out.extend(q[part * 16..part * 16 + 16].iter().map(|&b| dl * f32::from((b >> (2 * shift)) & 3) - ml));
            }
        }
    }
}

/// Q3_K: 32 bytes of high bits (bit k of byte i: value 32k + i's third bit, set meaning "no
/// −4"), 64 bytes of 2-bit values laid out as Q2_K's, 12 bytes packing 16 six-bit scales
/// (stored + 32), d.
fn q3_k(blk: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, packed, d) = (&blk[..32], &blk[32..96], &blk[96..108], f16(&blk[108..]));
    // scale j: low 4 bits from byte j % 8 (low nibble for j < 8, high after), high 2 bits from
    // byte 8 + j % 4, bits 2·(j / 4)..
    let scale = |j: usize| {
        let low = if j < 8 { packed[j] & 0xf } else { packed[j - 8] >> 4 };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        i32::from(low | (high << 4)) - 32
    };
    let mut bit = 0;
    for (half, q) in qs.chunks_exact(32).enumerate() {
        for shift in 0..4 {
            for part in 0..2 {
                let dl = d * scale(half * 8 + shift * 2 + part) as f32;
                for l in part * 16..part * 16 + 16 {
                    let low = i32::from((q[l] >> (2 * shift)) & 3);
                    let minus = if hmask[l] & (1 << bit) != 0 { 0 } else { 4 };
                    out.push(dl * (low - minus) as f32);
                }
            }
            bit += 1;
        }
    }
}

/// Sub-block `j`'s (scale, min) of Q4_K and Q5_K: eight 6-bit pairs packed in 12 bytes.
fn scale_min_k4(j: usize, packed: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        ((packed[j + 4] & 0xf) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
    };
    (f32::from(sc), f32::from(m))
}

/// Q4_K: d, dmin, 12 bytes of scales and mins, 128 bytes of nibbles: each 32-byte run holds
/// two 32-value sub-blocks (low nibbles, then high).
fn q4_k(blk: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, packed, qs) = (f16(blk), f16(&blk[2..]), &blk[4..16], &blk[16..144]);
    for (k, q) in qs.chunks_exact(32).enumerate() {
        for (sub, nibble) in [(2 * k, 0), (2 * k + 1, 4)] {
            let (sc, m) = scale_min_k4(sub, packed);
            let (d1, m1) = (d * sc, dmin * m);
            out.extend(q.iter().map(|&b| d1 * f32::from((b >> nibble) & 0xf) - m1));
        }
    }
}

/// Q5_K: Q4_K's layout plus 32 bytes of fifth bits before the nibbles (bit s of byte l: value l
/// of sub-block s).
fn q5_k(blk: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, packed) = (f16(blk), f16(&blk[2..]), &blk[4..16]);
    let (qh, qs) = (&blk[16..48], &blk[48..176]);
    for (k, q) in qs.chunks_exact(32).enumerate() {
        for (sub, nibble) in [(2 * k, 0), (2 * k + 1, 4)] {
            let (sc, m) = scale_min_k4(sub, packed);
            let (d1, m1) = (d * sc, dmin * m);
            out.extend(q.iter().zip(qh).map(|(&b, &h)| {
                let fifth = if h & (1 << sub) != 0 { 16 } else { 0 };
                d1 * f32::from(((b >> nibble) & 0xf) + fifth) - m1
            }));
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed scales, d; value =
/// d·scale·(q − 32). Each 128-value half uses 64 low bytes and 32 high bytes: value 32k + l
/// takes its low 4 bits from byte l (k = 0, 2) or l + 32 (k = 1, 3) — that byte's low nibble
/// for k < 2, its high one after — and its high 2 bits from bits 2k..2k+1 of high byte l.
fn q6_k(blk: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales, d) = (&blk[..128], &blk[128..192], &blk[192..208], f16(&blk[208..]));
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &scales[8 * half..]);
        for k in 0..4 {
            for l in 0..32 {
                let low_byte = ql[l + 32 * (k % 2)];
                let low = if k < 2 { low_byte & 0xf } else { low_byte >> 4 };
                let q = i32::from(low | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                out.push(d * f32::from(sc[l / 16 + 2 * k] as i8) * q as f32);
            }
        }
    }
}

/// The 16 levels of the IQ4 types' non-linear 4-bit grid (ggml's `kvalues_iq4nl`).
const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// 32 values from 16 bytes of grid indices scaled by `d`: value j from the low nibble of
/// byte j, value j + 16 from its high nibble (IQ4_NL's block after its f16 `d`).
fn iq4_nibbles(d: f32, qs: &[u8], out: &mut Vec<f32>) {
    out.extend(qs[..16].iter().map(|&q| d * f32::from(IQ4_LEVELS[usize::from(q & 0xf)])));
    out.extend(qs[..16].iter().map(|&q| d * f32::from(IQ4_LEVELS[usize::from(q >> 4)])));
}

/// IQ4_XS: d, a u16 of the sub-block scales' high bits (two per sub-block), 4 bytes of their
/// low nibbles (two per byte), then eight 32-value sub-blocks of IQ4_NL nibbles, each scaled by
/// `d·(scale − 32)` with its 6-bit scale.
fn iq4_xs(blk: &[u8], out: &mut Vec<f32>) {
    let (d, high) = (f16(blk), u16::from_le_bytes([blk[2], blk[3]]));
    for (ib, qs) in blk[8..].chunks_exact(16).enumerate() {
        let low = (blk[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
        let scale = i32::from(low) | (i32::from((high >> (2 * ib)) & 3) << 4);
        iq4_nibbles(d * (scale - 32) as f32, qs, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_dequantise_as_ggml_does() {
        let half = |x: f32| crate::half::f32_to_f16(x).to_le_bytes();
        let mut q41 = [half(0.5), half(-1.0)].concat();
        q41.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(id::Q4_1, &q41, 32);
        assert_eq!((v[0], v[1], v[16], v[31]), (-1.0, -0.5, 6.5, -1.0));
        let mut q80 = half(0.25).to_vec();
        q80.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(id::Q8_0, &q80, 32);
        assert_eq!((v[0], v[16], v[31]), (-4.0, 0.0, 3.75));
        // Q5_0: the fifth bit of value 17 set, all nibbles 1: 1 − 16 and 17 − 16
        let mut q50 = half(2.0).to_vec();
        q50.extend((1u32 << 17).to_le_bytes());
        q50.extend([0x11; 16]);
        let v = dequantize(id::Q5_0, &q50, 32);
        assert_eq!((v[0], v[16], v[17]), (-30.0, -30.0, 2.0));
        // BF16 is the top half of an f32
        assert_eq!(dequantize(id::BF16, &(1.5f32.to_bits() >> 16).to_le_bytes()[..2], 1), [1.5]);
    }
}
