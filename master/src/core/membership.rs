//! Nodes and their segments: registration with inventory, liveness, and the queue of frees
//! each node must apply.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use kvpool_proto::{
    check_key, CommitNotice, CommitState, ErrorCode, Heartbeat, HeartbeatResponse, ItemResult,
    NodeId, NodeStatus, Register, RegisterResponse, ReplicaId, SegmentId, SegmentStatus, Tier,
    WireError,
};

use super::objects::{FastMap, ObjId, Object, RepState, Replica, State};
use super::puts::allocation_of;
use super::{MasterCore, MAX_FREES_PER_HEARTBEAT};
use crate::alloc::OffsetAllocator;

/// One segment (DRAM or NVMe) contributed by a node.
#[derive(Debug)]
pub(crate) struct Segment {
    pub node: NodeId,
    pub tier: Tier,
    /// False once the node reported an I/O error or a full disk on it: no new data goes there.
    pub healthy: bool,
    pub alloc: OffsetAllocator,
    /// Every replica on the segment (Processing or Complete) and its object. Preempted puts'
    /// replicas are not here but in `MasterCore::discarded`.
    pub members: FastMap<ReplicaId, ObjId>,
    /// Eviction candidates (Ready replicas of Complete, not hard-pinned objects) by (access
    /// seq, replica), coldest first.
    pub recency: BTreeMap<(u64, ReplicaId), ObjId>,
    /// Bytes of Leaving replicas: the watermark pass counts them as free already.
    pub leaving: u64,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub name: String,
    /// Shared with every replica description of this node's replicas.
    pub addr: std::sync::Arc<str>,
    pub segments: Vec<SegmentId>,
    pub last_seen: Duration,
    /// Frees not yet acknowledged, by increasing sequence number.
    pub frees: VecDeque<(u64, ReplicaId)>,
    /// Commit notices not yet acknowledged, numbered in the same sequence as `frees`.
    pub commits: VecDeque<(u64, CommitNotice)>,
    /// The highest sequence number queued for this node (0: none yet).
    pub last_free_seq: u64,
    /// Being drained: no new data; its replicas are released in `tick`.
    pub draining: bool,
}

impl Node {
    /// Whether the node was heard from within `ttl` (a node past it is dead even before
    /// `tick` drops it).
    pub fn alive(&self, now: Duration, ttl: Duration) -> bool {
        now.saturating_sub(self.last_seen) < ttl
    }
}

/// The cluster as the master sees it.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub nodes: BTreeMap<NodeId, Node>,
    /// By id; looked up for every replica of every lookup, hence the fast hasher.
    pub segments: FastMap<SegmentId, Segment>,
    /// All segment ids, sorted: the ring placement walks from a rotating start.
    pub order: Vec<SegmentId>,
    /// One counter for all nodes, so that sequence numbers also increase across a node's
    /// re-registrations; it starts at the id base, so across master restarts too.
    next_free_seq: u64,
}

impl Cluster {
    pub fn new(id_base: u64) -> Self {
        Cluster {
            nodes: BTreeMap::new(),
            segments: FastMap::default(),
            order: Vec::new(),
            next_free_seq: id_base,
        }
    }

