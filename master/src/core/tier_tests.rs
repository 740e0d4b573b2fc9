//! Scenario tests of the second tier, one per rule: demotion at the DRAM watermark, copy tasks
//! and their outcomes, NVMe watermarks, promotion, unhealthy segments, and what removal,
//! node death and master restarts do to tasks in flight.

use kvpool_proto::*;

use super::tests::{code, ids, inventory_entry, overwriting, preferring, secs, World, MIB};
use super::{Admission, CoreConfig};

/// A short lease so that a read does not keep its object from eviction past the next second.
fn cfg(nvme_admission: Admission) -> CoreConfig {
    CoreConfig {
        lease_ttl: secs(1),
        nvme_admission,
        ..CoreConfig::default()
    }
}

/// Node 1: a 10 MiB DRAM segment 10 and an NVMe segment 11.
fn tiered(w: &mut World, nvme: u64, inventory: Vec<InventoryEntry>) -> RegisterResponse {
    w.register_tiered(
        1,
        &[(10, 10 * MIB, Tier::Dram), (11, nvme, Tier::Nvme)],
        inventory,
    )
}

/// Fills DRAM segment 10 with `k{from}..k{to}` of 1 MiB each, oldest first.
fn fill(w: &mut World, keys: std::ops::Range<u64>) -> Vec<ReplicaDesc> {
    keys.flat_map(|i| w.put(&format!("k{i}"), MIB)).collect()
}

/// The bytes an NVMe record of a two-byte key and a 1 MiB value takes.
fn record() -> u64 {
    layout::record_len(2, MIB)
}

fn ok(id: u64) -> TaskDone {
    TaskDone { id, result: Ok(()) }
}

fn failed(id: u64) -> TaskDone {
    TaskDone {
        id,
        result: Err(WireError::new(ErrorCode::Io, "disk error")),
    }
}

/// An NVMe inventory entry for key `n{i}` in the `i`-th record slot of segment 11.
fn nvme_entry(i: u64) -> InventoryEntry {
    InventoryEntry {
        replica: ReplicaId(500 + i),
        key: format!("n{i}").into_bytes(),
        segment: SegmentId(11),
        offset: i * record() + layout::value_offset(2),
        len: MIB,
        checksum: 7,
        commit: CommitState::Unconfirmed,
    }
}

#[test]
fn a_read_victim_is_demoted_and_its_dram_is_freed_only_when_the_copy_is_done() {
    // Given a full DRAM segment whose coldest object was read once.
    let mut w = World::with(cfg(Admission::AfterRead));
    tiered(&mut w, 64 * MIB, Vec::new());
    let d0 = w.put("k0", MIB);
    w.get("k0").unwrap();
    fill(&mut w, 1..10);
    assert_eq!(w.used(10), 10 * MIB);

    // When the watermark pass runs.
    w.pass(secs(1));

    // Then the victim gets an NVMe record while its DRAM bytes stay, and readers still get
    // the DRAM replica only (the NVMe one is not written yet).
    assert!(w.used(11) >= record());
    assert_eq!(w.used(10), 10 * MIB);
    let info = w.get("k0").unwrap();
    assert_eq!(ids(&info.replicas), vec![d0[0].id]);
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 1);
    let t = w.inbox[0].clone();
    assert_eq!(
        (t.key.as_slice(), t.len, t.checksum),
        (&b"k0"[..], MIB, MIB as u32)
    );
    assert_eq!((t.from, t.from_offset), (SegmentId(10), d0[0].offset));
    assert_eq!((t.to, t.to_offset), (SegmentId(11), 0));

    // The bytes being demoted count as freed: later passes evict nothing else.
    w.pass(secs(3));
    assert_eq!(w.inbox.len(), 1);
    assert!((1..10).all(|i| w.exists(&format!("k{i}"))));
    assert_eq!(w.used(10), 10 * MIB);

    // When the node reports the copy done, the DRAM replica is freed and NVMe serves.
    let r = w.report(1, 0, vec![ok(t.id)], Vec::new());
    assert!(r.frees.contains(&d0[0].id));
    assert_eq!(w.used(10), 9 * MIB);
    let info = w.get("k0").unwrap();
    assert_eq!(info.replicas.len(), 1);
    let rep = &info.replicas[0];
    assert_eq!(
        (rep.id, rep.segment, rep.tier),
        (t.replica, t.to, Tier::Nvme)
    );
    assert_eq!(rep.offset, t.to_offset + layout::value_offset(2));
}

