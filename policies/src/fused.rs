//! Fused CPU ops with their own backward pass, for the training forward (dfdx's element-wise
//! ops are single-threaded scalar loops, and its tanh-GELU costs ~20 ns per element).
//!
//! Model code calls them through [`FusedOps`], so it stays generic over the device: the CPU
//! implementation is fused; other devices use dfdx's composition. Each op is tested against
//! that composition (forward and gradient).

use dfdx::prelude::*;

#[cfg(feature = "cuda")]
use crate::attention::attention_composed;
use crate::attention::{attention_cpu, AttnShape};
use crate::block::{gpt2_block_cpu, BlockInputs};
use crate::config::GeluKind;
use crate::dora::{dora_scale_composed, dora_scale_cpu, DoraScale};
#[cfg(feature = "cuda")]
use crate::embed::{embed_composed, select_rows_composed};
use crate::embed::{embed_cpu, select_rows_cpu};
use crate::gelu::gated;
#[cfg(any(feature = "cuda", test))]
use crate::gelu::gelu_erf_composed;
#[cfg(feature = "cuda")]
use crate::layer_norm::layer_norm_composed;
use crate::layer_norm::layer_norm_cpu;
#[cfg(feature = "cuda")]
use crate::linear::linear_composed;
use crate::linear::{linear_cpu, Affine};
use crate::logprobs::{
    lm_logprobs_and_entropy_cpu, lm_logprobs_and_entropy_masked_cpu, lm_weighted_nll_cpu, logprobs_and_entropy_cpu,
    weighted_nll_cpu, Head,
};
use crate::lora::{column_norms_host, Lora};
use crate::model::Block;
use crate::nucleus::{TokenMask, MASKED_LOGIT};

/// A `(rows, cols)` activation on device `D` with tape `T`.
pub type Act<D, T> = Tensor<(usize, usize), f32, D, T>;

/// Ops the model uses that a device may fuse.
pub trait FusedOps: Device<f32> {
    /// Whether rollouts sample on the host engine ([`InferenceModel`](crate::InferenceModel),
    /// from a host copy of the weights) rather than through [`CausalLm::decode`](crate::CausalLm::decode)
    /// on this device: true for the CPU, whose host kernels are its fast path.
    const HOST_ROLLOUT: bool = false;

