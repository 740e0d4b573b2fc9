//! Same-host reads of a node's NVMe tier, straight off its file.
//!
//! A node with an NVMe tier hands a same-host client a read-only O_DIRECT descriptor of the
//! tier's file (`ShmNvme`). A get of an NVMe-resident value then reads its record (the header
//! block and the value) with one O_DIRECT read per item: a request's reads are submitted
//! together on an io_uring, so the device works on all of them at once; a task waits for
//! them through the client's runtime (its worker runs other tasks meanwhile) unless they are
//! small and all the process has in flight, a `block_on` caller in the kernel. Each record is checked as the
//! node checks it: the header decodes (magic, version, its own crc32c), names the replica the
//! master handed out, and holds a value of the requested length whose crc32c, computed while
//! the value is copied into the caller's buffers, matches the header's. Replica ids are never
//! reused, so the bytes are then the ones the node wrote for that replica, whatever happened
//! to the file meanwhile.
//!
//! Anything else is no error here: the item goes to the node as before, which answers with
//! what it holds. That covers a key over 4,032 bytes (its value starts past the first block),
//! a partial range, a record freed and overwritten under the read, an I/O error, a kernel
//! without io_uring.

use std::{
    fs::File,
    io,
    ops::Range,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use io_uring::{opcode, types, IoUring};
use kvpool_proto::{
    crc32c::crc32c_combine,
    layout::{self, NVME_ALIGN},
    ReplicaId, SegmentId,
};
use tokio::io::{unix::AsyncFd, Interest};

use super::copy::{Local, Plan};
use crate::{engine::ReadItem, memory::SharedRange};

/// The block before a value that holds its record's header and key (keys of up to 4,032
/// bytes: nearly all).
const HEAD: u64 = NVME_ALIGN;
/// Longest record read made here (an SQE's length is 32 bits); longer values go to the node.
const MAX_READ: u64 = 1 << 30;
/// Record reads longer than twice this are cut into parts of this size, read at once, each
/// copied as it lands. Measured (docs/benchmarks.md, "NVMe reads off the node's file"):
/// 256 KiB parts were no faster than one read at 1 MiB on this machine's disk and sometimes
/// slower with four clients, as on the node (`store.nvme.read-parts`); only values beyond
/// 16 MiB are cut, where the copy of one part overlapping the next part's read matters.
const PART: u64 = 8 << 20;
/// ... except a lone record read (one record in the request, no other direct read of this
/// process in flight), cut into parts of this size: nothing else overlaps its copy, which for
/// 1 MiB is ~95 µs after the read lands in one piece and ~35 µs after the last of five parts
/// (docs/benchmarks.md, "NVMe gets against the disk's own pattern").
const LONE_PART: u64 = 256 << 10;
/// Submission queue entries per ring: a request's further reads go in as earlier ones land.
const RING_ENTRIES: u32 = 64;
/// A task whose reads are all the reads of this process in flight, of at most this many
/// bytes (a batch of four 64 KiB records), waits for them in the kernel (`Ring::step`).
const INLINE_WAIT_MAX: u64 = 512 << 10;
/// Bytes of direct reads in flight in this process, over every ring.
static READS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Whether this process has direct reads in flight besides `own` bytes of them (a request's
/// own, or 0 before it submits any).
fn others_in_flight(own: u64) -> bool {
    READS_IN_FLIGHT.load(Ordering::Relaxed) != own
}

/// Whether a request with `own` bytes of reads in flight (or about to be), while this process
/// has `others` in flight or not, waits for them through the runtime.
///
/// A caller outside the runtime's tasks (a `block_on` thread, as the Python binding drives
/// the client) has nothing else to run: it waits in the kernel, where the completion wakes it
/// directly. A task waits for the ring's readiness instead, so its worker runs other tasks
/// meanwhile; unless its reads are small and all this process has in flight (a get at depth
/// 1): then no other read could overlap the wait, and waiting in the kernel saves the wake-up
/// through the runtime (a 64 KiB read's median 93-98 µs on a task went to 75-78, as on a
/// blocked thread, and to 67-72 with the submission and the wait in one call;
/// docs/benchmarks.md). The worker is held for one such batch at most.
fn waits_in_task(own: u64, others: bool) -> bool {
    tokio::task::try_id().is_some() && (own > INLINE_WAIT_MAX || others)
}

/// Idle rings (with their buffers) kept for the next requests.
const IDLE_RINGS: usize = 8;
/// A buffer over this is freed after its request rather than kept with its ring.
const KEEP_BUF: usize = 8 << 20;

/// A node's NVMe tier file, as a same-host client reads it.
pub struct DiskFile {
    segment: SegmentId,
    file: File,
    size: u64,
    /// Record reads longer than twice this are cut into parts ([`PART`]) ...
    part: u64,
    /// ... or, for a lone record read, than twice this ([`LONE_PART`]).
    lone_part: u64,
    idle: Mutex<Idle>,
}

/// Rings not in use, and the process that made them (a forked child makes its own: a ring
/// shared with the parent would hand it the parent's completions).
#[derive(Default)]
struct Idle {
    pid: u32,
    rings: Vec<Ring>,
}

impl DiskFile {
    /// The tier file of `segment`, `size` usable bytes, from the node's read-only descriptor.
    pub fn new(segment: SegmentId, fd: OwnedFd, size: u64) -> DiskFile {
        DiskFile {
            segment,
            file: File::from(fd),
            size,
            part: PART,
            lone_part: LONE_PART,
            idle: Mutex::new(Idle::default()),
        }
    }

    /// The same file with every record read, lone or not, cut into parts of `part` bytes
    /// (rounded to 4 KiB multiples; `u64::MAX`: never cut), for
    /// `benches/examples/disk_read.rs`.
    pub fn with_part(mut self, part: u64) -> DiskFile {
        self.part = part / NVME_ALIGN * NVME_ALIGN;
        self.lone_part = self.part;
        self
    }

    pub fn segment(&self) -> SegmentId {
        self.segment
    }

    /// Reads each item's value straight off the file, checked against its record (the
    /// replica each item expects, in `expect`). Per item, the crc32c of the bytes now in its
    /// destination, or `None` when the item must be read through the node instead (its
    /// destination may hold anything then).
    ///
    /// Every part of every record is read at once; each part is copied into the caller's
    /// buffers (with its crc32c) as soon as it lands, so the copies of the first parts overlap
    /// the reads of the others, and a record is checked once its last part is in.
    pub async fn read(&self, items: &mut [ReadItem<'_>], expect: &[ReplicaId]) -> Vec<Option<u32>> {
        let n = items.len();
        let mut out = vec![None; n];
        if expect.len() != n {
            return out;
        }
        // Per item, where its record read starts and how long it is.
        let spans: Vec<Option<(u64, u64)>> = items
            .iter()
            .map(|it| span(it.op.offset, it.op.len, self.size))
            .collect();
        let want: Vec<usize> = (0..n).filter(|&i| spans[i].is_some()).collect();
        if want.is_empty() {
            return out;
        }
        let lens: Vec<u64> = want.iter().map(|&i| spans[i].map_or(0, |s| s.1)).collect();
        // Looked at once, before this request submits: both choices below follow from it.
        let others = others_in_flight(0);
        let mut ring = match self.take_ring(waits_in_task(lens.iter().sum(), others)) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(segment = %self.segment, "no io_uring for direct NVMe reads: {e}");
                return out;
            }
        };
        ring.fit(&lens);
        let part = self.part_for(lens.len(), !others);
        let parts: Vec<Part> = lens
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| split(len, part).map(move |(at, len)| Part { buf: b, at, len }))
            .collect();
        let starts: Vec<u64> = want.iter().map(|&i| spans[i].map_or(0, |s| s.0)).collect();
        // Per part, the crc32c of its share of the value once copied (None: not landed whole).
        let mut crcs: Vec<Option<u32>> = vec![None; parts.len()];
        let mut submitted = 0;
        let mut landed = 0;
        while landed < parts.len() {
            let done = match ring
                .step(self.file.as_raw_fd(), &parts, &starts, &mut submitted)
                .await
            {
                Ok(done) => done,
                Err(e) => {
                    tracing::debug!(segment = %self.segment, "direct NVMe read failed: {e}");
                    return out;
                }
            };
            for (p, whole) in done {
                landed += 1;
                if whole {
                    let part = &parts[p];
                    let it = &mut items[want[part.buf]];
                    crcs[p] = Some(ring.copy_part(part, it.op.len, &mut it.dst));
                }
            }
        }
        // Every read is done: the buffers are ours alone again. Each record's header, then its
        // value's crc32c folded from its parts' in order.
        let mut first = 0;
        for (b, &i) in want.iter().enumerate() {
            let count = parts[first..].iter().take_while(|p| p.buf == b).count();
            let mine = first..first + count;
            first += count;
            let len = items[i].op.len;
            let Ok(header_crc) = check(ring.bufs[b].bytes(), expect[i], len) else {
                continue;
            };
            let mut crc = None;
            for p in mine {
                let share = value_share(&parts[p], len);
                if share.is_empty() {
                    continue;
                }
                let Some(c) = crcs[p] else {
                    crc = None;
                    break;
                };
                crc = Some(match crc {
                    None => c,
                    Some(acc) => crc32c_combine(acc, c, share.len()),
                });
            }
            // A value that does not match its header was overwritten under the read.
            out[i] = crc.filter(|&c| c == header_crc);
        }
        self.give_back(ring);
        out
    }

    /// The part size for a request of `records` record reads, `alone` when this process
    /// has no other direct read in flight: a lone record read's, or the file's.
    fn part_for(&self, records: usize, alone: bool) -> u64 {
        match (records, alone) {
            (1, true) => self.lone_part,
            _ => self.part,
        }
    }

    /// An idle ring, preferably one registered with the runtime's poller or not as
    /// `registered` says (whether the request will likely wait through the runtime), or a
    /// new one.
    fn take_ring(&self, registered: bool) -> io::Result<Ring> {
        let pid = std::process::id();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.pid != pid {
                // Made by the parent of this (forked) process: never used here. Dropping them
                // only closes this process's copies of their descriptors.
                idle.rings.clear();
                idle.pid = pid;
            }
            let rings = &mut idle.rings;
            let fit = rings.iter().rposition(|r| r.poll.is_some() == registered);
            if let Some(at) = fit.or(rings.len().checked_sub(1)) {
                return Ok(rings.swap_remove(at));
            }
        }
        Ring::new()
    }

    fn give_back(&self, mut ring: Ring) {
        ring.bufs.retain(|b| b.raw.len() <= KEEP_BUF);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.pid == std::process::id() && idle.rings.len() < IDLE_RINGS {
            idle.rings.push(ring);
        }
    }
}

