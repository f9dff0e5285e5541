//! Run folders: `runs/<name>/` with the resolved `config.json`, `metrics.jsonl` (one JSON
//! object per logged step), `samples.jsonl`, and `checkpoints/step-N/` written atomically.
//!
//! A checkpoint is written into a hidden temporary folder, completed with a
//! `checkpoint.json` marker (step and metadata), then renamed into place; a folder without
//! the marker — a crash mid-write — is never taken as a checkpoint.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// The marker file that makes a checkpoint folder valid.
pub const MARKER: &str = "checkpoint.json";
/// The run's resolved config.
pub const CONFIG: &str = "config.json";
/// One JSON object per logged step.
pub const METRICS: &str = "metrics.jsonl";
/// Sample generations, one JSON object each.
pub const SAMPLES: &str = "samples.jsonl";
/// The run's HTML report ([`crate::report`]).
pub const REPORT: &str = "report.html";
/// The logs a run appends to step by step.
const LOGS: [&str; 2] = [METRICS, SAMPLES];
/// The folder of the run's checkpoints.
const CHECKPOINTS: &str = "checkpoints";
/// How a checkpoint's folder is named while it is written.
const TMP_PREFIX: &str = ".tmp-step-";
/// Where `--overwrite` keeps the previous run's files while the new run starts
/// ([`RunDir::set_aside`]).
const SET_ASIDE: &str = ".overwritten";
/// What a run writes into its folder: what `--overwrite` replaces.
const RUN_FILES: [&str; 5] = [CONFIG, REPORT, METRICS, SAMPLES, CHECKPOINTS];

