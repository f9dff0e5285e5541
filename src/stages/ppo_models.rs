//! PPO's trained models — the policy and its critic — as one unit for the optimizer and the
//! checkpoints, and their training forward over rollouts: per response token, the log-prob of
//! the sampled token and the entropy at the sampling temperature, and the value estimate.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use dfdx::prelude::*;
use rayon::prelude::*;
use rlhf_policies::checkpoint::{read_safetensors, write_safetensors, HostTensor};
use rlhf_policies::{
    Batch, CausalLm, FusedOps, HasParams, LearnedReward, ParamMut, ParamRef, ScalarHead, TokenMask, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::stages::common::Checkpointable;

/// Where the value estimates come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ValueModelConfig {
    /// A separate critic: a transformer with a scalar head, initialised from a reward-model
    /// checkpoint (N+ / InstructGPT), by default the one used as the reward.
    Separate {
        /// The checkpoint to start from. Default: the reward model's (`reward.kind = model`);
        /// otherwise the policy's backbone with a zero head.
        #[serde(default)]
        init: Option<std::path::PathBuf>,
    },
    /// A value head on the policy's trunk (shared weights), zero-initialised
    /// (lm-human-preferences).
    Shared {},
}

impl Default for ValueModelConfig {
    fn default() -> Self {
        ValueModelConfig::Separate { init: None }
    }
}

/// The critic, on device `D`.
#[derive(Debug)]
pub enum Critic<D: Device<f32> = Cpu> {
    /// A value head `(C → 1)` on the policy's final hidden states.
    Shared(ScalarHead<D>),
    /// Its own backbone and head (the head's bias is trained).
    Separate(Box<LearnedReward<D>>),
}

/// Policy + critic on device `D`: what PPO's optimizer updates.
#[derive(Debug)]
pub struct PpoModels<D: Device<f32> = Cpu> {
    /// π_θ.
    pub policy: CausalLm<D>,
    /// V_φ.
    pub critic: Critic<D>,
    /// The bottoms the critic and the reference share with the policy, run once per batch
    /// (set by the PPO trainer when it starts; default none).
    pub shares: SharedBottoms,
}

/// One rollout as the training forward sees it: `ids = prompt ⧺ response`.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq {
    /// Prompt then response ids.
    pub ids: Vec<u32>,
    /// Prompt length.
    pub prompt_len: usize,
}

impl Seq {
    /// Response length.
    pub fn resp_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

/// The input batch (each sequence without its last token, right-padded), the hidden-state row
/// that predicts every response token, and those tokens.
pub fn response_rows(seqs: &[&Seq], pad: u32) -> Result<(Batch, Vec<usize>, Vec<usize>)> {
    let inputs: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids[..s.ids.len() - 1].to_vec()).collect();
    let batch = Batch::right_padded(&inputs, pad)?;
    let (mut rows, mut targets) = (vec![], vec![]);
    for (b, s) in seqs.iter().enumerate() {
        for t in s.prompt_len..s.ids.len() {
            rows.push(b * batch.t + t - 1);
            targets.push(s.ids[t] as usize);
        }
    }
    Ok((batch, rows, targets))
}

/// Per response token of `seqs` (in order): `[log π(token)…, entropy…]` `(2N,)` of
/// `softmax(logits / temperature)`, with `model`'s training forward.
pub fn logprobs_and_entropy<D: FusedOps, T: Tape<f32, D>>(
    model: &CausalLm<D>,
    seqs: &[&Seq],
    pad: u32,
    temperature: f32,
    tape: T,
) -> Result<Tensor<(usize,), f32, D, T>> {
    let (batch, rows, targets) = response_rows(seqs, pad)?;
    let h = model.forward_hidden_rows(&batch, &rows, tape)?;
    Ok(model.logprobs_and_entropy(h, &targets, temperature))
}

/// [`logprobs_and_entropy`] of `seqs` under `policy` and, when given, `reference`, untaped.
/// With `shared` > 0 the two models' common bottom (embeddings and first `shared` blocks,
/// [`CausalLm::shared_bottom`]) runs once and only the blocks above it run for each — trlx's
/// hydra reference, with the same numbers as two whole forwards.
pub fn policy_and_reference_logprobs<D: FusedOps>(
    policy: &CausalLm<D>,
    reference: Option<&CausalLm<D>>,
    shared: usize,
    seqs: &[&Seq],
    pad: u32,
    temperature: f32,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (batch, rows, targets) = response_rows(seqs, pad)?;
    let bottom = match (reference, shared) {
        (Some(_), k) if k > 0 => Some((policy.bottom(&batch, k)?, k)),
        _ => None,
    };
    let lpe = |m, share| untaped_logprobs(m, (bottom.as_ref(), share), (&batch, &rows, &targets), temperature);
    Ok((lpe(policy, usize::MAX)?, reference.map(|r| lpe(r, shared)).transpose()?))
}

