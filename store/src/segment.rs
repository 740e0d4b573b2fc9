//! A DRAM segment: one anonymous memory mapping whose ranges clients write and read directly.
//!
//! The master's allocator hands out disjoint ranges, so concurrent connection tasks touch
//! disjoint bytes. The one exception is space reused after eviction while a slow reader still
//! streams the old object: the reader then gets mixed bytes, and the client detects it by its
//! lease check and the object's checksum. [`Segment`] is the only place that turns the mapping
//! into slices; everything else goes through its bounds-checked accessors.

use std::{fmt, ptr::NonNull};

use kvpool_proto::{ErrorCode, SegmentId, SegmentInfo, WireError};
use memmap2::{Advice, MmapMut, MmapOptions};

/// Size of a huge page, in bytes (x86-64 and aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;
/// `MAP_HUGE_2MB >> MAP_HUGE_SHIFT`: log2 of the huge page size asked of hugetlbfs.
const HUGE_PAGE_BITS: u8 = 21;
/// `MADV_POPULATE_WRITE` (Linux 5.14); not yet exported by the libc crate.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Which pages back a segment, as obtained at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Explicit 2 MiB pages from the hugetlb pool (`MAP_HUGETLB`).
    HugeTlb,
    /// Base pages with transparent huge pages asked for (`madvise(MADV_HUGEPAGE)`).
    TransparentHuge,
    /// Plain base pages.
    Base,
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backing::HugeTlb => "hugetlb 2MiB pages",
            Backing::TransparentHuge => "transparent huge pages (madvise)",
            Backing::Base => "base pages",
        })
    }
}

/// One DRAM segment this node contributes to the pool.
pub struct Segment {
    id: SegmentId,
    /// Usable bytes (the configured size; the mapping may be rounded up to a huge page).
    size: u64,
    /// Start of the mapping, taken once at creation so that no `&`/`&mut` to the whole mapping
    /// is ever formed after it: slices are derived from this pointer range by range.
    ptr: NonNull<u8>,
    backing: Backing,
    /// Owns the mapping; unmapped on drop. Never dereferenced after creation.
    _map: MmapMut,
}

// SAFETY: `Segment` owns its mapping (like `MmapMut`, which is Send + Sync). The raw pointer
// only refers into that mapping, which lives as long as the `Segment`. Concurrent access to
// the bytes goes through the `unsafe` accessors, whose callers uphold the aliasing contract.
unsafe impl Send for Segment {}
// SAFETY: see `Send` above; `&Segment` hands out no slice without an `unsafe` call.
unsafe impl Sync for Segment {}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Segment {
    /// Maps and pre-faults `size` bytes of anonymous memory. With `huge_pages`, tries the
    /// hugetlb pool first, then transparent huge pages; plain pages are the last resort.
    /// Blocking (pre-faulting touches every page): call it from a blocking context.
    pub fn new(id: SegmentId, size: u64, huge_pages: bool) -> std::io::Result<Segment> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| std::io::Error::other(format!("segment size {size} is not mappable")))?;
        let mut attempt = None;
        if huge_pages {
            // munmap of a hugetlb mapping needs a length that is a multiple of the page size.
            let rounded = len.div_ceil(HUGE_PAGE).checked_mul(HUGE_PAGE);
            if let Some(rounded) = rounded {
                match MmapOptions::new()
                    .len(rounded)
                    .huge(Some(HUGE_PAGE_BITS))
                    .map_anon()
                {
                    Ok(m) => attempt = Some((m, Backing::HugeTlb)),
                    Err(e) => tracing::warn!(
                        segment = %id,
                        "no hugetlb pages for {size} bytes ({e}); see /proc/sys/vm/nr_hugepages; \
                         trying transparent huge pages"
                    ),
                }
            }
        }
        let (mut map, backing) = match attempt {
            Some(a) => a,
            None => {
                let m = MmapOptions::new().len(len).map_anon()?;
                // THP must be asked for before the first touch to back the pages at fault time.
                if huge_pages {
                    match m.advise(Advice::HugePage) {
                        Ok(()) => (m, Backing::TransparentHuge),
                        Err(e) => {
                            tracing::warn!(segment = %id, "transparent huge pages refused ({e})");
                            (m, Backing::Base)
                        }
                    }
                } else {
                    (m, Backing::Base)
                }
            }
        };
        let ptr = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))?;
        prefault(ptr, map.len());
        tracing::info!(segment = %id, size, %backing, "segment mapped and pre-faulted");
        Ok(Segment {
            id,
            size,
            ptr,
            backing,
            _map: map,
        })
    }

    pub fn id(&self) -> SegmentId {
        self.id
    }

    /// Usable bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn info(&self) -> SegmentInfo {
        SegmentInfo {
            id: self.id,
            size: self.size,
            tier: kvpool_proto::Tier::Dram,
        }
    }

    /// Checks that `offset..offset+len` lies in the segment, returning the start as `usize`.
    pub fn check(&self, offset: u64, len: u64) -> Result<usize, WireError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {
                // size came from a usize, so offset and len fit in one too.
                usize::try_from(offset).map_err(|_| self.out_of_range(offset, len))
            }
            _ => Err(self.out_of_range(offset, len)),
        }
    }

    fn out_of_range(&self, offset: u64, len: u64) -> WireError {
        WireError::new(
            ErrorCode::OutOfRange,
            format!(
                "range {offset}+{len} outside segment {} of {} bytes",
                self.id, self.size
            ),
        )
    }

    /// The bytes of `offset..offset+len`, for reading.
    ///
    /// # Safety
    /// While the returned slice lives, no `&mut` slice of an overlapping range may be in use.
    /// kvpool upholds this through the master's allocator (live objects have disjoint ranges);
    /// a reader that races a writer on space reused after eviction sees torn bytes, which its
    /// lease check and checksum reject.
    pub unsafe fn slice(&self, offset: u64, len: u64) -> Result<&[u8], WireError> {
        let start = self.check(offset, len)?;
        // SAFETY: `check` proved start+len <= size <= mapping length, so the range is inside
        // the mapping, which lives as long as `&self`. The caller upholds the aliasing rule.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len as usize) })
    }

    /// The bytes of `offset..offset+len`, for writing.
    ///
    /// # Safety
    /// While the returned slice lives, no other slice of an overlapping range may be in use
    /// (see [`Segment::slice`] for how kvpool upholds this and what a violation costs).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> Result<&mut [u8], WireError> {
        let start = self.check(offset, len)?;
        // SAFETY: as in `slice`; the mapping is writable (PROT_READ | PROT_WRITE), and
        // exclusivity of the range is the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len as usize) })
    }
}

