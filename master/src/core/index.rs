//! What the location index says of each key: the core decides, the server writes it into
//! shared memory (`kvpool_transport::shm::index`) before it releases the core's lock.
//!
//! Every change to an object passes through the object table, which records it while an
//! index is kept ([`super::objects::Change`]); after each locked step the server takes the
//! entries of the objects changed and writes them. So the index never says more than the
//! map: a removed key's entry goes before the remove is answered, and a replica's entry is
//! rewritten before its range can be handed out again.

use kvpool_proto::Tier;
use kvpool_transport::shm::index::{key_hash, Entry};

use super::objects::{Change, Object};
use super::puts::describe_on;
use super::MasterCore;

impl MasterCore {
    /// Records object changes from now on, for [`MasterCore::take_index_updates`].
    pub fn track_index(&mut self) {
        self.objects.track_changes();
    }

    /// The entries of the keys whose objects changed since the last call, in order: each
    /// key's hash, and its entry now (`None`: withdrawn).
    pub fn take_index_updates(&mut self) -> Vec<(u128, Option<Entry>)> {
        let changes = self.objects.take_changes();
        changes
            .into_iter()
            .filter_map(|c| match c {
                Change::Gone(hash) => Some((hash, None)),
                // Gone since: its removal follows in the list.
                Change::Object(id) => {
                    let obj = self.objects.get(id)?;
                    Some((key_hash(&obj.key), self.index_entry(obj)))
                }
            })
            .collect()
    }

    /// What the index says of `obj`: a committed object's first readable DRAM replica, else,
    /// when reads move nothing (promotion off), its first readable NVMe one; else nothing.
    /// With promotion on an NVMe replica is left out: a reader served by the index would
    /// never count towards a promotion.
    pub(super) fn index_entry(&self, obj: &Object) -> Option<Entry> {
        if !obj.visible() {
            return None;
        }
        let tiers: &[Tier] = if self.cfg.promotes() {
            &[Tier::Dram]
        } else {
            &[Tier::Dram, Tier::Nvme]
        };
        tiers.iter().find_map(|&tier| {
            obj.replicas
                .iter()
                .filter(|r| r.readable())
                .find_map(|r| {
                    let (seg, node) = self.cluster.placed(r.segment)?;
                    (seg.tier == tier).then(|| describe_on(r, seg, node, obj.key.len(), obj.len))
                })
                .map(|d| Entry::of(&d, obj.checksum))
        })
    }
}
