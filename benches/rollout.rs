//! Rollout throughput on the fixed peer workload: batched sampling with the KV cache for the
//! `tiny` and `small` models at the workload's batch sizes (prompt 32, 64 new tokens,
//! temperature 1). The measured unit is the same `generate` call `rlhf bench rollout` times.
//!
//! `cargo bench --bench rollout` (reads `../shared/peers/workload.json`, or `RLHF_WORKLOAD`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf::bench::{RolloutBench, Workload};
use rlhf_policies::WeightDtype;

fn workload() -> Workload {
    let path = std::env::var_os("RLHF_WORKLOAD")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workload.json"));
    Workload::from_file(&path).expect("workload file")
}

fn rollout(c: &mut Criterion) {
    // the binary's allocator settings (src/malloc.rs), so the numbers match `rlhf bench`
    rlhf::malloc::tune_for_training();
    let w = workload();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(w.threads).build().expect("thread pool");
    let mut group = c.benchmark_group("rollout");
    group.sample_size(10);
    for (model, weights, tag) in
        [("tiny", WeightDtype::F32, ""), ("small", WeightDtype::F32, ""), ("small", WeightDtype::F16, "-f16")]
    {
        for &batch in &w.rollout.batch_sizes {
            let bench = RolloutBench::new(&w, model, batch, weights).expect("bench setup");
            group.throughput(Throughput::Elements((batch * w.rollout.max_new_tokens) as u64));
            group.bench_function(format!("{model}{tag}/b{batch}"), |b| {
                b.iter(|| pool.install(|| bench.run_once().expect("generate")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, rollout);
criterion_main!(benches);
