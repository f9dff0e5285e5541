//! The runtime-shaped decoder-only transformer on dfdx: GPT-2, Llama and GPT-NeoX families.
//!
//! This is the *training* forward: every op is a dfdx op, so gradients flow through the tape
//! that travels with the tensors (see `../shared/docs/dfdx-notes.md` §2). The rollout path uses
//! the tape-free engine in [`crate::infer`], which a test pins to this forward.
//!
//! Shapes use nanoGPT's letters: `B` batch, `T` time, `C` = d_model, `V` vocab, `H` heads,
//! `Hkv` key/value heads, `Dh` head width. Activations are kept as `(B·T, C)` so each linear is
//! one gemm.

use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::Normal;

use crate::attention::AttnShape;
use crate::batch::Batch;
use crate::config::{Dims, Family, GeluKind, Glu, ModelConfig, NormKind};
use crate::error::PolicyError;
use crate::forward_ctx::{apply_rope, Ctx, Rope};
use crate::fused::FusedOps;
use crate::linear::{Affine, WeightLayout};
use crate::logprobs::Head;
use crate::params::FrozenTrunk;

/// 1-D parameter.
pub type T1<D> = Tensor<(usize,), f32, D>;
/// 2-D parameter.
pub type T2<D> = Tensor<(usize, usize), f32, D>;
/// A `(rows, cols)` activation carrying tape `T`.
pub type A2<D, T> = Tensor<(usize, usize), f32, D, T>;

/// An error for a row beyond `batch`'s positions.
fn check_rows(batch: &Batch, rows: &[usize]) -> Result<(), PolicyError> {
    match rows.iter().find(|&&r| r >= batch.b * batch.t) {
        Some(r) => {
            Err(PolicyError::Input(format!("hidden row {r} is beyond the batch's {}x{} positions", batch.b, batch.t)))
        }
        None => Ok(()),
    }
}

/// Additive mask value for keys a query may not see (exp underflows to exactly 0 in f32).
pub const MASKED: f32 = -1e9;

/// `y = x·W + b` with `W` stored `(in, out)` (GPT-2's Conv1D layout; Llama's `(out, in)` weights
/// are transposed when loaded).
#[derive(Debug, Clone)]
pub struct Linear<D: Storage<f32>> {
    /// Weight `(in, out)`.
    pub w: T2<D>,
    /// Optional bias `(out,)`.
    pub b: Option<T1<D>>,
    /// A LoRA update trained in place of `w` and `b` ([`crate::lora`]); `None` as loaded.
    pub lora: Option<Box<crate::lora::Lora<D>>>,
    /// `w` and `b` are frozen ([`CausalLm::set_frozen_trunk`]): a taped forward forms no
    /// gradient for them. Always so under a LoRA update.
    pub(crate) frozen: bool,
}

impl<D: Device<f32>> Linear<D> {
    fn new(dev: &D, init: &mut Init, i: usize, o: usize, std: f32, bias: bool) -> Self {
        let w = init.matrix(dev, (i, o), std);
        Linear { w, b: bias.then(|| dev.zeros_like(&(o,))), lora: None, frozen: false }
    }
}

/// How [`CausalLm::build`] fills the weight matrices: normal samples from one seeded stream
/// (a new model), or zeros (a model whose weights are about to be loaded: sampling them cost
/// as much as reading a checkpoint).
struct Init(Option<StdRng>);

impl Init {
    fn matrix<D: Device<f32>>(&mut self, dev: &D, shape: (usize, usize), std: f32) -> T2<D> {
        match &mut self.0 {
            Some(rng) => sample_normal(dev, rng, shape, std),
            None => dev.zeros_like(&shape),
        }
    }
}

