//! Training data: text corpora as token streams, split into train/validation, and random
//! blocks drawn deterministically from `(seed, step, micro-batch)` — so a resumed run draws
//! exactly the batches an uninterrupted one would, with no RNG state to save.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// `text` without a leading UTF-8 byte-order mark (editors on Windows write one; it is not
/// part of the text, and JSON parsers refuse it).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads UTF-8 text files and concatenates them, with a leading byte-order mark dropped and
/// Windows line ends (`\r\n`) read as `\n`, as Python's text mode reads them (nanoGPT's
/// `open(path).read()`); errors name the file, and for invalid UTF-8 the line and column of
/// the first bad byte.
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
        let s = strip_bom(&s);
        if s.contains("\r\n") {
            text.push_str(&s.replace("\r\n", "\n"));
        } else {
            text.push_str(s);
        }
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
        let total = tokens.len();
        let cut = total - held_out_count(total, val_fraction);
        let mut train = tokens;
        let val = train.split_off(cut);
        if train.len() <= block_size || (val_fraction > 0.0 && val.len() <= block_size) {
            bail!(
                "{}: {} tokens give {} train / {} validation tokens; each needs more than block_size = {block_size}",
                source.display(),
                total,
                train.len(),
                val.len()
            );
        }
        Ok(TokenSplit { train, val })
    }

    /// A training stream and a separate validation stream (from `val_source`); each must hold
    /// at least one block plus its target.
    pub fn held_out(
        train: Vec<u32>,
        val: Vec<u32>,
        block_size: usize,
        source: &Path,
        val_source: &Path,
    ) -> Result<Self> {
        for (tokens, file) in [(&train, source), (&val, val_source)] {
            if tokens.len() <= block_size {
                bail!("{}: {} tokens; it needs more than block_size = {block_size}", file.display(), tokens.len());
            }
        }
        Ok(TokenSplit { train, val })
    }
}

/// How many of `n` items a held-out split of `val_fraction` takes (rounded): every stage holds
/// out the *last* ones.
pub fn held_out_count(n: usize, val_fraction: f64) -> usize {
    (n as f64 * val_fraction).round() as usize
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
    fn byte_order_marks_and_windows_line_ends_read_as_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
        std::fs::write(&a, "\u{feff}one\r\ntwo\r\n").unwrap();
        std::fs::write(&b, "\u{feff}three\rfour\n").unwrap();
        assert_eq!(read_corpus(&[a, b]).unwrap(), "one\ntwo\nthree\rfour\n", "a lone \\r stays");
        let j = dir.path().join("d.jsonl");
        std::fs::write(&j, "\u{feff}{\"p\": \"x\"}\r\n\r\n{\"p\": \"y\\r\\n\"}\r\n").unwrap();
        let records = read_jsonl(&j).unwrap();
        assert_eq!(records.iter().map(|r| r.str("p").unwrap()).collect::<Vec<_>>(), ["x", "y\r\n"]);
        assert_eq!(records[1].line, 3, "line numbers count the blank line");
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

/// One JSONL record: its 1-based line number and its object, with typed field getters whose
/// errors name the file, the line and the field.
#[derive(Debug, Clone)]
pub struct JsonRecord<'f> {
    /// The file it came from.
    pub file: &'f Path,
    /// 1-based line number.
    pub line: usize,
    /// The object.
    pub obj: serde_json::Map<String, serde_json::Value>,
}

impl JsonRecord<'_> {
    /// An error about this record (file and line prefixed).
    pub fn error(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: line {}: {msg}", self.file.display(), self.line)
    }

    fn field(&self, f: &str) -> Result<&serde_json::Value> {
        self.obj.get(f).ok_or_else(|| self.error(format!("field `{f}` is missing")))
    }

    /// A required field of any JSON shape `T` reads (e.g. a list of chat messages).
    pub fn parse<T: serde::de::DeserializeOwned>(&self, f: &str) -> Result<T> {
        serde_json::from_value(self.field(f)?.clone()).map_err(|e| self.error(format!("field `{f}`: {e}")))
    }

    /// A required string field.
    pub fn str(&self, f: &str) -> Result<String> {
        match self.field(f)? {
            serde_json::Value::String(s) => Ok(s.clone()),
            other => Err(self.error(format!("field `{f}` must be a string, found {}", json_kind(other)))),
        }
    }

    /// A required finite number.
    pub fn f32(&self, f: &str) -> Result<f32> {
        match self.field(f)? {
            serde_json::Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => Ok(n.as_f64().unwrap() as f32),
            other => Err(self.error(format!("field `{f}` must be a finite number, found {}", json_kind(other)))),
        }
    }

    /// A required boolean.
    pub fn bool(&self, f: &str) -> Result<bool> {
        match self.field(f)? {
            serde_json::Value::Bool(b) => Ok(*b),
            other => Err(self.error(format!("field `{f}` must be true or false, found {}", json_kind(other)))),
        }
    }

    /// A required array of strings.
    pub fn str_array(&self, f: &str) -> Result<Vec<String>> {
        let serde_json::Value::Array(items) = self.field(f)? else {
            return Err(
                self.error(format!("field `{f}` must be an array of strings, found {}", json_kind(self.field(f)?)))
            );
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                other => Err(self.error(format!("field `{f}`[{i}] must be a string, found {}", json_kind(other)))),
            })
            .collect()
    }
}

