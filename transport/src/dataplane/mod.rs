//! The data server: clients write and read segment ranges of a storage node.
//!
//! One implementation of the data plane's server side for every transport that carries
//! frames (TCP today; the same-host Unix socket of the shared-memory transport): the accept
//! loop and the `Hello` gate ([`crate::listen`]), frame limits, the Read/Write contract, and
//! buffered-then-direct payload I/O. The storage node supplies only where a range's bytes
//! are ([`SegmentStore`]).
//!
//! One task per connection; a connection's requests are answered in order, so a client may
//! pipeline many before reading. Small frames go through a buffered reader and writer so that
//! a batch of 4 KiB objects costs few syscalls; object bytes of [`DIRECT_MIN`] or more move
//! straight between the socket and segment memory, never through an intermediate buffer.
//!
//! Bad input never takes the server down: a request that can be skipped (unknown opcode,
//! malformed body, a bad range) gets an error and the connection goes on; a stream that can no
//! longer be trusted (bad header, truncated frame, lengths that disagree) gets an error and is
//! closed. Either way only that connection is affected.

mod rdma;
mod read;
mod stream;
#[cfg(test)]
mod tests;

use std::{future::Future, pin::Pin, sync::Arc};

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use kvpool_proto::{
    decode_body, ErrorCode, FrameHeader, FrameLimits, NodeId, ObjectTag, Opcode, Read, ReplicaId,
    SegmentId, ShmAttach, ShmAttachResponse, ShmBoard, ShmBoardResponse, ShmCommit, ShmInfo,
    ShmInfoResponse, ShmNvme, ShmNvmeFile, ShmNvmeResponse, ShmSegment, Token, UnitResponse,
    WireError, Write, HEADER_LEN,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::{TcpStream, UnixStream},
};

pub use rdma::rdma_unsupported;
pub(crate) use read::stale;
pub use stream::{advance, recv_exact, send_all, write_all_gathered, RawSocket, MAX_IOVECS};

use crate::{
    frame,
    listen::{self, Gate, Listener},
    memory::SharedRange,
    TransportError,
};

/// Payload bytes at least this long move straight between a socket and their final memory,
/// bypassing the connection buffers (one copy fewer; the syscall cost is amortized over
/// enough bytes). Shorter ones go through the buffers, so a batch of small payloads costs a
/// few syscalls instead of one each. Both ends of the data plane use this one threshold.
pub const DIRECT_MIN: usize = 64 << 10;

/// Buffer size of a connection's reader and writer: a batch of small objects per syscall.
const BUF_SIZE: usize = 256 << 10;

/// Limits used to decode a header so that an oversized frame's request id and opcode are
/// known when it is refused; the node's real limits are checked right after.
const DECODE_ANY: FrameLimits = FrameLimits {
    max_body: u32::MAX,
    max_payload: u64::MAX,
};

/// Bytes read off a slower tier (the NVMe tier), owned by the server until sent.
pub type OwnedBytes = Box<dyn OwnedPayload>;

/// Bytes a store read into memory of its own (a slower tier's value), sent as they are: in
/// one or several slices (the parts a large read was split into), in order.
pub trait OwnedPayload: Send + Sync {
    fn slices(&self) -> Vec<&[u8]>;
}

impl OwnedPayload for Vec<u8> {
    fn slices(&self) -> Vec<&[u8]> {
        vec![self]
    }
}

/// A read of a slower tier, started by [`SegmentStore::read_range`]: the range's bytes in
/// order, in one or more parts, each as soon as it (and the parts before it) has landed. An
/// `Err` ends it: the read failed, or the check of the whole value after its last part did,
/// and the parts before it are not to be used.
pub type DiskRead<'a> =
    Pin<Box<dyn futures::Stream<Item = Result<OwnedBytes, WireError>> + Send + 'a>>;

/// Where the bytes of a range to read are.
pub enum Source<'a> {
    /// In memory: sent straight from there.
    Memory(SharedRange),
    /// On a slower tier: read into owned buffers first, part by part.
    Disk(DiskRead<'a>),
}

