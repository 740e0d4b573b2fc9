//! A registered KV cache as per-layer regions, and the gather/scatter list that maps one
//! block's pool object onto it.
//!
//! A KV cache is registered once (as vLLM's `register_kv_caches` does) as an ordered list of
//! regions: for each layer, its K region then its V region (or one region per layer for
//! MLA-style caches). Block `b` of a region lives at `base + b * block_stride` and is
//! `block_bytes` long. A pool object holds one block of every layer in its layer group,
//! concatenated in region order; [`KvLayout::segments`] lists the address ranges to copy, with
//! adjacent ranges merged, because copy cost is per operation (a 16 KiB copy moves about
//! 1.1 GB/s over PCIe, a 2 MiB one about 50 GB/s).
//!
//! Addresses are plain `usize` here: nothing in this module dereferences them.

use std::ops::Range;

/// One registered region (a layer's K, a layer's V, or a layer's single MLA cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerRegion {
    /// Address of block 0.
    pub base: usize,
    /// Distance between consecutive blocks; at least `block_bytes`.
    pub block_stride: usize,
    /// Bytes of one block in this region.
    pub block_bytes: usize,
}

/// How layers are split into pool objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerGroups {
    /// One object per block holding every layer: fewest keys and lookups.
    All,
    /// One object per `n` consecutive layers (the last group may be shorter): lets layer-wise
    /// loading start computing on group 0 while later groups are in flight.
    PerObject(usize),
}

/// The shape of one block of one region in vLLM's paged cache
/// (`[block_size, kv_heads, head_dim]` elements of `dtype_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype_bytes: usize,
}

impl BlockShape {
    pub fn bytes(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim * self.dtype_bytes
    }
}

/// One contiguous range to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: usize,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("a layout needs at least one layer")]
    NoLayers,
    #[error("regions per layer must be 1 (MLA) or 2 (K and V), got {0}")]
    RegionsPerLayer(usize),
    #[error("{regions} regions is not a multiple of {per_layer} regions per layer")]
    RegionCount { regions: usize, per_layer: usize },
    #[error("region {0}: block_bytes is 0")]
    EmptyBlock(usize),
    #[error("region {0}: block_stride is smaller than block_bytes (blocks would overlap)")]
    StrideTooSmall(usize),
    #[error("region {0}: the last block's end does not fit in the address space")]
    Overflow(usize),
    #[error("num_blocks must be > 0")]
    NoBlocks,
    #[error("layers per object must be > 0")]
    EmptyGroup,
    #[error("expected {expected} base addresses, got {got}")]
    Bases { expected: usize, got: usize },
}

/// A registered KV cache: regions in layer order (K then V within a layer), the number of
/// blocks each region holds, and how layers are grouped into objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    regions: Vec<LayerRegion>,
    regions_per_layer: usize,
    num_blocks: usize,
    groups: LayerGroups,
}

impl KvLayout {
    /// A layout from explicit regions, ordered layer 0 (K, V), layer 1 (K, V), ...
    /// Validation up front means [`Self::segments`] can never compute an address past a
    /// region's last block (in-range block ids) or overflow.
    pub fn new(
        regions: Vec<LayerRegion>,
        regions_per_layer: usize,
        num_blocks: usize,
        groups: LayerGroups,
    ) -> Result<Self, LayoutError> {
        if !(1..=2).contains(&regions_per_layer) {
            return Err(LayoutError::RegionsPerLayer(regions_per_layer));
        }
        if regions.is_empty() {
            return Err(LayoutError::NoLayers);
        }
        if !regions.len().is_multiple_of(regions_per_layer) {
            return Err(LayoutError::RegionCount {
                regions: regions.len(),
                per_layer: regions_per_layer,
            });
        }
        if num_blocks == 0 {
            return Err(LayoutError::NoBlocks);
        }
        if groups == LayerGroups::PerObject(0) {
            return Err(LayoutError::EmptyGroup);
        }
        for (i, r) in regions.iter().enumerate() {
            if r.block_bytes == 0 {
                return Err(LayoutError::EmptyBlock(i));
            }
            if r.block_stride < r.block_bytes {
                return Err(LayoutError::StrideTooSmall(i));
            }
            (num_blocks - 1)
                .checked_mul(r.block_stride)
                .and_then(|o| o.checked_add(r.base))
                .and_then(|a| a.checked_add(r.block_bytes))
                .ok_or(LayoutError::Overflow(i))?;
        }
        Ok(Self {
            regions,
            regions_per_layer,
            num_blocks,
            groups,
        })
    }

