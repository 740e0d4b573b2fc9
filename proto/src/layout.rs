//! The on-disk layout of an object on an NVMe segment, as far as others must know it: the
//! master allocates whole records and tells clients where the value starts; the node writes
//! the header (see `store/src/nvme/layout.rs` for its fields).
//!
//! ```text
//! | header (RECORD_HEADER_LEN) | key | pad to 4 KiB | value | pad to 4 KiB |
//! ^ record offset (4 KiB-aligned)      ^ value_offset(key_len)
//! ```
//! Values start 4 KiB-aligned so that they are read with O_DIRECT straight off the disk.

/// Alignment of records and values on an NVMe segment.
pub const NVME_ALIGN: u64 = 4096;
/// Bytes of the fixed record header before the key.
pub const RECORD_HEADER_LEN: u64 = 64;

const fn align_up(n: u64) -> u64 {
    n.div_ceil(NVME_ALIGN) * NVME_ALIGN
}

/// Offset of the value from the start of its record.
pub const fn value_offset(key_len: usize) -> u64 {
    align_up(RECORD_HEADER_LEN + key_len as u64)
}

/// Bytes a record of this key and value occupies.
pub const fn record_len(key_len: usize, value_len: u64) -> u64 {
    value_offset(key_len) + align_up(value_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden() {
        assert_eq!(value_offset(1), 4096);
        assert_eq!(value_offset(4096 - 64), 4096);
        assert_eq!(value_offset(4096 - 63), 8192);
        assert_eq!(record_len(10, 1), 8192);
        assert_eq!(record_len(10, 4096), 8192);
        assert_eq!(record_len(10, 4097), 12288);
    }
}
