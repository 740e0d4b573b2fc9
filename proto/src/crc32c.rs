//! CRC-32C (Castagnoli, the iSCSI polynomial): the one checksum of object bytes and frame
//! headers, for every crate.
//!
//! Computed with `crc-fast`, which picks the widest instructions the CPU has at run time
//! (AVX-512 with VPCLMULQDQ here, SSE4.2 and PCLMULQDQ on older x86, NEON on ARM). Measured
//! on this machine, a 64 KiB copy followed by this checksum of the same piece runs at about
//! memcpy speed, where the `crc32c` crate's three-way hardware loop cost 10-15 % of it
//! (`docs/benchmarks.md`, "Checksums fused with the copy"). The values are the standard
//! CRC-32C; only the speed depends on the implementation.

use crc_fast::{CrcAlgorithm, Digest};

const ALGO: CrcAlgorithm = CrcAlgorithm::Crc32Iscsi;

/// The CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The CRC-32C of the bytes `crc` was the checksum of, followed by `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    if data.is_empty() {
        return crc;
    }
    // The digest's state is the register before the final inversion.
    let mut d = Digest::new_with_init_state(ALGO, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

/// The CRC-32C of a value gathered from `parts`, in order.
pub fn crc32c_parts<B: AsRef<[u8]>>(parts: impl IntoIterator<Item = B>) -> u32 {
    parts
        .into_iter()
        .fold(0, |crc, p| crc32c_append(crc, p.as_ref()))
}

/// The CRC-32C of `a`'s bytes followed by `b`'s, from their checksums and `b`'s length.
pub fn crc32c_combine(a: u32, b: u32, len_b: usize) -> u32 {
    crc_fast::checksum_combine(ALGO, u64::from(a), u64::from(b), len_b as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answers() {
        // The CRC-32C check value (RFC 3720's polynomial) and the empty input.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    proptest! {
        #[test]
        fn append_and_combine_agree_with_one_pass(
            a in proptest::collection::vec(any::<u8>(), 0..5000),
            b in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            let (ca, cb) = (crc32c(&a), crc32c(&b));
            prop_assert_eq!(crc32c_append(ca, &b), crc32c(&whole));
            prop_assert_eq!(crc32c_parts([&a, &b]), crc32c(&whole));
            prop_assert_eq!(crc32c_combine(ca, cb, b.len()), crc32c(&whole));
        }
    }
}
