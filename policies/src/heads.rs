//! The scalar head: one linear `C → 1` on the final hidden states, used as the PPO value head
//! and as the reward-model score head (transformers' `score` layer of
//! `GPT2ForSequenceClassification`).

use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::error::PolicyError;
use crate::fused::FusedOps;
use crate::model::{A2, T1, T2};
use crate::params::{ParamMut, ParamRef};

/// `score(h) = h·w + b`, `w: (C, 1)`, `b: (1,)`.
#[derive(Debug, Clone)]
pub struct ScalarHead<D: Storage<f32>> {
    /// Weight `(C, 1)`.
    pub w: T2<D>,
    /// Bias `(1,)`.
    pub b: T1<D>,
}

impl<D: Device<f32>> ScalarHead<D> {
    /// Normal(0, std) weight, zero bias.
    pub fn new(dev: &D, d_model: usize, std: f32, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let dist = Normal::new(0.0f32, std.max(1e-12)).expect("std is positive");
        let w: Vec<f32> = (0..d_model).map(|_| dist.sample(&mut rng)).collect();
        ScalarHead { w: dev.tensor_from_vec(w, (d_model, 1)), b: dev.zeros_like(&(1,)) }
    }

    /// One score per row: `(N, C) → (N,)`.
    pub fn forward<T: Tape<f32, D>>(&self, h: A2<D, T>) -> Tensor<(usize,), f32, D, T> {
        let n = h.shape().0;
        let y = h.matmul(self.w.retaped::<T>()) + self.b.retaped::<T>().broadcast_like::<_, Axis<0>>(&(n, 1));
        y.reshape_like(&(n,))
    }

    /// Parameters with their HF names (`score.weight`, `score.bias`).
    pub fn params(&self) -> Vec<(String, ParamRef<'_, D>)> {
        vec![("score.weight".into(), ParamRef::M(&self.w)), ("score.bias".into(), ParamRef::V(&self.b))]
    }

    /// Mutable parameters with their HF names.
    pub fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, D>)> {
        vec![("score.weight".into(), ParamMut::M(&mut self.w)), ("score.bias".into(), ParamMut::V(&mut self.b))]
    }
}

impl<D: FusedOps> ScalarHead<D> {
    /// Scores read at chosen rows of `(N, C)` hidden states, e.g. the last real token of each
    /// sequence (`row = b·T + index`). `(N, C) → (k,)`.
    pub fn read_at<T: Tape<f32, D>>(
        &self,
        h: A2<D, T>,
        rows: &[usize],
    ) -> Result<Tensor<(usize,), f32, D, T>, PolicyError> {
        let n = h.shape().0;
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(PolicyError::Input(format!("scalar head row {r} is outside the {n} hidden rows")));
        }
        Ok(self.forward(D::select_rows(h, rows)))
    }
}
