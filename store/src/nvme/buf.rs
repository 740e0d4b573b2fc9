//! 4 KiB-aligned I/O buffers, and the pool of staging buffers the io_uring engine registers.
//!
//! O_DIRECT needs the memory, the file offset and the length aligned to the device's logical
//! block; kvpool aligns all three to [`NVME_ALIGN`](super::NVME_ALIGN). Buffers are owned and
//! moved into the I/O engine for the duration of an operation (the kernel writes into them
//! while the caller's future may be dropped), and come back with the result.

use std::{
    alloc::{self, Layout},
    fmt,
    ops::{Deref, DerefMut},
    ptr::NonNull,
    sync::{Arc, Mutex},
};

use super::layout::NVME_ALIGN;

const ALIGN: usize = NVME_ALIGN as usize;

/// An owned, zero-initialised, 4 KiB-aligned byte buffer whose capacity is a multiple of
/// 4 KiB. It either owns its allocation or borrows a slot of a [`BufPool`], to which it
/// returns on drop.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

enum Origin {
    Heap,
    Pool { pool: Arc<Slab>, index: u16 },
}

// SAFETY: `AlignedBuf` uniquely owns its bytes (a heap allocation, or a pool slot taken out of
// the free list until drop), like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to 4 KiB, at least 4 KiB).
    pub fn new(len: usize) -> AlignedBuf {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = layout(cap);
        // SAFETY: the layout has a non-zero size (cap >= 4096).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            cap,
            origin: Origin::Heap,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length the engine transfers. Bytes up to the capacity are always initialised
    /// (zeroed at allocation, or left from an earlier use of a pool slot).
    ///
    /// # Panics
    /// If `len` exceeds the capacity: a caller bug, not an I/O condition.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length {len} over capacity {}", self.cap);
        self.len = len;
    }

    /// The index of the registered (fixed) buffer this one is, when it comes from a pool.
    pub fn fixed_index(&self) -> Option<u16> {
        match &self.origin {
            Origin::Pool { index, .. } => Some(*index),
            Origin::Heap => None,
        }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

fn layout(cap: usize) -> Layout {
    match Layout::from_size_align(cap, ALIGN) {
        Ok(l) => l,
        // Only a capacity near isize::MAX fails; no value kvpool stores comes close.
        Err(_) => panic!("buffer of {cap} bytes cannot be allocated"),
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+cap is owned by this buffer and initialised; len <= cap.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match &self.origin {
            // SAFETY: allocated in `new` with exactly this layout, and not freed since.
            Origin::Heap => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout(self.cap)) },
            Origin::Pool { pool, index } => pool.put(*index),
        }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("fixed", &self.fixed_index())
            .finish()
    }
}

/// A fixed set of equal-sized aligned buffers carved out of one allocation. The io_uring
/// engine registers them with its ring once, so that I/O on them skips the per-operation
/// page pinning (`READ_FIXED`/`WRITE_FIXED`).
#[derive(Clone)]
pub struct BufPool {
    slab: Arc<Slab>,
}

struct Slab {
    ptr: NonNull<u8>,
    buf_size: usize,
    count: usize,
    free: Mutex<Vec<u16>>,
}

// SAFETY: the slab owns its allocation; each slot is handed to at most one `AlignedBuf` at a
// time (the free list, under its mutex, decides which), so no two owners alias a slot.
unsafe impl Send for Slab {}
// SAFETY: see `Send`; the only shared state is the mutex-protected free list.
unsafe impl Sync for Slab {}

impl Slab {
    fn put(&self, index: u16) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(index);
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: allocated in `BufPool::new` with this layout; every `AlignedBuf` of the pool
        // holds an `Arc<Slab>`, so none is alive any more.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout(self.buf_size * self.count)) }
    }
}

impl BufPool {
    /// `count` buffers of `buf_size` bytes each (rounded up to 4 KiB); at most 65535 buffers,
    /// the range of a registered-buffer index.
    pub fn new(buf_size: usize, count: usize) -> BufPool {
        let buf_size = buf_size.div_ceil(ALIGN).max(1) * ALIGN;
        let count = count.clamp(1, u16::MAX as usize);
        let l = layout(buf_size * count);
        // SAFETY: non-zero size (buf_size >= 4096, count >= 1).
        let raw = unsafe { alloc::alloc_zeroed(l) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(l)
        };
        // Hand out low indices first: they are the ones most recently used, so warm in cache.
        let free = (0..count as u16).rev().collect();
        BufPool {
            slab: Arc::new(Slab {
                ptr,
                buf_size,
                count,
                free: Mutex::new(free),
            }),
        }
    }

    /// Capacity of each buffer.
    pub fn buf_size(&self) -> usize {
        self.slab.buf_size
    }

    pub fn count(&self) -> usize {
        self.slab.count
    }

    /// A pool buffer of `len` bytes, if one is free and `len` fits.
    pub fn try_take(&self, len: usize) -> Option<AlignedBuf> {
        if len > self.slab.buf_size {
            return None;
        }
        let index = self
            .slab
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()?;
        // SAFETY: index < count, so the slot lies inside the slab allocation.
        let ptr = unsafe { self.slab.ptr.add(index as usize * self.slab.buf_size) };
        Some(AlignedBuf {
            ptr,
            len,
            cap: self.slab.buf_size,
            origin: Origin::Pool {
                pool: self.slab.clone(),
                index,
            },
        })
    }

    /// A pool buffer when one is free, else a fresh allocation: callers never wait on the
    /// pool, so a caller holding buffers cannot deadlock others waiting for one.
    pub fn take_or_alloc(&self, len: usize) -> AlignedBuf {
        self.try_take(len).unwrap_or_else(|| AlignedBuf::new(len))
    }

    /// The buffers as iovecs, in index order, for `IORING_REGISTER_BUFFERS`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slab.count)
            .map(|i| libc::iovec {
                // SAFETY: i < count keeps the pointer inside the slab allocation.
                iov_base: unsafe { self.slab.ptr.as_ptr().add(i * self.slab.buf_size) }.cast(),
                iov_len: self.slab.buf_size,
            })
            .collect()
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("buf_size", &self.slab.buf_size)
            .field("count", &self.slab.count)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_pool_slots_come_back() {
        let b = AlignedBuf::new(10);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!((b.len(), b.capacity()), (10, 4096));
        assert!(b.iter().all(|&x| x == 0));

        let pool = BufPool::new(5000, 2);
        assert_eq!(pool.buf_size(), 8192);
        let a = pool.try_take(8192).unwrap();
        let c = pool.try_take(1).unwrap();
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_ne!(a.fixed_index(), c.fixed_index());
        assert!(pool.try_take(1).is_none(), "pool is empty");
        assert!(pool.try_take(8193).is_none(), "too large for a slot");
        let d = pool.take_or_alloc(1);
        assert_eq!(d.fixed_index(), None);
        drop(a);
        assert!(pool.try_take(1).is_some());
        assert_eq!(pool.iovecs().len(), 2);
    }
}
