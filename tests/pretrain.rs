//! Pretraining end to end on a small corpus: the loss falls, a run resumed from a checkpoint
//! logs exactly the metrics of the uninterrupted run, and bad input gives clear errors.

mod common;

use common::comparable_metrics;
use rlhf::schedule::LrSchedule;
use rlhf::stages::pretrain::{train, PretrainConfig, TokenizerSpec};
use rlhf_policies::ModelConfig;

const TEXT: &str = "the quick brown fox jumps over the lazy dog.\nthe lazy dog sleeps in the sun.\n";

fn cfg(dir: &std::path::Path, steps: usize) -> PretrainConfig {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(40)).unwrap();
    PretrainConfig {
        out_dir: dir.join("run"),
        files: vec![corpus],
        model: ModelConfig::gpt2_preset(1, 32, 2, 2, 32),
        block_size: 16,
        batch_size: 4,
        grad_accum: 2,
        steps,
        optim: rlhf_policies::AdamWConfig { lr: 1e-2, ..PretrainConfig::default().optim },
        schedule: LrSchedule::warmup_cosine(3),
        eval_every: 10,
        eval_batches: 2,
        checkpoint_every: 10,
        sample_tokens: 10,
        ..Default::default()
    }
}

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn loss_falls_and_resume_is_exact() {
    let a = tempfile::tempdir().unwrap();
    let report = train(cfg(a.path(), 30), false).unwrap();
    let full = metrics(a.path());
    assert_eq!(full.len(), 30);
    let first = full[0]["loss"].as_f64().unwrap();
    assert!(report.train_loss < 0.5 * first as f32, "loss {first} -> {}", report.train_loss);
    assert!(full[9]["val_loss"].is_number() && full[29]["val_loss"].is_number() && full[10].get("val_loss").is_none());
    let samples = std::fs::read_to_string(a.path().join("run/samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 3);
    // each checkpoint's marker holds its step's held-out loss; the best is their argmin
    let run = rlhf::run::RunDir::create(a.path().join("run")).unwrap();
    let mut lowest = (0, f64::INFINITY);
    for step in [10, 20, 30] {
        let marker = common::read_json(&run.checkpoint_dir(step).join("checkpoint.json"));
        let val_loss = full[step - 1]["val_loss"].as_f64().unwrap();
        assert_eq!(marker["meta"]["held_out_loss"].as_f64(), Some(val_loss), "step {step}");
        if val_loss < lowest.1 {
            lowest = (step, val_loss);
        }
    }
    assert_eq!(run.best_checkpoint().unwrap(), Some((lowest.0, run.checkpoint_dir(lowest.0), lowest.1)));

    // interrupted run: a crash after step 20's checkpoint, in the middle of writing step
    // 30's (its folder has no marker; log lines past step 20 are stale), then resume
    let b = tempfile::tempdir().unwrap();
    train(cfg(b.path(), 30), false).unwrap();
    std::fs::remove_file(b.path().join("run/checkpoints/step-30/checkpoint.json")).unwrap();
    std::fs::create_dir_all(b.path().join("run/checkpoints/.tmp-step-30-99")).unwrap();
    train(cfg(b.path(), 30), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&a.path().join("run")));
    assert!(b.path().join("run/checkpoints/step-30/checkpoint.json").is_file());
    assert!(!b.path().join("run/checkpoints/.tmp-step-30-99").exists(), "the cut-off write is cleared on resume");
}

#[test]
fn keep_checkpoints_leaves_the_newest_and_resume_still_works() {
    let d = tempfile::tempdir().unwrap();
    let keep_one = |steps| PretrainConfig { keep_checkpoints: 1, ..cfg(d.path(), steps) };
    train(keep_one(20), false).unwrap();
    let left: Vec<String> = std::fs::read_dir(d.path().join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["step-20"]);
    let report = train(keep_one(30), true).unwrap();
    assert_eq!(report.steps, 30);
    assert!(d.path().join("run/checkpoints/step-30").is_dir() && !d.path().join("run/checkpoints/step-20").exists());
}

#[test]
fn no_validation_split_trains_without_val_loss() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 10);
    c.val_fraction = 0.0;
    let report = train(c, false).unwrap();
    assert!(report.val_loss.is_none() && report.train_loss.is_finite());
    assert!(!metrics(d.path()).iter().any(|m| m.get("val_loss").is_some()));
}

#[test]
fn separate_validation_files_leave_all_of_the_corpus_to_training() {
    let d = tempfile::tempdir().unwrap();
    let mut whole = cfg(d.path(), 10);
    whole.val_fraction = 0.0;
    let whole_report = train(whole, false).unwrap();
    let losses =
        |dir: &std::path::Path| -> Vec<f64> { metrics(dir).iter().map(|m| m["loss"].as_f64().unwrap()).collect() };
    let e = tempfile::tempdir().unwrap();
    let mut c = cfg(e.path(), 10);
    let val = e.path().join("val.txt");
    std::fs::write(&val, "the dog jumps over the quick fox.\n".repeat(5)).unwrap();
    c.val_files = vec![val.clone()];
    c.val_fraction = 0.5; // not used when val_files are given
    let report = train(c.clone(), false).unwrap();
    // the same training stream, step for step, as with no validation split at all
    assert_eq!(losses(e.path()), losses(d.path()));
    assert_eq!(report.train_loss, whole_report.train_loss);
    assert!(report.val_loss.is_some_and(f32::is_finite) && metrics(e.path())[9]["val_loss"].is_number());
    // a validation file shorter than a block is an error naming it
    std::fs::write(&val, "the dog.").unwrap();
    c.out_dir = e.path().join("run-short");
    let err = train(c, false).unwrap_err().to_string();
    assert!(err.contains("val.txt") && err.contains("block_size = 16"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 3);
    c.files = vec![d.path().join("nope.txt")];
    assert!(train(c, false).unwrap_err().to_string().contains("nope.txt"));
    let mut c = cfg(d.path(), 3);
    c.block_size = 100;
    assert!(train(c, false).unwrap_err().to_string().contains("n_positions"));
    let mut c = cfg(d.path(), 3);
    c.out_dir = d.path().join("fresh");
    assert!(train(c, true).unwrap_err().to_string().contains("no complete checkpoint"));
    let mut c = cfg(d.path(), 3);
    c.tokenizer = TokenizerSpec::File { path: d.path().join("missing.json") };
    assert!(train(c, false).unwrap_err().to_string().contains("missing.json"));
}
