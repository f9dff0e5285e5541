//! What every training stage shares: restoring from the last checkpoint, one optimizer step
//! over accumulated micro-batches, and writing checkpoints.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use rlhf_envs::{RunningMoments, ScoreConfig};
use rlhf_policies::checkpoint::{read_safetensors, write_safetensors};
use rlhf_policies::{
    clip_grad_norm, AdamW, AdamWConfig, CausalLm, FusedOps, GradBuffers, HasParams, LearnedReward, ParamRef, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::run::RunDir;
use crate::stages::lora_state;

/// A taped scalar loss on device `D`.
pub type LossOn<D> = Tensor<Rank0, f32, D, OwnedTape<f32, D>>;

/// Checks the config's counts: each `(name, value)` must be at least 1.
pub fn require_counts(fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => bail!("{name} must be at least 1"),
        None => Ok(()),
    }
}

/// Checks that `max_len` fits a model with a position limit (GPT-2's `n_positions`, a
/// LongRoPE model's pretrained context; `model` names it): a longer example would otherwise stop
/// the run at the first batch holding it.
pub fn require_fits(max_len: usize, dims: &rlhf_policies::Dims, model: &Path) -> Result<()> {
    if let Some(limit) = dims.position_limit().filter(|&l| max_len > l) {
        bail!(
            "max_len {max_len} exceeds the {limit} positions of {} ({}); set max_len to at most that",
            model.display(),
            dims.position_limit_field()
        );
    }
    Ok(())
}

/// Checks a held-out fraction: in `[0, 1)`.
pub fn require_fraction(name: &str, v: f64) -> Result<()> {
    if !(0.0..1.0).contains(&v) {
        bail!("{name} must be in [0, 1), got {v}");
    }
    Ok(())
}

/// Each `(name, value)` is a positive number (`inf` allowed: e.g. no gradient clipping).
pub fn require_positive(fields: &[(&str, f64)]) -> Result<()> {
    match fields.iter().find(|(_, v)| v.is_nan() || *v <= 0.0) {
        Some((name, v)) => bail!("{name} must be positive, got {v}"),
        None => Ok(()),
    }
}

/// A non-finite loss: the optimizer step was abandoned before any update.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what} is {value} at micro-batch {micro}")]
pub struct NonFinite {
    /// The quantity.
    pub what: &'static str,
    /// Its value.
    pub value: f32,
    /// The micro-batch.
    pub micro: usize,
}

/// What a checkpoint's marker records besides the step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// AdamW's step count.
    pub adam_t: i32,
    /// The held-out loss evaluated at this step, if one was (what `keep_checkpoints` spares
    /// the lowest of, see [`RunDir::best_checkpoint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_loss: Option<f64>,
}

/// What a stage trains and checkpoints as one HF folder: a language model, or a backbone
/// with a score head, on device `D`.
pub trait Checkpointable<D: Device<f32> = Cpu>: HasParams<D> + Sized {
    /// Writes the model folder (config, weights, tokenizer) into `dir`.
    fn save_dir(&self, dir: &Path, tok: &Tokenizer) -> Result<()>;
    /// Reads what [`Checkpointable::save_dir`] wrote onto `dev`.
    fn load_dir(dir: &Path, dev: &D) -> Result<(Self, Tokenizer)>;
}

impl<D: FusedOps> Checkpointable<D> for CausalLm<D> {
    fn save_dir(&self, dir: &Path, tok: &Tokenizer) -> Result<()> {
        Ok(self.save_pretrained(dir, Some(tok))?)
    }
    fn load_dir(dir: &Path, dev: &D) -> Result<(Self, Tokenizer)> {
        Ok(rlhf_policies::checkpoint::load_with_tokenizer(dir, dev)?)
    }
}

