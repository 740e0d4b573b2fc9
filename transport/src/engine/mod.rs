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
//!
//! # Layout
//! - this module: [`TransferEngine`], its options and items, and running a batch: cut,
//!   pack, run up to `conns_per_peer` requests at once, merge per-chunk into per-item results.
//! - `chunk`: cutting items into stripe-sized chunks across the caller's slices; packing.
//! - `exchange`: the write and read exchanges on the wire, with vectored I/O.
//! - `pool`: pooled connections, and the retry of a request whose pooled connection died.
//! - `rdma`: RDMA per node (after shared memory, before TCP), the client's registered
//!   buffers, and batches as one-sided READs and WRITEs (feature `rdma`).

mod chunk;
mod exchange;
mod pool;
mod rdma;

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Mutex},
    time::Duration,
};

use futures::{stream, StreamExt};
use kvpool_proto::{
    ErrorCode, FrameLimits, ItemResult, NodeId, ObjectTag, Read, ReadOp, ReplicaId, SegmentId,
    Token, WireError, Write, WriteOp,
};
use tokio::net::TcpStream;

use crate::{
    shm::{ShmPeers, TransportMode},
    TransportError,
};
use chunk::{Chunk, Item, Piece};
use exchange::Exchange;
pub use rdma::BOUNCE_SIZE;
use rdma::{RdmaPath, Via};

/// A read chunk with at least this many bytes still to come once the response buffer is
/// drained is read straight into its slices; smaller ones go through the buffer. The same
/// threshold as the data server's ([`crate::dataplane::DIRECT_MIN`]).
pub use crate::dataplane::DIRECT_MIN as DIRECT_READ_MIN;

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
    /// Shared memory for nodes on this host, or TCP [auto: shared memory where possible].
    pub transport: TransportMode,
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
            transport: TransportMode::Auto,
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

/// A storage node's confirmation of a write, still to come (see
/// [`TransferEngine::write_then_confirm`]).
pub type Confirmation = futures::future::BoxFuture<'static, Result<(), TransportError>>;

/// A request's chunks, given back, and its per-op results, or its failure.
type RequestOutcome<P, T> = (Vec<Chunk<P>>, Result<Vec<ItemResult<T>>, TransportError>);

/// A storage node as the engine addresses it: its data address and, when known, its id (so a
/// shared-memory attachment to a node that has since restarted at that address is not used).
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub addr: &'a str,
    pub node: Option<NodeId>,
}

impl<'a> From<&'a str> for Peer<'a> {
    fn from(addr: &'a str) -> Self {
        Peer { addr, node: None }
    }
}

/// Moves batches of segment ranges to and from storage nodes: through shared memory for nodes
/// on this host (see [`crate::shm`]), with one-sided RDMA where both sides have a device
/// (feature `rdma`), over pooled TCP connections otherwise.
pub struct TransferEngine {
    opts: EngineOptions,
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    next_id: AtomicU64,
    shm: ShmPeers,
    rdma: RdmaPath,
}

impl TransferEngine {
    pub fn new(opts: EngineOptions) -> Self {
        TransferEngine {
            opts,
            idle: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shm: ShmPeers::default(),
            rdma: RdmaPath::default(),
        }
    }

