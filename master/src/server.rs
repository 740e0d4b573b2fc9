//! The master's thin async shell: decode a request, hand it to [`MasterCore`] under a lock
//! with the current time, encode the answer. Nothing in here decides anything.
//!
//! With etcd endpoints configured (HA), the master campaigns for leadership
//! ([`kvpool_ha::Election`]) and serves only while it certainly holds the lease; a standby
//! answers every request `NotLeader`. Each term starts from an empty core: the storage nodes
//! get `need_register` on their next heartbeat and report their inventories again, which
//! rebuilds the object map. Losing leadership drops the core, so a later term starts empty
//! too and never serves a stale map.
//!
//! Failing loudly: [`run`] returns why it stopped. A start that cannot serve (unreadable
//! token file, an election that cannot start) is an error even after `ready` was printed,
//! and a panic while the core is locked stops serving at once: the core may hold a
//! half-applied update, so the process exits non-zero and, under HA, a standby takes over
//! from the nodes' inventories instead of anyone serving the damaged map.

use std::{
    future::Future,
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kvpool_proto::{decode_body, encode_body, FrameLimits, Message, Opcode, WireError};
use kvpool_transport::server::{serve_rpc_with, RpcService, ServerOptions};
use kvpool_transport::shm::IndexWriter;
use serde::Serialize;
use tokio::{net::TcpListener, sync::Notify};

use crate::{config::MasterConfig, core::MasterCore};

struct Service {
    core: Mutex<Locked>,
    /// The location index's file and size, for `MasterIndex` answers.
    index_info: Option<(String, u64)>,
    epoch: Instant,
    ha: Option<Ha>,
    /// Notified once the core is found poisoned (a panic while it was locked): [`run`]
    /// stops serving and returns [`ServeError::Poisoned`].
    fatal: Notify,
    faults: crate::faults::Faults,
    metrics: Arc<crate::metrics::MasterMetrics>,
    /// `master.promote-after-hits = 0`: lookups are answered with `FLAG_NO_PROMOTION`.
    no_promotion: bool,
}

/// What the core's lock guards: the core, and the location index it keeps current.
struct Locked {
    core: MasterCore,
    index: Option<IndexWriter>,
}

/// Why the master stopped serving on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("not serving: {0}")]
    Start(String),
    #[error(
        "stopped serving: the state machine panicked while applying a request, so its map may \
         hold a half-applied update (the panic is logged above); a standby or a restarted \
         master rebuilds the map from the nodes' inventories"
    )]
    Poisoned,
}

/// The locked core. Dropping it writes what changed into the location index, before anyone
/// can see an answer that depends on the change; dropping it during a panic (the lock is then
/// poisoned) tells [`run`] to stop serving at once, without waiting for the next request to
/// find the poison.
struct CoreGuard<'a> {
    guard: MutexGuard<'a, Locked>,
    fatal: &'a Notify,
}

impl Deref for CoreGuard<'_> {
    type Target = MasterCore;
    fn deref(&self) -> &MasterCore {
        &self.guard.core
    }
}

impl DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut MasterCore {
        &mut self.guard.core
    }
}

impl CoreGuard<'_> {
    /// Serves from `fresh` from now on (a new term, or none while a standby): the index
    /// forgets the old map's entries, and readers stop trusting it unless this master leads.
    fn reset(&mut self, mut fresh: MasterCore, leading: bool) {
        let Locked { core, index } = &mut *self.guard;
        if let Some(ix) = index {
            fresh.track_index();
            ix.clear();
            if !leading {
                ix.invalidate();
            }
        }
        *core = fresh;
    }

    /// Tells the index's readers that this master still leads (every tick).
    fn renew_index(&self) {
        if let Some(ix) = &self.guard.index {
            ix.renew();
        }
    }

    /// Withdraws and removes the index (the master stops serving).
    fn close_index(&mut self) {
        self.guard.index = None;
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // notify_one keeps a permit, so this counts even before run() waits.
            self.fatal.notify_one();
            if let Some(ix) = &self.guard.index {
                ix.invalidate();
            }
            return;
        }
        let Locked { core, index } = &mut *self.guard;
        if let Some(ix) = index {
            for (hash, entry) in core.take_index_updates() {
                ix.set(hash, entry.as_ref());
            }
        }
    }
}

fn poisoned() -> WireError {
    WireError::new(
        kvpool_proto::ErrorCode::Internal,
        "the master's state machine failed and this master is stopping; retry on the next leader",
    )
}

