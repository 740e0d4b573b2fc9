//! Reads, and the verification of whole values against their header and checksum.
//!
//! A large read is split into a few parts read at once (the device works on all of them
//! while one part alone would leave it idle between requests), each into a buffer of its own
//! (a registered staging buffer where one is free), and each part's share of the value is
//! checksummed as soon as it lands; the parts' checksums are then combined, so verifying a
//! whole value costs no pass of its own after the last part.

use std::ops::Range;

use futures::future::join_all;

use super::{
    layout::{align_down, align_up, decode_header},
    tier::Shared,
    value_offset, AlignedBuf, NvmeError, NvmeTier, MAX_KEY_LEN, NVME_ALIGN,
};

/// Reads longer than twice this are split into parts of about this size, but into no more
/// than the tier's `read-parts` (1 by default: no split; at 8, a value of up to 16 MiB still
/// has its parts in 2 MiB staging buffers).
const READ_PART: u64 = 256 << 10;

/// A value (or a range of it) read from the tier: the aligned buffers its parts were read
/// into, in order, and where the requested bytes are in their concatenation.
pub struct ValueBuf {
    parts: Vec<AlignedBuf>,
    range: Range<usize>,
}

impl ValueBuf {
    fn empty() -> ValueBuf {
        ValueBuf {
            parts: Vec::new(),
            range: 0..0,
        }
    }

    /// The requested bytes' length.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The requested bytes, as slices of the part buffers, in order (to send them without a
    /// copy).
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let range = self.range.clone();
        let mut at = 0usize;
        self.parts.iter().filter_map(move |p| {
            let (lo, hi) = (at, at + p.len());
            at = hi;
            let (s, e) = (range.start.max(lo), range.end.min(hi));
            (s < e).then(|| &p[s - lo..e - lo])
        })
    }

    /// Copies the requested bytes into `dst`, which must be exactly [`len`](Self::len) long.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len(), "destination length");
        let mut at = 0;
        for s in self.slices() {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        self.copy_to(&mut v);
        v
    }
}

/// The parts `[start, end)` (relative to the read's start) a read of `len` bytes is split
/// into: one part up to twice [`READ_PART`], else at most `max` parts of equal, 4 KiB-aligned
/// size.
fn parts(len: u64, max: u64) -> Vec<Range<u64>> {
    let n = if len <= 2 * READ_PART {
        1
    } else {
        len.div_ceil(READ_PART).clamp(1, max.max(1))
    };
    let size = align_up(len.div_ceil(n), NVME_ALIGN);
    (0..len)
        .step_by(size as usize)
        .map(|s| s..(s + size).min(len))
        .collect()
}

impl NvmeTier {
    /// Reads `range` = (start, len) of the value of the record at `offset` (whose key is
    /// `key_len` bytes and value `value_len`). A read of the whole value also reads the
    /// header and checks the value's crc32c: a mismatch is an error (and drops the record
    /// from the index), never bytes. Partial ranges are not checked (no checksum covers them).
    pub async fn read_value(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        range: (u64, u64),
    ) -> Result<ValueBuf, NvmeError> {
        let s = &self.shared;
        if key_len == 0 || key_len > MAX_KEY_LEN {
            return Err(NvmeError::InvalidArgument(format!(
                "key length {key_len} (1 to {MAX_KEY_LEN})"
            )));
        }
        s.check_extent(offset, key_len, value_len)?;
        let (start, len) = range;
        if start.checked_add(len).is_none_or(|end| end > value_len) {
            return Err(NvmeError::InvalidArgument(format!(
                "range {start}+{len} outside a value of {value_len} bytes"
            )));
        }
        if len == 0 {
            return Ok(ValueBuf::empty());
        }
        let vo = value_offset(key_len);
        let whole = start == 0 && len == value_len;
        // Whole values come with their header (one read) so that they can be verified.
        let (io_off, io_len) = if whole {
            (offset, vo + align_up(value_len, NVME_ALIGN))
        } else {
            let a = align_down(vo + start, NVME_ALIGN);
            (offset + a, align_up(vo + start + len, NVME_ALIGN) - a)
        };
        let skip = (offset + vo + start - io_off) as usize;
        // The value's bytes, relative to the read's start (what a whole read checksums).
        let value = vo..vo + value_len;
        let reads = parts(io_len, s.read_parts).into_iter().map(|p| {
            let n = (p.end - p.start) as usize;
            let buf = if n <= s.pool.buf_size() {
                s.pool.take_or_alloc(n)
            } else {
                AlignedBuf::new(n)
            };
            let value = value.clone();
            async move {
                let (buf, r) = s.engine.read(buf, io_off + p.start).await;
                r.map_err(|e| s.io_failed("read", io_off + p.start, p.end - p.start, e))?;
                // This part's share of the value, checksummed while it is in cache.
                let (vs, ve) = (value.start.max(p.start), value.end.min(p.end));
                let crc = (whole && vs < ve).then(|| {
                    let share = &buf[(vs - p.start) as usize..(ve - p.start) as usize];
                    (crc32c::crc32c(share), share.len())
                });
                Ok::<_, NvmeError>((buf, crc))
            }
        });
        let mut bufs = Vec::new();
        let mut crc = None;
        for part in join_all(reads).await {
            let (buf, part_crc) = part?;
            if let Some((c, n)) = part_crc {
                crc = Some(match crc {
                    None => c,
                    Some(acc) => crc32c::crc32c_combine(acc, c, n),
                });
            }
            bufs.push(buf);
        }
        if whole {
            // The header is in the first part: parts are at least 64 KiB, a header block at
            // most 8 KiB.
            let header = &bufs[0][..vo as usize];
            s.verify(offset, key_len, value_len, header, crc.unwrap_or(0))?;
        }
        Ok(ValueBuf {
            parts: bufs,
            range: skip..skip + len as usize,
        })
    }

