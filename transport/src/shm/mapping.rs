//! A client's mapping of a node's segment memfd.

use std::{fs::File, os::fd::OwnedFd, ptr::NonNull};

use kvpool_proto::{ErrorCode, ShmSegment, WireError};
use memmap2::{MmapOptions, MmapRaw};

use crate::memory::SharedRange;

/// One of a node's segments, mapped read-write into this process. Only ever accessed through
/// [`SharedRange`]s: the node and other clients write it concurrently.
pub struct Mapping {
    seg: ShmSegment,
    map: MmapRaw,
}

impl Mapping {
    /// Maps `fd`, which the node says is `seg` (its size is checked against the file's).
    pub fn new(seg: ShmSegment, fd: OwnedFd) -> Result<Mapping, WireError> {
        let file = File::from(fd);
        let bad = |m: String| WireError::new(ErrorCode::InvalidArgument, m);
        let flen = file
            .metadata()
            .map_err(|e| bad(format!("segment {} memfd: {e}", seg.id)))?
            .len();
        if seg.size > seg.mapped || seg.mapped != flen {
            return Err(bad(format!(
                "segment {}: {} usable of {} mapped bytes, memfd of {flen}",
                seg.id, seg.size, seg.mapped
            )));
        }
        let len = usize::try_from(seg.mapped).map_err(|_| bad("segment too large".into()))?;
        // MAP_SHARED read-write: writes land in the node's memory. The file stays mapped
        // after `file` closes; nothing here ever truncates it.
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| bad(format!("mapping segment {}: {e}", seg.id)))?;
        Ok(Mapping { seg, map })
    }

    pub fn segment(&self) -> &ShmSegment {
        &self.seg
    }

    /// The memory of `offset..offset+len`, bounds-checked against the usable size as the
    /// node checks it.
    pub fn range(&self, offset: u64, len: u64) -> Result<SharedRange, WireError> {
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.seg.size);
        if !in_range {
            return Err(WireError::new(
                ErrorCode::OutOfRange,
                format!(
                    "range {offset}+{len} outside segment {} of {} bytes",
                    self.seg.id, self.seg.size
                ),
            ));
        }
        let ptr = NonNull::new(self.map.as_mut_ptr())
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "null mapping"))?;
        // SAFETY: offset+len <= size <= mapped length (checked above and in `new`), so the
        // range lies in the mapping, which lives as long as `self`; callers use ranges only
        // while they hold the attachment that owns this mapping. No reference to the mapped
        // bytes is ever formed (MmapRaw hands out only a pointer).
        Ok(unsafe {
            SharedRange::new(
                NonNull::new_unchecked(ptr.as_ptr().add(offset as usize)),
                len as usize,
            )
        })
    }
}
