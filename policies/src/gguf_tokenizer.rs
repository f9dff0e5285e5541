//! The `tokenizer.json` a GGUF file's vocabulary describes (`tokenizer.ggml.*` metadata), and its
//! chat template.
//!
//! Two kinds of vocabulary are read. A byte-level BPE file (`tokenizer.ggml.model = gpt2`) stores
//! tokens, merges and token types, and names in `tokenizer.ggml.pre` how text is split before the
//! merges. The split is what the model's own `tokenizer.json` does — the one the vocabulary was
//! trained with, which llama.cpp and transformers' GGUF loader rebuild from the name: GPT-2's
//! byte-level regex (GPT-2, GPT-NeoX's vocabulary, MPT), Llama 3's, Qwen2's, GPT-4o's and
//! Tekken's `Split` regexes (digits in threes, digits one by one; Qwen2's after NFC
//! normalisation, which llama.cpp and transformers' GGUF loader leave out; Llama 3's and
//! Tekken's words that are tokens taken whole), the digits-first split of SmolLM, StarCoder and
//! Command-R, Falcon's and DeepSeek Coder's. A name outside these is an error rather than a
//! guess, since a wrong split tokenizes text the model never saw.
//!
//! A SentencePiece BPE file (`tokenizer.ggml.model = llama`: Llama 2, TinyLlama, Mistral 7B,
//! Gemma) stores tokens with scores and types but no merges: llama.cpp joins, again and again, the
//! neighbouring pair whose join is the vocabulary's highest-scoring token, after `▁` for every
//! space (and one in front of the text unless the file says not to), and spells what no token
//! covers in `<0xNN>` byte tokens.
//! The same result comes from a BPE whose merges are every split of a token into two tokens,
//! ranked by the joined token's score (as transformers' GGUF loader and tokenizers' SentencePiece
//! converters build it), with byte fallback.

use crate::error::PolicyError;
use crate::gguf::{Gguf, Value};

/// Llama 3's split (its `tokenizer.json`): contractions, letters, digits in runs of up to three,
/// punctuation, newlines, spaces.
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// GPT-4o's split (`o200k_base`: Phi-4, Phi-4-mini, Llama 4), as its tokenizer.json has it:
/// words with their case runs apart, contractions kept on, digits in runs of up to three.
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Mistral's Tekken split (Mistral NeMo, Ministral): GPT-4o's without the contractions, each
/// digit on its own.
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Qwen2's split: Llama 3's with each digit on its own.
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// How a `tokenizer.ggml.pre` name splits text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// GPT-2's byte-level regex (the `ByteLevel` pre-tokenizer's own).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (SmolLM, StarCoder, Command-R).
    DigitsThenGpt2,
    /// Falcon's: runs of punctuation apart, GPT-2's regex, digits in threes.
    Falcon,
    /// DeepSeek Coder's: newlines, letter runs and punctuation runs (each with a space in
    /// front), CJK runs and single digits apart.
    DeepseekCoder,
    /// A `Split` regex, then byte-level mapping without a regex of its own; `nfc`: the text is
    /// NFC-normalised first (Qwen2's tokenizer, as transformers' `Qwen2Tokenizer` builds it);
    /// `llama3`: llama.cpp's Llama 3 (and Tekken) pre-type — a word that is itself a token is taken whole
    /// rather than merged up to (Llama 3's tokenizer.json has `ignore_merges`; some such tokens
    /// cannot be reached by the merges at all), and BOS goes in front unless
    /// `tokenizer.ggml.add_bos_token` says otherwise.
    Regex { pattern: &'static str, nfc: bool, llama3: bool },
}

const LLAMA3: Split = Split::Regex { pattern: LLAMA3_SPLIT, nfc: false, llama3: true };
/// DBRX's and Smaug's: Llama 3's regex, merges as usual.
const LLAMA3_REGEX: Split = Split::Regex { pattern: LLAMA3_SPLIT, nfc: false, llama3: false };

