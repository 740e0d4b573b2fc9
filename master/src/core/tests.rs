//! Scenario tests, one per rule of the contract. Each reads as Given / When / Then through the
//! small `World` helper, which also checks the core's invariants when a test ends.

use std::time::Duration;

use kvpool_proto::*;

use super::{CoreConfig, MasterCore};

pub(super) const MIB: u64 = 1 << 20;
pub(super) const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);

pub(super) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub(super) struct World {
    pub core: MasterCore,
    pub now: Duration,
    nodes: Vec<NodeId>,
    /// Copy tasks heartbeat responses delivered (each is delivered once), oldest first.
    pub inbox: Vec<CopyTask>,
}

impl World {
    pub fn new() -> Self {
        Self::with(CoreConfig::default())
    }

    pub fn with(cfg: CoreConfig) -> Self {
        World {
            core: MasterCore::new(cfg, 1_000),
            now: secs(1),
            nodes: Vec::new(),
            inbox: Vec::new(),
        }
    }

    /// Given a node with segments `(id, size)` and no inventory.
    pub fn node(&mut self, id: u64, segments: &[(u64, u64)]) -> RegisterResponse {
        self.register(id, segments, Vec::new())
    }

    fn register(
        &mut self,
        id: u64,
        segments: &[(u64, u64)],
        inventory: Vec<InventoryEntry>,
    ) -> RegisterResponse {
        let tiered: Vec<(u64, u64, Tier)> =
            segments.iter().map(|&(s, n)| (s, n, Tier::Dram)).collect();
        self.register_tiered(id, &tiered, inventory)
    }

    /// Given a node with segments `(id, size, tier)` and an inventory.
    pub fn register_tiered(
        &mut self,
        id: u64,
        segments: &[(u64, u64, Tier)],
        inventory: Vec<InventoryEntry>,
    ) -> RegisterResponse {
        if !self.nodes.contains(&NodeId(id)) {
            self.nodes.push(NodeId(id));
        }
        self.core.register(
            self.now,
            Register {
                node: NodeId(id),
                name: format!("node-{id}"),
                addr: format!("10.0.0.{id}:9000"),
                segments: segments
                    .iter()
                    .map(|&(s, size, tier)| SegmentInfo {
                        id: SegmentId(s),
                        size,
                        tier,
                    })
                    .collect(),
                inventory,
            },
        )
    }

