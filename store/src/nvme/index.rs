//! The per-node RocksDB index: replica id -> where its record lies and what it holds, so a
//! restarted node finds its NVMe objects again.
//!
//! Keys are the replica id (u64 big endian, so iteration is in id order). Values are
//! `version u8 | offset u64 | value_len u64 | checksum u32 | last_access_ms u64 | key`, little
//! endian. An entry is only ever written after its record is durable on the device (the
//! tier's commit thread syncs the device first), so an entry never points at bytes that a
//! crash could lose; the header check at open catches the rest (a device that lied about a
//! flush, a file replaced or edited under the index).

use std::path::Path;

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::{NvmeError, NvmeRecordInfo};

const ENTRY_VERSION: u8 = 1;
const FIXED: usize = 1 + 8 + 8 + 4 + 8;

/// Decoded entries, and the raw keys of entries that do not decode.
pub(crate) type Loaded = (Vec<NvmeRecordInfo>, Vec<Box<[u8]>>);

pub(crate) struct Index {
    db: DB,
    /// The first write or sync that failed, if any. RocksDB keeps a failed log writer's error
    /// and must not be asked to write through it again: Debian's librocksdb 7.8.3 is built
    /// with assertions, and a write after an ENOSPC on the log aborts the whole node
    /// (`WritableFileWriter::AssertFalseAndGetStatusForPrevError`, found by the chaos soak
    /// with the index's filesystem full). So after one failure every write and sync is
    /// refused here, with the cause, until the node restarts (the tier is unhealthy by then:
    /// its callers mark it so on an index error).
    failed: std::sync::Mutex<Option<String>>,
    /// `KVPOOL_FAULT_NVME_INDEX_FREE=fail`: the first delete of a freed replica fails as a
    /// full disk would (and the index then refuses every write, as after a real failure),
    /// so end-to-end tests can show a removed record does not come back from the index.
    /// Unset, it costs one bool test per free.
    fail_frees: bool,
}

/// The fault switch for [`Index::free`].
const FAULT_FREE: &str = "KVPOOL_FAULT_NVME_INDEX_FREE";

impl Index {
    pub fn open(dir: &Path) -> Result<Index, NvmeError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Entries are tens of bytes and the set is small next to the data: compression would
        // only cost CPU, and RocksDB's info logs would outgrow the index itself.
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        let db = DB::open(&opts, dir).map_err(|e| {
            NvmeError::Index(format!("cannot open the index at {}: {e}", dir.display()))
        })?;
        let fail_frees = std::env::var(FAULT_FREE).is_ok_and(|v| v == "fail");
        if fail_frees {
            tracing::warn!("{FAULT_FREE}=fail: freeing an NVMe record fails (fault injection)");
        }
        Ok(Index {
            db,
            failed: std::sync::Mutex::new(None),
            fail_frees,
        })
    }

    /// Runs `f` unless an earlier write or sync failed; remembers its failure.
    fn guarded(
        &self,
        what: &str,
        f: impl FnOnce(&DB) -> Result<(), rocksdb::Error>,
    ) -> Result<(), NvmeError> {
        // Held across the write, so a write that races with a failing one cannot reach the
        // failed log writer either.
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cause) = &*failed {
            return Err(NvmeError::Index(format!(
                "{what}: refused, the index failed earlier ({cause}); restart the node once \
                 its disk is fixed"
            )));
        }
        f(&self.db).map_err(|e| {
            let cause = format!("{what}: {e}");
            *failed = Some(cause.clone());
            NvmeError::Index(cause)
        })
    }

    /// Every entry, and the keys of entries that do not decode (written by a newer build, or
    /// damaged), which the caller drops.
    pub fn load(&self) -> Result<Loaded, NvmeError> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for item in self.db.iterator(IteratorMode::Start) {
            let (k, v) = item.map_err(|e| NvmeError::Index(format!("reading the index: {e}")))?;
            match decode(&k, &v) {
                Some(info) => good.push(info),
                None => bad.push(k),
            }
        }
        Ok((good, bad))
    }

    /// Applies puts and deletes atomically; with `sync`, durable when this returns.
    pub fn write(
        &self,
        puts: &[&NvmeRecordInfo],
        deletes: &[u64],
        raw_deletes: &[Box<[u8]>],
        sync: bool,
    ) -> Result<(), NvmeError> {
        let mut batch = WriteBatch::default();
        for id in deletes {
            batch.delete(id.to_be_bytes());
        }
        for k in raw_deletes {
            batch.delete(k);
        }
        for info in puts {
            batch.put(info.replica.to_be_bytes(), encode(info));
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.guarded("writing the index", |db| db.write_opt(batch, &opts))
    }
}

impl Index {
    /// Deletes the entry of a replica the master freed (not synced: see
    /// `NvmeTier::remove`).
    pub fn free(&self, replica: u64) -> Result<(), NvmeError> {
        if self.fail_frees {
            let cause = format!("writing the index: injected fault: {FAULT_FREE}=fail (as ENOSPC)");
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            failed.get_or_insert_with(|| cause.clone());
            return Err(NvmeError::Index(cause));
        }
        self.write(&[], &[replica], &[], false)
    }

    /// Makes every write so far durable (one WAL sync for a whole commit group).
    pub fn sync_wal(&self) -> Result<(), NvmeError> {
        self.guarded("syncing the index", |db| db.flush_wal(true))
    }
}

pub(crate) fn encode(info: &NvmeRecordInfo) -> Vec<u8> {
    let mut v = Vec::with_capacity(FIXED + info.key.len());
    v.push(ENTRY_VERSION);
    v.extend_from_slice(&info.offset.to_le_bytes());
    v.extend_from_slice(&info.value_len.to_le_bytes());
    v.extend_from_slice(&info.checksum.to_le_bytes());
    v.extend_from_slice(&info.last_access_ms.to_le_bytes());
    v.extend_from_slice(&info.key);
    v
}

pub(crate) fn decode(k: &[u8], v: &[u8]) -> Option<NvmeRecordInfo> {
    let replica = u64::from_be_bytes(k.try_into().ok()?);
    if v.len() < FIXED || v[0] != ENTRY_VERSION {
        return None;
    }
    let u64_at = |i: usize| v[i..i + 8].try_into().ok().map(u64::from_le_bytes);
    Some(NvmeRecordInfo {
        replica,
        offset: u64_at(1)?,
        value_len: u64_at(9)?,
        checksum: u32::from_le_bytes(v[17..21].try_into().ok()?),
        last_access_ms: u64_at(21)?,
        key: v[FIXED..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_junk_is_refused() {
        let info = NvmeRecordInfo {
            replica: 7,
            key: b"some key".to_vec(),
            offset: 8192,
            value_len: 12345,
            checksum: 0xabcd_ef01,
            last_access_ms: 1_700_000_000_000,
        };
        let v = encode(&info);
        assert_eq!(decode(&7u64.to_be_bytes(), &v), Some(info));
        assert_eq!(decode(&[1, 2, 3], &v), None, "short key");
        assert_eq!(decode(&7u64.to_be_bytes(), &v[..FIXED - 1]), None);
        let mut newer = v.clone();
        newer[0] = 2;
        assert_eq!(decode(&7u64.to_be_bytes(), &newer), None);
    }
}
