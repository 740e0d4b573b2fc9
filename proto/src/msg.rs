//! Every message of the protocol, defined once. Bodies are encoded with postcard (a stable,
//! compact, varint-based serde format); object bytes never pass through it but travel as the
//! frame's raw payload.
//!
//! Every request is a batch: a single operation is a batch of one, and the response carries
//! one [`ItemResult`] per item, in request order.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{ErrorCode, ItemResult, WireError};

/// Longest key accepted anywhere (docs/design.md §3).
pub const MAX_KEY_LEN: usize = 4096;

/// A storage node's identity, chosen by the node at start-up and kept while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// A segment's identity, unique in the cluster (chosen by its node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentId(pub u64);

/// A client's identity; the writer of a put is the only one that may end or revoke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub u64);

/// One allocation handed out by the master. Unique across master restarts, so that a late
/// "free" notice never removes a newer object that reuses the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The storage tier a segment (and so a replica) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Tier {
    /// Memory: tier 1, written by clients, read at memory speed.
    #[default]
    Dram,
    /// Local disk (NVMe): tier 2, written only by its node (demotion), read through the node.
    Nvme,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Dram => "dram",
            Tier::Nvme => "nvme",
        })
    }
}

/// Checks a key against the contract: non-empty, at most [`MAX_KEY_LEN`] bytes.
pub fn check_key(key: &[u8]) -> Result<(), WireError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(WireError::new(
            ErrorCode::KeyTooLong,
            format!("key of {} bytes (allowed 1..={MAX_KEY_LEN})", key.len()),
        ));
    }
    Ok(())
}

/// Where one replica of an object lives: enough for the transfer engine to move its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDesc {
    pub id: ReplicaId,
    pub node: NodeId,
    /// The node's data endpoint, "ip:port". Shared: the master answers every replica on a
    /// node with the same allocation (a get of many keys copies no address).
    pub addr: std::sync::Arc<str>,
    pub segment: SegmentId,
    /// Where the value's bytes start in the segment (for NVMe, past the record header).
    pub offset: u64,
    pub len: u64,
    pub tier: Tier,
}

/// The opcodes. Connection opcodes (served by every server) are 0x01..0x0f, master (control
/// plane) opcodes 0x10..0x3f, storage-node (data plane) opcodes 0x40..0x5f, P/D bootstrap
/// (a producer engine's hand-off port) opcodes 0x60..0x6f. Numbers are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Hello = 0x01,
    PutStart = 0x10,
    PutEnd = 0x11,
    PutRevoke = 0x12,
    GetReplicas = 0x13,
    Exists = 0x14,
    Remove = 0x15,
    RemoveAll = 0x16,
    Status = 0x17,
    Drain = 0x18,
    ListKeys = 0x19,
    RemoveRegex = 0x1a,
    Register = 0x20,
    Heartbeat = 0x21,
    Leave = 0x22,
    Inspect = 0x2a,
    Read = 0x40,
    Write = 0x41,
    ShmInfo = 0x42,
    ShmAttach = 0x43,
    ShmCommit = 0x44,
    /// The node's replica board (which replicas it holds), for same-host clients.
    ShmBoard = 0x45,
    /// RDMA queue-pair handshake (`crate::rdma`); data-plane opcodes 0x48..0x4f are RDMA's.
    RdmaConnect = 0x48,
    /// The object tags of a put whose bytes a client wrote with one-sided RDMA WRITEs.
    RdmaWritten = 0x49,
    HandoffClaim = 0x60,
    HandoffDone = 0x61,
    HandoffAbort = 0x62,
}