impl<D: FusedOps> Linear<D> {
    /// `(N, in) → (N, out)`.
    pub fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>) -> A2<D, T> {
        self.forward_plus(x, None)
    }

    /// `(N, in) → r + x·W + b`: the block's output projections add the residual stream `r`
    /// (untaped; its gradient is recorded by id) in the same pass.
    pub fn forward_residual<T: Tape<f32, D>>(&self, x: A2<D, T>, r: &A2<D, NoneTape>) -> A2<D, T> {
        self.forward_plus(x, Some(r))
    }

    /// [`Linear::forward_residual`] with the residual optional.
    fn forward_plus<T: Tape<f32, D>>(&self, x: A2<D, T>, r: Option<&A2<D, NoneTape>>) -> A2<D, T> {
        match &self.lora {
            None => D::linear(
                x,
                Affine {
                    w: &self.w,
                    layout: WeightLayout::InOut,
                    b: self.b.as_ref(),
                    residual: r,
                    frozen: self.frozen,
                },
            ),
            Some(lora) => lora.forward(self, x, r),
        }
    }
}

/// LayerNorm (GPT-2, GPT-NeoX) or RMSNorm (Llama).
#[derive(Debug, Clone)]
pub struct Norm<D: Storage<f32>> {
    /// Gain `(C,)`, or with `unit_offset` the `w` of the gain `1 + w`.
    pub w: T1<D>,
    /// Bias `(C,)` (LayerNorm only).
    pub b: Option<T1<D>>,
    /// Which normalisation.
    pub kind: NormKind,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// The gain is `1 + w` (Gemma's RMSNorm, [`Dims::norm_unit_offset`]).
    pub unit_offset: bool,
}

impl<D: FusedOps> Norm<D> {
    fn new(dev: &D, dims: &Dims) -> Self {
        let c = dims.d_model;
        let kind = dims.norm();
        let b = (kind == NormKind::LayerNorm && dims.has_bias()).then(|| dev.zeros_like(&(c,)));
        Self::unit(dev, dims, c, kind, b)
    }

    /// A norm of width `c` with unit gain (`w` = 1, or 0 under a unit offset).
    fn unit(dev: &D, dims: &Dims, c: usize, kind: NormKind, b: Option<T1<D>>) -> Self {
        let w = if dims.norm_unit_offset { dev.zeros_like(&(c,)) } else { dev.ones_like(&(c,)) };
        Norm { w, b, kind, eps: dims.norm_eps, unit_offset: dims.norm_unit_offset }
    }

    /// `(N, C) → (N, C)`.
    pub fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>) -> A2<D, T> {
        let s = *x.shape();
        match (self.kind, &self.b) {
            // (x - mean) / sqrt(var_biased + eps) · w + b, fused on the CPU
            (NormKind::LayerNorm, b) => D::layer_norm(x, &self.w, b.as_ref(), self.eps),
            // x / sqrt(mean(x²) + eps) · w; x is used twice, so split its tape.
            (NormKind::RmsNorm, _) => {
                let (x, tape) = x.split_tape();
                let ms = x.retaped::<T>().square().mean::<(usize,), Axis<1>>();
                let inv = (ms + self.eps).sqrt().recip();
                let y = x.put_tape(tape) * inv.broadcast_like::<_, Axis<1>>(&s);
                let gain = if self.unit_offset { self.w.retaped::<T>() + 1.0 } else { self.w.retaped::<T>() };
                let y = y * gain.broadcast_like::<_, Axis<0>>(&s);
                match &self.b {
                    Some(b) => y + b.retaped::<T>().broadcast_like::<_, Axis<0>>(&s),
                    None => y,
                }
            }
        }
    }
}

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
pub enum Mlp<D: Storage<f32>> {
    /// GPT-2 and GPT-NeoX: `proj(gelu(fc(x)))`.
    Gelu {
        /// `(C, F)`.
        fc: Linear<D>,
        /// `(F, C)`.
        proj: Linear<D>,
    },
    /// Llama: `down(silu(gate(x)) * up(x))`; Gemma's GeGLU with the tanh GELU for SiLU
    /// ([`Dims::glu`]).
    SwiGlu {
        /// `(C, F)`.
        gate: Linear<D>,
        /// `(C, F)`.
        up: Linear<D>,
        /// `(F, C)`.
        down: Linear<D>,
    },
}

