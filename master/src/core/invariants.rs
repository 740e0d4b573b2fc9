//! A full consistency check of the core's indexes, for tests and debug endpoints. It walks
//! everything, so never call it on a hot path.

use std::collections::{HashMap, HashSet};

use kvpool_proto::{NodeId, SegmentId, Tier};

use super::objects::{ObjId, RepState, Replica, State};
use super::tasks::TaskKind;
use super::MasterCore;

impl MasterCore {
    /// Checks that every index agrees with the objects: each segment's used bytes equal the
    /// sum of its live (Ready, Filling, Leaving), discarded and orphaned-task replicas,
    /// replicas in a segment do not overlap, keys, membership and recency entries point at
    /// the right objects, every object has a replica and a committed one a readable replica,
    /// every Filling and Leaving replica has exactly one pending task, and the Processing
    /// index holds exactly the Processing objects. Returns what broke.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut ranges: HashMap<SegmentId, Vec<(u64, u64)>> = HashMap::new();
        let mut recency_expected = 0usize;
        let mut leaving: HashMap<SegmentId, u64> = HashMap::new();
        let mut processing = 0usize;
        for (id, obj) in self.objects.iter() {
            if self.objects.keys().get(&obj.key) != Some(&id) {
                return Err(format!("object {id} is not under its key"));
            }
            if obj.replicas.is_empty() {
                return Err(format!("object {id} has no replica"));
            }
            if obj.access_seq > obj.last_access {
                return Err(format!("object {id} is filed after its latest use"));
            }
            if obj.is_complete() && !obj.has_readable() {
                return Err(format!("committed object {id} has no readable replica"));
            }
            if !obj.is_complete() && obj.task_in_flight() {
                return Err(format!("processing object {id} has a copy task"));
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
                self.check_task_states(id, r, seg.node, seg.tier)?;
                if r.state == RepState::Leaving {
                    *leaving.entry(r.segment).or_default() += r.alloc_len;
                }
                let candidate = obj.in_recency() && r.state == RepState::Ready;
                if !candidate && seg.recency.contains_key(&(obj.access_seq, r.id)) {
                    return Err(format!(
                        "replica {:?} of object {id} is an eviction candidate in state {:?}",
                        r.id, r.state
                    ));
                }
                if candidate {
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
        for (tid, t) in self.tasks.iter() {
            let seg = self
                .cluster
                .segments
                .get(&t.target.segment)
                .ok_or_else(|| {
                    format!("task {tid}: target on unknown segment {}", t.target.segment)
                })?;
            if seg.node != t.node {
                return Err(format!("task {tid}: target not on the task's node"));
            }
            if t.orphan {
                if seg.members.contains_key(&t.target.id) {
                    return Err(format!("task {tid}: orphaned target still a member"));
                }
                ranges
                    .entry(t.target.segment)
                    .or_default()
                    .push((t.target.offset, t.target.alloc_len));
            } else {
                let held = self.objects.get(t.object).is_some_and(|o| {
                    o.replicas
                        .iter()
                        .any(|r| r.id == t.target.id && r.state == RepState::Filling)
                });
                if !held {
                    return Err(format!("task {tid}: its object lacks the Filling target"));
                }
            }
        }
        let mut recency_total = 0;
        for (sid, seg) in &self.cluster.segments {
            recency_total += seg.recency.len();
            let want = leaving.get(sid).copied().unwrap_or(0);
            if seg.leaving != want {
                return Err(format!(
                    "segment {sid}: leaving {} but Leaving replicas hold {want}",
                    seg.leaving
                ));
            }
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

    /// A Filling replica is the target of exactly one live task on its node; a Leaving one
    /// the source of exactly one demotion; a Ready one the target of none.
    fn check_task_states(
        &self,
        id: ObjId,
        r: &Replica,
        node: NodeId,
        tier: Tier,
    ) -> Result<(), String> {
        match r.state {
            RepState::Ready => {
                if self.tasks.of_target(r.id).is_some() {
                    return Err(format!("Ready replica {:?} is a task's target", r.id));
                }
            }
            RepState::Filling => {
                let ok = self.tasks.of_target(r.id).is_some_and(|(_, t)| {
                    t.object == id && !t.orphan && t.node == node && t.target == *r
                });
                if !ok {
                    return Err(format!("Filling replica {:?} has no task", r.id));
                }
            }
            RepState::Leaving => {
                let n = self.tasks.iter().filter(|(_, t)| t.source == r.id).count();
                let ok = self.tasks.of_source(r.id).is_some_and(|(_, t)| {
                    t.object == id && t.kind == TaskKind::Demote && t.node == node
                });
                if n != 1 || !ok || tier != Tier::Dram {
                    return Err(format!(
                        "Leaving replica {:?} has {n} tasks (demotion: {ok})",
                        r.id
                    ));
                }
            }
        }
        Ok(())
    }
}
