//! An O(1) offset allocator for one DRAM segment, after sebbbi's OffsetAllocator (a TLSF-style
//! two-level bin allocator), with Mooncake's "round up to the bin size" change.
//!
//! The allocator never touches the memory it manages: it hands out `(offset, len)` ranges of a
//! segment that lives on a storage node. Sizes are kept in units of the alignment; each free
//! block sits in the bin of its size written as a tiny float (3-bit mantissa), so the bins grow
//! geometrically and a lookup is two bit scans. Free blocks keep links to their address-order
//! neighbours, so a free merges with free neighbours in O(1).
//!
//! Allocations are rounded up to their bin's size. That wastes at most 1/8 of a block but means
//! that a workload of same-size objects (KV blocks) always frees blocks that exactly fit the next
//! allocation, which keeps fragmentation from building up.

use std::collections::{BTreeMap, HashMap};

/// Default alignment of offsets and lengths, in bytes: a cache line, so that replicas never
/// share one and RDMA/DMA engines see aligned buffers.
pub const DEFAULT_ALIGN: u64 = 64;

const MANTISSA_BITS: u32 = 3;
const MANTISSA_VALUE: u64 = 1 << MANTISSA_BITS;
const MANTISSA_MASK: u64 = MANTISSA_VALUE - 1;
const TOP_BINS: usize = 64;
const LEAF_BINS: usize = 8;
const BINS: usize = TOP_BINS * LEAF_BINS;
const NONE: u32 = u32::MAX;

/// Converts a size to a bin index, rounding up: every block in that bin is at least `size`.
fn bin_round_up(size: u64) -> u32 {
    let bin = bin_round_down(size);
    // The next bin when `size` lies past this bin's smallest size. A mantissa overflow
    // carries into the exponent, as intended.
    bin + u32::from(bin_size(bin) < size)
}

/// Converts a size to a bin index, rounding down: the block fits every request of that bin.
fn bin_round_down(size: u64) -> u32 {
    if size < MANTISSA_VALUE {
        return size as u32;
    }
    let highest = 63 - size.leading_zeros();
    let mantissa_start = highest - MANTISSA_BITS;
    let exp = mantissa_start + 1;
    let mantissa = (size >> mantissa_start) & MANTISSA_MASK;
    (exp << MANTISSA_BITS) | mantissa as u32
}

/// The smallest size of a bin. Saturates for the topmost bins, which no real segment reaches.
fn bin_size(bin: u32) -> u64 {
    let exp = bin >> MANTISSA_BITS;
    let mantissa = u128::from(bin) & u128::from(MANTISSA_MASK);
    let v = if exp == 0 {
        mantissa
    } else {
        (mantissa | u128::from(MANTISSA_VALUE)) << (exp - 1)
    };
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The lowest set bit of `bits` at position `from` or above.
fn lowest_bit_from(bits: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let masked = bits & (u64::MAX << from);
    (masked != 0).then(|| masked.trailing_zeros())
}

/// A range handed out by [`OffsetAllocator::alloc`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Allocation {
    /// Start of the range; a multiple of the allocator's alignment.
    pub offset: u64,
    /// Length reserved: the request rounded up to the alignment and to the bin size.
    pub len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    /// In units of the alignment.
    offset: u64,
    /// In units of the alignment.
    size: u64,
    used: bool,
    bin_prev: u32,
    bin_next: u32,
    neighbor_prev: u32,
    neighbor_next: u32,
}

/// A two-level bin allocator over `[0, capacity)` of one segment. See the module docs.
#[derive(Debug, Clone)]
pub struct OffsetAllocator {
    align: u64,
    /// Whole units managed; bytes past `units * align` are never handed out.
    units: u64,
    capacity: u64,
    free_units: u64,
    top_bits: u64,
    leaf_bits: [u8; TOP_BINS],
    bin_heads: Vec<u32>,
    nodes: Vec<Node>,
    /// Slots of `nodes` that are unused, reused before the slab grows.
    spare: Vec<u32>,
    /// Used blocks by offset (in units), so that a free needs only the offset.
    used_at: HashMap<u64, u32>,
}

impl OffsetAllocator {
    /// An allocator over a segment of `size` bytes, all free. `align` (a power of two; other
    /// values are raised to the next one, 0 to 1) is the granularity of offsets and lengths.
    pub fn new(size: u64, align: u64) -> Self {
        let mut a = Self::empty(size, align);
        if a.units > 0 {
            let n = a.new_node(0, a.units, false, NONE, NONE);
            a.insert_free(n);
        }
        a
    }

