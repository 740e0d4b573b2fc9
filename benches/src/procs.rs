//! The servers under test, run as child processes on loopback: `kvpool up` and
//! `redis-server`. Each is killed when its guard drops, so an aborted run leaves nothing behind.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::resp::RespConn;

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process, SIGKILLed and reaped on drop.
pub struct Server {
    child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kvpool` binary: `explicit`, else the one beside this executable (cargo builds every
/// binary of the workspace into the same folder, wherever CARGO_TARGET_DIR points).
pub fn kvpool_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating kvpool-bench itself")?;
    let bin = exe.with_file_name("kvpool");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`, or pass --kvpool PATH",
            bin.display()
        );
    }
    Ok(bin)
}

/// Starts `kvpool up` on free loopback ports with `dram` of memory and returns once its
/// `ready master=ADDR store=ADDR` line says the pool is usable; `addr` is the master's.
pub fn start_kvpool(bin: &Path, dram: &str) -> Result<Server> {
    start_kvpool_with(bin, dram, None, &[])
}

/// [`start_kvpool`] with a config file (`--config`) and more `up` flags (`--nvme ...`).
pub fn start_kvpool_with(
    bin: &Path,
    dram: &str,
    config: Option<&Path>,
    extra: &[&OsStr],
) -> Result<Server> {
    let mut cmd = Command::new(bin);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-listen",
            "127.0.0.1:0",
            "--dram",
            dram,
        ])
        .args(extra)
        // Info logs would interleave with the report; warnings still show.
        .env("KVPOOL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("kvpool stdout")?;
    // Wrapped at once so that an early return below still kills the child.
    let mut server = Server {
        child,
        addr: String::new(),
    };
    let (tx, rx) = mpsc::channel();
    // The reader keeps draining stdout after the ready line so the child never blocks on it.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ready ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| anyhow::anyhow!("kvpool up printed no ready line within {START_TIMEOUT:?}"))?;
    server.addr = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("master="))
        .with_context(|| format!("no master= in the ready line {line:?}"))?
        .to_string();
    Ok(server)
}

/// Starts `redis-server` on a free port with persistence off. `Ok(None)` when the binary is
/// not installed (the Redis columns are then left empty).
pub async fn start_redis(bin: &str) -> Result<Option<Server>> {
    let port = free_port()?;
    let spawned = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("starting {bin}")),
    };
    let mut server = Server {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    wait_for_redis(&mut server).await?;
    Ok(Some(server))
}

/// "Redis server v=7.0.15 ..." as the binary reports itself, for the report.
pub fn redis_version(bin: &str) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{bin} (version unknown)"))
}

/// Polls with PING until Redis answers (it starts in milliseconds, but not instantly).
async fn wait_for_redis(server: &mut Server) -> Result<()> {
    let addr = server.addr.clone();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("redis-server exited at startup ({status}); is port {addr} taken?");
        }
        let last = match RespConn::connect(&addr).await {
            Ok(mut c) => match c.command(&[b"PING"]).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(last.context(format!("redis-server on {addr} did not answer PING")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nothing listens on right now. Redis cannot be told to pick one and report it, so
/// the port is taken from the kernel and released; a race with another process is unlikely
/// and shows up as a clear startup failure.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
