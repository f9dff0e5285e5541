//! The parameter walker (our substitute for dfdx's const-shaped `TensorCollection`), and what is
//! built on it: parameter maps, AdamW with decay exclusions, and global grad-norm clipping.

use dfdx::prelude::*;

use crate::model::{CausalLm, Linear, Mlp, Norm, T1, T2};

/// A shared reference to one parameter.
#[derive(Debug)]
pub enum ParamRef<'a, D: Storage<f32>> {
    /// 1-D (biases, norm gains).
    V(&'a T1<D>),
    /// 2-D (weights, embeddings).
    M(&'a T2<D>),
}

/// A mutable reference to one parameter.
#[derive(Debug)]
pub enum ParamMut<'a, D: Storage<f32>> {
    /// 1-D (biases, norm gains).
    V(&'a mut T1<D>),
    /// 2-D (weights, embeddings).
    M(&'a mut T2<D>),
}

impl<D: Device<f32>> ParamRef<'_, D> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            ParamRef::V(t) => t.shape().0,
            ParamRef::M(t) => t.shape().0 * t.shape().1,
        }
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Row-major values.
    pub fn to_vec(&self) -> Vec<f32> {
        match self {
            ParamRef::V(t) => t.as_vec(),
            ParamRef::M(t) => t.as_vec(),
        }
    }
    /// Shape as a list.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            ParamRef::V(t) => vec![t.shape().0],
            ParamRef::M(t) => vec![t.shape().0, t.shape().1],
        }
    }
    /// The id its gradient is keyed by ([`tensor_id`]).
    pub fn id(&self) -> UniqueId {
        match self {
            ParamRef::V(t) => tensor_id(*t),
            ParamRef::M(t) => tensor_id(*t),
        }
    }
    /// Whether `other` holds the same values bit for bit: at once when both are one tensor
    /// (as after [`CausalLm::share_storage`]), else by reading both to the host.
    pub fn bitwise_eq(&self, other: &Self) -> bool {
        let bits = |p: &Self| p.to_vec().into_iter().map(f32::to_bits);
        self.id() == other.id() || (self.shape() == other.shape() && bits(self).eq(bits(other)))
    }
}

/// Generates `params` (shared) and `params_mut` (mutable) from one list of fields, so the two
/// walks can never disagree on names or order.
macro_rules! walker {
    ($fn_name:ident, $P:ident, $iter:ident, $($m:ident)?) => {
        impl<D: Device<f32>> CausalLm<D> {
            /// Every parameter with its canonical name, in a fixed order.
            pub fn $fn_name(&$($m)? self) -> Vec<(String, $P<'_, D>)> {
                let mut out = Vec::new();
                out.push(("wte".to_string(), $P::M(&$($m)? self.wte)));
                if let Some(w) = &$($m)? self.wpe {
                    out.push(("wpe".to_string(), $P::M(w)));
                }
                for (i, blk) in self.blocks.$iter().enumerate() {
                    let p = format!("blocks.{i}");
                    if let Some(ln1) = &$($m)? blk.ln1 {
                        norm(&format!("{p}.ln1"), ln1, &mut out);
                    }
                    linear(&format!("{p}.attn.q"), &$($m)? blk.wq, &mut out);
                    linear(&format!("{p}.attn.k"), &$($m)? blk.wk, &mut out);
                    linear(&format!("{p}.attn.v"), &$($m)? blk.wv, &mut out);
                    linear(&format!("{p}.attn.o"), &$($m)? blk.wo, &mut out);
                    if let Some([q_norm, k_norm]) = &$($m)? blk.qk_norm {
                        norm(&format!("{p}.attn.q_norm"), q_norm, &mut out);
                        norm(&format!("{p}.attn.k_norm"), k_norm, &mut out);
                    }
                    if let Some(ln2) = &$($m)? blk.ln2 {
                        norm(&format!("{p}.ln2"), ln2, &mut out);
                    }
                    match &$($m)? blk.mlp {
                        Mlp::Gelu { fc, proj } => {
                            linear(&format!("{p}.mlp.fc"), fc, &mut out);
                            linear(&format!("{p}.mlp.proj"), proj, &mut out);
                        }
                        Mlp::SwiGlu { gate, up, down } => {
                            linear(&format!("{p}.mlp.gate"), gate, &mut out);
                            linear(&format!("{p}.mlp.up"), up, &mut out);
                            linear(&format!("{p}.mlp.down"), down, &mut out);
                        }
                    }
                    if let Some([attn, mlp]) = &$($m)? blk.post_norms {
                        norm(&format!("{p}.attn.post_norm"), attn, &mut out);
                        norm(&format!("{p}.mlp.post_norm"), mlp, &mut out);
                    }
                }
                norm("ln_f", &$($m)? self.ln_f, &mut out);
                if let Some(w) = &$($m)? self.lm_head {
                    out.push(("lm_head".to_string(), $P::M(w)));
                }
                return out;

                fn linear<'a, D: Device<f32>>(p: &str, l: &'a $($m)? Linear<D>, out: &mut Vec<(String, $P<'a, D>)>) {
                    out.push((format!("{p}.weight"), $P::M(&$($m)? l.w)));
                    if let Some(b) = &$($m)? l.b {
                        out.push((format!("{p}.bias"), $P::V(b)));
                    }
                    if let Some(lora) = &$($m)? l.lora {
                        out.push((format!("{p}.lora_a"), $P::M(&$($m)? lora.a)));
                        out.push((format!("{p}.lora_b"), $P::M(&$($m)? lora.b)));
                        if let Some(m) = &$($m)? lora.magnitude {
                            out.push((format!("{p}.lora_magnitude"), $P::V(m)));
                        }
                    }
                }
                fn norm<'a, D: Device<f32>>(p: &str, n: &'a $($m)? Norm<D>, out: &mut Vec<(String, $P<'a, D>)>) {
                    out.push((format!("{p}.weight"), $P::V(&$($m)? n.w)));
                    if let Some(b) = &$($m)? n.b {
                        out.push((format!("{p}.bias"), $P::V(b)));
                    }
                }
            }
        }
    };
}

