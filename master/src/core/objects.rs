//! The object table and the lifecycle steps shared by every rule: dropping an object, freeing
//! one replica, recording an access.

use std::collections::{BTreeSet, HashMap};

use foldhash::fast::RandomState;
use std::time::Duration;

use kvpool_proto::{ClientId, CommitNotice, NodeId, ReplicaId, SegmentId};

use super::membership::Cluster;
use super::MasterCore;

/// An object's internal id; keys map to it so that indexes hold 8 bytes, not the key.
pub(crate) type ObjId = u64;

/// One allocation holding an object's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replica {
    pub id: ReplicaId,
    pub segment: SegmentId,
    pub offset: u64,
    /// The bytes the allocator reserved (at least the object's length).
    pub alloc_len: u64,
    pub state: RepState,
}

/// Where a replica stands with respect to copy tasks between tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RepState {
    /// Holds the object's bytes; readable and (when the object allows) evictable.
    Ready,
    /// The target of a copy task: its bytes are not there yet, so readers must not see it and
    /// eviction must not take it.
    Filling,
    /// A DRAM replica being demoted: readable until its task ends, but already chosen by
    /// eviction, so it must not be chosen again.
    Leaving,
}

impl Replica {
    pub fn readable(&self) -> bool {
        self.state != RepState::Filling
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Processing { started: Duration },
    Complete,
}

#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub key: Vec<u8>,
    pub len: u64,
    pub checksum: u32,
    pub state: State,
    /// The client that started the put; `None` for objects re-admitted from an inventory.
    pub writer: Option<ClientId>,
    pub replicas: Vec<Replica>,
    pub lease_until: Duration,
    /// `Some` once committed with a soft pin.
    pub soft_pin_until: Option<Duration>,
    pub soft_pin: bool,
    pub hard_pin: bool,
    /// Where the object's Ready replicas are filed in their segments' recency orders (the
    /// key of their entries); larger is hotter. At most `last_access`.
    pub access_seq: u64,
    /// The object's latest use (commit, lookup or read). A read only sets this; eviction
    /// refiles an object whose entries lag behind it when it reaches one ([`Object::stale`]).
    pub last_access: u64,
    /// Lookups since commit (`get_replicas`); NVMe admission may require one.
    pub reads: u32,
    /// Lookups served from NVMe alone since the last promotion was issued.
    pub nvme_hits: u32,
}

impl Object {
    pub fn is_complete(&self) -> bool {
        self.state == State::Complete
    }

    pub fn leased(&self, now: Duration) -> bool {
        self.lease_until > now
    }

    pub fn soft_pinned(&self, now: Duration) -> bool {
        self.soft_pin_until.is_some_and(|t| t > now)
    }

    /// Whether the object sits in its segments' recency orders (eviction candidates).
    pub fn in_recency(&self) -> bool {
        self.is_complete() && !self.hard_pin
    }

    /// Whether a reader can be served: Filling replicas do not count.
    pub fn has_readable(&self) -> bool {
        self.replicas.iter().any(Replica::readable)
    }

    /// Whether readers see the object: committed, with a readable replica.
    pub fn visible(&self) -> bool {
        self.is_complete() && self.has_readable()
    }

    /// Whether the object was used since it was last filed in the recency orders: its entries
    /// there are older than its latest use, so eviction must refile it before judging it.
    pub fn stale(&self) -> bool {
        self.last_access > self.access_seq
    }

    /// Whether a copy task involves the object (a Filling target exists).
    pub fn task_in_flight(&self) -> bool {
        self.replicas.iter().any(|r| r.state != RepState::Ready)
    }
}

/// The table's maps hash with foldhash: several times faster than std's SipHash on the keys
/// of a batched lookup (the master's per-key cost), and seeded per process like std's, so
/// clients cannot aim keys at one bucket.
pub(crate) type FastMap<K, V> = HashMap<K, V, RandomState>;

/// Keys, objects and the index of puts in progress.
///
/// Objects live in a slab indexed by their id, so that a key's lookup costs one hash probe
/// (the key map) and one array index, not a second probe of an id map: on a pool larger
/// than the caches each probe is a cache miss, and the two probes were most of a lookup's
/// time (docs/benchmarks.md, "Master per-key cost").
#[derive(Debug, Default)]
pub(crate) struct ObjectTable {
    keys: FastMap<Vec<u8>, ObjId>,
    slots: Vec<Slot>,
    /// Slots without an object, reused before the slab grows.
    free: Vec<u32>,
    /// Processing objects by start time, so zombie release looks only at the oldest.
    processing: BTreeSet<(Duration, ObjId)>,
    complete: u64,
    /// With a location index to keep: every object handed out mutably or removed since the
    /// last [`ObjectTable::take_changes`], in order.
    changes: Option<Vec<Change>>,
}

