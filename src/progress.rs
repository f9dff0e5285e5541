//! Progress: position, ETA, and a message with loss and tokens/s. On a terminal, an indicatif
//! bar; when stderr is not one (a batch job's log, a pipe, `nohup`), where a bar would not
//! show, a plain line every 30 seconds (`RLHF_PROGRESS_SECS` sets the interval, 0 gives a line
//! per step) and one at the end.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{HumanDuration, ProgressBar, ProgressStyle};

/// The environment variable with the seconds between plain progress lines.
pub const INTERVAL_VAR: &str = "RLHF_PROGRESS_SECS";
/// Seconds between plain progress lines by default.
const DEFAULT_INTERVAL_S: u64 = 30;

/// A stage's progress over its steps.
pub struct Progress {
    bar: ProgressBar,
    stage: String,
    /// Plain lines instead of the bar: where they go, how often, and when and where the last was.
    lines: Option<Lines>,
}

struct Lines {
    out: Box<dyn Write + Send>,
    every: Duration,
    last: Option<(Instant, u64)>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("stage", &self.stage).field("lines", &self.lines.is_some()).finish()
    }
}

/// Progress over `total` steps labelled `stage`: a bar on a terminal, plain lines on stderr
/// otherwise.
pub fn bar(total: u64, stage: &str) -> Progress {
    if std::io::stderr().is_terminal() {
        return Progress::new(total, stage, None);
    }
    let secs = std::env::var(INTERVAL_VAR).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(DEFAULT_INTERVAL_S);
    Progress::lines(total, stage, Duration::from_secs(secs), Box::new(std::io::stderr()))
}

impl Progress {
    fn new(total: u64, stage: &str, lines: Option<Lines>) -> Self {
        let bar = if lines.is_some() { ProgressBar::hidden() } else { ProgressBar::new(total) };
        bar.set_length(total);
        let style =
            ProgressStyle::with_template("{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} (eta {eta}) {msg}")
                .expect("valid template")
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(stage.to_string());
        Progress { bar, stage: stage.to_string(), lines }
    }

    /// Plain progress lines into `out`, at most one per `every` (and one at the end).
    pub fn lines(total: u64, stage: &str, every: Duration, out: Box<dyn Write + Send>) -> Self {
        Self::new(total, stage, Some(Lines { out, every, last: None }))
    }

    /// Sets the position (a resumed run's first step).
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Sets the message shown after the position (loss, tokens/s, …).
    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// Advances by `delta` steps; in plain-line mode, writes a line when one is due (the first
    /// step's is, to show the rate early).
    pub fn inc(&mut self, delta: u64) {
        self.bar.inc(delta);
        let due = self.lines.as_ref().is_some_and(|l| l.last.is_none_or(|(t, _)| t.elapsed() >= l.every));
        if due {
            self.write_line();
        }
    }

    /// Ends the progress: the bar stays on screen, or a last line is written (unless the last
    /// one already showed this position).
    pub fn finish(&mut self) {
        self.bar.finish();
        let pos = self.bar.position();
        if self.lines.as_ref().is_some_and(|l| l.last.is_none_or(|(_, at)| at != pos)) {
            self.write_line();
        }
    }

    fn write_line(&mut self) {
        let b = &self.bar;
        let (pos, len, msg) = (b.position(), b.length().unwrap_or(0), b.message());
        let eta = if pos < len { format!(" (eta {})", HumanDuration(b.eta())) } else { String::new() };
        let line = format!("{} {pos}/{len} [{}]{eta} {msg}", self.stage, clock(b.elapsed()));
        if let Some(l) = self.lines.as_mut() {
            // progress is best-effort: a closed log must not stop training
            let _ = writeln!(l.out, "{}", line.trim_end()).and_then(|_| l.out.flush());
            l.last = Some((Instant::now(), pos));
        }
    }
}

/// `h:mm:ss`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Sink {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
        }
    }

    #[test]
    fn plain_lines_come_at_the_first_step_when_due_and_at_the_end() {
        // an hour apart: only the first step's line and the last
        let sink = Sink::default();
        let mut p = Progress::lines(5, "sft", Duration::from_secs(3600), Box::new(sink.clone()));
        p.set_position(1);
        for step in 2..=5 {
            p.set_message(format!("loss {step}.000 | 99 tok/s"));
            p.inc(1);
        }
        p.finish();
        let lines = sink.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("sft 2/5 [0:00:00] (eta ") && lines[0].ends_with(" loss 2.000 | 99 tok/s"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "sft 5/5 [0:00:00] loss 5.000 | 99 tok/s");
        // every step: a line each, and none repeated at the end
        let sink = Sink::default();
        let mut p = Progress::lines(3, "ppo", Duration::ZERO, Box::new(sink.clone()));
        for _ in 0..3 {
            p.inc(1);
        }
        p.finish();
        let pos: Vec<String> = sink.lines().iter().map(|l| l.split(' ').nth(1).unwrap().to_string()).collect();
        assert_eq!(pos, ["1/3", "2/3", "3/3"]);
    }

    #[test]
    fn the_clock_reads_hours_minutes_seconds() {
        assert_eq!(clock(Duration::from_secs(3 * 3600 + 7 * 60 + 5)), "3:07:05");
        assert_eq!(clock(Duration::from_millis(59_999)), "0:00:59");
    }
}
