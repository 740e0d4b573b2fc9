//! The node's answer to a `Read`: which ops it admits, how each op's bytes land (straight from
//! memory, copied out for a checked read, or read off a slower tier), and the two answer
//! layouts ([protocol](../../../docs/protocol.md)).
//!
//! - **Plain**: every op is read first, then the head (each op's result) and the bytes of the
//!   ops that succeeded. The only layout a reader that does not ask for a streamed answer
//!   understands.
//! - **Streamed** (`FLAG_STREAMED`): the head (which names only the ops refused up front) is
//!   written with the first bytes; each admitted op's bytes go out as soon as they and every
//!   op before them have landed, then its status ([`ReadStatus`]). A request's slower-tier reads are all in flight from the
//!   start, and they keep being polled (their checksums computed as they land) while earlier
//!   ops' bytes are on their way out, so the disk, the node's CPU and the socket overlap.

use std::{collections::VecDeque, future::Future};

use futures::{
    stream::{self, BoxStream, Stream, StreamExt},
    FutureExt,
};
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

/// Most bytes of small ops a streamed answer gathers before handing them to the writer.
const PENDING_MAX: usize = 256 << 10;

/// Filler sent in place of a failed op's bytes in a streamed answer.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Bytes of one read op: in (shared) memory, or read off a slower tier (in parts).
enum Bytes {
    Memory(SharedRange),
    Owned(Vec<OwnedBytes>),
}

impl Bytes {
    fn len(&self) -> usize {
        match self {
            Bytes::Memory(r) => r.len(),
            Bytes::Owned(parts) => parts.iter().flat_map(|p| p.slices()).map(<[u8]>::len).sum(),
        }
    }
}

/// What the server learns of an admitted op, in order, as it lands.
enum Event {
    /// The op's next bytes.
    Bytes(Bytes),
    /// The op failed: the bytes before are not its.
    Failed(WireError),
    /// Every byte of the op has landed and passed its checks.
    Done,
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
pub(crate) fn stale(replica: ReplicaId) -> WireError {
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
            Bytes::Owned(vec![Box::new(copy) as OwnedBytes])
        }
        Source::Memory(r) => Bytes::Memory(r),
        Source::Disk(mut parts) => {
            let mut landed = Vec::new();
            while let Some(p) = parts.next().await {
                landed.push(p?);
            }
            Bytes::Owned(landed)
        }
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
        send_bytes(w, b, &mut scratch).await?;
    }
    Ok(())
}

/// An admitted op's events. A slower tier's unchecked read yields each part as it lands; any
/// other op lands whole (a checked op is copied out and checked again first).
fn events<'a, T: SegmentStore>(
    store: &'a T,
    op: ReadOp,
    expect: Option<ReplicaId>,
    source: Source<'a>,
) -> BoxStream<'a, Event> {
    match source {
        Source::Disk(parts) if expect.is_none() => parts
            .map(|p| match p {
                Ok(b) => Event::Bytes(Bytes::Owned(vec![b])),
                Err(e) => Event::Failed(e),
            })
            .chain(stream::once(async { Event::Done }))
            .boxed(),
        source => stream::once(land(store, op, expect, source))
            .flat_map(|r| {
                stream::iter(match r {
                    Ok(b) => vec![Event::Bytes(b), Event::Done],
                    Err(e) => vec![Event::Failed(e)],
                })
            })
            .boxed(),
    }
}

/// The streamed answer: the head, then, op by op in order, each admitted op's bytes as they
/// land (what is ready goes out before the server waits for more), each op followed by its
/// status. A failed op's missing bytes are filler.
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
    // Every op's events, tagged with its place among the admitted ops, as they come: all
    // reads are in flight from the first poll (a refused request above started none).
    let mut landing = stream::select_all(
        sources
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.ok().map(|s| (i, s)))
            .enumerate()
            .map(|(k, (i, s))| events(store, req.ops[i], expect(req, i), s).map(move |e| (k, e))),
    );
    let mut queues: Vec<VecDeque<Event>> = admitted.iter().map(|_| VecDeque::new()).collect();
    // This answer's bytes not yet handed to the writer: the head, small ops, statuses. They
    // go out in the next large op's gathered write, before a wait, or at the end: an answer
    // of one large op is one write (head, bytes, status), and the head never goes out alone
    // (the reader can do nothing with it before bytes follow).
    let mut pending = head;
    let mut head_only = true;
    for (k, &len) in admitted.iter().enumerate() {
        let mut sent = 0u64;
        loop {
            let Some(event) = queues[k].pop_front() else {
                if take_landed(&mut landing, &mut queues) {
                    continue;
                }
                // Nothing more of this op yet: what is ready goes out before the wait, and a
                // peer that left meanwhile ends it (its reads are dropped, not finished for
                // nobody).
                let w = io.get_mut();
                if !head_only && !pending.is_empty() {
                    w.write_all(&pending).await?;
                    pending.clear();
                }
                if !w.buffer().is_empty() {
                    w.flush().await?;
                }
                let next = tokio::select! {
                    next = landing.next() => next,
                    gone = peer_gone(io.get_ref().get_ref()) => {
                        gone?;
                        return Err(Close::Transport(TransportError::Closed));
                    }
                };
                match next {
                    Some((j, e)) => queues[j].push_back(e),
                    None => queues[k].push_back(Event::Failed(internal("an op ended unchecked"))),
                }
                continue;
            };
            head_only = false;
            let w = io.get_mut();
            let status = match event {
                Event::Bytes(b) if sent + b.len() as u64 <= len => {
                    sent += b.len() as u64;
                    // The op's verdict, when it is already known, goes out in the same write.
                    take_landed(&mut landing, &mut queues);
                    let done = sent == len && matches!(queues[k].front(), Some(Event::Done));
                    let ok = ReadStatus(ErrorCode::Ok).encode();
                    let trailer: &[u8] = if done {
                        queues[k].pop_front();
                        &ok
                    } else {
                        &[]
                    };
                    // The ops behind this one keep landing (and checksumming) meanwhile.
                    let send = send_part(w, &mut pending, &b, trailer);
                    while_landing(send, &mut landing, &mut queues).await?;
                    if done {
                        store.payload_moved(true, len);
                        break;
                    }
                    continue;
                }
                Event::Bytes(_) => internal(format!("more bytes landed than the op's {len}")),
                Event::Done if sent == len => {
                    store.payload_moved(true, len);
                    WireError::new(ErrorCode::Ok, "")
                }
                Event::Done => internal(format!("{sent} bytes landed for an op of {len}")),
                Event::Failed(e) => e,
            };
            if status.code != ErrorCode::Ok {
                tracing::debug!(
                    len,
                    sent,
                    "read op failed after the answer's head: {status}"
                );
                w.write_all(&pending).await?;
                pending.clear();
                let filler = fill(w, len - sent);
                while_landing(filler, &mut landing, &mut queues).await?;
            }
            pending.extend_from_slice(&ReadStatus(status.code).encode());
            break;
        }
    }
    // Into the write buffer: the connection's loop sends it with whatever answers follow.
    io.get_mut().write_all(&pending).await?;
    Ok(())
}