/// The HA gate: which term the core belongs to.
struct Ha {
    election: Arc<kvpool_ha::Election>,
    core_cfg: crate::core::CoreConfig,
    /// The term the current core serves; `None` while a standby (the core is then empty).
    term: Mutex<Option<i64>>,
    /// Remove fences in etcd: loaded into each new term's core, written before a remove is
    /// acknowledged.
    fences: kvpool_ha::fence::FenceStore,
}

/// Replica ids must not repeat across master restarts or terms (a node may still hold ids
/// from the previous master), so they start at the wall clock in nanoseconds.
fn id_base() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

impl Service {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Locks the core. A poisoned lock is never cleared: the update that panicked may be
    /// half applied, and serving from it could hand out space twice or lose a commit.
    fn core(&self) -> Result<CoreGuard<'_>, WireError> {
        match self.core.lock() {
            Ok(guard) => Ok(CoreGuard {
                guard,
                fatal: &self.fatal,
            }),
            Err(_) => {
                self.fatal.notify_one();
                Err(poisoned())
            }
        }
    }

    /// Whether this master may act now (always, without HA). Switches the core to a fresh
    /// one when a new term starts, and drops it when leadership is lost.
    fn admit(&self) -> Result<(), WireError> {
        let Some(ha) = &self.ha else { return Ok(()) };
        let now_term = ha.election.leader_term();
        let mut term = ha.term.lock().unwrap_or_else(|e| e.into_inner());
        if *term != now_term {
            // Either way the old map must go: a new term rebuilds it from the nodes, and a
            // standby must not keep one that would be stale when it next leads.
            let mut fresh = MasterCore::new(ha.core_cfg.clone(), id_base());
            if now_term.is_some() {
                // Before any node registers: earlier leaders' removes must fence their
                // inventories. Until they are loaded this master does not serve its term.
                match ha.fences.load() {
                    Ok(fences) => {
                        tracing::info!(fences = fences.len(), "remove fences loaded from etcd");
                        fresh.load_fences(self.now(), fences);
                    }
                    Err(e) => {
                        self.core()?
                            .reset(MasterCore::new(ha.core_cfg.clone(), id_base()), false);
                        *term = None;
                        return Err(WireError::new(
                            kvpool_proto::ErrorCode::NotLeader,
                            format!("elected, but the remove fences could not be loaded from etcd yet: {e}"),
                        ));
                    }
                }
            }
            self.core()?.reset(fresh, now_term.is_some());
            *term = now_term;
            match now_term {
                Some(t) => tracing::info!(
                    term = t,
                    "leading: serving from an empty map that the nodes' reports rebuild"
                ),
                None => tracing::info!("not leading: map dropped, answering NotLeader"),
            }
        }
        if now_term.is_some() {
            return Ok(());
        }
        let msg = match ha.election.leader_hint() {
            Some(l) => format!("this master is a standby; the leader is {l}"),
            None => "this master is a standby; no leader is elected right now".to_string(),
        };
        Err(WireError::new(kvpool_proto::ErrorCode::NotLeader, msg))
    }

    /// The term the core serves now (`None` without HA or while a standby).
    fn term(&self) -> Option<i64> {
        let ha = self.ha.as_ref()?;
        *ha.term.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the fences of removes applied in `term` durable before they are acknowledged:
    /// in etcd, only while this master still holds that term's leader key. Without HA a
    /// restart loses them, as it loses the whole map.
    fn persist_fences(
        &self,
        term: Option<i64>,
        fences: Vec<(Vec<u8>, u64)>,
    ) -> Result<(), WireError> {
        let Some(ha) = self.ha.as_ref().filter(|_| !fences.is_empty()) else {
            return Ok(());
        };
        let not_durable = |why: String| {
            WireError::new(
                kvpool_proto::ErrorCode::NotLeader,
                format!(
                    "the remove was applied but could not be recorded in etcd ({why}); a next \
                     leader might not know it: retry (it then answers NotFound once durable)"
                ),
            )
        };
        let Some(term) = term.filter(|_| self.term() == term) else {
            return Err(not_durable("this master's term ended".into()));
        };
        ha.fences
            .record(term, fences)
            .map_err(|e| not_durable(e.to_string()))
    }
}

/// Decodes a batch request, applies `f` to the locked core, encodes the answer.
fn call<M: Message, R: Serialize>(
    service: &Service,
    opcode: Opcode,
    body: &[u8],
    f: impl FnOnce(&mut MasterCore, M) -> R,
) -> Result<Vec<u8>, WireError> {
    try_call(service, opcode, body, |core, req| Ok(f(core, req)))
}

