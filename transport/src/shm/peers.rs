//! The client side of the shared-memory transport: attaching to a node, the per-node cache of
//! attachments, and the copies in and out of mapped segments.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kvpool_proto::{
    ErrorCode, FrameHeader, FrameLimits, ItemResult, NodeId, ObjectTag, SegmentId, ShmAttach,
    ShmAttachResponse, ShmCommit, ShmInfo, ShmInfoResponse, UnitResponse, WireError, HEADER_LEN,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

use super::{fds, host_id, Mapping};
use crate::{
    engine::{EngineOptions, ReadItem, WriteItem},
    frame, TransportError,
};

/// How long a node that could not be attached (socket missing, refused) is reached over TCP
/// before attaching is tried again.
const RETRY_ATTACH: Duration = Duration::from_secs(5);

/// Bytes copied and then checksummed at a time by a shared-memory get or put: small enough
/// that the piece is still in L1/L2 when the checksum reads it, so the value crosses the
/// memory bus once.
const COPY_PIECE: usize = 64 << 10;

/// A node's segments mapped into this process, and the socket that proves the node alive
/// and takes its commits.
pub struct Attachment {
    node: NodeId,
    segments: HashMap<SegmentId, Mapping>,
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

    /// Whether the node still holds its end of the socket. A node that exited (or restarted)
    /// closed it; its mapping is then stale and must not be used for new requests.
    pub fn alive(&self) -> bool {
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
        match n {
            0 => false,
            n if n > 0 => true,
            _ => std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock,
        }
    }

    /// Copies each item's range into its slices; an item's value is the crc32c of the bytes
    /// the caller got (0 unless `checksum`). Every item's segment must be mapped.
    pub fn read(&self, items: Vec<ReadItem<'_>>, checksum: bool) -> Vec<ItemResult<u32>> {
        items
            .into_iter()
            .map(|mut it| {
                let src = self.range(it.op.segment, it.op.offset, it.op.len)?;
                let mut at = 0;
                let mut crc = 0;
                for dst in it.dst.iter_mut() {
                    // Piece by piece, so each piece is checksummed while still in cache: the
                    // get reads the bytes from memory once, not twice.
                    for piece in dst.chunks_mut(COPY_PIECE) {
                        let part = src.sub(at, piece.len()).ok_or_else(|| {
                            WireError::new(ErrorCode::InvalidArgument, "buffers longer than the op")
                        })?;
                        part.copy_to(piece);
                        if checksum {
                            crc = kvpool_proto::crc32c::crc32c_append(crc, piece);
                        }
                        at += piece.len();
                    }
                }
                Ok(crc)
            })
            .collect()
    }

    /// Copies each item's slices into its range, checksumming each piece of the caller's bytes
    /// as it goes (one pass over the value). An item's value is the crc32c of its bytes;
    /// items whose range is refused fail alone. The node does not know of the bytes until
    /// [`Attachment::commit`] hands it their tags.
    pub fn copy_in(&self, items: &[WriteItem<'_>]) -> Vec<ItemResult<u32>> {
        items
            .iter()
            .map(|it| {
                let dst = self.range(it.op.segment, it.op.offset, it.op.len)?;
                let mut at = 0;
                let mut crc = 0;
                for src in it.data.iter().flat_map(|d| d.chunks(COPY_PIECE)) {
                    let part = dst.sub(at, src.len()).ok_or_else(|| {
                        WireError::new(ErrorCode::InvalidArgument, "buffers longer than the op")
                    })?;
                    part.copy_from(src);
                    // The caller's piece, just read and still in cache; never the shared
                    // copy, which another process may write.
                    crc = kvpool_proto::crc32c::crc32c_append(crc, src);
                    at += src.len();
                }
                Ok(crc)
            })
            .collect()
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
    s.write_all(&frame::encode_request(1, &ShmAttach {}, 0))
        .await?;
    // The descriptors ride with the response's first byte; the rest may follow in more reads.
    let mut buf = vec![0u8; 64 << 10];
    let (mut have, fds) = fds::recv_with_fds(&s, &mut buf).await?;
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
            let h = FrameHeader::decode(head, &opts.limits).map_err(TransportError::Header)?;
            need = HEADER_LEN + h.body_len as usize;
            if need > buf.len() {
                buf.resize(need, 0);
            }
            header = Some(h);
        }
        if header.is_some() && have >= need {
            break;
        }
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf[have..]).await?;
        if n == 0 {
            return Err(TransportError::Truncated);
        }
        have += n;
    }
    let h = header.ok_or(TransportError::Truncated)?;
    let resp: ShmAttachResponse = frame::decode_response(&h, &buf[HEADER_LEN..need])?;
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
    tracing::debug!(node = %node, socket, segments = segments.len(), "attached to node memory");
    let ctl_fd = s.as_raw_fd();
    Ok(Attachment {
        node,
        segments,
        ctl: tokio::sync::Mutex::new(s),
        ctl_fd,
        next_id: AtomicU64::new(2),
    })
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
