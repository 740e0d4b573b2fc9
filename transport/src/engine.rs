//! The transfer engine: moves bytes between caller buffers and storage-node segments.
//!
//! An item is one contiguous segment range whose bytes lie in one or more caller slices (a
//! gather list for a write, a scatter list for a read: an object put from, or got into, a
//! paged KV cache's many blocks). A batch for one peer is cut into chunks of at most
//! `stripe_size` bytes of segment range, each with the sub-slices that cover it (a chunk
//! boundary may fall inside a slice); the chunks are packed into requests, and up to
//! `conns_per_peer` requests run at once, each on its own pooled TCP connection. Small items
//! of a batch share one request (one round trip); a large one is striped across connections.
//! Either way an item costs one wire op per chunk, however many slices it has.
//!
//! Payload bytes go from the caller's slices to the socket with vectored writes and from the
//! socket into the caller's slices with vectored reads: the engine never copies a payload on
//! the way out, and on the way in copies only what its response buffer read ahead (the
//! header, the body and the payloads of chunks under [`DIRECT_READ_MIN`]).
//!
//! Reads and writes of a segment range are idempotent, so a request that failed on a pooled
//! connection (which the peer may have closed while it idled) is retried once on a new one.

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
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
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::{frame, TransportError};

/// A read chunk with at least this many bytes still to come once the response buffer is
/// drained is read straight into its slices; smaller ones go through the buffer, so a batch
/// of small payloads costs a few syscalls instead of one each.
pub const DIRECT_READ_MIN: usize = 64 << 10;

/// Read buffer for a response's header, body and small payloads.
const RESPONSE_BUF: usize = 256 << 10;

/// Most slices one vectored syscall is given (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

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

/// One write: `op`'s range is filled from `data`'s slices in order; their lengths must add
/// up to `op.len` (empty slices are allowed and skipped).
pub struct WriteItem<'a> {
    pub op: WriteOp,
    pub data: Vec<&'a [u8]>,
}

impl<'a> WriteItem<'a> {
    /// A write from one slice.
    pub fn new(op: WriteOp, data: &'a [u8]) -> Self {
        WriteItem {
            op,
            data: vec![data],
        }
    }
}

/// One read: `op`'s range is scattered over `dst`'s slices in order; their lengths must add
/// up to `op.len` (empty slices are allowed and skipped).
pub struct ReadItem<'a> {
    pub op: ReadOp,
    pub dst: Vec<&'a mut [u8]>,
}

