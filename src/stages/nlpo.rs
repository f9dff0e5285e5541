//! NLPO (Ramamurthy et al. 2023, RL4LMs): PPO on the policy restricted, at every step, to the
//! top-p nucleus of a masking policy π_ψ — a copy of π_θ synced every
//! `target_update_iterations` iterations:
//!
//! ```text
//! V_p(s) = smallest set of most likely tokens with π_ψ(V_p(s) | s) ≥ p (≥ min_tokens_to_keep,
//!          EOS always in it),
//! π_θ^mask(a|s) = π_θ(a|s)·1[a ∈ V_p(s)] / π_θ(V_p(s) | s)
//! ```
//!
//! Rollouts sample from π_θ^mask and keep each step's V_p; the scoring pass and the update take
//! log-probs and entropies of π_θ^mask over those same sets (RL4LMs'
//! `MaskableCategoricalDistribution`), so PPO's ratio is a ratio of masked probabilities; the
//! reference's log-probs stay unmasked, making the per-token KL term `log π_θ^mask − log π_ref`.
//! With `top_mask = 1` every set is the whole vocabulary and the run is plain PPO, bit for bit.
//! The held-out evaluation samples the policy itself, unmasked: the model a user keeps.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rlhf_envs::{Episode, NoReference, RewardModel, Rollout, VecEnv};
use rlhf_policies::{nucleus_masked_session, CausalLm, FusedOps, Nucleus, RolloutEngine, SamplingConfig, TokenMask};
use serde::{Deserialize, Serialize};

/// `"nlpo"` in a PPO config. Defaults are RL4LMs' IMDB NLPO settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NlpoConfig {
    /// p of the nucleus V_p (RL4LMs' `top_mask`), in (0, 1]. Default `0.9`.
    pub top_mask: f32,
    /// V_p holds at least this many tokens. Default `100`.
    pub min_tokens_to_keep: usize,
    /// π_ψ becomes a copy of π_θ before the first iteration and then every this many
    /// iterations. Default `5`.
    pub target_update_iterations: usize,
}

impl Default for NlpoConfig {
    fn default() -> Self {
        NlpoConfig { top_mask: 0.9, min_tokens_to_keep: 100, target_update_iterations: 5 }
    }
}

impl NlpoConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.top_mask > 0.0 && self.top_mask <= 1.0) {
            bail!("nlpo.top_mask must be in (0, 1], got {}", self.top_mask);
        }
        if self.min_tokens_to_keep == 0 || self.target_update_iterations == 0 {
            bail!("nlpo.min_tokens_to_keep and nlpo.target_update_iterations must be at least 1");
        }
        Ok(())
    }

    /// Whether π_ψ is synced before iteration `it` (0-based).
    pub fn syncs_at(&self, it: usize) -> bool {
        it.is_multiple_of(self.target_update_iterations)
    }
}

/// Where a checkpoint keeps π_ψ (an HF folder).
pub const MASK_POLICY_DIR: &str = "nlpo_mask_policy";

/// π_ψ as a checkpoint saved it.
pub fn load_mask_policy<D: FusedOps>(checkpoint: &Path, dev: &D) -> Result<CausalLm<D>> {
    let dir = checkpoint.join(MASK_POLICY_DIR);
    if !dir.is_dir() {
        bail!("{}: no NLPO masking policy to resume from (was the run started without `nlpo`?)", dir.display());
    }
    CausalLm::load_pretrained(&dir, dev).with_context(|| format!("NLPO masking policy {}", dir.display()))
}

/// One rollout of NLPO: the episodes, each one's masks (one per response token) and
/// π_θ(V_p) per response token.
#[derive(Debug)]
pub struct MaskedRollout {
    /// The env's episodes, in row order.
    pub episodes: Vec<Episode>,
    /// V_p of each response token.
    pub masks: Vec<Vec<TokenMask>>,
    /// π_θ's mass inside V_p at each response token.
    pub masses: Vec<Vec<f32>>,
}

/// Rolls out every env row with π_θ^mask (`policy` within `mask_policy`'s nucleus; `None`
/// when π_ψ is a fresh copy of the policy, whose own logits then serve as the mask's).
#[allow(clippy::too_many_arguments)]
pub fn rollout<M: RewardModel, D: FusedOps>(
    env: &mut VecEnv<NoReference, M>,
    policy: &CausalLm<D>,
    mask_policy: Option<&CausalLm<D>>,
    cfg: &NlpoConfig,
    capacity: usize,
    sampling: SamplingConfig,
    engine: RolloutEngine,
) -> Result<MaskedRollout, rlhf_envs::EnvError> {
    let nucleus = Nucleus { top_p: cfg.top_mask, min_keep: cfg.min_tokens_to_keep };
    let rows = env.num_envs();
    let mut session = nucleus_masked_session(policy, mask_policy, (rows, capacity), nucleus, sampling, engine)
        .map_err(|e| rlhf_envs::EnvError::Model(e.to_string()))?;
    let episodes = env.rollout_with(&mut session, Rollout { group_size: 1, reference: false })?;
    let (masks, masses) = (session.take_masks(), session.take_masses());
    for (r, (ep, m)) in episodes.iter().zip(&masks).enumerate() {
        if ep.response_ids.len() != m.len() {
            return Err(rlhf_envs::EnvError::Model(format!(
                "row {r}: {} response tokens but {} masks",
                ep.response_ids.len(),
                m.len()
            )));
        }
    }
    Ok(MaskedRollout { episodes, masks, masses })
}

/// `nlpo/…` metrics of a rollout: the mean size of V_p and π_θ's mean mass inside it, over
/// every response token.
pub fn metrics(r: &MaskedRollout, synced: bool) -> [(&'static str, f64); 3] {
    let n = r.masks.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let size = r.masks.iter().flatten().map(|m| m.count() as f64).sum::<f64>() / n;
    let mass = r.masses.iter().flatten().map(|&m| m as f64).sum::<f64>() / n;
    [("nlpo/mask_size", size), ("nlpo/mask_mass", mass), ("nlpo/mask_synced", f64::from(u8::from(synced)))]
}
