//! Copy planning for GPU caches: which device ranges go to which staging offsets. Pure
//! functions over a [`KvLayout`], so they are tested without a GPU.
//!
//! Staging is **object-major**: the objects of one batch lie back to back in a pinned buffer,
//! each in object order (layers ascending, K then V), so each object is one contiguous slice
//! that the pool can put or get as is. The copies are the layout's segments (already merged
//! within a block), merged again across blocks where both the device and the staging side
//! continue (consecutive block ids of a block-first cache become one copy).

use std::ops::Range;

use super::GpuError;
use crate::layout::KvLayout;

/// One copy between device memory and staging: `len` bytes at device address `dev` and at
/// offset `host` of the staging buffer. The direction is the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub dev: usize,
    pub host: usize,
    pub len: usize,
}

/// The copies for `objects`, each `(block id, staging offset of its object)` for layer group
/// `group`, merged where both sides are contiguous.
///
/// # Panics
/// If a block id or `group` is out of range (callers validate ids first, see [`check_blocks`]).
pub fn plan_copies(layout: &KvLayout, group: usize, objects: &[(usize, usize)]) -> Vec<CopyOp> {
    let mut ops: Vec<CopyOp> = Vec::new();
    for &(block, offset) in objects {
        let mut host = offset;
        for s in layout.segments(block, group) {
            match ops.last_mut() {
                Some(last) if last.dev + last.len == s.addr && last.host + last.len == host => {
                    last.len += s.len
                }
                _ => ops.push(CopyOp {
                    dev: s.addr,
                    host,
                    len: s.len,
                }),
            }
            host += s.len;
        }
    }
    ops
}

/// [`plan_copies`] with the objects of `blocks` packed back to back from offset 0 (object `i`
/// at `i * object_len(group)`).
pub fn plan_packed(layout: &KvLayout, group: usize, blocks: &[usize]) -> Vec<CopyOp> {
    let len = layout.object_len(group);
    let objects: Vec<(usize, usize)> = blocks
        .iter()
        .enumerate()
        .map(|(i, &b)| (b, i * len))
        .collect();
    plan_copies(layout, group, &objects)
}

/// The staging range of each of `n` packed objects of `object_len` bytes.
pub fn packed_objects(n: usize, object_len: usize) -> Vec<Range<usize>> {
    (0..n)
        .map(|i| i * object_len..(i + 1) * object_len)
        .collect()
}

/// Splits `n` objects of `object_len` bytes into consecutive runs that each fit in a staging
/// buffer of `staging` bytes (at least one object per run; the cache sizes its staging to
/// hold the largest object, see [`min_staging`]).
pub fn chunks(n: usize, object_len: usize, staging: usize) -> Vec<Range<usize>> {
    let per = (staging / object_len.max(1)).max(1);
    (0..n)
        .step_by(per)
        .map(|start| start..(start + per).min(n))
        .collect()
}

/// The smallest staging buffer that holds one object of every group.
pub fn min_staging(layout: &KvLayout) -> usize {
    (0..layout.num_groups())
        .map(|g| layout.object_len(g))
        .max()
        .unwrap_or(0)
}

