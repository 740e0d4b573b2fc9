//! Reads, and the verification of whole values against their header and checksum.
//!
//! A large read is split into a few parts read at once (the device works on all of them
//! while one part alone would leave it idle between requests), each into a buffer of its own
//! (a registered staging buffer where one is free), and each part's share of the value is
//! checksummed as soon as it lands; the parts' checksums are then combined, so verifying a
//! whole value costs no pass of its own after the last part. The parts come out in order as
//! they land ([`NvmeTier::read_value_parts`]), so a caller can send the first while the
//! others are still on the device; the verdict on a whole value comes after its last part.

use std::{ops::Range, pin::Pin};

use futures::{
    stream::{self, FuturesOrdered},
    Stream, StreamExt,
};

use super::{
    layout::{align_down, align_up, decode_header},
    tier::Shared,
    value_offset, AlignedBuf, NvmeError, NvmeTier, MAX_KEY_LEN, NVME_ALIGN,
};

/// Reads longer than twice this are split into parts of about this size, but into no more
/// than the tier's `read-parts` (1 by default: no split; at 8, a value of up to 16 MiB still
/// has its parts in 2 MiB staging buffers).
const READ_PART: u64 = 256 << 10;

/// One landed part of a read: the aligned buffer it was read into, and where the requested
/// bytes are in it (none, for a part that holds only the header or alignment padding).
pub struct Part {
    buf: AlignedBuf,
    range: Range<usize>,
}

impl Part {
    /// The requested bytes this part holds.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

/// A read's parts in order, as they land; an `Err` ends it (the read, or the whole value's
/// check after its last part, failed: the parts before it are not the value).
pub type PartStream<'a> = Pin<Box<dyn Stream<Item = Result<Part, NvmeError>> + Send + 'a>>;

/// A value (or a range of it) read from the tier and checked: its parts, in order.
pub struct ValueBuf {
    parts: Vec<Part>,
}

impl ValueBuf {
    /// Collects a read's parts; its error, if it ends with one.
    pub async fn collect<E>(
        mut parts: impl Stream<Item = Result<Part, E>> + Unpin,
    ) -> Result<ValueBuf, E> {
        let mut v = ValueBuf { parts: Vec::new() };
        while let Some(p) = parts.next().await {
            v.parts.push(p?);
        }
        Ok(v)
    }

    /// The requested bytes' length.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.range.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The requested bytes, as slices of the part buffers, in order (to send them without a
    /// copy).
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(Part::bytes).filter(|b| !b.is_empty())
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

/// Where a part's check stands while the parts land.
struct Landing<F: std::future::Future> {
    reads: FuturesOrdered<F>,
    /// The combined crc32c of the value bytes landed so far (whole reads).
    crc: Option<u32>,
    /// The record's header bytes, copied out of the first part (whole reads).
    header: Option<Vec<u8>>,
    done: bool,
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
        ValueBuf::collect(self.read_value_parts(offset, key_len, value_len, range)?).await
    }

    /// [`read_value`](Self::read_value), part by part: every part is read at once, and each
    /// comes out (its share of the value checksummed) as soon as it and the parts before it
    /// have landed. A whole value's verdict (header and crc32c) is the stream's last item
    /// when it fails; the stream just ends when it holds.
    pub fn read_value_parts(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        range: (u64, u64),
    ) -> Result<PartStream<'_>, NvmeError> {
        let s = &*self.shared;
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
            return Ok(Box::pin(stream::empty()));
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
        // The requested bytes, and the value's bytes (what a whole read checksums), relative
        // to the read's start.
        let skip = offset + vo + start - io_off;
        let wanted = skip..skip + len;
        let value = vo..vo + value_len;
        let reads: FuturesOrdered<_> = parts(io_len, s.read_parts)
            .into_iter()
            .map(|p| {
                let n = (p.end - p.start) as usize;
                let buf = if n <= s.pool.buf_size() {
                    s.pool.take_or_alloc(n)
                } else {
                    AlignedBuf::new(n)
                };
                let (value, wanted) = (value.clone(), wanted.clone());
                async move {
                    let (buf, r) = s.engine.read(buf, io_off + p.start).await;
                    r.map_err(|e| s.io_failed("read", io_off + p.start, p.end - p.start, e))?;
                    // This part's share of the value, checksummed while it is in cache.
                    let (vs, ve) = (value.start.max(p.start), value.end.min(p.end));
                    let crc = (whole && vs < ve).then(|| {
                        let share = &buf[(vs - p.start) as usize..(ve - p.start) as usize];
                        (kvpool_proto::crc32c::crc32c(share), share.len())
                    });
                    // This part's share of the requested bytes (none: header or padding).
                    let (ws, we) = (wanted.start.max(p.start), wanted.end.min(p.end));
                    let range = if ws < we {
                        (ws - p.start) as usize..(we - p.start) as usize
                    } else {
                        0..0
                    };
                    Ok::<_, NvmeError>((buf, range, p.start == 0, crc))
                }
            })
            .collect();
        let landing = Landing {
            reads,
            crc: None,
            header: None,
            done: false,
        };
        let parts = stream::unfold(landing, move |mut st| async move {
            if st.done {
                return None;
            }
            match st.reads.next().await {
                Some(Ok((buf, range, first, part_crc))) => {
                    if let Some((c, n)) = part_crc {
                        st.crc = Some(match st.crc {
                            None => c,
                            Some(acc) => kvpool_proto::crc32c::crc32c_combine(acc, c, n),
                        });
                    }
                    if whole && first {
                        // The header is in the first part: parts are at least 64 KiB, a
                        // header block at most 8 KiB.
                        st.header = Some(buf[..vo as usize].to_vec());
                    }
                    Some((Ok(Part { buf, range }), st))
                }
                Some(Err(e)) => {
                    st.done = true;
                    Some((Err(e), st))
                }
                None => {
                    st.done = true;
                    if !whole {
                        return None;
                    }
                    let header = st.header.take().unwrap_or_default();
                    let verdict =
                        s.verify(offset, key_len, value_len, &header, st.crc.unwrap_or(0));
                    verdict.err().map(|e| (Err(e), st))
                }
            }
        });
        Ok(Box::pin(parts))
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