/// The `tokenizer.ggml.pre` names known here (llama.cpp's, as its converter writes them from the
/// hash of how a tokenizer splits a fixed text) and their splits; a file without the key splits
/// as GPT-2.
const PRE_SPLITS: [(&str, Split); 26] = [
    ("default", Split::Gpt2),
    ("gpt-2", Split::Gpt2),
    ("gpt2", Split::Gpt2),
    // GPT-NeoX's vocabulary (Pythia, OLMo) and MPT's: GPT-2's split in llama.cpp
    ("olmo", Split::Gpt2),
    ("mpt", Split::Gpt2),
    ("smollm", Split::DigitsThenGpt2),
    ("starcoder", Split::DigitsThenGpt2),
    ("refact", Split::DigitsThenGpt2),
    ("command-r", Split::DigitsThenGpt2),
    ("codeshell", Split::DigitsThenGpt2),
    ("exaone", Split::DigitsThenGpt2),
    ("falcon", Split::Falcon),
    ("deepseek-coder", Split::DeepseekCoder),
    ("gpt-4o", Split::Regex { pattern: GPT4O_SPLIT, nfc: false, llama3: false }),
    ("llama4", Split::Regex { pattern: GPT4O_SPLIT, nfc: false, llama3: false }),
    ("tekken", Split::Regex { pattern: TEKKEN_SPLIT, nfc: false, llama3: true }),
    ("llama3", LLAMA3),
    ("llama-v3", LLAMA3),
    ("llama-bpe", LLAMA3),
    ("falcon3", LLAMA3),
    ("smaug-bpe", LLAMA3_REGEX),
    ("dbrx", LLAMA3_REGEX),
    ("pixtral", LLAMA3),
    ("qwen2", Split::Regex { pattern: QWEN2_SPLIT, nfc: true, llama3: false }),
    ("deepseek-r1-qwen", Split::Regex { pattern: QWEN2_SPLIT, nfc: false, llama3: false }),
    ("megrez", Split::Regex { pattern: QWEN2_SPLIT, nfc: false, llama3: false }),
];

impl Split {
    fn pre_tokenizer(self) -> serde_json::Value {
        match self {
            Split::Gpt2 => byte_level(true),
            Split::DigitsThenGpt2 => serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            Split::DeepseekCoder => serde_json::json!({"type": "Sequence", "pretokenizers": [
                isolated(r"[\r\n]"), isolated(r"\s?\p{L}+"), isolated(r"\s?\p{P}+"), isolated("[一-龥ࠀ-一가-퟿]+"),
                {"type": "Digits", "individual_digits": true}, byte_level(false)]}),
            Split::Falcon => serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Punctuation", "behavior": "Contiguous"}, byte_level(true),
                {"type": "Digits", "individual_digits": false}, isolated("[0-9][0-9][0-9]")]}),
            Split::Regex { pattern, .. } => {
                serde_json::json!({"type": "Sequence", "pretokenizers": [isolated(pattern), byte_level(false)]})
            }
        }
    }

    /// Whether this is llama.cpp's Llama 3 pre-type ([`Split::Regex`]).
    fn llama3(self) -> bool {
        matches!(self, Split::Regex { llama3: true, .. })
    }

    /// The split's tokenizer.json `normalizer`.
    fn normalizer(self) -> serde_json::Value {
        match self {
            Split::Regex { nfc: true, .. } => serde_json::json!({"type": "NFC"}),
            _ => serde_json::Value::Null,
        }
    }
}

/// tokenizer.json's `Split` pre-tokenizer keeping each match of `pattern` as a piece of its own.
fn isolated(pattern: &str) -> serde_json::Value {
    serde_json::json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// tokenizer.json's `ByteLevel` (pre-tokenizer with or without GPT-2's regex, or decoder).
fn byte_level(use_regex: bool) -> serde_json::Value {
    serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The strings of the array metadata `key`.
fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>, PolicyError> {
    match g.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.as_str()),
                _ => Err(g.err("metadata", format!("`{key}` must hold strings"))),
            })
            .collect(),
        _ => Err(g.err("metadata", format!("`{key}` is missing (no vocabulary in this file)"))),
    }
}