#[test]
fn write_through_copies_at_commit_and_dram_eviction_then_loses_nothing() {
    // Given write-through admission and room on NVMe for everything.
    let mut w = World::with(cfg(Admission::WriteThrough));
    tiered(&mut w, 64 * MIB, Vec::new());
    let d0 = w.put("k0", MIB);

    // Then the commit queued a copy to NVMe; the DRAM replica alone serves until it is done.
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 1);
    let t = w.inbox[0].clone();
    assert_eq!((t.from, t.from_offset), (SegmentId(10), d0[0].offset));
    assert_eq!(
        (t.to, t.to_offset, t.key.as_slice()),
        (SegmentId(11), 0, &b"k0"[..])
    );
    assert_eq!(ids(&w.get("k0").unwrap().replicas), vec![d0[0].id]);

    // While the copy is in flight, its source is not evicted: a DRAM full of such objects
    // refuses new puts (the writer slows down) instead of dropping them.
    fill(&mut w, 1..10);
    assert_eq!(w.used(10), 10 * MIB);
    w.heartbeat(1, 0);
    let copies: Vec<CopyTask> = w.inbox.drain(..).collect();
    assert_eq!(copies.len(), 10, "one copy per committed object");
    let full = w.start_with(ClientId(1), "k10", MIB, PutOptions::default());
    assert_eq!(
        code(full),
        ErrorCode::NoSpaceYet,
        "room comes when the copies end"
    );

    // When the copies are done both replicas serve; DRAM stays full (nothing was demoted).
    let done = copies.iter().map(|t| ok(t.id)).collect();
    w.report(1, 0, done, Vec::new());
    assert_eq!(w.get("k0").unwrap().replicas.len(), 2);
    assert_eq!(w.used(10), 10 * MIB);

    // And DRAM eviction (the watermark pass, then puts that need room) drops DRAM replicas
    // only: every object is still there, from NVMe, and no copy task is issued for them.
    w.pass(secs(1));
    fill(&mut w, 10..14);
    for i in 0..14 {
        assert!(w.exists(&format!("k{i}")), "k{i} lost");
    }
    // k1 is the coldest (k0 was read since).
    let tiers: Vec<Tier> = w
        .get("k1")
        .unwrap()
        .replicas
        .iter()
        .map(|r| r.tier)
        .collect();
    assert_eq!(tiers, vec![Tier::Nvme]);
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 4, "copies of k10..k13 only");
}

#[test]
fn an_unread_victim_is_dropped_after_read_and_demoted_with_always() {
    for (admission, demoted) in [(Admission::AfterRead, false), (Admission::Always, true)] {
        let mut w = World::with(cfg(admission));
        tiered(&mut w, 64 * MIB, Vec::new());
        fill(&mut w, 0..10);
        w.pass(secs(1));
        w.heartbeat(1, 0);
        assert_eq!(w.inbox.len(), usize::from(demoted), "{admission:?}");
        assert_eq!(w.exists("k0"), demoted, "{admission:?}");
        assert_eq!(w.used(11) > 0, demoted, "{admission:?}");
    }
}

#[test]
fn a_source_read_during_its_demotion_is_freed_when_the_lease_ends() {
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    fill(&mut w, 0..10);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    let t = w.inbox[0].clone();

    // Given a reader leasing the DRAM replica mid-copy.
    assert_eq!(w.get("k0").unwrap().replicas[0].tier, Tier::Dram);

    // When the copy ends, new readers go to NVMe but the DRAM range stays for the reader.
    w.report(1, 0, vec![ok(t.id)], Vec::new());
    assert_eq!(w.get("k0").unwrap().replicas[0].tier, Tier::Nvme);
    assert_eq!(w.used(10), 10 * MIB);

    // Then it is freed once the lease is over.
    w.pass(secs(2));
    assert_eq!(w.used(10), 9 * MIB);
}

#[test]
fn a_failed_or_timed_out_demotion_frees_both_replicas() {
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    let d = fill(&mut w, 0..10);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    let t0 = w.inbox[0].clone();

    // A failed copy: eviction wanted the DRAM space, so both go.
    let r = w.report(1, 0, vec![failed(t0.id)], Vec::new());
    assert!(r.frees.contains(&t0.replica) && r.frees.contains(&d[0].id));
    assert!(!w.exists("k0"));
    assert_eq!((w.used(10), w.used(11)), (9 * MIB, 0));

    // A copy never reported fails after the task timeout.
    w.put("k10", MIB);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 2);
    let t1 = w.inbox[1].clone();
    assert_eq!(t1.key, b"k1");
    w.pass(secs(61));
    assert_eq!(w.core.pending_tasks(), 0);
    assert!(!w.exists("k1"));
    assert_eq!((w.used(10), w.used(11)), (9 * MIB, 0));

    // A late report of it changes nothing.
    w.report(1, 0, vec![ok(t1.id)], Vec::new());
    assert!(!w.exists("k1"));
    assert_eq!(w.used(11), 0);
}

