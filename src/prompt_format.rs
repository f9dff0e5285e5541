//! How a record's prompt becomes the model's input text: the stage's `prompt_template`
//! (`{prompt}` replaced), then, when the stage's config has `chat`, the model's own chat
//! template around it (the templated prompt as the user turn, the assistant's turn opened, as
//! `rlhf generate --chat` does). A prompt that is a whole conversation (hh-rlhf's
//! `\n\nHuman: … \n\nAssistant: …` transcripts) can be laid out turn by turn instead; a
//! prompt given as a list of messages always takes the model's chat template. With a
//! chat template, responses lose their leading white space (the template's assistant header
//! already separates them); then comes the EOS token (for a chat model, its end of turn).

use std::path::Path;

use anyhow::{bail, Result};
use rlhf_policies::chat::{ChatMessage, ChatTemplate};
use rlhf_policies::{ModelConfig, Tokenizer};
use serde::{Deserialize, Serialize};

/// A stage's `chat` setting: prompts in the model's chat template (its tokenizer's
/// `chat_template`: a GGUF file's own, `chat_template.jinja` or `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatPrompt {
    /// A system message. Default: none (the template's own default, if it has one).
    pub system: Option<String>,
    /// Present: the prompt is a conversation transcript, laid out as user and assistant turns
    /// (it must end with an open assistant turn). Default: none (the prompt is one user turn).
    pub transcript: Option<Transcript>,
    /// Further variables for the chat template, as TRL's `chat_template_kwargs`: e.g.
    /// `{"enable_thinking": false}` for Qwen3's answers without a reasoning block. Default:
    /// none. Conversational data takes them too.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// The turn markers of a conversation transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Transcript {
    /// Starts a user turn. Default `"\n\nHuman:"` (hh-rlhf).
    pub user: String,
    /// Starts an assistant turn. Default `"\n\nAssistant:"`.
    pub assistant: String,
}

impl Default for Transcript {
    fn default() -> Self {
        Transcript { user: "\n\nHuman:".into(), assistant: "\n\nAssistant:".into() }
    }
}

impl Transcript {
    /// The turns of `text` (each trimmed), without the final open assistant turn; an error if
    /// text comes before the first marker or the transcript does not end with an open
    /// assistant turn.
    pub fn messages(&self, text: &str) -> Result<Vec<ChatMessage>> {
        let mut marks: Vec<(usize, &str, usize)> = [(&self.user, "user"), (&self.assistant, "assistant")]
            .iter()
            .flat_map(|(m, role)| text.match_indices(m.as_str()).map(move |(at, _)| (at, *role, m.len())))
            .collect();
        marks.sort_by_key(|m| m.0);
        let head = &text[..marks.first().map_or(text.len(), |m| m.0)];
        if marks.is_empty() || !head.trim().is_empty() {
            bail!("the prompt is not a transcript: it does not start with {:?} or {:?}", self.user, self.assistant);
        }
        let mut messages: Vec<ChatMessage> = marks
            .iter()
            .enumerate()
            .map(|(i, &(at, role, len))| {
                let end = marks.get(i + 1).map_or(text.len(), |m| m.0);
                ChatMessage { role: role.into(), content: text[at + len..end].trim().to_string() }
            })
            .collect();
        match messages.pop() {
            Some(last) if last.role == "assistant" && last.content.is_empty() => Ok(messages),
            _ => bail!("the transcript does not end with an open assistant turn ({:?})", self.assistant),
        }
    }
}

/// The model's chat template for records that are conversations (`conversations`), from
/// `format` (which loaded it, with `chat`'s `template_kwargs`): they are rendered with it as
/// they are, so `prompt_template` must be `{prompt}` and `chat` hold no system message or
/// transcript; their prompts then pass the prompt format untouched ([`PromptFormat::input`]).
/// `None` for text records.
pub fn conversation_template(conversations: bool, format: &PromptFormat) -> Result<Option<ChatTemplate>> {
    if !conversations {
        return Ok(None);
    }
    let laid_out = format.chat.as_ref().is_some_and(|c| c.system.is_some() || c.transcript.is_some());
    if laid_out || format.template != "{prompt}" {
        bail!(
            "conversations are rendered with the model's chat template as they are: leave out prompt_template, \
             and chat's system and transcript (its template_kwargs apply)"
        );
    }
    format.chat_template.clone().map(Some).map_err(anyhow::Error::msg)
}