walker!(params, ParamRef, iter,);
walker!(params_mut, ParamMut, iter_mut, mut);

impl<D: Device<f32>> CausalLm<D> {
    /// Replaces every parameter by `f(param)` (used for frozen copies and device moves).
    pub fn map_params(&mut self, mut fv: impl FnMut(&T1<D>) -> T1<D>, mut fm: impl FnMut(&T2<D>) -> T2<D>) {
        for (_, p) in self.params_mut() {
            match p {
                ParamMut::V(t) => *t = fv(t),
                ParamMut::M(t) => *t = fm(t),
            }
        }
    }

    /// A deep copy whose parameters have fresh tensor ids: a taped forward through it can never
    /// write gradients onto the original's ids (`clone()` would share them).
    pub fn frozen_copy(&self) -> Self {
        let mut copy = self.clone();
        copy.map_params(|t| t.clone() + 0.0f32, |t| t.clone() + 0.0f32);
        copy.frozen = FrozenTrunk::default();
        copy.linears_mut().into_iter().for_each(|(_, l)| l.frozen = false);
        copy
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, p)| p.len()).sum()
    }

    /// Lets a taped forward run the embeddings and the longest run of leading blocks whose
    /// parameters are all `frozen` (by name, as [`CausalLm::params`] gives them) without a
    /// tape: they get no gradient, and the backward pass stops at the first block that trains.
    /// Nothing changes while the embeddings train. A frozen LM head (`lm_head`, or the tied
    /// `wte`) gets no weight gradient either, nor does a frozen linear layer above them
    /// (its weight and bias: [`crate::linear::Affine::frozen`]). Returns the number of blocks
    /// run untaped.
    pub fn set_frozen_trunk(&mut self, frozen: impl Fn(&str) -> bool) -> usize {
        let params = self.params();
        let all_frozen =
            |part: &str| params.iter().filter(|(n, _)| crate::freeze::covers(part, n)).all(|(n, _)| frozen(n));
        let k = if all_frozen("wte") && all_frozen("wpe") {
            (0..self.blocks.len()).take_while(|i| all_frozen(&format!("blocks.{i}"))).count()
        } else {
            0
        };
        let head = all_frozen(if self.lm_head.is_some() { "lm_head" } else { "wte" });
        self.frozen = FrozenTrunk { blocks: k, head };
        for (name, lin) in self.linears_mut() {
            let bias_frozen = lin.b.is_none() || frozen(&format!("{name}.bias"));
            lin.frozen = frozen(&format!("{name}.weight")) && bias_frozen;
        }
        k
    }

    /// The leading blocks a taped forward runs untaped ([`CausalLm::set_frozen_trunk`]).
    pub fn frozen_blocks(&self) -> usize {
        self.frozen.blocks
    }

    /// How many leading blocks `self` and `other` share with their embeddings: the longest
    /// run, at most `limit` and leaving a block above, whose parameters are bitwise equal (0
    /// when the embeddings or the shapes differ). Reads those weights to the host once, unless
    /// they are already one tensor ([`CausalLm::share_storage`]).
    pub fn shared_bottom(&self, other: &Self, limit: usize) -> usize {
        let most = limit.min(self.blocks.len().saturating_sub(1));
        if most == 0 || self.dims != other.dims {
            return 0;
        }
        let (mine, theirs) = (self.params(), other.params());
        let same = |part: &str| {
            let mut pairs = mine.iter().zip(&theirs).filter(|((n, _), _)| crate::freeze::covers(part, n));
            pairs.all(|((n, a), (m, b))| n == m && a.bitwise_eq(b))
        };
        if !(same("wte") && same("wpe")) {
            return 0;
        }
        (0..most).take_while(|i| same(&format!("blocks.{i}"))).count()
    }

    /// Makes each parameter of `self` that `share` names and that is bitwise equal to
    /// `source`'s parameter of the same name a clone of `source`'s — the same buffer and the
    /// same tensor id — and frees `self`'s own copy. Only for parameters neither model ever
    /// changes (frozen in both; a reference's): an update would copy the buffer before writing
    /// (dfdx's copy-on-write), but gradients are keyed by the id, which is shared. Returns the
    /// number of values shared.
    pub fn share_storage(&mut self, source: &Self, share: impl Fn(&str) -> bool) -> usize {
        if self.dims != source.dims {
            return 0;
        }
        // by name: a model with LoRA updates (crate::lora) has parameters the other lacks
        let theirs: std::collections::HashMap<String, ParamRef<'_, D>> = source.params().into_iter().collect();
        let equal: Vec<bool> =
            self.params().iter().map(|(n, a)| share(n) && theirs.get(n).is_some_and(|b| a.bitwise_eq(b))).collect();
        let mut shared = 0;
        for ((name, mine), equal) in self.params_mut().into_iter().zip(equal) {
            let Some(theirs) = theirs.get(&name).filter(|_| equal) else { continue };
            match (mine, theirs) {
                (ParamMut::V(a), ParamRef::V(b)) => *a = (*b).clone(),
                (ParamMut::M(a), ParamRef::M(b)) => *a = (*b).clone(),
                _ => continue,
            }
            shared += theirs.len();
        }
        shared
    }
}

