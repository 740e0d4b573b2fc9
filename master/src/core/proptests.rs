//! Random operation sequences against a small cluster whose nodes behave like real ones
//! (they keep what clients wrote, apply the frees heartbeats bring, run the copy tasks they
//! are sent and report them done or failed, re-register with their inventory when told to).
//! Two nodes have an NVMe segment, so ticks demote, reads promote, and tasks race with
//! removal, overwrite and death. After every step the core's invariants must hold and no
//! Processing object or Filling replica may be visible to readers.

use std::collections::HashMap;
use std::time::Duration;

use kvpool_proto::*;
use proptest::prelude::*;

use super::objects::{RepState, State};
use super::{Admission, CoreConfig, MasterCore};

const KEYS: usize = 12;
const NODES: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    Start {
        client: u64,
        key: usize,
        len: u64,
        replicas: u8,
        overwrite: bool,
        soft: bool,
        hard: bool,
        pref: Option<u64>,
    },
    End {
        client: u64,
        key: usize,
    },
    Revoke {
        client: u64,
        key: usize,
    },
    /// `times` lookups in a row, so that NVMe hits add up to a promotion.
    Get {
        key: usize,
        times: u8,
    },
    /// Lookups of an object readable only from NVMe, if there is one: promotions need
    /// repeated hits on such objects, which random keys rarely give.
    GetNvmeOnly {
        times: u8,
    },
    Exists {
        key: usize,
        lease: bool,
    },
    Remove {
        key: usize,
        force: bool,
    },
    RemoveAll {
        force: bool,
    },
    Advance {
        ms: u64,
        silent: Option<u64>,
    },
    Heartbeat {
        node: u64,
        ack: bool,
    },
    Reregister {
        node: u64,
    },
    /// The node finishes its oldest task.
    Complete {
        node: u64,
        ok: bool,
    },
    /// The node reports its NVMe segment failed.
    Unhealthy {
        node: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    let node = 1..=NODES;
    prop_oneof![
        6 => (0u64..2, key.clone(), 1u64..300_000, 0u8..4, any::<bool>(), any::<bool>(), prop::bool::weighted(0.1), prop::option::of(node.clone()))
            .prop_map(|(client, key, len, replicas, overwrite, soft, hard, pref)| Op::Start { client, key, len, replicas, overwrite, soft, hard, pref }),
        5 => (0u64..2, key.clone()).prop_map(|(client, key)| Op::End { client, key }),
        1 => (0u64..2, key.clone()).prop_map(|(client, key)| Op::Revoke { client, key }),
        3 => (key.clone(), 1u8..=3).prop_map(|(key, times)| Op::Get { key, times }),
        3 => (1u8..=3).prop_map(|times| Op::GetNvmeOnly { times }),
        2 => (key.clone(), any::<bool>()).prop_map(|(key, lease)| Op::Exists { key, lease }),
        2 => (key, any::<bool>()).prop_map(|(key, force)| Op::Remove { key, force }),
        1 => any::<bool>().prop_map(|force| Op::RemoveAll { force }),
        4 => (0u64..40_000, prop::option::of(node.clone())).prop_map(|(ms, silent)| Op::Advance { ms, silent }),
        2 => (node.clone(), any::<bool>()).prop_map(|(node, ack)| Op::Heartbeat { node, ack }),
        1 => node.clone().prop_map(|node| Op::Reregister { node }),
        // Node 3 has no NVMe segment, so it never gets a task.
        5 => (1..NODES, prop::bool::weighted(0.8)).prop_map(|(node, ok)| Op::Complete { node, ok }),
        // Rarely: an unhealthy NVMe segment stays so until its node re-registers.
        1 => (node, prop::bool::weighted(0.25)).prop_map(|(node, bad)| if bad { Op::Unhealthy { node } } else { Op::Heartbeat { node, ack: true } }),
    ]
}

/// A storage node as the master's peer: what it holds and what it has acknowledged.
#[derive(Default)]
struct FakeNode {
    held: HashMap<ReplicaId, InventoryEntry>,
    acked: u64,
    /// Tasks received and not finished, oldest first.
    tasks: Vec<CopyTask>,
    /// Finished tasks to report in the next heartbeat.
    done: Vec<TaskDone>,
}