    /// Time passes in 1 s steps; every node in `alive` heartbeats each step; the core ticks.
    pub fn pass_with(&mut self, d: Duration, alive: &[u64]) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + secs(1)).min(end);
            for &n in alive {
                let r = self.core.heartbeat(
                    self.now,
                    Heartbeat {
                        node: NodeId(n),
                        acked: 0,
                        done: Vec::new(),
                        unhealthy: Vec::new(),
                    },
                );
                self.inbox.extend(r.tasks);
            }
            self.core.tick(self.now);
        }
    }

    /// Time passes with every node alive.
    pub fn pass(&mut self, d: Duration) {
        let all: Vec<u64> = self.nodes.iter().map(|n| n.0).collect();
        self.pass_with(d, &all);
    }

    pub fn start_with(
        &mut self,
        c: ClientId,
        key: &str,
        len: u64,
        options: PutOptions,
    ) -> ItemResult<Vec<ReplicaDesc>> {
        let item = PutStartItem {
            key: key.as_bytes().to_vec(),
            len,
            checksum: len as u32,
            options,
        };
        let mut r = self.core.put_start(
            self.now,
            PutStart {
                client: c,
                items: vec![item],
            },
        );
        r.items.remove(0)
    }

    fn start(&mut self, c: ClientId, key: &str, len: u64) -> ItemResult<Vec<ReplicaDesc>> {
        self.start_with(c, key, len, PutOptions::default())
    }

    fn end(&mut self, c: ClientId, key: &str) -> ItemResult<()> {
        self.core
            .put_end(
                self.now,
                PutEnd {
                    client: c,
                    keys: vec![key.as_bytes().to_vec()],
                },
            )
            .items
            .remove(0)
    }

    fn revoke(&mut self, c: ClientId, key: &str) -> ItemResult<()> {
        self.core
            .put_revoke(
                self.now,
                PutRevoke {
                    client: c,
                    keys: vec![key.as_bytes().to_vec()],
                },
            )
            .items
            .remove(0)
    }

    /// A whole put that must succeed.
    pub fn put_with(&mut self, key: &str, len: u64, options: PutOptions) -> Vec<ReplicaDesc> {
        let r = self
            .start_with(A, key, len, options)
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        self.end(A, key).unwrap();
        r
    }

    pub fn put(&mut self, key: &str, len: u64) -> Vec<ReplicaDesc> {
        self.put_with(key, len, PutOptions::default())
    }

    pub fn get(&mut self, key: &str) -> ItemResult<ObjectInfo> {
        self.core
            .get_replicas(
                self.now,
                GetReplicas {
                    keys: vec![key.as_bytes().to_vec()],
                },
            )
            .items
            .remove(0)
    }

    pub fn exists(&mut self, key: &str) -> bool {
        let r = self.core.exists(
            self.now,
            Exists {
                keys: vec![key.as_bytes().to_vec()],
                lease: false,
            },
        );
        r.items[0].clone().unwrap()
    }

    pub fn remove(&mut self, key: &str, force: bool) -> ItemResult<()> {
        self.core
            .remove(
                self.now,
                Remove {
                    keys: vec![key.as_bytes().to_vec()],
                    force,
                },
            )
            .items
            .remove(0)
    }

    pub fn heartbeat(&mut self, node: u64, acked: u64) -> HeartbeatResponse {
        self.report(node, acked, Vec::new(), Vec::new())
    }

    /// A heartbeat carrying finished tasks and failed segments; delivered tasks go to the inbox.
    pub fn report(
        &mut self,
        node: u64,
        acked: u64,
        done: Vec<TaskDone>,
        unhealthy: Vec<SegmentId>,
    ) -> HeartbeatResponse {
        let r = self.core.heartbeat(
            self.now,
            Heartbeat {
                node: NodeId(node),
                acked,
                done,
                unhealthy,
            },
        );
        self.inbox.extend(r.tasks.iter().cloned());
        r
    }

    pub fn used(&self, segment: u64) -> u64 {
        self.segment(segment).map_or(0, |s| s.used)
    }

    pub fn segment(&self, segment: u64) -> Option<SegmentStatus> {
        let st = self.core.status(self.now);
        st.nodes
            .into_iter()
            .flat_map(|n| n.segments)
            .find(|s| s.id == SegmentId(segment))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            if let Err(e) = self.core.check_invariants() {
                panic!("invariant broken at the end of the scenario: {e}");
            }
        }
    }
}

pub(super) fn code<T: std::fmt::Debug>(r: ItemResult<T>) -> ErrorCode {
    r.expect_err("expected an error").code
}

fn ids(d: &[ReplicaDesc]) -> Vec<ReplicaId> {
    d.iter().map(|r| r.id).collect()
}

// ------------------------------------------------------------------ two-phase put

#[test]
fn a_put_is_readable_only_after_put_end() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let descs = w.start(A, "k", 1000).unwrap();
    assert_eq!(descs.len(), 1);
    assert_eq!(descs[0].addr, "10.0.0.1:9000");
    assert_eq!(descs[0].len, 1000);

    assert_eq!(
        code(w.get("k")),
        ErrorCode::NotFound,
        "Processing is invisible to get"
    );
    assert!(!w.exists("k"), "Processing is invisible to exists");
    assert_eq!(code(w.remove("k", true)), ErrorCode::NotFound);
    assert_eq!(w.core.status(w.now).processing, 1);

    w.end(A, "k").unwrap();
    let info = w.get("k").unwrap();
    assert_eq!(
        (info.len, info.checksum, info.replicas.clone()),
        (1000, 1000, descs)
    );
    assert!(w.exists("k"));
    assert_eq!(w.core.status(w.now).objects, 1);
}