/// An object that may have changed, for the location index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Its state now decides its entry.
    Object(ObjId),
    /// Removed: the hash of its key (`shm::index::key_hash`), whose entry goes.
    Gone(u128),
}

/// One place in the slab. An id names a slot and the generation of its occupant; the
/// generation changes whenever an object leaves, so an id held past its object's removal
/// (a task's, an index entry's) finds nothing rather than a newer object in the same slot.
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    object: Option<Object>,
}

/// The id of a slot's current occupant: generation above, slot below. Generations start at
/// 1, so no id is 0.
fn object_id(slot: usize, generation: u32) -> ObjId {
    (u64::from(generation) << 32) | slot as u64
}

impl ObjectTable {
    pub fn id_of(&self, key: &[u8]) -> Option<ObjId> {
        self.keys.get(key).copied()
    }

    /// The slot `id` names, while it still holds that object.
    fn slot(&self, id: ObjId) -> Option<&Slot> {
        let s = self.slots.get((id & u64::from(u32::MAX)) as usize)?;
        (u64::from(s.generation) == id >> 32).then_some(s)
    }

    fn slot_mut(&mut self, id: ObjId) -> Option<&mut Slot> {
        let s = self.slots.get_mut((id & u64::from(u32::MAX)) as usize)?;
        (u64::from(s.generation) == id >> 32).then_some(s)
    }

    pub fn get(&self, id: ObjId) -> Option<&Object> {
        self.slot(id)?.object.as_ref()
    }

    /// The object under `key`, with its id.
    pub fn lookup(&self, key: &[u8]) -> Option<(ObjId, &Object)> {
        let id = self.id_of(key)?;
        self.get(id).map(|o| (id, o))
    }

    /// [`ObjectTable::lookup`] for a caller that updates the object (a read's lease and
    /// recency), so that a get finds its object once.
    pub fn lookup_mut(&mut self, key: &[u8]) -> Option<(ObjId, &mut Object)> {
        let id = self.id_of(key)?;
        self.get_mut(id).map(|o| (id, o))
    }

    /// Every change to an object goes through here (or [`ObjectTable::insert`] and
    /// [`ObjectTable::remove`]): the one place the location index learns of it.
    pub fn get_mut(&mut self, id: ObjId) -> Option<&mut Object> {
        if let Some(c) = &mut self.changes {
            c.push(Change::Object(id));
        }
        self.slot_mut(id)?.object.as_mut()
    }

    /// Starts recording changes for a location index.
    pub fn track_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// The changes recorded since the last call (none when not tracking).
    pub fn take_changes(&mut self) -> Vec<Change> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = (ObjId, &Object)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.object.as_ref().map(|o| (object_id(i, s.generation), o)))
    }

    pub fn keys(&self) -> &FastMap<Vec<u8>, ObjId> {
        &self.keys
    }

    pub fn processing_index(&self) -> &BTreeSet<(Duration, ObjId)> {
        &self.processing
    }

    pub fn complete_count(&self) -> u64 {
        self.complete
    }

    pub fn processing_count(&self) -> u64 {
        self.processing.len() as u64
    }

    /// Inserts an object under its key, which must be free.
    pub fn insert(&mut self, obj: Object) -> ObjId {
        let slot = match self.free.pop() {
            Some(slot) => slot as usize,
            None => {
                self.slots.push(Slot {
                    generation: 1,
                    object: None,
                });
                self.slots.len() - 1
            }
        };
        let id = object_id(slot, self.slots[slot].generation);
        match obj.state {
            State::Processing { started } => {
                self.processing.insert((started, id));
            }
            State::Complete => self.complete += 1,
        }
        self.keys.insert(obj.key.clone(), id);
        self.slots[slot].object = Some(obj);
        if let Some(c) = &mut self.changes {
            c.push(Change::Object(id));
        }
        id
    }

    /// Removes an object and its key; the caller deals with its replicas.
    pub fn remove(&mut self, id: ObjId) -> Option<Object> {
        let s = self.slot_mut(id)?;
        let obj = s.object.take()?;
        // A new generation for the next occupant (never 0, so no id is 0).
        s.generation = s.generation.checked_add(1).unwrap_or(1);
        self.free.push((id & u64::from(u32::MAX)) as u32);
        self.keys.remove(&obj.key);
        if let Some(c) = &mut self.changes {
            c.push(Change::Gone(kvpool_transport::shm::index::key_hash(
                &obj.key,
            )));
        }
        match obj.state {
            State::Processing { started } => {
                self.processing.remove(&(started, id));
            }
            State::Complete => self.complete -= 1,
        }
        Some(obj)
    }

    /// Processing → Complete; false if the object is not Processing.
    pub fn mark_complete(&mut self, id: ObjId) -> bool {
        let Some(obj) = self.get_mut(id) else {
            return false;
        };
        let State::Processing { started } = obj.state else {
            return false;
        };
        obj.state = State::Complete;
        self.processing.remove(&(started, id));
        self.complete += 1;
        true
    }

    /// The oldest put in progress.
    pub fn oldest_processing(&self) -> Option<(Duration, ObjId)> {
        self.processing.first().copied()
    }
}

