//! The NVMe tier against real files opened O_DIRECT: round trips at several sizes, ranges,
//! restart recovery, corruption, torn records, a tier too small, and device faults. Every
//! test runs once per I/O engine.

mod common;

use std::{
    fs::OpenOptions,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
};

use common::pattern;
use kvpool_proto::{ByteSize, ErrorCode};
use kvpool_store::nvme::{
    record_len, value_offset, AlignedBuf, IoEngine, IoEngineKind, IoFuture, NvmeConfig, NvmeError,
    NvmeTier,
};

const TMPFS_MAGIC: i64 = 0x0102_1994;

fn is_tmpfs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed local through a valid pointer; c is NUL-terminated.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == TMPFS_MAGIC
    }
}

/// A fresh folder on a disk-backed filesystem (O_DIRECT on tmpfs needs Linux 6.6 and
/// measures nothing real), removed when the test passes; kept for a look when it fails.
fn test_dir(name: &str, engine: IoEngineKind) -> TestDir {
    let candidates = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ];
    let base = candidates
        .iter()
        .find(|p| std::fs::create_dir_all(p).is_ok() && !is_tmpfs(p))
        .cloned()
        .unwrap_or_else(|| {
            eprintln!("no disk-backed temp folder; using tmpfs");
            candidates[0].clone()
        });
    let dir = base
        .join("nvme-tests")
        .join(format!("{name}-{engine:?}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TestDir(dir)
}

struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn config(dir: &Path, size: u64, engine: IoEngineKind) -> NvmeConfig {
    NvmeConfig {
        path: dir.join("tier"),
        size: ByteSize(size),
        engine,
        queue_depth: 16,
        index_dir: None,
        staging: ByteSize::mib(8),
        // Large values' reads split into parts (the default reads them whole), so the tests
        // cover the parts' checksums and a tear in a later part.
        read_parts: 8,
    }
}

fn open(cfg: &NvmeConfig) -> (NvmeTier, Vec<kvpool_store::nvme::NvmeRecordInfo>) {
    let (tier, recs) = NvmeTier::open(cfg.clone()).unwrap();
    let want = match cfg.engine {
        IoEngineKind::Uring => "uring",
        IoEngineKind::Psync => "psync",
    };
    if tier.engine_name() != want {
        eprintln!(
            "WARNING: asked for {want}, got {} (io_uring unavailable here)",
            tier.engine_name()
        );
    }
    (tier, recs)
}

/// Records laid out back to back from offset 0, as the master's allocator might.
struct Layout {
    next: u64,
}

impl Layout {
    fn place(&mut self, key: &[u8], len: usize) -> u64 {
        let at = self.next;
        self.next += record_len(key.len(), len as u64);
        at
    }
}

/// Writes records "a" (replica 1) and "b" (replica 2) back to back into the tier at `cfg`,
/// then closes it; returns where each record starts.
async fn write_a_and_b(cfg: &NvmeConfig, a: &[u8], b: &[u8]) -> (u64, u64) {
    let mut l = Layout { next: 0 };
    let (at_a, at_b) = (l.place(b"a", a.len()), l.place(b"b", b.len()));
    let (tier, _) = open(cfg);
    tier.write_record(at_a, 1, b"a", a, kvpool_proto::crc32c::crc32c(a))
        .await
        .unwrap();
    tier.write_record(at_b, 2, b"b", b, kvpool_proto::crc32c::crc32c(b))
        .await
        .unwrap();
    (at_a, at_b)
}

/// Flips one byte of the tier file behind the tier's back (buffered; O_DIRECT reads flush
/// the page cache of the range first).
fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

fn zero(path: &Path, at: u64, len: usize) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len], at).unwrap();
    f.sync_all().unwrap();
}