#[test]
fn batches_answer_per_item_in_order() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("a", 10);
    let r = w.core.exists(
        w.now,
        Exists {
            keys: vec![b"a".to_vec(), b"zz".to_vec(), Vec::new(), b"a".to_vec()],
            lease: false,
        },
    );
    assert_eq!(r.items[0], Ok(true));
    assert_eq!(r.items[1], Ok(false));
    assert_eq!(r.items[2].clone().unwrap_err().code, ErrorCode::KeyTooLong);
    assert_eq!(r.items[3], Ok(true));
}

#[test]
fn bad_put_arguments_are_refused() {
    let mut w = World::new();
    assert_eq!(code(w.start(A, "k", 10)), ErrorCode::NoSegment);
    w.node(1, &[(10, 64 * MIB)]);
    assert_eq!(code(w.start(A, "", 10)), ErrorCode::KeyTooLong);
    assert_eq!(
        code(w.start(A, &"x".repeat(MAX_KEY_LEN + 1), 10)),
        ErrorCode::KeyTooLong
    );
    assert_eq!(code(w.start(A, "k", 0)), ErrorCode::ValueTooLarge);
    assert_eq!(
        code(w.start(A, "k", (1 << 30) + 1)),
        ErrorCode::ValueTooLarge
    );
    let zero = PutOptions {
        replicas: 0,
        ..PutOptions::default()
    };
    assert_eq!(
        code(w.start_with(A, "k", 10, zero)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(w.start(A, "k", 65 * MIB)), ErrorCode::NoSpace);
}

#[test]
fn only_the_writer_ends_or_revokes_a_put() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.start(A, "k", 100).unwrap();
    assert_eq!(code(w.end(B, "k")), ErrorCode::NotWriter);
    assert_eq!(code(w.revoke(B, "k")), ErrorCode::NotWriter);
    w.end(A, "k").unwrap();
    w.end(A, "k").unwrap(); // a retried end is a no-op
    assert_eq!(code(w.end(B, "k")), ErrorCode::NotWriter);
    assert_eq!(code(w.end(A, "missing")), ErrorCode::NotFound);
    assert_eq!(
        code(w.revoke(A, "k")),
        ErrorCode::InvalidArgument,
        "committed: use remove"
    );
}

#[test]
fn revoke_frees_the_space() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.start(A, "k", MIB).unwrap();
    assert!(w.used(10) >= MIB);
    w.revoke(A, "k").unwrap();
    assert_eq!(w.used(10), 0);
    assert_eq!(code(w.end(A, "k")), ErrorCode::NotFound);
    assert_eq!(w.heartbeat(1, 0).frees, ids(&d));
}

#[test]
fn concurrent_put_starts_of_one_key_let_exactly_one_win() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let item = |len| PutStartItem {
        key: b"k".to_vec(),
        len,
        checksum: 0,
        options: PutOptions::default(),
    };
    let r = w.core.put_start(
        w.now,
        PutStart {
            client: A,
            items: vec![item(10), item(20)],
        },
    );
    assert!(r.items[0].is_ok());
    assert_eq!(r.items[1].clone().unwrap_err().code, ErrorCode::Processing);
    assert_eq!(code(w.start(B, "k", 30)), ErrorCode::Processing);
    assert_eq!(code(w.end(B, "k")), ErrorCode::NotWriter);
    w.end(A, "k").unwrap();
    assert_eq!(w.get("k").unwrap().len, 10);
}

// ------------------------------------------------------------------ immutability

