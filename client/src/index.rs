//! Same-host lookups: the master's location index (`kvpool_transport::shm::index`), mapped
//! read-only, answers where a key is without a round trip (docs/semantics.md, "Same-host
//! lookups").
//!
//! A get served by the index reads its replica with the node's check (as a cached location
//! is read) and then checks its ticket: the entry unchanged and the master still vouching.
//! Anything else is a miss here and the get asks the master. What the master does for a
//! lookup besides answering (the read lease, the object's recency and read count, NVMe
//! hits) is not skipped, only deferred: the keys read through the index are sent to it as
//! `Touch` batches in the background ([`TOUCH_BATCH`] keys, or what waited
//! [`TOUCH_EVERY`]), whose answers nobody waits for, and before this client's removes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use kvpool_proto::{MasterIndex, NodeId, ObjectInfo, ReplicaDesc, Touch};
use kvpool_transport::{
    rpc::RpcClient,
    shm::index::{key_hash, IndexReader, Ticket},
};

/// How often a client without a usable index asks the master for one again.
const ASK_AGAIN: Duration = Duration::from_secs(1);
/// ... and after the master said it keeps none (or is too old to say).
const ASK_AGAIN_NONE: Duration = Duration::from_secs(30);
/// Keys read through the index are reported to the master once this many are waiting...
pub(crate) const TOUCH_BATCH: usize = 256;
/// ... or the first has waited this long.
pub(crate) const TOUCH_EVERY: Duration = Duration::from_millis(100);
/// At most this many keys wait for a report; reads beyond it (a master far slower than the
/// reads) are not reported: recency is a hint, and a report never grows without bound.
const TOUCH_CAP: usize = 1 << 16;

/// What a get read through the index checks after its copy.
#[derive(Clone)]
pub(crate) struct IndexTicket {
    reader: Arc<IndexReader>,
    ticket: Ticket,
}

impl IndexTicket {
    /// Whether the entry stood throughout the copy that ended before this call.
    pub fn still(&self) -> bool {
        self.reader.still(&self.ticket)
    }
}

#[derive(Default)]
struct Mapped {
    reader: Option<Arc<IndexReader>>,
    /// When to ask the master again, if the index is missing or no longer trusted.
    ask_at: Option<Instant>,
}

