//! The replica board: which replicas a node's shared segments hold, published in shared
//! memory so that a same-host client can check a cached location without a round trip.
//!
//! A get from a cached location must not return bytes of a range that no longer holds the
//! replica the location names (docs/semantics.md, "Hot reads"). Over TCP the node checks its
//! inventory before and after the copy; over shared memory the client copies itself, and
//! asking the node afterwards costs a round trip, as much as the lookup the cache saves. So
//! the node publishes its inventory's replica ids in a memfd that same-host clients map
//! read-only: the client checks the id before and after its copy, with two memory loads.
//!
//! # Layout
//! A header (`MAGIC`, then the slot count, a power of two, as little-endian u64s) and the
//! slots: an open-addressed table of replica ids (u64, 0 = empty, `u64::MAX` = removed),
//! probed linearly from the id's home slot for at most [`PROBES`] slots.
//!
//! # Why a present id is proof
//! Only the node writes the board, always under its inventory's lock, and a slot only ever
//! goes empty → id → removed → id. An id is published when the inventory records its tag and
//! marked removed when the inventory drops it (freed, overwritten, refused), before the node
//! answers anything that depends on the drop. Replica ids are never reused, so an id found
//! after the copy was present throughout it, as the node's own check proves over TCP. A
//! reader racing a change may miss an id that is there (a full table, a rebuild clearing
//! removed slots): that is a miss, which the client retries through the master; it can never
//! find an id that is gone.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use memmap2::{MmapOptions, MmapRaw};

/// The first header word: "KVPBOARD".
const MAGIC: u64 = u64::from_le_bytes(*b"KVPBOARD");
/// Header bytes before the first slot (a cache line).
const HEADER: usize = 64;
const EMPTY: u64 = 0;
const REMOVED: u64 = u64::MAX;
/// The most slots a lookup or an insertion probes. An id that finds no free slot within them
/// is not published (its reads take the node's check over the socket).
pub const PROBES: usize = 32;
/// Fewest and most slots a board has.
const MIN_SLOTS: usize = 1 << 12;
const MAX_SLOTS: usize = 1 << 22;

/// The slot count for a node with `dram` bytes of shared segments: one slot per 8 KiB, a power
/// of two within [4 Ki, 4 Mi] (8 KiB of values per 8-byte slot: 0.1 % of the memory).
pub fn slots_for(dram: u64) -> usize {
    usize::try_from(dram / (8 << 10))
        .unwrap_or(MAX_SLOTS)
        .clamp(MIN_SLOTS, MAX_SLOTS)
        .next_power_of_two()
}

/// The first slot `id` probes: Fibonacci hashing, so consecutive ids spread over the table.
fn home(id: u64, slots: usize) -> usize {
    let bits = slots.trailing_zeros();
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
}

/// The slots of a mapping: `slots` atomics after the header.
struct Slots {
    map: MmapRaw,
    slots: usize,
}

impl Slots {
    fn slot(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.slots);
        // SAFETY: the mapping is HEADER + 8 * slots bytes (checked where it is made), page
        // aligned, so slot `i < slots` is an aligned u64 inside it, valid as long as `self`.
        // Other processes access these words only atomically (the node writes, clients
        // load), which is what `AtomicU64` over shared memory requires.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(HEADER).cast::<u64>().add(i)) }
    }

    fn header(&self, i: usize) -> &AtomicU64 {
        // SAFETY: as for `slot`: the header's words 0 and 1 lie in the mapping's first line.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().cast::<u64>().add(i)) }
    }

    /// The slot holding `id`, probing from its home slot.
    fn find(&self, id: u64) -> Option<usize> {
        let mask = self.slots - 1;
        let start = home(id, self.slots);
        for p in 0..PROBES.min(self.slots) {
            let i = (start + p) & mask;
            match self.slot(i).load(Ordering::Acquire) {
                v if v == id => return Some(i),
                EMPTY => return None,
                _ => {}
            }
        }
        None
    }
}

/// The node's side: publishes and withdraws ids. Not shared between threads by itself: the
/// inventory calls it under its lock.
pub struct BoardWriter {
    file: File,
    slots: Slots,
    /// Published ids, and slots marked removed since the last rebuild.
    live: usize,
    removed: usize,
}

impl std::fmt::Debug for BoardWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardWriter")
            .field("slots", &self.slots.slots)
            .field("live", &self.live)
            .field("removed", &self.removed)
            .finish()
    }
}

