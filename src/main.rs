//! The `rlhf` command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dfdx::prelude::Cpu;
use rlhf::device::DeviceKind;
use rlhf::run::resolve_model_in;
use rlhf::stages::dpo::{self, DpoConfig};
use rlhf::stages::grpo::{self, GrpoConfig};
use rlhf::stages::ppo::{self, PpoConfig};
use rlhf::stages::pretrain::{self, PretrainConfig};
use rlhf::stages::reward::{self, RewardConfig};
use rlhf::stages::reward_spec::RewardSpec;
use rlhf::stages::sft::{self, SftConfig};
use rlhf_policies::{CausalLm, FusedOps, ModelConfig, Tokenizer};

mod bench_cli;
mod export_cli;
mod generate_cli;
use bench_cli::*;
use generate_cli::{chat_cmd, generate_cmd, ChatArgs, GenerateArgs, Weights};

/// RLHF in Rust: pretraining, SFT, reward models and PPO on small language models.
#[derive(Debug, Parser)]
#[command(name = "rlhf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: pretrain → SFT → reward model → PPO on an embedded task, then SFT vs PPO
    /// (and DPO, GRPO, best-of-n) on gold reward, proxy reward and KL.
    Demo(DemoArgs),
    /// Write a freshly initialised model (HF folder: config.json, model.safetensors,
    /// tokenizer.json).
    Init(InitArgs),
    /// Sample a completion of a prompt from a checkpoint folder.
    Generate(GenerateArgs),
    /// Stage 1: next-token pretraining on a text corpus.
    Pretrain(StageArgs),
    /// Stage 2: supervised fine-tuning on {prompt, response} JSONL (loss on the response).
    Sft(StageArgs),
    /// Stage 3a: a Bradley–Terry reward model on preference JSONL ({prompt, chosen,
    /// rejected}, hh-rlhf conversations, or rankings).
    Reward(StageArgs),
    /// Stage 3b: PPO against a reward model (or a rule / external command) with a KL penalty
    /// to the frozen SFT model.
    Ppo(PpoArgs),
    /// NLPO (PPO within the top-p nucleus of a periodically synced copy of the policy):
    /// `rlhf ppo` with `nlpo` set (RL4LMs' settings unless the config has its own).
    Nlpo(PpoArgs),
    /// Direct preference optimisation (DPO, cDPO, robust, hinge, IPO; reference-free SimPO, ORPO) on preference JSONL, or
    /// KTO on labelled {prompt, completion, label} JSONL, against the frozen SFT model.
    Dpo(DpoArgs),
    /// GRPO (group-normalised advantages, KL as a loss term) on the PPO environment: G
    /// completions per prompt, no critic.
    Grpo(PpoArgs),
    /// RLOO (leave-one-out baseline, KL folded into the reward): `rlhf grpo` with
    /// `algo.kind = rloo`.
    Rloo(PpoArgs),
    /// REINFORCE++ (per-token KL in the reward, globally whitened returns): `rlhf grpo` with
    /// `algo.kind = reinforce_pp`.
    #[command(name = "reinforce-pp")]
    ReinforcePp(PpoArgs),
    /// ReMax (the greedy response's reward as the baseline, KL folded into the reward): `rlhf
    /// grpo` with `algo.kind = remax`.
    Remax(PpoArgs),
    /// Online DPO (two completions per prompt from the current policy, the better-scored one
    /// chosen, a DPO loss against the frozen reference): `rlhf grpo` with `algo.kind =
    /// online_dpo`.
    #[command(name = "online-dpo")]
    OnlineDpo(PpoArgs),
    /// Talk to a chat model at the terminal: each line is a user message, the reply follows
    /// (the whole conversation in the model's chat template; reply n sampled with --seed + n).
    Chat(ChatArgs),
    /// Loss and perplexity of a checkpoint on a text file (non-overlapping blocks).
    Eval(EvalArgs),
    /// Write a model as a plain HF folder (config.json, model.safetensors, tokenizer.json): a
    /// PEFT adapter merged into its base, a GGUF file dequantised, a run's newest checkpoint.
    Export(export_cli::ExportArgs),
    /// Write RUN_DIR/report.html: plots of every stage's metrics (and the demo's table and
    /// over-optimisation plot).
    Report(ReportArgs),
    /// Run the fixed peer workload's benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Architecture preset (the workload's shapes): tiny or small.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// An HF config.json to use instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A tokenizer.json to use. Without it (and without --corpus), a byte-level tokenizer
    /// (256 bytes + <|endoftext|> + <|pad|>) is used.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Train a byte-level BPE of the preset's vocab size on this text file.
    #[arg(long, conflicts_with = "tokenizer")]
    corpus: Option<PathBuf>,
    /// Seed of the weight init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// Checkpoint folder (config.json, model.safetensors, tokenizer.json): a causal LM, or a
    /// reward model (`*ForSequenceClassification`).
    #[arg(long)]
    model: PathBuf,
    /// A causal LM: a UTF-8 text file (loss on every token), or `.jsonl` {prompt, response}
    /// records (loss on the response tokens and the EOS, as SFT's). A reward model: preference
    /// JSONL (accuracy, margin and loss over every pair, as the reward stage's evaluation).
    #[arg(long)]
    data: PathBuf,
    /// Tokens per block (text; default: the model's maximum positions, at most 256).
    #[arg(long)]
    block: Option<usize>,
    /// Blocks (or records) per forward.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// JSONL: the prompt field.
    #[arg(long, default_value = "prompt")]
    prompt_field: String,
    /// JSONL: the response field.
    #[arg(long, default_value = "response")]
    response_field: String,
    /// JSONL: read each record's conversation from this field instead (as SFT's
    /// `messages_field`: the loss is on its last, assistant message).
    #[arg(long, conflicts_with_all = ["prompt_field", "response_field", "prompt_template", "chat"])]
    messages_field: Option<String>,
    /// --messages-field: the loss on the `last` assistant message or on `all` of them (as SFT's
    /// `assistant_turns`).
    #[arg(long, value_enum, default_value = "last", requires = "messages_field")]
    assistant_turns: rlhf::stages::sft::AssistantTurns,
    /// JSONL: the prompt template (`{prompt}` is replaced).
    #[arg(long, default_value = "{prompt}")]
    prompt_template: String,
    /// JSONL: put prompts in the model's chat template (as a stage's `"chat": {}`).
    #[arg(long)]
    chat: bool,
    /// A reward model's preference records, as the reward stage's `format`, e.g.
    /// `'{"kind": "conversations"}'` for hh-rlhf.
    #[arg(long, default_value = r#"{"kind": "pairs"}"#)]
    format: String,
    /// Device: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

