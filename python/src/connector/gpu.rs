//! GPU memory by address (feature `cuda`): the layout's bases are device pointers (torch's
//! `data_ptr()` on a CUDA tensor) and the bytes move through
//! `kvpool_connector::cuda::GpuKvCache`'s pinned staging, on a stream of its own in the
//! device's primary context (the one the CUDA runtime, and so torch, uses).

use std::sync::{Arc, Mutex, OnceLock};

use kvpool_client::ErrorCode;
use kvpool_connector::cuda::{open_device, GpuError, GpuKvCache, GpuLoad, GpuOptions};
use kvpool_connector::layout::KvLayout;
use kvpool_connector::{BlockKey, PoolConnector};
use pyo3::{exceptions::PyValueError, prelude::*};

use super::batch::{Failure, Loaded, Saved};
use crate::runtime;

impl From<&GpuError> for Failure {
    fn from(e: &GpuError) -> Self {
        let code = match e {
            GpuError::Connector(c) => return Failure::from(c),
            GpuError::Driver(_) | GpuError::NoDevice(_) | GpuError::LoadAborted => {
                ErrorCode::Internal
            }
            GpuError::Layout(_)
            | GpuError::BlockOutOfRange { .. }
            | GpuError::Duplicate(_)
            | GpuError::GroupOutOfRange { .. }
            | GpuError::RegionOutOfRange { .. }
            | GpuError::Length { .. }
            | GpuError::Staging { .. }
            | GpuError::GroupMismatch { .. } => ErrorCode::InvalidArgument,
        };
        Failure::new(code, e.to_string())
    }
}

pub(super) fn saved(r: &Result<(), GpuError>) -> Saved {
    r.as_ref().map(|_| ()).map_err(Failure::from)
}

fn loaded(r: &Result<bool, GpuError>) -> Loaded {
    r.as_ref().map(|b| *b).map_err(Failure::from)
}

/// A GPU cache over the layout's device memory on CUDA device `ordinal`.
pub(super) fn open(
    py: Python<'_>,
    layout: &Arc<KvLayout>,
    ordinal: usize,
) -> PyResult<Arc<GpuKvCache>> {
    let err = |e: GpuError| PyValueError::new_err(format!("CUDA device {ordinal}: {e}"));
    let layout = KvLayout::clone(layout);
    py.detach(|| {
        let ctx = open_device(ordinal).map_err(err)?;
        let stream = ctx.new_stream().map_err(|e| err(e.into()))?;
        // SAFETY: the caller's contract (`Connector.__new__`, docs/connector.md "From
        // Python"): every block range of the layout is device memory of this device, the
        // primary context's (where the CUDA runtime allocates), and stays allocated while the
        // connector exists (the layout holds its owners); the engine's writes to a block are
        // done before it is saved, and it does not touch a block being loaded until its group
        // is reported.
        let cache = unsafe { GpuKvCache::from_raw(stream, layout, GpuOptions::default()) };
        cache.map(Arc::new).map_err(err)
    })
}

/// Orders the cache's next copies behind the engine's event `handle` (a `CUevent`).
pub(super) fn wait_event(cache: &GpuKvCache, handle: usize) -> PyResult<()> {
    if handle == 0 {
        return Err(PyValueError::new_err("after_event = 0: not a CUDA event"));
    }
    // SAFETY: the caller's contract (`Connector.save_detached`): a live event of this
    // device, recorded on the stream that wrote the blocks; it is read only during the call.
    unsafe { cache.wait_event(handle as kvpool_connector::cuda::CUevent) }
        .map_err(|e| PyValueError::new_err(format!("after_event: {e}")))
}

pub(super) fn save(
    py: Python<'_>,
    cache: &GpuKvCache,
    conn: &PoolConnector,
    blocks: &[(BlockKey, usize)],
) -> PyResult<Vec<Saved>> {
    let res = runtime::block_on(py, cache.save(conn, blocks))?;
    Ok(res.iter().map(saved).collect())
}

pub(super) fn load(
    py: Python<'_>,
    cache: &GpuKvCache,
    conn: &PoolConnector,
    blocks: &[(BlockKey, usize)],
) -> PyResult<Vec<Loaded>> {
    let rt = runtime::runtime()?;
    let res = py.detach(|| rt.block_on(cache.load(conn, blocks)).wait_all());
    Ok(res.iter().map(loaded).collect())
}

/// A spawned GPU load: `GpuLoad` waits for groups by reference and for the results by value,
/// so the handle keeps it until `wait`, and the results after.
pub(crate) struct GpuLoadHandle {
    load: Mutex<Option<GpuLoad>>,
    results: OnceLock<Vec<Loaded>>,
}

pub(super) fn start_load(
    cache: &Arc<GpuKvCache>,
    conn: &Arc<PoolConnector>,
    blocks: Vec<(BlockKey, usize)>,
) -> PyResult<GpuLoadHandle> {
    // `start_load` spawns its task on the ambient runtime.
    let _rt = runtime::runtime()?.enter();
    Ok(GpuLoadHandle {
        load: Mutex::new(Some(cache.start_load(conn.clone(), blocks))),
        results: OnceLock::new(),
    })
}

impl GpuLoadHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<GpuLoad>> {
        self.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits with the lock held (`wait_all` takes the load by value), so threads waiting for
    /// different groups of one GPU load take turns; the first group a thread waits for is
    /// normally the earliest to land anyway.
    pub(crate) fn wait_group(&self, group: usize) -> Result<(), Failure> {
        match &*self.lock() {
            Some(l) => l.wait_group(group).map_err(|e| Failure::from(&e)),
            // `wait` returned: every group is in place.
            None => Ok(()),
        }
    }

    pub(crate) fn wait_all(&self) -> Vec<Loaded> {
        let mut load = self.lock();
        if let Some(l) = load.take() {
            let res = l.wait_all().iter().map(loaded).collect();
            let _ = self.results.set(res);
        }
        drop(load);
        self.results.get().cloned().unwrap_or_default()
    }

    pub(crate) fn fetched(&self) -> bool {
        self.lock().as_ref().is_none_or(GpuLoad::is_fetched)
    }
}
