//! A full consistency check of the core's indexes, for tests and debug endpoints. It walks
//! everything, so never call it on a hot path.

use std::collections::{HashMap, HashSet};

use kvpool_proto::SegmentId;

use super::objects::State;
use super::MasterCore;

impl MasterCore {
    /// Checks that every index agrees with the objects: each segment's used bytes equal the
    /// sum of its live and discarded replicas, replicas in a segment do not overlap, keys,
    /// membership and recency entries point at the right objects, every object has a replica,
    /// and the Processing index holds exactly the Processing objects. Returns what broke.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut ranges: HashMap<SegmentId, Vec<(u64, u64)>> = HashMap::new();
        let mut recency_expected = 0usize;
        let mut processing = 0usize;
        for (id, obj) in self.objects.iter() {
            if self.objects.keys().get(&obj.key) != Some(&id) {
                return Err(format!("object {id} is not under its key"));
            }
            if obj.replicas.is_empty() {
                return Err(format!("object {id} has no replica"));
            }
            match obj.state {
                State::Processing { started } => {
                    processing += 1;
                    if !self.objects.processing_index().contains(&(started, id)) {
                        return Err(format!("processing object {id} missing from the index"));
                    }
                }
                State::Complete => {}
            }
            for r in &obj.replicas {
                let seg = self.cluster.segments.get(&r.segment).ok_or_else(|| {
                    format!("object {id} has a replica on unknown segment {}", r.segment)
                })?;
                if seg.members.get(&r.id) != Some(&id) {
                    return Err(format!(
                        "replica {:?} of object {id} not a member of its segment",
                        r.id
                    ));
                }
                if seg.alloc.len_at(r.offset) != Some(r.alloc_len) {
                    return Err(format!(
                        "replica {:?} of object {id}: allocator disagrees",
                        r.id
                    ));
                }
                if r.alloc_len < obj.len {
                    return Err(format!(
                        "replica {:?} of object {id} is shorter than the object",
                        r.id
                    ));
                }
                if obj.in_recency() {
                    recency_expected += 1;
                    if seg.recency.get(&(obj.access_seq, r.id)) != Some(&id) {
                        return Err(format!(
                            "replica {:?} of object {id} missing from recency",
                            r.id
                        ));
                    }
                }
                ranges
                    .entry(r.segment)
                    .or_default()
                    .push((r.offset, r.alloc_len));
            }
        }
        if processing != self.objects.processing_index().len() {
            return Err("processing index has stale entries".into());
        }
        if self.objects.keys().len() != self.objects.iter().count() {
            return Err("key map and object table differ in size".into());
        }
        let mut discarded_ids = HashSet::new();
        for r in self.discarded.values() {
            ranges
                .entry(r.segment)
                .or_default()
                .push((r.offset, r.alloc_len));
            discarded_ids.insert(r.id);
        }
        let mut recency_total = 0;
        for (sid, seg) in &self.cluster.segments {
            recency_total += seg.recency.len();
            let mut v = ranges.remove(sid).unwrap_or_default();
            let sum: u64 = v.iter().map(|x| x.1).sum();
            if sum != seg.alloc.used() {
                return Err(format!(
                    "segment {sid}: used {} but replicas hold {sum}",
                    seg.alloc.used()
                ));
            }
            if v.len() != seg.alloc.allocations() {
                return Err(format!(
                    "segment {sid}: {} allocations for {} replicas",
                    seg.alloc.allocations(),
                    v.len()
                ));
            }
            v.sort_unstable();
            for w in v.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    return Err(format!(
                        "segment {sid}: replicas overlap at {:?} and {:?}",
                        w[0], w[1]
                    ));
                }
            }
            if let Some(last) = v.last() {
                if last.0 + last.1 > seg.alloc.capacity() {
                    return Err(format!("segment {sid}: replica past the end"));
                }
            }
            if !self
                .cluster
                .nodes
                .get(&seg.node)
                .is_some_and(|n| n.segments.contains(sid))
            {
                return Err(format!("segment {sid}: its node does not list it"));
            }
        }
        if let Some(sid) = ranges.keys().next() {
            return Err(format!("replicas on unknown segment {sid}"));
        }
        if recency_total != recency_expected {
            return Err(format!(
                "recency holds {recency_total} entries, expected {recency_expected}"
            ));
        }
        Ok(())
    }
}