/// What the data server needs of a storage node: where ranges are, and what it keeps.
pub trait SegmentStore: Send + Sync + 'static {
    /// Frame size limits enforced on the data plane.
    fn limits(&self) -> &FrameLimits;
    /// The bytes of `segment`'s range `offset..offset+len`, for a read.
    fn read_range(
        &self,
        segment: SegmentId,
        offset: u64,
        len: u64,
    ) -> Result<Source<'_>, WireError>;
    /// The memory of `segment`'s range `offset..offset+len`, for a client's write.
    fn write_range(
        &self,
        segment: SegmentId,
        offset: u64,
        len: u64,
    ) -> Result<SharedRange, WireError>;
    /// Whether `segment`'s range `offset..offset+len` lies inside the range `replica`'s tag
    /// names (a read from a client's cached location, checked before and after the copy).
    /// False for a replica the node holds no tag for: freed, overwritten, never written here,
    /// or on a tier whose records carry no tag.
    fn holds(&self, segment: SegmentId, offset: u64, len: u64, replica: ReplicaId) -> bool;
    /// Keeps the tags of a write whose bytes have landed.
    fn record_tags(&self, tags: Vec<ObjectTag>);
    /// Keeps one tag of a same-host client's write (`ShmCommit`): a tag that names no range
    /// of the node's segments is refused.
    fn commit_tag(&self, tag: ObjectTag) -> Result<(), WireError>;
    /// Keeps one tag of a put a client wrote with one-sided RDMA WRITEs (`RdmaWritten`), by
    /// the same rule as [`SegmentStore::commit_tag`] (the default); a node overrides it only
    /// to count the bytes under their transport.
    fn commit_rdma_tag(&self, tag: ObjectTag) -> Result<(), WireError> {
        self.commit_tag(tag)
    }
    /// The node's id (a same-host client checks it is the node it expected).
    fn node_id(&self) -> NodeId;
    /// The segments a same-host client may map, each with its memory file.
    fn shared_segments(&self) -> Vec<(ShmSegment, BorrowedFd<'_>)>;
    /// The node's replica board (`shm::board`): its slot count and memory file, if it
    /// publishes one. None by default.
    fn board(&self) -> Option<(u64, BorrowedFd<'_>)> {
        None
    }
    /// The NVMe tier files a same-host client may read directly, each with a read-only
    /// O_DIRECT descriptor (`ShmNvme`). None by default.
    fn nvme_files(&self) -> Vec<(ShmNvmeFile, BorrowedFd<'_>)> {
        Vec::new()
    }
    /// A request was answered (`ok`) or failed, `started` when its header arrived: for the
    /// node's metrics. Does nothing by default.
    fn request_done(&self, _opcode: u8, _started: std::time::Instant, _ok: bool) {}
    /// Object bytes that crossed the socket: `read` out of the node, else written in.
    fn payload_moved(&self, _read: bool, _bytes: u64) {}
}

/// How a data server guards its connections.
#[derive(Debug, Clone, Default)]
pub struct DataServerOptions {
    /// The cluster token. When set, every connection must start with a `Hello` carrying it.
    pub token: Option<Token>,
    /// The node's Unix socket for same-host clients, told to whoever asks `ShmInfo`
    /// [unset: the node shares no memory].
    pub shm_socket: Option<String>,
    /// Answer every `Read` in the plain layout, even when the client asks for a streamed
    /// answer [false: streamed when asked]. For measuring the two against each other, and a
    /// way back should a streamed answer misbehave.
    pub plain_reads: bool,
    /// The node's RDMA device, its segments registered, for `RdmaConnect` [unset: answered
    /// `TransportUnsupported`].
    #[cfg(feature = "rdma")]
    pub rdma: Option<Arc<crate::rdma::RdmaDevice>>,
}

