//! The GPU cache itself: device memory (owned or an engine's), its copy stream, pinned
//! staging, and the driver calls that enqueue planned copies.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUresult, CUstream};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaStream, DriverError, PinnedHostSlice};

use super::plan::{self, CopyOp};
use super::{GpuError, Result};
use crate::layout::{KvLayout, LayerGroups, LayerRegion};

/// How planned copies are handed to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// `cuMemcpyBatchAsync` (CUDA 12.8) where the driver has it and the stream allows it,
    /// else one `cuMemcpy*Async` per copy; a batch the driver rejects falls back for good.
    #[default]
    Auto,
    /// Always batched; an error where the driver lacks it (for benchmarks).
    Batched,
    /// One async copy per (merged) segment.
    PerSegment,
}

/// Staging and copy settings of a [`GpuKvCache`].
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Bytes of each of the two pinned staging buffers; raised to one object if smaller. A
    /// batch larger than this is moved in several rounds.
    pub staging_bytes: usize,
    pub copy_mode: CopyMode,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            staging_bytes: 64 << 20,
            copy_mode: CopyMode::Auto,
        }
    }
}

/// How [`GpuKvCache::alloc`] lays out device memory (see docs/connector.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuAlloc {
    /// vLLM's paged cache: one allocation per layer, `[K, V][num_blocks][block_bytes]`
    /// (FlashAttention's `[2, num_blocks, ...]`): one copy per region per block.
    Paged,
    /// One allocation, `[layer][K, V][num_blocks][block_bytes]`.
    LayerFirst,
    /// One allocation, `[num_blocks][layer][K, V][block_bytes]`: one copy per object.
    BlockFirst,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Dir {
    DeviceToHost,
    HostToDevice,
}

/// Device memory the cache owns; freed on drop.
struct DeviceAlloc {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
    len: usize,
}

impl DeviceAlloc {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain allocation in the bound context; the memory is zeroed below before
        // anything reads it.
        let ptr = unsafe { result::malloc_sync(len) }?;
        let a = Self {
            ctx: ctx.clone(),
            ptr,
            len,
        };
        // SAFETY: `ptr` is a live allocation of `len` bytes (the caller synchronizes the
        // context before the memory is used).
        unsafe { sys::cuMemsetD8_v2(a.ptr, 0, a.len) }.result()?;
        Ok(a)
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: allocated by `malloc_sync` and freed once; the owning cache synchronized its
        // stream in its own drop, before its fields (this) are dropped, so no copy is in flight.
        self.ctx.record_err(unsafe { result::free_sync(self.ptr) });
    }
}

/// Two pinned host buffers (double buffering) and, per buffer, the event after which the
/// device no longer touches it.
pub(super) struct Staging {
    /// Kept for ownership: freed (after its pending work) when the cache drops.
    _bufs: [PinnedHostSlice<u8>; 2],
    addrs: [usize; 2],
    len: usize,
    pub(super) pending: [Option<Arc<CudaEvent>>; 2],
}