/// Where the record read for a value at `offset` of `len` bytes starts and how long it is,
/// if it can be read here: the value starts on a block boundary past a header block, and
/// the read lies within the file's `size`.
fn span(offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    if len == 0 || offset < HEAD || !offset.is_multiple_of(NVME_ALIGN) {
        return None;
    }
    let n = HEAD.checked_add(layout::align_up(len, NVME_ALIGN))?;
    let start = offset - HEAD;
    (n <= MAX_READ && start.checked_add(n)? <= size).then_some((start, n))
}

/// Whether a record of a `key_len`-byte key is read this way: its value starts right after
/// the first block (keys up to 4,032 bytes), which is all one read's plan assumes.
pub fn reads_key(key_len: usize) -> bool {
    layout::value_offset(key_len) == HEAD
}

/// Checks a record read (`buf`: its header block, then the value) against what the master
/// said: the header must be whole, name `expect`, and hold a value of `len` bytes starting
/// right after the first block. The header's value crc32c, which the value must match.
fn check(buf: &[u8], expect: ReplicaId, len: u64) -> Result<u32, String> {
    let (h, key) =
        layout::decode_header(&buf[..HEAD as usize]).map_err(|e| format!("header: {e}"))?;
    if h.replica != expect.0 {
        return Err(format!(
            "the record is replica {}, not {}",
            h.replica, expect.0
        ));
    }
    if !reads_key(key.len()) || h.value_len != len {
        return Err(format!(
            "a {}-byte key and a {}-byte value, not a value of {len} after one block",
            key.len(),
            h.value_len
        ));
    }
    Ok(h.value_crc)
}

