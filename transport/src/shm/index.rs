//! The master's location index: where each object is, published in shared memory so that a
//! client on the master's host finds a key's replica without asking (docs/semantics.md,
//! "Same-host lookups"). A cold same-host get is then the index probe and the copy: no round
//! trip at all.
//!
//! # Layout
//! A header (64 bytes: `MAGIC`, the slot count, and the monotonic-clock instant in
//! nanoseconds until which the index may be trusted) and the slots: an open-addressed table
//! keyed by the 128-bit XXH3 hash of the key, probed linearly from its home slot for at most
//! [`PROBES`] slots. A slot is [`WORDS`] u64 words: a sequence number (odd while the master
//! writes the slot), the hash (both words 0: empty; both `u64::MAX`: removed), then the
//! replica: its id, node, segment, offset and length (the value's), and the object's crc32c
//! and the replica's tier in one word.
//!
//! # Why an entry found is proof
//! Only the master writes the index, under its core's lock, after every change to an object
//! and before it answers anything that depends on the change: a removed or overwritten key's
//! entry is withdrawn before the remove or the overwrite is acknowledged, a moved one is
//! rewritten before the old range is given to anyone else. Every write of a slot advances its
//! sequence number. So a reader that takes the entry with its sequence number, copies the
//! replica's bytes, and then finds the same sequence number again (a [`Ticket`]) copied bytes
//! that the master had not let go of at any moment of the copy: the range could not have been
//! handed to another writer. That also needs the master to be alive and the one in charge:
//! it renews the header's deadline every tick (a quarter of a second ahead), sets it to 0
//! when it stops leading or exits, and a master that finds a dead master's index waits for
//! its deadline to pass before it serves ([`clear_stale`]). A reader trusts only an index
//! whose deadline has not passed, at the lookup and again after the copy. A hash names its
//! key: 128 bits, so two keys of one pool sharing one is not a concern (about 2^-64 for
//! 2^32 keys).
//!
//! A reader racing a write sees an odd or changed sequence number and reads the slot again;
//! a missing entry (a full table, one being rebuilt) is a miss, which the client asks the
//! master about.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{
        atomic::{fence, AtomicU64, Ordering},
        Arc,
    },
};

use kvpool_proto::{NodeId, ReplicaDesc, ReplicaId, SegmentId, Tier};
use memmap2::{MmapOptions, MmapRaw};

/// The first header word: "KVPINDEX".
const MAGIC: u64 = u64::from_le_bytes(*b"KVPINDEX");
/// Header bytes before the first slot (a cache line).
const HEADER: usize = 64;
/// Header word indexes.
const H_MAGIC: usize = 0;
const H_SLOTS: usize = 1;
const H_VALID_UNTIL: usize = 2;
/// Word indexes within a slot: the sequence number, the hash, then the entry's words
/// ([`Entry::words`]).
const W_SEQ: usize = 0;
const W_HASH_LO: usize = 1;
const W_HASH_HI: usize = 2;
const W_ENTRY: usize = 3;
/// Words of an entry, and of a slot.
const ENTRY_WORDS: usize = 6;
pub const WORDS: usize = W_ENTRY + ENTRY_WORDS;
/// The most slots a lookup or an insertion probes.
pub const PROBES: usize = 32;
/// Fewest and most slots an index has.
pub const MIN_SLOTS: usize = 1 << 10;
pub const MAX_SLOTS: usize = 1 << 24;
/// How far ahead of each renewal the master says its index may be trusted.
pub const VALIDITY_NS: u64 = 250_000_000;
const EMPTY: u128 = 0;
const REMOVED: u128 = u128::MAX;

/// What a slot says of a key: one replica (where its value starts and how long it is), and
/// the object's crc32c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub replica: ReplicaId,
    pub node: NodeId,
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u64,
    pub tier: Tier,
    pub checksum: u32,
}

impl Entry {
    /// What the index says of replica `r` of an object whose crc32c is `checksum`.
    pub fn of(r: &ReplicaDesc, checksum: u32) -> Entry {
        Entry {
            replica: r.id,
            node: r.node,
            segment: r.segment,
            offset: r.offset,
            len: r.len,
            tier: r.tier,
            checksum,
        }
    }

