//! The control plane: clients and storage nodes to the master.

use serde::{Deserialize, Serialize};

use super::*;

/// How a put wants its object placed and kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOptions {
    /// Replicas wanted on distinct nodes (best effort, at least one) [1].
    pub replicas: u8,
    /// Nodes to try first, in order (e.g. the writer's own node).
    pub preferred_nodes: Vec<NodeId>,
    /// Keep the object out of the first eviction pass for the soft-pin TTL [30 min].
    pub soft_pin: bool,
    /// Never evict; only a forced remove deletes it.
    pub hard_pin: bool,
    /// Replace a committed value instead of failing with `AlreadyExists`.
    pub overwrite: bool,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            replicas: 1,
            preferred_nodes: Vec::new(),
            soft_pin: false,
            hard_pin: false,
            overwrite: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutStartItem {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub len: u64,
    pub options: PutOptions,
}

/// Phase one of a put: allocate replicas, status Processing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutStart {
    pub client: ClientId,
    pub items: Vec<PutStartItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutStartResponse {
    pub items: Vec<ItemResult<Vec<ReplicaDesc>>>,
}

impl Message for PutStart {
    const OPCODE: Opcode = Opcode::PutStart;
    type Response = PutStartResponse;
}

/// Phase two: the bytes are written; make the object readable.
///
/// The checksum travels here, not in `PutStart`, because the writer computes it while it
/// copies the bytes (one pass over the value instead of two).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutEnd {
    pub client: ClientId,
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
    /// crc32c of each key's value as written, one per key.
    pub checksums: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitResponse {
    pub items: Vec<ItemResult<()>>,
}

impl Message for PutEnd {
    const OPCODE: Opcode = Opcode::PutEnd;
    type Response = UnitResponse;
}

/// Abandons a put and frees its space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRevoke {
    pub client: ClientId,
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
}

impl Message for PutRevoke {
    const OPCODE: Opcode = Opcode::PutRevoke;
    type Response = UnitResponse;
}

/// Where a committed object lives; grants a read lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReplicas {
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub len: u64,
    pub checksum: u32,
    pub replicas: Vec<ReplicaDesc>,
    /// The lease granted, counted by the reader from when it sent the request.
    pub lease_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReplicasResponse {
    pub items: Vec<ItemResult<ObjectInfo>>,
}

impl Message for GetReplicas {
    const OPCODE: Opcode = Opcode::GetReplicas;
    type Response = GetReplicasResponse;
}

/// Whether keys are committed; with `lease`, also grants read leases on the present ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exists {
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
    pub lease: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistsResponse {
    pub items: Vec<ItemResult<bool>>,
}

impl Message for Exists {
    const OPCODE: Opcode = Opcode::Exists;
    type Response = ExistsResponse;
}

/// Removes committed objects; leased or hard-pinned ones only with `force`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remove {
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
    pub force: bool,
}

impl Message for Remove {
    const OPCODE: Opcode = Opcode::Remove;
    type Response = UnitResponse;
}

/// Removes every committed object (leased and pinned ones only with `force`); with `prefix`,
/// only the objects whose key starts with it (a tenant's keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveAll {
    pub force: bool,
    #[serde(with = "serde_bytes")]
    pub prefix: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveAllResponse {
    pub removed: u64,
}

impl Message for RemoveAll {
    const OPCODE: Opcode = Opcode::RemoveAll;
    type Response = RemoveAllResponse;
}

/// Most keys one [`ListKeys`] answer carries, whatever its `limit`: 10 000 keys of at most
/// 4 KiB stay below the 64 MiB body limit.
pub const MAX_LIST_KEYS: u32 = 10_000;

/// One page of the committed keys that start with `prefix`, in byte order: the first `limit`
/// (at most [`MAX_LIST_KEYS`]) keys after `start_after` (from the first key when `None`).
/// The next page starts after the last key of this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListKeys {
    #[serde(with = "serde_bytes")]
    pub prefix: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub start_after: Option<Vec<u8>>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListKeysResponse {
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
    /// Whether keys after the last one listed match too.
    pub more: bool,
}

impl Message for ListKeys {
    const OPCODE: Opcode = Opcode::ListKeys;
    type Response = ListKeysResponse;
}

/// Longest pattern [`RemoveRegex`] accepts, in bytes.
pub const MAX_PATTERN_LEN: usize = 64 << 10;

