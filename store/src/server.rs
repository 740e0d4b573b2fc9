//! The data server: clients write and read segment ranges over TCP.
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

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use kvpool_proto::{
    decode_body, ErrorCode, FrameHeader, FrameLimits, HeaderError, Opcode, Read, Token,
    UnitResponse, WireError, Write, HEADER_LEN,
};
use kvpool_transport::{auth, frame, TransportError};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    task::JoinSet,
};

use crate::node::Node;

/// Buffer size of a connection's reader and writer: a batch of small objects per syscall.
const BUF_SIZE: usize = 256 << 10;
/// Object bytes at least this long bypass the connection buffers (one copy fewer; the
/// syscall cost is amortized over enough bytes).
pub const DIRECT_MIN: usize = 64 << 10;
/// After a fatal error, how long and how much the server keeps reading (and discarding) so the
/// peer sees the error response instead of a reset caused by unread input.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 20;
/// Back-off after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Limits used to decode a header so that an oversized frame's request id and opcode are
/// known when it is refused; the node's real limits are checked right after.
const DECODE_ANY: FrameLimits = FrameLimits {
    max_body: u32::MAX,
    max_payload: u64::MAX,
};

/// Serves data-plane connections from `listener` until `shutdown` completes; then stops
/// accepting and ends every connection. No token: see [`serve_with_token`].
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    serve_with_token(listener, node, None, shutdown).await
}

/// [`serve`], requiring `token` (when set) in a `Hello` as the first frame of every
/// connection; anything else is answered `Unauthorized` and the connection closed.
pub async fn serve_with_token(
    listener: TcpListener,
    node: Arc<Node>,
    token: Option<Token>,
    shutdown: impl Future<Output = ()>,
) {
    let token = token.map(Arc::new);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(connection(stream, peer, node.clone(), token.clone()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("a data connection task panicked: {e}");
                    }
                }
            }
        }
    }
    conns.shutdown().await;
}

struct Io {
    r: BufReader<OwnedReadHalf>,
    w: BufWriter<OwnedWriteHalf>,
}

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

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    node: Arc<Node>,
    token: Option<Arc<Token>>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, "TCP_NODELAY: {e}");
    }
    let (r, w) = stream.into_split();
    let mut io = Io {
        r: BufReader::with_capacity(BUF_SIZE, r),
        w: BufWriter::with_capacity(BUF_SIZE, w),
    };
    match serve_connection(&mut io, &node, token.as_deref()).await {
        Ok(()) => tracing::trace!(%peer, "data connection closed"),
        Err(Close::Transport(e)) => tracing::debug!(%peer, "data connection ended: {e}"),
        Err(Close::Fatal {
            opcode,
            request_id,
            err,
        }) => {
            tracing::warn!(%peer, request_id, "closing data connection: {err}");
            let frame = frame::encode_error(opcode, request_id, &err);
            let _ = io.w.write_all(&frame).await;
            let _ = io.w.shutdown().await;
            let drain = async {
                let mut scratch = vec![0u8; 64 << 10];
                let mut total = 0;
                while total < LINGER_BYTES {
                    match io.r.read(&mut scratch).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, drain).await;
        }
    }
}

