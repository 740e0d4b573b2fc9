//! Moving objects between a node's tiers: write-through copies of new objects to NVMe,
//! demotion of DRAM eviction victims to NVMe, and promotion of NVMe-only objects that keep
//! being read back to DRAM. Each allocates a Filling target and queues a copy task for the
//! node; `tasks` applies the outcome.

use std::time::Duration;

use kvpool_proto::{layout, CopyTask, NodeId, ReplicaId, SegmentId, Tier};

use super::objects::{ObjId, RepState, Replica};
use super::puts::value_offset;
use super::tasks::{Task, TaskKind};
use super::MasterCore;
use crate::alloc::Allocation;

/// Which objects go to NVMe, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// Every object is copied to its node's NVMe as soon as it is committed (the DRAM copy
    /// stays); evicting it from DRAM then costs nothing and loses nothing, however fast DRAM
    /// turns over. A KV block is typically written once and read, if ever, after DRAM has
    /// turned over (a conversation's next turn): on the shared trace this serves far more
    /// prompt tokens than demoting at eviction (docs/benchmarks.md, replay). While its copy is
    /// in flight an object's DRAM replica is not evicted, which slows writers that outrun the
    /// disk instead of dropping what the disk has room for.
    WriteThrough,
    /// Every eviction victim.
    Always,
    /// Victims read at least once since their commit: a KV block nobody reused is unlikely
    /// to be reused later, and NVMe writes cost endurance.
    AfterRead,
}

impl MasterCore {
    /// Tries to demote a DRAM eviction victim; false when it must be dropped instead.
    pub(crate) fn try_demote(&mut self, now: Duration, oid: ObjId, rid: ReplicaId) -> bool {
        let Some(obj) = self.objects.get(oid) else {
            return false;
        };
        let Some(src) = obj.replicas.iter().find(|r| r.id == rid).copied() else {
            return false;
        };
        let admitted = match self.cfg.nvme_admission {
            Admission::WriteThrough | Admission::Always => true,
            Admission::AfterRead => obj.reads > 0,
        };
        let has_nvme = obj
            .replicas
            .iter()
            .any(|r| self.tier_of(r.segment) == Some(Tier::Nvme));
        if !obj.is_complete() || src.state != RepState::Ready || has_nvme || !admitted {
            return false;
        }
        let seq = obj.access_seq;
        if !self.queue_nvme_copy(now, oid, &src, TaskKind::Demote) {
            return false;
        }
        if let Some(obj) = self.objects.get_mut(oid) {
            if let Some(r) = obj.replicas.iter_mut().find(|r| r.id == rid) {
                r.state = RepState::Leaving;
            }
        }
        if let Some(seg) = self.cluster.segments.get_mut(&src.segment) {
            seg.recency.remove(&(seq, rid));
            seg.leaving += src.alloc_len;
        }
        true
    }

    /// Write-through: queues the copy of a just-committed object from its DRAM replica to an
    /// NVMe segment of the same node, if the node has one with room (NVMe eviction may make
    /// it). The DRAM replica stays Ready and readable; the copy's source is protected from
    /// eviction until the task ends.
    pub(crate) fn write_through(&mut self, now: Duration, oid: ObjId) {
        if self.cfg.nvme_admission != Admission::WriteThrough {
            return;
        }
        let Some(obj) = self.objects.get(oid) else {
            return;
        };
        let on_nvme = |r: &Replica| self.tier_of(r.segment) == Some(Tier::Nvme);
        if !obj.is_complete() || obj.replicas.iter().any(on_nvme) {
            return;
        }
        let Some(src) = obj
            .replicas
            .iter()
            .find(|r| r.state == RepState::Ready && self.tier_of(r.segment) == Some(Tier::Dram))
            .copied()
        else {
            return;
        };
        self.queue_nvme_copy(now, oid, &src, TaskKind::WriteThrough);
    }

    /// Allocates an NVMe record for object `oid` on the node of its DRAM replica `src`
    /// (evicting NVMe's coldest if needed) and queues the copy; false when there is no room.
    fn queue_nvme_copy(
        &mut self,
        now: Duration,
        oid: ObjId,
        src: &Replica,
        kind: TaskKind,
    ) -> bool {
        let Some(obj) = self.objects.get(oid) else {
            return false;
        };
        let record = layout::record_len(obj.key.len(), obj.len);
        let Some(node) = self.cluster.segments.get(&src.segment).map(|s| s.node) else {
            return false;
        };
        let Some((to, a)) = self.alloc_on_node(now, node, Tier::Nvme, record) else {
            return false;
        };
        let target = self.add_filling(oid, to, a);
        // On DRAM the allocation offset is the value offset.
        self.issue(now, kind, oid, src, src.offset, target, node);
        true
    }

