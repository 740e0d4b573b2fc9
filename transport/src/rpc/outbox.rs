//! The write side of one RPC connection, shared by every caller on it.
//!
//! A caller whose frame finds nothing queued and nobody writing writes it to the socket
//! itself (`try_write`, never blocking): an unbatched request then costs one `send` on the
//! caller's thread, with no hand-off to another task or thread (measured in
//! docs/benchmarks.md, "Master round trip (issue 13)"). Whatever cannot go out at once (the
//! socket would block, or another write is in progress) is appended to one queue that the
//! flusher task writes, many frames per syscall: frames queued under load are still
//! coalesced. Frames leave in the order their `send` calls took the lock: a caller that wrote
//! only part of its frame puts the rest in front of the frames queued meanwhile, and nobody
//! else writes while a write is in progress (`busy`).

use std::{
    io,
    sync::{Arc, Mutex},
};

use tokio::{net::tcp::OwnedWriteHalf, sync::Notify};

use crate::TransportError;

/// Most bytes the flusher hands to one socket write.
const COALESCE_LIMIT: usize = 1 << 20;

/// What is not yet on the socket, and who may write.
#[derive(Default)]
pub(super) struct Outbox {
    /// Bytes of whole frames not yet written, in order.
    queued: Vec<u8>,
    /// Someone (a caller or the flusher) is writing outside the lock: everyone else queues.
    busy: bool,
    /// The socket failed: nothing more is written.
    pub(super) failed: bool,
    /// The connection's owner is gone: the flusher writes what is queued, then ends.
    pub(super) closing: bool,
}

/// One connection's write half with its queue.
pub(super) struct Link {
    wr: OwnedWriteHalf,
    pub(super) out: Mutex<Outbox>,
    /// Wakes the flusher (a stored permit: a wake before it waits is not lost).
    pub(super) flush: Notify,
}

/// What became of a frame handed to [`Link::send`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    /// All of it is on the socket.
    Written,
    /// Some or all of it waits for the flusher.
    Queued,
}

impl Link {
    pub(super) fn new(wr: OwnedWriteHalf) -> Arc<Link> {
        Arc::new(Link {
            wr,
            out: Mutex::new(Outbox::default()),
            flush: Notify::new(),
        })
    }

    /// Writes `frame` now if the socket is free and takes it, else queues it for the
    /// flusher. Never waits. `Err` means the socket failed (now or before).
    pub(super) fn send(&self, frame: &[u8]) -> Result<Sent, TransportError> {
        let mut out = lock(&self.out);
        if out.failed {
            return Err(TransportError::Closed);
        }
        if out.busy || !out.queued.is_empty() {
            out.queued.extend_from_slice(frame);
            return Ok(Sent::Queued);
        }
        out.busy = true;
        drop(out);
        // Outside the lock: a send racing with this one queues behind it instead of waiting.
        let r = self.wr.try_write(frame);
        let mut out = lock(&self.out);
        out.busy = false;
        let written = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                out.failed = true;
                return Err(e.into());
            }
        };
        let sent = if written < frame.len() {
            // Ahead of whatever was queued while this write was in progress.
            out.queued.splice(0..0, frame[written..].iter().copied());
            Sent::Queued
        } else {
            Sent::Written
        };
        if !out.queued.is_empty() {
            self.flush.notify_one();
        }
        Ok(sent)
    }

    /// The flusher: writes queued bytes until the socket fails or the owner is gone and
    /// nothing is left. Returns the socket's error, if any.
    pub(super) async fn flusher(self: Arc<Link>) -> Result<(), TransportError> {
        let mut chunk = Vec::new();
        loop {
            self.flush.notified().await;
            loop {
                {
                    let mut out = lock(&self.out);
                    if out.failed {
                        return Err(TransportError::Closed);
                    }
                    // A caller writing now notifies again when it leaves bytes behind.
                    if out.busy || out.queued.is_empty() {
                        if out.closing && !out.busy {
                            return Ok(());
                        }
                        break;
                    }
                    out.busy = true;
                    let n = out.queued.len().min(COALESCE_LIMIT);
                    chunk.clear();
                    chunk.extend(out.queued.drain(..n));
                }
                let r = self.write_all(&chunk).await;
                let mut out = lock(&self.out);
                out.busy = false;
                if let Err(e) = r {
                    out.failed = true;
                    return Err(e.into());
                }
            }
        }
    }

    async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.wr.writable().await?;
            match self.wr.try_write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single step (an insert, a remove, a flag, an
    // append), so a panic cannot leave them half done and a poisoned lock is safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
