//! Membership: node death, (re-)registration with inventories, segment ownership, frees
//! delivered through heartbeats, and the status report.

use kvpool_proto::*;

use super::{code, ids, inventory_entry, preferring, replicated, secs, World, A, MIB};

// ------------------------------------------------------------------ liveness

#[test]
fn a_silent_node_dies_and_takes_its_only_replicas_with_it() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let two = replicated(2);
    w.put_with("both", 100, two);
    let only2 = preferring(2);
    w.put_with("only-on-2", 100, only2.clone());
    w.start_with(A, "writing-on-2", 100, only2).unwrap();

    w.pass_with(secs(9), &[1]);
    assert!(w.exists("only-on-2"), "9 s of silence is not death");
    w.pass_with(secs(1), &[1]);

    assert!(!w.exists("only-on-2"));
    assert_eq!(
        code(w.end(A, "writing-on-2")),
        ErrorCode::NotFound,
        "its put in progress is dropped"
    );
    let info = w.get("both").unwrap();
    assert_eq!(info.replicas.len(), 1);
    assert_eq!(info.replicas[0].node, NodeId(1));
    assert!(w.heartbeat(2, 0).need_register);
    let st = w.core.status(w.now);
    assert_eq!(st.nodes.len(), 1);
    assert_eq!(st.processing, 0);
}

// ------------------------------------------------------------------ registration and inventories

#[test]
fn a_restarted_master_rebuilds_from_inventories() {
    // Given a cluster with objects.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let two = replicated(2);
    let mut inventory: Vec<(u64, InventoryEntry)> = Vec::new();
    for i in 0..20 {
        let key = format!("k{i}");
        let d = w.put_with(
            &key,
            1000 + i,
            if i % 2 == 0 {
                two.clone()
            } else {
                PutOptions::default()
            },
        );
        for r in d {
            inventory.push((r.node.0, inventory_entry(&r, &key, (1000 + i) as u32)));
        }
    }
    let used_before = (w.used(10), w.used(20));

    // When a fresh master hears the nodes re-register.
    let mut m = World::new();
    let of = |n: u64| {
        inventory
            .iter()
            .filter(|(node, _)| *node == n)
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>()
    };
    assert!(m.register(1, &[(10, 64 * MIB)], of(1)).rejected.is_empty());
    assert!(m.register(2, &[(20, 64 * MIB)], of(2)).rejected.is_empty());

    // Then every object is back, with all its replicas, and no space is double-booked.
    for i in 0..20 {
        let info = m.get(&format!("k{i}")).unwrap();
        assert_eq!(info.len, 1000 + i);
        assert_eq!(info.replicas.len(), if i % 2 == 0 { 2 } else { 1 });
    }
    // The restored objects keep their bytes; new puts land in the gaps.
    assert!(m.used(10) <= used_before.0 && m.used(20) <= used_before.1);
    for i in 0..20 {
        m.put(&format!("new{i}"), 5000);
    }
}

#[test]
fn inventory_overlaps_conflicts_and_unknown_segments_are_rejected() {
    let mut w = World::new();
    w.node(2, &[(20, 64 * MIB)]);
    w.put("shared", 100);
    let e = |id: u64, key: &str, seg: u64, offset: u64, len: u64, checksum: u32| InventoryEntry {
        replica: ReplicaId(id),
        key: key.as_bytes().to_vec(),
        segment: SegmentId(seg),
        offset,
        len,
        checksum,
        commit: CommitState::Unconfirmed,
    };
    let inv = vec![
        e(1, "a", 10, 0, 1000, 1),
        e(2, "b", 10, 512, 1000, 2),          // overlaps "a"
        e(3, "c", 99, 0, 1000, 3),            // unknown segment
        e(4, "shared", 10, 4096, 50, 9),      // conflicts with the committed "shared"
        e(5, "shared", 10, 8192, 100, 100),   // an extra replica of "shared"
        e(6, "a", 10, 16384, 999, 1),         // conflicts with entry 1
        e(7, "", 10, 32768, 10, 0),           // bad key
        e(8, "d", 10, 65, 10, 0),             // misaligned
        e(9, "e", 10, 64 * MIB - 64, 128, 0), // past the end
    ];
    let r = w.register(1, &[(10, 64 * MIB)], inv);
    assert_eq!(r.rejected, [2, 3, 4, 6, 7, 8, 9].map(ReplicaId).to_vec());
    assert_eq!(r.heartbeat_ms, 1000);
    assert_eq!(w.get("a").unwrap().replicas.len(), 1);
    assert_eq!(w.get("shared").unwrap().replicas.len(), 2);
    assert_eq!(w.used(10), 1024 + 128);
    let frees = w.heartbeat(1, 0).frees;
    assert_eq!(
        frees, r.rejected,
        "rejected entries are also queued as frees"
    );
}