/// Removes the committed objects whose key, after `prefix`, matches the regular expression
/// `pattern` anywhere (a search, not a full match: anchor with `^...$`), in the syntax of the
/// `regex` crate. With `prefix` (a tenant's), only keys that start with it are candidates and
/// the pattern sees the rest of the key. Leased and hard-pinned objects go only with `force`,
/// exactly as for [`RemoveAll`]. A malformed or oversized pattern is answered
/// `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRegex {
    pub pattern: String,
    #[serde(with = "serde_bytes")]
    pub prefix: Option<Vec<u8>>,
    pub force: bool,
}

impl Message for RemoveRegex {
    const OPCODE: Opcode = Opcode::RemoveRegex;
    type Response = RemoveAllResponse;
}

/// Where the master publishes its location index (`kvpool_transport::shm::index`): a file a
/// client on the master's host (the same `host` identity) maps read-only, to find keys'
/// replicas without asking. `path` unset: the master keeps none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterIndex {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterIndexResponse {
    /// The master's host identity (boot id, host name, network namespace).
    pub host: String,
    pub path: Option<String>,
    pub slots: u64,
}

impl Message for MasterIndex {
    const OPCODE: Opcode = Opcode::MasterIndex;
    type Response = MasterIndexResponse;
}

/// Keys a client read through the master's location index, reported after the reads: the
/// master does for each what a lookup does besides answering (the read lease, recency, the
/// read count, NVMe hits), and answers only whether it found it (`NotFound` otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
}

impl Message for Touch {
    const OPCODE: Opcode = Opcode::Touch;
    type Response = UnitResponse;
}

/// The cluster's state, for `kvpool status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentStatus {
    pub id: SegmentId,
    pub tier: Tier,
    pub capacity: u64,
    pub used: u64,
    pub objects: u64,
    /// False after the node reported an I/O error or a full disk on it.
    pub healthy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    pub alive: bool,
    /// Milliseconds since the last heartbeat.
    pub silent_ms: u64,
    /// Frees queued for the node that it has not acknowledged yet.
    pub pending_frees: u64,
    /// Commit notices queued for the node that it has not acknowledged yet (until then, a
    /// failover treats those puts as unconfirmed).
    pub pending_commits: u64,
    /// Being drained: it gets no new data and its replicas are being released.
    pub draining: bool,
    pub segments: Vec<SegmentStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub nodes: Vec<NodeStatus>,
    /// Committed objects.
    pub objects: u64,
    /// Puts between start and end.
    pub processing: u64,
    pub evictions: u64,
}

impl Message for Status {
    const OPCODE: Opcode = Opcode::Status;
    type Response = StatusResponse;
}

/// Starts (or, with `cancel`, stops) the graceful drain of a node: it takes no new data and
/// its replicas are released (those with a copy elsewhere at once, leased ones when their
/// lease ends), so it can leave without readers hitting a vanished node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub node: NodeId,
    pub cancel: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainResponse {
    /// Replicas still on the node, or why the drain was refused (an unknown node).
    pub replicas_left: ItemResult<u64>,
}

impl Message for Drain {
    const OPCODE: Opcode = Opcode::Drain;
    type Response = DrainResponse;
}

/// A segment a node contributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub id: SegmentId,
    pub size: u64,
    pub tier: Tier,
}

/// One object a node holds, as it reports it when it (re-)registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEntry {
    pub replica: ReplicaId,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u64,
    pub checksum: u32,
    /// What the node knows of the put's commit: a new master admits only what may have been
    /// acknowledged, and restores pins.
    pub commit: CommitState,
}

/// What a node knows of a replica's commit (docs/reliability.md, "Failover keeps the
/// contract").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitState {
    /// A master told the node (a [`CommitNotice`]) that the put was committed, with its pins.
    Committed { hard_pin: bool, soft_pin: bool },
    /// Written, and no commit heard of yet: the put may have been committed just before the
    /// master that knew of it went away. Admitted (losing an acknowledged put is worse).
    Unconfirmed,
    /// Written, and no commit heard of although the master answered a heartbeat sent long
    /// enough after the write that it would have told: never committed. Refused.
    Abandoned,
}

/// A master tells a node that a replica it holds belongs to a committed object, and how the
/// object is pinned, so the node's inventory can say so to a later master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitNotice {
    pub replica: ReplicaId,
    pub hard_pin: bool,
    pub soft_pin: bool,
}

