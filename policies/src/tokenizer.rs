//! Tokenizers through the `tokenizers` crate: load any `tokenizer.json`, train a byte-level BPE,
//! or build a character-level vocabulary (nanoGPT's Shakespeare setup).
//!
//! Every tokenizer we make is a plain HF `tokenizer.json`, so it loads in Python unchanged.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::PolicyError;

/// The end-of-text token our trained tokenizers reserve (id 0).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// The padding token our trained tokenizers reserve (id 1), distinct from EOS so that a
/// response's EOS is never mistaken for padding.
pub const PAD_TOKEN: &str = "<|pad|>";

/// A tokenizer: the HF object, plus a strict fast path for character-level vocabularies.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// For character-level tokenizers: char → id, so encoding can reject unknown characters
    /// (HF's BPE without an unk token would silently drop them).
    chars: Option<HashMap<char, u32>>,
    source: String,
    /// The model's chat template (Jinja source), if it has one; saved beside `tokenizer.json`
    /// as `chat_template.jinja` (see [`crate::chat::ChatTemplate`]).
    pub chat_template: Option<String>,
    /// The token the tokenizer's post-processor puts before a text (Llama's BOS), which
    /// [`Tokenizer::encode_prompt`] adds as transformers' `tokenizer(text)` does.
    bos_prefix: Option<u32>,
    /// The model folder's `generation_config.json`, if it has one; saved beside `tokenizer.json`
    /// unchanged.
    pub generation: Option<GenerationConfig>,
}

/// A model folder's `generation_config.json`: the text, written back unchanged with the
/// tokenizer, and the ids its `eos_token_id` names — transformers' `generate` stops at those,
/// and an instruction model may list its end-of-turn token there beside the config's EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// The file's text.
    pub text: String,
    /// `eos_token_id` (one id or a list; empty when absent or `null`).
    pub eos_ids: Vec<u32>,
}