/// A client's view of its master's index, and what it learned to use it.
#[derive(Default)]
pub(crate) struct MasterIndexView {
    enabled: bool,
    mapped: Mutex<Mapped>,
    /// Data addresses of the nodes seen in the master's answers: the index names nodes by id.
    nodes: RwLock<HashMap<NodeId, Arc<str>>>,
    touched: Arc<Reports>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MasterIndexView {
    /// `max_batch`: keys per report, as per any master request of this client.
    pub fn new(enabled: bool, max_batch: usize) -> Self {
        MasterIndexView {
            enabled,
            touched: Arc::new(Reports {
                batch: max_batch.max(1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The index to look keys up in now: the one mapped, while its master vouches for it;
    /// else, when the last ask is long enough ago, whatever asking the master again gives.
    pub async fn current(&self, rpc: &RpcClient, now: Instant) -> Option<Arc<IndexReader>> {
        if !self.enabled {
            return None;
        }
        {
            let m = lock(&self.mapped);
            match &m.reader {
                Some(r) if r.valid() => return Some(r.clone()),
                _ if m.ask_at.is_some_and(|t| now < t) => return None,
                _ => {}
            }
        }
        self.ask(rpc).await;
        lock(&self.mapped).reader.clone().filter(|r| r.valid())
    }

    /// Asks the master where its index is and maps it when it is on this host. Failures only
    /// postpone the next ask: gets keep going through the master.
    async fn ask(&self, rpc: &RpcClient) {
        let now = Instant::now();
        let mapped = match rpc.call(&MasterIndex {}).await {
            Ok(a) if a.host == kvpool_transport::shm::net_host_id() => match a.path {
                Some(p) => match IndexReader::open(std::path::Path::new(&p), a.slots) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) => {
                        tracing::debug!("the master's location index is not usable: {e}");
                        None
                    }
                },
                None => None,
            },
            Ok(_) => None,
            // An older master: it keeps none.
            Err(kvpool_transport::TransportError::Remote(w))
                if w.code == kvpool_proto::ErrorCode::UnknownOpcode =>
            {
                tracing::debug!("the master keeps no location index: {w}");
                None
            }
            Err(e) => {
                tracing::debug!("asking the master for its location index: {e}");
                let mut m = lock(&self.mapped);
                m.ask_at = Some(now + ASK_AGAIN);
                return;
            }
        };
        let mut m = lock(&self.mapped);
        m.ask_at = Some(
            now + if mapped.is_some() {
                ASK_AGAIN
            } else {
                ASK_AGAIN_NONE
            },
        );
        if let Some(r) = mapped {
            tracing::debug!(index = %r.path().display(), "reading the master's location index");
            m.reader = Some(r);
        }
    }

    /// Remembers the nodes of a master's answer, by id.
    pub fn learn(&self, replicas: &[ReplicaDesc]) {
        if !self.enabled {
            return;
        }
        let known = {
            let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
            replicas
                .iter()
                .all(|r| nodes.get(&r.node).is_some_and(|a| *a == r.addr))
        };
        if !known {
            let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
            for r in replicas {
                nodes.insert(r.node, r.addr.clone());
            }
        }
    }

    /// Where `wire_key` is, by the index `reader`: the object as a lookup would describe it
    /// (one replica, no lease) and its ticket; `None` when the index has no entry for it or
    /// names a node this client has not seen yet.
    pub fn find(
        &self,
        reader: &Arc<IndexReader>,
        wire_key: &[u8],
    ) -> Option<(Arc<ObjectInfo>, IndexTicket)> {
        let (e, ticket) = reader.find(key_hash(wire_key))?;
        let addr = self
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&e.node)?
            .clone();
        let info = ObjectInfo {
            len: e.len,
            checksum: e.checksum,
            replicas: vec![e.replica(addr)],
            lease_ms: 0,
        };
        Some((
            Arc::new(info),
            IndexTicket {
                reader: reader.clone(),
                ticket,
            },
        ))
    }

    /// Records keys read through the index: they are reported to the master in the
    /// background once [`TOUCH_BATCH`] are waiting, or [`TOUCH_EVERY`] after the first.
    pub fn touch(&self, rpc: &RpcClient, keys: Vec<Vec<u8>>) {
        if keys.is_empty() {
            return;
        }
        let (full, first) = {
            let mut pending = lock(&self.touched.pending);
            let first = pending.is_empty();
            let room = TOUCH_CAP.saturating_sub(pending.len());
            pending.extend(keys.into_iter().take(room));
            (pending.len() >= TOUCH_BATCH, first)
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (reports, rpc) = (self.touched.clone(), rpc.clone());
        if full {
            runtime.spawn(async move { reports.drain(&rpc).await });
        } else if first {
            runtime.spawn(async move {
                tokio::time::sleep(TOUCH_EVERY).await;
                reports.drain(&rpc).await;
            });
        }
    }

    /// Reports the reads waiting now, and returns once the master has them (and any report
    /// in flight): before a remove, so that this client's own reads lease their keys first,
    /// as gets through the master do.
    pub async fn flush(&self, rpc: &RpcClient) {
        let _sending = self.touched.sending.lock().await;
        self.touched.report(rpc, self.touched.take()).await;
    }
}

/// Keys read through the index and not yet reported, and the one report in flight: a master
/// slower than the reads makes the next report larger, never more of them at once.
#[derive(Default)]
struct Reports {
    pending: Mutex<Vec<Vec<u8>>>,
    /// Held while a report is sent.
    sending: tokio::sync::Mutex<()>,
    /// Keys per `Touch` request.
    batch: usize,
}

impl Reports {
    /// Each key once: a hot key read many times between two reports is one lookup.
    fn take(&self) -> Vec<Vec<u8>> {
        let mut keys = std::mem::take(&mut *lock(&self.pending));
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Sends what is pending until nothing is, unless another report is being sent (which
    /// then sends it).
    async fn drain(&self, rpc: &RpcClient) {
        loop {
            {
                let Ok(_sending) = self.sending.try_lock() else {
                    return;
                };
                let keys = self.take();
                if keys.is_empty() {
                    return;
                }
                self.report(rpc, keys).await;
            }
            // Keys that arrived while it was sent: their own timer may have found this
            // report in flight and left them to it.
            if lock(&self.pending).is_empty() {
                return;
            }
        }
    }

    /// Tells the master of reads served by the index: the lookups they skipped, whose
    /// answers nobody needs.
    async fn report(&self, rpc: &RpcClient, keys: Vec<Vec<u8>>) {
        let mut keys = keys.into_iter();
        loop {
            let msg = Touch {
                keys: keys.by_ref().take(self.batch).collect(),
            };
            if msg.keys.is_empty() {
                return;
            }
            if let Err(e) = rpc.call(&msg).await {
                tracing::debug!("reporting reads served by the location index: {e}");
                return;
            }
        }
    }
}
