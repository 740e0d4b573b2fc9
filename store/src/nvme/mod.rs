//! The NVMe tier: records on a local file or block device, found again after a restart
//! through a per-node RocksDB index.
//!
//! Three layers, one job each (after foyer's split):
//! - [`device`]: where the bytes live, a preallocated file or a block device opened O_DIRECT.
//! - [`engine`]: how I/O is issued, an [`IoEngine`] moving owned aligned buffers: io_uring
//!   with registered buffers on a dedicated thread, or pread/pwrite on worker threads.
//! - [`layout`]: what a record looks like on disk (header with magic, version, key, lengths
//!   and checksums; the value 4 KiB-aligned).
//!
//! On top, `index` keeps replica -> extent in RocksDB, and [`NvmeTier`] ties them together.
//!
//! Space is the master's: it allocates 4 KiB-aligned extents of [`record_len`] bytes in the
//! tier with its own allocator and tells the node where to write. The tier never allocates;
//! it writes the record at the given offset, makes it durable, then indexes it.
//!
//! Durability and integrity: a write is acknowledged only after its bytes are synced and its
//! index entry is durable, and an index entry is never written before its bytes are synced.
//! Concurrent writes share syncs: a sync thread fdatasyncs the device once for every write
//! whose bytes landed, then an index thread writes their entries and syncs RocksDB's WAL
//! once, while the sync thread already syncs the next group. A record whose header does not
//! match its index entry is dropped at open; a value whose crc32c does not match is never
//! returned. An I/O error, a short read or a full disk marks the tier unhealthy: writes are
//! then refused, reads still tried.

pub mod buf;
pub mod device;
pub mod engine;
pub(crate) mod index;
pub mod layout;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    ops::{Deref, Range},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{stream::FuturesUnordered, StreamExt};
use kvpool_proto::{ByteSize, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use buf::{AlignedBuf, BufPool};
pub use device::Device;
pub use engine::{IoEngine, IoEngineKind, IoFuture, IoResult};
pub use layout::{record_len, value_offset, MAX_KEY_LEN, NVME_ALIGN};

use index::Index;
use layout::{align_down, align_up, decode_header, encode_header, RecordHeader};

/// Size of one staging buffer: a 1 MiB value and its header block go out as one write.
pub const STAGING_BUF: usize = 2 << 20;
/// Pieces of one large record written concurrently.
const PIECES_IN_FLIGHT: usize = 8;
/// Touches kept in memory before they are written to the index.
const TOUCH_BATCH: usize = 256;

/// The `[store.nvme]` part of a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NvmeConfig {
    /// File (created and preallocated if missing) or block device holding the records
    /// [required].
    pub path: PathBuf,
    /// Bytes of the tier, rounded down to 4 KiB [0: the whole device; required for a file].
    pub size: ByteSize,
    /// I/O engine: "uring" or "psync" ["uring"; falls back to "psync" with a warning when
    /// io_uring cannot be set up].
    pub engine: IoEngineKind,
    /// Requests in flight on the device: the ring depth, or the psync thread count [64].
    pub queue_depth: u32,
    /// Folder of the RocksDB index [unset: "<path>.index"].
    pub index_dir: Option<PathBuf>,
    /// Memory of the staging buffers (2 MiB each) that values are copied through, registered
    /// with io_uring [64MiB]. When all are busy, buffers are allocated per request.
    pub staging: ByteSize,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            path: PathBuf::new(),
            size: ByteSize(0),
            engine: IoEngineKind::Uring,
            queue_depth: 64,
            index_dir: None,
            staging: ByteSize::mib(64),
        }
    }
}

impl NvmeConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("nvme path is not set".into());
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(format!(
                "nvme queue-depth = {} is out of range (1 to 4096)",
                self.queue_depth
            ));
        }
        if self.staging.0 < STAGING_BUF as u64 {
            return Err(format!(
                "nvme staging = {} is too small (at least 2MiB)",
                self.staging
            ));
        }
        Ok(())
    }

    /// The index folder: as configured, or next to the data.
    pub fn index_dir(&self) -> PathBuf {
        self.index_dir.clone().unwrap_or_else(|| {
            let mut p = self.path.clone().into_os_string();
            p.push(".index");
            PathBuf::from(p)
        })
    }
}