/// Serves data-plane connections from `listener` until `shutdown` completes; then stops
/// accepting and ends every connection.
pub async fn serve<L, T>(
    listener: L,
    store: Arc<T>,
    opts: DataServerOptions,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
    L::Stream: Conn,
    T: SegmentStore,
{
    let opts = Arc::new(opts);
    listen::accept_loop(listener, shutdown, |stream, peer| {
        connection(stream, peer, store.clone(), opts.clone())
    })
    .await
}

/// A connection the data server serves: a raw socket ([`RawSocket::prepare`]d for low
/// latency).
pub trait Conn: RawSocket {
    /// Sends `frame` with `fds` attached, where the socket can carry descriptors (`None`
    /// where it cannot: TCP).
    fn send_fds<'a>(
        &'a self,
        frame: &'a [u8],
        fds: &'a [RawFd],
    ) -> Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>>;
}

impl Conn for TcpStream {
    fn send_fds<'a>(
        &'a self,
        _: &'a [u8],
        _: &'a [RawFd],
    ) -> Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>> {
        None
    }
}

impl Conn for UnixStream {
    fn send_fds<'a>(
        &'a self,
        frame: &'a [u8],
        fds: &'a [RawFd],
    ) -> Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>> {
        Some(Box::pin(crate::shm::fds::send_with_fds(self, frame, fds)))
    }
}

/// A connection's buffered reader over its buffered writer over the socket. Direct payload
/// I/O reaches the socket only with both buffers empty, so the byte order holds.
type Io<S> = BufReader<BufWriter<S>>;

/// What ends a connection.
enum Close {
    /// The stream is out of step or the request cannot be honoured: answer, then close.
    Fatal {
        opcode: u8,
        request_id: u64,
        err: WireError,
    },
    /// The socket failed or the peer left mid-frame with nothing to answer.
    Transport(TransportError),
}

impl From<TransportError> for Close {
    fn from(e: TransportError) -> Self {
        Close::Transport(e)
    }
}

impl From<std::io::Error> for Close {
    fn from(e: std::io::Error) -> Self {
        Close::Transport(TransportError::Io(e))
    }
}

async fn connection<S: Conn, T: SegmentStore>(
    stream: S,
    peer: String,
    store: Arc<T>,
    opts: Arc<DataServerOptions>,
) {
    if let Err(e) = stream.prepare() {
        tracing::debug!(%peer, "socket options: {e}");
    }
    let mut io: Io<S> =
        BufReader::with_capacity(BUF_SIZE, BufWriter::with_capacity(BUF_SIZE, stream));
    match serve_connection(&mut io, &*store, &opts).await {
        Ok(()) => tracing::trace!(%peer, "data connection closed"),
        Err(Close::Transport(e)) => tracing::debug!(%peer, "data connection ended: {e}"),
        Err(Close::Fatal {
            opcode,
            request_id,
            err,
        }) => {
            tracing::warn!(%peer, request_id, "closing data connection: {err}");
            let frame = frame::encode_error(opcode, request_id, &err);
            let _ = io.get_mut().write_all(&frame).await;
            let _ = io.get_mut().shutdown().await;
            listen::linger(&mut io).await;
        }
    }
}