    /// GPT-2's GELU on `(N, C)`: `gelu_new`'s `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` or
    /// the exact `x·Φ(x)`.
    fn gelu<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        kind: GeluKind,
    ) -> Tensor<(usize, usize), f32, Self, T>;

    /// LayerNorm over rows of `(N, C)`: `(x − mean)/√(var + eps) · g (+ b)` (biased variance).
    /// Gradients of `g` and `b` are recorded by id (they are parameters, never taped).
    fn layer_norm<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        g: &Tensor<(usize,), f32, Self>,
        b: Option<&Tensor<(usize,), f32, Self>>,
        eps: f32,
    ) -> Tensor<(usize, usize), f32, Self, T>;

    /// Weighted negative log-likelihood of `targets` under `softmax(logits)` rows:
    /// `L = −Σᵢ wᵢ · log softmax(logitsᵢ)[targetsᵢ]` (the caller's weights carry the mean and
    /// any mask). `logits: (N, V)`, `targets` and `weights` of length N.
    fn weighted_nll<T: Tape<f32, Self>>(
        logits: Tensor<(usize, usize), f32, Self, T>,
        targets: &[usize],
        weights: &[f32],
    ) -> Tensor<Rank0, f32, Self, T>;

    /// [`FusedOps::weighted_nll`] of the LM head's logits `h·headᵀ` for hidden states `h`
    /// `(N, C)` and a head weight `(V, C)`; the CPU op never builds the logits tensor (see
    /// [`crate::logprobs`]).
    fn lm_weighted_nll<T: Tape<f32, Self>>(
        h: Tensor<(usize, usize), f32, Self, T>,
        head: Head<'_, Self>,
        targets: &[usize],
        weights: &[f32],
    ) -> Tensor<Rank0, f32, Self, T> {
        let logits = head_logits(h, head);
        Self::weighted_nll(logits, targets, weights)
    }

    /// Per row of `logits / temperature` `(N, V)`: the log-prob of `targets[i]` and the
    /// entropy of the row's distribution, as one `(2N,)` tensor `[logprobs…, entropies…]`,
    /// with gradients through both (PPO's ratio and entropy bonus from one pass).
    fn logprobs_and_entropy<T: Tape<f32, Self>>(
        logits: Tensor<(usize, usize), f32, Self, T>,
        targets: &[usize],
        temperature: f32,
    ) -> Tensor<(usize,), f32, Self, T>;

    /// [`FusedOps::logprobs_and_entropy`] of the LM head's logits `h·headᵀ` for hidden states
    /// `h` `(N, C)` and a head weight `(V, C)`; the CPU op never builds the logits tensor
    /// (see [`crate::logprobs`]).
    fn lm_logprobs_and_entropy<T: Tape<f32, Self>>(
        h: Tensor<(usize, usize), f32, Self, T>,
        head: Head<'_, Self>,
        targets: &[usize],
        temperature: f32,
    ) -> Tensor<(usize,), f32, Self, T> {
        let logits = head_logits(h, head);
        Self::logprobs_and_entropy(logits, targets, temperature)
    }

    /// [`FusedOps::lm_logprobs_and_entropy`] of NLPO's masked policy: row `i`'s logits outside
    /// `masks[i]` are set to [`MASKED_LOGIT`] first, so the log-probs and entropies are those of
    /// the softmax over the allowed tokens (whose gradients the masked logits do not get).
    /// Every target must be allowed by its row's mask.
    fn lm_logprobs_and_entropy_masked<T: Tape<f32, Self>>(
        h: Tensor<(usize, usize), f32, Self, T>,
        head: Head<'_, Self>,
        targets: &[usize],
        temperature: f32,
        masks: &[TokenMask],
    ) -> Tensor<(usize,), f32, Self, T> {
        lm_logprobs_and_entropy_masked_composed(h, head, targets, temperature, masks)
    }

    /// Embedding rows `wte[ids[r]] (+ wpe[pos[r]])` as `(N, C)`, recorded on `tape`; see
    /// [`crate::embed`].
    fn embed<T: Tape<f32, Self>>(
        tape: T,
        wte: &Tensor<(usize, usize), f32, Self>,
        wpe: Option<&Tensor<(usize, usize), f32, Self>>,
        ids: &[usize],
        pos: &[usize],
    ) -> Tensor<(usize, usize), f32, Self, T>;

    /// Rows `rows` of `x` `(N, C)` as `(rows.len(), C)`, repeats allowed; see [`crate::embed`].
    fn select_rows<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        rows: &[usize],
    ) -> Tensor<(usize, usize), f32, Self, T>;

    /// The affine map `x (N, in) → x·W + b + r (N, out)`; see [`crate::linear`].
    fn linear<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        a: Affine<'_, Self>,
    ) -> Tensor<(usize, usize), f32, Self, T>;

    /// DoRA's column norms `‖W + s·A·B‖_c` of a layer's weight `w` and update `lora`, untaped.
    /// Default: dfdx's composition ([`Lora::column_norms`]).
    fn dora_norms(w: &Tensor<(usize, usize), f32, Self>, lora: &Lora<Self>) -> Tensor<(usize,), f32, Self> {
        lora.column_norms(w)
    }

    /// DoRA's `z ⊙ m / n + b + r` over an adapted layer's output `z` `(N, out)`; see
    /// [`crate::dora`]. Default: dfdx's composition.
    fn dora_scale<T: Tape<f32, Self>>(z: Act<Self, T>, a: DoraScale<'_, Self>) -> Act<Self, T> {
        dora_scale_composed(z, a)
    }

    /// A whole pre-norm GPT-2 block (LayerNorms, attention, a GELU MLP; GPT-NeoX's with RoPE
    /// and the parallel residual) as one op, where the device has one: `Err(x)` hands the input
    /// back and the caller runs the block op by op (the default). `x` `(B·T, C)`; `inputs` the
    /// host-side mask and RoPE tables; with `rows`, only those rows of the output `(rows, C)`.
    /// See [`crate::block`].
    fn gpt2_block<T: Tape<f32, Self>>(
        x: Act<Self, T>,
        block: &Block<Self>,
        inputs: BlockInputs<'_>,
        rows: Option<&[usize]>,
    ) -> Result<Act<Self, T>, Act<Self, T>> {
        let _ = (block, inputs, rows);
        Err(x)
    }

    /// Causal self-attention's core: q `(B·T, H·Dh)`, k and v `(B·T, Hkv·Dh)` (the
    /// projections' layout), additive `mask` `(B, T, T)` → `softmax(q·kᵀ/√Dh + mask)·v` as
    /// `(B·T, H·Dh)`; see [`crate::attention`].
    fn attention<T: Tape<f32, Self>>(
        q: Tensor<(usize, usize), f32, Self, T>,
        k: Tensor<(usize, usize), f32, Self, T>,
        v: Tensor<(usize, usize), f32, Self, T>,
        mask: &Tensor<(usize, usize, usize), f32, Self>,
        shape: AttnShape,
    ) -> Tensor<(usize, usize), f32, Self, T>;
}