/// Why a tier operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("invalid nvme tier config: {0}")]
    Config(String),
    #[error("invalid nvme request: {0}")]
    InvalidArgument(String),
    #[error("record {offset}+{len} does not fit in the nvme tier of {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("cannot open the nvme tier at {path}: {source}", path = path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("nvme tier full: {0}")]
    NoSpace(String),
    #[error("nvme {op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("short nvme read at offset {offset}: the device ended before {len} bytes (was the file truncated?)")]
    ShortRead { offset: u64, len: u64 },
    #[error(
        "value at offset {offset}: crc32c {actual:#010x}, expected {expected:#010x}; not served"
    )]
    ChecksumMismatch {
        offset: u64,
        expected: u32,
        actual: u32,
    },
    #[error("record at offset {offset} is not the one asked for: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("nvme tier is unhealthy ({0}); writes are refused until it is reopened")]
    Unhealthy(String),
    #[error("nvme index: {0}")]
    Index(String),
}

impl NvmeError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            NvmeError::Config(_) | NvmeError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            NvmeError::OutOfRange { .. } => ErrorCode::OutOfRange,
            NvmeError::NoSpace(_) => ErrorCode::NoSpace,
            NvmeError::Open { source, .. } | NvmeError::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                ErrorCode::NoSpace
            }
            NvmeError::Open { .. }
            | NvmeError::Io { .. }
            | NvmeError::ShortRead { .. }
            | NvmeError::Unhealthy(_)
            | NvmeError::Index(_) => ErrorCode::Io,
            NvmeError::ChecksumMismatch { .. } | NvmeError::Corrupt { .. } => {
                ErrorCode::ChecksumMismatch
            }
        }
    }
}

/// One record the tier holds, as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeRecordInfo {
    pub replica: u64,
    pub key: Vec<u8>,
    /// Start of the record's extent (its header), 4 KiB-aligned.
    pub offset: u64,
    pub value_len: u64,
    /// crc32c of the value.
    pub checksum: u32,
    /// Last write or [`NvmeTier::touch`], in milliseconds since the Unix epoch.
    pub last_access_ms: u64,
}

impl NvmeRecordInfo {
    /// Bytes of the extent the record occupies.
    pub fn record_len(&self) -> u64 {
        record_len(self.key.len(), self.value_len)
    }

    /// Offset of the value on the device.
    pub fn value_start(&self) -> u64 {
        self.offset + value_offset(self.key.len())
    }
}

/// A value (or a range of it) read from the tier: the aligned buffer it was read into, and
/// where in it the requested bytes are.
pub struct ValueBuf {
    buf: AlignedBuf,
    range: Range<usize>,
}

impl ValueBuf {
    /// The buffer and the requested bytes' range in it (to hand the buffer on without a copy).
    pub fn into_parts(self) -> (AlignedBuf, Range<usize>) {
        (self.buf, self.range)
    }
}

impl Deref for ValueBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

/// The NVMe tier of one node.
pub struct NvmeTier {
    shared: Arc<Shared>,
    commit_tx: Option<mpsc::Sender<Commit>>,
    /// The sync stage and the index stage of the commit pipeline.
    committers: Vec<JoinHandle<()>>,
}

struct Shared {
    device: Arc<Device>,
    engine: Arc<dyn IoEngine>,
    pool: BufPool,
    index: Index,
    state: Mutex<State>,
    healthy: AtomicBool,
    cause: Mutex<Option<String>>,
}

#[derive(Default)]
struct State {
    records: HashMap<u64, NvmeRecordInfo>,
    /// Start offset -> replica. Records never overlap (indexing one drops those it overlaps).
    by_offset: BTreeMap<u64, u64>,
    /// Replicas being written; true once removed mid-write, so the commit does not index them.
    pending: HashMap<u64, bool>,
    /// Replicas whose last access changed since it was last written to the index.
    touched: HashSet<u64>,
}

impl State {
    fn insert(&mut self, info: NvmeRecordInfo) {
        self.remove(info.replica);
        self.by_offset.insert(info.offset, info.replica);
        self.records.insert(info.replica, info);
    }

    fn remove(&mut self, replica: u64) -> Option<NvmeRecordInfo> {
        let info = self.records.remove(&replica)?;
        if self.by_offset.get(&info.offset) == Some(&replica) {
            self.by_offset.remove(&info.offset);
        }
        self.touched.remove(&replica);
        Some(info)
    }

    /// Replicas whose extents intersect `offset..offset+len`.
    fn overlapping(&self, offset: u64, len: u64) -> Vec<u64> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        for (&start, &id) in self.by_offset.range(..end).rev() {
            let other_end = self
                .records
                .get(&id)
                .map_or(start, |r| start.saturating_add(r.record_len()));
            if other_end <= offset {
                break;
            }
            out.push(id);
        }
        out
    }

    fn at(&self, offset: u64) -> Option<&NvmeRecordInfo> {
        self.by_offset
            .get(&offset)
            .and_then(|id| self.records.get(id))
    }
}

