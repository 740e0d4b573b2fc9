//! kvpool's transfer engine and RPC plumbing.
//!
//! # Layout
//! - [`auth`]: the cluster-token handshake (`Hello`), client and server side.
//! - [`frame`]: reading and writing frames on a byte stream; payloads go straight between
//!   the socket and their final buffer.
//! - [`rpc`]: a multiplexed, reconnecting request/response client for control messages.
//! - [`server`]: a generic control-plane server over a synchronous [`server::RpcService`].
//! - [`engine`]: the transfer engine: batched reads and writes of segment ranges on storage
//!   nodes, pooled and striped over several TCP connections per peer.
//! - `rdma` (feature `rdma`): one-sided RDMA READ/WRITE through libibverbs: the queue-pair
//!   handshake, registration, work-request batching and completions (`docs/rdma.md`).
//!
//! The TCP transport is the only one wired into the engine today; shared memory (same host)
//! and RDMA slot in behind [`engine::TransferEngine`] without changing its callers.

pub mod auth;
pub mod engine;
mod error;
pub mod frame;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod rpc;
pub mod server;

pub use error::TransportError;