/// A scalar loss of a vector whose math runs on the host, in f64: `f(x) = (L, ∂L/∂x)`. The
/// tape gets the linear surrogate `Σᵢ gᵢ·xᵢ + (L − Σᵢ gᵢ·xᵢ)`, whose value is `L` and whose
/// gradient is `g`, so any device works with dfdx's own ops. Meant for losses over a few
/// hundred per-sequence scalars (Bradley–Terry, DPO), written as pure functions over slices
/// with their own tests of value and gradient.
pub fn host_loss<D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<(usize,), f32, D, T>,
    f: impl FnOnce(&[f32]) -> (f64, Vec<f64>),
) -> Tensor<Rank0, f32, D, T> {
    let xv = x.as_vec();
    let (loss, grad) = f(&xv);
    assert_eq!(grad.len(), xv.len(), "host_loss: the gradient must have one entry per input");
    let offset = loss - grad.iter().zip(&xv).map(|(g, &x)| g * x as f64).sum::<f64>();
    let g = x.device().tensor_from_vec(grad.iter().map(|&g| g as f32).collect(), (xv.len(),));
    (x * g).sum::<Rank0, _>() + offset as f32
}

/// dfdx's composition of [`FusedOps::logprobs_and_entropy`] (reference and fallback).
pub fn logprobs_and_entropy_composed<D: Device<f32>, T: Tape<f32, D>>(
    logits: Tensor<(usize, usize), f32, D, T>,
    targets: &[usize],
    temperature: f32,
) -> Tensor<(usize,), f32, D, T> {
    let n = targets.len();
    let dev = logits.device().clone();
    let lsm = (logits * (1.0 / temperature)).log_softmax::<Axis<1>>();
    // log_softmax feeds both outputs: split its tape (dfdx-notes §2)
    let (lsm, tape) = lsm.split_tape();
    let logprobs = lsm.clone().put_tape(tape).select(dev.tensor_from_vec(targets.to_vec(), (n,)));
    let entropy = (lsm.retaped::<T>().exp() * lsm.clone()).sum::<(usize,), Axis<1>>().negate();
    (logprobs, entropy).concat_along(Axis::<0>)
}

/// The LM head's logits `h·headᵀ` `(N, V)` for hidden states `h` `(N, C)`, times the head's
/// [`Head::scale`], then soft-capped when the head has a cap ([`Head::softcap`]).
pub fn head_logits<D: FusedOps, T: Tape<f32, D>>(
    h: Tensor<(usize, usize), f32, D, T>,
    head: Head<'_, D>,
) -> Tensor<(usize, usize), f32, D, T> {
    let z = D::linear(h, Affine::lm_head(head.w));
    let z = if head.scale != 1.0 { z * head.scale } else { z };
    crate::softcap::softcap_tensor(z, head.softcap)
}