/// Reads a JSONL file (`.gz` files are decompressed; a leading byte-order mark dropped; `\n` or
/// `\r\n` line ends) into records. Blank lines are skipped;
/// every other problem — an unreadable, non-UTF-8 or empty file, a malformed line, a line that
/// is not an object — is an error naming the file and the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<JsonRecord<'_>>> {
    let mut bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes.as_slice()), &mut out)
            .with_context(|| format!("{}: not a valid gzip file", path.display()))?;
        bytes = out;
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("{}: line {line}: not valid UTF-8", path.display())
    })?;
    let mut out = Vec::new();
    for (i, text) in strip_bom(&text).lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: line {line}: malformed JSON: {e}", path.display()))?;
        let serde_json::Value::Object(obj) = v else {
            bail!("{}: line {line}: expected a JSON object, found {}", path.display(), json_kind(&v));
        };
        out.push(JsonRecord { file: path, line, obj });
    }
    if out.is_empty() {
        bail!("{}: no records (the file is empty)", path.display());
    }
    Ok(out)
}

/// Reads a JSONL file whose records each need the string fields `fields`; returns those
/// fields' values per record, in order. Errors as [`read_jsonl`] and [`JsonRecord::str`].
pub fn read_jsonl_fields(path: &Path, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    read_jsonl(path)?.iter().map(|r| fields.iter().map(|f| r.str(f)).collect()).collect()
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The dataset index for position `i` of the global example stream: shuffled epochs, each
/// permutation drawn from `(seed, epoch)`, so the stream needs no saved state. (It shuffles
/// all `n` indices per call; training loops walk the stream with [`EpochOrder`].)
pub fn epoch_index(n: usize, seed: u64, i: usize) -> usize {
    epoch_permutation(n, seed, (i / n) as u64)[i % n]
}

/// The stream [`epoch_index`] defines, shuffling once per epoch instead of once per index:
/// `index(i)` equals `epoch_index(n, seed, i)` for any order of `i` (a resumed run starts
/// mid-epoch).
#[derive(Debug, Clone)]
pub struct EpochOrder {
    n: usize,
    seed: u64,
    /// The epoch `perm` belongs to.
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl EpochOrder {
    /// The stream over `0..n` (`n` ≥ 1) drawn from `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        assert!(n > 0, "EpochOrder over an empty dataset");
        EpochOrder { n, seed, epoch: None, perm: Vec::new() }
    }

    /// The dataset index at position `i` of the stream.
    pub fn index(&mut self, i: usize) -> usize {
        let epoch = (i / self.n) as u64;
        if self.epoch != Some(epoch) {
            self.perm = epoch_permutation(self.n, self.seed, epoch);
            self.epoch = Some(epoch);
        }
        self.perm[i % self.n]
    }
}

/// Passes over a training set of `n` records after `consumed` of the stream's draws (TRL's
/// `epoch` metric: 1.5 = one pass and half of the next).
pub fn epochs_seen(consumed: usize, n: usize) -> f64 {
    consumed as f64 / n.max(1) as f64
}

/// The whole permutation of epoch `epoch` that [`epoch_index`] walks (for callers that need
/// every index at once: one shuffle instead of one per index).
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut StdRng::seed_from_u64(mix(seed, epoch, 0x5f7)));
    perm
}

#[cfg(test)]
mod jsonl_tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn jsonl_errors_name_file_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        let ok = write(
            d.path(),
            "ok.jsonl",
            b"{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"c\", \"response\": \"d\", \"x\": 1}\n",
        );
        assert_eq!(read_jsonl_fields(&ok, &["prompt", "response"]).unwrap(), vec![vec!["a", "b"], vec!["c", "d"]]);
        let cases: [(&str, &[u8], &str); 6] = [
            ("bad.jsonl", b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\",\n", "line 2: malformed JSON"),
            ("missing.jsonl", b"{\"prompt\": \"a\"}\n", "line 1: field `response` is missing"),
            (
                "type.jsonl",
                b"{\"prompt\": \"a\", \"response\": 7}\n",
                "line 1: field `response` must be a string, found a number",
            ),
            ("array.jsonl", b"[1, 2]\n", "line 1: expected a JSON object"),
            ("empty.jsonl", b"\n\n", "no records"),
            (
                "utf8.jsonl",
                b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xff\"}\n",
                "line 2: not valid UTF-8",
            ),
        ];
        for (name, body, want) in cases {
            let p = write(d.path(), name, body);
            let e = read_jsonl_fields(&p, &["prompt", "response"]).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
        assert!(read_jsonl_fields(&d.path().join("none.jsonl"), &["a"])
            .unwrap_err()
            .to_string()
            .contains("none.jsonl"));
    }

    #[test]
    fn epoch_order_walks_the_epoch_index_stream() {
        for (n, seed) in [(1, 0), (7, 3), (64, 11)] {
            let mut order = EpochOrder::new(n, seed);
            // forwards across epochs, then a jump back (a resumed run) and forwards again
            let positions: Vec<usize> = (0..3 * n + 2).chain(n / 2..2 * n).collect();
            for i in positions {
                assert_eq!(order.index(i), epoch_index(n, seed, i), "n {n}, seed {seed}, i {i}");
            }
        }
    }

    #[test]
    fn epoch_index_visits_every_example_once_per_epoch() {
        let mut seen: Vec<usize> = (0..10).map(|i| epoch_index(10, 3, i)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(epoch_index(10, 3, 4), epoch_index(10, 3, 4));
    }
}