/// A conversation split into the messages before its reply and the reply's text (leading
/// white space trimmed, as a response under a chat template is); `None` unless it ends with
/// an assistant message.
pub fn split_reply(mut messages: Vec<ChatMessage>) -> Option<(Vec<ChatMessage>, String)> {
    let reply = messages.pop().filter(|m| m.role == "assistant")?;
    Some((messages, reply.content.trim_start().to_string()))
}

/// A prompt template, and the chat template it is wrapped in, if any.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    template: String,
    /// The stage's `chat` setting: text prompts go into the chat template.
    chat: Option<ChatPrompt>,
    /// The model's chat template, or why it has none (an error when `chat` is set, or when a
    /// conversation comes).
    chat_template: Result<ChatTemplate, String>,
}

impl PromptFormat {
    /// `template` alone.
    pub fn plain(template: &str) -> Self {
        PromptFormat { template: template.to_string(), chat: None, chat_template: Err("no model was given".into()) }
    }

    /// `template`, inside the chat template of the model at `model` (its tokenizer `tok` and
    /// config) when `chat` is set; an error naming `model` if it has no chat template.
    pub fn new(
        template: &str,
        chat: Option<&ChatPrompt>,
        tok: &Tokenizer,
        config: &ModelConfig,
        model: &Path,
    ) -> Result<Self> {
        anyhow::ensure!(
            template.contains("{prompt}"),
            "prompt template {template:?} has no {{prompt}}: every record's prompt would be left out"
        );
        let kwargs = chat.map(|c| c.template_kwargs.clone()).unwrap_or_default();
        let chat_template =
            ChatTemplate::of_model(tok, config, model).and_then(|t| t.with_kwargs(kwargs)).map_err(|e| e.to_string());
        if let (Some(_), Err(e)) = (chat, &chat_template) {
            bail!("{e}");
        }
        Ok(PromptFormat { template: template.to_string(), chat: chat.cloned(), chat_template })
    }

    /// The input text for `prompt`.
    pub fn apply(&self, prompt: &str) -> Result<String> {
        let text = self.template.replace("{prompt}", prompt);
        let (Some(c), Ok(chat)) = (&self.chat, &self.chat_template) else { return Ok(text) };
        let Some(transcript) = &c.transcript else { return Ok(chat.user_prompt(c.system.as_deref(), &text)?) };
        let system = c.system.iter().map(|s| ChatMessage { role: "system".into(), content: s.clone() });
        let messages: Vec<ChatMessage> = system.chain(transcript.messages(&text)?).collect();
        Ok(chat.render(&messages, true)?)
    }

    /// The input text for a record's prompt: [`PromptFormat::apply`], or the prompt as it is when
    /// it was `rendered` from a conversation with the chat template already.
    pub fn input(&self, prompt: &str, rendered: bool) -> Result<String> {
        if rendered {
            Ok(prompt.to_string())
        } else {
            self.apply(prompt)
        }
    }

    /// The input text for a conversation (TRL's conversational prompt): its messages, after
    /// `chat`'s system message (if set) when it has none of its own, rendered with the model's
    /// chat template up to the assistant's turn, as TRL renders conversational prompts, with or
    /// without `chat`. Needs the plain `{prompt}` template (a conversation is not text to put
    /// in one).
    pub fn apply_messages(&self, messages: &[ChatMessage]) -> Result<String> {
        let chat = match &self.chat_template {
            Ok(chat) => chat,
            Err(e) => bail!("a conversation is rendered with the model's chat template, but {e}"),
        };
        let configured_system = self.chat.as_ref().and_then(|c| c.system.as_ref());
        if self.template != "{prompt}" {
            bail!("a conversation cannot go into prompt_template {:?}; leave it at {{prompt}}", self.template);
        }
        let own_system = messages.first().is_some_and(|m| m.role == "system");
        let system = configured_system
            .filter(|_| !own_system)
            .map(|s| ChatMessage { role: "system".into(), content: s.clone() });
        let all: Vec<ChatMessage> = system.into_iter().chain(messages.iter().cloned()).collect();
        Ok(chat.render(&all, true)?)
    }

