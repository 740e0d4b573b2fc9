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
///
/// Appending `n` bytes multiplies the register by x^(8n) modulo the polynomial (the pre- and
/// post-inversions cancel between the two checksums), so the result is `a · x^(8·len_b) + b`
/// over GF(2). The power is built from a table of x^(2^k) with one multiplication per set bit
/// of the length: under a microsecond, where `crc_fast::checksum_combine` took about 30 µs
/// (measured: it dominated a same-host 4 KiB get).
pub fn crc32c_combine(a: u32, b: u32, len_b: usize) -> u32 {
    mul_mod(x_pow_8n(len_b as u64), a) ^ b
}

/// CRC-32C's polynomial, bit-reflected (bit 31 is the coefficient of x^0).
const POLY: u32 = 0x82F6_3B78;

/// `a · b` modulo the polynomial, both bit-reflected.
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// x^(2^k) modulo the polynomial for k in 0..32 (x^1 is bit 30 when reflected). Lengths of
/// 2^29 bytes and more need higher powers, squared on the fly.
const X_POW_2K: [u32; 32] = {
    let mut t = [0u32; 32];
    t[0] = 1 << 30;
    let mut k = 1;
    while k < 32 {
        t[k] = mul_mod(t[k - 1], t[k - 1]);
        k += 1;
    }
    t
};

/// x^(8n) modulo the polynomial: the product of x^(2^k) over the set bits k of 8n.
fn x_pow_8n(n: u64) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    let mut bits = n;
    // 8n = n << 3: bit i of n is bit i + 3 of 8n.
    let mut k = 3usize;
    let mut sq = X_POW_2K[3];
    while bits != 0 {
        if bits & 1 != 0 {
            p = mul_mod(sq, p);
        }
        bits >>= 1;
        k += 1;
        sq = if k < 32 { X_POW_2K[k] } else { mul_mod(sq, sq) };
    }
    p
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

        #[test]
        fn combine_agrees_with_crc_fast_at_any_length(
            a in any::<u32>(),
            b in any::<u32>(),
            len in prop_oneof![0u64..10_000, 0u64..(1 << 40)],
        ) {
            let want = crc_fast::checksum_combine(ALGO, u64::from(a), u64::from(b), len) as u32;
            prop_assert_eq!(crc32c_combine(a, b, len as usize), want);
        }
    }
}
