//! Stopping a run cleanly (`rlhf::stop`, what Ctrl-C and SIGTERM do): the stage finishes its
//! step, writes a checkpoint there — between its regular ones — and returns `Interrupted`; a
//! resume from it logs exactly the metrics of an uninterrupted run. The stop flag is
//! process-wide, so this file's tests (one binary of their own) take turns.

mod common;

use std::path::Path;
use std::sync::Mutex;

use common::comparable_metrics;
use rlhf::stop::{self, Interrupted};

/// Held by each test while it may set the flag.
static FLAG: Mutex<()> = Mutex::new(());

/// Runs `train` with a stop requested before its first step: it must stop after that step with
/// a checkpoint at step 1.
fn stopped_after_one_step<R: std::fmt::Debug>(run_dir: &Path, train: impl FnOnce() -> anyhow::Result<R>) {
    stop::request();
    let err = train().unwrap_err();
    stop::clear();
    let i = err.downcast_ref::<Interrupted>().unwrap_or_else(|| panic!("not an interruption: {err:#}"));
    assert_eq!((i.step, i.run_dir.as_path()), (1, run_dir));
    assert!(i.checkpoint.join(rlhf::run::MARKER).is_file(), "{}", i.checkpoint.display());
    assert_eq!(i.checkpoint, run_dir.join("checkpoints/step-1"));
}

#[test]
fn a_stop_saves_then_interrupts_except_after_the_last_step() {
    let _turn = FLAG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let run = rlhf::run::RunDir::create(dir.path()).unwrap();
    let mut saves = vec![];
    for done in 1..=5 {
        stop::end_step("t", &run, (done, 5, 2), || {
            saves.push(done);
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(saves, [2, 4, 5]);
    stop::request();
    let mut saved = false;
    let err = stop::end_step("t", &run, (3, 5, 2), || {
        saved = true;
        Ok(())
    })
    .unwrap_err();
    let i = err.downcast_ref::<Interrupted>().expect("an Interrupted error");
    assert!(saved);
    assert_eq!((i.step, i.total), (3, 5));
    assert_eq!(i.checkpoint, run.checkpoint_dir(3));
    assert!(err.to_string().contains("stopped after step 3 of 5"), "{err}");
    // the last step ends the run as usual
    stop::end_step("t", &run, (5, 5, 2), || Ok(())).unwrap();
    // a failed save is the error, not the stop
    let err = stop::end_step("t", &run, (3, 5, 2), || anyhow::bail!("disk full")).unwrap_err();
    assert!(err.downcast_ref::<Interrupted>().is_none() && err.to_string().contains("disk full"));
    stop::clear();
    assert!(!stop::requested());
}

#[test]
fn a_stopped_pretraining_resumes_exactly() {
    use rlhf::stages::pretrain::{train, PretrainConfig};
    let _turn = FLAG.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("corpus.txt");
    std::fs::write(&corpus, "the quick brown fox jumps over the lazy dog.\n".repeat(40)).unwrap();
    let cfg = |name: &str| PretrainConfig {
        out_dir: d.path().join(name),
        files: vec![corpus.clone()],
        model: rlhf_policies::ModelConfig::gpt2_preset(1, 32, 2, 2, 32),
        block_size: 16,
        batch_size: 4,
        steps: 6,
        eval_every: 3,
        eval_batches: 1,
        checkpoint_every: 3,
        sample_tokens: 4,
        ..Default::default()
    };
    train(cfg("whole"), false).unwrap();
    stopped_after_one_step(&d.path().join("run"), || train(cfg("run"), false));
    train(cfg("run"), true).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("run")), comparable_metrics(&d.path().join("whole")));
}

#[test]
fn a_stopped_reward_model_resumes_exactly_and_fits_its_normalisation_at_the_end() {
    let _turn = FLAG.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let train = rlhf::stages::reward::train;
    let whole = train(common::marker_cfg(a.path(), 4), false).unwrap();
    stopped_after_one_step(&b.path().join("run"), || train(common::marker_cfg(b.path(), 4), false));
    let stopped = common::read_json(&b.path().join("run/checkpoints/step-1/config.json"));
    assert!(stopped.get("reward_normalization").is_none(), "fitted only after the last step");
    let resumed = train(common::marker_cfg(b.path(), 4), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&a.path().join("run")));
    assert!(whole.normalization.is_some());
    assert_eq!(format!("{:?}", resumed.normalization), format!("{:?}", whole.normalization));
}

#[test]
fn a_stopped_ppo_run_resumes_exactly() {
    let _turn = FLAG.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg =
        |dir: &Path| rlhf::stages::ppo::PpoConfig { val_fraction: 0.34, eval_every: 2, ..common::ppo_config(dir, 3) };
    let (whole, run) = (cfg(a.path()), cfg(b.path()));
    rlhf::stages::ppo::train(whole, false).unwrap();
    stopped_after_one_step(&b.path().join("ppo"), || rlhf::stages::ppo::train(run.clone(), false));
    rlhf::stages::ppo::train(run, true).unwrap();
    let m = comparable_metrics(&b.path().join("ppo"));
    assert_eq!(m.len(), 4, "three iterations and the evaluation before them");
    assert_eq!(m, comparable_metrics(&a.path().join("ppo")));
}

#[test]
fn a_stopped_grpo_run_resumes_exactly() {
    use rlhf::stages::grpo::{train, GrpoConfig};
    let _turn = FLAG.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = |dir: &Path| {
        let (policy, prompts) = common::pretrained_policy(dir);
        GrpoConfig {
            out_dir: dir.join("run"),
            policy,
            prompts,
            reward: Some(rlhf::stages::reward_spec::RewardSpec::Keywords { keywords: vec!["a".into()], weight: 1.0 }),
            prompts_per_step: 2,
            num_generations: 4,
            minibatch_size: 8,
            max_new_tokens: 8,
            max_prompt_len: 16,
            iterations: 3,
            checkpoint_every: 3,
            ..Default::default()
        }
    };
    let (whole, run) = (cfg(a.path()), cfg(b.path()));
    train(whole, false).unwrap();
    stopped_after_one_step(&b.path().join("run"), || train(run.clone(), false));
    train(run, true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&a.path().join("run")));
}

#[test]
fn a_second_signal_exits_unless_it_repeats_the_first_within_a_second() {
    use std::time::{Duration, Instant};
    let _turn = FLAG.lock().unwrap_or_else(|e| e.into_inner());
    let (t0, mut first) = (Instant::now(), None);
    assert_eq!(stop::on_signal(&mut first, t0), stop::Signal::Stop);
    assert!(stop::requested());
    assert_eq!(stop::on_signal(&mut first, t0 + Duration::from_millis(300)), stop::Signal::Repeat);
    assert_eq!(stop::on_signal(&mut first, t0 + Duration::from_millis(1500)), stop::Signal::Exit);
    stop::clear();
}
