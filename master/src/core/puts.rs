//! The two-phase put: start (allocate, Processing), end (Complete, readable), revoke, and the
//! handling of puts that never end (preemption after the discard timeout, release after the
//! release timeout).

use std::time::Duration;

use kvpool_proto::{check_key, ClientId, ErrorCode, ItemResult, PutStartItem, ReplicaDesc, Tier};

use super::membership::{Node, Segment};
use super::objects::{ObjId, Object, RepState, Replica, State};
use super::{key_error, MasterCore};

/// Where a replica's value starts, given its allocation: on NVMe, past the record header.
pub(crate) fn value_offset(tier: Tier, key_len: usize, alloc_offset: u64) -> u64 {
    match tier {
        Tier::Dram => alloc_offset,
        Tier::Nvme => alloc_offset + kvpool_proto::layout::value_offset(key_len),
    }
}

/// The allocation behind a reported value: its offset and length, or `None` if the value
/// cannot start where it is said to (an NVMe value sits past its record header).
pub(crate) fn allocation_of(
    tier: Tier,
    key_len: usize,
    value_offset: u64,
    len: u64,
) -> Option<(u64, u64)> {
    match tier {
        Tier::Dram => Some((value_offset, len)),
        Tier::Nvme => {
            let start = value_offset.checked_sub(kvpool_proto::layout::value_offset(key_len))?;
            Some((start, kvpool_proto::layout::record_len(key_len, len)))
        }
    }
}

impl MasterCore {
    pub(crate) fn put_start_one(
        &mut self,
        now: Duration,
        client: ClientId,
        item: PutStartItem,
    ) -> ItemResult<Vec<ReplicaDesc>> {
        check_key(&item.key)?;
        let key = &item.key;
        if item.len == 0 || item.len > self.cfg.max_value_len {
            let what = format!(
                "value of {} bytes (allowed 1..={})",
                item.len, self.cfg.max_value_len
            );
            return Err(key_error(ErrorCode::ValueTooLarge, key, &what));
        }
        if item.options.replicas == 0 {
            return Err(key_error(
                ErrorCode::InvalidArgument,
                key,
                "replicas must be at least 1",
            ));
        }
        if !self.has_alive_segment(now) {
            // A master that just started, or just took over as HA leader, has no node until
            // they register (within a heartbeat): a retryable answer, not a failure.
            let age = now.saturating_sub(*self.born.get_or_insert(now));
            if age < self.cfg.node_ttl {
                let why = format!(
                    "no storage node has registered with this master yet (it started {} ms \
                     ago; nodes register within a heartbeat)",
                    age.as_millis()
                );
                return Err(key_error(ErrorCode::NoSpaceYet, key, &why));
            }
            return Err(key_error(
                ErrorCode::NoSegment,
                key,
                "the pool has no storage segment",
            ));
        }
        if let Some(id) = self.objects.id_of(key) {
            self.clear_key_for_put(now, id, key, item.options.overwrite)?;
        }
        let placed = self.place(
            now,
            key,
            item.len,
            item.options.replicas,
            &item.options.preferred_nodes,
        );
        if placed.is_empty() {
            // Replicas being copied to NVMe are not evicted until their copy ends; then
            // room comes back (demotion frees them, write-through makes them droppable).
            if self.tasks.copies_from_dram() {
                return Err(key_error(
                    ErrorCode::NoSpaceYet,
                    key,
                    "no room until the copies to NVMe in flight end; retry",
                ));
            }
            return Err(key_error(
                ErrorCode::NoSpace,
                key,
                "no segment has room, even after eviction",
            ));
        }
        let replicas: Vec<Replica> = placed
            .into_iter()
            .map(|(segment, a)| Replica {
                id: self.fresh_replica_id(),
                segment,
                offset: a.offset,
                alloc_len: a.len,
                state: RepState::Ready,
            })
            .collect();
        let descs = replicas
            .iter()
            .filter_map(|r| self.describe(r, key.len(), item.len))
            .collect();
        let id = self.objects.insert(Object {
            key: item.key,
            len: item.len,
            // Known at commit: the writer computes it while it copies the bytes.
            checksum: 0,
            state: State::Processing { started: now },
            writer: Some(client),
            replicas: replicas.clone(),
            lease_until: Duration::ZERO,
            soft_pin_until: None,
            soft_pin: item.options.soft_pin,
            hard_pin: item.options.hard_pin,
            access_seq: 0,
            last_access: 0,
            reads: 0,
            nvme_hits: 0,
        });
        for r in &replicas {
            if let Some(seg) = self.cluster.segments.get_mut(&r.segment) {
                seg.members.insert(r.id, id);
            }
        }
        Ok(descs)
    }

    /// Makes way for a new put of a key that has an object: preempts a stale put, replaces a
    /// committed object when overwrite is asked, or says why not.
    fn clear_key_for_put(
        &mut self,
        now: Duration,
        id: ObjId,
        key: &[u8],
        overwrite: bool,
    ) -> ItemResult<()> {
        let Some(obj) = self.objects.get(id) else {
            return Ok(());
        };
        match obj.state {
            State::Processing { started } => {
                if now.saturating_sub(started) <= self.cfg.put_discard_timeout {
                    return Err(key_error(
                        ErrorCode::Processing,
                        key,
                        "a put of this key is in progress",
                    ));
                }
                tracing::info!(key = %String::from_utf8_lossy(key), "preempting a stale put");
                self.preempt(id);
            }
            State::Complete => {
                if !overwrite {
                    return Err(key_error(
                        ErrorCode::AlreadyExists,
                        key,
                        "already committed",
                    ));
                }
                // Overwrite is the owner's explicit replacement, so a hard pin does not block it.
                if obj.leased(now) {
                    // Readers holding a lease may still be copying the old bytes: the key moves
                    // to the new value now, the old space is freed when the lease ends.
                    let until = obj.lease_until;
                    self.retire_until(id, until);
                } else {
                    self.drop_object(id);
                }
            }
        }
        Ok(())
    }

