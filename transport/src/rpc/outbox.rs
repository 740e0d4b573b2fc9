//! The write side of one RPC connection, shared by every caller on it.
//!
//! A caller outside the runtime's tasks (a `block_on` thread, as the Python binding drives
//! the client) whose frame finds nothing queued and nobody writing writes it to the socket
//! itself (`try_write`, never blocking): an unbatched request then costs one `send` on the
//! caller's thread, with no wake-up of a worker thread to write it (measured in
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

use tokio::{
    net::{tcp, unix},
    sync::Notify,
};

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

/// A connection's write half: TCP, or a same-host server's Unix socket.
pub(super) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

impl WriteHalf {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Tcp(w) => w.try_write(buf),
            WriteHalf::Unix(w) => w.try_write(buf),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            WriteHalf::Tcp(w) => w.writable().await,
            WriteHalf::Unix(w) => w.writable().await,
        }
    }
}

/// One connection's write half with its queue.
pub(super) struct Link {
    wr: WriteHalf,
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
    pub(super) fn new(wr: WriteHalf) -> Arc<Link> {
        Arc::new(Link {
            wr,
            out: Mutex::new(Outbox::default()),
            flush: Notify::new(),
        })
    }

    /// With `direct`, writes `frame` now if the socket is free and takes it; otherwise (or
    /// without `direct`) queues it for the flusher. Never waits. `Err` means the socket
    /// failed (now or before).
    pub(super) fn send(&self, frame: &[u8], direct: bool) -> Result<Sent, TransportError> {
        let mut out = lock(&self.out);
        if out.failed {
            return Err(TransportError::Closed);
        }
        if !direct || out.busy || !out.queued.is_empty() {
            out.queued.extend_from_slice(frame);
            if !out.busy {
                self.flush.notify_one();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpSocket},
    };

    /// A connected pair whose client side has a small send buffer, and the server side.
    async fn pair() -> (WriteHalf, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(16 << 10).unwrap();
        let (client, server) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (_rd, wr) = client.unwrap().into_split();
        (WriteHalf::Tcp(wr), server.unwrap().0)
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_socket_buffer_goes_out_partly_direct_then_in_order() {
        let (wr, mut peer) = pair().await;
        let link = Link::new(wr);
        // The peer reads nothing yet: the socket takes only part of the first frame.
        let big: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        assert_eq!(link.send(&big, true).unwrap(), Sent::Queued);
        let left = lock(&link.out).queued.len();
        assert!(left > 0 && left < big.len(), "{left} of {} left", big.len());
        // Later frames queue behind the rest of the first.
        let small = b"after the big one".to_vec();
        assert_eq!(link.send(&small, true).unwrap(), Sent::Queued);
        let flusher = tokio::spawn(link.clone().flusher());
        let mut got = vec![0u8; big.len() + small.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert!(got[..big.len()] == big[..], "the big frame arrived intact");
        assert_eq!(&got[big.len()..], &small[..]);
        // With the queue empty, the next frame goes out from the caller.
        assert_eq!(link.send(b"direct", true).unwrap(), Sent::Written);
        let mut direct = [0u8; 6];
        peer.read_exact(&mut direct).await.unwrap();
        assert_eq!(&direct, b"direct");
        // The owner leaving ends the flusher once the queue is empty.
        lock(&link.out).closing = true;
        link.flush.notify_one();
        assert!(flusher.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_failed_socket_refuses_further_frames() {
        let (wr, peer) = pair().await;
        let link = Link::new(wr);
        let flusher = tokio::spawn(link.clone().flusher());
        drop(peer);
        // The first writes after the peer is gone may still be accepted by the kernel; the
        // reset they draw fails a later one (the caller's, or the flusher's).
        let frame = vec![1u8; 4 << 10];
        let failed = kvpool_testkit::poll_until(Duration::from_secs(5), || {
            std::future::ready(link.send(&frame, true).is_err())
        })
        .await;
        assert!(failed, "writes to a closed peer never failed");
        assert!(matches!(
            link.send(&frame, true),
            Err(TransportError::Closed)
        ));
        assert!(lock(&link.out).failed);
        // A flusher that saw the failure reports it; one that was idle ends on the next wake.
        link.flush.notify_one();
        assert!(flusher.await.unwrap().is_err());
    }
}
