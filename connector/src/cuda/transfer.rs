//! Save and load of a GPU cache's blocks through pinned staging, pipelined over two staging
//! buffers: while the pool moves one round of objects, the copy engine moves the next.
//!
//! A round is one layer group's objects of a set of blocks that fits in one staging buffer
//! (normally the whole batch). Save: device-to-host copies of round `k + 1` are enqueued
//! before the put of round `k` is awaited. Load: round `k`'s host-to-device copies are
//! enqueued and an event recorded, and round `k + 1` is fetched into the other buffer while
//! they run; a buffer is refilled only after its event completed.

use std::sync::{Arc, Condvar, Mutex};

use cudarc::driver::{CudaEvent, DriverError};

use super::cache::{Dir, GpuKvCache, Staging};
use super::plan;
use super::{GpuError, Result};
use crate::keys::BlockKey;
use crate::pool::PoolConnector;

/// A block key and its object's gather list, as `save_parts` takes them.
type SaveItem<'a> = (BlockKey, &'a [&'a [u8]]);

/// Waits for `ev` without blocking the async runtime's worker: the (blocking-sync) event wait
/// runs on the blocking pool unless the event is already complete.
async fn wait_event(ev: &Arc<CudaEvent>) -> std::result::Result<(), DriverError> {
    ev.context().bind_to_thread()?;
    if ev.try_is_complete()? {
        return Ok(());
    }
    let ev2 = ev.clone();
    match tokio::task::spawn_blocking(move || {
        ev2.context().bind_to_thread()?;
        ev2.synchronize()
    })
    .await
    {
        Ok(r) => r,
        // The runtime is shutting down: wait here rather than report a false error.
        Err(_) => ev.synchronize(),
    }
}

impl GpuKvCache {
    fn group_mismatch(&self, conn: &PoolConnector) -> Option<GpuError> {
        let (cache, connector) = (self.layout.num_groups(), conn.num_groups());
        (cache != connector).then_some(GpuError::GroupMismatch { cache, connector })
    }

    /// Enqueues the device-to-host copies of `ids`' objects of `group` into staging buffer
    /// `buf` (packed, object-major) and returns the event after them.
    async fn stage_out(
        &self,
        st: &mut Staging,
        buf: usize,
        group: usize,
        ids: &[usize],
    ) -> std::result::Result<Arc<CudaEvent>, DriverError> {
        // The buffer's previous copies (a host-to-device copy of an earlier load may still
        // read it) must be done before it is overwritten.
        if let Some(ev) = st.pending[buf].take() {
            wait_event(&ev).await?;
        }
        let ops = plan::plan_packed(&self.layout, group, ids);
        let enqueued = self.enqueue(Dir::DeviceToHost, &ops, st.addr(buf));
        // Record even after a failed enqueue: earlier copies of the list may be in flight.
        let ev = self.record_or_sync()?;
        st.pending[buf] = Some(ev.clone());
        enqueued?;
        Ok(ev)
    }

    /// An event after the stream's work so far; if even that fails, waits for the stream so
    /// that no copy can still touch a staging buffer that is reused.
    fn record_or_sync(&self) -> std::result::Result<Arc<CudaEvent>, DriverError> {
        self.record().inspect_err(|_| {
            let _ = self.stream.synchronize();
        })
    }

    /// Saves each `(key, block id)`: per layer group, the blocks' segments are copied
    /// device-to-host into pinned staging (each object contiguous) and put in one
    /// [`PoolConnector::save_parts`] batch. An object already in the pool counts as saved.
    /// One result per block, in order; a block is saved only if every group was, and a block
    /// whose group failed is not written for later groups.
    ///
    /// The blocks' device bytes must be final when this is called (see
    /// [`GpuKvCache::from_raw`]'s ordering rule); the copies run on the cache's stream.
    pub async fn save(
        &self,
        conn: &PoolConnector,
        blocks: &[(BlockKey, usize)],
    ) -> Vec<Result<()>> {
        let all: Vec<usize> = (0..self.layout.num_groups()).collect();
        self.save_groups(conn, blocks, &all).await
    }

    /// [`Self::save`] for layer groups `groups` only (each in range, listed once: a layer-wise
    /// save starts a group's objects as soon as the forward has written its layers). A group
    /// out of range fails every block.
    pub async fn save_groups(
        &self,
        conn: &PoolConnector,
        blocks: &[(BlockKey, usize)],
        groups: &[usize],
    ) -> Vec<Result<()>> {
        let ids: Vec<usize> = blocks.iter().map(|(_, b)| *b).collect();
        if self.group_mismatch(conn).is_some() {
            return blocks
                .iter()
                .map(|_| Err(self.group_mismatch(conn).expect("checked")))
                .collect();
        }
        let mut out = plan::check_blocks(&self.layout, &ids, false);
        let valid: Vec<usize> = (0..blocks.len()).filter(|&i| out[i].is_ok()).collect();
        let mut st = self.staging.lock().await;
        let mut rounds: Vec<(usize, &[usize])> = Vec::new();
        for &g in groups {
            let num_groups = self.layout.num_groups();
            if g >= num_groups {
                let e = || GpuError::GroupOutOfRange {
                    group: g,
                    num_groups,
                };
                return blocks.iter().map(|_| Err(e())).collect();
            }
            for r in plan::chunks(valid.len(), self.layout.object_len(g), st.len()) {
                rounds.push((g, &valid[r]));
            }
        }
        let ids_of = |idx: &[usize]| -> Vec<usize> { idx.iter().map(|&i| ids[i]).collect() };
        let mut next = match rounds.first() {
            Some(&(g, idx)) => Some(self.stage_out(&mut st, 0, g, &ids_of(idx)).await),
            None => None,
        };
        for (k, &(group, idx)) in rounds.iter().enumerate() {
            let cur = next.take().expect("staged one round ahead");
            // Keep the copy engine busy during this round's put.
            if let Some(&(g, nidx)) = rounds.get(k + 1) {
                next = Some(self.stage_out(&mut st, (k + 1) % 2, g, &ids_of(nidx)).await);
            }
            let ready = match cur {
                Ok(ev) => wait_event(&ev).await,
                Err(e) => Err(e),
            };
            if let Err(e) = ready {
                for &i in idx {
                    if out[i].is_ok() {
                        out[i] = Err(e.into());
                    }
                }
                continue;
            }
            let len = self.layout.object_len(group);
            // SAFETY: this round's device-to-host copies into buffer `k % 2` completed (its
            // event was waited for, which also orders the bytes' writes before these reads);
            // the copies staged meanwhile go to the other buffer.
            let bytes = unsafe { st.bytes(k % 2, idx.len() * len) };
            let parts: Vec<[&[u8]; 1]> = bytes.chunks(len).map(|c| [c]).collect();
            let (which, items): (Vec<usize>, Vec<SaveItem>) = idx
                .iter()
                .zip(&parts)
                .filter(|(i, _)| out[**i].is_ok())
                .map(|(&i, p)| (i, (blocks[i].0.clone(), &p[..])))
                .unzip();
            if items.is_empty() {
                continue;
            }
            let res = conn.save_parts(group, &items).await;
            for (i, r) in which.into_iter().zip(res) {
                if let Err(e) = r {
                    out[i] = Err(e.into());
                }
            }
        }
        out
    }

    /// Loads each `(key, block id)`: per layer group, one [`PoolConnector::load_parts`]
    /// batch into pinned staging, then host-to-device copies of the objects that arrived into
    /// their blocks' segments, with an event per group; group `g`'s copies run while group
    /// `g + 1` is fetched. Returns when every fetch is done and every copy enqueued; the
    /// handle waits for the copies ([`GpuLoad::wait_group`], [`GpuLoad::wait_all`]).
    ///
    /// A block that misses (or fails) in a group is not fetched for later groups; a miss
    /// leaves that group's device bytes untouched, earlier groups' bytes are overwritten.
    pub async fn load(&self, conn: &PoolConnector, blocks: &[(BlockKey, usize)]) -> GpuLoad {
        let shared = Arc::new(LoadShared::new(self.layout.num_groups(), blocks.len()));
        {
            let _abort = AbortOnDrop(&shared);
            self.run_load(conn, blocks, &shared).await;
        }
        GpuLoad { shared }
    }

    /// [`Self::load`] in a spawned task, returning the handle at once: the engine can wait
    /// for group 0 and compute on it while later groups are still being fetched (vLLM's
    /// `start_load_kv` / `wait_for_layer_load`). Must be called inside a tokio runtime.
    pub fn start_load(
        self: &Arc<Self>,
        conn: Arc<PoolConnector>,
        blocks: Vec<(BlockKey, usize)>,
    ) -> GpuLoad {
        let shared = Arc::new(LoadShared::new(self.layout.num_groups(), blocks.len()));
        let cache = self.clone();
        let task_shared = shared.clone();
        tokio::spawn(async move {
            let _abort = AbortOnDrop(&task_shared);
            cache.run_load(&conn, &blocks, &task_shared).await;
        });
        GpuLoad { shared }
    }

    async fn run_load(
        &self,
        conn: &PoolConnector,
        blocks: &[(BlockKey, usize)],
        shared: &LoadShared,
    ) {
        if self.group_mismatch(conn).is_some() {
            let out = blocks
                .iter()
                .map(|_| Err(self.group_mismatch(conn).expect("checked")))
                .collect();
            return shared.finish(out);
        }
        let ids: Vec<usize> = blocks.iter().map(|(_, b)| *b).collect();
        let mut out: Vec<Result<bool>> = plan::check_blocks(&self.layout, &ids, true)
            .into_iter()
            .map(|r| r.map(|()| true))
            .collect();
        let mut st = self.staging.lock().await;
        let mut round = 0usize;
        for group in 0..self.layout.num_groups() {
            let len = self.layout.object_len(group);
            let idx: Vec<usize> = (0..blocks.len())
                .filter(|&i| matches!(out[i], Ok(true)))
                .collect();
            let mut group_event = None;
            for r in plan::chunks(idx.len(), len, st.len()) {
                let chunk = &idx[r];
                let buf = round % 2;
                round += 1;
                if let Some(ev) = st.pending[buf].take() {
                    if let Err(e) = wait_event(&ev).await {
                        for &i in chunk {
                            out[i] = Err(e.into());
                        }
                        continue;
                    }
                }
                let keys: Vec<BlockKey> = chunk.iter().map(|&i| blocks[i].0.clone()).collect();
                let res = {
                    // SAFETY: the buffer's earlier copies completed (its pending event was
                    // waited for just above), and nothing is enqueued on it until these
                    // slices end with this block.
                    let bytes = unsafe { st.bytes_mut(buf, chunk.len() * len) };
                    let mut parts: Vec<[&mut [u8]; 1]> =
                        bytes.chunks_mut(len).map(|c| [c]).collect();
                    let mut dests: Vec<&mut [&mut [u8]]> =
                        parts.iter_mut().map(|p| &mut p[..]).collect();
                    conn.load_parts(group, &keys, &mut dests).await
                };
                let mut arrived = Vec::new();
                let mut objects = Vec::new();
                for (j, (&i, r)) in chunk.iter().zip(res).enumerate() {
                    match r {
                        Ok(true) => {
                            arrived.push(i);
                            objects.push((ids[i], j * len));
                        }
                        Ok(false) => out[i] = Ok(false),
                        Err(e) => out[i] = Err(e.into()),
                    }
                }
                if objects.is_empty() {
                    continue;
                }
                let ops = plan::plan_copies(&self.layout, group, &objects);
                let enqueued = self.enqueue(Dir::HostToDevice, &ops, st.addr(buf));
                match self.record_or_sync() {
                    Ok(ev) => {
                        st.pending[buf] = Some(ev.clone());
                        group_event = Some(ev);
                    }
                    Err(e) => {
                        for &i in &arrived {
                            out[i] = Err(e.into());
                        }
                    }
                }
                if let Err(e) = enqueued {
                    for &i in &arrived {
                        out[i] = Err(e.into());
                    }
                }
            }
            shared.publish(group, group_event);
        }
        shared.finish(out);
    }
}

/// What a load has published so far.
struct LoadState {
    /// `Some(event)` once group `g`'s copies are all enqueued (`Some(None)`: nothing to copy).
    groups: Vec<Option<Option<Arc<CudaEvent>>>>,
    results: Option<Vec<Result<bool>>>,
    done: bool,
    aborted: bool,
    num_blocks: usize,
}

struct LoadShared {
    state: Mutex<LoadState>,
    cv: Condvar,
}

impl LoadShared {
    fn new(num_groups: usize, num_blocks: usize) -> Self {
        Self {
            state: Mutex::new(LoadState {
                groups: vec![None; num_groups],
                results: None,
                done: false,
                aborted: false,
                num_blocks,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadState> {
        // A panic while holding this lock only ever leaves plain data behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, group: usize, ev: Option<Arc<CudaEvent>>) {
        self.lock().groups[group] = Some(ev);
        self.cv.notify_all();
    }

    fn finish(&self, results: Vec<Result<bool>>) {
        let mut s = self.lock();
        s.results = Some(results);
        s.done = true;
        drop(s);
        self.cv.notify_all();
    }
}

/// Marks a load aborted if its task ends without finishing (panic, cancelled future), so
/// that waiters wake up with an error instead of hanging.
struct AbortOnDrop<'a>(&'a LoadShared);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        if !s.done {
            s.done = true;
            s.aborted = true;
            drop(s);
            self.0.cv.notify_all();
        }
    }
}

/// A load in progress or done: wait for a layer group's blocks to be in device memory, or for
/// all of them and the per-block results.
///
/// The waits block the calling thread (an engine's forward pass does that between layers);
/// from async code, call them in `spawn_blocking`, or only after [`GpuKvCache::load`]
/// returned (then they wait for copies only, never for the pool).
pub struct GpuLoad {
    shared: Arc<LoadShared>,
}

impl std::fmt::Debug for GpuLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("GpuLoad")
            .field("groups", &s.groups.len())
            .field("done", &s.done)
            .finish()
    }
}