struct Commit {
    info: NvmeRecordInfo,
    reply: oneshot::Sender<Result<(), NvmeError>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An io::Error with the same errno (or kind) and message, for reporting one failure to
/// every writer of a commit group.
fn dup_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

impl NvmeTier {
    /// Opens (creating and preallocating if needed) the tier and its index, and returns the
    /// records found, each checked against its on-disk header; entries whose header does not
    /// match are dropped from the index and logged. Blocking (preallocation, RocksDB open, a
    /// header read per record): call it from a blocking context.
    pub fn open(cfg: NvmeConfig) -> Result<(NvmeTier, Vec<NvmeRecordInfo>), NvmeError> {
        Self::open_wrapped(cfg, |e| e)
    }

    /// [`open`](Self::open), with the I/O engine passed through `wrap` first (fault
    /// injection, throttling, metrics).
    pub fn open_wrapped(
        cfg: NvmeConfig,
        wrap: impl FnOnce(Arc<dyn IoEngine>) -> Arc<dyn IoEngine>,
    ) -> Result<(NvmeTier, Vec<NvmeRecordInfo>), NvmeError> {
        cfg.validate().map_err(NvmeError::Config)?;
        let device = Arc::new(Device::open(&cfg.path, cfg.size.0)?);
        let count = (cfg.staging.0 / STAGING_BUF as u64).clamp(1, 4096) as usize;
        let pool = BufPool::new(STAGING_BUF, count);
        let engine = wrap(engine::open_engine(
            cfg.engine,
            device.clone(),
            &pool,
            cfg.queue_depth,
        ));
        let index_dir = cfg.index_dir();
        let index = Index::open(&index_dir)?;
        let shared = Arc::new(Shared {
            device,
            engine,
            pool,
            index,
            state: Mutex::new(State::default()),
            healthy: AtomicBool::new(true),
            cause: Mutex::new(None),
        });
        let records = shared.recover(cfg.queue_depth as usize)?;
        let (commit_tx, rx) = mpsc::channel();
        let (indexed_tx, indexed_rx) = mpsc::channel();
        let spawn_err = |e| NvmeError::Io {
            op: "start the commit threads",
            offset: 0,
            len: 0,
            source: e,
        };
        let s = shared.clone();
        let index_stage = std::thread::Builder::new()
            .name("kvpool-nvme-index".into())
            .spawn(move || s.index_stage(indexed_rx))
            .map_err(spawn_err)?;
        let s = shared.clone();
        let sync_stage = std::thread::Builder::new()
            .name("kvpool-nvme-sync".into())
            .spawn(move || s.sync_stage(rx, indexed_tx))
            .map_err(spawn_err)?;
        tracing::info!(
            path = %cfg.path.display(),
            index = %index_dir.display(),
            size = shared.device.size(),
            engine = shared.engine.name(),
            records = records.len(),
            "nvme tier open"
        );
        Ok((
            NvmeTier {
                shared,
                commit_tx: Some(commit_tx),
                committers: vec![sync_stage, index_stage],
            },
            records,
        ))
    }

    /// Writes a record at `offset` (an extent of at least [`record_len`] bytes the master
    /// allocated), makes it durable, then indexes it. `checksum` is the value's crc32c; a
    /// value that does not match it is refused rather than stored.
    pub async fn write_record(
        &self,
        offset: u64,
        replica: u64,
        key: &[u8],
        value: &[u8],
        checksum: u32,
    ) -> Result<(), NvmeError> {
        let s = &self.shared;
        s.check_healthy()?;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(NvmeError::InvalidArgument(format!(
                "key of {} bytes (1 to {MAX_KEY_LEN})",
                key.len()
            )));
        }
        let total = s.check_extent(offset, key.len(), value.len() as u64)?;
        let _pending = Pending::register(s, replica)?;

