//! The RDMA path with a device (feature `rdma`): opening the device once, connecting to
//! nodes, and running batches as one-sided READs and WRITEs.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use kvpool_proto::{rdma::RdmaWritten, ItemResult, ObjectTag, UnitResponse};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{forced, RdmaPath, Via, BOUNCE_SIZE};
use crate::{
    engine::{EngineOptions, ReadItem, WriteItem},
    frame,
    rdma::{
        registry::{Access, Registry},
        wire, DeviceOptions, Op, Piece, RdmaDevice, RdmaError, RdmaPeer, Transfer,
    },
    shm::TransportMode,
    TransportError,
};

/// How long a node whose RDMA connection failed (refused connection, timeout) is reached
/// otherwise before RDMA is tried again.
const RETRY_CONNECT: Duration = Duration::from_secs(5);

/// How long a node that cannot do RDMA (no device, an older build) is reached otherwise
/// before it is asked again (it may have been restarted with a device).
const RETRY_UNSUPPORTED: Duration = Duration::from_secs(60);

/// The bounce buffer's registration id: client buffer ids count up from 0.
const BOUNCE_ID: u64 = u64::MAX;

/// The device, opened on first use: `Err` says why this process has no RDMA.
#[derive(Default)]
pub(super) struct Lazy(OnceLock<Result<Opened, String>>);

/// An open device and the registered bounce buffer that unregistered caller memory moves
/// through (one batch at a time).
pub(super) struct Opened {
    dev: Arc<RdmaDevice>,
    bounce: tokio::sync::Mutex<Box<[u8]>>,
    bounce_addr: u64,
}

impl Drop for Opened {
    fn drop(&mut self) {
        // The device may outlive this (connections hold it): deregister the bounce buffer
        // before its memory is freed. No batch runs: they borrow `self`.
        let _ = self.dev.unregister(self.bounce_addr);
    }
}

impl Lazy {
    /// The device, if it was opened already (does not try to open it).
    pub(super) fn opened(&self) -> Option<&Arc<RdmaDevice>> {
        self.0.get()?.as_ref().ok().map(|o| &o.dev)
    }

