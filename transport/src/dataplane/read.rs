//! The node's answer to a `Read`: which ops it admits, how each op's bytes land (straight from
//! memory, copied out for a checked read, or read off a slower tier), and the two answer
//! layouts ([protocol](../../../docs/protocol.md)).
//!
//! - **Plain**: every op is read first, then the head (each op's result) and the bytes of the
//!   ops that succeeded. The only layout a reader that does not ask for a streamed answer
//!   understands.
//! - **Streamed** (`FLAG_STREAMED`): the head goes out at once, with the ops refused up front;
//!   each admitted op's bytes follow as soon as it and every op before it have landed, then
//!   its status ([`ReadStatus`]). A request's slower-tier reads are all in flight from the
//!   start, and they keep being polled (their checksums computed as they land) while earlier
//!   ops' bytes are on their way out, so the disk, the node's CPU and the socket overlap.

use std::collections::VecDeque;

use futures::stream::{FuturesOrdered, StreamExt};
use kvpool_proto::{
    header::FLAG_STREAMED, ErrorCode, FrameHeader, ItemResult, Read, ReadOp, ReadStatus, ReplicaId,
    UnitResponse, WireError,
};
use tokio::io::{AsyncWriteExt, BufWriter};

use super::{
    reply_error, send_all, stream::peer_gone, write_all_gathered, Close, Conn, Io, OwnedBytes,
    SegmentStore, Source, DIRECT_MIN,
};
use crate::{frame, memory::SharedRange, TransportError};

/// Filler sent in place of a failed op's bytes in a streamed answer.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The bytes of one read op: in (shared) memory, or read off a slower tier.
enum Bytes {
    Memory(SharedRange),
    Owned(OwnedBytes),
}

impl Bytes {
    fn len(&self) -> usize {
        match self {
            Bytes::Memory(r) => r.len(),
            Bytes::Owned(b) => b.slices().iter().map(|s| s.len()).sum(),
        }
    }
}

/// Each op's source, or why it is refused before anything is read (a bad range, a checked
/// range that no longer holds its replica).
pub(super) fn admit<'a, T: SegmentStore>(
    store: &'a T,
    req: &Read,
) -> Vec<Result<Source<'a>, WireError>> {
    req.ops
        .iter()
        .enumerate()
        .map(|(i, op)| match expect(req, i) {
            Some(r) if !store.holds(op.segment, op.offset, op.len, r) => Err(stale(r)),
            _ => store.read_range(op.segment, op.offset, op.len),
        })
        .collect()
}

fn expect(req: &Read, i: usize) -> Option<ReplicaId> {
    req.expect.get(i).copied().flatten()
}

/// The answer to a checked read whose range no longer holds the replica the client expected.
fn stale(replica: ReplicaId) -> WireError {
    WireError::new(
        ErrorCode::StaleLocation,
        format!("the range no longer holds replica {}", replica.0),
    )
}

/// Lands one admitted op's bytes. A checked range is copied out, so its tag can be checked
/// again once the bytes are the server's: a free and reuse of the range that raced the copy
/// is then a stale location, not sent as the object. A slower tier's read is awaited here
/// (it fails as that op's error: a checksum mismatch, a dropped record, an I/O error).
async fn land<T: SegmentStore>(
    store: &T,
    op: ReadOp,
    expect: Option<ReplicaId>,
    source: Source<'_>,
) -> Result<Bytes, WireError> {
    let bytes = match source {
        Source::Memory(r) if expect.is_some() => {
            let mut copy = vec![0u8; r.len()];
            r.copy_to(&mut copy);
            Bytes::Owned(Box::new(copy))
        }
        Source::Memory(r) => Bytes::Memory(r),
        Source::Disk(read) => Bytes::Owned(read.await?),
    };
    if let Some(r) = expect {
        if !store.holds(op.segment, op.offset, op.len, r) {
            return Err(stale(r));
        }
    }
    if bytes.len() as u64 != op.len {
        // A store bug; sending it would put the stream out of step.
        return Err(WireError::new(
            ErrorCode::Internal,
            format!("{} bytes landed for an op of {}", bytes.len(), op.len),
        ));
    }
    Ok(bytes)
}

/// The plain answer: every op landed (a request's slower-tier reads all in flight at once),
/// then the head with each op's result, then the bytes of the ops that succeeded.
pub(super) async fn plain<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
    req: &Read,
    sources: Vec<Result<Source<'_>, WireError>>,
) -> Result<(), Close> {
    let landed = futures::future::join_all(sources.into_iter().enumerate().map(|(i, s)| {
        let op = req.ops[i];
        async move { land(store, op, expect(req, i), s?).await }
    }))
    .await;
    let mut items = Vec::with_capacity(req.ops.len());
    let mut bytes = Vec::with_capacity(req.ops.len());
    let mut total = 0u64;
    for b in landed {
        match b {
            Ok(b) => {
                total = total.saturating_add(b.len() as u64);
                bytes.push(b);
                items.push(Ok(()));
            }
            Err(e) => items.push(Err(e)),
        }
    }
    if let Some(e) = too_large(store, total) {
        return reply_error(io, h, e).await;
    }
    let head = frame::encode_response(h.opcode, h.request_id, &UnitResponse { items }, total);
    let w = io.get_mut();
    w.write_all(&head).await?;
    store.payload_moved(true, total);
    let mut scratch = Vec::new();
    for b in &bytes {
        send_bytes(w, b, &[], &mut scratch).await?;
    }
    Ok(())
}

