//! A batch of token sequences with its attention mask and position ids.

use crate::error::PolicyError;

/// `B` rows of `T` token ids, row-major, with a padding mask and per-token positions.
///
/// Positions follow transformers 5: `cumsum(attention_mask) - 1`, and 0 at pads. So a
/// left-padded row sees the same positions at its real tokens as the unpadded sequence.
///
/// A packed row ([`Batch::packed`]) holds several sequences: its mask numbers them (1, 2, …),
/// positions restart with each, and a token attends only to its own sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub b: usize,
    /// Columns.
    pub t: usize,
    /// Token ids `(B·T)`.
    pub ids: Vec<u32>,
    /// 0 for padding; for real tokens 1, or in a packed row the token's sequence number
    /// (1, 2, …) `(B·T)`.
    pub attention_mask: Vec<u8>,
    /// Position of each token `(B·T)`.
    pub position_ids: Vec<usize>,
}

impl Batch {
    /// A batch from ids and mask; positions are derived from the mask.
    pub fn new(ids: Vec<u32>, attention_mask: Vec<u8>, b: usize, t: usize) -> Result<Self, PolicyError> {
        if ids.len() != b * t || attention_mask.len() != b * t {
            return Err(PolicyError::Input(format!(
                "batch of {b}x{t} needs {} ids and mask entries, got {} and {}",
                b * t,
                ids.len(),
                attention_mask.len()
            )));
        }
        let mut position_ids = vec![0usize; b * t];
        for r in 0..b {
            // positions count the real tokens of the row's current sequence
            let (mut seen, mut seq) = (0usize, 0u8);
            for j in 0..t {
                let m = attention_mask[r * t + j];
                if m != 0 {
                    if m != seq {
                        (seen, seq) = (0, m);
                    }
                    position_ids[r * t + j] = seen;
                    seen += 1;
                }
            }
        }
        Ok(Batch { b, t, ids, attention_mask, position_ids })
    }

    /// Rows that each hold several sequences one after another, right-padded with `pad_id`
    /// to the longest row (see the type's note): at most 255 sequences per row.
    pub fn packed(rows: &[Vec<&[u32]>], pad_id: u32) -> Result<Self, PolicyError> {
        let t = rows.iter().map(|r| r.iter().map(|s| s.len()).sum::<usize>()).max().unwrap_or(0);
        let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * t), Vec::with_capacity(rows.len() * t));
        for row in rows {
            if row.len() > u8::MAX as usize {
                return Err(PolicyError::Input(format!("a packed row holds {} sequences; at most 255", row.len())));
            }
            let mut len = 0;
            for (k, s) in row.iter().enumerate() {
                ids.extend_from_slice(s);
                mask.extend(std::iter::repeat_n(k as u8 + 1, s.len()));
                len += s.len();
            }
            let pad = t - len;
            ids.extend(std::iter::repeat_n(pad_id, pad));
            mask.extend(std::iter::repeat_n(0u8, pad));
        }
        Self::new(ids, mask, rows.len(), t)
    }

    /// Whether the real tokens at columns `i` and `j` of row `r` belong to different
    /// sequences of a packed row.
    pub fn other_sequence(&self, r: usize, i: usize, j: usize) -> bool {
        let (a, b) = (self.attention_mask[r * self.t + i], self.attention_mask[r * self.t + j]);
        a != 0 && b != 0 && a != b
    }

    /// Rows of equal length, no padding.
    pub fn unpadded(rows: &[Vec<u32>]) -> Result<Self, PolicyError> {
        let t = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != t) {
            return Err(PolicyError::Input("unpadded batch needs rows of equal length".into()));
        }
        Self::new(rows.concat(), vec![1; rows.len() * t], rows.len(), t)
    }

    /// Rows left-padded with `pad_id` to the longest row (the layout generation uses).
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32) -> Result<Self, PolicyError> {
        Self::padded(rows, pad_id, true)
    }

    /// Rows right-padded with `pad_id` to the longest row (the layout training uses).
    pub fn right_padded(rows: &[Vec<u32>], pad_id: u32) -> Result<Self, PolicyError> {
        Self::padded(rows, pad_id, false)
    }

    fn padded(rows: &[Vec<u32>], pad_id: u32, left: bool) -> Result<Self, PolicyError> {
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * t), Vec::with_capacity(rows.len() * t));
        for r in rows {
            let pad = t - r.len();
            if left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(0u8, pad));
            }
            ids.extend_from_slice(r);
            mask.extend(std::iter::repeat_n(1u8, r.len()));
            if !left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(0u8, pad));
            }
        }
        Self::new(ids, mask, rows.len(), t)
    }

    /// Whether column `j` of row `r` is a real token.
    pub fn is_real(&self, r: usize, j: usize) -> bool {
        self.attention_mask[r * self.t + j] != 0
    }

    /// Column of the last real token of each row (`None` for an all-pad row).
    pub fn last_real_index(&self) -> Vec<Option<usize>> {
        (0..self.b).map(|r| (0..self.t).rev().find(|&j| self.is_real(r, j))).collect()
    }

    /// Checks ids against the model's vocabulary and positions against its position limit
    /// ([`crate::Dims::position_limit`]), if it has one.
    pub(crate) fn check(&self, dims: &crate::Dims) -> Result<(), PolicyError> {
        let vocab = dims.vocab;
        if self.b == 0 || self.t == 0 {
            return Err(PolicyError::Input(format!("empty batch ({}x{})", self.b, self.t)));
        }
        if let Some((k, &id)) = self.ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(PolicyError::Input(format!(
                "token id {id} at row {}, column {} is outside the vocabulary of {vocab}",
                k / self.t,
                k % self.t
            )));
        }
        let max_pos = self.position_ids.iter().copied().max().unwrap_or(0);
        if let Some(limit) = dims.position_limit().filter(|&l| max_pos >= l) {
            return Err(PolicyError::Input(format!(
                "sequence needs position {max_pos}, but the model has only {limit} positions ({})",
                dims.position_limit_field()
            )));
        }
        Ok(())
    }
}
