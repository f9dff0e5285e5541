//! `CommandReward` against a real child process (`tests/scripts/reward_server.py`): it scores,
//! and every way it can misbehave is a clear error — no zeros, no hang.

use std::time::{Duration, Instant};

use rlhf_envs::{CommandReward, EnvError, RewardInput, RewardModel};

fn server(mode: &str, timeout_ms: u64) -> CommandReward {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/reward_server.py");
    CommandReward::spawn("python3", &[script, mode], Duration::from_millis(timeout_ms)).unwrap()
}

fn batch() -> Vec<RewardInput> {
    vec![
        RewardInput {
            prompt: "p".into(),
            response: "banana".into(),
            prompt_ids: vec![1],
            response_ids: vec![2, 3],
            reference: None,
        },
        RewardInput {
            prompt: "q".into(),
            response: "xyz".into(),
            prompt_ids: vec![1],
            response_ids: vec![4],
            reference: None,
        },
    ]
}

fn err(mode: &str) -> String {
    let mut s = server(mode, 5_000);
    s.score(&batch()).expect_err("should fail").to_string()
}

#[test]
fn scores_from_a_child_process_over_several_requests() {
    let mut s = server("ok", 10_000);
    assert_eq!(s.score(&batch()).unwrap(), vec![4.0, 0.5]);
    assert_eq!(s.score(&batch()[1..]).unwrap(), vec![0.5]);
}

#[test]
fn a_crash_reports_exit_status_and_stderr() {
    let e = err("crash");
    assert!(e.contains("exit status: 3") && e.contains("simulated failure on request 1"), "{e}");
}

#[test]
fn a_hang_times_out() {
    let mut s = server("hang", 700);
    let t0 = Instant::now();
    let e = s.score(&batch()).unwrap_err().to_string();
    assert!(t0.elapsed() < Duration::from_secs(5), "returned after {:?}", t0.elapsed());
    assert!(e.contains("no reply within 0.7 s"), "{e}");
    // the process was killed; further calls fail fast instead of hanging
    assert!(s.score(&batch()).is_err());
}

#[test]
fn wrong_count_nan_malformed_and_wrong_id_are_errors() {
    assert!(err("count").contains("returned 1 scores for 2 responses"));
    let e = err("nan");
    assert!(e.contains("not finite"), "{e}");
    assert!(err("malformed").contains("malformed reply"));
    assert!(err("wrong_id").contains("does not match request id"));
}

#[test]
fn a_missing_program_is_an_error() {
    let e = CommandReward::spawn("/nonexistent/reward-program", &[], Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, EnvError::Reward { .. }) && e.to_string().contains("cannot start"), "{e}");
}

/// A Ctrl-C at the terminal goes to the foreground process group; the reward process is not in
/// it, so the trainer can finish its step with the scores and stop cleanly.
#[cfg(unix)]
#[test]
fn the_process_leads_a_process_group_of_its_own() {
    let mut s = server("pgid", 10_000);
    assert_eq!(s.score(&batch()).unwrap(), vec![1.0, 1.0]);
}
