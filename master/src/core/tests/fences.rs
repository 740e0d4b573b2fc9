//! Removes are fenced: a removed object never comes back from an inventory, whichever way its
//! free was lost (a new master, a node declared dead and back, a node restarted on its disk).

use std::time::Duration;

use kvpool_proto::*;

use super::{code, inventory_entry, secs, World, MIB};
use crate::core::CoreConfig;

const SEG: &[(u64, u64, Tier)] = &[(10, 64 * MIB, Tier::Dram)];

/// `key`'s replicas as the node would report them.
fn reported(d: &[ReplicaDesc], key: &str, len: u64) -> Vec<InventoryEntry> {
    d.iter()
        .map(|r| inventory_entry(r, key, len as u32))
        .collect()
}

#[test]
fn a_node_declared_dead_and_back_does_not_bring_a_removed_object_back() {
    let mut w = World::new();
    w.register_tiered(1, SEG, Vec::new());
    let d = w.put("k", 4096);
    let keep = w.put("live", 4096);
    w.remove("k", false).unwrap();
    // The node never acknowledges the free: it stalls past node-ttl and is declared dead,
    // which drops its free queue.
    w.pass_with(secs(15), &[]);
    assert!(
        !w.exists("live"),
        "the dead node's objects are gone meanwhile"
    );

    let mut inv = reported(&d, "k", 4096);
    inv.extend(reported(&keep, "live", 4096));
    let r = w.register_tiered(1, SEG, inv);
    assert_eq!(
        r.rejected,
        [d[0].id],
        "the removed object's replica is refused"
    );
    assert!(!w.exists("k"));
    assert!(w.exists("live"), "what was not removed comes back");
}

#[test]
fn a_remove_answered_not_found_fences_too() {
    // The object's only node is declared dead: a remove answers NotFound, which a client
    // takes as "gone"; the node coming back must not make it a lie.
    let mut w = World::new();
    w.register_tiered(1, SEG, Vec::new());
    let d = w.put("k", 4096);
    w.pass_with(secs(15), &[]);
    assert_eq!(code(w.remove("k", false)), ErrorCode::NotFound);
    let r = w.register_tiered(1, SEG, reported(&d, "k", 4096));
    assert_eq!(r.rejected, [d[0].id]);
    assert!(!w.exists("k"));
}

#[test]
fn a_remove_that_finds_a_put_in_progress_does_not_fence_it() {
    let mut w = World::new();
    w.register_tiered(1, SEG, Vec::new());
    let d = w
        .start_with(super::A, "k", 4096, PutOptions::default())
        .unwrap();
    assert_eq!(code(w.remove("k", false)), ErrorCode::NotFound);
    assert!(w.core.take_unsaved_fences().is_empty());
    w.end(super::A, "k").unwrap();
    // A restarted master rebuilds from the node: the put that was acknowledged is admitted.
    let mut next = World::new();
    let r = next.register_tiered(1, SEG, reported(&d, "k", 4096));
    assert!(r.rejected.is_empty());
    assert!(next.exists("k"));
}

#[test]
fn a_new_master_given_the_fences_refuses_removed_replicas_and_admits_later_puts() {
    let mut old = World::new();
    old.register_tiered(1, SEG, Vec::new());
    let gone = old.put_with("k", 4096, super::replicated(1));
    let kept = old.put("other", 4096);
    old.remove("k", false).unwrap();
    assert_eq!(old.remove_regex("^nothing$", None, false).unwrap(), 0);
    let fences = old.core.take_unsaved_fences();
    assert_eq!(fences.len(), 1);
    assert_eq!(fences[0].0, b"k");
    assert!(fences[0].1 >= gone[0].id.0);

    // The new leader: an id base below the old one (a clock behind) must not matter.
    let mut new = World::new();
    new.core.load_fences(new.now, fences);
    let mut inv = reported(&gone, "k", 4096);
    inv.extend(reported(&kept, "other", 4096));
    let r = new.register_tiered(1, SEG, inv);
    assert_eq!(r.rejected, [gone[0].id]);
    assert!(!new.exists("k") && new.exists("other"));

    // The key put again under the new leader gets larger ids: it is never fenced.
    let again = new.put("k", 4096);
    assert!(again[0].id.0 > gone[0].id.0);
    let mut later = World::new();
    later
        .core
        .load_fences(later.now, vec![(b"k".to_vec(), gone[0].id.0)]);
    let r = later.register_tiered(1, SEG, reported(&again, "k", 4096));
    assert!(r.rejected.is_empty());
    assert!(later.exists("k"));
}

#[test]
fn remove_all_and_regex_fence_every_key_they_remove() {
    let mut w = World::new();
    w.register_tiered(1, SEG, Vec::new());
    let a = w.put("t/a", 4096);
    let b = w.put("t/b", 4096);
    assert_eq!(w.remove_regex("a$", Some("t/"), false).unwrap(), 1);
    let mut keys: Vec<Vec<u8>> = w
        .core
        .take_unsaved_fences()
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(keys, [b"t/a".to_vec()]);
    w.core.remove_all(
        w.now,
        RemoveAll {
            prefix: None,
            force: false,
        },
    );
    keys = w
        .core
        .take_unsaved_fences()
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(keys, [b"t/b".to_vec()]);
    w.pass_with(secs(15), &[]);
    let mut inv = reported(&a, "t/a", 4096);
    inv.extend(reported(&b, "t/b", 4096));
    let r = w.register_tiered(1, SEG, inv);
    assert_eq!(r.rejected.len(), 2);
}

#[test]
fn fences_lapse_after_their_ttl() {
    let mut w = World::with(CoreConfig {
        remove_fence_ttl: Duration::from_secs(5),
        ..CoreConfig::default()
    });
    w.register_tiered(1, SEG, Vec::new());
    w.put("k", 4096);
    w.remove("k", false).unwrap();
    assert_eq!(w.core.fence_count(), 1);
    w.pass(secs(4));
    assert_eq!(w.core.fence_count(), 1);
    w.pass(secs(2));
    assert_eq!(w.core.fence_count(), 0);
}
