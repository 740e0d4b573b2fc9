//! The RDMA transport (feature `rdma`): one-sided READ for gets and WRITE for puts, straight
//! between a client's registered buffers and a storage node's registered segments.
//!
//! Queue pairs are set up through the existing TCP data connection with one
//! `RdmaConnect` round trip (`kvpool_proto::rdma`), and live as long as that connection.
//! A batch of transfers is planned into work requests over several queue pairs ("lanes") per
//! peer, posted in chains, and completed by polling the peer's completion queue against a
//! deadline. See `docs/rdma.md` for the design and for what is wired where.
//!
//! # Layout
//! Sans-I/O (unit-tested without a device):
//! - [`registry`]: registered regions, lookup of the region covering a range, overlap and
//!   unregister rules.
//! - [`handshake`]: pairing our lanes with the peer's (`LaneParams`), the peer's regions.
//! - [`plan`]: a batch → READ/WRITE work requests, split at the message size and `max_sge`,
//!   spread over lanes, cut into chains with only the last request signaled.
//! - [`completion`]: which items a completion or an error completion finishes; deadlines.
//!
//! Device-bound (feature `rdma`; the default build has the sans-I/O parts only, so a
//! client records `register_buffer` regions by the same rules without libibverbs):
//! - `verbs`: owning wrappers of the libibverbs objects (device context, protection domain,
//!   completion queue, queue pair, memory region) and the few calls made on them.
//! - [`device`]: [`RdmaDevice`] (open a device, or [`RdmaError::Unavailable`]), registering
//!   memory, and the two ends of a connection: [`RdmaDevice::accept`] (node) and
//!   [`RdmaDevice::connect`] + [`Connecting::finish`] (client), which yield an [`RdmaPeer`]
//!   that runs batches.
//! - [`wire`]: the handshake on a data connection: [`wire::answer_connect`] (node) and
//!   [`wire::connect_over`] (client).

pub mod completion;
#[cfg(feature = "rdma")]
pub mod device;
mod error;
pub mod handshake;
pub mod plan;
pub mod registry;
#[cfg(feature = "rdma")]
mod verbs;
#[cfg(feature = "rdma")]
pub mod wire;

#[cfg(feature = "rdma")]
pub use device::{Connecting, DeviceOptions, RdmaDevice, RdmaPeer};
pub use error::RdmaError;
pub use plan::{Limits, Op, Piece, Transfer};
pub use registry::{Access, Region};
