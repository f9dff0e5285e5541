//! Training with LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
//! eq. 3): each adapted linear layer computes `h = x·W + b + s·(x·A)·B` with the pretrained
//! `W`, `b` frozen, `A` `(in, r)` and `B` `(r, out)` trained, and `s = lora_alpha / r`
//! (rsLoRA, Kalajdzievski 2023: `lora_alpha / √r`). `A` starts as PEFT's does (Kaiming-uniform,
//! `U(−1/√in, 1/√in)`) and `B` at zero, so the adapted model starts as the pretrained one.
//!
//! The frozen `W` gets no gradient (the linear op skips `dW = xᵀ·dy`, half of the layer's
//! backward gemm work), and the optimizer keeps moments for `A` and `B` only. Everything that reads
//! weights outside the training forward — a checkpoint's `model.safetensors`, the rollout
//! engines — sees the merged `W + s·A·B`, so a checkpoint is a plain model for every later
//! stage and for transformers. The parameters are named `<linear>.lora_a` / `.lora_b` beside
//! the linear's `weight` (`blocks.0.attn.q.lora_a`).
//!
//! DoRA (`use_dora`; Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5)
//! also trains a magnitude `m` per output (`<linear>.lora_magnitude`, starting at the norms of
//! `W`'s columns): `h = (x·W + s·(x·A)·B) ⊙ m / ‖W + s·A·B‖_c + b`, the column norm `‖·‖_c`
//! (over the inputs) treated as a constant in the backward pass (the paper's §4.3, as PEFT
//! does). It starts as the pretrained layer (`m / ‖W‖_c` is exactly 1).

use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::dora::DoraScale;
use crate::error::PolicyError;
use crate::fused::FusedOps;
use crate::linear::{Affine, WeightLayout};
use crate::model::{CausalLm, Linear, Mlp, A2, T1, T2};
use crate::strided::{gemm_into, View};

/// Which linear layers a LoRA config adapts, and how (PEFT's `LoraConfig` field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank `r`. Default 8 (PEFT's).
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `lora_alpha / r`. Default 8 (PEFT's).
    pub lora_alpha: f64,
    /// rsLoRA's scale `lora_alpha / √r`. Default `false`.
    pub use_rslora: bool,
    /// DoRA: train a magnitude per output as well (see the module doc). Default `false`.
    pub use_dora: bool,
    /// PEFT's `lora_dropout`, read so that a PEFT config can be pasted: only 0 is accepted.
    /// rlhf's models run without dropout, so that log-probs are reproducible and PPO's first
    /// ratio is exactly 1 (the N+ implementation details, item 7; TRL's trainers switch dropout
    /// off for the same reason). Default 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub lora_dropout: f64,
    /// The layers to adapt: `"all-linear"` (every attention and MLP projection; not the LM
    /// head, as PEFT's), or a list of module names matched as PEFT matches them — a layer is
    /// adapted when its transformers module name (`model.layers.0.self_attn.q_proj`,
    /// `transformer.h.0.attn.c_attn`) or its name here (`blocks.0.attn.q`) is the entry or ends
    /// with `.` and the entry: `["q_proj", "v_proj"]`, `["c_attn"]` (GPT-2's fused q|k|v: each
    /// of q, k and v gets its own pair), `["attn.q", "mlp.down"]`. Default `"all-linear"`.
    pub target_modules: TargetModules,
    /// PEFT's `layers_to_transform`: adapt the targeted layers of these blocks only (0-based; a
    /// number is one block). Default: every block — or, with `optim.num_layers_unfrozen: N`,
    /// the top N, the ones that train: an update below them would be frozen with its block,
    /// and the untouched bottom stays the reference's, stored once and run once per batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Layers>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            use_rslora: false,
            use_dora: false,
            lora_dropout: 0.0,
            target_modules: TargetModules::default(),
            layers_to_transform: None,
        }
    }
}

/// [`LoraConfig::layers_to_transform`]: one block or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    /// One block.
    One(usize),
    /// These blocks.
    Many(Vec<usize>),
}

impl Layers {
    /// The blocks, in the order given.
    pub fn blocks(&self) -> Vec<usize> {
        match self {
            Layers::One(i) => vec![*i],
            Layers::Many(v) => v.clone(),
        }
    }
}

