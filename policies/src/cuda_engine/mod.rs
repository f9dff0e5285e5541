//! The fused CUDA decode engine: the host engine's ([`InferenceModel`](crate::InferenceModel))
//! KV-cached forward on a GPU, from a device copy of the weights, in nine launches per GPT-2
//! layer — two norms (each also adding the bias the residual stream owes from the previous
//! output projection), cuBLAS for each projection, one kernel for bias + RoPE + the KV-cache
//! write, one attention kernel per (token, head), bias + GELU (or SwiGLU) — where dfdx's
//! composed decode ([`CausalLm::decode`](crate::CausalLm::decode)) launched ~55 small kernels
//! per layer (334 per token on the workload's small model, measured on an H200;
//! docs/BENCHMARKS.md, "CUDA"). Its device buffers are reused from call to call, and each
//! forward uploads its per-token integers once. Logits come back to the host, where the
//! sessions sample exactly as on the host engine.
//!
//! The kernels (`kernels.cu`) are compiled once per process with NVRTC, and share GPU 0's
//! primary context with dfdx.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaDevice, CudaFunction, CudaSlice, DeviceRepr, LaunchAsync, LaunchConfig};
use dfdx::prelude::*;

use crate::config::{Dims, Family, Glu, NormKind};
use crate::error::PolicyError;
use crate::infer::LogitsAt;
use crate::model::{CausalLm, Mlp, Norm};
use crate::sampling::Decode;
use crate::session::RowEngine;

mod forward;

const KERNELS: &str = include_str!("kernels.cu");
const NAMES: [&str; 8] =
    ["embed", "row_norm", "qkv_prep", "attention", "bias_act", "swiglu", "gather_rows", "copy_span"];
/// Threads per block (kernels.cu's `BLOCK`).
const BLOCK: u32 = 256;

fn dev_err(e: impl std::fmt::Debug) -> PolicyError {
    PolicyError::Device(format!("CUDA engine: {e:?}"))
}

/// GPU 0, its cuBLAS handle and the compiled kernels, once per process.
struct Gpu {
    dev: Arc<CudaDevice>,
    blas: CudaBlas,
    f: Vec<CudaFunction>,
}

fn gpu() -> Result<Arc<Gpu>, PolicyError> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    let init = || -> Result<Arc<Gpu>, String> {
        let dev = CudaDevice::new(0).map_err(|e| format!("{e:?}"))?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| format!("compiling kernels.cu: {e:?}"))?;
        dev.load_ptx(ptx, "rlhf_engine", &NAMES).map_err(|e| format!("{e:?}"))?;
        let f: Result<Vec<_>, String> =
            NAMES.iter().map(|n| dev.get_func("rlhf_engine", n).ok_or(format!("kernel {n} missing"))).collect();
        let blas = CudaBlas::new(dev.clone()).map_err(|e| format!("{e:?}"))?;
        Ok(Arc::new(Gpu { dev, blas, f: f? }))
    };
    GPU.get_or_init(init).clone().map_err(|e| PolicyError::Device(format!("CUDA engine: {e}")))
}

/// Shapes passed to `qkv_prep` and `attention` (kernels.cu's `Shape`; cudarc launches take at
/// most twelve arguments).
#[repr(C)]
#[derive(Clone, Copy)]
struct Shape {
    width: i32,
    nh: i32,
    nkv: i32,
    dh: i32,
    cap: i32,
    has_bias: i32,
    rope: i32,
    scale: f32,
}
// SAFETY: plain `repr(C)` ints and a float, passed by value as kernels.cu's `Shape`.
unsafe impl DeviceRepr for Shape {}

struct NormG {
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
    rms: bool,
    eps: f32,
}

enum MlpG {
    Gelu { fc: CudaSlice<f32>, fc_b: Option<CudaSlice<f32>>, proj: CudaSlice<f32>, proj_b: Option<CudaSlice<f32>> },
    SwiGlu { gate_up: CudaSlice<f32>, down: CudaSlice<f32> },
}

struct LayerG {
    ln1: NormG,
    /// `(C, q_dim + 2·kv_dim)`: q | k | v columns.
    qkv: CudaSlice<f32>,
    qkv_b: Option<CudaSlice<f32>>,
    o: CudaSlice<f32>,
    o_b: Option<CudaSlice<f32>>,
    ln2: NormG,
    mlp: MlpG,
}

/// The engine: a GPU copy of one model's weights (f32, the training forward's numbers).
pub struct CudaEngine {
    gpu: Arc<Gpu>,
    /// Sizes.
    pub dims: Dims,
    wte: CudaSlice<f32>,
    wpe: Option<CudaSlice<f32>>,
    layers: Vec<LayerG>,
    ln_f: NormG,
    /// `(V, C)`: the LM head, or the tied embedding.
    head: CudaSlice<f32>,
    inv_freq: CudaSlice<f32>,
    /// Bound where a kernel's optional buffer is absent.
    none: CudaSlice<f32>,
    /// The forward's device buffers, reused from call to call.
    scratch: Mutex<forward::Scratch>,
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEngine").field("dims", &self.dims).finish_non_exhaustive()
    }
}