    /// vLLM's paged layout: every layer has its own K and V tensors (or one tensor for MLA,
    /// `k_and_v = false`), each `[num_blocks, block_size, kv_heads, head_dim]`, so a block is
    /// `shape.bytes()` long and blocks are back to back. `bases` holds the address of block 0
    /// of each region in layout order (layer 0 K, layer 0 V, layer 1 K, ...); for vLLM's
    /// FlashAttention tensor `[2, num_blocks, ...]`, V's base is K's base plus
    /// `num_blocks * shape.bytes()`.
    pub fn paged_vllm(
        num_layers: usize,
        k_and_v: bool,
        shape: BlockShape,
        num_blocks: usize,
        bases: &[usize],
        groups: LayerGroups,
    ) -> Result<Self, LayoutError> {
        let per_layer = if k_and_v { 2 } else { 1 };
        let expected = num_layers * per_layer;
        if bases.len() != expected {
            return Err(LayoutError::Bases {
                expected,
                got: bases.len(),
            });
        }
        let block_bytes = shape.bytes();
        let regions = bases
            .iter()
            .map(|&base| LayerRegion {
                base,
                block_stride: block_bytes,
                block_bytes,
            })
            .collect();
        Self::new(regions, per_layer, num_blocks, groups)
    }

    /// One buffer, layer-first: `[num_layers][K, V][num_blocks][block_bytes]`. A block's
    /// layers are `num_blocks * block_bytes` apart, so nothing merges: one copy per region.
    pub fn layer_first_contiguous(
        base: usize,
        num_layers: usize,
        k_and_v: bool,
        num_blocks: usize,
        block_bytes: usize,
        groups: LayerGroups,
    ) -> Result<Self, LayoutError> {
        let per_layer = if k_and_v { 2 } else { 1 };
        let span = num_blocks
            .checked_mul(block_bytes)
            .ok_or(LayoutError::Overflow(0))?;
        let regions = (0..num_layers * per_layer)
            .map(|r| {
                let off = r.checked_mul(span).ok_or(LayoutError::Overflow(r))?;
                Ok(LayerRegion {
                    base: base.checked_add(off).ok_or(LayoutError::Overflow(r))?,
                    block_stride: block_bytes,
                    block_bytes,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(regions, per_layer, num_blocks, groups)
    }

    /// One buffer, block-first (vLLM's cross-layer cache):
    /// `[num_blocks][num_layers][K, V][block_bytes]`. A block's whole group is one range, so
    /// [`Self::segments`] merges it into a single copy.
    pub fn block_first_contiguous(
        base: usize,
        num_layers: usize,
        k_and_v: bool,
        num_blocks: usize,
        block_bytes: usize,
        groups: LayerGroups,
    ) -> Result<Self, LayoutError> {
        let per_layer = if k_and_v { 2 } else { 1 };
        let n = num_layers * per_layer;
        let stride = n.checked_mul(block_bytes).ok_or(LayoutError::Overflow(0))?;
        let regions = (0..n)
            .map(|r| {
                let off = r.checked_mul(block_bytes).ok_or(LayoutError::Overflow(r))?;
                Ok(LayerRegion {
                    base: base.checked_add(off).ok_or(LayoutError::Overflow(r))?,
                    block_stride: stride,
                    block_bytes,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(regions, per_layer, num_blocks, groups)
    }

    pub fn num_layers(&self) -> usize {
        self.regions.len() / self.regions_per_layer
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn regions(&self) -> &[LayerRegion] {
        &self.regions
    }

    pub fn groups(&self) -> LayerGroups {
        self.groups
    }

    /// Number of pool objects per block.
    pub fn num_groups(&self) -> usize {
        match self.groups {
            LayerGroups::All => 1,
            LayerGroups::PerObject(n) => self.num_layers().div_ceil(n),
        }
    }

    /// The layers stored in object `group`.
    ///
    /// # Panics
    /// If `group >= num_groups()`.
    pub fn group_layers(&self, group: usize) -> Range<usize> {
        assert!(
            group < self.num_groups(),
            "group {group} out of range (num_groups {})",
            self.num_groups()
        );
        match self.groups {
            LayerGroups::All => 0..self.num_layers(),
            LayerGroups::PerObject(n) => group * n..((group + 1) * n).min(self.num_layers()),
        }
    }

    /// The `/g<group>` part of the object's key: none when all layers share one object.
    pub fn key_group(&self, group: usize) -> Option<usize> {
        match self.groups {
            LayerGroups::All => None,
            LayerGroups::PerObject(_) => Some(group),
        }
    }

    /// A tag for [`crate::Namespace::layout`]'s grouping part (`"all"` or `"l<n>"`): objects
    /// of different groupings have different bytes under the same `/g<i>`, so the grouping
    /// must be in the namespace.
    pub fn grouping_tag(&self) -> String {
        match self.groups {
            LayerGroups::All => "all".into(),
            LayerGroups::PerObject(n) => format!("l{n}"),
        }
    }

    fn group_regions(&self, group: usize) -> &[LayerRegion] {
        let layers = self.group_layers(group);
        &self.regions[layers.start * self.regions_per_layer..layers.end * self.regions_per_layer]
    }

    /// Bytes of one block's object for `group`.
    ///
    /// # Panics
    /// If `group >= num_groups()`.
    pub fn object_len(&self, group: usize) -> usize {
        self.group_regions(group)
            .iter()
            .map(|r| r.block_bytes)
            .sum()
    }

    /// The gather (save) / scatter (load) list for block `block_id`'s object of `group`: the
    /// object's bytes are these ranges concatenated in order (layer ascending, K then V).
    /// A range that starts where the previous one ends is merged into it.
    ///
    /// # Panics
    /// If `block_id >= num_blocks()` or `group >= num_groups()`.
    pub fn segments(&self, block_id: usize, group: usize) -> Vec<Segment> {
        assert!(
            block_id < self.num_blocks,
            "block {block_id} out of range (num_blocks {})",
            self.num_blocks
        );
        let mut out: Vec<Segment> = Vec::new();
        for r in self.group_regions(group) {
            // No overflow: `new` checked the last block's end for every region.
            let addr = r.base + block_id * r.block_stride;
            match out.last_mut() {
                Some(last) if last.addr + last.len == addr => last.len += r.block_bytes,
                _ => out.push(Segment {
                    addr,
                    len: r.block_bytes,
                }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3-8B: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks.
    const LAYERS: usize = 32;
    const LLAMA: BlockShape = BlockShape {
        block_size: 16,
        kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
    };
    const PER_KV: usize = 16 * 8 * 128 * 2; // 32 KiB per K (or V) per layer per block
    const BLOCKS: usize = 1000;
    const GPU: usize = 0x7f00_0000_0000;

    /// vLLM FlashAttention: one `[2, num_blocks, ...]` tensor per layer, tensors spaced apart.
    fn llama_paged(groups: LayerGroups) -> KvLayout {
        let tensor = 2 * BLOCKS * PER_KV;
        let bases: Vec<usize> = (0..LAYERS)
            .flat_map(|l| {
                let k = GPU + l * (tensor + 4096);
                [k, k + BLOCKS * PER_KV]
            })
            .collect();
        KvLayout::paged_vllm(LAYERS, true, LLAMA, BLOCKS, &bases, groups).unwrap()
    }

    /// Checks that `segs` cover exactly the block's bytes of `regions`: same total, no
    /// overlap, and every region's block range inside some segment.
    fn check_cover(segs: &[Segment], regions: &[LayerRegion], block: usize) {
        let total: usize = regions.iter().map(|r| r.block_bytes).sum();
        assert_eq!(segs.iter().map(|s| s.len).sum::<usize>(), total);
        let mut sorted = segs.to_vec();
        sorted.sort_by_key(|s| s.addr);
        for w in sorted.windows(2) {
            assert!(w[0].addr + w[0].len <= w[1].addr, "overlap {w:?}");
        }
        for r in regions {
            let a = r.base + block * r.block_stride;
            assert!(
                segs.iter()
                    .any(|s| s.addr <= a && a + r.block_bytes <= s.addr + s.len),
                "region {r:?} not covered"
            );
        }
    }

    #[test]
    fn llama_paged_sizes_and_segments() {
        assert_eq!(LLAMA.bytes(), 32 * 1024);
        let l = llama_paged(LayerGroups::All);
        assert_eq!(l.num_layers(), 32);
        assert_eq!(l.num_groups(), 1);
        // 32 layers x (K + V) x 32 KiB = 2 MiB per block.
        assert_eq!(l.object_len(0), LAYERS * 2 * PER_KV);
        assert_eq!(l.object_len(0), 2 << 20);
        for block in [0, 1, 17, BLOCKS - 1] {
            let segs = l.segments(block, 0);
            // K and V of a layer are in different halves of the tensor: no merging.
            assert_eq!(segs.len(), 64);
            assert_eq!(segs[0].addr, GPU + block * PER_KV);
            assert_eq!(segs[1].addr, GPU + (BLOCKS + block) * PER_KV);
            check_cover(&segs, l.regions(), block);
        }
        assert_eq!(l.key_group(0), None);
        assert_eq!(l.grouping_tag(), "all");
    }

    #[test]
    fn layer_groups() {
        let l = llama_paged(LayerGroups::PerObject(8));
        assert_eq!(l.num_groups(), 4);
        assert_eq!(l.group_layers(1), 8..16);
        assert_eq!(l.object_len(1), 8 * 2 * PER_KV);
        let segs = l.segments(5, 1);
        assert_eq!(segs.len(), 16);
        check_cover(&segs, &l.regions()[16..32], 5);
        assert_eq!(l.key_group(3), Some(3));
        assert_eq!(l.grouping_tag(), "l8");
        // Uneven split: 32 layers by 5 -> 7 groups, the last holds 2 layers.
        let l = llama_paged(LayerGroups::PerObject(5));
        assert_eq!(l.num_groups(), 7);
        assert_eq!(l.group_layers(6), 30..32);
        assert_eq!(l.object_len(6), 2 * 2 * PER_KV);
        let sum: usize = (0..7).map(|g| l.object_len(g)).sum();
        assert_eq!(sum, LAYERS * 2 * PER_KV);
    }

    #[test]
    fn mla_single_region_per_layer() {
        // MLA (DeepSeek-style): one latent cache per layer; 61 layers of 576 x bf16 x 64 tokens.
        let shape = BlockShape {
            block_size: 64,
            kv_heads: 1,
            head_dim: 576,
            dtype_bytes: 2,
        };
        let bases: Vec<usize> = (0..61).map(|l| GPU + l * (1 << 30)).collect();
        let l = KvLayout::paged_vllm(61, false, shape, 100, &bases, LayerGroups::All).unwrap();
        assert_eq!(l.object_len(0), 61 * 64 * 576 * 2);
        let segs = l.segments(3, 0);
        assert_eq!(segs.len(), 61);
        check_cover(&segs, l.regions(), 3);
    }

    #[test]
    fn layer_first_contiguous_layout() {
        let l =
            KvLayout::layer_first_contiguous(GPU, LAYERS, true, BLOCKS, PER_KV, LayerGroups::All)
                .unwrap();
        assert_eq!(l.object_len(0), 2 << 20);
        let segs = l.segments(7, 0);
        assert_eq!(segs.len(), 64);
        // Order: layer 0 K, layer 0 V, layer 1 K, ...
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(s.addr, GPU + (i * BLOCKS + 7) * PER_KV);
        }
        check_cover(&segs, l.regions(), 7);
        // With a single block, every region is adjacent to the next: one copy.
        let one =
            KvLayout::layer_first_contiguous(GPU, 4, true, 1, PER_KV, LayerGroups::All).unwrap();
        assert_eq!(
            one.segments(0, 0),
            vec![Segment {
                addr: GPU,
                len: 8 * PER_KV
            }]
        );
    }

    #[test]
    fn block_first_merges_to_one_copy() {
        let l =
            KvLayout::block_first_contiguous(GPU, LAYERS, true, BLOCKS, PER_KV, LayerGroups::All)
                .unwrap();
        for block in [0, 9, BLOCKS - 1] {
            let segs = l.segments(block, 0);
            assert_eq!(
                segs,
                vec![Segment {
                    addr: GPU + block * (2 << 20),
                    len: 2 << 20
                }]
            );
            check_cover(&segs, l.regions(), block);
        }
        // Per group of 8 layers: still one 512 KiB copy, at the group's offset in the block.
        let l = KvLayout::block_first_contiguous(
            GPU,
            LAYERS,
            true,
            BLOCKS,
            PER_KV,
            LayerGroups::PerObject(8),
        )
        .unwrap();
        assert_eq!(
            l.segments(2, 3),
            vec![Segment {
                addr: GPU + 2 * (2 << 20) + 24 * 2 * PER_KV,
                len: 16 * PER_KV
            }]
        );
    }

    #[test]
    fn partial_merging() {
        // K and V of each layer adjacent, layers apart: one copy per layer.
        let regions: Vec<LayerRegion> = (0..3)
            .flat_map(|l| {
                let b = 0x1000_0000 * (l + 1);
                [
                    LayerRegion {
                        base: b,
                        block_stride: 200,
                        block_bytes: 100,
                    },
                    LayerRegion {
                        base: b + 100,
                        block_stride: 200,
                        block_bytes: 100,
                    },
                ]
            })
            .collect();
        let l = KvLayout::new(regions, 2, 10, LayerGroups::All).unwrap();
        let segs = l.segments(4, 0);
        assert_eq!(segs.len(), 3);
        assert!(segs.iter().all(|s| s.len == 200));
        check_cover(&segs, l.regions(), 4);
    }

    #[test]
    fn validation() {
        let r = |base, block_stride, block_bytes| LayerRegion {
            base,
            block_stride,
            block_bytes,
        };
        use LayerGroups::*;
        assert_eq!(KvLayout::new(vec![], 2, 1, All), Err(LayoutError::NoLayers));
        assert_eq!(
            KvLayout::new(vec![r(0, 8, 8)], 3, 1, All),
            Err(LayoutError::RegionsPerLayer(3))
        );
        assert_eq!(
            KvLayout::new(vec![r(0, 8, 8)], 2, 1, All),
            Err(LayoutError::RegionCount {
                regions: 1,
                per_layer: 2
            })
        );
        assert_eq!(
            KvLayout::new(vec![r(0, 4, 8)], 1, 1, All),
            Err(LayoutError::StrideTooSmall(0))
        );
        assert_eq!(
            KvLayout::new(vec![r(0, 8, 0)], 1, 1, All),
            Err(LayoutError::EmptyBlock(0))
        );
        assert_eq!(
            KvLayout::new(vec![r(0, 8, 8)], 1, 0, All),
            Err(LayoutError::NoBlocks)
        );
        assert_eq!(
            KvLayout::new(vec![r(0, 8, 8)], 1, 1, PerObject(0)),
            Err(LayoutError::EmptyGroup)
        );
        assert_eq!(
            KvLayout::new(vec![r(usize::MAX - 100, 64, 64)], 1, 3, All),
            Err(LayoutError::Overflow(0))
        );
        assert_eq!(
            KvLayout::paged_vllm(2, true, LLAMA, 4, &[0, 1, 2], All),
            Err(LayoutError::Bases {
                expected: 4,
                got: 3
            })
        );
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn block_out_of_range_panics() {
        llama_paged(LayerGroups::All).segments(BLOCKS, 0);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn group_out_of_range_panics() {
        llama_paged(LayerGroups::PerObject(8)).object_len(4);
    }
}
