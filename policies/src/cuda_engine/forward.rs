//! The engine's forward: [`InferenceModel::forward_rows`](crate::InferenceModel::forward_rows)
//! step for step on the GPU.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaDevice, CudaSlice, DeviceRepr, DeviceSlice, LaunchConfig};

use super::{dev_err, CudaEngine, CudaKvCache, MlpG, Shape, BLOCK};
use crate::config::{Dims, GeluKind};
use crate::error::PolicyError;
use crate::infer::{row_positions, LogitsAt};
use crate::session::RowEngine;

/// Kernel indices in [`super::NAMES`].
const EMBED: usize = 0;
const QKV_PREP: usize = 2;
const ATTENTION: usize = 3;
const SWIGLU: usize = 5;
const GATHER_ROWS: usize = 6;
const COPY_SPAN: usize = 7;

/// Threads per attention block (one (token, head) pair).
const ATTN_THREADS: u32 = 128;

fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Device buffers reused by every forward, grown on demand and never shrunk, so that a decode
/// step allocates nothing on the GPU: the per-token integers, the activations, the attention
/// scores and the logits.
pub(super) struct Scratch {
    /// Per token: ids | positions | cache columns | row padding | cache rows; then the rows of
    /// x whose logits are asked for, when not all of them.
    ints: CudaSlice<u32>,
    act: Acts,
}

/// The float buffers of [`Scratch`].
struct Acts {
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    /// The MLP's hidden activations, and SwiGLU's fused gate|up rows.
    a: CudaSlice<f32>,
    gu: CudaSlice<f32>,
    /// The rows whose logits are asked for, and their final norm.
    picked: CudaSlice<f32>,
    hn: CudaSlice<f32>,
    logits: CudaSlice<f32>,
}

impl Scratch {
    pub(super) fn new(dev: &Arc<CudaDevice>) -> Result<Self, PolicyError> {
        let f = || dev.alloc_zeros::<f32>(1).map_err(dev_err);
        let ints = dev.alloc_zeros::<u32>(1).map_err(dev_err)?;
        let (x, h, qkv, att, scores) = (f()?, f()?, f()?, f()?, f()?);
        let act = Acts { x, h, qkv, att, scores, a: f()?, gu: f()?, picked: f()?, hn: f()?, logits: f()? };
        Ok(Scratch { ints, act })
    }
}

/// Makes `buf` hold at least `n` elements (its contents are not kept: every caller writes a
/// buffer before reading it).
fn fit<T: DeviceRepr>(dev: &Arc<CudaDevice>, buf: &mut CudaSlice<T>, n: usize) -> Result<(), PolicyError> {
    if buf.len() < n {
        // SAFETY: the element types here (f32, u32) have no invalid bit patterns, and the
        // buffer is written before use.
        *buf = unsafe { dev.alloc::<T>(n) }.map_err(dev_err)?;
    }
    Ok(())
}

impl CudaEngine {
    fn ensure_cache(&self, cache: &mut CudaKvCache) -> Result<(), PolicyError> {
        if cache.kv.is_empty() {
            let d = &self.dims;
            let size = cache.rows * d.n_kv_head * cache.cap * d.head_dim;
            for _ in 0..d.n_layer {
                let k = self.gpu.dev.alloc_zeros::<f32>(size.max(1)).map_err(dev_err)?;
                let v = self.gpu.dev.alloc_zeros::<f32>(size.max(1)).map_err(dev_err)?;
                cache.kv.push((k, v));
            }
        }
        Ok(())
    }

