//! The tape-free inference forward with a preallocated KV cache, used for rollouts.
//!
//! It holds a plain-`Vec` snapshot of a [`CausalLm`]'s weights (q/k/v fused into one matrix,
//! SwiGLU's gate and up fused), so decoding one token costs one pass over the weights and no
//! allocation of graph nodes. Tests pin it to the dfdx training forward (logits within 1e-5),
//! so the rollout and the PPO update see the same model. Refresh the snapshot after each
//! optimizer step with [`InferenceModel::from_model`].
//!
//! Rows are left-padded: row `r` has `pad[r]` pad columns, its token at column `c` has
//! position `c - pad[r]`, and pad keys are never attended to.

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::config::{Dims, GeluKind, Glu, NormKind};
use crate::decode_attn::attend;
use crate::error::PolicyError;
use crate::kernels::{gelu_erf_inplace, gelu_tanh_inplace, matmul, silu_inplace, PackedMatrix, WeightDtype};
use crate::model::{CausalLm, Mlp, Norm};
use crate::rope;

#[derive(Debug, Clone)]
struct NormW {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    kind: NormKind,
    eps: f32,
}

#[derive(Debug, Clone)]
enum MlpW {
    Gelu {
        fc: PackedMatrix,
        fc_b: Option<Vec<f32>>,
        proj: PackedMatrix,
        proj_b: Option<Vec<f32>>,
    },
    /// `gate_up`: `(C, 2F)`, gate columns first.
    SwiGlu {
        gate_up: PackedMatrix,
        down: PackedMatrix,
    },
}

#[derive(Debug, Clone)]
struct LayerW {
    /// The branches' input norms (none in OLMo 2).
    ln1: Option<NormW>,
    /// `(C, H·Dh + 2·Hkv·Dh)`: q, k, v columns.
    qkv: PackedMatrix,
    qkv_b: Option<Vec<f32>>,
    o: PackedMatrix,
    o_b: Option<Vec<f32>>,
    /// Qwen3's RMSNorms over each head's queries and keys (OLMo 2's over the whole rows).
    qk_norm: Option<[NormW; 2]>,
    ln2: Option<NormW>,
    mlp: MlpW,
    /// Gemma's norms on the attention's and the MLP's outputs.
    post_norms: Option<[NormW; 2]>,
    /// The attention window of a local layer.
    window: Option<usize>,
    /// Whether the layer rotates its queries and keys (not SmolLM3's NoPE layers).
    rope: bool,
}

/// A weight snapshot for fast, tape-free inference.
#[derive(Debug, Clone)]
pub struct InferenceModel {
    /// Sizes.
    pub dims: Dims,
    wte: Vec<f32>,
    wpe: Option<Vec<f32>>,
    layers: Vec<LayerW>,
    ln_f: NormW,
    /// The LM head transposed to `(C, V)` (a copy of `wte` when tied), so the head is one more
    /// small-m matmul instead of a strided gemm that repacks the embedding every step.
    head_t: PackedMatrix,
    /// The global layers' RoPE.
    rope: Frequencies,
    /// Local layers' RoPE (no frequencies without local layers).
    rope_local: Frequencies,
}

/// A RoPE's frequencies ([`rope::inv_freq`]) and the factor on its cos and sin
/// ([`rope::attention_factor`]), computed once per engine.
#[derive(Debug, Clone, Default)]
struct Frequencies {
    inv_freq: Vec<f32>,
    scale: f32,
}

impl Frequencies {
    fn of(dims: &Dims) -> Self {
        Frequencies { inv_freq: rope::inv_freq(dims), scale: rope::attention_factor(dims) }
    }
}