    /// The replica, on the node whose data address is `addr`.
    pub fn replica(&self, addr: Arc<str>) -> ReplicaDesc {
        ReplicaDesc {
            id: self.replica,
            node: self.node,
            addr,
            segment: self.segment,
            offset: self.offset,
            len: self.len,
            tier: self.tier,
        }
    }

    /// The slot words, after the hash.
    fn words(&self) -> [u64; ENTRY_WORDS] {
        let tier = u64::from(self.tier == Tier::Nvme);
        [
            self.replica.0,
            self.node.0,
            self.segment.0,
            self.offset,
            self.len,
            u64::from(self.checksum) | (tier << 32),
        ]
    }

    fn from_words(w: [u64; ENTRY_WORDS]) -> Entry {
        Entry {
            replica: ReplicaId(w[0]),
            node: NodeId(w[1]),
            segment: SegmentId(w[2]),
            offset: w[3],
            len: w[4],
            tier: if w[5] >> 32 == 1 {
                Tier::Nvme
            } else {
                Tier::Dram
            },
            checksum: w[5] as u32,
        }
    }
}

/// Whether an index may have `slots` slots: a power of two within [`MIN_SLOTS`, `MAX_SLOTS`]
/// (the master's setting, the writer and every reader check it).
pub fn valid_slots(slots: u64) -> bool {
    slots.is_power_of_two() && (MIN_SLOTS as u64..=MAX_SLOTS as u64).contains(&slots)
}

/// What a reader checks after its copy: the slot it read and the sequence number it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
    seq: u64,
}

/// The index's hash of a wire key (never the empty or the removed mark).
pub fn key_hash(key: &[u8]) -> u128 {
    match xxhash_rust::xxh3::xxh3_128(key) {
        EMPTY => 1,
        REMOVED => REMOVED - 1,
        h => h,
    }
}

/// This host's monotonic clock in nanoseconds: the same clock in every process of one boot,
/// which the deadline is written in.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn len_for(slots: usize) -> usize {
    HEADER + 8 * WORDS * slots
}

fn home(hash: u128, slots: usize) -> usize {
    let bits = slots.trailing_zeros();
    let folded = (hash as u64) ^ ((hash >> 64) as u64);
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
}

/// A mapping of the table.
struct Table {
    map: MmapRaw,
    slots: usize,
}

impl Table {
    fn header(&self, w: usize) -> &AtomicU64 {
        debug_assert!(w < HEADER / 8);
        // SAFETY: the mapping is `len_for(slots)` bytes (checked where it is made), page
        // aligned, so header word `w < 8` is an aligned u64 inside it, valid as long as
        // `self`. Other processes access these words only atomically (the master stores,
        // clients load), which is what `AtomicU64` over shared memory requires.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().cast::<u64>().add(w)) }
    }

    fn word(&self, slot: usize, w: usize) -> &AtomicU64 {
        debug_assert!(slot < self.slots && w < WORDS);
        // SAFETY: as for `header`: slot `slot < slots`, word `w < WORDS` lies inside the
        // mapping, 8-byte aligned (the header and slots are multiples of 8 bytes).
        unsafe {
            AtomicU64::from_ptr(
                self.map
                    .as_mut_ptr()
                    .add(HEADER)
                    .cast::<u64>()
                    .add(slot * WORDS + w),
            )
        }
    }

    fn hash_at(&self, slot: usize) -> u128 {
        let lo = self.word(slot, W_HASH_LO).load(Ordering::Relaxed);
        let hi = self.word(slot, W_HASH_HI).load(Ordering::Relaxed);
        u128::from(lo) | (u128::from(hi) << 64)
    }

    fn entry_at(&self, slot: usize) -> Entry {
        Entry::from_words(std::array::from_fn(|i| {
            self.word(slot, W_ENTRY + i).load(Ordering::Relaxed)
        }))
    }