#[test]
fn committed_objects_are_immutable_unless_overwritten() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let old = w.put("k", 100);
    assert_eq!(code(w.start(B, "k", 200)), ErrorCode::AlreadyExists);

    let overwrite = PutOptions {
        overwrite: true,
        ..PutOptions::default()
    };
    w.start_with(B, "k", 200, overwrite.clone()).unwrap();
    assert_eq!(
        code(w.get("k")),
        ErrorCode::NotFound,
        "the old value is gone, the new one not yet readable"
    );
    w.end(B, "k").unwrap();
    assert_eq!(w.get("k").unwrap().len, 200);
    assert_eq!(
        w.heartbeat(1, 0).frees,
        ids(&old),
        "the old replicas reach the node as frees"
    );

    // The get above leased it: the overwrite takes the key at once, but the leased bytes
    // stay reserved (not handed to the new put, not freed on the node) until the lease ends.
    let acked = w.heartbeat(1, 0).frees_upto;
    let used_before = w.core.status(w.now).nodes[0].segments[0].used;
    let leased = w.get("k").unwrap().replicas;
    w.start_with(A, "k", 300, overwrite).unwrap();
    assert!(w.core.status(w.now).nodes[0].segments[0].used >= used_before + 300);
    assert!(
        w.heartbeat(1, acked).frees.is_empty(),
        "leased bytes freed early"
    );
    w.pass(secs(11));
    w.core.tick(w.now);
    assert_eq!(
        w.heartbeat(1, acked).frees,
        ids(&leased),
        "freed when the lease ended"
    );
}

// ------------------------------------------------------------------ zombie puts

#[test]
fn a_stale_put_is_preempted_after_30s_and_its_space_freed_after_600s() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let zombie = w.start(A, "k", MIB).unwrap();
    w.pass(secs(29));
    assert_eq!(
        code(w.start(B, "k", MIB)),
        ErrorCode::Processing,
        "not stale yet"
    );
    w.pass(secs(2));
    let fresh = w.start(B, "k", MIB).unwrap();
    assert_ne!(
        zombie[0].offset, fresh[0].offset,
        "the zombie's bytes are not reused while it may write"
    );
    assert_eq!(
        code(w.end(A, "k")),
        ErrorCode::NotWriter,
        "the old writer lost the key"
    );
    w.end(B, "k").unwrap();
    let used_with_zombie = w.used(10);

    w.pass(secs(600 - 31 - 1));
    assert_eq!(w.used(10), used_with_zombie);
    assert!(w.heartbeat(1, 0).frees.is_empty());
    w.pass(secs(2));
    assert!(w.used(10) < used_with_zombie);
    assert_eq!(w.heartbeat(1, 0).frees, ids(&zombie));
    assert_eq!(w.get("k").unwrap().replicas, fresh);
}

#[test]
fn a_put_that_never_ends_is_released_after_600s() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.start(A, "k", MIB).unwrap();
    w.pass(secs(599));
    assert_eq!(w.core.status(w.now).processing, 1);
    w.pass(secs(1));
    assert_eq!(w.core.status(w.now).processing, 0);
    assert_eq!(w.used(10), 0);
    assert_eq!(w.heartbeat(1, 0).frees, ids(&d));
    assert_eq!(code(w.end(A, "k")), ErrorCode::NotFound);
}

// ------------------------------------------------------------------ leases and pins

#[test]
fn a_lease_blocks_remove_until_it_expires() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("k", 100);
    assert_eq!(w.get("k").unwrap().lease_ms, 10_000);
    assert_eq!(code(w.remove("k", false)), ErrorCode::HasLease);
    w.pass(secs(9));
    assert_eq!(code(w.remove("k", false)), ErrorCode::HasLease);
    w.pass(secs(1));
    w.remove("k", false).unwrap();
    assert!(!w.exists("k"));
    assert_eq!(code(w.remove("k", false)), ErrorCode::NotFound);
}

