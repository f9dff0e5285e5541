//! AdamW over the parameter walker, and global gradient-norm clipping.

use dfdx::prelude::*;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::checkpoint::HostTensor;
use crate::error::{dev_err, PolicyError};
use crate::freeze::frozen_mask;
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
    /// Runs the Adam update of every job. The updates touch disjoint buffers; the CPU spreads
    /// them over the rayon pool (dfdx's Adam kernel is single-threaded, and one update step
    /// of the tiny model's 4.2M parameters took 3.5 ms on one core). Each job carries its
    /// parameter's own step count.
    fn adam_updates(jobs: &mut [AdamJob<'_, Self>]) -> Result<(), Self::Err>;
}

/// A device's gradient (and moment) buffer.
type Buf<D> = <D as Storage<f32>>::Vec;

/// One parameter's Adam update: the hyper-parameters, the parameter's step count (this step
/// included), the parameter, and its moments and gradient, taken out of their maps for the
/// duration of the step.
pub struct AdamJob<'a, D: Storage<f32>> {
    cfg: AdamConfig,
    t: i32,
    p: ParamMut<'a, D>,
    m: Buf<D>,
    v: Buf<D>,
    g: Buf<D>,
}

impl<D: Storage<f32>> std::fmt::Debug for AdamJob<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamJob")
            .field("cfg", &self.cfg)
            .field("t", &self.t)
            .field("p", &self.p)
            .finish_non_exhaustive()
    }
}

impl<D: Device<f32>> AdamJob<'_, D> {
    fn run(&mut self) -> Result<(), D::Err> {
        let AdamJob { cfg, t, p, m, v, g } = self;
        match p {
            ParamMut::V(p) => cfg.try_update(*t, *p, m, v, g),
            ParamMut::M(p) => cfg.try_update(*t, *p, m, v, g),
        }
    }
}

/// Chunk length of the CPU's parallel gradient reductions: fixed, so that the sum of squares
/// adds the same partial sums in the same order whatever the thread count.
const CHUNK: usize = 1 << 14;

impl GradBuffers for Cpu {
    fn sum_sq(buf: &<Self as Storage<f32>>::Vec) -> f64 {
        let partial: Vec<f64> =
            buf.par_chunks(CHUNK).map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum()).collect();
        partial.iter().sum()
    }
    fn scale(buf: &mut <Self as Storage<f32>>::Vec, s: f32) {
        buf.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|g| *g *= s));
    }
    fn read(buf: &<Self as Storage<f32>>::Vec) -> Vec<f32> {
        buf.to_vec()
    }
    fn write(buf: &mut <Self as Storage<f32>>::Vec, data: &[f32]) {
        buf.copy_from_slice(data);
    }
    fn adam_updates(jobs: &mut [AdamJob<'_, Self>]) -> Result<(), Self::Err> {
        jobs.par_iter_mut().try_for_each(|j| j.run())
    }
}