impl Opcode {
    pub const ALL: &'static [Opcode] = &[
        Opcode::Hello,
        Opcode::PutStart,
        Opcode::PutEnd,
        Opcode::PutRevoke,
        Opcode::GetReplicas,
        Opcode::Exists,
        Opcode::Remove,
        Opcode::RemoveAll,
        Opcode::Status,
        Opcode::Drain,
        Opcode::ListKeys,
        Opcode::RemoveRegex,
        Opcode::Register,
        Opcode::Heartbeat,
        Opcode::Leave,
        Opcode::Inspect,
        Opcode::Read,
        Opcode::Write,
        Opcode::ShmInfo,
        Opcode::ShmAttach,
        Opcode::ShmCommit,
        Opcode::ShmBoard,
        Opcode::RdmaConnect,
        Opcode::RdmaWritten,
        Opcode::HandoffClaim,
        Opcode::HandoffDone,
        Opcode::HandoffAbort,
    ];
}

impl TryFrom<u8> for Opcode {
    type Error = WireError;
    fn try_from(v: u8) -> Result<Self, WireError> {
        Opcode::ALL
            .iter()
            .copied()
            .find(|o| *o as u8 == v)
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::UnknownOpcode,
                    format!("unknown opcode 0x{v:02x}"),
                )
            })
    }
}

/// A request message and the response it gets.
pub trait Message: Serialize + DeserializeOwned + Send + 'static {
    const OPCODE: Opcode;
    type Response: Serialize + DeserializeOwned + Send + 'static;
}

/// Encodes a body.
pub fn encode_body<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail (no I/O, no maps with non-string keys).
    postcard::to_allocvec(msg).unwrap_or_default()
}

/// Decodes a body, refusing trailing bytes. Never panics; allocation is bounded by the body's
/// length, which the header limits checked before the body was read.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(WireError::new(
            ErrorCode::MalformedBody,
            format!("{} trailing bytes after the message", rest.len()),
        )),
        Err(e) => Err(WireError::new(
            ErrorCode::MalformedBody,
            format!("body does not decode: {e}"),
        )),
    }
}

// ---------------------------------------------------------------- connection (every server)

/// The first frame of a connection: presents the cluster token. A server configured with a
/// token refuses (`Unauthorized`, then closes) a connection whose first frame is anything else
/// or carries another token; a server without one accepts and ignores it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// The protocol version the client speaks (the header's version byte today).
    pub client_version: u16,
}

/// Hand-written so that logging a `Hello` never prints the token.
impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("client_version", &self.client_version)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResponse {
    pub server_version: u16,
}

impl Message for Hello {
    const OPCODE: Opcode = Opcode::Hello;
    type Response = HelloResponse;
}

// ---------------------------------------------------------------- control plane (master)

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

// ---------------------------------------------------------------- data plane (storage node)

/// One read of a segment range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOp {
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u64,
}

/// Reads ranges; the response payload carries the bytes of the successful ops, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    pub ops: Vec<ReadOp>,
    /// Empty, or one entry per op: the replica the op's range must still hold (a client
    /// reading from a location it cached, without a fresh lookup at the master). The node
    /// answers such an op `StaleLocation` unless its inventory holds that replica's tag over
    /// the whole range, both before and after it copied the bytes.
    pub expect: Vec<Option<ReplicaId>>,
}

impl Message for Read {
    const OPCODE: Opcode = Opcode::Read;
    type Response = UnitResponse;
}

/// The status that follows each admitted op's bytes in a streamed `Read` answer
/// ([`crate::header::FLAG_STREAMED`]): two bytes, the op's error code little-endian, 0 when
/// the bytes before it are the op's. It comes after the bytes because a slower tier's read is
/// checked (its crc32c, its record header) only once its last part has landed, and the node
/// sends parts before that; the bytes of a failed op are filler of the op's length, so the
/// frame's payload length is known when its head goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStatus(pub ErrorCode);

impl ReadStatus {
    /// Bytes of a status on the wire.
    pub const LEN: usize = 2;

    pub fn encode(self) -> [u8; Self::LEN] {
        (self.0 as u16).to_le_bytes()
    }

    /// Any two bytes decode (an unknown code is kept as the catch-all, never an `Ok`).
    pub fn decode(b: [u8; Self::LEN]) -> ReadStatus {
        ReadStatus(ErrorCode::from_u16(u16::from_le_bytes(b)))
    }

