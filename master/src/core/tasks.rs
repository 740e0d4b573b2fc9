//! Copy tasks between a node's tiers (write-through and demotion DRAM → NVMe, promotion
//! NVMe → DRAM): the pending table, the per-node outboxes that heartbeat responses empty, and
//! what a task's end does to the replicas involved.
//!
//! A task's target replica is Filling until the node reports the copy done; a demotion's source
//! is Leaving until then. Demotions and promotions run between two segments of one node, so a
//! node's death or re-registration takes their tasks, sources and targets together. A drain's
//! move runs on the target's node, which pulls from the draining node: when the source's node
//! goes, the object keeps only the Filling target and is dropped, and the task keeps the
//! target's range until it ends.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kvpool_proto::{CopyTask, Heartbeat, HeartbeatResponse, NodeId, ReplicaId};

use super::objects::{ObjId, RepState, Replica};
use super::{MasterCore, MAX_TASKS_PER_HEARTBEAT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskKind {
    Demote,
    Promote,
    /// Write-through: a committed object's DRAM replica copied to NVMe; the source stays.
    WriteThrough,
    /// A drain's copy of a sole replica to another node (which pulls it).
    Move,
}

#[derive(Debug, Clone)]
pub(crate) struct Task {
    pub kind: TaskKind,
    pub object: ObjId,
    pub source: ReplicaId,
    pub target: Replica,
    pub node: NodeId,
    pub issued: Duration,
    /// The object let go of the target (removed, overwritten): the task owns the target's
    /// range and frees it when it ends, since the node may be writing into it until then.
    pub orphan: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Tasks {
    pending: HashMap<u64, Task>,
    /// Pending tasks by issue time, so the timeout check looks only at the oldest.
    by_time: BTreeSet<(Duration, u64)>,
    by_target: HashMap<ReplicaId, u64>,
    /// Sources must not be evicted while their task reads them.
    by_source: HashMap<ReplicaId, u64>,
    /// Issued tasks the node has not been sent yet.
    outbox: HashMap<NodeId, Vec<CopyTask>>,
}

impl Tasks {
    pub fn insert(&mut self, id: u64, task: Task, wire: CopyTask) {
        self.by_time.insert((task.issued, id));
        self.by_target.insert(task.target.id, id);
        self.by_source.insert(task.source, id);
        self.outbox.entry(task.node).or_default().push(wire);
        self.pending.insert(id, task);
    }

    /// Removes a task from every index.
    pub fn take(&mut self, id: u64) -> Option<Task> {
        let task = self.pending.remove(&id)?;
        self.by_time.remove(&(task.issued, id));
        self.by_target.remove(&task.target.id);
        self.by_source.remove(&task.source);
        if let Some(out) = self.outbox.get_mut(&task.node) {
            out.retain(|t| t.id != id);
        }
        Some(task)
    }

    /// The object releases a Filling target. Returns true when the task keeps the range
    /// (the node may already be writing into it); false when the caller may free it now,
    /// either because no task knows the replica or because the task was never sent and is
    /// cancelled here.
    pub fn orphan_target(&mut self, target: ReplicaId) -> bool {
        let Some(&id) = self.by_target.get(&target) else {
            return false;
        };
        let Some(task) = self.pending.get_mut(&id) else {
            return false;
        };
        let unsent = self
            .outbox
            .get(&task.node)
            .is_some_and(|out| out.iter().any(|t| t.id == id));
        if unsent {
            self.take(id);
            return false;
        }
        task.orphan = true;
        true
    }

    /// Whether a copy out of DRAM (write-through or demotion) is pending: DRAM held by its
    /// source becomes evictable or free when it ends.
    pub fn copies_from_dram(&self) -> bool {
        self.pending
            .values()
            .any(|t| matches!(t.kind, TaskKind::Demote | TaskKind::WriteThrough))
    }

    pub fn is_source(&self, replica: ReplicaId) -> bool {
        self.by_source.contains_key(&replica)
    }

    pub fn of_target(&self, replica: ReplicaId) -> Option<(u64, &Task)> {
        let id = *self.by_target.get(&replica)?;
        Some((id, self.pending.get(&id)?))
    }

    pub fn of_source(&self, replica: ReplicaId) -> Option<(u64, &Task)> {
        let id = *self.by_source.get(&replica)?;
        Some((id, self.pending.get(&id)?))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Task)> {
        self.pending.iter().map(|(id, t)| (*id, t))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Pending tasks of one kind.
    pub fn count_kind(&self, kind: TaskKind) -> usize {
        self.pending.values().filter(|t| t.kind == kind).count()
    }

    /// Tasks issued before `deadline`.
    pub fn issued_before(&self, deadline: Duration) -> Vec<u64> {
        self.by_time
            .iter()
            .take_while(|(t, _)| *t < deadline)
            .map(|(_, id)| *id)
            .collect()
    }

    /// The next tasks to send a node, oldest first; each is sent once.
    pub fn drain_outbox(&mut self, node: NodeId) -> Vec<CopyTask> {
        let Some(out) = self.outbox.get_mut(&node) else {
            return Vec::new();
        };
        let n = out.len().min(MAX_TASKS_PER_HEARTBEAT);
        let batch = out.drain(..n).collect();
        if out.is_empty() {
            self.outbox.remove(&node);
        }
        batch
    }

    /// Forgets a node's tasks (its segments are going away with their replicas).
    pub fn drop_node(&mut self, node: NodeId) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, t)| t.node == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.take(id);
        }
        self.outbox.remove(&node);
    }
}

