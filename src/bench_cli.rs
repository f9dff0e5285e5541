//! `rlhf bench …`: the fixed peer workload's benchmarks (argument types and runners).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use rlhf::bench;

use crate::Weights;

#[derive(Debug, clap::Args)]
pub(crate) struct PpoBenchArgs {
    #[command(flatten)]
    env: EnvArgs,
    /// Critic: shared value head, separate critic, or both.
    #[arg(long, value_enum, default_value = "both")]
    value: ValueChoice,
    /// Device: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: rlhf::device::DeviceKind,
    /// Where the rollout decodes: auto (the host engine on the CPU, the model's decode on a
    /// GPU), host, device, or fused (the CUDA engine).
    #[arg(long, default_value = "auto", value_parser = rollout_engine)]
    rollout_engine: rlhf_policies::RolloutEngine,
}

fn rollout_engine(s: &str) -> Result<rlhf_policies::RolloutEngine, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?}: auto, host, device or fused"))
}

#[derive(Debug, clap::Args)]
pub(crate) struct GrpoBenchArgs {
    #[command(flatten)]
    env: EnvArgs,
    /// Algorithm: grpo, rloo, reinforce-pp, or all.
    #[arg(long, value_enum, default_value = "all")]
    algo: AlgoChoice,
    /// Device: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: rlhf::device::DeviceKind,
}

/// `--algo` values.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub(crate) enum AlgoChoice {
    Grpo,
    Rloo,
    ReinforcePp,
    All,
}

/// `--value` values.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub(crate) enum ValueChoice {
    Shared,
    Separate,
    Both,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Rollout tokens/s (batched sampling with the KV cache) at the workload's batch sizes.
    Rollout(RolloutArgs),
    /// Token-level stepping through VecEnv vs raw generation + one reference pass (PPO shapes).
    Env(EnvArgs),
    /// One training step (forward + cross-entropy + backward + AdamW) at the workload's shape.
    Train(DeviceArgs),
    /// One no-grad forward with full logits at the workload's `scoring` shape (32 × 96).
    #[command(alias = "score")]
    Scoring(DeviceArgs),
    /// One PPO iteration (rollout, scoring, advantages, 4 × 4 minibatch updates) per phase.
    Ppo(PpoBenchArgs),
    /// One GRPO / RLOO / REINFORCE++ iteration at the workload's `trl_grpo` shapes (8 prompts ×
    /// 4 completions, 4 passes × 4 optimizer steps of 8) per phase.
    Grpo(GrpoBenchArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct EnvArgs {
    /// The workload file (shared/peers/workload.json).
    #[arg(long)]
    workload: PathBuf,
    /// Model name from the workload (tiny or small); default: every model.
    #[arg(long)]
    model: Option<String>,
    /// Threads (default: the workload's).
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the JSON results to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeviceArgs {
    #[command(flatten)]
    env: EnvArgs,
    /// Device: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: rlhf::device::DeviceKind,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RolloutArgs {
    /// The workload file (shared/peers/workload.json).
    #[arg(long)]
    workload: PathBuf,
    /// Model name from the workload (tiny or small); default: every model.
    #[arg(long)]
    model: Option<String>,
    /// Batch size; default: the workload's batch sizes.
    #[arg(long)]
    batch: Option<usize>,
    /// Threads (default: the workload's).
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the JSON results to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Storage precision of the sampling engine's weights (the CPU's host engine).
    #[arg(long, value_enum, default_value = "f32")]
    weights: Weights,
    /// Device: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: rlhf::device::DeviceKind,
    /// What decodes: auto (the host engine on the CPU, the model's KV-cached decode on a GPU),
    /// host, device, or fused (the CUDA engine).
    #[arg(long, default_value = "auto", value_parser = rollout_engine)]
    rollout_engine: rlhf_policies::RolloutEngine,
}

pub(crate) fn bench_rollout(a: RolloutArgs) -> Result<()> {
    let (w, pool, models) = setup(&a.workload, a.threads, a.model.as_deref())?;
    let batches = a.batch.map(|b| vec![b]).unwrap_or_else(|| w.rollout.batch_sizes.clone());
    let mut all = Vec::new();
    for m in &models {
        let results =
            pool.install(|| bench::rollout(&w, m, &batches, a.weights.into(), (a.device, a.rollout_engine)))?;
        for r in &results {
            eprintln!(
                "rollout {:>5} on {} ({:?}) b={:<3} {:>8.0} tok/s  [{:.0}-{:.0}]  ({} tokens/run, {} threads, {:?} weights)",
                r.model,
                r.device,
                r.rollout_engine,
                r.batch,
                r.tokens_per_s,
                r.tokens_per_s_min,
                r.tokens_per_s_max,
                r.tokens,
                r.threads,
                r.weights
            );
        }
        all.extend(results);
    }
    print_results("rollout", &all, a.out.as_deref())
}

/// The workload, a pool of its thread count (or `threads`), and the models to run (`model`, or
/// every model of the workload).
fn setup(
    workload: &std::path::Path,
    threads: Option<usize>,
    model: Option<&str>,
) -> Result<(bench::Workload, rayon::ThreadPool, Vec<String>)> {
    let w = bench::Workload::from_file(workload)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(w.threads)).build()?;
    let models = match model {
        Some(m) => vec![m.to_string()],
        None => w.models.keys().cloned().collect(),
    };
    Ok((w, pool, models))
}