async fn round_trip_at_several_sizes(engine: IoEngineKind) {
    let dir = test_dir("round-trip", engine);
    let cfg = config(&dir, 64 << 20, engine);
    let (tier, recs) = open(&cfg);
    assert!(recs.is_empty());
    assert_eq!(tier.capacity(), 64 << 20);
    let mut l = Layout { next: 0 };
    let sizes = [1usize, 4096, (1 << 20) + 3, 16 << 20];
    let mut placed = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let key = format!("key-{i}-{len}").into_bytes();
        let v = pattern(i as u64, len);
        let at = l.place(&key, len);
        tier.write_record(at, i as u64 + 1, &key, &v, kvpool_proto::crc32c::crc32c(&v))
            .await
            .unwrap();
        placed.push((at, key, v));
    }
    // A value that does not match its checksum never reaches the extent, whatever its size.
    for (at, key, v) in &placed {
        let crc = kvpool_proto::crc32c::crc32c(v) ^ 1;
        let e = tier.write_record(*at, 99, key, v, crc).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ChecksumMismatch, "{e}");
    }
    for (at, key, v) in &placed {
        let len = v.len() as u64;
        let got = tier
            .read_value(*at, key.len(), len, (0, len))
            .await
            .unwrap();
        assert!(
            got.to_vec()[..] == v[..],
            "whole value of {len} bytes differs"
        );
        let mut ranges = vec![(0, 1), (len - 1, 1), (len / 3, len / 3 + 1)];
        if len > 8192 {
            ranges.extend([(4095, 8193), (4096, 4096), (len - 5000, 5000)]);
        }
        for (s, n) in ranges {
            let got = tier.read_value(*at, key.len(), len, (s, n)).await.unwrap();
            assert!(
                got.to_vec()[..] == v[s as usize..(s + n) as usize],
                "range {s}+{n} of {len}"
            );
            let mut dst = vec![0u8; n as usize];
            tier.read_value_into(*at, key.len(), len, (s, n), &mut dst)
                .await
                .unwrap();
            assert!(dst[..] == v[s as usize..(s + n) as usize]);
        }
        let empty = tier
            .read_value(*at, key.len(), len, (len, 0))
            .await
            .unwrap();
        assert!(empty.is_empty());
        let e = tier
            .read_value(*at, key.len(), len, (len, 1))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    }
    assert_eq!(tier.records().len(), 4);
    assert!(tier.healthy());
}

async fn reopen_finds_records_and_serves_them(engine: IoEngineKind) {
    let dir = test_dir("reopen", engine);
    let cfg = config(&dir, 16 << 20, engine);
    let mut l = Layout { next: 0 };
    let vals: Vec<(u64, Vec<u8>, Vec<u8>)> = (0..5u64)
        .map(|i| {
            let key = format!("object/{i}").into_bytes();
            let v = pattern(i, 1000 + i as usize * 70_000);
            (l.place(&key, v.len()), key, v)
        })
        .collect();
    let before;
    {
        let (tier, _) = open(&cfg);
        for (i, (at, key, v)) in vals.iter().enumerate() {
            tier.write_record(*at, 100 + i as u64, key, v, kvpool_proto::crc32c::crc32c(v))
                .await
                .unwrap();
        }
        tier.remove(103).unwrap();
        tier.remove(999).unwrap(); // unknown: ignored
        before = tier.get(101).unwrap().last_access_ms;
        // Touches land in the index on drop; touch until the millisecond clock has moved.
        while tier.get(101).unwrap().last_access_ms == before {
            tier.touch(101);
        }
    }
    let (tier, recs) = open(&cfg);
    let ids: Vec<u64> = recs.iter().map(|r| r.replica).collect();
    assert_eq!(ids, [100, 101, 102, 104]);
    for r in &recs {
        let i = (r.replica - 100) as usize;
        let (at, key, v) = &vals[i];
        assert_eq!((r.offset, &r.key, r.value_len), (*at, key, v.len() as u64));
        assert_eq!(r.checksum, kvpool_proto::crc32c::crc32c(v));
        assert_eq!(r.value_start(), at + value_offset(key.len()));
        let got = tier
            .read_value(r.offset, r.key.len(), r.value_len, (0, r.value_len))
            .await
            .unwrap();
        assert!(got.to_vec()[..] == v[..]);
    }
    assert!(recs[1].last_access_ms > before, "touch was persisted");
}

async fn corrupt_value_is_detected_and_dropped(engine: IoEngineKind) {
    let dir = test_dir("corrupt-value", engine);
    let cfg = config(&dir, 8 << 20, engine);
    let key = b"k1";
    let v = pattern(7, 300_000);
    {
        let (tier, _) = open(&cfg);
        tier.write_record(0, 1, key, &v, kvpool_proto::crc32c::crc32c(&v))
            .await
            .unwrap();
    }
    flip(&cfg.path, value_offset(key.len()) + 123_456);
    let (tier, recs) = open(&cfg);
    assert_eq!(recs.len(), 1, "the header is intact");
    let len = v.len() as u64;
    let e = tier
        .read_value(0, key.len(), len, (0, len))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), ErrorCode::ChecksumMismatch, "{e}");
    assert!(tier.get(1).is_none(), "the corrupt record left the index");
    assert!(tier.healthy(), "one bad record is not a bad device");
    drop(tier);
    let (_tier, recs) = open(&cfg);
    assert!(recs.is_empty(), "and stays out after a restart");
}