/// llama.cpp's token types, one per token: 1 normal, 3 control (special), 4 user-defined (added
/// but not special, like `<think>`); without the key every token is normal.
fn token_types(g: &Gguf, n: usize) -> Result<Vec<i128>, PolicyError> {
    let types = per_token(g, "token_type", "integer", n, |v| if let Value::Int(i) = v { Some(*i) } else { None })?;
    Ok(types.unwrap_or_else(|| vec![NORMAL; n]))
}

/// `tokenizer.ggml.<key>`: one `what` per token (`pick` reads each), or `None` when absent.
fn per_token<T>(
    g: &Gguf,
    key: &str,
    what: &str,
    n: usize,
    pick: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>, PolicyError> {
    let full = format!("tokenizer.ggml.{key}");
    match g.metadata.get(&full) {
        None => Ok(None),
        Some(Value::Array(items)) if items.len() == n => items
            .iter()
            .map(&pick)
            .collect::<Option<_>>()
            .map(Some)
            .ok_or_else(|| g.err("metadata", format!("`{full}` must hold {what}s"))),
        Some(_) => Err(g.err("metadata", format!("`{full}` must be one {what} per token ({n})"))),
    }
}

/// Whether every character of `token` is one of the 256 byte-level symbols (GPT-2's
/// `bytes_to_unicode`): a byte-level vocabulary spells every real token so.
fn byte_level_spelling(token: &str) -> bool {
    token.chars().all(|c| {
        let c = c as u32;
        (0x21..=0x7e).contains(&c)
            || (0xa1..=0xac).contains(&c)
            || (0xae..=0xff).contains(&c)
            || (0x100..0x144).contains(&c)
    })
}

/// The `tokenizer.json` a GGUF file's vocabulary describes: byte-level BPE
/// (`tokenizer.ggml.model = gpt2`) or SentencePiece BPE (`llama`), as the [module docs](self)
/// say.
pub fn tokenizer_json(g: &Gguf) -> Result<String, PolicyError> {
    match g.metadata.get("tokenizer.ggml.model") {
        Some(Value::Str(m)) if m == "gpt2" => byte_level_bpe(g),
        Some(Value::Str(m)) if m == "llama" => sentencepiece_bpe(g),
        other => {
            Err(g.err("metadata", format!("tokenizer.ggml.model {other:?} is not supported (gpt2 and llama are)")))
        }
    }
}

/// The `tokenizer.json` of a file whose vocabulary is a byte-level BPE (`tokenizer.ggml.model =
/// gpt2`): tokens and merges; control tokens (type 3) as special added tokens and user-defined
/// ones (type 4) as plain added tokens, so text holding them keeps them whole; the split its
/// `tokenizer.ggml.pre` names ([module docs](self)), with Llama 3's whole-word tokens; a ByteLevel
/// decoder, NFC for Qwen2 only; and BOS in front of each text when `tokenizer.ggml.add_bos_token`
/// says so (by default for Llama 3's pre-tokenizer, as llama.cpp).
///
/// A control token spelled outside the byte-level alphabet (a space in it, say) could never
/// come out of the merges; llama.cpp files mislabel such tokens, and like transformers this
/// leaves them out of the added tokens.
fn byte_level_bpe(g: &Gguf) -> Result<String, PolicyError> {
    let pre = match g.metadata.get("tokenizer.ggml.pre") {
        Some(Value::Str(p)) => Some(p.as_str()),
        None => None,
        Some(other) => return Err(g.err("metadata", format!("`tokenizer.ggml.pre` must be a string, found {other:?}"))),
    };
    let split = match pre {
        None => Split::Gpt2,
        Some(pre) => PRE_SPLITS.iter().find(|(name, _)| *name == pre).map(|&(_, split)| split).ok_or_else(|| {
            let known: Vec<&str> = PRE_SPLITS.iter().map(|(name, _)| *name).collect();
            let msg = format!(
                "tokenizer.ggml.pre {pre:?} names a pre-tokenizer this loader does not know ({} are known): \
                 put the model's tokenizer.json beside the file, and it is used instead",
                known.join(", ")
            );
            g.err("metadata", msg)
        })?,
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges: Vec<[&str; 2]> = strings(g, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| [a, b]))
        .collect::<Option<_>>()
        .ok_or_else(|| g.err("metadata", "a merge in `tokenizer.ggml.merges` is not \"a b\""))?;
    let types = token_types(g, tokens.len())?;
    let added = added_tokens(&tokens, &types, |t, ty| (ty == CONTROL && byte_level_spelling(t)) || ty == USER_DEFINED);
    let post_processor = bos_post_processor(g, &tokens, split.llama3(), None)?;
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": split.normalizer(),
        "pre_tokenizer": split.pre_tokenizer(),
        "post_processor": post_processor,
        "decoder": byte_level(true),
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": split.llama3(),
            "vocab": vocab(&tokens), "merges": merges},
    })
    .to_string())
}