    /// The payload bytes of a streamed answer: every admitted op's bytes and status.
    pub fn payload_len(admitted: impl IntoIterator<Item = u64>) -> u64 {
        admitted.into_iter().fold(0u64, |sum, len| {
            sum.saturating_add(len).saturating_add(Self::LEN as u64)
        })
    }
}

/// One write of a segment range; its bytes are the next `len` bytes of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOp {
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u64,
}

/// Names the object a replica's bytes belong to, so the node can report it after a master
/// restart. Sent once per replica, with any one of its writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectTag {
    pub replica: ReplicaId,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u64,
    pub checksum: u32,
}

/// Writes ranges from the payload (concatenated in op order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub ops: Vec<WriteOp>,
    pub tags: Vec<ObjectTag>,
}

impl Message for Write {
    const OPCODE: Opcode = Opcode::Write;
    type Response = UnitResponse;
}

/// Asks a storage node whether and how a client on its own host may map its segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmInfo {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmInfoResponse {
    pub node: NodeId,
    /// The node's host identity (boot id and host name): a client with the same identity is
    /// on the same host (kernel) and may use the socket.
    pub host: String,
    /// The node's Unix socket path, unset when the node shares no memory.
    pub socket: Option<String>,
}

impl Message for ShmInfo {
    const OPCODE: Opcode = Opcode::ShmInfo;
    type Response = ShmInfoResponse;
}

/// Asks for the node's DRAM segments as memory file descriptors. Served only on the node's
/// Unix socket: the response frame carries one descriptor per segment (`SCM_RIGHTS`), in
/// `segments` order, with its first byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmAttach {}

/// A segment handed to a same-host client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSegment {
    pub id: SegmentId,
    /// Usable bytes (ranges beyond are refused as over TCP).
    pub size: u64,
    /// Length of the memory file to map (`size` rounded up to a huge page).
    pub mapped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmAttachResponse {
    pub node: NodeId,
    pub segments: Vec<ShmSegment>,
}

impl Message for ShmAttach {
    const OPCODE: Opcode = Opcode::ShmAttach;
    type Response = ShmAttachResponse;
}

/// After a same-host client copied a put's bytes into mapped segment memory: the objects they
/// belong to, for the node's inventory (what `Write.tags` carries over TCP). One result per
/// tag; a tag naming a range outside the node's segments fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmCommit {
    pub tags: Vec<ObjectTag>,
}

impl Message for ShmCommit {
    const OPCODE: Opcode = Opcode::ShmCommit;
    type Response = UnitResponse;
}

/// Asks for the node's replica board: a memory file listing the replica ids its inventory
/// holds, which a same-host client maps read-only to check a cached location without a round
/// trip (`transport::shm::board` has the layout). Served only on the node's Unix socket, after
/// `ShmAttach`; the response frame carries the board's descriptor with its first byte. A
/// node without a board answers `TransportUnsupported`; an older node `UnknownOpcode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmBoard {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmBoardResponse {
    /// Slots in the board (a power of two).
    pub slots: u64,
}

impl Message for ShmBoard {
    const OPCODE: Opcode = Opcode::ShmBoard;
    type Response = ShmBoardResponse;
}

// ---------------------------------------------------------------- P/D bootstrap (producer)

/// A consumer announces it is about to load a hand-off: the producer keeps holding the
/// blocks (its abort timer restarts) or answers why it cannot (`TransferUnknown`,
/// `TransferAborted`, `TransferExpired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffClaim {
    pub transfer_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffClaimResponse {
    /// Blocks held for this transfer.
    pub blocks: u32,
}

impl Message for HandoffClaim {
    const OPCODE: Opcode = Opcode::HandoffClaim;
    type Response = HandoffClaimResponse;
}

/// The consumer loaded every block: the producer releases its hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffDone {
    pub transfer_id: String,
}

/// The answer to [`HandoffDone`] and [`HandoffAbort`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffAck {}

impl Message for HandoffDone {
    const OPCODE: Opcode = Opcode::HandoffDone;
    type Response = HandoffAck;
}