    pub fn alive(&self, node: NodeId, now: Duration, ttl: Duration) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.alive(now, ttl))
    }

    /// A segment and the node it belongs to.
    pub fn placed(&self, segment: SegmentId) -> Option<(&Segment, &Node)> {
        let seg = self.segments.get(&segment)?;
        let node = self.nodes.get(&seg.node)?;
        Some((seg, node))
    }

    /// Queues a free for a node; a node the master does not know gets none (it re-registers
    /// and reports only what it still holds).
    pub fn queue_free(&mut self, node: NodeId, replica: ReplicaId) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        self.next_free_seq = self.next_free_seq.wrapping_add(1);
        n.frees.push_back((self.next_free_seq, replica));
        n.last_free_seq = self.next_free_seq;
    }

    /// Queues a commit notice for a node, in the same sequence as its frees (so a free of
    /// the replica, always queued later, is applied after it).
    pub fn queue_commit(&mut self, node: NodeId, notice: CommitNotice) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        self.next_free_seq = self.next_free_seq.wrapping_add(1);
        n.commits.push_back((self.next_free_seq, notice));
        n.last_free_seq = self.next_free_seq;
    }

    pub fn heartbeat(&mut self, now: Duration, req: Heartbeat) -> HeartbeatResponse {
        let Some(n) = self.nodes.get_mut(&req.node) else {
            return HeartbeatResponse {
                need_register: true,
                frees: Vec::new(),
                frees_upto: 0,
                tasks: Vec::new(),
                commits: Vec::new(),
                more: false,
            };
        };
        n.last_seen = n.last_seen.max(now);
        while n.frees.front().is_some_and(|(seq, _)| *seq <= req.acked) {
            n.frees.pop_front();
        }
        while n.commits.front().is_some_and(|(seq, _)| *seq <= req.acked) {
            n.commits.pop_front();
        }
        // The oldest notices of both kinds, in sequence order, up to the cap: everything up
        // to `frees_upto` is in this response, so the node's ack of it is exact.
        let (mut frees, mut commits) = (Vec::new(), Vec::new());
        let (mut f, mut c) = (n.frees.iter().peekable(), n.commits.iter().peekable());
        let mut upto = None;
        for _ in 0..MAX_FREES_PER_HEARTBEAT {
            let take_free = match (f.peek(), c.peek()) {
                (Some((fs, _)), Some((cs, _))) => fs < cs,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_free {
                let (seq, r) = f.next().copied().expect("peeked");
                frees.push(r);
                upto = Some(seq);
            } else {
                let (seq, notice) = c.next().copied().expect("peeked");
                commits.push(notice);
                upto = Some(seq);
            }
        }
        let more = f.peek().is_some() || c.peek().is_some();
        HeartbeatResponse {
            need_register: false,
            frees,
            frees_upto: upto.unwrap_or(n.last_free_seq),
            tasks: Vec::new(),
            commits,
            more,
        }
    }

    pub fn rebuild_order(&mut self) {
        self.order = self.segments.keys().copied().collect();
        self.order.sort_unstable();
    }

    pub fn node_status(&self, now: Duration, ttl: Duration) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|(id, n)| {
                let silent = now.saturating_sub(n.last_seen);
                NodeStatus {
                    id: *id,
                    name: n.name.clone(),
                    addr: n.addr.to_string(),
                    alive: silent < ttl,
                    silent_ms: u64::try_from(silent.as_millis()).unwrap_or(u64::MAX),
                    pending_frees: n.frees.len() as u64,
                    pending_commits: n.commits.len() as u64,
                    draining: n.draining,
                    segments: n
                        .segments
                        .iter()
                        .filter_map(|s| {
                            let seg = self.segments.get(s)?;
                            Some(SegmentStatus {
                                id: *s,
                                tier: seg.tier,
                                capacity: seg.alloc.capacity(),
                                used: seg.alloc.used(),
                                objects: seg.members.len() as u64,
                                healthy: seg.healthy,
                            })
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

impl MasterCore {
    pub(crate) fn register_inner(&mut self, now: Duration, req: Register) -> RegisterResponse {
        let heartbeat_ms =
            u64::try_from(self.cfg.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
        // Replicas the master freed but the node has not acknowledged are gone for the master;
        // re-admitting them would resurrect removed objects.
        let mut freed: HashSet<ReplicaId> = HashSet::new();
        if let Some(old) = self.cluster.nodes.get(&req.node) {
            freed.extend(old.frees.iter().map(|(_, r)| *r));
            tracing::info!(node = %req.node, "node re-registers; dropping its previous registration");
            self.drop_node(req.node);
        }
        // Segment ids are chosen by nodes; one already owned by another node is refused
        // rather than letting two nodes share allocation state.
        let mut seen = HashSet::new();
        let segments: Vec<_> = req
            .segments
            .iter()
            .filter(|s| {
                let fresh = seen.insert(s.id) && !self.cluster.segments.contains_key(&s.id);
                if !fresh {
                    tracing::warn!(node = %req.node, segment = %s.id, "duplicate segment id refused");
                }
                fresh
            })
            .cloned()
            .collect();
        self.cluster.nodes.insert(
            req.node,
            Node {
                name: req.name.clone(),
                addr: req.addr.as_str().into(),
                segments: segments.iter().map(|s| s.id).collect(),
                last_seen: now,
                frees: VecDeque::new(),
                commits: VecDeque::new(),
                last_free_seq: 0,
                draining: false,
            },
        );

        let inv = &req.inventory;
        let mut rejected = vec![false; inv.len()];
        let mut per_segment: HashMap<SegmentId, Vec<usize>> = HashMap::new();
        for (i, e) in inv.iter().enumerate() {
            // A put the node knows was never committed stays uncommitted under this master
            // too: its entry is refused (and freed on the node) like a bad one.
            let valid = check_key(&e.key).is_ok()
                && e.commit != CommitState::Abandoned
                && !freed.contains(&e.replica)
                && !self.fenced(&e.key, e.replica)
                && e.len > 0
                && e.len <= self.cfg.max_value_len
                && segments.iter().any(|s| s.id == e.segment);
            if valid {
                per_segment.entry(e.segment).or_default().push(i);
            } else {
                rejected[i] = true;
            }
        }
        for s in &segments {
            let idx = per_segment.remove(&s.id).unwrap_or_default();
            // An entry whose value cannot sit where it says maps to a range no segment has,
            // so the allocator refuses it like any other bad range.
            let ranges: Vec<(u64, u64)> = idx
                .iter()
                .map(|&i| {
                    allocation_of(s.tier, inv[i].key.len(), inv[i].offset, inv[i].len)
                        .unwrap_or((u64::MAX, 1))
                })
                .collect();
            let (alloc, refused) =
                OffsetAllocator::from_used_indexed(s.size, self.align_for(s.tier), &ranges);
            for r in refused {
                rejected[idx[r]] = true;
            }
            self.cluster.segments.insert(
                s.id,
                Segment {
                    node: req.node,
                    tier: s.tier,
                    healthy: true,
                    alloc,
                    members: FastMap::default(),
                    recency: BTreeMap::new(),
                    leaving: 0,
                },
            );
        }
        self.cluster.rebuild_order();

        // In report order, so that the first of two conflicting entries for a key wins.
        for (i, e) in inv.iter().enumerate() {
            if rejected[i] || !self.admit(now, req.node, e) {
                rejected[i] = true;
            }
        }
        let mut out = Vec::new();
        for (i, e) in inv.iter().enumerate() {
            if rejected[i] {
                out.push(e.replica);
                self.cluster.queue_free(req.node, e.replica);
            }
        }
        if !out.is_empty() {
            tracing::warn!(node = %req.node, rejected = out.len(), "inventory entries rejected");
        }
        tracing::info!(node = %req.node, addr = %req.addr, segments = segments.len(), "node joined");
        RegisterResponse {
            heartbeat_ms,
            rejected: out,
        }
    }

    /// Allocation alignment of a tier: NVMe records are 4 KiB-aligned for O_DIRECT.
    pub(crate) fn align_for(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Dram => self.cfg.alloc_align,
            Tier::Nvme => kvpool_proto::layout::NVME_ALIGN,
        }
    }

    /// Admits one inventory entry whose range the segment's allocator accepted; on refusal,
    /// gives the range back to the allocator.
    /// A replica id names bytes on one disk. When another node reports an id the master
    /// still places elsewhere, the disk moved: a node restarted (new identity, same NVMe
    /// path) before the master noticed the old process died. The old claim is stale; it is
    /// dropped here (its space released, no free sent: the old node must not delete a record
    /// that is now the new node's) so the report can be admitted.
    fn take_over_moved_replica(&mut self, e: &kvpool_proto::InventoryEntry) {
        let Some(id) = self.objects.id_of(&e.key) else {
            return;
        };
        let Some(obj) = self.objects.get_mut(id) else {
            return;
        };
        let Some(pos) = obj.replicas.iter().position(|r| {
            r.id == e.replica && r.segment != e.segment && r.state == RepState::Ready
        }) else {
            return;
        };
        if !(obj.is_complete() && obj.len == e.len && obj.checksum == e.checksum) {
            return;
        }
        let old = obj.replicas.remove(pos);
        let seq = obj.access_seq;
        if let Some(seg) = self.cluster.segments.get_mut(&old.segment) {
            seg.members.remove(&old.id);
            seg.recency.remove(&(seq, old.id));
            seg.alloc.free(old.offset);
        }
        tracing::info!(replica = old.id.0, from = %old.segment, to = %e.segment, "replica moved to a new node");
    }

    fn admit(&mut self, now: Duration, node: NodeId, e: &kvpool_proto::InventoryEntry) -> bool {
        let Some(seg) = self.cluster.segments.get(&e.segment) else {
            return false;
        };
        let Some((offset, _)) = allocation_of(seg.tier, e.key.len(), e.offset, e.len) else {
            return false;
        };
        let Some(alloc_len) = seg.alloc.len_at(offset) else {
            return false;
        };
        let rep = Replica {
            id: e.replica,
            segment: e.segment,
            offset,
            alloc_len,
            state: RepState::Ready,
        };
        let duplicate_id = seg.members.contains_key(&e.replica);
        if !duplicate_id {
            self.take_over_moved_replica(e);
        }
        // Pins come back with the commit the node heard of; an unconfirmed entry has none.
        let (hard_pin, soft_pin) = match e.commit {
            CommitState::Committed { hard_pin, soft_pin } => (hard_pin, soft_pin),
            CommitState::Unconfirmed | CommitState::Abandoned => (false, false),
        };
        let ok = match self.objects.id_of(&e.key) {
            _ if duplicate_id => false,
            Some(id) => match self.objects.get(id) {
                Some(obj)
                    if obj.is_complete()
                        && obj.len == e.len
                        && obj.checksum == e.checksum
                        && obj.replicas.iter().all(|r| r.id != e.replica) =>
                {
                    self.pin_from_report(now, id, hard_pin, soft_pin);
                    let Some(obj) = self.objects.get_mut(id) else {
                        return false;
                    };
                    obj.replicas.push(rep);
                    let (seq, recent) = (obj.access_seq, obj.in_recency());
                    if let Some(seg) = self.cluster.segments.get_mut(&e.segment) {
                        seg.members.insert(e.replica, id);
                        if recent {
                            seg.recency.insert((seq, e.replica), id);
                        }
                    }
                    true
                }
                _ => false,
            },
            None => {
                let seq = self.next_access();
                let id = self.objects.insert(Object {
                    key: e.key.clone(),
                    len: e.len,
                    checksum: e.checksum,
                    state: State::Complete,
                    writer: None,
                    replicas: vec![rep],
                    lease_until: Duration::ZERO,
                    // The soft pin's lifetime restarts: the node does not know the old
                    // master's clock.
                    soft_pin_until: soft_pin.then(|| now.saturating_add(self.cfg.soft_pin_ttl)),
                    soft_pin,
                    hard_pin,
                    access_seq: seq,
                    last_access: seq,
                    reads: 0,
                    nvme_hits: 0,
                });
                if let Some(seg) = self.cluster.segments.get_mut(&e.segment) {
                    seg.members.insert(e.replica, id);
                    if !hard_pin {
                        seg.recency.insert((seq, e.replica), id);
                    }
                }
                true
            }
        };
        if ok && e.commit == CommitState::Unconfirmed {
            // Admitted, so committed from now on: tell the node, so that a later master
            // finds it Committed rather than guessing again.
            if let Some(notice) = self.commit_notice(e.key.as_slice(), e.replica) {
                self.cluster.queue_commit(node, notice);
            }
        }
        if ok && e.replica.0 >= self.id_base {
            // Never hand out an id a node already uses (a master restarted with a clock that
            // went backwards, or a test reusing the id base).
            self.next_replica = self.next_replica.max(e.replica.0 - self.id_base);
        }
        if !ok {
            if let Some(seg) = self.cluster.segments.get_mut(&e.segment) {
                // The allocation's offset: on NVMe the entry reports the value's.
                seg.alloc.free(offset);
            }
        }
        ok
    }

    /// Merges pins reported for another replica of an admitted object: a hard pin takes the
    /// object out of eviction (its replicas leave the recency orders), a soft pin starts.
    fn pin_from_report(&mut self, now: Duration, id: ObjId, hard_pin: bool, soft_pin: bool) {
        let ttl = self.cfg.soft_pin_ttl;
        let Some(obj) = self.objects.get_mut(id) else {
            return;
        };
        if soft_pin && !obj.soft_pin {
            obj.soft_pin = true;
            obj.soft_pin_until = Some(now.saturating_add(ttl));
        }
        if hard_pin && !obj.hard_pin {
            obj.hard_pin = true;
            let seq = obj.access_seq;
            let reps: Vec<ReplicaId> = obj.replicas.iter().map(|r| r.id).collect();
            for (sid, rid) in obj.replicas.iter().map(|r| r.segment).zip(reps) {
                if let Some(seg) = self.cluster.segments.get_mut(&sid) {
                    seg.recency.remove(&(seq, rid));
                }
            }
        }
    }

    /// Forgets a node: its segments, the replicas on them, objects left without a replica,
    /// and puts in progress that had a replica there (their other replicas are freed).
    pub(crate) fn drop_node(&mut self, node: NodeId) {
        let Some(n) = self.cluster.nodes.remove(&node) else {
            return;
        };
        // Tasks run between the node's own segments, so their sources and targets go below.
        self.tasks.drop_node(node);
        let mut broken = Vec::new();
        for sid in &n.segments {
            let Some(seg) = self.cluster.segments.remove(sid) else {
                continue;
            };
            for (rid, oid) in seg.members {
                let Some(obj) = self.objects.get_mut(oid) else {
                    continue;
                };
                obj.replicas.retain(|r| r.id != rid);
                if obj.replicas.is_empty() {
                    self.objects.remove(oid);
                } else if !obj.is_complete() || !obj.has_readable() {
                    broken.push(oid);
                }
            }
        }
        for oid in broken {
            self.drop_object(oid);
        }
        let gone: HashSet<SegmentId> = n.segments.iter().copied().collect();
        self.discarded.retain(|_, r| !gone.contains(&r.segment));
        self.cluster.rebuild_order();
    }

    /// A node leaving: the same path as a node declared dead, at once instead of after its
    /// TTL of silence.
    pub(crate) fn leave_inner(&mut self, node: NodeId) -> ItemResult<()> {
        if !self.cluster.nodes.contains_key(&node) {
            return Err(WireError::new(
                ErrorCode::UnknownNode,
                format!("node {node} is not registered (never was, left, or declared dead)"),
            ));
        }
        tracing::info!(node = %node, "node left");
        self.drop_node(node);
        Ok(())
    }

    /// Declares nodes silent for `node_ttl` dead.
    pub(crate) fn expire_nodes(&mut self, now: Duration) {
        let ttl = self.cfg.node_ttl;
        let dead: Vec<NodeId> = self
            .cluster
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_sub(n.last_seen) >= ttl)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            tracing::warn!(node = %id, silent_for = ?ttl, "node declared dead");
            self.drop_node(id);
        }
    }
}