/// Queues every event that has landed by now, without waiting; whether there was any.
fn take_landed(
    landing: &mut (impl Stream<Item = (usize, Event)> + Unpin),
    queues: &mut [VecDeque<Event>],
) -> bool {
    let mut any = false;
    // Polled without a waker: the set of reads re-registers its wake-ups on the next real
    // poll, which always comes before the server waits.
    while let Some(Some((j, e))) = landing.next().now_or_never() {
        queues[j].push_back(e);
        any = true;
    }
    any
}

/// Sends one landed part of an op, after this answer's `pending` bytes and followed by
/// `trailer` (the op's status when it is known). A large part goes out with both in one
/// gathered write (segment memory, which no slice may cover, in a `send` of its own); a
/// small one joins `pending`.
async fn send_part<S: Conn>(
    w: &mut BufWriter<S>,
    pending: &mut Vec<u8>,
    b: &Bytes,
    trailer: &[u8],
) -> Result<(), Close> {
    match b {
        Bytes::Owned(parts) if b.len() >= DIRECT_MIN => {
            // Earlier answers still in the write buffer go first.
            if !w.buffer().is_empty() {
                w.flush().await?;
            }
            let bufs: Vec<&[u8]> = std::iter::once(pending.as_slice())
                .chain(parts.iter().flat_map(|p| p.slices()))
                .chain(std::iter::once(trailer))
                .collect();
            write_all_gathered(w.get_mut(), &bufs).await?;
            pending.clear();
            return Ok(());
        }
        Bytes::Memory(r) if r.len() >= DIRECT_MIN => {
            w.write_all(pending).await?;
            pending.clear();
            w.flush().await?;
            send_all(w.get_ref(), *r).await?;
        }
        Bytes::Memory(r) => {
            // Copied (no slice over segment memory is formed).
            let at = pending.len();
            pending.resize(at + r.len(), 0);
            r.copy_to(&mut pending[at..]);
        }
        Bytes::Owned(parts) => {
            for s in parts.iter().flat_map(|p| p.slices()) {
                pending.extend_from_slice(s);
            }
        }
    }
    pending.extend_from_slice(trailer);
    if pending.len() >= PENDING_MAX {
        w.write_all(pending).await?;
        pending.clear();
    }
    Ok(())
}

fn internal(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Internal, msg)
}

/// Runs `send` while the request's other ops keep landing into their queues.
async fn while_landing(
    send: impl Future<Output = Result<(), Close>>,
    landing: &mut (impl Stream<Item = (usize, Event)> + Unpin),
    queues: &mut [VecDeque<Event>],
) -> Result<(), Close> {
    let mut send = std::pin::pin!(send);
    loop {
        tokio::select! {
            biased;
            sent = &mut send => return sent,
            Some((j, e)) = landing.next() => queues[j].push_back(e),
        }
    }
}

/// Writes `n` bytes of filler.
async fn fill<S: Conn>(w: &mut BufWriter<S>, mut n: u64) -> Result<(), Close> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k]).await?;
        n -= k as u64;
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

/// Sends one op's bytes. Small ones go through the write buffer; large ones straight to the
/// socket after whatever is buffered: segment memory with `send`, a slower tier's parts in
/// one gathered write.
async fn send_bytes<S: Conn>(
    w: &mut BufWriter<S>,
    b: &Bytes,
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
        Bytes::Owned(parts) if b.len() >= DIRECT_MIN => {
            w.flush().await?;
            let bufs: Vec<&[u8]> = parts.iter().flat_map(|p| p.slices()).collect();
            write_all_gathered(w.get_mut(), &bufs).await?;
        }
        Bytes::Owned(parts) => {
            for s in parts.iter().flat_map(|p| p.slices()) {
                w.write_all(s).await?;
            }
        }
    }
    Ok(())
}
