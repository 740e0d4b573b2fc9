use kvpool_proto::{ErrorCode, HeaderError, WireError};

/// Everything that can go wrong moving a request and its bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection closed")]
    Closed,
    #[error("bad frame header: {0}")]
    Header(HeaderError),
    #[error("{op} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        after: std::time::Duration,
    },
    /// The peer answered with an error.
    #[error("{0}")]
    Remote(WireError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl TransportError {
    /// The stable code for this error, as a caller would report it.
    pub fn code(&self) -> ErrorCode {
        match self {
            TransportError::Io(_) => ErrorCode::Io,
            TransportError::Truncated => ErrorCode::Truncated,
            TransportError::Closed => ErrorCode::ConnectionClosed,
            TransportError::Header(h) => h.code(),
            TransportError::Timeout { .. } => ErrorCode::Timeout,
            TransportError::Remote(w) => w.code,
            TransportError::Protocol(_) => ErrorCode::MalformedBody,
        }
    }

    /// Whether the connection that produced this error can still be used.
    pub fn connection_usable(&self) -> bool {
        matches!(self, TransportError::Remote(_))
    }

    /// Whether a retry (possibly on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Io(_) | TransportError::Truncated | TransportError::Closed => true,
            TransportError::Timeout { .. } => true,
            TransportError::Remote(w) => w.code.is_retryable(),
            TransportError::Header(_) | TransportError::Protocol(_) => false,
        }
    }

    pub fn into_wire(self) -> WireError {
        WireError::new(self.code(), self.to_string())
    }
}