async fn serve_connection<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    opts: &DataServerOptions,
) -> Result<(), Close> {
    let token = opts.token.as_ref();
    let mut lanes = rdma::Lanes::default();
    // Nothing is served before the Hello when a token is configured.
    let mut authed = token.is_none();
    loop {
        // Answers go out before the server could block on input: a pipelined batch gets its
        // answers in few writes, and no answer waits on bytes the client has not sent yet.
        if !next_head_buffered(io.buffer()) {
            io.get_mut().flush().await?;
        }
        let h = match frame::read_header(io, &DECODE_ANY).await {
            Ok(Some(h)) => h,
            Ok(None) => {
                io.get_mut().flush().await?;
                return Ok(());
            }
            Err(TransportError::Header(e)) => return Err(fatal(0, 0, e.code(), e.to_string())),
            Err(TransportError::Truncated) => {
                return Err(fatal(
                    0,
                    0,
                    ErrorCode::Truncated,
                    "connection ended inside a header",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        match listen::gate(io, &h, token, &mut authed).await? {
            Gate::Serve => {}
            Gate::Welcome(f) => {
                io.get_mut().write_all(&f).await?;
                continue;
            }
            Gate::BadRequest(e) => {
                reply_error(io, &h, e).await?;
                continue;
            }
            Gate::Refuse(err) => {
                return Err(Close::Fatal {
                    opcode: h.opcode,
                    request_id: h.request_id,
                    err,
                })
            }
        }
        if let Err(e) = frame::check_limits(&h, store.limits()) {
            return Err(fatal(h.opcode, h.request_id, e.code(), e.to_string()));
        }
        let started = std::time::Instant::now();
        let served = match Opcode::try_from(h.opcode) {
            Ok(Opcode::Read) => read(io, store, opts, &h).await,
            Ok(Opcode::Write) => write(io, store, &h).await,
            Ok(Opcode::ShmInfo) => shm_info(io, store, opts, &h).await,
            Ok(Opcode::ShmAttach) => shm_attach(io, store, &h).await,
            Ok(Opcode::ShmCommit) => shm_commit(io, store, &h).await,
            Ok(Opcode::ShmBoard) => shm_board(io, store, &h).await,
            Ok(Opcode::ShmNvme) => shm_nvme(io, store, &h).await,
            Ok(Opcode::RdmaConnect) => rdma::connect(io, opts, &h, &mut lanes).await,
            Ok(Opcode::RdmaWritten) => rdma::written(io, store, &h).await,
            Ok(op) => {
                skip(io, &h).await?;
                let msg = format!("{op:?} is a master request; this is a storage node");
                reply_error(io, &h, WireError::new(ErrorCode::WrongService, msg)).await
            }
            Err(e) => {
                skip(io, &h).await?;
                reply_error(io, &h, e).await
            }
        };
        store.request_done(h.opcode, started, served.is_ok());
        match served {
            Err(Close::Transport(TransportError::Truncated)) => {
                return Err(fatal(
                    h.opcode,
                    h.request_id,
                    ErrorCode::Truncated,
                    "connection ended inside a frame",
                ))
            }
            other => other?,
        }
    }
}

/// Whether `buf` starts with a whole header and body, so that reading them cannot block.
fn next_head_buffered(buf: &[u8]) -> bool {
    let Some(head) = buf
        .get(..HEADER_LEN)
        .and_then(|b| <&[u8; HEADER_LEN]>::try_from(b).ok())
    else {
        return false;
    };
    match FrameHeader::decode(head, &DECODE_ANY) {
        Ok(h) => buf.len() - HEADER_LEN >= h.body_len as usize,
        // A bad header is answered without reading further.
        Err(_) => true,
    }
}

fn fatal(opcode: u8, request_id: u64, code: ErrorCode, msg: impl Into<String>) -> Close {
    Close::Fatal {
        opcode,
        request_id,
        err: WireError::new(code, msg),
    }
}

/// Skips a whole frame's body and payload without allocating for it.
async fn skip<S: Conn>(io: &mut Io<S>, h: &FrameHeader) -> Result<(), Close> {
    frame::discard(io, u64::from(h.body_len) + h.payload_len).await?;
    Ok(())
}

async fn reply_error<S: Conn>(
    io: &mut Io<S>,
    h: &FrameHeader,
    err: WireError,
) -> Result<(), Close> {
    tracing::debug!(
        request_id = h.request_id,
        opcode = h.opcode,
        "request refused: {err}"
    );
    io.get_mut()
        .write_all(&frame::encode_error(h.opcode, h.request_id, &err))
        .await?;
    Ok(())
}

/// Reads ranges: validates every op, then answers in the layout the client asked for: the
/// plain one (every op read, then the head with each op's result, then the bytes of those
/// that succeeded), or streamed ([`read::streamed`]) when the request carries
/// `FLAG_STREAMED`.
async fn read<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    opts: &DataServerOptions,
    h: &FrameHeader,
) -> Result<(), Close> {
    let body = frame::read_body(io, h.body_len).await?;
    // A read carries no payload; one sent anyway is skipped so the stream stays in step.
    frame::discard(io, h.payload_len).await?;
    let req: Read = match decode_body(&body) {
        Ok(r) => r,
        Err(e) => return reply_error(io, h, e).await,
    };
    if !req.expect.is_empty() && req.expect.len() != req.ops.len() {
        let msg = format!(
            "{} expected replicas for {} ops",
            req.expect.len(),
            req.ops.len()
        );
        return reply_error(io, h, WireError::new(ErrorCode::InvalidArgument, msg)).await;
    }
    let sources = read::admit(store, &req);
    if h.is_streamed() && !opts.plain_reads {
        read::streamed(io, store, h, &req, sources).await
    } else {
        read::plain(io, store, h, &req, sources).await
    }
}

/// Writes ranges: each op's bytes go from the socket straight into segment memory; a refused
/// op's bytes are skipped. Tags are recorded once the bytes have landed.
async fn write<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
) -> Result<(), Close> {
    let body = frame::read_body(io, h.body_len).await?;
    let req: Write = match decode_body(&body) {
        Ok(w) => w,
        Err(e) => {
            frame::discard(io, h.payload_len).await?;
            return reply_error(io, h, e).await;
        }
    };
    let declared = req
        .ops
        .iter()
        .try_fold(0u64, |sum, op| sum.checked_add(op.len));
    if declared != Some(h.payload_len) {
        // The client's framing is broken; reading (or skipping) a payload whose split we
        // cannot trust could mean gigabytes of garbage, so refuse and close.
        let msg = format!(
            "write ops declare {} payload bytes but the frame carries {}",
            declared.map_or_else(|| "more than 2^64".to_string(), |d| d.to_string()),
            h.payload_len
        );
        return Err(fatal(h.opcode, h.request_id, ErrorCode::MalformedBody, msg));
    }
    let mut items = Vec::with_capacity(req.ops.len());
    for op in &req.ops {
        match store.write_range(op.segment, op.offset, op.len) {
            Ok(dst) => {
                read_payload(io, dst).await?;
                store.payload_moved(false, op.len);
                items.push(Ok(()));
            }
            Err(e) => {
                frame::discard(io, op.len).await?;
                items.push(Err(e));
            }
        }
    }
    store.record_tags(req.tags);
    let head = frame::encode_response(h.opcode, h.request_id, &UnitResponse { items }, 0);
    io.get_mut().write_all(&head).await?;
    Ok(())
}

/// Fills `dst` from the stream: what the reader has buffered first, then (for large
/// remainders) straight from the socket, bypassing the buffer; small remainders through it.
async fn read_payload<S: Conn>(io: &mut Io<S>, dst: SharedRange) -> Result<(), TransportError> {
    let mut at = 0;
    loop {
        let buffered = io.buffer();
        if !buffered.is_empty() {
            let n = buffered.len().min(dst.len() - at);
            if let Some(part) = dst.sub(at, n) {
                part.copy_from(&buffered[..n]);
            }
            io.consume(n);
            at += n;
        }
        let left = dst.len() - at;
        if left == 0 {
            return Ok(());
        }
        if left >= DIRECT_MIN {
            // The buffer is empty here (everything buffered was consumed), so reading the
            // socket directly keeps the byte order.
            let rest = dst.sub(at, left).ok_or(TransportError::Truncated)?;
            return recv_exact(io.get_ref().get_ref(), rest).await;
        }
        if io.fill_buf().await?.is_empty() {
            return Err(TransportError::Truncated);
        }
    }
}

/// Reads a small request's body (no payload) and decodes it; `Ok(None)` when it was answered
/// with an error instead.
async fn small_request<S: Conn, M: serde::de::DeserializeOwned>(
    io: &mut Io<S>,
    h: &FrameHeader,
) -> Result<Option<M>, Close> {
    let body = frame::read_body(io, h.body_len).await?;
    frame::discard(io, h.payload_len).await?;
    match decode_body(&body) {
        Ok(m) => Ok(Some(m)),
        Err(e) => reply_error(io, h, e).await.map(|()| None),
    }
}

/// Tells a client where this node's shared memory is (and who and where the node is).
async fn shm_info<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    opts: &DataServerOptions,
    h: &FrameHeader,
) -> Result<(), Close> {
    let Some(ShmInfo {}) = small_request(io, h).await? else {
        return Ok(());
    };
    let resp = ShmInfoResponse {
        node: store.node_id(),
        host: crate::shm::host_id().to_string(),
        socket: opts.shm_socket.clone(),
    };
    let f = frame::encode_response(h.opcode, h.request_id, &resp, 0);
    io.get_mut().write_all(&f).await?;
    Ok(())
}

/// Hands a same-host client the segments' memory files, with the response frame. Only a Unix
/// socket carries descriptors; over TCP the request is refused.
async fn shm_attach<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
) -> Result<(), Close> {
    let Some(ShmAttach {}) = small_request(io, h).await? else {
        return Ok(());
    };
    let shared = store.shared_segments();
    let resp = ShmAttachResponse {
        node: store.node_id(),
        segments: shared.iter().map(|(s, _)| *s).collect(),
    };
    let fds: Vec<RawFd> = shared.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    if send_with_fds(io, h, &resp, &fds).await? {
        tracing::debug!(
            segments = fds.len(),
            "handed segment memory to a same-host client"
        );
    }
    Ok(())
}