    /// An allocator whose used space is exactly the given ranges `(offset, len)` and whose free
    /// space is the gaps between them: how a restarted master rebuilds a segment's state from
    /// the node's inventory. Ranges are taken in order; one that is empty, not aligned, past the
    /// end of the segment or overlapping a range accepted before it is rejected. Each accepted
    /// range can later be freed by its offset; its length is rounded up to the alignment.
    pub fn from_used(
        size: u64,
        align: u64,
        used: impl IntoIterator<Item = (u64, u64)>,
    ) -> (Self, Vec<(u64, u64)>) {
        let ranges: Vec<(u64, u64)> = used.into_iter().collect();
        let (a, rejected) = Self::from_used_indexed(size, align, &ranges);
        let rejected = rejected.into_iter().map(|i| ranges[i]).collect();
        (a, rejected)
    }

    /// [`OffsetAllocator::from_used`], reporting the rejected ranges by their index in `ranges`
    /// (ranges may repeat, so only an index says which one was refused).
    pub fn from_used_indexed(size: u64, align: u64, ranges: &[(u64, u64)]) -> (Self, Vec<usize>) {
        let mut a = Self::empty(size, align);
        let mut rejected = Vec::new();
        // Accepted ranges in units, keyed by start, to find overlaps with the neighbours.
        let mut accepted: BTreeMap<u64, u64> = BTreeMap::new();
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            let Some((start, units)) = a.range_units(offset, len) else {
                rejected.push(i);
                continue;
            };
            let end = start + units;
            let overlaps_prev = accepted
                .range(..=start)
                .next_back()
                .is_some_and(|(s, u)| s + u > start);
            let overlaps_next = accepted
                .range(start..)
                .next()
                .is_some_and(|(s, _)| *s < end);
            if overlaps_prev || overlaps_next {
                rejected.push(i);
                continue;
            }
            accepted.insert(start, units);
        }
        let mut cursor = 0;
        let mut prev = NONE;
        let mut free_blocks = Vec::new();
        for (&start, &units) in &accepted {
            if start > cursor {
                prev = a.push_neighbor(cursor, start - cursor, false, prev);
                free_blocks.push(prev);
            }
            prev = a.push_neighbor(start, units, true, prev);
            a.used_at.insert(start, prev);
            cursor = start + units;
        }
        if a.units > cursor {
            let rest = a.units - cursor;
            prev = a.push_neighbor(cursor, rest, false, prev);
            free_blocks.push(prev);
        }
        for n in free_blocks {
            a.insert_free(n);
        }
        (a, rejected)
    }

    /// Appends a node after `prev` in address order.
    fn push_neighbor(&mut self, offset: u64, size: u64, used: bool, prev: u32) -> u32 {
        let n = self.new_node(offset, size, used, prev, NONE);
        if prev != NONE {
            self.nodes[prev as usize].neighbor_next = n;
        }
        n
    }

    fn empty(size: u64, align: u64) -> Self {
        let align = align.max(1).checked_next_power_of_two().unwrap_or(1 << 63);
        let units = size / align;
        OffsetAllocator {
            align,
            units,
            capacity: size,
            free_units: 0,
            top_bits: 0,
            leaf_bits: [0; TOP_BINS],
            bin_heads: vec![NONE; BINS],
            nodes: Vec::new(),
            spare: Vec::new(),
            used_at: HashMap::new(),
        }
    }

    /// `(offset, len)` in bytes as `(start, units)` if it is a non-empty aligned range inside
    /// the managed units.
    fn range_units(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || !offset.is_multiple_of(self.align) {
            return None;
        }
        let start = offset / self.align;
        let units = len.div_ceil(self.align);
        (start.checked_add(units)? <= self.units).then_some((start, units))
    }

    /// Reserves `len` bytes (rounded up to the alignment and the bin size). `None` when `len`
    /// is 0 or no free block is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<Allocation> {
        if len == 0 {
            return None;
        }
        let units = len.div_ceil(self.align);
        let min_bin = bin_round_up(units);
        let want = bin_size(min_bin);
        if want > self.free_units {
            return None;
        }
        let bin = self.find_bin(min_bin)?;
        let n = self.bin_heads[bin as usize];
        if n == NONE {
            return None;
        }
        self.remove_free(n);
        let node = self.nodes[n as usize];
        // Blocks in a bin found by rounding up are at least `want`; guard anyway so that a bug
        // cannot hand out more than the block holds.
        if node.size < want {
            self.insert_free(n);
            return None;
        }
        let rest = node.size - want;
        self.nodes[n as usize].size = want;
        self.nodes[n as usize].used = true;
        if rest > 0 {
            let next = node.neighbor_next;
            let r = self.new_node(node.offset + want, rest, false, n, next);
            if next != NONE {
                self.nodes[next as usize].neighbor_prev = r;
            }
            self.nodes[n as usize].neighbor_next = r;
            self.insert_free(r);
        }
        self.used_at.insert(node.offset, n);
        Some(Allocation {
            offset: node.offset * self.align,
            len: want * self.align,
        })
    }

    /// Releases the allocation that starts at `offset`. Returns false, changing nothing, if no
    /// allocation starts there (never allocated, or already freed).
    pub fn free(&mut self, offset: u64) -> bool {
        if !offset.is_multiple_of(self.align) {
            return false;
        }
        let Some(n) = self.used_at.remove(&(offset / self.align)) else {
            return false;
        };
        let mut node = self.nodes[n as usize];
        node.used = false;
        let prev = node.neighbor_prev;
        if prev != NONE && !self.nodes[prev as usize].used {
            self.remove_free(prev);
            let p = self.nodes[prev as usize];
            node.offset = p.offset;
            node.size += p.size;
            node.neighbor_prev = p.neighbor_prev;
            if p.neighbor_prev != NONE {
                self.nodes[p.neighbor_prev as usize].neighbor_next = n;
            }
            self.spare.push(prev);
        }
        let next = node.neighbor_next;
        if next != NONE && !self.nodes[next as usize].used {
            self.remove_free(next);
            let x = self.nodes[next as usize];
            node.size += x.size;
            node.neighbor_next = x.neighbor_next;
            if x.neighbor_next != NONE {
                self.nodes[x.neighbor_next as usize].neighbor_prev = n;
            }
            self.spare.push(next);
        }
        self.nodes[n as usize] = node;
        self.insert_free(n);
        true
    }

    /// The length reserved for the allocation starting at `offset`, if there is one.
    pub fn len_at(&self, offset: u64) -> Option<u64> {
        if !offset.is_multiple_of(self.align) {
            return None;
        }
        let n = *self.used_at.get(&(offset / self.align))?;
        Some(self.nodes[n as usize].size * self.align)
    }

    /// Bytes reserved by live allocations.
    pub fn used(&self) -> u64 {
        (self.units - self.free_units) * self.align
    }

    /// The segment size given at construction.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The alignment in effect (a power of two).
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Number of live allocations.
    pub fn allocations(&self) -> usize {
        self.used_at.len()
    }

    /// The size of the largest free block, in bytes. Scans only the highest non-empty bin.
    pub fn largest_free(&self) -> u64 {
        if self.top_bits == 0 {
            return 0;
        }
        let top = 63 - self.top_bits.leading_zeros();
        let leaf = 7 - self.leaf_bits[top as usize].leading_zeros();
        let mut n = self.bin_heads[(top as usize) * LEAF_BINS + leaf as usize];
        let mut best = 0;
        while n != NONE {
            best = best.max(self.nodes[n as usize].size);
            n = self.nodes[n as usize].bin_next;
        }
        best * self.align
    }

    /// The first non-empty bin at or above `min_bin`.
    fn find_bin(&self, min_bin: u32) -> Option<u32> {
        let top = min_bin / LEAF_BINS as u32;
        let leaf = min_bin % LEAF_BINS as u32;
        if top as usize >= TOP_BINS {
            return None;
        }
        if self.top_bits & (1 << top) != 0 {
            if let Some(l) = lowest_bit_from(u64::from(self.leaf_bits[top as usize]), leaf) {
                return Some(top * LEAF_BINS as u32 + l);
            }
        }
        let t = lowest_bit_from(self.top_bits, top + 1)?;
        let l = self.leaf_bits[t as usize].trailing_zeros();
        Some(t * LEAF_BINS as u32 + l)
    }

    fn new_node(&mut self, offset: u64, size: u64, used: bool, prev: u32, next: u32) -> u32 {
        let node = Node {
            offset,
            size,
            used,
            bin_prev: NONE,
            bin_next: NONE,
            neighbor_prev: prev,
            neighbor_next: next,
        };
        if let Some(i) = self.spare.pop() {
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            // The slab holds at most one node per aligned unit, far below u32::MAX for any
            // segment this allocator is given (2^32 units of 64 B is 256 GiB of tiny objects).
            (self.nodes.len() - 1) as u32
        }
    }

    fn insert_free(&mut self, n: u32) {
        let size = self.nodes[n as usize].size;
        let bin = bin_round_down(size) as usize;
        let head = self.bin_heads[bin];
        self.nodes[n as usize].bin_prev = NONE;
        self.nodes[n as usize].bin_next = head;
        if head != NONE {
            self.nodes[head as usize].bin_prev = n;
        }
        self.bin_heads[bin] = n;
        self.top_bits |= 1 << (bin / LEAF_BINS);
        self.leaf_bits[bin / LEAF_BINS] |= 1 << (bin % LEAF_BINS);
        self.free_units += size;
    }

    fn remove_free(&mut self, n: u32) {
        let node = self.nodes[n as usize];
        if node.bin_prev != NONE {
            self.nodes[node.bin_prev as usize].bin_next = node.bin_next;
        } else {
            let bin = bin_round_down(node.size) as usize;
            self.bin_heads[bin] = node.bin_next;
            if node.bin_next == NONE {
                self.leaf_bits[bin / LEAF_BINS] &= !(1 << (bin % LEAF_BINS));
                if self.leaf_bits[bin / LEAF_BINS] == 0 {
                    self.top_bits &= !(1 << (bin / LEAF_BINS));
                }
            }
        }
        if node.bin_next != NONE {
            self.nodes[node.bin_next as usize].bin_prev = node.bin_prev;
        }
        self.free_units -= node.size;
    }

    /// Free blocks as `(offset, len)` in bytes, in address order; for tests and diagnostics.
    pub fn free_blocks(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| !n.used && !self.spare.contains(&(*i as u32)))
            .map(|(_, n)| (n.offset * self.align, n.size * self.align))
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const MIB: u64 = 1 << 20;

    fn assert_no_overlap(live: &[(u64, u64)], size: u64) {
        let mut v = live.to_vec();
        v.sort_unstable();
        for w in v.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap {:?} {:?}", w[0], w[1]);
        }
        if let Some(last) = v.last() {
            assert!(last.0 + last.1 <= size, "out of bounds {last:?}");
        }
    }

    #[test]
    fn bins_round_the_right_way() {
        for size in 1..10_000u64 {
            assert!(bin_size(bin_round_up(size)) >= size);
            assert!(bin_size(bin_round_down(size)) <= size);
        }
        assert_eq!(bin_size(bin_round_up(8)), 8);
        assert_eq!(bin_size(bin_round_up(9)), 9);
        assert_eq!(bin_size(bin_round_up(17)), 18);
    }

    #[test]
    fn alloc_rounds_to_alignment_and_bin() {
        let mut a = OffsetAllocator::new(1 << 30, 64);
        let x = a.alloc(1).unwrap();
        assert_eq!(x, Allocation { offset: 0, len: 64 });
        let y = a.alloc(1_000_001).unwrap();
        assert!(y.len >= 1_000_001 && y.len.is_multiple_of(64));
        assert!(y.len <= 1_000_001 + 1_000_001 / 8 + 64);
        assert_eq!(a.used(), x.len + y.len);
        assert!(a.alloc(0).is_none());
    }

    #[test]
    fn free_rejects_double_and_unknown() {
        let mut a = OffsetAllocator::new(1 << 20, 64);
        let x = a.alloc(4096).unwrap();
        assert!(!a.free(x.offset + 64));
        assert!(!a.free(7));
        assert!(a.free(x.offset));
        assert!(!a.free(x.offset));
        assert_eq!(a.used(), 0);
        assert_eq!(a.largest_free(), 1 << 20);
    }

    #[test]
    fn exhausts_and_refuses() {
        let mut a = OffsetAllocator::new(64 * 100, 64);
        let mut n = 0;
        while a.alloc(64).is_some() {
            n += 1;
        }
        assert_eq!(n, 100);
        assert_eq!(a.used(), a.capacity());
        assert_eq!(a.largest_free(), 0);
    }

    #[test]
    fn from_used_rejects_overlaps_and_out_of_range() {
        let ranges = [
            (0, 100),
            (64, 10),
            (128, 64),
            (1 << 20, 64),
            (4096, 0),
            (100, 8),
            (512, 64),
        ];
        let (mut a, rejected) = OffsetAllocator::from_used(1 << 20, 64, ranges);
        assert_eq!(rejected, vec![(64, 10), (1 << 20, 64), (4096, 0), (100, 8)]);
        assert_eq!(a.used(), 128 + 64 + 64);
        assert_eq!(a.len_at(0), Some(128));
        assert!(a.free(128));
        assert!(a.free(0));
        assert!(a.free(512));
        assert_eq!(a.free_blocks(), vec![(0, 1 << 20)]);
    }

    #[test]
    fn from_used_repeated_range_rejects_the_second() {
        let (_, rejected) = OffsetAllocator::from_used_indexed(1 << 20, 64, &[(0, 64), (0, 64)]);
        assert_eq!(rejected, vec![1]);
    }

    #[test]
    fn mib_objects_do_not_fragment() {
        let size = 1024 * MIB;
        let mut a = OffsetAllocator::new(size, 64);
        let mut rng = StdRng::seed_from_u64(7);
        let mut live: Vec<Allocation> = Vec::new();
        for round in 0..20 {
            // Fill until an allocation fails.
            loop {
                let len = rng.gen_range(MIB..=4 * MIB);
                match a.alloc(len) {
                    Some(x) => live.push(x),
                    None => {
                        // A failure is only acceptable with little free space left.
                        let free = size - a.used();
                        assert!(
                            free < 64 * MIB,
                            "round {round}: alloc of {len} failed with {free} free"
                        );
                        break;
                    }
                }
            }
            // Free a random half.
            let mut keep = Vec::new();
            for x in live.drain(..) {
                if rng.gen_bool(0.5) {
                    assert!(a.free(x.offset));
                } else {
                    keep.push(x);
                }
            }
            live = keep;
        }
        for x in live.drain(..) {
            assert!(a.free(x.offset));
        }
        assert_eq!(a.free_blocks(), vec![(0, size)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u64..200_000).prop_map(Op::Alloc),
            2 => any::<usize>().prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn random_ops_keep_ranges_disjoint(
            size in 1u64..4_000_000,
            align_pow in 0u32..8,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let align = 1u64 << align_pow;
            let mut a = OffsetAllocator::new(size, align);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(len) => {
                        if let Some(x) = a.alloc(len) {
                            prop_assert!(x.len >= len);
                            prop_assert_eq!(x.offset % a.align(), 0);
                            live.push((x.offset, x.len));
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (off, _) = live.swap_remove(i % live.len());
                        prop_assert!(a.free(off));
                        prop_assert!(!a.free(off));
                    }
                    Op::Free(_) => {}
                }
                assert_no_overlap(&live, size);
                prop_assert_eq!(a.used(), live.iter().map(|x| x.1).sum::<u64>());
            }
            for (off, _) in live.drain(..) {
                prop_assert!(a.free(off));
            }
            let whole = size / align * align;
            if whole > 0 {
                prop_assert_eq!(a.free_blocks(), vec![(0, whole)]);
                prop_assert_eq!(a.largest_free(), whole);
            }
        }

        #[test]
        fn from_used_then_alloc_avoids_used(
            size in 1u64..2_000_000,
            ranges in proptest::collection::vec((0u64..2_000_000, 1u64..100_000), 0..40),
            allocs in proptest::collection::vec(1u64..100_000, 0..60),
        ) {
            let ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(o, l)| (o / 64 * 64, l)).collect();
            let (mut a, rejected) = OffsetAllocator::from_used_indexed(size, 64, &ranges);
            let mut live: Vec<(u64, u64)> = ranges
                .iter()
                .enumerate()
                .filter(|(i, _)| !rejected.contains(i))
                .map(|(_, &(o, l))| (o, l.div_ceil(64) * 64))
                .collect();
            assert_no_overlap(&live, size);
            prop_assert_eq!(a.used(), live.iter().map(|x| x.1).sum::<u64>());
            for len in allocs {
                if let Some(x) = a.alloc(len) {
                    live.push((x.offset, x.len));
                }
                assert_no_overlap(&live, size);
            }
            for (off, _) in live.drain(..) {
                prop_assert!(a.free(off));
            }
            prop_assert_eq!(a.used(), 0);
        }
    }
}
