//! The engine's forward: [`InferenceModel::forward_rows`](crate::InferenceModel::forward_rows)
//! step for step on the GPU.

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig};

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

impl CudaEngine {
    /// An uninitialised device buffer of `n` floats (every caller writes it before reading).
    fn scratch(&self, n: usize) -> Result<CudaSlice<f32>, PolicyError> {
        // SAFETY: f32 has no invalid bit patterns, and the buffer is written before use.
        unsafe { self.gpu.dev.alloc::<f32>(n.max(1)) }.map_err(dev_err)
    }

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

    /// `x += mlp(h)` over `m` rows.
    fn mlp(&self, mlp: &MlpG, h: &CudaSlice<f32>, x: &mut CudaSlice<f32>, m: usize) -> Result<(), PolicyError> {
        let (c, f) = (self.dims.d_model, self.dims.d_ff);
        match mlp {
            MlpG::Gelu { fc, fc_b, proj, proj_b } => {
                let mut a = self.scratch(m * f)?;
                self.matmul(h, fc, &mut a, (m, c, f), 0.0)?;
                let act = if self.dims.gelu == GeluKind::Erf { 2 } else { 1 };
                self.bias_act(&mut a, fc_b.as_ref(), m, f, act)?;
                self.matmul(&a, proj, x, (m, f, c), 1.0)?;
                self.bias_act(x, proj_b.as_ref(), m, c, 0)
            }
            MlpG::SwiGlu { gate_up, down } => {
                let (mut gu, mut a) = (self.scratch(m * 2 * f)?, self.scratch(m * f)?);
                self.matmul(h, gate_up, &mut gu, (m, c, 2 * f), 0.0)?;
                self.launch(SWIGLU, LaunchConfig::for_num_elems((m * f) as u32), (&mut a, &gu, m as i32, f as i32))?;
                self.matmul(&a, down, x, (m, f, c), 1.0)
            }
        }
    }

    /// The final norm and the LM head at the requested positions of the `(m = B·n, C)` hidden
    /// states, copied to the host.
    fn logits(&self, x: CudaSlice<f32>, m: usize, n: usize, at: LogitsAt) -> Result<Vec<f32>, PolicyError> {
        let (c, v) = (self.dims.d_model, self.dims.vocab);
        let (picked, p) = match at {
            LogitsAt::All => (x, m),
            LogitsAt::Last => {
                let rows: Vec<u32> = (0..m / n).map(|r| (r * n + n - 1) as u32).collect();
                let rows_d = self.gpu.dev.htod_copy(rows).map_err(dev_err)?;
                let mut out = self.scratch((m / n) * c)?;
                self.launch(GATHER_ROWS, grid(m / n, BLOCK), (&mut out, &x, &rows_d, c as i32))?;
                (out, m / n)
            }
        };
        let mut hn = self.scratch(p * c)?;
        self.norm(&self.ln_f, &mut hn, &picked, p)?;
        let mut logits = self.scratch(p * v)?;
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
        // SAFETY: head is V·C floats, hn p·C, logits p·V.
        unsafe { self.gpu.blas.gemm(cfg, &self.head, &hn, &mut logits) }.map_err(dev_err)?;
        self.gpu.dev.dtoh_sync_copy(&logits).map_err(dev_err)
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
        // per token: ids | positions | cache columns | row padding as one upload, and the
        // cache offset of (row, kv head 0, column) as another
        let mut ints: Vec<u32> = Vec::with_capacity(4 * m);
        ints.extend_from_slice(ids);
        ints.extend(positions.iter().map(|&p| p as u32));
        ints.extend((0..m).map(|i| (cache.len[rows[i / n]] + i % n) as u32));
        ints.extend((0..m).map(|i| cache.pad[rows[i / n]] as u32));
        let slot: Vec<u64> =
            (0..m).map(|i| ((rows[i / n] * d.n_kv_head * cap + ints[2 * m + i] as usize) * dh) as u64).collect();
        let dev = &self.gpu.dev;
        let (ints_d, slot_d) = (dev.htod_copy(ints).map_err(dev_err)?, dev.htod_copy(slot).map_err(dev_err)?);
        let [ids_d, pos_d, col_d, pad_d] = [0, 1, 2, 3].map(|k| ints_d.slice(k * m..(k + 1) * m));

        let mut x = self.scratch(m * c)?;
        let wpe = self.wpe.as_ref().unwrap_or(&self.none);
        let has_wpe = self.wpe.is_some() as i32;
        self.launch(EMBED, grid(m, BLOCK), (&mut x, &self.wte, wpe, &ids_d, &pos_d, c as i32, has_wpe))?;
        let (mut h, mut qkv) = (self.scratch(m * c)?, self.scratch(m * width)?);
        let (mut att, mut scores) = (self.scratch(m * d.q_dim())?, self.scratch(m * d.n_head * cap)?);
        let rope = (d.family == crate::config::Family::Llama) as i32;
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
            self.norm(&l.ln1, &mut h, &x, m)?;
            self.matmul(&h, &l.qkv, &mut qkv, (m, c, width), 0.0)?;
            let bias = l.qkv_b.as_ref().unwrap_or(&self.none);
            self.launch(
                QKV_PREP,
                grid(m, BLOCK),
                (&mut qkv, bias, &pos_d, &slot_d, &mut *kc, &mut *vc, &self.inv_freq, shape),
            )?;
            let cfg = LaunchConfig {
                grid_dim: (m as u32, d.n_head as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: (dh * 4) as u32,
            };
            self.launch(ATTENTION, cfg, (&mut att, &qkv, &*kc, &*vc, &slot_d, &col_d, &pad_d, &mut scores, shape))?;
            self.matmul(&att, &l.o, &mut x, (m, d.q_dim(), c), 1.0)?;
            self.bias_act(&mut x, l.o_b.as_ref(), m, c, 0)?;
            self.norm(&l.ln2, &mut h, &x, m)?;
            self.mlp(&l.mlp, &h, &mut x, m)?;
        }
        for &r in rows {
            cache.len[r] += n;
        }
        self.logits(x, m, n, at)
    }
}
