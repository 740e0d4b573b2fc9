//! Where a same-host NVMe get's disk time goes: the reader of a node's tier file
//! (`kvpool_transport::shm::DiskFile`: one O_DIRECT read of each record on an io_uring, the
//! value copied into the caller's buffer with its crc32c and checked against the header),
//! its record reads cut into parts of 256 KiB (each copied as it lands) or not (the default up
//! to 16 MiB), against
//! a plain `pread` of the same record into an aligned buffer (the device alone, no copy and
//! no check), the crc32c of the values a bare io_uring read has just landed (what the first
//! touch of bytes a device wrote costs, which the reader's copy pays), and the copy and
//! crc32c alone of bytes in cache, each timed over the same records in a shuffled
//! order, alternating, one read at a time, the reader on a runtime task (an async caller) or,
//! with `block-on`, on the thread that blocks on it (as the Python binding drives a client).
//! With `batch=N`, N records per request instead (a batched get), beside the same N record
//! reads submitted together on a bare io_uring and waited for all at once (the device's time
//! for that pattern; the `pread` column is then left empty).
//! `cargo run --release -p kvpool-benches --example disk_read -- SIZE COUNT DIR [block-on] [batch=N]`

use std::{
    os::unix::fs::{FileExt, OpenOptionsExt},
    sync::Arc,
    time::{Duration, Instant},
};