        let hb = value_offset(key.len()) as usize;
        let mut header = vec![0u8; hb];
        encode_header(
            &RecordHeader {
                replica,
                key_len: key.len() as u32,
                value_len: value.len() as u64,
                value_crc: checksum,
            },
            key,
            &mut header,
        );
        let piece = s.pool.buf_size();
        let mismatch = |actual| NvmeError::ChecksumMismatch {
            offset,
            expected: checksum,
            actual,
        };
        // A value that does not match its checksum must not touch the extent (it could still
        // hold bytes someone reads). A one-piece record is checked as it is copied, in cache,
        // before its single write; a larger one is checked up front, in a pass of its own.
        let one_piece = total <= piece;
        if !one_piece {
            let actual = crc32c::crc32c(value);
            if actual != checksum {
                return Err(mismatch(actual));
            }
        }
        let mut inflight = FuturesUnordered::new();
        let mut first_err = None;
        let mut pos = 0usize;
        while pos < total || !inflight.is_empty() {
            if pos < total && inflight.len() < PIECES_IN_FLIGHT && first_err.is_none() {
                let n = (total - pos).min(piece);
                let mut buf = s.pool.take_or_alloc(n);
                let crc = fill_record(&mut buf, pos, &header, value, 0);
                if one_piece && crc != checksum {
                    return Err(mismatch(crc));
                }
                let at = offset + pos as u64;
                inflight.push(async move { (at, n, s.engine.write(buf, at).await) });
                pos += n;
                continue;
            }
            let Some((at, n, (_buf, r))) = inflight.next().await else {
                break;
            };
            if let Err(e) = r {
                first_err.get_or_insert_with(|| s.io_failed("write", at, n as u64, e));
            }
            if first_err.is_some() && inflight.is_empty() {
                break;
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }

        let (reply, rx) = oneshot::channel();
        let info = NvmeRecordInfo {
            replica,
            key: key.to_vec(),
            offset,
            value_len: value.len() as u64,
            checksum,
            last_access_ms: now_ms(),
        };
        let sent = self
            .commit_tx
            .as_ref()
            .is_some_and(|tx| tx.send(Commit { info, reply }).is_ok());
        if !sent {
            return Err(NvmeError::Unhealthy("the commit thread stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(NvmeError::Unhealthy("the commit thread stopped".into())))
    }

    /// Reads `range` = (start, len) of the value of the record at `offset` (whose key is
    /// `key_len` bytes and value `value_len`). A read of the whole value also reads the
    /// header and checks the value's crc32c: a mismatch is an error (and drops the record
    /// from the index), never bytes. Partial ranges are not checked (no checksum covers them).
    pub async fn read_value(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        range: (u64, u64),
    ) -> Result<ValueBuf, NvmeError> {
        let s = &self.shared;
        if key_len == 0 || key_len > MAX_KEY_LEN {
            return Err(NvmeError::InvalidArgument(format!(
                "key length {key_len} (1 to {MAX_KEY_LEN})"
            )));
        }
        s.check_extent(offset, key_len, value_len)?;
        let (start, len) = range;
        if start.checked_add(len).is_none_or(|end| end > value_len) {
            return Err(NvmeError::InvalidArgument(format!(
                "range {start}+{len} outside a value of {value_len} bytes"
            )));
        }
        if len == 0 {
            return Ok(ValueBuf {
                buf: AlignedBuf::new(0),
                range: 0..0,
            });
        }
        let vo = value_offset(key_len);
        let whole = start == 0 && len == value_len;
        // Whole values come with their header (one read) so that they can be verified.
        let (io_off, io_len) = if whole {
            (offset, vo + align_up(value_len, NVME_ALIGN))
        } else {
            let a = align_down(vo + start, NVME_ALIGN);
            (offset + a, align_up(vo + start + len, NVME_ALIGN) - a)
        };
        let skip = (offset + vo + start - io_off) as usize;
        let n = io_len as usize;
        let buf = if n <= s.pool.buf_size() {
            s.pool.take_or_alloc(n)
        } else {
            AlignedBuf::new(n)
        };
        let (buf, r) = s.engine.read(buf, io_off).await;
        r.map_err(|e| s.io_failed("read", io_off, io_len, e))?;
        if whole {
            s.verify(offset, key_len, value_len, &buf)?;
        }
        Ok(ValueBuf {
            buf,
            range: skip..skip + len as usize,
        })
    }

    /// [`read_value`](Self::read_value) into `dst`, which must be exactly `range.1` bytes.
    pub async fn read_value_into(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        range: (u64, u64),
        dst: &mut [u8],
    ) -> Result<(), NvmeError> {
        if dst.len() as u64 != range.1 {
            return Err(NvmeError::InvalidArgument(format!(
                "destination of {} bytes for a range of {}",
                dst.len(),
                range.1
            )));
        }
        let v = self.read_value(offset, key_len, value_len, range).await?;
        dst.copy_from_slice(&v);
        Ok(())
    }

    /// Forgets a replica (the master freed it): an index delete, no data I/O. Unknown ids are
    /// ignored; a replica still being written is not indexed when its write completes.
    pub fn remove(&self, replica: u64) -> Result<(), NvmeError> {
        let s = &self.shared;
        let mut st = s.lock();
        if let Some(revoked) = st.pending.get_mut(&replica) {
            *revoked = true;
        }
        if st.remove(replica).is_some() {
            // Not synced: a remove lost in a crash only brings back a record whose space the
            // master reallocates, and the header check or the checksum catches the overwrite.
            s.index.write(&[], &[replica], &[], false)?;
        }
        Ok(())
    }

    /// Records an access to a replica (for the master's coldest-first eviction). Batched:
    /// the index is written every 256 touches, by [`flush`](Self::flush) and on drop.
    pub fn touch(&self, replica: u64) {
        let s = &self.shared;
        let mut st = s.lock();
        let Some(r) = st.records.get_mut(&replica) else {
            return;
        };
        r.last_access_ms = now_ms();
        st.touched.insert(replica);
        if st.touched.len() >= TOUCH_BATCH {
            s.flush_touches(&mut st);
        }
    }

    /// Writes pending touches to the index.
    pub fn flush(&self) {
        let s = &self.shared;
        s.flush_touches(&mut s.lock());
    }

    /// False after an I/O error, a short read or a full disk; writes are refused then.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// What made the tier unhealthy, if it is.
    pub fn unhealthy_reason(&self) -> Option<String> {
        self.shared
            .cause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Usable bytes of the device: the space the master allocates extents in.
    pub fn capacity(&self) -> u64 {
        self.shared.device.size()
    }

    /// The engine in use ("uring" or "psync"; a fallback shows here).
    pub fn engine_name(&self) -> &'static str {
        self.shared.engine.name()
    }

    /// The records indexed now (for a registration while running).
    pub fn records(&self) -> Vec<NvmeRecordInfo> {
        let mut v: Vec<_> = self.shared.lock().records.values().cloned().collect();
        v.sort_by_key(|r| r.offset);
        v
    }

    /// The record of a replica, if indexed.
    pub fn get(&self, replica: u64) -> Option<NvmeRecordInfo> {
        self.shared.lock().records.get(&replica).cloned()
    }
}

impl Drop for NvmeTier {
    fn drop(&mut self) {
        self.flush();
        // The sync stage drains what is queued and sees its channel closed, which closes the
        // index stage's after it.
        self.commit_tx = None;
        for t in self.committers.drain(..) {
            let _ = t.join();
        }
    }
}

/// Marks a replica as being written for as long as its `write_record` runs.
struct Pending<'a> {
    shared: &'a Shared,
    replica: u64,
}

impl<'a> Pending<'a> {
    fn register(shared: &'a Shared, replica: u64) -> Result<Self, NvmeError> {
        let mut st = shared.lock();
        if st.pending.contains_key(&replica) {
            return Err(NvmeError::InvalidArgument(format!(
                "replica {replica} is already being written"
            )));
        }
        st.pending.insert(replica, false);
        Ok(Pending { shared, replica })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.replica);
    }
}

/// Copies the part `pos..pos+dst.len()` of the record (header block, value, zero padding)
/// into `dst`, extending `crc` (the value's crc32c so far) over the value bytes copied.
fn fill_record(dst: &mut [u8], pos: usize, header: &[u8], value: &[u8], mut crc: u32) -> u32 {
    // Checksummed right after the copy, while the bytes are still in cache.
    const STRIDE: usize = 64 << 10;
    let end = pos + dst.len();
    let hb = header.len();
    let mut covered = pos;
    let (a, b) = (pos, hb.min(end));
    if a < b {
        dst[..b - a].copy_from_slice(&header[a..b]);
        covered = b;
    }
    let (a, b) = (hb.max(pos), (hb + value.len()).min(end));
    if a < b {
        for (d, v) in dst[a - pos..b - pos]
            .chunks_mut(STRIDE)
            .zip(value[a - hb..b - hb].chunks(STRIDE))
        {
            d.copy_from_slice(v);
            crc = crc32c::crc32c_append(crc, d);
        }
        covered = b;
    }
    // What follows the value is padding; pool buffers hold earlier data, so zero it.
    let pad_from = covered.max(hb + value.len()).max(pos);
    if pad_from < end {
        dst[pad_from - pos..].fill(0);
    }
    crc
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The maps stay consistent between statements; a panicking holder loses at most one
        // update, which the index (the source of truth at open) does not.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_healthy(&self) -> Result<(), NvmeError> {
        if self.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        let cause = self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Err(NvmeError::Unhealthy(cause.unwrap_or_default()))
    }