#[test]
fn exists_leases_only_when_asked_and_force_overrides_a_lease() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("k", 100);
    assert!(w.exists("k"));
    w.remove("k", false).unwrap();

    w.put("k", 100);
    let r = w.core.exists(
        w.now,
        Exists {
            keys: vec![b"k".to_vec()],
            lease: true,
        },
    );
    assert_eq!(r.items[0], Ok(true));
    assert_eq!(code(w.remove("k", false)), ErrorCode::HasLease);
    w.remove("k", true).unwrap();
}

#[test]
fn hard_pinned_objects_need_force_and_are_never_evicted() {
    let cfg = CoreConfig {
        high_watermark: 0.5,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 16 * MIB)]);
    w.put_with(
        "pinned",
        4 * MIB,
        PutOptions {
            hard_pin: true,
            ..PutOptions::default()
        },
    );
    for i in 0..10 {
        w.put(&format!("filler{i}"), 2 * MIB);
        w.pass(secs(1));
    }
    assert!(w.exists("pinned"));
    assert_eq!(code(w.remove("pinned", false)), ErrorCode::Pinned);
    w.core.remove_all(
        w.now,
        RemoveAll {
            force: false,
            prefix: None,
        },
    );
    assert!(w.exists("pinned"));
    w.remove("pinned", true).unwrap();
}

#[test]
fn soft_pinned_objects_go_only_in_a_second_eviction_pass() {
    // Given a segment holding a cold soft-pinned object and newer plain ones.
    let cfg = CoreConfig {
        high_watermark: 0.5,
        eviction_ratio: 0.01,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg.clone());
    w.node(1, &[(10, 16 * MIB)]);
    w.put_with(
        "soft",
        2 * MIB,
        PutOptions {
            soft_pin: true,
            ..PutOptions::default()
        },
    );
    w.put("plain1", 2 * MIB);
    w.put("plain2", 2 * MIB);
    // When the segment crosses the watermark...
    w.put("plain3", 3 * MIB);
    w.pass(secs(11));
    // ...then the plain objects go first, coldest first, and the soft-pinned one stays.
    assert!(w.exists("soft"));
    assert!(!w.exists("plain1"));

    // Given soft-pinned objects only, eviction takes them in the second pass.
    let mut w = World::with(cfg.clone());
    w.node(1, &[(10, 16 * MIB)]);
    for i in 0..5 {
        w.put_with(
            &format!("s{i}"),
            2 * MIB,
            PutOptions {
                soft_pin: true,
                ..PutOptions::default()
            },
        );
    }
    w.pass(secs(11));
    assert!(!w.exists("s0"));
    assert!(w.used(10) <= 8 * MIB);

    // Unless the configuration forbids it.
    let mut w = World::with(CoreConfig {
        allow_evict_soft_pinned: false,
        ..cfg
    });
    w.node(1, &[(10, 16 * MIB)]);
    for i in 0..5 {
        w.put_with(
            &format!("s{i}"),
            2 * MIB,
            PutOptions {
                soft_pin: true,
                ..PutOptions::default()
            },
        );
    }
    w.pass(secs(11));
    assert!((0..5).all(|i| w.exists(&format!("s{i}"))));
}

#[test]
fn a_leased_object_is_not_evicted() {
    let cfg = CoreConfig {
        high_watermark: 0.5,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 16 * MIB)]);
    w.put("old", 3 * MIB);
    w.put("mid", 3 * MIB);
    w.put("new", 3 * MIB);
    // Coldest by commit order, but leased by a reader (which also makes it the hottest; move
    // "mid" and "new" above it so only the lease protects it).
    w.get("old").unwrap();
    w.get("mid").unwrap();
    w.get("new").unwrap();
    w.core.tick(w.now);
    assert!(
        w.exists("old") && w.exists("mid") && w.exists("new"),
        "all leased: nothing to evict"
    );
    w.pass(secs(11));
    assert!(!w.exists("old"), "lease expired: the coldest goes");
}

