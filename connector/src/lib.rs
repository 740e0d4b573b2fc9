//! The engine-side connector (prefix-block keys, KV-cache layouts, P/D hand-off). It builds on
//! `kvpool-client` only; its work is tracked as issue 5.
//!
//! Modules (see docs/connector.md):
//! - [`keys`]: the namespace, the chained block hash and the key strings (a wire protocol:
//!   pinned by golden vectors);
//! - [`layout`]: a registered KV cache as per-layer regions, and the gather/scatter list that
//!   maps one block's pool object onto it;
//! - [`cache`]: a KV cache in host memory whose gather/scatter lists are safe slices;
//! - [`pool`]: the async, batched lookup / save / load of a host cache's blocks.

pub mod cache;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod keys;
pub mod layout;
pub mod pd;
pub mod pool;

pub use cache::{CacheError, HostKvCache};
pub use pool::{ConnectorError, GroupLoaded, LayerwiseLoad, PoolConnector, SaveHandle};

pub use keys::{BlockHasher, BlockId, BlockKey, ExternalHash, Namespace};
pub use layout::{BlockShape, KvLayout, LayerGroups, LayerRegion, LayoutError, Segment};