    /// [`read_value`](Self::read_value) into `dst`, which must be exactly `range.1` bytes.
    pub async fn read_value_into(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        range: (u64, u64),
        dst: &mut [u8],
    ) -> Result<(), NvmeError> {
        if dst.len() as u64 != range.1 {
            return Err(NvmeError::InvalidArgument(format!(
                "destination of {} bytes for a range of {}",
                dst.len(),
                range.1
            )));
        }
        let v = self.read_value(offset, key_len, value_len, range).await?;
        v.copy_to(dst);
        Ok(())
    }
}

impl Shared {
    /// Checks a whole record read at `offset`: its header (`header`, the record's first
    /// bytes up to the value), and the value's crc32c (`value_crc`, of the bytes read)
    /// against the header's checksum and the index's.
    fn verify(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        header: &[u8],
        value_crc: u32,
    ) -> Result<(), NvmeError> {
        let corrupt = |reason: String| NvmeError::Corrupt { offset, reason };
        let indexed = self.lock().at(offset).cloned();
        let (h, key) = match decode_header(header) {
            Ok(x) => x,
            Err(e) => {
                // The header an indexed record had at open is gone: never-synced or damaged.
                self.drop_corrupt(offset, &e.to_string());
                return Err(corrupt(e.to_string()));
            }
        };
        if h.key_len as usize != key_len || h.value_len != value_len {
            return Err(corrupt(format!(
                "it holds a {}-byte key and a {}-byte value, not {key_len} and {value_len}",
                h.key_len, h.value_len
            )));
        }
        if let Some(r) = &indexed {
            if r.replica != h.replica || r.checksum != h.value_crc || r.key != key {
                return Err(corrupt(format!(
                    "the header names replica {}, the index replica {}",
                    h.replica, r.replica
                )));
            }
        }
        if value_crc != h.value_crc {
            self.drop_corrupt(offset, "value checksum mismatch");
            return Err(NvmeError::ChecksumMismatch {
                offset,
                expected: h.value_crc,
                actual: value_crc,
            });
        }
        Ok(())
    }

    /// Drops the indexed record at `offset`, whose bytes failed their check.
    fn drop_corrupt(&self, offset: u64, why: &str) {
        let mut st = self.lock();
        let Some(id) = st.by_offset.get(&offset).copied() else {
            return;
        };
        st.remove(id);
        tracing::warn!(replica = id, offset, why, "corrupt nvme record dropped");
        if let Err(e) = self.index.write(&[], &[id], &[], false) {
            tracing::warn!(
                replica = id,
                "cannot drop the corrupt record from the index: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 8;

    #[test]
    fn reads_split_into_aligned_parts_that_cover_them() {
        for len in [
            4096,
            2 * READ_PART,
            2 * READ_PART + 4096,
            (1 << 20) + 4096,
            64 << 20,
        ] {
            let p = parts(len, MAX);
            assert_eq!(p.first().map(|r| r.start), Some(0));
            assert_eq!(p.last().map(|r| r.end), Some(len));
            assert!(p.windows(2).all(|w| w[0].end == w[1].start), "{len}: {p:?}");
            assert!(p.iter().all(|r| r.start % NVME_ALIGN == 0), "{len}: {p:?}");
            assert!(p.len() as u64 <= MAX);
        }
        assert_eq!(
            parts(2 * READ_PART, MAX).len(),
            1,
            "up to two parts' worth is one read"
        );
        assert_eq!(
            parts((1 << 20) + 4096, MAX).len(),
            5,
            "a 1 MiB value: five parts"
        );
        assert_eq!(parts(64 << 20, MAX).len(), MAX as usize);
        let one = parts(64 << 20, 1);
        assert_eq!(
            (one.len(), one[0].end),
            (1, 64 << 20),
            "read-parts = 1: one read"
        );
    }
}
