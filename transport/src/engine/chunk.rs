//! Cutting items into stripe-sized chunks across the caller's slices, and packing chunks into
//! requests.

use kvpool_proto::SegmentId;

use super::{ReadItem, TransferEngine, WriteItem};

/// Most ops one request carries.
const MAX_OPS_PER_REQUEST: usize = 4096;

/// One wire op: a contiguous segment range and the caller's sub-slices that cover it.
pub(super) struct Chunk<P> {
    pub(super) item: usize,
    /// Position of the chunk within its item, for folding per-chunk checksums in order.
    pub(super) seq: usize,
    pub(super) segment: SegmentId,
    pub(super) offset: u64,
    /// Bytes of the range: the sum of `bufs`' lengths.
    pub(super) len: usize,
    /// In order, none empty.
    pub(super) bufs: Vec<P>,
}

/// A caller slice that chunking can cut in two.
pub(super) trait Piece: Sized {
    fn len(&self) -> usize;
    fn split(self, at: usize) -> (Self, Self);
}

impl Piece for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

impl Piece for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

/// A batch entry, write or read: one segment range and the caller's slices that cover it.
pub(super) trait Item {
    type Piece: Piece;
    /// The range's segment, offset and length, and the slices.
    fn into_parts(self) -> (SegmentId, u64, u64, Vec<Self::Piece>);
}

impl<'a> Item for WriteItem<'a> {
    type Piece = &'a [u8];
    fn into_parts(self) -> (SegmentId, u64, u64, Vec<&'a [u8]>) {
        (self.op.segment, self.op.offset, self.op.len, self.data)
    }
}

impl<'a> Item for ReadItem<'a> {
    type Piece = &'a mut [u8];
    fn into_parts(self) -> (SegmentId, u64, u64, Vec<&'a mut [u8]>) {
        (self.op.segment, self.op.offset, self.op.len, self.dst)
    }
}

