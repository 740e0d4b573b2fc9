//! The end-to-end harness: starts real `kvpool` processes on loopback (port 0), learns their
//! addresses from the `ready` line they print, kills them with SIGKILL when asked (or when
//! dropped), and waits for conditions by polling with a deadline, never by sleeping a guess.

pub mod http;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use kvpool_client::{Client, ClientConfig, ErrorCode, TransportMode};

mod skip;
use kvpool_proto::Status;
use kvpool_transport::{
    rpc::{RpcClient, RpcOptions},
    TransportError,
};
pub use skip::{skipped, SKIP_LOG};

/// The `kvpool` binary built next to the running test (`target/<profile>/kvpool`), or
/// `$KVPOOL_BIN`.
pub fn kvpool_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVPOOL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/kvpool
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("kvpool");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --bins`, as scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A running kvpool process. Killed with SIGKILL when dropped.
pub struct Proc {
    child: Child,
    pub ready: HashMap<String, String>,
    pub args: Vec<String>,
}

impl Proc {
    /// Starts `kvpool ARGS...` and waits (up to 60 s) for its `ready k=v ...` line.
    pub fn start(args: &[&str]) -> Proc {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(kvpool_bin());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_ready(cmd, "kvpool", args)
    }

    /// [`Proc::start_with_env`] with the process's stderr written to `log` instead of the
    /// test's, so a test can check what the process said before it exited.
    pub fn start_logged(args: &[&str], env: &[(&str, &str)], log: &std::path::Path) -> Proc {
        let mut cmd = Command::new(kvpool_bin());
        cmd.args(args)
            .stderr(std::fs::File::create(log).expect("create the stderr log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_ready(cmd, "kvpool", args)
    }

    /// Polls (every 20 ms, up to `limit`) until the process exits on its own; its status, or
    /// `None` if it is still running at the deadline.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `PROGRAM ARGS...` (a wrapper such as `ip netns exec NS kvpool ...` that ends by
    /// exec'ing kvpool, so the pid is kvpool's) and waits (up to 60 s) for its `ready` line.
    pub fn start_program(program: &std::path::Path, args: &[&str]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::spawn_ready(cmd, &program.display().to_string(), args)
    }

    /// Spawns `cmd` (stdout piped, stderr inherited unless `cmd` sets it) and waits (up to
    /// 60 s) for the `ready k=v ...` line; the reader thread keeps draining stdout after it.
    fn spawn_ready(mut cmd: Command, name: &str, args: &[&str]) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ready ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} did not become ready within 60s");
        };
        let ready = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Proc {
            child,
            ready,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn addr(&self, what: &str) -> String {
        self.ready
            .get(what)
            .cloned()
            .unwrap_or_else(|| panic!("no {what}= in ready line: {:?}", self.ready))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped) has no memory
        // effects; at worst it fails with ESRCH.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kvpool up` on free ports with `dram` of memory and any extra flags.
pub fn up(dram: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "up",
        "--listen",
        "127.0.0.1:0",
        "--data-listen",
        "127.0.0.1:0",
        "--dram",
        dram,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args)
}

/// `kvpool store` on a free port with 64 MiB of DRAM, registered with `master` as `name`.
pub fn store(master: &str, name: &str) -> Proc {
    Proc::start(&[
        "store",
        "--master",
        master,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        "64MiB",
        "--name",
        name,
    ])
}

/// A config file in a temp folder, for settings without a flag (short TTLs in fault tests).
pub fn config_file(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kvpool-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join("kvpool.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

pub fn client(master: &str) -> Client {
    client_over(master, TransportMode::Auto)
}

/// The data transports the data-path tests run over: each test of the matrix runs once per
/// entry ([`transport_matrix!`]). `Shm` fails any request it cannot serve through shared
/// memory, so a test passing over it proves the bytes went that way.
pub const TRANSPORTS: [TransportMode; 2] = [TransportMode::Tcp, TransportMode::Shm];

/// A client that reaches storage nodes over `transport`.
pub fn client_over(master: &str, transport: TransportMode) -> Client {
    let mut cfg = ClientConfig::with_master(master);
    cfg.deadline = Duration::from_secs(10);
    cfg.engine.io_timeout = Duration::from_secs(10);
    cfg.transport = transport;
    Client::new(cfg)
}

/// Runs an async test body `fn(TransportMode)` once per data transport, as one test each:
/// `transport_matrix!(name, body);` makes `name::tcp` and `name::shm`.
#[macro_export]
macro_rules! transport_matrix {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$body(kvpool_client::TransportMode::Tcp).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shm() {
                super::$body(kvpool_client::TransportMode::Shm).await
            }
        }
    };
}

