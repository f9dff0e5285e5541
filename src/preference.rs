//! Preference data: JSONL records of human choices between responses, in the layouts users
//! bring — `{prompt, chosen, rejected}` pairs, hh-rlhf's full conversations and K-way rankings,
//! read into one [`Comparison`] type (responses ranked best first) — and KTO's unpaired
//! `{prompt, completion, label}` examples, read into [`Labelled`]; TRL's conversational
//! layouts of both (message lists) are rendered with the model's chat template. Comparisons
//! become tokens ([`TokComparison`]) with [`tokenize_with`], for the reward model and DPO alike.

use std::path::Path;

use anyhow::{bail, Result};
use rlhf_policies::chat::{ChatMessage, ChatTemplate};
use rlhf_policies::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::data::{read_jsonl, JsonRecord};
use crate::prompt_format::{conversation_template, split_reply, PromptFormat};

/// How the records of a preference file are laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PreferenceFormat {
    /// `{prompt, chosen, rejected}`, with an optional numeric margin field (the `m` of
    /// `−log σ(r_c − r_r − m)`).
    Pairs {
        /// Default `prompt`.
        #[serde(default = "default_prompt")]
        prompt_field: String,
        /// Default `chosen`.
        #[serde(default = "default_chosen")]
        chosen_field: String,
        /// Default `rejected`.
        #[serde(default = "default_rejected")]
        rejected_field: String,
        /// Default: none.
        #[serde(default)]
        margin_field: Option<String>,
    },
    /// Anthropic hh-rlhf: `{chosen, rejected}` whole conversations that share everything up
    /// to the last assistant turn. The prompt is the longest common prefix cut after its last
    /// `separator`; the rest of each conversation is its response.
    Conversations {
        /// Default `chosen`.
        #[serde(default = "default_chosen")]
        chosen_field: String,
        /// Default `rejected`.
        #[serde(default = "default_rejected")]
        rejected_field: String,
        /// Default `"\n\nAssistant:"`.
        #[serde(default = "default_separator")]
        separator: String,
    },
    /// `{prompt, responses}` with the responses ranked best first (K ≥ 2): every one of the
    /// C(K,2) pairs is a comparison, and all of them together weigh as one batch element
    /// (InstructGPT).
    Ranking {
        /// Default `prompt`.
        #[serde(default = "default_prompt")]
        prompt_field: String,
        /// Default `responses`.
        #[serde(default = "default_responses")]
        responses_field: String,
    },
    /// TRL's conversational pairs: `{chosen, rejected}` lists of `{role, content}` messages
    /// that share every message but their last, the assistant's responses (UltraFeedback's
    /// layout) — or, with `prompt_field`, a prompt list and one assistant message in each of
    /// `chosen` and `rejected`. The prompt turns are rendered with the model's chat template up
    /// to the assistant's turn (`prompt_template` and `chat` then do not apply).
    Messages {
        /// Default: none (the prompt is the conversations' shared messages).
        #[serde(default)]
        prompt_field: Option<String>,
        /// Default `chosen`.
        #[serde(default = "default_chosen")]
        chosen_field: String,
        /// Default `rejected`.
        #[serde(default = "default_rejected")]
        rejected_field: String,
    },
    /// `{prompt, completion, label}` with a boolean label (`true` = desirable): KTO's unpaired
    /// data. It holds no comparisons, so only the KTO loss trains on it.
    Unpaired {
        /// Default `prompt`.
        #[serde(default = "default_prompt")]
        prompt_field: String,
        /// Default `completion`.
        #[serde(default = "default_completion")]
        completion_field: String,
        /// Default `label`.
        #[serde(default = "default_label")]
        label_field: String,
    },
    /// TRL's conversational unpaired data (kto-mix's layout): `{prompt, completion, label}`
    /// with `prompt` a list of `{role, content}` messages and `completion` a list holding one
    /// assistant message. The prompt is rendered with the model's chat template up to the
    /// assistant's turn (`prompt_template` and `chat` then do not apply). Only KTO trains on
    /// it.
    UnpairedMessages {
        /// Default `prompt`.
        #[serde(default = "default_prompt")]
        prompt_field: String,
        /// Default `completion`.
        #[serde(default = "default_completion")]
        completion_field: String,
        /// Default `label`.
        #[serde(default = "default_label")]
        label_field: String,
    },
}

fn default_prompt() -> String {
    "prompt".into()
}
fn default_chosen() -> String {
    "chosen".into()
}
fn default_rejected() -> String {
    "rejected".into()
}
fn default_responses() -> String {
    "responses".into()
}
fn default_completion() -> String {
    "completion".into()
}
fn default_label() -> String {
    "label".into()
}
fn default_separator() -> String {
    "\n\nAssistant:".into()
}