/// A 4 KiB-aligned buffer an O_DIRECT read lands in.
struct AlignedBuf {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + NVME_ALIGN as usize - 1];
        let at = raw.as_ptr().align_offset(NVME_ALIGN as usize);
        AlignedBuf { raw, at, len }
    }

    /// The first byte's address, made without a reference to the bytes (the kernel may be
    /// writing some of them).
    fn base(&mut self) -> *mut u8 {
        // SAFETY: `at` is within the allocation (it is at most `NVME_ALIGN - 1`).
        unsafe { self.raw.as_mut_ptr().add(self.at) }
    }

    fn fits(&self, len: usize) -> bool {
        self.raw.len() - self.at >= len
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
}

/// One request's io_uring and the buffers its reads land in.
struct Ring {
    /// The ring's registration with the runtime's poller, made the first time a task waits
    /// through the runtime on it. A registered ring's every completion also wakes the poller
    /// (the kernel's commit of each completion calls `__wake_up` on it), which a ring that
    /// only ever waits in the kernel does not need: a 64 KiB read at depth 1 on a `block_on`
    /// caller took 2–3 µs less on an unregistered ring (paired; docs/benchmarks.md), so rings
    /// stay unregistered until then. Declared before `uring`: dropped (deregistered) before
    /// the ring's descriptor closes.
    poll: Option<AsyncFd<RingFd>>,
    uring: IoUring,
    bufs: Vec<AlignedBuf>,
    /// Reads submitted and not yet completed: the kernel may still write into `bufs`.
    in_flight: u32,
    /// Their bytes (counted in [`READS_IN_FLIGHT`] too).
    bytes_in_flight: u64,
}