impl GpuLoad {
    pub fn num_groups(&self) -> usize {
        self.shared.lock().groups.len()
    }

    /// Whether every fetch is done and every copy enqueued (the copies may still run).
    pub fn is_fetched(&self) -> bool {
        self.shared.lock().done
    }

    /// Blocks until layer group `group` is in device memory for every block that loaded it.
    /// Which blocks did is in [`Self::wait_all`]'s results; a block that missed must not be
    /// used.
    pub fn wait_group(&self, group: usize) -> Result<()> {
        let ev = {
            let mut s = self.shared.lock();
            if group >= s.groups.len() {
                return Err(GpuError::GroupOutOfRange {
                    group,
                    num_groups: s.groups.len(),
                });
            }
            loop {
                if let Some(ev) = &s.groups[group] {
                    break ev.clone();
                }
                if s.done {
                    if s.aborted {
                        return Err(GpuError::LoadAborted);
                    }
                    // No block was left to fetch for this group.
                    break None;
                }
                s = self.shared.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        if let Some(ev) = ev {
            ev.context().bind_to_thread()?;
            ev.synchronize()?;
        }
        Ok(())
    }

    /// Blocks until the load is finished and its copies done; one result per block, in
    /// order: `Ok(true)` every group is in device memory, `Ok(false)` a miss (recompute it).
    pub fn wait_all(self) -> Vec<Result<bool>> {
        let (results, events, n) = {
            let mut s = self.shared.lock();
            while !s.done {
                s = self.shared.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            let events: Vec<Arc<CudaEvent>> =
                s.groups.iter().flatten().flatten().cloned().collect();
            (s.results.take(), events, s.num_blocks)
        };
        let Some(mut results) = results else {
            return (0..n).map(|_| Err(GpuError::LoadAborted)).collect();
        };
        // Stream order: the last event covers every copy, but a failure is reported by the
        // event that saw it, so wait for each.
        let mut failed = None;
        for ev in &events {
            let r = ev
                .context()
                .bind_to_thread()
                .and_then(|()| ev.synchronize());
            if let Err(e) = r {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            for r in &mut results {
                if matches!(r, Ok(true)) {
                    *r = Err(e.into());
                }
            }
        }
        results
    }
}