/// A post-processor putting BOS in front of each text when `tokenizer.ggml.add_bos_token` is
/// true (Llama 3's `TemplateProcessing`), else none; `add` when the key is absent, and BOS
/// `default_id` when `tokenizer.ggml.bos_token_id` is (llama.cpp's defaults: BOS added, id 1,
/// for SentencePiece vocabularies; added for Llama 3's pre-tokenizer, whose files name it).
fn bos_post_processor(
    g: &Gguf,
    tokens: &[&str],
    add: bool,
    default_id: Option<usize>,
) -> Result<serde_json::Value, PolicyError> {
    if !flag(g, "tokenizer.ggml.add_bos_token", add)? {
        return Ok(serde_json::Value::Null);
    }
    let id = match (g.metadata.get("tokenizer.ggml.bos_token_id"), default_id) {
        (None, Some(id)) => id,
        _ => g.int("tokenizer.ggml.bos_token_id")?,
    };
    let bos = tokens.get(id).ok_or_else(|| {
        g.err("metadata", format!("tokenizer.ggml.bos_token_id {id} is past the {} tokens", tokens.len()))
    })?;
    let seq = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let special = |type_id: u32| serde_json::json!({"SpecialToken": {"id": bos, "type_id": type_id}});
    Ok(serde_json::json!({
        "type": "TemplateProcessing",
        "single": [special(0), seq("A", 0)],
        "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
        "special_tokens": {*bos: {"id": bos, "ids": [id], "tokens": [bos]}},
    }))
}

/// tokenizer.json's `vocab`: each token and its id.
fn vocab(tokens: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i.into())).collect()
}

/// tokenizer.json's `added_tokens`: the tokens `keep` picks (by spelling and type), matched in
/// the text as written; user-defined ones are not special, the rest are.
fn added_tokens(tokens: &[&str], types: &[i128], keep: impl Fn(&str, i128) -> bool) -> Vec<serde_json::Value> {
    let picked = tokens.iter().zip(types).enumerate().filter(|(_, (t, &ty))| keep(t, ty));
    picked
        .map(|(i, (t, &ty))| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != USER_DEFINED})
        })
        .collect()
}

/// llama.cpp's BOS and EOS ids for a SentencePiece vocabulary whose file names none.
pub(crate) const SENTENCEPIECE_BOS: usize = 1;
pub(crate) const SENTENCEPIECE_EOS: u32 = 2;

/// Whether the file's vocabulary is SentencePiece BPE (`tokenizer.ggml.model = llama`).
pub(crate) fn is_sentencepiece(g: &Gguf) -> bool {
    matches!(g.metadata.get("tokenizer.ggml.model"), Some(Value::Str(m)) if m == "llama")
}

/// A boolean metadata value, `default` when absent.
fn flag(g: &Gguf, key: &str, default: bool) -> Result<bool, PolicyError> {
    match g.metadata.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(g.err("metadata", format!("`{key}` must be a bool, found {other:?}"))),
    }
}

