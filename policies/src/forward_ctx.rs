//! What one training forward shares between its blocks: the additive attention masks and the
//! RoPE tables, built once per batch — a second mask and table set for local (sliding-window)
//! layers where the model has them (Gemma 3).

use std::sync::Arc;

use dfdx::prelude::*;

use crate::attention::AttnShape;
use crate::batch::Batch;
use crate::block::BlockInputs;
use crate::config::Dims;
use crate::fused::FusedOps;
use crate::model::{CausalLm, A2, MASKED, T2};
use crate::rope::RopeTables;

/// A `(B, T, T)` additive attention mask.
pub(crate) type Mask<D> = Tensor<(usize, usize, usize), f32, D>;

/// Per-forward constants shared by all blocks: the additive masks and RoPE tables.
pub(crate) struct Ctx<D: Storage<f32>> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// The global layers' `(B, T, T)` mask on the host, row-major, for a whole-block op (one
    /// copy per forward instead of one per block).
    pub(crate) mask_host: Vec<f32>,
    /// The masks and RoPE tables each layer reads.
    pub(crate) layers: LayerInputs<D>,
}

impl<D: Storage<f32>> Ctx<D> {
    /// What a whole-block op ([`FusedOps::gpt2_block`]) reads: the global layers' mask and, with
    /// rotary positions, their RoPE tables on the host (the op refuses the blocks it cannot run).
    pub(crate) fn block_inputs(&self, dims: &Dims) -> BlockInputs<'_> {
        let rope = self.layers.rope.as_ref().map(|r| (&r.host, dims.rotary_dim()));
        let (b, t) = (self.b, self.t);
        let (nh, nkv, dh, softcap) = (dims.n_head, dims.n_kv_head, dims.head_dim, dims.attn_softcap);
        let shape = AttnShape { b, t, nh, nkv, dh, softcap };
        BlockInputs { mask: &self.mask_host, shape, gelu: dims.gelu, rope, parallel: dims.parallel_residual }
    }
}

/// What a layer's attention reads besides its input: the additive mask `(B, Q, K)` (causal,
/// key padding, packing) and, with rotary positions, the RoPE tables of the queries' rows —
/// for local layers their own, with the window in the mask and the local RoPE base.
pub(crate) struct LayerInputs<D: Storage<f32>> {
    mask: Mask<D>,
    /// `None` with learned positions (GPT-2).
    pub(crate) rope: Option<Rope<D>>,
    /// The local layers' mask and RoPE tables, when the model has local layers.
    local: Option<(Mask<D>, Rope<D>)>,
}

impl<D: Storage<f32>> LayerInputs<D> {
    /// The mask and RoPE tables of a layer with attention window `window` (`None`: global);
    /// no tables for a layer without RoPE (`rotary` false: SmolLM3's NoPE layers).
    pub(crate) fn for_layer(&self, window: Option<usize>, rotary: bool) -> (&Mask<D>, Option<&Rope<D>>) {
        let (mask, rope) = match (&self.local, window) {
            (Some((mask, rope)), Some(_)) => (mask, Some(rope)),
            _ => (&self.mask, self.rope.as_ref()),
        };
        (mask, rope.filter(|_| rotary))
    }
}

/// RoPE tables for a run of rows (see [`CausalLm::rope_at`]); cloning shares the tensors.
#[derive(Clone)]
pub(crate) struct Rope<D: Storage<f32>> {
    pub(crate) cos_q: T2<D>,
    pub(crate) sin_q: T2<D>,
    pub(crate) cos_k: T2<D>,
    pub(crate) sin_k: T2<D>,
    pub(crate) rot: T2<D>,
    /// The `(N, Dh)` tables before the per-head expansion, on the host (a whole-block op's).
    pub(crate) host: Arc<RopeTables>,
}

/// `rope(x) = x·cos + rotate_half(x)·sin` on `(N, Dh)` rows (NeoX / rotate_half layout).
pub(crate) fn apply_rope<D: Device<f32>, T: Tape<f32, D>>(
    x: A2<D, T>,
    cos: &T2<D>,
    sin: &T2<D>,
    rot: &T2<D>,
) -> A2<D, T> {
    let (x, tape) = x.split_tape();
    let rotated = x.retaped::<T>().matmul(rot.clone());
    x.put_tape(tape) * cos.clone() + rotated * sin.clone()
}

