//! `fio` runs, for the disk's own bandwidth next to a tier's.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

/// One fio job on `file`.
pub struct Job<'a> {
    pub file: &'a Path,
    /// Bytes of the file the job covers (fio lays the file out first if it is shorter).
    pub size: u64,
    /// `read`, `randread`, `write`, `randwrite`.
    pub rw: &'a str,
    pub block: usize,
    /// I/Os in flight per job.
    pub iodepth: u32,
    /// Jobs at once (fio's `numjobs`, reported as one group).
    pub jobs: u32,
    /// Each job submits `iodepth` I/Os together and waits for all of them before the next
    /// `iodepth` (a client's batched request), instead of keeping `iodepth` in flight.
    pub in_batches: bool,
    pub runtime: Duration,
    /// `--fdatasync=N`: one fdatasync every N writes.
    pub fdatasync: Option<u32>,
}

impl Job<'_> {
    /// Runs `fio` (the binary `bin`) with io_uring and O_DIRECT: bytes per second.
    pub fn run(&self, bin: &str) -> Result<f64> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "--name=kvpool-bench",
            "--ioengine=io_uring",
            "--direct=1",
            "--output-format=terse",
            "--terse-version=3",
            "--time_based",
            "--randrepeat=0",
            "--norandommap",
        ])
        .arg(format!("--filename={}", self.file.display()))
        .arg(format!("--size={}", self.size))
        .arg(format!("--rw={}", self.rw))
        .arg(format!("--bs={}", self.block))
        .arg(format!("--iodepth={}", self.iodepth))
        .arg(format!("--numjobs={}", self.jobs.max(1)))
        .arg("--group_reporting")
        .arg(format!("--runtime={}ms", self.runtime.as_millis()));
        if self.in_batches {
            cmd.arg(format!("--iodepth_batch_submit={}", self.iodepth))
                .arg(format!("--iodepth_batch_complete_min={}", self.iodepth));
        }
        if let Some(n) = self.fdatasync {
            cmd.arg(format!("--fdatasync={n}"));
        }
        let out = cmd.output().with_context(|| format!("running {bin}"))?;
        if !out.status.success() {
            bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("3;"))
            .context("no terse line in fio's output")?;
        let fields: Vec<&str> = line.split(';').collect();
        // Terse v3: field 7 is read bandwidth, field 48 write bandwidth, both KiB/s.
        let at = if self.rw.contains("write") { 47 } else { 6 };
        let kib: f64 = fields
            .get(at)
            .context("short fio terse line")?
            .parse()
            .context("fio bandwidth")?;
        Ok(kib * 1024.0)
    }
}

/// Whether `bin` runs at all.
pub fn available(bin: &str) -> bool {
    Command::new(bin).arg("--version").output().is_ok()
}

/// Whether `p` is on tmpfs (where O_DIRECT measures memory, not a disk).
pub fn is_tmpfs(p: &Path) -> bool {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs")
        .unwrap_or(false)
}