impl<D: FusedOps> Checkpointable<D> for LearnedReward<D> {
    fn save_dir(&self, dir: &Path, tok: &Tokenizer) -> Result<()> {
        Ok(self.save_pretrained(dir, Some(tok), None)?)
    }
    fn load_dir(dir: &Path, dev: &D) -> Result<(Self, Tokenizer)> {
        let (rm, _) = LearnedReward::load_pretrained(dir, dev)?;
        let tok = Tokenizer::from_file(&rlhf_policies::checkpoint::tokenizer_dir(dir)?.join("tokenizer.json"))?;
        Ok((rm, tok))
    }
}

/// A model, its tokenizer and optimizer (on device `D`), and the step to continue from.
#[derive(Debug)]
pub struct Restored<M, D: Device<f32> = Cpu> {
    /// Steps already done.
    pub step: usize,
    /// The model.
    pub model: M,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// The optimizer with its moments.
    pub opt: AdamW<D>,
}

/// The last complete checkpoint of `run` (model, tokenizer, optimizer), with the logs written
/// after it dropped; an error if there is none.
pub fn restore_latest<D: GradBuffers + FusedOps, M: Checkpointable<D>>(
    run: &RunDir,
    optim: &AdamWConfig,
    dev: &D,
) -> Result<Restored<M, D>> {
    let Some((step, dir)) = run.latest_checkpoint()? else {
        bail!("{}: no complete checkpoint to resume from", run.root.display());
    };
    let (mut model, tok) = M::load_dir(&dir, dev)?;
    lora_state::restore(&mut model, optim, &dir)?;
    let state = read_marker(&dir)?;
    let file = dir.join("optimizer.safetensors");
    let mut opt = AdamW::new(optim.clone());
    opt.load_state(&model.params(), state.adam_t, &read_safetensors(&file)?, &file)?;
    run.truncate_logs_after(step)?;
    Ok(Restored { step, model, tok, opt })
}

/// What a stage starts from: the run's last complete checkpoint when resuming
/// ([`restore_latest`]), else the model `fresh` gives (with `optim.lora`'s update, its `A`
/// drawn from `seed`), a new optimizer and step 0.
pub fn restore_or_init<D: GradBuffers + FusedOps, M: Checkpointable<D>>(
    run: &RunDir,
    resume: bool,
    (optim, seed): (&AdamWConfig, u64),
    dev: &D,
    fresh: impl FnOnce() -> Result<(M, Tokenizer)>,
) -> Result<Restored<M, D>> {
    if resume {
        return restore_latest(run, optim, dev);
    }
    let (mut model, tok) = fresh()?;
    lora_state::attach(&mut model, optim, seed)?;
    Ok(Restored { step: 0, model, tok, opt: AdamW::new(optim.clone()) })
}

/// One optimizer step: `micro_loss(i, tape)` for each of `accum` micro-batches (each loss
/// scaled by `1/accum`, gradients accumulated), global clipping, AdamW at `lr`. Returns the
/// summed (scaled) loss and the gradient norm before clipping.
pub fn optimizer_step<D: GradBuffers, M: HasParams<D>>(
    model: &mut M,
    opt: &mut AdamW<D>,
    lr: f64,
    clip: f64,
    accum: usize,
    micro_loss: impl FnMut(&M, usize, OwnedTape<f32, D>) -> Result<LossOn<D>>,
) -> Result<(f32, f64)> {
    untape_frozen(model, opt, |_| true)?;
    let (grads, loss) = accumulate_grads(model, accum, micro_loss)?;
    Ok((loss, apply_grads(model, opt, grads, lr, clip)?))
}

