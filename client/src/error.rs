use kvpool_proto::{ErrorCode, WireError};
use kvpool_transport::TransportError;

/// What a client operation can fail with. Every variant maps to a stable [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The master or a storage node refused the operation.
    #[error("{0}")]
    Remote(WireError),
    /// The request or its bytes could not be moved.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The caller's buffer cannot hold the value.
    #[error("buffer of {have} bytes is too small for a value of {need}")]
    BufferTooSmall { need: u64, have: u64 },
    /// Every replica was tried and none gave back the bytes that were put.
    #[error("no replica of the object could be read: {last}")]
    NoReadableReplica { last: Box<ClientError> },
    /// The bytes read differ from what the writer put (a torn read or corruption).
    #[error("checksum mismatch: read {got:08x}, object has {want:08x}")]
    ChecksumMismatch { want: u32, got: u32 },
    /// The read lease ended before the transfer did; the bytes may have been overwritten.
    #[error("read lease expired during the transfer")]
    LeaseExpired,
    #[error("{op} did not finish within {after:?}")]
    Deadline {
        op: &'static str,
        after: std::time::Duration,
    },
}

impl ClientError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Remote(w) => w.code,
            ClientError::Transport(t) => t.code(),
            ClientError::BufferTooSmall { .. } => ErrorCode::InvalidArgument,
            ClientError::NoReadableReplica { last } => last.code(),
            ClientError::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
            ClientError::LeaseExpired => ErrorCode::LeaseExpired,
            ClientError::Deadline { .. } => ErrorCode::Timeout,
        }
    }

    /// Every replica turned out to hold other bytes than were put (corruption on disk, or
    /// space reused after eviction) or to be gone from its node. For a cache that is a miss:
    /// the caller recomputes, as it would for a key never stored.
    pub fn is_gone(&self) -> bool {
        match self {
            ClientError::NoReadableReplica { last } => {
                matches!(last.as_ref(), ClientError::ChecksumMismatch { .. })
                    || matches!(last.as_ref(), ClientError::Remote(w) if w.code == ErrorCode::NotFound)
            }
            _ => false,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(t) => t.is_retryable(),
            ClientError::Remote(w) => w.code.is_retryable(),
            ClientError::NoReadableReplica { .. } | ClientError::LeaseExpired => true,
            ClientError::ChecksumMismatch { .. } => true,
            ClientError::BufferTooSmall { .. } | ClientError::Deadline { .. } => false,
        }
    }
}

impl From<WireError> for ClientError {
    fn from(w: WireError) -> Self {
        ClientError::Remote(w)
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