/// [`call`] for a request that is not a batch: its error is the whole answer's.
fn try_call<M: Message, R: Serialize>(
    service: &Service,
    opcode: Opcode,
    body: &[u8],
    f: impl FnOnce(&mut MasterCore, M) -> Result<R, WireError>,
) -> Result<Vec<u8>, WireError> {
    let req: M = decode_body(body)?;
    let mut core = service.core()?;
    service.faults.before_apply(opcode);
    Ok(encode_body(&f(&mut core, req)?))
}

/// [`try_call`] for the removes: the fences the request made are persisted (after the core's
/// lock is released) before the answer goes out, so nothing acknowledged as removed can come
/// back under a later leader.
fn remove_call<M: Message, R: Serialize>(
    service: &Service,
    opcode: Opcode,
    body: &[u8],
    f: impl FnOnce(&mut MasterCore, M) -> Result<R, WireError>,
) -> Result<Vec<u8>, WireError> {
    let term = service.term();
    let mut fences = Vec::new();
    let answer = try_call(service, opcode, body, |core, req| {
        let answer = f(core, req);
        fences = core.take_unsaved_fences();
        answer
    });
    service.persist_fences(term, fences)?;
    answer
}

impl RpcService for Service {
    fn response_flags(&self, opcode: Opcode) -> u8 {
        match opcode {
            Opcode::GetReplicas if self.no_promotion => kvpool_proto::header::FLAG_NO_PROMOTION,
            _ => 0,
        }
    }

    fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError> {
        let now = self.now();
        self.admit()?;
        self.faults.admit(opcode, body)?;
        match opcode {
            Opcode::PutStart => call(self, opcode, body, |c, r| c.put_start(now, r)),
            Opcode::PutEnd => call(self, opcode, body, |c, r| c.put_end(now, r)),
            Opcode::PutRevoke => call(self, opcode, body, |c, r| c.put_revoke(now, r)),
            Opcode::GetReplicas => call(self, opcode, body, |c, r| {
                self.metrics.lookups(c.get_replicas(now, r))
            }),
            Opcode::Exists => call(self, opcode, body, |c, r| c.exists(now, r)),
            Opcode::Touch => call(self, opcode, body, |c, r| {
                self.metrics.index_reads(c.served_reads(now, r))
            }),
            Opcode::Remove => remove_call(self, opcode, body, |c, r| Ok(c.remove(now, r))),
            Opcode::RemoveAll => {
                remove_call(self, opcode, body, |c, r| Ok(c.remove_all(now, r)))
            }
            Opcode::Status => call(self, opcode, body, |c, _: kvpool_proto::Status| c.status(now)),
            Opcode::Drain => call(self, opcode, body, |c, r| c.drain(now, r)),
            Opcode::ListKeys => call(self, opcode, body, |c, r| c.list_keys(r)),
            Opcode::RemoveRegex => remove_call(self, opcode, body, |c, r| c.remove_regex(now, r)),
            Opcode::Register => call(self, opcode, body, |c, r| c.register(now, r)),
            Opcode::Heartbeat => call(self, opcode, body, |c, r| {
                self.metrics.heartbeat(c.heartbeat(now, r))
            }),
            Opcode::Leave => call(self, opcode, body, |c, r| c.leave(now, r)),
            Opcode::Inspect => call(self, opcode, body, |c, r| c.inspect(now, r)),
            // The transport answers (and checks) Hello itself; this is only reached if a
            // server is wired without it, and then an answer is still the right one.
            Opcode::Hello => {
                let _: kvpool_proto::Hello = decode_body(body)?;
                Ok(encode_body(&kvpool_proto::HelloResponse {
                    server_version: u16::from(kvpool_proto::header::VERSION),
                }))
            }
            Opcode::MasterIndex => {
                let _: kvpool_proto::MasterIndex = decode_body(body)?;
                let (path, slots) = match &self.index_info {
                    Some((p, n)) => (Some(p.clone()), *n),
                    None => (None, 0),
                };
                Ok(encode_body(&kvpool_proto::MasterIndexResponse {
                    host: kvpool_transport::shm::net_host_id(),
                    path,
                    slots,
                }))
            }
            // Answered by the transport (`ServerOptions::local_socket`); reached only by a
            // server wired without it, which then has no socket to name.
            Opcode::Local => Ok(encode_body(&kvpool_proto::LocalResponse {
                host: String::new(),
                socket: None,
            })),
            Opcode::Read
            | Opcode::Write
            | Opcode::ShmInfo
            | Opcode::ShmAttach
            | Opcode::ShmCommit
            | Opcode::ShmBoard
            | Opcode::ShmNvme
            | Opcode::RdmaConnect
            | Opcode::RdmaWritten => Err(WireError::new(
                kvpool_proto::ErrorCode::WrongService,
                "data-plane request sent to the master; send it to a storage node",
            )),
            Opcode::HandoffClaim | Opcode::HandoffDone | Opcode::HandoffAbort => {
                Err(WireError::new(
                    kvpool_proto::ErrorCode::WrongService,
                    "P/D hand-off request sent to the master; send it to the producer's bootstrap port",
                ))
            }
        }
    }
}

