//! The client side of the shared-memory transport: attaching to a node, the per-node cache of
//! attachments, and the copies in and out of mapped segments.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kvpool_proto::{
    ErrorCode, FrameHeader, FrameLimits, ItemResult, Message, NodeId, ObjectTag, ReplicaId,
    SegmentId, ShmAttach, ShmAttachResponse, ShmBoard, ShmBoardResponse, ShmCommit, ShmInfo,
    ShmInfoResponse, ShmNvme, ShmNvmeResponse, UnitResponse, WireError, HEADER_LEN,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

use super::{
    copy::{self, Local, Plan},
    fds, host_id, BoardReader, DiskFile, Mapping,
};
use crate::{
    engine::{EngineOptions, ReadItem, WriteItem},
    frame, TransportError,
};

/// How long a node that could not be attached (socket missing, refused) is reached over TCP
/// before attaching is tried again.
const RETRY_ATTACH: Duration = Duration::from_secs(5);

/// A node's segments mapped into this process, and the socket that proves the node alive
/// and takes its commits.
pub struct Attachment {
    node: NodeId,
    segments: HashMap<SegmentId, Mapping>,
    /// The node's replica board, if it publishes one (see [`board`](super::board)).
    board: Option<BoardReader>,
    /// The node's NVMe tier files it shares, read directly (see [`disk`](super::disk)).
    disks: Vec<DiskFile>,
    ctl: tokio::sync::Mutex<UnixStream>,
    ctl_fd: RawFd,
    next_id: AtomicU64,
}

impl Attachment {
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Whether `segment` is one of the mapped segments (NVMe segments are not shared).
    pub fn covers(&self, segment: SegmentId) -> bool {
        self.segments.contains_key(&segment)
    }

    /// Whether `segment` is one of the node's NVMe tier files this client reads directly.
    pub fn reads_file(&self, segment: SegmentId) -> bool {
        self.disk(segment).is_some()
    }

    /// The node's shared NVMe tier file holding `segment`, if any.
    fn disk(&self, segment: SegmentId) -> Option<&DiskFile> {
        self.disks.iter().find(|d| d.segment() == segment)
    }

    /// Reads the `items` (by their index in the request) that the node's shared NVMe files
    /// hold straight off them (item `i`'s replica is `replicas[i]`), their results into
    /// `out`; gives back the items to read through the node: the others, and those whose
    /// record did not check out.
    pub async fn read_files<'a>(
        &self,
        items: Vec<(usize, ReadItem<'a>)>,
        replicas: &[ReplicaId],
        out: &mut [ItemResult<u32>],
    ) -> Vec<(usize, ReadItem<'a>)> {
        if self.disks.is_empty() {
            return items;
        }
        let (mut direct, mut rest): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(_, it)| self.disk(it.op.segment).is_some());
        // Per file (a node has one NVMe tier), one request of all its items.
        while let Some(disk) = direct.first().and_then(|(_, it)| self.disk(it.op.segment)) {
            let (these, others): (Vec<_>, Vec<_>) = direct
                .into_iter()
                .partition(|(_, it)| it.op.segment == disk.segment());
            direct = others;
            let (idx, mut reads): (Vec<usize>, Vec<ReadItem<'a>>) = these.into_iter().unzip();
            let expect: Vec<ReplicaId> = idx.iter().map(|&i| replicas[i]).collect();
            let got = disk.read(&mut reads, &expect).await;
            for ((i, it), crc) in idx.into_iter().zip(reads).zip(got) {
                match crc {
                    Some(crc) => out[i] = Ok(crc),
                    None => rest.push((i, it)),
                }
            }
        }
        rest
    }

    /// Whether the node still holds its end of the socket. A node that exited (or restarted)
    /// closed it; its mapping is then stale and must not be used for new requests.
    ///
    /// Asked on every same-host read, so first without a syscall: the node writes on the
    /// socket only to answer a commit, so unless the runtime saw it become readable since it
    /// last said "would block", nothing (no bytes, no end) has come. Otherwise, and while a
    /// commit holds the socket, it is peeked.
    pub fn alive(&self) -> bool {
        if let Ok(ctl) = self.ctl.try_lock() {
            let ready = std::pin::pin!(ctl.ready(tokio::io::Interest::READABLE));
            // Polled once with a waker that does nothing: what the runtime last saw, no wait.
            let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
            match std::future::Future::poll(ready, noop) {
                std::task::Poll::Pending => return true,
                std::task::Poll::Ready(Err(_)) => return false,
                std::task::Poll::Ready(Ok(_)) => {}
            }
            // Readable: bytes or the end. Peeked through the runtime, so that "would block"
            // clears its readiness and the next check is a syscall-free one again.
            return open(ctl.try_io(tokio::io::Interest::READABLE, || self.peek()));
        }
        open(self.peek())
    }