/// Records a read: the object's latest use becomes `seq`, and nothing else moves. Its
/// entries in the recency orders keep their place until eviction reaches one and refiles the
/// object ([`MasterCore::refile_if_stale`]), so eviction still goes by each object's latest
/// use (exactly as if every read had moved it) while a read costs no B-tree work: a batched
/// get used to remove and re-insert every replica of every key (docs/benchmarks.md, "Master
/// per-key cost").
pub(crate) fn note_read(obj: &mut Object, seq: u64) {
    obj.last_access = obj.last_access.max(seq);
}

/// Files an object's Ready replicas in their segments' recency orders at its latest use,
/// taking them out of where they were (`access_seq`). Objects outside eviction (Processing,
/// hard-pinned) are only stamped.
pub(crate) fn refile(cluster: &mut Cluster, id: ObjId, obj: &mut Object) {
    let (old, seq) = (obj.access_seq, obj.last_access);
    obj.access_seq = seq;
    if !obj.in_recency() {
        return;
    }
    for rep in obj.replicas.iter().filter(|r| r.state == RepState::Ready) {
        if let Some(seg) = cluster.segments.get_mut(&rep.segment) {
            seg.recency.remove(&(old, rep.id));
            seg.recency.insert((seq, rep.id), id);
        }
    }
}

impl MasterCore {
    /// Removes an object and frees all its replicas (queued for their nodes).
    pub(crate) fn drop_object(&mut self, id: ObjId) -> Option<super::objects::Object> {
        let obj = self.objects.remove(id)?;
        for rep in &obj.replicas {
            self.release_replica(rep, obj.access_seq);
        }
        Some(obj)
    }

    /// Takes a replica out of its segment's indexes. Returns whether the caller now owns its
    /// space: a Filling target's space goes to its task instead, because the node may still
    /// be writing into it and the range must not be handed out again before the task ends.
    pub(crate) fn detach_replica(&mut self, rep: &Replica, access_seq: u64) -> bool {
        let Some(seg) = self.cluster.segments.get_mut(&rep.segment) else {
            return false;
        };
        seg.members.remove(&rep.id);
        seg.recency.remove(&(access_seq, rep.id));
        match rep.state {
            RepState::Ready => true,
            RepState::Leaving => {
                seg.leaving = seg.leaving.saturating_sub(rep.alloc_len);
                true
            }
            RepState::Filling => !self.tasks.orphan_target(rep.id),
        }
    }

    /// Frees one replica's space and tells its node. `access_seq` locates it in the recency
    /// order. A replica whose segment is gone (dead node) needs nothing.
    pub(crate) fn release_replica(&mut self, rep: &Replica, access_seq: u64) {
        if self.detach_replica(rep, access_seq) {
            self.free_range(rep);
        }
    }

    /// Gives a detached replica's range back to its segment and queues the node's free.
    pub(crate) fn free_range(&mut self, rep: &Replica) {
        let Some(seg) = self.cluster.segments.get_mut(&rep.segment) else {
            return;
        };
        if !seg.alloc.free(rep.offset) {
            tracing::error!(segment = %rep.segment, offset = rep.offset, "freeing an unknown allocation");
        }
        let node = seg.node;
        self.cluster.queue_free(node, rep.id);
    }

    /// Records a commit or lookup: the object becomes the hottest in its segments, filed
    /// there at once. `update` is applied to the object first, in the same lookup (a lease, a
    /// commit's pin).
    pub(crate) fn touch(&mut self, id: ObjId, update: impl FnOnce(&mut Object)) {
        let seq = self.next_access();
        let Some(obj) = self.objects.get_mut(id) else {
            return;
        };
        update(obj);
        obj.last_access = seq;
        refile(&mut self.cluster, id, obj);
    }

    /// Refiles a stale object ([`Object::stale`]) at its latest use; returns whether it was.
    pub(crate) fn refile_if_stale(&mut self, id: ObjId) -> bool {
        match self.objects.get_mut(id) {
            Some(obj) if obj.stale() => {
                refile(&mut self.cluster, id, obj);
                true
            }
            _ => false,
        }
    }