/// The GPU's gradient norm and clip scale run on the device (`optim_kernels.cu`: one 8-byte
/// read per buffer where a copy of every gradient went through the host; the sum is in f64
/// and in a fixed order, as on the CPU); reads and writes for checkpoints go through the host;
/// dfdx's own CUDA kernel runs the Adam updates.
#[cfg(feature = "cuda")]
impl GradBuffers for Cuda {
    fn sum_sq(buf: &<Self as Storage<f32>>::Vec) -> f64 {
        use cudarc::driver::{DeviceSlice, LaunchAsync, LaunchConfig};
        let dev = buf.device();
        let [sum_sq, _] = grad_kernels(&dev);
        // SAFETY: the kernel always writes out[0] before it is read.
        let mut out = unsafe { dev.alloc::<f64>(1) }.unwrap_or_else(|e| panic!("allocating the norm's sum: {e:?}"));
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: sum_sq_f64(const float *g, unsigned long long n, double *out) reads n floats of
        // the buffer and writes one double.
        unsafe { sum_sq.launch(cfg, (buf, buf.len() as u64, &mut out)) }
            .unwrap_or_else(|e| panic!("the gradient norm kernel: {e:?}"));
        dev.dtoh_sync_copy(&out).unwrap_or_else(|e| panic!("reading the gradient norm: {e:?}"))[0]
    }
    fn scale(buf: &mut <Self as Storage<f32>>::Vec, s: f32) {
        use cudarc::driver::{DeviceSlice, LaunchAsync, LaunchConfig};
        let [_, scale] = grad_kernels(&buf.device());
        let n = buf.len();
        // SAFETY: scale_f32(float *g, unsigned long long n, float s) writes the n floats of the
        // buffer.
        unsafe { scale.launch(LaunchConfig::for_num_elems(n as u32), (&mut *buf, n as u64, s)) }
            .unwrap_or_else(|e| panic!("the gradient scale kernel: {e:?}"));
    }
    fn read(buf: &<Self as Storage<f32>>::Vec) -> Vec<f32> {
        buf.device().dtoh_sync_copy(buf).unwrap_or_else(|e| panic!("copying a gradient buffer to the host: {e:?}"))
    }
    fn write(buf: &mut <Self as Storage<f32>>::Vec, data: &[f32]) {
        buf.device().htod_sync_copy_into(data, buf).unwrap_or_else(|e| panic!("copying a buffer to the GPU: {e:?}"))
    }
    fn adam_updates(jobs: &mut [AdamJob<'_, Self>]) -> Result<(), Self::Err> {
        jobs.iter_mut().try_for_each(|j| j.run())
    }
}

/// `optim_kernels.cu`'s `[sum_sq_f64, scale_f32]` on `dev` (dfdx's device), compiled with
/// NVRTC once per process and loaded once per device.
#[cfg(feature = "cuda")]
fn grad_kernels(dev: &std::sync::Arc<cudarc::driver::CudaDevice>) -> [cudarc::driver::CudaFunction; 2] {
    use std::sync::OnceLock;
    const MODULE: &str = "rlhf_grad_norm";
    const NAMES: [&str; 2] = ["sum_sq_f64", "scale_f32"];
    static PTX: OnceLock<Result<cudarc::nvrtc::Ptx, String>> = OnceLock::new();
    if !dev.has_func(MODULE, NAMES[0]) {
        let ptx = PTX
            .get_or_init(|| cudarc::nvrtc::compile_ptx(include_str!("optim_kernels.cu")).map_err(|e| format!("{e:?}")))
            .clone()
            .unwrap_or_else(|e| panic!("compiling optim_kernels.cu: {e}"));
        dev.load_ptx(ptx, MODULE, &NAMES).unwrap_or_else(|e| panic!("loading optim_kernels.cu: {e:?}"));
    }
    NAMES.map(|n| dev.get_func(MODULE, n).unwrap_or_else(|| panic!("kernel {n} missing")))
}

/// AdamW hyper-parameters (Loshchilov & Hutter 2019, decoupled weight decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Peak learning rate: the stages scale it per step by their `schedule`. Default `1e-4`.
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
    /// Parameters left as they are (not stepped, not counted in the gradient norm), by name or
    /// by a prefix of whole dot-separated parts: `wte`, `blocks.0` (not `blocks.10`), and in
    /// PPO `policy.blocks.0` — the names in `optimizer.safetensors` (`exp_avg.<name>`). Each
    /// must match some parameter. Default: none.
    pub freeze: Vec<String>,
    /// trlx's `num_layers_unfrozen`: in every transformer the run trains (PPO: the policy and
    /// a separate critic), only the top N blocks, the final norm and an untied LM head train;
    /// the other blocks and the embeddings (hence a tied head) are frozen, and their backward
    /// pass is skipped (see [`crate::freeze::frozen_mask`]). Adds to `freeze`. Default: none
    /// (all train).
    pub num_layers_unfrozen: Option<usize>,
    /// Train a LoRA update instead of the weights ([`crate::lora`]): in every transformer the
    /// run trains, the targeted layers get `A`, `B` and everything else of the transformer is
    /// frozen (heads outside it — a reward model's `score`, PPO's value head — still train, as
    /// PEFT's `modules_to_save`). Combines with `freeze` and `num_layers_unfrozen` (a parameter
    /// either freezes stays frozen). Default: none.
    pub lora: Option<crate::lora::LoraConfig>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            no_decay_1d: true,
            freeze: vec![],
            num_layers_unfrozen: None,
            lora: None,
        }
    }
}