    /// One byte peeked off the control socket, not waiting: 0 at its end.
    fn peek(&self) -> std::io::Result<usize> {
        let mut b = [0u8; 1];
        // SAFETY: a non-blocking peek of at most 1 byte into a local buffer; the descriptor
        // is owned by `ctl`, which lives as long as `self`.
        let n = unsafe {
            libc::recv(
                self.ctl_fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// Copies each item's range into its slices; an item's value is the crc32c of the bytes
    /// the caller got (0 unless `checksum`). Every item's segment must be mapped. Large
    /// requests are copied by several threads ([`copy`](super::copy)).
    pub fn read(&self, items: Vec<ReadItem<'_>>, checksum: bool) -> Vec<ItemResult<u32>> {
        self.copy_out(items, checksum, |_| Ok(()))
    }

    /// Whether reads can be checked against the node's inventory here, without a round trip.
    pub fn has_board(&self) -> bool {
        self.board.is_some()
    }

    /// [`Attachment::read`] of replicas the caller expects (one per item), checked on the
    /// node's board before and after the copy: an item whose replica the node does not hold
    /// at either moment fails `StaleLocation` (its bytes, if copied, are not to be used).
    /// The items back when the node publishes no board (the caller asks the node instead).
    pub fn read_checked<'a>(
        &self,
        items: Vec<ReadItem<'a>>,
        expect: &[ReplicaId],
        checksum: bool,
    ) -> Result<Vec<ItemResult<u32>>, Vec<ReadItem<'a>>> {
        let Some(board) = self.board.as_ref() else {
            return Err(items);
        };
        let held = |i: usize| {
            // No expected replica (id 0) is never on the board.
            let id = expect.get(i).map_or(0, |r| r.0);
            if board.holds(id) {
                return Ok(());
            }
            Err(WireError::new(
                ErrorCode::StaleLocation,
                format!("node {} no longer holds replica {id}", self.node),
            ))
        };
        let mut out = self.copy_out(items, checksum, held);
        for (i, o) in out.iter_mut().enumerate() {
            // After the copy: ids are never reused, so one still held was held throughout.
            if o.is_ok() {
                if let Err(e) = held(i) {
                    *o = Err(e);
                }
            }
        }
        Ok(out)
    }

    /// The copies of [`Attachment::read`], each item first passing `admit` (by its index).
    fn copy_out(
        &self,
        items: Vec<ReadItem<'_>>,
        checksum: bool,
        admit: impl Fn(usize) -> Result<(), WireError>,
    ) -> Vec<ItemResult<u32>> {
        let n = items.len();
        let mut plan = Plan::default();
        let refused = items
            .into_iter()
            .enumerate()
            .map(|(i, it)| {
                admit(i)?;
                let src = self.range(it.op.segment, it.op.offset, it.op.len)?;
                plan.add(i, src, it.dst.into_iter().map(Local::Into))
            })
            .map(Result::err)
            .collect();
        copy::results(refused, plan.run(n, checksum))
    }

    /// Copies each item's slices into its range, checksumming each piece of the caller's bytes
    /// as it goes (one pass over the value). An item's value is the crc32c of its bytes;
    /// items whose range is refused fail alone. The node does not know of the bytes until
    /// [`Attachment::commit`] hands it their tags.
    pub fn copy_in(&self, items: &[WriteItem<'_>]) -> Vec<ItemResult<u32>> {
        let mut plan = Plan::default();
        let refused = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let dst = self.range(it.op.segment, it.op.offset, it.op.len)?;
                plan.add(i, dst, it.data.iter().map(|d| Local::From(d)))
            })
            .map(Result::err)
            .collect();
        copy::results(refused, plan.run(items.len(), true))
    }