/// Moves each of [`RUN_FILES`] that `from` holds into `to`.
fn move_run_files(from: &Path, to: &Path) -> Result<()> {
    for name in RUN_FILES {
        let (src, dst) = (from.join(name), to.join(name));
        if src.exists() {
            std::fs::rename(&src, &dst).with_context(|| format!("moving {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// A run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// `runs/<name>`.
    pub root: PathBuf,
    /// How many complete checkpoints to keep (the newest); 0 keeps every one.
    keep: usize,
}

impl RunDir {
    /// Creates (or reopens) the folder and its `checkpoints/`.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(CHECKPOINTS)).with_context(|| format!("creating {}", root.display()))?;
        Ok(RunDir { root, keep: 0 })
    }

    /// Keeps only the newest `keep` complete checkpoints, deleting older ones after each new
    /// one is written (0, the default, keeps every one).
    pub fn keep_last(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// Opens the folder for a stage: with `resume`, as it is (the run to continue); for a fresh
    /// run, the folder must not hold a previous run's logs or checkpoints — its metrics would
    /// mix with the new run's, and a later `--resume` could pick up the old run's checkpoint.
    pub fn open(root: impl Into<PathBuf>, resume: bool) -> Result<Self> {
        let run = Self::create(root)?;
        if resume {
            run.remove_incomplete()?;
        } else {
            let left = run.previous_run()?;
            if !left.is_empty() {
                bail!(
                    "{} already holds a run ({}): continue it with `--resume {0}`, replace it with \
                     `--overwrite`, or choose another out_dir",
                    run.root.display(),
                    left.join(", ")
                );
            }
        }
        Ok(run)
    }

    /// Deletes the temporary folders of checkpoints whose writing was cut off (a crash, a
    /// second Ctrl-C): never valid, they would only take up disk; said on stderr.
    fn remove_incomplete(&self) -> Result<()> {
        let dir = self.root.join(CHECKPOINTS);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(TMP_PREFIX)) {
                std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
                eprintln!("removed {}: a checkpoint whose writing was cut off", path.display());
            }
        }
        Ok(())
    }

    /// What a previous run left in the folder: non-empty logs and checkpoint folders (none when
    /// `checkpoints/` is missing).
    fn previous_run(&self) -> Result<Vec<String>> {
        let mut left = vec![];
        for name in LOGS {
            let path = self.root.join(name);
            if path.metadata().is_ok_and(|m| m.len() > 0) {
                left.push(name.to_string());
            }
        }
        let dir = self.root.join(CHECKPOINTS);
        let n = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.count(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        if n > 0 {
            left.push(format!("{n} entries in {CHECKPOINTS}/"));
        }
        Ok(left)
    }

    /// Deletes what a run writes into `root` — `config.json`, the logs, `report.html` and
    /// `checkpoints/` — leaving anything else there alone (`--overwrite`).
    pub fn clear(root: &Path) -> Result<()> {
        for name in [CONFIG, REPORT].into_iter().chain(LOGS) {
            let path = root.join(name);
            if path.exists() {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        let dir = root.join(CHECKPOINTS);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// `--overwrite`, first half: moves what a run writes into `root` (config, logs, report,
    /// checkpoints) into `root/.overwritten/`, anything else staying, so that a new run that
    /// stops before it writes anything — a config, model or data error — can give the previous
    /// run back ([`RunDir::settle_overwrite`]). A set-aside left by a crash is deleted first.
    pub fn set_aside(root: &Path) -> Result<()> {
        let aside = root.join(SET_ASIDE);
        if aside.exists() {
            std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
        }
        std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
        move_run_files(root, &aside)
    }

    /// `--overwrite`, second half, once the new run has stopped (done, failed or interrupted):
    /// if it left no logs and no checkpoints, the previous run's files go back in place of its
    /// config and report, and this returns `true`; otherwise the previous run is deleted.
    pub fn settle_overwrite(root: &Path) -> Result<bool> {
        let aside = root.join(SET_ASIDE);
        if !aside.is_dir() {
            return Ok(false);
        }
        let new_run = RunDir { root: root.to_path_buf(), keep: 0 };
        if !new_run.previous_run()?.is_empty() {
            std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
            return Ok(false);
        }
        Self::clear(root)?;
        move_run_files(&aside, root)?;
        std::fs::remove_dir(&aside).with_context(|| format!("removing {}", aside.display()))?;
        Ok(true)
    }

    /// Writes the resolved config as `config.json` (atomically).
    pub fn write_config<T: Serialize>(&self, cfg: &T) -> Result<()> {
        write_atomic(&self.root.join(CONFIG), serde_json::to_string_pretty(cfg)?.as_bytes())
    }

    /// Appends to `metrics.jsonl`.
    pub fn metrics(&self) -> Result<JsonlWriter> {
        JsonlWriter::append(&self.root.join(METRICS))
    }

    /// Appends to `samples.jsonl`.
    pub fn samples(&self) -> Result<JsonlWriter> {
        JsonlWriter::append(&self.root.join(SAMPLES))
    }

    /// The folder of the checkpoint at `step`.
    pub fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.root.join(CHECKPOINTS).join(format!("step-{step}"))
    }

    /// Writes a checkpoint atomically: `write` fills a temporary folder, the marker (with
    /// `meta`) is written last, and the folder is renamed to `checkpoints/step-N`.
    pub fn save_checkpoint<M: Serialize>(
        &self,
        step: usize,
        meta: &M,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let ckpts = self.root.join(CHECKPOINTS);
        let tmp = ckpts.join(format!("{TMP_PREFIX}{step}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        if let Err(e) = write(&tmp) {
            // a failed write (a full disk, say) leaves nothing behind to take up space
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("writing checkpoint {step} into {}", tmp.display())));
        }
        let marker = serde_json::json!({ "step": step, "meta": meta });
        std::fs::write(tmp.join(MARKER), serde_json::to_string_pretty(&marker)?)?;
        let dst = self.checkpoint_dir(step);
        if dst.exists() {
            let old = ckpts.join(format!(".old-step-{step}"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&dst, &old)?;
            std::fs::rename(&tmp, &dst)?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&tmp, &dst)?;
        }
        self.prune()?;
        Ok(dst)
    }

    /// The complete checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(usize, PathBuf)>> {
        let dir = self.root.join(CHECKPOINTS);
        if !dir.exists() {
            return Ok(vec![]);
        }
        let mut out = vec![];
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) else { continue };
            if path.join(MARKER).is_file() {
                out.push((step, path)); // without the marker: a crash mid-write, never picked up
            }
        }
        out.sort();
        Ok(out)
    }

    /// The complete checkpoint with the lowest held-out loss recorded in its marker (the
    /// earliest of equals), with that loss; `None` when no marker records one.
    pub fn best_checkpoint(&self) -> Result<Option<(usize, PathBuf, f64)>> {
        let mut best: Option<(usize, PathBuf, f64)> = None;
        for (step, path) in self.checkpoints()? {
            let marker = path.join(MARKER);
            let text = std::fs::read_to_string(&marker).with_context(|| format!("reading {}", marker.display()))?;
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{}", marker.display()))?;
            let Some(loss) = v["meta"]["held_out_loss"].as_f64() else { continue };
            if best.as_ref().is_none_or(|b| loss < b.2) {
                best = Some((step, path, loss));
            }
        }
        Ok(best)
    }

    /// Deletes all but the newest `keep` complete checkpoints (see [`RunDir::keep_last`]),
    /// sparing the one with the lowest held-out loss ([`RunDir::best_checkpoint`]).
    fn prune(&self) -> Result<()> {
        if self.keep == 0 {
            return Ok(());
        }
        let all = self.checkpoints()?;
        let best = self.best_checkpoint()?.map(|b| b.0);
        for (step, path) in &all[..all.len().saturating_sub(self.keep)] {
            if Some(*step) == best {
                continue;
            }
            // renamed first (atomic), so a crash mid-delete never leaves a partial checkpoint
            // that still looks complete
            let doomed = self.root.join(CHECKPOINTS).join(format!(".del-step-{step}-{}", std::process::id()));
            std::fs::rename(path, &doomed)?;
            std::fs::remove_dir_all(&doomed)
                .with_context(|| format!("removing the old checkpoint {}", doomed.display()))?;
        }
        Ok(())
    }

    /// The valid checkpoint with the highest step, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<(usize, PathBuf)>> {
        Ok(self.checkpoints()?.pop())
    }

    /// Drops `metrics.jsonl` and `samples.jsonl` lines whose `step` is past `step` (written
    /// after the checkpoint a resume restarts from), so a resumed run's logs read as one run.
    pub fn truncate_logs_after(&self, step: usize) -> Result<()> {
        for name in LOGS {
            let path = self.root.join(name);
            if !path.exists() {
                continue;
            }
            let mut kept = String::new();
            for (i, line) in BufReader::new(File::open(&path)?).lines().enumerate() {
                let line = line?;
                let v: Value =
                    serde_json::from_str(&line).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
                let s = v.get("step").and_then(Value::as_u64);
                if s.is_none_or(|s| s as usize <= step) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }
}

/// A model path as a user gives it: a model folder or file, as it is, or a training run's
/// folder (`runs/sft`: it holds `checkpoints/` and no `config.json` of a model), which stands
/// for its newest complete checkpoint — said on stderr, since a later run may add newer ones.
/// A path that does not exist is an error saying so.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        bail!("{}: no such model folder or file", path.display());
    }
    let is_model = path.is_file()
        || path.join("model.safetensors").exists()
        || path.join(rlhf_policies::checkpoint::SHARD_INDEX).exists()
        || path.join(MARKER).exists();
    if is_model || !path.join(CHECKPOINTS).is_dir() {
        return Ok(path.to_path_buf());
    }
    let run = RunDir { root: path.to_path_buf(), keep: 0 };
    match run.latest_checkpoint()? {
        Some((_, checkpoint)) => {
            eprintln!("{}: a run folder; using its newest checkpoint {}", path.display(), checkpoint.display());
            Ok(checkpoint)
        }
        None => bail!(
            "{}: a run folder without a complete checkpoint (no {CHECKPOINTS}/step-N with its {MARKER})",
            path.display()
        ),
    }
}

