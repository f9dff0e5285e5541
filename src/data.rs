//! Training data: text corpora as token streams, split into train/validation, and random
//! blocks drawn deterministically from `(seed, step, micro-batch)` — so a resumed run draws
//! exactly the batches an uninterrupted one would, with no RNG state to save.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Reads UTF-8 text files and concatenates them; errors name the file, and for invalid UTF-8
/// the line and column of the first bad byte.
pub fn read_corpus(files: &[PathBuf]) -> Result<String> {
    if files.is_empty() {
        bail!("data.files: no corpus files given");
    }
    let mut text = String::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("{}: cannot read", f.display()))?;
        let s = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let before = &e.as_bytes()[..at];
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                let col = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
                bail!("{}: line {line}, column {col}: not valid UTF-8 (byte offset {at})", f.display());
            }
        };
        if s.trim().is_empty() {
            bail!("{}: the file is empty", f.display());
        }
        text.push_str(&s);
    }
    Ok(text)
}

/// A token stream cut into a training part and a validation part (the last `val_fraction`).
#[derive(Debug, Clone)]
pub struct TokenSplit {
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub val: Vec<u32>,
}

impl TokenSplit {
    /// Splits `tokens`; both parts must hold at least one block plus its target.
    pub fn new(tokens: Vec<u32>, val_fraction: f64, block_size: usize, source: &Path) -> Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) {
            bail!("data.val_fraction must be in [0, 1), got {val_fraction}");
        }
        let n_val = (tokens.len() as f64 * val_fraction).round() as usize;
        let cut = tokens.len() - n_val;
        let (train, val) = (tokens[..cut].to_vec(), tokens[cut..].to_vec());
        if train.len() <= block_size || (val_fraction > 0.0 && val.len() <= block_size) {
            bail!(
                "{}: {} tokens give {} train / {} validation tokens; each needs more than block_size = {block_size}",
                source.display(),
                tokens.len(),
                train.len(),
                val.len()
            );
        }
        Ok(TokenSplit { train, val })
    }
}

/// `batch` random windows of `block + 1` tokens from `tokens` (inputs and next-token targets),
/// drawn from an RNG seeded by `(seed, step, micro)`.
pub fn sample_blocks(
    tokens: &[u32],
    block: usize,
    batch: usize,
    seed: u64,
    step: u64,
    micro: u64,
) -> (Vec<Vec<u32>>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(mix(seed, step, micro));
    let mut inputs = Vec::with_capacity(batch);
    let mut targets = Vec::with_capacity(batch * block);
    for _ in 0..batch {
        let start = rng.gen_range(0..tokens.len() - block);
        inputs.push(tokens[start..start + block].to_vec());
        targets.extend(tokens[start + 1..start + block + 1].iter().map(|&t| t as usize));
    }
    (inputs, targets)
}

/// A well-mixed 64-bit seed from three numbers (splitmix64 rounds).
pub fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"ok line\nsecond \xff line\n").unwrap();
        let e = read_corpus(&[bad]).unwrap_err().to_string();
        assert!(e.contains("bad.txt") && e.contains("line 2, column 8"), "{e}");
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(read_corpus(&[empty]).unwrap_err().to_string().contains("empty"));
        let missing = dir.path().join("missing.txt");
        assert!(read_corpus(&[missing]).unwrap_err().to_string().contains("missing.txt"));
    }

    #[test]
    fn blocks_are_deterministic_and_targets_shifted() {
        let toks: Vec<u32> = (0..100).collect();
        let (x, y) = sample_blocks(&toks, 8, 3, 1, 5, 0);
        assert_eq!(sample_blocks(&toks, 8, 3, 1, 5, 0), (x.clone(), y.clone()));
        assert_ne!(sample_blocks(&toks, 8, 3, 1, 6, 0).0, x);
        for (b, row) in x.iter().enumerate() {
            for (j, &t) in row.iter().enumerate() {
                assert_eq!(y[b * 8 + j], t as usize + 1);
            }
        }
    }
}
