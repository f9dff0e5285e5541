//! Stopping a run cleanly. Ctrl-C (SIGINT), SIGTERM (a scheduler's pre-emption, `kill`) or
//! SIGHUP ask the running stage to finish its current step (a PPO or GRPO iteration), write a
//! checkpoint there — an ordinary one, so `--resume` continues the run exactly, metrics step
//! for step as if it had not stopped — and return [`Interrupted`]. Another signal, a second or
//! more later, ends the process at once (exit status 130) without a checkpoint; one it cuts off
//! mid-write is never taken for a checkpoint ([`crate::run::RunDir::save_checkpoint`]).
//!
//! The `rlhf` binary installs the handler ([`install_handler`]) for its training commands; a
//! program using the library can do the same, or call [`request`] itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use crate::run::RunDir;

/// Whether a stop has been asked for (and not yet [`clear`]ed).
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The exit status of a process stopped by a signal: 128 + SIGINT, as shells report it.
pub const EXIT_STATUS: i32 = 130;

/// A stage stopped before its last step because a stop was asked for; its last checkpoint is
/// at the step it stopped after.
#[derive(Debug, thiserror::Error)]
#[error("{stage}: stopped after step {step} of {total}; checkpoint {}", checkpoint.display())]
pub struct Interrupted {
    /// The stage's name.
    pub stage: String,
    /// The steps (iterations) done, and the step of the checkpoint.
    pub step: usize,
    /// The steps the run was to take.
    pub total: usize,
    /// The run folder (what `--resume` takes).
    pub run_dir: PathBuf,
    /// The checkpoint written at `step`.
    pub checkpoint: PathBuf,
}

/// Installs the signal handler: the first SIGINT / SIGTERM / SIGHUP calls [`request`] and says
/// so on stderr; one more, a second or more later, exits the process with [`EXIT_STATUS`]
/// ([`on_signal`]).
pub fn install_handler() -> Result<(), ctrlc::Error> {
    let first = std::sync::Mutex::new(None);
    ctrlc::set_handler(move || {
        let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
        match on_signal(&mut first, std::time::Instant::now()) {
            Signal::Stop => eprintln!(
                "\nstop requested: the current step finishes, then a checkpoint is written \
                 (signal again to stop at once, without one)"
            ),
            Signal::Repeat => {}
            Signal::Exit => {
                eprintln!("\nstopping now, without a checkpoint");
                std::process::exit(EXIT_STATUS);
            }
        }
    })
}

/// What a signal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The first: stop after the current step.
    Stop,
    /// Within a second of the first: the same request delivered twice (GNU `timeout` signals
    /// its child and then the child's process group; a job may get SIGHUP with SIGTERM).
    Repeat,
    /// A later one: the user insists.
    Exit,
}

/// The handler's decision for a signal at `now`, given when the first one came (`first`, set
/// by the first): the first requests the stop ([`request`]).
pub fn on_signal(first: &mut Option<std::time::Instant>, now: std::time::Instant) -> Signal {
    match *first {
        None => {
            *first = Some(now);
            request();
            Signal::Stop
        }
        Some(t) if now.saturating_duration_since(t) < std::time::Duration::from_secs(1) => Signal::Repeat,
        Some(_) => Signal::Exit,
    }
}

/// Asks the running stage to stop after its current step.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Withdraws a request (before running another stage in the same process).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}

/// Whether a stop has been asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Ends step `done` of `total` of a stage's loop: runs `save` (the stage's checkpoint at
/// `done`) every `every` steps, at the last step, and when a stop has been asked for — then,
/// for the stop, returns [`Interrupted`] (after the last step there is nothing to stop).
pub fn end_step(
    stage: &str,
    run: &RunDir,
    (done, total, every): (usize, usize, usize),
    save: impl FnOnce() -> Result<()>,
) -> Result<()> {
    // read once, so a signal arriving after the save cannot stop a step without a checkpoint
    let stop = requested() && done < total;
    if stop || done % every == 0 || done == total {
        save()?;
    }
    if stop {
        let checkpoint = run.checkpoint_dir(done);
        return Err(
            Interrupted { stage: stage.into(), step: done, total, run_dir: run.root.clone(), checkpoint }.into()
        );
    }
    Ok(())
}
