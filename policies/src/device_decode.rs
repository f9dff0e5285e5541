//! KV-cached decoding with dfdx ops, on any device: the rollout path where the weights live,
//! e.g. on a GPU. (On the CPU, [`InferenceModel`](crate::InferenceModel)'s host kernels are the
//! fast path; this one is pinned to them and to transformers by tests.)
//!
//! Each call feeds `n` new columns per row: the whole left-padded prompt batch first (prefill),
//! then one sampled token per row. Per layer the cache holds keys and values as `(B, Hkv, L,
//! Dh)` tensors that grow by concatenation; attention is `softmax(q·kᵀ/√Dh + mask)·v` over the
//! cached columns, with pad columns and future columns masked.

use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use rlhf_envs::{Action, EnvError, Policy};

use crate::error::PolicyError;
use crate::fused::FusedOps;
use crate::infer::LogitsAt;
use crate::model::CausalLm;
use crate::nucleus::RowLogits;
use crate::sampling::{row_seed, SamplingConfig};
use crate::session::{model_err, sample_rows};

type A2<D> = Tensor<(usize, usize), f32, D>;
type A4<D> = Tensor<(usize, usize, usize, usize), f32, D>;

/// The device cache of [`CausalLm::decode`]: per layer, keys and values `(B, Hkv, L, Dh)`.
#[derive(Debug, Clone)]
pub struct DeviceKv<D: Storage<f32>> {
    pad: Vec<usize>,
    len: usize,
    cap: usize,
    k: Vec<Option<A4<D>>>,
    v: Vec<Option<A4<D>>>,
}

impl<D: Storage<f32>> DeviceKv<D> {
    /// An empty cache for `pad.len()` rows of at most `cap` columns; row `r`'s first `pad[r]`
    /// columns are left padding.
    pub fn new(layers: usize, pad: Vec<usize>, cap: usize) -> Self {
        DeviceKv { pad, len: 0, cap, k: vec![None; layers], v: vec![None; layers] }
    }

    /// Columns filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<D: FusedOps> CausalLm<D> {
    /// Feeds `ids` `(B, n)` as the next `n` columns of every cache row and returns logits on the
    /// host: `(B·n, V)` for [`LogitsAt::All`], `(B, V)` for [`LogitsAt::Last`]. A row's
    /// position at column `j` is `j − pad[r]`; its pad columns are never attended to.
    pub fn decode(
        &self,
        cache: &mut DeviceKv<D>,
        ids: &[u32],
        n: usize,
        at: LogitsAt,
    ) -> Result<Vec<f32>, PolicyError> {
        let (b, l0, dims) = (cache.pad.len(), cache.len, &self.dims);
        if n == 0 || ids.len() != b * n {
            return Err(PolicyError::Input(format!("decode: {} ids for {b} rows of {n} columns", ids.len())));
        }
        if l0 + n > cache.cap {
            return Err(PolicyError::Input(format!("decode: {} columns exceed the cache's {}", l0 + n, cache.cap)));
        }
        let pad = &cache.pad;
        let positions: Vec<usize> = pad.iter().flat_map(|&p| (l0..l0 + n).map(move |j| j.saturating_sub(p))).collect();
        dims.check_step(ids, &positions)?;
        let l = l0 + n;
        // (B, n, L) masks: a key column is visible if it is real and not in the future
        let hidden = |r: usize, i: usize, j: usize| j < pad[r] || j > l0 + i;
        let (_, inputs) = self.layer_inputs((b, n, l), l0, &positions, hidden);
        let ids: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let mut x = self.embed(NoneTape, &ids, &positions);
        let (nh, nkv, dh) = (dims.n_head, dims.n_kv_head, dims.head_dim);
        for (layer, blk) in self.blocks.iter().enumerate() {
            let h = blk.ln1.as_ref().map_or_else(|| x.clone(), |n| n.forward(x.clone()));
            let q = blk.wq.forward(h.clone());
            let k = blk.wk.forward(h.clone());
            let v = blk.wv.forward(h);
            let (mask, rope) = inputs.for_layer(blk.window, blk.rope);
            let (q, k) = blk.positioned_qk(q, k, rope, dims);
            let heads = |t: A2<D>, hs: usize| -> A4<D> {
                // (B·n, hs·Dh) → (B, hs, n, Dh), made contiguous
                let t = t.reshape_like(&(b, n, hs, dh)).permute::<_, Axes4<0, 2, 1, 3>>();
                t.reshape_like(&(b, hs, n, dh))
            };
            let keys = append(&mut cache.k[layer], heads(k, nkv));
            let values = append(&mut cache.v[layer], heads(v, nkv));
            let (keys, values) = (repeat_heads(keys, nh), repeat_heads(values, nh));
            let scores = heads(q, nh).matmul(keys.permute::<_, Axes4<0, 1, 3, 2>>()) * (1.0 / (dh as f32).sqrt());
            let scores = crate::softcap::softcap_tensor(scores, dims.attn_softcap);
            let scores = scores + mask.clone().broadcast_like::<_, Axis<1>>(&(b, nh, n, l));
            let y = scores.softmax::<Axis<3>>().matmul(values); // (B, H, n, Dh)
            let y = y.permute::<_, Axes4<0, 2, 1, 3>>().reshape_like(&(b * n, nh * dh));
            let x1 = blk.attn_out(y, &x, dims);
            x = blk.mlp_out(crate::model::Block::mlp_input(x, &x1, dims), &x1, dims);
        }
        cache.len = l;
        if at == LogitsAt::Last {
            let rows: Vec<usize> = (0..b).map(|r| r * n + n - 1).collect();
            x = D::select_rows(x, &rows);
        }
        Ok(self.logits(self.ln_f.forward(x)).as_vec())
    }
}

