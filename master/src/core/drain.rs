//! Graceful drain: an operator empties a node before taking it away.
//!
//! A draining node gets no new puts, demotions or promotions, and `tick` empties it. A
//! replica with a copy on another node goes at once. A sole copy is first moved: a copy task
//! for another node (DRAM where there is free room, else NVMe) pulls it from the draining
//! node, and once that copy is Ready the draining replica goes like any other with a copy
//! elsewhere. What readers still use waits: leased objects until their lease ends, puts in
//! progress until they end, copies until their task ends. Only when no other node has free
//! room is a sole copy dropped (the pool is a cache: a reader then misses and recomputes, as
//! after an eviction), and never the last copy of a leased or pinned object: that one waits
//! for room. The node can leave once nothing is left.

use std::time::Duration;

use kvpool_proto::{layout, Drain, DrainResponse, ErrorCode, NodeId, ReplicaId, Tier, WireError};

use super::objects::{ObjId, RepState};
use super::puts::value_offset;
use super::tasks::TaskKind;
use super::MasterCore;
use crate::alloc::Allocation;

/// Drain moves in flight at once, cluster-wide: each holds a target range and a copy slot on
/// its node, and a task waiting too long in a node's queue would time out.
pub const MAX_MOVES_IN_FLIGHT: usize = 64;

/// What the drain pass does with one replica of a draining node.
enum Step {
    /// Another node has a Ready copy: release this one (once no reader holds the object).
    Release,
    /// The only copy: move it to another node first.
    Move,
    /// Leave it for now (a put or copy in progress, or a move of it running).
    Wait,
}

impl MasterCore {
    /// Starts or cancels a drain; reports the replicas still on the node.
    pub fn drain(&mut self, now: Duration, req: Drain) -> DrainResponse {
        let Some(node) = self.cluster.nodes.get_mut(&req.node) else {
            return DrainResponse {
                replicas_left: Err(WireError::new(
                    ErrorCode::UnknownNode,
                    format!("node {} is not registered", req.node),
                )),
            };
        };
        node.draining = !req.cancel;
        tracing::info!(node = %req.node, draining = node.draining, "drain");
        if node.draining {
            self.release_draining(now);
        }
        DrainResponse {
            replicas_left: Ok(self.replicas_on(req.node)),
        }
    }

    /// Replicas (of any state) on a node's segments.
    fn replicas_on(&self, node: NodeId) -> u64 {
        self.cluster.nodes.get(&node).map_or(0, |n| {
            n.segments
                .iter()
                .filter_map(|s| self.cluster.segments.get(s))
                .map(|seg| seg.members.len() as u64)
                .sum()
        })
    }

    fn draining(&self, node: NodeId) -> bool {
        self.cluster.nodes.get(&node).is_some_and(|n| n.draining)
    }

    fn step_for(&self, oid: ObjId, rid: ReplicaId) -> Step {
        let Some(obj) = self.objects.get(oid) else {
            return Step::Wait;
        };
        let ready = obj
            .replicas
            .iter()
            .any(|r| r.id == rid && r.state == RepState::Ready);
        if !obj.is_complete() || !ready || self.tasks.is_source(rid) {
            return Step::Wait;
        }
        let elsewhere = obj.replicas.iter().any(|r| {
            r.id != rid
                && r.state == RepState::Ready
                && self
                    .cluster
                    .segments
                    .get(&r.segment)
                    .is_some_and(|s| !self.draining(s.node))
        });
        if elsewhere {
            Step::Release
        } else if obj.task_in_flight() {
            // A demotion or promotion of it is running; decide once it ends.
            Step::Wait
        } else {
            Step::Move
        }
    }

