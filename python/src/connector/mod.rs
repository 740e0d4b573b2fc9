//! The connector's API over engine memory given by address: `BlockHasher` / `BlockKey` (the
//! block keys), `KvLayout` (an engine's KV cache by address, checked), `Connector` (lookup,
//! save, load, layer-wise load, detached saves) and `LayerwiseLoad` (a load in flight).
//! `kvpool.connector` is the documented Python API over them (docs/connector.md, "From
//! Python").
//!
//! Memory is the engine's: a host cache's block ranges become slices only here
//! ([`host::HostCache`]), and only from a layout's segments, with the block ids checked
//! against the layout first; a GPU cache (feature `cuda`) goes through
//! `kvpool_connector::cuda::GpuKvCache`. The transfers are `PoolConnector`'s batched
//! primitives (`lookup`, `save_parts`, `load_parts`), so the key, tail-first and
//! already-saved rules are the Rust connector's.
//!
//! Every call releases the GIL while it runs. A whole call refused before any transfer (keys
//! and ids of different lengths, an id out of range, an id listed twice in a load) raises
//! `ValueError`; per-block outcomes come back one per block, failures as the
//! `(code, name, message)` tuples of [`crate::outcome`].
//!
//! # Layout
//! - [`keys`]: `BlockHasher`, `BlockKey`.
//! - [`layout`]: `KvLayout` and its checks (no aliasing block ranges, ids in range).
//! - [`host`]: host memory's block ranges as slices (the `unsafe` of this module).
//! - [`batch`]: per-block outcomes, and every layer group's batch run together.
//! - [`load`]: `LayerwiseLoad`, a load that outlives the call starting it.
//! - `gpu` (feature `cuda`): device memory through `GpuKvCache`.
//! - [`pd`]: `PdProducer` / `PdConsumer`, the P/D hand-off's holds and messages.

mod batch;
#[cfg(feature = "cuda")]
mod gpu;
mod host;
mod keys;
mod layout;
mod load;
mod pd;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::client::NativeClient;
use kvpool_connector::PoolConnector;
use kvpool_proto::{NodeId, PutOptions};
use pyo3::{exceptions::PyValueError, prelude::*, IntoPyObjectExt};

pub use keys::{BlockHasher, BlockKey};
pub use layout::KvLayout;
pub use load::LayerwiseLoad;
pub use pd::{PdConsumer, PdProducer};

use crate::runtime;
use batch::{load_groups, loaded_to_py, save_groups, saved_to_py, Failure, Saved};
use layout::{check_groups, check_ids};

/// Where the cache's bytes are.
enum Memory {
    Host(host::HostCache),
    #[cfg(feature = "cuda")]
    Gpu(Arc<kvpool_connector::cuda::GpuKvCache>),
}

/// Detached saves in flight, and the finished ones not yet collected.
#[derive(Default)]
struct DetachedSaves {
    state: Mutex<SavesState>,
    cv: Condvar,
}

#[derive(Default)]
struct SavesState {
    in_flight: usize,
    finished: Vec<(String, Vec<Saved>)>,
}

impl DetachedSaves {
    fn lock(&self) -> std::sync::MutexGuard<'_, SavesState> {
        // Only plain data is behind the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A detached save, counted in flight until it ends, however it ends: one that ends without
/// results (its task panicked or was dropped) is still reported, every block failed, so an
/// engine waiting for the request to free its blocks is never left waiting.
struct InFlight {
    saves: Arc<DetachedSaves>,
    request_id: String,
    blocks: usize,
    results: Option<Vec<Saved>>,
}

impl InFlight {
    fn start(saves: &Arc<DetachedSaves>, request_id: String, blocks: usize) -> Self {
        saves.lock().in_flight += 1;
        InFlight {
            saves: saves.clone(),
            request_id,
            blocks,
            results: None,
        }
    }

