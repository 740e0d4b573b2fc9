//! The tier type: what its threads share, opening it, and closing it.

use std::{
    sync::{atomic::AtomicBool, mpsc, Arc, Mutex, MutexGuard},
    thread::JoinHandle,
};

use super::{
    commit::{self, Commit},
    engine,
    index::Index,
    record_len,
    records::State,
    BufPool, Device, IoEngine, NvmeConfig, NvmeError, NvmeRecordInfo, NVME_ALIGN, STAGING_BUF,
};

/// The NVMe tier of one node.
pub struct NvmeTier {
    pub(super) shared: Arc<Shared>,
    pub(super) commit_tx: Option<mpsc::Sender<Commit>>,
    /// The sync stage and the index stage of the commit pipeline.
    pub(super) committers: Vec<JoinHandle<()>>,
}

pub(super) struct Shared {
    pub(super) device: Arc<Device>,
    pub(super) engine: Arc<dyn IoEngine>,
    pub(super) pool: BufPool,
    pub(super) index: Index,
    pub(super) state: Mutex<State>,
    pub(super) healthy: AtomicBool,
    pub(super) cause: Mutex<Option<String>>,
    /// Most parts a large read is split into (`read-parts`).
    pub(super) read_parts: u64,
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
            read_parts: u64::from(cfg.read_parts),
        });
        let records = shared.recover(cfg.queue_depth as usize)?;
        let (commit_tx, committers) = commit::start(&shared)?;
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
                committers,
            },
            records,
        ))
    }

    /// Usable bytes of the device: the space the master allocates extents in.
    pub fn capacity(&self) -> u64 {
        self.shared.device.size()
    }

    /// A read-only O_DIRECT descriptor of the device, for same-host clients.
    pub fn open_read_only(&self) -> std::io::Result<std::fs::File> {
        self.shared.device.open_read_only()
    }

    /// The engine in use ("uring" or "psync"; a fallback shows here).
    pub fn engine_name(&self) -> &'static str {
        self.shared.engine.name()
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

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The maps stay consistent between statements; a panicking holder loses at most one
        // update, which the index (the source of truth at open) does not.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that a record of this shape fits at `offset`; returns its length.
    pub(super) fn check_extent(
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
}
