//! `rlhf generate` and `rlhf chat`: sampling from a checkpoint — one prompt, a JSONL file of
//! prompts, or a conversation at the terminal.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rlhf::device::DeviceKind;
use rlhf::run::resolve_model_in;
use rlhf::stages::reward_spec::RewardSpec;
use rlhf_policies::chat::{ChatMessage, ChatTemplate};
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::{
    generate_from_with, generate_observed, CausalLm, FusedOps, InferenceModel, SamplingConfig, Tokenizer, WeightDtype,
};

#[derive(Debug, clap::Args)]
pub(crate) struct GenerateArgs {
    /// Checkpoint folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (used as is).
    #[arg(long, required_unless_present_any = ["chat", "prompts"], conflicts_with_all = ["chat", "prompts"])]
    prompt: Option<String>,
    /// A user message, formatted with the model's chat template (a GGUF file's own, or
    /// `chat_template.jinja` / `tokenizer_config.json` beside the model).
    #[arg(long, conflicts_with = "prompts")]
    chat: Option<String>,
    /// System message for --chat or --in-chat (default: the template's own default, if any).
    #[arg(long)]
    system: Option<String>,
    /// Further chat-template variables for --chat or --in-chat, a JSON object (e.g.
    /// '{"enable_thinking": false}' for Qwen3).
    #[arg(long, value_parser = template_kwargs)]
    template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// A JSONL file of prompt records: every prompt's completions (--samples each, --batch at
    /// a time) go out as JSON lines (record, sample, prompt, completion, tokens, logprob,
    /// finished, and reward with --reward-model) to --out or stdout.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// --prompts: the records' prompt field.
    #[arg(long, default_value = "prompt", requires = "prompts")]
    prompt_field: String,
    /// --prompts: the prompt template (`{prompt}` is replaced).
    #[arg(long, default_value = "{prompt}", requires = "prompts")]
    prompt_template: String,
    /// --prompts: put each templated prompt in the model's chat template as the user turn (as
    /// a stage's `"chat": {}`; prompts that are message lists take the template without it).
    #[arg(long, requires = "prompts")]
    in_chat: bool,
    /// --prompts: completions per prompt.
    #[arg(long, default_value_t = 1, requires = "prompts", value_parser = clap::value_parser!(u64).range(1..))]
    samples: u64,
    /// --prompts: write only each prompt's highest-reward completion of its --samples
    /// (rejection sampling; `rlhf sft --set response_field=completion` trains on the file).
    #[arg(long, requires = "prompts")]
    best_of: bool,
    /// --prompts: sequences per batch (the output depends on --seed and --batch).
    #[arg(long, default_value_t = 16, requires = "prompts", value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// --prompts: write the JSON lines here instead of stdout.
    #[arg(long, requires = "prompts")]
    out: Option<PathBuf>,
    /// --prompts: the records' reference-answer field (written out, and handed to --reward).
    #[arg(long, requires = "prompts")]
    reference_field: Option<String>,
    /// --prompts: skip (and count) prompts longer than this many tokens after the template;
    /// without it, a prompt that leaves no room for --max-new-tokens is an error.
    #[arg(long, requires = "prompts")]
    max_prompt_len: Option<usize>,
    /// --prompts: score each completion with this reward model folder (its own tokenizer and
    /// stored normalisation).
    #[arg(long, requires = "prompts", conflicts_with = "reward")]
    reward_model: Option<PathBuf>,
    /// --prompts: score each completion with a reward as PPO's config gives it, e.g.
    /// `'{"kind": "answer", "extraction": "flexible"}'` with --reference-field answer.
    #[arg(long, requires = "prompts")]
    reward: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Device: cpu (the host engine), or cuda (the model's KV-cached decode on GPU 0; needs a
    /// build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

/// The sampling flags `generate` and `chat` share (each has its own length and temperature
/// defaults).
#[derive(Debug, clap::Args)]
pub(crate) struct SamplingFlags {
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Greedy decoding (argmax) instead of sampling.
    #[arg(long)]
    greedy: bool,
    /// Storage precision of the sampling engine's weights (f16 halves the memory traffic).
    #[arg(long, value_enum, default_value = "f32")]
    weights: Weights,
}

impl SamplingFlags {
    /// The sampler: these flags with `max_new_tokens`, `temperature`, the EOS ids and `seed`.
    fn config(&self, (max_new_tokens, temperature): (usize, f32), eos_ids: &[u32], seed: u64) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens,
            temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            greedy: self.greedy,
            eos_ids: eos_ids.to_vec(),
            seed,
            ..SamplingConfig::default()
        }
    }
}