    fn finish(mut self, results: Vec<Saved>) {
        self.results = Some(results);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let results = self.results.take().unwrap_or_else(|| {
            let f = Failure::new(
                kvpool_client::ErrorCode::Internal,
                "the save ended before this block was done".into(),
            );
            vec![Err(f); self.blocks]
        });
        let mut s = self.saves.lock();
        s.finished
            .push((std::mem::take(&mut self.request_id), results));
        s.in_flight -= 1;
        drop(s);
        self.saves.cv.notify_all();
    }
}

/// The pool side of one engine rank over a KV cache given by address (see the module docs).
#[pyclass(module = "kvpool._native", frozen)]
pub struct Connector {
    conn: Arc<PoolConnector>,
    /// Keeps the layout, and so the memory's owners, alive.
    layout: Py<KvLayout>,
    /// `None` for a layout without memory (lookups only).
    memory: Option<Memory>,
    saves: Arc<DetachedSaves>,
}

impl Connector {
    fn num_blocks(&self, py: Python<'_>) -> usize {
        match self.memory {
            Some(_) => self.layout.bind(py).get().inner.num_blocks(),
            None => 0,
        }
    }

    fn memory(&self) -> PyResult<&Memory> {
        self.memory
            .as_ref()
            .ok_or_else(|| PyValueError::new_err(layout::NO_MEMORY))
    }

    /// The `(key, block id)` pairs of a call, refused as a whole if the lists differ in
    /// length or an id is out of range (or, with `distinct`, listed twice).
    fn blocks(
        &self,
        py: Python<'_>,
        keys: &[PyRef<'_, BlockKey>],
        block_ids: &[usize],
        distinct: bool,
    ) -> PyResult<Vec<(kvpool_connector::BlockKey, usize)>> {
        self.memory()?;
        if keys.len() != block_ids.len() {
            return Err(PyValueError::new_err(format!(
                "{} keys but {} block ids",
                keys.len(),
                block_ids.len()
            )));
        }
        check_ids(&self.layout.bind(py).get().inner, block_ids, distinct)?;
        Ok(keys
            .iter()
            .map(|k| k.0.clone())
            .zip(block_ids.iter().copied())
            .collect())
    }
}

#[pymethods]
impl Connector {
    /// A connector for the cache `layout` describes, with its own client of the pool at
    /// `master` (the client options are `NativeClient`'s). Saves use `replicas`,
    /// `preferred_nodes` (node ids tried first: the engine's own host's) and `soft_pin`.
    ///
    /// The caller's contract, for every call: the layout's memory stays allocated while this
    /// connector (or a load from it) exists; a block being saved is not written until the
    /// call returns (for a GPU cache's `save_detached`: until `finished_saves` reports the
    /// request); a block being loaded is neither read nor written by anyone else until its
    /// load reports it (`load` returned, `wait_group` for its group, or the handle dropped).
    #[new]
    #[pyo3(signature = (layout, client, *, replicas=1, preferred_nodes=Vec::new(), soft_pin=false))]
    fn new(
        layout: Bound<'_, KvLayout>,
        client: Bound<'_, NativeClient>,
        replicas: u8,
        preferred_nodes: Vec<u64>,
        soft_pin: bool,
    ) -> PyResult<Self> {
        if replicas == 0 {
            return Err(PyValueError::new_err("replicas = 0: must be at least 1"));
        }
        let l = layout.get();
        let opts = PutOptions {
            replicas,
            preferred_nodes: preferred_nodes.into_iter().map(NodeId).collect(),
            soft_pin,
            ..PutOptions::default()
        };
        // The client's connections are shared with whoever else uses it (kvpool.Client).
        let conn = PoolConnector::new(client.get().shared(), &l.inner).with_put_options(opts);
        let memory = match l.device {
            _ if !l.memory => None,
            None => Some(Memory::Host(host::HostCache::new(l.inner.clone()))),
            #[cfg(feature = "cuda")]
            Some(ordinal) => Some(Memory::Gpu(gpu::open(layout.py(), &l.inner, ordinal)?)),
            #[cfg(not(feature = "cuda"))]
            Some(ordinal) => {
                return Err(PyValueError::new_err(format!(
                    "the layout is in memory of CUDA device {ordinal}, and this kvpool was \
                     built without the cuda feature"
                )))
            }
        };
        Ok(Connector {
            conn: Arc::new(conn),
            layout: layout.unbind(),
            memory,
            saves: Arc::default(),
        })
    }

    /// The layout this connector moves blocks of.
    #[getter]
    fn layout(&self, py: Python<'_>) -> Py<KvLayout> {
        self.layout.clone_ref(py)
    }

    /// Pool objects per block.
    #[getter]
    fn num_groups(&self) -> usize {
        self.conn.num_groups()
    }