/// Tells each transformer in `model` which of its leading blocks need no gradient at this
/// step: those `opt` freezes (`optim.freeze`, `optim.num_layers_unfrozen`) and those that sit
/// the step out (`steps(name)` false: PPO's policy during the critic warm-up). Their backward
/// pass is skipped ([`CausalLm::set_frozen_trunk`]); the gradients of the parameters that step
/// are the same.
///
/// [`CausalLm::set_frozen_trunk`]: rlhf_policies::CausalLm::set_frozen_trunk
pub fn untape_frozen<D: GradBuffers, M: HasParams<D>>(
    model: &mut M,
    opt: &mut AdamW<D>,
    steps: impl Fn(&str) -> bool,
) -> Result<()> {
    let frozen = frozen_names(model, opt)?;
    for (prefix, lm) in model.trunks_mut() {
        lm.set_frozen_trunk(|name| {
            let name = format!("{prefix}{name}");
            frozen.contains(&name) || !steps(&name)
        });
    }
    Ok(())
}

/// The names (as `model.params()` gives them) of the parameters `opt` leaves frozen.
pub fn frozen_names<D: GradBuffers, M: HasParams<D>>(model: &M, opt: &mut AdamW<D>) -> Result<HashSet<String>> {
    let names: Vec<String> = model.params().into_iter().map(|(n, _)| n).collect();
    let trainable = opt.trainable(names.iter().map(String::as_str))?;
    Ok(names.iter().zip(trainable).filter(|(_, &t)| !t).map(|(n, _)| n.clone()).collect())
}

/// Points `target`'s parameters (`what`: the reference, a critic) that `share` names and that
/// equal the policy's at the policy's storage ([`CausalLm::share_storage`]); `share` must name
/// only parameters frozen in both, so that one copy serves both for the whole run. Says on
/// stderr how much it shared.
pub fn share_frozen<D: FusedOps>(
    (stage, what): (&str, &str),
    target: &mut CausalLm<D>,
    policy: &CausalLm<D>,
    share: impl Fn(&str) -> bool,
) {
    let shared = target.share_storage(policy, share);
    if shared > 0 {
        eprintln!("{stage}: {what} shares {:.0} MB of frozen weights with the policy", shared as f64 * 4e-6);
    }
}

/// The first half of [`optimizer_step`]: the gradients of `accum` micro-batch losses (each
/// scaled by `1/accum`) and their summed loss, the model untouched — for a trainer that looks
/// at the minibatch before deciding to step (PPO's `target_kl`).
pub fn accumulate_grads<D: GradBuffers, M: HasParams<D>>(
    model: &M,
    accum: usize,
    mut micro_loss: impl FnMut(&M, usize, OwnedTape<f32, D>) -> Result<LossOn<D>>,
) -> Result<(Gradients<f32, D>, f32)> {
    let mut grads = Gradients::leaky();
    let mut loss_sum = 0.0f32;
    let leafs = param_ids(model);
    let dev = device_of(model)?;
    for micro in 0..accum {
        // keep recording into the same Gradients: backward accumulates (+=) into them
        let anchor: Tensor<Rank0, f32, D> = dev.zeros();
        let (_, tape) = anchor.traced(grads).split_tape();
        let loss = micro_loss(model, micro, tape)? * (1.0 / accum as f32);
        let value = loss.as_vec()[0]; // `array()` needs TensorToArray, which the generic D lacks
        if !value.is_finite() {
            return Err(NonFinite { what: "loss", value, micro }.into());
        }
        loss_sum += value;
        grads = loss.backward();
        grads.retain_leafs(&leafs); // free the activations' gradients between micro-batches
    }
    Ok((grads, loss_sum))
}

/// The second half of [`optimizer_step`]: global clipping of `grads` and one AdamW step at
/// `lr`. Returns the gradient norm before clipping.
pub fn apply_grads<D: GradBuffers, M: HasParams<D>>(
    model: &mut M,
    opt: &mut AdamW<D>,
    grads: Gradients<f32, D>,
    lr: f64,
    clip: f64,
) -> Result<f64> {
    apply_grads_with(model, opt, grads, |_| Some(lr), clip)
}