/// A KV cache on the GPU with the host engine's [`KvCache`](crate::KvCache) layout and rules:
/// per layer `(rows, Hkv, cap, Dh)`, a fill level and left padding per row. Its buffers are
/// allocated by the first forward (errors surface there).
pub struct CudaKvCache {
    rows: usize,
    cap: usize,
    len: Vec<usize>,
    pad: Vec<usize>,
    kv: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache").field("rows", &self.rows).field("cap", &self.cap).finish_non_exhaustive()
    }
}

impl CudaKvCache {
    /// An empty cache for `pad.len()` rows of at most `cap` columns.
    pub fn new(pad: Vec<usize>, cap: usize) -> Self {
        CudaKvCache { rows: pad.len(), cap, len: vec![0; pad.len()], pad, kv: vec![] }
    }
    /// Empties `row` for a new sequence with `pad` left-pad columns.
    pub fn reset_row(&mut self, row: usize, pad: usize) {
        self.len[row] = 0;
        self.pad[row] = pad;
    }
}

impl CudaEngine {
    /// Copies `model`'s weights (on any device) to GPU 0. Needs an even head width (RoPE's
    /// halves; every supported config has one), and none of Qwen3's, Gemma 3's, GPT-NeoX's or
    /// Phi-4-mini's extras (q/k head norms, …).
    pub fn from_model<D: Device<f32>>(model: &CausalLm<D>) -> Result<Self, PolicyError> {
        let gpu = gpu()?;
        let dims = model.dims;
        if !dims.head_dim.is_multiple_of(2) {
            return Err(PolicyError::Input(format!("the CUDA engine needs an even head_dim, got {}", dims.head_dim)));
        }
        let gemma = dims.post_norms || dims.embed_scale != 1.0 || dims.query_scale != 1.0 || dims.glu != Glu::Silu;
        let gemma = gemma || dims.attn_softcap.is_some() || dims.final_softcap.is_some();
        let granite = dims.residual_scale != 1.0 || dims.logit_scale != 1.0;
        let neox = dims.family == Family::GptNeox || dims.partial_rotary.is_some();
        let longrope = crate::rope::attention_factor(&dims) != 1.0;
        let nope = model.blocks.iter().any(|b| !b.rope) && dims.rotary();
        let olmo2 = !dims.pre_norms;
        if dims.qk_norm || gemma || granite || olmo2 || dims.sliding_window.is_some() || neox || longrope || nope {
            let msg = "the fused CUDA engine has no kernels for Qwen3's and Gemma 3's q/k head norms, Gemma's other \
                       parts (Gemma 2's soft caps among them), Granite's multipliers, OLMo 2's post-norm blocks, sliding windows, GPT-NeoX's and Phi-4-mini's partial RoPE, LongRoPE's attention \
                       factor, SmolLM3's NoPE layers, or GPT-NeoX's parallel residual: use rollout_engine \
                       \"device\" (the default on a GPU)";
            return Err(PolicyError::Input(msg.into()));
        }
        let up = |v: Vec<f32>| gpu.dev.htod_copy(v).map_err(dev_err);
        let up_t = |t: &Tensor<(usize,), f32, D>| up(t.as_vec());
        let pre_norms = || PolicyError::Input("the CUDA engine runs pre-norm blocks only".into());
        let norm = |n: &Norm<D>| -> Result<NormG, PolicyError> {
            let b = n.b.as_ref().map(up_t).transpose()?;
            Ok(NormG { w: up_t(&n.w)?, b, rms: n.kind == NormKind::RmsNorm, eps: n.eps })
        };
        let c = dims.d_model;
        let mut layers = Vec::with_capacity(model.blocks.len());
        for blk in &model.blocks {
            let qkv = crate::infer::concat_cols(
                &[
                    (blk.wq.merged_w(), dims.q_dim()),
                    (blk.wk.merged_w(), dims.kv_dim()),
                    (blk.wv.merged_w(), dims.kv_dim()),
                ],
                c,
            );
            let zeros = || vec![0.0; dims.kv_dim()];
            let qkv_b = match &blk.wq.b {
                Some(bq) => {
                    let mut b = bq.as_vec();
                    b.extend(blk.wk.b.as_ref().map(|t| t.as_vec()).unwrap_or_else(zeros));
                    b.extend(blk.wv.b.as_ref().map(|t| t.as_vec()).unwrap_or_else(zeros));
                    Some(up(b)?)
                }
                None => None,
            };
            let mlp = match &blk.mlp {
                Mlp::Gelu { fc, proj } => MlpG::Gelu {
                    fc: up(fc.merged_w())?,
                    fc_b: fc.b.as_ref().map(up_t).transpose()?,
                    proj: up(proj.merged_w())?,
                    proj_b: proj.b.as_ref().map(up_t).transpose()?,
                },
                Mlp::SwiGlu { gate, up: u, down } => MlpG::SwiGlu {
                    gate_up: up(crate::infer::concat_cols(
                        &[(gate.merged_w(), dims.d_ff), (u.merged_w(), dims.d_ff)],
                        c,
                    ))?,
                    down: up(down.merged_w())?,
                },
            };
            layers.push(LayerG {
                ln1: norm(blk.ln1.as_ref().ok_or_else(pre_norms)?)?,
                qkv: up(qkv)?,
                qkv_b,
                o: up(blk.wo.merged_w())?,
                o_b: blk.wo.b.as_ref().map(up_t).transpose()?,
                ln2: norm(blk.ln2.as_ref().ok_or_else(pre_norms)?)?,
                mlp,
            });
        }
        let inv_freq = if dims.rotary() { crate::rope::inv_freq(&dims) } else { vec![0.0] };
        Ok(CudaEngine {
            dims,
            wte: up(model.wte.as_vec())?,
            wpe: model.wpe.as_ref().map(|w| up(w.as_vec())).transpose()?,
            layers,
            ln_f: norm(&model.ln_f)?,
            head: up(model.lm_head.as_ref().unwrap_or(&model.wte).as_vec())?,
            inv_freq: up(inv_freq)?,
            none: up(vec![0.0])?,
            scratch: Mutex::new(forward::Scratch::new(&gpu.dev)?),
            gpu,
        })
    }