/// `cache ← [cache, new]` along the column axis (2) of `(B, Hkv, L, Dh)`; returns the result.
fn append<D: FusedOps>(cache: &mut Option<A4<D>>, new: A4<D>) -> A4<D> {
    let all = match cache.take() {
        None => new,
        Some(old) => (old, new).concat_along(Axis::<2>),
    };
    *cache = Some(all.clone());
    all
}

/// `(B, Hkv, L, Dh)` → `(B, H, L, Dh)`, query head `j` reading KV head `j / (H / Hkv)`.
fn repeat_heads<D: FusedOps>(x: A4<D>, nh: usize) -> A4<D> {
    let (b, nkv, l, dh) = *x.shape();
    if nkv == nh {
        return x;
    }
    x.broadcast_like::<_, Axis<2>>(&(b, nkv, nh / nkv, l, dh)).reshape_like(&(b, nh, l, dh))
}

/// The env's [`Policy`] over [`CausalLm::decode`]: every row of the batch begins together and
/// advances in lockstep (a row that has ended is fed a pad id, and its logits are ignored),
/// which is how [`VecEnv::rollout_with`](rlhf_envs::VecEnv::rollout_with) drives a policy.
/// Sampling is [`EngineSession`](crate::EngineSession)'s, with the same per-row RNG streams.
#[derive(Debug)]
pub struct DeviceSession<'m, D: FusedOps> {
    model: &'m CausalLm<D>,
    rows: usize,
    capacity: usize,
    cache: Option<DeviceKv<D>>,
    logits: Vec<Vec<f32>>,
    steps: Vec<usize>,
    rngs: Vec<StdRng>,
    sampling: SamplingConfig,
}

impl<'m, D: FusedOps> DeviceSession<'m, D> {
    /// `rows` streams of at most `capacity` tokens each (prompt + response).
    pub fn new(model: &'m CausalLm<D>, rows: usize, capacity: usize, sampling: SamplingConfig) -> Self {
        let rngs = (0..rows).map(|r| StdRng::seed_from_u64(row_seed(sampling.seed, r))).collect();
        DeviceSession {
            model,
            rows,
            capacity,
            cache: None,
            logits: vec![vec![]; rows],
            steps: vec![0; rows],
            rngs,
            sampling,
        }
    }

    fn store(&mut self, rows: &[usize], logits: &[f32]) {
        let v = self.model.dims.vocab;
        for &r in rows {
            self.logits[r] = logits[r * v..(r + 1) * v].to_vec();
        }
    }
}

impl<D: FusedOps> RowLogits for DeviceSession<'_, D> {
    fn row_logits(&self, row: usize) -> Result<&[f32], EnvError> {
        match self.logits.get(row) {
            Some(l) if !l.is_empty() => Ok(l),
            _ => Err(EnvError::Model(format!("row {row} has not begun"))),
        }
    }
}

impl<D: FusedOps> Policy for DeviceSession<'_, D> {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        if rows.len() != prompts.len() {
            return Err(EnvError::Count { what: "prompts", expected: rows.len(), got: prompts.len() });
        }
        if !rows.iter().copied().eq(0..self.rows) {
            return Err(EnvError::Model(format!(
                "the device session begins all {} rows together, in order (got rows {rows:?})",
                self.rows
            )));
        }
        if let Some(r) = prompts.iter().position(|p| p.is_empty()) {
            return Err(EnvError::Model(format!("row {r}: empty prompt")));
        }
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pad: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let ids: Vec<u32> =
            prompts.iter().flat_map(|p| std::iter::repeat_n(0, t - p.len()).chain(p.iter().copied())).collect();
        let mut cache = DeviceKv::new(self.model.dims.n_layer, pad, self.capacity);
        let logits = self.model.decode(&mut cache, &ids, t, LogitsAt::Last).map_err(model_err)?;
        self.cache = Some(cache);
        self.store(rows, &logits);
        self.steps.iter_mut().for_each(|s| *s = 0);
        Ok(())
    }

    fn act(&mut self, rows: &[usize]) -> Result<Vec<Action>, EnvError> {
        if let Some(&r) = rows.iter().find(|&&r| self.logits.get(r).is_none_or(Vec::is_empty)) {
            return Err(EnvError::Model(format!("row {r} has not begun")));
        }
        sample_rows(rows, &self.logits, &self.steps, &mut self.rngs, &self.sampling)
    }

    fn push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError> {
        if rows.len() != tokens.len() {
            return Err(EnvError::Count { what: "tokens", expected: rows.len(), got: tokens.len() });
        }
        let cache = self.cache.as_mut().ok_or_else(|| EnvError::Model("push before begin".into()))?;
        let mut column = vec![0u32; self.rows];
        for (&r, &tok) in rows.iter().zip(tokens) {
            *column.get_mut(r).ok_or_else(|| EnvError::Model(format!("row {r} out of range")))? = tok;
        }
        let logits = self.model.decode(cache, &column, 1, LogitsAt::Last).map_err(model_err)?;
        self.store(rows, &logits);
        for &r in rows {
            self.steps[r] += 1;
        }
        Ok(())
    }
}
