//! kvpool's storage node: contributes DRAM segments to the pool and serves clients' reads and
//! writes of segment ranges, while the master (metadata only) decides what lives where.
//!
//! A node maps its segment at start-up, registers with the master (segments and an inventory
//! of the objects it holds), heartbeats, and serves the data plane: `Write` frames put bytes
//! from the socket straight into segment memory, `Read` frames send them straight back. When
//! a master restarts or a new one is elected, the node registers again and reports every
//! object whose bytes still match the writer's checksum, so the master's object map is
//! rebuilt instead of lost.
//!
//! # Layout
//! - [`config`]: [`StoreConfig`], the node's settings and their defaults.
//! - [`segment`]: [`Segment`], an anonymous (optionally huge-page) mapping with bounds-checked
//!   access; the only place that turns segment memory into slices.
//! - [`inventory`]: [`Inventory`], the objects the node holds (from the writers' tags) and the
//!   checksum-verified report sent on registration.
//! - [`node`]: [`Node`], the state shared by the data server and the agent.
//! - [`server`]: the data-plane server ([`server::serve`]).
//! - [`agent`]: registration and heartbeats with the master.
//! - [`metrics`]: the node's Prometheus metrics and `/ready` rule (served by `kvpool-ops`).
//! - [`nvme`]: [`nvme::NvmeTier`], the NVMe tier engine (device, io engines, record layout,
//!   RocksDB index).
//! - `rdma` (feature `rdma`): the node's RDMA device and its segments' registrations.
//!
//! [`run`] wires these together for the CLI; [`start`] does the same and returns a handle, for
//! embedding a node in another process (`kvpool up`, tests).

pub mod agent;
pub mod config;
pub mod inventory;
pub mod metrics;
pub mod node;
pub mod nvme;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod segment;
pub mod server;
pub mod tasks;
pub mod tiered;

use std::{
    future::Future,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    sync::Arc,
};

use kvpool_transport::dataplane::{self, DataServerOptions};

use kvpool_proto::SegmentId;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use config::StoreConfig;
pub use inventory::Inventory;
pub use node::Node;
pub use segment::Segment;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store config: {0}")]
    Config(String),
    #[error("cannot map the {size}-byte DRAM segment: {source}")]
    Segment { size: u64, source: std::io::Error },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open the NVMe tier: {0}")]
    Nvme(nvme::NvmeError),
}

/// A running node: its state, its data address, and the tasks serving it.
pub struct StoreHandle {
    node: Arc<Node>,
    local_addr: SocketAddr,
    stop_agent: watch::Sender<bool>,
    stop_server: watch::Sender<bool>,
    server: JoinHandle<()>,
    /// The Unix-socket server for same-host clients, and its socket path (removed on stop).
    shm: Option<(JoinHandle<()>, PathBuf)>,
    agent: JoinHandle<()>,
    /// The RDMA device and the segments' registrations, dropped (deregistered) after the
    /// servers stopped.
    #[cfg(feature = "rdma")]
    _rdma: Option<rdma::Registration>,
}

impl StoreHandle {
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The node's part of an HTTP endpoint (metrics and readiness).
    pub fn probe(&self) -> Arc<dyn kvpool_ops::Probe> {
        Arc::new(metrics::NodeProbe(self.node.clone()))
    }

    /// The address the data server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Unix socket same-host clients attach through, if the node shares its memory.
    pub fn shm_socket(&self) -> Option<&std::path::Path> {
        self.shm.as_ref().map(|(_, p)| p.as_path())
    }