    fn mark_unhealthy(&self, cause: &str) {
        let mut c = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            tracing::error!(cause, "nvme tier marked unhealthy; writes are refused");
            *c = Some(cause.to_string());
        }
        self.healthy.store(false, Ordering::Release);
    }

    /// Turns an engine error into the tier's, marking the tier unhealthy.
    fn io_failed(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> NvmeError {
        let err = match e.kind() {
            io::ErrorKind::UnexpectedEof => NvmeError::ShortRead { offset, len },
            _ if e.raw_os_error() == Some(libc::ENOSPC) => NvmeError::NoSpace(format!(
                "{op} of {len} bytes at offset {offset}: {e} (the filesystem under the tier \
                 file is full)"
            )),
            _ => NvmeError::Io {
                op,
                offset,
                len,
                source: e,
            },
        };
        self.mark_unhealthy(&err.to_string());
        err
    }

    /// Checks that a record of this shape fits at `offset`; returns its length.
    fn check_extent(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
    ) -> Result<usize, NvmeError> {
        if !offset.is_multiple_of(NVME_ALIGN) {
            return Err(NvmeError::InvalidArgument(format!(
                "offset {offset} is not {NVME_ALIGN}-aligned"
            )));
        }
        let len = record_len(key_len, value_len);
        let capacity = self.device.size();
        match offset.checked_add(len) {
            Some(end) if end <= capacity => usize::try_from(len).map_err(|_| {
                NvmeError::InvalidArgument(format!("record of {len} bytes is too large"))
            }),
            _ => Err(NvmeError::OutOfRange {
                offset,
                len,
                capacity,
            }),
        }
    }

    /// Checks a whole record read at `offset`: its header, and the value against the
    /// header's checksum and the index's.
    fn verify(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        rec: &[u8],
    ) -> Result<(), NvmeError> {
        let vo = value_offset(key_len) as usize;
        let corrupt = |reason: String| NvmeError::Corrupt { offset, reason };
        let indexed = self.lock().at(offset).cloned();
        let (h, key) = match decode_header(&rec[..vo]) {
            Ok(x) => x,
            Err(e) => {
                // The header an indexed record had at open is gone: never-synced or damaged.
                self.drop_corrupt(offset, &e.to_string());
                return Err(corrupt(e.to_string()));
            }
        };
        if h.key_len as usize != key_len || h.value_len != value_len {
            return Err(corrupt(format!(
                "it holds a {}-byte key and a {}-byte value, not {key_len} and {value_len}",
                h.key_len, h.value_len
            )));
        }
        if let Some(r) = &indexed {
            if r.replica != h.replica || r.checksum != h.value_crc || r.key != key {
                return Err(corrupt(format!(
                    "the header names replica {}, the index replica {}",
                    h.replica, r.replica
                )));
            }
        }
        let actual = crc32c::crc32c(&rec[vo..vo + value_len as usize]);
        if actual != h.value_crc {
            self.drop_corrupt(offset, "value checksum mismatch");
            return Err(NvmeError::ChecksumMismatch {
                offset,
                expected: h.value_crc,
                actual,
            });
        }
        Ok(())
    }

    /// Drops the indexed record at `offset`, whose bytes failed their check.
    fn drop_corrupt(&self, offset: u64, why: &str) {
        let mut st = self.lock();
        let Some(id) = st.by_offset.get(&offset).copied() else {
            return;
        };
        st.remove(id);
        tracing::warn!(replica = id, offset, why, "corrupt nvme record dropped");
        if let Err(e) = self.index.write(&[], &[id], &[], false) {
            tracing::warn!(
                replica = id,
                "cannot drop the corrupt record from the index: {e}"
            );
        }
    }

    fn flush_touches(&self, st: &mut State) {
        if st.touched.is_empty() {
            return;
        }
        let ids: Vec<u64> = st.touched.drain().collect();
        let puts: Vec<&NvmeRecordInfo> = ids.iter().filter_map(|id| st.records.get(id)).collect();
        // Under the state lock, so a concurrent remove cannot be undone by this put.
        if let Err(e) = self.index.write(&puts, &[], &[], false) {
            tracing::warn!(
                "cannot record {} accesses in the nvme index: {e}",
                puts.len()
            );
        }
    }

    /// Loads the index and keeps the entries whose on-disk header matches.
    fn recover(&self, depth: usize) -> Result<Vec<NvmeRecordInfo>, NvmeError> {
        let (entries, undecodable) = self.index.load()?;
        let total = entries.len();
        let checks = futures::stream::iter(entries)
            .map(|e| async move {
                let r = self.check_header(&e).await;
                (e, r)
            })
            .buffer_unordered(depth.max(1));
        let results: Vec<_> = futures::executor::block_on(checks.collect());
        let mut keep = Vec::new();
        let mut drop_ids = Vec::new();
        let mut unreadable = 0usize;
        for (e, r) in results {
            match r {
                Ok(()) => keep.push(e),
                Err(Check::Mismatch(why)) => {
                    tracing::warn!(
                        replica = e.replica,
                        offset = e.offset,
                        why,
                        "nvme record dropped at open: its header does not match the index"
                    );
                    drop_ids.push(e.replica);
                }
                Err(Check::Io(err)) => {
                    // Not dropped from the index: the bytes may be fine once the device is.
                    tracing::error!(replica = e.replica, "{err}");
                    unreadable += 1;
                }
            }
        }
        if !drop_ids.is_empty() || !undecodable.is_empty() {
            self.index.write(&[], &drop_ids, &undecodable, true)?;
        }
        keep.sort_by_key(|r| r.offset);
        // Two records cannot overlap (a commit drops what its record overlaps), unless the
        // index was edited; keep the first and drop the rest rather than serve either wrongly.
        let mut st = self.lock();
        let mut kept = Vec::with_capacity(keep.len());
        let mut end = 0;
        let mut overlapped = Vec::new();
        for r in keep {
            if r.offset < end {
                overlapped.push(r.replica);
                continue;
            }
            end = r.offset + r.record_len();
            st.insert(r.clone());
            kept.push(r);
        }
        drop(st);
        if !overlapped.is_empty() {
            tracing::warn!(
                n = overlapped.len(),
                "overlapping nvme index entries dropped"
            );
            self.index.write(&[], &overlapped, &[], true)?;
        }
        tracing::info!(
            indexed = total,
            kept = kept.len(),
            dropped = drop_ids.len() + undecodable.len() + overlapped.len(),
            unreadable,
            "nvme index checked against the records' headers"
        );
        Ok(kept)
    }

    async fn check_header(&self, e: &NvmeRecordInfo) -> Result<(), Check> {
        if e.key.is_empty() || e.key.len() > MAX_KEY_LEN {
            return Err(Check::Mismatch(format!("key of {} bytes", e.key.len())));
        }
        if let Err(err) = self.check_extent(e.offset, e.key.len(), e.value_len) {
            return Err(Check::Mismatch(err.to_string()));
        }
        let hb = value_offset(e.key.len());
        let (buf, r) = self
            .engine
            .read(self.pool.take_or_alloc(hb as usize), e.offset)
            .await;
        if let Err(err) = r {
            return Err(Check::Io(self.io_failed("read", e.offset, hb, err)));
        }
        let (h, key) = decode_header(&buf).map_err(|err| Check::Mismatch(err.to_string()))?;
        if h.replica != e.replica
            || key != e.key.as_slice()
            || h.value_len != e.value_len
            || h.value_crc != e.checksum
        {
            return Err(Check::Mismatch(format!(
                "the header holds replica {} ({} value bytes, crc {:#010x})",
                h.replica, h.value_len, h.value_crc
            )));
        }
        Ok(())
    }

    /// First commit stage: takes every write whose bytes are on the device, makes them
    /// durable with one fdatasync, and passes them to the index stage. While the index stage
    /// syncs one group's entries, this stage already syncs the next group's data.
    fn sync_stage(&self, rx: mpsc::Receiver<Commit>, next: mpsc::Sender<Vec<Commit>>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            group.extend(rx.try_iter());
            if let Some(group) = self.sync_group(group) {
                if let Err(mpsc::SendError(group)) = next.send(group) {
                    for c in group {
                        let _ = c
                            .reply
                            .send(Err(NvmeError::Unhealthy("the index stage stopped".into())));
                    }
                }
            }
        }
    }