/// Checks the block ids of one call: each entry is `Ok(())` or why that block is skipped.
/// With `exclusive` (loads: two objects written to the same block would race), every
/// occurrence of a repeated id is an error; saves may read a block twice.
pub fn check_blocks(
    layout: &KvLayout,
    blocks: &[usize],
    exclusive: bool,
) -> Vec<Result<(), GpuError>> {
    let n = layout.num_blocks();
    let mut seen = std::collections::HashMap::<usize, usize>::new();
    if exclusive {
        for &b in blocks {
            *seen.entry(b).or_default() += 1;
        }
    }
    blocks
        .iter()
        .map(|&b| {
            if b >= n {
                Err(GpuError::BlockOutOfRange {
                    block: b,
                    num_blocks: n,
                })
            } else if exclusive && seen[&b] > 1 {
                Err(GpuError::Duplicate(b))
            } else {
                Ok(())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BlockShape, LayerGroups};

    const GPU: usize = 0x7f00_0000_0000;
    const BB: usize = 4096;

    /// Simulates the copies against a fake device (a byte array at `GPU`): gathering with
    /// `ops` must give exactly the objects `segments` describes.
    fn gather(dev: &[u8], ops: &[CopyOp], total: usize) -> Vec<u8> {
        let mut out = vec![0u8; total];
        for op in ops {
            let d = op.dev - GPU;
            out[op.host..op.host + op.len].copy_from_slice(&dev[d..d + op.len]);
        }
        out
    }

    fn objects_via_segments(dev: &[u8], l: &KvLayout, g: usize, blocks: &[usize]) -> Vec<u8> {
        blocks
            .iter()
            .flat_map(|&b| l.segments(b, g))
            .flat_map(|s| dev[s.addr - GPU..s.addr - GPU + s.len].to_vec())
            .collect()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn check_plan(l: &KvLayout, span: usize, blocks: &[usize]) {
        let dev = pattern(span);
        for g in 0..l.num_groups() {
            let ops = plan_packed(l, g, blocks);
            let total = blocks.len() * l.object_len(g);
            assert_eq!(ops.iter().map(|o| o.len).sum::<usize>(), total);
            assert_eq!(
                gather(&dev, &ops, total),
                objects_via_segments(&dev, l, g, blocks)
            );
        }
    }

    #[test]
    fn block_first_consecutive_blocks_merge_to_one_copy() {
        let l = KvLayout::block_first_contiguous(GPU, 4, true, 16, BB, LayerGroups::All).unwrap();
        let ops = plan_packed(&l, 0, &[3, 4, 5, 6]);
        assert_eq!(
            ops,
            vec![CopyOp {
                dev: GPU + 3 * 8 * BB,
                host: 0,
                len: 4 * 8 * BB
            }]
        );
        // A gap or a reorder breaks the run.
        assert_eq!(plan_packed(&l, 0, &[3, 4, 6]).len(), 2);
        assert_eq!(plan_packed(&l, 0, &[4, 3]).len(), 2);
        check_plan(&l, 16 * 8 * BB, &[3, 4, 6, 0, 15]);
    }

    #[test]
    fn block_first_groups_do_not_merge_across_blocks() {
        // Group 1 of block b and group 1 of block b+1 are not adjacent on the device.
        let l = KvLayout::block_first_contiguous(GPU, 4, true, 16, BB, LayerGroups::PerObject(2))
            .unwrap();
        let ops = plan_packed(&l, 1, &[2, 3]);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].dev, GPU + 2 * 8 * BB + 4 * BB);
        assert_eq!(ops[1].host, 4 * BB);
        check_plan(&l, 16 * 8 * BB, &[2, 3, 9]);
    }

    #[test]
    fn paged_llama_is_one_copy_per_region() {
        // vLLM FlashAttention: one [2, num_blocks, ...] tensor per layer.
        let shape = BlockShape {
            block_size: 16,
            kv_heads: 2,
            head_dim: 64,
            dtype_bytes: 2,
        };
        let nb = 8;
        let tensor = 2 * nb * shape.bytes();
        let bases: Vec<usize> = (0..4)
            .flat_map(|l| [GPU + l * tensor, GPU + l * tensor + nb * shape.bytes()])
            .collect();
        for groups in [LayerGroups::All, LayerGroups::PerObject(3)] {
            let l = KvLayout::paged_vllm(4, true, shape, nb, &bases, groups).unwrap();
            let ops = plan_packed(&l, 0, &[1, 2]);
            let regions = 2 * l.group_layers(0).len();
            assert_eq!(ops.len(), 2 * regions);
            check_plan(&l, 4 * tensor, &[1, 2, 7, 0]);
        }
    }

    #[test]
    fn layer_first_single_block_cache_is_one_copy() {
        let l = KvLayout::layer_first_contiguous(GPU, 3, true, 1, BB, LayerGroups::All).unwrap();
        assert_eq!(plan_packed(&l, 0, &[0]).len(), 1);
        let l = KvLayout::layer_first_contiguous(GPU, 3, false, 5, BB, LayerGroups::All).unwrap();
        check_plan(&l, 3 * 5 * BB, &[4, 0, 2]);
    }

    #[test]
    fn explicit_offsets_skip_missing_objects() {
        // A load copies only the objects that arrived: objects 0 and 2 of a packed batch.
        let l = KvLayout::block_first_contiguous(GPU, 2, true, 8, BB, LayerGroups::All).unwrap();
        let len = l.object_len(0);
        let ops = plan_copies(&l, 0, &[(1, 0), (3, 2 * len)]);
        assert_eq!(
            ops,
            vec![
                CopyOp {
                    dev: GPU + len,
                    host: 0,
                    len
                },
                CopyOp {
                    dev: GPU + 3 * len,
                    host: 2 * len,
                    len
                }
            ]
        );
        // Device-contiguous but not staging-contiguous: not merged.
        assert_eq!(plan_copies(&l, 0, &[(1, 0), (2, 2 * len)]).len(), 2);
    }

    #[test]
    fn chunking() {
        assert_eq!(chunks(5, 10, 25), vec![0..2, 2..4, 4..5]);
        assert_eq!(chunks(3, 10, 100), vec![0..3]);
        // An object larger than the buffer still gets a run of one (staging is sized so this
        // does not happen, but chunking never loops forever).
        assert_eq!(chunks(2, 10, 5), vec![0..1, 1..2]);
        assert!(chunks(0, 10, 100).is_empty());
        assert_eq!(packed_objects(3, 4), vec![0..4, 4..8, 8..12]);
        let l = KvLayout::block_first_contiguous(GPU, 5, true, 2, BB, LayerGroups::PerObject(2))
            .unwrap();
        assert_eq!(min_staging(&l), 4 * BB);
    }

    #[test]
    fn block_checks() {
        let l = KvLayout::block_first_contiguous(GPU, 2, true, 4, BB, LayerGroups::All).unwrap();
        let r = check_blocks(&l, &[0, 4, 2, 2], true);
        assert!(r[0].is_ok());
        assert!(matches!(
            r[1],
            Err(GpuError::BlockOutOfRange {
                block: 4,
                num_blocks: 4
            })
        ));
        assert!(matches!(r[2], Err(GpuError::Duplicate(2))));
        assert!(matches!(r[3], Err(GpuError::Duplicate(2))));
        // Saves may read a block twice.
        let r = check_blocks(&l, &[2, 2], false);
        assert!(r.iter().all(|r| r.is_ok()));
    }
}
