//! Progress of a long verb (`kvpool drain`): a bar on a terminal, one line per update in a
//! log or a pipe (where a redrawn bar would be noise), nothing with `--json`.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub enum Progress {
    Bar(ProgressBar),
    Lines { what: String, total: u64 },
    Quiet,
}

impl Progress {
    /// Progress toward `total` units done, labelled `what`.
    pub fn new(what: &str, total: u64, quiet: bool) -> Progress {
        if quiet {
            return Progress::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines {
                what: what.to_string(),
                total,
            };
        }
        let bar = ProgressBar::new(total.max(1));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} replicas released ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress::Bar(bar)
    }

    /// `left` units remain.
    pub fn left(&self, left: u64) {
        match self {
            Progress::Bar(b) => b.set_position(b.length().unwrap_or(0).saturating_sub(left)),
            Progress::Lines { what, total } => {
                let total = (*total).max(1);
                eprintln!(
                    "{what}: {left} replica(s) left ({:.0}% done)",
                    100.0 * total.saturating_sub(left.min(total)) as f64 / total as f64
                );
            }
            Progress::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish();
        }
    }
}