#[test]
fn nvme_above_its_high_watermark_drops_the_coldest_to_its_low_watermark() {
    // Given an NVMe segment 90.3 % full of nine records, n0 the most recently used.
    let mut w = World::with(cfg(Admission::Always));
    let inventory = (0..9).map(nvme_entry).collect();
    assert!(tiered(&mut w, 10 * MIB, inventory).rejected.is_empty());
    assert_eq!(w.used(11), 9 * record());
    assert!(w.exists("n0"));

    // When the watermark pass runs.
    w.pass(secs(1));

    // Then the two coldest went, bringing it under 80 %.
    assert_eq!(w.used(11), 7 * record());
    assert!(!w.exists("n1") && !w.exists("n2"));
    assert!([0, 3, 4, 5, 6, 7, 8]
        .iter()
        .all(|i| w.exists(&format!("n{i}"))));
    let frees = w.heartbeat(1, 0).frees;
    assert!(frees.contains(&ReplicaId(501)) && frees.contains(&ReplicaId(502)));
}

#[test]
fn a_victim_is_dropped_when_nvme_is_full_of_unevictable_objects() {
    // Given an NVMe segment with room for one record, holding a leased one.
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 2 * MIB, vec![nvme_entry(0)]);
    fill(&mut w, 0..10);
    let leased = w.core.exists(
        w.now,
        Exists {
            keys: vec![b"n0".to_vec()],
            lease: true,
        },
    );
    assert_eq!(leased.items, vec![Ok(true)]);

    // When the watermark pass runs, the victim is dropped.
    w.core.tick(w.now);
    w.heartbeat(1, 0);
    assert!(w.inbox.is_empty());
    assert!(!w.exists("k0") && w.exists("n0"));
    assert_eq!((w.used(10), w.used(11)), (9 * MIB, record()));

    // Once the lease is over, the next victim takes n0's place.
    w.pass(secs(1));
    w.put("k10", MIB);
    w.core.tick(w.now);
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 1);
    assert_eq!(w.inbox[0].key, b"k1");
    assert!(!w.exists("n0"));
}

#[test]
fn an_nvme_only_object_is_promoted_after_two_hits_and_dram_is_served_first() {
    let mut w = World::with(cfg(Admission::AfterRead));
    tiered(&mut w, 10 * MIB, vec![nvme_entry(0)]);

    // The first hit only counts.
    assert_eq!(w.get("n0").unwrap().replicas[0].tier, Tier::Nvme);
    w.heartbeat(1, 0);
    assert!(w.inbox.is_empty());

    // The second promotes: a DRAM replica on the same node, copied from the NVMe value.
    w.get("n0").unwrap();
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 1);
    let t = w.inbox[0].clone();
    assert_eq!(
        (t.from, t.from_offset),
        (SegmentId(11), layout::value_offset(2))
    );
    assert_eq!((t.to, t.to_offset), (SegmentId(10), 0));
    assert_eq!(w.used(10), MIB);

    // While the copy runs, readers see NVMe only and no second promotion starts.
    for _ in 0..3 {
        assert_eq!(ids(&w.get("n0").unwrap().replicas), vec![ReplicaId(500)]);
    }
    w.heartbeat(1, 0);
    assert_eq!(w.inbox.len(), 1);

    // Then DRAM is served first, and the NVMe replica stays.
    w.report(1, 0, vec![ok(t.id)], Vec::new());
    let info = w.get("n0").unwrap();
    assert_eq!(ids(&info.replicas), vec![t.replica, ReplicaId(500)]);
    assert_eq!(info.replicas[0].tier, Tier::Dram);
    assert_eq!(w.used(11), record());
}

#[test]
fn with_promotion_off_reads_of_an_nvme_only_object_move_nothing() {
    let mut w = World::with(CoreConfig {
        promote_after_hits: 0,
        ..cfg(Admission::AfterRead)
    });
    tiered(&mut w, 10 * MIB, vec![nvme_entry(0)]);
    for _ in 0..5 {
        assert_eq!(ids(&w.get("n0").unwrap().replicas), vec![ReplicaId(500)]);
        w.heartbeat(1, 0);
    }
    assert!(w.inbox.is_empty());
    assert_eq!((w.used(10), w.used(11)), (0, record()));
}