/// The composition of [`FusedOps::lm_logprobs_and_entropy_masked`] (the devices' default,
/// and the CPU op's reference): the head, plus a bias of 0 or [`MASKED_LOGIT`] per logit, then
/// [`FusedOps::logprobs_and_entropy`].
pub fn lm_logprobs_and_entropy_masked_composed<D: FusedOps, T: Tape<f32, D>>(
    h: Tensor<(usize, usize), f32, D, T>,
    head: Head<'_, D>,
    targets: &[usize],
    temperature: f32,
    masks: &[TokenMask],
) -> Tensor<(usize,), f32, D, T> {
    let v = head.w.shape().0;
    crate::logprobs::check_masks(v, targets, masks);
    let logits = head_logits(h, head);
    let mut bias = vec![0.0; masks.len() * v];
    bias.chunks_mut(v).zip(masks).for_each(|(row, m)| m.apply(row, MASKED_LOGIT));
    let bias = logits.device().tensor_from_vec(bias, (masks.len(), v));
    D::logprobs_and_entropy(logits + bias, targets, temperature)
}

/// dfdx's composition of the weighted NLL (reference and fallback).
pub fn weighted_nll_composed<D: Device<f32>, T: Tape<f32, D>>(
    logits: Tensor<(usize, usize), f32, D, T>,
    targets: &[usize],
    weights: &[f32],
) -> Tensor<Rank0, f32, D, T> {
    let n = targets.len();
    let dev = logits.device().clone();
    let lp = logits.log_softmax::<Axis<1>>().select(dev.tensor_from_vec(targets.to_vec(), (n,)));
    (lp * dev.tensor_from_vec(weights.to_vec(), (n,))).sum::<Rank0, _>().negate()
}

#[cfg(feature = "cuda")]
impl FusedOps for Cuda {
    fn gelu<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        kind: GeluKind,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        match kind {
            GeluKind::Tanh => x.fast_gelu(),
            GeluKind::Erf => gelu_erf_composed(x),
        }
    }
    fn layer_norm<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        g: &Tensor<(usize,), f32, Self>,
        b: Option<&Tensor<(usize,), f32, Self>>,
        eps: f32,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        layer_norm_composed(x, g, b, eps)
    }
    fn weighted_nll<T: Tape<f32, Self>>(
        logits: Tensor<(usize, usize), f32, Self, T>,
        targets: &[usize],
        weights: &[f32],
    ) -> Tensor<Rank0, f32, Self, T> {
        weighted_nll_composed(logits, targets, weights)
    }
    fn logprobs_and_entropy<T: Tape<f32, Self>>(
        logits: Tensor<(usize, usize), f32, Self, T>,
        targets: &[usize],
        temperature: f32,
    ) -> Tensor<(usize,), f32, Self, T> {
        logprobs_and_entropy_composed(logits, targets, temperature)
    }
    fn attention<T: Tape<f32, Self>>(
        q: Tensor<(usize, usize), f32, Self, T>,
        k: Tensor<(usize, usize), f32, Self, T>,
        v: Tensor<(usize, usize), f32, Self, T>,
        mask: &Tensor<(usize, usize, usize), f32, Self>,
        shape: AttnShape,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        attention_composed(q, k, v, mask, shape)
    }
    fn linear<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        a: Affine<'_, Self>,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        linear_composed(x, a)
    }
    fn embed<T: Tape<f32, Self>>(
        tape: T,
        wte: &Tensor<(usize, usize), f32, Self>,
        wpe: Option<&Tensor<(usize, usize), f32, Self>>,
        ids: &[usize],
        pos: &[usize],
    ) -> Tensor<(usize, usize), f32, Self, T> {
        embed_composed(tape, wte, wpe, ids, pos)
    }
    fn select_rows<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        rows: &[usize],
    ) -> Tensor<(usize, usize), f32, Self, T> {
        select_rows_composed(x, rows)
    }
}

