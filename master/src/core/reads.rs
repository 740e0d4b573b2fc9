//! Lookups, read leases and removal. Readers only ever see Complete objects, and of those
//! only the replicas that hold the bytes (not the Filling targets of copy tasks), DRAM first.

use std::collections::BinaryHeap;
use std::time::Duration;

use kvpool_proto::{check_key, ErrorCode, ItemResult, ObjectInfo, Tier, WireError};
use regex::bytes::{Regex, RegexBuilder};

use super::objects::{self, ObjId, Object};
use super::puts::describe_on;
use super::{key_error, MasterCore};

/// The most memory a compiled `RemoveRegex` pattern may take (its program, and separately
/// its lazy DFA's cache): a hostile pattern such as `\w{1000}{1000}` is refused instead of
/// exhausting the master.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a `RemoveRegex` pattern (the `regex` crate's syntax, Unicode on), bounded in
/// length and compiled size; a malformed or oversized one is `InvalidArgument`, naming it.
pub(crate) fn key_regex(pattern: &str) -> Result<Regex, WireError> {
    let shown: String = pattern.chars().take(64).collect();
    let more = if shown.len() < pattern.len() {
        "…"
    } else {
        ""
    };
    let refuse = |what: String| {
        WireError::new(
            ErrorCode::InvalidArgument,
            format!("pattern {shown:?}{more}: {what}"),
        )
    };
    if pattern.len() > kvpool_proto::MAX_PATTERN_LEN {
        return Err(refuse(format!(
            "{} bytes long (allowed up to {})",
            pattern.len(),
            kvpool_proto::MAX_PATTERN_LEN
        )));
    }
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| refuse(e.to_string()))
}

impl MasterCore {
    /// A committed object and its id, or `NotFound` (a Processing object is not there yet).
    fn committed(&self, key: &[u8]) -> ItemResult<(ObjId, &Object)> {
        check_key(key)?;
        self.objects
            .lookup(key)
            .filter(|(_, o)| o.visible())
            .ok_or_else(|| key_error(ErrorCode::NotFound, key, "not in the pool"))
    }

    /// Where a read lease granted now ends.
    fn lease_end(&self, now: Duration) -> Duration {
        now.saturating_add(self.cfg.lease_ttl)
    }