/// Per response token of `seqs` (in order): the exact `KL(π(·|s_t) ‖ π_ref(·|s_t))` of
/// `softmax(logits / temperature)` ([`crate::math::ppo::full_kl`]), the policy restricted to
/// each token's mask when `masks` are given (NLPO).
pub fn full_kl_terms<D: FusedOps>(
    policy: &CausalLm<D>,
    reference: &CausalLm<D>,
    seqs: &[&Seq],
    masks: Option<&[TokenMask]>,
    pad: u32,
    temperature: f32,
) -> Result<Vec<f32>> {
    let (batch, rows, _) = response_rows(seqs, pad)?;
    let logits = |m: &CausalLm<D>| -> Result<Vec<f32>> {
        Ok(m.logits(m.forward_hidden_rows(&batch, &rows, NoneTape)?).as_vec())
    };
    let (mut lp, lq, v) = (logits(policy)?, logits(reference)?, policy.dims.vocab);
    if let Some(masks) = masks {
        lp.chunks_mut(v).zip(masks).for_each(|(row, m)| m.apply(row, f32::NEG_INFINITY));
    }
    let kl = |(p, q): (&[f32], &[f32])| crate::math::ppo::full_kl(p, q, temperature) as f32;
    Ok(lp.par_chunks(v).zip(lq.par_chunks(v)).map(kl).collect())
}

/// Per sequence, `Σ_t log π_θ(token) − log π_ref(token)` over its response tokens, both
/// distributions from `logits / temperature`: on samples from π_θ at that temperature, an
/// unbiased estimate of the sequence-level KL(π_θ‖π_ref).
pub fn sequence_log_ratios<D: FusedOps>(
    policy: &CausalLm<D>,
    reference: &CausalLm<D>,
    seqs: &[&Seq],
    pad: u32,
    temperature: f32,
) -> Result<Vec<f64>> {
    let lp = logprobs_and_entropy(policy, seqs, pad, temperature, NoneTape)?.as_vec();
    let lr = logprobs_and_entropy(reference, seqs, pad, temperature, NoneTape)?.as_vec();
    let mut off = 0;
    Ok(seqs
        .iter()
        .map(|s| {
            let n = s.resp_len();
            off += n;
            (off - n..off).map(|i| (lp[i] - lr[i]) as f64).sum()
        })
        .collect())
}

impl<D: FusedOps> PpoModels<D> {
    /// The policy's `[logprobs…, entropies…]` `(2N,)` and the critic's values `(N,)` for
    /// every response token of `seqs`, from one taped pass (two for a separate critic). With
    /// `masks` (NLPO, one per response token in order) the log-probs and entropies are those
    /// of the policy restricted to each token's mask. A separate critic that shares the
    /// policy's frozen bottom ([`PpoModels::shares`]) runs above it only.
    #[allow(clippy::type_complexity)]
    pub fn forward<T: Tape<f32, D>>(
        &self,
        seqs: &[&Seq],
        masks: Option<&[TokenMask]>,
        pad: u32,
        temperature: f32,
        tape: T,
    ) -> Result<(Tensor<(usize,), f32, D, T>, Tensor<(usize,), f32, D, T>)> {
        let (lpe, values, _) = self.forward_with(None, seqs, masks, (pad, temperature), tape)?;
        Ok((lpe, values))
    }