impl BoardWriter {
    /// A board of `slots` slots (a power of two, at least 2) in a fresh memfd.
    pub fn new(slots: usize) -> std::io::Result<BoardWriter> {
        if !slots.is_power_of_two() || slots < 2 {
            return Err(std::io::Error::other(format!(
                "a board needs a power-of-two slot count, not {slots}"
            )));
        }
        let len = HEADER + 8 * slots;
        let file = super::memfd("kvpool-board", 0)?;
        file.set_len(len as u64)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        let slots = Slots { map, slots };
        slots.header(1).store(slots.slots as u64, Ordering::Relaxed);
        slots.header(0).store(MAGIC, Ordering::Release);
        Ok(BoardWriter {
            file,
            slots,
            live: 0,
            removed: 0,
        })
    }

    /// The memfd a client maps.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn slots(&self) -> usize {
        self.slots.slots
    }

    /// Published ids.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Publishes `id` (once: an id already published stays as it is); false when it could not be (a full board, or
    /// an id that cannot be told from an empty or removed slot): its reads then take the
    /// node's check. `live_ids` lists every id that should stay published, for a rebuild
    /// when removed slots crowd the table.
    pub fn insert<I: IntoIterator<Item = u64>>(
        &mut self,
        id: u64,
        live_ids: impl FnOnce() -> I,
    ) -> bool {
        if id == EMPTY || id == REMOVED {
            return false;
        }
        // Keep a quarter of the slots empty, so probes stay short and lookups end early.
        let crowded = |b: &Self| (b.live + b.removed + 1) * 4 > b.slots.slots * 3;
        if crowded(self) && self.removed > 0 {
            self.rebuild(live_ids());
        }
        if crowded(self) {
            return false;
        }
        // Never twice: a second copy would outlive the first's removal. (The rebuild may have
        // placed it already, or it may be recorded again.)
        self.slots.find(id).is_some() || self.place(id)
    }

    fn place(&mut self, id: u64) -> bool {
        let mask = self.slots.slots - 1;
        let start = home(id, self.slots.slots);
        for p in 0..PROBES.min(self.slots.slots) {
            let slot = self.slots.slot((start + p) & mask);
            match slot.load(Ordering::Relaxed) {
                EMPTY => {
                    slot.store(id, Ordering::Release);
                    self.live += 1;
                    return true;
                }
                REMOVED => {
                    slot.store(id, Ordering::Release);
                    self.live += 1;
                    self.removed -= 1;
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// Withdraws `id` (nothing happens if it was not published).
    pub fn remove(&mut self, id: u64) {
        if let Some(i) = self.slots.find(id) {
            self.slots.slot(i).store(REMOVED, Ordering::Release);
            self.live -= 1;
            self.removed += 1;
        }
    }

    /// Clears the table and publishes `ids` again, dropping the removed marks. A reader
    /// probing meanwhile may miss a live id (a miss), never find a withdrawn one: `ids` must
    /// hold only ids that are still live.
    fn rebuild(&mut self, ids: impl IntoIterator<Item = u64>) {
        for i in 0..self.slots.slots {
            self.slots.slot(i).store(EMPTY, Ordering::Release);
        }
        self.live = 0;
        self.removed = 0;
        for id in ids {
            if id != EMPTY && id != REMOVED {
                self.place(id);
            }
        }
    }
}

/// A client's read-only view of a node's board.
pub struct BoardReader {
    slots: Slots,
}

impl std::fmt::Debug for BoardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardReader")
            .field("slots", &self.slots.slots)
            .finish()
    }
}

impl BoardReader {
    /// Maps a node's board memfd; `slots` is what the node said. The file's size and header
    /// must agree.
    pub fn new(fd: OwnedFd, slots: u64) -> Result<BoardReader, String> {
        let file = File::from(fd);
        let slots = usize::try_from(slots)
            .ok()
            .filter(|s| s.is_power_of_two() && *s >= 2 && *s <= MAX_SLOTS)
            .ok_or_else(|| format!("a board of {slots} slots"))?;
        let len = HEADER + 8 * slots;
        let flen = file.metadata().map_err(|e| e.to_string())?.len();
        if flen != len as u64 {
            return Err(format!(
                "a board of {slots} slots in a file of {flen} bytes"
            ));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw_read_only(&file)
            .map_err(|e| format!("mapping the board: {e}"))?;
        let slots = Slots { map, slots };
        let (magic, n) = (
            slots.header(0).load(Ordering::Acquire),
            slots.header(1).load(Ordering::Relaxed),
        );
        if magic != MAGIC || n != slots.slots as u64 {
            return Err(format!("not a board (magic {magic:#x}, {n} slots)"));
        }
        Ok(BoardReader { slots })
    }

    /// Whether the node holds replica `id` now. Loads only: a fence before the lookup keeps
    /// the caller's earlier reads (its copy) from moving after it.
    pub fn holds(&self, id: u64) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        id != EMPTY && id != REMOVED && self.slots.find(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_of(w: &BoardWriter) -> BoardReader {
        let fd = w.fd().try_clone_to_owned().unwrap();
        BoardReader::new(fd, w.slots() as u64).unwrap()
    }

    #[test]
    fn published_ids_are_seen_through_another_mapping_and_withdrawn_ones_are_not() {
        let mut w = BoardWriter::new(64).unwrap();
        let r = reader_of(&w);
        for id in 1..=40u64 {
            assert!(w.insert(id, Vec::new), "id {id}");
        }
        // Three quarters of 64: the 49th would crowd the table and there is nothing to
        // rebuild away.
        assert!((1..=40).all(|id| r.holds(id)));
        assert!(!r.holds(41) && !r.holds(0) && !r.holds(u64::MAX));
        for id in (1..=40).step_by(2) {
            w.remove(id);
        }
        assert!(
            (1..=40).all(|id| r.holds(id) == (id % 2 == 0)),
            "odd ids withdrawn"
        );
        assert_eq!(w.live(), 20);
        // Removed slots are reused, and a removed id stays gone.
        for id in 100..108 {
            assert!(w.insert(id, Vec::new));
        }
        assert!((100..108).all(|id| r.holds(id)) && !r.holds(1));
        // Publishing an id twice keeps one copy: one removal withdraws it.
        assert!(w.insert(100, Vec::new));
        w.remove(100);
        assert!(!r.holds(100));
    }

    #[test]
    fn a_crowded_board_rebuilds_from_the_live_ids_and_a_full_one_refuses() {
        let mut w = BoardWriter::new(16).unwrap();
        let r = reader_of(&w);
        let mut live: Vec<u64> = Vec::new();
        // Churn far past the table's size: each insertion after the first dozen finds the
        // table crowded with removed marks and rebuilds it from `live`.
        for id in 1..=500u64 {
            if live.len() == 8 {
                let gone = live.remove(0);
                w.remove(gone);
                assert!(!r.holds(gone));
            }
            let keep = live.clone();
            assert!(w.insert(id, move || keep), "id {id}");
            live.push(id);
            assert!(live.iter().all(|&l| r.holds(l)), "after {id}");
        }
        // Twelve live ids fill three quarters of 16 slots: the next is refused, and nothing
        // already published is lost.
        while live.len() < 12 {
            let id = live.last().unwrap() + 1;
            let keep = live.clone();
            assert!(w.insert(id, move || keep));
            live.push(id);
        }
        let keep = live.clone();
        assert!(!w.insert(10_000, move || keep));
        assert!(live.iter().all(|&l| r.holds(l)) && !r.holds(10_000));
    }

    #[test]
    fn a_reader_refuses_a_file_that_is_not_a_board_of_the_size_said() {
        let w = BoardWriter::new(64).unwrap();
        let dup = || w.fd().try_clone_to_owned().unwrap();
        assert!(BoardReader::new(dup(), 128).unwrap_err().contains("bytes"));
        assert!(BoardReader::new(dup(), 3).is_err());
        let other = super::super::memfd("not-a-board", 0).unwrap();
        other.set_len((HEADER + 8 * 64) as u64).unwrap();
        let e = BoardReader::new(other.into(), 64).err().unwrap();
        assert!(e.contains("not a board"), "{e}");
    }

    #[test]
    fn slot_counts_follow_the_memory_within_bounds() {
        assert_eq!(slots_for(0), MIN_SLOTS);
        assert_eq!(slots_for(2 << 30), 1 << 18);
        assert_eq!(slots_for(u64::MAX), MAX_SLOTS);
        assert!(slots_for(3 << 30).is_power_of_two());
    }
}
