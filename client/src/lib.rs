//! The kvpool client: the library every user of the pool links.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvpool_client::ClientError> {
//! let client = kvpool_client::Client::new(kvpool_client::ClientConfig::with_master("127.0.0.1:50051"));
//! client.put(b"prefix/0", b"kv bytes", &Default::default()).await?;
//! assert_eq!(client.get(b"prefix/0").await?.as_deref(), Some(&b"kv bytes"[..]));
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`Client`]: put / get / exists / remove, each a batch underneath (and the
//!   whole-namespace `remove_all`, `remove_regex`, `list_keys`); `put_parts` and
//!   `get_into_parts` gather from and scatter into several caller buffers (one per layer)
//!   without copying.
//! - `put.rs`, `get.rs`: the two data paths. A put is two-phase: the master allocates
//!   replicas, the client writes the bytes straight to the storage nodes, then commits (or
//!   revokes on failure). A get asks the master where the object is (taking a read lease),
//!   reads a replica, falls back to the next replica on failure, and trusts the bytes only if
//!   the lease was still live when the read finished and the crc32c matches.
//! - [`ClientConfig`], [`ClientError`].
//!
//! The TCP transfer engine needs no memory registration; registered regions arrive with the
//! shared-memory and RDMA transports, behind the same `put_parts`/`get_into_parts` calls.

mod config;
mod error;
mod get;
mod index;
mod inspect;
mod locations;
mod put;

use std::time::{Duration, Instant};

use kvpool_proto::{
    ClientId, Exists, ListKeys, Message, PutOptions, Remove, RemoveAll, RemoveRegex, Status,
    StatusResponse,
};
use kvpool_transport::{engine::TransferEngine, rpc::RpcClient, TransportError};

pub use config::{ClientConfig, LocationCache, LOCATION_CACHE_ENV, TRANSPORT_ENV};
pub use error::{ClientError, Result};
pub use kvpool_proto::{ErrorCode, NodeId, ObjectInfo, ReplicaDesc, Tier};
pub use kvpool_transport::shm::TransportMode;

/// A handle to the pool. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Client {
    id: ClientId,
    cfg: ClientConfig,
    master: RpcClient,
    engine: TransferEngine,
    /// What every key is prefixed with on the wire: `tenant 0x00`, or nothing without a
    /// tenant; or why the tenant is invalid (then every keyed operation fails with it).
    key_prefix: std::result::Result<Vec<u8>, String>,
    /// Where keys read recently live, so a repeated get skips the master.
    locations: locations::Locations,
    /// The master's location index, when it runs on this host.
    index: index::MasterIndexView,
}

impl Client {
    /// A client for the master in `cfg`; connections are made on first use.
    /// An invalid tenant (see [`ClientConfig::validate`]) does not fail here: every keyed
    /// operation then fails with `InvalidArgument`.
    pub fn new(cfg: ClientConfig) -> Self {
        let mut rpc_opts = cfg.rpc.clone();
        let mut engine_opts = cfg.engine.clone();
        if let Some(t) = &cfg.token {
            rpc_opts.token = Some(t.clone());
            engine_opts.token = Some(t.clone());
        }
        engine_opts.checksum_reads = cfg.verify_checksum;
        let transport = cfg.effective_transport();
        // TCP only means the master's connection too (its Unix socket is another path).
        rpc_opts.same_host &= transport.as_ref().ok() != Some(&TransportMode::Tcp);
        let index =
            index::MasterIndexView::new(cfg.master_index && rpc_opts.same_host, cfg.max_batch);
        let master = master_rpc(&cfg, rpc_opts);
        let location_cache = cfg.effective_location_cache();
        engine_opts.transport = *transport.as_ref().unwrap_or(&cfg.transport);
        let engine = TransferEngine::new(engine_opts);
        // A bad tenant, transport or cache switch does not fail here: every keyed operation
        // fails with it.
        let key_prefix = cfg
            .validate()
            .and(transport.map(|_| ()))
            .and(location_cache.as_ref().map(|_| ()).map_err(Clone::clone))
            .map(|()| match cfg.tenant.as_deref() {
                None | Some("") => Vec::new(),
                Some(t) => [t.as_bytes(), &[0]].concat(),
            });
        Client {
            id: ClientId(rand::random()),
            locations: locations::Locations::new(
                location_cache.as_ref().unwrap_or(&cfg.location_cache),
            ),
            cfg,
            master,
            engine,
            key_prefix,
            index,
        }
    }

    /// Fails when the configured tenant is invalid.
    fn check_tenant(&self) -> Result<()> {
        match &self.key_prefix {
            Ok(_) => Ok(()),
            Err(msg) => Err(ClientError::Remote(kvpool_proto::WireError::new(
                ErrorCode::InvalidArgument,
                msg.clone(),
            ))),
        }
    }