/// Whether query column `i` may not see key column `j`: a window of `w` columns ends at the
/// query (transformers' `sliding_window_overlay`: `j > i − w`).
fn outside_window(w: usize, i: usize, j: usize) -> bool {
    j + w <= i
}

/// A `(B, Q, K)` additive mask, row-major: [`MASKED`] where `hidden(r, i, j)` hides key `j`
/// from query `i` of row `r`.
fn mask_values((b, q, k): (usize, usize, usize), hidden: impl Fn(usize, usize, usize) -> bool) -> Vec<f32> {
    let mut mask = vec![0.0f32; b * q * k];
    for r in 0..b {
        for i in 0..q {
            for j in 0..k {
                if hidden(r, i, j) {
                    mask[(r * q + i) * k + j] = MASKED;
                }
            }
        }
    }
    mask
}

impl<D: FusedOps> CausalLm<D> {
    pub(crate) fn context(&self, batch: &Batch) -> Ctx<D> {
        let (b, t) = (batch.b, batch.t);
        let hidden = |r, i, j| j > i || !batch.is_real(r, j) || batch.other_sequence(r, i, j);
        let (mask_host, layers) = self.layer_inputs((b, t, t), 0, &batch.position_ids, hidden);
        Ctx { b, t, mask_host, layers }
    }

    /// The [`LayerInputs`] of `Q` queries per row at `positions` (`(B·Q)` entries) against `K`
    /// keys: `hidden` as for [`mask_values`], and in a local layer's mask also the keys outside
    /// the window of query `i`, which sits at key column `q0 + i`. Also returns the global
    /// mask's host values.
    pub(crate) fn layer_inputs(
        &self,
        shape: (usize, usize, usize),
        q0: usize,
        positions: &[usize],
        hidden: impl Fn(usize, usize, usize) -> bool,
    ) -> (Vec<f32>, LayerInputs<D>) {
        let host = mask_values(shape, &hidden);
        let mask = self.dev.tensor_from_vec(host.clone(), shape);
        let rope = self.dims.rotary().then(|| self.rope_at(positions));
        let local = self.dims.sliding_window.map(|w| {
            let local = mask_values(shape, |r, i, j| hidden(r, i, j) || outside_window(w, q0 + i, j));
            // local layers without a RoPE base of their own (Mistral) share the global tables
            let local_rope = match (self.dims.rope_local_theta, &rope) {
                (None, Some(global)) => global.clone(),
                _ => self.rope_with(positions, &self.dims.local_rope()),
            };
            (self.dev.tensor_from_vec(local, shape), local_rope)
        });
        (host, LayerInputs { mask, rope, local })
    }

    /// RoPE tables for one row per entry of `positions`.
    pub(crate) fn rope_at(&self, positions: &[usize]) -> Rope<D> {
        self.rope_with(positions, &self.dims)
    }

    /// [`CausalLm::rope_at`] with the base and scaling of `dims` (a local layer's:
    /// [`Dims::local_rope`]).
    pub(crate) fn rope_with(&self, positions: &[usize], dims: &Dims) -> Rope<D> {
        let (cos, sin) = crate::rope::tables(positions, dims);
        let expand = |tab: &[f32], heads: usize| {
            let dh = dims.head_dim;
            let mut out = Vec::with_capacity(tab.len() * heads);
            for row in tab.chunks(dh) {
                for _ in 0..heads {
                    out.extend_from_slice(row);
                }
            }
            self.dev.tensor_from_vec(out, (positions.len() * heads, dh))
        };
        let dh = dims.head_dim;
        let half = dims.rotary_dim() / 2;
        // x·R = rotate_half(x) = [-x[half:], x[:half]] over the turned dimensions, 0 past them
        // (where the tables' sin is 0 and cos 1)
        let mut rot = vec![0.0f32; dh * dh];
        for i in 0..half {
            rot[(i + half) * dh + i] = -1.0; // out[i] = -x[i + half]
            rot[i * dh + (i + half)] = 1.0; // out[i + half] = x[i]
        }
        Rope {
            cos_q: expand(&cos, dims.n_head),
            sin_q: expand(&sin, dims.n_head),
            cos_k: expand(&cos, dims.n_kv_head),
            sin_k: expand(&sin, dims.n_kv_head),
            rot: self.dev.tensor_from_vec(rot, (dh, dh)),
            host: Arc::new(RopeTables { cos, sin }),
        }
    }
}
