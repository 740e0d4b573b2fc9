//! The master's sans-I/O state machine.
//!
//! [`MasterCore`] holds the object map, the cluster's nodes and segments, and the frees queued
//! for nodes. Every request is a batch and gets one result per item, in order. Time comes in as
//! `now`, a monotonic [`Duration`] since an arbitrary epoch, so the core has no clock, socket or
//! thread of its own and tests drive it deterministically.
//!
//! Layout, one reason to change per module:
//! - `objects`: the object table and the lifecycle helpers every rule shares (drop, touch).
//! - `puts`: the two-phase put (start, end, revoke, zombie preemption and release).
//! - `reads`: lookups, leases and removal.
//! - `placement`: which segments get a new object's replicas.
//! - `eviction`: freeing the coldest replicas of a segment; the watermark passes.
//! - `tiering`: demotion of DRAM victims to NVMe and promotion of NVMe-only objects.
//! - `tasks`: the copy tasks those issue, their delivery in heartbeats and their outcome.
//! - `membership`: nodes, segments, inventories, liveness and the per-node free queues.
//! - `fences`: remove fences, so that a removed object never comes back from an inventory.
//! - `invariants`: a self-check used by tests and available to the server's debug endpoints.

mod drain;
mod eviction;
mod fences;
mod index;
mod inspect;
mod invariants;
mod membership;
mod objects;
mod placement;
mod puts;
mod reads;
mod stats;
mod tasks;
mod tiering;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;

use std::collections::BTreeMap;
use std::time::Duration;

use kvpool_proto::{
    ErrorCode, Exists, ExistsResponse, GetReplicas, GetReplicasResponse, Heartbeat,
    HeartbeatResponse, Leave, ListKeys, ListKeysResponse, PutEnd, PutRevoke, PutStart,
    PutStartResponse, Register, RegisterResponse, Remove, RemoveAll, RemoveAllResponse,
    RemoveRegex, StatusResponse, UnitResponse, WireError, MAX_LIST_KEYS,
};

use self::membership::Cluster;
use self::objects::{ObjectTable, Replica};
pub use self::stats::ObjectStats;
use self::tasks::Tasks;
use crate::alloc::DEFAULT_ALIGN;

pub use self::tiering::Admission;

/// The master's tunables. Defaults follow Mooncake (docs/design.md §3).
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    /// How long a lookup's read lease keeps an object from removal and eviction [10 s].
    pub lease_ttl: Duration,
    /// How long a soft-pinned object stays out of the first eviction pass, counted from its
    /// commit [30 min].
    pub soft_pin_ttl: Duration,
    /// After this, a new `PutStart` of the key preempts a put still Processing [30 s].
    pub put_discard_timeout: Duration,
    /// After this (counted from the put's start), the space of a put that never ended is
    /// freed, preempted or not [600 s].
    pub put_release_timeout: Duration,
    /// A node silent this long is dead: its segments and replicas are dropped [10 s].
    pub node_ttl: Duration,
    /// The heartbeat period nodes are told to use in `RegisterResponse` [1 s].
    pub heartbeat_interval: Duration,
    /// A DRAM segment whose used fraction (not counting replicas being demoted) exceeds this
    /// is evicted from in `tick` [0.90].
    pub high_watermark: f64,
    /// The fraction of a segment's capacity one eviction frees at least [0.05].
    pub eviction_ratio: f64,
    /// Whether soft-pinned objects may go in a second eviction pass [true].
    pub allow_evict_soft_pinned: bool,
    /// Largest value accepted by `PutStart` [1 GiB].
    pub max_value_len: u64,
    /// Alignment of replica offsets and lengths inside a segment [64 B, a cache line]. Must
    /// stay the same across master restarts, or re-registered inventories are rejected.
    pub alloc_align: u64,
    /// An NVMe segment whose used fraction exceeds this is evicted from in `tick`, coldest
    /// first [0.90]...
    pub nvme_high_watermark: f64,
    /// ...until its used fraction is at most this [0.80].
    pub nvme_low_watermark: f64,
    /// What goes to the node's NVMe: every object at commit, or which DRAM eviction victims
    /// are demoted rather than dropped [`Admission::WriteThrough`].
    pub nvme_admission: Admission,
    /// Lookups served from NVMe alone after which an object is promoted back to DRAM [2];
    /// 0: never (reads move nothing, and clients may cache NVMe locations).
    pub promote_after_hits: u32,
    /// A copy task not reported done within this is failed [60 s].
    pub task_timeout: Duration,
    /// How long a removed key stays fenced: a node holding an old replica of it that
    /// registers within this cannot bring it back [1 h] (docs/reliability.md).
    pub remove_fence_ttl: Duration,
}

