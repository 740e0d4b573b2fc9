//! A KV cache in host memory, owned as one `Vec<u8>`, with its blocks' gather/scatter lists
//! handed out as slices.
//!
//! The layout is a [`KvLayout`] built at base 0, so its segment "addresses" are offsets into
//! the buffer: the same segment computation (and merging) as for a registered GPU cache, but
//! every copy is a bounds-checked slice instead of a raw address. That is what lets the pool
//! scatter a block straight into the cache without `unsafe`.

use crate::layout::{KvLayout, LayerGroups, LayoutError, Segment};

/// Why a set of blocks cannot be handed out as mutable slices at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("block {block} out of range (num_blocks {num_blocks})")]
    BlockOutOfRange { block: usize, num_blocks: usize },
    #[error("group {group} out of range (num_groups {num_groups})")]
    GroupOutOfRange { group: usize, num_groups: usize },
    /// Two destinations would alias (the same block id twice in one load).
    #[error("block {0} is listed twice")]
    Duplicate(usize),
}

/// A host-memory KV cache: `layout` at base 0 over `buf`.
#[derive(Debug, Clone)]
pub struct HostKvCache {
    layout: KvLayout,
    buf: Vec<u8>,
}

impl HostKvCache {
    /// `[num_layers][K, V][num_blocks][block_bytes]`, zeroed (vLLM's per-layer tensors, laid
    /// end to end): one copy per region per block.
    pub fn layer_first(
        num_layers: usize,
        k_and_v: bool,
        num_blocks: usize,
        block_bytes: usize,
        groups: LayerGroups,
    ) -> Result<Self, LayoutError> {
        KvLayout::layer_first_contiguous(0, num_layers, k_and_v, num_blocks, block_bytes, groups)
            .map(Self::zeroed)
    }

    /// `[num_blocks][num_layers][K, V][block_bytes]`, zeroed (vLLM's cross-layer cache): one
    /// copy per block object.
    pub fn block_first(
        num_layers: usize,
        k_and_v: bool,
        num_blocks: usize,
        block_bytes: usize,
        groups: LayerGroups,
    ) -> Result<Self, LayoutError> {
        KvLayout::block_first_contiguous(0, num_layers, k_and_v, num_blocks, block_bytes, groups)
            .map(Self::zeroed)
    }