impl Staging {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        let alloc = || -> Result<(PinnedHostSlice<u8>, usize)> {
            // SAFETY: flags 0 = plain cuMemHostAlloc (not write-combined, which makes the CPU
            // reads of saved objects slow). The bytes are uninitialized, but every byte handed
            // out as a slice was first written by a copy or by the pool.
            let mut b = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }?;
            let addr = b.as_mut_ptr()? as usize;
            Ok((b, addr))
        };
        let (b0, a0) = alloc()?;
        let (b1, a1) = alloc()?;
        Ok(Self {
            _bufs: [b0, b1],
            addrs: [a0, a1],
            len,
            pending: [None, None],
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn addr(&self, buf: usize) -> usize {
        self.addrs[buf]
    }

    /// Buffer `buf`'s first `len` bytes for reading.
    ///
    /// # Safety
    /// No device copy into this buffer may be in flight (its last event completed), and the
    /// bytes were written (by a device-to-host copy) before.
    pub(super) unsafe fn bytes(&self, buf: usize, len: usize) -> &[u8] {
        assert!(len <= self.len);
        // SAFETY: in bounds of a live pinned allocation (asserted); the caller rules out
        // concurrent device writes; `&self` rules out a `bytes_mut` alias.
        unsafe { std::slice::from_raw_parts(self.addrs[buf] as *const u8, len) }
    }

    /// Buffer `buf`'s first `len` bytes for writing.
    ///
    /// # Safety
    /// No device copy from or into this buffer may be in flight (its last event completed).
    pub(super) unsafe fn bytes_mut(&mut self, buf: usize, len: usize) -> &mut [u8] {
        assert!(len <= self.len);
        // SAFETY: as `bytes`; `&mut self` makes this the only slice of the staging.
        // Uninitialized pinned bytes are only written through this slice (the pool scatters
        // into it) before they are read.
        unsafe { std::slice::from_raw_parts_mut(self.addrs[buf] as *mut u8, len) }
    }
}

/// `cuMemcpyBatchAsync` with CUDA 12.8's ABI (CUDA 13 renamed this ABI's successor `_v2`).
type BatchFn = unsafe extern "C" fn(
    *mut CUdeviceptr,
    *mut CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    CUstream,
) -> CUresult;

/// The driver's `cuMemcpyBatchAsync` as of CUDA 12.8, asked for by version through
/// `cuGetProcAddress` (as the runtime does), so a newer driver returns the 12.8 ABI rather
/// than whatever the bare symbol name means there. `None` on drivers before 12.8.
fn batch_fn() -> Option<BatchFn> {
    let name: &CStr = c"cuMemcpyBatchAsync";
    let mut pfn: *mut c_void = std::ptr::null_mut();
    let mut status = sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS;
    // SAFETY: a NUL-terminated name and valid out-pointers; only a lookup, nothing is called.
    let r = unsafe {
        sys::cuGetProcAddress_v2(
            name.as_ptr(),
            &mut pfn,
            12080,
            sys::CUdriverProcAddress_flags::CU_GET_PROC_ADDRESS_DEFAULT as u64,
            &mut status,
        )
    };
    if r != CUresult::CUDA_SUCCESS
        || status != sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS
        || pfn.is_null()
    {
        return None;
    }
    // SAFETY: the driver returned this entry point for the CUDA 12.8 signature, which
    // `BatchFn` spells out (cuda.h 12.8: dsts, srcs, sizes, count, attrs, attrsIdxs,
    // numAttrs, failIdx, hStream).
    Some(unsafe { std::mem::transmute::<*mut c_void, BatchFn>(pfn) })
}

/// A KV cache in GPU memory: a [`KvLayout`] over device addresses, a stream for its copies,
/// and pinned staging for moving blocks to and from the pool (see the module docs).
pub struct GpuKvCache {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) layout: KvLayout,
    /// Empty for an engine's memory ([`Self::from_raw`]).
    allocs: Vec<DeviceAlloc>,
    /// One save or load at a time uses the staging (a tokio lock: held across pool awaits).
    pub(super) staging: tokio::sync::Mutex<Staging>,
    staging_len: usize,
    batch: Option<BatchFn>,
    /// Cleared when the driver rejects a batch in [`CopyMode::Auto`].
    batch_ok: AtomicBool,
    mode: CopyMode,
}

impl std::fmt::Debug for GpuKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKvCache")
            .field("ordinal", &self.ctx.ordinal())
            .field("layout", &self.layout)
            .field("owned_allocations", &self.allocs.len())
            .field("batched_copies", &self.batched())
            .finish()
    }
}