impl AdamWConfig {
    /// Checks the numbers (`lr` finite and ≥ 0, each β in [0, 1), `eps` > 0, `weight_decay`
    /// finite and ≥ 0) and returns, per parameter of `names` (a model's, in its order), whether
    /// `freeze` and `num_layers_unfrozen` leave it as it is ([`crate::freeze::frozen_mask`]).
    pub fn frozen(&self, names: &[&str]) -> Result<Vec<bool>, PolicyError> {
        let field =
            |f: &str, msg: String| PolicyError::Config { file: "config".into(), field: format!("optim.{f}"), msg };
        let [b1, b2] = self.betas;
        let in_unit = |b: f64| (0.0..1.0).contains(&b);
        let bad = [
            ("lr", self.lr.is_finite() && self.lr >= 0.0, self.lr, "[0, inf)"),
            ("betas", in_unit(b1) && in_unit(b2), if in_unit(b1) { b2 } else { b1 }, "[0, 1)"),
            ("eps", self.eps > 0.0 && self.eps.is_finite(), self.eps, "(0, inf)"),
            ("weight_decay", self.weight_decay.is_finite() && self.weight_decay >= 0.0, self.weight_decay, "[0, inf)"),
        ];
        if let Some((f, _, v, range)) = bad.iter().find(|b| !b.1) {
            return Err(field(f, format!("{v} is out of range {range}")));
        }
        let mut mask = frozen_mask(&self.freeze, self.num_layers_unfrozen, names)?;
        if let Some(lora) = &self.lora {
            lora.validate()?;
            crate::freeze::freeze_all_but_lora(names, &mut mask)?;
        }
        Ok(mask)
    }
}

/// AdamW state: step counts and first/second moments keyed by parameter id.
#[derive(Debug)]
pub struct AdamW<D: Storage<f32>> {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Steps taken.
    pub t: i32,
    /// Steps each parameter sat out ([`AdamW::step_with`] without a rate for it), by name;
    /// absent: none. A parameter's own step count, which its bias correction uses, is `t`
    /// minus these — as if it had its own optimizer (OpenRLHF's actor beside its critic).
    sat_out: BTreeMap<String, i32>,
    m: Gradients<f32, D>,
    v: Gradients<f32, D>,
    /// Per parameter, in the model's order: not frozen (set by the first step, see
    /// [`AdamW::trainable`]).
    trainable: Option<Vec<bool>>,
}

impl<D: Device<f32>> AdamW<D> {
    /// Fresh state.
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, t: 0, sat_out: BTreeMap::new(), m: Gradients::leaky(), v: Gradients::leaky(), trainable: None }
    }

    /// Which of the parameters `names` (the model's, in its order) train: those `freeze` and
    /// `num_layers_unfrozen` leave out. Checked and worked out ([`AdamWConfig::frozen`]) on the
    /// first call, then kept: the names are the same at every step.
    pub fn trainable<'a>(&mut self, names: impl IntoIterator<Item = &'a str> + Clone) -> Result<&[bool], PolicyError> {
        let n = names.clone().into_iter().count();
        if self.trainable.as_ref().is_none_or(|t| t.len() != n) {
            let names: Vec<&str> = names.into_iter().collect();
            self.trainable = Some(self.cfg.frozen(&names)?.into_iter().map(|f| !f).collect());
        }
        Ok(self.trainable.as_deref().expect("set above"))
    }

    /// The parameters of `params` that train ([`AdamW::trainable`]).
    fn training<'p, 'a>(
        &mut self,
        params: &'p [(String, ParamRef<'a, D>)],
    ) -> Result<Vec<&'p (String, ParamRef<'a, D>)>, PolicyError> {
        let trainable = self.trainable(params.iter().map(|(n, _)| n.as_str()))?;
        Ok(params.iter().zip(trainable).filter(|(_, &t)| t).map(|(p, _)| p).collect())
    }
}