impl MasterCore {
    pub(crate) fn heartbeat_inner(&mut self, now: Duration, req: Heartbeat) -> HeartbeatResponse {
        let known = self.cluster.nodes.contains_key(&req.node);
        if known {
            for sid in &req.unhealthy {
                match self.cluster.segments.get_mut(sid) {
                    Some(seg) if seg.node == req.node => {
                        if seg.healthy {
                            tracing::warn!(node = %req.node, segment = %sid, "segment reported unhealthy");
                        }
                        seg.healthy = false;
                    }
                    _ => {}
                }
            }
            for r in &req.lost {
                self.forget_lost_replica(req.node, *r);
            }
            for d in &req.done {
                // Only the node the task went to may end it; anything else (a task of a
                // previous master, a duplicate report) is ignored.
                let mine = self
                    .tasks
                    .pending
                    .get(&d.id)
                    .is_some_and(|t| t.node == req.node);
                if mine {
                    if let Err(e) = &d.result {
                        tracing::warn!(node = %req.node, task = d.id, error = %e, "copy task failed");
                    }
                    self.finish_task(now, d.id, d.result.is_ok());
                }
            }
        }
        let node = req.node;
        let mut resp = self.cluster.heartbeat(now, req);
        if known {
            resp.tasks = self.tasks.drain_outbox(node);
        }
        resp
    }

    /// Fails the tasks that have run longer than `task_timeout`.
    pub(crate) fn expire_tasks(&mut self, now: Duration) {
        let deadline = now.saturating_sub(self.cfg.task_timeout);
        for id in self.tasks.issued_before(deadline) {
            tracing::warn!(task = id, "copy task timed out");
            self.finish_task(now, id, false);
        }
    }

    /// Applies a task's end. On success the target becomes Ready; a demotion's source goes
    /// either way (eviction chose it). On failure the target is freed.
    pub(crate) fn finish_task(&mut self, now: Duration, id: u64, ok: bool) {
        let Some(task) = self.tasks.take(id) else {
            return;
        };
        if task.orphan {
            self.free_range(&task.target);
            return;
        }
        let oid = task.object;
        if ok {
            self.make_ready(oid, task.target.id);
        } else if let Some(rep) = self.take_replica(oid, task.target.id) {
            let seq = self.objects.get(oid).map_or(0, |o| o.access_seq);
            self.release_replica(&rep, seq);
        }
        if task.kind == TaskKind::Demote {
            self.retire_source(now, oid, task.source);
        }
        self.drop_if_unreadable(oid);
    }

    fn make_ready(&mut self, oid: ObjId, rid: ReplicaId) {
        let Some(obj) = self.objects.get_mut(oid) else {
            return;
        };
        let Some(rep) = obj.replicas.iter_mut().find(|r| r.id == rid) else {
            return;
        };
        rep.state = RepState::Ready;
        let (segment, seq, recent) = (rep.segment, obj.access_seq, obj.in_recency());
        let notice = kvpool_proto::CommitNotice {
            replica: rid,
            hard_pin: obj.hard_pin,
            soft_pin: obj.soft_pin,
        };
        if let Some(seg) = self.cluster.segments.get_mut(&segment) {
            if recent {
                seg.recency.insert((seq, rid), oid);
            }
            // The copy is of a committed object: the node's inventory says so from now on.
            let node = seg.node;
            self.cluster.queue_commit(node, notice);
        }
    }

    /// Frees a demoted DRAM source; a reader holding a lease may still be copying from it, so
    /// then its range stays reserved until the lease ends.
    fn retire_source(&mut self, now: Duration, oid: ObjId, rid: ReplicaId) {
        let Some(lease) = self.objects.get(oid).map(|o| o.lease_until) else {
            return;
        };
        let Some(rep) = self.take_replica(oid, rid) else {
            return;
        };
        let seq = self.objects.get(oid).map_or(0, |o| o.access_seq);
        if lease > now {
            if self.detach_replica(&rep, seq) {
                self.discard_seq += 1;
                self.discarded.insert((lease, self.discard_seq), rep);
            }
        } else {
            self.release_replica(&rep, seq);
        }
    }
}
