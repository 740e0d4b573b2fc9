//! Draining a node: sole copies move to other nodes before the node lets them go.

use kvpool_proto::*;

use super::{code, hard_pinned, replicated, secs, World, MIB};

/// Reports every move task delivered so far as done (or failed) by its node.
fn finish_moves(w: &mut World, ok: bool) -> usize {
    // Heartbeats collect the tasks issued since the last ones.
    w.heartbeat(1, 0);
    w.heartbeat(2, 0);
    let tasks: Vec<CopyTask> = std::mem::take(&mut w.inbox);
    let n = tasks.len();
    for t in tasks {
        assert!(
            t.from_addr.is_some(),
            "a drain's copy names its source node"
        );
        let node = w
            .core
            .status(w.now)
            .nodes
            .iter()
            .find(|n| n.segments.iter().any(|s| s.id == t.to))
            .map(|n| n.id.0)
            .expect("the target's node");
        let result = if ok {
            Ok(())
        } else {
            Err(WireError::new(ErrorCode::Io, "source unreachable"))
        };
        w.report(node, 0, vec![TaskDone { id: t.id, result }], Vec::new());
    }
    n
}

#[test]
fn a_draining_node_moves_its_sole_copies_away_before_it_empties() {
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
    let held = on_2[0].clone();
    w.get(&held).unwrap(); // a reader holds one of node 2's objects

    // When node 2 is drained: the copy with a twin goes at once, sole copies are moved.
    let left = w.drain(2, false).unwrap();
    assert_eq!(left as usize, on_2.len(), "sole copies stay until moved");
    assert_eq!(w.get("both").unwrap().replicas.len(), 1);
    w.pass(secs(1)); // heartbeats deliver the moves to node 1
    assert_eq!(w.inbox.len(), on_2.len(), "one move per sole copy");
    for k in &on_2 {
        assert!(w.exists(k), "{k} stays readable while it moves");
    }
    // New puts avoid the draining node.
    for i in 0..4 {
        assert_eq!(w.put(&format!("new{i}"), MIB)[0].node, NodeId(1));
    }

    // Then once node 1 reports the copies, node 2 lets go of all but the leased one...
    assert_eq!(finish_moves(&mut w, true), on_2.len());
    w.core.tick(w.now);
    assert_eq!(w.drain(2, false).unwrap(), 1);
    for k in &on_2[1..] {
        let info = w.get(k).unwrap();
        assert_eq!(info.replicas.len(), 1);
        assert_eq!(info.replicas[0].node, NodeId(1), "{k} now lives on node 1");
    }
    assert_eq!(
        w.get(&held).unwrap().replicas.len(),
        2,
        "the leased copy waits"
    );
    // ...and that one once its lease ends (the gets above lease node 1's copies only).
    w.pass(secs(11));
    assert_eq!(w.drain(2, false).unwrap(), 0);
    assert_eq!(w.used(20), 0);

    // Cancelling takes it back into placement; an unknown node is refused.
    w.drain(2, true).unwrap();
    assert!(!w.core.status(w.now).nodes.iter().any(|n| n.draining));
    let e = w.drain(9, false).unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownNode);
}

#[test]
fn a_failed_move_is_tried_again() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let d = w.put_with("k", MIB, super::preferring(2));
    assert_eq!(d[0].node, NodeId(2));
    w.drain(2, false).unwrap();
    w.pass(secs(1));
    assert_eq!(finish_moves(&mut w, false), 1);
    assert_eq!(w.used(10), 0, "the failed copy's range is free again");
    assert!(w.exists("k"), "the sole copy is still there");
    w.pass(secs(1));
    assert_eq!(finish_moves(&mut w, true), 1, "a new move was issued");
    w.pass(secs(1));
    assert_eq!(w.drain(2, false).unwrap(), 0);
    assert_eq!(w.get("k").unwrap().replicas[0].node, NodeId(1));
}

#[test]
fn without_room_elsewhere_plain_sole_copies_drop_but_pinned_ones_wait() {
    let mut w = World::new();
    w.node(1, &[(10, 4 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    // Below the eviction watermark (90 %), with less than 1 MiB free.
    w.put_with("fill", 3 * MIB + MIB / 2, super::preferring(1));
    w.put_with("plain", MIB, super::preferring(2));
    w.put_with(
        "pinned",
        MIB,
        PutOptions {
            preferred_nodes: vec![NodeId(2)],
            ..hard_pinned()
        },
    );
    // Node 1 is full and a drain does not evict to make room.
    w.drain(2, false).unwrap();
    w.pass(secs(1));
    assert!(w.inbox.is_empty());
    assert_eq!(
        code(w.get("plain")),
        ErrorCode::NotFound,
        "a cache may drop it"
    );
    assert!(
        w.exists("pinned"),
        "the last copy of a pinned object is never freed"
    );
    assert!(w.exists("fill"));
    assert_eq!(w.drain(2, false).unwrap(), 1);

    // Once room appears, the pinned copy moves and the node empties.
    w.remove("fill", true).unwrap();
    w.pass(secs(1));
    assert_eq!(finish_moves(&mut w, true), 1);
    w.pass(secs(1));
    assert_eq!(w.drain(2, false).unwrap(), 0);
    assert_eq!(code(w.remove("pinned", false)), ErrorCode::Pinned);
}

#[test]
fn a_sole_copy_moves_to_nvme_when_no_dram_has_room() {
    // No write-through: the inbox holds the move alone.
    let mut w = World::with(crate::core::CoreConfig {
        nvme_admission: crate::core::Admission::AfterRead,
        ..Default::default()
    });
    w.register_tiered(
        1,
        &[(10, 4 * MIB, Tier::Dram), (11, 64 * MIB, Tier::Nvme)],
        Vec::new(),
    );
    w.node(2, &[(20, 64 * MIB)]);
    w.put_with("fill", 3 * MIB + MIB / 2, super::preferring(1));
    w.put_with("k", MIB, super::preferring(2));
    w.drain(2, false).unwrap();
    w.pass(secs(1));
    assert_eq!(w.inbox.len(), 1);
    assert_eq!(w.inbox[0].to, SegmentId(11), "the move lands on NVMe");
    assert_eq!(finish_moves(&mut w, true), 1);
    w.pass(secs(1));
    assert_eq!(w.drain(2, false).unwrap(), 0);
    let info = w.get("k").unwrap();
    assert_eq!(info.replicas.len(), 1);
    assert_eq!(info.replicas[0].tier, Tier::Nvme);
    assert!(w.exists("fill"), "a drain evicts nothing to make room");
}