async fn corrupt_header_is_dropped_at_open(engine: IoEngineKind) {
    let dir = test_dir("corrupt-header", engine);
    let cfg = config(&dir, 8 << 20, engine);
    let (a, b) = (pattern(1, 5000), pattern(2, 5000));
    let (_, at_b) = write_a_and_b(&cfg, &a, &b).await;
    flip(&cfg.path, at_b + 20); // inside the header's replica field
    let (tier, recs) = open(&cfg);
    assert_eq!(recs.iter().map(|r| r.replica).collect::<Vec<_>>(), [1]);
    // A read of the dropped record's bytes never returns them.
    let e = tier
        .read_value(at_b, 1, b.len() as u64, (0, b.len() as u64))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), ErrorCode::ChecksumMismatch, "{e}");
}

async fn torn_records_are_dropped_or_detected(engine: IoEngineKind) {
    let dir = test_dir("torn", engine);
    let cfg = config(&dir, 8 << 20, engine);
    // Over 512 KiB each: a whole read is split into parts, and the tear is in the last one.
    let (a, b) = (pattern(3, 1_100_000), pattern(4, 1_100_000));
    let (at_a, at_b) = write_a_and_b(&cfg, &a, &b).await;
    // As if the device had acknowledged a flush it never did: a's bytes never landed at all,
    // b's header did but the tail of its value did not.
    zero(&cfg.path, at_a, record_len(1, a.len() as u64) as usize);
    zero(&cfg.path, at_b + value_offset(1) + 1_000_000, 50_000);
    let (tier, recs) = open(&cfg);
    assert_eq!(recs.iter().map(|r| r.replica).collect::<Vec<_>>(), [2]);
    let len = b.len() as u64;
    let e = tier.read_value(at_b, 1, len, (0, len)).await.err().unwrap();
    assert_eq!(e.code(), ErrorCode::ChecksumMismatch, "{e}");
}

async fn tier_too_small_and_bad_requests_are_refused(engine: IoEngineKind) {
    let dir = test_dir("tiny", engine);
    let cfg = config(&dir, 8192, engine);
    let (tier, _) = open(&cfg);
    assert_eq!(tier.capacity(), 8192);
    let one = [7u8];
    let crc = kvpool_proto::crc32c::crc32c(&one);
    tier.write_record(0, 1, b"k", &one, crc).await.unwrap();
    let e = tier
        .write_record(4096, 2, b"k", &one, crc)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::OutOfRange, "{e}");
    assert!(e.to_string().contains("does not fit"), "{e}");
    let big = pattern(1, 8192);
    let e = tier
        .write_record(0, 3, b"k", &big, kvpool_proto::crc32c::crc32c(&big))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::OutOfRange, "{e}");
    let e = tier
        .write_record(100, 4, b"k", &one, crc)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    let e = tier.write_record(0, 5, b"", &one, crc).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    let e = tier
        .write_record(0, 6, b"k", &one, crc ^ 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::ChecksumMismatch, "{e}");
    let e = tier.read_value(4096, 1, 4097, (0, 1)).await.err().unwrap();
    assert_eq!(e.code(), ErrorCode::OutOfRange, "{e}");
    let e = tier.read_value(0, 1, u64::MAX, (0, 1)).await.err().unwrap();
    assert_eq!(e.code(), ErrorCode::OutOfRange, "{e}");
    assert!(tier.healthy(), "bad requests are not device faults");
    let got = tier.read_value(0, 1, 1, (0, 1)).await.unwrap();
    assert_eq!(&got.to_vec()[..], &one, "the acknowledged record is intact");
}

async fn overlapping_record_replaces_the_old_one(engine: IoEngineKind) {
    let dir = test_dir("overlap", engine);
    let cfg = config(&dir, 8 << 20, engine);
    let (tier, _) = open(&cfg);
    let a = pattern(1, 20_000);
    tier.write_record(0, 1, b"a", &a, kvpool_proto::crc32c::crc32c(&a))
        .await
        .unwrap();
    let b = pattern(2, 10);
    tier.write_record(8192, 2, b"b", &b, kvpool_proto::crc32c::crc32c(&b))
        .await
        .unwrap();
    assert!(tier.get(1).is_none(), "overwritten");
    assert_eq!(tier.records().len(), 1);
}

