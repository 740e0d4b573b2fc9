//! The io_uring engine: one dedicated thread owns a ring with the device registered as a
//! fixed file and the staging pool registered as fixed buffers; requests come in over a
//! channel, completions go back through oneshots.
//!
//! The thread sleeps in `io_uring_enter` waiting for either a completion or a poll on an
//! eventfd that senders bump after queueing a request, so a new request is submitted at once
//! even while the ring waits on others. No IOPOLL: virtio and most cloud disks have no poll
//! queues (`EOPNOTSUPP`), and interrupts cost little at kvpool's transfer sizes.

use std::{
    fmt, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{mpsc, Arc},
    thread::JoinHandle,
};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{ready, reply_future, send_op, IoEngine, IoFuture, Op, OpKind};
use crate::nvme::{buf::AlignedBuf, device::Device, BufPool};

/// user_data of the eventfd poll; request slots use their index.
const WAKE: u64 = u64::MAX;
/// Largest single submission: the kernel caps one read/write below 2 GiB; the rest of a
/// larger buffer is submitted when this part completes.
const MAX_IO: usize = 1 << 30;

pub struct UringEngine {
    device: Arc<Device>,
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    fixed_buffers: bool,
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringEngine")
            .field("fixed_buffers", &self.fixed_buffers)
            .finish()
    }
}

impl UringEngine {
    /// Sets up the ring (errors here mean "use psync") and starts its thread.
    pub fn new(device: Arc<Device>, pool: &BufPool, queue_depth: u32) -> io::Result<UringEngine> {
        let depth = queue_depth.clamp(1, 4096);
        // One more entry than requests in flight, for the eventfd poll.
        let ring: IoUring = IoUring::builder().build(depth + 1)?;
        ring.submitter().register_files(&[device.fd()])?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's slab, which stays allocated as long as the
        // thread holds its clone of the pool, and the thread outlives the ring's use of it.
        // Fixed ops are only issued on buffers taken from this pool (checked by index).
        let fixed_buffers = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "io_uring cannot register {} staging buffers ({e}; RLIMIT_MEMLOCK?): \
                     using unregistered buffers",
                    iovecs.len()
                );
                false
            }
        };
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = mpsc::channel();
        let ctx = Ring {
            ring,
            rx,
            wake: wake.clone(),
            depth: depth as usize,
            fixed_buffers,
            pool_count: pool.count(),
            _pool: pool.clone(),
            _device: device.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("kvpool-uring".into())
            .spawn(move || ctx.run())?;
        tracing::info!(depth, fixed_buffers, "io_uring engine started");
        Ok(UringEngine {
            device,
            tx: Some(tx),
            wake,
            thread: Some(thread),
            fixed_buffers,
        })
    }

    fn submit(&self, kind: OpKind, buf: AlignedBuf, offset: u64) -> IoFuture {
        let Some(tx) = &self.tx else {
            return ready(buf, Err(io::Error::other("io_uring engine closed")));
        };
        let rx = match send_op(tx, kind, buf, offset, "the io_uring thread stopped") {
            Ok(rx) => rx,
            Err(refused) => return refused,
        };
        bump(&self.wake);
        reply_future(rx)
    }
}

