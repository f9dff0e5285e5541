//! AdamW over the parameter walker, and global gradient-norm clipping.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::checkpoint::HostTensor;
use crate::error::{dev_err, PolicyError};
use crate::params::{ParamMut, ParamRef};

/// What a device must offer the optimizer beyond dfdx's `Device`: in-place access to gradient
/// buffers for the norm and the clip scale. The CPU buffer is a `Vec<f32>`.
pub trait GradBuffers: Device<f32> {
    /// Σ g² over one gradient buffer, accumulated in f64.
    fn sum_sq(buf: &<Self as Storage<f32>>::Vec) -> f64;
    /// `g *= s` in place.
    fn scale(buf: &mut <Self as Storage<f32>>::Vec, s: f32);
    /// The buffer's values on the host.
    fn read(buf: &<Self as Storage<f32>>::Vec) -> Vec<f32>;
    /// Overwrites the buffer with `data` (same length).
    fn write(buf: &mut <Self as Storage<f32>>::Vec, data: &[f32]);
}

impl GradBuffers for Cpu {
    fn sum_sq(buf: &<Self as Storage<f32>>::Vec) -> f64 {
        buf.iter().map(|&g| (g as f64) * (g as f64)).sum()
    }
    fn scale(buf: &mut <Self as Storage<f32>>::Vec, s: f32) {
        buf.iter_mut().for_each(|g| *g *= s);
    }
    fn read(buf: &<Self as Storage<f32>>::Vec) -> Vec<f32> {
        buf.to_vec()
    }
    fn write(buf: &mut <Self as Storage<f32>>::Vec, data: &[f32]) {
        buf.copy_from_slice(data);
    }
}

/// AdamW hyper-parameters (Loshchilov & Hutter 2019, decoupled weight decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Learning rate. Defaults to `1e-4`; a schedule may override it per step.
    pub lr: f64,
    /// β₁, β₂. Default `[0.9, 0.999]`.
    pub betas: [f64; 2],
    /// ε. Default `1e-8`.
    pub eps: f64,
    /// Decoupled weight decay λ. Default `0.0`.
    pub weight_decay: f64,
    /// Exclude 1-D parameters (biases and norm gains) from weight decay, as nanoGPT does.
    /// Default `true`.
    pub no_decay_1d: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0, no_decay_1d: true }
    }
}

/// AdamW state: step count and first/second moments keyed by parameter id.
#[derive(Debug)]
pub struct AdamW<D: Storage<f32>> {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Steps taken.
    pub t: i32,
    m: Gradients<f32, D>,
    v: Gradients<f32, D>,
}

impl<D: Device<f32>> AdamW<D> {
    /// Fresh state.
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, t: 0, m: Gradients::leaky(), v: Gradients::leaky() }
    }

    /// One update of every parameter in `params` with the gradients in `grads`, at learning
    /// rate `lr`. A parameter absent from `grads` is updated with a zero gradient.
    pub fn step(
        &mut self,
        params: Vec<(String, ParamMut<'_, D>)>,
        grads: &mut Gradients<f32, D>,
        lr: f64,
    ) -> Result<(), PolicyError> {
        self.t += 1;
        for (_, p) in params {
            let decay = |is_1d: bool| {
                let wd = if is_1d && self.cfg.no_decay_1d { 0.0 } else { self.cfg.weight_decay };
                (wd > 0.0).then_some(WeightDecay::Decoupled(wd))
            };
            match p {
                ParamMut::V(p) => {
                    let cfg = self.adam_cfg(lr, decay(true));
                    let g = grads.get_or_alloc_mut(p).map_err(dev_err)?;
                    let m = self.m.get_or_alloc_mut(p).map_err(dev_err)?;
                    let v = self.v.get_or_alloc_mut(p).map_err(dev_err)?;
                    cfg.try_update(self.t, p, m, v, g).map_err(dev_err)?;
                }
                ParamMut::M(p) => {
                    let cfg = self.adam_cfg(lr, decay(false));
                    let g = grads.get_or_alloc_mut(p).map_err(dev_err)?;
                    let m = self.m.get_or_alloc_mut(p).map_err(dev_err)?;
                    let v = self.v.get_or_alloc_mut(p).map_err(dev_err)?;
                    cfg.try_update(self.t, p, m, v, g).map_err(dev_err)?;
                }
            }
        }
        Ok(())
    }

    fn adam_cfg(&self, lr: f64, weight_decay: Option<WeightDecay>) -> AdamConfig {
        AdamConfig { lr, betas: self.cfg.betas, eps: self.cfg.eps, weight_decay }
    }
}

impl<D: GradBuffers> AdamW<D> {
    /// The optimizer state for a checkpoint: `exp_avg.<name>` and `exp_avg_sq.<name>` for
    /// every parameter (PyTorch's names), and the step count.
    pub fn state(
        &mut self,
        params: &[(String, ParamRef<'_, D>)],
    ) -> Result<(i32, BTreeMap<String, HostTensor>), PolicyError> {
        let mut out = BTreeMap::new();
        for (name, p) in params {
            let shape = p.shape();
            out.insert(
                format!("exp_avg.{name}"),
                HostTensor { shape: shape.clone(), data: D::read(grad_mut(p, &mut self.m)?) },
            );
            out.insert(format!("exp_avg_sq.{name}"), HostTensor { shape, data: D::read(grad_mut(p, &mut self.v)?) });
        }
        Ok((self.t, out))
    }

    /// Restores what [`AdamW::state`] saved (`file` names the source in errors).
    pub fn load_state(
        &mut self,
        params: &[(String, ParamRef<'_, D>)],
        t: i32,
        tensors: &BTreeMap<String, HostTensor>,
        file: &std::path::Path,
    ) -> Result<(), PolicyError> {
        for (name, p) in params {
            for (prefix, moments) in [("exp_avg", &mut self.m), ("exp_avg_sq", &mut self.v)] {
                let key = format!("{prefix}.{name}");
                let h = tensors
                    .get(&key)
                    .ok_or_else(|| PolicyError::tensor(file, &key, "missing from the optimizer state"))?;
                if h.shape != p.shape() {
                    return Err(PolicyError::tensor(
                        file,
                        &key,
                        format!("shape {:?}, parameter has {:?}", h.shape, p.shape()),
                    ));
                }
                D::write(grad_mut(p, moments)?, &h.data);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of the gradients of `params`; if it exceeds `max_norm`, scales every gradient
/// by `max_norm / norm` (PyTorch's `clip_grad_norm_`, without its 1e-6 fudge). Returns the norm
/// before clipping.
pub fn clip_grad_norm<D: GradBuffers>(
    params: &[(String, ParamRef<'_, D>)],
    grads: &mut Gradients<f32, D>,
    max_norm: f64,
) -> Result<f64, PolicyError> {
    let mut sq = 0.0f64;
    for (_, p) in params {
        sq += D::sum_sq(grad_mut(p, grads)?);
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = (max_norm / norm) as f32;
        for (_, p) in params {
            D::scale(grad_mut(p, grads)?, s);
        }
    }
    Ok(norm)
}

fn grad_mut<'g, D: Device<f32>>(
    p: &ParamRef<'_, D>,
    grads: &'g mut Gradients<f32, D>,
) -> Result<&'g mut <D as Storage<f32>>::Vec, PolicyError> {
    match p {
        ParamRef::V(t) => grads.get_or_alloc_mut(*t).map_err(dev_err),
        ParamRef::M(t) => grads.get_or_alloc_mut(*t).map_err(dev_err),
    }
}