impl FusedOps for Cpu {
    const HOST_ROLLOUT: bool = true;

    fn dora_scale<T: Tape<f32, Self>>(z: Act<Self, T>, a: DoraScale<'_, Self>) -> Act<Self, T> {
        dora_scale_cpu(z, a)
    }

    fn dora_norms(w: &Tensor<(usize, usize), f32, Self>, lora: &Lora<Self>) -> Tensor<(usize,), f32, Self> {
        let n = column_norms_host(w, lora);
        w.device().tensor_from_vec(n, (lora.b.shape().1,))
    }

    fn gpt2_block<T: Tape<f32, Self>>(
        x: Act<Self, T>,
        block: &Block<Self>,
        inputs: BlockInputs<'_>,
        rows: Option<&[usize]>,
    ) -> Result<Act<Self, T>, Act<Self, T>> {
        gpt2_block_cpu(x, block, inputs, rows)
    }

    fn linear<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        a: Affine<'_, Self>,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        linear_cpu(x, a)
    }

    fn embed<T: Tape<f32, Self>>(
        tape: T,
        wte: &Tensor<(usize, usize), f32, Self>,
        wpe: Option<&Tensor<(usize, usize), f32, Self>>,
        ids: &[usize],
        pos: &[usize],
    ) -> Tensor<(usize, usize), f32, Self, T> {
        embed_cpu(tape, wte, wpe, ids, pos)
    }

    fn select_rows<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        rows: &[usize],
    ) -> Tensor<(usize, usize), f32, Self, T> {
        select_rows_cpu(x, rows)
    }

    fn attention<T: Tape<f32, Self>>(
        q: Tensor<(usize, usize), f32, Self, T>,
        k: Tensor<(usize, usize), f32, Self, T>,
        v: Tensor<(usize, usize), f32, Self, T>,
        mask: &Tensor<(usize, usize, usize), f32, Self>,
        shape: AttnShape,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        attention_cpu(q, k, v, mask, shape)
    }

    fn gelu<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        kind: GeluKind,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        gated(x, kind)
    }

    fn layer_norm<T: Tape<f32, Self>>(
        x: Tensor<(usize, usize), f32, Self, T>,
        g: &Tensor<(usize,), f32, Self>,
        b: Option<&Tensor<(usize,), f32, Self>>,
        eps: f32,
    ) -> Tensor<(usize, usize), f32, Self, T> {
        layer_norm_cpu(x, g, b, eps)
    }

    fn weighted_nll<T: Tape<f32, Self>>(
        logits: Tensor<(usize, usize), f32, Self, T>,
        targets: &[usize],
        weights: &[f32],
    ) -> Tensor<Rank0, f32, Self, T> {
        weighted_nll_cpu(logits, targets, weights)
    }

    fn lm_weighted_nll<T: Tape<f32, Self>>(
        h: Tensor<(usize, usize), f32, Self, T>,
        head: Head<'_, Self>,
        targets: &[usize],
        weights: &[f32],
    ) -> Tensor<Rank0, f32, Self, T> {
        lm_weighted_nll_cpu(h, head, targets, weights)
    }

    fn logprobs_and_entropy<T: Tape<f32, Self>>(
        logits: Tensor<(usize, usize), f32, Self, T>,
        targets: &[usize],
        temperature: f32,
    ) -> Tensor<(usize,), f32, Self, T> {
        logprobs_and_entropy_cpu(logits, targets, temperature)
    }

    fn lm_logprobs_and_entropy<T: Tape<f32, Self>>(
        h: Tensor<(usize, usize), f32, Self, T>,
        head: Head<'_, Self>,
        targets: &[usize],
        temperature: f32,
    ) -> Tensor<(usize,), f32, Self, T> {
        lm_logprobs_and_entropy_cpu(h, head, targets, temperature)
    }

    fn lm_logprobs_and_entropy_masked<T: Tape<f32, Self>>(
        h: Tensor<(usize, usize), f32, Self, T>,
        head: Head<'_, Self>,
        targets: &[usize],
        temperature: f32,
        masks: &[TokenMask],
    ) -> Tensor<(usize,), f32, Self, T> {
        lm_logprobs_and_entropy_masked_cpu(h, head, targets, temperature, masks)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Largest `|a − b| / (1 + |b|)`: the fused ops' tests compare with dfdx's composition.
    pub(crate) fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "max_rel: lengths differ");
        a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
    }

    #[test]
    fn fused_gelu_matches_dfdx_forward_and_gradient() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(0);
        for shape in [(7usize, 5usize), (64, 300), (96, 1024)] {
            let kind = GeluKind::Tanh;
            let n = shape.0 * shape.1;
            let xs: Vec<f32> = (0..n).map(|_| rng.gen_range(-6.0..6.0)).collect();
            let up: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(xs, shape);
            let upstream = dev.tensor_from_vec(up, shape);
            // ours
            let y = Cpu::gelu(x.leaky_trace(), kind);
            let y_vals = y.retaped::<NoneTape>().as_vec();
            let g1 = (y * upstream.clone()).sum::<Rank0, _>().backward();
            // dfdx
            let y2 = x.leaky_trace().fast_gelu();
            let y2_vals = y2.retaped::<NoneTape>().as_vec();
            let g2 = (y2 * upstream).sum::<Rank0, _>().backward();
            assert!(max_rel(&y_vals, &y2_vals) < 2e-6, "{shape:?} {kind:?} forward");
            assert!(max_rel(&g1.get(&x).as_vec(), &g2.get(&x).as_vec()) < 1e-5, "{shape:?} {kind:?} gradient");
            // no tape: same values
            assert!(max_rel(&Cpu::gelu(x.clone(), kind).as_vec(), &y2_vals) < 2e-6);
        }
    }

    #[test]
    fn exact_gelu_matches_its_closed_form_on_both_paths() {
        // against f64 math (dfdx's accurate_gelu gradient is off by √2 in its φ term)
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(3);
        let shape = (33usize, 70usize);
        let xs: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.gen_range(-6.0..6.0)).collect();
        let x: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(xs.clone(), shape);
        let phi = |x: f64| 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let want_y: Vec<f32> = xs.iter().map(|&x| (x as f64 * phi(x as f64)) as f32).collect();
        let want_g: Vec<f32> = xs.iter().map(|&x| (phi(x as f64) + x as f64 * pdf(x as f64)) as f32).collect();
        for fused in [true, false] {
            let y = if fused { Cpu::gelu(x.leaky_trace(), GeluKind::Erf) } else { gelu_erf_composed(x.leaky_trace()) };
            assert!(max_rel(&y.retaped::<NoneTape>().as_vec(), &want_y) < 1e-6, "fused {fused}: values");
            let g = y.sum::<Rank0, _>().backward();
            assert!(max_rel(&g.get(&x).as_vec(), &want_g) < 1e-6, "fused {fused}: gradient");
        }
    }

    #[test]
    fn fused_gelu_accumulates_into_a_permuted_input() {
        // x used twice (fused gelu of its transpose + itself): gradients must add up
        let dev = Cpu::default();
        let x: Tensor<(usize, usize), f32, Cpu> =
            dev.tensor_from_vec((0..12).map(|i| i as f32 * 0.3 - 1.5).collect(), (3, 4));
        let (xt, tape) = x.leaky_trace().split_tape();
        let a = Cpu::gelu(xt.clone().put_tape(tape).permute::<_, Axes2<1, 0>>(), GeluKind::Tanh).sum::<Rank0, _>();
        let b = xt.retaped::<OwnedTape<f32, Cpu>>().sum::<Rank0, _>();
        let g = (a + b).backward();
        let want = x.leaky_trace().fast_gelu().sum::<Rank0, _>().backward();
        let got = g.get(&x).as_vec();
        let ref_plus_one: Vec<f32> = want.get(&x).as_vec().iter().map(|v| v + 1.0).collect();
        assert!(max_rel(&got, &ref_plus_one) < 1e-5, "{got:?} vs {ref_plus_one:?}");
    }
}
