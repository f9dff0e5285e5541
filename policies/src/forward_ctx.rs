//! What one training forward shares between its blocks: the additive attention masks and the
//! RoPE tables, built once per batch — a second mask and table set for local (sliding-window)
//! layers where the model has them (Gemma 3).

use dfdx::prelude::*;

use crate::batch::Batch;
use crate::config::{Dims, Family};
use crate::fused::FusedOps;
use crate::model::{CausalLm, A2, MASKED, T2};

/// A `(B, T, T)` additive attention mask.
pub(crate) type Mask<D> = Tensor<(usize, usize, usize), f32, D>;

/// Per-forward constants shared by all blocks: the additive mask and RoPE tables.
pub(crate) struct Ctx<D: Storage<f32>> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// `(B, T, T)` additive mask: causal and key padding.
    pub(crate) mask: Mask<D>,
    /// The same mask on the host, row-major, for a whole-block op (one copy per forward
    /// instead of one per block).
    pub(crate) mask_host: Vec<f32>,
    /// RoPE `(B·T·H, Dh)` tables for queries and `(B·T·Hkv, Dh)` for keys, and the
    /// `(Dh, Dh)` matrix with `x·R = rotate_half(x)`.
    pub(crate) rope: Option<Rope<D>>,
    /// The local layers' mask and RoPE tables, when the model has local layers.
    pub(crate) local: Option<(Mask<D>, Rope<D>)>,
}

impl<D: Storage<f32>> Ctx<D> {
    /// The mask and RoPE tables of a local (`true`) or a global layer.
    pub(crate) fn for_layer(&self, local: bool) -> (&Mask<D>, Option<&Rope<D>>) {
        match (&self.local, local) {
            (Some((mask, rope)), true) => (mask, Some(rope)),
            _ => (&self.mask, self.rope.as_ref()),
        }
    }
}

/// RoPE tables for a run of rows (see [`Ctx::rope`]).
pub(crate) struct Rope<D: Storage<f32>> {
    pub(crate) cos_q: T2<D>,
    pub(crate) sin_q: T2<D>,
    pub(crate) cos_k: T2<D>,
    pub(crate) sin_k: T2<D>,
    pub(crate) rot: T2<D>,
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
pub(crate) fn outside_window(window: Option<usize>, i: usize, j: usize) -> bool {
    window.is_some_and(|w| j + w <= i)
}

impl<D: Storage<f32>> CausalLm<D> {
    /// The window of the model's local layers, if it has any.
    pub(crate) fn local_window(&self) -> Option<usize> {
        self.blocks.iter().find_map(|b| b.window)
    }
}

impl<D: FusedOps> CausalLm<D> {
    pub(crate) fn context(&self, batch: &Batch) -> Ctx<D> {
        let (b, t) = (batch.b, batch.t);
        let build = |window: Option<usize>| {
            let mut mask = vec![0.0f32; b * t * t];
            for r in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        let hidden = j > i || !batch.is_real(r, j) || batch.other_sequence(r, i, j);
                        if hidden || outside_window(window, i, j) {
                            mask[(r * t + i) * t + j] = MASKED;
                        }
                    }
                }
            }
            mask
        };
        let mask_host = build(None);
        let mask = self.dev.tensor_from_vec(mask_host.clone(), (b, t, t));
        let rope = (self.dims.family == Family::Llama).then(|| self.rope_at(&batch.position_ids));
        let local = self.local_window().map(|w| {
            let mask = self.dev.tensor_from_vec(build(Some(w)), (b, t, t));
            (mask, self.rope_with(&batch.position_ids, &self.dims.local_rope()))
        });
        Ctx { b, t, mask, mask_host, rope, local }
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
        let half = dh / 2;
        // x·R = rotate_half(x) = [-x[half:], x[:half]]
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
        }
    }
}
