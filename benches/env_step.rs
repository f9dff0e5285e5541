//! Environment stepping on the workload's PPO rollout shapes (32 prompts × 32 tokens, 64 new
//! tokens, EOS suppressed): `VecEnv::rollout`, `VecEnv::step` token by token, and the raw
//! baseline (`generate` + one teacher-forced reference pass). Same code as `rlhf bench env`.
//!
//! `cargo bench --bench env_step`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf::bench::Workload;
use rlhf::bench_env::EnvBench;

fn env_step(c: &mut Criterion) {
    // the binary's allocator settings (src/malloc.rs), so the numbers match `rlhf bench`
    rlhf::malloc::tune_for_training();
    let path = std::env::var_os("RLHF_WORKLOAD")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workload.json"));
    let w = Workload::from_file(&path).expect("workload file");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(w.threads).build().expect("thread pool");
    let mut group = c.benchmark_group("env_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements((w.ppo.batch * w.ppo.response_len) as u64));
    for model in ["tiny", "small"] {
        let bench = EnvBench::new(&w, model).expect("bench setup");
        group.bench_function(format!("{model}/vecenv_rollout"), |b| {
            b.iter(|| pool.install(|| bench.run_env().expect("rollout")))
        });
        group.bench_function(format!("{model}/vecenv_step"), |b| {
            b.iter(|| pool.install(|| bench.run_steps().expect("step")))
        });
        group.bench_function(format!("{model}/raw_generate_plus_reference"), |b| {
            b.iter(|| pool.install(|| bench.run_raw().expect("raw")))
        });
    }
    group.finish();
}

criterion_group!(benches, env_step);
criterion_main!(benches);