#[test]
fn an_unhealthy_segment_gets_no_new_data() {
    // Placement skips an unhealthy DRAM segment.
    let mut w = World::new();
    w.node(1, &[(10, 10 * MIB)]);
    w.node(2, &[(20, 10 * MIB)]);
    w.report(1, 0, Vec::new(), vec![SegmentId(10)]);
    // A node cannot mark another node's segment.
    w.report(2, 0, Vec::new(), vec![SegmentId(10), SegmentId(99)]);
    assert_eq!(w.segment(10).map(|s| s.healthy), Some(false));
    assert_eq!(w.segment(20).map(|s| s.healthy), Some(true));
    let prefer_1 = preferring(1);
    for i in 0..4 {
        let d = w.put_with(&format!("k{i}"), MIB, prefer_1.clone());
        assert_eq!(d[0].segment, SegmentId(20));
    }

    // Demotion skips an unhealthy NVMe segment: the victim is dropped.
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    w.report(1, 0, Vec::new(), vec![SegmentId(11)]);
    fill(&mut w, 0..10);
    w.pass(secs(1));
    assert!(w.inbox.is_empty());
    assert!(!w.exists("k0"));
    assert_eq!(w.used(11), 0);
}

#[test]
fn a_node_that_dies_with_tasks_in_flight_takes_them_along() {
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    w.node(2, &[(20, 64 * MIB)]);
    let prefer_1 = preferring(1);
    for i in 0..10 {
        w.put_with(&format!("k{i}"), MIB, prefer_1.clone());
    }
    w.pass(secs(1));
    assert_eq!(w.inbox.len(), 0);
    w.heartbeat(1, 0);
    let t = w.inbox[0].clone();
    assert_eq!(w.core.pending_tasks(), 1);

    // When node 1 goes silent.
    w.pass_with(secs(11), &[2]);

    // Then its tasks and objects are gone, and its late report is ignored.
    assert_eq!(w.core.pending_tasks(), 0);
    assert!(!w.exists("k0") && !w.exists("k5"));
    let r = w.report(1, 0, vec![ok(t.id)], Vec::new());
    assert!(r.need_register && r.tasks.is_empty());
    assert!(!w.exists("k0"));
}

#[test]
fn a_re_registering_node_drops_its_tasks_and_late_reports_are_ignored() {
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    let d = fill(&mut w, 0..10);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    let t = w.inbox[0].clone();

    // When the node re-registers with its DRAM objects (the copy never made it).
    let inventory = d
        .iter()
        .enumerate()
        .map(|(i, r)| inventory_entry(r, &format!("k{i}"), MIB as u32))
        .collect();
    assert!(tiered(&mut w, 64 * MIB, inventory).rejected.is_empty());

    // Then the task is gone and the object is back on DRAM.
    assert_eq!(w.core.pending_tasks(), 0);
    assert_eq!(w.used(11), 0);
    w.report(1, 0, vec![ok(t.id)], Vec::new());
    let info = w.get("k0").unwrap();
    assert_eq!(ids(&info.replicas), vec![d[0].id]);
    assert_eq!(w.used(11), 0);
}

#[test]
fn removing_or_overwriting_an_object_mid_demotion_leaks_nothing() {
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    fill(&mut w, 0..10);

    // Removed before the task was sent: the task is cancelled and both ranges are free.
    w.pass(secs(1));
    w.remove("k0", false).unwrap();
    assert_eq!((w.used(10), w.used(11)), (9 * MIB, 0));
    assert_eq!(w.core.pending_tasks(), 0);
    w.heartbeat(1, 0);
    assert!(w.inbox.is_empty());

    // Removed after it was sent: the NVMe range stays until the node is done writing it.
    w.put("k10", MIB);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    let t1 = w.inbox[0].clone();
    assert_eq!(t1.key, b"k1");
    w.remove("k1", false).unwrap();
    assert!(!w.exists("k1"));
    assert_eq!(w.used(10), 9 * MIB);
    assert!(w.used(11) >= record());
    let r = w.report(1, 0, vec![ok(t1.id)], Vec::new());
    assert!(r.frees.contains(&t1.replica));
    assert_eq!(w.used(11), 0);
    assert!(!w.exists("k1"));

    // Overwritten mid-copy: the new value stands, the copy's range is freed when it ends.
    w.put("k11", MIB);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    let t2 = w.inbox[1].clone();
    assert_eq!(t2.key, b"k2");
    let overwrite = overwriting();
    let fresh = w.put_with("k2", MIB, overwrite);
    w.report(1, 0, vec![failed(t2.id)], Vec::new());
    assert_eq!(w.used(11), 0);
    assert_eq!(ids(&w.get("k2").unwrap().replicas), ids(&fresh));
    assert_eq!(code(w.remove("k1", false)), ErrorCode::NotFound);
}