fn bump(wake: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to an eventfd we own. Failure (EAGAIN at a
    // counter near u64::MAX) means the thread is already due to wake, so it is ignored.
    let _ = unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl IoEngine for UringEngine {
    fn read(&self, buf: AlignedBuf, offset: u64) -> IoFuture {
        self.submit(OpKind::Read, buf, offset)
    }

    fn write(&self, buf: AlignedBuf, offset: u64) -> IoFuture {
        self.submit(OpKind::Write, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        // A plain fdatasync: it is issued once per commit group from the commit thread, and
        // as a whole-file barrier it gains nothing from sitting in the ring.
        self.device.sync_data()
    }

    fn name(&self) -> &'static str {
        "uring"
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The thread finishes what is queued and in flight, then sees the channel closed.
        self.tx = None;
        bump(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request in flight: the op (which owns the buffer the kernel uses) and how much of it
/// is done.
struct Slot {
    op: Op,
    done: usize,
}

/// Everything the ring thread owns.
struct Ring {
    ring: IoUring,
    rx: mpsc::Receiver<Op>,
    wake: Arc<OwnedFd>,
    depth: usize,
    fixed_buffers: bool,
    pool_count: usize,
    /// The registered buffers' memory must outlive the ring.
    _pool: BufPool,
    /// The registered file must stay open as long as the ring.
    _device: Arc<Device>,
}

/// The in-flight slots. If the thread unwinds with requests in flight, their buffers are
/// leaked rather than freed, because the kernel may still write into them.
struct Slots {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    inflight: usize,
}

impl Drop for Slots {
    fn drop(&mut self) {
        if self.inflight > 0 {
            for s in self.slots.drain(..).flatten() {
                std::mem::forget(s.op.buf);
            }
        }
    }
}

impl Ring {
    fn run(mut self) {
        let mut slots = Slots {
            slots: (0..self.depth).map(|_| None).collect(),
            free: (0..self.depth).rev().collect(),
            inflight: 0,
        };
        let mut wake_armed = false;
        let mut open = true;
        let mut cqes: Vec<cqueue::Entry> = Vec::with_capacity(self.depth + 1);
        loop {
            if open && !wake_armed {
                let poll =
                    opcode::PollAdd::new(types::Fd(self.wake.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(WAKE);
                if self.push(&poll).is_err() {
                    tracing::error!("io_uring submission queue full with nothing in flight");
                    break;
                }
                wake_armed = true;
            }
            while open && slots.inflight < self.depth {
                match self.rx.try_recv() {
                    Ok(op) => self.start(&mut slots, op),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            if !open && slots.inflight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // The kernel may still own the in-flight buffers: `Slots` leaks them.
                    tracing::error!("io_uring_enter failed ({e}); the io_uring engine stops");
                    break;
                }
            }
            cqes.clear();
            cqes.extend(self.ring.completion());
            for cqe in &cqes {
                if cqe.user_data() == WAKE {
                    wake_armed = false;
                    let mut n = 0u64;
                    // SAFETY: reads 8 bytes into a live local from our non-blocking eventfd;
                    // EAGAIN (already drained) is fine.
                    let _ = unsafe {
                        libc::read(self.wake.as_raw_fd(), (&mut n as *mut u64).cast(), 8)
                    };
                    continue;
                }
                self.complete(&mut slots, cqe.user_data() as usize, cqe.result());
            }
        }
    }

    fn push(&mut self, sqe: &squeue::Entry) -> Result<(), ()> {
        // SAFETY: every entry we push either references no memory (the eventfd poll) or a
        // buffer owned by an in-flight slot, which is neither moved nor freed until its
        // completion has been reaped.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        if pushed.is_ok() {
            return Ok(());
        }
        // Full: hand the queued entries to the kernel and retry once.
        let _ = self.ring.submit();
        // SAFETY: as above.
        unsafe { self.ring.submission().push(sqe) }.map_err(|_| ())
    }

    fn start(&mut self, slots: &mut Slots, op: Op) {
        let Some(i) = slots.free.pop() else {
            let _ = op
                .reply
                .send((op.buf, Err(io::Error::other("io_uring has no free slot"))));
            return;
        };
        slots.slots[i] = Some(Slot { op, done: 0 });
        slots.inflight += 1;
        self.issue(slots, i);
    }

    /// Submits the part of slot `i` not yet transferred.
    fn issue(&mut self, slots: &mut Slots, i: usize) {
        let Some(slot) = slots.slots[i].as_mut() else {
            return;
        };
        let len = (slot.op.buf.len() - slot.done).min(MAX_IO) as u32;
        let offset = slot.op.offset + slot.done as u64;
        let fixed = slot
            .op
            .buf
            .fixed_index()
            .filter(|&b| self.fixed_buffers && (b as usize) < self.pool_count);
        let file = types::Fixed(0);
        // SAFETY: done <= len(buf), so the pointer stays inside the buffer.
        let ptr = unsafe { slot.op.buf.as_mut_ptr().add(slot.done) };
        let sqe = match (slot.op.kind, fixed) {
            (OpKind::Read, Some(b)) => opcode::ReadFixed::new(file, ptr, len, b)
                .offset(offset)
                .build(),
            (OpKind::Read, None) => opcode::Read::new(file, ptr, len).offset(offset).build(),
            (OpKind::Write, Some(b)) => opcode::WriteFixed::new(file, ptr, len, b)
                .offset(offset)
                .build(),
            (OpKind::Write, None) => opcode::Write::new(file, ptr, len).offset(offset).build(),
        }
        .user_data(i as u64);
        if self.push(&sqe).is_err() {
            // Cannot happen with depth+1 entries; fail the request rather than lose it.
            self.finish(
                slots,
                i,
                Err(io::Error::other("io_uring submission queue full")),
            );
        }
    }

    fn complete(&mut self, slots: &mut Slots, i: usize, res: i32) {
        let Some(slot) = slots.slots.get_mut(i).and_then(|s| s.as_mut()) else {
            tracing::error!(user_data = i, "io_uring completion for an unknown slot");
            return;
        };
        if res < 0 {
            self.finish(slots, i, Err(io::Error::from_raw_os_error(-res)));
            return;
        }
        if res == 0 && slot.op.buf.len() > slot.done {
            let what = match slot.op.kind {
                OpKind::Read => "read past the end of the device",
                OpKind::Write => "device accepted no bytes",
            };
            let kind = match slot.op.kind {
                OpKind::Read => io::ErrorKind::UnexpectedEof,
                OpKind::Write => io::ErrorKind::WriteZero,
            };
            self.finish(slots, i, Err(io::Error::new(kind, what)));
            return;
        }
        slot.done += res as usize;
        if slot.done >= slot.op.buf.len() {
            self.finish(slots, i, Ok(()));
        } else {
            self.issue(slots, i);
        }
    }

    fn finish(&mut self, slots: &mut Slots, i: usize, r: io::Result<()>) {
        if let Some(slot) = slots.slots[i].take() {
            slots.inflight -= 1;
            slots.free.push(i);
            let _ = slot.op.reply.send((slot.op.buf, r));
        }
    }
}