/// llama.cpp's token types ([`token_types`]): a piece of text, the unknown token, a control
/// token, a user-defined one; the last three are taken out of the text before it is tokenized.
const NORMAL: i128 = 1;
const UNKNOWN: i128 = 2;
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;

/// The `tokenizer.json` of a SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`), as
/// llama.cpp tokenizes with it ([module docs](self)): `▁` for each space and one in front of
/// each stretch of text unless `tokenizer.ggml.add_space_prefix` is false (llama.cpp prefixes the
/// text after every special token too, as the `Prepend` normaliser does for each stretch between
/// added tokens — transformers' `Metaspace` skips it when the text already starts with a space,
/// SentencePiece and llama.cpp do not); merges from the scores ([`score_merges`]); byte fallback
/// and the unknown token; unknown and control tokens as special added tokens, user-defined ones
/// as plain added tokens (both taken out of the text first, as llama.cpp does); a decoder that
/// turns `▁` back into spaces, joins byte tokens and drops the prefixed space; BOS in front
/// unless `tokenizer.ggml.add_bos_token` is false.
fn sentencepiece_bpe(g: &Gguf) -> Result<String, PolicyError> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let types = token_types(g, tokens.len())?;
    let scores = token_scores(g, tokens.len())?;
    let prefix = flag(g, "tokenizer.ggml.add_space_prefix", true)?;
    let added = added_tokens(&tokens, &types, |_, ty| [UNKNOWN, CONTROL, USER_DEFINED].contains(&ty));
    let unk = match g.metadata.get("tokenizer.ggml.unknown_token_id") {
        Some(_) => Some(g.int("tokenizer.ggml.unknown_token_id")?),
        None => types.iter().position(|&t| t == UNKNOWN),
    };
    let unk = unk
        .map(|id| {
            tokens
                .get(id)
                .copied()
                .ok_or_else(|| g.err("metadata", format!("unknown token id {id} is past the vocabulary")))
        })
        .transpose()?;
    let known: std::collections::HashSet<&str> = tokens.iter().copied().collect();
    let has_bytes = (0..=255u8).all(|b| known.contains(format!("<0x{b:02X}>").as_str()));
    if unk.is_none() && !has_bytes {
        let msg = "the vocabulary has neither the 256 `<0xNN>` byte tokens nor an unknown token: \
                   text outside it could not be tokenized";
        return Err(g.err("metadata", msg));
    }
    let replace =
        |from: &str, to: &str| serde_json::json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let mut normalizers = vec![replace(" ", "▁")];
    let mut decoders =
        vec![replace("▁", " "), serde_json::json!({"type": "ByteFallback"}), serde_json::json!({"type": "Fuse"})];
    if prefix {
        normalizers.insert(0, serde_json::json!({"type": "Prepend", "prepend": "▁"}));
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": bos_post_processor(g, &tokens, true, Some(SENTENCEPIECE_BOS))?,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab(&tokens), "merges": score_merges(&tokens, &types, &scores)},
    })
    .to_string())
}

/// SentencePiece BPE's merges from its scores: each normal token that splits into two normal
/// tokens gives one merge per split, ranked by the token's score (highest first; equal scores by
/// id). llama.cpp joins the neighbouring pair whose join scores highest, and since a pair's
/// pieces are what earlier joins left, the ranked merges reproduce its choices.
fn score_merges(tokens: &[&str], types: &[i128], scores: &[f32]) -> Vec<[String; 2]> {
    let normal: std::collections::HashSet<&str> =
        tokens.iter().zip(types).filter(|(_, &ty)| ty == NORMAL).map(|(t, _)| *t).collect();
    let mut order: Vec<usize> = (0..tokens.len()).filter(|&i| types[i] == NORMAL).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = vec![];
    for i in order {
        let t = tokens[i];
        for (k, _) in t.char_indices().skip(1) {
            let (left, right) = t.split_at(k);
            if normal.contains(left) && normal.contains(right) {
                merges.push([left.to_string(), right.to_string()]);
            }
        }
    }
    merges
}