#[test]
fn re_registration_replaces_the_old_registration() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.put("kept", 100);
    w.put("lost", 100);
    w.start(A, "writing", 100).unwrap();
    // The node restarted and kept only "kept"; it also brings a new segment.
    let inv = vec![InventoryEntry {
        replica: d[0].id,
        key: b"kept".to_vec(),
        segment: SegmentId(10),
        offset: d[0].offset,
        len: 100,
        checksum: 100,
        commit: CommitState::Unconfirmed,
    }];
    let r = w.register(1, &[(10, 64 * MIB), (11, 64 * MIB)], inv);
    assert!(r.rejected.is_empty());
    assert!(w.exists("kept"));
    assert!(!w.exists("lost"));
    assert_eq!(code(w.end(A, "writing")), ErrorCode::NotFound);
    assert_eq!(w.core.status(w.now).nodes[0].segments.len(), 2);
    assert_eq!(w.core.status(w.now).processing, 0);
}

#[test]
fn a_segment_id_owned_by_another_node_is_refused() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(10, 64 * MIB), (20, 64 * MIB)]);
    let st = w.core.status(w.now);
    assert_eq!(st.nodes[0].segments.len(), 1);
    assert_eq!(
        st.nodes[1]
            .segments
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        vec![SegmentId(20)]
    );
}

// ------------------------------------------------------------------ heartbeats and status

#[test]
fn frees_reach_the_node_through_heartbeats_until_acked() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    assert!(w.heartbeat(7, 0).need_register, "unknown node");
    let a = w.put("a", 100);
    let b = w.put("b", 100);
    let hb = w.heartbeat(1, 0);
    assert!(!hb.need_register && hb.frees.is_empty());

    w.remove("a", false).unwrap();
    let hb1 = w.heartbeat(1, hb.frees_upto);
    assert_eq!(hb1.frees, ids(&a));
    // Not acked yet: sent again.
    let again = w.heartbeat(1, hb.frees_upto);
    assert_eq!(again, hb1);

    w.remove("b", false).unwrap();
    let hb2 = w.heartbeat(1, hb1.frees_upto);
    assert_eq!(hb2.frees, ids(&b), "acked frees are dropped");
    assert!(hb2.frees_upto > hb1.frees_upto);
    let hb3 = w.heartbeat(1, hb2.frees_upto);
    assert!(hb3.frees.is_empty());
    assert_eq!(hb3.frees_upto, hb2.frees_upto);
}

#[test]
fn status_reports_nodes_segments_and_counts() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("a", 100);
    w.start(A, "b", 100).unwrap();
    w.now += secs(3);
    let st = w.core.status(w.now);
    assert_eq!((st.objects, st.processing, st.evictions), (1, 1, 0));
    let n = &st.nodes[0];
    assert_eq!(
        (n.id, n.name.as_str(), n.addr.as_str(), n.alive, n.silent_ms),
        (NodeId(1), "node-1", "10.0.0.1:9000", true, 3000)
    );
    assert_eq!(
        n.segments[0],
        SegmentStatus {
            id: SegmentId(10),
            tier: kvpool_proto::Tier::Dram,
            capacity: 64 * MIB,
            used: 256,
            objects: 2,
            healthy: true,
        }
    );
}

// ------------------------------------------------------------------ leaving

#[test]
fn a_leaving_node_is_dropped_at_once_like_a_dead_one() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    w.put_with("both", 100, replicated(2));
    w.put_with("only-on-2", 100, preferring(2));
    w.put_with("leased-on-2", 100, preferring(2));
    w.get("leased-on-2").unwrap();
    w.start_with(A, "writing-on-2", 100, preferring(2)).unwrap();

    w.leave(2).unwrap();

    // No TTL to wait out: its sole replicas are misses now, leased or not.
    assert_eq!(code(w.get("only-on-2")), ErrorCode::NotFound);
    assert!(!w.exists("leased-on-2"));
    assert_eq!(code(w.end(A, "writing-on-2")), ErrorCode::NotFound);
    let info = w.get("both").unwrap();
    assert_eq!(info.replicas.len(), 1);
    assert_eq!(info.replicas[0].node, NodeId(1));
    let st = w.core.status(w.now);
    assert_eq!(st.nodes.len(), 1);
    assert_eq!((st.objects, st.processing), (1, 0));
    // New puts go to the nodes left.
    assert_eq!(w.put("after", 100)[0].node, NodeId(1));
    // The node is forgotten: a late heartbeat is told to register, and a second Leave (or
    // one from a node never seen) is UnknownNode.
    assert!(w.heartbeat(2, 0).need_register);
    assert_eq!(code(w.leave(2)), ErrorCode::UnknownNode);
    assert_eq!(code(w.leave(9)), ErrorCode::UnknownNode);
}