    fn get(&self, buffers: &std::sync::Mutex<Registry<()>>) -> Result<&Opened, String> {
        self.0
            .get_or_init(|| {
                let buffers = buffers.lock().unwrap_or_else(|p| p.into_inner());
                let opened = open(&buffers);
                if let Err(why) = &opened {
                    tracing::info!("no RDMA on this host, using shared memory or TCP: {why}");
                }
                opened
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Opens the device, registers the bounce buffer and every buffer recorded before.
fn open(buffers: &Registry<()>) -> Result<Opened, String> {
    let dev = RdmaDevice::open(&DeviceOptions::from_env()).map_err(|e| e.to_string())?;
    let mut bounce = vec![0u8; BOUNCE_SIZE].into_boxed_slice();
    let bounce_addr = bounce.as_mut_ptr() as u64;
    // SAFETY: the bounce memory is owned by the `Opened` built below, which deregisters it
    // in its `Drop` before the memory is freed.
    unsafe { dev.register(BOUNCE_ID, bounce_addr, BOUNCE_SIZE as u64, Access::Local) }
        .map_err(|e| format!("registering the bounce buffer: {e}"))?;
    for r in buffers.regions() {
        // SAFETY: `RdmaPath::register`'s caller keeps every recorded buffer mapped until it
        // unregisters it, which deregisters it from this device too.
        if let Err(e) = unsafe { dev.register(r.id, r.addr, r.len, Access::Local) } {
            // Not fatal: transfers from this buffer go through the bounce buffer.
            tracing::warn!(addr = r.addr, len = r.len, "cannot register a buffer: {e}");
        }
    }
    tracing::info!(device = dev.name(), "RDMA device open");
    Ok(Opened {
        dev,
        bounce: tokio::sync::Mutex::new(bounce),
        bounce_addr,
    })
}

/// What a client knows about reaching one node over RDMA.
pub(super) enum State {
    Connected(Arc<tokio::sync::Mutex<Conn>>),
    /// Not over RDMA until `until`, because of `why`.
    Elsewhere {
        until: Instant,
        why: String,
    },
}

/// A data connection that set up RDMA lanes: the lanes live as long as it does, and the
/// put's `RdmaWritten` goes on it.
pub(super) struct Conn {
    stream: TcpStream,
    lanes: RdmaPeer,
    next_id: u64,
}

impl RdmaPath {
    pub(in crate::engine) fn describe(&self, addr: &str) -> Option<&'static str> {
        match self.peers().get(addr) {
            Some(State::Connected(_)) => Some("rdma"),
            _ => None,
        }
    }

    pub(in crate::engine) async fn probe(
        &self,
        addr: &str,
        opts: &EngineOptions,
    ) -> Result<(), String> {
        self.conn(addr, opts).await.map(|_| ())
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, State>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The RDMA connection to the node at `addr`, connecting first if needed; `Err` says why
    /// the node is reached otherwise.
    async fn conn(
        &self,
        addr: &str,
        opts: &EngineOptions,
    ) -> Result<Arc<tokio::sync::Mutex<Conn>>, String> {
        let known = match self.peers().get(addr) {
            Some(State::Connected(c)) => return Ok(c.clone()),
            Some(State::Elsewhere { until, why }) if Instant::now() < *until => {
                return Err(why.clone())
            }
            Some(_) => true,
            None => false,
        };
        let dev = self.dev.get(&self.buffers)?.dev.clone();
        let connected = tokio::time::timeout(opts.connect_timeout, connect(addr, &dev, opts))
            .await
            .unwrap_or_else(|_| {
                Err(RdmaError::Connection(TransportError::Timeout {
                    op: "rdma connect",
                    after: opts.connect_timeout,
                }))
            });
        match connected {
            Ok(c) => {
                tracing::debug!(addr, lanes = c.lanes.live_lanes(), "RDMA lanes to node");
                let c = Arc::new(tokio::sync::Mutex::new(c));
                self.peers()
                    .insert(addr.to_string(), State::Connected(c.clone()));
                Ok(c)
            }
            Err(e) => {
                let why = e.to_string();
                if !known {
                    tracing::info!("not using RDMA for the node at {addr}: {why}");
                }
                let wait = if e.is_fallback() {
                    RETRY_UNSUPPORTED
                } else {
                    RETRY_CONNECT
                };
                self.forget(addr, wait, why.clone());
                Err(why)
            }
        }
    }

    /// Stops using RDMA for `addr` for `wait` (dropping its lanes).
    fn forget(&self, addr: &str, wait: Duration, why: String) {
        let until = Instant::now() + wait;
        self.peers()
            .insert(addr.to_string(), State::Elsewhere { until, why });
    }

    /// What every batch checks first: the node's lanes (connected, then locked for the batch)
    /// and the device, or why the batch goes elsewhere (no RDMA to the node, an op the lanes
    /// cannot serve, more unregistered memory than the bounce buffer holds). `ops` are the
    /// items' (segment, length); `pieces` the caller's memory (address, length). Plain slices,
    /// not iterators: the future must stay `Send` for callers that spawn it.
    async fn prepare(
        &self,
        addr: &str,
        ops: &[(u64, u64)],
        pieces: &[(u64, usize)],
        opts: &EngineOptions,
    ) -> Result<Ready<'_>, TransportError> {
        let conn = match self.conn(addr, opts).await {
            Ok(c) => c,
            Err(why) => return Ok(Ready::Elsewhere(why)),
        };
        let opened = self
            .dev
            .get(&self.buffers)
            .map_err(|why| forced(addr, &why))?;
        let conn = conn.lock_owned().await;
        if let Some(why) = unsuitable(&conn.lanes, ops.iter().copied()) {
            return Ok(Ready::Elsewhere(why.into()));
        }
        if bounce_bytes(&opened.dev, pieces) > BOUNCE_SIZE {
            return Ok(Ready::Elsewhere(BOUNCE_FULL.into()));
        }
        Ok(Ready::Go(conn, opened))
    }

    /// `items` back for TCP, or the error of a forced transport.
    fn elsewhere<I, R>(
        &self,
        addr: &str,
        why: &str,
        items: Vec<I>,
        opts: &EngineOptions,
    ) -> Result<Via<I, R>, TransportError> {
        match opts.transport {
            TransportMode::Rdma => Err(forced(addr, why)),
            _ => Ok(Via::Tcp(items)),
        }
    }

    /// Writes each item with RDMA WRITEs, then hands the node the tags (`RdmaWritten`).
    pub(in crate::engine) async fn write<'a>(
        &self,
        addr: &str,
        items: Vec<WriteItem<'a>>,
        tags: &[ObjectTag],
        opts: &EngineOptions,
    ) -> Result<Via<WriteItem<'a>, ()>, TransportError> {
        let ops: Vec<_> = items
            .iter()
            .map(|it| (it.op.segment.0, it.op.len))
            .collect();
        let pieces: Vec<_> = items
            .iter()
            .flat_map(|it| it.data.iter().map(|s| (s.as_ptr() as u64, s.len())))
            .collect();
        let (mut conn, opened) = match self.prepare(addr, &ops, &pieces, opts).await? {
            Ready::Go(conn, opened) => (conn, opened),
            Ready::Elsewhere(why) => return self.elsewhere(addr, &why, items, opts),
        };
        let mut bounce = opened.bounce.lock().await;
        let mut at = 0usize;
        let mut transfers = Vec::with_capacity(items.len());
        for it in &items {
            let mut local = Vec::with_capacity(it.data.len());
            for s in it.data.iter().filter(|s| !s.is_empty()) {
                let (a, len) = (s.as_ptr() as u64, s.len() as u64);
                if opened.dev.covers(a, len) {
                    local.push(Piece { addr: a, len });
                    continue;
                }
                // Fits: the batch's bounce bytes were counted above.
                bounce[at..at + s.len()].copy_from_slice(s);
                local.push(Piece {
                    addr: opened.bounce_addr + at as u64,
                    len,
                });
                at += s.len();
            }
            transfers.push(Transfer {
                op: Op::Write,
                region: it.op.segment.0,
                offset: it.op.offset,
                local,
            });
        }
        let lanes = &mut conn.lanes;
        // SAFETY: every piece is in a buffer registered with this device (checked above: the
        // caller's, or the bounce buffer); the caller's slices are borrowed for this call and
        // the bounce buffer is locked, so nothing writes them while the WRITEs read them.
        let ran = blocking(|| unsafe { lanes.run(&transfers, opts.io_timeout) });
        drop(bounce);
        let results = match self.settle(addr, ran, opts) {
            Some(r) => r?,
            None => return Ok(Via::Tcp(items)),
        };
        if !tags.is_empty() {
            if let Err(e) = written(&mut conn, tags.to_vec(), opts).await {
                // The node may not know these objects: the put fails and is revoked.
                drop(conn);
                self.forget(addr, RETRY_CONNECT, e.to_string());
                return Err(e);
            }
        }
        Ok(Via::Done(results))
    }

    /// Reads each item with RDMA READs; an item's value is the crc32c of the bytes the
    /// caller got (0 unless `checksum_reads`).
    pub(in crate::engine) async fn read<'a>(
        &self,
        addr: &str,
        mut items: Vec<ReadItem<'a>>,
        opts: &EngineOptions,
    ) -> Result<Via<ReadItem<'a>, u32>, TransportError> {
        let ops: Vec<_> = items
            .iter()
            .map(|it| (it.op.segment.0, it.op.len))
            .collect();
        let pieces: Vec<_> = items
            .iter()
            .flat_map(|it| it.dst.iter().map(|d| (d.as_ptr() as u64, d.len())))
            .collect();
        let (mut conn, opened) = match self.prepare(addr, &ops, &pieces, opts).await? {
            Ready::Go(conn, opened) => (conn, opened),
            Ready::Elsewhere(why) => return self.elsewhere(addr, &why, items, opts),
        };
        let bounce = opened.bounce.lock().await;
        // (item, slice, bounce offset) of each piece read through the bounce buffer.
        let mut bounced = Vec::new();
        let mut at = 0usize;
        let mut transfers = Vec::with_capacity(items.len());
        for (i, it) in items.iter_mut().enumerate() {
            let mut local = Vec::with_capacity(it.dst.len());
            for (j, d) in it.dst.iter_mut().enumerate().filter(|(_, d)| !d.is_empty()) {
                let (a, len) = (d.as_mut_ptr() as u64, d.len() as u64);
                if opened.dev.covers(a, len) {
                    local.push(Piece { addr: a, len });
                    continue;
                }
                local.push(Piece {
                    addr: opened.bounce_addr + at as u64,
                    len,
                });
                bounced.push((i, j, at));
                at += d.len();
            }
            transfers.push(Transfer {
                op: Op::Read,
                region: it.op.segment.0,
                offset: it.op.offset,
                local,
            });
        }
        let lanes = &mut conn.lanes;
        // SAFETY: every piece is in a buffer registered with this device (checked above);
        // the caller's slices are borrowed mutably for this call and the bounce buffer is
        // locked, so nothing reads or writes them while the READs fill them.
        let ran = blocking(|| unsafe { lanes.run(&transfers, opts.io_timeout) });
        let results = match self.settle(addr, ran, opts) {
            Some(r) => r?,
            None => return Ok(Via::Tcp(items)),
        };
        for (i, j, from) in bounced {
            let d = &mut items[i].dst[j];
            let n = d.len();
            d.copy_from_slice(&bounce[from..from + n]);
        }
        drop(bounce);
        let out = items
            .iter()
            .zip(results)
            .map(|(it, r)| {
                r.map(|()| match opts.checksum_reads {
                    true => kvpool_proto::crc32c::crc32c_parts(it.dst.iter()),
                    false => 0,
                })
            })
            .collect();
        Ok(Via::Done(out))
    }

    /// A batch's outcome as per-item results. `None`: the batch should run again over TCP
    /// (`auto` only: its lanes failed or an item's request failed in a way a new attempt may
    /// not, as the engine retries a failed pooled connection once); the node's lanes are
    /// dropped and set up again later.
    fn settle(
        &self,
        addr: &str,
        ran: Result<Vec<Result<(), RdmaError>>, RdmaError>,
        opts: &EngineOptions,
    ) -> Option<Result<Vec<ItemResult<()>>, TransportError>> {
        let forced_rdma = opts.transport == TransportMode::Rdma;
        let retry = match &ran {
            Err(e) => Some(e.to_string()),
            Ok(rs) => rs
                .iter()
                .find_map(|r| r.as_ref().err().filter(|e| e.is_retryable()))
                .map(ToString::to_string),
        };
        if let Some(why) = retry {
            tracing::debug!(addr, "RDMA batch failed, lanes dropped: {why}");
            self.forget(addr, RETRY_CONNECT, why);
            if !forced_rdma {
                return None;
            }
        }
        Some(match ran {
            Err(e) => Err(TransportError::Remote(e.into_wire())),
            Ok(rs) => Ok(rs
                .into_iter()
                .map(|r| r.map_err(RdmaError::into_wire))
                .collect()),
        })
    }
}

