//! Failover keeps the contract: commits and pins reach the nodes' inventories (commit
//! notices, sequenced with frees), and a new master rebuilds pins from them and refuses puts
//! the nodes know were never committed.

use kvpool_proto::*;

use super::{code, hard_pinned, soft_pinned, World, MIB};

/// An entry for `key` at `slot` (4 KiB slots) of DRAM segment `segment`.
fn entry(id: u64, key: &str, segment: u64, slot: u64, commit: CommitState) -> InventoryEntry {
    InventoryEntry {
        replica: ReplicaId(id),
        key: key.as_bytes().to_vec(),
        segment: SegmentId(segment),
        offset: slot * 4096,
        len: 4096,
        checksum: 7,
        commit,
    }
}

fn committed(hard_pin: bool, soft_pin: bool) -> CommitState {
    CommitState::Committed { hard_pin, soft_pin }
}

#[test]
fn a_commit_is_announced_to_every_replica_node_in_sequence_with_frees() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let p = w.put_with("p", 4096, hard_pinned());
    let q = w.put("q", 4096);

    let r = w.heartbeat(1, 0);
    assert_eq!(
        r.commits,
        [
            CommitNotice {
                replica: p[0].id,
                hard_pin: true,
                soft_pin: false
            },
            CommitNotice {
                replica: q[0].id,
                hard_pin: false,
                soft_pin: false
            },
        ]
    );
    assert!(r.frees.is_empty() && !r.more);

    // Unacknowledged notices are sent again; acknowledged ones never.
    assert_eq!(w.heartbeat(1, 0).commits.len(), 2);
    w.remove("q", false).unwrap();
    let r2 = w.heartbeat(1, r.frees_upto);
    assert!(r2.commits.is_empty(), "acknowledged commits are not resent");
    assert_eq!(r2.frees, [q[0].id]);
    assert!(r2.frees_upto > r.frees_upto);
    let r3 = w.heartbeat(1, r2.frees_upto);
    assert!(r3.frees.is_empty() && r3.commits.is_empty());
}

#[test]
fn a_revoked_put_is_never_announced() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w
        .start_with(super::A, "r", 4096, PutOptions::default())
        .unwrap();
    w.revoke(super::A, "r").unwrap();
    let r = w.heartbeat(1, 0);
    assert!(r.commits.is_empty());
    assert_eq!(r.frees, [d[0].id]);
}

#[test]
fn a_new_master_restores_pins_and_refuses_never_committed_puts() {
    let mut w = World::new();
    let inv = vec![
        entry(101, "pinned", 10, 0, committed(true, false)),
        entry(102, "soft", 10, 1, committed(false, true)),
        entry(103, "abandoned", 10, 2, CommitState::Abandoned),
        entry(104, "unconfirmed", 10, 3, CommitState::Unconfirmed),
        entry(105, "plain", 10, 4, committed(false, false)),
    ];
    let r = w.register_tiered(1, &[(10, 64 * MIB, Tier::Dram)], inv);

    assert_eq!(
        r.rejected,
        [ReplicaId(103)],
        "the never-committed put is refused"
    );
    assert!(!w.exists("abandoned"));
    assert_eq!(w.used(10), 4 * 4096, "its range is free");
    for k in ["pinned", "soft", "unconfirmed", "plain"] {
        assert!(w.exists(k), "{k} is back");
    }
    assert_eq!(code(w.remove("pinned", false)), ErrorCode::Pinned);
    let soft = w.core.objects.lookup(b"soft").unwrap().1;
    assert!(soft.soft_pin && soft.soft_pinned(w.now));
    let plain = w.core.objects.lookup(b"plain").unwrap().1;
    assert!(!plain.soft_pin && !plain.hard_pin);

    // The unconfirmed entry is committed from now on, and the node is told so.
    let hb = w.heartbeat(1, 0);
    assert_eq!(
        hb.commits,
        [CommitNotice {
            replica: ReplicaId(104),
            hard_pin: false,
            soft_pin: false
        }]
    );
    assert_eq!(
        hb.frees,
        [ReplicaId(103)],
        "the node forgets the refused entry"
    );
}

#[test]
fn a_pin_reported_by_any_replica_pins_the_object() {
    let mut w = World::new();
    w.register_tiered(
        1,
        &[(10, 64 * MIB, Tier::Dram)],
        vec![entry(201, "k", 10, 0, CommitState::Unconfirmed)],
    );
    w.register_tiered(
        2,
        &[(20, 64 * MIB, Tier::Dram)],
        vec![entry(202, "k", 20, 0, committed(true, false))],
    );
    assert_eq!(w.core.objects.lookup(b"k").unwrap().1.replicas.len(), 2);
    assert_eq!(code(w.remove("k", false)), ErrorCode::Pinned);
    // Neither replica is an eviction candidate any more (the invariants check at the end
    // of the test verifies the recency orders agree).
    assert!(w.core.objects.lookup(b"k").unwrap().1.hard_pin);
}

#[test]
fn soft_pins_come_back_too() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.put_with("s", 4096, soft_pinned());
    let hb = w.heartbeat(1, 0);
    assert!(hb.commits[0].soft_pin && hb.commits[0].replica == d[0].id);
}