impl GpuKvCache {
    /// Allocates (and zeroes) a cache on `ctx`'s device: `num_layers` layers of K and V
    /// regions (`k_and_v = false`: one MLA region per layer), `num_blocks` blocks of
    /// `block_bytes` per region, laid out as `alloc` says. Copies run on a new stream.
    #[allow(clippy::too_many_arguments)]
    pub fn alloc(
        ctx: &Arc<CudaContext>,
        alloc: GpuAlloc,
        num_layers: usize,
        k_and_v: bool,
        num_blocks: usize,
        block_bytes: usize,
        groups: LayerGroups,
        opts: GpuOptions,
    ) -> Result<Self> {
        // Validate the shape at base 0 before allocating anything.
        KvLayout::layer_first_contiguous(0, num_layers, k_and_v, num_blocks, block_bytes, groups)?;
        let per_layer = if k_and_v { 2 } else { 1 };
        let overflow = || GpuError::Layout(crate::layout::LayoutError::Overflow(0));
        let region_span = num_blocks.checked_mul(block_bytes).ok_or_else(overflow)?;
        let mut allocs = Vec::new();
        let layout = match alloc {
            GpuAlloc::Paged => {
                let tensor = region_span.checked_mul(per_layer).ok_or_else(overflow)?;
                let mut regions = Vec::with_capacity(num_layers * per_layer);
                for _ in 0..num_layers {
                    let a = DeviceAlloc::new(ctx, tensor)?;
                    for kv in 0..per_layer {
                        regions.push(LayerRegion {
                            base: a.ptr as usize + kv * region_span,
                            block_stride: block_bytes,
                            block_bytes,
                        });
                    }
                    allocs.push(a);
                }
                KvLayout::new(regions, per_layer, num_blocks, groups)?
            }
            GpuAlloc::LayerFirst | GpuAlloc::BlockFirst => {
                let total = region_span
                    .checked_mul(per_layer * num_layers)
                    .ok_or_else(overflow)?;
                let a = DeviceAlloc::new(ctx, total)?;
                let base = a.ptr as usize;
                allocs.push(a);
                let contiguous = if alloc == GpuAlloc::LayerFirst {
                    KvLayout::layer_first_contiguous
                } else {
                    KvLayout::block_first_contiguous
                };
                contiguous(base, num_layers, k_and_v, num_blocks, block_bytes, groups)?
            }
        };
        // cuMemsetD8 may return before it is done, and the cache's stream does not wait for
        // the legacy stream: finish the zeroing before any copy can touch the memory.
        ctx.synchronize()?;
        let stream = ctx.new_stream()?;
        Self::build(stream, layout, allocs, opts)
    }

    /// A cache over device memory the engine owns (vLLM's torch tensors): `layout`'s region
    /// bases are device addresses (e.g. `tensor.data_ptr()`; build it with
    /// [`KvLayout::paged_vllm`], [`KvLayout::layer_first_contiguous`] or
    /// [`KvLayout::block_first_contiguous`]). Copies run on `stream`.
    ///
    /// # Safety
    /// - For every region and every block `b < num_blocks`, the bytes
    ///   `base + b * block_stride .. + block_bytes` are device memory of `stream`'s context (or
    ///   memory it can address), and stay allocated until this cache is dropped: the engine
    ///   must not free or reallocate its tensors while the cache exists.
    /// - Ordering with the engine's own work is the engine's: its writes to a block must be
    ///   complete, or ordered before the copies on `stream` (pass the compute stream itself,
    ///   or synchronize it), before that block is saved; and it must not read or write a block
    ///   that is being loaded until [`GpuLoad::wait_group`](super::GpuLoad::wait_group) or
    ///   [`GpuLoad::wait_all`](super::GpuLoad::wait_all) says it is there.
    pub unsafe fn from_raw(
        stream: Arc<CudaStream>,
        layout: KvLayout,
        opts: GpuOptions,
    ) -> Result<Self> {
        Self::build(stream, layout, Vec::new(), opts)
    }