/// The parts of a [`CausalLm`] whose gradients a taped forward does not compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FrozenTrunk {
    /// How many leading blocks run untaped, with the embeddings: nothing below the first block
    /// that trains needs a gradient.
    pub(crate) blocks: usize,
    /// Whether the LM head's weight (`lm_head`, or the tied `wte`) is frozen: the head ops skip
    /// its gradient `dW = dlogitsᵀ·h` (see [`crate::logprobs::Head`]).
    pub(crate) head: bool,
}

/// The id dfdx keys a tensor's gradient by (dfdx has no public getter; `UnusedTensors::add`
/// records it).
pub fn tensor_id<S: Shape, D: Device<f32>, T>(t: &Tensor<S, f32, D, T>) -> UniqueId {
    let mut u = dfdx::optim::UnusedTensors::default();
    u.add(t);
    u.ids[0]
}

/// Anything trained as one unit: a model, a backbone with a head, a policy and its critic.
/// The optimizer, grad clipping and checkpoints walk these names.
pub trait HasParams<D: Device<f32>> {
    /// Every trained parameter with a unique name, in a fixed order.
    fn params(&self) -> Vec<(String, ParamRef<'_, D>)>;
    /// The same parameters, mutable, in the same order.
    fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, D>)>;
    /// The transformers among them, each with the prefix its parameters' names carry here
    /// (`""` for a bare model), so a trainer can tell each which of its blocks are frozen
    /// ([`CausalLm::set_frozen_trunk`]). Default: none.
    fn trunks_mut(&mut self) -> Vec<(&'static str, &mut CausalLm<D>)> {
        vec![]
    }
    /// The language model the unit is built around (a policy, not its critic), if any: what a
    /// LoRA run exports as its PEFT adapter. Default: none.
    fn language_model(&self) -> Option<&CausalLm<D>> {
        None
    }
    /// What a LoRA run's PEFT adapter holds whole beside the language model's updates, by HF
    /// name: a reward model's `score` head, making it a `SEQ_CLS` adapter. Default: none (a
    /// causal LM's adapter).
    fn adapter_head(&self) -> Option<std::collections::BTreeMap<String, crate::checkpoint::HostTensor>> {
        None
    }
}

impl<D: Device<f32>> HasParams<D> for CausalLm<D> {
    fn params(&self) -> Vec<(String, ParamRef<'_, D>)> {
        CausalLm::params(self)
    }
    fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, D>)> {
        CausalLm::params_mut(self)
    }
    fn trunks_mut(&mut self) -> Vec<(&'static str, &mut CausalLm<D>)> {
        vec![("", self)]
    }
    fn language_model(&self) -> Option<&CausalLm<D>> {
        Some(self)
    }
}