impl<'a> ReadItem<'a> {
    /// A read into one slice.
    pub fn new(op: ReadOp, dst: &'a mut [u8]) -> Self {
        ReadItem { op, dst: vec![dst] }
    }
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

impl<P> Chunk<P> {
    fn chunk_ref(&self) -> ChunkRef {
        ChunkRef {
            item: self.item,
            seq: self.seq,
            len: self.len,
        }
    }
}

/// Moves batches of segment ranges to and from storage nodes over TCP.
pub struct TransferEngine {
    opts: EngineOptions,
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    next_id: AtomicU64,
}

/// One wire op: a contiguous segment range and the caller's sub-slices that cover it.
struct Chunk<P> {
    item: usize,
    /// Position of the chunk within its item, for folding per-chunk checksums in order.
    seq: usize,
    segment: kvpool_proto::SegmentId,
    offset: u64,
    /// Bytes of the range: the sum of `bufs`' lengths.
    len: usize,
    /// In order, none empty.
    bufs: Vec<P>,
}

/// A caller slice that chunking can cut in two.
trait Piece: Sized {
    fn len(&self) -> usize;
    fn split(self, at: usize) -> (Self, Self);
}

impl Piece for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

impl Piece for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

/// Cuts an item's slices into runs of exactly `stripe` bytes (the last may be shorter),
/// splitting a slice where a run ends inside it and dropping empty slices. A run is one
/// chunk's sub-slices, in order.
fn cut<P: Piece>(slices: Vec<P>, stripe: usize) -> Vec<Vec<P>> {
    let stripe = stripe.max(1);
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut room = stripe;
    for mut s in slices {
        while s.len() > 0 {
            if s.len() < room {
                room -= s.len();
                run.push(s);
                break;
            }
            let (head, tail) = s.split(room);
            run.push(head);
            runs.push(std::mem::take(&mut run));
            room = stripe;
            s = tail;
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
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
            let have: u64 = it.data.iter().map(|d| d.len() as u64).sum();
            if have != it.op.len {
                return Err(TransportError::Protocol(format!(
                    "write item {i}: buffers of {have} bytes for an op of {}",
                    it.op.len
                )));
            }
            self.chunk_item(&mut chunks, i, it.op.segment, it.op.offset, it.data);
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
        for (i, it) in items.into_iter().enumerate() {
            let have: u64 = it.dst.iter().map(|d| d.len() as u64).sum();
            if have != it.op.len {
                return Err(TransportError::Protocol(format!(
                    "read item {i}: buffers of {have} bytes for an op of {}",
                    it.op.len
                )));
            }
            self.chunk_item(&mut chunks, i, it.op.segment, it.op.offset, it.dst);
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

    /// Appends item `item`'s chunks: its range `offset..` on `segment`, cut at every
    /// `stripe` bytes, each chunk with the sub-slices of `slices` that cover it.
    fn chunk_item<P: Piece>(
        &self,
        chunks: &mut Vec<Chunk<P>>,
        item: usize,
        segment: kvpool_proto::SegmentId,
        offset: u64,
        slices: Vec<P>,
    ) {
        let mut off = offset;
        for (seq, bufs) in cut(slices, self.stripe()).into_iter().enumerate() {
            let len: usize = bufs.iter().map(Piece::len).sum();
            chunks.push(Chunk {
                item,
                seq,
                segment,
                offset: off,
                len,
                bufs,
            });
            off += len as u64;
        }
    }

    /// Packs chunks into requests of at most `stripe_size` bytes (a single chunk may fill one).
    fn pack<P>(&self, chunks: Vec<Chunk<P>>) -> Vec<Vec<Chunk<P>>> {
        let mut out: Vec<Vec<Chunk<P>>> = Vec::new();
        let mut cur = Vec::new();
        let mut bytes = 0u64;
        for c in chunks {
            let len = c.len as u64;
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
                    len: c.len as u64,
                })
                .collect(),
            tags,
        };
        let payload: u64 = req.iter().map(|c| c.len as u64).sum();
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
                    len: c.len as u64,
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

/// Sends one write request, its head and every chunk's slices in vectored writes, and reads
/// its per-op results.
async fn write_exchange(
    mut conn: TcpStream,
    id: u64,
    msg: &Write,
    req: &[Chunk<&[u8]>],
    payload: u64,
    limits: &FrameLimits,
) -> Result<(TcpStream, Vec<ItemResult<()>>), TransportError> {
    let head = frame::encode_request(id, msg, payload);
    let bufs: Vec<&[u8]> = std::iter::once(head.as_slice())
        .chain(req.iter().flat_map(|c| c.bufs.iter().copied()))
        .collect();
    write_all_gathered(&mut conn, &bufs).await?;
    let resp = read_unit_response(&mut conn, limits, id, req.len()).await?;
    Ok((conn, resp))
}

/// Writes all of `bufs`, in order, with as few `writev`s as the socket allows.
async fn write_all_gathered(conn: &mut TcpStream, bufs: &[&[u8]]) -> std::io::Result<()> {
    // Position: the first unwritten byte is `bufs[at][skip]`.
    let (mut at, mut skip) = (0, 0);
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS.min(bufs.len()));
    while at < bufs.len() {
        iov.clear();
        iov.push(IoSlice::new(&bufs[at][skip..]));
        iov.extend(
            bufs[at + 1..]
                .iter()
                .take(MAX_IOVECS - 1)
                .map(|b| IoSlice::new(b)),
        );
        let mut n = conn.write_vectored(&iov).await?;
        if n == 0 && iov.iter().any(|b| !b.is_empty()) {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Step past what went out, and past empty slices, which a zero-byte write leaves.
        while at < bufs.len() && n >= bufs[at].len() - skip {
            n -= bufs[at].len() - skip;
            at += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
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
    // chunks still go straight into their slices (`read_chunk`). The response is the only
    // thing on the wire, so nothing read ahead is lost when the reader is dropped.
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
        .map(|(c, _)| c.len as u64)
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
                read_chunk(&mut rd, c).await?;
                Ok(if opts.checksum_reads {
                    c.bufs
                        .iter()
                        .fold(0, |crc, b| crc32c::crc32c_append(crc, b))
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

/// Fills a chunk's slices, in order, from the response: first what the buffer read ahead,
/// then, if at least [`DIRECT_READ_MIN`] bytes are still to come, straight from the socket
/// with vectored reads (the buffer is empty then, so the byte order holds); otherwise through
/// the buffer.
async fn read_chunk(
    rd: &mut BufReader<&mut TcpStream>,
    c: &mut Chunk<&mut [u8]>,
) -> Result<(), TransportError> {
    let mut left = c.len;
    // Position: the first unfilled byte is `c.bufs[at][skip]`.
    let (mut at, mut skip) = (0, 0);
    while at < c.bufs.len() && !rd.buffer().is_empty() {
        let buffered = rd.buffer();
        let dst = &mut c.bufs[at][skip..];
        let n = buffered.len().min(dst.len());
        dst[..n].copy_from_slice(&buffered[..n]);
        rd.consume(n);
        left -= n;
        skip += n;
        if skip == c.bufs[at].len() {
            at += 1;
            skip = 0;
        }
    }
    if left == 0 {
        return Ok(());
    }
    if left < DIRECT_READ_MIN {
        frame::read_payload_into(rd, &mut c.bufs[at][skip..]).await?;
        for b in &mut c.bufs[at + 1..] {
            frame::read_payload_into(rd, b).await?;
        }
        return Ok(());
    }
    let conn: &TcpStream = rd.get_mut();
    while at < c.bufs.len() {
        let (first, rest) = c.bufs[at..].split_at_mut(1);
        let mut iov: Vec<IoSliceMut<'_>> = std::iter::once(IoSliceMut::new(&mut first[0][skip..]))
            .chain(
                rest.iter_mut()
                    .take(MAX_IOVECS - 1)
                    .map(|b| IoSliceMut::new(b)),
            )
            .collect();
        let mut n = loop {
            conn.readable().await?;
            match conn.try_read_vectored(&mut iov) {
                Ok(0) => return Err(TransportError::Truncated),
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        while at < c.bufs.len() && n >= c.bufs[at].len() - skip {
            n -= c.bufs[at].len() - skip;
            at += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_proto::SegmentId;

    const STRIPE: usize = 4 << 20;

    /// Distinct bytes per position, so a misplaced byte shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    /// Checks `cut`'s contract: runs of exactly `stripe` bytes but the last, no empty
    /// slice, and the bytes in the original order.
    fn check_cut(sizes: &[usize], stripe: usize) -> Vec<Vec<usize>> {
        let bufs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u8))
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        let runs = cut(slices, stripe);
        let total: usize = sizes.iter().sum();
        assert_eq!(runs.len(), total.div_ceil(stripe), "sizes {sizes:?}");
        for (k, run) in runs.iter().enumerate() {
            let len: usize = run.iter().map(|s| s.len()).sum();
            if k + 1 < runs.len() {
                assert_eq!(len, stripe, "run {k} of {sizes:?}");
            } else {
                assert!(len > 0 && len <= stripe, "last run of {sizes:?}");
            }
            assert!(run.iter().all(|s| !s.is_empty()), "empty slice in run {k}");
        }
        let joined: Vec<u8> = runs
            .iter()
            .flatten()
            .flat_map(|s| s.iter().copied())
            .collect();
        assert!(joined == bufs.concat(), "bytes out of order for {sizes:?}");
        runs.iter()
            .map(|r| r.iter().map(|s| s.len()).collect())
            .collect()
    }

    #[test]
    fn cut_keeps_whole_slices_within_a_stripe() {
        assert_eq!(
            check_cut(&[1, 4095, 32 << 10], STRIPE),
            vec![vec![1, 4095, 32 << 10]]
        );
        assert_eq!(
            check_cut(&[32 << 10; 128], STRIPE),
            vec![vec![32 << 10; 128]]
        );
    }

    #[test]
    fn cut_splits_a_slice_straddling_the_stripe() {
        // 127 slices of 32 KiB leave 32 KiB of room; a 64 KiB slice is cut in the middle.
        let mut sizes = vec![32 << 10; 127];
        sizes.push(64 << 10);
        sizes.push(1);
        let runs = check_cut(&sizes, STRIPE);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].last(), Some(&(32 << 10)));
        assert_eq!(runs[1], vec![32 << 10, 1]);
        // A slice spanning several stripes, starting and ending inside one.
        let runs = check_cut(&[4095, 3 * STRIPE, 1], STRIPE);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[0], vec![4095, STRIPE - 4095]);
        assert_eq!(runs[1], vec![STRIPE]);
        assert_eq!(runs[3], vec![4095, 1]);
    }

    #[test]
    fn cut_ends_a_run_exactly_at_a_slice_end() {
        let runs = check_cut(&[STRIPE / 2, STRIPE / 2, 1], STRIPE);
        assert_eq!(runs, vec![vec![STRIPE / 2, STRIPE / 2], vec![1]]);
        assert_eq!(check_cut(&[STRIPE], STRIPE), vec![vec![STRIPE]]);
    }

    #[test]
    fn cut_skips_empty_slices() {
        assert_eq!(
            check_cut(&[0, 1, 0, 0, 4095, 0], STRIPE),
            vec![vec![1, 4095]]
        );
        assert!(check_cut(&[0, 0], STRIPE).is_empty());
        assert!(check_cut(&[], STRIPE).is_empty());
    }

    #[test]
    fn cut_odd_sizes_at_a_small_stripe() {
        for seed in 0..50u64 {
            let sizes: Vec<usize> = (0..1 + seed % 40)
                .map(|i| ((seed * 7919 + i * 104_729) % 9000) as usize)
                .collect();
            check_cut(&sizes, 4096);
        }
        // And the `&mut` flavour cuts the same way.
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 3];
        let runs = cut(vec![a.as_mut_slice(), b.as_mut_slice()], 4096);
        let lens: Vec<Vec<usize>> = runs
            .iter()
            .map(|r| r.iter().map(|s| s.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![4096], vec![904, 3]]);
    }

    #[test]
    fn chunks_cover_consecutive_segment_ranges() {
        let engine = TransferEngine::new(EngineOptions::default());
        let bufs: Vec<Vec<u8>> = [1usize, 4095, 32 << 10, STRIPE, 7]
            .iter()
            .map(|&n| vec![0u8; n])
            .collect();
        let mut chunks = Vec::new();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        engine.chunk_item(&mut chunks, 3, SegmentId(9), 1000, slices);
        let total: usize = bufs.iter().map(Vec::len).sum();
        assert_eq!(chunks.len(), 2);
        let mut at = 1000u64;
        for (seq, c) in chunks.iter().enumerate() {
            assert_eq!(
                (c.item, c.seq, c.segment, c.offset),
                (3, seq, SegmentId(9), at)
            );
            assert_eq!(c.len, c.bufs.iter().map(|b| b.len()).sum::<usize>());
            at += c.len as u64;
        }
        assert_eq!(at, 1000 + total as u64);
    }

    /// Gathered writes and scattered reads over a real socket: more slices than one syscall
    /// takes, odd sizes, a scatter shape unlike the gather shape, and bytes already in the
    /// response buffer when the chunk starts.
    #[tokio::test]
    async fn gathered_writes_land_in_a_different_scatter_shape() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sizes: Vec<usize> = (0..3000)
            .map(|i| [1, 4095, 0, 700, 32 << 10][i % 5])
            .collect();
        let src: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u8))
            .collect();
        let all = src.concat();
        // A second chunk, small enough to be read through the buffer.
        let tail = pattern(5000, 77);
        let writer = async {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let prefix = b"head";
            let mut bufs: Vec<&[u8]> = vec![prefix];
            bufs.extend(src.iter().map(Vec::as_slice));
            bufs.push(&tail);
            write_all_gathered(&mut conn, &bufs).await.unwrap();
        };
        let reader = async {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut dst = vec![0u8; all.len()];
            // Scatter shape: 13 bytes, then 100 KiB pieces, then the rest.
            let (first, rest) = dst.split_at_mut(13);
            let mut bufs: Vec<&mut [u8]> = vec![first];
            bufs.extend(rest.chunks_mut(100 << 10));
            let mut c = Chunk {
                item: 0,
                seq: 0,
                segment: SegmentId(0),
                offset: 0,
                len: all.len(),
                bufs,
            };
            let mut rd = BufReader::with_capacity(RESPONSE_BUF, &mut conn);
            let mut head = [0u8; 4];
            frame::read_payload_into(&mut rd, &mut head).await.unwrap();
            assert_eq!(&head, b"head");
            read_chunk(&mut rd, &mut c).await.unwrap();
            let crc = c
                .bufs
                .iter()
                .fold(0, |crc, b| crc32c::crc32c_append(crc, b));
            assert_eq!(crc, crc32c::crc32c(&all));
            drop(c);
            assert!(dst == all, "bytes differ");
            let mut small = vec![0u8; tail.len()];
            let (a, b) = small.split_at_mut(1);
            let (b, d) = b.split_at_mut(4095);
            let mut c = Chunk {
                item: 0,
                seq: 1,
                segment: SegmentId(0),
                offset: 0,
                len: tail.len(),
                bufs: vec![a, b, d],
            };
            read_chunk(&mut rd, &mut c).await.unwrap();
            drop(c);
            assert!(small == tail, "small chunk differs");
        };
        tokio::join!(writer, reader);
    }
}