struct Sim {
    core: MasterCore,
    now: Duration,
    nodes: HashMap<u64, FakeNode>,
    /// The location index as the server would have written it, by key hash.
    index: HashMap<u128, kvpool_transport::shm::index::Entry>,
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

/// NVMe segments are `node * 10 + 5`.
fn is_nvme(s: SegmentId) -> bool {
    s.0 % 10 == 5
}

fn segments(node: u64) -> Vec<SegmentInfo> {
    // Small segments so that space runs out and eviction happens; node 3 has two DRAM
    // segments, nodes 1 and 2 an NVMe segment each.
    let mut v = vec![SegmentInfo {
        id: SegmentId(node * 10),
        size: 1 << 20,
        tier: kvpool_proto::Tier::Dram,
    }];
    if node != 3 {
        v.push(SegmentInfo {
            id: SegmentId(node * 10 + 5),
            size: 4 << 20,
            tier: kvpool_proto::Tier::Nvme,
        });
    }
    if node == 3 {
        v.push(SegmentInfo {
            id: SegmentId(31),
            size: 512 << 10,
            tier: kvpool_proto::Tier::Dram,
        });
    }
    v
}

impl Sim {
    fn new(nvme_admission: Admission, promote: bool) -> Self {
        let cfg = CoreConfig {
            // Low enough that ticks demote often; a short lease so reads do not block it.
            high_watermark: 0.5,
            eviction_ratio: 0.1,
            lease_ttl: Duration::from_secs(2),
            nvme_admission,
            // Every NVMe-only hit promotes, so promotions race with everything else often;
            // the counting itself is a scenario test.
            promote_after_hits: u32::from(promote),
            ..CoreConfig::default()
        };
        let mut core = MasterCore::new(cfg, 1 << 40);
        core.track_index();
        let mut s = Sim {
            core,
            now: Duration::from_secs(1),
            nodes: HashMap::new(),
            index: HashMap::new(),
        };
        for n in 1..=NODES {
            s.nodes.insert(n, FakeNode::default());
            s.register(n);
        }
        s
    }

    fn register(&mut self, n: u64) {
        let fake = self.nodes.entry(n).or_default();
        let mut inventory: Vec<InventoryEntry> = fake.held.values().cloned().collect();
        inventory.sort_by_key(|e| e.replica);
        let r = self.core.register(
            self.now,
            Register {
                node: NodeId(n),
                name: format!("n{n}"),
                addr: format!("h{n}:1"),
                segments: segments(n),
                inventory,
            },
        );
        for id in r.rejected {
            fake.held.remove(&id);
        }
        fake.acked = 0;
        fake.tasks.clear();
        fake.done.clear();
    }

    fn heartbeat(&mut self, n: u64, ack: bool) {
        self.heartbeat_with(n, ack, Vec::new());
    }

    fn heartbeat_with(&mut self, n: u64, ack: bool, unhealthy: Vec<SegmentId>) {
        let fake = self.nodes.entry(n).or_default();
        let acked = fake.acked;
        let done = std::mem::take(&mut fake.done);
        let hb = self.core.heartbeat(
            self.now,
            Heartbeat {
                node: NodeId(n),
                acked,
                done,
                unhealthy,
                lost: Vec::new(),
            },
        );
        if hb.need_register {
            self.register(n);
            return;
        }
        if let Some(fake) = self.nodes.get_mut(&n) {
            for id in &hb.frees {
                fake.held.remove(id);
            }
            if ack {
                fake.acked = hb.frees_upto;
            }
            fake.tasks.extend(hb.tasks);
        }
    }

    /// The node finishes its oldest task; a successful copy is in its inventory from now on.
    fn complete(&mut self, n: u64, ok: bool) {
        let Some(fake) = self.nodes.get_mut(&n) else {
            return;
        };
        if fake.tasks.is_empty() {
            return;
        }
        let t = fake.tasks.remove(0);
        if ok {
            let offset = if is_nvme(t.to) {
                t.to_offset + layout::value_offset(t.key.len())
            } else {
                t.to_offset
            };
            let e = InventoryEntry {
                replica: t.replica,
                key: t.key.clone(),
                segment: t.to,
                offset,
                len: t.len,
                checksum: t.checksum,
                commit: CommitState::Unconfirmed,
            };
            fake.held.insert(t.replica, e);
        }
        let result = if ok {
            Ok(())
        } else {
            Err(WireError::new(ErrorCode::Io, "copy failed"))
        };
        fake.done.push(TaskDone { id: t.id, result });
    }

