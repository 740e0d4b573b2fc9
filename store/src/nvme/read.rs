//! Reads, and the verification of whole values against their header and checksum.

use std::ops::{Deref, Range};

use super::{
    layout::{align_down, align_up, decode_header},
    tier::Shared,
    value_offset, AlignedBuf, NvmeError, NvmeTier, MAX_KEY_LEN, NVME_ALIGN,
};

/// A value (or a range of it) read from the tier: the aligned buffer it was read into, and
/// where in it the requested bytes are.
pub struct ValueBuf {
    pub(super) buf: AlignedBuf,
    pub(super) range: Range<usize>,
}

impl ValueBuf {
    /// The buffer and the requested bytes' range in it (to hand the buffer on without a copy).
    pub fn into_parts(self) -> (AlignedBuf, Range<usize>) {
        (self.buf, self.range)
    }
}

impl Deref for ValueBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
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
            return Ok(ValueBuf {
                buf: AlignedBuf::new(0),
                range: 0..0,
            });
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
        let n = io_len as usize;
        let buf = if n <= s.pool.buf_size() {
            s.pool.take_or_alloc(n)
        } else {
            AlignedBuf::new(n)
        };
        let (buf, r) = s.engine.read(buf, io_off).await;
        r.map_err(|e| s.io_failed("read", io_off, io_len, e))?;
        if whole {
            s.verify(offset, key_len, value_len, &buf)?;
        }
        Ok(ValueBuf {
            buf,
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
        dst.copy_from_slice(&v);
        Ok(())
    }
}

impl Shared {
    /// Checks a whole record read at `offset`: its header, and the value against the
    /// header's checksum and the index's.
    fn verify(
        &self,
        offset: u64,
        key_len: usize,
        value_len: u64,
        rec: &[u8],
    ) -> Result<(), NvmeError> {
        let vo = value_offset(key_len) as usize;
        let corrupt = |reason: String| NvmeError::Corrupt { offset, reason };
        let indexed = self.lock().at(offset).cloned();
        let (h, key) = match decode_header(&rec[..vo]) {
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
        let actual = crc32c::crc32c(&rec[vo..vo + value_len as usize]);
        if actual != h.value_crc {
            self.drop_corrupt(offset, "value checksum mismatch");
            return Err(NvmeError::ChecksumMismatch {
                offset,
                expected: h.value_crc,
                actual,
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