    /// Registers `[addr, addr + len)` for RDMA transfers straight from and into it (Python's
    /// `register_buffer`): with a device, a local-access memory registration (made when the
    /// device opens, for buffers registered before); without one, a record kept by the same
    /// rules. Registering the same range again is a no-op; a null, empty or wrapping range,
    /// or one overlapping another registered range, is `InvalidArgument`. Transfers work on
    /// unregistered memory too (through a bounce buffer, or TCP).
    ///
    /// # Safety
    /// The memory must stay mapped until [`TransferEngine::unregister_buffer`] returns `Ok`
    /// for `addr`: the device may read and write it during any transfer that names it.
    pub unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<(), WireError> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.rdma.register(addr, len) }
    }

    /// Unregisters the buffer registered at `addr`: `true` if one was, `false` if none starts
    /// there (so unregistering twice is harmless); `InvalidArgument` while a transfer uses it.
    pub fn unregister_buffer(&self, addr: u64) -> Result<bool, WireError> {
        self.rdma.unregister(addr)
    }

    /// The registered buffers, as `(addr, len)` in address order.
    pub fn registered_buffers(&self) -> Vec<(u64, u64)> {
        self.rdma.registered()
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Whether a read from a cached location of the node at `addr` is checked without a round
    /// trip to it: reached through shared memory with its replica board (`Some(true)`),
    /// through shared memory without one (`Some(false)`: the check costs a round trip, as
    /// much as the lookup the cache saves), or not through shared memory (`None`).
    pub fn shm_board(&self, addr: &str) -> Option<bool> {
        match self.opts.transport {
            TransportMode::Tcp | TransportMode::Rdma => None,
            TransportMode::Auto | TransportMode::Shm => self.shm.board_at(addr),
        }
    }

    /// Whether this engine reads the record of a `key_len`-byte wire key in `segment` of the
    /// node at `addr` off the node's NVMe file (a same-host node sharing its NVMe tier), as
    /// far as known: where a read from a cached NVMe location is checked against the record's
    /// replica id.
    pub fn reads_file(&self, addr: &str, segment: SegmentId, key_len: usize) -> bool {
        match self.opts.transport {
            TransportMode::Tcp | TransportMode::Rdma => false,
            TransportMode::Auto | TransportMode::Shm => {
                crate::shm::reads_key(key_len) && self.shm.file_at(addr, segment)
            }
        }
    }

    /// The transport the node at `addr` is reached by ("shm", "rdma" or "tcp"), as far as
    /// known.
    pub fn transport_to(&self, addr: &str) -> &'static str {
        match self.opts.transport {
            TransportMode::Tcp => "tcp",
            TransportMode::Shm => self.shm.describe(addr),
            TransportMode::Rdma => self.rdma.describe(addr).unwrap_or("tcp"),
            TransportMode::Auto => match self.shm.describe(addr) {
                "shm" => "shm",
                _ => self.rdma.describe(addr).unwrap_or("tcp"),
            },
        }
    }

    /// The transport a request to the node at `addr` would use now ("shm", "rdma" or
    /// "tcp"; "-" when `transport = rdma` and the node cannot be reached so), attaching to its shared memory or setting up RDMA lanes first if this engine
    /// may and has not yet: what a status display shows for a node.
    pub async fn probe(&self, addr: &str) -> &'static str {
        if let Ok(Some(_)) = self.attachment(addr.into()).await {
            return "shm";
        }
        match self.opts.transport {
            TransportMode::Auto | TransportMode::Rdma
                if self.rdma.probe(addr, &self.opts).await.is_ok() =>
            {
                "rdma"
            }
            // Forced RDMA never falls back: requests to this node fail.
            TransportMode::Rdma => "-",
            _ => "tcp",
        }
    }

    /// The shared-memory attachment to use for `peer`: `Ok(None)` means TCP; `Err` when
    /// shared memory is required (`TransportMode::Shm`) and unavailable.
    async fn attachment(
        &self,
        peer: Peer<'_>,
    ) -> Result<Option<std::sync::Arc<crate::shm::Attachment>>, TransportError> {
        if matches!(
            self.opts.transport,
            TransportMode::Tcp | TransportMode::Rdma
        ) {
            return Ok(None);
        }
        match self.shm.get(peer.addr, peer.node, &self.opts).await {
            Ok(a) => Ok(Some(a)),
            Err(why) if self.opts.transport == TransportMode::Shm => {
                Err(TransportError::Remote(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("transport = shm: {why}"),
                )))
            }
            Err(_) => Ok(None),
        }
    }

    /// Writes every item to the node `peer` (an address, or an address and node id). `tags`
    /// is empty or names, one per item, the object its bytes belong to; the engine sets each
    /// tag's checksum to the crc32c of the bytes it writes. Returns one result per item: that
    /// crc32c. An `Err` means the batch as a whole failed (no connection).
    pub async fn write(
        &self,
        peer: impl Into<Peer<'_>>,
        items: Vec<WriteItem<'_>>,
        tags: Vec<ObjectTag>,
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        let (results, confirmation) = self.write_then_confirm(peer, items, tags).await?;
        confirmation.await?;
        Ok(results)
    }

    /// [`TransferEngine::write`], returning as soon as the bytes are in place, with the node's
    /// confirmation still to await: over shared memory the node hears of the bytes (their
    /// tags) only after the copy, so a caller can commit at the master while the node's
    /// answer is on its way (one round trip fewer); over TCP and RDMA the node's answer came
    /// with the write and the confirmation is ready. Until the confirmation resolves `Ok`
    /// the node may not know the bytes: a failed confirmation fails the whole batch.
    pub async fn write_then_confirm(
        &self,
        peer: impl Into<Peer<'_>>,
        items: Vec<WriteItem<'_>>,
        mut tags: Vec<ObjectTag>,
    ) -> Result<(Vec<ItemResult<u32>>, Confirmation), TransportError> {
        if !tags.is_empty() && tags.len() != items.len() {
            return Err(TransportError::Protocol(format!(
                "{} tags for {} writes",
                tags.len(),
                items.len()
            )));
        }
        let peer = peer.into();
        if let Some(att) = self.attachment(peer).await? {
            // All or nothing: clients write DRAM segments only, which are all shared.
            if items.iter().all(|it| att.covers(it.op.segment)) {
                // Checksummed piece by piece as the bytes are copied.
                let results = att.copy_in(&items);
                // A failed item's range holds no value: the node is not told of it.
                let tags: Vec<ObjectTag> = tags
                    .into_iter()
                    .zip(&results)
                    .filter_map(|(tag, r)| {
                        r.as_ref()
                            .ok()
                            .map(|&checksum| ObjectTag { checksum, ..tag })
                    })
                    .collect();
                let (limits, timeout) = (self.opts.limits, self.opts.io_timeout);
                let confirmation =
                    Box::pin(async move { att.commit(tags, &limits, timeout).await });
                return Ok((results, confirmation));
            }
        }
        let done: Confirmation = Box::pin(std::future::ready(Ok(())));
        // Sent from the caller's memory: the tags go before the bytes, so the checksums are
        // computed first.
        let crcs: Vec<u32> = items
            .iter()
            .map(|it| kvpool_proto::crc32c::crc32c_parts(it.data.iter()))
            .collect();
        for (tag, crc) in tags.iter_mut().zip(&crcs) {
            tag.checksum = *crc;
        }
        let items = match self.opts.transport {
            TransportMode::Auto | TransportMode::Rdma => {
                match self.rdma.write(peer.addr, items, &tags, &self.opts).await? {
                    Via::Done(results) => return Ok((with_values(results, &crcs), done)),
                    Via::Tcp(items) => items,
                }
            }
            _ => items,
        };
        let results = self.write_tcp(peer.addr, items, tags).await?;
        Ok((with_values(results, &crcs), done))
    }

    async fn write_tcp(
        &self,
        addr: &str,
        items: Vec<WriteItem<'_>>,
        tags: Vec<ObjectTag>,
    ) -> Result<Vec<ItemResult<()>>, TransportError> {
        // The tags go with the first request.
        let mut tags = Some(tags);
        let ask = |chunks: &[Chunk<&[u8]>]| Write {
            ops: chunks
                .iter()
                .map(|c| WriteOp {
                    segment: c.segment,
                    offset: c.offset,
                    len: c.len as u64,
                })
                .collect(),
            tags: tags.take().unwrap_or_default(),
        };
        self.transfer(addr, items, ask, |(), _, ()| ()).await
    }

    /// Reads every item from the node `peer` into its destination slices. On success an
    /// item's result is the crc32c of its bytes (0 unless `checksum_reads`). Items in shared
    /// segments of a same-host node are copied from its memory; the rest (another host, the
    /// NVMe tier) go over TCP.
    pub async fn read(
        &self,
        peer: impl Into<Peer<'_>>,
        items: Vec<ReadItem<'_>>,
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        self.read_replicas(peer, items, &[]).await
    }

    /// [`TransferEngine::read`] of whole values whose replicas the caller knows (`replicas[i]`
    /// is item `i`'s, from the master): a same-host node's NVMe-resident values are then read
    /// straight off its tier file and checked against their records (`shm::DiskFile`); any
    /// such read that does not check out goes to the node like the rest. With `replicas`
    /// empty, exactly [`TransferEngine::read`].
    pub async fn read_replicas(
        &self,
        peer: impl Into<Peer<'_>>,
        items: Vec<ReadItem<'_>>,
        replicas: &[ReplicaId],
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        let peer = peer.into();
        let Some(att) = self.attachment(peer).await? else {
            let items = match self.opts.transport {
                TransportMode::Auto | TransportMode::Rdma => {
                    match self.rdma.read(peer.addr, items, &self.opts).await? {
                        Via::Done(results) => return Ok(results),
                        Via::Tcp(items) => items,
                    }
                }
                _ => items,
            };
            return self.read_tcp(peer.addr, items, &[]).await;
        };
        let n = items.len();
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for (i, it) in items.into_iter().enumerate() {
            if att.covers(it.op.segment) {
                local.push((i, it));
            } else {
                remote.push((i, it));
            }
        }
        let mut out: Vec<ItemResult<u32>> = (0..n).map(|_| Ok(0)).collect();
        let (li, litems): (Vec<usize>, Vec<_>) = local.into_iter().unzip();
        for (i, r) in li
            .into_iter()
            .zip(att.read(litems, self.opts.checksum_reads))
        {
            out[i] = r;
        }
        if replicas.len() == n {
            remote = att.read_files(remote, replicas, &mut out).await;
        }
        if !remote.is_empty() {
            let (ri, ritems): (Vec<usize>, Vec<_>) = remote.into_iter().unzip();
            let all_remote = ri.len() == n;
            match self.read_tcp(peer.addr, ritems, &[]).await {
                Ok(rs) => {
                    for (i, r) in ri.into_iter().zip(rs) {
                        out[i] = r;
                    }
                }
                Err(e) if all_remote => return Err(e),
                Err(e) => {
                    let w = WireError::new(e.code(), e.to_string());
                    for i in ri {
                        out[i] = Err(w.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    /// [`TransferEngine::read`] of ranges the caller located without a fresh lease (a cached
    /// location): item `i`'s range must still hold replica `expect[i]`, else the item fails
    /// with `StaleLocation`. An NVMe record read off a same-host node's file is checked by
    /// its header, which names its replica; one that does not check out is stale. Over TCP
    /// the node checks before and after its copy. From a same-host node's shared memory the engine copies first and then asks the node, in one
    /// request of one-byte checked reads, whether each range still holds its replica: a range
    /// that held it after the copy held it throughout (a replica's tag, once dropped, never
    /// comes back), so the bytes copied are the replica's.
    pub async fn read_checked(
        &self,
        peer: impl Into<Peer<'_>>,
        items: Vec<ReadItem<'_>>,
        expect: &[ReplicaId],
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        let peer = peer.into();
        if expect.len() != items.len() {
            return Err(TransportError::Protocol(format!(
                "{} expected replicas for {} reads",
                expect.len(),
                items.len()
            )));
        }
        let Some(att) = self.attachment(peer).await? else {
            return self.read_tcp(peer.addr, items, expect).await;
        };
        if items.iter().all(|it| att.covers(it.op.segment)) {
            return self.checked_in_memory(&att, peer.addr, items, expect).await;
        }
        if !items
            .iter()
            .all(|it| att.covers(it.op.segment) || att.reads_file(it.op.segment))
        {
            return self.read_tcp(peer.addr, items, expect).await;
        }
        // Records read off the node's NVMe file name their replica: one that does not check
        // out is stale (never read through the node instead, which would be unchecked).
        let mut out: Vec<ItemResult<u32>> = (0..items.len()).map(|_| Ok(0)).collect();
        let (memory, files): (Vec<_>, Vec<_>) = items
            .into_iter()
            .enumerate()
            .partition(|(_, it)| att.covers(it.op.segment));
        for (i, _) in att.read_files(files, expect, &mut out).await {
            out[i] = Err(crate::dataplane::stale(expect[i]));
        }
        if !memory.is_empty() {
            let (idx, items): (Vec<usize>, Vec<_>) = memory.into_iter().unzip();
            let expect: Vec<ReplicaId> = idx.iter().map(|&i| expect[i]).collect();
            let got = self
                .checked_in_memory(&att, peer.addr, items, &expect)
                .await?;
            for (i, r) in idx.into_iter().zip(got) {
                out[i] = r;
            }
        }
        Ok(out)
    }

    /// [`TransferEngine::read_checked`] of ranges in the shared memory of the node at `addr`.
    async fn checked_in_memory(
        &self,
        att: &crate::shm::Attachment,
        addr: &str,
        items: Vec<ReadItem<'_>>,
        expect: &[ReplicaId],
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        // Checked on the node's board before and after the copy: no round trip. Without a
        // board: copied, then checked by the node (a one-byte checked read per item).
        let items = match att.read_checked(items, expect, self.opts.checksum_reads) {
            Ok(out) => return Ok(out),
            Err(items) => items,
        };
        let ops: Vec<ReadOp> = items.iter().map(|it| it.op).collect();
        let mut out = att.read(items, self.opts.checksum_reads);
        let mut probe = vec![0u8; ops.len()];
        let checks: Vec<ReadItem<'_>> = ops
            .iter()
            .zip(probe.chunks_mut(1))
            .map(|(op, dst)| ReadItem::new(ReadOp { len: 1, ..*op }, dst))
            .collect();
        let checked = self.read_tcp(addr, checks, expect).await?;
        for (o, c) in out.iter_mut().zip(checked) {
            if let (Ok(_), Err(e)) = (&o, c) {
                *o = Err(e);
            }
        }
        Ok(out)
    }

    /// [`TransferEngine::read`] over TCP: the chunks' crc32c is computed as each lands, so
    /// checksumming overlaps the transfer of the other chunks. `expect` is empty, or one
    /// replica per item for a checked read.
    async fn read_tcp(
        &self,
        addr: &str,
        items: Vec<ReadItem<'_>>,
        expect: &[ReplicaId],
    ) -> Result<Vec<ItemResult<u32>>, TransportError> {
        let ask = |chunks: &[Chunk<&mut [u8]>]| Read {
            ops: chunks
                .iter()
                .map(|c| ReadOp {
                    segment: c.segment,
                    offset: c.offset,
                    len: c.len as u64,
                })
                .collect(),
            expect: match expect {
                [] => Vec::new(),
                _ => chunks.iter().map(|c| expect.get(c.item).copied()).collect(),
            },
        };
        let checksum = self.opts.checksum_reads;
        let fold = move |crc: &mut u32, c: &Chunk<&mut [u8]>, chunk_crc: u32| {
            if checksum {
                *crc = match c.seq {
                    0 => chunk_crc,
                    _ => kvpool_proto::crc32c::crc32c_combine(*crc, chunk_crc, c.len),
                };
            }
        };
        self.transfer(addr, items, ask, fold).await
    }

    /// Runs a batch for one peer: cuts the items into chunks, packs the chunks into requests,
    /// each asking with the message `ask` builds, runs up to `conns_per_peer` requests at
    /// once, and folds each item's chunk values into its result with `fold`, in `seq` order.
    async fn transfer<I, M, A>(
        &self,
        addr: &str,
        items: Vec<I>,
        mut ask: impl FnMut(&[Chunk<I::Piece>]) -> M,
        fold: impl FnMut(&mut A, &Chunk<I::Piece>, M::Value),
    ) -> Result<Vec<ItemResult<A>>, TransportError>
    where
        I: Item,
        M: Exchange<I::Piece>,
        A: Default,
    {
        let n = items.len();
        let mut chunks = Vec::new();
        for (i, it) in items.into_iter().enumerate() {
            let (segment, offset, len, slices) = it.into_parts();
            let have: u64 = slices.iter().map(|s| s.len() as u64).sum();
            if have != len {
                return Err(TransportError::Protocol(format!(
                    "{} item {i}: buffers of {have} bytes for an op of {len}",
                    M::OP
                )));
            }
            self.chunk_item(&mut chunks, i, segment, offset, slices);
        }
        // The futures are built up front (they do nothing until polled): a closure stored
        // inside the stream would make the returned future not `Send` (rust-lang/rust#102211).
        let requests: Vec<_> = self
            .pack(chunks)
            .into_iter()
            .map(|req| self.request(addr, ask(&req), req))
            .collect();
        let results = stream::iter(requests)
            .buffer_unordered(self.opts.conns_per_peer.max(1))
            .collect::<Vec<_>>()
            .await;
        merge(n, results, fold)
    }
}

/// Folds per-chunk results into per-item results: an item fails if any of its chunks did;
/// otherwise `fold` takes each chunk's value, in `seq` order. `Err` only when every request
/// failed.
fn merge<P, T, A: Default>(
    n: usize,
    mut results: Vec<RequestOutcome<P, T>>,
    mut fold: impl FnMut(&mut A, &Chunk<P>, T),
) -> Result<Vec<ItemResult<A>>, TransportError> {
    // Requests finish in any order; each holds a run of consecutive chunks, so ordering them
    // by their first chunk puts every item's chunks back in `seq` order.
    results.sort_unstable_by_key(|(chunks, _)| chunks.first().map(|c| (c.item, c.seq)));
    let mut out: Vec<ItemResult<A>> = (0..n).map(|_| Ok(A::default())).collect();
    let mut all_failed = true;
    let mut first_err = None;
    for (chunks, res) in results {
        match res {
            Ok(rs) => {
                all_failed = false;
                for (c, r) in chunks.iter().zip(rs) {
                    match r {
                        Ok(v) => {
                            if let Some(Ok(acc)) = out.get_mut(c.item) {
                                fold(acc, c, v);
                            }
                        }
                        Err(e) => fail_item(out.get_mut(c.item), e),
                    }
                }
            }
            Err(e) => {
                let w = WireError::new(e.code(), e.to_string());
                for c in &chunks {
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

/// Per-item results of a batch with each success carrying its item's value.
fn with_values<T: Copy>(results: Vec<ItemResult<()>>, values: &[T]) -> Vec<ItemResult<T>> {
    results
        .into_iter()
        .zip(values)
        .map(|(r, &v)| r.map(|()| v))
        .collect()
}

/// Records an item's first error; later errors of the same item are dropped.
fn fail_item<T>(slot: Option<&mut ItemResult<T>>, e: WireError) {
    if let Some(slot) = slot {
        if slot.is_ok() {
            *slot = Err(e);
        }
    }
}

/// Distinct bytes per position, so a misplaced byte shows.
#[cfg(test)]
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}