/// Faults every page in now: first touch of fresh anonymous memory costs a page fault and a
/// zeroing per page, which would otherwise land on the first writes' latency.
fn prefault(ptr: NonNull<u8>, len: usize) {
    // SAFETY: ptr..ptr+len is a private anonymous mapping owned by the caller; madvise does
    // not change its contents (fresh zero pages), only populates the page tables.
    let rc = unsafe { libc::madvise(ptr.as_ptr().cast(), len, MADV_POPULATE_WRITE) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.14: touch one byte per base page.
    let page = 4096;
    let mut off = 0;
    while off < len {
        // SAFETY: off < len keeps the write inside the mapping; no slice of it exists yet, and
        // writing a zero over a fresh zero page leaves the contents unchanged.
        unsafe { ptr.as_ptr().add(off).write_volatile(0) };
        off += page;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_without_overflow() {
        let s = Segment::new(SegmentId(1), 1 << 20, false).unwrap();
        assert_eq!(s.size(), 1 << 20);
        assert!(s.check(0, 1 << 20).is_ok());
        assert!(s.check((1 << 20) - 1, 1).is_ok());
        assert!(s.check(1 << 20, 0).is_ok());
        for (o, l) in [
            (0, (1 << 20) + 1),
            (1 << 20, 1),
            (u64::MAX, 2),
            (1, u64::MAX),
        ] {
            assert_eq!(
                s.check(o, l).unwrap_err().code,
                ErrorCode::OutOfRange,
                "{o}+{l}"
            );
        }
    }

    #[test]
    fn writes_are_visible_to_reads() {
        let s = Segment::new(SegmentId(2), 3 << 20, true).unwrap();
        // SAFETY: single-threaded test; the slices do not outlive their statements.
        unsafe { s.slice_mut(4096, 5).unwrap().copy_from_slice(b"hello") };
        // SAFETY: as above.
        assert_eq!(unsafe { s.slice(4096, 5).unwrap() }, b"hello");
        // SAFETY: as above.
        assert_eq!(unsafe { s.slice((3 << 20) - 1, 1).unwrap() }, &[0]);
        // SAFETY: as above.
        assert!(unsafe { s.slice_mut(3 << 20, 1) }.is_err());
    }
}