    fn launch<P>(&self, k: usize, cfg: LaunchConfig, params: P) -> Result<(), PolicyError>
    where
        CudaFunction: LaunchAsync<P>,
    {
        // SAFETY: every call site passes the argument list of kernels.cu's kernel `NAMES[k]`,
        // with buffers sized for the indices the kernel derives from its shape arguments.
        unsafe { self.gpu.f[k].clone().launch(cfg, params) }.map_err(dev_err)
    }

    /// Row-major `y (m×n) = x (m×k) · w (k×n) + beta·y`.
    fn matmul(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (m, k, n): (usize, usize, usize),
        beta: f32,
    ) -> Result<(), PolicyError> {
        let (m, k, n) = (m as i32, k as i32, n as i32);
        let op = cublasOperation_t::CUBLAS_OP_N;
        // column-major: yᵀ (n×m) = wᵀ (n×k) · xᵀ (k×m)
        let cfg = GemmConfig { transa: op, transb: op, m: n, n: m, k, alpha: 1.0, lda: n, ldb: k, beta, ldc: n };
        // SAFETY: the slices hold k·n, m·k and m·n floats (the callers' buffers are sized so).
        unsafe { self.gpu.blas.gemm(cfg, w, x, y) }.map_err(dev_err)
    }

    /// `out = norm(x)` over `rows` rows, after `x += xb` in place when `xb` is given (a bias
    /// the residual stream still owes).
    fn norm(
        &self,
        n: &NormG,
        out: &mut CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        xb: Option<&CudaSlice<f32>>,
        rows: usize,
    ) -> Result<(), PolicyError> {
        let c = self.dims.d_model as i32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let b = n.b.as_ref().unwrap_or(&self.none);
        let (has_b, has_xb) = (n.b.is_some() as i32, xb.is_some() as i32);
        self.launch(1, cfg, (out, x, &n.w, b, c, n.eps, n.rms as i32, has_b, xb.unwrap_or(&self.none), has_xb))
    }

    /// `x += b` (if any), then the activation (0 none, 1 GELU tanh, 2 GELU erf) over `(m, n)`.
    fn bias_act(
        &self,
        x: &mut CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        m: usize,
        n: usize,
        act: i32,
    ) -> Result<(), PolicyError> {
        if b.is_none() && act == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig::for_num_elems((m * n) as u32);
        self.launch(4, cfg, (x, b.unwrap_or(&self.none), m as i32, n as i32, b.is_some() as i32, act))
    }
}

/// [`crate::sampling::generate`] on the engine: every row fed at once.
impl Decode for CudaEngine {
    type Cache = CudaKvCache;
    fn dims(&self) -> &Dims {
        &self.dims
    }
    fn new_cache(&self, pad: Vec<usize>, cap: usize) -> CudaKvCache {
        CudaKvCache::new(pad, cap)
    }
    fn feed(&self, cache: &mut CudaKvCache, ids: &[u32], n: usize) -> Result<Vec<f32>, PolicyError> {
        let rows: Vec<usize> = (0..cache.rows).collect();
        RowEngine::forward_rows(self, cache, &rows, ids, n, LogitsAt::Last)
    }
}