    /// Leaves the pool, then stops the server (closing every data connection). The agent
    /// tells the master first, waiting at most a couple of seconds for it, so the master stops
    /// handing out this node's replicas while the node still serves them: readers get misses,
    /// not connection errors.
    pub async fn shutdown(self) {
        let _ = self.stop_agent.send(true);
        let _ = self.agent.await;
        let _ = self.stop_server.send(true);
        let _ = self.server.await;
        if let Some((server, path)) = self.shm {
            let _ = server.await;
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Builds the node (maps and pre-faults its segment), then starts the master agent and the
/// data server on `listener`, in the background of the current tokio runtime.
pub async fn start(mut cfg: StoreConfig, listener: TcpListener) -> Result<StoreHandle, StoreError> {
    cfg.validate().map_err(StoreError::Config)?;
    cfg.load_token().map_err(StoreError::Config)?;
    let local_addr = listener.local_addr()?;
    let addr = match &cfg.advertise {
        Some(a) => a.clone(),
        // With etcd, the route to etcd picks the interface (the masters share its network).
        None => match cfg.etcd.first() {
            Some(e) => advertised_addr(
                local_addr,
                e.trim_start_matches("http://")
                    .trim_start_matches("https://"),
            ),
            None => advertised_addr(local_addr, &cfg.master),
        },
    };
    let name = cfg.name.clone().unwrap_or_else(host_name);
    let (size, huge) = (cfg.dram.0, cfg.huge_pages);
    // Pre-faulting touches every page: seconds for large segments, so not on an async worker.
    let segment =
        tokio::task::spawn_blocking(move || Segment::new(SegmentId(rand::random()), size, huge))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            .map_err(|source| StoreError::Segment { size, source })?;
    let mut nvme = match cfg.nvme.clone() {
        // Opening reads the index and checks every record header: blocking work.
        Some(ncfg) => Some(
            tokio::task::spawn_blocking(move || {
                tiered::NvmeSegment::open(SegmentId(rand::random()), ncfg)
            })
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            .map_err(StoreError::Nvme)?,
        ),
        None => None,
    };
    if let Some(n) = nvme.as_mut().filter(|_| cfg.shm && cfg.share_nvme) {
        if let Err(e) = n.share() {
            tracing::warn!(
                "the NVMe tier is not shared with same-host clients ({e}): they read it \
                 through the node"
            );
        }
    }
    if let Some(n) = &nvme {
        tracing::info!(
            segment = %n.id(),
            capacity = %kvpool_proto::ByteSize(n.tier().capacity()),
            engine = n.tier().engine_name(),
            records = n.tier().records().len(),
            shared_with_clients = n.shared_file().is_some(),
            "NVMe tier ready"
        );
    }
    let board = cfg.shm && cfg.replica_board;
    let node = Arc::new(Node::with_nvme(name, addr, vec![segment], nvme, board));
    tracing::info!(
        node = %node.id(),
        name = node.name(),
        listen = %local_addr,
        advertise = node.addr(),
        master = cfg.master,
        dram = %cfg.dram,
        token = cfg.token.is_some(),
        "storage node started"
    );
    let (stop_server, stop_rx) = watch::channel(false);
    let shm = if cfg.shm {
        let path = match cfg.shm_socket.clone() {
            Some(p) => p,
            None => {
                // Nodes killed with SIGKILL leave their sockets behind; clear those first.
                kvpool_transport::shm::remove_stale_sockets(
                    &kvpool_transport::shm::default_socket_dir(),
                    "store",
                );
                kvpool_transport::shm::default_socket_path("store", local_addr.port())
            }
        };
        match bind_unix(&path) {
            Ok(l) => {
                let opts = DataServerOptions {
                    token: cfg.token.clone(),
                    plain_reads: !cfg.stream_reads,
                    ..DataServerOptions::default()
                };
                let served =
                    dataplane::serve(l, node.clone(), opts, stopped(stop_server.subscribe()));
                tracing::info!(socket = %path.display(), "sharing segment memory with same-host clients");
                Some((tokio::spawn(served), path))
            }
            Err(e) => {
                // Not fatal: same-host clients then use TCP like everyone else.
                tracing::warn!(socket = %path.display(), "cannot listen for same-host clients ({e}); TCP only");
                None
            }
        }
    } else {
        None
    };
    // Registration pins every segment page: blocking work.
    #[cfg(feature = "rdma")]
    let rdma = {
        let n = node.clone();
        tokio::task::spawn_blocking(move || rdma::Registration::open(&n))
            .await
            .ok()
            .flatten()
    };
    let opts = DataServerOptions {
        token: cfg.token.clone(),
        shm_socket: shm.as_ref().map(|(_, p)| p.to_string_lossy().into_owned()),
        plain_reads: !cfg.stream_reads,
        #[cfg(feature = "rdma")]
        rdma: rdma.as_ref().map(rdma::Registration::device),
    };
    let server = tokio::spawn(dataplane::serve(
        listener,
        node.clone(),
        opts,
        stopped(stop_rx),
    ));
    let master = if cfg.etcd.is_empty() {
        cfg.master.clone()
    } else {
        kvpool_ha::etcd_target(&cfg.etcd, &cfg.cluster)
    };
    let (stop_agent, stop_rx) = watch::channel(false);
    let agent = tokio::spawn(agent::run_agent_with_token(
        node.clone(),
        master,
        cfg.token.clone(),
        stopped(stop_rx),
    ));
    Ok(StoreHandle {
        node,
        local_addr,
        stop_agent,
        stop_server,
        server,
        shm,
        agent,
        #[cfg(feature = "rdma")]
        _rdma: rdma,
    })
}

/// Binds the same-host socket, replacing a stale file a killed node left behind (a live
/// node's socket has another name: the pid is in the default one).
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// Runs a storage node until `shutdown` completes.
pub async fn run(
    cfg: StoreConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let handle = start(cfg, listener).await?;
    shutdown.await;
    tracing::info!(node = %handle.node.id(), "storage node shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender (the handle) is gone: nobody can stop us any more, but a
    // dropped handle should not keep a node running either.
    let _ = rx.wait_for(|s| *s).await;
}

/// The data address to give clients when none is configured: the bound address, unless it is
/// a wildcard; then the local IP the kernel would use to reach the master (no packet is sent).
fn advertised_addr(local: SocketAddr, master: &str) -> String {
    if !local.ip().is_unspecified() {
        return local.to_string();
    }
    let routed = UdpSocket::bind((local.ip(), 0))
        .and_then(|s| s.connect(master).map(|()| s))
        .and_then(|s| s.local_addr());
    match routed {
        Ok(a) if !a.ip().is_unspecified() => SocketAddr::new(a.ip(), local.port()).to_string(),
        _ => {
            tracing::warn!(
                "listening on {local} and no route to the master to pick an address from; \
                 advertising loopback (set `advertise` for other hosts to reach this node)"
            );
            SocketAddr::new([127, 0, 0, 1].into(), local.port()).to_string()
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "store".to_string())
}
