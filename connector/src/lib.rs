//! The engine-side connector (prefix-block keys, KV-cache layouts, P/D hand-off). It builds on
//! `kvpool-client` only; its work is tracked as issue 5.
//!
//! Pure, synchronous building blocks so far (see docs/connector.md):
//! - [`keys`]: the namespace, the chained block hash and the key strings (a wire protocol:
//!   pinned by golden vectors);
//! - [`layout`]: a registered KV cache as per-layer regions, and the gather/scatter list that
//!   maps one block's pool object onto it.

pub mod keys;
pub mod layout;

pub use keys::{BlockHasher, BlockId, BlockKey, ExternalHash, Namespace};
pub use layout::{BlockShape, KvLayout, LayerGroups, LayerRegion, LayoutError, Segment};