    fn build(
        stream: Arc<CudaStream>,
        layout: KvLayout,
        allocs: Vec<DeviceAlloc>,
        opts: GpuOptions,
    ) -> Result<Self> {
        let ctx = stream.context().clone();
        ctx.bind_to_thread()?;
        let len = opts.staging_bytes.max(plan::min_staging(&layout));
        let staging = Staging::new(&ctx, len)?;
        // The batch API refuses the legacy NULL stream (torch's default stream).
        let batch = if opts.copy_mode == CopyMode::PerSegment || stream.cu_stream().is_null() {
            None
        } else {
            batch_fn()
        };
        if opts.copy_mode == CopyMode::Batched && batch.is_none() {
            return Err(DriverError(CUresult::CUDA_ERROR_NOT_SUPPORTED).into());
        }
        Ok(Self {
            ctx,
            stream,
            layout,
            allocs,
            staging: tokio::sync::Mutex::new(staging),
            staging_len: len,
            batch_ok: AtomicBool::new(batch.is_some()),
            batch,
            mode: opts.copy_mode,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the cache's copies run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether copies currently go through `cuMemcpyBatchAsync`.
    pub fn batched(&self) -> bool {
        self.batch.is_some() && self.batch_ok.load(Ordering::Relaxed)
    }

    /// Bytes of each staging buffer.
    pub fn staging_bytes(&self) -> usize {
        self.staging_len
    }

    /// Enqueues `ops` on the cache's stream, between device memory and the host buffer at
    /// `host_base`. Asynchronous: record an event after it and wait for that before touching
    /// the host bytes.
    ///
    /// The caller guarantees that `host_base + op.host .. + op.len` is pinned memory that
    /// stays allocated and untouched until the copies complete, and that every `op.dev`
    /// range is a block range of the layout (plans come from [`plan`]).
    pub(super) fn enqueue(
        &self,
        dir: Dir,
        ops: &[CopyOp],
        host_base: usize,
    ) -> std::result::Result<(), DriverError> {
        if ops.is_empty() {
            return Ok(());
        }
        // Async tasks move between threads: make the context current for the raw calls.
        self.ctx.bind_to_thread()?;
        if ops.len() > 1 && self.batched() {
            match self.enqueue_batched(dir, ops, host_base) {
                Ok(()) => return Ok(()),
                Err(e) if self.mode == CopyMode::Batched => return Err(e),
                Err(e) => {
                    // Copies before the failing one may have been enqueued: redoing them
                    // one by one is harmless (same bytes to the same place, in stream order).
                    tracing::warn!(error = %e, "cuMemcpyBatchAsync failed; using per-copy calls");
                    self.batch_ok.store(false, Ordering::Relaxed);
                }
            }
        }
        let stream = self.stream.cu_stream();
        for op in ops {
            let host = (host_base + op.host) as *mut c_void;
            // SAFETY: both ranges are valid for `op.len` bytes and outlive the copy (caller's
            // contract above); the context is bound.
            let r = unsafe {
                match dir {
                    Dir::DeviceToHost => {
                        sys::cuMemcpyDtoHAsync_v2(host, op.dev as CUdeviceptr, op.len, stream)
                    }
                    Dir::HostToDevice => {
                        sys::cuMemcpyHtoDAsync_v2(op.dev as CUdeviceptr, host, op.len, stream)
                    }
                }
            };
            r.result()?;
        }
        Ok(())
    }

    fn enqueue_batched(
        &self,
        dir: Dir,
        ops: &[CopyOp],
        host_base: usize,
    ) -> std::result::Result<(), DriverError> {
        let Some(f) = self.batch else {
            return Err(DriverError(CUresult::CUDA_ERROR_NOT_SUPPORTED));
        };
        let host = |op: &CopyOp| (host_base + op.host) as CUdeviceptr;
        let dev = |op: &CopyOp| op.dev as CUdeviceptr;
        let (mut dsts, mut srcs): (Vec<CUdeviceptr>, Vec<CUdeviceptr>) = match dir {
            Dir::DeviceToHost => ops.iter().map(|o| (host(o), dev(o))).unzip(),
            Dir::HostToDevice => ops.iter().map(|o| (dev(o), host(o))).unzip(),
        };
        let mut sizes: Vec<usize> = ops.iter().map(|o| o.len).collect();
        let device = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ctx.ordinal() as i32,
        };
        let hostloc = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        };
        let (src_loc, dst_loc) = match dir {
            Dir::DeviceToHost => (device, hostloc),
            Dir::HostToDevice => (hostloc, device),
        };
        // Stream order: the sources are read when the copy runs, after earlier work on the
        // stream (the staging is stable until our event, the device bytes are the engine's).
        let mut attrs = [sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: src_loc,
            dstLocHint: dst_loc,
            flags: 0,
        }];
        let mut attr_idx = [0usize];
        let mut fail_idx = usize::MAX;
        // SAFETY: the three arrays hold `ops.len()` entries, one attribute applies to all
        // copies from index 0, and every range is valid until the copies complete (caller's
        // contract on `enqueue`); the stream is not the legacy NULL stream (`build`) and the
        // context is bound (`enqueue`).
        let r = unsafe {
            f(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                ops.len(),
                attrs.as_mut_ptr(),
                attr_idx.as_mut_ptr(),
                1,
                &mut fail_idx,
                self.stream.cu_stream(),
            )
        };
        r.result()
    }

    /// A new event recorded on the cache's stream after everything enqueued so far. Blocking
    /// sync: a thread waiting on it sleeps instead of spinning.
    pub(super) fn record(&self) -> std::result::Result<Arc<CudaEvent>, DriverError> {
        let ev = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?;
        ev.record(&self.stream)?;
        Ok(Arc::new(ev))
    }

