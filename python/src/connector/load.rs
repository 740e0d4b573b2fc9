//! `LayerwiseLoad`: a load running in the background, one batch per layer group, so an engine
//! computes on layer group `g` while `g + 1` is still in flight (vLLM's `start_load_kv`, then
//! `wait_for_layer_load` per layer).
//!
//! `PoolConnector::load_layerwise` borrows its cache for the iterator's life; here the load
//! must outlive the call that starts it, so it owns everything it uses: the keys, the
//! connector (an `Arc`), and the scatter lists, whose memory the handle keeps alive (it holds
//! the Python `Connector`, which holds the layout's owners). The handle's drop cancels the
//! load and waits until its task has ended, so no byte is written after the handle is gone.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kvpool_connector::{BlockKey, PoolConnector};
use pyo3::{exceptions::PyValueError, prelude::*};

use super::batch::{load_groups, loaded_to_py, Failure, Loaded};
use super::host::{HostCache, Parts};
use super::Connector;
use crate::runtime;

/// A load in flight (see the module docs). Every wait blocks with the GIL released.
#[pyclass(module = "kvpool._native", frozen)]
pub struct LayerwiseLoad {
    inner: Inner,
    num_groups: usize,
    num_blocks: usize,
    /// Keeps the connector, its layout and the memory's owners alive while the load runs.
    _connector: Py<Connector>,
}

enum Inner {
    Host(HostLoad),
    #[cfg(feature = "cuda")]
    Gpu(super::gpu::GpuLoadHandle),
}

/// What a host load has published so far.
struct State {
    /// Group `g`'s per-block results, once it landed.
    groups: Vec<Option<Vec<Loaded>>>,
    /// Per-block results over all groups, once every group landed.
    results: Option<Vec<Loaded>>,
    /// The task ended (finished, or cancelled before it could).
    ended: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Only plain data is behind the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `ready` gives a value; `None` if the task ended without one.
    fn wait<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(v) = ready(&mut s) {
                return Some(v);
            }
            if s.ended {
                return None;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Marks the load ended when its task stops, however it stops, and wakes the waiters.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.lock().ended = true;
        self.0.cv.notify_all();
    }
}

struct HostLoad {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        // The task writes into the engine's memory: it must have stopped before the handle
        // (and with it the memory's owners) goes. A cancelled task stops at its next poll,
        // and it never needs the GIL, so waiting with the GIL held is short and cannot
        // deadlock.
        self.task.abort();
        self.shared.wait(|s| s.ended.then_some(()));
    }
}

/// The failure of every block of a load that ended early (cancelled, or its task panicked).
fn aborted(n: usize) -> Vec<Loaded> {
    let f = Failure::new(
        kvpool_client::ErrorCode::Internal,
        "the load ended before this block was done".into(),
    );
    vec![Err(f); n]
}

/// Starts a host-memory load of `blocks` (ids checked by the caller: in range and distinct).
pub(super) fn start_host(
    connector: Py<Connector>,
    cache: &HostCache,
    conn: &Arc<PoolConnector>,
    blocks: Vec<(BlockKey, usize)>,
    window: usize,
) -> PyResult<LayerwiseLoad> {
    let ids: Vec<usize> = blocks.iter().map(|(_, b)| *b).collect();
    let keys: Vec<BlockKey> = blocks.into_iter().map(|(k, _)| k).collect();
    // SAFETY: `'static` stands for "until the task below ends". The memory stays allocated
    // that long: the handle holds the connector, whose layout holds the memory's owners, and
    // the handle's drop waits for the task to end. Nobody else reads or writes these blocks
    // until their group is reported or the handle is dropped: the caller's contract
    // (`Connector.__new__`).
    let dests: Parts<&'static mut [u8]> = unsafe { cache.scatter(&ids)? };
    let num_groups = dests.len();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            groups: vec![None; num_groups],
            results: None,
            ended: false,
        }),
        cv: Condvar::new(),
    });
    // Made outside the task so that a task cancelled before its first poll (which drops the
    // future with its captures, never running its body) still marks the load ended.
    let (ended, conn) = (Ended(shared.clone()), conn.clone());
    let task = runtime::runtime()?.spawn(async move {
        let publish = |g: usize, res: Vec<Loaded>| {
            ended.0.lock().groups[g] = Some(res);
            ended.0.cv.notify_all();
        };
        let results = load_groups(&conn, &keys, dests, window, publish).await;
        ended.0.lock().results = Some(results);
    });
    Ok(LayerwiseLoad {
        inner: Inner::Host(HostLoad { shared, task }),
        num_groups,
        num_blocks: ids.len(),
        _connector: connector,
    })
}

/// Starts a GPU load of `blocks` (ids checked by the caller).
#[cfg(feature = "cuda")]
pub(super) fn start_gpu(
    connector: Py<Connector>,
    cache: &Arc<kvpool_connector::cuda::GpuKvCache>,
    conn: &Arc<PoolConnector>,
    blocks: Vec<(BlockKey, usize)>,
) -> PyResult<LayerwiseLoad> {
    let num_blocks = blocks.len();
    Ok(LayerwiseLoad {
        inner: Inner::Gpu(super::gpu::start_load(cache, conn, blocks)?),
        num_groups: cache.layout().num_groups(),
        num_blocks,
        _connector: connector,
    })
}

#[pymethods]
impl LayerwiseLoad {
    #[getter]
    fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// Blocks until layer group `group` has landed: its bytes are in place for every block
    /// whose result is `True`. Host memory: the group's per-block results (`True`, `False`
    /// for a miss, or a failure tuple). GPU memory: `None` (per-block results come from
    /// `wait`), or the failure for every block if the load broke. Groups may be waited for
    /// in any order, and again.
    fn wait_group<'py>(
        &self,
        py: Python<'py>,
        group: usize,
    ) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
        if group >= self.num_groups {
            return Err(PyValueError::new_err(format!(
                "group {group} out of range (num_groups {})",
                self.num_groups
            )));
        }
        let res = match &self.inner {
            Inner::Host(h) => Some(
                py.detach(|| h.shared.wait(|s| s.groups[group].clone()))
                    .unwrap_or_else(|| aborted(self.num_blocks)),
            ),
            #[cfg(feature = "cuda")]
            Inner::Gpu(g) => py
                .detach(|| g.wait_group(group))
                .err()
                .map(|f| vec![Err(f); self.num_blocks]),
        };
        res.map(|rs| rs.iter().map(|r| loaded_to_py(py, r)).collect())
            .transpose()
    }

    /// Blocks until every group has landed; per block: `True` (every group loaded), `False`
    /// (a miss: recompute the block) or a failure tuple.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let res = match &self.inner {
            Inner::Host(h) => py
                .detach(|| h.shared.wait(|s| s.results.clone()))
                .unwrap_or_else(|| aborted(self.num_blocks)),
            #[cfg(feature = "cuda")]
            Inner::Gpu(g) => py.detach(|| g.wait_all()),
        };
        res.iter().map(|r| loaded_to_py(py, r)).collect()
    }

    /// Whether the load has ended (host: every group landed; GPU: every object fetched and
    /// its copy enqueued, the copies may still run).
    fn done(&self) -> bool {
        match &self.inner {
            Inner::Host(h) => h.shared.lock().ended,
            #[cfg(feature = "cuda")]
            Inner::Gpu(g) => g.fetched(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<kvpool LayerwiseLoad blocks={} groups={} done={}>",
            self.num_blocks,
            self.num_groups,
            self.done()
        )
    }
}