    /// Second commit stage: indexes synced writes (all groups waiting, at once) and makes
    /// the index durable with one WAL sync.
    fn index_stage(&self, rx: mpsc::Receiver<Vec<Commit>>) {
        while let Ok(mut group) = rx.recv() {
            for more in rx.try_iter() {
                group.extend(more);
            }
            self.index_group(group);
        }
    }

    /// Syncs the device for `group`; on failure answers every writer and returns None.
    fn sync_group(&self, group: Vec<Commit>) -> Option<Vec<Commit>> {
        if let Err(e) = self.engine.sync() {
            let msg = format!("fdatasync of the tier failed: {e}");
            self.mark_unhealthy(&msg);
            for c in group {
                let _ = c.reply.send(Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                    NvmeError::NoSpace(msg.clone())
                } else {
                    NvmeError::Io {
                        op: "sync",
                        offset: c.info.offset,
                        len: c.info.record_len(),
                        source: dup_io(&e),
                    }
                }));
            }
            return None;
        }
        Some(group)
    }

    fn index_group(&self, group: Vec<Commit>) {
        // Plan under the lock: a later record of the group wins over an earlier one it
        // overlaps, and both over indexed records they overlap.
        let mut st = self.lock();
        let mut puts: Vec<&NvmeRecordInfo> = Vec::with_capacity(group.len());
        let mut deletes: Vec<u64> = Vec::new();
        for c in &group {
            if st.pending.get(&c.info.replica) == Some(&true) {
                continue; // removed while being written
            }
            let (o, l) = (c.info.offset, c.info.record_len());
            puts.retain(|p| p.offset + p.record_len() <= o || o + l <= p.offset);
            deletes.extend(
                st.overlapping(o, l)
                    .into_iter()
                    .filter(|&id| id != c.info.replica),
            );
            puts.push(&c.info);
        }
        let written = self.index.write(&puts, &deletes, &[], false);
        if written.is_ok() {
            for id in &deletes {
                st.remove(*id);
                tracing::debug!(replica = id, "nvme record overwritten by a new record");
            }
            for p in &puts {
                st.insert((*p).clone());
            }
        }
        drop(st);
        // The WAL sync outside the lock, so reads and touches do not wait on it.
        let r = written
            .map_err(|e| match e {
                NvmeError::Index(m) => m,
                e => e.to_string(),
            })
            .and_then(|()| {
                self.index
                    .sync_wal()
                    .map_err(|e| format!("syncing the index: {e}"))
            });
        if let Err(msg) = &r {
            self.mark_unhealthy(&format!("nvme index: {msg}"));
        }
        for c in group {
            let _ = c.reply.send(r.clone().map_err(NvmeError::Index));
        }
    }
}

