//! Remove fences: a removed object never comes back from a node's inventory (docs/reliability.md,
//! "Removes are fenced").
//!
//! A remove answered `Ok` (or `NotFound` with no object under the key at all) records a
//! fence `(key, upto)`, `upto` being the highest replica id this core has handed out. Every
//! replica of the removed object, and of any earlier object under that key, has an id at most
//! `upto`; every later put's replicas get larger ids (the core hands out increasing ids, and
//! [`MasterCore::load_fences`] raises the counter above every fence a new leader loads).
//! Registration refuses inventory entries a fence covers, whatever the node's free queue said,
//! so the four ways a free could be lost (a new leader, a node declared dead and back, a node
//! killed before it acknowledged, an index delete that failed) all end at the same check.
//!
//! Fences live for `CoreConfig::remove_fence_ttl`; the server persists the new ones in etcd
//! (`kvpool_ha::fence`) before it acknowledges the remove, and hands the stored ones to the
//! core of each new term.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use kvpool_proto::ReplicaId;

use super::MasterCore;

#[derive(Debug, Default)]
pub(crate) struct Fences {
    /// Per key: replicas with ids up to this are of removed objects, and when that lapses.
    by_key: HashMap<Vec<u8>, (u64, Duration)>,
    /// Keys in the order their fences lapse (a key made again later appears again; the map
    /// says which entry is current).
    expiry: VecDeque<(Duration, Vec<u8>)>,
    /// Fences made by removes and not yet taken by the server to persist.
    unsaved: Vec<(Vec<u8>, u64)>,
}

impl Fences {
    fn insert(&mut self, key: &[u8], upto: u64, until: Duration) {
        let e = self.by_key.entry(key.to_vec()).or_insert((upto, until));
        e.0 = e.0.max(upto);
        e.1 = e.1.max(until);
        self.expiry.push_back((until, key.to_vec()));
    }

    /// Whether `replica` of `key` belongs to a removed object.
    pub(crate) fn covers(&self, key: &[u8], replica: ReplicaId) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|&(upto, _)| replica.0 <= upto)
    }

    fn expire(&mut self, now: Duration) {
        while let Some((until, _)) = self.expiry.front() {
            if *until > now {
                break;
            }
            let (_, key) = self.expiry.pop_front().expect("peeked");
            if self.by_key.get(&key).is_some_and(|&(_, u)| u <= now) {
                self.by_key.remove(&key);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

impl MasterCore {
    /// The highest replica id handed out so far.
    fn last_replica_id(&self) -> u64 {
        self.id_base.wrapping_add(self.next_replica)
    }

    /// Records that `key` was removed now: its replicas so far are fenced.
    pub(crate) fn fence_removed(&mut self, now: Duration, key: &[u8]) {
        let upto = self.last_replica_id();
        let until = now.saturating_add(self.cfg.remove_fence_ttl);
        self.fences.insert(key, upto, until);
        self.fences.unsaved.push((key.to_vec(), upto));
    }

    /// A remove of `key` found nothing: fenced too when the master has no object at all under
    /// it (the object's last replica went with a node declared dead, which may come back), but
    /// not while a put of it is in progress or its only copy is being filled: that object is
    /// live, and a fence would refuse it on the next rebuild.
    pub(crate) fn fence_absent(&mut self, now: Duration, key: &[u8]) {
        if self.objects.lookup(key).is_none() {
            self.fence_removed(now, key);
        }
    }

    /// The fences removes made since the last call, for the server to persist before it
    /// answers those removes.
    pub fn take_unsaved_fences(&mut self) -> Vec<(Vec<u8>, u64)> {
        std::mem::take(&mut self.fences.unsaved)
    }

    /// Installs fences persisted by earlier leaders (a new term, before any node registers),
    /// and raises the replica id counter above them so that no new replica is ever covered.
    pub fn load_fences(&mut self, now: Duration, fences: Vec<(Vec<u8>, u64)>) {
        // etcd drops a fence up to one lease reuse after its TTL; in memory it restarts now,
        // so it lives at least as long as it would have under the old leader.
        let until = now.saturating_add(self.cfg.remove_fence_ttl);
        for (key, upto) in fences {
            if upto >= self.id_base {
                self.next_replica = self.next_replica.max(upto - self.id_base);
            }
            self.fences.insert(&key, upto, until);
        }
    }

    /// Whether an inventory entry is a replica of a removed object.
    pub(crate) fn fenced(&self, key: &[u8], replica: ReplicaId) -> bool {
        self.fences.covers(key, replica)
    }

    /// Drops fences past their TTL (from `tick`).
    pub(crate) fn expire_fences(&mut self, now: Duration) {
        self.fences.expire(now);
    }

    /// How many keys are fenced now.
    pub fn fence_count(&self) -> usize {
        self.fences.len()
    }
}
