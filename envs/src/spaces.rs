//! Spaces in gymnasium's sense: the set of valid actions and observations.

use serde::{Deserialize, Serialize};

/// A set of values with a membership test.
pub trait Space {
    /// The element type.
    type Item: ?Sized;
    /// Whether `x` belongs to the space.
    fn contains(&self, x: &Self::Item) -> bool;
}

/// `{0, 1, …, n−1}`: the action space of a language model (one token id per step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrete {
    /// Number of actions (the vocabulary size).
    pub n: u32,
}

impl Space for Discrete {
    type Item = u32;
    fn contains(&self, x: &u32) -> bool {
        *x < self.n
    }
}

/// Token sequences of at most `max_len` ids, each below `vocab`: the observation space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSeq {
    /// Longest allowed sequence (prompt + response).
    pub max_len: usize,
    /// Vocabulary size.
    pub vocab: u32,
}

impl Space for TokenSeq {
    type Item = [u32];
    fn contains(&self, x: &[u32]) -> bool {
        x.len() <= self.max_len && x.iter().all(|&t| t < self.vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn discrete_contains_exactly_below_n(n in 1u32..100_000, x in 0u32..200_000) {
            prop_assert_eq!(Discrete { n }.contains(&x), x < n);
        }

        #[test]
        fn token_seq_checks_length_and_ids(ids in proptest::collection::vec(0u32..600, 0..40), max_len in 0usize..40) {
            let space = TokenSeq { max_len, vocab: 512 };
            let want = ids.len() <= max_len && ids.iter().all(|&t| t < 512);
            prop_assert_eq!(space.contains(&ids), want);
        }
    }
}