/// Bytes received on the loopback interface so far (`/sys/class/net/lo/statistics`).
pub fn loopback_rx_bytes() -> u64 {
    std::fs::read_to_string("/sys/class/net/lo/statistics/rx_bytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("reading /sys/class/net/lo/statistics/rx_bytes")
}

/// Deterministic pseudo-random bytes: a different value per (seed, len), cheap to recompute.
pub fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] for plain threads (no runtime): polls `cond` every 20 ms until it holds or
/// `limit` passes; panics with `what` on timeout.
pub fn wait_until_blocking(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Nodes the master currently reports alive.
pub async fn alive_nodes(c: &Client) -> usize {
    match c.status().await {
        Ok(s) => s.nodes.iter().filter(|n| n.alive).count(),
        Err(_) => 0,
    }
}

/// A fresh folder on a disk-backed filesystem (the target dir), for NVMe tier files that
/// need O_DIRECT (tmpfs refuses it).
pub fn disk_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/kvpool-disk/<name>-<pid>-<rand>
    let base = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("kvpool-disk");
    let dir = base.join(format!(
        "{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("disk dir");
    dir
}

/// Status figures for one tier: (capacity, used) summed over alive nodes.
pub async fn tier_use(c: &Client, tier: kvpool_proto::Tier) -> (u64, u64) {
    let Ok(s) = c.status().await else {
        return (0, 0);
    };
    s.nodes
        .iter()
        .filter(|n| n.alive)
        .flat_map(|n| &n.segments)
        .filter(|seg| seg.tier == tier)
        .fold((0, 0), |(c, u), seg| (c + seg.capacity, u + seg.used))
}

/// The `etcd` binary: `$KVPOOL_ETCD_BIN`, else `etcd` on the PATH (Debian's `etcd-server`
/// installs /usr/bin/etcd). Panics with what to install when there is none: the HA tests need
/// a real etcd, and CI installs it (scripts/deps.sh).
pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVPOOL_ETCD_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the HA tests need the `etcd` binary and none was found on the PATH or in \
                 /usr/bin: install Debian's `etcd-server` (scripts/deps.sh does) or set \
                 KVPOOL_ETCD_BIN"
            )
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A single-member etcd on free loopback ports with a temporary data folder; killed (and its
/// folder removed) when dropped.
pub struct Etcd {
    child: Child,
    /// The client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd and waits (up to 30 s) until it reports itself healthy.
    pub fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "kvpool-etcd-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("etcd data dir");
        let (cp, pp) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
        let child = Command::new(etcd_bin())
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let etcd = Etcd {
            child,
            url: client,
            dir,
        };
        etcd_wait_healthy(&etcd.url, &etcd.dir.join("etcd.log"));
        etcd
    }

    /// Whether etcd answers `GET /health` with `"health":"true"`.
    pub fn healthy(&self) -> bool {
        etcd_healthy(&self.url)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped; no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGSTOP: etcd stops answering but keeps its connections open (a stalled etcd).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

/// Whether the etcd at `url` (`http://IP:PORT`) answers `GET /health` with
/// `"health":"true"`. The socket is made on the calling thread (in its network namespace).
pub fn etcd_healthy(url: &str) -> bool {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let Ok(sa) = addr.parse() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

/// Waits (up to 30 s, polling on this thread) until the etcd at `url` is healthy; the panic
/// names its `log`.
pub fn etcd_wait_healthy(url: &str, log: &std::path::Path) {
    wait_until_blocking(
        &format!("etcd to become healthy; see {}", log.display()),
        Duration::from_secs(30),
        || etcd_healthy(url),
    );
}

/// A client that finds the leading master through the etcd at `url`, with limits short
/// enough for failover tests.
pub fn etcd_client(url: &str) -> Client {
    etcd_client_over(url, TransportMode::Auto)
}

/// [`etcd_client`] reaching storage nodes over `transport`.
pub fn etcd_client_over(url: &str, transport: TransportMode) -> Client {
    let mut cfg = ClientConfig {
        etcd: vec![url.to_string()],
        deadline: Duration::from_secs(20),
        transport,
        ..ClientConfig::default()
    };
    cfg.engine.io_timeout = Duration::from_secs(5);
    cfg.rpc.request_timeout = Duration::from_secs(2);
    cfg.rpc.connect_timeout = Duration::from_secs(1);
    Client::new(cfg)
}

/// A direct line to one master, for asking it whether it leads (no retries, short limits).
pub fn probe(addr: &str) -> RpcClient {
    RpcClient::new(
        addr,
        RpcOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(500),
            ..RpcOptions::default()
        },
    )
}

/// What a master says when asked for `Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Leader,
    NotLeader,
    Down,
}

pub async fn ask_master(p: &RpcClient) -> Answer {
    match p.call(&Status {}).await {
        Ok(_) => Answer::Leader,
        Err(TransportError::Remote(w)) if w.code == ErrorCode::NotLeader => Answer::NotLeader,
        Err(_) => Answer::Down,
    }
}

/// Indexes of the masters in `probes` that answer as leader.
pub async fn leaders(probes: &[RpcClient]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        if ask_master(p).await == Answer::Leader {
            out.push(i);
        }
    }
    out
}

/// Polls until exactly one of `probes` leads (never two at once) and returns its index.
pub async fn the_leader(probes: &[RpcClient], within: Duration) -> usize {
    let found = &std::sync::OnceLock::new();
    wait_until("a leader elected", within, || async move {
        let l = leaders(probes).await;
        assert!(l.len() <= 1, "two masters answer as leader: {l:?}");
        match l[..] {
            [one] => found.set(one).is_ok(),
            _ => false,
        }
    })
    .await;
    found.get().copied().expect("set when the wait ended")
}

/// Runs `kvpool ARGS...` to completion with `env` (and without any `KVPOOL_TOKEN` or
/// `KVPOOL_TENANT` of the test's own environment), feeding it `stdin` if given.
pub fn run_kvpool(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(kvpool_bin());
    cmd.args(args)
        .env_remove("KVPOOL_TOKEN")
        .env_remove("KVPOOL_TENANT")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn kvpool");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait for kvpool")
}

