//! The servers under test, run as child processes on loopback: `kvpool up` and
//! `redis-server`. Each is killed when its guard drops, so an aborted run leaves nothing behind.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use kvpool_testkit::{free_port, up_args, Guard, Proc, READY_WITHIN};

use crate::resp::RespConn;

/// A server process, SIGKILLed and reaped on drop (the testkit's guard).
pub struct Server {
    child: Guard,
    pub addr: String,
}

/// The `kvpool` binary: `explicit`, else the testkit's (`$KVPOOL_BIN`, or the one cargo built
/// beside this executable, wherever CARGO_TARGET_DIR points).
pub fn kvpool_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    kvpool_testkit::kvpool_bin()
        .context("build it with `cargo build --release --bins`, or pass --kvpool PATH")
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
    cmd.args(up_args(dram))
        .args(extra)
        // Info logs would interleave with the report; warnings still show.
        .env("KVPOOL_LOG", "warn")
        .stderr(Stdio::inherit());
    let proc =
        Proc::spawn(cmd, READY_WITHIN).with_context(|| format!("starting {} up", bin.display()))?;
    let addr = proc.field("master")?;
    Ok(Server {
        child: proc.into_guard(),
        addr,
    })
}

/// Starts `redis-server` on a free port with persistence off. `Ok(None)` when the binary is
/// not installed (the Redis columns are then left empty).
pub async fn start_redis(bin: &str) -> Result<Option<Server>> {
    let port = free_port().context("a free port for redis-server")?;
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
        child: Guard::new(child),
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
    let deadline = Instant::now() + READY_WITHIN;
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