/// [`apply_grads`] with each parameter's learning rate given by its name; a parameter given
/// none sits the step out ([`AdamW::step_with`]) and is left out of the gradient norm.
pub fn apply_grads_with<D: GradBuffers, M: HasParams<D>>(
    model: &mut M,
    opt: &mut AdamW<D>,
    mut grads: Gradients<f32, D>,
    lr_of: impl Fn(&str) -> Option<f64>,
    clip: f64,
) -> Result<f64> {
    let params = model.params();
    let mask = opt.trainable(params.iter().map(|(n, _)| n.as_str()))?.to_vec();
    let stepped: Vec<_> =
        params.into_iter().zip(mask).filter_map(|(p, t)| (t && lr_of(&p.0).is_some()).then_some(p)).collect();
    let grad_norm = clip_grad_norm(&stepped, &mut grads, clip)?;
    opt.step_with(model.params_mut(), &mut grads, lr_of)?;
    Ok(grad_norm)
}

/// `score/running_mean` and `score/running_std` (trlx's `exp_scores/running_*`) of a run
/// with `score.running_norm`: the statistics the next batch starts from (the std is null
/// until two scores were seen).
pub fn running_score_metrics(score: &ScoreConfig, moments: &RunningMoments, record: &mut serde_json::Value) {
    if score.running_norm.is_some() {
        record["score/running_mean"] = moments.mean.into();
        record["score/running_std"] = moments.std().into();
    }
}

/// The device `model`'s parameters live on.
pub fn device_of<D: Device<f32>>(model: &impl HasParams<D>) -> Result<D> {
    match model.params().first() {
        Some((_, ParamRef::V(t))) => Ok(t.device().clone()),
        Some((_, ParamRef::M(t))) => Ok(t.device().clone()),
        None => bail!("the model has no parameters"),
    }
}

fn param_ids<D: Device<f32>>(model: &impl HasParams<D>) -> Vec<UniqueId> {
    model.params().iter().map(|(_, p)| p.id()).collect()
}

/// Writes `checkpoints/step-N` atomically: the HF model folder with its tokenizer, and the
/// optimizer state; `held_out_loss` (the step's held-out loss, if evaluated) goes into the
/// marker.
pub fn save<D: GradBuffers, M: Checkpointable<D>>(
    run: &RunDir,
    (step, held_out_loss): (usize, Option<f64>),
    model: &M,
    tok: &Tokenizer,
    opt: &mut AdamW<D>,
) -> Result<()> {
    save_with(run, (step, held_out_loss), model, opt, |dir| model.save_dir(dir, tok))
}

/// [`save`] with a custom writer of the model folder (e.g. extra fields in its config).
pub fn save_with<D: GradBuffers, M: HasParams<D>>(
    run: &RunDir,
    (step, held_out_loss): (usize, Option<f64>),
    model: &M,
    opt: &mut AdamW<D>,
    write_model: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let (adam_t, state) = opt.state(&model.params())?;
    run.save_checkpoint(step, &TrainerState { step, adam_t, held_out_loss }, |dir| {
        write_model(dir)?;
        lora_state::save(model, dir)?;
        write_safetensors(&dir.join("optimizer.safetensors"), &state)?;
        Ok(())
    })?;
    Ok(())
}

/// The steps a dataset stage runs: `steps`, or, with `epochs` set, enough whole steps of
/// `per_step` batch units to cover `epochs` passes over the `n` training records, where
/// `units(k)` is how many units (examples, or packed rows) take the stream's first `k`
/// records. The last step may reach into the next pass (the stream runs on); said on stderr.
pub fn steps_for_epochs(
    stage: &str,
    (epochs, steps): (Option<f64>, usize),
    n: usize,
    per_step: usize,
    units: impl FnOnce(usize) -> usize,
) -> usize {
    let Some(epochs) = epochs else { return steps };
    let steps = units((epochs * n as f64).ceil() as usize).div_ceil(per_step).max(1);
    eprintln!("{stage}: {epochs} epochs of {n} training records = {steps} steps");
    steps
}

