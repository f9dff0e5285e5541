//! One training step at the workload's `train_step` shape (32 × 96: forward, cross-entropy,
//! backward, AdamW) for `tiny` and `small` — the pretrain stage's own step.
//!
//! `cargo bench --bench train_step`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf::bench::{TrainStepBench, Workload};

fn train_step(c: &mut Criterion) {
    // the binary's allocator settings (src/malloc.rs), so the numbers match `rlhf bench`
    rlhf::malloc::tune_for_training();
    let path = std::env::var_os("RLHF_WORKLOAD")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workload.json"));
    let w = Workload::from_file(&path).expect("workload file");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(w.threads).build().expect("thread pool");
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for model in ["tiny", "small"] {
        let mut bench = TrainStepBench::new(&w, model, &dfdx::prelude::Cpu::default()).expect("bench setup");
        group.throughput(Throughput::Elements(bench.tokens as u64));
        group.bench_function(model, |b| b.iter(|| pool.install(|| bench.step().expect("step"))));
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