    /// Takes a committed object's key away but keeps its space reserved until `until`.
    fn retire_until(&mut self, id: ObjId, until: Duration) {
        if let Some(obj) = self.objects.remove(id) {
            self.reserve_until(obj, until);
        }
    }

    /// Takes a stale put's key away. Its space stays reserved until the release timeout (the
    /// old writer may still be writing into it).
    fn preempt(&mut self, id: ObjId) {
        let Some(obj) = self.objects.remove(id) else {
            return;
        };
        let State::Processing { started } = obj.state else {
            return;
        };
        let release_at = started.saturating_add(self.cfg.put_release_timeout);
        self.reserve_until(obj, release_at);
    }

    /// Takes a removed object's replicas out of their segments but keeps their space reserved
    /// until `until`, when `release_zombies` frees it.
    fn reserve_until(&mut self, obj: Object, until: Duration) {
        for r in obj.replicas {
            if self.detach_replica(&r, obj.access_seq) {
                self.discard_seq += 1;
                self.discarded.insert((until, self.discard_seq), r);
            }
        }
    }

    /// The object of `client`'s put of `key`: `NotFound` without one, `NotWriter` when another
    /// client started it.
    fn writers_put(&self, client: ClientId, key: &[u8]) -> ItemResult<(ObjId, &Object)> {
        check_key(key)?;
        let Some((id, obj)) = self.objects.lookup(key) else {
            return Err(key_error(
                ErrorCode::NotFound,
                key,
                "no put of this key in progress",
            ));
        };
        if obj.writer != Some(client) {
            return Err(key_error(
                ErrorCode::NotWriter,
                key,
                "another client is the writer",
            ));
        }
        Ok((id, obj))
    }

    pub(crate) fn put_end_one(
        &mut self,
        now: Duration,
        client: ClientId,
        key: &[u8],
        checksum: u32,
    ) -> ItemResult<()> {
        let (id, obj) = self.writers_put(client, key)?;
        if obj.is_complete() {
            // A retried PutEnd whose first response was lost: the same bytes, or a writer
            // that is confused about what it wrote.
            if obj.checksum == checksum {
                return Ok(());
            }
            return Err(key_error(
                ErrorCode::InvalidArgument,
                key,
                &format!(
                    "committed with checksum {:#010x}, now ended with {checksum:#010x}",
                    obj.checksum
                ),
            ));
        }
        let soft_pin_until = obj
            .soft_pin
            .then(|| now.saturating_add(self.cfg.soft_pin_ttl));
        self.objects.mark_complete(id);
        self.touch(id, |obj| {
            obj.checksum = checksum;
            obj.soft_pin_until = soft_pin_until;
        });
        self.announce_commit(id);
        self.write_through(now, id);
        Ok(())
    }

    pub(crate) fn put_revoke_one(&mut self, client: ClientId, key: &[u8]) -> ItemResult<()> {
        let (id, obj) = self.writers_put(client, key)?;
        if obj.is_complete() {
            return Err(key_error(
                ErrorCode::InvalidArgument,
                key,
                "already committed; use remove",
            ));
        }
        self.drop_object(id);
        Ok(())
    }

    /// Frees preempted puts' space and drops puts still Processing, once their release time
    /// has come.
    pub(crate) fn release_zombies(&mut self, now: Duration) {
        while let Some(entry) = self.discarded.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let r = entry.remove();
            if let Some(seg) = self.cluster.segments.get_mut(&r.segment) {
                seg.alloc.free(r.offset);
                let node = seg.node;
                self.cluster.queue_free(node, r.id);
            }
        }
        let timeout = self.cfg.put_release_timeout;
        while let Some((started, id)) = self.objects.oldest_processing() {
            if started.saturating_add(timeout) > now {
                break;
            }
            tracing::info!(object = id, "releasing a put that never ended");
            if self.drop_object(id).is_none() {
                // The index and the table disagree; stop rather than spin on the same entry.
                tracing::error!(object = id, "processing index names a missing object");
                break;
            }
        }
    }

    /// The wire description of a replica, with its node's data address.
    pub(crate) fn describe(&self, r: &Replica, key_len: usize, len: u64) -> Option<ReplicaDesc> {
        let (seg, node) = self.cluster.placed(r.segment)?;
        Some(describe_on(r, seg, node, key_len, len))
    }
}

/// [`MasterCore::describe`] with the replica's segment and node already found (a lookup
/// checks the node's liveness on the same entry).
pub(crate) fn describe_on(
    r: &Replica,
    seg: &Segment,
    node: &Node,
    key_len: usize,
    len: u64,
) -> ReplicaDesc {
    ReplicaDesc {
        id: r.id,
        node: seg.node,
        addr: node.addr.clone(),
        segment: r.segment,
        offset: value_offset(seg.tier, key_len, r.offset),
        len,
        tier: seg.tier,
    }
}
