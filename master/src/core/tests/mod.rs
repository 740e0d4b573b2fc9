//! Scenario tests, one per rule of the contract. Each reads as Given / When / Then through the
//! small `World` helper, which also checks the core's invariants when a test ends. This module
//! holds that scaffolding; the scenarios live in one file per concept of the core.

use std::time::Duration;

use kvpool_proto::*;

use super::{CoreConfig, MasterCore};

mod drain;
mod eviction;
mod failover;
mod fences;
mod lost;
mod membership;
mod placement;
mod puts;
mod reads;

pub(super) const MIB: u64 = 1 << 20;
pub(super) const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);

pub(super) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Put options asking for a soft pin.
pub(super) fn soft_pinned() -> PutOptions {
    PutOptions {
        soft_pin: true,
        ..PutOptions::default()
    }
}

/// Put options asking for a hard pin.
pub(super) fn hard_pinned() -> PutOptions {
    PutOptions {
        hard_pin: true,
        ..PutOptions::default()
    }
}

/// Put options asking for `n` replicas.
pub(super) fn replicated(n: u8) -> PutOptions {
    PutOptions {
        replicas: n,
        ..PutOptions::default()
    }
}

/// Put options asking for a replace of a committed object.
pub(super) fn overwriting() -> PutOptions {
    PutOptions {
        overwrite: true,
        ..PutOptions::default()
    }
}

/// Put options naming a node to try first.
pub(super) fn preferring(node: u64) -> PutOptions {
    PutOptions {
        preferred_nodes: vec![NodeId(node)],
        ..PutOptions::default()
    }
}

/// What a node reports in its inventory for a replica it holds under `key`.
pub(super) fn inventory_entry(r: &ReplicaDesc, key: &str, checksum: u32) -> InventoryEntry {
    InventoryEntry {
        replica: r.id,
        key: key.as_bytes().to_vec(),
        segment: r.segment,
        offset: r.offset,
        len: r.len,
        checksum,
        commit: CommitState::Unconfirmed,
    }
}

pub(super) struct World {
    pub core: MasterCore,
    pub now: Duration,
    nodes: Vec<NodeId>,
    /// Copy tasks heartbeat responses delivered (each is delivered once), oldest first.
    pub inbox: Vec<CopyTask>,
    /// The length of each key's last started put: its value's checksum in these tests.
    lens: std::collections::HashMap<String, u64>,
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
            lens: Default::default(),
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
                        lost: Vec::new(),
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
            options,
        };
        self.lens.insert(key.to_string(), len);
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
                    checksums: vec![self.lens.get(key).copied().unwrap_or(0) as u32],
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

    /// A page of `limit` committed keys with `prefix` after `start_after`, as strings, and
    /// whether more follow.
    pub fn list(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> (Vec<String>, bool) {
        let r = self.core.list_keys(ListKeys {
            prefix: prefix.as_bytes().to_vec(),
            start_after: start_after.map(|a| a.as_bytes().to_vec()),
            limit,
        });
        let keys = r
            .keys
            .into_iter()
            .map(|k| String::from_utf8(k).unwrap())
            .collect();
        (keys, r.more)
    }

    /// `RemoveRegex`: how many went, or why the pattern was refused.
    pub fn remove_regex(
        &mut self,
        pattern: &str,
        prefix: Option<&str>,
        force: bool,
    ) -> Result<u64, WireError> {
        let req = RemoveRegex {
            pattern: pattern.to_string(),
            prefix: prefix.map(|p| p.as_bytes().to_vec()),
            force,
        };
        self.core.remove_regex(self.now, req).map(|r| r.removed)
    }

    /// A node leaves the pool.
    pub fn leave(&mut self, node: u64) -> ItemResult<()> {
        let req = Leave { node: NodeId(node) };
        self.core.leave(self.now, req).items.remove(0)
    }

    /// Drains a node (or, with `cancel`, takes it back); the replicas still on it.
    pub fn drain(&mut self, node: u64, cancel: bool) -> ItemResult<u64> {
        self.core
            .drain(
                self.now,
                Drain {
                    node: NodeId(node),
                    cancel,
                },
            )
            .replicas_left
    }

    pub fn heartbeat(&mut self, node: u64, acked: u64) -> HeartbeatResponse {
        self.report(node, acked, Vec::new(), Vec::new())
    }

    /// A heartbeat reporting replicas the node dropped as corrupt.
    pub fn lose(&mut self, node: u64, lost: &[ReplicaId]) -> HeartbeatResponse {
        self.core.heartbeat(
            self.now,
            Heartbeat {
                node: NodeId(node),
                acked: 0,
                done: Vec::new(),
                unhealthy: Vec::new(),
                lost: lost.to_vec(),
            },
        )
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
                lost: Vec::new(),
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

pub(super) fn ids(d: &[ReplicaDesc]) -> Vec<ReplicaId> {
    d.iter().map(|r| r.id).collect()
}