    /// Hands the node the tags of bytes [`Attachment::copy_in`] copied (its inventory), and
    /// waits for its answer, which proves the node alive after the copy. Any refusal fails
    /// the whole commit.
    pub async fn commit(
        &self,
        tags: Vec<ObjectTag>,
        limits: &FrameLimits,
        io_timeout: Duration,
    ) -> Result<(), TransportError> {
        if tags.is_empty() {
            return Ok(());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut ctl = self.ctl.lock().await;
        let fut = async {
            ctl.write_all(&frame::encode_request(id, &ShmCommit { tags }, 0))
                .await?;
            let r: UnitResponse = read_reply(&mut *ctl, id, limits).await?;
            Ok::<_, TransportError>(r)
        };
        let r = tokio::time::timeout(io_timeout, fut).await.map_err(|_| {
            TransportError::Timeout {
                op: "shm commit",
                after: io_timeout,
            }
        })??;
        match r.items.into_iter().find(|r| r.is_err()) {
            Some(Err(e)) => Err(TransportError::Remote(e)),
            _ => Ok(()),
        }
    }

    fn range(
        &self,
        segment: SegmentId,
        offset: u64,
        len: u64,
    ) -> Result<crate::memory::SharedRange, WireError> {
        self.segments
            .get(&segment)
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::UnknownSegment,
                    format!("segment {segment} is not shared by node {}", self.node),
                )
            })?
            .range(offset, len)
    }
}

/// What a client knows about reaching one node.
enum State {
    Attached(Arc<Attachment>),
    /// Reached over TCP: another host, a node that shares no memory (then `until` is `None`:
    /// for good), or an attach that failed (tried again after `until`).
    Tcp {
        until: Option<Instant>,
        why: String,
    },
}