impl<D: GradBuffers> AdamW<D> {
    /// One update of every parameter in `params` with the gradients in `grads`, at learning
    /// rate `lr`; frozen ones ([`AdamW::trainable`]) are left. A parameter absent from `grads`
    /// is updated with a zero gradient.
    pub fn step(
        &mut self,
        params: Vec<(String, ParamMut<'_, D>)>,
        grads: &mut Gradients<f32, D>,
        lr: f64,
    ) -> Result<(), PolicyError> {
        self.step_with(params, grads, |_| Some(lr))
    }

    /// [`AdamW::step`] with each parameter's learning rate given by its name (parameter
    /// groups, e.g. a critic's own rate beside the policy's). A parameter given no rate sits
    /// the step out: it, its moments and its own step count stay as they are (a policy
    /// waiting out a critic warm-up).
    pub fn step_with(
        &mut self,
        params: Vec<(String, ParamMut<'_, D>)>,
        grads: &mut Gradients<f32, D>,
        lr_of: impl Fn(&str) -> Option<f64>,
    ) -> Result<(), PolicyError> {
        let trainable = self.trainable(params.iter().map(|(n, _)| n.as_str()))?.to_vec();
        let mut jobs = Vec::with_capacity(params.len());
        let (mut taken, mut sitting_out) = (Ok(()), vec![]);
        for ((name, p), _) in params.into_iter().zip(trainable).filter(|(_, t)| *t) {
            let Some(lr) = lr_of(&name) else {
                sitting_out.push(name);
                continue;
            };
            let is_1d = matches!(p, ParamMut::V(_));
            let wd = if is_1d && self.cfg.no_decay_1d { 0.0 } else { self.cfg.weight_decay };
            let cfg = self.adam_cfg(lr, (wd > 0.0).then_some(WeightDecay::Decoupled(wd)));
            let own_t = self.t + 1 - self.sat_out.get(&name).copied().unwrap_or(0);
            let buffers = match &p {
                ParamMut::V(t) => self.take_buffers(grads, *t),
                ParamMut::M(t) => self.take_buffers(grads, *t),
            };
            match buffers {
                Ok([g, m, v]) => jobs.push(AdamJob { cfg, t: own_t, p, m, v, g }),
                Err(e) => {
                    taken = Err(e);
                    break;
                }
            }
        }
        let updated = taken.and_then(|()| {
            self.t += 1;
            for name in sitting_out {
                *self.sat_out.entry(name).or_insert(0) += 1;
            }
            D::adam_updates(&mut jobs).map_err(dev_err)
        });
        // every buffer goes back, whatever failed
        let mut restored = Ok(());
        for AdamJob { p, m, v, g, .. } in jobs {
            let r = match p {
                ParamMut::V(t) => self.put_buffers(grads, t, [g, m, v]),
                ParamMut::M(t) => self.put_buffers(grads, t, [g, m, v]),
            };
            restored = restored.and(r);
        }
        updated.and(restored)
    }

    fn adam_cfg(&self, lr: f64, weight_decay: Option<WeightDecay>) -> AdamConfig {
        AdamConfig { lr, betas: self.cfg.betas, eps: self.cfg.eps, weight_decay }
    }

    /// Moves `t`'s gradient and moments out of their maps (zero ones if absent), leaving placeholder
    /// buffers. Everything is allocated before anything moves, so a failure loses nothing.
    fn take_buffers<S: Shape>(
        &mut self,
        grads: &mut Gradients<f32, D>,
        t: &Tensor<S, f32, D>,
    ) -> Result<[Buf<D>; 3], PolicyError> {
        // one element, not zero: CUDA refuses zero-byte allocations
        let empty = || Storage::<f32>::try_alloc_len(t.device(), 1).map_err(dev_err);
        let empties = [empty()?, empty()?, empty()?];
        for map in [&mut *grads, &mut self.m, &mut self.v] {
            map.try_alloc_for(t).map_err(dev_err)?;
        }
        let [g, m, v] = empties;
        Ok([
            std::mem::replace(grads.get_or_alloc_mut(t).map_err(dev_err)?, g),
            std::mem::replace(self.m.get_or_alloc_mut(t).map_err(dev_err)?, m),
            std::mem::replace(self.v.get_or_alloc_mut(t).map_err(dev_err)?, v),
        ])
    }

    /// Puts back what [`AdamW::take_buffers`] moved out: gradient, first and second moment.
    fn put_buffers<S: Shape>(
        &mut self,
        grads: &mut Gradients<f32, D>,
        t: &Tensor<S, f32, D>,
        [g, m, v]: [Buf<D>; 3],
    ) -> Result<(), PolicyError> {
        *grads.get_or_alloc_mut(t).map_err(dev_err)? = g;
        *self.m.get_or_alloc_mut(t).map_err(dev_err)? = m;
        *self.v.get_or_alloc_mut(t).map_err(dev_err)? = v;
        Ok(())
    }

    /// The optimizer state for a checkpoint: `exp_avg.<name>` and `exp_avg_sq.<name>` for
    /// every parameter that trains (PyTorch's names; a frozen one has no moments, as in
    /// PyTorch, where it is not the optimizer's), `step.<name>` (a one-element tensor, as
    /// PyTorch keeps it) for a parameter whose own step count is not the optimizer's, and the
    /// step count.
    pub fn state(
        &mut self,
        params: &[(String, ParamRef<'_, D>)],
    ) -> Result<(i32, BTreeMap<String, HostTensor>), PolicyError> {
        let mut out = BTreeMap::new();
        for (name, p) in self.training(params)? {
            let shape = p.shape();
            out.insert(
                format!("exp_avg.{name}"),
                HostTensor { shape: shape.clone(), data: D::read(grad_mut(p, &mut self.m)?) },
            );
            out.insert(format!("exp_avg_sq.{name}"), HostTensor { shape, data: D::read(grad_mut(p, &mut self.v)?) });
        }
        for (name, sat_out) in &self.sat_out {
            out.insert(format!("step.{name}"), HostTensor { shape: vec![1], data: vec![(self.t - sat_out) as f32] });
        }
        Ok((self.t, out))
    }

    /// Restores what [`AdamW::state`] saved (`file` names the source in errors). Moments of
    /// frozen parameters are not needed, and ignored if there (older checkpoints kept zeros).
    pub fn load_state(
        &mut self,
        params: &[(String, ParamRef<'_, D>)],
        t: i32,
        tensors: &BTreeMap<String, HostTensor>,
        file: &std::path::Path,
    ) -> Result<(), PolicyError> {
        for (name, p) in self.training(params)? {
            for (prefix, moments) in [("exp_avg", &mut self.m), ("exp_avg_sq", &mut self.v)] {
                let key = format!("{prefix}.{name}");
                let h = tensors.get(&key).ok_or_else(|| {
                    PolicyError::tensor(file, &key, "missing from the optimizer state (was it frozen when saved?)")
                })?;
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
        self.sat_out = sat_out_counts(params, t, tensors, file)?;
        self.t = t;
        Ok(())
    }
}

/// How many of `t` steps each parameter sat out, from the `step.<name>` entries of a saved
/// state: each must name a parameter and hold a whole count in `0..=t`.
fn sat_out_counts<D: Device<f32>>(
    params: &[(String, ParamRef<'_, D>)],
    t: i32,
    tensors: &BTreeMap<String, HostTensor>,
    file: &std::path::Path,
) -> Result<BTreeMap<String, i32>, PolicyError> {
    let mut sat_out = BTreeMap::new();
    for (key, h) in tensors.iter().filter(|(k, _)| k.starts_with("step.")) {
        let name = &key["step.".len()..];
        if !params.iter().any(|(n, _)| n == name) {
            return Err(PolicyError::tensor(file, key, "names no parameter of the model"));
        }
        let own = match h.data[..] {
            [s] if s.fract() == 0.0 && (0.0..=t as f32).contains(&s) => s as i32,
            _ => return Err(PolicyError::tensor(file, key, format!("{:?} is not one step count in 0..={t}", h.data))),
        };
        sat_out.insert(name.to_string(), t - own);
    }
    Ok(sat_out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_numbers_name_their_field() {
        let names = ["wte", "blocks.0.ln1.weight", "ln_f.weight"];
        for (bad, field) in [
            (AdamWConfig { lr: f64::NAN, ..Default::default() }, "lr"),
            (AdamWConfig { betas: [0.9, 1.0], ..Default::default() }, "betas"),
            (AdamWConfig { eps: 0.0, ..Default::default() }, "eps"),
            (AdamWConfig { weight_decay: -0.1, ..Default::default() }, "weight_decay"),
        ] {
            let e = bad.frozen(&names).unwrap_err().to_string();
            assert!(e.contains(&format!("`optim.{field}`")) && e.contains("out of range"), "{e}");
        }
        let lr0 = AdamWConfig { lr: 0.0, ..Default::default() };
        assert_eq!(lr0.frozen(&names).unwrap(), [false; 3], "lr 0 freezes a run on purpose, not by the mask");
    }
}
