//! The P/D bootstrap: a consumer engine claims, finishes or aborts a producer's hand-off.

use serde::{Deserialize, Serialize};

use super::*;

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