impl<D: FusedOps> Mlp<D> {
    /// `r + mlp(x)`, or `mlp(x)` without `r`.
    pub(crate) fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>, r: Option<&A2<D, NoneTape>>, dims: &Dims) -> A2<D, T> {
        let out = |l: &Linear<D>, a| l.forward_plus(a, r);
        match self {
            Mlp::Gelu { fc, proj } => out(proj, D::gelu(fc.forward(x), dims.gelu)),
            Mlp::SwiGlu { gate, up, down } => {
                let (x, tape) = x.split_tape();
                let g = gate.forward(x.clone().put_tape(tape));
                let u = up.forward(x.retaped::<T>());
                let act = match dims.glu {
                    Glu::Silu => {
                        let (g, tape) = g.split_tape();
                        g.clone().put_tape(tape) * g.retaped::<T>().sigmoid()
                    }
                    Glu::GeluTanh => D::gelu(g, GeluKind::Tanh),
                };
                out(down, act * u)
            }
        }
    }
}

/// One transformer block: pre-norm, with Gemma's post norms as well, or post-norm only (OLMo 2).
#[derive(Debug, Clone)]
pub struct Block<D: Storage<f32>> {
    /// Norm before attention (none in OLMo 2, [`Dims::pre_norms`]).
    pub ln1: Option<Norm<D>>,
    /// Query projection `(C, H·Dh)`.
    pub wq: Linear<D>,
    /// Key projection `(C, Hkv·Dh)`.
    pub wk: Linear<D>,
    /// Value projection `(C, Hkv·Dh)`.
    pub wv: Linear<D>,
    /// Output projection `(H·Dh, C)`.
    pub wo: Linear<D>,
    /// Qwen3's RMSNorms over each head's queries and keys before RoPE ([`Dims::qk_norm`]), or
    /// OLMo 2's over the whole projections ([`Dims::qk_norm_full`]).
    pub qk_norm: Option<[Norm<D>; 2]>,
    /// Norm before the MLP (none in OLMo 2).
    pub ln2: Option<Norm<D>>,
    /// Feed-forward.
    pub mlp: Mlp<D>,
    /// Gemma's and OLMo 2's norms on the attention's and the MLP's outputs, before each
    /// residual add ([`Dims::post_norms`]).
    pub post_norms: Option<[Norm<D>; 2]>,
    /// This layer's attention window ([`ModelConfig::layer_windows`]); `None`: every earlier
    /// position.
    pub window: Option<usize>,
    /// Whether this layer rotates its queries and keys ([`ModelConfig::layer_ropes`]: not
    /// SmolLM3's NoPE layers, nor GPT-2's).
    pub rope: bool,
}