impl Default for PreferenceFormat {
    fn default() -> Self {
        PreferenceFormat::Pairs {
            prompt_field: default_prompt(),
            chosen_field: default_chosen(),
            rejected_field: default_rejected(),
            margin_field: None,
        }
    }
}

/// One prompt with its responses ranked best first (two for a chosen/rejected pair).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// 1-based line of the record in its file.
    pub line: usize,
    /// The prompt text.
    pub prompt: String,
    /// Whether `prompt` is already chat-template text (a conversation's), which the stage's
    /// prompt format leaves as it is ([`PromptFormat::input`]).
    pub rendered: bool,
    /// Responses, best first.
    pub responses: Vec<String>,
    /// Margin of a pair (`m`), if the data has one.
    pub margin: Option<f32>,
}

impl Comparison {
    /// Every (better, worse) index pair: `(i, j)` for `i < j`.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let k = self.responses.len();
        (0..k).flat_map(|i| (i + 1..k).map(move |j| (i, j))).collect()
    }
}

/// The chat template `format` renders its prompts with: the model's, for `messages` and
/// `unpaired_messages` ([`conversation_template`]); none otherwise.
pub fn chat_for(format: &PreferenceFormat, prompt: &PromptFormat) -> Result<Option<ChatTemplate>> {
    let messages = matches!(format, PreferenceFormat::Messages { .. } | PreferenceFormat::UnpairedMessages { .. });
    conversation_template(messages, prompt)
}

/// Reads `path` (JSONL, optionally `.gz`) as comparisons in `format` (`chat`: the template of
/// [`chat_for`]). Every malformed record is an error naming the file, the line and the field.
pub fn read_comparisons(
    path: &Path,
    format: &PreferenceFormat,
    chat: Option<&ChatTemplate>,
) -> Result<Vec<Comparison>> {
    if let PreferenceFormat::Unpaired { .. } | PreferenceFormat::UnpairedMessages { .. } = format {
        bail!(
            "{}: unpaired {{prompt, completion, label}} examples hold no comparisons; only the KTO loss \
             (`rlhf dpo --loss kto`) trains on them",
            path.display()
        );
    }
    read_jsonl(path)?.iter().map(|r| comparison(r, format, chat)).collect()
}

/// One unpaired example: a completion of a prompt labelled desirable or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// 1-based line of the record in its file.
    pub line: usize,
    /// The prompt text.
    pub prompt: String,
    /// Whether `prompt` is already chat-template text (a conversation's).
    pub rendered: bool,
    /// The completion text.
    pub completion: String,
    /// `true` = desirable.
    pub desirable: bool,
}

/// Reads `path` as labelled examples: unpaired records as they are, and pairs (or hh-rlhf
/// conversations) unpaired as TRL's `unpair_preference_dataset` does — the chosen response
/// desirable, the rejected one not. Rankings are an error: their middle responses have no
/// label.
pub fn read_labelled(path: &Path, format: &PreferenceFormat, chat: Option<&ChatTemplate>) -> Result<Vec<Labelled>> {
    match format {
        PreferenceFormat::Unpaired { prompt_field, completion_field, label_field } => read_jsonl(path)?
            .iter()
            .map(|r| {
                Ok(Labelled {
                    line: r.line,
                    prompt: r.str(prompt_field)?,
                    rendered: false,
                    completion: r.str(completion_field)?,
                    desirable: r.bool(label_field)?,
                })
            })
            .collect(),
        PreferenceFormat::UnpairedMessages { prompt_field, completion_field, label_field } => {
            let chat = chat.expect("chat_for gives messages a template");
            read_jsonl(path)?
                .iter()
                .map(|r| {
                    let completion = match split_reply(r.parse(completion_field)?) {
                        Some((before, reply)) if before.is_empty() => reply,
                        _ => return Err(r.error(format!("field `{completion_field}` must hold one assistant message"))),
                    };
                    let prompt: Vec<ChatMessage> = r.parse(prompt_field)?;
                    let prompt = chat.render(&prompt, true).map_err(|e| r.error(e))?;
                    Ok(Labelled { line: r.line, prompt, rendered: true, completion, desirable: r.bool(label_field)? })
                })
                .collect()
        }
        PreferenceFormat::Ranking { .. } => bail!(
            "{}: rankings cannot be unpaired into desirable / undesirable examples for KTO (the middle \
             responses have no label); use pairs, conversations or unpaired records",
            path.display()
        ),
        _ => Ok(read_comparisons(path, format, chat)?
            .into_iter()
            .flat_map(|c| {
                let [chosen, rejected]: [String; 2] = c.responses.try_into().expect("pairs hold two responses");
                [(chosen, true), (rejected, false)].map(|(completion, desirable)| Labelled {
                    line: c.line,
                    prompt: c.prompt.clone(),
                    rendered: c.rendered,
                    completion,
                    desirable,
                })
            })
            .collect()),
    }
}