    /// Empties draining nodes: releases replicas with a copy elsewhere, moves sole copies.
    pub(crate) fn release_draining(&mut self, now: Duration) {
        let mut todo: Vec<(ObjId, ReplicaId, Step)> = Vec::new();
        for n in self.cluster.nodes.values().filter(|n| n.draining) {
            for sid in &n.segments {
                let Some(seg) = self.cluster.segments.get(sid) else {
                    continue;
                };
                for (&rid, &oid) in &seg.members {
                    todo.push((oid, rid, self.step_for(oid, rid)));
                }
            }
        }
        let mut moving = self.tasks.count_kind(TaskKind::Move);
        for (oid, rid, step) in todo {
            let Some(obj) = self.objects.get(oid) else {
                continue;
            };
            let (leased, pinned) = (obj.leased(now), obj.hard_pin || obj.soft_pinned(now));
            match step {
                Step::Release if !leased => self.drop_replica(oid, rid),
                Step::Move if moving < MAX_MOVES_IN_FLIGHT => {
                    if self.start_move(now, oid, rid) {
                        moving += 1;
                    } else if !leased && !pinned {
                        // No other node has room: a cache may drop an unpinned sole copy.
                        tracing::debug!(replica = rid.0, "no room elsewhere; dropping a sole copy");
                        self.drop_replica(oid, rid);
                    }
                }
                Step::Release | Step::Move | Step::Wait => {}
            }
        }
    }

    /// Issues a copy of `rid` (a draining node's sole copy) to another node; false when no
    /// other node has free room for it.
    fn start_move(&mut self, now: Duration, oid: ObjId, rid: ReplicaId) -> bool {
        let Some(obj) = self.objects.get(oid) else {
            return false;
        };
        let Some(src) = obj.replicas.iter().find(|r| r.id == rid).copied() else {
            return false;
        };
        let (key_len, len) = (obj.key.len(), obj.len);
        let Some(src_seg) = self.cluster.segments.get(&src.segment) else {
            return false;
        };
        let (src_node, src_tier) = (src_seg.node, src_seg.tier);
        let Some(from_addr) = self
            .cluster
            .nodes
            .get(&src_node)
            .map(|n| n.addr.to_string())
        else {
            return false;
        };
        // DRAM first (a cache's hot tier), then NVMe; free room only: a drain does not evict
        // other objects to make space.
        let spot = [
            (Tier::Dram, len),
            (Tier::Nvme, layout::record_len(key_len, len)),
        ]
        .into_iter()
        .find_map(|(tier, need)| self.free_room_elsewhere(now, tier, need));
        let Some((to_node, to, a)) = spot else {
            return false;
        };
        let target = self.add_filling(oid, to, a);
        let from_offset = value_offset(src_tier, key_len, src.offset);
        tracing::debug!(replica = rid.0, from = %src_node, to = %to_node, "drain moves a sole copy");
        self.issue_from(
            now,
            TaskKind::Move,
            oid,
            &src,
            from_offset,
            target,
            to_node,
            Some(from_addr),
        );
        true
    }

    /// Free room for `len` bytes on a healthy segment of `tier` of an alive node that is not
    /// draining, trying segments from a rotating start so moves spread over the nodes.
    fn free_room_elsewhere(
        &mut self,
        now: Duration,
        tier: Tier,
        len: u64,
    ) -> Option<(NodeId, kvpool_proto::SegmentId, Allocation)> {
        let ttl = self.cfg.node_ttl;
        let n = self.cluster.order.len();
        let start = self.rotor as usize;
        self.rotor = self.rotor.wrapping_add(1);
        for i in 0..n {
            let sid = self.cluster.order[(start + i) % n];
            let Some(seg) = self.cluster.segments.get(&sid) else {
                continue;
            };
            let node = seg.node;
            let usable = seg.tier == tier
                && seg.healthy
                && !self.draining(node)
                && self.cluster.alive(node, now, ttl);
            if !usable {
                continue;
            }
            if let Some(a) = self
                .cluster
                .segments
                .get_mut(&sid)
                .and_then(|s| s.alloc.alloc(len))
            {
                return Some((node, sid, a));
            }
        }
        None
    }
}