impl<D: FusedOps> Block<D> {
    /// `(B·T, C) → (B·T, C)`, or `(rows, C)` with `rows`: the device's whole-block op where it
    /// has one for this block (see [`FusedOps::gpt2_block`]), else [`Block::forward_ops`].
    fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>, dims: &Dims, ctx: &Ctx<D>, rows: Option<&[usize]>) -> A2<D, T> {
        let x = match D::gpt2_block(x, self, ctx.block_inputs(dims), rows) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let y = self.forward_ops(x, dims, ctx);
        match rows {
            Some(rows) => D::select_rows(y, rows),
            None => y,
        }
    }

    /// The block op by op: norm, attention (+ residual), norm, MLP (+ residual).
    pub(crate) fn forward_ops<T: Tape<f32, D>>(&self, x: A2<D, T>, dims: &Dims, ctx: &Ctx<D>) -> A2<D, T> {
        // residual: keep an untaped handle, run the branch on the taped one; the branch's
        // output projection adds it back
        let (x, tape) = x.split_tape();
        let x1 = self.attention(pre_norm(&self.ln1, x.clone().put_tape(tape)), &x, dims, ctx);
        let (x1, tape) = x1.split_tape();
        self.mlp_out(Self::mlp_input(x, &x1, dims).put_tape(tape), &x1, dims)
    }

    /// What the MLP half reads: the attention half's output `x₁`, or with GPT-NeoX's parallel
    /// residual ([`Dims::parallel_residual`]) the block's input `x` (the output is then
    /// `x₁ + mlp(ln₂(x)) = x + attn(ln₁(x)) + mlp(ln₂(x))`).
    pub(crate) fn mlp_input(x: A2<D, NoneTape>, x1: &A2<D, NoneTape>, dims: &Dims) -> A2<D, NoneTape> {
        match dims.parallel_residual {
            true => x,
            false => x1.clone(),
        }
    }

    /// `r + o(y)` for the attention heads' output `y` `(N, H·Dh)`, with Gemma's norm on `o(y)`
    /// and Granite's multiplier ([`Dims::residual_scale`]).
    pub(crate) fn attn_out<T: Tape<f32, D>>(&self, y: A2<D, T>, r: &A2<D, NoneTape>, dims: &Dims) -> A2<D, T> {
        match &self.post_norms {
            None if dims.residual_scale == 1.0 => self.wo.forward_residual(y, r),
            None => self.wo.forward(y) * dims.residual_scale + r.clone(),
            Some([post, _]) => scaled(post.forward(self.wo.forward(y)), dims.residual_scale) + r.clone(),
        }
    }

    /// `r + mlp(ln2(x))`, with Gemma's norm on `mlp(…)` and Granite's multiplier.
    pub(crate) fn mlp_out<T: Tape<f32, D>>(&self, x: A2<D, T>, r: &A2<D, NoneTape>, dims: &Dims) -> A2<D, T> {
        let h = pre_norm(&self.ln2, x);
        match &self.post_norms {
            None if dims.residual_scale == 1.0 => self.mlp.forward(h, Some(r), dims),
            None => self.mlp.forward(h, None, dims) * dims.residual_scale + r.clone(),
            Some([_, post]) => scaled(post.forward(self.mlp.forward(h, None, dims)), dims.residual_scale) + r.clone(),
        }
    }

    /// `r +` causal self-attention with GQA, optional q/k head norms and optional RoPE.
    /// `(B·T, C) → (B·T, C)`.
    fn attention<T: Tape<f32, D>>(&self, h: A2<D, T>, r: &A2<D, NoneTape>, dims: &Dims, ctx: &Ctx<D>) -> A2<D, T> {
        let (b, t) = (ctx.b, ctx.t);
        let (nh, nkv, dh) = (dims.n_head, dims.n_kv_head, dims.head_dim);
        let (h, tape) = h.split_tape();
        let q = self.wq.forward(h.clone().put_tape(tape));
        let k = self.wk.forward(h.retaped::<T>());
        let v = self.wv.forward(h.retaped::<T>());
        let (mask, rope) = ctx.layers.for_layer(self.window, self.rope);
        let (q, k) = self.positioned_qk(q, k, rope, dims);
        let shape = AttnShape { b, t, nh, nkv, dh, softcap: dims.attn_softcap };
        let y = D::attention(q, k, v, mask, shape);
        self.attn_out(y, r, dims)
    }

    /// The projected queries `(N, H·Dh)` and keys `(N, Hkv·Dh)` as attention takes them: each
    /// head's through its norm (Qwen3, Gemma 3), rotated by `rope`, the queries scaled by
    /// [`Dims::query_scale`].
    pub(crate) fn positioned_qk<T: Tape<f32, D>, U: Tape<f32, D>>(
        &self,
        q: A2<D, T>,
        k: A2<D, U>,
        rope: Option<&Rope<D>>,
        dims: &Dims,
    ) -> (A2<D, T>, A2<D, U>) {
        let ((n, qw), (_, kw), dh) = (*q.shape(), *k.shape(), dims.head_dim);
        let norms = |q, k| match &self.qk_norm {
            Some([q_norm, k_norm]) => (q_norm.forward(q), k_norm.forward(k)),
            None => (q, k),
        };
        // OLMo 2 normalises whole rows, the others each head
        let (q, k) = if dims.qk_norm_full { norms(q, k) } else { (q, k) };
        let (q, k) = (q.reshape_like(&(n * qw / dh, dh)), k.reshape_like(&(n * kw / dh, dh)));
        let (q, k) = if dims.qk_norm_full { (q, k) } else { norms(q, k) };
        let (q, k) = match rope {
            Some(r) => (apply_rope(q, &r.cos_q, &r.sin_q, &r.rot), apply_rope(k, &r.cos_k, &r.sin_k, &r.rot)),
            None => (q, k),
        };
        let q = if dims.query_scale != 1.0 { q * dims.query_scale } else { q };
        (q.reshape_like(&(n, qw)), k.reshape_like(&(n, kw)))
    }
}

