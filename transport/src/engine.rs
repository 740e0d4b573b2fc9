//! The transfer engine: moves bytes between caller buffers and storage-node segments.
//!
//! A batch for one peer is cut into chunks of at most `stripe_size` bytes, the chunks are
//! packed into requests, and up to `conns_per_peer` requests run at once, each on its own
//! pooled TCP connection. Small ops of a batch share one request (one round trip); a large
//! op is striped across connections. Payload bytes go from the caller's slice to the socket
//! and from the socket into the caller's slice: the engine never copies a large payload
//! (only payloads under [`COALESCE_BELOW`] are gathered into the request's first write, which
//! saves a syscall per small op).
//!
//! Reads and writes of a segment range are idempotent, so a request that failed on a pooled
//! connection (which the peer may have closed while it idled) is retried once on a new one.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use futures::{stream, StreamExt};
use kvpool_proto::{
    decode_body, ErrorCode, FrameLimits, ItemResult, ObjectTag, Read, ReadOp, Token, UnitResponse,
    WireError, Write, WriteOp,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::{frame, TransportError};

/// Payloads below this size are copied into the request's header buffer.
pub const COALESCE_BELOW: usize = 64 << 10;

/// Read buffer for a response's header, body and small payloads.
const RESPONSE_BUF: usize = 256 << 10;

/// Most ops one request carries.
const MAX_OPS_PER_REQUEST: usize = 4096;

/// How the engine connects, stripes and waits.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests in flight to one peer, each on its own connection [4].
    pub conns_per_peer: usize,
    /// Largest chunk of one op, and the size at which requests are cut [4 MiB].
    pub stripe_size: u64,
    pub connect_timeout: Duration,
    /// Limit for one request, from first byte sent to last byte received.
    pub io_timeout: Duration,
    pub limits: FrameLimits,
    /// Compute the crc32c of read bytes as each chunk lands [true].
    pub checksum_reads: bool,
    /// The cluster token, sent in a `Hello` on every new connection before it is used. A
    /// refused token fails the request with `Unauthorized`.
    pub token: Option<Token>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            conns_per_peer: 4,
            stripe_size: 4 << 20,
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(30),
            limits: FrameLimits::default(),
            checksum_reads: true,
            token: None,
        }
    }
}

/// One write: `data.len()` must equal `op.len`.
pub struct WriteItem<'a> {
    pub op: WriteOp,
    pub data: &'a [u8],
}

/// One read: `dst.len()` must equal `op.len`.
pub struct ReadItem<'a> {
    pub op: ReadOp,
    pub dst: &'a mut [u8],
}

/// The items a request carried (by index) and its per-op results, or its failure.
type RequestOutcome<T> = (Vec<ChunkRef>, Result<Vec<ItemResult<T>>, TransportError>);

/// An item's outcome: the value of each of its chunks, or its first error.
type ItemChunks<T> = ItemResult<Vec<(ChunkRef, T)>>;

/// Which item a chunk of a request belongs to, where in it, and how long it is.
#[derive(Debug, Clone, Copy)]
struct ChunkRef {
    item: usize,
    seq: usize,
    len: usize,
}

impl<B: AsRef<[u8]>> Chunk<B> {
    fn chunk_ref(&self) -> ChunkRef {
        ChunkRef {
            item: self.item,
            seq: self.seq,
            len: self.buf.as_ref().len(),
        }
    }
}

/// Moves batches of segment ranges to and from storage nodes over TCP.
pub struct TransferEngine {
    opts: EngineOptions,
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    next_id: AtomicU64,
}

struct Chunk<B> {
    item: usize,
    /// Position of the chunk within its item, for folding per-chunk checksums in order.
    seq: usize,
    segment: kvpool_proto::SegmentId,
    offset: u64,
    buf: B,
}