/// Hands a same-host client the node's replica board (`shm::board`), read-only to it.
async fn shm_board<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
) -> Result<(), Close> {
    let Some(ShmBoard {}) = small_request(io, h).await? else {
        return Ok(());
    };
    let Some((slots, fd)) = store.board() else {
        let e = WireError::new(
            ErrorCode::TransportUnsupported,
            "this node publishes no replica board",
        );
        return reply_error(io, h, e).await;
    };
    send_with_fds(io, h, &ShmBoardResponse { slots }, &[fd.as_raw_fd()]).await?;
    Ok(())
}

/// Hands a same-host client the node's NVMe tier files, read-only (an empty list when it has
/// none or shares none).
async fn shm_nvme<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
) -> Result<(), Close> {
    let Some(ShmNvme {}) = small_request(io, h).await? else {
        return Ok(());
    };
    let files = store.nvme_files();
    let resp = ShmNvmeResponse {
        files: files.iter().map(|(f, _)| *f).collect(),
    };
    let fds: Vec<RawFd> = files.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    send_with_fds(io, h, &resp, &fds).await?;
    Ok(())
}

/// Answers `h` with `resp`, the descriptors riding with the frame's first byte; false when
/// the connection cannot carry descriptors (TCP), after answering `WrongService`.
async fn send_with_fds<S: Conn, R: serde::Serialize>(
    io: &mut Io<S>,
    h: &FrameHeader,
    resp: &R,
    fds: &[RawFd],
) -> Result<bool, Close> {
    let f = frame::encode_response(h.opcode, h.request_id, resp, 0);
    // Everything answered before goes out first, so the descriptors ride with this frame.
    io.get_mut().flush().await?;
    let sent = match io.get_ref().get_ref().send_fds(&f, fds) {
        Some(send) => Some(send.await),
        None => None,
    };
    match sent {
        Some(r) => {
            r?;
            Ok(true)
        }
        None => {
            let e = WireError::new(
                ErrorCode::WrongService,
                "shared memory is attached over the node's Unix socket, not TCP",
            );
            reply_error(io, h, e).await?;
            Ok(false)
        }
    }
}

/// Records the tags of a same-host client's put, whose bytes it copied into shared memory.
async fn shm_commit<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
) -> Result<(), Close> {
    let Some(ShmCommit { tags }) = small_request(io, h).await? else {
        return Ok(());
    };
    let items = tags.into_iter().map(|t| store.commit_tag(t)).collect();
    let f = frame::encode_response(h.opcode, h.request_id, &UnitResponse { items }, 0);
    io.get_mut().write_all(&f).await?;
    Ok(())
}
