//! Sockets the data server moves segment bytes through, with the payload I/O that goes
//! between a socket and a [`SharedRange`] without forming a slice over it.

use std::{
    future::Future,
    io::{self, IoSlice},
    os::fd::AsRawFd,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest},
    net::{TcpStream, UnixStream},
};

use crate::{memory::SharedRange, TransportError};

/// Most slices one vectored syscall is given (Linux's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// A non-blocking stream socket whose readiness tokio tracks: TCP or Unix.
pub trait RawSocket: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + Sync + 'static {
    /// Waits until the socket may be ready for `interest`.
    fn wait(&self, interest: Interest) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs one non-blocking syscall `f`, clearing readiness when it would block.
    fn try_raw<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Sets a freshly accepted socket up for small, latency-bound messages (TCP: no Nagle).
    fn prepare(&self) -> io::Result<()> {
        Ok(())
    }
}

impl RawSocket for TcpStream {
    async fn wait(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
    fn try_raw<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
    }
    fn prepare(&self) -> io::Result<()> {
        self.set_nodelay(true)
    }
}

impl RawSocket for UnixStream {
    async fn wait(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
    fn try_raw<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
    }
}

/// Receives exactly `dst.len()` bytes from `s` into `dst`.
pub async fn recv_exact<S: RawSocket>(s: &S, dst: SharedRange) -> Result<(), TransportError> {
    let mut at = 0;
    while at < dst.len() {
        let Some(rest) = dst.sub(at, dst.len() - at) else {
            break;
        };
        s.wait(Interest::READABLE).await?;
        match s.try_raw(Interest::READABLE, || rest.recv_from(s.as_raw_fd())) {
            Ok(0) => return Err(TransportError::Truncated),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Resolves once the peer has closed the connection (end of stream, or an error such as a
/// reset), so that a server waiting on something slow for that peer can stop. Never resolves
/// while the peer has sent bytes not yet read (a pipelined request: the peer is there).
pub async fn peer_gone<S: RawSocket>(s: &S) -> io::Result<()> {
    loop {
        s.wait(Interest::READABLE).await?;
        let mut b = [0u8; 1];
        let peeked = s.try_raw(Interest::READABLE, || {
            // SAFETY: `b` is valid for writes of its length for the whole call; MSG_PEEK
            // leaves the byte in the socket for the reader.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    b.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match peeked {
            Ok(0) => return Ok(()),
            // Readiness stays set while bytes wait; the peer is alive, nothing to watch.
            Ok(_) => return std::future::pending().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends all of `src` to `s`.
pub async fn send_all<S: RawSocket>(s: &S, src: SharedRange) -> io::Result<()> {
    let mut at = 0;
    while at < src.len() {
        let Some(rest) = src.sub(at, src.len() - at) else {
            break;
        };
        s.wait(Interest::WRITABLE).await?;
        match s.try_raw(Interest::WRITABLE, || rest.send_to(s.as_raw_fd())) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `bufs`, in order, with as few `writev`s as the socket allows.
pub async fn write_all_gathered<W: AsyncWrite + Unpin>(
    conn: &mut W,
    bufs: &[&[u8]],
) -> io::Result<()> {
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
        let n = conn.write_vectored(&iov).await?;
        if n == 0 && iov.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Step past what went out, and past empty slices, which a zero-byte write leaves.
        advance(|i| bufs[i].len(), bufs.len(), (&mut at, &mut skip), n);
    }
    Ok(())
}

/// Steps a position in a list of `count` buffers (the first byte not yet moved is byte
/// `skip` of buffer `at`; `len(i)` is buffer `i`'s length) past `n` more bytes moved, and
/// past empty buffers: the one rule of partial vectored reads and writes.
pub fn advance(
    len: impl Fn(usize) -> usize,
    count: usize,
    (at, skip): (&mut usize, &mut usize),
    mut n: usize,
) {
    while *at < count && n >= len(*at) - *skip {
        n -= len(*at) - *skip;
        *at += 1;
        *skip = 0;
    }
    *skip += n;
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn advance_steps_over_whole_buffers_and_empty_ones() {
        let lens = [3usize, 0, 0, 4, 2];
        let len = |i: usize| lens[i];
        let (mut at, mut skip) = (0, 0);
        // Inside the first buffer.
        advance(len, lens.len(), (&mut at, &mut skip), 2);
        assert_eq!((at, skip), (0, 2));
        // Its last byte done: past it and the two empty ones, to the start of buffer 3.
        advance(len, lens.len(), (&mut at, &mut skip), 1);
        assert_eq!((at, skip), (3, 0));
        // Across a boundary: all of buffer 3 and one byte of buffer 4.
        advance(len, lens.len(), (&mut at, &mut skip), 5);
        assert_eq!((at, skip), (4, 1));
        advance(len, lens.len(), (&mut at, &mut skip), 1);
        assert_eq!((at, skip), (5, 0), "everything moved");
    }
}