/// Per-layer keys and values for every row, `[B][Hkv][cap][Dh]`. Each row has its own fill
/// level and left padding, so rows can advance (and restart) independently — what a vector
/// of environments with auto-reset needs.
#[derive(Debug, Clone)]
pub struct KvCache {
    b: usize,
    cap: usize,
    len: Vec<usize>,
    pad: Vec<usize>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// An empty cache for `pad.len()` rows and at most `cap` columns per row; row `r` will
    /// start with `pad[r]` pad columns (left padding).
    pub fn new(dims: &Dims, pad: Vec<usize>, cap: usize) -> Self {
        let b = pad.len();
        let size = b * dims.n_kv_head * cap * dims.head_dim;
        KvCache {
            b,
            cap,
            len: vec![0; b],
            pad,
            k: vec![vec![0.0; size]; dims.n_layer],
            v: vec![vec![0.0; size]; dims.n_layer],
        }
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.b
    }
    /// Columns filled so far in `row`.
    pub fn len(&self, row: usize) -> usize {
        self.len[row]
    }
    /// Columns available per row.
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Makes row `dst` a copy of row `src` (keys, values, fill level and padding): a prompt
    /// shared by several rows is prefilled once.
    pub fn copy_row(&mut self, src: usize, dst: usize) {
        let block = self.k[0].len() / self.b;
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            layer.copy_within(src * block..(src + 1) * block, dst * block);
        }
        self.len[dst] = self.len[src];
        self.pad[dst] = self.pad[src];
    }
    /// Empties `row` to start a new sequence there, with `pad` left-pad columns (so rows
    /// restarted together can be prefilled as one left-padded batch).
    pub fn reset_row(&mut self, row: usize, pad: usize) {
        self.len[row] = 0;
        self.pad[row] = pad;
    }
}

/// Checks a `forward_rows` call against a cache of `len.len()` rows (fill levels `len`, left
/// padding `pad`, `cap` columns) and returns each fed token's position (its column less the
/// row's padding); the shared check of every engine's `forward_rows`.
pub(crate) fn row_positions(
    d: &Dims,
    len: &[usize],
    pad: &[usize],
    cap: usize,
    rows: &[usize],
    ids: &[u32],
    n: usize,
) -> Result<Vec<usize>, PolicyError> {
    let b = rows.len();
    if ids.len() != b * n || n == 0 || b == 0 {
        return Err(PolicyError::Input(format!("forward needs {b}x{n} ids (n, rows > 0), got {}", ids.len())));
    }
    let mut seen = vec![false; len.len()];
    for &r in rows {
        if r >= len.len() || std::mem::replace(&mut seen[r], true) {
            return Err(PolicyError::Input(format!("cache row {r} is out of range or repeated ({} rows)", len.len())));
        }
        if len[r] + n > cap {
            return Err(PolicyError::Input(format!("KV cache row {r} of {cap} columns is full ({} + {n})", len[r])));
        }
    }
    let positions: Vec<usize> =
        (0..b * n).map(|i| (len[rows[i / n]] + i % n).saturating_sub(pad[rows[i / n]])).collect();
    d.check_step(ids, &positions)?;
    Ok(positions)
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every fed position: `(B·n, V)`.
    All,
    /// Only the last fed column of each row: `(B, V)`.
    Last,
}

/// A norm's gain, bias and kind; Gemma's `1 + w` gain stored as that sum.
fn norm_w<D: Device<f32>>(n: &Norm<D>) -> NormW {
    let mut w = n.w.as_vec();
    if n.unit_offset {
        w.iter_mut().for_each(|w| *w += 1.0);
    }
    NormW { w, b: n.b.as_ref().map(|b| b.as_vec()), kind: n.kind, eps: n.eps }
}

/// Concatenates `(k, n_i)` row-major matrices along columns.
pub(crate) fn concat_cols(mats: &[(Vec<f32>, usize)], k: usize) -> Vec<f32> {
    let total: usize = mats.iter().map(|(_, n)| n).sum();
    let mut out = Vec::with_capacity(k * total);
    for r in 0..k {
        for (m, n) in mats {
            out.extend_from_slice(&m[r * n..(r + 1) * n]);
        }
    }
    out
}

impl InferenceModel {
    /// Snapshots the weights of `model` in f32 (exactly the training forward's numbers).
    pub fn from_model<D: Device<f32>>(model: &CausalLm<D>) -> Self {
        Self::from_model_with(model, WeightDtype::F32)
    }