    fn get(&mut self, k: usize) {
        let filling = self.filling();
        let r = self
            .core
            .get_replicas(self.now, GetReplicas { keys: vec![key(k)] });
        if let Some(Ok(info)) = r.items.first() {
            assert!(!info.replicas.is_empty());
            assert!(info.replicas.iter().all(|d| d.len == info.len));
            assert!(info.replicas.iter().all(|d| !filling.contains(&d.id)));
            assert!(info
                .replicas
                .iter()
                .all(|d| (d.tier == Tier::Nvme) == is_nvme(d.segment)));
            let dram_first = info
                .replicas
                .windows(2)
                .all(|w| !(w[0].tier == Tier::Nvme && w[1].tier == Tier::Dram));
            assert!(dram_first);
        }
    }

    /// Replica ids readers must not be given.
    fn filling(&self) -> Vec<ReplicaId> {
        self.core
            .objects
            .iter()
            .flat_map(|(_, o)| o.replicas.iter())
            .filter(|r| r.state == RepState::Filling)
            .map(|r| r.id)
            .collect()
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Start {
                client,
                key: k,
                len,
                replicas,
                overwrite,
                soft,
                hard,
                pref,
            } => {
                let options = PutOptions {
                    replicas,
                    preferred_nodes: pref.map(NodeId).into_iter().collect(),
                    soft_pin: soft,
                    hard_pin: hard,
                    overwrite,
                };
                let item = PutStartItem {
                    key: key(k),
                    len,
                    options,
                };
                let r = self.core.put_start(
                    self.now,
                    PutStart {
                        client: ClientId(client),
                        items: vec![item],
                    },
                );
                if let Some(Ok(descs)) = r.items.first() {
                    assert!(!descs.is_empty());
                    for d in descs {
                        // The client writes the bytes, tagging them for the node's inventory.
                        let e = InventoryEntry {
                            replica: d.id,
                            key: key(k),
                            segment: d.segment,
                            offset: d.offset,
                            len: d.len,
                            checksum: (len % 7) as u32,
                            commit: CommitState::Unconfirmed,
                        };
                        self.nodes.entry(d.node.0).or_default().held.insert(d.id, e);
                    }
                }
            }
            Op::End { client, key: k } => {
                // The writer ends with the checksum its tags carry: `len % 7`.
                let len = self
                    .core
                    .inspect(self.now, Inspect { keys: vec![key(k)] })
                    .items
                    .remove(0)
                    .map_or(0, |d| d.len);
                self.core.put_end(
                    self.now,
                    PutEnd {
                        client: ClientId(client),
                        keys: vec![key(k)],
                        checksums: vec![(len % 7) as u32],
                    },
                );
            }
            Op::Revoke { client, key: k } => {
                self.core.put_revoke(
                    self.now,
                    PutRevoke {
                        client: ClientId(client),
                        keys: vec![key(k)],
                    },
                );
            }
            Op::Get { key: k, times } => {
                for _ in 0..times {
                    self.get(k);
                }
            }
            Op::GetNvmeOnly { times } => {
                let nvme_only = (0..KEYS).find(|&k| {
                    self.core
                        .objects
                        .id_of(&key(k))
                        .and_then(|id| self.core.objects.get(id))
                        .is_some_and(|o| {
                            o.is_complete()
                                && o.replicas
                                    .iter()
                                    .all(|r| r.state != RepState::Ready || is_nvme(r.segment))
                        })
                });
                if let Some(k) = nvme_only {
                    for _ in 0..times {
                        self.get(k);
                    }
                }
            }
            Op::Exists { key: k, lease } => {
                self.core.exists(
                    self.now,
                    Exists {
                        keys: vec![key(k)],
                        lease,
                    },
                );
            }
            Op::Remove { key: k, force } => {
                self.core.remove(
                    self.now,
                    Remove {
                        keys: vec![key(k)],
                        force,
                    },
                );
            }
            Op::RemoveAll { force } => {
                self.core.remove_all(
                    self.now,
                    RemoveAll {
                        force,
                        prefix: None,
                    },
                );
            }
            Op::Advance { ms, silent } => {
                // In steps no longer than a heartbeat period, so that only `silent` can die.
                let end = self.now + Duration::from_millis(ms);
                while self.now < end {
                    self.now = (self.now + Duration::from_millis(900)).min(end);
                    for n in 1..=NODES {
                        if Some(n) != silent {
                            self.heartbeat(n, true);
                        }
                    }
                    self.core.tick(self.now);
                }
            }
            Op::Heartbeat { node, ack } => self.heartbeat(node, ack),
            Op::Reregister { node } => self.register(node),
            Op::Complete { node, ok } => self.complete(node, ok),
            Op::Unhealthy { node } => {
                self.heartbeat_with(node, true, vec![SegmentId(node * 10 + 5)]);
            }
        }
    }