use kvpool_proto::{
    crc32c::crc32c,
    layout::{encode_header, record_len, value_offset, RecordHeader},
    ReadOp, ReplicaId, SegmentId,
};
use kvpool_transport::{engine::ReadItem, shm::DiskFile};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let size: usize = a.get(1).map_or(Ok(1 << 20), |s| s.parse())?;
    let count: usize = a.get(2).map_or(Ok(256), |s| s.parse())?;
    let dir = std::path::PathBuf::from(a.get(3).map_or("target", String::as_str));
    let flags = a.get(4..).unwrap_or_default();
    let on_task = !flags.iter().any(|m| m == "block-on");
    let batch: usize = match flags.iter().find_map(|m| m.strip_prefix("batch=")) {
        Some(n) => n.parse()?,
        None => 1,
    };
    anyhow::ensure!(
        (1..=64).contains(&batch),
        "batch=N: 1 to 64 records per request"
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("disk-read-{}.dat", std::process::id()));
    let key = b"disk-read-key";
    let rec = record_len(key.len(), size as u64);
    let value: Vec<u8> = (0..size).map(|i| (i * 131 % 251) as u8).collect();
    let mut block = vec![0u8; rec as usize];
    {
        let f = std::fs::File::create(&path)?;
        for i in 0..count as u64 {
            let h = RecordHeader {
                replica: i + 1,
                key_len: key.len() as u32,
                value_len: size as u64,
                value_crc: crc32c(&value),
            };
            block.fill(0);
            encode_header(&h, key, &mut block);
            let at = value_offset(key.len()) as usize;
            block[at..at + size].copy_from_slice(&value);
            f.write_all_at(&block, i * rec)?;
        }
        f.sync_all()?;
    }
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
    };
    let total = rec * count as u64;
    let cut = Arc::new(DiskFile::new(SegmentId(1), open()?.into(), total).with_part(256 << 10));
    let whole = Arc::new(DiskFile::new(SegmentId(1), open()?.into(), total));
    let raw = open()?;
    // One destination per record of a request, written before the clock starts.
    let mut dsts = vec![vec![1u8; size]; batch];
    let mut device = Device::new(rec, batch, value_offset(key.len()) as usize, size)?;
    // Records in a fixed shuffled order, the same for every mode.
    let order: Vec<u64> = (0..count as u64)
        .map(|i| (i * 7919) % count as u64)
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "{} records of {size} B on {}: median per read",
        count,
        dir.display()
    );
    println!(
        "round | pread (device) | io_uring, {batch} at once (device) | DiskFile, 256 KiB parts | DiskFile (defaults: a lone record read over 512 KiB in 256 KiB parts, else one read up to 16 MiB) | crc32c of what the device just wrote (first touch) | copy, then crc32c (in cache)"
    );
    for round in 0..5 {
        // Request by request, every mode in turn, so the disk's drift (large on this
        // machine's virtual disk) falls on every column alike.
        let mut t_raw = Vec::new();
        let mut t_ring = Vec::new();
        let mut t_touch = Vec::new();
        let mut times = [Vec::new(), Vec::new()];
        for chunk in order.chunks(batch) {
            if batch == 1 {
                t_raw.push(device.pread(&raw, chunk[0] * rec)?);
            }
            let offsets: Vec<u64> = chunk.iter().map(|&i| i * rec).collect();
            t_ring.push(device.read(&raw, &offsets)?);
            t_touch.push(device.first_touch(chunk.len()));
            let ops: Vec<ReadOp> = chunk
                .iter()
                .map(|&i| ReadOp {
                    segment: SegmentId(1),
                    offset: i * rec + value_offset(key.len()),
                    len: size as u64,
                })
                .collect();
            let expect: Vec<ReplicaId> = chunk.iter().map(|&i| ReplicaId(i + 1)).collect();
            for (m, disk) in [&cut, &whole].into_iter().enumerate() {
                let (ops, expect) = (ops.clone(), expect.clone());
                let disk = disk.clone();
                let mut d = std::mem::take(&mut dsts);
                let read = async move {
                    let t = Instant::now();
                    let mut items: Vec<ReadItem<'_>> = ops
                        .iter()
                        .zip(d.iter_mut())
                        .map(|(op, dst)| ReadItem::new(*op, dst))
                        .collect();
                    let got = disk.read(&mut items, &expect).await;
                    drop(items);
                    (got, t.elapsed(), d)
                };
                // On a runtime task (an async caller), or on the `block_on` thread (as the
                // Python binding drives the client).
                let (got, took, d) = if on_task {
                    rt.block_on(rt.spawn(read))?
                } else {
                    rt.block_on(read)
                };
                dsts = d;
                times[m].push(took);
                anyhow::ensure!(
                    got.iter().all(|&c| c == Some(crc32c(&value))),
                    "records {chunk:?}: {got:?}"
                );
            }
        }
        anyhow::ensure!(dsts.iter().all(|d| *d == value), "wrong bytes");
        let dst = &mut dsts[0];
        let mut t_copy = Vec::new();
        for _ in &order {
            let t = Instant::now();
            dst.copy_from_slice(device.value(0));
            std::hint::black_box(crc32c(dst));
            t_copy.push(t.elapsed());
        }
        println!(
            "{round} | {} | {:?} | {:?} | {:?} | {:?} | {:?}",
            if batch == 1 {
                format!("{:?}", median(t_raw))
            } else {
                "–".into()
            },
            median(t_ring),
            median(std::mem::take(&mut times[0])),
            median(std::mem::take(&mut times[1])),
            median(t_touch),
            median(t_copy)
        );
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

/// A bare io_uring and one aligned buffer per record of a request: the device's time for a
/// request's record reads submitted together and waited for together, nothing else.
struct Device {
    ring: io_uring::IoUring,
    buf: Vec<u8>,
    skew: usize,
    rec: usize,
    /// Where a record's value lies in it.
    value: std::ops::Range<usize>,
}

impl Device {
    /// For records of `rec` bytes whose values of `size` bytes start `at` bytes in.
    fn new(rec: u64, batch: usize, at: usize, size: usize) -> anyhow::Result<Device> {
        let rec = rec as usize;
        let buf = vec![0u8; rec * batch + 4096];
        let skew = buf.as_ptr().align_offset(4096);
        Ok(Device {
            ring: io_uring::IoUring::new(64)?,
            buf,
            skew,
            rec,
            value: at..at + size,
        })
    }

    /// Reads the record at `at` into the first record's buffer with a plain `pread`; how long
    /// it took.
    fn pread(&mut self, file: &std::fs::File, at: u64) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let rec = self.rec;
        file.read_exact_at(&mut self.buf[self.skew..][..rec], at)?;
        Ok(t.elapsed())
    }

    /// The `k`th record's value, as the last read left it.
    fn value(&self, k: usize) -> &[u8] {
        &self.buf[self.skew + k * self.rec..][self.value.clone()]
    }

    /// How long the crc32c of the values of the first `records` records takes, their bytes
    /// as the last read left them.
    fn first_touch(&self, records: usize) -> Duration {
        let t = Instant::now();
        for k in 0..records {
            std::hint::black_box(crc32c(self.value(k)));
        }
        t.elapsed()
    }

    /// Reads a record at each of `offsets` (at most the batch) at once; how long it took.
    fn read(&mut self, file: &std::fs::File, offsets: &[u64]) -> anyhow::Result<Duration> {
        let fd = io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(file));
        let t = Instant::now();
        for (k, &at) in offsets.iter().enumerate() {
            let dst = self.buf[self.skew + k * self.rec..][..self.rec].as_mut_ptr();
            let sqe = io_uring::opcode::Read::new(fd, dst, self.rec as u32)
                .offset(at)
                .build();
            // SAFETY: each read lands in its own `rec` bytes of `buf`, which nothing else
            // touches and which outlives the wait below for every read submitted here.
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| anyhow::anyhow!("submission queue full"))?;
        }
        self.ring.submit_and_wait(offsets.len())?;
        let took = t.elapsed();
        for cqe in self.ring.completion() {
            anyhow::ensure!(
                cqe.result() == self.rec as i32,
                "record read: {}",
                cqe.result()
            );
        }
        Ok(took)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
