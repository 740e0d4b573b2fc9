//! Freeing the coldest replicas of a segment (metadata only: the node just forgets them).
//!
//! Each segment keeps its eviction candidates in access order, so a pass reads from the cold
//! end and stops once it has freed enough. Leased objects are skipped; hard-pinned and
//! Processing ones are never candidates; soft-pinned ones go only in a second pass, and only
//! when the configuration allows it.

use std::time::Duration;

use kvpool_proto::{ReplicaId, SegmentId};

use super::objects::ObjId;
use super::MasterCore;
use crate::alloc::Allocation;

/// When a pass may stop.
#[derive(Debug, Clone, Copy)]
struct Goal {
    /// Free at least this many bytes...
    min_free: u64,
    /// ...and bring the segment's used bytes to at most this.
    max_used: u64,
}

impl MasterCore {
    /// Evicts from one segment until `goal` is met or nothing evictable remains; returns the
    /// bytes freed.
    fn evict_segment(&mut self, now: Duration, sid: SegmentId, goal: Goal) -> u64 {
        let Some(seg) = self.cluster.segments.get(&sid) else {
            return 0;
        };
        let used = seg.alloc.used();
        let met =
            |freed: u64| freed >= goal.min_free && used.saturating_sub(freed) <= goal.max_used;
        let mut freed = 0;
        let mut victims: Vec<(ObjId, ReplicaId)> = Vec::new();
        let mut soft: Vec<(ObjId, ReplicaId, u64)> = Vec::new();
        for (&(_, rid), &oid) in &seg.recency {
            if met(freed) {
                break;
            }
            let Some(obj) = self.objects.get(oid) else {
                continue;
            };
            if obj.leased(now) {
                continue;
            }
            let Some(rep) = obj.replicas.iter().find(|r| r.id == rid) else {
                continue;
            };
            if obj.soft_pinned(now) {
                if self.cfg.allow_evict_soft_pinned {
                    soft.push((oid, rid, rep.alloc_len));
                }
                continue;
            }
            victims.push((oid, rid));
            freed += rep.alloc_len;
        }
        for (oid, rid, len) in soft {
            if met(freed) {
                break;
            }
            victims.push((oid, rid));
            freed += len;
        }
        self.evictions += victims.len() as u64;
        for (oid, rid) in victims {
            self.drop_replica(oid, rid);
        }
        if freed > 0 {
            tracing::debug!(segment = %sid, freed, "evicted");
        }
        freed
    }

    /// Evicts from a segment until an allocation of `len` fits, in rounds of at least
    /// `eviction_ratio` of the segment so that the next puts find room too.
    pub(crate) fn evict_for_alloc(
        &mut self,
        now: Duration,
        sid: SegmentId,
        len: u64,
    ) -> Option<Allocation> {
        loop {
            let cap = self.cluster.segments.get(&sid)?.alloc.capacity();
            let goal = Goal {
                min_free: fraction(cap, self.cfg.eviction_ratio).max(len),
                max_used: u64::MAX,
            };
            let freed = self.evict_segment(now, sid, goal);
            if let Some(a) = self.cluster.segments.get_mut(&sid)?.alloc.alloc(len) {
                return Some(a);
            }
            if freed == 0 {
                return None;
            }
        }
    }

    /// Evicts from every segment whose use exceeds the high watermark.
    pub(crate) fn evict_above_watermark(&mut self, now: Duration) {
        let over: Vec<(SegmentId, u64)> = self
            .cluster
            .segments
            .iter()
            .filter_map(|(sid, seg)| {
                let cap = seg.alloc.capacity();
                let mark = fraction(cap, self.cfg.high_watermark);
                (seg.alloc.used() > mark).then_some((*sid, cap))
            })
            .collect();
        for (sid, cap) in over {
            let goal = Goal {
                min_free: fraction(cap, self.cfg.eviction_ratio),
                max_used: fraction(cap, self.cfg.high_watermark),
            };
            self.evict_segment(now, sid, goal);
        }
    }
}

/// `cap * f`, clamped to `0..=cap` (the config may hold any float).
fn fraction(cap: u64, f: f64) -> u64 {
    let f = if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) };
    // f64 has 53 bits of mantissa: exact enough for byte counts of a segment.
    (cap as f64 * f) as u64
}