/// One iteration benchmark's summary line: median, range and median phases.
fn iteration_line(
    label: &str,
    seconds: f64,
    range: [f64; 2],
    phases: &std::collections::BTreeMap<String, f64>,
) -> String {
    format!(
        "{label}: {seconds:.2} s/iteration [{:.2}-{:.2}] (rollout {:.2}, scoring {:.2}, update {:.2})",
        range[0], range[1], phases["rollout"], phases["scoring"], phases["update"]
    )
}

/// Prints `{"benchmark": name, "results": [...]}` and writes it to `out` if given.
pub(crate) fn print_results<T: serde::Serialize>(
    name: &str,
    results: &[T],
    out: Option<&std::path::Path>,
) -> Result<()> {
    let json = serde_json::to_string_pretty(&serde_json::json!({ "benchmark": name, "results": results }))?;
    println!("{json}");
    if let Some(p) = out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub(crate) fn bench_env(a: EnvArgs) -> Result<()> {
    let (w, pool, models) = setup(&a.workload, a.threads, a.model.as_deref())?;
    let mut all = Vec::new();
    for m in &models {
        let r = pool.install(|| rlhf::bench_env::env_step(&w, m))?;
        eprintln!(
            "env {:>5}: VecEnv::rollout {:.0} tok/s [{:.0}-{:.0}], raw generate + reference pass {:.0} [{:.0}-{:.0}] (rollout slowdown {:.3}x), VecEnv::step {:.0} [{:.0}-{:.0}]",
            r.model, r.env_tokens_per_s[0], r.env_tokens_per_s[1], r.env_tokens_per_s[2],
            r.raw_tokens_per_s[0], r.raw_tokens_per_s[1], r.raw_tokens_per_s[2], r.slowdown,
            r.step_tokens_per_s[0], r.step_tokens_per_s[1], r.step_tokens_per_s[2]
        );
        all.push(r);
    }
    print_results("env_step", &all, a.out.as_deref())
}

pub(crate) fn bench_ppo(a: PpoBenchArgs) -> Result<()> {
    let (w, pool, models) = setup(&a.env.workload, a.env.threads, a.env.model.as_deref())?;
    let critics: &[bool] = match a.value {
        ValueChoice::Shared => &[true],
        ValueChoice::Separate => &[false],
        ValueChoice::Both => &[true, false],
    };
    let mut all = Vec::new();
    for m in &models {
        for &shared in critics {
            let r = pool.install(|| rlhf::bench_ppo::ppo_iteration(&w, m, shared, (a.device, a.rollout_engine)))?;
            let label =
                format!("ppo {:>5} {:>8} on {} ({:?} rollout)", r.model, r.value_model, r.device, r.rollout_engine);
            eprintln!("{}", iteration_line(&label, r.seconds, r.range, &r.phases));
            all.push(r);
        }
    }
    print_results("ppo_iteration", &all, a.env.out.as_deref())
}

pub(crate) fn bench_grpo(a: GrpoBenchArgs) -> Result<()> {
    use rlhf::stages::grpo::Algo;
    let (w, pool, models) = setup(&a.env.workload, a.env.threads, a.env.model.as_deref())?;
    // the algorithms at TRL's defaults (GRPO: group std; RLOO: no normalisation)
    let grpo = Algo::Grpo { scale_rewards: Default::default(), std_eps: 1e-4 };
    let rloo = Algo::Rloo { normalize_advantages: false, normalize_eps: 1e-4 };
    let rpp = Algo::ReinforcePp { gamma: 1.0, whitening: Default::default(), whiten_eps: 1e-8, baseline: false };
    let algos = match a.algo {
        AlgoChoice::Grpo => vec![grpo],
        AlgoChoice::Rloo => vec![rloo],
        AlgoChoice::ReinforcePp => vec![rpp],
        AlgoChoice::All => vec![grpo, rloo, rpp],
    };
    let mut all = Vec::new();
    for m in &models {
        for &algo in &algos {
            let r = pool.install(|| rlhf::bench_grpo::grpo_iteration(&w, m, algo, a.device))?;
            let label = format!("{:>12} {:>5} on {}", r.algo, r.model, r.device);
            eprintln!("{}", iteration_line(&label, r.seconds, r.range, &r.phases));
            all.push(r);
        }
    }
    print_results("grpo_iteration", &all, a.env.out.as_deref())
}

/// `rlhf bench train` (`scoring == false`) or `rlhf bench scoring`.
pub(crate) fn bench_rate(a: DeviceArgs, scoring: bool) -> Result<()> {
    let (w, pool, models) = setup(&a.env.workload, a.env.threads, a.env.model.as_deref())?;
    let (name, value) = if scoring { ("scoring", "mean logit") } else { ("train_step", "loss") };
    let mut all = Vec::new();
    for m in &models {
        let r =
            pool.install(
                || {
                    if scoring {
                        bench::scoring(&w, m, a.device)
                    } else {
                        bench::train_step(&w, m, a.device)
                    }
                },
            )?;
        eprintln!(
            "{name} {:>5} on {}: {:.0} tok/s [{:.0}-{:.0}] ({} tokens, {value} {:.3})",
            r.model, r.device, r.tokens_per_s, r.range[0], r.range[1], r.tokens, r.loss
        );
        all.push(r);
    }
    print_results(name, &all, a.env.out.as_deref())
}
