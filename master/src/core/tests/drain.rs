//! Draining a node.

use kvpool_proto::*;

use super::{code, replicated, secs, World, MIB};

#[test]
fn a_draining_node_gets_no_new_data_and_is_emptied_except_what_readers_hold() {
    // Given two nodes and objects with one replica on each node, and one with two replicas.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    for i in 0..8 {
        w.put(&format!("k{i}"), MIB);
    }
    w.put_with("both", MIB, replicated(2));
    let on_2: Vec<String> = (0..8)
        .map(|i| format!("k{i}"))
        .filter(|k| w.get(k).unwrap().replicas[0].node == NodeId(2))
        .collect();
    assert!(!on_2.is_empty());
    w.pass(secs(11)); // the gets' leases end
                      // A reader holds one of node 2's objects.
    let held = on_2[0].clone();
    w.get(&held).unwrap();
    // When node 2 is drained.
    let left = w.drain(2, false).unwrap();
    // Then only the leased replica is left, node 2 shows as draining, and new puts avoid it.
    assert_eq!(left, 1);
    let st = w.core.status(w.now);
    assert!(st.nodes.iter().any(|n| n.id == NodeId(2) && n.draining));
    assert_eq!(
        w.get("both").unwrap().replicas.len(),
        1,
        "the copy elsewhere survives"
    );
    for k in &on_2[1..] {
        assert_eq!(code(w.get(k)), ErrorCode::NotFound);
    }
    for i in 0..8 {
        assert_eq!(w.put(&format!("new{i}"), MIB)[0].node, NodeId(1));
    }
    // And once the lease ends, the node is empty.
    w.pass(secs(11));
    w.core.tick(w.now);
    let left = w.drain(2, false).unwrap();
    assert_eq!(left, 0);
    assert_eq!(w.used(20), 0);
    // Cancelling takes it back into placement; an unknown node is refused.
    w.drain(2, true).unwrap();
    assert!(!w.core.status(w.now).nodes.iter().any(|n| n.draining));
    let e = w.drain(9, false).unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownNode);
}