    /// Only the two constructors above build layouts, so regions never overlap and the buffer
    /// is exactly their extent; an arbitrary `KvLayout` could alias regions, which the mutable
    /// carving below would then have to reject at every load.
    fn zeroed(layout: KvLayout) -> Self {
        let n = layout.num_blocks();
        let len = layout
            .regions()
            .iter()
            .map(|r| r.base + (n - 1) * r.block_stride + r.block_bytes)
            .max()
            .unwrap_or(0);
        Self {
            layout,
            buf: vec![0; len],
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Index of a layer's K (`kv = 0`) or V (`kv = 1`) region; MLA caches have only `kv = 0`.
    fn region_index(&self, layer: usize, kv: usize) -> usize {
        let per_layer = self.layout.regions().len() / self.layout.num_layers();
        assert!(
            layer < self.layout.num_layers() && kv < per_layer,
            "layer {layer} / kv {kv} out of range"
        );
        layer * per_layer + kv
    }

    fn region_range(&self, layer: usize, kv: usize, block_id: usize) -> std::ops::Range<usize> {
        assert!(
            block_id < self.layout.num_blocks(),
            "block {block_id} out of range (num_blocks {})",
            self.layout.num_blocks()
        );
        let r = self.layout.regions()[self.region_index(layer, kv)];
        let start = r.base + block_id * r.block_stride;
        start..start + r.block_bytes
    }

    /// One layer's K or V bytes of one block: what the engine's attention kernel reads.
    ///
    /// # Panics
    /// If `layer`, `kv` or `block_id` is out of range.
    pub fn region_block(&self, layer: usize, kv: usize, block_id: usize) -> &[u8] {
        &self.buf[self.region_range(layer, kv, block_id)]
    }

    /// Mutable [`Self::region_block`]: what the engine's forward pass writes.
    pub fn region_block_mut(&mut self, layer: usize, kv: usize, block_id: usize) -> &mut [u8] {
        let range = self.region_range(layer, kv, block_id);
        &mut self.buf[range]
    }

    fn check(&self, block_id: usize, group: usize) -> Result<(), CacheError> {
        if block_id >= self.layout.num_blocks() {
            return Err(CacheError::BlockOutOfRange {
                block: block_id,
                num_blocks: self.layout.num_blocks(),
            });
        }
        if group >= self.layout.num_groups() {
            return Err(CacheError::GroupOutOfRange {
                group,
                num_groups: self.layout.num_groups(),
            });
        }
        Ok(())
    }

    /// The gather list of block `block_id`'s object for `group`: the object's bytes are these
    /// slices concatenated (layer ascending, K then V; adjacent ranges merged).
    ///
    /// # Panics
    /// If `block_id` or `group` is out of range.
    pub fn block_parts(&self, block_id: usize, group: usize) -> Vec<&[u8]> {
        self.layout
            .segments(block_id, group)
            .into_iter()
            .map(|s| &self.buf[s.addr..s.addr + s.len])
            .collect()
    }

    /// [`Self::block_parts`] with errors instead of panics, for ids that come from a caller.
    pub fn try_block_parts(&self, block_id: usize, group: usize) -> Result<Vec<&[u8]>, CacheError> {
        self.check(block_id, group)?;
        Ok(self.block_parts(block_id, group))
    }

    /// The scatter list of one block's object for `group`, in object order.
    ///
    /// # Panics
    /// If `block_id` or `group` is out of range.
    pub fn block_parts_mut(&mut self, block_id: usize, group: usize) -> Vec<&mut [u8]> {
        self.blocks_parts_mut(&[block_id], group)
            .unwrap_or_else(|e| panic!("{e}"))
            .pop()
            .unwrap_or_default()
    }

    /// The scatter lists of several blocks' objects for `group` at once (one per block, each
    /// in object order), so a whole batch can be loaded in one request. Fails if an id is out
    /// of range or listed twice (two destinations would alias).
    pub fn blocks_parts_mut(
        &mut self,
        block_ids: &[usize],
        group: usize,
    ) -> Result<Vec<Vec<&mut [u8]>>, CacheError> {
        let mut by_group = self.blocks_groups_parts_mut(block_ids, group..group + 1)?;
        Ok(by_group.pop().unwrap_or_default())
    }

    /// The scatter lists of several blocks for several groups at once, indexed
    /// `[group - groups.start][block][part]`: disjoint slices, so every group can be in flight
    /// at the same time (layer-wise loading) while each stays a safe `&mut`.
    pub fn blocks_groups_parts_mut(
        &mut self,
        block_ids: &[usize],
        groups: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<Vec<&mut [u8]>>>, CacheError> {
        // Every (group, block, position in its list, segment), sorted by offset, so the buffer
        // can be split front to back into disjoint slices with `split_at_mut`: safe
        // aliasing-free carving, then put back into each block's object order.
        let mut segs: Vec<(usize, usize, usize, Segment)> = Vec::new();
        let mut out: Vec<Vec<Vec<Option<&mut [u8]>>>> = Vec::with_capacity(groups.len());
        for (gi, g) in groups.clone().enumerate() {
            let mut per_block = Vec::with_capacity(block_ids.len());
            for (i, &b) in block_ids.iter().enumerate() {
                self.check(b, g)?;
                let list = self.layout.segments(b, g);
                per_block.push((0..list.len()).map(|_| None).collect());
                segs.extend(list.into_iter().enumerate().map(|(j, s)| (gi, i, j, s)));
            }
            out.push(per_block);
        }
        segs.sort_by_key(|&(_, _, _, s)| s.addr);
        let mut rest: &mut [u8] = &mut self.buf;
        let mut consumed = 0;
        for (gi, i, j, s) in segs {
            if s.addr < consumed {
                // The layouts built here never overlap themselves, so an overlap is the same
                // block twice.
                return Err(CacheError::Duplicate(block_ids[i]));
            }
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(s.addr - consumed);
            let (part, tail) = tail.split_at_mut(s.len);
            rest = tail;
            consumed = s.addr + s.len;
            out[gi][i][j] = Some(part);
        }
        Ok(out
            .into_iter()
            .map(|blocks| {
                blocks
                    .into_iter()
                    .map(|parts| parts.into_iter().flatten().collect())
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BB: usize = 8;

    /// Fills each region block with a byte naming (layer, kv, block).
    fn filled(mut c: HostKvCache) -> HostKvCache {
        for l in 0..c.layout().num_layers() {
            for kv in 0..2 {
                for b in 0..c.layout().num_blocks() {
                    c.region_block_mut(l, kv, b)
                        .fill((l * 100 + kv * 10 + b) as u8);
                }
            }
        }
        c
    }

    fn object(c: &HostKvCache, b: usize, g: usize) -> Vec<u8> {
        c.block_parts(b, g).concat()
    }

    #[test]
    fn both_layouts_give_the_same_object_bytes() {
        for groups in [LayerGroups::All, LayerGroups::PerObject(2)] {
            let a = filled(HostKvCache::layer_first(3, true, 4, BB, groups).unwrap());
            let b = filled(HostKvCache::block_first(3, true, 4, BB, groups).unwrap());
            for g in 0..a.layout().num_groups() {
                for blk in 0..4 {
                    let oa = object(&a, blk, g);
                    assert_eq!(oa, object(&b, blk, g));
                    assert_eq!(oa.len(), a.layout().object_len(g));
                    // Object order: layer ascending, K then V.
                    let want: Vec<u8> = a
                        .layout()
                        .group_layers(g)
                        .flat_map(|l| [l * 100 + blk, l * 100 + 10 + blk])
                        .flat_map(|v| [v as u8; BB])
                        .collect();
                    assert_eq!(oa, want);
                }
            }
        }
        // Block-first merges a block's object into one slice.
        let b = HostKvCache::block_first(3, true, 4, BB, LayerGroups::All).unwrap();
        assert_eq!(b.block_parts(2, 0).len(), 1);
    }

    #[test]
    fn scatter_writes_only_the_listed_blocks() {
        let mut c = filled(HostKvCache::layer_first(2, true, 4, BB, LayerGroups::All).unwrap());
        let before = c.clone();
        let mut dests = c.blocks_parts_mut(&[3, 1], 0).unwrap();
        // Listed order is kept, whatever the offsets.
        for (i, parts) in dests.iter_mut().enumerate() {
            assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 4 * BB);
            for p in parts.iter_mut() {
                p.fill(200 + i as u8);
            }
        }
        assert_eq!(object(&c, 3, 0), vec![200; 4 * BB]);
        assert_eq!(object(&c, 1, 0), vec![201; 4 * BB]);
        for b in [0, 2] {
            assert_eq!(object(&c, b, 0), object(&before, b, 0));
        }
    }

    #[test]
    fn bad_ids_are_errors() {
        let mut c = HostKvCache::block_first(2, true, 4, BB, LayerGroups::PerObject(1)).unwrap();
        assert_eq!(
            c.blocks_parts_mut(&[1, 1], 0).unwrap_err(),
            CacheError::Duplicate(1)
        );
        assert_eq!(
            c.blocks_parts_mut(&[4], 0).unwrap_err(),
            CacheError::BlockOutOfRange {
                block: 4,
                num_blocks: 4
            }
        );
        assert_eq!(
            c.try_block_parts(0, 2).unwrap_err(),
            CacheError::GroupOutOfRange {
                group: 2,
                num_groups: 2
            }
        );
    }
}
