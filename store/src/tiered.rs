//! The node's NVMe segment: the tier engine ([`crate::nvme`]) seen as a segment of the pool.
//!
//! The master addresses an NVMe replica by the absolute offset of its value in the tier, like
//! a DRAM range; this module maps such a range back to the record holding it, reads it
//! through the engine, and writes the records the master's copy tasks ask for.

use std::{collections::BTreeMap, sync::Mutex};

use kvpool_proto::{ErrorCode, InventoryEntry, ReplicaId, SegmentId, SegmentInfo, Tier, WireError};

use crate::{
    inventory::LostReplicas,
    nvme::{NvmeConfig, NvmeError, NvmeTier, Part, ValueBuf},
};

/// Where a record sits, by the offset of its extent.
#[derive(Debug, Clone, Copy)]
struct Extent {
    replica: u64,
    key_len: usize,
    value_len: u64,
}

impl Extent {
    fn value_start(&self, record: u64) -> u64 {
        record + kvpool_proto::layout::value_offset(self.key_len)
    }
}

/// One NVMe segment of this node.
pub struct NvmeSegment {
    id: SegmentId,
    tier: NvmeTier,
    /// Record offset -> extent, to find the record behind a value range in O(log n).
    extents: Mutex<BTreeMap<u64, Extent>>,
    /// Records dropped as corrupt, for the next heartbeat.
    lost: LostReplicas,
    /// The read-only descriptor handed to same-host clients, once [`NvmeSegment::share`]d.
    shared: Option<std::fs::File>,
}

impl std::fmt::Debug for NvmeSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeSegment").field("id", &self.id).finish()
    }
}

fn wire(e: NvmeError) -> WireError {
    WireError::new(e.code(), e.to_string())
}

impl NvmeSegment {
    /// Opens (or creates) the tier; the records its index knows become this segment's
    /// inventory. Blocking: call it from a blocking context.
    pub fn open(id: SegmentId, cfg: NvmeConfig) -> Result<NvmeSegment, NvmeError> {
        let (tier, records) = NvmeTier::open(cfg)?;
        let extents = records
            .iter()
            .map(|r| {
                (
                    r.offset,
                    Extent {
                        replica: r.replica,
                        key_len: r.key.len(),
                        value_len: r.value_len,
                    },
                )
            })
            .collect();
        Ok(NvmeSegment {
            id,
            tier,
            extents: Mutex::new(extents),
            lost: LostReplicas::default(),
            shared: None,
        })
    }

    /// Lets same-host clients read this segment's records themselves
    /// ([`NvmeSegment::shared_file`]).
    pub fn share(&mut self) -> std::io::Result<()> {
        self.shared = Some(self.tier.open_read_only()?);
        Ok(())
    }

