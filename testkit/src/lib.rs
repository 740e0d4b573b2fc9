//! The one testkit that end-to-end tests (`kvpool-tests`), store tests, examples and benches
//! share: start a `kvpool` process and learn its addresses from the `ready k=v ...` line it
//! prints, kill children when their guard drops, find free ports, poll for a condition with a
//! deadline (never sleep a guess), and make deterministic value bytes.
//!
//! Fallible calls return [`KitError`] (benches and examples report it); the `start*`
//! shorthands panic with it, as tests want.

pub mod skip;

use std::{
    collections::HashMap,
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// How long a process may take to print its `ready` line.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// How often the wait helpers look again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// Why a process could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{0} not found: build it first (`cargo build --bins`), or set KVPOOL_BIN")]
    NoBinary(PathBuf),
    #[error("spawn {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} {args:?} exited or printed no ready line within {limit:?}")]
    NotReady {
        name: String,
        args: Vec<String>,
        limit: Duration,
    },
    #[error("no {what}= in the ready line {line:?}")]
    NoField { what: String, line: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The `kvpool` binary: `$KVPOOL_BIN`, else the one cargo built beside the running
/// executable: in its folder (a bench binary, `target/<profile>/`) or the one above it (a
/// test in `target/<profile>/deps/`, an example in `target/<profile>/examples/`).
pub fn kvpool_bin() -> Result<PathBuf, KitError> {
    if let Some(p) = std::env::var_os("KVPOOL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| KitError::NoBinary(exe.clone()))?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("kvpool"))
        .find(|b| b.is_file());
    found.ok_or_else(|| KitError::NoBinary(dir.join("kvpool")))
}

/// A child process, SIGKILLed and reaped when dropped, so an aborted run leaves nothing
/// behind.
pub struct Guard(Child);

impl Guard {
    pub fn new(child: Child) -> Guard {
        Guard(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.0.try_wait()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, SIGTERM ...) without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped has no memory effects;
        // at worst it fails with ESRCH.
        unsafe {
            libc::kill(self.0.id() as i32, sig);
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.0.wait()
    }

    /// Polls (every [`POLL_EVERY`], up to `limit`) until the process exits on its own; its
    /// status, or `None` if it still runs at the deadline.
    pub fn wait_exit(&mut self, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.0.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_EVERY);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running process that announced itself with a `ready k=v ...` line; killed when dropped.
pub struct Proc {
    guard: Guard,
    /// The `ready` line's fields (`master`, `store`, `http` ...).
    pub ready: HashMap<String, String>,
    /// The arguments it was started with (tests restart a process with them).
    pub args: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` (stdin closed, stdout piped; stderr as `cmd` sets it) and waits up to
    /// `limit` for its `ready` line. A thread keeps draining stdout after it, so the child
    /// never blocks on a full pipe.
    pub fn spawn(mut cmd: Command, limit: Duration) -> Result<Proc, KitError> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| KitError::Spawn {
                name: name.clone(),
                source,
            })?;
        let stdout = child.stdout.take();
        // Guarded at once: an early return below still kills the child.
        let guard = Guard(child);
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(rest) = line.strip_prefix("ready ") {
                        let _ = tx.send(rest.to_string());
                    }
                }
            });
        }
        // A process that exits first closes the channel: the same error, at once.
        let line = rx.recv_timeout(limit).map_err(|_| KitError::NotReady {
            name,
            args: args.clone(),
            limit,
        })?;
        let ready = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Proc { guard, ready, args })
    }

    /// `kvpool ARGS...` with `env`, waiting [`READY_WITHIN`] for its `ready` line.
    pub fn try_start<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Result<Proc, KitError> {
        let mut cmd = Command::new(kvpool_bin()?);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(cmd, READY_WITHIN)
    }

    /// [`Proc::try_start`] without environment; panics on failure (for tests).
    pub fn start(args: &[&str]) -> Proc {
        Self::start_with_env(args, &[])
    }

    /// [`Proc::try_start`]; panics on failure (for tests).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        Self::try_start(args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Proc::start_with_env`] with the process's stderr written to `log` instead of the
    /// caller's, so a test can check what the process said before it exited.
    pub fn start_logged(args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
        let bin = kvpool_bin().unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stderr(std::fs::File::create(log).expect("create the stderr log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(cmd, READY_WITHIN).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `PROGRAM ARGS...` (a wrapper such as `ip netns exec NS kvpool ...` that ends by
    /// exec'ing kvpool, so the pid is kvpool's) and waits for its `ready` line; panics on
    /// failure.
    pub fn start_program(program: &Path, args: &[&str]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Proc::spawn(cmd, READY_WITHIN).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The `ready` line's `what=` value.
    pub fn field(&self, what: &str) -> Result<String, KitError> {
        self.ready
            .get(what)
            .cloned()
            .ok_or_else(|| KitError::NoField {
                what: what.to_string(),
                line: format!("{:?}", self.ready),
            })
    }

    /// [`Proc::field`]; panics when the line has no such field (for tests).
    pub fn addr(&self, what: &str) -> String {
        self.field(what).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Sends `sig` (SIGSTOP, SIGCONT ...) without waiting.
    pub fn signal(&self, sig: i32) {
        self.guard.signal(sig)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        self.guard.kill()
    }

    /// SIGTERM, and waits for the exit; panics if it cannot wait.
    pub fn terminate(&mut self) -> ExitStatus {
        self.guard.terminate().expect("wait")
    }

    /// See [`Guard::wait_exit`]; panics if it cannot wait.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.guard.wait_exit(limit).expect("try_wait")
    }

    /// The kill-on-drop guard alone, once the `ready` fields are read.
    pub fn into_guard(self) -> Guard {
        self.guard
    }
}

/// The arguments of `kvpool up` on free loopback ports (port 0; the `ready` line says which)
/// with `dram` of memory; global flags (`--config`) go before them, more `up` flags after.
pub fn up_args(dram: &str) -> [&str; 7] {
    [
        "up",
        "--listen",
        "127.0.0.1:0",
        "--data-listen",
        "127.0.0.1:0",
        "--dram",
        dram,
    ]
}

/// A loopback port nothing listens on right now (bound, then released), for programs that
/// cannot be told to pick one and report it (etcd, Redis). A race with another process is
/// unlikely and shows up as a clear start failure.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `cond` every [`POLL_EVERY`] until it holds (`true`) or `limit` passes (`false`).
pub async fn poll_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`poll_until`] that panics with `what` on timeout (for tests).
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        poll_until(limit, cond).await,
        "timed out after {limit:?} waiting for: {what}"
    );
}

/// [`wait_until`] for plain threads (no runtime).
pub fn wait_until_blocking(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(POLL_EVERY);
    }
}

/// Fills `buf` with deterministic xorshift64 bytes from `seed`: different for every seed and
/// every position, so a misplaced or mixed-up value shows up as wrong bytes.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// `len` bytes of [`fill`]: cheap to recompute for the check.
pub fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_differ_by_seed_and_prefix_is_stable() {
        assert_eq!(value(1, 100)[..37], value(1, 37)[..]);
        assert_ne!(value(1, 64), value(2, 64));
        assert!(value(3, 4096).windows(8).any(|w| w != [0u8; 8]));
    }

    #[test]
    fn a_process_without_a_ready_line_is_an_error_and_is_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo not-ready; exit 0"]);
        match Proc::spawn(cmd, Duration::from_secs(10)) {
            Err(KitError::NotReady { name, .. }) => assert_eq!(name, "sh"),
            other => panic!("expected NotReady, got {:?}", other.map(|p| p.ready)),
        }
    }

    #[test]
    fn the_ready_line_gives_fields_and_drop_kills() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'ready master=1.2.3.4:5 store=x'; exec sleep 600",
        ]);
        let p = Proc::spawn(cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(p.addr("master"), "1.2.3.4:5");
        assert!(matches!(p.field("http"), Err(KitError::NoField { .. })));
        let pid = p.pid() as i32;
        drop(p);
        // Reaped by the drop: the pid no longer names our child.
        // SAFETY: kill(2) with signal 0 only checks existence.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1);
    }
}