/// `cfg`, written as the run's `config.json` when the run is fresh (a resumed run keeps its
/// own): the config as resolved (model paths, steps from `epochs`).
pub fn record_config<C: Serialize>(run: &RunDir, resume: bool, cfg: C) -> Result<C> {
    if !resume {
        run.write_config(&cfg)?;
    }
    Ok(cfg)
}

/// `epochs`, when set, is a positive finite number.
pub fn require_epochs(epochs: Option<f64>) -> Result<()> {
    match epochs {
        Some(e) if !(e.is_finite() && e > 0.0) => bail!("epochs must be a positive number, got {e}"),
        _ => Ok(()),
    }
}

/// The number `record` holds under `key` (a step's held-out loss, for [`save`]).
pub fn held_out(record: &serde_json::Value, key: &str) -> Option<f64> {
    record.get(key).and_then(serde_json::Value::as_f64)
}

/// Says on stderr which checkpoint has the lowest held-out loss when it is not the last one
/// (a run folder given as a model stands for the last).
pub fn announce_best(run: &RunDir, stage: &str) -> Result<()> {
    let last = run.latest_checkpoint()?.map(|c| c.0);
    if let Some((step, path, loss)) = run.best_checkpoint()?.filter(|b| Some(b.0) != last) {
        eprintln!("{stage}: the lowest held-out loss, {loss:.4}, is at step {step} ({}), not the last", path.display());
    }
    Ok(())
}

fn read_marker(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(crate::run::MARKER);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
    serde_json::from_value(v["meta"].clone()).with_context(|| format!("{}: field meta", p.display()))
}

/// The rollouts `0..n` shuffled with `seed` into minibatches of `minibatch`, each split into
/// `accum` micro-batches. Trainers seed it per (iteration, epoch) and walk epoch 0's layout in
/// their scoring pass, so the first minibatch sees bit-identical inputs and its ratio is
/// exactly 1.
pub fn shuffled_minibatches(n: usize, minibatch: usize, accum: usize, seed: u64) -> Vec<Vec<Vec<usize>>> {
    use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut StdRng::seed_from_u64(seed));
    let micro = minibatch / accum;
    perm.chunks(minibatch).map(|mb| mb.chunks(micro).map(<[usize]>::to_vec).collect()).collect()
}

/// An optimizer step's result under the `skip` policy for non-finite values: `Some` when it
/// stepped, `None` when a [`NonFinite`] error was skipped (counted in `skipped`); any other
/// error (or a non-finite value without `skip`) is returned.
pub fn or_skip_non_finite<T>(r: Result<T>, skip: bool, skipped: &mut usize) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if skip && e.downcast_ref::<NonFinite>().is_some() => {
            *skipped += 1;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Reads the JSON state file `name` a trainer stored in its checkpoint folder `dir`.
pub fn read_state<T: serde::de::DeserializeOwned>(dir: &std::path::Path, name: &str) -> Result<T> {
    use anyhow::Context;
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", p.display()))
}

/// A stage's tokenized records, the last `val_fraction` of them (rounded) held out — or, with
/// a separate held-out file, all of the data file trained on — with the counts of those
/// skipped as too long and those truncated (reported on stderr, never silent).
#[derive(Debug)]
pub struct HeldOut<T> {
    all: Vec<T>,
    n_val: usize,
    /// The held-out items are the data file's last ones (`val_fraction`), not a second file's.
    by_fraction: bool,
    /// Records left out for being longer than `max_len`.
    pub skipped: usize,
    /// Records cut to fit.
    pub truncated: usize,
}

/// A file's records read and tokenized: (records read, (items, skipped, truncated)).
pub type Loaded<T> = (usize, (Vec<T>, usize, usize));

/// Where a stage's held-out items come from, and what to call things in messages.
#[derive(Debug, Clone, Copy)]
pub struct HoldOut<'a> {
    /// The stage's name.
    pub stage: &'a str,
    /// What the items are ("examples", "comparisons").
    pub what: &'a str,
    /// The training file.
    pub data: &'a Path,
    /// A separate held-out file (`val_data`): when given, `val_fraction` is not used.
    pub val_data: Option<&'a Path>,
    /// The fraction of `data` (its last records) held out when there is no `val_data`.
    pub val_fraction: f64,
    /// The length limit (for the skipped/truncated message).
    pub max_len: usize,
}

