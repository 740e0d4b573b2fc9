//! Skips that show. A test that cannot run here (no GPU, not root, no small filesystem or
//! block device) calls [`skipped`] and returns. Passing tests' output is captured by the
//! test harness, so besides saying so on stderr the skip is appended to the file named by
//! `KVPOOL_SKIP_LOG`, one `TEST<TAB>REASON` line per skip; `scripts/test.sh` sets it and
//! prints a count per reason in its final summary, so a skip is never mistaken for a pass.

use std::io::Write;

/// The environment variable naming the skip log.
pub const SKIP_LOG: &str = "KVPOOL_SKIP_LOG";

/// Reports that `test` did not run, and why. The caller returns right after.
pub fn skipped(test: &str, reason: &str) {
    eprintln!("SKIPPED: {test}: {reason}");
    let Some(path) = std::env::var_os(SKIP_LOG) else {
        return;
    };
    // One short write per line with O_APPEND: lines from tests running in parallel (and
    // from several test binaries) never interleave.
    let line = format!("{test}\t{}\n", reason.replace(['\n', '\t'], " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // A skip that cannot be recorded must not look like a pass either.
        panic!(
            "{test} is skipped ({reason}) but {SKIP_LOG}={} cannot be written: {e}",
            path.to_string_lossy()
        );
    }
}