/// Why RDMA does not suit this batch (the node did not register a segment it names, such as
/// its NVMe tier, or an empty op, which the device cannot express), if it does not.
fn unsuitable(lanes: &RdmaPeer, ops: impl Iterator<Item = (u64, u64)>) -> Option<&'static str> {
    for (segment, len) in ops {
        if len == 0 {
            return Some("an empty op");
        }
        if !lanes.has_region(segment) {
            return Some("a segment the node does not serve over RDMA (its NVMe tier)");
        }
    }
    None
}

/// Bytes of the pieces `(pointer, len)` not inside a registered buffer: what a batch needs of
/// the bounce buffer.
fn bounce_bytes(dev: &RdmaDevice, pieces: &[(u64, usize)]) -> usize {
    pieces
        .iter()
        .filter(|&&(p, len)| len > 0 && !dev.covers(p, len as u64))
        .map(|&(_, len)| len)
        .sum()
}

const BOUNCE_FULL: &str = "the batch's unregistered memory exceeds the bounce buffer";

/// A batch's start ([`RdmaPath::prepare`]): go, holding the node's lanes, or go elsewhere.
enum Ready<'d> {
    Go(tokio::sync::OwnedMutexGuard<Conn>, &'d Opened),
    Elsewhere(String),
}

/// Runs `f`, which blocks for the length of a batch (the completion queue is busy-polled),
/// without starving the runtime's other tasks where the runtime allows; on a current-thread
/// runtime it simply blocks. Either way it runs to the end inside the caller's poll, so the
/// batch cannot be abandoned while the device still uses the caller's memory.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A data connection to `addr` with RDMA lanes set up over it.
async fn connect(
    addr: &str,
    dev: &Arc<RdmaDevice>,
    opts: &EngineOptions,
) -> Result<Conn, RdmaError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| RdmaError::Connection(e.into()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| RdmaError::Connection(e.into()))?;
    if let Some(token) = &opts.token {
        crate::auth::client_hello(&mut stream, token, &opts.limits, opts.connect_timeout)
            .await
            .map_err(RdmaError::Connection)?;
    }
    let lanes = wire::connect_over(&mut stream, dev, 1, &opts.limits).await?;
    Ok(Conn {
        stream,
        lanes,
        next_id: 1,
    })
}

