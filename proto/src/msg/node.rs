//! The data plane: clients to storage nodes (reads, writes, shared memory, RDMA set-up).

use serde::{Deserialize, Serialize};

use super::*;

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

/// Asks for the node's NVMe tier files, read-only, so that a same-host client reads
/// NVMe-resident values straight off the disk (O_DIRECT) and checks each record's header
/// (replica id, length, value crc32c) as the node does (`kvpool_proto::layout`). Served only
/// on the node's Unix socket, after `ShmAttach`; the response frame carries one read-only
/// descriptor per file, in `files` order, with its first byte. A node with no NVMe tier, or
/// that does not share it, answers an empty list; an older node `UnknownOpcode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmNvme {}

/// An NVMe segment's file handed to a same-host client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmNvmeFile {
    pub segment: SegmentId,
    /// Usable bytes of the file (reads beyond are not made).
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmNvmeResponse {
    pub files: Vec<ShmNvmeFile>,
}

impl Message for ShmNvme {
    const OPCODE: Opcode = Opcode::ShmNvme;
    type Response = ShmNvmeResponse;
}
