//! The prompts of the online trainers (PPO, NLPO and the critic-free ones) and of `rlhf
//! generate`: read from JSONL (text or conversations, through the prompt template), each with
//! its reference answer when the reward wants one; too-long prompts skipped and counted.

use anyhow::{bail, Result};
use rlhf_envs::{EnvError, PromptSource};
use rlhf_policies::Tokenizer;

use crate::data::read_jsonl;
use crate::prompt_format::PromptFormat;

/// A `samples.jsonl` row with prompt `index`'s reference answer added, when it has one.
pub fn with_reference(mut row: serde_json::Value, prompts: &PromptSource, index: usize) -> serde_json::Value {
    if let Some(r) = prompts.reference(index) {
        row["reference"] = r.into();
    }
    row
}

/// Tokenized prompts as `(ids, text)`, and each one's reference answer when the prompt data
/// names a `reference_field`.
#[derive(Debug, Clone, Default)]
pub struct Prompts {
    /// `(ids, text)` per prompt.
    pub prompts: Vec<(Vec<u32>, String)>,
    /// One reference answer per prompt, or none at all.
    pub references: Option<Vec<String>>,
}

impl Prompts {
    /// The env's seeded prompt sampler over them.
    pub fn source(self, seed: u64) -> Result<PromptSource, EnvError> {
        let source = PromptSource::new(self.prompts, seed)?;
        match self.references {
            Some(r) => source.with_references(r),
            None => Ok(source),
        }
    }
}

impl From<Vec<(Vec<u32>, String)>> for Prompts {
    fn from(prompts: Vec<(Vec<u32>, String)>) -> Self {
        Prompts { prompts, references: None }
    }
}

/// Checks that the longest of the prompts (token ids) plus `max_new_tokens` fits a policy
/// with learned positions (GPT-2's `n_positions`): a rollout would otherwise fail at the first
/// long prompt, and the scoring pass runs over prompt and response together.
pub fn check_fits<'a>(
    prompts: impl IntoIterator<Item = &'a [u32]>,
    max_new_tokens: usize,
    dims: &rlhf_policies::Dims,
) -> Result<()> {
    let longest = prompts.into_iter().map(<[u32]>::len).max().unwrap_or(0);
    if let Some(limit) = dims.position_limit().filter(|&l| longest + max_new_tokens > l) {
        bail!(
            "the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the policy's \
             {limit} positions ({}); shorten the prompts (max_prompt_len) or lower max_new_tokens",
            dims.position_limit_field()
        );
    }
    Ok(())
}

/// Where the prompts are and how they are read.
#[derive(Debug, Clone, Copy)]
pub struct PromptSpec<'a> {
    /// JSONL file.
    pub path: &'a std::path::Path,
    /// Field holding the prompt.
    pub field: &'a str,
    /// Field holding the reference answer, if the reward wants one.
    pub reference_field: Option<&'a str>,
    /// Template, and chat template, if any.
    pub format: &'a PromptFormat,
    /// Longer prompts (in tokens) are skipped and counted.
    pub max_len: usize,
}

/// Tokenized prompts and the number skipped as too long (`stage` names the messages).
pub fn read_prompts(spec: PromptSpec<'_>, tok: &Tokenizer, stage: &str) -> Result<(Prompts, usize)> {
    let (mut out, mut references, mut skipped) = (vec![], vec![], 0);
    for r in read_jsonl(spec.path)? {
        // a prompt is text, or a conversation (TRL's conversational prompts) for the chat template
        let text = match r.obj.get(spec.field) {
            Some(serde_json::Value::Array(_)) => {
                let messages: Vec<rlhf_policies::chat::ChatMessage> = r.parse(spec.field)?;
                spec.format.apply_messages(&messages).map_err(|e| r.error(format!("field `{}`: {e}", spec.field)))?
            }
            _ => spec.format.apply(&r.str(spec.field)?)?,
        };
        let reference = spec.reference_field.map(|f| r.str(f)).transpose()?;
        let ids = tok.encode_prompt(&text)?;
        if ids.is_empty() {
            return Err(r.error("the prompt encodes to no tokens"));
        }
        if ids.len() > spec.max_len {
            skipped += 1;
            continue;
        }
        out.push((ids, text));
        references.extend(reference);
    }
    if skipped > 0 {
        eprintln!("{stage}: {skipped} prompts longer than max_prompt_len {} skipped", spec.max_len);
    }
    if out.is_empty() {
        bail!("{}: no prompts left ({skipped} longer than max_prompt_len)", spec.path.display());
    }
    let references = spec.reference_field.is_some().then_some(references);
    Ok((Prompts { prompts: out, references }, skipped))
}