    /// Orders every copy enqueued after this call behind `event`, an event another stream
    /// (the engine's compute stream) recorded after writing the blocks to save: the save
    /// waits on the device instead of the host synchronizing the engine's stream.
    ///
    /// # Safety
    /// `event` is a live `CUevent` of this cache's device (torch's `Event.cuda_event` once
    /// recorded), alive for this call; the stream wait takes the event's state at the call.
    pub unsafe fn wait_event(&self, event: sys::CUevent) -> Result<()> {
        // SAFETY: the precondition; the stream is the cache's own, alive with it.
        let r = unsafe { sys::cuStreamWaitEvent(self.stream.cu_stream(), event, 0) };
        Ok(r.result()?)
    }

    fn region(&self, layer: usize, kv: usize, block: usize) -> Result<(usize, usize)> {
        let per_layer = self.layout.regions().len() / self.layout.num_layers();
        if layer >= self.layout.num_layers() || kv >= per_layer {
            return Err(GpuError::RegionOutOfRange { layer, kv });
        }
        if block >= self.layout.num_blocks() {
            return Err(GpuError::BlockOutOfRange {
                block,
                num_blocks: self.layout.num_blocks(),
            });
        }
        let r = self.layout.regions()[layer * per_layer + kv];
        Ok((r.base + block * r.block_stride, r.block_bytes))
    }

    /// Writes one layer's K (`kv = 0`) or V (`kv = 1`) bytes of a block, as a forward pass
    /// would; synchronous (ordered after the cache's pending copies). For tests and tools:
    /// pageable memory, one small copy.
    pub fn write_region_block(
        &self,
        layer: usize,
        kv: usize,
        block: usize,
        bytes: &[u8],
    ) -> Result<()> {
        let (addr, len) = self.region(layer, kv, block)?;
        if bytes.len() != len {
            return Err(GpuError::Length {
                got: bytes.len(),
                want: len,
            });
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: `addr .. + len` is a block range of the layout (checked by `region`), and
        // `bytes` lives until the stream synchronization below returns.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                addr as CUdeviceptr,
                bytes.as_ptr() as *const c_void,
                len,
                self.stream.cu_stream(),
            )
        }
        .result()?;
        Ok(self.stream.synchronize()?)
    }

    /// Reads one layer's K or V bytes of a block (synchronous; see
    /// [`Self::write_region_block`]).
    pub fn read_region_block(&self, layer: usize, kv: usize, block: usize) -> Result<Vec<u8>> {
        let (addr, len) = self.region(layer, kv, block)?;
        let mut out = vec![0u8; len];
        self.ctx.bind_to_thread()?;
        // SAFETY: as in `write_region_block`; `out` is `len` bytes and outlives the sync.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                out.as_mut_ptr() as *mut c_void,
                addr as CUdeviceptr,
                len,
                self.stream.cu_stream(),
            )
        }
        .result()?;
        self.stream.synchronize()?;
        Ok(out)
    }

    /// Block `block`'s object for `group` in the object format (what a save stores), read
    /// synchronously from device memory: for checks against a host cache's `block_parts`.
    pub fn read_object(&self, block: usize, group: usize) -> Result<Vec<u8>> {
        self.check_group(group)?;
        plan::check_blocks(&self.layout, &[block], false)
            .pop()
            .unwrap_or(Ok(()))?;
        let ops = plan::plan_packed(&self.layout, group, &[block]);
        let mut out = vec![0u8; self.layout.object_len(group)];
        self.ctx.bind_to_thread()?;
        for op in &ops {
            // SAFETY: planned block ranges of the layout; `out` holds the object and outlives
            // the synchronization below.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    out.as_mut_ptr().add(op.host) as *mut c_void,
                    op.dev as CUdeviceptr,
                    op.len,
                    self.stream.cu_stream(),
                )
            }
            .result()?;
        }
        self.stream.synchronize()?;
        Ok(out)
    }

    pub(super) fn check_group(&self, group: usize) -> Result<()> {
        if group >= self.layout.num_groups() {
            return Err(GpuError::GroupOutOfRange {
                group,
                num_groups: self.layout.num_groups(),
            });
        }
        Ok(())
    }
}

impl Drop for GpuKvCache {
    fn drop(&mut self) {
        // Copies may still be in flight (a load whose handle was dropped unwaited): finish
        // them before the staging and owned device memory (fields, dropped after this) go.
        self.ctx.record_err(self.ctx.bind_to_thread());
        self.ctx.record_err(self.stream.synchronize());
    }
}