/// Cuts an item's slices into runs of exactly `stripe` bytes (the last may be shorter),
/// splitting a slice where a run ends inside it and dropping empty slices. A run is one
/// chunk's sub-slices, in order.
pub(super) fn cut<P: Piece>(slices: Vec<P>, stripe: usize) -> Vec<Vec<P>> {
    let stripe = stripe.max(1);
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut room = stripe;
    for mut s in slices {
        while s.len() > 0 {
            if s.len() < room {
                room -= s.len();
                run.push(s);
                break;
            }
            let (head, tail) = s.split(room);
            run.push(head);
            runs.push(std::mem::take(&mut run));
            room = stripe;
            s = tail;
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

impl TransferEngine {
    fn stripe(&self) -> usize {
        usize::try_from(self.opts.stripe_size.max(4096)).unwrap_or(usize::MAX)
    }

    /// Appends item `item`'s chunks: its range `offset..` on `segment`, cut at every
    /// `stripe` bytes, each chunk with the sub-slices of `slices` that cover it.
    pub(super) fn chunk_item<P: Piece>(
        &self,
        chunks: &mut Vec<Chunk<P>>,
        item: usize,
        segment: SegmentId,
        offset: u64,
        slices: Vec<P>,
    ) {
        let mut off = offset;
        for (seq, bufs) in cut(slices, self.stripe()).into_iter().enumerate() {
            let len: usize = bufs.iter().map(Piece::len).sum();
            chunks.push(Chunk {
                item,
                seq,
                segment,
                offset: off,
                len,
                bufs,
            });
            off += len as u64;
        }
    }

    /// Packs chunks into requests of at most `stripe_size` bytes (a single chunk may fill one).
    /// Each request holds a run of consecutive chunks, so an item's chunks stay in `seq` order
    /// across the requests.
    pub(super) fn pack<P>(&self, chunks: Vec<Chunk<P>>) -> Vec<Vec<Chunk<P>>> {
        let mut out: Vec<Vec<Chunk<P>>> = Vec::new();
        let mut cur = Vec::new();
        let mut bytes = 0u64;
        for c in chunks {
            let len = c.len as u64;
            if !cur.is_empty()
                && (bytes + len > self.opts.stripe_size || cur.len() >= MAX_OPS_PER_REQUEST)
            {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            bytes += len;
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{pattern, EngineOptions};

    const STRIPE: usize = 4 << 20;
    /// Checks `cut`'s contract: runs of exactly `stripe` bytes but the last, no empty
    /// slice, and the bytes in the original order.
    fn check_cut(sizes: &[usize], stripe: usize) -> Vec<Vec<usize>> {
        let bufs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u8))
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        let runs = cut(slices, stripe);
        let total: usize = sizes.iter().sum();
        assert_eq!(runs.len(), total.div_ceil(stripe), "sizes {sizes:?}");
        for (k, run) in runs.iter().enumerate() {
            let len: usize = run.iter().map(|s| s.len()).sum();
            if k + 1 < runs.len() {
                assert_eq!(len, stripe, "run {k} of {sizes:?}");
            } else {
                assert!(len > 0 && len <= stripe, "last run of {sizes:?}");
            }
            assert!(run.iter().all(|s| !s.is_empty()), "empty slice in run {k}");
        }
        let joined: Vec<u8> = runs
            .iter()
            .flatten()
            .flat_map(|s| s.iter().copied())
            .collect();
        assert!(joined == bufs.concat(), "bytes out of order for {sizes:?}");
        runs.iter()
            .map(|r| r.iter().map(|s| s.len()).collect())
            .collect()
    }

    #[test]
    fn cut_keeps_whole_slices_within_a_stripe() {
        assert_eq!(
            check_cut(&[1, 4095, 32 << 10], STRIPE),
            vec![vec![1, 4095, 32 << 10]]
        );
        assert_eq!(
            check_cut(&[32 << 10; 128], STRIPE),
            vec![vec![32 << 10; 128]]
        );
    }

    #[test]
    fn cut_splits_a_slice_straddling_the_stripe() {
        // 127 slices of 32 KiB leave 32 KiB of room; a 64 KiB slice is cut in the middle.
        let mut sizes = vec![32 << 10; 127];
        sizes.push(64 << 10);
        sizes.push(1);
        let runs = check_cut(&sizes, STRIPE);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].last(), Some(&(32 << 10)));
        assert_eq!(runs[1], vec![32 << 10, 1]);
        // A slice spanning several stripes, starting and ending inside one.
        let runs = check_cut(&[4095, 3 * STRIPE, 1], STRIPE);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[0], vec![4095, STRIPE - 4095]);
        assert_eq!(runs[1], vec![STRIPE]);
        assert_eq!(runs[3], vec![4095, 1]);
    }

    #[test]
    fn cut_ends_a_run_exactly_at_a_slice_end() {
        let runs = check_cut(&[STRIPE / 2, STRIPE / 2, 1], STRIPE);
        assert_eq!(runs, vec![vec![STRIPE / 2, STRIPE / 2], vec![1]]);
        assert_eq!(check_cut(&[STRIPE], STRIPE), vec![vec![STRIPE]]);
    }

    #[test]
    fn cut_skips_empty_slices() {
        assert_eq!(
            check_cut(&[0, 1, 0, 0, 4095, 0], STRIPE),
            vec![vec![1, 4095]]
        );
        assert!(check_cut(&[0, 0], STRIPE).is_empty());
        assert!(check_cut(&[], STRIPE).is_empty());
    }

    #[test]
    fn cut_odd_sizes_at_a_small_stripe() {
        for seed in 0..50u64 {
            let sizes: Vec<usize> = (0..1 + seed % 40)
                .map(|i| ((seed * 7919 + i * 104_729) % 9000) as usize)
                .collect();
            check_cut(&sizes, 4096);
        }
        // And the `&mut` flavour cuts the same way.
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 3];
        let runs = cut(vec![a.as_mut_slice(), b.as_mut_slice()], 4096);
        let lens: Vec<Vec<usize>> = runs
            .iter()
            .map(|r| r.iter().map(|s| s.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![4096], vec![904, 3]]);
    }

    #[test]
    fn chunks_cover_consecutive_segment_ranges() {
        let engine = TransferEngine::new(EngineOptions::default());
        let bufs: Vec<Vec<u8>> = [1usize, 4095, 32 << 10, STRIPE, 7]
            .iter()
            .map(|&n| vec![0u8; n])
            .collect();
        let mut chunks = Vec::new();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        engine.chunk_item(&mut chunks, 3, SegmentId(9), 1000, slices);
        let total: usize = bufs.iter().map(Vec::len).sum();
        assert_eq!(chunks.len(), 2);
        let mut at = 1000u64;
        for (seq, c) in chunks.iter().enumerate() {
            assert_eq!(
                (c.item, c.seq, c.segment, c.offset),
                (3, seq, SegmentId(9), at)
            );
            assert_eq!(c.len, c.bufs.iter().map(|b| b.len()).sum::<usize>());
            at += c.len as u64;
        }
        assert_eq!(at, 1000 + total as u64);
    }
}