    /// Snapshots the weights of `model`, storing the matmul weights (and the LM head) as
    /// `dtype`. Norms, biases and the embedding lookup stay f32; arithmetic is always f32.
    pub fn from_model_with<D: Device<f32>>(model: &CausalLm<D>, dtype: WeightDtype) -> Self {
        let pack = |l: &crate::model::Linear<D>| {
            let (k, n) = *l.w.shape();
            PackedMatrix::with_dtype(&l.merged_w(), k, n, dtype)
        };
        let dims = model.dims;
        let c = dims.d_model;
        let layers = model
            .blocks
            .iter()
            .map(|blk| {
                let qkv = concat_cols(
                    &[
                        (blk.wq.merged_w(), dims.q_dim()),
                        (blk.wk.merged_w(), dims.kv_dim()),
                        (blk.wv.merged_w(), dims.kv_dim()),
                    ],
                    c,
                );
                let qkv = PackedMatrix::with_dtype(&qkv, c, dims.q_dim() + 2 * dims.kv_dim(), dtype);
                let qkv_b = blk.wq.b.as_ref().map(|bq| {
                    let mut b = bq.as_vec();
                    b.extend(blk.wk.b.as_ref().map(|t| t.as_vec()).unwrap_or_else(|| vec![0.0; dims.kv_dim()]));
                    b.extend(blk.wv.b.as_ref().map(|t| t.as_vec()).unwrap_or_else(|| vec![0.0; dims.kv_dim()]));
                    b
                });
                let mlp = match &blk.mlp {
                    Mlp::Gelu { fc, proj } => MlpW::Gelu {
                        fc: pack(fc),
                        fc_b: fc.b.as_ref().map(|b| b.as_vec()),
                        proj: pack(proj),
                        proj_b: proj.b.as_ref().map(|b| b.as_vec()),
                    },
                    Mlp::SwiGlu { gate, up, down } => MlpW::SwiGlu {
                        gate_up: PackedMatrix::with_dtype(
                            &concat_cols(&[(gate.merged_w(), dims.d_ff), (up.merged_w(), dims.d_ff)], c),
                            c,
                            2 * dims.d_ff,
                            dtype,
                        ),
                        down: pack(down),
                    },
                };
                LayerW {
                    ln1: blk.ln1.as_ref().map(norm_w),
                    qkv,
                    qkv_b,
                    o: pack(&blk.wo),
                    o_b: blk.wo.b.as_ref().map(|b| b.as_vec()),
                    qk_norm: blk.qk_norm.as_ref().map(|[q, k]| [norm_w(q), norm_w(k)]),
                    ln2: blk.ln2.as_ref().map(norm_w),
                    mlp,
                    post_norms: blk.post_norms.as_ref().map(|[a, m]| [norm_w(a), norm_w(m)]),
                    window: blk.window,
                    rope: blk.rope,
                }
            })
            .collect();
        InferenceModel {
            dims,
            wte: model.wte.as_vec(),
            wpe: model.wpe.as_ref().map(|w| w.as_vec()),
            layers,
            ln_f: norm_w(&model.ln_f),
            head_t: PackedMatrix::with_dtype(
                &crate::hf_names::transpose_rows(&model.lm_head.as_ref().unwrap_or(&model.wte).as_vec(), dims.vocab, c),
                c,
                dims.vocab,
                dtype,
            ),
            rope: if dims.rotary() { Frequencies::of(&dims) } else { Frequencies::default() },
            rope_local: match dims.sliding_window {
                Some(_) => Frequencies::of(&dims.local_rope()),
                None => Frequencies::default(),
            },
        }
    }

    /// Feeds `n` new columns of ids for every row (`ids`: `(B, n)` row-major) and returns the
    /// logits requested. The first call is the prefill (the whole left-padded prompt).
    pub fn forward(&self, cache: &mut KvCache, ids: &[u32], n: usize, at: LogitsAt) -> Result<Vec<f32>, PolicyError> {
        let rows: Vec<usize> = (0..cache.b).collect();
        self.forward_rows(cache, &rows, ids, n, at)
    }

