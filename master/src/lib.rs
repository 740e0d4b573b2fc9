//! kvpool's metadata master: a sans-I/O core behind a thin async shell.
//!
//! - [`alloc`]: the O(1) offset allocator that manages the space of one segment (DRAM, or
//!   NVMe with 4 KiB alignment).
//! - [`core`]: [`MasterCore`], the pure state machine behind every master request: object map,
//!   two-phase puts, leases and pins, placement, eviction, demotion to NVMe and promotion back
//!   (copy tasks sent to nodes in heartbeats), membership and the frees queued for storage
//!   nodes. It owns no socket, clock or thread: time is an argument, so that the server
//!   shell, tests and simulations drive it the same way.
//! - [`server`]: the async shell: decode, lock, call the core with the time, encode.
//! - `faults`: fault injection for end-to-end tests (`KVPOOL_FAULT_MASTER_PANIC`), off
//!   unless set.
//! - [`config`]: [`config::MasterConfig`], the `[master]` section of the config file.
//! - [`metrics`]: the Prometheus metrics and the `/ready` rule (served by `kvpool-ops`).

pub mod alloc;
pub mod config;
pub mod core;
mod faults;
pub mod metrics;
pub mod server;

pub use crate::alloc::{Allocation, OffsetAllocator};
pub use crate::core::{CoreConfig, MasterCore};
