//! Table-driven stand-ins for models: a bigram "language model" that is both a policy and a
//! reference, so environment tests need no autodiff and are exact.
#![allow(dead_code)]

use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_envs::{Action, Detokenizer, EnvError, LogProbModel, Policy};

/// `log p(next | last)` from a fixed table over `vocab` ids (row = last token).
#[derive(Debug, Clone)]
pub struct Bigram {
    pub vocab: usize,
    table: Vec<f32>,
    rows: Vec<Vec<u32>>,
    rngs: Vec<StdRng>,
}

impl Bigram {
    /// A deterministic table; `skew` shifts mass so two tables differ.
    pub fn new(vocab: usize, skew: f32, num_rows: usize, seed: u64) -> Self {
        let mut table = vec![0.0f32; vocab * vocab];
        for a in 0..vocab {
            let logits: Vec<f32> =
                (0..vocab).map(|b| (((a * 7 + b * 3) % vocab) as f32 * 0.37 + skew * b as f32).sin() * 2.0).collect();
            let lse = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
            for b in 0..vocab {
                table[a * vocab + b] = logits[b] - lse;
            }
        }
        let rngs = (0..num_rows).map(|r| StdRng::seed_from_u64(seed * 1000 + r as u64)).collect();
        Bigram { vocab, table, rows: vec![vec![]; num_rows], rngs }
    }

    pub fn logprob(&self, last: u32, next: u32) -> f32 {
        self.table[last as usize * self.vocab + next as usize]
    }
}

impl LogProbModel for Bigram {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        for (&r, p) in rows.iter().zip(prompts) {
            self.rows[r] = p.to_vec();
        }
        Ok(())
    }
    fn logprob_and_push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>, EnvError> {
        Ok(rows
            .iter()
            .zip(tokens)
            .map(|(&r, &t)| {
                let lp = self.logprob(*self.rows[r].last().expect("begun"), t);
                self.rows[r].push(t);
                lp
            })
            .collect())
    }
}

impl Policy for Bigram {
    fn begin(&mut self, rows: &[usize], prompts: &[&[u32]]) -> Result<(), EnvError> {
        LogProbModel::begin(self, rows, prompts)
    }
    fn act(&mut self, rows: &[usize]) -> Result<Vec<Action>, EnvError> {
        Ok(rows
            .iter()
            .map(|&r| {
                let last = *self.rows[r].last().expect("begun");
                let u: f32 = self.rngs[r].gen();
                let mut acc = 0.0;
                let mut tok = self.vocab as u32 - 1;
                for b in 0..self.vocab as u32 {
                    acc += self.logprob(last, b).exp();
                    if acc > u {
                        tok = b;
                        break;
                    }
                }
                Action { token: tok, logprob: self.logprob(last, tok) }
            })
            .collect())
    }
    fn push(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), EnvError> {
        for (&r, &t) in rows.iter().zip(tokens) {
            self.rows[r].push(t);
        }
        Ok(())
    }
}

/// Renders ids as letters.
#[derive(Debug)]
pub struct Letters;

impl Detokenizer for Letters {
    fn decode(&self, ids: &[u32]) -> Result<String, EnvError> {
        Ok(ids.iter().map(|&i| (b'a' + (i % 26) as u8) as char).collect())
    }
}

pub fn prompts(n: usize) -> Vec<(Vec<u32>, String)> {
    (0..n).map(|i| (vec![1 + i as u32 % 5, 2 + i as u32 % 3], format!("prompt {i}"))).collect()
}