    /// Feeds `n` new columns of ids to the cache rows `rows` only (`ids`: `(rows.len(), n)`),
    /// each at its own fill level; returns the logits requested for those rows, in order.
    pub fn forward_rows(
        &self,
        cache: &mut KvCache,
        rows: &[usize],
        ids: &[u32],
        n: usize,
        at: LogitsAt,
    ) -> Result<Vec<f32>, PolicyError> {
        let d = &self.dims;
        let (b, c) = (rows.len(), d.d_model);
        let positions = row_positions(d, &cache.len, &cache.pad, cache.cap, rows, ids, n)?;
        let mut x = vec![0.0f32; b * n * c];
        for (row, xr) in x.chunks_mut(c).enumerate() {
            let id = ids[row] as usize;
            xr.copy_from_slice(&self.wte[id * c..(id + 1) * c]);
            if d.embed_scale != 1.0 {
                xr.iter_mut().for_each(|x| *x *= d.embed_scale);
            }
            if let Some(wpe) = &self.wpe {
                let p = positions[row];
                xr.iter_mut().zip(&wpe[p * c..(p + 1) * c]).for_each(|(x, w)| *x += w);
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            self.layer_forward(li, layer, cache, rows, &mut x, &positions, n);
        }
        for &r in rows {
            cache.len[r] += n;
        }
        let picked: Vec<usize> = match at {
            LogitsAt::All => (0..b * n).collect(),
            LogitsAt::Last => (0..b).map(|r| r * n + n - 1).collect(),
        };
        let mut h: Vec<f32> = picked.iter().flat_map(|&r| x[r * c..(r + 1) * c].iter().copied()).collect();
        apply_norm(&self.ln_f, &mut h, c);
        let mut logits = vec![0.0f32; picked.len() * d.vocab];
        matmul(&h, &self.head_t, &mut logits, picked.len(), false);
        if d.logit_scale != 1.0 {
            logits.iter_mut().for_each(|z| *z *= d.logit_scale);
        }
        if let Some(cap) = d.final_softcap {
            crate::softcap::softcap_inplace(&mut logits, cap);
        }
        Ok(logits)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        li: usize,
        l: &LayerW,
        cache: &mut KvCache,
        rows: &[usize],
        x: &mut [f32],
        positions: &[usize],
        n: usize,
    ) {
        let d = &self.dims;
        let (c, m) = (d.d_model, x.len() / d.d_model);
        let (qd, kvd) = (d.q_dim(), d.kv_dim());
        let width = qd + 2 * kvd;
        // attention; GPT-NeoX's parallel residual keeps the block's input for the MLP
        let x0 = d.parallel_residual.then(|| x.to_vec());
        let mut h = x.to_vec();
        if let Some(ln1) = &l.ln1 {
            apply_norm(ln1, &mut h, c);
        }
        let mut qkv = vec![0.0f32; m * width];
        matmul(&h, &l.qkv, &mut qkv, m, false);
        if let Some(bias) = &l.qkv_b {
            add_bias(&mut qkv, bias);
        }
        if let Some([q_norm, k_norm]) = &l.qk_norm {
            let (q_width, k_width) = if d.qk_norm_full { (qd, kvd) } else { (d.head_dim, d.head_dim) };
            for row in qkv.chunks_mut(width) {
                apply_norm(q_norm, &mut row[..qd], q_width);
                apply_norm(k_norm, &mut row[qd..qd + kvd], k_width);
            }
        }
        if d.rotary() && l.rope {
            let rope = if l.window.is_some() { &self.rope_local } else { &self.rope };
            rope_rows(d, rope, &mut qkv, positions, width);
        }
        if d.query_scale != 1.0 {
            qkv.chunks_mut(width).for_each(|row| row[..qd].iter_mut().for_each(|q| *q *= d.query_scale));
        }
        self.write_cache(li, cache, rows, &qkv, n, width);
        let att = self.attention(li, l.window, cache, rows, &qkv, n, width);
        let (post_attn, post_mlp) = match &l.post_norms {
            Some([a, m]) => (Some(a), Some(m)),
            None => (None, None),
        };
        // the branch's output straight into x when nothing comes between
        let direct = post_attn.is_none() && d.residual_scale == 1.0;
        let mut y = if direct { vec![] } else { vec![0.0f32; m * c] };
        let out: &mut [f32] = if direct { x } else { &mut y };
        matmul(&att, &l.o, out, m, direct);
        if let Some(bias) = &l.o_b {
            add_bias(out, bias);
        }
        if !direct {
            add_branch(x, &mut y, post_attn, d.residual_scale);
        }
        // MLP
        h.copy_from_slice(x0.as_deref().unwrap_or(x));
        if let Some(ln2) = &l.ln2 {
            apply_norm(ln2, &mut h, c);
        }
        if direct {
            self.mlp_forward(&l.mlp, &h, x, m);
        } else {
            y.fill(0.0);
            self.mlp_forward(&l.mlp, &h, &mut y, m);
            add_branch(x, &mut y, post_mlp, d.residual_scale);
        }
    }

    /// `x += mlp(h)` for `m` rows.
    fn mlp_forward(&self, mlp: &MlpW, h: &[f32], x: &mut [f32], m: usize) {
        let d = &self.dims;
        let f = d.d_ff;
        match mlp {
            MlpW::Gelu { fc, fc_b, proj, proj_b } => {
                let mut a = vec![0.0f32; m * f];
                matmul(h, fc, &mut a, m, false);
                if let Some(bias) = fc_b {
                    add_bias(&mut a, bias);
                }
                par_apply(&mut a, if d.gelu == GeluKind::Erf { gelu_erf_inplace } else { gelu_tanh_inplace });
                matmul(&a, proj, x, m, true);
                if let Some(bias) = proj_b {
                    add_bias(x, bias);
                }
            }
            MlpW::SwiGlu { gate_up, down } => {
                let mut gu = vec![0.0f32; m * 2 * f];
                matmul(h, gate_up, &mut gu, m, false);
                let mut a: Vec<f32> = gu.chunks(2 * f).flat_map(|r| r[..f].iter().copied()).collect();
                par_apply(&mut a, if d.glu == Glu::GeluTanh { gelu_tanh_inplace } else { silu_inplace });
                for (a, r) in a.chunks_mut(f).zip(gu.chunks(2 * f)) {
                    a.iter_mut().zip(&r[f..]).for_each(|(g, u)| *g *= u);
                }
                matmul(&a, down, x, m, true);
            }
        }
    }

    fn write_cache(&self, li: usize, cache: &mut KvCache, rows: &[usize], qkv: &[f32], n: usize, width: usize) {
        let d = &self.dims;
        let (dh, nkv, cap) = (d.head_dim, d.n_kv_head, cache.cap);
        let (qd, kvd) = (d.q_dim(), d.kv_dim());
        for (bi, &r) in rows.iter().enumerate() {
            let start = cache.len[r];
            for i in 0..n {
                let src = &qkv[(bi * n + i) * width..(bi * n + i + 1) * width];
                for h in 0..nkv {
                    let dst = ((r * nkv + h) * cap + start + i) * dh;
                    cache.k[li][dst..dst + dh].copy_from_slice(&src[qd + h * dh..qd + (h + 1) * dh]);
                    cache.v[li][dst..dst + dh].copy_from_slice(&src[qd + kvd + h * dh..qd + kvd + (h + 1) * dh]);
                }
            }
        }
    }

    /// Softmax attention of the `n` new queries of each row over its cached, non-pad keys (the
    /// last `window` of them in a local layer).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        window: Option<usize>,
        cache: &KvCache,
        rows: &[usize],
        qkv: &[f32],
        n: usize,
        width: usize,
    ) -> Vec<f32> {
        let d = &self.dims;
        let (dh, nh, nkv, cap) = (d.head_dim, d.n_head, d.n_kv_head, cache.cap);
        let rep = nh / nkv;
        let scale = 1.0 / (dh as f32).sqrt();
        let (kc, vc) = (&cache.k[li], &cache.v[li]);
        let mut out = vec![0.0f32; rows.len() * n * d.q_dim()];
        let row_fn = |(bi, out_r): (usize, &mut [f32])| {
            let r = rows[bi];
            let (pad, start) = (cache.pad[r], cache.len[r]);
            let mut scores = vec![0.0f32; start + n];
            for i in 0..n {
                let col = start + i;
                if col < pad {
                    continue; // a pad query: its output is never used
                }
                let q_row = &qkv[(bi * n + i) * width..];
                for h in 0..nh {
                    let base = (r * nkv + h / rep) * cap;
                    let first = window.map_or(pad, |w| pad.max((col + 1).saturating_sub(w)));
                    let keys = (base + first) * dh..(base + col + 1) * dh;
                    let o = &mut out_r[i * nh * dh + h * dh..i * nh * dh + (h + 1) * dh];
                    let q = &q_row[h * dh..(h + 1) * dh];
                    attend(q, &kc[keys.clone()], &vc[keys], (scale, d.attn_softcap), &mut scores, o);
                }
            }
        };
        let chunk = n * d.q_dim();
        if rows.len() >= 4 {
            out.par_chunks_mut(chunk).enumerate().for_each(row_fn);
        } else {
            out.chunks_mut(chunk).enumerate().for_each(row_fn);
        }
        out
    }
}