impl Ring {
    fn new() -> io::Result<Ring> {
        Ok(Ring {
            poll: None,
            uring: IoUring::new(RING_ENTRIES)?,
            bufs: Vec::new(),
            in_flight: 0,
            bytes_in_flight: 0,
        })
    }

    /// Makes buffer `b` fit a read of `lens[b]` bytes.
    fn fit(&mut self, lens: &[u64]) {
        for (b, &len) in lens.iter().enumerate() {
            let len = len as usize;
            match self.bufs.get_mut(b) {
                Some(buf) if buf.fits(len) => buf.len = len,
                Some(buf) => *buf = AlignedBuf::new(len),
                None => self.bufs.push(AlignedBuf::new(len)),
            }
        }
    }

    /// The ring's registration with the runtime's poller, made now if this is the first
    /// wait through the runtime on this ring (from within a task: the runtime's context).
    fn poller(&mut self) -> io::Result<&AsyncFd<RingFd>> {
        if self.poll.is_none() {
            let fd = RingFd(self.uring.as_raw_fd());
            // SAFETY: the descriptor is the ring's, open until the ring is dropped, and the
            // registration is dropped first (`Ring::poll` is declared before `Ring::uring`).
            let poll = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
            self.poll = Some(poll);
        }
        Ok(self.poll.as_ref().expect("registered above"))
    }