impl GenerationConfig {
    /// `dir/generation_config.json`, if there is one; malformed JSON or an `eos_token_id` that is
    /// not an id or a list of ids is an error naming the file and field.
    pub fn read(dir: &Path) -> Result<Option<Self>, PolicyError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::io(&path, e))?;
        let err = |field: &str, msg: String| PolicyError::tokenizer(path.display().to_string(), field, msg);
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err("json", e.to_string()))?;
        let id = |v: &serde_json::Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
        let bad = || err("eos_token_id", "must be a token id or a list of token ids".into());
        let eos_ids = match &json["eos_token_id"] {
            serde_json::Value::Null => vec![],
            serde_json::Value::Array(items) => items.iter().map(|v| id(v).ok_or_else(bad)).collect::<Result<_, _>>()?,
            v => vec![id(v).ok_or_else(bad)?],
        };
        Ok(Some(GenerationConfig { text, eos_ids }))
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// A tokenizer from `tokenizer.json` text (`source` names it in errors).
    pub fn from_json(text: &str, source: &str) -> Result<Self, PolicyError> {
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| PolicyError::tokenizer(source, "tokenizer.json", format!("cannot parse: {e}")))?;
        let mut tok = Self::wrap(inner, source);
        tok.chars = tok.char_vocab();
        tok.bos_prefix = tok.post_processor_prefix();
        Ok(tok)
    }

    /// `inner` with nothing else known yet (no template, BOS prefix or generation config).
    fn wrap(inner: tokenizers::Tokenizer, source: &str) -> Self {
        let source = source.to_string();
        Tokenizer { inner, chars: None, source, chat_template: None, bos_prefix: None, generation: None }
    }

    /// The id the post-processor adds in front of a single text (encoding with special tokens
    /// gives it, then the plain encoding), if it adds one.
    fn post_processor_prefix(&self) -> Option<u32> {
        let with = self.inner.encode("a", true).ok()?;
        let plain = self.inner.encode("a", false).ok()?;
        let (with, plain) = (with.get_ids(), plain.get_ids());
        (with.len() > plain.len() && with[1..].starts_with(plain)).then(|| with[0])
    }

    /// The id a prompt starts with, if the tokenizer's post-processor adds one (Llama's BOS).
    pub fn bos_prefix(&self) -> Option<u32> {
        self.bos_prefix
    }

    /// A prompt's ids: [`Tokenizer::encode`] with the tokenizer's BOS in front when its
    /// post-processor adds one (as transformers' `tokenizer(text)` does) and the text does not
    /// already start with it (a chat template with `bos_token` puts it in the text).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, PolicyError> {
        let mut ids = self.encode(text)?;
        if let Some(bos) = self.bos_prefix.filter(|b| ids.first() != Some(b)) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Trains a byte-level BPE (GPT-2 style) of `vocab_size` tokens on `texts`, reserving
    /// [`EOS_TOKEN`] (id 0) and [`PAD_TOKEN`] (id 1). All 256 byte symbols are in the initial
    /// alphabet, so any UTF-8 text encodes without unknown tokens.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize, min_frequency: u64) -> Result<Self, PolicyError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let specials = vec![AddedToken::from(EOS_TOKEN, true), AddedToken::from(PAD_TOKEN, true)];
        if vocab_size < 256 + specials.len() {
            return Err(PolicyError::Input(format!(
                "BPE vocab_size {vocab_size} is below the 258 bytes + special tokens"
            )));
        }
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        inner.with_post_processor(Some(ByteLevel::new(false, false, true)));
        let mut trainer: TrainerWrapper = trainer.into();
        inner.train(&mut trainer, texts).map_err(|e| PolicyError::tokenizer("<training>", "bpe", e.to_string()))?;
        Ok(Self::wrap(inner, "<trained BPE>"))
    }

    /// A byte-level tokenizer with no merges: the 256 byte symbols after [`EOS_TOKEN`] (id 0)
    /// and [`PAD_TOKEN`] (id 1). Encodes any text; the natural vocabulary of a fresh model.
    pub fn byte_level() -> Result<Self, PolicyError> {
        Self::train_bpe(std::iter::empty::<&str>(), 258, 2)
    }

    /// A character-level tokenizer over the characters of `text` (sorted), after
    /// [`EOS_TOKEN`] (id 0). Encoding a character outside it is an error.
    pub fn char_level(text: &str) -> Result<Self, PolicyError> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        let mut vocab = serde_json::Map::new();
        vocab.insert(EOS_TOKEN.into(), 0.into());
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), (i + 1).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": EOS_TOKEN, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| PolicyError::tokenizer("<char-level>", "model", e.to_string()))?;
        let mut tok = Self::wrap(inner, "<char-level>");
        tok.chars = tok.char_vocab();
        Ok(tok)
    }

    /// If this is a character-level vocabulary (BPE, no merges, no pre-tokenizer, every
    /// non-special token one character), its char → id map.
    fn char_vocab(&self) -> Option<HashMap<char, u32>> {
        let json: serde_json::Value = serde_json::from_str(&self.inner.to_string(false).ok()?).ok()?;
        let model = json.get("model")?;
        let no_merges = model.get("merges")?.as_array()?.is_empty();
        if model.get("type")?.as_str()? != "BPE" || !no_merges || !json.get("pre_tokenizer")?.is_null() {
            return None;
        }
        let mut map = HashMap::new();
        for (tok, id) in model.get("vocab")?.as_object()? {
            let mut it = tok.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => {
                    map.insert(c, id.as_u64()? as u32);
                }
                _ if self.inner.get_added_vocabulary().is_special_token(tok) => {}
                _ => return None,
            }
        }
        Some(map)
    }

    /// Token ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PolicyError> {
        if let Some(chars) = &self.chars {
            return text
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    chars.get(&c).copied().ok_or_else(|| {
                        PolicyError::Input(format!(
                            "character {c:?} at offset {i} is not in the character vocabulary of {}",
                            self.source
                        ))
                    })
                })
                .collect();
        }
        let enc = self.inner.encode(text, false).map_err(|e| PolicyError::Input(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept, so an EOS shows).
    pub fn decode(&self, ids: &[u32]) -> Result<String, PolicyError> {
        self.inner.decode(ids, false).map_err(|e| PolicyError::Input(format!("decoding failed: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `other` maps the same token strings to the same ids (added tokens included):
    /// then one model can read the other's token ids.
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The EOS id, if the vocabulary has `<|endoftext|>`, `</s>`, `<|im_end|>` or `<eos>`.
    pub fn eos_id(&self) -> Option<u32> {
        [EOS_TOKEN, "</s>", "<|im_end|>", "<eos>"].iter().find_map(|t| self.token_to_id(t))
    }

    /// The end-of-sequence id for a model with `config`: the config's `eos_token_id` (what HF
    /// generation stops at: `<|im_end|>` for chat models whose vocabulary also has
    /// `<|endoftext|>`), else [`Tokenizer::eos_id`].
    pub fn eos_for(&self, config: &crate::config::ModelConfig) -> Option<u32> {
        config.eos_token_id().or(self.eos_id())
    }

    /// Every id that ends a generation: all the config's EOS ids (Llama 3 lists each token that
    /// ends a turn), then those of `generation_config.json` not among them (as transformers'
    /// `generate`), else the tokenizer's EOS.
    pub fn eos_ids_for(&self, config: &crate::config::ModelConfig) -> Vec<u32> {
        let mut ids = config.eos_token_ids();
        for &id in self.generation.iter().flat_map(|g| &g.eos_ids) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            self.eos_id().into_iter().collect()
        } else {
            ids
        }
    }

    /// The pad id, if the vocabulary has `<|pad|>` or `<pad>`.
    pub fn pad_id(&self) -> Option<u32> {
        [PAD_TOKEN, "<pad>"].iter().find_map(|t| self.token_to_id(t))
    }

    /// Writes `tokenizer.json` (atomically), with the chat template and generation config beside it.
    pub fn save(&self, path: &Path) -> Result<(), PolicyError> {
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| PolicyError::tokenizer(path.display().to_string(), "tokenizer.json", e.to_string()))?;
        crate::checkpoint::write_atomic(path, text.as_bytes())?;
        if let Some(t) = &self.chat_template {
            crate::checkpoint::write_atomic(&path.with_file_name("chat_template.jinja"), t.as_bytes())?;
        }
        if let Some(g) = &self.generation {
            crate::checkpoint::write_atomic(&path.with_file_name("generation_config.json"), g.text.as_bytes())?;
        }
        Ok(())
    }
}