impl TransferEngine {
    pub fn new(opts: EngineOptions) -> Self {
        TransferEngine {
            opts,
            idle: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Writes every item to the node at `addr`; `tags` name the objects the bytes belong to.
    /// Returns one result per item. An `Err` means the batch as a whole failed (no connection).
    pub async fn write(
        &self,
        addr: &str,
        items: Vec<WriteItem<'_>>,
        tags: Vec<ObjectTag>,
    ) -> Result<Vec<ItemResult<()>>, TransportError> {
        let n = items.len();
        let mut chunks = Vec::new();
        for (i, it) in items.into_iter().enumerate() {
            if it.data.len() as u64 != it.op.len {
                return Err(TransportError::Protocol(format!(
                    "write item {i}: buffer of {} bytes for an op of {}",
                    it.data.len(),
                    it.op.len
                )));
            }
            let mut off = 0u64;
            for (seq, piece) in it.data.chunks(self.stripe()).enumerate() {
                chunks.push(Chunk {
                    item: i,
                    seq,
                    segment: it.op.segment,
                    offset: it.op.offset + off,
                    buf: piece,
                });
                off += piece.len() as u64;
            }
        }
        let mut tags = Some(tags);
        // The futures are built up front (they do nothing until polled): a closure stored
        // inside the stream would make the returned future not `Send` (rust-lang/rust#102211).
        let requests: Vec<_> = self
            .pack(chunks)
            .into_iter()
            .map(|req| self.write_request(addr, req, tags.take().unwrap_or_default()))
            .collect();
        let results = stream::iter(requests)
            .buffer_unordered(self.opts.conns_per_peer.max(1))
            .collect::<Vec<_>>()
            .await;
        Ok(merge(n, results)?
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect())
    }

    /// Reads every item from the node at `addr` into its destination slice. On success an
    /// item's result is the crc32c of its bytes (0 unless `checksum_reads`), computed chunk
    /// by chunk as each lands, so checksumming overlaps the transfer of the other chunks.
    pub async fn read(
        &self,
        addr: &str,
        items: Vec<ReadItem<'_>>,
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        let n = items.len();
        let mut chunks = Vec::new();
        let stripe = self.stripe();
        for (i, it) in items.into_iter().enumerate() {
            if it.dst.len() as u64 != it.op.len {
                return Err(TransportError::Protocol(format!(
                    "read item {i}: buffer of {} bytes for an op of {}",
                    it.dst.len(),
                    it.op.len
                )));
            }
            let mut off = 0u64;
            for (seq, piece) in it.dst.chunks_mut(stripe).enumerate() {
                let len = piece.len() as u64;
                chunks.push(Chunk {
                    item: i,
                    seq,
                    segment: it.op.segment,
                    offset: it.op.offset + off,
                    buf: piece,
                });
                off += len;
            }
        }
        let requests: Vec<_> = self
            .pack(chunks)
            .into_iter()
            .map(|req| self.read_request(addr, req))
            .collect();
        let results = stream::iter(requests)
            .buffer_unordered(self.opts.conns_per_peer.max(1))
            .collect::<Vec<_>>()
            .await;
        let checksum = self.opts.checksum_reads;
        Ok(merge(n, results)?
            .into_iter()
            .map(|r| {
                r.map(|mut chunks| {
                    if !checksum {
                        return 0;
                    }
                    chunks.sort_by_key(|(c, _)| c.seq);
                    chunks
                        .into_iter()
                        .fold(None, |acc, (c, crc)| match acc {
                            None => Some(crc),
                            Some(a) => Some(crc32c::crc32c_combine(a, crc, c.len)),
                        })
                        .unwrap_or(0)
                })
            })
            .collect())
    }

    fn stripe(&self) -> usize {
        usize::try_from(self.opts.stripe_size.max(4096)).unwrap_or(usize::MAX)
    }

    /// Packs chunks into requests of at most `stripe_size` bytes (a single chunk may fill one).
    fn pack<B: AsRef<[u8]>>(&self, chunks: Vec<Chunk<B>>) -> Vec<Vec<Chunk<B>>> {
        let mut out: Vec<Vec<Chunk<B>>> = Vec::new();
        let mut cur = Vec::new();
        let mut bytes = 0u64;
        for c in chunks {
            let len = c.buf.as_ref().len() as u64;
            if !cur.is_empty()
                && (bytes + len > self.opts.stripe_size || cur.len() >= MAX_OPS_PER_REQUEST)
            {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            bytes += len;
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    async fn write_request(
        &self,
        addr: &str,
        req: Vec<Chunk<&[u8]>>,
        tags: Vec<ObjectTag>,
    ) -> RequestOutcome<()> {
        let items: Vec<ChunkRef> = req.iter().map(Chunk::chunk_ref).collect();
        let msg = Write {
            ops: req
                .iter()
                .map(|c| WriteOp {
                    segment: c.segment,
                    offset: c.offset,
                    len: c.buf.len() as u64,
                })
                .collect(),
            tags,
        };
        let payload: u64 = req.iter().map(|c| c.buf.len() as u64).sum();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let (conn, pooled) = match self.checkout(addr).await {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let exchange = write_exchange(conn, id, &msg, &req, payload, &self.opts.limits);
            let r = tokio::time::timeout(self.opts.io_timeout, exchange).await;
            if let Some(done) = self.settle(addr, r, pooled && attempt == 1, "write") {
                break done;
            }
        };
        (items, result)
    }

    async fn read_request(
        &self,
        addr: &str,
        mut req: Vec<Chunk<&mut [u8]>>,
    ) -> RequestOutcome<u32> {
        let items: Vec<ChunkRef> = req.iter().map(Chunk::chunk_ref).collect();
        let msg = Read {
            ops: req
                .iter()
                .map(|c| ReadOp {
                    segment: c.segment,
                    offset: c.offset,
                    len: c.buf.len() as u64,
                })
                .collect(),
        };
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let (conn, pooled) = match self.checkout(addr).await {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let exchange = read_exchange(conn, id, &msg, &mut req, &self.opts);
            let r = tokio::time::timeout(self.opts.io_timeout, exchange).await;
            if let Some(done) = self.settle(addr, r, pooled && attempt == 1, "read") {
                break done;
            }
        };
        (items, result)
    }

    /// What one attempt at an exchange came to: its answer (the connection goes back to the
    /// pool), or `None` when a connection taken from the pool turned out dead (`may_retry`)
    /// and the exchange should run again on a fresh one. Reads and writes of a range are
    /// idempotent, so running one twice is safe.
    fn settle<T>(
        &self,
        addr: &str,
        r: Result<Result<(TcpStream, T), TransportError>, tokio::time::error::Elapsed>,
        may_retry: bool,
        op: &'static str,
    ) -> Option<Result<T, TransportError>> {
        match r {
            Ok(Ok((conn, resp))) => {
                self.checkin(addr, conn);
                Some(Ok(resp))
            }
            Ok(Err(e)) if may_retry && e.is_retryable() => None,
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => Some(Err(TransportError::Timeout {
                op,
                after: self.opts.io_timeout,
            })),
        }
    }

    async fn checkout(&self, addr: &str) -> Result<(TcpStream, bool), TransportError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(addr)
            .and_then(Vec::pop);
        if let Some(c) = pooled {
            return Ok((c, true));
        }
        let mut stream =
            match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(addr)).await {
                Ok(s) => s?,
                Err(_) => {
                    return Err(TransportError::Timeout {
                        op: "connect",
                        after: self.opts.connect_timeout,
                    })
                }
            };
        stream.set_nodelay(true)?;
        if let Some(token) = &self.opts.token {
            crate::auth::client_hello(
                &mut stream,
                token,
                &self.opts.limits,
                self.opts.connect_timeout,
            )
            .await?;
        }
        Ok((stream, false))
    }

    fn checkin(&self, addr: &str, conn: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr.to_string()).or_default();
        if list.len() < self.opts.conns_per_peer * 2 {
            list.push(conn);
        }
    }

    /// Drops idle connections to `addr` (after the peer failed).
    pub fn forget(&self, addr: &str) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
    }
}

/// Sends one write request (small payloads gathered into the head's write, large ones
/// straight from the caller's slice) and reads its per-op results.
async fn write_exchange(
    mut conn: TcpStream,
    id: u64,
    msg: &Write,
    req: &[Chunk<&[u8]>],
    payload: u64,
    limits: &FrameLimits,
) -> Result<(TcpStream, Vec<ItemResult<()>>), TransportError> {
    let mut head = frame::encode_request(id, msg, payload);
    for c in req {
        if c.buf.len() < COALESCE_BELOW {
            head.extend_from_slice(c.buf);
        } else {
            if !head.is_empty() {
                conn.write_all(&head).await?;
                head.clear();
            }
            conn.write_all(c.buf).await?;
        }
    }
    if !head.is_empty() {
        conn.write_all(&head).await?;
    }
    let resp = read_unit_response(&mut conn, limits, id, req.len()).await?;
    Ok((conn, resp))
}

async fn read_exchange(
    mut conn: TcpStream,
    id: u64,
    msg: &Read,
    req: &mut [Chunk<&mut [u8]>],
    opts: &EngineOptions,
) -> Result<(TcpStream, Vec<ItemResult<u32>>), TransportError> {
    conn.write_all(&frame::encode_request(id, msg, 0)).await?;
    // Buffered, so a batch of small payloads costs a few syscalls instead of one each; large
    // payloads still go straight into their slice (tokio's BufReader bypasses its buffer for
    // reads larger than it when it is empty). The response is the only thing on the wire, so
    // nothing read ahead is lost when the reader is dropped.
    let mut rd = tokio::io::BufReader::with_capacity(RESPONSE_BUF, &mut conn);
    let header = frame::read_header(&mut rd, &opts.limits)
        .await?
        .ok_or(TransportError::Closed)?;
    check_reply(&header, id)?;
    let body = frame::read_body(&mut rd, header.body_len).await?;
    let resp: Vec<ItemResult<()>> = match frame::decode_response::<UnitResponse>(&header, &body) {
        Ok(r) => r.items,
        Err(TransportError::Remote(w)) if header.payload_len == 0 => {
            // The whole request was refused; the connection is still in step.
            vec![Err(w); req.len()]
        }
        Err(e) => return Err(e),
    };
    if resp.len() != req.len() {
        return Err(TransportError::Protocol(format!(
            "{} results for {} ops",
            resp.len(),
            req.len()
        )));
    }
    let expected: u64 = req
        .iter()
        .zip(&resp)
        .filter(|(_, r)| r.is_ok())
        .map(|(c, _)| c.buf.len() as u64)
        .sum();
    if header.payload_len != expected {
        return Err(TransportError::Protocol(format!(
            "payload of {} bytes, expected {expected}",
            header.payload_len
        )));
    }
    let mut out = Vec::with_capacity(req.len());
    for (c, r) in req.iter_mut().zip(resp) {
        out.push(match r {
            Ok(()) => {
                frame::read_payload_into(&mut rd, c.buf).await?;
                Ok(if opts.checksum_reads {
                    crc32c::crc32c(c.buf)
                } else {
                    0
                })
            }
            Err(e) => Err(e),
        });
    }
    drop(rd);
    Ok((conn, out))
}

async fn read_unit_response(
    conn: &mut TcpStream,
    limits: &FrameLimits,
    id: u64,
    ops: usize,
) -> Result<Vec<ItemResult<()>>, TransportError> {
    let header = frame::read_header(conn, limits)
        .await?
        .ok_or(TransportError::Closed)?;
    check_reply(&header, id)?;
    if header.payload_len != 0 {
        return Err(TransportError::Protocol(
            "payload on a write response".into(),
        ));
    }
    let body = frame::read_body(conn, header.body_len).await?;
    let items = match header.code() {
        ErrorCode::Ok => {
            decode_body::<UnitResponse>(&body)
                .map_err(TransportError::Remote)?
                .items
        }
        code => vec![
            Err(WireError::new(
                code,
                String::from_utf8_lossy(&body).into_owned()
            ));
            ops
        ],
    };
    if items.len() != ops {
        return Err(TransportError::Protocol(format!(
            "{} results for {ops} ops",
            items.len()
        )));
    }
    Ok(items)
}

fn check_reply(header: &kvpool_proto::FrameHeader, id: u64) -> Result<(), TransportError> {
    if !header.is_response() || header.request_id != id {
        return Err(TransportError::Protocol(format!(
            "response id {} for request {id}",
            header.request_id
        )));
    }
    Ok(())
}

/// Folds per-chunk results into per-item results: an item fails if any of its chunks did;
/// otherwise it carries each chunk's value. `Err` only when every request failed.
fn merge<T>(
    n: usize,
    results: Vec<RequestOutcome<T>>,
) -> Result<Vec<ItemChunks<T>>, TransportError> {
    let mut out: Vec<ItemChunks<T>> = (0..n).map(|_| Ok(Vec::new())).collect();
    let mut all_failed = true;
    let mut first_err = None;
    for (chunks, res) in results {
        match res {
            Ok(rs) => {
                all_failed = false;
                for (c, r) in chunks.into_iter().zip(rs) {
                    match r {
                        Ok(v) => {
                            if let Some(Ok(list)) = out.get_mut(c.item) {
                                list.push((c, v));
                            }
                        }
                        Err(e) => fail_item(out.get_mut(c.item), e),
                    }
                }
            }
            Err(e) => {
                let w = WireError::new(e.code(), e.to_string());
                for c in chunks {
                    fail_item(out.get_mut(c.item), w.clone());
                }
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) if all_failed => Err(e),
        _ => Ok(out),
    }
}

/// Records an item's first error; later errors of the same item are dropped.
fn fail_item<T>(slot: Option<&mut ItemResult<T>>, e: WireError) {
    if let Some(slot) = slot {
        if slot.is_ok() {
            *slot = Err(e);
        }
    }
}
