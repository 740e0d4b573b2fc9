//! The NVMe tier: records on a local file or block device, found again after a restart
//! through a per-node RocksDB index.
//!
//! Three layers, one job each (after foyer's split):
//! - [`device`]: where the bytes live, a preallocated file or a block device opened O_DIRECT.
//! - [`engine`]: how I/O is issued, an [`IoEngine`] moving owned aligned buffers: io_uring
//!   with registered buffers on a dedicated thread, or pread/pwrite on worker threads.
//! - [`layout`] (in `kvpool_proto`, shared with clients): what a record looks like on disk (header with magic, version, key, lengths
//!   and checksums; the value 4 KiB-aligned).
//!
//! On top, `index` keeps replica -> extent in RocksDB, and [`NvmeTier`] ties them together.
//! The tier itself is split by concept: `tier` (the type, open and close), `config`, `error`,
//! `records` (what the tier holds, touches, removes), `write`, `commit` (the group-commit
//! pipeline), `read` (reads and verification), `recover` (checks at open) and `health`.
//!
//! Space is the master's: it allocates 4 KiB-aligned extents of [`record_len`] bytes in the
//! tier with its own allocator and tells the node where to write. The tier never allocates;
//! it writes the record at the given offset, makes it durable, then indexes it.
//!
//! Durability and integrity: a write is acknowledged only after its bytes are synced and its
//! index entry is durable, and an index entry is never written before its bytes are synced.
//! Concurrent writes share syncs: a sync thread fdatasyncs the device once for every write
//! whose bytes landed, then an index thread writes their entries and syncs RocksDB's WAL
//! once, while the sync thread already syncs the next group. A record whose header does not
//! match its index entry is dropped at open; a value whose crc32c does not match is never
//! returned. An I/O error, a short read or a full disk marks the tier unhealthy: writes are
//! then refused, reads still tried.

pub mod buf;
mod commit;
mod config;
pub mod device;
pub mod engine;
mod error;
mod health;
pub(crate) mod index;
mod read;
mod records;
mod recover;
mod tier;
mod write;

pub use buf::{AlignedBuf, BufPool};
pub use config::{NvmeConfig, STAGING_BUF};
pub use device::Device;
pub use engine::{IoEngine, IoEngineKind, IoFuture, IoResult};
pub use error::NvmeError;
/// The record format, shared with the master and same-host clients (`kvpool_proto::layout`).
pub use kvpool_proto::layout;
pub use layout::{record_len, value_offset, MAX_KEY_LEN, NVME_ALIGN};
pub use read::{Part, PartStream, ValueBuf};
pub use records::NvmeRecordInfo;
pub use tier::NvmeTier;
