//! `CommandReward`: a reward model in any language, as a long-lived child process speaking
//! JSON lines over stdin/stdout (`../shared/docs/design.md` §5).
//!
//! Request (one line): `{"id": 7, "episodes": [{"prompt": "...", "response": "...",
//! "prompt_ids": [...], "response_ids": [...]}, ...]}` (plus `"reference": "..."` when the
//! prompts carry reference answers). Reply (one line):
//! `{"id": 7, "scores": [0.3, ...]}`. The reply must come within the timeout, carry the same
//! id, and hold one finite number per episode; anything else is an error naming the process,
//! with its exit status and the tail of its stderr when it died. Never a silent zero.
//!
//! On Unix the process runs in a process group of its own, so a Ctrl-C typed at the terminal
//! reaches the trainer (which finishes its step, scores included, and writes a checkpoint) and
//! not the reward process; it ends when its stdin is closed.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::EnvError;
use crate::reward::{check_scores, RewardInput, RewardModel};

/// Lines of the child's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// An external reward process.
#[derive(Debug)]
pub struct CommandReward {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    timeout: Duration,
    next_id: u64,
}

#[derive(Serialize)]
struct Request<'a> {
    id: u64,
    episodes: &'a [RewardInput],
}

#[derive(Deserialize)]
struct Reply {
    id: u64,
    scores: Vec<f64>,
}

impl CommandReward {
    /// Starts `program args…` and waits at most `timeout` for each reply.
    pub fn spawn(program: &str, args: &[&str], timeout: Duration) -> Result<Self, EnvError> {
        let name = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // its own process group: a Ctrl-C at the terminal goes to the foreground group, and the
        // trainer stops cleanly after the step (which may still need this process's scores);
        // the process ends when the trainer closes its stdin, or is killed (`Drop`)
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|e| EnvError::reward(&name, format!("cannot start: {e}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail_w = Arc::clone(&tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = tail_w.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let stdin = child.stdin.take();
        Ok(CommandReward { name, child, stdin, lines, stderr: tail, timeout, next_id: 0 })
    }

    fn stderr_tail(&self) -> String {
        // give the stderr reader a moment to collect the last lines of a dying process
        std::thread::sleep(Duration::from_millis(50));
        let t = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_empty() {
            "(stderr empty)".into()
        } else {
            format!("stderr tail:\n{}", t.iter().cloned().collect::<Vec<_>>().join("\n"))
        }
    }

    /// The process is gone or unusable: report its exit status and stderr.
    fn died(&mut self, what: &str) -> EnvError {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited with {s}"),
            Ok(None) => match self.child.wait_timeout_kill() {
                Some(s) => format!("exited with {s}"),
                None => "did not exit".into(),
            },
            Err(e) => format!("status unknown ({e})"),
        };
        EnvError::reward(&self.name, format!("{what}; the process {status}; {}", self.stderr_tail()))
    }
}

trait WaitBriefly {
    fn wait_timeout_kill(&mut self) -> Option<std::process::ExitStatus>;
}

impl WaitBriefly for Child {
    /// Waits up to 200 ms for the child to exit on its own.
    fn wait_timeout_kill(&mut self) -> Option<std::process::ExitStatus> {
        for _ in 0..20 {
            if let Ok(Some(s)) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl RewardModel for CommandReward {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        self.next_id += 1;
        let id = self.next_id;
        let line = serde_json::to_string(&Request { id, episodes: batch })
            .map_err(|e| EnvError::reward(&self.name, e.to_string()))?;
        let sent = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}").and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed after an earlier failure")),
        };
        if let Err(e) = sent {
            return Err(self.died(&format!("writing the request failed ({e})")));
        }
        let reply = match self.lines.recv_timeout(self.timeout) {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(self.died(&format!("reading the reply failed ({e})"))),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                self.stdin = None;
                return Err(self.died(&format!("no reply within {:.1} s (killed)", self.timeout.as_secs_f64())));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(self.died("stdout closed before a reply")),
        };
        let reply: Reply = serde_json::from_str(&reply).map_err(|e| {
            let not_finite =
                ["NaN", "Infinity"].iter().any(|t| reply.contains(t)) || e.to_string().contains("out of range");
            let hint =
                if not_finite { " (a score is not finite: NaN/Infinity; scores must be finite numbers)" } else { "" };
            let shown = truncate(&reply, 200);
            EnvError::reward(
                &self.name,
                format!("malformed reply {shown:?}: {e}{hint}; expected {{\"id\": {id}, \"scores\": [...]}}"),
            )
        })?;
        if reply.id != id {
            return Err(EnvError::reward(&self.name, format!("reply id {} does not match request id {id}", reply.id)));
        }
        let scores: Vec<f32> = reply.scores.iter().map(|&s| s as f32).collect();
        check_scores(&self.name, &scores, batch.len())?;
        Ok(scores)
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        self.stdin = None; // EOF lets a well-behaved process exit
        if self.child.wait_timeout_kill().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