/// What a peek of a node's control socket says of the node: alive unless the socket ended
/// (0 bytes) or failed; "would block" means nothing came, so it is alive.
fn open(peeked: std::io::Result<usize>) -> bool {
    match peeked {
        Ok(n) => n > 0,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// A client's attachments, per node data address.
#[derive(Default)]
pub struct ShmPeers {
    peers: Mutex<HashMap<String, State>>,
}

impl ShmPeers {
    /// The attachment to the node at `addr`, attaching on first use; `Err` says why the node
    /// is reached over TCP instead. `expect` is the node the caller believes serves `addr`:
    /// an attachment to another node (the one at `addr` restarted) is dropped and made anew.
    pub async fn get(
        &self,
        addr: &str,
        expect: Option<NodeId>,
        opts: &EngineOptions,
    ) -> Result<Arc<Attachment>, String> {
        {
            let peers = self.lock();
            match peers.get(addr) {
                Some(State::Attached(a)) if a.alive() && expect.is_none_or(|n| n == a.node) => {
                    return Ok(a.clone())
                }
                Some(State::Tcp { until, why }) if until.is_none_or(|t| Instant::now() < t) => {
                    return Err(why.clone())
                }
                _ => {}
            }
        }
        let state = match attach(addr, opts).await {
            Ok(Some(a)) => State::Attached(Arc::new(a)),
            Ok(None) => State::Tcp {
                until: None,
                why: format!("node at {addr} is on another host or shares no memory"),
            },
            Err(e) => {
                tracing::debug!(addr, "shared memory unavailable, using TCP: {e}");
                State::Tcp {
                    until: Some(Instant::now() + RETRY_ATTACH),
                    why: format!("attaching to node at {addr} failed: {e}"),
                }
            }
        };
        let r = match &state {
            State::Attached(a) => Ok(a.clone()),
            State::Tcp { why, .. } => Err(why.clone()),
        };
        if let (Ok(a), Some(n)) = (&r, expect) {
            if a.node != n {
                // The master's view and the node disagree (a restart the master has not
                // seen yet): do not use this mapping for that replica.
                self.lock().insert(addr.to_string(), state);
                return Err(format!("node at {addr} is {}, not {n}", a.node));
            }
        }
        self.lock().insert(addr.to_string(), state);
        r
    }

    /// Whether this client reads `segment` of the node at `addr` off the node's NVMe file,
    /// as far as known (no liveness check: the read that follows makes it).
    pub fn file_at(&self, addr: &str, segment: SegmentId) -> bool {
        matches!(self.lock().get(addr), Some(State::Attached(a)) if a.reads_file(segment))
    }

    /// Whether the node at `addr` is reached through shared memory (`Some`) and then whether
    /// it publishes a replica board (`Some(true)`), as far as known.
    pub fn board_at(&self, addr: &str) -> Option<bool> {
        // No liveness check here (a syscall, and this is asked on every cached get): the read
        // that follows checks it and attaches again to a node that restarted.
        match self.lock().get(addr) {
            Some(State::Attached(a)) => Some(a.has_board()),
            _ => None,
        }
    }

    /// Which transport the node at `addr` is reached by, as far as known.
    pub fn describe(&self, addr: &str) -> &'static str {
        match self.lock().get(addr) {
            Some(State::Attached(a)) if a.alive() => "shm",
            _ => "tcp",
        }
    }

    /// Drops what is known about `addr` (after the peer failed).
    pub fn forget(&self, addr: &str) {
        self.lock().remove(addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Attaches to the node at `addr`: `Ok(None)` when it is on another host or shares no
/// memory.
async fn attach(addr: &str, opts: &EngineOptions) -> Result<Option<Attachment>, TransportError> {
    let deadline = opts.connect_timeout;
    let info = tokio::time::timeout(deadline, shm_info(addr, opts))
        .await
        .map_err(|_| TransportError::Timeout {
            op: "shm info",
            after: deadline,
        })??;
    let Some(info) = info else { return Ok(None) };
    let Some(socket) = info.socket.filter(|_| info.host == host_id()) else {
        return Ok(None);
    };
    tokio::time::timeout(deadline, attach_socket(&socket, info.node, opts))
        .await
        .map_err(|_| TransportError::Timeout {
            op: "shm attach",
            after: deadline,
        })?
        .map(Some)
}

/// Asks the node's TCP port where its shared memory is; `None` from a node that does not
/// know the question (an older node).
async fn shm_info(
    addr: &str,
    opts: &EngineOptions,
) -> Result<Option<ShmInfoResponse>, TransportError> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    hello(&mut s, opts).await?;
    s.write_all(&frame::encode_request(1, &ShmInfo {}, 0))
        .await?;
    match read_reply::<_, ShmInfoResponse>(&mut s, 1, &opts.limits).await {
        Ok(r) => Ok(Some(r)),
        Err(TransportError::Remote(w)) if w.code == ErrorCode::UnknownOpcode => Ok(None),
        Err(e) => Err(e),
    }
}

/// Connects to the node's socket, passes the token check and maps the segments it hands
/// over; the node must be `node`, the one its TCP port named.
async fn attach_socket(
    socket: &str,
    node: NodeId,
    opts: &EngineOptions,
) -> Result<Attachment, TransportError> {
    let mut s = UnixStream::connect(socket).await?;
    hello(&mut s, opts).await?;
    let (resp, fds) = call_with_fds(&mut s, 1, &ShmAttach {}, &opts.limits).await?;
    let resp: ShmAttachResponse = resp.map_err(TransportError::Remote)?;
    if resp.node != node {
        return Err(TransportError::Protocol(format!(
            "the socket answers as node {}, the TCP port as node {node}",
            resp.node
        )));
    }
    if fds.len() != resp.segments.len() {
        return Err(TransportError::Protocol(format!(
            "{} descriptors for {} segments",
            fds.len(),
            resp.segments.len()
        )));
    }
    let mut segments = HashMap::new();
    for (seg, fd) in resp.segments.into_iter().zip(fds) {
        let m = Mapping::new(seg, fd).map_err(TransportError::Remote)?;
        segments.insert(seg.id, m);
    }
    let board = match call_with_fds(&mut s, 2, &ShmBoard {}, &opts.limits).await? {
        (Ok(ShmBoardResponse { slots }), mut fds) if fds.len() == 1 => {
            let fd = fds.pop().ok_or(TransportError::Truncated)?;
            Some(BoardReader::new(fd, slots).map_err(TransportError::Protocol)?)
        }
        // An older node, or one without a board: cached reads are checked over the socket.
        (Err(e), _)
            if matches!(
                e.code,
                ErrorCode::UnknownOpcode | ErrorCode::TransportUnsupported
            ) =>
        {
            None
        }
        (Err(e), _) => return Err(TransportError::Remote(e)),
        (Ok(_), fds) => {
            return Err(TransportError::Protocol(format!(
                "{} descriptors for one board",
                fds.len()
            )))
        }
    };
    let disks = match call_with_fds(&mut s, 3, &ShmNvme {}, &opts.limits).await? {
        (Ok(ShmNvmeResponse { files }), fds) if fds.len() == files.len() => files
            .into_iter()
            .zip(fds)
            .map(|(f, fd)| DiskFile::new(f.segment, fd, f.size))
            .collect(),
        // An older node: NVMe-resident values are read through it.
        (Err(e), _) if e.code == ErrorCode::UnknownOpcode => Vec::new(),
        (Err(e), _) => return Err(TransportError::Remote(e)),
        (Ok(r), fds) => {
            return Err(TransportError::Protocol(format!(
                "{} descriptors for {} NVMe files",
                fds.len(),
                r.files.len()
            )))
        }
    };
    tracing::debug!(
        node = %node,
        socket,
        segments = segments.len(),
        board = board.is_some(),
        nvme_files = disks.len(),
        "attached to node memory"
    );
    let ctl_fd = s.as_raw_fd();
    Ok(Attachment {
        node,
        segments,
        board,
        disks,
        ctl: tokio::sync::Mutex::new(s),
        ctl_fd,
        next_id: AtomicU64::new(4),
    })
}

/// Sends request `id` and reads its answer, with the descriptors that rode on it. A refusal
/// is the first `Err` (the connection stays usable); the second is a broken exchange.
async fn call_with_fds<M: Message>(
    s: &mut UnixStream,
    id: u64,
    msg: &M,
    limits: &FrameLimits,
) -> Result<(Result<M::Response, WireError>, Vec<OwnedFd>), TransportError> {
    s.write_all(&frame::encode_request(id, msg, 0)).await?;
    // The descriptors ride with the response's first byte; the rest may follow in more reads.
    let mut buf = vec![0u8; 64 << 10];
    let (mut have, fds) = fds::recv_with_fds(s, &mut buf).await?;
    if have == 0 {
        return Err(TransportError::Closed);
    }
    let mut need = HEADER_LEN;
    let mut header = None;
    loop {
        if header.is_none() && have >= HEADER_LEN {
            let head: &[u8; HEADER_LEN] = buf[..HEADER_LEN]
                .try_into()
                .map_err(|_| TransportError::Truncated)?;
            let h = FrameHeader::decode(head, limits).map_err(TransportError::Header)?;
            need = HEADER_LEN + h.body_len as usize;
            if need > buf.len() {
                buf.resize(need, 0);
            }
            header = Some(h);
        }
        if header.is_some() && have >= need {
            break;
        }
        let n = tokio::io::AsyncReadExt::read(s, &mut buf[have..]).await?;
        if n == 0 {
            return Err(TransportError::Truncated);
        }
        have += n;
    }
    let h = header.ok_or(TransportError::Truncated)?;
    if !h.is_response() || h.request_id != id {
        return Err(TransportError::Protocol(format!(
            "unexpected frame (id {}) for request {id}",
            h.request_id
        )));
    }
    match frame::decode_response::<M::Response>(&h, &buf[HEADER_LEN..need]) {
        Ok(r) => Ok((Ok(r), fds)),
        Err(TransportError::Remote(e)) => Ok((Err(e), fds)),
        Err(e) => Err(e),
    }
}

async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opts: &EngineOptions,
) -> Result<(), TransportError> {
    if let Some(token) = &opts.token {
        crate::auth::client_hello(s, token, &opts.limits, opts.connect_timeout).await?;
    }
    Ok(())
}

/// Reads the response to request `id` (a small frame, no payload).
async fn read_reply<S: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    s: &mut S,
    id: u64,
    limits: &FrameLimits,
) -> Result<T, TransportError> {
    let h = frame::read_header(s, limits)
        .await?
        .ok_or(TransportError::Closed)?;
    if !h.is_response() || h.request_id != id || h.payload_len != 0 {
        return Err(TransportError::Protocol(format!(
            "unexpected frame (id {}, payload {}) for request {id}",
            h.request_id, h.payload_len
        )));
    }
    let body = frame::read_body(s, h.body_len).await?;
    frame::decode_response(&h, &body)
}
