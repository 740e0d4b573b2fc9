//! Lookup, save and load of a host KV cache's blocks against the pool, batched: one master
//! round trip per layer group, never one per block.
//!
//! A block is stored as one object per layer group (`KvLayout::num_groups`), keyed
//! `BlockKey::wire(layout.key_group(g))`. A block counts as present only when every group's
//! object is, because a block with a missing layer group cannot be used.

use std::sync::Arc;

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

pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;

/// The pool side of one engine (one TP/PP rank): a client and the layer grouping of its
/// objects. Block keys come from the caller's [`crate::BlockHasher`], whose namespace must name
/// this grouping (see docs/connector.md, "Object format").
pub struct PoolConnector {
    client: Arc<Client>,
    /// `key_group(g)` for each group: the `/g<g>` suffix, or none with one object per block.
    groups: Vec<Option<usize>>,
    put_options: PutOptions,
}

impl PoolConnector {
    /// A connector for caches of `layout`'s grouping (the layout's addresses are not used).
    pub fn new(client: Arc<Client>, layout: &KvLayout) -> Self {
        Self {
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
        // Block-major order: block i's groups are items i*g .. (i+1)*g.
        let wire: Vec<String> = keys
            .iter()
            .flat_map(|k| self.groups.iter().map(move |grp| k.wire(*grp)))
            .collect();
        let refs: Vec<&[u8]> = wire.iter().map(|k| k.as_bytes()).collect();
        let found = self.client.exists(&refs, true).await;
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

    /// Saves each `(key, block id)` from `cache`: one `put_batch_parts` per layer group,
    /// gathering the block's bytes straight from the cache (no staging copy). A block already
    /// in the pool (`AlreadyExists`, e.g. saved by another engine with the same prefix) counts
    /// as saved: same key means same tokens in the same namespace, so the same KV. One result
    /// per block, in order; a block is saved only if every group was.
    pub async fn save(&self, cache: &HostKvCache, blocks: &[(BlockKey, usize)]) -> Vec<Result<()>> {
        if let Err(e) = self.check_cache(cache) {
            return blocks.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let mut out: Vec<Result<()>> = blocks.iter().map(|_| Ok(())).collect();
        for group in 0..self.groups.len() {
            // Blocks that already failed (bad id, earlier group) are not written further.
            let mut idx = Vec::new();
            let mut parts = Vec::new();
            for (i, (_, b)) in blocks.iter().enumerate() {
                if out[i].is_err() {
                    continue;
                }
                match cache.try_block_parts(*b, group) {
                    Ok(p) => {
                        idx.push(i);
                        parts.push(p);
                    }
                    Err(e) => out[i] = Err(e.into()),
                }
            }
            if idx.is_empty() {
                break;
            }
            let keys = self.wire_keys(idx.iter().map(|&i| blocks[i].0.clone()), group);
            let items: Vec<(&[u8], &[&[u8]])> = keys
                .iter()
                .zip(&parts)
                .map(|(k, p)| (k.as_bytes(), p.as_slice()))
                .collect();
            let res = self.client.put_batch_parts(&items, &self.put_options).await;
            for (i, r) in idx.into_iter().zip(res) {
                match r {
                    Ok(()) => {}
                    Err(e) if e.code() == ErrorCode::AlreadyExists => {}
                    Err(e) => out[i] = Err(e.into()),
                }
            }
        }
        out
    }

    /// Loads each `(key, block id)` into `cache`, scattering every object straight into the
    /// block's slices. `Ok(true)`: every group was loaded; `Ok(false)`: a miss (the block, or
    /// one of its groups, is not in the pool; its bytes in the cache are then partly
    /// overwritten and must be recomputed). One result per block, in order.
    ///
    /// Groups are loaded in order, one batch each, so group 0 of every block is complete
    /// before group 1 is asked for: the order a layer-wise engine needs. Overlapping compute
    /// on group `g` with the transfer of `g + 1` needs the caller to drive
    /// [`Self::load_group`] itself; this method simply waits for each group in turn.
    pub async fn load(
        &self,
        cache: &mut HostKvCache,
        blocks: &[(BlockKey, usize)],
    ) -> Vec<Result<bool>> {
        let mut out: Vec<Result<bool>> = blocks.iter().map(|_| Ok(true)).collect();
        for group in 0..self.groups.len() {
            // A block that missed or failed in an earlier group is not fetched further.
            let idx: Vec<usize> = (0..blocks.len())
                .filter(|&i| matches!(out[i], Ok(true)))
                .collect();
            if idx.is_empty() {
                break;
            }
            let sub: Vec<(BlockKey, usize)> = idx.iter().map(|&i| blocks[i].clone()).collect();
            let res = self.load_group(cache, &sub, group).await;
            for (i, r) in idx.into_iter().zip(res) {
                out[i] = r;
            }
        }
        out
    }

    /// Loads one layer group's objects of `blocks` (one batch); results as for [`Self::load`].
    pub async fn load_group(
        &self,
        cache: &mut HostKvCache,
        blocks: &[(BlockKey, usize)],
        group: usize,
    ) -> Vec<Result<bool>> {
        if let Err(e) = self.check_cache(cache) {
            return blocks.iter().map(|_| Err(clone_err(&e))).collect();
        }
        if group >= self.groups.len() {
            let e = ConnectorError::Cache(CacheError::GroupOutOfRange {
                group,
                num_groups: self.groups.len(),
            });
            return blocks.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let want = cache.layout().object_len(group);
        let ids: Vec<usize> = blocks.iter().map(|(_, b)| *b).collect();
        let mut dests = match cache.blocks_parts_mut(&ids, group) {
            Ok(d) => d,
            Err(e) => {
                let e = ConnectorError::Cache(e);
                return blocks.iter().map(|_| Err(clone_err(&e))).collect();
            }
        };
        let keys = self.wire_keys(blocks.iter().map(|(k, _)| k.clone()), group);
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let mut dest_refs: Vec<&mut [&mut [u8]]> =
            dests.iter_mut().map(|d| d.as_mut_slice()).collect();
        let res = self
            .client
            .get_batch_into_parts(&refs, &mut dest_refs)
            .await;
        res.into_iter()
            .map(|r| match r {
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
}

/// A copy of a client error for each item a batch-wide failure applies to (client errors do
/// not implement `Clone`: some wrap I/O errors).
fn clone_client_err(e: &ClientError) -> ClientError {
    ClientError::Remote(kvpool_proto::WireError::new(e.code(), e.to_string()))
}

fn clone_err(e: &ConnectorError) -> ConnectorError {
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
