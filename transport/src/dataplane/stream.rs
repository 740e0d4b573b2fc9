//! Sockets the data server moves segment bytes through, with the payload I/O that goes
//! between a socket and a [`SharedRange`] without forming a slice over it.

use std::{future::Future, io, os::fd::AsRawFd};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest},
    net::{TcpStream, UnixStream},
};

use crate::{memory::SharedRange, TransportError};

/// A non-blocking stream socket whose readiness tokio tracks: TCP or Unix.
pub trait RawSocket: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + Sync + 'static {
    /// Waits until the socket may be ready for `interest`.
    fn wait(&self, interest: Interest) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs one non-blocking syscall `f`, clearing readiness when it would block.
    fn try_raw<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

impl RawSocket for TcpStream {
    async fn wait(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
    fn try_raw<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
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
