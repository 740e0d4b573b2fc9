//! The on-disk record format of an NVMe segment: what a record at an extent offset looks
//! like. Shared by the master (it allocates whole records and tells clients where the value
//! starts), the node (it writes and checks records) and a same-host client (it reads records
//! straight off the node's file and checks them as the node does).
//!
//! ```text
//! offset                                      offset + value_offset(key_len)
//! | header (64 B) | key | zero pad to 4 KiB | value | zero pad to 4 KiB |
//! ```
//!
//! The header (little endian) carries a magic, a format version, the replica id, the key
//! length, the value length and the value's crc32c, and a crc32c of itself and the key, so a
//! header that was never written, half written, or belongs to another record is told apart
//! from the one the index expects. The value starts on a 4 KiB boundary so that a read of
//! any value range is one O_DIRECT read of the blocks covering it.

/// Alignment of extents, values and every O_DIRECT transfer.
pub const NVME_ALIGN: u64 = 4096;
/// Bytes of the fixed header at the start of a record.
pub const HEADER_LEN: usize = 64;
/// Longest key a record holds (docs/design.md §3: keys are at most 4 KiB).
pub const MAX_KEY_LEN: usize = 4096;
/// "KVNV", little endian.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KVNV");
/// Format version written by this build; a record of another version is not read.
pub const RECORD_VERSION: u16 = 1;

/// Where the header's own crc32c sits in the header block.
pub const HEADER_CRC_AT: usize = 8;

pub const fn align_up(x: u64, a: u64) -> u64 {
    // Saturating: lengths come from requests, and a huge one must fail a range check, not wrap.
    x.div_ceil(a).saturating_mul(a)
}

pub const fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// Offset of the value inside a record: the header and key, rounded up to 4 KiB.
pub const fn value_offset(key_len: usize) -> u64 {
    align_up((HEADER_LEN + key_len) as u64, NVME_ALIGN)
}

/// Bytes a record occupies on disk (what the master allocates for it): the header block,
/// then the value padded to 4 KiB.
pub const fn record_len(key_len: usize, value_len: u64) -> u64 {
    value_offset(key_len).saturating_add(align_up(value_len, NVME_ALIGN))
}

/// The fixed fields of a record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub replica: u64,
    pub key_len: u32,
    pub value_len: u64,
    /// crc32c of the value, as the writer computed it.
    pub value_crc: u32,
}

/// Why a header block is not the record it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("bad magic {0:#010x} (no record was written here)")]
    Magic(u32),
    #[error("record format version {0}, this build reads {RECORD_VERSION}")]
    Version(u16),
    #[error("key length {0} over the block read or the 4 KiB limit")]
    KeyLen(u32),
    #[error("header checksum {actual:#010x} does not match {stored:#010x} (torn header)")]
    HeaderChecksum { stored: u32, actual: u32 },
}

/// Writes the header and the key at the start of `out` (at least `HEADER_LEN + key.len()`
/// bytes; the caller zeroes the padding).
pub fn encode_header(h: &RecordHeader, key: &[u8], out: &mut [u8]) {
    let hdr = &mut out[..HEADER_LEN];
    hdr.fill(0);
    hdr[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    hdr[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
    // 6..8: flags, none yet.
    hdr[12..16].copy_from_slice(&h.key_len.to_le_bytes());
    hdr[16..24].copy_from_slice(&h.replica.to_le_bytes());
    hdr[24..32].copy_from_slice(&h.value_len.to_le_bytes());
    hdr[32..36].copy_from_slice(&h.value_crc.to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + key.len()].copy_from_slice(key);
    let crc = header_crc(&out[..HEADER_LEN], key);
    out[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Parses and checks the header at the start of `block`, returning it and the key.
pub fn decode_header(block: &[u8]) -> Result<(RecordHeader, &[u8]), LayoutError> {
    let u32_at =
        |i: usize| u32::from_le_bytes([block[i], block[i + 1], block[i + 2], block[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&block[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if block.len() < HEADER_LEN {
        return Err(LayoutError::Magic(0));
    }
    let magic = u32_at(0);
    if magic != RECORD_MAGIC {
        return Err(LayoutError::Magic(magic));
    }
    let version = u16::from_le_bytes([block[4], block[5]]);
    if version != RECORD_VERSION {
        return Err(LayoutError::Version(version));
    }
    let key_len = u32_at(12);
    let key_end = HEADER_LEN + key_len as usize;
    if key_len as usize > MAX_KEY_LEN || key_end > block.len() {
        return Err(LayoutError::KeyLen(key_len));
    }
    let key = &block[HEADER_LEN..key_end];
    let stored = u32_at(HEADER_CRC_AT);
    let actual = header_crc(&block[..HEADER_LEN], key);
    if stored != actual {
        return Err(LayoutError::HeaderChecksum { stored, actual });
    }
    Ok((
        RecordHeader {
            replica: u64_at(16),
            key_len,
            value_len: u64_at(24),
            value_crc: u32_at(32),
        },
        key,
    ))
}

/// crc32c of the header with its checksum field taken as zero, then of the key.
fn header_crc(hdr: &[u8], key: &[u8]) -> u32 {
    let crc = crate::crc32c::crc32c(&hdr[..HEADER_CRC_AT]);
    let crc = crate::crc32c::crc32c_append(crc, &[0; 4]);
    let crc = crate::crc32c::crc32c_append(crc, &hdr[HEADER_CRC_AT + 4..HEADER_LEN]);
    crate::crc32c::crc32c_append(crc, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_offsets() {
        assert_eq!(value_offset(1), 4096);
        assert_eq!(value_offset(4096 - HEADER_LEN), 4096);
        assert_eq!(value_offset(4096 - HEADER_LEN + 1), 8192);
        assert_eq!(value_offset(MAX_KEY_LEN), 8192);
        assert_eq!(record_len(10, 0), 4096);
        assert_eq!(record_len(10, 1), 8192);
        assert_eq!(record_len(10, 4096), 8192);
        assert_eq!(record_len(10, (1 << 20) + 3), 4096 + (1 << 20) + 4096);
        assert_eq!(record_len(10, u64::MAX), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = RecordHeader {
            replica: 42,
            key_len: 5,
            value_len: 1 << 20,
            value_crc: 0xdead_beef,
        };
        let mut block = vec![0u8; 4096];
        encode_header(&h, b"hello", &mut block);
        let (got, key) = decode_header(&block).unwrap();
        assert_eq!((got, key), (h, &b"hello"[..]));

        for i in [0, 4, 8, 13, 20, 30, 33, 40, 63, 64, 68] {
            let mut bad = block.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_header(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert_eq!(
            decode_header(&vec![0u8; 4096]),
            Err(LayoutError::Magic(0)),
            "never-written block"
        );
        assert!(
            decode_header(&block[..HEADER_LEN + 4]).is_err(),
            "key cut off"
        );
    }
}
