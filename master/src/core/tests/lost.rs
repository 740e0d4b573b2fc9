//! Lost replicas: a node that finds a replica's bytes corrupt drops them and says so in its
//! next heartbeat; the master forgets the replica at once, so lookups stop counting it.

use kvpool_proto::*;

use super::{hard_pinned, preferring, replicated, World, MIB};

#[test]
fn a_lost_replica_is_forgotten_and_the_other_copy_serves() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let d = w.put_with("k", 4096, replicated(2));
    let on1 = d.iter().find(|r| r.node == NodeId(1)).unwrap().id;
    let used = w.used(10);
    assert!(used > 0);

    w.lose(1, &[on1]);

    let info = w.get("k").unwrap();
    assert_eq!(
        info.replicas.len(),
        1,
        "only the healthy copy is handed out"
    );
    assert_eq!(info.replicas[0].node, NodeId(2));
    assert_eq!(w.used(10), 0, "the lost range is free again");
    assert_eq!(w.core.lost_replicas(), 1);
}

#[test]
fn a_lost_sole_copy_is_a_miss_even_when_pinned_and_leased() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.put_with("pinned", 4096, hard_pinned());
    w.get("pinned").unwrap(); // holds a read lease
    assert!(w.exists("pinned"));

    w.lose(1, &[d[0].id]);

    assert!(
        !w.exists("pinned"),
        "the bytes are gone: a pin cannot keep them"
    );
    assert_eq!(w.get("pinned").unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(w.core.status(w.now).objects, 0);
}

#[test]
fn only_the_holding_node_can_report_a_replica_lost() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let d = w.put_with("k", 4096, preferring(1));
    assert_eq!(d[0].node, NodeId(1));

    // Another node, an unknown id and an unregistered node change nothing.
    w.lose(2, &[d[0].id]);
    w.lose(1, &[ReplicaId(424_242)]);
    w.lose(9, &[d[0].id]);

    assert_eq!(w.get("k").unwrap().replicas.len(), 1);
    assert_eq!(w.core.lost_replicas(), 0);
}