// ------------------------------------------------------------------ placement

#[test]
fn replicas_go_to_distinct_nodes_then_distinct_segments() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB), (11, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    w.node(3, &[(30, 64 * MIB)]);
    let three = PutOptions {
        replicas: 3,
        ..PutOptions::default()
    };
    for i in 0..10 {
        let d = w.put_with(&format!("k{i}"), 1000, three.clone());
        let mut nodes: Vec<_> = d.iter().map(|r| r.node).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), 3, "three distinct nodes");
    }
    let four = PutOptions {
        replicas: 4,
        ..PutOptions::default()
    };
    let d = w.put_with("four", 1000, four);
    let mut segs: Vec<_> = d.iter().map(|r| r.segment).collect();
    segs.sort();
    segs.dedup();
    assert_eq!(segs.len(), 4, "four distinct segments over three nodes");
    let ten = PutOptions {
        replicas: 10,
        ..PutOptions::default()
    };
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
        let opts = PutOptions {
            preferred_nodes: vec![NodeId(3)],
            ..PutOptions::default()
        };
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

// ------------------------------------------------------------------ eviction

#[test]
fn watermark_eviction_frees_the_coldest_first() {
    // Given a 20 MiB segment holding 13 objects of 1.5 MiB (above the 18 MiB watermark), the
    // oldest of which was just read.
    let cfg = CoreConfig {
        eviction_ratio: 0.2,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 20 * MIB)]);
    for i in 0..13 {
        w.put(&format!("k{i}"), 3 * MIB / 2);
    }
    w.get("k0").unwrap();
    // When the core ticks.
    w.pass(secs(1));
    // Then at least 4 MiB (20 %) went, coldest first, sparing the object just read.
    assert!(w.used(10) <= 16 * MIB);
    let evicted: Vec<usize> = (0..13).filter(|i| !w.exists(&format!("k{i}"))).collect();
    assert!(!evicted.is_empty());
    assert!(!evicted.contains(&0), "the recently read object survives");
    let expected: Vec<usize> = (1..=evicted.len()).collect();
    assert_eq!(
        evicted, expected,
        "eviction follows commit order for the untouched ones"
    );
    assert_eq!(w.core.status(w.now).evictions, evicted.len() as u64);
    let frees = w.heartbeat(1, 0).frees;
    assert_eq!(
        frees.len(),
        evicted.len(),
        "evicted replicas reach the node"
    );
}

#[test]
fn puts_on_a_full_pool_evict_and_succeed() {
    // No watermark eviction: only allocation failure makes room.
    let cfg = CoreConfig {
        high_watermark: 1.0,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 32 * MIB)]);
    w.node(2, &[(20, 32 * MIB)]);
    // Write ten times the pool's size in MiB-sized blocks.
    for i in 0..640 {
        let len = MIB + (i % 3) * 300_000;
        w.start(A, &format!("k{i}"), len)
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
        w.end(A, &format!("k{i}")).unwrap();
    }
    let st = w.core.status(w.now);
    assert!(st.evictions > 500);
    assert!(st.objects > 30);
    assert!(w.exists("k639") && !w.exists("k0"));
}

#[test]
fn a_full_pool_of_unevictable_objects_says_no_space() {
    let mut w = World::new();
    w.node(1, &[(10, 8 * MIB)]);
    w.put_with(
        "a",
        4 * MIB,
        PutOptions {
            hard_pin: true,
            ..PutOptions::default()
        },
    );
    w.put("b", 3 * MIB);
    w.get("b").unwrap();
    assert_eq!(code(w.start(A, "c", 3 * MIB)), ErrorCode::NoSpace);
    w.now += secs(11);
    w.heartbeat(1, 0);
    w.start(A, "c", 3 * MIB).unwrap();
    assert!(!w.exists("b"));
}

// ------------------------------------------------------------------ membership