/// The consumer gives up (its timeout, a failed load, the request aborted): the producer
/// releases its hold and counts the transfer as aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffAbort {
    pub transfer_id: String,
    pub reason: String,
}

impl Message for HandoffAbort {
    const OPCODE: Opcode = Opcode::HandoffAbort;
    type Response = HandoffAck;
}

#[cfg(test)]
mod tests {

    /// A streamed read's op status: two bytes, little-endian, 0 for success; any two bytes
    /// decode, and a code this build does not know is never read as success.
    #[test]
    fn read_status_bytes_are_pinned() {
        assert_eq!(ReadStatus(ErrorCode::Ok).encode(), [0, 0]);
        let nf = ReadStatus(ErrorCode::NotFound).encode();
        assert_eq!(u16::from_le_bytes(nf), ErrorCode::NotFound as u16);
        assert_eq!(ReadStatus::decode(nf), ReadStatus(ErrorCode::NotFound));
        assert_eq!(ReadStatus::decode([0xff, 0xfe]).0, ErrorCode::Unknown);
        assert_ne!(ErrorCode::Unknown, ErrorCode::Ok);
        assert_eq!(
            ReadStatus::payload_len([4096, 1 << 20]),
            4096 + (1 << 20) + 4
        );
        assert_eq!(
            ReadStatus::payload_len([u64::MAX, 1]),
            u64::MAX,
            "saturates"
        );
    }
    use super::*;
    use proptest::prelude::*;

    fn round_trip<T: Message + PartialEq + std::fmt::Debug>(m: &T) {
        let b = encode_body(m);
        assert_eq!(&decode_body::<T>(&b).unwrap(), m);
    }

    #[test]
    fn messages_round_trip() {
        round_trip(&PutStart {
            client: ClientId(9),
            items: vec![PutStartItem {
                key: b"k".to_vec(),
                len: 5,
                options: PutOptions::default(),
            }],
        });
        round_trip(&Write {
            ops: vec![WriteOp {
                segment: SegmentId(1),
                offset: 2,
                len: 3,
            }],
            tags: vec![ObjectTag {
                replica: ReplicaId(4),
                key: vec![1, 2],
                segment: SegmentId(1),
                offset: 2,
                len: 3,
                checksum: 7,
            }],
        });
    }

    #[test]
    fn golden_body() {
        // postcard: varint lengths and integers; pins the body encoding across releases.
        let b = encode_body(&Exists {
            keys: vec![b"ab".to_vec()],
            lease: true,
        });
        assert_eq!(b, vec![1, 2, b'a', b'b', 1]);
        let b = encode_body(&UnitResponse {
            items: vec![Ok(()), Err(WireError::new(ErrorCode::NotFound, "x"))],
        });
        assert_eq!(b, vec![2, 0, 1, 200, 1, 1, b'x']);
    }

    #[test]
    fn hello_golden_bytes() {
        // Pinned: a Hello is what every client sends first, across versions.
        let hello = Hello {
            token: b"tok".to_vec(),
            client_version: 1,
        };
        let b = encode_body(&hello);
        assert_eq!(b, vec![3, b't', b'o', b'k', 1]);
        assert_eq!(decode_body::<Hello>(&b).unwrap(), hello);
        // client_version is a varint: 300 takes two bytes.
        let b = encode_body(&Hello {
            token: Vec::new(),
            client_version: 300,
        });
        assert_eq!(b, vec![0, 0xac, 0x02]);
        let b = encode_body(&HelloResponse { server_version: 1 });
        assert_eq!(b, vec![1]);
        assert_eq!(
            decode_body::<HelloResponse>(&b).unwrap(),
            HelloResponse { server_version: 1 }
        );
        assert_eq!(Opcode::try_from(0x01).unwrap(), Opcode::Hello);
        assert!(!format!("{hello:?}").contains("116, 111, 107"));
    }

