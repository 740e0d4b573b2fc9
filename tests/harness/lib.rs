//! The end-to-end harness: starts real `kvpool` processes on loopback (port 0), learns their
//! addresses from the `ready` line they print, kills them with SIGKILL when asked (or when
//! dropped), and waits for conditions by polling with a deadline, never by sleeping a guess.
//! The process start, the polling and the value bytes are `kvpool-testkit`'s (shared with
//! store tests, examples and benches); this crate adds pools, clients, etcd and masters.

pub mod http;

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use kvpool_client::{Client, ClientConfig, ErrorCode, TransportMode};

use kvpool_proto::Status;
pub use kvpool_testkit::skip::{skipped, SKIP_LOG};
use kvpool_transport::{
    rpc::{RpcClient, RpcOptions},
    TransportError,
};

// The process start, wait helpers and value bytes live in the one testkit that store tests,
// examples and benches share too; re-exported so tests keep naming them from here.
use kvpool_testkit::Guard;
pub use kvpool_testkit::{
    fill, free_port, poll_until, up_args, value, wait_until, wait_until_blocking, KitError, Proc,
};

/// The `kvpool` binary built next to the running test (`target/<profile>/kvpool`), or
/// `$KVPOOL_BIN`; panics with what to build when there is none.
pub fn kvpool_bin() -> PathBuf {
    kvpool_testkit::kvpool_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// `kvpool up` on free ports with `dram` of memory and any extra flags.
pub fn up(dram: &str, extra: &[&str]) -> Proc {
    let mut args = up_args(dram).to_vec();
    args.extend_from_slice(extra);
    Proc::start(&args)
}

/// `kvpool store` on a free port with 64 MiB of DRAM, registered with `master` as `name`.
pub fn store(master: &str, name: &str) -> Proc {
    store_of(master, name, "64MiB")
}

/// [`store`] with `dram` of memory.
pub fn store_of(master: &str, name: &str, dram: &str) -> Proc {
    Proc::start(&[
        "store",
        "--master",
        master,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        dram,
        "--name",
        name,
    ])
}

/// `kvpool master` on free ports (RPC and HTTP: its `ready` line names both) with the
/// settings of `config` (a file's text, for those without a flag).
pub fn master_with(config: &str) -> Proc {
    let cfg = config_file(config);
    Proc::start(&[
        "--config",
        cfg.to_str().expect("utf-8 path"),
        "master",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
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

/// Nodes the master currently reports alive.
pub async fn alive_nodes(c: &Client) -> usize {
    match c.status().await {
        Ok(s) => s.nodes.iter().filter(|n| n.alive).count(),
        Err(_) => 0,
    }
}

/// A fresh folder on a disk-backed filesystem (the target dir), for NVMe tier files that
/// need O_DIRECT (tmpfs refuses it). Removed with everything in it when dropped, also when
/// the test fails (tier files are hundreds of MiB: a target dir shared by many runs must not
/// collect them), unless [`DiskDir::keep`] is called.
pub fn disk_dir(name: &str) -> DiskDir {
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
    DiskDir {
        path: dir,
        keep: false,
    }
}

/// A folder [`disk_dir`] made; derefs to its path.
#[derive(Debug)]
pub struct DiskDir {
    path: PathBuf,
    keep: bool,
}

impl DiskDir {
    /// Leaves the folder on disk when dropped (to look at after a run).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl std::ops::Deref for DiskDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::path::Path> for DiskDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for DiskDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
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

/// A single-member etcd on free loopback ports with a temporary data folder; killed (and its
/// folder removed) when dropped.
pub struct Etcd {
    child: Guard,
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
        let port = || free_port().expect("a free loopback port");
        let (cp, pp) = (port(), port());
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
            child: Guard::new(child),
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

    /// SIGSTOP: etcd stops answering but keeps its connections open (a stalled etcd).
    pub fn pause(&self) {
        self.child.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.child.signal(libc::SIGCONT);
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
    etcd_client_with(url, |cfg| cfg.transport = transport)
}

/// [`etcd_client`] with `edit` applied to its configuration.
pub fn etcd_client_with(url: &str, edit: impl FnOnce(&mut ClientConfig)) -> Client {
    let mut cfg = ClientConfig {
        etcd: vec![url.to_string()],
        deadline: Duration::from_secs(20),
        ..ClientConfig::default()
    };
    cfg.engine.io_timeout = Duration::from_secs(5);
    cfg.rpc.request_timeout = Duration::from_secs(2);
    cfg.rpc.connect_timeout = Duration::from_secs(1);
    edit(&mut cfg);
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
        self.child.kill();
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