    /// One key of a lookup: its readable replicas on live nodes (DRAM first) and a lease.
    ///
    /// The hot path of every get, so it hashes the key once (then finds the object by id
    /// twice: to describe it, and to record the read) and each replica's segment and node
    /// once, and records the read without moving anything in the recency orders
    /// ([`objects::note_read`]).
    pub(crate) fn get_replicas_one(&mut self, now: Duration, key: &[u8]) -> ItemResult<ObjectInfo> {
        // The full TTL, not what is left of a longer earlier lease: the reader counts it from
        // when it sent the request, so this is the conservative figure.
        let lease_ms = u64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let ttl = self.cfg.node_ttl;
        let (id, obj) = self.committed(key)?;
        let cluster = &self.cluster;
        let mut replicas = Vec::with_capacity(obj.replicas.len());
        for r in obj.replicas.iter().filter(|r| r.readable()) {
            // A node past its TTL that `tick` has not dropped yet must not be read from.
            match cluster.placed(r.segment) {
                Some((seg, node)) if node.alive(now, ttl) => {
                    replicas.push(describe_on(r, seg, node, obj.key.len(), obj.len));
                }
                _ => {}
            }
        }
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
            lease_ms,
        };
        self.note_lookup(now, id, nvme_only);
        Ok(info)
    }

    /// What a lookup records besides its answer: the read lease, the read count, the
    /// object's latest use, and an NVMe hit when only NVMe could serve it.
    fn note_lookup(&mut self, now: Duration, id: ObjId, nvme_only: bool) {
        let until = self.lease_end(now);
        let seq = self.access_clock + 1;
        let Some(obj) = self.objects.get_mut(id) else {
            return;
        };
        obj.lease_until = obj.lease_until.max(until);
        obj.reads = obj.reads.saturating_add(1);
        objects::note_read(obj, seq);
        self.access_clock = seq;
        if nvme_only {
            self.note_nvme_hit(now, id);
        }
    }

    /// One key of a `Touch`: a read served by the location index, recorded as its lookup
    /// would have been (a lookup of a replica the index named: NVMe only when the object has
    /// no readable DRAM replica).
    pub(crate) fn touch_one(&mut self, now: Duration, key: &[u8]) -> ItemResult<()> {
        let (id, nvme_only) = {
            let (id, obj) = self.committed(key)?;
            let on_dram = obj.replicas.iter().filter(|r| r.readable()).any(|r| {
                self.cluster
                    .placed(r.segment)
                    .is_some_and(|(seg, _)| seg.tier == Tier::Dram)
            });
            (id, !on_dram)
        };
        self.note_lookup(now, id, nvme_only);
        Ok(())
    }

    pub(crate) fn exists_one(
        &mut self,
        now: Duration,
        key: &[u8],
        lease: bool,
    ) -> ItemResult<bool> {
        check_key(key)?;
        let until = lease.then(|| self.lease_end(now));
        let seq = self.access_clock + 1;
        let Some((_, obj)) = self.objects.lookup_mut(key).filter(|(_, o)| o.visible()) else {
            return Ok(false);
        };
        if let Some(until) = until {
            obj.lease_until = obj.lease_until.max(until);
        }
        // A lookup (the connector's prefix match) predicts a read: keep it warm.
        objects::note_read(obj, seq);
        self.access_clock = seq;
        Ok(true)
    }

    /// Removes one committed object. `Ok`, and `NotFound` with no object under the key at
    /// all, fence the key (`fences`): the client takes both as "gone", so neither may come back.
    pub(crate) fn remove_one(&mut self, now: Duration, key: &[u8], force: bool) -> ItemResult<()> {
        let r = self.remove_committed(now, key, force);
        match &r {
            Ok(()) => self.fence_removed(now, key),
            Err(e) if e.code == ErrorCode::NotFound => self.fence_absent(now, key),
            Err(_) => {}
        }
        r
    }

    fn remove_committed(&mut self, now: Duration, key: &[u8], force: bool) -> ItemResult<()> {
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

    /// Removes the committed objects whose key starts with `prefix` and whose rest (the key
    /// after `prefix`) satisfies `matches`; leased and hard-pinned ones only with `force`.
    /// `RemoveAll` and `RemoveRegex` are this. Returns how many went.
    pub(crate) fn remove_matching(
        &mut self,
        now: Duration,
        force: bool,
        prefix: &[u8],
        matches: impl Fn(&[u8]) -> bool,
    ) -> u64 {
        let victims: Vec<ObjId> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o.is_complete()
                    && (force || (!o.leased(now) && !o.hard_pin))
                    && o.key.strip_prefix(prefix).is_some_and(&matches)
            })
            .map(|(id, _)| id)
            .collect();
        let mut removed = 0;
        for id in victims {
            if let Some(obj) = self.drop_object(id) {
                self.fence_removed(now, &obj.key);
                removed += 1;
            }
        }
        removed
    }

    /// One page of the committed keys that start with `prefix`, in byte order: the first
    /// `limit` after `start_after`, and whether more follow.
    ///
    /// The object table is a hash map (every get and put looks a key up; only this admin
    /// call wants order), so a page is one pass over it that keeps the `limit + 1` smallest
    /// matching keys in a bounded max-heap of borrowed keys: O(n log limit) time, O(limit)
    /// memory, and only the keys returned are copied. Paging by `start_after` stays stable
    /// while keys come and go: a page never repeats or skips a key that existed throughout.
    pub(crate) fn list_keys_inner(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> (Vec<Vec<u8>>, bool) {
        let mut smallest: BinaryHeap<&[u8]> = BinaryHeap::with_capacity(limit + 1);
        let candidates = self.objects.iter().map(|(_, o)| o).filter(|o| {
            o.visible()
                && o.key.starts_with(prefix)
                && start_after.is_none_or(|after| o.key.as_slice() > after)
        });
        for o in candidates {
            if smallest.len() <= limit {
                smallest.push(&o.key);
            } else if smallest.peek().is_some_and(|top| o.key.as_slice() < *top) {
                smallest.pop();
                smallest.push(&o.key);
            }
        }
        let more = smallest.len() > limit;
        if more {
            smallest.pop();
        }
        let keys = smallest
            .into_sorted_vec()
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        (keys, more)
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
