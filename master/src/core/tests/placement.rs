//! Placement: distinct nodes then segments, preferred nodes, and nodes past their TTL.

use kvpool_proto::*;

use super::{preferring, replicated, secs, World, A, MIB};

#[test]
fn replicas_go_to_distinct_nodes_then_distinct_segments() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB), (11, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    w.node(3, &[(30, 64 * MIB)]);
    let three = replicated(3);
    for i in 0..10 {
        let d = w.put_with(&format!("k{i}"), 1000, three.clone());
        let mut nodes: Vec<_> = d.iter().map(|r| r.node).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), 3, "three distinct nodes");
    }
    let four = replicated(4);
    let d = w.put_with("four", 1000, four);
    let mut segs: Vec<_> = d.iter().map(|r| r.segment).collect();
    segs.sort();
    segs.dedup();
    assert_eq!(segs.len(), 4, "four distinct segments over three nodes");
    let ten = replicated(10);
    assert_eq!(
        w.put_with("ten", 1000, ten).len(),
        4,
        "best effort: one per segment"
    );
}

#[test]
fn preferred_nodes_come_first_and_others_rotate() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    w.node(3, &[(30, 64 * MIB)]);
    for i in 0..6 {
        let opts = preferring(3);
        let d = w.put_with(&format!("p{i}"), 1000, opts);
        assert_eq!(d[0].node, NodeId(3));
    }
    let mut firsts = std::collections::HashSet::new();
    for i in 0..6 {
        firsts.insert(w.put(&format!("r{i}"), 1000)[0].segment);
    }
    assert_eq!(
        firsts.len(),
        3,
        "without a preference, puts spread over all segments"
    );
}

#[test]
fn placement_skips_nodes_past_their_ttl() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    // Node 2 goes silent; before any tick notices, placement already avoids it.
    w.now += secs(5);
    w.heartbeat(1, 0);
    w.now += secs(6);
    w.heartbeat(1, 0);
    for i in 0..4 {
        assert_eq!(
            w.start(A, &format!("k{i}"), 100).unwrap()[0].node,
            NodeId(1)
        );
    }
}