#[derive(Debug, clap::Args)]
struct StageArgs {
    /// JSON config (fields of the stage's config struct; unknown fields are errors).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config field, e.g. `--set steps=500 --set optim.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in this folder from its last complete checkpoint (its config.json,
    /// plus any --set overrides).
    #[arg(long, conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// Start afresh in an `out_dir` that holds a previous run, deleting its config.json,
    /// metrics, samples, report and checkpoints (without it, such a folder is an error) once
    /// the new run writes its first metrics or checkpoint: a run that stops before that (a
    /// config or data error) leaves the previous one in place.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Print the resolved config (defaults, then the file or the run's config.json, then
    /// --set and the command's own flags) as JSON, and exit without running.
    #[arg(long)]
    print_config: bool,
}

#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// A run folder (or the demo's folder of stages): its report.html. Several run folders:
    /// one page overlaying their curves (written to --out).
    #[arg(required = true)]
    run_dirs: Vec<PathBuf>,
    /// The comparison page of several runs.
    #[arg(long, default_value = "compare.html")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Output folder (data, every stage's run folder, summary.json).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// quick (a few minutes on 2 cores), full (longer; shows over-optimisation), or test.
    #[arg(long, value_enum, default_value = "quick")]
    preset: rlhf::demo::Preset,
    /// Seed of the task, the data and every stage.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct PpoArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// Use this reward-model folder (from `rlhf reward`) as the reward, with its stored
    /// normalisation.
    #[arg(long)]
    reward_model: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct DpoArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// The loss with its default parameters (same as `--set loss.kind=…`; `--set loss.tau=…`
    /// etc. still apply): dpo (sigmoid), cdpo, robust, hinge, ipo, simpo, orpo, kto.
    #[arg(long, value_enum)]
    loss: Option<LossChoice>,
}