/// Serves the master on `listener` until `shutdown` completes (`Ok`), or until it cannot
/// go on (`Err`). With a token in `cfg` (or a `token_file` to read it from), every connection
/// must present it first; a token file that cannot be read is fatal, rather than serve open.
pub async fn run(
    listener: TcpListener,
    cfg: &MasterConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with_ops(listener, cfg, None, shutdown).await
}

/// [`run`], with the master's metrics and readiness added to `ops` (the HTTP endpoint).
pub async fn run_with_ops(
    listener: TcpListener,
    cfg: &MasterConfig,
    ops: Option<&kvpool_ops::Endpoint>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut cfg = cfg.clone();
    cfg.load_token().map_err(ServeError::Start)?;
    let cfg = &cfg;
    let ha = start_election(&listener, cfg).map_err(ServeError::Start)?;
    let (unix, socket_file) = match cfg.unix_socket.then(|| bind_unix(&listener)).flatten() {
        Some((l, f)) => (Some(l), Some(f)),
        None => (None, None),
    };
    let index = open_index(&listener, cfg, unix.is_some()).await;
    let index_info = index
        .as_ref()
        .map(|ix| (ix.path().display().to_string(), ix.slots() as u64));
    let mut core = MasterCore::new(cfg.core(), id_base());
    if index.is_some() {
        core.track_index();
    }
    let service = Arc::new(Service {
        core: Mutex::new(Locked { core, index }),
        index_info,
        epoch: Instant::now(),
        ha,
        fatal: Notify::new(),
        faults: crate::faults::Faults::from_env(),
        metrics: Default::default(),
        no_promotion: !cfg.core().promotes(),
    });
    if let Some(ops) = ops {
        ops.add(Arc::new(probe(&service)));
    }
    let ticker = {
        let service = service.clone();
        let every = cfg.tick.0;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let now = service.now();
                // A standby has nothing to expire or evict; admit() also drops the map the
                // moment leadership ends, even when no request arrives. A poisoned core has
                // already told run() to stop.
                if service.admit().is_ok() {
                    if let Ok(mut core) = service.core() {
                        core.tick(now);
                        core.renew_index();
                    }
                }
            }
        })
    };
    if cfg.token.is_some() {
        tracing::info!("a cluster token is required on every connection");
    }
    let opts = ServerOptions {
        limits: FrameLimits::default(),
        token: cfg.token.clone(),
        local_socket: socket_file.as_ref().map(|f| f.0.display().to_string()),
    };
    let metered = Arc::new(crate::metrics::Metered {
        inner: service.clone(),
        metrics: service.metrics.clone(),
    });
    // The same service on the Unix socket, for same-host clients that asked where it is.
    let same_host = async {
        match unix {
            Some(l) => {
                serve_rpc_with(l, metered.clone(), opts.clone(), std::future::pending()).await
            }
            None => std::future::pending().await,
        }
    };
    // Dropping the server futures closes the listeners and every connection at once.
    let outcome = tokio::select! {
        () = serve_rpc_with(listener, metered.clone(), opts.clone(), shutdown) => Ok(()),
        () = same_host => Ok(()),
        () = service.fatal.notified() => Err(ServeError::Poisoned),
    };
    drop(socket_file);
    ticker.abort();
    if let Ok(mut core) = service.core() {
        core.close_index();
    }
    if let Some(ha) = &service.ha {
        // Hand leadership over at once instead of making the standbys wait out the lease.
        ha.election.resign().await;
    }
    if let Err(e) = &outcome {
        tracing::error!("{e}");
    }
    outcome
}