/// A causal language model with runtime sizes. The frozen reference is [`CausalLm::frozen_copy`].
#[derive(Debug, Clone)]
pub struct CausalLm<D: Storage<f32>> {
    /// The HF config it was built from (saved with checkpoints).
    pub config: ModelConfig,
    /// Resolved sizes.
    pub dims: Dims,
    /// Token embedding `(V, C)`; also the LM head when tied.
    pub wte: T2<D>,
    /// Learned positions `(P, C)` (GPT-2 only).
    pub wpe: Option<T2<D>>,
    /// Transformer blocks.
    pub blocks: Vec<Block<D>>,
    /// Final norm.
    pub ln_f: Norm<D>,
    /// Untied LM head `(V, C)` (HF layout); `None` when tied to `wte`.
    pub lm_head: Option<T2<D>>,
    /// The device.
    pub dev: D,
    /// What a taped forward leaves off the tape because its parameters are frozen
    /// ([`CausalLm::set_frozen_trunk`]); nothing for a new model or a copy.
    pub(crate) frozen: FrozenTrunk,
    /// The folder or file the weights were read from (`None` for a new model): a LoRA run's
    /// checkpoints name it as their PEFT adapter's base ([`crate::peft_export`]).
    pub origin: Option<std::path::PathBuf>,
}

impl<D: FusedOps> CausalLm<D> {
    /// A freshly initialised model: normal(0, initializer_range) weights, zero biases, unit
    /// norms, and GPT-2's scaled init (std / sqrt(2·layers)) on the residual projections.
    pub fn new(config: ModelConfig, dev: &D, seed: u64) -> Result<Self, PolicyError> {
        Self::build(config, dev, Init(Some(StdRng::seed_from_u64(seed))))
    }

    /// A model of `config` with zero weight matrices (unit norms), for a loader to fill.
    pub(crate) fn zeroed(config: ModelConfig, dev: &D) -> Result<Self, PolicyError> {
        Self::build(config, dev, Init(None))
    }

