//! One PPO iteration at the workload's `ppo` shapes (32 prompts × 32 tokens → 64 sampled
//! tokens, scoring, GAE, 4 epochs × 4 minibatches of 8) for `tiny` with a shared value head
//! and a separate critic — the trainer `rlhf ppo` runs.
//!
//! `cargo bench --bench ppo_iteration`

use criterion::{criterion_group, criterion_main, Criterion};
use rlhf::bench::Workload;
use rlhf::bench_ppo::ppo_trainer;

fn ppo_iteration(c: &mut Criterion) {
    // the binary's allocator settings (src/malloc.rs), so the numbers match `rlhf bench`
    rlhf::malloc::tune_for_training();
    let path = std::env::var_os("RLHF_WORKLOAD")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workload.json"));
    let w = Workload::from_file(&path).expect("workload file");
    // the trainer holds a non-Send detokenizer, so size the global pool instead of install()
    let _ = rayon::ThreadPoolBuilder::new().num_threads(w.threads).build_global();
    let mut group = c.benchmark_group("ppo_iteration");
    group.sample_size(10);
    for (name, shared) in [("tiny/shared", true), ("tiny/separate", false)] {
        let mut t = ppo_trainer(&w, "tiny", shared, &dfdx::prelude::Cpu::default()).expect("bench setup");
        let mut it = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                t.iteration(it).expect("iteration");
                it += 1;
            })
        });
    }
    group.finish();
}

criterion_group!(benches, ppo_iteration);
criterion_main!(benches);
