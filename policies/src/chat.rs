//! Chat templates: the Jinja `chat_template` that HF tokenizers (and GGUF files, under
//! `tokenizer.chat_template`) carry, rendered with minijinja the way transformers'
//! `apply_chat_template` does (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! and any further variables the caller passes, as TRL's `chat_template_kwargs`).

use std::path::Path;

use serde::Serialize;

use crate::error::PolicyError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A chat template with the special tokens it may refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    source: String,
    /// `bos_token` in the template.
    pub bos_token: String,
    /// `eos_token` in the template.
    pub eos_token: String,
    /// Further variables for the template (transformers' `apply_chat_template(**kwargs)`):
    /// Qwen3's `enable_thinking`, a date string, … They may override `bos_token`/`eos_token`.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl ChatTemplate {
    /// A template from its Jinja source (checked to parse).
    pub fn new(source: impl Into<String>, bos_token: &str, eos_token: &str) -> Result<Self, PolicyError> {
        let t = ChatTemplate {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            kwargs: Default::default(),
        };
        environment()
            .template_from_str(&t.source)
            .map_err(|e| PolicyError::tokenizer("<chat template>", "chat_template", e.to_string()))?;
        Ok(t)
    }

    /// The template a model's files carry: a GGUF file's `tokenizer.chat_template`, or a
    /// folder's `chat_template.jinja`, or the `chat_template` of its `tokenizer_config.json` (a
    /// string, or the `default` one of a list of named templates), or that of the
    /// `chat_template.json` transformers 4 wrote beside a processor (multimodal checkpoints such
    /// as gemma-3-4b-it). `None` if there is none. (The loader puts it on the [`crate::Tokenizer`],
    /// whose `save` writes it back as `chat_template.jinja`.)
    pub fn source_of(model: &Path) -> Result<Option<String>, PolicyError> {
        if model.is_file() {
            return Ok(crate::gguf::chat_template(&crate::gguf::Gguf::open(model)?));
        }
        let jinja = model.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja).map(Some).map_err(|e| PolicyError::io(&jinja, e));
        }
        for name in ["tokenizer_config.json", "chat_template.json"] {
            let path = model.join(name);
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::io(&path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| PolicyError::tokenizer(path.display().to_string(), name, e.to_string()))?;
            if let Some(template) = config_template(&v, &path)? {
                return Ok(Some(template));
            }
        }
        Ok(None)
    }

    /// The template with further variables (`kwargs`); `messages` and `add_generation_prompt`
    /// are the render's own, and an error.
    pub fn with_kwargs(mut self, kwargs: serde_json::Map<String, serde_json::Value>) -> Result<Self, PolicyError> {
        if let Some(k) = kwargs.keys().find(|k| ["messages", "add_generation_prompt"].contains(&k.as_str())) {
            let msg = format!("`{k}` is set by the render itself, not a template variable to pass");
            return Err(PolicyError::tokenizer("<chat template>", "template_kwargs", msg));
        }
        self.kwargs = kwargs;
        Ok(self)
    }

    /// The template a loaded model's tokenizer carries, with the model's BOS and EOS token
    /// texts; an error naming `model` when it has none.
    pub fn of_model(tok: &crate::Tokenizer, config: &crate::ModelConfig, model: &Path) -> Result<Self, PolicyError> {
        let name = |id: Option<u32>| id.and_then(|i| tok.decode(&[i]).ok()).unwrap_or_default();
        let (bos, eos) = (name(config.bos_token_id()), name(tok.eos_for(config)));
        let source = tok.chat_template.clone().ok_or_else(|| {
            PolicyError::tokenizer(
                model.display().to_string(),
                "chat_template",
                "none (no tokenizer.chat_template, chat_template.jinja or tokenizer_config.json)",
            )
        })?;
        ChatTemplate::new(source, &bos, &eos)
    }

    /// A prompt for the model to answer: an optional system message and `user`, with the
    /// assistant's turn opened (a template's own default system message applies without one).
    pub fn user_prompt(&self, system: Option<&str>, user: &str) -> Result<String, PolicyError> {
        let message = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
        let mut messages: Vec<ChatMessage> = system.map(|s| message("system", s)).into_iter().collect();
        messages.push(message("user", user));
        self.render(&messages, true)
    }

    /// The prompt text for `messages` (with the assistant's opening when
    /// `add_generation_prompt`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, PolicyError> {
        let env = environment();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| PolicyError::tokenizer("<chat template>", "chat_template", e.to_string()))?;
        let mut vars = serde_json::Map::new();
        vars.insert("bos_token".into(), self.bos_token.clone().into());
        vars.insert("eos_token".into(), self.eos_token.clone().into());
        vars.extend(self.kwargs.clone());
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            ..minijinja::Value::from_serialize(&vars)
        })
        .map_err(|e| PolicyError::tokenizer("<chat template>", "chat_template", e.to_string()))
    }
}

/// The `chat_template` of `tokenizer_config.json` or `chat_template.json` (read from `path`): a
/// string, or — as transformers
/// writes a tokenizer with several — a list of `{"name", "template"}` of which the one named
/// `default` is the chat template (transformers' choice when no other is asked for).
fn config_template(config: &serde_json::Value, path: &Path) -> Result<Option<String>, PolicyError> {
    let err = |msg: String| PolicyError::tokenizer(path.display().to_string(), "chat_template", msg);
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let name = |t: &serde_json::Value| t.get("name").and_then(|n| n.as_str()).map(str::to_string);
            let names: Vec<String> = named.iter().map(|t| name(t).unwrap_or_else(|| "(no name)".into())).collect();
            let default = named.iter().find(|t| name(t).as_deref() == Some("default")).ok_or_else(|| {
                err(format!("a list of named templates ({}) without one named \"default\"", names.join(", ")))
            })?;
            match default.get("template") {
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(err("the template named \"default\" has no string `template`".into())),
            }
        }
        Some(other) => Err(err(format!("must be a string or a list of named templates, found {other}"))),
    }
}

/// The Jinja environment transformers renders chat templates in: block tags take their line's
/// indentation and newline with them (`trim_blocks`, `lstrip_blocks`), `break` / `continue`,
/// Python's string methods, `raise_exception`. Unlike transformers, no `strftime_now`: a
/// template that asks `strftime_now is defined` (Llama 3.1+) then takes its fixed fallback
/// date, so prompts — and a resumed run — do not change with the day.
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env
}