/// `--weights` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Weights {
    F32,
    F16,
}

impl From<Weights> for WeightDtype {
    fn from(w: Weights) -> Self {
        match w {
            Weights::F32 => WeightDtype::F32,
            Weights::F16 => WeightDtype::F16,
        }
    }
}

fn sampling_config(a: &GenerateArgs, eos_ids: &[u32]) -> SamplingConfig {
    a.sampling.config((a.max_new_tokens, a.temperature), eos_ids, a.sampling.seed)
}

/// `--template-kwargs`: a JSON object.
fn template_kwargs(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("must be a JSON object, found {other}")),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// The chat-formatted prompt for `--chat` (with `--system` and `--template-kwargs` if given).
fn chat_prompt<D: FusedOps>(a: &GenerateArgs, model: &CausalLm<D>, tok: &Tokenizer, user: &str) -> Result<String> {
    let template = rlhf_policies::chat::ChatTemplate::of_model(tok, &model.config, &a.model)?
        .with_kwargs(a.template_kwargs.clone().unwrap_or_default())?;
    Ok(template.user_prompt(a.system.as_deref(), user)?)
}

pub(crate) fn generate_cmd(mut a: GenerateArgs) -> Result<()> {
    resolve_model_in(&mut a.model)?;
    if let Some(rm) = a.reward_model.as_mut() {
        resolve_model_in(rm)?;
    }
    if a.device != DeviceKind::Cpu && !matches!(a.sampling.weights, Weights::F32) {
        bail!("--weights is the CPU host engine's option; --device {} decodes in f32", a.device);
    }
    rlhf::on_device!(a.device, dev => generate_on(&a, dev))
}

fn generate_on<D: FusedOps>(a: &GenerateArgs, dev: &D) -> Result<()> {
    if (a.system.is_some() || a.template_kwargs.is_some()) && a.chat.is_none() && !a.in_chat {
        bail!("--system and --template-kwargs need --chat (or --in-chat with --prompts)");
    }
    if let Some(prompts) = &a.prompts {
        return generate_file(a, prompts, dev);
    }
    let (model, tok) = load_with_tokenizer(&a.model, dev)?;
    let text = match (&a.prompt, &a.chat) {
        (Some(p), _) => p.clone(),
        (None, Some(user)) => chat_prompt(a, &model, &tok, user)?,
        (None, None) => bail!("--prompt or --chat is required"),
    };
    let prompt = tok.encode_prompt(&text)?;
    if prompt.is_empty() {
        bail!("--prompt encodes to no tokens");
    }
    let eos_ids = tok.eos_ids_for(&model.config);
    let pad = tok.pad_id().or(model.config.pad_token_id()).or(eos_ids.first().copied()).unwrap_or(0);
    let cfg = sampling_config(a, &eos_ids);
    let t0 = Instant::now();
    let out = generate_from_with(&model, &[prompt], pad, &cfg, a.sampling.weights.into())?;
    let secs = t0.elapsed().as_secs_f64();
    let new = &out.tokens[0];
    println!("{}{}", text, tok.decode(new)?);
    let lp: f32 = out.logprobs[0].iter().sum();
    eprintln!(
        "[{} new tokens in {:.3} s, {:.0} tok/s; sum log-prob {:.3}; {}]",
        new.len(),
        secs,
        new.len() as f64 / secs,
        lp,
        if out.finished[0] { "stopped at EOS" } else { "reached max_new_tokens" }
    );
    Ok(())
}