impl CoreConfig {
    /// Whether reads move objects back to DRAM (`promote_after_hits` 0: never).
    pub fn promotes(&self) -> bool {
        self.promote_after_hits > 0
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            lease_ttl: Duration::from_secs(10),
            soft_pin_ttl: Duration::from_secs(30 * 60),
            put_discard_timeout: Duration::from_secs(30),
            put_release_timeout: Duration::from_secs(600),
            node_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            high_watermark: 0.90,
            eviction_ratio: 0.05,
            allow_evict_soft_pinned: true,
            max_value_len: 1 << 30,
            alloc_align: DEFAULT_ALIGN,
            nvme_high_watermark: 0.90,
            nvme_low_watermark: 0.80,
            nvme_admission: Admission::WriteThrough,
            promote_after_hits: 2,
            task_timeout: Duration::from_secs(60),
            remove_fence_ttl: Duration::from_secs(3600),
        }
    }
}

/// The most frees one heartbeat response carries; the rest follow in later heartbeats. Keeps
/// a response far below the frame body limit after a mass removal.
pub const MAX_FREES_PER_HEARTBEAT: usize = 65_536;

/// The most copy tasks one heartbeat response carries (a task holds a key of up to 4 KiB, so
/// this keeps a response far below the frame body limit); the rest follow in later ones.
pub const MAX_TASKS_PER_HEARTBEAT: usize = 1_024;

/// The master's state machine. See the module docs.
#[derive(Debug)]
pub struct MasterCore {
    cfg: CoreConfig,
    objects: ObjectTable,
    cluster: Cluster,
    /// Replicas of preempted puts, keyed by (release time, tie-breaker). Their space stays
    /// allocated until then because the old writer may still be writing into it.
    discarded: BTreeMap<(Duration, u64), Replica>,
    discard_seq: u64,
    /// Copy tasks issued and not yet ended.
    tasks: Tasks,
    id_base: u64,
    next_replica: u64,
    next_task: u64,
    /// Logical clock for access recency: bumped on every commit and read.
    access_clock: u64,
    /// Rotates the first segment tried by placement so load spreads.
    rotor: u64,
    evictions: u64,
    /// Evictions not yet reported in an `eviction burst` log line.
    eviction_log: eviction::BurstLog,
    /// Replicas nodes reported lost (corrupt or unreadable) since this core started.
    lost_replicas: u64,
    /// Removed keys whose old replicas registration refuses.
    fences: fences::Fences,
    /// When this core first ran (its first tick or put): a master (or a new HA leader) with
    /// no node yet is young for a node TTL, while its nodes register.
    born: Option<Duration>,
}

impl MasterCore {
    /// A master with no nodes and no objects. Replica ids are `id_base + n`; the server passes
    /// wall-clock nanoseconds so that ids (and free sequence numbers) stay unique and
    /// increasing across master restarts.
    pub fn new(cfg: CoreConfig, id_base: u64) -> Self {
        MasterCore {
            cfg,
            objects: ObjectTable::default(),
            cluster: Cluster::new(id_base),
            discarded: BTreeMap::new(),
            discard_seq: 0,
            tasks: Tasks::default(),
            id_base,
            next_replica: 0,
            next_task: 0,
            access_clock: 0,
            rotor: 0,
            evictions: 0,
            eviction_log: eviction::BurstLog::default(),
            lost_replicas: 0,
            fences: fences::Fences::default(),
            born: None,
        }
    }

    /// The configuration in effect.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Phase one of puts: allocates replicas, status Processing.
    pub fn put_start(&mut self, now: Duration, req: PutStart) -> PutStartResponse {
        let items = req
            .items
            .into_iter()
            .map(|item| self.put_start_one(now, req.client, item))
            .collect();
        PutStartResponse { items }
    }