    fn build(config: ModelConfig, dev: &D, mut init: Init) -> Result<Self, PolicyError> {
        let dims = config.dims()?;
        let (c, std, bias) = (dims.d_model, dims.init_std, dims.has_bias());
        let resid_std = match dims.family {
            Family::Gpt2 => std / (2.0 * dims.n_layer as f32).sqrt(),
            Family::Llama | Family::GptNeox => std,
        };
        let wte = init.matrix(dev, (dims.vocab, c), std);
        let wpe = (dims.family == Family::Gpt2).then(|| init.matrix(dev, (dims.max_positions, c), std));
        let windows = config.layer_windows()?;
        let blocks = windows
            .into_iter()
            .zip(config.layer_ropes()?)
            .map(|(window, rope)| {
                let lin = |init: &mut Init, i, o, s| Linear::new(dev, init, i, o, s, bias);
                let mlp = match dims.family {
                    Family::Gpt2 | Family::GptNeox => Mlp::Gelu {
                        fc: lin(&mut init, c, dims.d_ff, std),
                        proj: lin(&mut init, dims.d_ff, c, resid_std),
                    },
                    Family::Llama => Mlp::SwiGlu {
                        gate: lin(&mut init, c, dims.d_ff, std),
                        up: lin(&mut init, c, dims.d_ff, std),
                        down: lin(&mut init, dims.d_ff, c, resid_std),
                    },
                };
                let qkv = |init: &mut Init, o| Linear::new(dev, init, c, o, std, bias || dims.qkv_bias);
                let qk_norm = |width| Norm::unit(dev, &dims, width, NormKind::RmsNorm, None);
                let (q_norm, k_norm) = match dims.qk_norm_full {
                    true => (dims.q_dim(), dims.kv_dim()),
                    false => (dims.head_dim, dims.head_dim),
                };
                Block {
                    ln1: dims.pre_norms.then(|| Norm::new(dev, &dims)),
                    wq: qkv(&mut init, dims.q_dim()),
                    wk: qkv(&mut init, dims.kv_dim()),
                    wv: qkv(&mut init, dims.kv_dim()),
                    wo: lin(&mut init, dims.q_dim(), c, resid_std),
                    qk_norm: dims.qk_norm.then(|| [qk_norm(q_norm), qk_norm(k_norm)]),
                    ln2: dims.pre_norms.then(|| Norm::new(dev, &dims)),
                    mlp,
                    post_norms: dims.post_norms.then(|| [Norm::new(dev, &dims), Norm::new(dev, &dims)]),
                    window,
                    rope,
                }
            })
            .collect();
        let lm_head = (!dims.tied).then(|| init.matrix(dev, (dims.vocab, c), std));
        let ln_f = Norm::new(dev, &dims);
        Ok(CausalLm {
            ln_f,
            config,
            dims,
            wte,
            wpe,
            blocks,
            lm_head,
            dev: dev.clone(),
            frozen: FrozenTrunk::default(),
            origin: None,
        })
    }

    /// Final hidden states `(B·T, C)` (after the last norm) for a batch, recording on `tape`
    /// from the first block above the frozen bottom ([`CausalLm::set_frozen_trunk`]; none by
    /// default).
    ///
    /// Padding: keys with `attention_mask == 0` get zero attention weight, and positions come
    /// from `batch.position_ids`, so a left-padded row gives the same hidden states at its real
    /// tokens as the unpadded sequence. Rows for pad queries are finite garbage. In a packed
    /// row ([`Batch::packed`]) each sequence's tokens get the hidden states it has alone.
    pub fn forward_hidden<T: Tape<f32, D>>(&self, batch: &Batch, tape: T) -> Result<A2<D, T>, PolicyError> {
        self.hidden(batch, None, tape)
    }

    /// Rows `rows` of [`CausalLm::forward_hidden`]'s `(B·T, C)` output, `(rows, C)`, in that
    /// order. Cheaper than selecting them afterwards: the last block's output projection and
    /// MLP run on these rows only (the positions a loss reads, e.g. a response's).
    pub fn forward_hidden_rows<T: Tape<f32, D>>(
        &self,
        batch: &Batch,
        rows: &[usize],
        tape: T,
    ) -> Result<A2<D, T>, PolicyError> {
        check_rows(batch, rows)?;
        self.hidden(batch, Some(rows), tape)
    }

    /// The input of block `k` for `batch`, untaped: the embeddings and blocks `0..k` at every
    /// position. With [`CausalLm::hidden_rows_above`] it lets two models that share their
    /// embeddings and first `k` blocks (a policy with a frozen bottom and its reference,
    /// [`CausalLm::shared_bottom`]: trlx's hydra) run that part once. `k` must leave a block
    /// above it.
    pub fn bottom(&self, batch: &Batch, k: usize) -> Result<A2<D, NoneTape>, PolicyError> {
        self.check_split(k)?;
        batch.check(&self.dims)?;
        let ids: Vec<usize> = batch.ids.iter().map(|&i| i as usize).collect();
        let x = self.embed(NoneTape, &ids, &batch.position_ids);
        Ok(self.run_blocks(x, 0..k, &self.context(batch), None))
    }