/// A socket file, removed when this is dropped.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the master's Unix socket, `kvpool-master-<pid>-<port>.sock` where nodes put theirs
/// (`$XDG_RUNTIME_DIR` or the temporary folder), first clearing those of masters killed
/// before they could; `None` (logged) when it cannot: clients then use TCP.
fn bind_unix(tcp: &TcpListener) -> Option<(tokio::net::UnixListener, SocketFile)> {
    use kvpool_transport::shm::{default_socket_dir, default_socket_path, remove_stale_sockets};
    let port = tcp.local_addr().ok()?.port();
    remove_stale_sockets(&default_socket_dir(), "master");
    let path = default_socket_path("master", port);
    let _ = std::fs::remove_file(&path);
    match tokio::net::UnixListener::bind(&path) {
        Ok(l) => {
            tracing::info!(socket = %path.display(), "serving same-host clients on a Unix socket");
            Some((l, SocketFile(path)))
        }
        Err(e) => {
            tracing::warn!(socket = %path.display(), "no Unix socket for same-host clients: {e}");
            None
        }
    }
}

/// The location index same-host clients read (`master.location-index`), next to the Unix
/// socket it needs (a client asks where it is over that socket's connection); `None`
/// (logged) when off or when it cannot be made. Whether or not this master keeps one, it
/// first waits out the index of a master that died on this host: its readers trust it until
/// its deadline, and this master could otherwise hand its ranges to new writers first.
async fn open_index(tcp: &TcpListener, cfg: &MasterConfig, unix: bool) -> Option<IndexWriter> {
    use kvpool_transport::shm::index;
    let waited = tokio::task::spawn_blocking(index::clear_stale)
        .await
        .unwrap_or_default();
    if !waited.is_zero() {
        tracing::info!(?waited, "waited out a dead master's location index");
    }
    if !cfg.location_index || !unix {
        return None;
    }
    let path = index::default_path(tcp.local_addr().ok()?.port());
    match IndexWriter::create(&path, cfg.location_index_slots as usize) {
        Ok(ix) => {
            tracing::info!(index = %path.display(), slots = ix.slots(), "publishing locations for same-host clients");
            Some(ix)
        }
        Err(e) => {
            tracing::warn!(index = %path.display(), "no location index for same-host clients: {e}");
            None
        }
    }
}

/// The master's part of the HTTP endpoint: its status (while it serves) read at each scrape.
fn probe(service: &Arc<Service>) -> crate::metrics::MasterProbe {
    let s = service.clone();
    crate::metrics::MasterProbe {
        metrics: service.metrics.clone(),
        snapshot: Box::new(move || {
            let term = s.ha.as_ref().and_then(|ha| ha.election.leader_term());
            // A poisoned core is not serving: the master is about to stop.
            let serving = s.admit().ok().and_then(|()| {
                let (core, now) = (s.core().ok()?, s.now());
                Some((core.status(now), core.object_stats(now)))
            });
            crate::metrics::Snapshot { serving, term }
        }),
    }
}

/// Starts campaigning when `cfg` names etcd endpoints.
fn start_election(listener: &TcpListener, cfg: &MasterConfig) -> Result<Option<Ha>, String> {
    if cfg.etcd.is_empty() {
        return Ok(None);
    }
    let address = match &cfg.advertise {
        Some(a) => a.clone(),
        None => {
            let local = listener
                .local_addr()
                .map_err(|e| format!("listener address: {e}"))?;
            if local.ip().is_unspecified() {
                return Err(format!(
                    "listening on {local} with etcd: set master.advertise (--advertise) to the \
                     address clients and nodes should dial"
                ));
            }
            local.to_string()
        }
    };
    tracing::info!(etcd = ?cfg.etcd, cluster = cfg.cluster, %address, "campaigning for leadership");
    let fences = kvpool_ha::fence::FenceStore::start(
        cfg.etcd.clone(),
        cfg.cluster.clone(),
        cfg.remove_fence_ttl.0,
    )
    .map_err(|e| format!("starting the remove fence store: {e}"))?;
    let election = kvpool_ha::Election::start(kvpool_ha::ElectionConfig {
        endpoints: cfg.etcd.clone(),
        cluster: cfg.cluster.clone(),
        address,
        ttl: cfg.leader_ttl.0,
    });
    Ok(Some(Ha {
        election: Arc::new(election),
        core_cfg: cfg.core(),
        term: Mutex::new(None),
        fences,
    }))
}