enum Check {
    Mismatch(String),
    Io(NvmeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_record_lays_out_header_value_and_padding() {
        let header = {
            let mut h = vec![0u8; 4096];
            h[..3].copy_from_slice(b"HDR");
            h
        };
        let value: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        let total = 4096 + 8192;
        let mut whole = vec![0xAAu8; total];
        let crc = fill_record(&mut whole, 0, &header, &value, 0);
        assert_eq!(crc, crc32c::crc32c(&value));
        assert_eq!(&whole[..4096], &header[..]);
        assert_eq!(&whole[4096..4096 + 5000], &value[..]);
        assert!(whole[4096 + 5000..].iter().all(|&b| b == 0));
        // Any split gives the same bytes.
        for piece in [1usize, 100, 4096, 5000, 7000] {
            let mut out = Vec::new();
            let mut pos = 0;
            let mut crc = 0;
            while pos < total {
                let n = piece.min(total - pos);
                let mut d = vec![0xAAu8; n];
                crc = fill_record(&mut d, pos, &header, &value, crc);
                out.extend_from_slice(&d);
                pos += n;
            }
            assert_eq!(out, whole, "piece {piece}");
            assert_eq!(crc, crc32c::crc32c(&value), "piece {piece}");
        }
    }

    #[test]
    fn config_defaults_and_names() {
        let c: NvmeConfig = toml::from_str("path = \"/data/kv\"\nsize = \"4GiB\"").unwrap();
        assert_eq!(c.engine, IoEngineKind::Uring);
        assert_eq!(c.queue_depth, 64);
        assert_eq!(c.size, ByteSize(4 << 30));
        assert_eq!(c.index_dir(), PathBuf::from("/data/kv.index"));
        assert!(c.validate().is_ok());
        let c: NvmeConfig =
            toml::from_str("path = \"x\"\nengine = \"psync\"\nqueue-depth = 8\nindex-dir = \"i\"")
                .unwrap();
        assert_eq!((c.engine, c.queue_depth), (IoEngineKind::Psync, 8));
        assert_eq!(c.index_dir(), PathBuf::from("i"));
        assert!(toml::from_str::<NvmeConfig>("engine = \"aio\"").is_err());
        assert!(toml::from_str::<NvmeConfig>("queue_depth = 8").is_err());
        assert!(NvmeConfig::default().validate().is_err(), "path required");
    }

    #[test]
    fn error_codes() {
        let io = |n| io::Error::from_raw_os_error(n);
        let e = |n| NvmeError::Io {
            op: "write",
            offset: 0,
            len: 1,
            source: io(n),
        };
        assert_eq!(e(libc::ENOSPC).code(), ErrorCode::NoSpace);
        assert_eq!(e(libc::EIO).code(), ErrorCode::Io);
        assert_eq!(
            NvmeError::ShortRead { offset: 0, len: 1 }.code(),
            ErrorCode::Io
        );
        assert_eq!(
            NvmeError::OutOfRange {
                offset: 0,
                len: 1,
                capacity: 0
            }
            .code(),
            ErrorCode::OutOfRange
        );
    }
}
