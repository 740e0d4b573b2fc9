//! kvpool's transfer engine and RPC plumbing.
//!
//! # Layout
//! - [`auth`]: the cluster-token handshake (`Hello`), client and server side.
//! - [`frame`]: reading and writing frames on a byte stream; payloads go straight between
//!   the socket and their final buffer.
//! - [`rpc`]: a multiplexed, reconnecting request/response client for control messages.
//! - [`listen`]: what every server does alike: the accept loop (TCP or Unix socket), the
//!   `Hello` gate, the close-and-drain after a refusal.
//! - [`server`]: a generic control-plane server over a synchronous [`server::RpcService`].
//! - [`dataplane`]: the storage node's data server (Read/Write of segment ranges) over a
//!   [`dataplane::SegmentStore`] the node supplies.
//! - [`memory`]: [`memory::SharedRange`], segment memory another party may write, accessed
//!   by copies through raw pointers only.
//! - [`engine`]: the transfer engine: batched reads and writes of segment ranges on storage
//!   nodes, pooled and striped over several TCP connections per peer.
//! - [`shm`]: the same-host shared-memory transport (segment memfds passed over a Unix
//!   socket, mapped once per node), chosen per peer by [`engine::TransferEngine`].
//! - `rdma` (feature `rdma`): one-sided RDMA READ/WRITE through libibverbs: the queue-pair
//!   handshake, registration, work-request batching and completions (`docs/rdma.md`); built
//!   and unit-tested, not yet wired into the engine.
//!
//! Transports: shared memory for nodes on this host, TCP otherwise (RDMA slots in behind
//! [`engine::TransferEngine`] the same way); callers see one batch API.

pub mod auth;
pub mod dataplane;
pub mod engine;
mod error;
pub mod frame;
pub mod listen;
pub mod memory;
pub mod rdma;
pub mod rpc;
pub mod server;
pub mod shm;

pub use error::TransportError;
