//! Lookup, save and load of a host KV cache's blocks against the pool, batched: one master
//! round trip per layer group, never one per block.
//!
//! Every batch goes to the pool **tail first** (blocks in reverse prefix order; results are
//! given back in the caller's order). The master keeps objects in access order, touching a
//! batch's items in the order they come, and evicts (and demotes) the least recently touched
//! first: sent head first, a prefix's first block would be its coldest and go first, leaving
//! a tail that no prefix lookup can reach. Sent tail first, a prefix always loses its tail
//! before its head, so what survives of it is still a usable prefix. Callers list blocks in
//! prefix order (as `BlockHasher::keys` gives them).
//!
//! A block is stored as one object per layer group (`KvLayout::num_groups`), keyed
//! `BlockKey::wire(layout.key_group(g))`. A block counts as present only when every group's
//! object is, because a block with a missing layer group cannot be used.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use kvpool_client::{Client, ClientError, ErrorCode};
use kvpool_proto::PutOptions;

use crate::cache::{CacheError, HostKvCache};
use crate::keys::BlockKey;
use crate::layout::KvLayout;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The cache's layer grouping differs from the connector's: the keys would name other
    /// objects than the bytes.
    #[error("cache has {cache} layer groups, connector {connector}")]
    GroupMismatch { cache: usize, connector: usize },
    /// A stored object is shorter than this layout's object: written under another layout
    /// with the same key, which a correct namespace rules out. Its bytes are not used.
    #[error("object of group {group} is {got} bytes, the layout's is {want}")]
    ObjectLength { group: usize, got: u64, want: usize },
}

impl ConnectorError {
    /// The stable code, for callers that report failures per request.
    pub fn code(&self) -> ErrorCode {
        match self {
            ConnectorError::Client(c) => c.code(),
            ConnectorError::Cache(_)
            | ConnectorError::GroupMismatch { .. }
            | ConnectorError::ObjectLength { .. } => ErrorCode::InvalidArgument,
        }
    }
}

pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;

/// The pool side of one engine (one TP/PP rank): a client and the layer grouping of its
/// objects. Block keys come from the caller's [`crate::BlockHasher`], whose namespace must name
/// this grouping (see docs/connector.md, "Object format").
pub struct PoolConnector {
    client: Arc<Client>,
    /// `key_group(g)` for each group: the `/g<g>` suffix, or none with one object per block.
    groups: Vec<Option<usize>>,
    put_options: PutOptions,
    finished_tx: mpsc::UnboundedSender<(String, Vec<Result<()>>)>,
    finished_rx: Mutex<mpsc::UnboundedReceiver<(String, Vec<Result<()>>)>>,
}

impl PoolConnector {
    /// A connector for caches of `layout`'s grouping (the layout's addresses are not used).
    pub fn new(client: Arc<Client>, layout: &KvLayout) -> Self {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Self {
            finished_tx,
            finished_rx: Mutex::new(finished_rx),
            client,
            groups: (0..layout.num_groups())
                .map(|g| layout.key_group(g))
                .collect(),
            put_options: PutOptions::default(),
        }
    }

    /// Replicas, pins and preferred nodes for saved objects (default: one replica, no pin).
    pub fn with_put_options(mut self, opts: PutOptions) -> Self {
        self.put_options = opts;
        self
    }

