//! kvpool's metadata master, sans I/O.
//!
//! - [`alloc`]: the O(1) offset allocator that manages the space of one DRAM segment.
//! - [`core`]: [`MasterCore`], the pure state machine behind every master request: object map,
//!   two-phase puts, leases and pins, placement, eviction, membership and the frees queued for
//!   storage nodes. It owns no socket, clock or thread: time is an argument, so that the server
//!   shell, tests and simulations drive it the same way.

pub mod alloc;
pub mod core;

pub use crate::alloc::{Allocation, OffsetAllocator};
pub use crate::core::{CoreConfig, MasterCore};
