//! Freeing the coldest replicas of a segment (metadata only: the node just forgets them).
//!
//! Each segment keeps its eviction candidates in access order, so a pass reads from the cold
//! end and stops once it has freed enough. Leased objects and the sources of copy tasks are
//! skipped; hard-pinned and Processing objects and Filling or Leaving replicas are never
//! candidates; soft-pinned ones go only in a second pass, and only when the configuration
//! allows it.

use std::ops::Bound::{Excluded, Unbounded};
use std::time::Duration;

use kvpool_proto::{ReplicaId, SegmentId, Tier};

use super::objects::ObjId;
use super::MasterCore;
use crate::alloc::Allocation;

/// Evictions that make an `eviction burst` line: fewer are routine (a put making room now
/// and then) and not worth a line at the default level.
pub(crate) const BURST_OBJECTS: u64 = 64;
/// At most one `eviction burst` line per this long: a pool under sustained pressure evicts on
/// every put, and its log must not turn into one line per request.
pub(crate) const BURST_EVERY: Duration = Duration::from_secs(10);

/// Evictions since the last `eviction burst` line (the core is sans-I/O: it logs through
/// `tracing` with the time it is given, no clock of its own).
#[derive(Debug, Default)]
pub(crate) struct BurstLog {
    objects: u64,
    bytes: u64,
    last_line: Option<Duration>,
}

impl BurstLog {
    /// Counts a pass's victims; logs one line (objects and bytes since the last line) once
    /// at least [`BURST_OBJECTS`] are pending and [`BURST_EVERY`] has passed since the last.
    /// Returns whether it logged.
    pub(crate) fn record(&mut self, now: Duration, objects: u64, bytes: u64) -> bool {
        self.objects += objects;
        self.bytes += bytes;
        let due = self
            .last_line
            .is_none_or(|t| now.saturating_sub(t) >= BURST_EVERY);
        if self.objects < BURST_OBJECTS || !due {
            return false;
        }
        let since = self.last_line.map(|t| now.saturating_sub(t));
        tracing::info!(
            objects = self.objects,
            bytes = self.bytes,
            since_last = ?since,
            "eviction burst"
        );
        self.objects = 0;
        self.bytes = 0;
        self.last_line = Some(now);
        true
    }
}

/// When a pass may stop.
#[derive(Debug, Clone, Copy)]
struct Goal {
    /// Free at least this many bytes...
    min_free: u64,
    /// ...and bring the segment's used bytes to at most this.
    max_used: u64,
}

impl MasterCore {
    /// The coldest evictable replicas of a segment, enough to meet `goal` (or all there are),
    /// with the bytes each frees. Replicas being demoted count as freed already: their space
    /// comes back when their task ends.
    ///
    /// Reads do not move objects in the recency order (`objects::note_read`), so an entry
    /// may be older than its object's latest use: such an object is refiled at that use
    /// when the walk reaches it, and met again further on, in its true place. The walk
    /// therefore visits candidates in order of latest use, as if every read had moved them.
    fn pick_victims(
        &mut self,
        now: Duration,
        sid: SegmentId,
        goal: Goal,
    ) -> (Vec<(ObjId, ReplicaId)>, u64) {
        let Some(seg) = self.cluster.segments.get(&sid) else {
            return (Vec::new(), 0);
        };
        let used = seg.alloc.used().saturating_sub(seg.leaving);
        let met =
            |freed: u64| freed >= goal.min_free && used.saturating_sub(freed) <= goal.max_used;
        let mut freed = 0;
        let mut victims: Vec<(ObjId, ReplicaId)> = Vec::new();
        let mut soft: Vec<(ObjId, ReplicaId, u64)> = Vec::new();
        // The last entry visited; the walk goes on strictly after it.
        let mut cursor: Option<(u64, ReplicaId)> = None;
        while !met(freed) {
            let Some(seg) = self.cluster.segments.get(&sid) else {
                break;
            };
            let next = match cursor {
                None => seg.recency.iter().next(),
                Some(c) => seg.recency.range((Excluded(c), Unbounded)).next(),
            };
            let Some((&(seq, rid), &oid)) = next else {
                break;
            };
            cursor = Some((seq, rid));
            if self.refile_if_stale(oid) {
                continue;
            }
            let Some(obj) = self.objects.get(oid) else {
                continue;
            };
            // A promotion's source is being read by the node.
            if obj.leased(now) || self.tasks.is_source(rid) {
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
        (victims, freed)
    }

    /// Evicts (drops) from one segment until `goal` is met or nothing evictable remains;
    /// returns whether anything was dropped.
    fn evict_segment(&mut self, now: Duration, sid: SegmentId, goal: Goal) -> bool {
        let (victims, bytes) = self.pick_victims(now, sid, goal);
        self.evictions += victims.len() as u64;
        self.eviction_log.record(now, victims.len() as u64, bytes);
        for &(oid, rid) in &victims {
            self.drop_replica(oid, rid);
        }
        if !victims.is_empty() {
            tracing::debug!(segment = %sid, victims = victims.len(), "evicted");
        }
        !victims.is_empty()
    }

    /// Evicts from a segment until an allocation of `len` fits, in rounds of at least
    /// `eviction_ratio` of the segment so that the next puts find room too. Drop-only: the
    /// caller needs the space now, and a demotion frees its source only later.
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
            let dropped = self.evict_segment(now, sid, goal);
            if let Some(a) = self.cluster.segments.get_mut(&sid)?.alloc.alloc(len) {
                return Some(a);
            }
            if !dropped {
                return None;
            }
        }
    }