/// `tokenizer.ggml.scores`, one per token (required).
fn token_scores(g: &Gguf, n: usize) -> Result<Vec<f32>, PolicyError> {
    per_token(g, "scores", "number", n, |v| if let Value::Float(x) = v { Some(*x as f32) } else { None })?
        .ok_or_else(|| g.err("metadata", format!("`tokenizer.ggml.scores` must be one number per token ({n})")))
}

/// The file's chat template (`tokenizer.chat_template`), if it has one.
pub fn chat_template(g: &Gguf) -> Option<String> {
    match g.metadata.get("tokenizer.chat_template") {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merges ranked by the joined token's score, one per split into two normal tokens: `bc`
    /// (-0.5) before `ab` (-1) before `abc` (-2, two splits), and nothing joins into or out of
    /// the control token.
    #[test]
    fn sentencepiece_merges_follow_the_scores() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc", "<s>", "s"];
        let types = [NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, CONTROL, NORMAL];
        let scores = [-3.0, -4.0, -5.0, -1.0, -0.5, -2.0, 0.0, -6.0];
        let merges = score_merges(&tokens, &types, &scores);
        let want = [["b", "c"], ["a", "b"], ["a", "bc"], ["ab", "c"]];
        assert_eq!(merges, want.map(|[l, r]| [l.to_string(), r.to_string()]));
    }

    #[test]
    fn the_byte_level_alphabet_has_256_symbols() {
        let n = (0..0x200u32).filter_map(char::from_u32).filter(|c| byte_level_spelling(&c.to_string())).count();
        assert_eq!(n, 256);
        assert!(byte_level_spelling("ĠHello<|im_end|>") && !byte_level_spelling("a b"));
    }

    /// The pieces `split` cuts `text` into (before the byte-level mapping).
    fn pieces(split: &str, text: &str) -> Vec<String> {
        pre_tokenized(isolated(split), text)
    }

    /// The pieces the tokenizer.json pre-tokenizer `pre` cuts `text` into, byte-level spaces and
    /// newlines (`Ġ`, `Ċ`) read back as themselves.
    fn pre_tokenized(pre: serde_json::Value, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper};
        let pre: PreTokenizerWrapper = serde_json::from_value(pre).unwrap();
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s).unwrap();
        let splits = s.get_splits(OffsetReferential::Original, OffsetType::Char);
        splits.into_iter().map(|(p, _, _)| p.replace('Ġ', " ").replace('Ċ', "\n")).collect()
    }

    /// DeepSeek Coder's split (its llama.cpp test vectors pass too, not vendored: the vocabulary
    /// is under DeepSeek's licence): newlines alone, letter and punctuation runs each with one
    /// space in front, single digits; a space before a digit or another space stands alone.
    #[test]
    fn deepseek_coder_split() {
        let pieces = pre_tokenized(Split::DeepseekCoder.pre_tokenizer(), "def f(x):\n  return x+12");
        let want = ["def", " f", "(", "x", "):", "\n", " ", " return", " x", "+", "1", "2"];
        assert_eq!(pieces, want);
    }

    /// GPT-4o's split (no llama.cpp test vectors here): case runs apart with the contraction kept
    /// on, a capitals run before its lower-case tail, digits in threes, a space left alone
    /// before digits, newline runs together; Tekken's without contractions, digit by digit.
    #[test]
    fn gpt4o_and_tekken_splits() {
        let text = "HelloWorld's CAPSLock 12345 naïve café\n\n  x";
        let want = ["Hello", "World's", " CAPSLock", " ", "123", "45", " naïve", " café", "\n\n", " ", " x"];
        assert_eq!(pieces(GPT4O_SPLIT, text), want);
        let want = ["Hello", "World", "'s", " CAPSLock", " ", "1", "2", "3", "4", "5"];
        assert_eq!(pieces(TEKKEN_SPLIT, "HelloWorld's CAPSLock 12345"), want);
    }
}
