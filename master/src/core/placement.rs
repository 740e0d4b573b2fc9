//! Which segments receive a new object's replicas.
//!
//! Preferred nodes first, in the order given; then every other segment, walking the sorted
//! ring from a start picked by the key's hash plus a rotor that turns with each put, so load
//! spreads instead of filling the first segment, and a caller's regular pattern of puts (say,
//! alternating replica counts) does not line up with the ring. Replicas go on distinct nodes when possible, else on distinct segments. Only
//! alive nodes are used. When the walk finds no room, the candidates are evicted from
//! (coldest first) and tried again, so a full pool keeps accepting puts.

use std::time::Duration;

use kvpool_proto::{NodeId, SegmentId};

use super::MasterCore;
use crate::alloc::Allocation;

impl MasterCore {
    /// Candidate segments for a put, in the order to try them.
    fn candidates(&mut self, now: Duration, key: &[u8], preferred: &[NodeId]) -> Vec<SegmentId> {
        let ttl = self.cfg.node_ttl;
        let mut out = Vec::new();
        for n in preferred {
            if !self.cluster.alive(*n, now, ttl) {
                continue;
            }
            if let Some(node) = self.cluster.nodes.get(n) {
                for s in &node.segments {
                    if !out.contains(s) && self.takes_puts(s) {
                        out.push(*s);
                    }
                }
            }
        }
        let ring = &self.cluster.order;
        if ring.is_empty() {
            return out;
        }
        let spread = self
            .rotor
            .wrapping_add(u64::from(kvpool_proto::crc32c::crc32c(key)));
        let start = (spread % ring.len() as u64) as usize;
        self.rotor = self.rotor.wrapping_add(1);
        for i in 0..ring.len() {
            let s = ring[(start + i) % ring.len()];
            let Some(seg) = self.cluster.segments.get(&s) else {
                continue;
            };
            if preferred.contains(&seg.node)
                || !self.cluster.alive(seg.node, now, ttl)
                || !self.takes_puts(&s)
            {
                continue;
            }
            out.push(s);
        }
        out
    }

    /// Clients write only DRAM segments; NVMe is filled by demotion. A segment that failed
    /// takes nothing new.
    fn takes_puts(&self, s: &SegmentId) -> bool {
        self.cluster.segments.get(s).is_some_and(|seg| {
            seg.tier == kvpool_proto::Tier::Dram
                && seg.healthy
                && !self
                    .cluster
                    .nodes
                    .get(&seg.node)
                    .is_some_and(|n| n.draining)
        })
    }

    /// Allocates up to `want` replicas of `len` bytes; fewer (possibly none) when space or
    /// segments run short.
    pub(crate) fn place(
        &mut self,
        now: Duration,
        key: &[u8],
        len: u64,
        want: u8,
        preferred: &[NodeId],
    ) -> Vec<(SegmentId, Allocation)> {
        let want = usize::from(want);
        let order = self.candidates(now, key, preferred);
        let mut chosen: Vec<(SegmentId, Allocation)> = Vec::with_capacity(want);
        let mut nodes: Vec<NodeId> = Vec::with_capacity(want);
        for evict in [false, true] {
            for distinct_nodes in [true, false] {
                for &s in &order {
                    if chosen.len() >= want {
                        return chosen;
                    }
                    if chosen.iter().any(|(c, _)| *c == s) {
                        continue;
                    }
                    let Some(node) = self.cluster.segments.get(&s).map(|seg| seg.node) else {
                        continue;
                    };
                    if distinct_nodes && nodes.contains(&node) {
                        continue;
                    }
                    let got = if evict {
                        self.evict_for_alloc(now, s, len)
                    } else {
                        self.cluster
                            .segments
                            .get_mut(&s)
                            .and_then(|seg| seg.alloc.alloc(len))
                    };
                    if let Some(a) = got {
                        chosen.push((s, a));
                        nodes.push(node);
                    }
                }
            }
        }
        chosen
    }
}