    /// `x += mlp(h)` over `m` rows, except the output projection's bias, which is returned for
    /// the next norm to add.
    fn mlp<'w>(&self, mlp: &'w MlpG, s: &mut Acts, m: usize) -> Result<Option<&'w CudaSlice<f32>>, PolicyError> {
        let (c, f) = (self.dims.d_model, self.dims.d_ff);
        let dev = &self.gpu.dev;
        fit(dev, &mut s.a, m * f)?;
        match mlp {
            MlpG::Gelu { fc, fc_b, proj, proj_b } => {
                self.matmul(&s.h, fc, &mut s.a, (m, c, f), 0.0)?;
                let act = if self.dims.gelu == GeluKind::Erf { 2 } else { 1 };
                self.bias_act(&mut s.a, fc_b.as_ref(), m, f, act)?;
                self.matmul(&s.a, proj, &mut s.x, (m, f, c), 1.0)?;
                Ok(proj_b.as_ref())
            }
            MlpG::SwiGlu { gate_up, down } => {
                fit(dev, &mut s.gu, m * 2 * f)?;
                self.matmul(&s.h, gate_up, &mut s.gu, (m, c, 2 * f), 0.0)?;
                let cfg = LaunchConfig::for_num_elems((m * f) as u32);
                self.launch(SWIGLU, cfg, (&mut s.a, &s.gu, m as i32, f as i32))?;
                self.matmul(&s.a, down, &mut s.x, (m, f, c), 1.0)?;
                Ok(None)
            }
        }
    }

    /// The final norm (adding the residual stream's pending bias `xb`) and the LM head at the
    /// `p` rows of the `(m, C)` hidden states in `s.x` that the forward's integers list after
    /// their first `5·m` (all `m` rows when `p == m`), copied to the host.
    fn logits(
        &self,
        sc: &mut Scratch,
        xb: Option<&CudaSlice<f32>>,
        m: usize,
        p: usize,
    ) -> Result<Vec<f32>, PolicyError> {
        let (c, v) = (self.dims.d_model, self.dims.vocab);
        let dev = &self.gpu.dev;
        let s = &mut sc.act;
        fit(dev, &mut s.hn, p * c)?;
        fit(dev, &mut s.logits, p * v)?;
        if p == m {
            self.norm(&self.ln_f, &mut s.hn, &mut s.x, xb, p)?;
        } else {
            fit(dev, &mut s.picked, p * c)?;
            let rows_d = sc.ints.slice(5 * m..5 * m + p);
            self.launch(GATHER_ROWS, grid(p, BLOCK), (&mut s.picked, &s.x, &rows_d, c as i32))?;
            self.norm(&self.ln_f, &mut s.hn, &mut s.picked, xb, p)?;
        }
        // column-major: logitsᵀ (V×p) = head (V×C, stored as its transpose) · hnᵀ (C×p)
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: v as i32,
            n: p as i32,
            k: c as i32,
            alpha: 1.0,
            lda: c as i32,
            ldb: c as i32,
            beta: 0.0,
            ldc: v as i32,
        };
        // SAFETY: head is V·C floats, hn at least p·C, logits at least p·V.
        unsafe { self.gpu.blas.gemm(cfg, &self.head, &s.hn, &mut s.logits) }.map_err(dev_err)?;
        let mut out = vec![0.0f32; p * v];
        dev.dtoh_sync_copy_into(&s.logits.slice(0..p * v), &mut out).map_err(dev_err)?;
        Ok(out)
    }
}

/// The engine's rows: [`InferenceModel`](crate::InferenceModel)'s contract, on the GPU.
impl RowEngine for CudaEngine {
    type Cache = CudaKvCache;
    fn dims(&self) -> &Dims {
        &self.dims
    }
    fn row_cache(&self, rows: usize, cap: usize) -> CudaKvCache {
        CudaKvCache::new(vec![0; rows], cap)
    }
    fn reset_row(&self, cache: &mut CudaKvCache, row: usize, pad: usize) {
        cache.reset_row(row, pad);
    }

    /// Makes cache row `dst` a copy of row `src` (keys, values, fill level, padding).
    fn copy_row(&self, cache: &mut CudaKvCache, src: usize, dst: usize) -> Result<(), PolicyError> {
        self.ensure_cache(cache)?;
        let block = self.dims.n_kv_head * cache.cap * self.dims.head_dim;
        for (k, v) in cache.kv.iter_mut() {
            for buf in [k, v] {
                let args = (buf, (dst * block) as u64, (src * block) as u64, block as u64);
                self.launch(COPY_SPAN, LaunchConfig::for_num_elems(block as u32), args)?;
            }
        }
        cache.len[dst] = cache.len[src];
        cache.pad[dst] = cache.pad[src];
        Ok(())
    }