    /// [`CausalLm::forward_hidden_rows`] from `x`: what [`CausalLm::bottom`] gave for `batch`
    /// and `k`, from this model or one with the same embeddings and first `k` blocks. The same
    /// numbers as the whole forward (the same ops on the same inputs); a taped pass records
    /// from the first block above `k` that trains ([`CausalLm::set_frozen_trunk`]).
    pub fn hidden_rows_above<T: Tape<f32, D>>(
        &self,
        x: A2<D, NoneTape>,
        k: usize,
        batch: &Batch,
        rows: &[usize],
        tape: T,
    ) -> Result<A2<D, T>, PolicyError> {
        self.check_split(k)?;
        check_rows(batch, rows)?;
        if *x.shape() != (batch.b * batch.t, self.dims.d_model) {
            let (b, t) = (batch.b, batch.t);
            return Err(PolicyError::Input(format!("a bottom of shape {:?} for a {b}x{t} batch", x.shape())));
        }
        Ok(self.above(x, k, &self.context(batch), Some(rows), tape))
    }

    /// Blocks `k..` and the final norm on `x`, the (untaped) input of block `k`: the frozen
    /// ones below the first that trains without a tape, the rest recording on `tape`.
    fn above<T: Tape<f32, D>>(
        &self,
        x: A2<D, NoneTape>,
        k: usize,
        ctx: &Ctx<D>,
        rows: Option<&[usize]>,
        tape: T,
    ) -> A2<D, T> {
        let untaped = if T::OWNS_TAPE { self.frozen.blocks.max(k) } else { k };
        let x = self.run_blocks(x, k..untaped, ctx, rows).put_tape(tape);
        self.ln_f.forward(self.run_blocks(x, untaped..self.blocks.len(), ctx, rows))
    }

    fn check_split(&self, k: usize) -> Result<(), PolicyError> {
        match k < self.blocks.len() {
            true => Ok(()),
            false => {
                Err(PolicyError::Input(format!("a bottom of {k} blocks leaves none of {} above it", self.blocks.len())))
            }
        }
    }

    fn hidden<T: Tape<f32, D>>(&self, batch: &Batch, rows: Option<&[usize]>, tape: T) -> Result<A2<D, T>, PolicyError> {
        batch.check(&self.dims)?;
        let (b, t, c) = (batch.b, batch.t, self.dims.d_model);
        let ids: Vec<usize> = batch.ids.iter().map(|&i| i as usize).collect();
        let ctx = self.context(batch);
        if T::OWNS_TAPE && self.frozen.blocks > 0 {
            // the frozen bottom runs untaped: no gradient is recorded below the first block that trains
            let x = self.embed(NoneTape, &ids, &batch.position_ids);
            return Ok(self.above(x, 0, &ctx, rows, tape));
        }
        let x = self.embed(tape, &ids, &batch.position_ids);
        debug_assert_eq!(*x.shape(), (b * t, c));
        let mut x = self.run_blocks(x, 0..self.blocks.len(), &ctx, rows);
        if let (true, Some(rows)) = (self.blocks.is_empty(), rows) {
            x = D::select_rows(x, rows);
        }
        Ok(self.ln_f.forward(x))
    }

    /// Blocks `range` in order; the last block of the model keeps only `rows`.
    fn run_blocks<T: Tape<f32, D>>(
        &self,
        mut x: A2<D, T>,
        range: std::ops::Range<usize>,
        ctx: &Ctx<D>,
        rows: Option<&[usize]>,
    ) -> A2<D, T> {
        let last = self.blocks.len().checked_sub(1);
        for i in range {
            x = self.blocks[i].forward(x, &self.dims, ctx, if Some(i) == last { rows } else { None });
        }
        x
    }

    /// The embeddings of `ids` at `positions` `(N, C)`: the token's row (plus the position's,
    /// GPT-2), times [`Dims::embed_scale`] (Gemma's `√d`).
    pub(crate) fn embed<T: Tape<f32, D>>(&self, tape: T, ids: &[usize], positions: &[usize]) -> A2<D, T> {
        scaled(D::embed(tape, &self.wte, self.wpe.as_ref(), ids, positions), self.dims.embed_scale)
    }