    /// Counts a lookup served from NVMe alone and promotes the object after enough of them.
    pub(crate) fn note_nvme_hit(&mut self, now: Duration, oid: ObjId) {
        if !self.cfg.promotes() {
            return;
        }
        let Some(obj) = self.objects.get_mut(oid) else {
            return;
        };
        obj.nvme_hits = obj.nvme_hits.saturating_add(1);
        if obj.nvme_hits < self.cfg.promote_after_hits || obj.task_in_flight() {
            return;
        }
        let ttl = self.cfg.node_ttl;
        let sources: Vec<(Replica, NodeId)> = obj
            .replicas
            .iter()
            .filter(|r| r.state == RepState::Ready)
            .filter_map(|r| {
                let seg = self.cluster.segments.get(&r.segment)?;
                let alive = self.cluster.alive(seg.node, now, ttl);
                (seg.tier == Tier::Nvme && alive).then_some((*r, seg.node))
            })
            .collect();
        let key_len = obj.key.len();
        let len = obj.len;
        for (src, node) in sources {
            if let Some((to, a)) = self.alloc_on_node(now, node, Tier::Dram, len) {
                let target = self.add_filling(oid, to, a);
                let from_offset = value_offset(Tier::Nvme, key_len, src.offset);
                self.issue(now, TaskKind::Promote, oid, &src, from_offset, target, node);
                if let Some(obj) = self.objects.get_mut(oid) {
                    obj.nvme_hits = 0;
                }
                return;
            }
        }
    }

    fn tier_of(&self, sid: SegmentId) -> Option<Tier> {
        self.cluster.segments.get(&sid).map(|s| s.tier)
    }

    /// Room for `len` bytes on one of a node's healthy segments of a tier: free space first,
    /// then by evicting (drop-only: the copy needs the space now).
    fn alloc_on_node(
        &mut self,
        now: Duration,
        node: NodeId,
        tier: Tier,
        len: u64,
    ) -> Option<(SegmentId, Allocation)> {
        // A draining node takes no new data: its victims are dropped, its objects not
        // promoted.
        if self.cluster.nodes.get(&node)?.draining {
            return None;
        }
        let segs: Vec<SegmentId> = self
            .cluster
            .nodes
            .get(&node)?
            .segments
            .iter()
            .copied()
            .filter(|s| {
                self.cluster
                    .segments
                    .get(s)
                    .is_some_and(|seg| seg.tier == tier && seg.healthy)
            })
            .collect();
        for &s in &segs {
            if let Some(a) = self
                .cluster
                .segments
                .get_mut(&s)
                .and_then(|seg| seg.alloc.alloc(len))
            {
                return Some((s, a));
            }
        }
        segs.into_iter()
            .find_map(|s| self.evict_for_alloc(now, s, len).map(|a| (s, a)))
    }

    /// Adds a Filling replica in an allocation to an object.
    pub(crate) fn add_filling(&mut self, oid: ObjId, segment: SegmentId, a: Allocation) -> Replica {
        let rep = Replica {
            id: self.fresh_replica_id(),
            segment,
            offset: a.offset,
            alloc_len: a.len,
            state: RepState::Filling,
        };
        if let Some(obj) = self.objects.get_mut(oid) {
            obj.replicas.push(rep);
        }
        if let Some(seg) = self.cluster.segments.get_mut(&segment) {
            seg.members.insert(rep.id, oid);
        }
        rep
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &mut self,
        now: Duration,
        kind: TaskKind,
        oid: ObjId,
        src: &Replica,
        from_offset: u64,
        target: Replica,
        node: NodeId,
    ) {
        self.issue_from(now, kind, oid, src, from_offset, target, node, None);
    }

    /// Queues a copy task for `node`, which holds `target`. `from_addr` is the data address
    /// of the node holding `src` when that is another node (a drain's move): `node` pulls the
    /// bytes from it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn issue_from(
        &mut self,
        now: Duration,
        kind: TaskKind,
        oid: ObjId,
        src: &Replica,
        from_offset: u64,
        target: Replica,
        node: NodeId,
        from_addr: Option<String>,
    ) {
        let id = self.fresh_task_id();
        let Some(obj) = self.objects.get(oid) else {
            return;
        };
        let wire = CopyTask {
            id,
            replica: target.id,
            key: obj.key.clone(),
            len: obj.len,
            checksum: obj.checksum,
            from: src.segment,
            from_offset,
            to: target.segment,
            // The NVMe record starts at the allocation (header first); on DRAM the value does.
            to_offset: target.offset,
            from_addr,
        };
        tracing::debug!(task = id, ?kind, from = %src.segment, to = %target.segment, "copy task issued");
        let task = Task {
            kind,
            object: oid,
            source: src.id,
            target,
            node,
            issued: now,
            orphan: false,
        };
        self.tasks.insert(id, task, wire);
    }
}