    /// The read-only descriptor same-host clients get, if the segment is shared.
    pub fn shared_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.shared.as_ref().map(|f| f.as_fd())
    }

    pub fn id(&self) -> SegmentId {
        self.id
    }

    pub fn tier(&self) -> &NvmeTier {
        &self.tier
    }

    pub fn info(&self) -> SegmentInfo {
        SegmentInfo {
            id: self.id,
            size: self.tier.capacity(),
            tier: Tier::Nvme,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Extent>> {
        // Single inserts and removes: a panic elsewhere cannot leave the map half-changed.
        self.extents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the tier holds, as inventory entries addressed by value offset (as the master
    /// describes NVMe replicas).
    pub fn inventory(&self) -> Vec<InventoryEntry> {
        self.tier
            .records()
            .into_iter()
            .map(|r| InventoryEntry {
                replica: ReplicaId(r.replica),
                segment: self.id,
                offset: r.value_start(),
                len: r.value_len,
                checksum: r.checksum,
                key: r.key,
                // The node writes NVMe records only on the master's copy tasks, which copy
                // committed objects alone. Pins are not kept on disk: a hard-pinned object is
                // never demoted, and a soft pin only orders eviction.
                commit: kvpool_proto::CommitState::Committed {
                    hard_pin: false,
                    soft_pin: false,
                },
            })
            .collect()
    }

    /// Reads `len` bytes of a value starting at absolute `offset`. A read of a whole value
    /// is verified against its checksum by the engine.
    pub async fn read(&self, offset: u64, len: u64) -> Result<ValueBuf, WireError> {
        ValueBuf::collect(self.read_parts(offset, len)?).await
    }

    /// [`read`](Self::read), part by part as the parts land (to send them while the rest is
    /// still on the device). The stream ends with an error instead when the read or the
    /// value's check fails; a record that fails its check is dropped here and reported as
    /// lost, and the read answered as a miss.
    pub fn read_parts(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<impl futures::Stream<Item = Result<Part, WireError>> + Send + Unpin + '_, WireError>
    {
        let found = {
            let extents = self.lock();
            extents
                .range(..=offset)
                .next_back()
                .map(|(&record, e)| (record, *e))
                .filter(|(record, e)| {
                    let start = e.value_start(*record);
                    offset >= start
                        && offset
                            .checked_add(len)
                            .is_some_and(|end| end <= start + e.value_len)
                })
        };
        let Some((record, e)) = found else {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("no NVMe record holds {len} bytes at {offset}"),
            ));
        };
        let start = offset - e.value_start(record);
        let parts = self
            .tier
            .read_value_parts(record, e.key_len, e.value_len, (start, len))
            .map_err(wire)?;
        // Counted as a hit when the read starts: a read that then fails drops the record.
        self.tier.touch(e.replica);
        Ok(futures::StreamExt::map(parts, move |r| {
            r.map_err(|err| self.failed(e.replica, err))
        }))
    }

    /// What a failed read of replica `replica` answers; a record that failed its check is
    /// never served again.
    fn failed(&self, replica: u64, err: NvmeError) -> WireError {
        match err {
            err @ (NvmeError::ChecksumMismatch { .. } | NvmeError::Corrupt { .. }) => {
                // Never serve it again: the record is dropped here, and the read is answered
                // as a miss (the client then tries another replica or recomputes).
                tracing::warn!(replica, "dropping a corrupt NVMe record: {err}");
                self.free(ReplicaId(replica));
                // ...and the master hears of it in the next heartbeat, so lookups stop
                // counting a replica that every read would miss.
                self.lost.record(ReplicaId(replica));
                WireError::new(
                    ErrorCode::NotFound,
                    format!("NVMe record corrupt and dropped: {err}"),
                )
            }
            err => wire(err),
        }
    }

    /// Writes a record for a copy task: `value` becomes replica `replica` of `key` at the
    /// record offset `record`.
    pub async fn write(
        &self,
        record: u64,
        replica: ReplicaId,
        key: &[u8],
        value: &[u8],
        checksum: u32,
    ) -> Result<(), WireError> {
        self.tier
            .write_record(record, replica.0, key, value, checksum)
            .await
            .map_err(wire)?;
        self.lock().insert(
            record,
            Extent {
                replica: replica.0,
                key_len: key.len(),
                value_len: value.len() as u64,
            },
        );
        Ok(())
    }

    /// Forgets a replica (the master freed it). Unknown ids are ignored.
    pub fn free(&self, replica: ReplicaId) {
        if let Some(r) = self.tier.get(replica.0) {
            let mut extents = self.lock();
            if extents
                .get(&r.offset)
                .is_some_and(|e| e.replica == replica.0)
            {
                extents.remove(&r.offset);
            }
        }
        if let Err(e) = self.tier.remove(replica.0) {
            tracing::warn!(
                replica = replica.0,
                "removing an NVMe record from the index: {e}"
            );
        }
    }

    pub fn healthy(&self) -> bool {
        self.tier.healthy()
    }

    /// Records dropped as corrupt since the last heartbeat took them.
    pub fn lost(&self) -> &LostReplicas {
        &self.lost
    }
}