    /// [`PpoModels::forward`], and with `reference` also its `[logprobs…, entropies…]` (the
    /// scoring pass), all from one run of the bottom the models share with the policy.
    #[allow(clippy::type_complexity)]
    pub fn forward_with<T: Tape<f32, D>>(
        &self,
        reference: Option<&CausalLm<D>>,
        seqs: &[&Seq],
        masks: Option<&[TokenMask]>,
        (pad, temperature): (u32, f32),
        tape: T,
    ) -> Result<(Tensor<(usize,), f32, D, T>, Tensor<(usize,), f32, D, T>, Option<Vec<f32>>)> {
        let (batch, rows, targets) = response_rows(seqs, pad)?;
        let shares = self.shares;
        let separate = matches!(self.critic, Critic::Separate(_));
        // the depth every sharer can start from: the shallowest of the shares in use
        let depth = [(separate, shares.critic), (reference.is_some(), shares.reference)]
            .iter()
            .filter(|&&(used, k)| used && k > 0)
            .map(|&(_, k)| k)
            .min();
        let bottom = depth.map(|k| Ok::<_, anyhow::Error>((self.policy.bottom(&batch, k)?, k))).transpose()?;
        let (bottom, batch, rows) = (bottom.as_ref(), &batch, rows.as_slice());
        let ref_lpe = reference
            .map(|r| untaped_logprobs(r, (bottom, shares.reference), (batch, rows, &targets), temperature))
            .transpose()?;
        let hr = hidden_rows(&self.policy, (bottom, usize::MAX), batch, rows, tape)?;
        let policy = |h| match masks {
            Some(m) => self.policy.logprobs_and_entropy_masked(h, &targets, temperature, m),
            None => self.policy.logprobs_and_entropy(h, &targets, temperature),
        };
        match &self.critic {
            Critic::Shared(head) => {
                // the gathered hidden states feed both heads: split the tape (dfdx-notes §2)
                let (hr, tape) = hr.split_tape();
                let lpe = policy(hr.clone().put_tape(tape));
                let (lpe, tape) = lpe.split_tape();
                let values = head.forward(hr.put_tape(tape));
                Ok((lpe.retaped::<T>(), values, ref_lpe))
            }
            Critic::Separate(critic) => {
                let lpe = policy(hr);
                // the critic's pass continues on the same tape
                let (lpe, tape) = lpe.split_tape();
                let hv = hidden_rows(&critic.model, (bottom, shares.critic), batch, rows, tape)?;
                let values = critic.head.forward(hv);
                Ok((lpe.retaped::<T>(), values, ref_lpe))
            }
        }
    }

    /// Builds the critic as configured (on the policy's device): `reward_model` is the reward
    /// checkpoint, if any.
    pub fn new(policy: CausalLm<D>, cfg: &ValueModelConfig, reward_model: Option<&Path>) -> Result<Self> {
        let critic = match cfg {
            ValueModelConfig::Shared {} => Critic::Shared(zero_head(&policy.dev, policy.dims.d_model)),
            ValueModelConfig::Separate { init } => match init.as_deref().or(reward_model) {
                Some(dir) => {
                    let (rm, _) = LearnedReward::load_pretrained(dir, &policy.dev)
                        .with_context(|| format!("value model init {}", dir.display()))?;
                    Critic::Separate(Box::new(rm))
                }
                None => {
                    let head = zero_head(&policy.dev, policy.dims.d_model);
                    Critic::Separate(Box::new(LearnedReward::with_head(policy.frozen_copy(), head, 0)))
                }
            },
        };
        Ok(PpoModels { policy, critic, shares: SharedBottoms::default() })
    }
}

/// How many leading blocks, with the embeddings, the critic and the reference share with the
/// policy — frozen in both and bitwise equal ([`CausalLm::shared_bottom`]) — so that PPO runs
/// them once per batch (trlx's hydra). 0: not shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedBottoms {
    /// A separate critic's (one started from the policy); 0 for a value head on the policy.
    pub critic: usize,
    /// π_ref's (the scoring pass only).
    pub reference: usize,
}

impl SharedBottoms {
    /// The bottoms `models`' critic and `reference` share with the policy, each at most as
    /// deep as the frozen bottom of both ([`CausalLm::frozen_blocks`], set by the optimizer's
    /// freezing): those stay equal for the whole run.
    pub fn of<D: FusedOps>(models: &PpoModels<D>, reference: &CausalLm<D>) -> Self {
        let policy = &models.policy;
        let critic = match &models.critic {
            Critic::Separate(c) => c.model.shared_bottom(policy, policy.frozen_blocks().min(c.model.frozen_blocks())),
            Critic::Shared(_) => 0,
        };
        SharedBottoms { critic, reference: reference.shared_bottom(policy, policy.frozen_blocks()) }
    }
}

/// The input of block `k` ([`CausalLm::bottom`]) and `k`.
type Bottom<D> = (Tensor<(usize, usize), f32, D>, usize);

/// `m`'s hidden states at `rows` of `batch`: from `bottom` (the input of block `k`) when `m`
/// shares at least `k` blocks with the model that ran it, else from the embeddings.
fn hidden_rows<D: FusedOps, T: Tape<f32, D>>(
    m: &CausalLm<D>,
    (bottom, share): (Option<&Bottom<D>>, usize),
    batch: &Batch,
    rows: &[usize],
    tape: T,
) -> Result<Tensor<(usize, usize), f32, D, T>> {
    Ok(match bottom {
        Some((x, k)) if share >= *k => m.hidden_rows_above(x.clone(), *k, batch, rows, tape)?,
        _ => m.forward_hidden_rows(batch, rows, tape)?,
    })
}