/// [`LoraConfig::target_modules`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"` (the only string accepted).
    All(AllLinear),
    /// Module names.
    Names(Vec<String>),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::All(AllLinear::AllLinear)
    }
}

/// The one string [`TargetModules`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllLinear {
    /// Every linear layer of the blocks.
    #[serde(rename = "all-linear")]
    AllLinear,
}

impl LoraConfig {
    /// The update's scale `s`.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.lora_alpha / r.sqrt() } else { self.lora_alpha / r }) as f32
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |f: &str, msg: String| optim_error(f, msg);
        if self.r == 0 {
            return Err(err("r", "must be at least 1".into()));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(err("lora_alpha", format!("{} must be finite and positive", self.lora_alpha)));
        }
        if matches!(&self.target_modules, TargetModules::Names(n) if n.is_empty()) {
            return Err(err("target_modules", "is empty: name the layers to adapt, or \"all-linear\"".into()));
        }
        if self.lora_dropout != 0.0 {
            let msg = format!(
                "{}: rlhf's models run without dropout (reproducible log-probs, PPO's first ratio exactly 1); \
                 set it to 0 or leave it out",
                self.lora_dropout
            );
            return Err(err("lora_dropout", msg));
        }
        if matches!(&self.layers_to_transform, Some(Layers::Many(v)) if v.is_empty()) {
            return Err(err("layers_to_transform", "is empty: name the blocks to adapt, or leave it out".into()));
        }
        Ok(())
    }

    /// This config for a model of `blocks` blocks of which `optim.num_layers_unfrozen` (`keep`)
    /// trains the top ones: without `layers_to_transform`, those blocks; with it, an error when
    /// it names a block below them (its update would be frozen with the block).
    pub fn within_top(&self, keep: Option<usize>, blocks: usize) -> Result<LoraConfig, PolicyError> {
        let Some(keep) = keep else { return Ok(self.clone()) };
        let first = blocks.saturating_sub(keep);
        let Some(layers) = &self.layers_to_transform else {
            return Ok(LoraConfig {
                layers_to_transform: Some(Layers::Many((first..blocks).collect())),
                ..self.clone()
            });
        };
        if let Some(i) = layers.blocks().into_iter().find(|&i| i < first) {
            let msg = format!(
                "block {i} is below the top {keep} that `optim.num_layers_unfrozen` trains (blocks {first}..{blocks}): \
                 its update would stay frozen"
            );
            return Err(optim_error("layers_to_transform", msg));
        }
        Ok(self.clone())
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// An error in the stage config's `optim.lora.<field>`.
fn optim_error(field: &str, msg: String) -> PolicyError {
    PolicyError::Config { file: "config".into(), field: format!("optim.lora.{field}"), msg }
}

/// One layer's low-rank update.
#[derive(Debug, Clone)]
pub struct Lora<D: Storage<f32>> {
    /// `A` `(in, r)`.
    pub a: T2<D>,
    /// `B` `(r, out)`.
    pub b: T2<D>,
    /// `s`.
    pub scale: f32,
    /// DoRA's magnitude `m` `(out,)`; `None` for plain LoRA.
    pub magnitude: Option<T1<D>>,
}

impl<D: Device<f32>> Lora<D> {
    /// `‖W + s·A·B‖_c`: each output's column norm over the inputs, untaped (DoRA's constant),
    /// as dfdx composes it (the default of [`FusedOps::dora_norms`]).
    pub fn column_norms(&self, w: &T2<D>) -> T1<D> {
        let merged = w.clone() + self.a.clone().matmul(self.b.clone()) * self.scale;
        merged.square().sum::<(usize,), Axis<0>>().sqrt()
    }

    /// `W + s·A·B` `(in, out)` on the host.
    fn merged_host(&self, w: &T2<D>) -> Vec<f32> {
        let mut w = w.as_vec();
        let ((i, r), (_, o)) = (*self.a.shape(), *self.b.shape());
        let (a, b) = (self.a.as_vec(), self.b.as_vec());
        let threads = rayon::current_num_threads();
        gemm_into(&mut w, (i, o, r), View::rows(&a, r), View::rows(&b, o), self.scale, true, threads);
        w
    }
}

/// The column norms of `W + s·A·B` computed on the host (the CPU's [`FusedOps::dora_norms`]):
/// per-chunk partial sums of squares in a fixed order, so the same numbers on every call.
pub(crate) fn column_norms_host(w: &T2<Cpu>, lora: &Lora<Cpu>) -> Vec<f32> {
    crate::dora::column_norms(&lora.merged_host(w), lora.b.shape().1)
}

impl<D: FusedOps> Lora<D> {
    /// `x·W + b (+ r) + s·(x·A)·B` for the frozen `base`: the base map without its weight's
    /// gradient, then the update through `r` columns, added onto it in the last gemm; with
    /// DoRA, `(x·W + s·(x·A)·B) ⊙ m / ‖W + s·A·B‖_c + b (+ r)` ([`crate::dora`]).
    pub(crate) fn forward<T: Tape<f32, D>>(
        &self,
        base: &Linear<D>,
        x: A2<D, T>,
        r: Option<&A2<D, NoneTape>>,
    ) -> A2<D, T> {
        // DoRA rescales x·W + s·(x·A)·B before the bias and the residual are added
        let (b, residual) = match &self.magnitude {
            Some(_) => (None, None),
            None => (base.b.as_ref(), r),
        };
        let (x, tape) = x.split_tape();
        let frozen = Affine { w: &base.w, layout: WeightLayout::InOut, b, residual, frozen: true };
        let (y, tape) = D::linear(x.clone().put_tape(tape), frozen).split_tape();
        let plain = |w| Affine { w, layout: WeightLayout::InOut, b: None, residual: None, frozen: false };
        let h = D::linear(x.put_tape(tape), plain(&self.a)) * self.scale;
        let y = D::linear(h, Affine { residual: Some(&y), ..plain(&self.b) });
        let Some(m) = &self.magnitude else { return y };
        let norms = D::dora_norms(&base.w, self);
        D::dora_scale(y, DoraScale { m, norms: &norms, b: base.b.as_ref(), residual: r })
    }
}

impl<D: Device<f32>> Linear<D> {
    /// The weight the layer applies, `(in, out)` on the host: `W`, or with an update
    /// `W + s·A·B` — with DoRA each column `j` times `m_j / ‖W + s·A·B‖_c` — (what checkpoints
    /// store and the rollout engines run).
    pub fn merged_w(&self) -> Vec<f32> {
        let Some(l) = &self.lora else { return self.w.as_vec() };
        let mut w = l.merged_host(&self.w);
        if let Some(m) = &l.magnitude {
            // the CPU forward pass's factor, computed as it computes it (CUDA's norms are
            // dfdx's, within rounding of these)
            crate::dora::rescale_outputs(&mut w, &m.as_vec(), true);
        }
        w
    }
}

/// Generates `linears` and `linears_mut`: every linear layer of the blocks with its name here
/// (`blocks.0.attn.q`), in [`CausalLm::params`]'s order.
macro_rules! linear_walker {
    ($fn_name:ident, $iter:ident, $($m:ident)?) => {
        impl<D: Storage<f32>> CausalLm<D> {
            /// Every linear layer of the blocks, named as in [`CausalLm::params`] without the
            /// `.weight`.
            pub fn $fn_name(&$($m)? self) -> Vec<(String, &$($m)? Linear<D>)> {
                let mut out = Vec::new();
                for (i, blk) in self.blocks.$iter().enumerate() {
                    let p = format!("blocks.{i}");
                    out.push((format!("{p}.attn.q"), &$($m)? blk.wq));
                    out.push((format!("{p}.attn.k"), &$($m)? blk.wk));
                    out.push((format!("{p}.attn.v"), &$($m)? blk.wv));
                    out.push((format!("{p}.attn.o"), &$($m)? blk.wo));
                    match &$($m)? blk.mlp {
                        Mlp::Gelu { fc, proj } => {
                            out.push((format!("{p}.mlp.fc"), fc));
                            out.push((format!("{p}.mlp.proj"), proj));
                        }
                        Mlp::SwiGlu { gate, up, down } => {
                            out.push((format!("{p}.mlp.gate"), gate));
                            out.push((format!("{p}.mlp.up"), up));
                            out.push((format!("{p}.mlp.down"), down));
                        }
                    }
                }
                out
            }
        }
    };
}

linear_walker!(linears, iter,);
linear_walker!(linears_mut, iter_mut, mut);

impl<D: FusedOps> CausalLm<D> {
    /// Adds a fresh update (`A` Kaiming-uniform from `seed`, `B` zero) to every layer `cfg`
    /// targets; the model computes what it did. Returns how many layers were adapted. An entry
    /// of `target_modules` that matches no layer is an error naming it.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<usize, PolicyError> {
        cfg.validate()?;
        let hf: Vec<String> = self
            .linears()
            .iter()
            .map(|(n, _)| self.hf_name(&format!("{n}.weight")).trim_end_matches(".weight").to_string())
            .collect();
        let matches = |entry: &str, name: &str| name == entry || name.ends_with(&format!(".{entry}"));
        let targeted = |ours: &str, theirs: &str, entry: &str| matches(entry, ours) || matches(entry, theirs);
        if let TargetModules::Names(entries) = &cfg.target_modules {
            let names = self.linears().into_iter().map(|(n, _)| n).zip(&hf).collect::<Vec<_>>();
            if let Some(e) = entries.iter().find(|e| !names.iter().any(|(o, t)| targeted(o, t, e))) {
                let some: Vec<&str> = hf.iter().take(7).map(String::as_str).collect();
                let msg = format!(
                    "{e:?} matches no linear layer (they are named like {}, or blocks.0.attn.q)",
                    some.join(", ")
                );
                return Err(optim_error("target_modules", msg));
            }
        }
        let blocks = cfg.layers_to_transform.as_ref().map(Layers::blocks);
        if let Some(i) = blocks.iter().flatten().find(|&&i| i >= self.blocks.len()) {
            let msg = format!("block {i} is not in the model (it has {} blocks, from 0)", self.blocks.len());
            return Err(optim_error("layers_to_transform", msg));
        }
        let in_blocks = |name: &str| {
            let block = name.strip_prefix("blocks.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
            blocks.as_ref().is_none_or(|b| block.is_some_and(|i| b.contains(&i)))
        };
        let (mut rng, scale, r, dev) = (StdRng::seed_from_u64(seed), cfg.scale(), cfg.r, self.dev.clone());
        let mut adapted = 0;
        for ((name, lin), theirs) in self.linears_mut().into_iter().zip(&hf) {
            let on = in_blocks(&name)
                && match &cfg.target_modules {
                    TargetModules::All(_) => true,
                    TargetModules::Names(entries) => entries.iter().any(|e| targeted(&name, theirs, e)),
                };
            if !on {
                continue;
            }
            let (i, o) = *lin.w.shape();
            let bound = 1.0 / (i as f32).sqrt();
            let a: Vec<f32> = (0..i * r).map(|_| rng.gen_range(-bound..bound)).collect();
            let mut lora =
                Lora { a: dev.tensor_from_vec(a, (i, r)), b: dev.zeros_like(&(r, o)), scale, magnitude: None };
            if cfg.use_dora {
                lora.magnitude = Some(D::dora_norms(&lin.w, &lora));
            }
            lin.lora = Some(Box::new(lora));
            adapted += 1;
        }
        Ok(adapted)
    }
}

impl<D: Storage<f32>> CausalLm<D> {
    /// Whether any layer carries an update.
    pub fn has_lora(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.lora.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_peft_names_and_checks_them() {
        let c: LoraConfig =
            serde_json::from_str(r#"{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}"#).unwrap();
        assert_eq!((c.r, c.scale()), (16, 2.0));
        assert_eq!(c.target_modules, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
        let d: LoraConfig =
            serde_json::from_str(r#"{"target_modules": "all-linear", "use_rslora": true, "r": 4}"#).unwrap();
        assert_eq!((d.scale(), d.target_modules), (4.0, TargetModules::default()));
        assert!(serde_json::from_str::<LoraConfig>(r#"{"target_modules": "all"}"#).is_err());
        let dropout: LoraConfig = serde_json::from_str(r#"{"lora_dropout": 0.05}"#).unwrap();
        let e = dropout.validate().unwrap_err().to_string();
        assert!(e.contains("optim.lora.lora_dropout") && e.contains("without dropout"), "{e}");
        let zero: LoraConfig = serde_json::from_str(r#"{"lora_dropout": 0.0}"#).unwrap();
        assert!(zero.validate().is_ok());
        assert!(!serde_json::to_string(&zero).unwrap().contains("lora_dropout"), "0 is not written back");
        let zero = LoraConfig { r: 0, ..LoraConfig::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("optim.lora.r"));
    }
}
