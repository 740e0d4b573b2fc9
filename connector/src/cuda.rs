//! KV caches in GPU memory (feature `cuda`), saved to and loaded from the pool through
//! pinned host staging.
//!
//! A [`GpuKvCache`] is a [`KvLayout`] whose region bases are device addresses: either memory it
//! allocated itself ([`GpuKvCache::alloc`]) or an engine's own tensors
//! ([`GpuKvCache::from_raw`]). Saving copies each block's segments device-to-host into a
//! pinned staging buffer, objects back to back, and hands the staging slices to
//! [`PoolConnector::save_parts`]; loading fetches objects into staging with
//! [`PoolConnector::load_parts`] and copies them host-to-device asynchronously, one CUDA event
//! per layer group, so a group's copy overlaps the next group's fetch (two staging buffers).
//!
//! The driver is loaded at run time (cudarc's `dynamic-loading`): this builds and its tests
//! run on machines without CUDA; [`open_device`] says why there is no GPU instead of
//! panicking.
//!
//! [`KvLayout`]: crate::layout::KvLayout
//! [`PoolConnector::save_parts`]: crate::pool::PoolConnector::save_parts
//! [`PoolConnector::load_parts`]: crate::pool::PoolConnector::load_parts

mod cache;
pub mod plan;
mod transfer;

use std::sync::Arc;

pub use cudarc::driver::sys::CUevent;
pub use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};

pub use cache::{CopyMode, GpuAlloc, GpuKvCache, GpuOptions};
pub use transfer::GpuLoad;

use crate::layout::LayoutError;
use crate::pool::ConnectorError;

/// Why a GPU cache could not be made, or a block not saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// No driver library, `cuInit` failed, or no device with that ordinal.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("block {block} out of range (num_blocks {num_blocks})")]
    BlockOutOfRange { block: usize, num_blocks: usize },
    /// Two objects would be copied into the same block in one load.
    #[error("block {0} is listed twice")]
    Duplicate(usize),
    #[error("group {group} out of range (num_groups {num_groups})")]
    GroupOutOfRange { group: usize, num_groups: usize },
    #[error("layer {layer} / kv {kv} out of range")]
    RegionOutOfRange { layer: usize, kv: usize },
    /// A buffer passed to or from the cache has the wrong length.
    #[error("buffer is {got} bytes, expected {want}")]
    Length { got: usize, want: usize },
    /// Staging smaller than one object: the object could never be copied whole.
    #[error("staging of {have} bytes cannot hold an object of {need} bytes")]
    Staging { need: usize, have: usize },
    /// The cache's layer grouping differs from the connector's: keys would name other bytes.
    #[error("cache has {cache} layer groups, connector {connector}")]
    GroupMismatch { cache: usize, connector: usize },
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    /// A background load stopped (panicked or its runtime shut down) before finishing.
    #[error("the load ended before this block was done")]
    LoadAborted,
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// A context on device `ordinal`, or [`GpuError::NoDevice`] saying why there is none (no
/// `libcuda.so`, `cuInit` failed, too few devices), so callers and tests can skip cleanly.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    // SAFETY: only tries to dlopen the driver library; no CUDA function is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuError::NoDevice(
            "libcuda.so (the NVIDIA driver) not found by dynamic loading".into(),
        ));
    }
    cudarc::driver::result::init().map_err(|e| GpuError::NoDevice(format!("cuInit: {e}")))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| GpuError::NoDevice(format!("cuDeviceGetCount: {e}")))?;
    if n <= 0 || ordinal >= n as usize {
        return Err(GpuError::NoDevice(format!(
            "{n} CUDA device(s), ordinal {ordinal} asked for"
        )));
    }
    Ok(CudaContext::new(ordinal)?)
}
