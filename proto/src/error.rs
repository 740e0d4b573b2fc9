//! The one error-code enum shared by every crate and by the wire.
//!
//! Numbers are stable: a code, once released, keeps its number and meaning forever. Codes are
//! grouped in ranges by subsystem (protocol 1xx, object 2xx, space 3xx, membership 4xx, data
//! path 5xx, transport 6xx, security 7xx, P/D hand-off 8xx, internal 9xx), so a number alone tells an operator
//! where to look. `docs/error-codes.md` lists them; a test keeps the two in step.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, )*) => {
        /// A stable, wire-visible error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $num, )*
        }

        impl ErrorCode {
            /// Every code, in numeric order (used by the docs test and the CLI).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code for a number; numbers this build does not know map to [`ErrorCode::Unknown`]
            /// so that an older peer still reports a newer peer's error instead of failing to decode.
            pub fn from_u16(n: u16) -> ErrorCode {
                match n {
                    $( $num => ErrorCode::$name, )*
                    _ => ErrorCode::Unknown,
                }
            }

            /// The stable name, as printed by the CLI and in logs.
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )*
                }
            }
        }
    };
}

error_codes! {
    /// Success; never carried by an error.
    Ok = 0,
    /// The frame did not start with the kvpool magic bytes.
    BadMagic = 100,
    /// The peer speaks a protocol version this build does not.
    UnsupportedVersion = 101,
    /// The opcode is not one this server knows.
    UnknownOpcode = 102,
    /// A frame's body or payload exceeds the configured limit.
    FrameTooLarge = 103,
    /// The body did not decode as the message its opcode names.
    MalformedBody = 104,
    /// The connection ended in the middle of a frame.
    Truncated = 105,
    /// The header checksum did not match: the stream is corrupt or out of step.
    BadHeaderChecksum = 106,
    /// The request is valid but this server does not serve it (e.g. a data op sent to the master).
    WrongService = 107,
    /// The key is not in the pool (or has no readable replica).
    NotFound = 200,
    /// The key already has a committed value and overwrite was not asked for.
    AlreadyExists = 201,
    /// The key is being written (two-phase put in progress).
    Processing = 202,
    /// The object holds a live read lease; retry later or force.
    HasLease = 203,
    /// Only the client that started a put may end or revoke it.
    NotWriter = 204,
    /// A key is empty or longer than the maximum (4 KiB).
    KeyTooLong = 205,
    /// A value is empty or larger than the configured maximum.
    ValueTooLarge = 206,
    /// An argument is out of its allowed range.
    InvalidArgument = 207,
    /// The object is hard-pinned; remove it with force.
    Pinned = 208,
    /// No segment had room for the object, even after eviction.
    NoSpace = 300,
    /// The pool has no storage segment at all.
    NoSegment = 301,
    /// No room right now, but room is coming: the space is held by copies to NVMe in flight
    /// (write-through, demotion). Clients retry until their deadline, so writers that outrun
    /// the disk are slowed to its pace instead of the pool dropping data.
    NoSpaceYet = 302,
    /// The node is not registered with this master.
    UnknownNode = 400,
    /// The master does not know this node any more; it must register again.
    NeedRegister = 401,
    /// The node was declared dead.
    NodeDead = 402,
    /// This master is a standby (HA): it does not lead the cluster now. The message names the
    /// leader when known; find it through etcd and retry there.
    NotLeader = 403,
    /// An offset or length falls outside the segment.
    OutOfRange = 500,
    /// Bytes read do not match the checksum the writer recorded.
    ChecksumMismatch = 501,
    /// The read lease expired before the transfer finished; the bytes are not trusted.
    LeaseExpired = 502,
    /// The segment is not served by this node.
    UnknownSegment = 503,
    /// A read from a client's cached location: the range no longer holds the replica the
    /// client expected (freed, overwritten, or the node restarted). The client drops the
    /// location and asks the master again; for a caller it is never an error by itself.
    StaleLocation = 504,
    /// The operation did not finish before its deadline.
    Timeout = 600,
    /// The connection closed before the response arrived.
    ConnectionClosed = 601,
    /// An I/O error on a socket or file.
    Io = 602,
    /// The peer cannot use the transport asked for (a storage node without an RDMA device, or
    /// built without RDMA, answering `RdmaConnect`); the client uses another transport.
    TransportUnsupported = 603,
    /// The cluster token is missing or wrong.
    Unauthorized = 700,
    /// The producer knows no hand-off by this transfer id.
    TransferUnknown = 800,
    /// The hand-off was aborted (by the producer's engine or a consumer).
    TransferAborted = 801,
    /// No consumer claimed the hand-off within the producer's abort timeout.
    TransferExpired = 802,
    /// A bug: an invariant did not hold.
    Internal = 900,
    /// A code this build does not know (sent by a newer peer).
    Unknown = 65535,
}

impl ErrorCode {
    /// Whether retrying the same request may succeed (transient conditions only).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Timeout
                | ErrorCode::ConnectionClosed
                | ErrorCode::Io
                | ErrorCode::NeedRegister
                | ErrorCode::NodeDead
                | ErrorCode::NotLeader
                | ErrorCode::LeaseExpired
                | ErrorCode::Processing
                | ErrorCode::HasLease
                | ErrorCode::NoSpaceYet
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name(), *self as u16)
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(*self as u16)
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u16::deserialize(d).map(ErrorCode::from_u16)
    }
}

/// An error as it travels on the wire: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

/// The result of one item of a batch.
pub type ItemResult<T> = Result<T, WireError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert!(seen.insert(c as u16), "duplicate number {}", c as u16);
            assert_eq!(ErrorCode::from_u16(c as u16), c);
        }
        assert_eq!(ErrorCode::from_u16(4242), ErrorCode::Unknown);
    }

    #[test]
    fn docs_list_every_code() {
        let doc = include_str!("../../docs/error-codes.md");
        for &c in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", c as u16, c.name());
            assert!(
                doc.contains(&row),
                "docs/error-codes.md lacks the row `{row}`"
            );
        }
    }
}
