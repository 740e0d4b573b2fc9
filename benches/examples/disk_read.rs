//! Where a same-host NVMe get's disk time goes: the reader of a node's tier file
//! (`kvpool_transport::shm::DiskFile`: one O_DIRECT read of each record on an io_uring, the
//! value copied into the caller's buffer with its crc32c and checked against the header),
//! its record reads cut into parts of 256 KiB (each copied as it lands) or not (the default up
//! to 16 MiB), against
//! a plain `pread` of the same record into an aligned buffer (the device alone, no copy and
//! no check), and the copy and crc32c alone, each timed over the same records in a shuffled
//! order, alternating, one read at a time, the reader on a runtime task (an async caller) or,
//! with `block-on`, on the thread that blocks on it (as the Python binding drives a client).
//! `cargo run --release -p kvpool-benches --example disk_read -- SIZE COUNT DIR [block-on]`

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
    let on_task = a.get(4).is_none_or(|m| m != "block-on");
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
    let mut aligned = vec![0u8; rec as usize + 4096];
    let skew = aligned.as_ptr().align_offset(4096);
    let mut dst = vec![0u8; size];
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
        "round | pread (device) | DiskFile, 256 KiB parts | DiskFile (one read up to 16 MiB) | copy, then crc32c"
    );
    for round in 0..5 {
        let mut t_raw = Vec::new();
        for &i in &order {
            let t = Instant::now();
            raw.read_exact_at(&mut aligned[skew..skew + rec as usize], i * rec)?;
            t_raw.push(t.elapsed());
        }
        let mut times = [Vec::new(), Vec::new()];
        for (m, disk) in [&cut, &whole].into_iter().enumerate() {
            for &i in &order {
                let op = ReadOp {
                    segment: SegmentId(1),
                    offset: i * rec + value_offset(key.len()),
                    len: size as u64,
                };
                let disk = disk.clone();
                let mut d = std::mem::take(&mut dst);
                let read = async move {
                    let t = Instant::now();
                    let mut items = vec![ReadItem::new(op, &mut d)];
                    let got = disk.read(&mut items, &[ReplicaId(i + 1)]).await;
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
                dst = d;
                times[m].push(took);
                anyhow::ensure!(got == vec![Some(crc32c(&value))], "record {i}: {got:?}");
            }
        }
        anyhow::ensure!(dst == value, "wrong bytes");
        let mut t_copy = Vec::new();
        for _ in &order {
            let t = Instant::now();
            dst.copy_from_slice(&aligned[skew + 4096..skew + 4096 + size]);
            std::hint::black_box(crc32c(&dst));
            t_copy.push(t.elapsed());
        }
        println!(
            "{round} | {:?} | {:?} | {:?} | {:?}",
            median(t_raw),
            median(std::mem::take(&mut times[0])),
            median(std::mem::take(&mut times[1])),
            median(t_copy)
        );
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