/// `--loss` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LossChoice {
    Dpo,
    Cdpo,
    Robust,
    Hinge,
    Ipo,
    Simpo,
    Orpo,
    Kto,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    rlhf::malloc::tune_for_training();
    match cli.command {
        Command::Init(a) => init(a),
        Command::Generate(a) => generate_cmd(a),
        Command::Chat(a) => chat_cmd(a),
        Command::Pretrain(a) => run_stage(&a, |_| {}, |c: &PretrainConfig| c.out_dir.clone(), pretrain::train),
        Command::Sft(a) => run_stage(&a, |_| {}, |c: &SftConfig| c.out_dir.clone(), sft::train),
        Command::Reward(a) => run_stage(&a, |_| {}, |c: &RewardConfig| c.out_dir.clone(), reward::train),
        Command::Demo(a) => demo_cmd(a),
        Command::Report(a) => {
            let page = match a.run_dirs.as_slice() {
                [one] => rlhf::report::write_report(one)?,
                several => rlhf::report::write_comparison(several, &a.out)?,
            };
            println!("{}", page.display());
            Ok(())
        }
        Command::Ppo(a) => ppo_cmd(a, false),
        Command::Nlpo(a) => ppo_cmd(a, true),
        Command::Dpo(mut a) => {
            if let Some(l) = a.loss {
                let kind = match l {
                    LossChoice::Dpo => "sigmoid",
                    LossChoice::Cdpo => "cdpo",
                    LossChoice::Robust => "robust",
                    LossChoice::Hinge => "hinge",
                    LossChoice::Ipo => "ipo",
                    LossChoice::Simpo => "simpo",
                    LossChoice::Orpo => "orpo",
                    LossChoice::Kto => "kto",
                };
                a.stage.set.insert(0, format!("loss={{\"kind\": \"{kind}\"}}"));
            }
            run_stage(&a.stage, |_| {}, |c: &DpoConfig| c.out_dir.clone(), dpo::train)
        }
        Command::Grpo(a) => grpo_cmd(a, None),
        Command::Rloo(a) => grpo_cmd(a, Some("rloo")),
        Command::ReinforcePp(a) => grpo_cmd(a, Some("reinforce_pp")),
        Command::Remax(a) => grpo_cmd(a, Some("remax")),
        Command::OnlineDpo(a) => grpo_cmd(a, Some("online_dpo")),
        Command::Eval(a) => eval_cmd(a),
        Command::Export(a) => export_cli::export_cmd(a),
        Command::Bench(BenchCommand::Rollout(a)) => bench_rollout(a),
        Command::Bench(BenchCommand::Env(a)) => bench_env(a),
        Command::Bench(BenchCommand::Train(a)) => bench_rate(a, false),
        Command::Bench(BenchCommand::Scoring(a)) => bench_rate(a, true),
        Command::Bench(BenchCommand::Ppo(a)) => bench_ppo(a),
        Command::Bench(BenchCommand::Grpo(a)) => bench_grpo(a),
    }
}

fn init(a: InitArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::preset(&a.preset)?,
    };
    let tok = match (&a.tokenizer, &a.corpus) {
        (Some(p), _) => Tokenizer::from_file(p)?,
        (None, Some(corpus)) => {
            let text = rlhf::data::read_corpus(std::slice::from_ref(corpus))?;
            Tokenizer::train_bpe(text.lines(), cfg.vocab_size(), 2)?
        }
        (None, None) => Tokenizer::byte_level()?,
    };
    // the model's vocabulary is exactly the tokenizer's
    cfg.set_vocab_size(tok.vocab_size());
    let model = CausalLm::new(cfg, &Cpu::default(), a.seed)?;
    model.save_pretrained(&a.out, Some(&tok))?;
    eprintln!("wrote {} ({} parameters, vocab {})", a.out.display(), model.num_params(), tok.vocab_size());
    Ok(())
}

/// The flags' sampling settings, stopping at `eos`.
/// The stage config: a fresh `--config` (+ `--set`), or the run's own `config.json` when
/// resuming (+ `--set`, with `out_dir` pinned to the run). Returns it and whether to resume.
fn stage_config<T: serde::de::DeserializeOwned>(a: &StageArgs) -> Result<(T, bool)> {
    Ok(match &a.resume {
        Some(dir) => {
            if !dir.join(rlhf::run::CONFIG).is_file() {
                bail!("--resume {}: no {} there, not a run folder", dir.display(), rlhf::run::CONFIG);
            }
            let mut set = a.set.clone();
            set.push(format!("out_dir={}", serde_json::to_string(&dir)?));
            (rlhf::config::load(Some(&dir.join(rlhf::run::CONFIG)), &set)?, true)
        }
        None => (rlhf::config::load(a.config.as_deref(), &a.set)?, false),
    })
}