/// `rlhf generate --prompts`: see [`rlhf::generate::generate_file`].
fn generate_file<D: FusedOps>(a: &GenerateArgs, prompts: &std::path::Path, dev: &D) -> Result<()> {
    let g = rlhf::generate::FileGeneration {
        prompts: prompts.to_path_buf(),
        field: a.prompt_field.clone(),
        reference_field: a.reference_field.clone(),
        template: a.prompt_template.clone(),
        chat: a.in_chat.then(|| rlhf::prompt_format::ChatPrompt {
            system: a.system.clone(),
            template_kwargs: a.template_kwargs.clone().unwrap_or_default(),
            ..Default::default()
        }),
        samples: a.samples as usize,
        batch: a.batch as usize,
        sampling: sampling_config(a, &[]),
        weights: a.sampling.weights.into(),
        reward: match (&a.reward_model, &a.reward) {
            (Some(path), _) => Some(RewardSpec::Model { path: path.clone(), normalize: true }),
            (None, Some(json)) => {
                let mut spec = serde_json::from_str(json).with_context(|| format!("--reward {json}: not a reward"))?;
                rlhf::stages::reward_spec::resolve_reward_models(&mut spec)?;
                Some(spec)
            }
            (None, None) => None,
        },
        max_prompt_len: a.max_prompt_len,
        best_of: a.best_of,
    };
    let mut out: Box<dyn std::io::Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let s = rlhf::generate::generate_file(&a.model, &g, &mut out, dev)?;
    let mut reward = s.mean_reward.map(|r| format!("; mean reward {r:.4}")).unwrap_or_default();
    if let Some(best) = s.mean_best_reward {
        reward += &format!(", best of {} {best:.4}", a.samples);
    }
    let skipped =
        if s.skipped_prompts > 0 { format!(" ({} skipped as too long)", s.skipped_prompts) } else { String::new() };
    eprintln!("[{} completions of {} prompts{skipped}, {} new tokens{reward}]", s.completions, s.prompts, s.tokens);
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(crate) struct ChatArgs {
    /// Checkpoint folder, run folder or GGUF file of a model with a chat template (its
    /// tokenizer's, `chat_template.jinja` or `tokenizer_config.json`).
    #[arg(long)]
    model: PathBuf,
    /// System message (default: the template's own default, if any).
    #[arg(long)]
    system: Option<String>,
    /// Further chat-template variables, a JSON object (e.g. '{"enable_thinking": false}' for
    /// Qwen3).
    #[arg(long, value_parser = template_kwargs)]
    template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Maximum number of new tokens per reply.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    // reply n is sampled with --seed + n
    #[command(flatten)]
    sampling: SamplingFlags,
}

pub(crate) fn chat_cmd(mut a: ChatArgs) -> Result<()> {
    resolve_model_in(&mut a.model)?;
    let dev = dfdx::prelude::Cpu::default();
    let (model, tok) = load_with_tokenizer(&a.model, &dev)?;
    let template = ChatTemplate::of_model(&tok, &model.config, &a.model)?
        .with_kwargs(a.template_kwargs.clone().unwrap_or_default())?;
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    eprintln!(
        "[chat with {}: one line per message; /reset forgets the conversation, /quit or the end of input ends it]",
        a.model.display()
    );
    let eos_ids = tok.eos_ids_for(&model.config);
    let pad = tok.pad_id().or(model.config.pad_token_id()).or(eos_ids.first().copied()).unwrap_or(0);
    let limit = model.dims.position_limit().unwrap_or(usize::MAX);
    // the sampling engine, built once (the weights converted for decoding)
    let engine = InferenceModel::from_model_with(&model, a.sampling.weights.into());
    drop(model);
    let mut chat = Conversation { a: &a, engine, tok: &tok, template, messages: vec![], eos_ids, pad, limit };
    chat.reset();
    let mut lines = stdin.lock().lines();
    for turn in 0u64.. {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next().transpose()? else { break };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                chat.reset();
                eprintln!("[the conversation is forgotten]");
            }
            // the reply is streamed to stdout; after an error the conversation goes on
            // without the message
            text => {
                if let Err(e) = chat.reply(text, a.sampling.seed.wrapping_add(turn)) {
                    eprintln!("error: {e:#}");
                }
            }
        }
    }
    Ok(())
}