    /// No reader sees a Processing object.
    fn check_readers(&mut self) -> Result<(), String> {
        let processing: Vec<Vec<u8>> = self
            .core
            .objects
            .iter()
            .filter(|(_, o)| matches!(o.state, State::Processing { .. }))
            .map(|(_, o)| o.key.clone())
            .collect();
        for k in processing {
            let e = self.core.exists(
                self.now,
                Exists {
                    keys: vec![k.clone()],
                    lease: false,
                },
            );
            if e.items[0] != Ok(false) {
                return Err(format!("exists sees a Processing object: {:?}", e.items[0]));
            }
            let g = self
                .core
                .get_replicas(self.now, GetReplicas { keys: vec![k] });
            if !matches!(&g.items[0], Err(e) if e.code == ErrorCode::NotFound) {
                return Err(format!("get sees a Processing object: {:?}", g.items[0]));
            }
        }
        Ok(())
    }

    /// Applies the index updates of the last step, as the server does when it releases the
    /// core, then checks that the index says of every key exactly what the map does: never a
    /// replica the map let go of, never a key it dropped.
    fn check_index(&mut self) -> Result<(), String> {
        use kvpool_transport::shm::index::key_hash;
        for (hash, entry) in self.core.take_index_updates() {
            match entry {
                Some(e) => self.index.insert(hash, e),
                None => self.index.remove(&hash),
            };
        }
        for k in 0..KEYS {
            let key = key(k);
            let want = self
                .core
                .objects
                .lookup(&key)
                .and_then(|(_, o)| self.core.index_entry(o));
            let have = self.index.get(&key_hash(&key)).copied();
            if have != want {
                return Err(format!(
                    "the index says {have:?} of key {k}, the map {want:?}"
                ));
            }
        }
        if self.index.len() > KEYS {
            return Err(format!(
                "{} index entries for {KEYS} keys",
                self.index.len()
            ));
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(
        ops in proptest::collection::vec(op(), 1..120),
        write_through in any::<bool>(),
        promote in any::<bool>(),
    ) {
        // Demotion of every victim, or write-through copies at commit racing with it all.
        let admission = if write_through { Admission::WriteThrough } else { Admission::Always };
        let mut sim = Sim::new(admission, promote);
        for (i, op) in ops.into_iter().enumerate() {
            let shown = format!("{op:?}");
            sim.apply(op);
            if let Err(e) = sim.core.check_invariants() {
                prop_assert!(false, "after op {i} {shown}: {e}");
            }
            if let Err(e) = sim.check_readers() {
                prop_assert!(false, "after op {i} {shown}: {e}");
            }
            if let Err(e) = sim.check_index() {
                prop_assert!(false, "after op {i} {shown}: {e}");
            }
        }
        // Whatever happened, every live node's frees eventually drain once acked.
        for n in 1..=NODES {
            sim.heartbeat(n, true);
            sim.heartbeat(n, true);
            let acked = sim.nodes[&n].acked;
            let hb = sim.core.heartbeat(sim.now, Heartbeat { node: NodeId(n), acked, done: Vec::new(), unhealthy: Vec::new(), lost: Vec::new() });
            prop_assert!(hb.frees.is_empty());
        }
    }
}
