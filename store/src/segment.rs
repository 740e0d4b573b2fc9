//! A DRAM segment: one shared memory mapping whose ranges clients write and read directly.
//!
//! The segment's memory is a memfd (with 2 MiB hugetlb pages when configured and available),
//! mapped shared: the node's own connection tasks reach it through its mapping, and a client
//! on the same host maps the same memfd (handed over a Unix socket, see
//! `kvpool_transport::shm`) and copies in and out of it directly.
//!
//! The master's allocator hands out disjoint ranges, so concurrent writers touch disjoint
//! bytes. The one exception is space reused after eviction while a slow reader still copies
//! the old object: the reader then gets mixed bytes, and the client detects it by its lease
//! check and the object's checksum. Since other processes may write the memory at any time,
//! no `&[u8]` or `&mut [u8]` is ever formed over it: [`Segment::range`] hands out
//! [`SharedRange`]s, which only copy through raw pointers.

use std::{
    fmt,
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    ptr::NonNull,
};

use kvpool_proto::{ErrorCode, SegmentId, SegmentInfo, WireError};
use kvpool_transport::memory::SharedRange;
use memmap2::{Advice, MmapMut, MmapOptions};

/// Size of a huge page, in bytes (x86-64 and aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;
/// `MFD_HUGE_2MB`: log2 of the huge page size asked of hugetlbfs, shifted into place.
const MFD_HUGE_2MB: libc::c_uint = 21 << 26;
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
    /// is ever formed after it: ranges are derived from this pointer range by range.
    ptr: NonNull<u8>,
    backing: Backing,
    /// The memfd behind the mapping: what a same-host client maps.
    memfd: File,
    /// Length of the memfd and the mapping (`size` rounded up to a huge page for hugetlb).
    mapped: usize,
    /// Owns the mapping; unmapped on drop. Never dereferenced after creation.
    _map: MmapMut,
}

// SAFETY: `Segment` owns its mapping (like `MmapMut`, which is Send + Sync). The raw pointer
// only refers into that mapping, which lives as long as the `Segment`. Access to the bytes
// goes through `SharedRange`, which only copies through raw pointers.
unsafe impl Send for Segment {}
// SAFETY: see `Send` above; `&Segment` hands out no reference to segment memory.
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

/// Creates a memfd named for the segment, with extra `flags` (hugetlb).
fn memfd(id: SegmentId, flags: libc::c_uint) -> std::io::Result<File> {
    kvpool_transport::shm::memfd(&format!("kvpool-segment-{id}"), flags)
}

/// A memfd of `len` bytes, mapped shared.
fn map_memfd(id: SegmentId, len: usize, flags: libc::c_uint) -> std::io::Result<(File, MmapMut)> {
    let file = memfd(id, flags)?;
    file.set_len(len as u64)?;
    // SAFETY: the memfd is ours; nothing truncates it while mapped (the segment owns it and
    // clients that map it never resize it: they only get a read-write mapping of it).
    let map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
    Ok((file, map))
}

impl Segment {
    /// Creates, maps and pre-faults a `size`-byte memfd. With `huge_pages`, tries hugetlb
    /// pages first, then transparent huge pages; plain pages are the last resort.
    /// Blocking (pre-faulting touches every page): call it from a blocking context.
    pub fn new(id: SegmentId, size: u64, huge_pages: bool) -> std::io::Result<Segment> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| std::io::Error::other(format!("segment size {size} is not mappable")))?;
        let mut attempt = None;
        if huge_pages {
            // A hugetlb memfd's length must be a multiple of the page size.
            let rounded = len.div_ceil(HUGE_PAGE).checked_mul(HUGE_PAGE);
            if let Some(rounded) = rounded {
                match map_memfd(id, rounded, libc::MFD_HUGETLB | MFD_HUGE_2MB) {
                    Ok((f, m)) => attempt = Some((f, m, rounded, Backing::HugeTlb)),
                    Err(e) => tracing::warn!(
                        segment = %id,
                        "no hugetlb pages for {size} bytes ({e}); see /proc/sys/vm/nr_hugepages; \
                         trying transparent huge pages"
                    ),
                }
            }
        }
        let (memfd, mut map, mapped, backing) = match attempt {
            Some(a) => a,
            None => {
                let (f, m) = map_memfd(id, len, 0)?;
                // THP must be asked for before the first touch to back the pages at fault time
                // (shared memory honours it when shmem_enabled is `advise` or `always`).
                if huge_pages {
                    match m.advise(Advice::HugePage) {
                        Ok(()) => (f, m, len, Backing::TransparentHuge),
                        Err(e) => {
                            tracing::warn!(segment = %id, "transparent huge pages refused ({e})");
                            (f, m, len, Backing::Base)
                        }
                    }
                } else {
                    (f, m, len, Backing::Base)
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
            memfd,
            mapped,
            _map: map,
        })
    }

    /// The memfd behind the segment, to hand to a same-host client.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Length of the memfd (what a client maps): at least [`Segment::size`].
    pub fn mapped_len(&self) -> u64 {
        self.mapped as u64
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

    /// The memory of `offset..offset+len`. Another process (a same-host client) may write
    /// it at any time, so it is only ever copied, never borrowed as a slice.
    pub fn range(&self, offset: u64, len: u64) -> Result<SharedRange, WireError> {
        let start = self.check(offset, len)?;
        // SAFETY: `check` proved start+len <= size <= mapping length, so the range is inside
        // the mapping; the mapping is read-write and lives as long as the segment, which
        // outlives every range handed out (the node holds its segments until it exits, and
        // ranges are used within a request). No reference to segment memory is ever formed.
        Ok(unsafe {
            SharedRange::new(
                NonNull::new_unchecked(self.ptr.as_ptr().add(start)),
                len as usize,
            )
        })
    }
}

/// Faults every page in now: first touch of fresh anonymous memory costs a page fault and a
/// zeroing per page, which would otherwise land on the first writes' latency.
fn prefault(ptr: NonNull<u8>, len: usize) {
    // SAFETY: ptr..ptr+len is a fresh shared mapping of a new memfd owned by the caller;
    // madvise does not change its contents (zero pages), only populates the page tables.
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
    fn writes_are_visible_to_reads_and_to_another_mapping() {
        let s = Segment::new(SegmentId(2), 3 << 20, true).unwrap();
        s.range(4096, 5).unwrap().copy_from(b"hello");
        assert_eq!(s.range(4096, 5).unwrap().to_vec(), b"hello");
        assert_eq!(s.range((3 << 20) - 1, 1).unwrap().to_vec(), [0]);
        assert!(s.range(3 << 20, 1).is_err());
        // A second mapping of the memfd (what a same-host client makes) sees the same bytes.
        let file = File::from(s.memfd().try_clone_to_owned().unwrap());
        // SAFETY: test-only mapping of the segment's memfd, read through a copy.
        let other = unsafe { MmapOptions::new().len(s.mapped).map(&file).unwrap() };
        assert_eq!(&other[4096..4101], b"hello");
    }
}