    /// LM logits `(N, V)` from hidden states `(N, C)`: `h · headᵀ` (head = `wte` when tied),
    /// scaled and soft-capped where the model does ([`Dims::logit_scale`], Granite;
    /// [`Dims::final_softcap`], Gemma 2).
    pub fn logits<T: Tape<f32, D>>(&self, h: A2<D, T>) -> A2<D, T> {
        crate::fused::head_logits(h, self.head_op())
    }

    /// Per row of hidden states `h` `(N, C)`: `[log π(targets[r])…, entropy…]` `(2N,)` of
    /// `softmax(logits / temperature)` — the LM head and the log-probs as one device op (see
    /// [`FusedOps::lm_logprobs_and_entropy`]).
    pub fn logprobs_and_entropy<T: Tape<f32, D>>(
        &self,
        h: A2<D, T>,
        targets: &[usize],
        temperature: f32,
    ) -> Tensor<(usize,), f32, D, T> {
        D::lm_logprobs_and_entropy(h, self.head_op(), targets, temperature)
    }

    /// [`CausalLm::logprobs_and_entropy`] of NLPO's π^mask: row `i` over the tokens
    /// `masks[i]` allows (see [`FusedOps::lm_logprobs_and_entropy_masked`]).
    pub fn logprobs_and_entropy_masked<T: Tape<f32, D>>(
        &self,
        h: A2<D, T>,
        targets: &[usize],
        temperature: f32,
        masks: &[crate::TokenMask],
    ) -> Tensor<(usize,), f32, D, T> {
        D::lm_logprobs_and_entropy_masked(h, self.head_op(), targets, temperature, masks)
    }

    /// `−Σᵢ wᵢ·log softmax(logitsᵢ)[targetsᵢ]` for hidden states `h` `(N, C)`: the LM head
    /// and the weighted NLL as one device op (see [`FusedOps::lm_weighted_nll`]).
    pub fn weighted_nll<T: Tape<f32, D>>(
        &self,
        h: A2<D, T>,
        targets: &[usize],
        weights: &[f32],
    ) -> Tensor<Rank0, f32, D, T> {
        D::lm_weighted_nll(h, self.head_op(), targets, weights)
    }

    /// The LM head's `(V, C)` weight: `lm_head`, or `wte` when tied.
    fn head(&self) -> &Tensor<(usize, usize), f32, D> {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// The LM head for the head ops: its weight, whether it trains (see [`FrozenTrunk`]), and
    /// its logits' scale and soft cap.
    fn head_op(&self) -> Head<'_, D> {
        let (scale, softcap) = (self.dims.logit_scale, self.dims.final_softcap);
        Head { w: self.head(), trains: !self.frozen.head, scale, softcap }
    }

    /// Convenience: logits `(B·T, V)` for a batch, recording on `tape`.
    pub fn forward<T: Tape<f32, D>>(&self, batch: &Batch, tape: T) -> Result<A2<D, T>, PolicyError> {
        Ok(self.logits(self.forward_hidden(batch, tape)?))
    }
}

/// `norm(x)`, or `x` itself without a norm (OLMo 2's branches).
fn pre_norm<D: FusedOps, T: Tape<f32, D>>(norm: &Option<Norm<D>>, x: A2<D, T>) -> A2<D, T> {
    match norm {
        Some(n) => n.forward(x),
        None => x,
    }
}

/// `x · s`, or `x` itself for `s = 1`.
fn scaled<D: Device<f32>, T: Tape<f32, D>>(x: A2<D, T>, s: f32) -> A2<D, T> {
    if s != 1.0 {
        x * s
    } else {
        x
    }
}

fn sample_normal<D: Device<f32>>(dev: &D, rng: &mut StdRng, shape: (usize, usize), std: f32) -> T2<D> {
    use rand::distributions::Distribution;
    let dist = Normal::new(0.0f32, std.max(1e-12)).expect("std is positive and finite");
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| dist.sample(rng)).collect();
    dev.tensor_from_vec(data, shape)
}