    /// Evicts from every segment above its tier's high watermark. NVMe goes first so that
    /// demotions in the same pass find the room it made; DRAM victims are demoted when they
    /// can be, else dropped.
    pub(crate) fn evict_above_watermark(&mut self, now: Duration) {
        let mut over: Vec<(Tier, SegmentId, u64)> = self
            .cluster
            .segments
            .iter()
            .filter_map(|(sid, seg)| {
                let cap = seg.alloc.capacity();
                let high = match seg.tier {
                    Tier::Dram => self.cfg.high_watermark,
                    Tier::Nvme => self.cfg.nvme_high_watermark,
                };
                let used = seg.alloc.used().saturating_sub(seg.leaving);
                (used > fraction(cap, high)).then_some((seg.tier, *sid, cap))
            })
            .collect();
        over.sort_unstable_by_key(|(tier, sid, _)| (*tier == Tier::Dram, *sid));
        for (tier, sid, cap) in over {
            match tier {
                Tier::Nvme => {
                    let goal = Goal {
                        min_free: 0,
                        max_used: fraction(cap, self.cfg.nvme_low_watermark),
                    };
                    self.evict_segment(now, sid, goal);
                }
                Tier::Dram => {
                    let goal = Goal {
                        min_free: fraction(cap, self.cfg.eviction_ratio),
                        max_used: fraction(cap, self.cfg.high_watermark),
                    };
                    let (victims, bytes) = self.pick_victims(now, sid, goal);
                    self.evictions += victims.len() as u64;
                    self.eviction_log.record(now, victims.len() as u64, bytes);
                    for (oid, rid) in victims {
                        if !self.try_demote(now, oid, rid) {
                            self.drop_replica(oid, rid);
                        }
                    }
                }
            }
        }
    }
}

/// `cap * f`, clamped to `0..=cap` (the config may hold any float).
fn fraction(cap: u64, f: f64) -> u64 {
    let f = if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) };
    // f64 has 53 bits of mantissa: exact enough for byte counts of a segment.
    (cap as f64 * f) as u64
}

#[cfg(test)]
mod burst_tests {
    use super::*;

    #[test]
    fn a_burst_line_needs_enough_evictions_and_is_rate_limited() {
        let mut log = BurstLog::default();
        let t = Duration::from_secs(100);
        // Routine evictions: no line until enough are pending.
        assert!(!log.record(t, BURST_OBJECTS - 1, 1 << 20));
        assert!(log.record(t, 1, 4096));
        assert_eq!((log.objects, log.bytes), (0, 0), "reported ones start over");
        // A second burst within the interval waits, and is reported whole once it is due.
        assert!(!log.record(t + Duration::from_secs(1), 500, 1 << 30));
        assert!(!log.record(t + BURST_EVERY - Duration::from_millis(1), 0, 0));
        assert!(log.record(t + BURST_EVERY, 0, 0));
        // A pass of zero victims never logs on its own.
        assert!(!log.record(t + 10 * BURST_EVERY, 0, 0));
    }
}
