//! A KV cache in host memory given by address: the only place its block ranges become
//! slices.
//!
//! Every slice is one segment of `KvLayout::segments(block, group)` for an in-range block, so
//! it lies inside a region's block range; the layout was checked at construction (non-null,
//! below `isize::MAX`, no byte in two block ranges, see [`super::layout`]). Whether the
//! memory is live and who else touches it is the caller's contract, stated on each function
//! as `crate::buffers` states it for `NativeClient`.

use std::sync::Arc;

use kvpool_connector::layout::KvLayout;
use pyo3::PyResult;

use super::layout::check_ids;

/// Per layer group, per block: the block's object for that group as slices, in object order.
pub(crate) type Parts<S> = Vec<Vec<Vec<S>>>;

pub(crate) struct HostCache {
    layout: Arc<KvLayout>,
}

impl HostCache {
    /// `layout` must have passed `KvLayout`'s (Python class) checks.
    pub(crate) fn new(layout: Arc<KvLayout>) -> Self {
        HostCache { layout }
    }

    /// The gather lists of `ids`' objects in layer groups `groups`, `[i][block][part]` for
    /// group `groups[i]`.
    ///
    /// # Panics
    /// If an id or a group is out of range (callers check first, with `check_ids` and
    /// `check_groups`).
    ///
    /// # Safety
    /// For `'a`, every block range of `ids` is allocated, initialised host memory that nobody
    /// writes.
    pub(crate) unsafe fn gather<'a>(&self, ids: &[usize], groups: &[usize]) -> Parts<&'a [u8]> {
        groups
            .iter()
            .map(|&g| {
                ids.iter()
                    .map(|&b| {
                        self.layout
                            .segments(b, g)
                            .into_iter()
                            .map(|s| {
                                // SAFETY: a segment of an in-range block (`segments` panics
                                // otherwise) lies in a block range of the checked layout: non-null
                                // and below isize::MAX; live, initialised and unwritten for 'a is
                                // this function's precondition. Shared slices may overlap.
                                unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.len) }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// The scatter lists of `ids`' objects, `[group][block][part]`; `ValueError` if an id is
    /// out of range or listed twice.
    ///
    /// # Safety
    /// For `'a`, every block range of `ids` is allocated host memory that nobody else reads
    /// or writes.
    pub(crate) unsafe fn scatter<'a>(&self, ids: &[usize]) -> PyResult<Parts<&'a mut [u8]>> {
        check_ids(&self.layout, ids, true)?;
        Ok((0..self.layout.num_groups())
            .map(|g| {
                ids.iter()
                    .map(|&b| {
                        self.layout
                            .segments(b, g)
                            .into_iter()
                            .map(|s| {
                                // SAFETY: as in `gather` for the address range. No two of these
                                // slices alias: each is the union of the block ranges of some
                                // (region, block) pairs, no pair is in two slices (the ids are
                                // distinct, checked above; a group's segments cover its
                                // regions once; groups share no region), and the layout has no
                                // byte in two block ranges. Nobody else touches them for 'a
                                // (precondition).
                                unsafe { std::slice::from_raw_parts_mut(s.addr as *mut u8, s.len) }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect())
    }

    /// Owned copies of `ids`' objects in layer groups `groups`, `[i][block]` (for saves that
    /// outlive the call).
    ///
    /// # Panics
    /// If an id or a group is out of range.
    ///
    /// # Safety
    /// As [`Self::gather`], for the duration of this call.
    pub(crate) unsafe fn copy_out(&self, ids: &[usize], groups: &[usize]) -> Vec<Vec<Vec<u8>>> {
        // SAFETY: this function's precondition, for the slices' lifetime (this call).
        let parts = unsafe { self.gather(ids, groups) };
        parts
            .into_iter()
            .map(|blocks| blocks.into_iter().map(|p| p.concat()).collect())
            .collect()
    }
}