#[test]
fn a_silent_node_dies_and_takes_its_only_replicas_with_it() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let two = PutOptions {
        replicas: 2,
        ..PutOptions::default()
    };
    w.put_with("both", 100, two);
    let only2 = PutOptions {
        preferred_nodes: vec![NodeId(2)],
        ..PutOptions::default()
    };
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

#[test]
fn a_restarted_master_rebuilds_from_inventories() {
    // Given a cluster with objects.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    let two = PutOptions {
        replicas: 2,
        ..PutOptions::default()
    };
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
            let e = InventoryEntry {
                replica: r.id,
                key: key.clone().into_bytes(),
                segment: r.segment,
                offset: r.offset,
                len: r.len,
                checksum: (1000 + i) as u32,
            };
            inventory.push((r.node.0, e));
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
fn remove_all_skips_leased_and_pinned_unless_forced() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("plain", 10);
    w.put("leased", 10);
    w.put_with(
        "pinned",
        10,
        PutOptions {
            hard_pin: true,
            ..PutOptions::default()
        },
    );
    w.start(A, "writing", 10).unwrap();
    w.get("leased").unwrap();
    assert_eq!(
        w.core
            .remove_all(
                w.now,
                RemoveAll {
                    force: false,
                    prefix: None
                }
            )
            .removed,
        1
    );
    assert_eq!(
        w.core
            .remove_all(
                w.now,
                RemoveAll {
                    force: true,
                    prefix: None
                }
            )
            .removed,
        2
    );
    let st = w.core.status(w.now);
    assert_eq!(
        (st.objects, st.processing),
        (0, 1),
        "puts in progress are not committed objects"
    );
}

#[test]
fn remove_all_with_a_prefix_removes_only_those_keys() {
    // A tenant's remove_all: keys are `tenant 0x00 key` on the wire.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("a\0k1", 10);
    w.put("a\0k2", 10);
    w.put("b\0k1", 10);
    w.put("plain", 10);
    let removed = w
        .core
        .remove_all(
            w.now,
            RemoveAll {
                force: false,
                prefix: Some(b"a\0".to_vec()),
            },
        )
        .removed;
    assert_eq!(removed, 2);
    assert!(!w.exists("a\0k1") && !w.exists("a\0k2"));
    assert!(w.exists("b\0k1") && w.exists("plain"));
    // An empty prefix is every key.
    let removed = w
        .core
        .remove_all(
            w.now,
            RemoveAll {
                force: false,
                prefix: Some(Vec::new()),
            },
        )
        .removed;
    assert_eq!(removed, 2);
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

#[test]
fn a_draining_node_gets_no_new_data_and_is_emptied_except_what_readers_hold() {
    // Given two nodes and objects with one replica on each node, and one with two replicas.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.node(2, &[(20, 64 * MIB)]);
    for i in 0..8 {
        w.put(&format!("k{i}"), MIB);
    }
    w.put_with(
        "both",
        MIB,
        PutOptions {
            replicas: 2,
            ..Default::default()
        },
    );
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
    let left = w
        .core
        .drain(
            w.now,
            Drain {
                node: NodeId(2),
                cancel: false,
            },
        )
        .replicas_left
        .unwrap();
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
    let left = w
        .core
        .drain(
            w.now,
            Drain {
                node: NodeId(2),
                cancel: false,
            },
        )
        .replicas_left
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(w.used(20), 0);
    // Cancelling takes it back into placement; an unknown node is refused.
    w.core
        .drain(
            w.now,
            Drain {
                node: NodeId(2),
                cancel: true,
            },
        )
        .replicas_left
        .unwrap();
    assert!(!w.core.status(w.now).nodes.iter().any(|n| n.draining));
    let e = w
        .core
        .drain(
            w.now,
            Drain {
                node: NodeId(9),
                cancel: false,
            },
        )
        .replicas_left
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownNode);
}