    /// A response's text as the model sees it after the prompt: without leading white space
    /// under a chat template, as it is otherwise.
    pub fn response<'r>(&self, response: &'r str) -> &'r str {
        if self.chat.is_some() {
            response.trim_start()
        } else {
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_then_chat() {
        assert_eq!(PromptFormat::plain("Q: {prompt}\nA:").apply("2+2?").unwrap(), "Q: 2+2?\nA:");
        let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}\
                      {% if add_generation_prompt %}<assistant>{% endif %}";
        let chat = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let f = PromptFormat {
            template: "Q: {prompt}".into(),
            chat: Some(ChatPrompt::default()),
            chat_template: Ok(chat.clone()),
        };
        assert_eq!(f.apply("2+2?").unwrap(), "<user>Q: 2+2?</s><assistant>");
        assert_eq!(f.response(" 4."), "4.");
        assert_eq!(PromptFormat::plain("{prompt}").response(" 4."), " 4.");
        let brief = ChatPrompt { system: Some("Be brief.".into()), ..Default::default() };
        let f =
            PromptFormat { template: "{prompt}".into(), chat: Some(brief.clone()), chat_template: Ok(chat.clone()) };
        assert_eq!(f.apply("hi").unwrap(), "<system>Be brief.</s><user>hi</s><assistant>");
        // a conversation: the configured system message unless it brings its own
        let m = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
        assert_eq!(f.apply_messages(&[m("user", "hi")]).unwrap(), "<system>Be brief.</s><user>hi</s><assistant>");
        assert_eq!(
            f.apply_messages(&[m("system", "Be kind."), m("user", "hi")]).unwrap(),
            "<system>Be kind.</s><user>hi</s><assistant>"
        );
        let templated =
            PromptFormat { template: "Q: {prompt}".into(), chat: Some(brief.clone()), chat_template: Ok(chat.clone()) };
        assert!(templated.apply_messages(&[m("user", "hi")]).unwrap_err().to_string().contains("prompt_template"));
        assert!(PromptFormat::plain("{prompt}").apply_messages(&[m("user", "hi")]).is_err());
        // without `chat`: text stays text, a conversation takes the model's template as it is
        let no_chat = PromptFormat { template: "{prompt}".into(), chat: None, chat_template: Ok(chat.clone()) };
        assert_eq!(no_chat.apply("hi").unwrap(), "hi");
        assert_eq!(no_chat.apply_messages(&[m("user", "hi")]).unwrap(), "<user>hi</s><assistant>");
        // a transcript, turn by turn
        let turns = ChatPrompt { transcript: Some(Transcript::default()), ..brief };
        let f = PromptFormat { template: "{prompt}".into(), chat: Some(turns), chat_template: Ok(chat) };
        let hh = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: 2+2?\n\nAssistant:";
        assert_eq!(
            f.apply(hh).unwrap(),
            "<system>Be brief.</s><user>hi</s><assistant>hello!</s><user>2+2?</s><assistant>"
        );
    }

    /// `template_kwargs` reach the template; the render's own variables are refused.
    #[test]
    fn template_kwargs_reach_the_template() {
        let c: ChatPrompt = serde_json::from_str(r#"{"template_kwargs": {"enable_thinking": false}}"#).unwrap();
        let source = "{% for m in messages %}{{ m.content }}{% endfor %}\
                      {% if enable_thinking is defined and enable_thinking is false %}/no_think{% endif %}";
        let chat = ChatTemplate::new(source, "", "").unwrap().with_kwargs(c.template_kwargs.clone()).unwrap();
        let f = PromptFormat { template: "{prompt}".into(), chat: Some(c), chat_template: Ok(chat) };
        assert_eq!(f.apply("hi").unwrap(), "hi/no_think");
        let own: serde_json::Map<_, _> = serde_json::from_str(r#"{"messages": []}"#).unwrap();
        assert!(ChatTemplate::new(source, "", "").unwrap().with_kwargs(own).is_err());
        assert!(serde_json::from_str::<ChatPrompt>(r#"{"kwargs": {}}"#).is_err());
    }

    #[test]
    fn transcripts_must_start_with_a_turn_and_end_open() {
        let t = Transcript::default();
        let m = t.messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:").unwrap();
        let got: Vec<(&str, &str)> = m.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(got, [("user", "a"), ("assistant", "b"), ("user", "c")]);
        for bad in ["hi", "preamble\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a"] {
            assert!(t.messages(bad).is_err(), "{bad:?}");
        }
    }
}
