//! Lookups, read leases and removal. Readers only ever see Complete objects, and of those
//! only the replicas that hold the bytes (not the Filling targets of copy tasks), DRAM first.

use std::time::Duration;

use kvpool_proto::{check_key, ErrorCode, ItemResult, ObjectInfo, Tier};

use super::objects::{ObjId, Object};
use super::{key_error, MasterCore};

impl MasterCore {
    /// A committed object and its id, or `NotFound` (a Processing object is not there yet).
    fn committed(&self, key: &[u8]) -> ItemResult<(ObjId, &Object)> {
        check_key(key)?;
        self.objects
            .lookup(key)
            .filter(|(_, o)| o.is_complete() && o.has_readable())
            .ok_or_else(|| key_error(ErrorCode::NotFound, key, "not in the pool"))
    }

    /// Where a read lease granted now ends.
    fn lease_end(&self, now: Duration) -> Duration {
        now.saturating_add(self.cfg.lease_ttl)
    }

    pub(crate) fn get_replicas_one(&mut self, now: Duration, key: &[u8]) -> ItemResult<ObjectInfo> {
        let (id, obj) = self.committed(key)?;
        // A node past its TTL that `tick` has not dropped yet must not be read from.
        let ttl = self.cfg.node_ttl;
        let mut replicas: Vec<_> = obj
            .replicas
            .iter()
            .filter(|r| r.readable())
            .filter_map(|r| self.describe(r, obj.key.len(), obj.len))
            .filter(|d| self.cluster.alive(d.node, now, ttl))
            .collect();
        if replicas.is_empty() {
            return Err(key_error(ErrorCode::NotFound, key, "no live replica"));
        }
        // Stable, so that within a tier the order stays the placement order.
        replicas.sort_by_key(|d| d.tier != Tier::Dram);
        let nvme_only = replicas.iter().all(|d| d.tier == Tier::Nvme);
        let info = ObjectInfo {
            len: obj.len,
            checksum: obj.checksum,
            replicas,
            // The full TTL, not what is left of a longer earlier lease: the reader counts it
            // from when it sent the request, so this is the conservative figure.
            lease_ms: u64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        };
        let until = self.lease_end(now);
        self.touch(id, |obj| {
            obj.lease_until = obj.lease_until.max(until);
            obj.reads = obj.reads.saturating_add(1);
        });
        if nvme_only {
            self.note_nvme_hit(now, id);
        }
        Ok(info)
    }

    pub(crate) fn exists_one(
        &mut self,
        now: Duration,
        key: &[u8],
        lease: bool,
    ) -> ItemResult<bool> {
        match self.committed(key) {
            Ok((id, _)) => {
                let until = lease.then(|| self.lease_end(now));
                // A lookup (the connector's prefix match) predicts a read: keep it warm.
                self.touch(id, |obj| {
                    if let Some(until) = until {
                        obj.lease_until = obj.lease_until.max(until);
                    }
                });
                Ok(true)
            }
            Err(e) if e.code == ErrorCode::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn remove_one(&mut self, now: Duration, key: &[u8], force: bool) -> ItemResult<()> {
        let (id, obj) = self.committed(key)?;
        if !force && obj.leased(now) {
            return Err(key_error(
                ErrorCode::HasLease,
                key,
                "read lease held; retry or force",
            ));
        }
        if !force && obj.hard_pin {
            return Err(key_error(
                ErrorCode::Pinned,
                key,
                "hard-pinned; remove with force",
            ));
        }
        self.drop_object(id);
        Ok(())
    }

    pub(crate) fn remove_all_inner(&mut self, now: Duration, force: bool, prefix: &[u8]) -> u64 {
        let victims: Vec<ObjId> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o.is_complete()
                    && o.key.starts_with(prefix)
                    && (force || (!o.leased(now) && !o.hard_pin))
            })
            .map(|(id, _)| id)
            .collect();
        let mut removed = 0;
        for id in victims {
            if self.drop_object(id).is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Whether any alive node has a segment.
    pub(crate) fn has_alive_segment(&self, now: Duration) -> bool {
        let ttl = self.cfg.node_ttl;
        self.cluster
            .nodes
            .iter()
            .any(|(id, n)| !n.segments.is_empty() && self.cluster.alive(*id, now, ttl))
    }
}