/// Hands the node a put's tags after its WRITEs completed; a refused tag fails the batch.
async fn written(
    conn: &mut Conn,
    tags: Vec<ObjectTag>,
    opts: &EngineOptions,
) -> Result<(), TransportError> {
    conn.next_id += 1;
    let id = conn.next_id;
    let stream = &mut conn.stream;
    let exchange = async {
        stream
            .write_all(&frame::encode_request(id, &RdmaWritten { tags }, 0))
            .await?;
        let h = frame::read_header(&mut *stream, &opts.limits)
            .await?
            .ok_or(TransportError::Closed)?;
        if !h.is_response() || h.request_id != id || h.payload_len != 0 {
            return Err(TransportError::Protocol(format!(
                "unexpected frame (id {}, payload {}) for RdmaWritten {id}",
                h.request_id, h.payload_len
            )));
        }
        let body = frame::read_body(&mut *stream, h.body_len).await?;
        frame::decode_response::<UnitResponse>(&h, &body)
    };
    let r = tokio::time::timeout(opts.io_timeout, exchange)
        .await
        .map_err(|_| TransportError::Timeout {
            op: "rdma written",
            after: opts.io_timeout,
        })??;
    match r.items.into_iter().find_map(Result::err) {
        Some(e) => Err(TransportError::Remote(e)),
        None => Ok(()),
    }
}
