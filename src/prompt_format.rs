//! How a record's prompt becomes the model's input text: the stage's `prompt_template`
//! (`{prompt}` replaced), then, when the stage's config has `chat`, the model's own chat
//! template around it (the templated prompt as the user turn, the assistant's turn opened, as
//! `rlhf generate --chat` does). Responses follow as they are, then the EOS token (for a chat
//! model, its end-of-turn token).

use std::path::Path;

use anyhow::Result;
use rlhf_policies::chat::ChatTemplate;
use rlhf_policies::{ModelConfig, Tokenizer};
use serde::{Deserialize, Serialize};

/// A stage's `chat` setting: prompts in the model's chat template (its tokenizer's
/// `chat_template`: a GGUF file's own, `chat_template.jinja` or `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatPrompt {
    /// A system message. Default: none (the template's own default, if it has one).
    pub system: Option<String>,
}

/// A prompt template, and the chat template it is wrapped in, if any.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    template: String,
    chat: Option<(ChatTemplate, Option<String>)>,
}

impl PromptFormat {
    /// `template` alone.
    pub fn plain(template: &str) -> Self {
        PromptFormat { template: template.to_string(), chat: None }
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
        let chat = match chat {
            Some(c) => Some((ChatTemplate::of_model(tok, config, model)?, c.system.clone())),
            None => None,
        };
        Ok(PromptFormat { template: template.to_string(), chat })
    }

    /// The input text for `prompt`.
    pub fn apply(&self, prompt: &str) -> Result<String> {
        let text = self.template.replace("{prompt}", prompt);
        Ok(match &self.chat {
            Some((chat, system)) => chat.user_prompt(system.as_deref(), &text)?,
            None => text,
        })
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
        let f = PromptFormat { template: "Q: {prompt}".into(), chat: Some((chat.clone(), None)) };
        assert_eq!(f.apply("2+2?").unwrap(), "<user>Q: 2+2?</s><assistant>");
        let f = PromptFormat { template: "{prompt}".into(), chat: Some((chat, Some("Be brief.".into()))) };
        assert_eq!(f.apply("hi").unwrap(), "<system>Be brief.</s><user>hi</s><assistant>");
    }
}
