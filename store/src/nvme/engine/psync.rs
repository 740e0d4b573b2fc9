//! The portable engine: `pread`/`pwrite` on the engine's own threads, one request per thread
//! at a time, so the queue depth is the thread count.

use std::{
    fmt, io,
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
};

use super::{ready, reply_future, send_op, IoEngine, IoFuture, Op, OpKind};
use crate::nvme::{buf::AlignedBuf, device::Device};

/// Threads above this add nothing but memory: a device rarely serves more requests at once.
const MAX_THREADS: u32 = 64;

pub struct PsyncEngine {
    device: Arc<Device>,
    tx: Option<mpsc::Sender<Op>>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for PsyncEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PsyncEngine")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl PsyncEngine {
    /// `queue_depth` threads (at most 64); a thread that cannot be spawned lowers the depth.
    pub fn new(device: Arc<Device>, queue_depth: u32) -> PsyncEngine {
        let (tx, rx) = mpsc::channel::<Op>();
        // std's Receiver is single-consumer; the mutex makes the threads take turns waiting.
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..queue_depth.clamp(1, MAX_THREADS) {
            let (rx, device) = (rx.clone(), device.clone());
            match std::thread::Builder::new()
                .name(format!("kvpool-psync-{i}"))
                .spawn(move || worker(&rx, &device))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!("cannot spawn psync thread {i}: {e}");
                    break;
                }
            }
        }
        PsyncEngine {
            device,
            tx: Some(tx),
            threads,
        }
    }

    fn submit(&self, kind: OpKind, buf: AlignedBuf, offset: u64) -> IoFuture {
        let Some(tx) = self.tx.as_ref().filter(|_| !self.threads.is_empty()) else {
            return ready(buf, Err(io::Error::other("no psync thread is running")));
        };
        match send_op(tx, kind, buf, offset, "the psync threads stopped") {
            Ok(rx) => reply_future(rx),
            Err(refused) => refused,
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Op>>, device: &Device) {
    loop {
        let op = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(mut op) = op else {
            return; // the engine was dropped
        };
        let r = match op.kind {
            OpKind::Read => device.read_exact_at(&mut op.buf, op.offset),
            OpKind::Write => device.write_all_at(&op.buf, op.offset),
        };
        // The caller may have given up on the result; the buffer is simply freed then.
        let _ = op.reply.send((op.buf, r));
    }
}

impl IoEngine for PsyncEngine {
    fn read(&self, buf: AlignedBuf, offset: u64) -> IoFuture {
        self.submit(OpKind::Read, buf, offset)
    }

    fn write(&self, buf: AlignedBuf, offset: u64) -> IoFuture {
        self.submit(OpKind::Write, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.device.sync_data()
    }

    fn name(&self) -> &'static str {
        "psync"
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        // Closing the channel ends each thread after the requests already queued.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