fn comparison(r: &JsonRecord<'_>, format: &PreferenceFormat, chat: Option<&ChatTemplate>) -> Result<Comparison> {
    Ok(match format {
        PreferenceFormat::Messages { prompt_field, chosen_field, rejected_field } => {
            let chat = chat.expect("chat_for gives messages a template");
            let (prompt, responses) = conversation_pair(r, prompt_field.as_deref(), (chosen_field, rejected_field))?;
            let prompt = chat.render(&prompt, true).map_err(|e| r.error(e))?;
            Comparison { line: r.line, prompt, rendered: true, responses, margin: None }
        }
        PreferenceFormat::Pairs { prompt_field, chosen_field, rejected_field, margin_field } => Comparison {
            line: r.line,
            prompt: r.str(prompt_field)?,
            rendered: false,
            responses: vec![r.str(chosen_field)?, r.str(rejected_field)?],
            margin: margin_field.as_deref().map(|f| r.f32(f)).transpose()?,
        },
        PreferenceFormat::Conversations { chosen_field, rejected_field, separator } => {
            let (chosen, rejected) = (r.str(chosen_field)?, r.str(rejected_field)?);
            let (prompt, c, j) = split_conversations(&chosen, &rejected, separator).ok_or_else(|| {
                r.error(format!(
                    "`{chosen_field}` and `{rejected_field}` share no prefix ending in {separator:?}, so the \
                     prompt cannot be split off (the conversations differ before the last assistant turn)"
                ))
            })?;
            Comparison { line: r.line, prompt, rendered: false, responses: vec![c, j], margin: None }
        }
        PreferenceFormat::Ranking { prompt_field, responses_field } => {
            let responses = r.str_array(responses_field)?;
            if responses.len() < 2 {
                return Err(r.error(format!("field `{responses_field}` needs at least 2 ranked responses")));
            }
            Comparison { line: r.line, prompt: r.str(prompt_field)?, rendered: false, responses, margin: None }
        }
        PreferenceFormat::Unpaired { .. } | PreferenceFormat::UnpairedMessages { .. } => {
            unreachable!("read_comparisons rejects unpaired data first")
        }
    })
}

/// A conversational pair's prompt messages and its two responses' texts (see
/// [`PreferenceFormat::Messages`]).
fn conversation_pair(
    r: &JsonRecord<'_>,
    prompt_field: Option<&str>,
    (chosen_field, rejected_field): (&str, &str),
) -> Result<(Vec<ChatMessage>, Vec<String>)> {
    let reply = |f: &str| {
        split_reply(r.parse(f)?).ok_or_else(|| r.error(format!("field `{f}` must end with an assistant message")))
    };
    let ((chosen, c), (rejected, j)) = (reply(chosen_field)?, reply(rejected_field)?);
    let responses = vec![c, j];
    let prompt = match prompt_field {
        Some(p) if chosen.is_empty() && rejected.is_empty() => r.parse(p)?,
        Some(p) => {
            return Err(r.error(format!(
                "with `{p}` given, `{chosen_field}` and `{rejected_field}` hold one assistant message each"
            )))
        }
        None if chosen == rejected && !chosen.is_empty() => chosen,
        None => {
            return Err(r.error(format!(
                "`{chosen_field}` and `{rejected_field}` must share every message but their last (the prompt)"
            )))
        }
    };
    Ok((prompt, responses))
}

/// Splits two conversations into `(prompt, chosen response, rejected response)` at the last
/// `separator` inside their longest common prefix; `None` if that prefix holds no separator.
pub fn split_conversations(chosen: &str, rejected: &str, separator: &str) -> Option<(String, String, String)> {
    let common = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map_or_else(|| chosen.len().min(rejected.len()), |((i, _), _)| i);
    let cut = chosen[..common].rfind(separator)? + separator.len();
    Some((chosen[..cut].to_string(), chosen[cut..].to_string(), rejected[cut..].to_string()))
}

