//! The producer side: save, hold, and the bootstrap server consumers claim transfers at.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvpool_proto::{
    decode_body, encode_body, ErrorCode, FrameLimits, HandoffAbort, HandoffAck, HandoffClaim,
    HandoffClaimResponse, HandoffDone, Opcode, WireError,
};
use kvpool_transport::server::{serve_rpc_with, RpcService, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, warn};

use super::{HandoffParams, HoldTable, Outcome, PdConfig, PdError, ProducerStats};
use crate::cache::HostKvCache;
use crate::keys::BlockKey;
use crate::pool::PoolConnector;

/// Lease renewals go to the master in batches of at most this many blocks.
const RENEW_BATCH: usize = 4096;

struct Shared {
    table: Mutex<HoldTable>,
    epoch: Instant,
    /// Wakes the keeper when a hold is added (its deadline may be the earliest).
    changed: Notify,
}

impl Shared {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn table(&self) -> MutexGuard<'_, HoldTable> {
        // The table stays consistent across a panic (every method is a few map operations).
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A producer engine worker's hand-off side: its bootstrap server and its holds. Dropping it
/// stops the server and the holds' renewal (their leases then lapse).
pub struct Producer {
    shared: Arc<Shared>,
    connector: Arc<PoolConnector>,
    addr: SocketAddr,
    advertised: String,
    seq: AtomicU64,
    /// Dropping it stops the server (`None` once `shutdown` took it).
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Producer {
    /// Binds the bootstrap port (`cfg.host`, [`PdConfig::bootstrap_port`]) and starts the
    /// server and the hold keeper. Must be called inside a tokio runtime.
    pub async fn start(connector: Arc<PoolConnector>, cfg: PdConfig) -> Result<Producer, PdError> {
        let port = cfg.bootstrap_port()?;
        let bind = format!("{}:{port}", cfg.host);
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|source| PdError::Bind {
                addr: bind.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| PdError::Bind {
            addr: bind.clone(),
            source,
        })?;
        let advertised = format!("{}:{}", cfg.host, addr.port());
        let shared = Arc::new(Shared {
            table: Mutex::new(HoldTable::new(cfg.abort_timeout)),
            epoch: Instant::now(),
            changed: Notify::new(),
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let opts = ServerOptions {
            limits: FrameLimits::default(),
            token: cfg.token.clone(),
            local_socket: None,
        };
        let service = Arc::new(Bootstrap(Arc::clone(&shared)));
        let server = tokio::spawn(serve_rpc_with(listener, service, opts, async move {
            let _ = stop_rx.await;
        }));
        let keeper = tokio::spawn(keep(
            Arc::clone(&shared),
            Arc::clone(&connector),
            cfg.hold_renew,
        ));
        info!(%advertised, "P/D bootstrap listening");
        Ok(Producer {
            shared,
            connector,
            addr,
            advertised,
            seq: AtomicU64::new(0),
            stop: Some(stop_tx),
            server: Some(server),
            keeper,
        })
    }

    /// Stops the holds' renewal and the bootstrap server, and waits until the server has let
    /// go of its port: a consumer dialing it afterwards is refused at once, never accepted and
    /// then cut off mid-answer (which a plain drop, stopping the server in the background,
    /// allows for a moment).
    pub async fn shutdown(mut self) {
        self.keeper.abort();
        drop(self.stop.take());
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// The bound address (the real port when the base was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` as consumers should dial it.
    pub fn bootstrap_addr(&self) -> &str {
        &self.advertised
    }

    /// Saves `blocks` of `cache` into the pool (the connector's put options decide where:
    /// give it this host's node as preferred to keep the save local), holds them, and
    /// returns what the consumer needs. Fails if any block could not be saved: a partial
    /// hand-off would only make the consumer recompute later.
    pub async fn hand_off(
        &self,
        request_id: &str,
        cache: &HostKvCache,
        blocks: &[(BlockKey, usize)],
    ) -> Result<HandoffParams, PdError> {
        for r in self.connector.save(cache, blocks).await {
            r.map_err(PdError::Save)?;
        }
        let keys: Vec<BlockKey> = blocks.iter().map(|(k, _)| k.clone()).collect();
        Ok(self.hold(request_id, None, keys).await)
    }

    /// Holds blocks the engine already saved (an engine that saves layer by layer, or from
    /// memory that is not a [`HostKvCache`]): the second half of [`Self::hand_off`].
    /// `transfer_id` lets the engine name the transfer before the hold exists (vLLM's
    /// scheduler answers the hand-off parameters before its worker holds the blocks); `None`
    /// makes one. A hold under an id already held replaces it.
    pub async fn hold(
        &self,
        request_id: &str,
        transfer_id: Option<String>,
        keys: Vec<BlockKey>,
    ) -> HandoffParams {
        // The first lease now: the keeper's next renewal may be up to `hold_renew` away.
        renew(&self.connector, &keys).await;
        let transfer_id = transfer_id.unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                self.addr.port(),
                std::process::id(),
                self.seq.fetch_add(1, Ordering::Relaxed)
            )
        });
        self.shared
            .table()
            .insert(self.shared.now(), &transfer_id, request_id, keys.clone());
        self.shared.changed.notify_one();
        debug!(%transfer_id, request_id, blocks = keys.len(), "hand-off held");
        HandoffParams {
            transfer_id,
            bootstrap_addr: self.advertised.clone(),
            block_keys: keys.iter().map(BlockKey::to_param).collect(),
        }
    }

    /// How `transfer_id` ended (released by its consumer, aborted, expired), or `None`
    /// while it is held (or when it is unknown or long forgotten).
    pub fn outcome(&self, transfer_id: &str) -> Option<Outcome> {
        self.shared.table().outcome(transfer_id)
    }

    /// The engine aborted `request_id`: its hand-offs end now, and a consumer that claims
    /// one later is told `TransferAborted`. Returns how many ended.
    pub fn abort(&self, request_id: &str) -> usize {
        self.shared.table().abort_request(request_id)
    }

    pub fn stats(&self) -> ProducerStats {
        self.shared.table().stats()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Expires unclaimed holds at their deadlines and renews the held blocks' leases.
async fn keep(shared: Arc<Shared>, connector: Arc<PoolConnector>, renew_every: Duration) {
    let mut next_renew = shared.now();
    loop {
        let now = shared.now();
        let expired = shared.table().expire(now);
        for id in &expired {
            info!(transfer_id = %id, "hand-off not claimed in time; released");
        }
        if now >= next_renew {
            let keys = shared.table().held_keys();
            renew(&connector, &keys).await;
            next_renew = shared.now() + renew_every;
        }
        let wake = shared
            .table()
            .next_deadline()
            .map_or(next_renew, |d| d.min(next_renew));
        let sleep_for = wake.saturating_sub(shared.now());
        tokio::select! {
            _ = tokio::time::sleep(sleep_for) => {}
            _ = shared.changed.notified() => {}
        }
    }
}

async fn renew(connector: &PoolConnector, keys: &[BlockKey]) {
    for chunk in keys.chunks(RENEW_BATCH) {
        match connector.lookup(chunk).await {
            Ok(n) if n < chunk.len() => {
                // Evicted or lost before the first lease (or a node died): the consumer
                // will miss and recompute; nothing the producer can do but say so.
                warn!(
                    held = chunk.len(),
                    present = n,
                    "held blocks missing from the pool"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("renewing hand-off leases: {e}"),
        }
    }
}

struct Bootstrap(Arc<Shared>);

impl RpcService for Bootstrap {
    fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError> {
        let shared = &self.0;
        match opcode {
            Opcode::HandoffClaim => {
                let m: HandoffClaim = decode_body(body)?;
                let blocks = shared.table().claim(shared.now(), &m.transfer_id)?;
                Ok(encode_body(&HandoffClaimResponse { blocks }))
            }
            Opcode::HandoffDone => {
                let m: HandoffDone = decode_body(body)?;
                shared.table().done(&m.transfer_id)?;
                Ok(encode_body(&HandoffAck {}))
            }
            Opcode::HandoffAbort => {
                let m: HandoffAbort = decode_body(body)?;
                info!(transfer_id = %m.transfer_id, reason = %m.reason, "consumer aborted the hand-off");
                shared.table().abort_transfer(&m.transfer_id)?;
                Ok(encode_body(&HandoffAck {}))
            }
            Opcode::Hello => Ok(encode_body(&kvpool_proto::HelloResponse {
                server_version: u16::from(kvpool_proto::header::VERSION),
            })),
            other => Err(WireError::new(
                ErrorCode::WrongService,
                format!("{other:?} sent to a P/D bootstrap port"),
            )),
        }
    }
}