/// A node joins (or re-joins) the pool, reporting what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub node: NodeId,
    pub name: String,
    pub addr: String,
    pub segments: Vec<SegmentInfo>,
    pub inventory: Vec<InventoryEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub heartbeat_ms: u64,
    /// Reported replicas the master did not admit; the node forgets them.
    pub rejected: Vec<ReplicaId>,
}

impl Message for Register {
    const OPCODE: Opcode = Opcode::Register;
    type Response = RegisterResponse;
}

/// A node's liveness signal; acknowledges the frees it has applied and reports finished tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: NodeId,
    /// The highest `frees_upto` the node has applied.
    pub acked: u64,
    /// Tasks finished since the last heartbeat.
    pub done: Vec<TaskDone>,
    /// Segments that failed (I/O error, full disk) and should get no new data.
    pub unhealthy: Vec<SegmentId>,
    /// Replicas the node found it cannot serve (a corrupt or torn NVMe record) and has
    /// dropped on its own since its last heartbeat. The master forgets them at once, so
    /// lookups stop counting them; objects left without a replica become misses.
    pub lost: Vec<ReplicaId>,
}

/// A copy the master asks a node to make: between two of its own segments (demotion, DRAM to
/// NVMe; promotion, NVMe to DRAM), or from another node's segment into its own (a drain's
/// move, `from_addr` set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTask {
    pub id: u64,
    /// The replica the copy creates.
    pub replica: ReplicaId,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub len: u64,
    pub checksum: u32,
    pub from: SegmentId,
    /// Where the value starts in `from`.
    pub from_offset: u64,
    pub to: SegmentId,
    /// Where the value goes in `to`; for an NVMe segment, the start of the record (header
    /// first, see [`crate::layout`]).
    pub to_offset: u64,
    /// The data address of the node holding `from` when that is another node (a drain moving
    /// a sole copy away): the node running the task reads the value from there. `None`: both
    /// segments are the node's own.
    pub from_addr: Option<String>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDone {
    pub id: u64,
    pub result: ItemResult<()>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The master does not know the node (it restarted, or declared the node dead).
    pub need_register: bool,
    /// Replicas the master freed (removed, evicted, revoked) that the node should forget.
    pub frees: Vec<ReplicaId>,
    /// Sequence number of the last notice (free or commit) in this response; the node acks
    /// it in its next heartbeat.
    pub frees_upto: u64,
    /// Copies to make (each is sent once; the node reports it in `Heartbeat.done`).
    pub tasks: Vec<CopyTask>,
    /// Replicas of puts committed (or admitted from an inventory) since the node's last ack,
    /// in the same sequence as `frees`: the node applies these first.
    pub commits: Vec<CommitNotice>,
    /// More notices wait than one response carries: the node must not conclude from this
    /// response that a put it has not heard of was never committed.
    pub more: bool,
}

impl Message for Heartbeat {
    const OPCODE: Opcode = Opcode::Heartbeat;
    type Response = HeartbeatResponse;
}

/// A node shutting down leaves the pool: the master drops it at once, as if it had been
/// declared dead (its segments and replicas go; objects left without a replica are misses).
/// Answered with one item: `()`, or `UnknownNode` for a node the master does not know (never
/// registered, already left or declared dead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    pub node: NodeId,
}

impl Message for Leave {
    const OPCODE: Opcode = Opcode::Leave;
    type Response = UnitResponse;
}

/// What the master knows of objects, for operators (`kvpool inspect`): read-only, so it
/// grants no lease and counts as no use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspect {
    #[serde(with = "crate::bytes::many")]
    pub keys: Vec<Vec<u8>>,
}

/// One replica as [`Inspect`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDetail {
    pub replica: ReplicaDesc,
    /// `ready`, `filling` (a copy's target, not readable yet) or `leaving` (being demoted).
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectDetail {
    pub len: u64,
    pub checksum: u32,
    /// `complete`, or `processing` for a put not ended yet.
    pub state: String,
    pub replicas: Vec<ReplicaDetail>,
    /// Milliseconds left of the longest read lease held on it (0: none).
    pub lease_left_ms: u64,
    /// Milliseconds left of its soft pin; `None` when it has none.
    pub soft_pin_left_ms: Option<u64>,
    pub hard_pin: bool,
    /// Lookups since it was committed.
    pub reads: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectResponse {
    pub items: Vec<ItemResult<ObjectDetail>>,
}

impl Message for Inspect {
    const OPCODE: Opcode = Opcode::Inspect;
    type Response = InspectResponse;
}