/// What to do with a comparison whose longest sequence exceeds `max_len` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardTruncation {
    /// Leave it out (counted and reported).
    #[default]
    Skip,
    /// Drop prompt tokens from the start (keeping the latest turns) until every response fits;
    /// a comparison whose response alone is too long is still skipped and counted.
    TruncatePrompt,
    /// Stop with an error naming the record.
    Error,
}

/// A comparison in tokens: each sequence is `prompt_ids ⧺ responses[k]` (responses end in EOS).
#[derive(Debug, Clone, PartialEq)]
pub struct TokComparison {
    /// Line of the record.
    pub line: usize,
    /// Prompt tokens.
    pub prompt_ids: Vec<u32>,
    /// Response tokens (with EOS), best first.
    pub responses: Vec<Vec<u32>>,
    /// Margin, if any.
    pub margin: Option<f32>,
}

impl TokComparison {
    /// Every `prompt_ids ⧺ response`, best first.
    pub fn sequences(&self) -> impl Iterator<Item = Vec<u32>> + '_ {
        self.responses.iter().map(|r| [self.prompt_ids.as_slice(), r].concat())
    }
}

/// How comparisons become tokens: `template(prompt) ⧺ response ⧺ EOS`, at most `max_len`.
#[derive(Debug, Clone, Copy)]
pub struct TokenizeSpec<'a> {
    /// Prompt template and chat template, if any.
    pub prompt: &'a PromptFormat,
    /// Longest sequence.
    pub max_len: usize,
    /// What to do with longer ones.
    pub truncation: RewardTruncation,
    /// The data file (for errors).
    pub data: &'a std::path::Path,
}

/// Tokenizes comparisons; returns them with the (skipped, truncated) counts.
pub fn tokenize_with(
    spec: TokenizeSpec<'_>,
    tok: &Tokenizer,
    eos: u32,
    comparisons: &[Comparison],
) -> Result<(Vec<TokComparison>, usize, usize)> {
    let (mut out, mut skipped, mut truncated) = (Vec::new(), 0, 0);
    for c in comparisons {
        let mut prompt_ids = tok.encode_prompt(&spec.prompt.input(&c.prompt, c.rendered)?)?;
        let responses: Vec<Vec<u32>> = c
            .responses
            .iter()
            .map(|r| Ok([tok.encode(spec.prompt.response(r))?, vec![eos]].concat()))
            .collect::<Result<_>>()?;
        let longest = responses.iter().map(Vec::len).max().unwrap_or(0);
        if prompt_ids.len() + longest > spec.max_len {
            let too_long = || {
                anyhow::anyhow!(
                    "{}: line {}: {} tokens exceed max_len {}",
                    spec.data.display(),
                    c.line,
                    prompt_ids.len() + longest,
                    spec.max_len
                )
            };
            match spec.truncation {
                RewardTruncation::Error => return Err(too_long()),
                RewardTruncation::TruncatePrompt if longest < spec.max_len => {
                    prompt_ids.drain(..prompt_ids.len() + longest - spec.max_len);
                    truncated += 1;
                }
                _ => {
                    skipped += 1;
                    continue;
                }
            }
        }
        out.push(TokComparison { line: c.line, prompt_ids, responses, margin: c.margin });
    }
    Ok((out, skipped, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_split_at_the_last_shared_assistant_turn() {
        let c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, here.";
        let r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No.";
        let (p, rc, rr) = split_conversations(c, r, "\n\nAssistant:").unwrap();
        assert_eq!(p, "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:");
        assert_eq!((rc.as_str(), rr.as_str()), (" Sure, here.", " No."));
        // responses sharing their first words still split at the turn, not inside the answer
        let (p, rc, rr) = split_conversations(
            "\n\nHuman: q\n\nAssistant: I am A",
            "\n\nHuman: q\n\nAssistant: I am B",
            "\n\nAssistant:",
        )
        .unwrap();
        assert_eq!((p.as_str(), rc.as_str(), rr.as_str()), ("\n\nHuman: q\n\nAssistant:", " I am A", " I am B"));
        // multi-byte characters at the point of difference
        assert!(split_conversations("\n\nAssistant: é", "\n\nAssistant: è", "\n\nAssistant:").is_some());
        // conversations that differ before any assistant turn cannot be split
        assert_eq!(
            split_conversations("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x", "\n\nAssistant:"),
            None
        );
    }

    #[test]
    fn rankings_give_all_ordered_pairs() {
        let c = Comparison {
            line: 1,
            prompt: "p".into(),
            rendered: false,
            responses: vec!["a".into(), "b".into(), "c".into()],
            margin: None,
        };
        assert_eq!(c.pairs(), vec![(0, 1), (0, 2), (1, 2)]);
    }
}