/// `cut` moved back (towards 0) until it does not fall between two items of one group.
pub fn group_boundary<T>(items: &[T], mut cut: usize, same_group: impl Fn(&T, &T) -> bool) -> usize {
    while cut > 0 && cut < items.len() && same_group(&items[cut - 1], &items[cut]) {
        cut -= 1;
    }
    cut
}

/// The held-out items read from `val_data`, announced on stderr; an error when there are none
/// (every record skipped as too long).
pub fn held_out_from<T>(stage: &str, val_data: &Path, val: Vec<T>, what: &str) -> Result<Vec<T>> {
    if val.is_empty() {
        bail!("{}: no held-out {what} left (every record skipped as too long)", val_data.display());
    }
    eprintln!("{stage}: {} held-out {what} from {}", val.len(), val_data.display());
    Ok(val)
}

impl<T> HeldOut<T> {
    /// Loads `h.data` (and `h.val_data`, if any) with `load` and splits them as `h` says.
    /// Errors when no item is left to train on, or a held-out file leaves none to evaluate.
    pub fn load(h: HoldOut<'_>, load: impl Fn(&Path) -> Result<Loaded<T>>) -> Result<Self> {
        let (records, (mut all, mut skipped, mut truncated)) = load(h.data)?;
        let n_val = match h.val_data {
            None => crate::data::held_out_count(all.len(), h.val_fraction),
            Some(v) => {
                let (_, (val, s, t)) = load(v)?;
                (skipped, truncated) = (skipped + s, truncated + t);
                let val = held_out_from(h.stage, v, val, h.what)?;
                let n = val.len();
                all.extend(val);
                n
            }
        };
        if all.len() == n_val {
            bail!(
                "{}: no training {} left ({records} records, {skipped} skipped as too long)",
                h.data.display(),
                h.what
            );
        }
        if skipped > 0 || truncated > 0 {
            eprintln!("{}: {skipped} {} skipped and {truncated} truncated (max_len {})", h.stage, h.what, h.max_len);
        }
        Ok(HeldOut { all, n_val, skipped, truncated, by_fraction: h.val_data.is_none() })
    }

    /// Keeps each group of consecutive items with the same `key` (a conversation's examples) on
    /// one side of a `val_fraction` split: the held-out part then begins at the first item of
    /// the group the cut fell in. An error when that leaves nothing to train on.
    pub fn keep_groups_whole(mut self, key: impl Fn(&T) -> usize, data: &Path, what: &str) -> Result<Self> {
        if self.by_fraction && self.n_val > 0 {
            let cut = group_boundary(&self.all, self.all.len() - self.n_val, |a, b| key(a) == key(b));
            if cut == 0 {
                bail!(
                    "{}: no training {what} left once the held-out part is widened to whole conversations; \
                     lower val_fraction or give val_data",
                    data.display()
                );
            }
            self.n_val = self.all.len() - cut;
        }
        Ok(self)
    }

    /// (training, held out).
    pub fn split(&self) -> (&[T], &[T]) {
        self.all.split_at(self.all.len() - self.n_val)
    }
}

#[cfg(test)]
mod tests {
    use super::group_boundary;

    #[test]
    fn a_cut_moves_back_to_the_start_of_the_group_it_falls_in() {
        let groups = [1, 1, 2, 2, 2, 3, 4, 4];
        let at = |cut| group_boundary(&groups, cut, |a, b| a == b);
        let want = [0, 0, 2, 2, 2, 5, 6, 6, 8];
        assert_eq!((0..=groups.len()).map(at).collect::<Vec<_>>(), want);
    }
}