    /// Phase two of puts: the writer's bytes are in place; the objects become readable.
    pub fn put_end(&mut self, now: Duration, req: PutEnd) -> UnitResponse {
        if req.checksums.len() != req.keys.len() {
            let e = WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "PutEnd with {} checksums for {} keys",
                    req.checksums.len(),
                    req.keys.len()
                ),
            );
            return UnitResponse {
                items: req.keys.iter().map(|_| Err(e.clone())).collect(),
            };
        }
        let items = req
            .keys
            .iter()
            .zip(req.checksums)
            .map(|(k, crc)| self.put_end_one(now, req.client, k, crc))
            .collect();
        UnitResponse { items }
    }

    /// Abandons puts and frees their space.
    pub fn put_revoke(&mut self, _now: Duration, req: PutRevoke) -> UnitResponse {
        let items = req
            .keys
            .iter()
            .map(|k| self.put_revoke_one(req.client, k))
            .collect();
        UnitResponse { items }
    }

    /// Where committed objects live; grants read leases.
    pub fn get_replicas(&mut self, now: Duration, req: GetReplicas) -> GetReplicasResponse {
        let items = req
            .keys
            .iter()
            .map(|k| self.get_replicas_one(now, k))
            .collect();
        GetReplicasResponse { items }
    }

    /// Reads served by the location index, recorded as their lookups would have been.
    pub fn served_reads(
        &mut self,
        now: Duration,
        req: kvpool_proto::Touch,
    ) -> kvpool_proto::UnitResponse {
        let items = req.keys.iter().map(|k| self.touch_one(now, k)).collect();
        kvpool_proto::UnitResponse { items }
    }

    /// Whether keys are committed; with `req.lease`, also leases the present ones.
    pub fn exists(&mut self, now: Duration, req: Exists) -> ExistsResponse {
        let items = req
            .keys
            .iter()
            .map(|k| self.exists_one(now, k, req.lease))
            .collect();
        ExistsResponse { items }
    }

    /// Removes committed objects, fencing each key removed (or found absent) so that no old
    /// replica of it comes back; the server persists the fences ([`Self::take_unsaved_fences`])
    /// before it answers.
    pub fn remove(&mut self, now: Duration, req: Remove) -> UnitResponse {
        let items = req
            .keys
            .iter()
            .map(|k| self.remove_one(now, k, req.force))
            .collect();
        UnitResponse { items }
    }

    /// Removes every committed object (leased and hard-pinned ones only with force); with a
    /// prefix, only the objects whose key starts with it (one tenant's keys).
    pub fn remove_all(&mut self, now: Duration, req: RemoveAll) -> RemoveAllResponse {
        let prefix = req.prefix.as_deref().unwrap_or(&[]);
        RemoveAllResponse {
            removed: self.remove_matching(now, req.force, prefix, |_| true),
        }
    }

    /// `remove_all` of the keys whose bytes after the prefix match a regular expression
    /// anywhere (`Regex::is_match`: a search, like `std::regex_search`; `^...$` anchors it).
    /// A malformed or oversized pattern is `InvalidArgument`, and nothing is removed.
    pub fn remove_regex(
        &mut self,
        now: Duration,
        req: RemoveRegex,
    ) -> Result<RemoveAllResponse, WireError> {
        let re = reads::key_regex(&req.pattern)?;
        let prefix = req.prefix.as_deref().unwrap_or(&[]);
        Ok(RemoveAllResponse {
            removed: self.remove_matching(now, req.force, prefix, |rest| re.is_match(rest)),
        })
    }

    /// A page of committed keys with a prefix, in byte order; `limit` is capped at
    /// [`MAX_LIST_KEYS`]. Takes no lease and changes no recency: listing is not a use.
    pub fn list_keys(&self, req: ListKeys) -> ListKeysResponse {
        let limit = req.limit.min(MAX_LIST_KEYS) as usize;
        let (keys, more) = self.list_keys_inner(&req.prefix, req.start_after.as_deref(), limit);
        ListKeysResponse { keys, more }
    }

    /// The cluster's state.
    pub fn status(&self, now: Duration) -> StatusResponse {
        StatusResponse {
            nodes: self.cluster.node_status(now, self.cfg.node_ttl),
            objects: self.objects.complete_count(),
            processing: self.objects.processing_count(),
            evictions: self.evictions,
        }
    }

    /// A node joins or re-joins, reporting its segments and what they hold.
    pub fn register(&mut self, now: Duration, req: Register) -> RegisterResponse {
        self.register_inner(now, req)
    }

    /// A node shutting down leaves: it is dropped at once, exactly as a node declared dead
    /// (its segments and replicas go, objects left without a replica are misses). A node the
    /// master does not know gets `UnknownNode`.
    pub fn leave(&mut self, _now: Duration, req: Leave) -> UnitResponse {
        UnitResponse {
            items: vec![self.leave_inner(req.node)],
        }
    }

    /// A node's liveness signal: applies its finished tasks and failed segments; returns the
    /// frees it has not acknowledged yet and the copy tasks not sent to it yet.
    pub fn heartbeat(&mut self, now: Duration, req: Heartbeat) -> HeartbeatResponse {
        self.heartbeat_inner(now, req)
    }

    /// Periodic work (call every 10–100 ms): declares silent nodes dead, fails copy tasks past
    /// their timeout, releases the space of zombie puts, and evicts (or demotes) from segments
    /// above their high watermark.
    pub fn tick(&mut self, now: Duration) {
        self.born.get_or_insert(now);
        self.expire_nodes(now);
        self.expire_tasks(now);
        self.release_zombies(now);
        self.evict_above_watermark(now);
        self.release_draining(now);
        self.expire_fences(now);
    }

    /// Copy tasks issued and not yet ended.
    pub fn pending_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Replicas nodes reported lost (corrupt or unreadable) since this core started.
    pub fn lost_replicas(&self) -> u64 {
        self.lost_replicas
    }

    fn fresh_replica_id(&mut self) -> kvpool_proto::ReplicaId {
        self.next_replica += 1;
        kvpool_proto::ReplicaId(self.id_base.wrapping_add(self.next_replica))
    }

    /// Task ids come from the same base as replica ids, so a completion a node reports to a
    /// restarted master cannot match a task of the new one.
    fn fresh_task_id(&mut self) -> u64 {
        self.next_task += 1;
        self.id_base.wrapping_add(self.next_task)
    }

    fn next_access(&mut self) -> u64 {
        self.access_clock += 1;
        self.access_clock
    }
}

/// A wire error naming the key (shortened: keys may be 4 KiB of binary).
fn key_error(code: ErrorCode, key: &[u8], what: &str) -> WireError {
    let shown = String::from_utf8_lossy(&key[..key.len().min(64)]);
    let more = if key.len() > 64 { "…" } else { "" };
    WireError::new(code, format!("key {shown:?}{more}: {what}"))
}