#[test]
fn a_restarted_master_rebuilds_dram_and_nvme_from_the_inventory() {
    // Given a node with nine objects on DRAM and one demoted to NVMe.
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, Vec::new());
    let d = fill(&mut w, 0..10);
    w.pass(secs(1));
    w.heartbeat(1, 0);
    let t = w.inbox[0].clone();
    w.report(1, 0, vec![ok(t.id)], Vec::new());
    let nvme_offset = t.to_offset + layout::value_offset(2);
    let mut inventory: Vec<InventoryEntry> = d[1..]
        .iter()
        .zip(1..)
        .map(|(r, i)| inventory_entry(r, &format!("k{i}"), MIB as u32))
        .collect();
    inventory.push(InventoryEntry {
        replica: t.replica,
        key: b"k0".to_vec(),
        segment: SegmentId(11),
        offset: nvme_offset,
        len: MIB,
        checksum: MIB as u32,
        commit: CommitState::Unconfirmed,
    });
    // An NVMe entry whose value cannot start where it says.
    inventory.push(InventoryEntry {
        replica: ReplicaId(9_999),
        key: b"bad".to_vec(),
        segment: SegmentId(11),
        offset: 100,
        len: MIB,
        checksum: 1,
        commit: CommitState::Unconfirmed,
    });
    let dram_used = w.used(10);

    // When a fresh master hears the node register.
    let mut m = World::with(cfg(Admission::Always));
    let r = tiered(&mut m, 64 * MIB, inventory);

    // Then both tiers are back where they were, and the bad entry is refused.
    assert_eq!(r.rejected, vec![ReplicaId(9_999)]);
    // A rebuilt allocator holds exactly the reported ranges (a live one rounds to its bins).
    assert_eq!((m.used(10), m.used(11)), (dram_used, record()));
    let info = m.get("k0").unwrap();
    assert_eq!(info.replicas.len(), 1);
    assert_eq!(
        (info.replicas[0].tier, info.replicas[0].offset),
        (Tier::Nvme, nvme_offset)
    );
    assert!((1..10).all(|i| m.exists(&format!("k{i}"))));

    // And promotion reads from the value's offset.
    m.get("k0").unwrap();
    m.heartbeat(1, 0);
    assert_eq!(m.inbox.len(), 1);
    assert_eq!(
        (m.inbox[0].from, m.inbox[0].from_offset),
        (SegmentId(11), nvme_offset)
    );
}

#[test]
fn a_node_restarted_on_the_same_disk_takes_over_its_records_before_the_old_one_expires() {
    // Given node 1 holding an NVMe record (reported at registration).
    let mut w = World::with(cfg(Admission::Always));
    tiered(&mut w, 64 * MIB, vec![nvme_entry(0)]);
    assert_eq!(w.get("n0").unwrap().replicas[0].node, NodeId(1));
    let acked = w.heartbeat(1, 0).frees_upto;
    // When the process dies and a new one (node 2) opens the same disk before node 1's TTL
    // runs out, reporting the same replica id on its own NVMe segment.
    w.pass(secs(1));
    let mut moved = nvme_entry(0);
    moved.segment = SegmentId(21);
    let resp = w.register_tiered(
        2,
        &[(20, 10 * MIB, Tier::Dram), (21, 64 * MIB, Tier::Nvme)],
        vec![moved],
    );
    // Then the record is admitted on the new node, and the old node is not told to free it
    // (it would delete a record that is now node 2's).
    assert!(resp.rejected.is_empty(), "the moved record was rejected");
    let info = w.get("n0").unwrap();
    assert_eq!(info.replicas.len(), 1);
    assert_eq!(
        (info.replicas[0].node, info.replicas[0].segment),
        (NodeId(2), SegmentId(21))
    );
    assert!(w.heartbeat(1, acked).frees.is_empty());
    assert_eq!(
        w.used(11),
        0,
        "the stale claim still holds space on the old segment"
    );
}
