//! Record bookkeeping: what the tier holds (by replica and by offset), which replicas are
//! being written, and accesses not yet written to the index.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{record_len, tier::Shared, value_offset, NvmeError, NvmeTier};

/// Touches kept in memory before they are written to the index.
const TOUCH_BATCH: usize = 256;

/// One record the tier holds, as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeRecordInfo {
    pub replica: u64,
    pub key: Vec<u8>,
    /// Start of the record's extent (its header), 4 KiB-aligned.
    pub offset: u64,
    pub value_len: u64,
    /// crc32c of the value.
    pub checksum: u32,
    /// Last write or [`NvmeTier::touch`], in milliseconds since the Unix epoch.
    pub last_access_ms: u64,
}

impl NvmeRecordInfo {
    /// Bytes of the extent the record occupies.
    pub fn record_len(&self) -> u64 {
        record_len(self.key.len(), self.value_len)
    }

    /// Offset of the value on the device.
    pub fn value_start(&self) -> u64 {
        self.offset + value_offset(self.key.len())
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) records: HashMap<u64, NvmeRecordInfo>,
    /// Start offset -> replica. Records never overlap (indexing one drops those it overlaps).
    pub(super) by_offset: BTreeMap<u64, u64>,
    /// Replicas being written; true once removed mid-write, so the commit does not index them.
    pub(super) pending: HashMap<u64, bool>,
    /// Replicas whose last access changed since it was last written to the index.
    pub(super) touched: HashSet<u64>,
}

impl State {
    pub(super) fn insert(&mut self, info: NvmeRecordInfo) {
        self.remove(info.replica);
        self.by_offset.insert(info.offset, info.replica);
        self.records.insert(info.replica, info);
    }

    pub(super) fn remove(&mut self, replica: u64) -> Option<NvmeRecordInfo> {
        let info = self.records.remove(&replica)?;
        if self.by_offset.get(&info.offset) == Some(&replica) {
            self.by_offset.remove(&info.offset);
        }
        self.touched.remove(&replica);
        Some(info)
    }

    /// Replicas whose extents intersect `offset..offset+len`.
    pub(super) fn overlapping(&self, offset: u64, len: u64) -> Vec<u64> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        for (&start, &id) in self.by_offset.range(..end).rev() {
            let other_end = self
                .records
                .get(&id)
                .map_or(start, |r| start.saturating_add(r.record_len()));
            if other_end <= offset {
                break;
            }
            out.push(id);
        }
        out
    }

    pub(super) fn at(&self, offset: u64) -> Option<&NvmeRecordInfo> {
        self.by_offset
            .get(&offset)
            .and_then(|id| self.records.get(id))
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NvmeTier {
    /// Forgets a replica (the master freed it): an index delete, no data I/O. Unknown ids are
    /// ignored; a replica still being written is not indexed when its write completes.
    pub fn remove(&self, replica: u64) -> Result<(), NvmeError> {
        let s = &self.shared;
        let mut st = s.lock();
        if let Some(revoked) = st.pending.get_mut(&replica) {
            *revoked = true;
        }
        if st.remove(replica).is_some() {
            // Not synced: a remove lost in a crash only brings back a record whose space the
            // master reallocates, and the header check or the checksum catches the overwrite.
            s.index.free(replica)?;
        }
        Ok(())
    }

    /// Records an access to a replica (for the master's coldest-first eviction). Batched:
    /// the index is written every 256 touches, by [`flush`](Self::flush) and on drop.
    pub fn touch(&self, replica: u64) {
        let s = &self.shared;
        let mut st = s.lock();
        let Some(r) = st.records.get_mut(&replica) else {
            return;
        };
        r.last_access_ms = now_ms();
        st.touched.insert(replica);
        if st.touched.len() >= TOUCH_BATCH {
            s.flush_touches(&mut st);
        }
    }

    /// Writes pending touches to the index.
    pub fn flush(&self) {
        let s = &self.shared;
        s.flush_touches(&mut s.lock());
    }

    /// The records indexed now (for a registration while running).
    pub fn records(&self) -> Vec<NvmeRecordInfo> {
        let mut v: Vec<_> = self.shared.lock().records.values().cloned().collect();
        v.sort_by_key(|r| r.offset);
        v
    }

    /// The record of a replica, if indexed.
    pub fn get(&self, replica: u64) -> Option<NvmeRecordInfo> {
        self.shared.lock().records.get(&replica).cloned()
    }
}

impl Shared {
    pub(super) fn flush_touches(&self, st: &mut State) {
        if st.touched.is_empty() {
            return;
        }
        let ids: Vec<u64> = st.touched.drain().collect();
        let puts: Vec<&NvmeRecordInfo> = ids.iter().filter_map(|id| st.records.get(id)).collect();
        // Under the state lock, so a concurrent remove cannot be undone by this put.
        if let Err(e) = self.index.write(&puts, &[], &[], false) {
            tracing::warn!(
                "cannot record {} accesses in the nvme index: {e}",
                puts.len()
            );
        }
    }
}