    /// How many leading blocks of `keys` are in the pool, every layer group of them (a hole
    /// ends the match); they get a read lease that keeps them for the load that follows.
    /// An int, or a failure tuple for a failure inside the matched prefix.
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<PyRef<'py, BlockKey>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys: Vec<kvpool_connector::BlockKey> = keys.iter().map(|k| k.0.clone()).collect();
        match runtime::block_on(py, self.conn.lookup(&keys))? {
            Ok(n) => n.into_bound_py_any(py),
            Err(e) => Failure::from(&e).to_py(py),
        }
    }

    /// Saves block `block_ids[i]` under `keys[i]`, every layer group's batch at once. Per
    /// block: `True` (saved, or already in the pool) or a failure tuple.
    fn save<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<PyRef<'py, BlockKey>>,
        block_ids: Vec<usize>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let blocks = self.blocks(py, &keys, &block_ids, false)?;
        let results = match self.memory()? {
            Memory::Host(h) => {
                let keys: Vec<_> = blocks.iter().map(|(k, _)| k.clone()).collect();
                let groups: Vec<usize> = (0..self.conn.num_groups()).collect();
                // SAFETY: the ids are in range (checked by `blocks`), the groups are all the
                // layout's, and the caller's contract (`Connector.__new__`) keeps the blocks
                // allocated, initialised and unwritten until this call returns; the slices end
                // with it.
                let objects = unsafe { h.gather(&block_ids, &groups) };
                runtime::block_on(py, save_groups(&self.conn, &keys, &groups, &objects))?
            }
            #[cfg(feature = "cuda")]
            Memory::Gpu(g) => gpu::save(py, g, &self.conn, &blocks)?,
        };
        results.iter().map(|r| saved_to_py(py, r)).collect()
    }