/// The messages so far, and what answers them.
struct Conversation<'a> {
    a: &'a ChatArgs,
    engine: InferenceModel,
    tok: &'a Tokenizer,
    template: ChatTemplate,
    messages: Vec<ChatMessage>,
    eos_ids: Vec<u32>,
    pad: u32,
    /// The model's positions (GPT-2's `n_positions`; no limit for RoPE models).
    limit: usize,
}

impl Conversation<'_> {
    fn reset(&mut self) {
        let system = self.a.system.iter().map(|s| ChatMessage { role: "system".into(), content: s.clone() });
        self.messages = system.collect();
    }

    /// The model's reply to `text` (sampled with `seed`), printed as it comes, after which
    /// both join the conversation. Turns are forgotten from the oldest on when the conversation and the reply
    /// would not fit the model's positions.
    fn reply(&mut self, text: &str, seed: u64) -> Result<String> {
        self.messages.push(ChatMessage { role: "user".into(), content: text.into() });
        let first_turn = usize::from(self.messages.first().is_some_and(|m| m.role == "system"));
        let limit = self.limit;
        let prompt = loop {
            let ids = self.tok.encode_prompt(&self.template.render(&self.messages, true)?)?;
            if ids.len() + self.a.max_new_tokens <= limit {
                break ids;
            }
            if self.messages.len() - first_turn <= 1 {
                self.messages.pop();
                bail!("the message takes {} tokens; with --max-new-tokens {} it does not fit the model's {limit} positions", ids.len(), self.a.max_new_tokens);
            }
            self.messages.drain(first_turn..first_turn + 2);
            eprintln!("[the oldest exchange is forgotten: the conversation no longer fits {limit} positions]");
        };
        let cfg = self.a.sampling.config((self.a.max_new_tokens, self.a.temperature), &self.eos_ids, seed);
        let t0 = Instant::now();
        let mut stream = Stream { tok: self.tok, shown: String::new() };
        let out = generate_observed(&self.engine, &[prompt], self.pad, &cfg, &mut |g| stream.show(g))?;
        stream.show(&out);
        println!();
        std::io::stdout().flush()?;
        let new = &out.tokens[0];
        let reply = self.tok.decode(reply_ids(&out))?.trim().to_string();
        let secs = t0.elapsed().as_secs_f64();
        let end = if out.finished[0] { "" } else { "; cut at --max-new-tokens" };
        eprintln!("[{} tokens in {secs:.2} s, {:.0} tok/s{end}]", new.len(), new.len() as f64 / secs.max(1e-9));
        self.messages.push(ChatMessage { role: "assistant".into(), content: reply.clone() });
        Ok(reply)
    }
}

/// The reply's tokens without the EOS that ended it.
fn reply_ids(g: &rlhf_policies::Generation) -> &[u32] {
    let new = &g.tokens[0];
    if g.finished[0] {
        &new[..new.len().saturating_sub(1)]
    } else {
        new
    }
}

/// Prints a reply as it is decoded: after each step, the new whole characters (leading white
/// space left out, as the stored reply trims it).
struct Stream<'a> {
    tok: &'a Tokenizer,
    /// The (left-trimmed) text printed so far.
    shown: String,
}

impl Stream<'_> {
    fn show(&mut self, g: &rlhf_policies::Generation) {
        let Ok(text) = self.tok.decode(reply_ids(g)) else { return };
        // a token that ends inside a character decodes to U+FFFD: wait for the next one
        let whole = text.trim_start().trim_end_matches('\u{FFFD}');
        // (a decoder that rewrites earlier text as tokens arrive prints only what extends it)
        if let Some(more) = whole.strip_prefix(self.shown.as_str()).filter(|m| !m.is_empty()) {
            print!("{more}");
            let _ = std::io::stdout().flush();
            self.shown = whole.to_string();
        }
    }
}
