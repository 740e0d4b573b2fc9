//! kvpool's wire protocol, defined once and shared by every crate.
//!
//! This crate is the only one that knows the byte layout of frames and messages. It does no
//! I/O and depends on no other kvpool crate.
//!
//! # Layout
//! - [`header`]: the fixed 32-byte frame header and the size limits checked before allocation.
//! - [`auth`]: the cluster [`auth::Token`] and its constant-time comparison.
//! - [`crc32c`]: the checksum of object bytes and frame headers.
//! - [`bytes`]: byte strings in bodies, decoded with one copy.
//! - [`msg`]: every request and response, the opcodes, body encoding and decoding.
//! - [`error`]: [`ErrorCode`], the stable error numbers shared by all crates and the wire.
//! - [`layout`]: the NVMe record format (header, key, value, alignment), shared by the master
//!   (allocation), the node (writes and checks) and same-host clients (reads and checks).
//! - [`units`]: human sizes and durations for configs and flags.
//! - [`rdma`]: the RDMA queue-pair handshake carried over a data connection.
//!
//! A frame is `header | body | payload`: the body is a postcard-encoded message, the payload
//! raw object bytes that no serializer touches. See `docs/protocol.md`.

pub mod auth;
pub mod bytes;
pub mod crc32c;
pub mod error;
pub mod header;
pub mod layout;
pub mod msg;
pub mod rdma;
pub mod units;

pub use auth::Token;
pub use error::{ErrorCode, ItemResult, WireError};
pub use header::{FrameHeader, FrameLimits, HeaderError, HEADER_LEN};
pub use msg::*;
pub use units::{ByteSize, HumanDuration};
