//! Progress bars (indicatif): position, ETA, and a message with loss and tokens/s. Hidden when
//! stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` steps labelled `stage`.
pub fn bar(total: u64, stage: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} (eta {eta}) {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(stage.to_string());
    pb
}
