//! Every message of the protocol, defined once. Bodies are encoded with postcard (a stable,
//! compact, varint-based serde format); object bytes never pass through it but travel as the
//! frame's raw payload.
//!
//! Every request is a batch: a single operation is a batch of one, and the response carries
//! one [`ItemResult`] per item, in request order.
//!
//! By plane: this module has the opcodes, the body codec and the connection's `Hello`;
//! `master` the control plane (clients and nodes to the master), `node` the data plane
//! (clients to storage nodes: reads, writes, shared memory, RDMA), `handoff` the P/D
//! bootstrap between engines.

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
    /// Where a same-host client may reach this server without TCP (`Local`).
    Local = 0x02,
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
    /// Where the master's location index is, for same-host clients.
    MasterIndex = 0x1b,
    /// Reads a client served from the master's index: the lookups' bookkeeping, deferred.
    Touch = 0x1c,
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
    /// The node's NVMe tier files, read-only, for same-host clients.
    ShmNvme = 0x46,
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
        Opcode::Local,
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
        Opcode::MasterIndex,
        Opcode::Touch,
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
        Opcode::ShmNvme,
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

/// Asks a server for its Unix socket: a client on the same host (the same `host` identity:
/// boot id, host name and network namespace) may send its requests there instead, skipping
/// loopback TCP. Answered
/// by the transport for every RPC server; a server from before it answers `UnknownOpcode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Local {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalResponse {
    /// The server's host identity.
    pub host: String,
    /// Its Unix socket path, unset when it has none.
    pub socket: Option<String>,
}

impl Message for Local {
    const OPCODE: Opcode = Opcode::Local;
    type Response = LocalResponse;
}

mod handoff;
mod master;
mod node;

pub use handoff::*;
pub use master::*;
pub use node::*;

#[cfg(test)]
mod tests;