async fn serve_connection(io: &mut Io, node: &Node, token: Option<&Token>) -> Result<(), Close> {
    // Nothing is served before the Hello when a token is configured.
    let mut authed = token.is_none();
    loop {
        // Answers go out before the server could block on input: a pipelined batch gets its
        // answers in few writes, and no answer waits on bytes the client has not sent yet.
        if !next_head_buffered(io.r.buffer()) {
            io.w.flush().await?;
        }
        let h = match frame::read_header(&mut io.r, &DECODE_ANY).await {
            Ok(Some(h)) => h,
            Ok(None) => {
                io.w.flush().await?;
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
        if h.opcode == Opcode::Hello as u8 {
            hello(io, &h, token).await?;
            authed = true;
            continue;
        }
        if !authed {
            // Neither body nor payload of an unauthenticated request is read (the linger
            // after the refusal discards what the peer already sent).
            let e = auth::hello_required();
            return Err(Close::Fatal {
                opcode: h.opcode,
                request_id: h.request_id,
                err: e,
            });
        }
        if let Some(e) = over_limits(&h, node.limits()) {
            return Err(fatal(h.opcode, h.request_id, e.code(), e.to_string()));
        }
        let started = std::time::Instant::now();
        let served = match Opcode::try_from(h.opcode) {
            Ok(Opcode::Read) => read(io, node, &h).await,
            Ok(Opcode::Write) => write(io, node, &h).await,
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
        node.metrics().request(h.opcode, started, served.is_ok());
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

/// Answers a `Hello`: accepted (any token when none is configured), or refused and the
/// connection closed. Its size is bounded before reading: the peer is not trusted yet.
async fn hello(io: &mut Io, h: &FrameHeader, token: Option<&Token>) -> Result<(), Close> {
    if h.body_len > auth::MAX_HELLO_BODY || h.payload_len > 0 {
        return Err(Close::Fatal {
            opcode: h.opcode,
            request_id: h.request_id,
            err: auth::hello_too_large(h.body_len, h.payload_len),
        });
    }
    let body = frame::read_body(&mut io.r, h.body_len).await?;
    match auth::check_hello(token, &body) {
        Ok(resp) => {
            let f = frame::encode_response(h.opcode, h.request_id, &resp, 0);
            io.w.write_all(&f).await?;
            Ok(())
        }
        Err(err) if err.code == ErrorCode::Unauthorized => Err(Close::Fatal {
            opcode: h.opcode,
            request_id: h.request_id,
            err,
        }),
        // A malformed Hello to a node without a token: an ordinary bad request.
        Err(err) => reply_error(io, h, err).await,
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

fn over_limits(h: &FrameHeader, limits: &FrameLimits) -> Option<HeaderError> {
    if h.body_len > limits.max_body {
        return Some(HeaderError::BodyTooLarge {
            len: h.body_len,
            max: limits.max_body,
        });
    }
    if h.payload_len > limits.max_payload {
        return Some(HeaderError::PayloadTooLarge {
            len: h.payload_len,
            max: limits.max_payload,
        });
    }
    None
}

/// Skips a whole frame's body and payload without allocating for it.
async fn skip(io: &mut Io, h: &FrameHeader) -> Result<(), Close> {
    frame::discard(&mut io.r, u64::from(h.body_len) + h.payload_len).await?;
    Ok(())
}

async fn reply_error(io: &mut Io, h: &FrameHeader, err: WireError) -> Result<(), Close> {
    tracing::debug!(
        request_id = h.request_id,
        opcode = h.opcode,
        "request refused: {err}"
    );
    io.w.write_all(&frame::encode_error(h.opcode, h.request_id, &err))
        .await?;
    Ok(())
}

/// The bytes of one read op: straight from segment memory, or read off the NVMe tier.
enum Bytes<'a> {
    Dram(&'a [u8]),
    Nvme(crate::nvme::ValueBuf),
}

impl std::ops::Deref for Bytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Dram(b) => b,
            Bytes::Nvme(v) => v,
        }
    }
}

/// Reads ranges: validates every op, sends the answer's head, then streams each successful
/// op's bytes from segment memory.
async fn read(io: &mut Io, node: &Node, h: &FrameHeader) -> Result<(), Close> {
    let body = frame::read_body(&mut io.r, h.body_len).await?;
    // A read carries no payload; one sent anyway is skipped so the stream stays in step.
    frame::discard(&mut io.r, h.payload_len).await?;
    let req: Read = match decode_body(&body) {
        Ok(r) => r,
        Err(e) => return reply_error(io, h, e).await,
    };
    let mut items = Vec::with_capacity(req.ops.len());
    let mut slices: Vec<Bytes<'_>> = Vec::with_capacity(req.ops.len());
    let mut total = 0u64;
    // NVMe ranges are read off the disk before the answer's head goes out, so that a failed
    // read becomes that op's error rather than a broken stream; all of a request's NVMe reads
    // are in flight at once, so a batch keeps the device's queue busy.
    let mut from_disk: Vec<_> = futures::future::join_all(req.ops.iter().map(|op| async move {
        match node.nvme(op.segment) {
            Some(nvme) => Some(nvme.read(op.offset, op.len).await),
            None => None,
        }
    }))
    .await
    .into_iter()
    .map(Some)
    .collect();
    for (i, op) in req.ops.iter().enumerate() {
        let bytes = match from_disk.get_mut(i).and_then(Option::take).flatten() {
            Some(read) => read.map(Bytes::Nvme),
            None => node.segment(op.segment).and_then(|s| {
                // SAFETY: a reader only reads ranges the master handed out to it; concurrent
                // writes to the same bytes happen only after the object was freed or evicted,
                // and then the client's lease check and checksum reject what it read.
                unsafe { s.slice(op.offset, op.len) }.map(Bytes::Dram)
            }),
        };
        match bytes {
            Ok(bytes) => {
                total = total.saturating_add(op.len);
                slices.push(bytes);
                items.push(Ok(()));
            }
            Err(e) => items.push(Err(e)),
        }
    }
    if total > node.limits().max_payload {
        let msg = format!(
            "the ops ask for {total} bytes, more than one response may carry ({})",
            node.limits().max_payload
        );
        return reply_error(io, h, WireError::new(ErrorCode::FrameTooLarge, msg)).await;
    }
    let head = frame::encode_response(h.opcode, h.request_id, &UnitResponse { items }, total);
    io.w.write_all(&head).await?;
    node.metrics().bytes_out(total);
    for bytes in &slices {
        let bytes: &[u8] = bytes;
        if bytes.len() >= DIRECT_MIN {
            io.w.flush().await?;
            io.w.get_mut().write_all(bytes).await?;
        } else {
            io.w.write_all(bytes).await?;
        }
    }
    Ok(())
}

/// Writes ranges: each op's bytes go from the socket straight into segment memory; a refused
/// op's bytes are skipped. Tags are recorded once the bytes have landed.
async fn write(io: &mut Io, node: &Node, h: &FrameHeader) -> Result<(), Close> {
    let body = frame::read_body(&mut io.r, h.body_len).await?;
    let req: Write = match decode_body(&body) {
        Ok(w) => w,
        Err(e) => {
            frame::discard(&mut io.r, h.payload_len).await?;
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
        if node.nvme(op.segment).is_some() {
            frame::discard(&mut io.r, op.len).await?;
            items.push(Err(WireError::new(
                ErrorCode::InvalidArgument,
                "an NVMe segment is written by its node only (demotion), not by clients",
            )));
            continue;
        }
        let dst = node.segment(op.segment).and_then(|s| {
            // SAFETY: the master allocated this range to this writer alone; ranges of live
            // objects are disjoint, so no other task holds a slice of these bytes except a
            // stale reader of evicted data, whose checksum then fails.
            unsafe { s.slice_mut(op.offset, op.len) }
        });
        match dst {
            Ok(dst) => {
                read_payload(&mut io.r, dst).await?;
                node.metrics().bytes_in(op.len);
                items.push(Ok(()));
            }
            Err(e) => {
                frame::discard(&mut io.r, op.len).await?;
                items.push(Err(e));
            }
        }
    }
    for tag in req.tags {
        node.record_tag(tag);
    }
    let head = frame::encode_response(h.opcode, h.request_id, &UnitResponse { items }, 0);
    io.w.write_all(&head).await?;
    Ok(())
}

/// Fills `dst` from the stream: what the reader has buffered first, then (for large
/// remainders) straight from the socket, bypassing the buffer.
async fn read_payload(
    r: &mut BufReader<OwnedReadHalf>,
    dst: &mut [u8],
) -> Result<(), TransportError> {
    let buffered = r.buffer();
    let n = buffered.len().min(dst.len());
    dst[..n].copy_from_slice(&buffered[..n]);
    r.consume(n);
    let rest = &mut dst[n..];
    if rest.is_empty() {
        Ok(())
    } else if rest.len() >= DIRECT_MIN {
        // The buffer is empty here (everything buffered was consumed), so reading the inner
        // stream directly keeps the byte order.
        frame::read_payload_into(r.get_mut(), rest).await
    } else {
        frame::read_payload_into(r, rest).await
    }
}