/// `m`'s untaped `[logprobs…, entropies…]` of `targets` at `rows` of `batch` ([`hidden_rows`]
/// from `bottom` when `m` shares it).
fn untaped_logprobs<D: FusedOps>(
    m: &CausalLm<D>,
    from: (Option<&Bottom<D>>, usize),
    (batch, rows, targets): (&Batch, &[usize], &[usize]),
    temperature: f32,
) -> Result<Vec<f32>> {
    let h = hidden_rows(m, from, batch, rows, NoneTape)?;
    Ok(m.logprobs_and_entropy(h, targets, temperature).as_vec())
}

fn zero_head<D: Device<f32>>(dev: &D, c: usize) -> ScalarHead<D> {
    ScalarHead { w: dev.zeros_like(&(c, 1)), b: dev.zeros_like(&(1,)) }
}

impl<D: Device<f32>> HasParams<D> for PpoModels<D> {
    fn params(&self) -> Vec<(String, ParamRef<'_, D>)> {
        let mut out: Vec<_> = self.policy.params().into_iter().map(|(n, p)| (format!("policy.{n}"), p)).collect();
        let (model, head) = match &self.critic {
            Critic::Shared(h) => (None, h),
            Critic::Separate(c) => (Some(&c.model), &c.head),
        };
        if let Some(m) = model {
            out.extend(m.params().into_iter().map(|(n, p)| (format!("value.{n}"), p)));
        }
        out.push(("value.head.weight".into(), ParamRef::M(&head.w)));
        out.push(("value.head.bias".into(), ParamRef::V(&head.b)));
        out
    }
    fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, D>)> {
        let mut out: Vec<_> = self.policy.params_mut().into_iter().map(|(n, p)| (format!("policy.{n}"), p)).collect();
        let (model, head) = match &mut self.critic {
            Critic::Shared(h) => (None, h),
            Critic::Separate(c) => (Some(&mut c.model), &mut c.head),
        };
        if let Some(m) = model {
            out.extend(m.params_mut().into_iter().map(|(n, p)| (format!("value.{n}"), p)));
        }
        out.push(("value.head.weight".into(), ParamMut::M(&mut head.w)));
        out.push(("value.head.bias".into(), ParamMut::V(&mut head.b)));
        out
    }
    fn language_model(&self) -> Option<&CausalLm<D>> {
        Some(&self.policy)
    }
    fn trunks_mut(&mut self) -> Vec<(&'static str, &mut CausalLm<D>)> {
        let mut out = vec![("policy.", &mut self.policy)];
        if let Critic::Separate(c) = &mut self.critic {
            out.push(("value.", &mut c.model));
        }
        out
    }
}

/// A checkpoint holds the policy as an HF folder (with the tokenizer), and the critic under
/// `value/` (an HF sequence-classification folder) or as `value_head.safetensors` (TRL's
/// `v_head.summary.*` names) when shared.
impl<D: FusedOps> Checkpointable<D> for PpoModels<D> {
    fn save_dir(&self, dir: &Path, tok: &Tokenizer) -> Result<()> {
        self.policy.save_pretrained(dir, Some(tok))?;
        match &self.critic {
            Critic::Separate(c) => c.save_pretrained(&dir.join("value"), None, None)?,
            Critic::Shared(h) => {
                let c = self.policy.dims.d_model;
                let tensors = BTreeMap::from([
                    ("v_head.summary.weight".to_string(), HostTensor { shape: vec![1, c], data: h.w.as_vec() }),
                    ("v_head.summary.bias".to_string(), HostTensor { shape: vec![1], data: h.b.as_vec() }),
                ]);
                write_safetensors(&dir.join("value_head.safetensors"), &tensors)?;
            }
        }
        Ok(())
    }

    fn load_dir(dir: &Path, dev: &D) -> Result<(Self, Tokenizer)> {
        let (policy, tok) = rlhf_policies::checkpoint::load_with_tokenizer(dir, dev)?;
        let critic = if dir.join("value").is_dir() {
            Critic::Separate(Box::new(LearnedReward::load_pretrained(&dir.join("value"), dev)?.0))
        } else {
            let file = dir.join("value_head.safetensors");
            let t = read_safetensors(&file)?;
            let get = |k: &str| {
                t.get(k).map(|h| h.data.clone()).with_context(|| format!("{}: tensor `{k}` is missing", file.display()))
            };
            let (w, b) = (get("v_head.summary.weight")?, get("v_head.summary.bias")?);
            Critic::Shared(ScalarHead {
                w: dev.tensor_from_vec(w, (policy.dims.d_model, 1)),
                b: dev.tensor_from_vec(b, (1,)),
            })
        };
        Ok((PpoModels { policy, critic, shares: SharedBottoms::default() }, tok))
    }
}