    /// The slot's hash and entry as of one sequence number (even), read consistently:
    /// `None` while the master keeps writing it.
    fn read(&self, slot: usize) -> Option<(u128, Entry, u64)> {
        for _ in 0..8 {
            let seq = self.word(slot, W_SEQ).load(Ordering::Acquire);
            if seq & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let (hash, entry) = (self.hash_at(slot), self.entry_at(slot));
            fence(Ordering::Acquire);
            if self.word(slot, W_SEQ).load(Ordering::Relaxed) == seq {
                return Some((hash, entry, seq));
            }
        }
        None
    }

    fn valid(&self) -> bool {
        mono_ns() < self.header(H_VALID_UNTIL).load(Ordering::Acquire)
    }
}

/// The master's side: publishes and withdraws entries. Used under the core's lock.
pub struct IndexWriter {
    table: Table,
    path: PathBuf,
    live: usize,
    removed: usize,
}

impl std::fmt::Debug for IndexWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexWriter")
            .field("path", &self.path)
            .field("slots", &self.table.slots)
            .field("live", &self.live)
            .finish()
    }
}

impl IndexWriter {
    /// A fresh index of `slots` slots (a power of two within bounds) in a new file at `path`
    /// (mode 0600: readable by this user's processes only), not yet trusted by anyone.
    pub fn create(path: &Path, slots: usize) -> std::io::Result<IndexWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        if !valid_slots(slots as u64) {
            return Err(std::io::Error::other(format!(
                "an index needs a power-of-two slot count within [{MIN_SLOTS}, {MAX_SLOTS}], not {slots}"
            )));
        }
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let len = len_for(slots);
        file.set_len(len as u64)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        let table = Table { map, slots };
        table.header(H_SLOTS).store(slots as u64, Ordering::Relaxed);
        table.header(H_VALID_UNTIL).store(0, Ordering::Relaxed);
        table.header(H_MAGIC).store(MAGIC, Ordering::Release);
        Ok(IndexWriter {
            table,
            path: path.to_path_buf(),
            live: 0,
            removed: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn slots(&self) -> usize {
        self.table.slots
    }

    /// Published entries.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Lets readers trust the index until `mono_ns() + VALIDITY_NS`.
    pub fn renew(&self) {
        let until = mono_ns().saturating_add(VALIDITY_NS);
        self.table
            .header(H_VALID_UNTIL)
            .store(until, Ordering::Release);
    }

    /// Tells readers to stop trusting the index at once (this master stops leading or exits).
    pub fn invalidate(&self) {
        self.table.header(H_VALID_UNTIL).store(0, Ordering::Release);
    }

    /// Writes a slot (no entry: zeros): its sequence number odd while the words change, then
    /// advanced past.
    fn write(&mut self, slot: usize, hash: u128, e: Option<&Entry>) {
        let t = &self.table;
        let seq = t.word(slot, W_SEQ).load(Ordering::Relaxed);
        t.word(slot, W_SEQ).store(seq | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        t.word(slot, W_HASH_LO)
            .store(hash as u64, Ordering::Relaxed);
        t.word(slot, W_HASH_HI)
            .store((hash >> 64) as u64, Ordering::Relaxed);
        let words = e.map_or([0; ENTRY_WORDS], Entry::words);
        for (i, v) in words.into_iter().enumerate() {
            t.word(slot, W_ENTRY + i).store(v, Ordering::Relaxed);
        }
        t.word(slot, W_SEQ)
            .store((seq | 1).wrapping_add(1), Ordering::Release);
    }

    /// Where `hash` is published, and the first slot it could be placed in.
    fn probe(&self, hash: u128) -> (Option<usize>, Option<usize>) {
        let mask = self.table.slots - 1;
        let start = home(hash, self.table.slots);
        let mut free = None;
        for p in 0..PROBES.min(self.table.slots) {
            let i = (start + p) & mask;
            match self.table.hash_at(i) {
                h if h == hash => return (Some(i), free),
                EMPTY => return (None, free.or(Some(i))),
                REMOVED => free = free.or(Some(i)),
                _ => {}
            }
        }
        (None, free)
    }

    /// Publishes `entry` under `hash` (replacing what was there), or withdraws it (`None`).
    /// Returns whether the key is published now; a key that finds no room is not (its gets
    /// ask the master), and anything it had published before is withdrawn.
    pub fn set(&mut self, hash: u128, entry: Option<&Entry>) -> bool {
        if hash == EMPTY || hash == REMOVED {
            return false;
        }
        let (at, free) = self.probe(hash);
        match (at, entry) {
            (Some(i), Some(e)) => {
                // The same entry again (a lookup touched the object): nothing changes, so
                // readers in the middle of a copy keep their ticket.
                if self.table.entry_at(i) != *e {
                    self.write(i, hash, Some(e));
                }
                true
            }
            (Some(i), None) => {
                self.write(i, REMOVED, None);
                self.live -= 1;
                self.removed += 1;
                false
            }
            (None, None) => false,
            (None, Some(e)) => {
                // Keep a quarter of the slots empty, so probes stay short.
                let crowded = |w: &Self| (w.live + w.removed + 1) * 4 > w.table.slots * 3;
                let mut free = free;
                // Removed marks lengthen probes: rebuild without them when they crowd the
                // table or leave this key no room within its probes.
                if (crowded(self) || free.is_none()) && self.removed > 0 {
                    self.rebuild();
                    free = self.probe(hash).1;
                }
                match free.filter(|_| !crowded(self)) {
                    Some(i) => {
                        if self.table.hash_at(i) == REMOVED {
                            self.removed -= 1;
                        }
                        self.write(i, hash, Some(e));
                        self.live += 1;
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// Withdraws every entry (a new term starts from an empty map).
    pub fn clear(&mut self) {
        for i in 0..self.table.slots {
            if self.table.hash_at(i) != EMPTY {
                self.write(i, EMPTY, None);
            }
        }
        self.live = 0;
        self.removed = 0;
    }

    /// Places the live entries again without the removed marks. A reader meanwhile may miss
    /// one (and ask the master); any ticket on a rewritten slot fails.
    fn rebuild(&mut self) {
        let mut keep = Vec::with_capacity(self.live);
        for i in 0..self.table.slots {
            let h = self.table.hash_at(i);
            if h != EMPTY && h != REMOVED {
                keep.push((h, self.table.entry_at(i)));
            }
        }
        self.clear();
        for (h, e) in keep {
            let (_, free) = self.probe(h);
            if let Some(i) = free {
                self.write(i, h, Some(&e));
                self.live += 1;
            }
        }
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        self.invalidate();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A client's read-only view of a master's index.
pub struct IndexReader {
    table: Table,
    path: PathBuf,
}

impl std::fmt::Debug for IndexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexReader")
            .field("path", &self.path)
            .field("slots", &self.table.slots)
            .finish()
    }
}

impl IndexReader {
    /// Maps the index at `path`, which its master said has `slots` slots; the file's size and
    /// header must agree.
    pub fn open(path: &Path, slots: u64) -> Result<IndexReader, String> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| format!("opening the index {shown}: {e}"))?;
        let slots = usize::try_from(slots)
            .ok()
            .filter(|&s| valid_slots(s as u64))
            .ok_or_else(|| format!("an index of {slots} slots"))?;
        let len = len_for(slots);
        let flen = file.metadata().map_err(|e| e.to_string())?.len();
        if flen != len as u64 {
            return Err(format!(
                "an index of {slots} slots in a file of {flen} bytes ({shown})"
            ));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw_read_only(&file)
            .map_err(|e| format!("mapping the index {shown}: {e}"))?;
        let table = Table { map, slots };
        let (magic, n) = (
            table.header(H_MAGIC).load(Ordering::Acquire),
            table.header(H_SLOTS).load(Ordering::Relaxed),
        );
        if magic != MAGIC || n != slots as u64 {
            return Err(format!(
                "{shown} is not an index (magic {magic:#x}, {n} slots)"
            ));
        }
        Ok(IndexReader {
            table,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the master renewed the index lately (and has not withdrawn it).
    pub fn valid(&self) -> bool {
        self.table.valid()
    }

    /// The entry published under `hash` and the ticket to check after reading it; `None`
    /// when there is none, or the index is not to be trusted now.
    pub fn find(&self, hash: u128) -> Option<(Entry, Ticket)> {
        if hash == EMPTY || hash == REMOVED || !self.valid() {
            return None;
        }
        let mask = self.table.slots - 1;
        let start = home(hash, self.table.slots);
        for p in 0..PROBES.min(self.table.slots) {
            let slot = (start + p) & mask;
            let (h, entry, seq) = self.table.read(slot)?;
            if h == hash {
                return Some((entry, Ticket { slot, seq }));
            }
            if h == EMPTY {
                return None;
            }
        }
        None
    }

    /// Whether the entry a ticket was taken with still stands and the master still vouches
    /// for the index: call it after the copy. A fence keeps the copy's loads before it.
    pub fn still(&self, t: &Ticket) -> bool {
        fence(Ordering::SeqCst);
        t.slot < self.table.slots
            && self.table.word(t.slot, W_SEQ).load(Ordering::Acquire) == t.seq
            && self.table.valid()
    }
}

/// Where a master serving TCP port `port` puts its index: `/dev/shm` (memory, never written
/// back to a disk) when there is one, else next to the sockets.
pub fn default_path(port: u16) -> PathBuf {
    default_dir().join(format!("kvpool-master-{}-{port}.index", std::process::id()))
}

/// The folder of [`default_path`].
pub fn default_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        super::default_socket_dir()
    }
}

/// Clears the indexes of masters that died without removing them (SIGKILL), each once its
/// deadline has passed: until then a client may still trust it, and a master that served
/// first could hand its ranges to new writers under it. Returns how long it waited.
pub fn clear_stale() -> std::time::Duration {
    clear_stale_in(&default_dir())
}

fn clear_stale_in(dir: &Path) -> std::time::Duration {
    let started = std::time::Instant::now();
    for path in super::left_by_dead(dir, "kvpool-master-", ".index") {
        let until = read_deadline(&path).unwrap_or(0);
        let now = mono_ns();
        if until > now {
            std::thread::sleep(std::time::Duration::from_nanos(
                (until - now).min(VALIDITY_NS),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    started.elapsed()
}

/// The deadline in an index file's header, read without mapping it.
fn read_deadline(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 24];
    File::open(path).ok()?.read_exact(&mut head).ok()?;
    let word = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    (word(H_MAGIC) == MAGIC).then(|| word(H_VALID_UNTIL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> Entry {
        Entry {
            replica: ReplicaId(n),
            node: NodeId(7),
            segment: SegmentId(3),
            offset: n * 4096,
            len: 4000,
            tier: if n % 2 == 1 { Tier::Nvme } else { Tier::Dram },
            checksum: n as u32 ^ 0xdead_beef,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kvpool-index-{name}-{}", std::process::id()))
    }

    #[test]
    fn entries_are_seen_through_another_mapping_only_while_the_master_vouches() {
        let path = scratch("seen");
        let mut w = IndexWriter::create(&path, MIN_SLOTS).unwrap();
        let r = IndexReader::open(&path, MIN_SLOTS as u64).unwrap();
        let keys: Vec<u128> = (0..500u64).map(|i| key_hash(&i.to_le_bytes())).collect();
        for (i, &h) in keys.iter().enumerate() {
            assert!(w.set(h, Some(&entry(i as u64 + 1))));
        }
        assert!(r.find(keys[0]).is_none(), "never renewed: not trusted");
        w.renew();
        for (i, &h) in keys.iter().enumerate() {
            let (e, t) = r.find(h).expect("published");
            assert_eq!(e, entry(i as u64 + 1));
            assert!(r.still(&t));
        }
        assert!(r.find(key_hash(b"absent")).is_none());
        // A ticket fails once its entry changes or goes, and stays good while the master
        // writes the same entry again.
        let (_, t0) = r.find(keys[0]).unwrap();
        let (_, t1) = r.find(keys[1]).unwrap();
        let (_, t2) = r.find(keys[2]).unwrap();
        assert!(w.set(keys[0], Some(&entry(1))));
        assert!(r.still(&t0), "rewriting the same entry keeps tickets");
        assert!(w.set(keys[1], Some(&entry(999))));
        assert!(!r.still(&t1));
        assert_eq!(r.find(keys[1]).unwrap().0, entry(999));
        assert!(!w.set(keys[2], None));
        assert!(!r.still(&t2) && r.find(keys[2]).is_none());
        assert_eq!(w.live(), 499);
        // Withdrawn at once when the master stops vouching.
        let (_, t3) = r.find(keys[3]).unwrap();
        w.invalidate();
        assert!(!r.still(&t3) && r.find(keys[3]).is_none());
        w.renew();
        w.clear();
        assert!(!r.still(&t3) && r.find(keys[3]).is_none());
        assert_eq!(w.live(), 0);
        drop(w);
        assert!(!path.exists(), "removed with its writer");
        assert!(!r.valid(), "and withdrawn");
    }

    #[test]
    fn churn_past_the_table_rebuilds_it_and_a_full_one_refuses() {
        let path = scratch("churn");
        let mut w = IndexWriter::create(&path, MIN_SLOTS).unwrap();
        let r = IndexReader::open(&path, MIN_SLOTS as u64).unwrap();
        w.renew();
        let mut live: std::collections::VecDeque<u64> = Default::default();
        for n in 1..=20_000u64 {
            if live.len() == 400 {
                let gone = live.pop_front().unwrap();
                w.set(key_hash(&gone.to_le_bytes()), None);
            }
            assert!(
                w.set(key_hash(&n.to_le_bytes()), Some(&entry(n))),
                "key {n}"
            );
            live.push_back(n);
        }
        w.renew();
        for &n in &live {
            assert_eq!(r.find(key_hash(&n.to_le_bytes())).unwrap().0, entry(n));
        }
        assert!(r.find(key_hash(&1u64.to_le_bytes())).is_none());
        // Three quarters full: the next key is refused, nothing published is lost.
        let mut n = 100_000u64;
        while w.set(key_hash(&n.to_le_bytes()), Some(&entry(n))) {
            n += 1;
        }
        assert!(w.live() <= MIN_SLOTS * 3 / 4);
        assert!(r.find(key_hash(&n.to_le_bytes())).is_none());
        assert!(live
            .iter()
            .all(|&l| r.find(key_hash(&l.to_le_bytes())).is_some()));
    }

    #[test]
    fn a_reader_refuses_what_is_not_an_index_of_the_size_said() {
        let path = scratch("refuse");
        let _w = IndexWriter::create(&path, MIN_SLOTS).unwrap();
        let e = IndexReader::open(&path, 2 * MIN_SLOTS as u64).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        assert!(IndexReader::open(&path, 3).is_err());
        let other = scratch("other");
        std::fs::write(&other, vec![0u8; len_for(MIN_SLOTS)]).unwrap();
        let e = IndexReader::open(&other, MIN_SLOTS as u64).unwrap_err();
        assert!(e.contains("not an index"), "{e}");
        std::fs::remove_file(&other).unwrap();
        assert!(IndexReader::open(&scratch("none"), MIN_SLOTS as u64).is_err());
        assert!(IndexWriter::create(&scratch("odd"), 1000).is_err());
    }

    #[test]
    fn a_dead_masters_index_is_cleared_after_its_deadline_and_a_live_ones_kept() {
        let dir = scratch("stale");
        std::fs::create_dir_all(&dir).unwrap();
        // A pid above the kernel's maximum (4194304) never runs.
        let dead = dir.join("kvpool-master-4194399-5000.index");
        let w = IndexWriter::create(&dead, MIN_SLOTS).unwrap();
        w.renew();
        std::mem::forget(w); // as if killed: neither withdrawn nor removed
        let live = dir.join(format!("kvpool-master-{}-5001.index", std::process::id()));
        std::fs::write(&live, b"").unwrap();
        let waited = clear_stale_in(&dir);
        assert!(!dead.exists() && live.exists());
        assert!(
            waited >= std::time::Duration::from_millis(100),
            "waited out the dead master's deadline: {waited:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hashes_avoid_the_marks_and_slot_counts_stay_in_bounds() {
        assert_ne!(key_hash(b""), EMPTY);
        assert_ne!(key_hash(b"k"), key_hash(b"l"));
        assert!(valid_slots(MIN_SLOTS as u64) && valid_slots(1 << 18));
        assert!(valid_slots(MAX_SLOTS as u64));
        assert!(!valid_slots(MAX_SLOTS as u64 * 2) && !valid_slots(1000) && !valid_slots(0));
    }
}