    /// Submits the next parts (as many as the ring holds; `submitted` counts those already
    /// submitted), then waits for at least one to land. The parts that landed, and for each
    /// whether all of its bytes did. Buffer `b`'s read starts at `starts[b]` in the file.
    async fn step(
        &mut self,
        fd: i32,
        parts: &[Part],
        starts: &[u64],
        submitted: &mut usize,
    ) -> io::Result<Vec<(usize, bool)>> {
        let before = *submitted;
        while *submitted < parts.len() && self.in_flight < RING_ENTRIES {
            let p = &parts[*submitted];
            let buf = &mut self.bufs[p.buf];
            // SAFETY: `at + len` is within the buffer (`split` covers exactly its length);
            // the address is computed without a reference to the buffer's bytes, parts of
            // which the kernel may be writing already.
            let ptr = unsafe { buf.base().add(p.at as usize) };
            let sqe = opcode::Read::new(types::Fd(fd), ptr, p.len as u32)
                .offset(starts[p.buf] + p.at)
                .build()
                .user_data(*submitted as u64);
            // SAFETY: the part's `len` bytes at `ptr` are owned by this ring and neither freed
            // nor read until the read completes: `in_flight` counts it, and dropping the ring
            // first waits for it (`Drop for Ring`).
            unsafe { self.uring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            self.in_flight += 1;
            self.bytes_in_flight += p.len;
            READS_IN_FLIGHT.fetch_add(p.len, Ordering::Relaxed);
            *submitted += 1;
        }
        let in_task = waits_in_task(self.bytes_in_flight, others_in_flight(self.bytes_in_flight));
        if *submitted > before {
            // Waiting here: one system call submits and waits.
            let wait = usize::from(!in_task);
            self.uring.submit_and_wait(wait)?;
        }
        loop {
            let done: Vec<(usize, bool)> = self
                .uring
                .completion()
                .map(|cqe| {
                    let p = cqe.user_data() as usize;
                    let whole = parts
                        .get(p)
                        .is_some_and(|part| u64::try_from(cqe.result()).ok() == Some(part.len));
                    (p, whole)
                })
                .collect();
            if !done.is_empty() {
                self.in_flight -= done.len() as u32;
                let bytes: u64 = done
                    .iter()
                    .filter_map(|&(p, _)| parts.get(p))
                    .map(|p| p.len)
                    .sum();
                self.bytes_in_flight -= bytes;
                READS_IN_FLIGHT.fetch_sub(bytes, Ordering::Relaxed);
                return Ok(done);
            }
            if !in_task {
                self.uring.submit_and_wait(1)?;
                continue;
            }
            // Edge-triggered: cleared, then the queue is looked at again, so a completion
            // between the look and the clear is not missed (nor one posted before the ring
            // was registered: registering reports a ring already readable).
            let mut ready = self.poller()?.readable().await?;
            ready.clear_ready();
        }
    }

    /// Copies the share of an item's value (of `len` bytes) that landed part `part` holds into
    /// the caller's `dst` (scattered parts, in order); its crc32c.
    fn copy_part(&mut self, part: &Part, len: u64, dst: &mut [&mut [u8]]) -> u32 {
        let share = value_share(part, len);
        if share.is_empty() {
            return 0;
        }
        let buf = &mut self.bufs[part.buf];
        let at = (HEAD as usize) + share.start;
        // SAFETY: the range lies inside the buffer and its bytes have landed; other parts of
        // the buffer may still be written by the kernel, so no reference is formed over it:
        // the copy goes through the raw range (`SharedRange`), which the plan runs before
        // this returns.
        let shared = unsafe {
            SharedRange::new(
                NonNull::new(buf.base().add(at)).expect("non-null"),
                share.len(),
            )
        };
        let mut plan = Plan::default();
        let locals = sub_slices(dst, share).into_iter().map(Local::Into);
        if plan.add(0, shared, locals).is_err() {
            return 0;
        }
        plan.run(1, true)[0]
    }
}

/// A ring's descriptor as the runtime's poller watches it; owned by the ring's `IoUring`,
/// which outlives the registration (`Ring::poll`).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One read of a part of a record: into buffer `buf`, at `at` bytes into the record read.
struct Part {
    buf: usize,
    at: u64,
    len: u64,
}

/// The parts a record read of `len` bytes is cut into: one up to twice `part`, else parts of
/// `part` (a 4 KiB multiple, so each is an O_DIRECT read of its own).
fn split(len: u64, part: u64) -> impl Iterator<Item = (u64, u64)> {
    let part = part.max(NVME_ALIGN);
    let size = if len <= part.saturating_mul(2) {
        len.max(1)
    } else {
        part
    };
    (0..len)
        .step_by(size as usize)
        .map(move |at| (at, size.min(len - at)))
}

/// Which bytes of the value (of `len` bytes, after the first block) part `p` holds.
fn value_share(p: &Part, len: u64) -> Range<usize> {
    let start = p.at.max(HEAD);
    let end = (p.at + p.len).min(HEAD + len);
    if start >= end {
        return 0..0;
    }
    (start - HEAD) as usize..(end - HEAD) as usize
}

/// The sub-slices of the scattered `dst` (in order) that cover bytes `range` of it.
fn sub_slices<'a>(dst: &'a mut [&mut [u8]], range: Range<usize>) -> Vec<&'a mut [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for d in dst.iter_mut() {
        let (s, e) = (at, at + d.len());
        at = e;
        if e <= range.start {
            continue;
        }
        if s >= range.end {
            break;
        }
        let from = range.start.max(s) - s;
        let to = range.end.min(e) - s;
        out.push(&mut d[from..to]);
    }
    out
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        // A request dropped mid-read (its caller gave up): the kernel still writes into the
        // buffers, so wait for its reads (a disk read's time) before freeing them.
        let uring = &mut self.uring;
        if uring.submit_and_wait(self.in_flight as usize).is_ok() {
            let done = uring.completion().count() as u32;
            self.in_flight = self.in_flight.saturating_sub(done);
        }
        if self.in_flight == 0 {
            // All landed: no longer in flight. (Otherwise the count stays high, which only
            // keeps later tasks waiting through the runtime.)
            READS_IN_FLIGHT.fetch_sub(self.bytes_in_flight, Ordering::Relaxed);
        }
        if self.in_flight > 0 {
            // Never freed rather than freed under the kernel's writes.
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use kvpool_proto::{
        crc32c::crc32c,
        layout::{encode_header, RecordHeader},
        ReadOp,
    };

    use super::*;

    fn record(replica: u64, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; layout::record_len(key.len(), value.len() as u64) as usize];
        let h = RecordHeader {
            replica,
            key_len: key.len() as u32,
            value_len: value.len() as u64,
            value_crc: crc32c(value),
        };
        encode_header(&h, key, &mut r);
        let at = layout::value_offset(key.len()) as usize;
        r[at..at + value.len()].copy_from_slice(value);
        r
    }

    #[test]
    fn spans_cover_the_header_block_and_the_padded_value_inside_the_file() {
        assert_eq!(span(4096, 1, 1 << 20), Some((0, 8192)));
        assert_eq!(span(8192, 4096, 1 << 20), Some((4096, 8192)));
        assert_eq!(span(4096, 4097, 1 << 20), Some((0, 12288)));
        assert_eq!(span(0, 10, 1 << 20), None, "no room for a header");
        assert_eq!(span(4100, 10, 1 << 20), None, "not a value start");
        assert_eq!(span(4096, 0, 1 << 20), None, "nothing to read");
        assert_eq!(span(4096, 8192, 8192), None, "past the end of the file");
        assert_eq!(span(u64::MAX - 4095, 1, u64::MAX), None, "no wrap");
        assert_eq!(
            span(4096, MAX_READ, u64::MAX),
            None,
            "too long for one read"
        );
    }

    #[test]
    fn only_a_lone_record_read_is_cut_finer() {
        // The choice looks at no file.
        let any = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        let disk = DiskFile::new(SegmentId(1), any(), 0);
        let lone = disk.part_for(1, true);
        assert_eq!(lone, LONE_PART);
        assert_eq!(
            disk.part_for(4, true),
            PART,
            "a batch overlaps its copies itself"
        );
        assert_eq!(disk.part_for(1, false), PART, "other reads are in flight");
        let never = DiskFile::new(SegmentId(1), any(), 0).with_part(u64::MAX);
        assert_eq!(
            never.part_for(1, true),
            never.part_for(4, true),
            "an explicit part holds"
        );
        // A 1 MiB value's record read (its header block, then the value): five parts when
        // lone, the last the value's final 4 KiB; one read otherwise. A 64 KiB one: one read.
        let rec = HEAD + (1 << 20);
        assert_eq!(split(rec, lone).count(), 5);
        assert_eq!(split(rec, PART).count(), 1);
        assert_eq!(split(HEAD + (64 << 10), lone).count(), 1);
    }

    #[test]
    fn parts_cover_a_record_read_and_shares_cover_its_value() {
        const P: u64 = 256 << 10;
        let cuts: Vec<(u64, u64)> = split(2 * P, P).collect();
        assert_eq!(cuts, vec![(0, 2 * P)], "up to two parts' worth is one read");
        let len = (1 << 20) + 5;
        let read = HEAD + layout::align_up(len, NVME_ALIGN);
        let cuts: Vec<(u64, u64)> = split(read, P).collect();
        assert_eq!(split(read, u64::MAX).count(), 1, "never cut");
        assert_eq!(cuts.len(), 5);
        assert!(cuts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        assert_eq!(cuts.last().map(|c| c.0 + c.1), Some(read));
        let shares: Vec<Range<usize>> = cuts
            .iter()
            .map(|&(at, l)| value_share(&Part { buf: 0, at, len: l }, len))
            .collect();
        assert_eq!(
            shares[0],
            0..(P - HEAD) as usize,
            "the header block is no value"
        );
        assert!(shares.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(shares[4].end, len as usize, "the padding is no value");
        let mut a = [0u8; 4];
        let mut b = [0u8; 6];
        let mut dst: Vec<&mut [u8]> = vec![&mut a, &mut b];
        let lens: Vec<usize> = sub_slices(&mut dst, 2..7).iter().map(|s| s.len()).collect();
        assert_eq!(lens, vec![2, 3]);
        assert!(sub_slices(&mut dst, 4..4).is_empty());
    }

    #[test]
    fn a_record_checks_only_against_its_own_replica_and_length() {
        let r = record(7, b"key", b"value bytes");
        assert_eq!(check(&r, ReplicaId(7), 11), Ok(crc32c(b"value bytes")));
        assert!(check(&r, ReplicaId(8), 11)
            .unwrap_err()
            .contains("replica 7"));
        assert!(check(&r, ReplicaId(7), 10).is_err(), "a partial range");
        let long_key = vec![b'k'; 4033];
        let r = record(7, &long_key, b"v");
        assert!(
            check(&r, ReplicaId(7), 1).is_err(),
            "value past the first block"
        );
        let mut torn = record(7, b"key", b"value");
        torn[20] ^= 1;
        assert!(check(&torn, ReplicaId(7), 5)
            .unwrap_err()
            .contains("header"));
        assert!(
            check(&[0u8; 8192], ReplicaId(7), 5).is_err(),
            "never written"
        );
    }

    #[tokio::test]
    async fn a_request_takes_a_ring_registered_or_not_as_it_will_wait() {
        // This test's body is no task: every wait of its reads is in the kernel.
        assert!(!waits_in_task(u64::MAX, true));
        let in_task = |own, others| async move {
            tokio::spawn(async move { waits_in_task(own, others) })
                .await
                .unwrap()
        };
        assert!(!in_task(INLINE_WAIT_MAX, false).await, "small and alone");
        assert!(in_task(INLINE_WAIT_MAX + 1, false).await, "large");
        assert!(in_task(4096, true).await, "other reads in flight");

        // Two idle rings, one registered: each request gets the kind it asks for while there
        // is one, else any.
        let devnull: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let disk = DiskFile::new(SegmentId(1), devnull, 0);
        let mut a = disk.take_ring(false).unwrap();
        a.poller().unwrap();
        let b = disk.take_ring(false).unwrap();
        assert!(b.poll.is_none(), "a new ring is not registered");
        disk.give_back(a);
        disk.give_back(b);
        let r = disk.take_ring(true).unwrap();
        assert!(r.poll.is_some());
        let u = disk.take_ring(true).unwrap();
        assert!(u.poll.is_none(), "the only one left");
        disk.give_back(r);
        disk.give_back(u);
        assert!(disk.take_ring(false).unwrap().poll.is_none());
        assert!(
            disk.take_ring(false).unwrap().poll.is_some(),
            "the only one left"
        );
    }

    /// A file with records at 0 (replica 1, 64 KiB + 3), 8 KiB... laid out back to back;
    /// opened without O_DIRECT (the test folder may be tmpfs), which reads the same bytes.
    #[tokio::test]
    async fn records_are_read_checked_and_the_rest_left_to_the_node() {
        let dir = std::env::temp_dir().join(format!("kvpool-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tier.dat");
        // The third is cut into five parts, read at once, copied across the caller's three
        // uneven buffers.
        let values: Vec<Vec<u8>> = [65_539usize, 1, (1 << 20) + 5, 300_000]
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n).map(|i| (i * 31 + s * 7) as u8).collect())
            .collect();
        let mut file = std::fs::File::create(&path).unwrap();
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for (i, v) in values.iter().enumerate() {
            let r = record(i as u64 + 1, format!("key-{i}").as_bytes(), v);
            file.write_all(&r).unwrap();
            offsets.push(at + HEAD);
            at += r.len() as u64;
        }
        file.write_all(&[0u8; 8192]).unwrap();
        drop(file);
        let fd: OwnedFd = std::fs::File::open(&path).unwrap().into();
        // Parts of 256 KiB, so that the 1 MiB value is read in five.
        let disk =
            std::sync::Arc::new(DiskFile::new(SegmentId(3), fd, at + 8192).with_part(256 << 10));

        // Every record, the third split over two parts, the last expecting another replica,
        // one item pointing at the empty blocks past the records.
        let mut bufs: Vec<Vec<u8>> = values.iter().map(|v| vec![0u8; v.len()]).collect();
        let mut blank = vec![0u8; 100];
        let [b0, b1, b2, b3] = &mut bufs[..] else {
            unreachable!()
        };
        let (t1, rest) = b2.split_at_mut(1000);
        let (t2, t3) = rest.split_at_mut(299_000);
        let op = |i: usize| ReadOp {
            segment: SegmentId(3),
            offset: offsets[i],
            len: values[i].len() as u64,
        };
        let mut items = vec![
            ReadItem::new(op(0), b0),
            ReadItem::new(op(1), b1),
            ReadItem {
                op: op(2),
                dst: vec![t1, t2, t3],
            },
            ReadItem::new(op(3), b3),
            ReadItem::new(
                ReadOp {
                    segment: SegmentId(3),
                    offset: at + 4096,
                    len: 100,
                },
                &mut blank,
            ),
        ];
        let expect = [1, 2, 3, 5, 9].map(ReplicaId);
        let got = disk.read(&mut items, &expect).await;
        drop(items);
        assert_eq!(
            got,
            vec![
                Some(crc32c(&values[0])),
                Some(crc32c(&values[1])),
                Some(crc32c(&values[2])),
                None,
                None
            ]
        );
        for i in 0..3 {
            assert!(bufs[i] == values[i], "value {i} byte for byte");
        }
        let registered = |disk: &DiskFile| -> Vec<bool> {
            let idle = disk.idle.lock().unwrap();
            idle.rings.iter().map(|r| r.poll.is_some()).collect()
        };
        assert_eq!(
            registered(&disk),
            vec![false],
            "a ring only ever waited on in the kernel stays off the runtime's poller"
        );

        // From a runtime task, which waits on the ring's readiness instead of in the kernel
        // (this test's body runs on the thread that blocks on it).
        let (d, want) = (disk.clone(), values[2].clone());
        let offset = offsets[2];
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; want.len()];
            let op = ReadOp {
                segment: SegmentId(3),
                offset,
                len: want.len() as u64,
            };
            let mut items = vec![ReadItem::new(op, &mut buf)];
            let got = d.read(&mut items, &[ReplicaId(3)]).await;
            drop(items);
            (got, buf == want)
        });
        assert_eq!(task.await.unwrap(), (vec![Some(crc32c(&values[2]))], true));

        // Twice more (the ring and its buffers come back from the idle list), then a record
        // overwritten in place: its value no longer matches its header.
        for _ in 0..2 {
            let mut buf = vec![0u8; values[0].len()];
            let mut items = vec![ReadItem::new(op(0), &mut buf)];
            assert_eq!(
                disk.read(&mut items, &[ReplicaId(1)]).await,
                vec![Some(crc32c(&values[0]))]
            );
        }
        // A read dropped after its first poll (its caller gave up; whether its read was still
        // in flight depends on the page cache here): the next read works.
        let mut buf = vec![0u8; values[3].len()];
        let mut items = vec![ReadItem::new(op(3), &mut buf)];
        let expect = [ReplicaId(4)];
        let read = disk.read(&mut items, &expect);
        let _ = tokio::time::timeout(std::time::Duration::ZERO, read).await;
        drop(items);
        let mut buf = vec![0u8; values[3].len()];
        let mut items = vec![ReadItem::new(op(3), &mut buf)];
        assert_eq!(
            disk.read(&mut items, &[ReplicaId(4)]).await,
            vec![Some(crc32c(&values[3]))]
        );
        drop(items);
        assert!(buf == values[3]);

        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"garbage", offsets[0] + 100).unwrap();
        let mut buf = vec![0u8; values[0].len()];
        let mut items = vec![ReadItem::new(op(0), &mut buf)];
        assert_eq!(disk.read(&mut items, &[ReplicaId(1)]).await, vec![None]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