    /// Feeds `n` new columns of ids to the cache rows `rows` (`ids`: `(rows.len(), n)`), each at
    /// its own fill level; returns the logits requested, on the host, as the host engine does.
    fn forward_rows(
        &self,
        cache: &mut CudaKvCache,
        rows: &[usize],
        ids: &[u32],
        n: usize,
        at: LogitsAt,
    ) -> Result<Vec<f32>, PolicyError> {
        let d = &self.dims;
        let positions = row_positions(d, &cache.len, &cache.pad, cache.cap, rows, ids, n)?;
        self.ensure_cache(cache)?;
        let (c, m, cap, dh) = (d.d_model, rows.len() * n, cache.cap, d.head_dim);
        let width = d.q_dim() + 2 * d.kv_dim();
        let mut guard =
            self.scratch.lock().map_err(|_| dev_err("a forward panicked while holding the scratch buffers"))?;
        let sc = &mut *guard;
        let dev = &self.gpu.dev;
        // the rows of x whose logits are asked for: each cache row's last column, which with one
        // column per row is every row of x
        let picked: Vec<u32> = match at {
            LogitsAt::Last if n > 1 => (0..rows.len()).map(|r| (r * n + n - 1) as u32).collect(),
            _ => vec![],
        };
        let p = if picked.is_empty() { m } else { picked.len() };
        // per token: ids | positions | cache columns | row padding | cache rows; then `picked`;
        // one upload
        let mut ints: Vec<u32> = Vec::with_capacity(5 * m + picked.len());
        ints.extend_from_slice(ids);
        ints.extend(positions.iter().map(|&pos| pos as u32));
        ints.extend((0..m).map(|i| (cache.len[rows[i / n]] + i % n) as u32));
        ints.extend((0..m).map(|i| cache.pad[rows[i / n]] as u32));
        ints.extend((0..m).map(|i| rows[i / n] as u32));
        ints.extend(picked);
        fit(dev, &mut sc.ints, ints.len())?;
        dev.htod_sync_copy_into(&ints, &mut sc.ints.slice_mut(0..ints.len())).map_err(dev_err)?;
        let s = &mut sc.act;
        for (buf, len) in [(&mut s.x, m * c), (&mut s.h, m * c), (&mut s.qkv, m * width)] {
            fit(dev, buf, len)?;
        }
        fit(dev, &mut s.att, m * d.q_dim())?;
        fit(dev, &mut s.scores, m * d.n_head * cap)?;
        let [ids_d, pos_d, col_d, pad_d, row_d] = [0, 1, 2, 3, 4].map(|k| sc.ints.slice(k * m..(k + 1) * m));

        let wpe = self.wpe.as_ref().unwrap_or(&self.none);
        let has_wpe = self.wpe.is_some() as i32;
        self.launch(EMBED, grid(m, BLOCK), (&mut s.x, &self.wte, wpe, &ids_d, &pos_d, c as i32, has_wpe))?;
        let rope = d.rotary() as i32;
        // the residual stream's bias not yet added (the last output projection's): the next
        // norm adds it
        let mut pending: Option<&CudaSlice<f32>> = None;
        for (l, (kc, vc)) in self.layers.iter().zip(cache.kv.iter_mut()) {
            let shape = Shape {
                width: width as i32,
                nh: d.n_head as i32,
                nkv: d.n_kv_head as i32,
                dh: dh as i32,
                cap: cap as i32,
                has_bias: l.qkv_b.is_some() as i32,
                rope,
                scale: 1.0 / (dh as f32).sqrt(),
            };
            self.norm(&l.ln1, &mut s.h, &mut s.x, pending, m)?;
            self.matmul(&s.h, &l.qkv, &mut s.qkv, (m, c, width), 0.0)?;
            let bias = l.qkv_b.as_ref().unwrap_or(&self.none);
            let args = (&mut s.qkv, bias, &pos_d, &row_d, &col_d, &mut *kc, &mut *vc, &self.inv_freq, shape);
            self.launch(QKV_PREP, grid(m, BLOCK), args)?;
            let cfg = LaunchConfig {
                grid_dim: (m as u32, d.n_head as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: (dh * 4) as u32,
            };
            let args = (&mut s.att, &s.qkv, &*kc, &*vc, &row_d, &col_d, &pad_d, &mut s.scores, shape);
            self.launch(ATTENTION, cfg, args)?;
            self.matmul(&s.att, &l.o, &mut s.x, (m, d.q_dim(), c), 1.0)?;
            self.norm(&l.ln2, &mut s.h, &mut s.x, l.o_b.as_ref(), m)?;
            pending = self.mlp(&l.mlp, s, m)?;
        }
        for &r in rows {
            cache.len[r] += n;
        }
        self.logits(sc, pending, m, p)
    }
}