    /// Removes one replica from an object (eviction, a task's end); drops the object when no
    /// readable replica is left.
    pub(crate) fn drop_replica(&mut self, id: ObjId, replica: ReplicaId) {
        let Some(rep) = self.take_replica(id, replica) else {
            return;
        };
        let seq = self.objects.get(id).map_or(0, |o| o.access_seq);
        self.release_replica(&rep, seq);
        self.drop_if_unreadable(id);
    }

    /// A node reports a replica it can no longer serve (it found the bytes corrupt and
    /// dropped them): the master forgets it at once, so lookups stop handing it out, and
    /// drops the object when no readable replica is left. Only the node holding the replica
    /// may report it; a Filling target is left to its task, whose failure frees it. Pins and
    /// leases do not keep it: the bytes are gone.
    pub(crate) fn forget_lost_replica(&mut self, node: NodeId, replica: ReplicaId) {
        let Some(n) = self.cluster.nodes.get(&node) else {
            return;
        };
        let Some(oid) = n.segments.iter().find_map(|sid| {
            let seg = self.cluster.segments.get(sid)?;
            seg.members.get(&replica).copied()
        }) else {
            return;
        };
        let filling = self
            .objects
            .get(oid)
            .and_then(|o| o.replicas.iter().find(|r| r.id == replica))
            .is_some_and(|r| r.state == RepState::Filling);
        if filling {
            return;
        }
        tracing::warn!(%node, replica = replica.0, "node lost a replica (corrupt or unreadable); forgetting it");
        self.lost_replicas += 1;
        self.drop_replica(oid, replica);
    }

    /// The notice telling a replica's node that the object under `key` is committed, with its
    /// pins; `None` unless the object is committed.
    pub(crate) fn commit_notice(&self, key: &[u8], replica: ReplicaId) -> Option<CommitNotice> {
        let (_, obj) = self.objects.lookup(key)?;
        obj.is_complete().then_some(CommitNotice {
            replica,
            hard_pin: obj.hard_pin,
            soft_pin: obj.soft_pin,
        })
    }

    /// Tells the nodes holding an object's Ready replicas that it is committed (and how it
    /// is pinned), so their inventories report it as such to a later master.
    pub(crate) fn announce_commit(&mut self, id: ObjId) {
        let Some(obj) = self.objects.get(id) else {
            return;
        };
        if !obj.is_complete() {
            return;
        }
        let notices: Vec<(SegmentId, CommitNotice)> = obj
            .replicas
            .iter()
            .filter(|r| r.state == RepState::Ready)
            .map(|r| {
                (
                    r.segment,
                    CommitNotice {
                        replica: r.id,
                        hard_pin: obj.hard_pin,
                        soft_pin: obj.soft_pin,
                    },
                )
            })
            .collect();
        for (sid, notice) in notices {
            if let Some(node) = self.cluster.segments.get(&sid).map(|s| s.node) {
                self.cluster.queue_commit(node, notice);
            }
        }
    }

    /// Removes a replica from its object's list (nothing else).
    pub(crate) fn take_replica(&mut self, id: ObjId, replica: ReplicaId) -> Option<Replica> {
        let obj = self.objects.get_mut(id)?;
        let pos = obj.replicas.iter().position(|r| r.id == replica)?;
        Some(obj.replicas.remove(pos))
    }

    /// An object left with only Filling replicas (or none) can serve nobody: it is gone.
    pub(crate) fn drop_if_unreadable(&mut self, id: ObjId) {
        if self.objects.get(id).is_some_and(|o| !o.has_readable()) {
            self.drop_object(id);
        }
    }
}

#[cfg(test)]
mod slab_tests {
    use super::*;

    fn object(key: &str) -> Object {
        Object {
            key: key.as_bytes().to_vec(),
            len: 1,
            checksum: 0,
            state: State::Complete,
            writer: None,
            replicas: Vec::new(),
            lease_until: Duration::ZERO,
            soft_pin_until: None,
            soft_pin: false,
            hard_pin: false,
            access_seq: 0,
            last_access: 0,
            reads: 0,
            nvme_hits: 0,
        }
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_its_previous_objects_id() {
        let mut t = ObjectTable::default();
        let a = t.insert(object("a"));
        assert_ne!(a, 0, "no id is 0");
        assert_eq!(t.remove(a).map(|o| o.key), Some(b"a".to_vec()));
        let b = t.insert(object("b"));
        assert_eq!(a & 0xffff_ffff, b & 0xffff_ffff, "the freed slot is reused");
        assert_ne!(a, b);
        assert!(
            t.get(a).is_none() && t.remove(a).is_none(),
            "a's id is stale"
        );
        assert_eq!(t.lookup(b"b").map(|(id, _)| id), Some(b));
        assert_eq!(t.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![b]);
        assert_eq!(t.complete_count(), 1);
    }
}