    /// The storage nodes on host `host` (an IP or name as the nodes advertise their data
    /// address), alive and not draining: what an engine passes as `preferred_nodes` so its
    /// saves, and a producer's hand-offs, land in its own host's memory and cost no network.
    pub async fn local_nodes(&self, host: &str) -> Result<Vec<kvpool_proto::NodeId>> {
        let status = self.client.status().await?;
        Ok(status
            .nodes
            .into_iter()
            .filter(|n| n.alive && !n.draining)
            .filter(|n| n.addr.rsplit_once(':').map(|(h, _)| h) == Some(host))
            .map(|n| n.id)
            .collect())
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    fn wire_keys(&self, keys: impl Iterator<Item = BlockKey>, group: usize) -> Vec<String> {
        keys.map(|k| k.wire(self.groups[group])).collect()
    }

    fn check_cache(&self, cache: &HostKvCache) -> Result<()> {
        let n = cache.layout().num_groups();
        if n != self.groups.len() || (0..n).any(|g| cache.layout().key_group(g) != self.groups[g]) {
            return Err(ConnectorError::GroupMismatch {
                cache: n,
                connector: self.groups.len(),
            });
        }
        Ok(())
    }

    /// How many leading blocks of `keys` are in the pool (every group's object present).
    /// Prefix only: a hole ends the match, because block `i`'s KV is useless without blocks
    /// `0..i`. The present objects get a read lease, so they survive until the load that
    /// normally follows (or the lease's expiry). One `exists` call for all keys and groups.
    ///
    /// An error for an object inside the matched prefix is returned (the caller may treat it
    /// as a miss and recompute); errors past the first hole do not matter and are ignored.
    pub async fn lookup(&self, keys: &[BlockKey]) -> Result<usize> {
        let g = self.groups.len();
        // Block-major order, sent tail first (see `tail_first`); after un-reversing, block i's
        // groups are items i*g .. (i+1)*g.
        let wire: Vec<String> = keys
            .iter()
            .rev()
            .flat_map(|k| self.groups.iter().rev().map(move |grp| k.wire(*grp)))
            .collect();
        let refs: Vec<&[u8]> = wire.iter().map(|k| k.as_bytes()).collect();
        let mut found = self.client.exists(&refs, true).await;
        found.reverse();
        let mut n = 0;
        for block in found.chunks(g.max(1)) {
            for r in block {
                match r {
                    Ok(true) => {}
                    Ok(false) => return Ok(n),
                    Err(e) => return Err(clone_client_err(e).into()),
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// One put batch for layer group `group`: each item is a block key and its object's
    /// gather list (the slices concatenated are the object). A block already in the pool
    /// (`AlreadyExists`, e.g. saved by another engine with the same prefix) or being put by
    /// another writer (`Processing`) counts as saved: same key means same tokens in the same
    /// namespace, so the same KV. (If that other put fails, the block is simply not in the
    /// pool: a later lookup misses and the prefix is recomputed, never wrong.) One result per
    /// item.
    ///
    /// This is the memory-agnostic primitive: host caches, pinned staging for GPU caches and
    /// detached saves all come down to it.
    pub async fn save_parts(
        &self,
        group: usize,
        items: &[(BlockKey, &[&[u8]])],
    ) -> Vec<Result<()>> {
        if group >= self.groups.len() {
            let e = self.group_range_err(group);
            return items.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let keys = self.wire_keys(items.iter().map(|(k, _)| k.clone()), group);
        let batch: Vec<(&[u8], &[&[u8]])> = keys
            .iter()
            .zip(items)
            .map(|(k, (_, p))| (k.as_bytes(), *p))
            .rev()
            .collect();
        let mut res = self.client.put_batch_parts(&batch, &self.put_options).await;
        res.reverse();
        res.into_iter()
            .map(|r| match r {
                Ok(()) => Ok(()),
                // Someone else has it, or is putting it right now (two engines that computed
                // the same prefix at once): same key, same bytes, nothing left to do here.
                Err(e) if matches!(e.code(), ErrorCode::AlreadyExists | ErrorCode::Processing) => {
                    Ok(())
                }
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    /// One get batch for layer group `group`, scattering each object straight into its
    /// scatter list. `Ok(true)`: loaded; `Ok(false)`: a miss; an object whose length differs
    /// from the list's total is an error (written under another layout with the same key,
    /// which a correct namespace rules out) and its bytes must not be used.
    pub async fn load_parts(
        &self,
        group: usize,
        keys: &[BlockKey],
        dests: &mut [&mut [&mut [u8]]],
    ) -> Vec<Result<bool>> {
        if group >= self.groups.len() {
            let e = self.group_range_err(group);
            return keys.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let wants: Vec<usize> = dests
            .iter()
            .map(|d| d.iter().map(|p| p.len()).sum())
            .collect();
        let wire = self.wire_keys(keys.iter().rev().cloned(), group);
        let refs: Vec<&[u8]> = wire.iter().map(|k| k.as_bytes()).collect();
        dests.reverse();
        let mut res = self.client.get_batch_into_parts(&refs, dests).await;
        dests.reverse();
        res.reverse();
        res.into_iter()
            .zip(wants)
            .map(|(r, want)| match r {
                Ok(Some(len)) if len as usize == want => Ok(true),
                // Longer objects fail as BufferTooSmall in the client; shorter ones here.
                Ok(Some(len)) => Err(ConnectorError::ObjectLength {
                    group,
                    got: len,
                    want,
                }),
                Ok(None) => Ok(false),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    /// Saves each `(key, block id)` from `cache`, gathering straight from the cache (no
    /// staging copy); all layer groups' batches are in flight together. One result per
    /// block, in order; a block is saved only if every group was.
    pub async fn save(&self, cache: &HostKvCache, blocks: &[(BlockKey, usize)]) -> Vec<Result<()>> {
        let mut out = self.check_blocks(cache, blocks);
        let (idx, keys) = accepted(&out, blocks);
        let objects: Vec<Vec<Vec<&[u8]>>> = (0..self.groups.len())
            .map(|g| {
                idx.iter()
                    .map(|&i| cache.block_parts(blocks[i].1, g))
                    .collect()
            })
            .collect();
        for (&i, r) in idx.iter().zip(self.save_groups(&keys, &objects).await) {
            out[i] = r;
        }
        out
    }

    /// Copies each `(key, block id)`'s objects out of `cache` and saves them in a spawned
    /// task, so the engine's step pays one memcpy per object instead of the transfer. The
    /// handle reports the per-block results; they are also queued for
    /// [`Self::finished_saves`] under `request_id`, the way vLLM's `get_finished` reports
    /// finished sends per request.
    ///
    /// Must be called inside a tokio runtime.
    pub fn save_detached(
        self: &Arc<Self>,
        request_id: &str,
        cache: &HostKvCache,
        blocks: &[(BlockKey, usize)],
    ) -> SaveHandle {
        let mut out = self.check_blocks(cache, blocks);
        let (idx, keys) = accepted(&out, blocks);
        // [group][n] -> block idx[n]'s object bytes: owned, so the task outlives the borrow.
        let staged: Vec<Vec<Vec<u8>>> = (0..self.groups.len())
            .map(|g| {
                idx.iter()
                    .map(|&i| cache.block_parts(blocks[i].1, g).concat())
                    .collect()
            })
            .collect();
        let this = Arc::clone(self);
        let request_id = request_id.to_string();
        let task = tokio::spawn(async move {
            let objects: Vec<Vec<Vec<&[u8]>>> = staged
                .iter()
                .map(|objs| objs.iter().map(|o| vec![o.as_slice()]).collect())
                .collect();
            for (&i, r) in idx.iter().zip(this.save_groups(&keys, &objects).await) {
                out[i] = r;
            }
            let report = out
                .iter()
                .map(|r| r.as_ref().map(|_| ()).map_err(clone_err))
                .collect();
            // The receiver lives as long as the connector, which `this` keeps alive.
            let _ = this.finished_tx.send((request_id, report));
            out
        });
        SaveHandle { task }
    }

    /// Per block: `Ok` if it may be saved from `cache`, else why not (the cache is not of
    /// this connector's grouping, or the id is out of range), so a bad id fails its block
    /// before anything is copied or written.
    fn check_blocks(&self, cache: &HostKvCache, blocks: &[(BlockKey, usize)]) -> Vec<Result<()>> {
        if let Err(e) = self.check_cache(cache) {
            return blocks.iter().map(|_| Err(clone_err(&e))).collect();
        }
        blocks
            .iter()
            .map(|(_, b)| cache.try_block_parts(*b, 0).map(|_| ()).map_err(Into::into))
            .collect()
    }

    /// Every layer group's batch at once; `objects[g][n]` is the gather list of block
    /// `keys[n]`'s object for group `g`. One result per block: its first failing group's
    /// error, if any.
    async fn save_groups(&self, keys: &[BlockKey], objects: &[Vec<Vec<&[u8]>>]) -> Vec<Result<()>> {
        let batches = objects.iter().enumerate().map(|(g, per_block)| {
            let items: Vec<(BlockKey, &[&[u8]])> = keys
                .iter()
                .zip(per_block)
                .map(|(k, p)| (k.clone(), p.as_slice()))
                .collect();
            async move { self.save_parts(g, &items).await }
        });
        let mut out: Vec<Result<()>> = keys.iter().map(|_| Ok(())).collect();
        for res in futures::future::join_all(batches).await {
            for (o, r) in out.iter_mut().zip(res) {
                if o.is_ok() {
                    *o = r;
                }
            }
        }
        out
    }

    /// The requests whose detached saves finished since the last call, with their per-block
    /// results.
    pub fn finished_saves(&self) -> Vec<(String, Vec<Result<()>>)> {
        let mut rx = self.finished_rx.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// Loads each `(key, block id)` into `cache`, scattering every object straight into the
    /// block's slices. `Ok(true)`: every group was loaded; `Ok(false)`: a miss (the block, or
    /// one of its groups, is not in the pool; its bytes in the cache are then partly
    /// overwritten and must be recomputed). One result per block, in order.
    pub async fn load(
        &self,
        cache: &mut HostKvCache,
        blocks: &[(BlockKey, usize)],
    ) -> Vec<Result<bool>> {
        match self.load_layerwise(cache, blocks, usize::MAX) {
            Ok(mut l) => {
                while l.next().await.is_some() {}
                l.finish()
            }
            Err(e) => blocks.iter().map(|_| Err(clone_err(&e))).collect(),
        }
    }

    /// Starts a layer-wise load: each layer group is one batch, at most `window` groups in
    /// flight, and [`LayerwiseLoad::next`] hands back group 0, then 1, ... as each lands, with
    /// the group's bytes, so an engine computes on layer group `g` while `g + 1` is in
    /// flight. Transfers progress while the load is polled: run it concurrently with the
    /// engine's work (`tokio::join!`, a spawned GPU launch) rather than between awaits.
    pub fn load_layerwise<'a>(
        &'a self,
        cache: &'a mut HostKvCache,
        blocks: &[(BlockKey, usize)],
        window: usize,
    ) -> Result<LayerwiseLoad<'a>> {
        self.check_cache(cache)?;
        let ids: Vec<usize> = blocks.iter().map(|(_, b)| *b).collect();
        let dests = cache.blocks_groups_parts_mut(&ids, 0..self.groups.len())?;
        let keys: Arc<[BlockKey]> = blocks.iter().map(|(k, _)| k.clone()).collect();
        let pending = dests
            .into_iter()
            .enumerate()
            .map(|(g, mut parts)| {
                let keys = Arc::clone(&keys);
                let fut: GroupFuture<'a> = Box::pin(async move {
                    let mut refs: Vec<&mut [&mut [u8]]> =
                        parts.iter_mut().map(|p| p.as_mut_slice()).collect();
                    let res = self.load_parts(g, &keys, &mut refs).await;
                    drop(refs);
                    GroupLoaded {
                        group: g,
                        results: res,
                        blocks: parts,
                    }
                });
                fut
            })
            .collect::<Vec<_>>()
            .into_iter();
        let mut load = LayerwiseLoad {
            pending,
            in_flight: futures::stream::FuturesOrdered::new(),
            window: window.max(1),
            combined: blocks.iter().map(|_| Ok(true)).collect(),
        };
        load.refill();
        Ok(load)
    }

    fn group_range_err(&self, group: usize) -> ConnectorError {
        ConnectorError::Cache(CacheError::GroupOutOfRange {
            group,
            num_groups: self.groups.len(),
        })
    }
}

type GroupFuture<'a> = Pin<Box<dyn Future<Output = GroupLoaded<'a>> + Send + 'a>>;

/// One layer group of a [`LayerwiseLoad`], landed.
pub struct GroupLoaded<'a> {
    pub group: usize,
    /// Per block, as for [`PoolConnector::load`].
    pub results: Vec<Result<bool>>,
    /// Per block, the group's bytes in object order (layers ascending, K then V): the
    /// engine's view of what it may now compute on. Valid only where `results` is `Ok(true)`.
    pub blocks: Vec<Vec<&'a mut [u8]>>,
}

/// A load in progress, one layer group at a time (see [`PoolConnector::load_layerwise`]).
pub struct LayerwiseLoad<'a> {
    pending: std::vec::IntoIter<GroupFuture<'a>>,
    in_flight: futures::stream::FuturesOrdered<GroupFuture<'a>>,
    window: usize,
    combined: Vec<Result<bool>>,
}

impl<'a> LayerwiseLoad<'a> {
    fn refill(&mut self) {
        while self.in_flight.len() < self.window {
            match self.pending.next() {
                Some(f) => self.in_flight.push_back(f),
                None => break,
            }
        }
    }

    /// The next layer group, in group order, once all its objects have landed; `None` after
    /// the last.
    pub async fn next(&mut self) -> Option<GroupLoaded<'a>> {
        use futures::StreamExt;
        let done = self.in_flight.next().await?;
        self.refill();
        for (c, r) in self.combined.iter_mut().zip(&done.results) {
            match (&*c, r) {
                (Ok(true), Ok(true)) => {}
                (Ok(true), Ok(false)) => *c = Ok(false),
                (Ok(_), Err(e)) => *c = Err(clone_err(e)),
                _ => {}
            }
        }
        Some(done)
    }

    /// Per block: `Ok(true)` when every group loaded so far was loaded (all of them once
    /// [`Self::next`] returned `None`), `Ok(false)` for a miss, or the first error.
    pub fn finish(self) -> Vec<Result<bool>> {
        self.combined
    }
}

/// A detached save (see [`PoolConnector::save_detached`]).
pub struct SaveHandle {
    task: tokio::task::JoinHandle<Vec<Result<()>>>,
}

impl SaveHandle {
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Per-block results, in the order given.
    pub async fn wait(self) -> Vec<Result<()>> {
        match self.task.await {
            Ok(r) => r,
            // The task never panics by design; if it did, nothing is known to be saved.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// The indices of the blocks `checked` accepts, and their keys.
fn accepted(checked: &[Result<()>], blocks: &[(BlockKey, usize)]) -> (Vec<usize>, Vec<BlockKey>) {
    (0..blocks.len())
        .filter(|&i| checked[i].is_ok())
        .map(|i| (i, blocks[i].0.clone()))
        .unzip()
}

/// A copy of a client error for each item a batch-wide failure applies to (client errors do
/// not implement `Clone`: some wrap I/O errors).
fn clone_client_err(e: &ClientError) -> ClientError {
    ClientError::Remote(kvpool_proto::WireError::new(e.code(), e.to_string()))
}

pub(crate) fn clone_err(e: &ConnectorError) -> ConnectorError {
    match e {
        ConnectorError::Client(c) => ConnectorError::Client(clone_client_err(c)),
        ConnectorError::Cache(c) => ConnectorError::Cache(c.clone()),
        ConnectorError::GroupMismatch { cache, connector } => ConnectorError::GroupMismatch {
            cache: *cache,
            connector: *connector,
        },
        ConnectorError::ObjectLength { group, got, want } => ConnectorError::ObjectLength {
            group: *group,
            got: *got,
            want: *want,
        },
    }
}