/// A finished command's stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prompts and their "KV" for connector tests: bytes that depend on the whole token prefix
/// (FNV-1a of the tokens, then xorshift), the layer and K/V, so a block loaded under the wrong
/// key, into the wrong slot or from another layer shows up as wrong bytes.
pub mod kv {
    /// A prompt of `len` token ids, different for each seed.
    pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| seed.wrapping_mul(7919).wrapping_add(i * 31) % 128_000)
            .collect()
    }

    /// FNV-1a over the token prefix: independent of the block-key hash.
    pub fn prefix_hash(tokens: &[u32]) -> u64 {
        tokens.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
            t.to_le_bytes()
                .iter()
                .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
        })
    }

    /// The `len` bytes of prompt block `block` (blocks of `block_size` tokens) for one
    /// layer's K (`kv = 0`) or V (`kv = 1`): what a forward pass would compute.
    pub fn block_bytes(
        tokens: &[u32],
        block_size: usize,
        len: usize,
        block: usize,
        layer: usize,
        kv: usize,
    ) -> Vec<u8> {
        let end = (block + 1) * block_size;
        let mut x = prefix_hash(&tokens[..end]) ^ ((layer as u64) << 32 | kv as u64) | 1;
        (0..len)
            .map(|_| {
                // xorshift64: cheap, deterministic, every byte position differs.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}