    /// Loads `keys[i]` into block `block_ids[i]` (ids distinct), every layer group's batch at
    /// once. Per block: `True` (loaded), `False` (a miss: recompute it; its bytes may be
    /// partly overwritten) or a failure tuple.
    fn load<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<PyRef<'py, BlockKey>>,
        block_ids: Vec<usize>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let blocks = self.blocks(py, &keys, &block_ids, true)?;
        let results = match self.memory()? {
            Memory::Host(h) => {
                let keys: Vec<_> = blocks.iter().map(|(k, _)| k.clone()).collect();
                // SAFETY: the caller's contract (`Connector.__new__`) gives this call the
                // blocks' bytes alone until it returns; the slices end with it.
                let dests = unsafe { h.scatter(&block_ids)? };
                runtime::block_on(
                    py,
                    load_groups(&self.conn, &keys, dests, usize::MAX, |_, _| {}),
                )?
            }
            #[cfg(feature = "cuda")]
            Memory::Gpu(g) => gpu::load(py, g, &self.conn, &blocks)?,
        };
        results.iter().map(|r| loaded_to_py(py, r)).collect()
    }

    /// Starts a layer-wise load and returns at once: one batch per layer group, at most
    /// `window` groups in flight (2 keeps group 0 from sharing the link with every later
    /// group), each published as it lands. See `LayerwiseLoad`.
    #[pyo3(signature = (keys, block_ids, window=2))]
    fn start_load(
        slf: &Bound<'_, Self>,
        keys: Vec<PyRef<'_, BlockKey>>,
        block_ids: Vec<usize>,
        window: usize,
    ) -> PyResult<LayerwiseLoad> {
        let py = slf.py();
        let this = slf.get();
        let blocks = this.blocks(py, &keys, &block_ids, true)?;
        let connector = slf.clone().unbind();
        match this.memory()? {
            Memory::Host(h) => load::start_host(connector, h, &this.conn, blocks, window),
            #[cfg(feature = "cuda")]
            Memory::Gpu(g) => load::start_gpu(connector, g, &this.conn, blocks),
        }
    }

    /// Saves the blocks in the background and returns at once; `finished_saves` reports
    /// `request_id` with the per-block results when it ends (one report per call). `groups`
    /// names the layer groups to save (all by default): a layer-wise save calls once per group
    /// as soon as the forward has written the group's layers. A host cache's blocks are copied
    /// out during the call (one memcpy per object), so the engine may reuse them at once; a
    /// GPU cache's must stay unchanged until the request is reported, and its copies run after
    /// `after_event` (a `CUevent` handle, e.g. torch's `Event.cuda_event`, recorded on the
    /// stream that wrote the blocks) instead of needing that stream synchronized first.
    #[pyo3(signature = (request_id, keys, block_ids, groups=None, after_event=None))]
    fn save_detached(
        &self,
        py: Python<'_>,
        request_id: String,
        keys: Vec<PyRef<'_, BlockKey>>,
        block_ids: Vec<usize>,
        groups: Option<Vec<usize>>,
        after_event: Option<usize>,
    ) -> PyResult<()> {
        let blocks = self.blocks(py, &keys, &block_ids, false)?;
        let groups = check_groups(self.conn.num_groups(), groups)?;
        let rt = runtime::runtime()?;
        let conn = self.conn.clone();
        match self.memory()? {
            Memory::Host(h) => {
                if after_event.is_some() {
                    return Err(PyValueError::new_err(
                        "after_event orders GPU copies; this cache is in host memory",
                    ));
                }
                let in_flight = InFlight::start(&self.saves, request_id, blocks.len());
                // SAFETY: the ids and groups are in range (checked by `blocks` and
                // `check_groups`), and the caller's contract keeps the blocks allocated,
                // initialised and unwritten until this call returns; the copies are owned.
                let staged = py.detach(|| unsafe { h.copy_out(&block_ids, &groups) });
                rt.spawn(async move {
                    let keys: Vec<_> = blocks.into_iter().map(|(k, _)| k).collect();
                    let objects: Vec<Vec<Vec<&[u8]>>> = staged
                        .iter()
                        .map(|objs| objs.iter().map(|o| vec![o.as_slice()]).collect())
                        .collect();
                    let results = save_groups(&conn, &keys, &groups, &objects).await;
                    in_flight.finish(results);
                });
            }
            #[cfg(feature = "cuda")]
            Memory::Gpu(g) => {
                if let Some(ev) = after_event {
                    gpu::wait_event(g, ev)?;
                }
                let in_flight = InFlight::start(&self.saves, request_id, blocks.len());
                let (cache, owner) = (g.clone(), self.layout.clone_ref(py));
                rt.spawn(async move {
                    let results = cache.save_groups(&conn, &blocks, &groups).await;
                    let results = results.iter().map(gpu::saved).collect();
                    in_flight.finish(results);
                    // The device memory stayed referenced until the copies were done.
                    drop(owner);
                });
            }
        }
        Ok(())
    }

    /// The requests whose detached saves ended since the last call, with their per-block
    /// results (`True` or a failure tuple), in the order they ended.
    fn finished_saves<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(String, Vec<Bound<'py, PyAny>>)>> {
        let finished = std::mem::take(&mut self.saves.lock().finished);
        finished
            .into_iter()
            .map(|(id, rs)| {
                let rs = rs
                    .iter()
                    .map(|r| saved_to_py(py, r))
                    .collect::<PyResult<_>>()?;
                Ok((id, rs))
            })
            .collect()
    }

    /// Blocks until no detached save is in flight (their results stay queued for
    /// `finished_saves`), at most `timeout` seconds; whether none is.
    #[pyo3(signature = (timeout=None))]
    fn wait_saves(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(PyValueError::new_err(format!(
                    "timeout = {t}: must be a non-negative number of seconds"
                )))
            }
        };
        let saves = &self.saves;
        Ok(py.detach(|| {
            let mut s = saves.lock();
            while s.in_flight > 0 {
                s = match deadline {
                    None => saves.cv.wait(s).unwrap_or_else(|p| p.into_inner()),
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return false;
                        }
                        saves
                            .cv
                            .wait_timeout(s, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                };
            }
            true
        }))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<kvpool Connector master={:?} blocks={} groups={}>",
            self.conn.client().config().master,
            self.num_blocks(py),
            self.conn.num_groups()
        )
    }
}

/// Why GPU memory cannot be used on CUDA device `ordinal`, or `None` when it can.
#[pyfunction]
#[pyo3(signature = (ordinal=0))]
pub fn cuda_unavailable(ordinal: usize) -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        kvpool_connector::cuda::open_device(ordinal)
            .err()
            .map(|e| e.to_string())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Some(format!(
            "kvpool was built without the cuda feature (device {ordinal} not tried)"
        ))
    }
}