    #[test]
    fn remove_all_golden_bytes() {
        let b = encode_body(&RemoveAll {
            force: true,
            prefix: Some(b"t\0".to_vec()),
        });
        assert_eq!(b, vec![1, 1, 2, b't', 0]);
        let b = encode_body(&RemoveAll {
            force: false,
            prefix: None,
        });
        assert_eq!(b, vec![0, 0]);
    }

    #[test]
    fn list_remove_regex_and_leave_golden_bytes() {
        let b = encode_body(&ListKeys {
            prefix: b"t\0".to_vec(),
            start_after: Some(b"a".to_vec()),
            limit: 300,
        });
        assert_eq!(b, vec![2, b't', 0, 1, 1, b'a', 0xac, 0x02]);
        let b = encode_body(&ListKeysResponse {
            keys: vec![b"a".to_vec(), b"bc".to_vec()],
            more: true,
        });
        assert_eq!(b, vec![2, 1, b'a', 2, b'b', b'c', 1]);
        let b = encode_body(&RemoveRegex {
            pattern: "^a".to_string(),
            prefix: None,
            force: true,
        });
        assert_eq!(b, vec![2, b'^', b'a', 0, 1]);
        assert_eq!(encode_body(&Leave { node: NodeId(300) }), vec![0xac, 0x02]);
    }

    #[test]
    fn docs_list_every_opcode() {
        let doc = include_str!("../../docs/protocol.md");
        for &o in Opcode::ALL {
            let row = format!("| 0x{:02x} | {o:?} |", o as u8);
            assert!(doc.contains(&row), "docs/protocol.md lacks the row `{row}`");
        }
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut b = encode_body(&Remove {
            keys: vec![],
            force: false,
        });
        b.push(0);
        assert_eq!(
            decode_body::<Remove>(&b).unwrap_err().code,
            ErrorCode::MalformedBody
        );
    }

    #[test]
    fn opcodes_are_unique() {
        for o in Opcode::ALL {
            assert_eq!(Opcode::try_from(*o as u8).unwrap(), *o);
        }
        assert_eq!(
            Opcode::try_from(0xEE).unwrap_err().code,
            ErrorCode::UnknownOpcode
        );
    }

    proptest! {
        // Every decoder, fed arbitrary bytes, returns a value or an error and never panics.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_body::<Hello>(&bytes);
            let _ = decode_body::<HelloResponse>(&bytes);
            let _ = decode_body::<PutStart>(&bytes);
            let _ = decode_body::<PutStartResponse>(&bytes);
            let _ = decode_body::<PutEnd>(&bytes);
            let _ = decode_body::<UnitResponse>(&bytes);
            let _ = decode_body::<GetReplicas>(&bytes);
            let _ = decode_body::<GetReplicasResponse>(&bytes);
            let _ = decode_body::<Exists>(&bytes);
            let _ = decode_body::<ExistsResponse>(&bytes);
            let _ = decode_body::<Remove>(&bytes);
            let _ = decode_body::<RemoveAll>(&bytes);
            let _ = decode_body::<RemoveAllResponse>(&bytes);
            let _ = decode_body::<StatusResponse>(&bytes);
            let _ = decode_body::<ListKeys>(&bytes);
            let _ = decode_body::<ListKeysResponse>(&bytes);
            let _ = decode_body::<RemoveRegex>(&bytes);
            let _ = decode_body::<Leave>(&bytes);
            let _ = decode_body::<Register>(&bytes);
            let _ = decode_body::<RegisterResponse>(&bytes);
            let _ = decode_body::<Heartbeat>(&bytes);
            let _ = decode_body::<HeartbeatResponse>(&bytes);
            let _ = decode_body::<Read>(&bytes);
            let _ = decode_body::<Write>(&bytes);
        }

        #[test]
        fn huge_declared_lengths_do_not_allocate(n in 1u64 << 40..u64::MAX >> 8) {
            // A varint length far beyond the body must fail, not reserve memory.
            let mut b = Vec::new();
            let mut v = n;
            while v >= 0x80 { b.push((v as u8) | 0x80); v >>= 7; }
            b.push(v as u8);
            prop_assert!(decode_body::<Read>(&b).is_err());
        }
    }
}
