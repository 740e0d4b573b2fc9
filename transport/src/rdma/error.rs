use std::time::Duration;

use kvpool_proto::{ErrorCode, WireError};

/// Everything that can go wrong on the RDMA path, each with a stable [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// This host (or the peer) has no usable RDMA device: no device, no kernel support, port
    /// down, or a peer that does not speak RDMA. Callers fall back to TCP.
    #[error("RDMA unavailable: {0}")]
    Unavailable(String),
    /// A verbs call failed.
    #[error("{call} failed: {source}")]
    Verbs {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Local memory in a transfer is not inside one registered region.
    #[error("local range [{addr:#x}, +{len}) is not inside one registered region")]
    NotRegistered { addr: u64, len: u64 },
    /// A registration would overlap one that exists (memory is registered once).
    #[error("[{addr:#x}, +{len}) overlaps registered region {existing} [{existing_addr:#x}, +{existing_len})")]
    Overlap {
        addr: u64,
        len: u64,
        existing: u64,
        existing_addr: u64,
        existing_len: u64,
    },
    /// An unregister while transfers still use the region.
    #[error("region {id} is in use by {pins} transfer batch(es)")]
    Busy { id: u64, pins: u32 },
    /// The peer's region does not exist or does not hold the whole range.
    #[error("remote region {region}: [{offset}, +{len}) {why}")]
    RemoteRange {
        region: u64,
        offset: u64,
        len: u64,
        why: &'static str,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The peer's handshake was refused (by us or by it).
    #[error("RDMA handshake: {0}")]
    Handshake(WireError),
    /// A work request completed with an error status (the lane's QP is now in the error state).
    #[error("work request failed: {status_name} (status {status}, vendor error {vendor_err:#x})")]
    Completion {
        status: u32,
        status_name: &'static str,
        vendor_err: u32,
    },
    /// Never executed: an earlier work request on the same lane failed first.
    #[error("work request flushed: an earlier one on its lane failed ({0})")]
    Flushed(String),
    #[error("RDMA batch timed out after {after:?}")]
    Timeout { after: Duration },
    /// The TCP connection the handshake runs on failed.
    #[error("RDMA handshake connection: {0}")]
    Connection(crate::TransportError),
}

impl RdmaError {
    /// The stable code for this error, as a caller would report it.
    pub fn code(&self) -> ErrorCode {
        match self {
            // What a node without a device answers too.
            RdmaError::Unavailable(_) => ErrorCode::TransportUnsupported,
            RdmaError::Verbs { .. } | RdmaError::Completion { .. } | RdmaError::Flushed(_) => {
                ErrorCode::Io
            }
            RdmaError::NotRegistered { .. }
            | RdmaError::Overlap { .. }
            | RdmaError::Busy { .. }
            | RdmaError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            RdmaError::RemoteRange { .. } => ErrorCode::OutOfRange,
            RdmaError::Handshake(w) => w.code,
            RdmaError::Timeout { .. } => ErrorCode::Timeout,
            RdmaError::Connection(t) => t.code(),
        }
    }

    /// Whether the caller should use TCP for this peer instead: no device here, or a peer
    /// without RDMA (`TransportUnsupported`; `WrongService` from a node before that code),
    /// from before RDMA (`UnknownOpcode`) or speaking another handshake version
    /// (`UnsupportedVersion`).
    pub fn is_fallback(&self) -> bool {
        match self {
            RdmaError::Unavailable(_) => true,
            RdmaError::Handshake(w) => matches!(
                w.code,
                ErrorCode::TransportUnsupported
                    | ErrorCode::WrongService
                    | ErrorCode::UnknownOpcode
                    | ErrorCode::UnsupportedVersion
            ),
            _ => false,
        }
    }

    /// Whether the same transfer may succeed on new lanes (or over TCP).
    pub fn is_retryable(&self) -> bool {
        match self {
            RdmaError::Completion { .. } | RdmaError::Flushed(_) | RdmaError::Timeout { .. } => {
                true
            }
            RdmaError::Connection(t) => t.is_retryable(),
            _ => false,
        }
    }

    pub fn into_wire(self) -> WireError {
        WireError::new(self.code(), self.to_string())
    }
}

impl From<WireError> for RdmaError {
    fn from(w: WireError) -> Self {
        RdmaError::Handshake(w)
    }
}