/// One training stage from the command line: its config (see [`stage_config`]), `prepare`
/// (command-line shortcuts written into it), `--overwrite`, `train`; then the stage's report
/// as JSON on stdout and the run's report.html.
fn run_stage<C, R>(
    a: &StageArgs,
    prepare: impl FnOnce(&mut C),
    out_dir: impl Fn(&C) -> PathBuf,
    train: impl FnOnce(C, bool) -> Result<R>,
) -> Result<()>
where
    C: serde::de::DeserializeOwned + serde::Serialize,
    R: serde::Serialize,
{
    let (mut cfg, resume): (C, bool) = stage_config(a)?;
    prepare(&mut cfg);
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let out = out_dir(&cfg);
    if a.overwrite {
        rlhf::run::RunDir::set_aside(&out)?;
    }
    rlhf::stop::install_handler().context("installing the Ctrl-C / SIGTERM handler")?;
    let result = train(cfg, resume);
    if a.overwrite {
        match rlhf::run::RunDir::settle_overwrite(&out) {
            Ok(true) => {
                eprintln!("--overwrite: the new run wrote nothing; {} holds the previous run again", out.display())
            }
            Ok(false) => {}
            Err(e) => eprintln!("--overwrite: settling {}: {e:#}", out.display()),
        }
    }
    let report = match result {
        Ok(report) => report,
        Err(e) => match e.downcast_ref::<rlhf::stop::Interrupted>() {
            Some(stop) => {
                write_report(&out);
                eprintln!("{stop}\ncontinue it with: rlhf {} --resume {}", stop.stage, stop.run_dir.display());
                std::process::exit(rlhf::stop::EXIT_STATUS);
            }
            None => return Err(e),
        },
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_report(&out);
    Ok(())
}

/// The run's report.html; a failure here is reported, not fatal (the run itself succeeded).
fn write_report(dir: &std::path::Path) {
    match rlhf::report::write_report(dir) {
        Ok(p) => eprintln!("report: {}", p.display()),
        Err(e) => eprintln!("report: not written: {e:#}"),
    }
}

fn demo_cmd(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let summary = rlhf::demo::run(&a.out, a.preset, a.seed)?;
    let report = rlhf::report::write_report(&a.out)?;
    println!("{}", rlhf::demo::table(&summary));
    println!(
        "({:.0} s; plots in {}, numbers in {}/summary.json)",
        t0.elapsed().as_secs_f64(),
        report.display(),
        a.out.display()
    );
    Ok(())
}

/// The reward model given by `--reward-model`, as PPO and GRPO configs take it.
fn reward_model(path: Option<PathBuf>) -> Option<RewardSpec> {
    path.map(|path| RewardSpec::Model { path, normalize: true })
}

/// `rlhf ppo` / `nlpo`: the second turns NLPO on (with its defaults, unless the config or a
/// `--set` gives `nlpo`).
fn ppo_cmd(a: PpoArgs, nlpo: bool) -> Result<()> {
    let reward = reward_model(a.reward_model);
    let prepare = |c: &mut PpoConfig| {
        if reward.is_some() {
            c.reward = reward;
        }
        if nlpo && c.nlpo.is_none() {
            c.nlpo = Some(Default::default());
        }
    };
    run_stage(&a.stage, prepare, |c: &PpoConfig| c.out_dir.clone(), ppo::train)
}

/// `rlhf grpo` / `rloo` / `reinforce-pp` / `remax` / `online-dpo`: all but the first set `algo.kind` (a config's own
/// parameters of that algorithm are kept).
fn grpo_cmd(mut a: PpoArgs, algo: Option<&str>) -> Result<()> {
    if let Some(kind) = algo {
        a.stage.set.insert(0, format!("algo.kind={kind}"));
    }
    let reward = reward_model(a.reward_model);
    let prepare = |c: &mut GrpoConfig| {
        if reward.is_some() {
            c.reward = reward;
        }
    };
    run_stage(&a.stage, prepare, |c: &GrpoConfig| c.out_dir.clone(), grpo::train)
}

fn eval_cmd(mut a: EvalArgs) -> Result<()> {
    resolve_model_in(&mut a.model)?;
    rlhf::on_device!(a.device, dev => eval_on(&a, dev))
}

fn eval_on<D: FusedOps>(a: &EvalArgs, dev: &D) -> Result<()> {
    let data = rlhf::eval::EvalData {
        data: a.data.clone(),
        block: a.block,
        batch: a.batch,
        fields: (a.prompt_field.clone(), a.response_field.clone()),
        messages_field: a.messages_field.clone(),
        assistant_turns: a.assistant_turns,
        prompt_template: a.prompt_template.clone(),
        chat: a.chat,
        format: serde_json::from_str(&a.format)
            .with_context(|| format!("--format {}: not a preference format", a.format))?,
    };
    let report = rlhf::eval::evaluate(&a.model, &data, dev)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