    /// The tenant's key prefix for whole-namespace requests (`None` without a tenant), or
    /// why the tenant is invalid.
    fn tenant_prefix(&self) -> Result<Option<Vec<u8>>> {
        self.check_tenant()?;
        Ok(match &self.key_prefix {
            Ok(p) if !p.is_empty() => Some(p.clone()),
            _ => None,
        })
    }

    /// A key as the master and nodes see it: prefixed with this client's tenant. An empty key
    /// stays empty so the master refuses it as it refuses any empty key.
    fn wire_key(&self, key: &[u8]) -> Vec<u8> {
        match &self.key_prefix {
            Ok(p) if !p.is_empty() && !key.is_empty() => [p.as_slice(), key].concat(),
            _ => key.to_vec(),
        }
    }

    /// The data transport this client uses for the node at data address `addr` ("shm",
    /// "rdma" or "tcp"), as far as it knows (a node not used yet shows "tcp").
    pub fn transport_to(&self, addr: &str) -> &'static str {
        self.engine.transport_to(addr)
    }

    /// The data transport this client would use for the node at `addr` now ("shm", "rdma"
    /// or "tcp"; "-" when forced to RDMA and it cannot be had), attaching to the node's
    /// shared memory or setting up RDMA lanes first if it may (one `ShmInfo` round
    /// trip and the attach, once per node): for `kvpool status`-like displays.
    pub async fn probe_transport(&self, addr: &str) -> &'static str {
        self.engine.probe(addr).await
    }

    /// Registers `[addr, addr + len)` for RDMA (Python's `register_buffer`): transfers from
    /// and into it then move straight between it and the node's segment, with no bounce
    /// copy. Without a device (or the `rdma` feature) the region is only recorded, by the
    /// same rules. Registering the same range twice is a no-op; a null, empty or wrapping
    /// range, or one overlapping another registered range, is `InvalidArgument`. Every
    /// address works unregistered too.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Client::unregister_buffer`] returns `Ok` for
    /// `addr`: an RDMA device may read and write it during any transfer that names it.
    pub unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.engine.register_buffer(addr, len) }.map_err(ClientError::Remote)
    }

    /// Unregisters the buffer registered at `addr`: `true` if one was, `false` if none
    /// starts there (unregistering twice is harmless).
    pub fn unregister_buffer(&self, addr: u64) -> Result<bool> {
        self.engine
            .unregister_buffer(addr)
            .map_err(ClientError::Remote)
    }

    /// The registered buffers, as `(addr, len)` in address order.
    pub fn registered_buffers(&self) -> Vec<(u64, u64)> {
        self.engine.registered_buffers()
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// Puts one value. Fails with `AlreadyExists` if the key is committed (unless
    /// `opts.overwrite`).
    pub async fn put(&self, key: &[u8], value: &[u8], opts: &PutOptions) -> Result<()> {
        self.put_parts(key, &[value], opts).await
    }

    /// Puts one value gathered from several buffers, in order.
    pub async fn put_parts(&self, key: &[u8], parts: &[&[u8]], opts: &PutOptions) -> Result<()> {
        let mut r = self.put_batch_parts(&[(key, parts)], opts).await;
        r.pop()
            .unwrap_or_else(|| Err(internal("empty batch result")))
    }

    /// Puts many values; one result per item, in order.
    pub async fn put_batch(&self, items: &[(&[u8], &[u8])], opts: &PutOptions) -> Vec<Result<()>> {
        let parts: Vec<[&[u8]; 1]> = items.iter().map(|(_, v)| [*v]).collect();
        let items: Vec<(&[u8], &[&[u8]])> = items
            .iter()
            .zip(&parts)
            .map(|((k, _), p)| (*k, &p[..]))
            .collect();
        self.put_batch_parts(&items, opts).await
    }

    /// Gets one value; `Ok(None)` is a miss.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut r = self.get_batch(&[key]).await;
        r.pop()
            .unwrap_or_else(|| Err(internal("empty batch result")))
    }

    /// Gets one value into `buf` without an intermediate copy; returns its length, or
    /// `None` on a miss. Fails with `BufferTooSmall` if the value does not fit.
    pub async fn get_into(&self, key: &[u8], buf: &mut [u8]) -> Result<Option<u64>> {
        self.get_into_parts(key, &mut [buf]).await
    }

    /// Gets one value scattered over several buffers, filled in order.
    pub async fn get_into_parts(&self, key: &[u8], parts: &mut [&mut [u8]]) -> Result<Option<u64>> {
        let mut r = self.get_batch_into_parts(&[key], &mut [parts]).await;
        r.pop()
            .unwrap_or_else(|| Err(internal("empty batch result")))
    }

    /// Whether each key is committed. With `lease`, present keys get a read lease.
    pub async fn exists(&self, keys: &[&[u8]], lease: bool) -> Vec<Result<bool>> {
        if let Err(e) = self.check_tenant() {
            return keys.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.cfg.max_batch.max(1)) {
            let msg = Exists {
                keys: chunk.iter().map(|k| self.wire_key(k)).collect(),
                lease,
            };
            match self.master_call(&msg).await {
                Ok(r) => out.extend(r.items.into_iter().map(|i| i.map_err(ClientError::from))),
                Err(e) => out.extend(chunk.iter().map(|_| Err(clone_err(&e)))),
            }
        }
        out
    }

    /// Removes keys; leased or hard-pinned ones only with `force`.
    pub async fn remove(&self, keys: &[&[u8]], force: bool) -> Vec<Result<()>> {
        if let Err(e) = self.check_tenant() {
            return keys.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let mut out = Vec::with_capacity(keys.len());
        self.index.flush(&self.master).await;
        for chunk in keys.chunks(self.cfg.max_batch.max(1)) {
            let msg = Remove {
                keys: chunk.iter().map(|k| self.wire_key(k)).collect(),
                force,
            };
            // Dropped whatever the answer: a key this client removes is not read from its
            // old location again by this client. Its reads served by the master's index are
            // reported first: they lease their keys, as gets through the master do.
            for k in &msg.keys {
                self.locations.forget(k);
            }
            match self.master_call(&msg).await {
                Ok(r) => out.extend(r.items.into_iter().map(|i| i.map_err(ClientError::from))),
                Err(e) => out.extend(chunk.iter().map(|_| Err(clone_err(&e)))),
            }
        }
        out
    }

    /// Removes every committed object (of this client's tenant, when it has one: the
    /// master removes only keys with the tenant's prefix); returns how many went.
    pub async fn remove_all(&self, force: bool) -> Result<u64> {
        let prefix = self.tenant_prefix()?;
        self.locations.clear();
        self.index.flush(&self.master).await;
        Ok(self
            .master_call(&RemoveAll { force, prefix })
            .await?
            .removed)
    }

    /// Removes the committed objects (of this client's tenant) whose key matches the regular
    /// expression `pattern` anywhere (a search, like `std::regex_search`: anchor with
    /// `^...$` for a whole-key match; with a tenant, `^` is the start of the tenant's key).
    /// The syntax is the `regex` crate's, Unicode on; leased and hard-pinned objects go only
    /// with `force`. Returns how many went; a malformed pattern fails with
    /// `InvalidArgument`.
    pub async fn remove_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        let prefix = self.tenant_prefix()?;
        let msg = RemoveRegex {
            pattern: pattern.to_string(),
            prefix,
            force,
        };
        self.locations.clear();
        self.index.flush(&self.master).await;
        Ok(self.master_call(&msg).await?.removed)
    }

    /// One page of the committed keys (of this client's tenant) that start with `prefix`,
    /// in byte order: the first `limit` after `start_after` (from the first when `None`),
    /// and whether more follow. The master caps a page at 10 000 keys. The next page starts
    /// after the last key of this one; paging never repeats a key, and never skips one that
    /// stayed in the pool throughout.
    pub async fn list_keys(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: u32,
    ) -> Result<(Vec<Vec<u8>>, bool)> {
        let tenant = self.tenant_prefix()?.unwrap_or_default();
        // Not `wire_key`: an empty prefix or start here is meaningful (every key of the
        // tenant, from its first one) and must still carry the tenant.
        let msg = ListKeys {
            prefix: [tenant.as_slice(), prefix].concat(),
            start_after: start_after.map(|a| [tenant.as_slice(), a].concat()),
            limit,
        };
        let r = self.master_call(&msg).await?;
        let keys = r
            .keys
            .into_iter()
            .map(|k| match k.strip_prefix(tenant.as_slice()) {
                Some(rest) => Ok(rest.to_vec()),
                None => Err(internal("the master listed a key outside the prefix")),
            })
            .collect::<Result<_>>()?;
        Ok((keys, r.more))
    }

    /// Starts (or with `cancel` stops) draining a node; returns the replicas still on it.
    pub async fn drain(&self, node: NodeId, cancel: bool) -> Result<u64> {
        self.master_call(&kvpool_proto::Drain { node, cancel })
            .await?
            .replicas_left
            .map_err(ClientError::Remote)
    }

    /// How this client reaches the master now: "unix" (the master's Unix socket: it runs on
    /// this host), "tcp", or `None` before the first request or after a failed one.
    pub async fn master_transport(&self) -> Option<&'static str> {
        self.master.via().await
    }

    /// Nodes, segments, capacity and use, as the master sees them (cluster-wide, also for a
    /// client with a tenant).
    pub async fn status(&self) -> Result<StatusResponse> {
        self.master_call(&Status {}).await
    }

    /// Sends a master request, retrying connection-level failures until the deadline.
    /// Errors the master answered with are never retried here: they are results.
    async fn master_call<M: Message>(&self, msg: &M) -> Result<M::Response> {
        self.master_call_flagged(msg).await.map(|(r, _)| r)
    }

    /// [`Client::master_call`], also giving the answer's frame flags.
    async fn master_call_flagged<M: Message>(&self, msg: &M) -> Result<(M::Response, u8)> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.master.call_flagged(msg).await {
                Ok(r) => return Ok(r),
                // A standby, or no leader yet (HA failover): the RPC client re-resolves the
                // leader on the next call, so wait for the election like for a reconnect.
                Err(TransportError::Remote(w))
                    if w.code == ErrorCode::NotLeader
                        && start.elapsed() + backoff < self.cfg.deadline =>
                {
                    tracing::debug!("master is not the leader, retrying in {backoff:?}: {w}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(TransportError::Remote(w)) => return Err(ClientError::Remote(w)),
                Err(e) if e.is_retryable() && start.elapsed() + backoff < self.cfg.deadline => {
                    tracing::debug!("master call failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The master connection: through etcd to whichever master leads when `cfg.etcd` is set or
/// `cfg.master` is an `etcd://HOST:PORT,.../CLUSTER` address, else straight to `cfg.master`.
fn master_rpc(cfg: &ClientConfig, opts: kvpool_transport::rpc::RpcOptions) -> RpcClient {
    let target = if cfg.etcd.is_empty() {
        kvpool_ha::parse_etcd_target(&cfg.master)
    } else {
        Some((cfg.etcd.clone(), cfg.cluster.clone()))
    };
    match target {
        Some((endpoints, cluster)) => {
            let describe = kvpool_ha::etcd_target(&endpoints, &cluster);
            let resolver = kvpool_ha::Resolver::new(endpoints, &cluster);
            RpcClient::with_resolver(describe, resolver.as_fn(), opts)
        }
        None => RpcClient::new(cfg.master.clone(), opts),
    }
}

fn internal(msg: &str) -> ClientError {
    ClientError::Remote(kvpool_proto::WireError::new(ErrorCode::Internal, msg))
}

/// A copy of an error for every item of a batch that failed as a whole.
fn clone_err(e: &ClientError) -> ClientError {
    match e {
        // Copied as is: re-wrapping would print the code twice ("Io(602): Io(602): ...").
        ClientError::Remote(w) => ClientError::Remote(w.clone()),
        _ => ClientError::Remote(kvpool_proto::WireError::new(e.code(), e.to_string())),
    }
}

/// Engines spawn client calls on multi-threaded runtimes: every public future must be `Send`.
#[cfg(test)]
#[allow(dead_code)]
fn futures_are_send(c: std::sync::Arc<Client>) {
    let c2 = c.clone();
    tokio::spawn(async move { c.put(b"k", b"v", &PutOptions::default()).await });
    tokio::spawn(async move { c2.get(b"k").await });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tenant(t: Option<&str>) -> Client {
        Client::new(ClientConfig {
            tenant: t.map(str::to_string),
            ..ClientConfig::default()
        })
    }

    #[test]
    fn tenant_keys_are_prefixed_on_the_wire() {
        assert_eq!(with_tenant(Some("a")).wire_key(b"k"), b"a\0k");
        assert_eq!(with_tenant(None).wire_key(b"k"), b"k");
        assert_eq!(with_tenant(Some("")).wire_key(b"k"), b"k");
        // An empty key stays empty: the master refuses it like any empty key.
        assert_eq!(with_tenant(Some("a")).wire_key(b""), b"");
    }

    #[test]
    fn a_copied_error_names_its_code_once() {
        let remote = ClientError::Remote(kvpool_proto::WireError::new(ErrorCode::Io, "refused"));
        assert_eq!(clone_err(&remote).to_string(), "Io(602): refused");
        assert_eq!(
            clone_err(&clone_err(&remote)).to_string(),
            "Io(602): refused"
        );
        let local = ClientError::LeaseExpired;
        assert_eq!(clone_err(&local).code(), ErrorCode::LeaseExpired);
    }

    #[tokio::test]
    async fn a_tenant_with_a_nul_is_refused_without_a_request() {
        let c = with_tenant(Some("a\0b"));
        assert!(c.config().validate().is_err());
        let e = c.get(b"k").await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        let e = c.put(b"k", b"v", &PutOptions::default()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert_eq!(
            c.remove_all(false).await.unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            c.remove_regex("k", false).await.unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            c.list_keys(b"", None, 10).await.unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
    }
}
