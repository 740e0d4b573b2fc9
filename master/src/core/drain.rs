//! Graceful drain: an operator empties a node before taking it away.
//!
//! A draining node gets no new puts, demotions or promotions, and `tick` releases its
//! replicas: a replica with a copy elsewhere goes at once, a sole replica too (the pool is a
//! cache: a reader then misses and recomputes, as it would after an eviction), except what
//! readers or copies still use: leased objects wait for their lease to end, puts in progress
//! for their end, copies for their task. The node can leave once nothing is left.

use std::time::Duration;

use kvpool_proto::{Drain, DrainResponse, ErrorCode, ReplicaId, WireError};

use super::objects::{ObjId, RepState};
use super::MasterCore;

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
    fn replicas_on(&self, node: kvpool_proto::NodeId) -> u64 {
        self.cluster.nodes.get(&node).map_or(0, |n| {
            n.segments
                .iter()
                .filter_map(|s| self.cluster.segments.get(s))
                .map(|seg| seg.members.len() as u64)
                .sum()
        })
    }

    /// Releases every replica of draining nodes that nothing is using any more.
    pub(crate) fn release_draining(&mut self, now: Duration) {
        let mut victims: Vec<(ObjId, ReplicaId)> = Vec::new();
        for n in self.cluster.nodes.values().filter(|n| n.draining) {
            for sid in &n.segments {
                let Some(seg) = self.cluster.segments.get(sid) else {
                    continue;
                };
                for (&rid, &oid) in &seg.members {
                    let Some(obj) = self.objects.get(oid) else {
                        continue;
                    };
                    let ready = obj
                        .replicas
                        .iter()
                        .any(|r| r.id == rid && r.state == RepState::Ready);
                    if obj.is_complete() && ready && !obj.leased(now) {
                        victims.push((oid, rid));
                    }
                }
            }
        }
        for (oid, rid) in victims {
            self.drop_replica(oid, rid);
        }
    }
}
