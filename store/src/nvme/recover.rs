//! Recovery at open: the index is loaded and each entry checked against its record's
//! on-disk header; entries that do not match (or overlap another) are dropped.

use futures::StreamExt;

use super::{
    layout::decode_header, tier::Shared, value_offset, NvmeError, NvmeRecordInfo, MAX_KEY_LEN,
};

impl Shared {
    /// Loads the index and keeps the entries whose on-disk header matches.
    pub(super) fn recover(&self, depth: usize) -> Result<Vec<NvmeRecordInfo>, NvmeError> {
        let (entries, undecodable) = self.index.load()?;
        let total = entries.len();
        let checks = futures::stream::iter(entries)
            .map(|e| async move {
                let r = self.check_header(&e).await;
                (e, r)
            })
            .buffer_unordered(depth.max(1));
        let results: Vec<_> = futures::executor::block_on(checks.collect());
        let mut keep = Vec::new();
        let mut drop_ids = Vec::new();
        let mut unreadable = 0usize;
        for (e, r) in results {
            match r {
                Ok(()) => keep.push(e),
                Err(Check::Mismatch(why)) => {
                    tracing::warn!(
                        replica = e.replica,
                        offset = e.offset,
                        why,
                        "nvme record dropped at open: its header does not match the index"
                    );
                    drop_ids.push(e.replica);
                }
                Err(Check::Io(err)) => {
                    // Not dropped from the index: the bytes may be fine once the device is.
                    tracing::error!(replica = e.replica, "{err}");
                    unreadable += 1;
                }
            }
        }
        if !drop_ids.is_empty() || !undecodable.is_empty() {
            self.index.write(&[], &drop_ids, &undecodable, true)?;
        }
        keep.sort_by_key(|r| r.offset);
        // Two records cannot overlap (a commit drops what its record overlaps), unless the
        // index was edited; keep the first and drop the rest rather than serve either wrongly.
        let mut st = self.lock();
        let mut kept = Vec::with_capacity(keep.len());
        let mut end = 0;
        let mut overlapped = Vec::new();
        for r in keep {
            if r.offset < end {
                overlapped.push(r.replica);
                continue;
            }
            end = r.offset + r.record_len();
            st.insert(r.clone());
            kept.push(r);
        }
        drop(st);
        if !overlapped.is_empty() {
            tracing::warn!(
                n = overlapped.len(),
                "overlapping nvme index entries dropped"
            );
            self.index.write(&[], &overlapped, &[], true)?;
        }
        tracing::info!(
            indexed = total,
            kept = kept.len(),
            dropped = drop_ids.len() + undecodable.len() + overlapped.len(),
            unreadable,
            "nvme index checked against the records' headers"
        );
        Ok(kept)
    }

    async fn check_header(&self, e: &NvmeRecordInfo) -> Result<(), Check> {
        if e.key.is_empty() || e.key.len() > MAX_KEY_LEN {
            return Err(Check::Mismatch(format!("key of {} bytes", e.key.len())));
        }
        if let Err(err) = self.check_extent(e.offset, e.key.len(), e.value_len) {
            return Err(Check::Mismatch(err.to_string()));
        }
        let hb = value_offset(e.key.len());
        let (buf, r) = self
            .engine
            .read(self.pool.take_or_alloc(hb as usize), e.offset)
            .await;
        if let Err(err) = r {
            return Err(Check::Io(self.io_failed("read", e.offset, hb, err)));
        }
        let (h, key) = decode_header(&buf).map_err(|err| Check::Mismatch(err.to_string()))?;
        if h.replica != e.replica
            || key != e.key.as_slice()
            || h.value_len != e.value_len
            || h.value_crc != e.checksum
        {
            return Err(Check::Mismatch(format!(
                "the header holds replica {} ({} value bytes, crc {:#010x})",
                h.replica, h.value_len, h.value_crc
            )));
        }
        Ok(())
    }
}

enum Check {
    Mismatch(String),
    Io(NvmeError),
}