async fn concurrent_writes_are_all_committed(engine: IoEngineKind) {
    let dir = test_dir("concurrent", engine);
    let cfg = config(&dir, 64 << 20, engine);
    let mut l = Layout { next: 0 };
    let items: Vec<(u64, Vec<u8>, Vec<u8>)> = (0..48u64)
        .map(|i| {
            let key = format!("c{i}").into_bytes();
            let v = pattern(i, 1 + (i as usize * 37_813) % 600_000);
            (l.place(&key, v.len()), key, v)
        })
        .collect();
    {
        let (tier, _) = open(&cfg);
        let writes = items.iter().enumerate().map(|(i, (at, k, v))| {
            let tier = &tier;
            async move {
                tier.write_record(*at, i as u64, k, v, kvpool_proto::crc32c::crc32c(v))
                    .await
            }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    }
    let (tier, recs) = open(&cfg);
    assert_eq!(recs.len(), items.len());
    let reads = recs.iter().map(|r| {
        let tier = &tier;
        async move {
            tier.read_value(r.offset, r.key.len(), r.value_len, (0, r.value_len))
                .await
        }
    });
    for (r, got) in recs.iter().zip(futures::future::join_all(reads).await) {
        assert!(got.unwrap().to_vec()[..] == items[r.replica as usize].2[..]);
    }
}

const OK: u8 = 0;
const WRITE_EIO: u8 = 1;
const WRITE_ENOSPC: u8 = 2;
const SHORT_READ: u8 = 3;
const SYNC_EIO: u8 = 4;

/// Wraps an engine and fails what `mode` says.
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn IoEngine>,
    mode: Arc<AtomicU8>,
}

fn failed(buf: AlignedBuf, e: io::Error) -> IoFuture {
    Box::pin(std::future::ready((buf, Err(e))))
}

impl IoEngine for Faulty {
    fn read(&self, buf: AlignedBuf, offset: u64) -> IoFuture {
        match self.mode.load(Ordering::SeqCst) {
            SHORT_READ => failed(
                buf,
                io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"),
            ),
            _ => self.inner.read(buf, offset),
        }
    }
    fn write(&self, buf: AlignedBuf, offset: u64) -> IoFuture {
        match self.mode.load(Ordering::SeqCst) {
            WRITE_EIO => failed(buf, io::Error::from_raw_os_error(libc::EIO)),
            WRITE_ENOSPC => failed(buf, io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => self.inner.write(buf, offset),
        }
    }
    fn sync(&self) -> io::Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            SYNC_EIO => Err(io::Error::from_raw_os_error(libc::EIO)),
            _ => self.inner.sync(),
        }
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

fn open_faulty(cfg: &NvmeConfig) -> (NvmeTier, Arc<AtomicU8>) {
    let mode = Arc::new(AtomicU8::new(OK));
    let m = mode.clone();
    let (tier, _) = NvmeTier::open_wrapped(cfg.clone(), move |inner| {
        Arc::new(Faulty { inner, mode: m }) as Arc<dyn IoEngine>
    })
    .unwrap();
    (tier, mode)
}

async fn device_faults_mark_the_tier_unhealthy(engine: IoEngineKind) {
    let dir = test_dir("faults", engine);
    let cfg = config(&dir, 8 << 20, engine);
    let acked = pattern(9, 50_000);
    let crc = kvpool_proto::crc32c::crc32c(&acked);
    let other = pattern(10, 1000);
    let other_crc = kvpool_proto::crc32c::crc32c(&other);
    let at = record_len(1, acked.len() as u64);
    for (mode, code) in [
        (WRITE_EIO, ErrorCode::Io),
        (WRITE_ENOSPC, ErrorCode::NoSpace),
        (SYNC_EIO, ErrorCode::Io),
        (SHORT_READ, ErrorCode::Io),
    ] {
        let (tier, m) = open_faulty(&cfg);
        if tier.get(1).is_none() {
            tier.write_record(0, 1, b"a", &acked, crc).await.unwrap();
        }
        m.store(mode, Ordering::SeqCst);
        let e: NvmeError = if mode == SHORT_READ {
            tier.read_value(0, 1, acked.len() as u64, (0, 10))
                .await
                .err()
                .unwrap()
        } else {
            tier.write_record(at, 2, b"b", &other, other_crc)
                .await
                .unwrap_err()
        };
        assert_eq!(e.code(), code, "mode {mode}: {e}");
        assert!(!tier.healthy(), "mode {mode}");
        assert!(tier.unhealthy_reason().is_some());
        assert!(tier.get(2).is_none(), "a failed write is not indexed");
        m.store(OK, Ordering::SeqCst);
        let e = tier
            .write_record(at, 3, b"c", &other, other_crc)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(e.to_string().contains("unhealthy"), "{e}");
        // Reads are still tried, and what was acknowledged is intact.
        let len = acked.len() as u64;
        let got = tier.read_value(0, 1, len, (0, len)).await.unwrap();
        assert!(got.to_vec()[..] == acked[..], "mode {mode}");
    }
    // A reopened tier is healthy and has exactly the acknowledged record.
    let (tier, recs) = open(&cfg);
    assert!(tier.healthy());
    assert_eq!(recs.iter().map(|r| r.replica).collect::<Vec<_>>(), [1]);
}

async fn real_enospc_when_the_filesystem_is_full(engine: IoEngineKind) {
    // A size-limited, O_DIRECT-capable filesystem cannot be made without privileges; point
    // KVPOOL_TEST_SMALL_FS at one (e.g. a small tmpfs on Linux >= 6.6, or a loop ext4).
    // scripts/test.sh mounts a small tmpfs for it where it may (docs/reliability.md).
    let Some(dir) = std::env::var_os("KVPOOL_TEST_SMALL_FS") else {
        kvpool_tests::skipped(
            &format!("nvme real_enospc ({engine:?})"),
            "KVPOOL_TEST_SMALL_FS is not set (a small filesystem; needs root to mount)",
        );
        return;
    };
    let dir = PathBuf::from(dir).join(format!("enospc-{engine:?}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, 1 << 50, engine);
    let err = NvmeTier::open(cfg).err().unwrap();
    assert_eq!(err.code(), ErrorCode::NoSpace, "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn block_device_round_trip(engine: IoEngineKind) {
    // Needs a scratch block device whose contents may be destroyed (e.g. a loop device:
    // `losetup -f --show IMG`); point KVPOOL_TEST_BLOCK_DEVICE at it.
    // scripts/test.sh attaches a loop device for it where it may (docs/reliability.md).
    let Some(dev) = std::env::var_os("KVPOOL_TEST_BLOCK_DEVICE") else {
        kvpool_tests::skipped(
            &format!("nvme block_device_round_trip ({engine:?})"),
            "KVPOOL_TEST_BLOCK_DEVICE is not set (a scratch block device; needs root for a loop device)",
        );
        return;
    };
    let dir = test_dir("blockdev", engine);
    let cfg = NvmeConfig {
        path: PathBuf::from(dev),
        size: ByteSize(0),
        index_dir: Some(dir.join("index")),
        ..config(&dir, 0, engine)
    };
    // The two engines' tests may run at once on the same device: disjoint extents.
    let at: u64 = match engine {
        IoEngineKind::Uring => 0,
        IoEngineKind::Psync => 8 << 20,
    };
    let v = pattern(5, 3 << 20);
    let crc = kvpool_proto::crc32c::crc32c(&v);
    let capacity = {
        let (tier, recs) = open(&cfg);
        assert!(recs.is_empty());
        assert!(
            tier.capacity() >= 16 << 20,
            "use a device of 16 MiB or more"
        );
        tier.write_record(at, 1, b"dev", &v, crc).await.unwrap();
        tier.capacity()
    };
    let (tier, recs) = open(&cfg);
    assert_eq!(tier.capacity(), capacity, "size 0 means the whole device");
    assert_eq!(recs.len(), 1);
    let len = v.len() as u64;
    let got = tier.read_value(at, 3, len, (0, len)).await.unwrap();
    assert!(got.to_vec()[..] == v[..]);
}

macro_rules! for_each_engine {
    ($($name:ident),* $(,)?) => {
        mod uring {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(IoEngineKind::Uring).await
            })*
        }
        mod psync {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(IoEngineKind::Psync).await
            })*
        }
    };
}

for_each_engine!(
    round_trip_at_several_sizes,
    reopen_finds_records_and_serves_them,
    corrupt_value_is_detected_and_dropped,
    corrupt_header_is_dropped_at_open,
    torn_records_are_dropped_or_detected,
    tier_too_small_and_bad_requests_are_refused,
    overlapping_record_replaces_the_old_one,
    concurrent_writes_are_all_committed,
    device_faults_mark_the_tier_unhealthy,
    real_enospc_when_the_filesystem_is_full,
    block_device_round_trip,
);
