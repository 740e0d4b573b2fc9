//! Caller memory given by address: what engines pass (`tensor.data_ptr()`, a numpy array's
//! address) and what the Python layer hands down for any buffer-protocol object.
//!
//! A batch describes its buffers as three flat lists, so the Python side never builds nested
//! tuples: `ptrs[i]`, `sizes[i]` for every buffer, and `counts[k]`, how many consecutive
//! buffers item `k` gathers from or scatters into (absent: one buffer per item).
//!
//! The caller's contract, as in Mooncake's binding: every buffer stays allocated and is
//! neither written (for puts) nor read or written (for gets) by anyone else until the call
//! returns. Python holds the buffer-protocol exports for the call's duration; raw addresses
//! are the caller's promise. What we can check, we do: null addresses, sizes that overflow,
//! counts that do not add up, and destinations that overlap (two `&mut` over one byte).

use std::fmt;

/// Why a batch's buffer description was refused (an `InvalidArgument` for every item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBuffers(pub String);

impl fmt::Display for BadBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One buffer: an address and a length, checked for null and overflow.
#[derive(Debug, Clone, Copy)]
struct Span {
    ptr: usize,
    len: usize,
}

/// Checks the flat description and returns each item's spans.
fn spans(
    items: usize,
    ptrs: &[usize],
    sizes: &[usize],
    counts: Option<&[usize]>,
) -> Result<Vec<Vec<Span>>, BadBuffers> {
    if ptrs.len() != sizes.len() {
        return Err(BadBuffers(format!(
            "{} addresses but {} sizes",
            ptrs.len(),
            sizes.len()
        )));
    }
    let counts_owned;
    let counts = match counts {
        Some(c) => c,
        None if ptrs.len() != items => {
            return Err(BadBuffers(format!(
                "{} buffers for {items} keys",
                ptrs.len()
            )));
        }
        None => {
            counts_owned = vec![1; items];
            &counts_owned
        }
    };
    if counts.len() != items {
        return Err(BadBuffers(format!(
            "{} buffer lists for {items} keys",
            counts.len()
        )));
    }
    let total: usize = counts.iter().sum();
    if total != ptrs.len() {
        return Err(BadBuffers(format!(
            "the buffer lists name {total} buffers but {} addresses were given",
            ptrs.len()
        )));
    }
    let mut at = 0;
    let mut out = Vec::with_capacity(items);
    for &n in counts {
        let mut item = Vec::with_capacity(n);
        for i in at..at + n {
            let (ptr, len) = (ptrs[i], sizes[i]);
            if len > 0 && ptr == 0 {
                return Err(BadBuffers(format!("buffer {i} has a null address")));
            }
            if ptr.checked_add(len).is_none() || len > isize::MAX as usize {
                return Err(BadBuffers(format!(
                    "buffer {i} (address {ptr:#x}, {len} bytes) wraps the address space"
                )));
            }
            item.push(Span { ptr, len });
        }
        at += n;
        out.push(item);
    }
    Ok(out)
}

/// Source buffers of a put batch, one list per item.
///
/// # Safety
/// Every non-empty buffer must be allocated, initialised and left unwritten for `'a` (the
/// call): the caller's contract in the module docs.
pub unsafe fn sources<'a>(
    items: usize,
    ptrs: &[usize],
    sizes: &[usize],
    counts: Option<&[usize]>,
) -> Result<Vec<Vec<&'a [u8]>>, BadBuffers> {
    Ok(spans(items, ptrs, sizes, counts)?
        .into_iter()
        .map(|item| {
            item.into_iter()
                .map(|s| {
                    if s.len == 0 {
                        return &[][..];
                    }
                    // SAFETY: `s.ptr` is non-null and `s.ptr + s.len` does not wrap (checked by
                    // `spans`); allocated, initialised and unwritten for `'a` is this function's
                    // precondition. Shared slices may overlap each other.
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) }
                })
                .collect()
        })
        .collect())
}

/// Destination buffers of a get batch, one list per item. Refuses overlapping destinations:
/// two writable slices over the same byte would be undefined behaviour, and the second write
/// would silently clobber the first.
///
/// # Safety
/// Every non-empty buffer must be allocated and neither read nor written by anyone else for
/// `'a` (the call): the caller's contract in the module docs.
pub unsafe fn destinations<'a>(
    items: usize,
    ptrs: &[usize],
    sizes: &[usize],
    counts: Option<&[usize]>,
) -> Result<Vec<Vec<&'a mut [u8]>>, BadBuffers> {
    let spans = spans(items, ptrs, sizes, counts)?;
    let mut sorted: Vec<(usize, usize)> = spans
        .iter()
        .flatten()
        .filter(|s| s.len > 0)
        .map(|s| (s.ptr, s.ptr + s.len))
        .collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(BadBuffers(format!(
            "destination buffers overlap: [{:#x}, {:#x}) and [{:#x}, {:#x})",
            w[0].0, w[0].1, w[1].0, w[1].1
        )));
    }
    Ok(spans
        .into_iter()
        .map(|item| {
            item.into_iter()
                .map(|s| {
                    if s.len == 0 {
                        return &mut [][..];
                    }
                    // SAFETY: non-null and not wrapping (checked by `spans`), disjoint from
                    // every other destination of this call (checked above), so no two of our
                    // slices alias; allocated and untouched by others for `'a` is this
                    // function's precondition.
                    unsafe { std::slice::from_raw_parts_mut(s.ptr as *mut u8, s.len) }
                })
                .collect()
        })
        .collect())
}