/// [`resolve_model`] in place (for config fields, so the run's `config.json` names the
/// checkpoint it started from).
pub fn resolve_model_in(path: &mut PathBuf) -> Result<()> {
    *path = resolve_model(path)?;
    Ok(())
}

/// Appends one JSON object per line, flushed after each.
#[derive(Debug)]
pub struct JsonlWriter {
    file: File,
    path: PathBuf,
}

impl JsonlWriter {
    /// Opens `path` for appending.
    pub fn append(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(JsonlWriter { file, path: path.to_path_buf() })
    }

    /// Writes one record.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record)?;
        if line.contains('\n') {
            bail!("a JSONL record serialised with a newline");
        }
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }

    /// Writes records in order.
    pub fn write_all<T: Serialize>(&mut self, records: &[T]) -> Result<()> {
        records.iter().try_for_each(|r| self.write(r))
    }
}

/// Writes `bytes` via a temporary file and a rename (the checkpoint writer's own helper).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(rlhf_policies::checkpoint::write_atomic(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_last_spares_the_checkpoint_with_the_lowest_held_out_loss() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path().join("r")).unwrap().keep_last(2);
        let save = |step: usize, loss: Option<f64>| {
            let meta = serde_json::json!({ "held_out_loss": loss });
            run.save_checkpoint(step, &meta, |d| Ok(std::fs::write(d.join("w.bin"), b"w")?)).unwrap();
        };
        assert!(run.best_checkpoint().unwrap().is_none());
        save(1, None);
        save(2, Some(0.5));
        save(3, Some(0.5)); // a tie: the earlier stays the best
        save(4, Some(0.9));
        save(5, None);
        let steps = |run: &RunDir| run.checkpoints().unwrap().into_iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(steps(&run), [2, 4, 5], "the newest two and the best");
        assert_eq!(run.best_checkpoint().unwrap(), Some((2, run.checkpoint_dir(2), 0.5)));
        save(6, Some(0.25));
        assert_eq!(steps(&run), [5, 6], "the best is among the newest: nothing else kept");
        assert_eq!(run.best_checkpoint().unwrap().map(|b| b.0), Some(6));
    }

    #[test]
    fn a_run_folder_stands_for_its_newest_complete_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path().join("r")).unwrap();
        let err = resolve_model(&run.root).unwrap_err().to_string();
        assert!(err.contains("a run folder without a complete checkpoint"), "{err}");
        run.write_config(&serde_json::json!({"init": "x"})).unwrap();
        for step in [2, 10] {
            run.save_checkpoint(step, &"", |d| Ok(std::fs::write(d.join("model.safetensors"), b"w")?)).unwrap();
        }
        std::fs::create_dir_all(run.root.join("checkpoints/step-20")).unwrap(); // no marker: a crash
        assert_eq!(resolve_model(&run.root).unwrap(), run.checkpoint_dir(10));
        let mut p = run.root.clone();
        resolve_model_in(&mut p).unwrap();
        assert_eq!(p, run.checkpoint_dir(10));
        // a checkpoint, a model folder and a file stay as they are; a missing path is an error
        for p in [run.checkpoint_dir(2), run.root.join(CONFIG)] {
            assert_eq!(resolve_model(&p).unwrap(), p);
        }
        let err = resolve_model(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.ends_with("missing: no such model folder or file"), "{err}");
        let model = dir.path().join("model");
        std::fs::create_dir_all(model.join(CHECKPOINTS)).unwrap();
        std::fs::write(model.join("model.safetensors"), b"w").unwrap();
        assert_eq!(resolve_model(&model).unwrap(), model);
    }

    #[test]
    fn checkpoints_are_atomic_and_latest_ignores_incomplete_ones() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path().join("r")).unwrap();
        assert!(run.latest_checkpoint().unwrap().is_none());
        run.save_checkpoint(5, &"a", |d| Ok(std::fs::write(d.join("w.bin"), b"5")?)).unwrap();
        run.save_checkpoint(10, &"b", |d| Ok(std::fs::write(d.join("w.bin"), b"10")?)).unwrap();
        // a crash mid-write: a half-written temporary folder and a step folder without marker
        std::fs::create_dir_all(run.root.join("checkpoints/.tmp-step-15-1")).unwrap();
        std::fs::create_dir_all(run.root.join("checkpoints/step-20")).unwrap();
        std::fs::write(run.root.join("checkpoints/step-20/w.bin"), b"partial").unwrap();
        // a writer that fails leaves no step folder
        let tmp_25 = run.root.join(format!("checkpoints/.tmp-step-25-{}", std::process::id()));
        let err = run
            .save_checkpoint(25, &"c", |d| {
                std::fs::write(d.join("w.bin"), b"half")?;
                bail!("disk full")
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("writing checkpoint 25") && format!("{err:#}").contains("disk full"));
        assert!(!run.checkpoint_dir(25).exists() && !tmp_25.exists(), "nothing of the failed write is left");
        let (step, path) = run.latest_checkpoint().unwrap().unwrap();
        assert_eq!(step, 10);
        assert_eq!(std::fs::read(path.join("w.bin")).unwrap(), b"10");
        // overwriting a step replaces it whole
        run.save_checkpoint(10, &"b2", |d| Ok(std::fs::write(d.join("w.bin"), b"new")?)).unwrap();
        assert_eq!(std::fs::read(run.checkpoint_dir(10).join("w.bin")).unwrap(), b"new");
        // resuming clears the cut-off temporary folder (never a checkpoint), nothing else
        let reopened = RunDir::open(&run.root, true).unwrap();
        assert!(!run.root.join("checkpoints/.tmp-step-15-1").exists());
        assert!(run.checkpoint_dir(20).join("w.bin").is_file());
        assert_eq!(reopened.latest_checkpoint().unwrap().map(|c| c.0), Some(10));
    }

    #[test]
    fn logs_are_truncated_to_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        let mut m = run.metrics().unwrap();
        for step in 1..=6 {
            m.write(&serde_json::json!({"step": step, "loss": 1.0 / step as f64})).unwrap();
        }
        run.truncate_logs_after(4).unwrap();
        let text = std::fs::read_to_string(run.root.join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().last().unwrap().contains("\"step\":4"));
    }

    #[test]
    fn keep_last_deletes_all_but_the_newest_complete_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path().join("r"), false).unwrap().keep_last(2);
        // a crashed write (no marker) is neither counted nor touched
        let crashed = run.root.join("checkpoints/.tmp-step-9-1");
        std::fs::create_dir_all(&crashed).unwrap();
        for step in [10, 20, 30, 40] {
            run.save_checkpoint(step, &"meta", |d| Ok(std::fs::write(d.join("w"), b"x")?)).unwrap();
        }
        let left: Vec<usize> = run.checkpoints().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, [30, 40]);
        assert!(crashed.is_dir() && !run.checkpoint_dir(20).exists());
        assert_eq!(run.latest_checkpoint().unwrap().map(|(s, _)| s), Some(40));
        let names: Vec<String> = std::fs::read_dir(run.root.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with(".del-")), "{names:?}");
    }

    #[test]
    fn a_fresh_run_refuses_a_folder_holding_a_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let run = RunDir::open(&root, false).unwrap();
        run.write_config(&"cfg").unwrap();
        // a config alone (a run that failed before its first step) is no run yet
        RunDir::open(&root, false).unwrap();
        run.metrics().unwrap().write(&serde_json::json!({"step": 1})).unwrap();
        let err = format!("{:#}", RunDir::open(&root, false).unwrap_err());
        assert!(err.contains("already holds a run (metrics.jsonl)") && err.contains("--resume"), "{err}");
        // continuing it is what --resume does
        RunDir::open(&root, true).unwrap();
        // --overwrite: the run's files go, anything else stays
        std::fs::write(root.join("notes.txt"), b"mine").unwrap();
        RunDir::clear(&root).unwrap();
        assert!(!root.join("metrics.jsonl").exists() && !root.join("config.json").exists());
        assert!(root.join("notes.txt").exists());
        RunDir::open(&root, false).unwrap();
        // checkpoints count, complete or not
        std::fs::create_dir_all(root.join("checkpoints/.tmp-step-5-1")).unwrap();
        let err = format!("{:#}", RunDir::open(&root, false).unwrap_err());
        assert!(err.contains("1 entries in checkpoints/"), "{err}");
        RunDir::clear(&root).unwrap();
        RunDir::open(&root, false).unwrap();
    }

    /// `--overwrite` keeps the previous run until the new one writes a log line or a checkpoint:
    /// a new run that stops before gives it back; one that wrote replaces it.
    #[test]
    fn overwrite_gives_the_previous_run_back_when_the_new_one_wrote_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let old = RunDir::open(&root, false).unwrap();
        old.write_config(&"old").unwrap();
        old.metrics().unwrap().write(&serde_json::json!({"step": 1})).unwrap();
        std::fs::create_dir_all(old.checkpoint_dir(1)).unwrap();
        std::fs::write(root.join("notes.txt"), b"mine").unwrap();
        let config = || std::fs::read_to_string(root.join("config.json")).unwrap();
        // the new run writes its config, then stops on an error
        RunDir::set_aside(&root).unwrap();
        let new = RunDir::open(&root, false).unwrap();
        new.write_config(&"new").unwrap();
        assert!(RunDir::settle_overwrite(&root).unwrap());
        assert_eq!(config(), "\"old\"");
        assert!(
            old.checkpoint_dir(1).is_dir() && root.join("metrics.jsonl").exists() && root.join("notes.txt").exists()
        );
        assert!(!root.join(".overwritten").exists());
        // the new run writes a step: the previous run is gone
        RunDir::set_aside(&root).unwrap();
        let new = RunDir::open(&root, false).unwrap();
        new.write_config(&"new").unwrap();
        new.metrics().unwrap().write(&serde_json::json!({"step": 7})).unwrap();
        assert!(!RunDir::settle_overwrite(&root).unwrap());
        assert_eq!(config(), "\"new\"");
        assert!(!old.checkpoint_dir(1).exists() && !root.join(".overwritten").exists());
        assert!(root.join("notes.txt").exists());
        // nothing set aside: nothing to settle
        assert!(!RunDir::settle_overwrite(&root).unwrap());
    }
}