/// The streamed answer: the head at once; then, op by op in order, each admitted op's bytes
/// as soon as it has landed (what is ready goes out before the server waits on the next
/// op), each followed by its status. A failed op's bytes are filler of its length.
pub(super) async fn streamed<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
    req: &Read,
    sources: Vec<Result<Source<'_>, WireError>>,
) -> Result<(), Close> {
    let items: Vec<ItemResult<()>> = sources
        .iter()
        .map(|s| s.as_ref().map(|_| ()).map_err(Clone::clone))
        .collect();
    let admitted: Vec<u64> = req
        .ops
        .iter()
        .zip(&items)
        .filter(|(_, r)| r.is_ok())
        .map(|(op, _)| op.len)
        .collect();
    let total = ReadStatus::payload_len(admitted.iter().copied());
    if let Some(e) = too_large(store, total) {
        return reply_error(io, h, e).await;
    }
    let head = frame::encode_response_flagged(
        h.opcode,
        h.request_id,
        &UnitResponse { items },
        total,
        FLAG_STREAMED,
    );
    io.get_mut().write_all(&head).await?;
    // Polled in order; every one is in flight from the first poll (futures do nothing until
    // then, so a refused request above started no read).
    let mut landing: FuturesOrdered<_> = sources
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let op = req.ops[i];
            s.ok().map(|s| land(store, op, expect(req, i), s))
        })
        .collect();
    let mut ready = VecDeque::new();
    let mut scratch = Vec::new();
    for len in admitted {
        let landed = match ready.pop_front() {
            Some(b) => b,
            None => {
                // The next op is still on its way: what is ready goes out before the wait.
                if !io.get_ref().buffer().is_empty() {
                    io.get_mut().flush().await?;
                }
                // A peer that left meanwhile ends the wait: its reads are dropped, not
                // finished for nobody.
                let next = tokio::select! {
                    next = landing.next() => next,
                    gone = peer_gone(io.get_ref().get_ref()) => {
                        gone?;
                        return Err(Close::Transport(TransportError::Closed));
                    }
                };
                match next {
                    Some(b) => b,
                    None => break,
                }
            }
        };
        let send = send_streamed(io.get_mut(), store, landed, len, &mut scratch);
        // The ops behind this one keep landing (and checksumming) while its bytes go out.
        let mut send = std::pin::pin!(send);
        loop {
            tokio::select! {
                biased;
                sent = &mut send => break sent?,
                Some(b) = landing.next(), if !landing.is_empty() => ready.push_back(b),
            }
        }
    }
    Ok(())
}

/// `FrameTooLarge` when an answer of `total` payload bytes is over the limit.
fn too_large<T: SegmentStore>(store: &T, total: u64) -> Option<WireError> {
    let max = store.limits().max_payload;
    (total > max).then(|| {
        WireError::new(
            ErrorCode::FrameTooLarge,
            format!("the ops ask for {total} bytes, more than one response may carry ({max})"),
        )
    })
}

/// One admitted op of a streamed answer: its bytes and status, or filler and its error.
async fn send_streamed<S: Conn, T: SegmentStore>(
    w: &mut BufWriter<S>,
    store: &T,
    landed: Result<Bytes, WireError>,
    len: u64,
    scratch: &mut Vec<u8>,
) -> Result<(), Close> {
    match landed {
        Ok(b) => {
            send_bytes(w, &b, &ReadStatus(ErrorCode::Ok).encode(), scratch).await?;
            store.payload_moved(true, len);
        }
        Err(e) => {
            tracing::debug!(len, "read op failed after the answer's head: {e}");
            let mut left = len;
            while left > 0 {
                let n = left.min(ZEROS.len() as u64) as usize;
                w.write_all(&ZEROS[..n]).await?;
                left -= n as u64;
            }
            w.write_all(&ReadStatus(e.code).encode()).await?;
        }
    }
    Ok(())
}

/// Sends one op's bytes, then `trailer` (its status in a streamed answer, else nothing).
/// Small ones go through the write buffer; large ones straight to the socket after whatever
/// is buffered: segment memory with `send`, a slower tier's parts and the trailer in one
/// gathered write.
async fn send_bytes<S: Conn>(
    w: &mut BufWriter<S>,
    b: &Bytes,
    trailer: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), Close> {
    match b {
        Bytes::Memory(r) if r.len() >= DIRECT_MIN => {
            w.flush().await?;
            send_all(w.get_ref(), *r).await?;
        }
        Bytes::Memory(r) => {
            // Small: through the write buffer, by way of an owned copy (no slice over
            // segment memory is formed).
            scratch.resize(r.len(), 0);
            r.copy_to(scratch);
            w.write_all(scratch).await?;
        }
        Bytes::Owned(o) if b.len() >= DIRECT_MIN => {
            w.flush().await?;
            let mut bufs = o.slices();
            bufs.push(trailer);
            write_all_gathered(w.get_mut(), &bufs).await?;
            return Ok(());
        }
        Bytes::Owned(o) => {
            for s in o.slices() {
                w.write_all(s).await?;
            }
        }
    }
    w.write_all(trailer).await?;
    Ok(())
}
