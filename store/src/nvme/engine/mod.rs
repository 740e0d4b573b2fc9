//! How I/O is issued: an [`IoEngine`] moves owned, aligned buffers to and from the device.
//!
//! Buffers are moved in and handed back with the result because the kernel (io_uring) or a
//! worker thread (psync) holds them while the operation runs: a caller whose future is
//! dropped mid-operation cannot free memory that is still being written. Both engines are
//! runtime-agnostic (their own threads, completions through oneshot channels), so the tier
//! can be used from any tokio runtime, or none.
//!
//! - [`uring`]: one thread owning an io_uring, registered file and buffers (the default).
//! - [`psync`]: `pread`/`pwrite` on a few threads, where io_uring is unavailable.

pub mod psync;
pub mod uring;

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::{mpsc, Arc},
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{buf::AlignedBuf, device::Device, BufPool};

/// The buffer back, and whether all of it was transferred.
pub type IoResult = (AlignedBuf, io::Result<()>);
/// A pending read or write.
pub type IoFuture = Pin<Box<dyn Future<Output = IoResult> + Send + 'static>>;

/// Issues O_DIRECT reads and writes of whole buffers on one device.
pub trait IoEngine: Send + Sync + fmt::Debug + 'static {
    /// Reads `buf.len()` bytes at `offset` into `buf`. Reaching the end of the device first
    /// is an `UnexpectedEof` error (a short read), never a partial success.
    fn read(&self, buf: AlignedBuf, offset: u64) -> IoFuture;
    /// Writes all of `buf` at `offset`.
    fn write(&self, buf: AlignedBuf, offset: u64) -> IoFuture;
    /// Makes every completed write durable. Blocking: the tier calls it from its commit
    /// thread only.
    fn sync(&self) -> io::Result<()>;
    /// "uring" or "psync" (wrappers name what they wrap).
    fn name(&self) -> &'static str;
}

/// Which engine a tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoEngineKind {
    /// io_uring with registered buffers; falls back to `psync` (with a warning) where the
    /// kernel refuses io_uring.
    #[default]
    Uring,
    /// Positional reads and writes on worker threads.
    Psync,
}

/// Builds the engine of `kind`; an io_uring that cannot be set up gives a psync engine.
pub fn open_engine(
    kind: IoEngineKind,
    device: Arc<Device>,
    pool: &BufPool,
    queue_depth: u32,
) -> Arc<dyn IoEngine> {
    match kind {
        IoEngineKind::Uring => match uring::UringEngine::new(device.clone(), pool, queue_depth) {
            Ok(e) => return Arc::new(e),
            Err(e) => tracing::warn!(
                "io_uring unavailable ({e}); the nvme tier uses the psync engine \
                 (check /proc/sys/kernel/io_uring_disabled and seccomp profiles)"
            ),
        },
        IoEngineKind::Psync => {}
    }
    Arc::new(psync::PsyncEngine::new(device, queue_depth))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
}

/// One request to an engine thread.
pub(crate) struct Op {
    pub kind: OpKind,
    pub buf: AlignedBuf,
    pub offset: u64,
    pub reply: oneshot::Sender<IoResult>,
}

/// Queues a request for an engine thread and gives the receiver of its result; a thread
/// that is gone (`stopped` says which) gives the buffer back in a ready error instead.
pub(crate) fn send_op(
    tx: &mpsc::Sender<Op>,
    kind: OpKind,
    buf: AlignedBuf,
    offset: u64,
    stopped: &'static str,
) -> Result<oneshot::Receiver<IoResult>, IoFuture> {
    let (reply, rx) = oneshot::channel();
    match tx.send(Op {
        kind,
        buf,
        offset,
        reply,
    }) {
        Ok(()) => Ok(rx),
        Err(mpsc::SendError(op)) => Err(ready(op.buf, Err(io::Error::other(stopped)))),
    }
}

/// The future of a request sent to an engine thread. A thread that is gone (it only stops
/// when the engine is dropped, or on a ring failure) drops the reply and keeps the buffer,
/// which might still be the target of a kernel operation.
pub(crate) fn reply_future(rx: oneshot::Receiver<IoResult>) -> IoFuture {
    Box::pin(async move {
        rx.await.unwrap_or_else(|_| {
            (
                AlignedBuf::new(0),
                Err(io::Error::other("the nvme io engine thread stopped")),
            )
        })
    })
}

/// A future that is ready with `r` (requests refused before reaching a thread).
pub(crate) fn ready(buf: AlignedBuf, r: io::Result<()>) -> IoFuture {
    Box::pin(std::future::ready((buf, r)))
}