/// RoPE at `positions` on the q and k columns of `qkv`'s rows (`width` wide) over each head's
/// first [`Dims::rotary_dim`] dimensions, cos and sin multiplied by the RoPE's factor as
/// [`rope::tables`] has them.
fn rope_rows(d: &Dims, rope: &Frequencies, qkv: &mut [f32], positions: &[usize], width: usize) {
    let (dh, rotary, inv_freq, scale) = (d.head_dim, d.rotary_dim(), &rope.inv_freq, rope.scale);
    let half = rotary / 2;
    let (mut cos, mut sin) = (vec![0.0f32; rotary], vec![0.0f32; rotary]);
    for (row, &p) in positions.iter().enumerate() {
        for i in 0..half {
            let (s, co) = (p as f32 * inv_freq[i]).sin_cos();
            let (s, co) = (s * scale, co * scale);
            (cos[i], cos[i + half], sin[i], sin[i + half]) = (co, co, s, s);
        }
        let r = &mut qkv[row * width..row * width + d.q_dim() + d.kv_dim()];
        for head in r.chunks_mut(dh) {
            rope::apply(&mut head[..rotary], &cos, &sin);
        }
    }
}

/// `x += scale · norm(y)`: a branch's output `y` through Gemma's post norm (if any) and times
/// Granite's residual multiplier into the residual stream.
fn add_branch(x: &mut [f32], y: &mut [f32], norm: Option<&NormW>, scale: f32) {
    if let Some(norm) = norm {
        apply_norm(norm, y, norm.w.len());
    }
    x.iter_mut().zip(y.iter()).for_each(|(x, y)| *x += scale * y);
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
}

/// Applies an in-place slice kernel, in parallel chunks when the slice is large.
fn par_apply(x: &mut [f32], f: fn(&mut [f32])) {
    if x.len() >= 1 << 15 {
        x.par_chunks_mut(1 << 13).for_each(f);
    } else {
        f(x);
    }
}

fn apply_norm(n: &NormW, x: &mut [f32], c: usize) {
    let one = |row: &mut [f32]| {
        let inv = match n.kind {
            NormKind::LayerNorm => {
                let mean = row.iter().sum::<f32>() / c as f32;
                row.iter_mut().for_each(|v| *v -= mean);
                let var = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
                1.0 / (var + n.eps).sqrt()
            }
            NormKind::RmsNorm => 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / c as f32 + n.eps).sqrt(),
        };
        match &n.b {
            Some(b) => row.iter_mut().zip(&n.w).zip(b).for_each(|((v, w), b)| *v = *v * inv * w + b),
            None => row.iter_mut().zip(&n.w).for_each(|(v, w)| *v = *v * inv * w),
        }
    };
    if x.len() >= 1 << 15 {
        x.par_chunks_mut(c).for_each(one);
    } else {
        x.chunks_mut(c).for_each(one);
    }
}
