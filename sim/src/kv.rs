//! The simulated forward pass: every block's K and V bytes, per layer, are a deterministic
//! function of the whole token prefix up to the end of that block, the layer, K or V, the model
//! and the TP rank. So a block loaded under the wrong key, into the wrong slot, from another
//! prompt, shifted by a block, or left stale from an earlier request shows up as wrong bytes.
//!
//! The hash here (FNV-1a over the tokens) is independent of the block-key hash (XXH3), so a
//! bug in the keys cannot hide itself by being repeated in the "KV".

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// What the KV depends on besides the tokens: different models (or TP ranks, which hold
/// different heads) must never produce equal bytes for equal tokens.
pub fn model_seed(model: &str, tp_rank: u32) -> u64 {
    fnv(fnv(FNV_OFFSET, model.as_bytes()), &tp_rank.to_le_bytes())
}

/// The running prefix hash after each block of `tokens` (the last, partial block included),
/// so the KV of block `i` costs O(block) to seed, not O(prefix).
pub fn prefix_seeds(seed: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut h = seed;
    tokens
        .chunks(block_size)
        .map(|blk| {
            for t in blk {
                h = fnv(h, &t.to_le_bytes());
            }
            // The length is hashed too: a partial block is not the prefix of a full one.
            fnv(h, &(blk.len() as u32).to_le_bytes())
        })
        .collect()
}

/// Writes the KV of one (block, layer, K/V) into `out`: an xorshift64 stream seeded by the
/// block's prefix hash, the layer and K/V, eight bytes per step.
pub fn fill(out: &mut [u8], block_seed: u64, layer: usize, kv: usize) {
    let mut x = stream_seed(block_seed, layer, kv);
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        x = xorshift(x);
        c.copy_from_slice(&x.to_le_bytes());
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        x = xorshift(x);
        let n = tail.len();
        tail.copy_from_slice(&x.to_le_bytes()[..n]);
    }
}

/// Whether `got` is exactly what [`fill`] writes for these arguments, without allocating.
pub fn matches(got: &[u8], block_seed: u64, layer: usize, kv: usize) -> bool {
    let mut x = stream_seed(block_seed, layer, kv);
    let mut chunks = got.chunks_exact(8);
    for c in &mut chunks {
        x = xorshift(x);
        if c != x.to_le_bytes() {
            return false;
        }
    }
    let tail = chunks.remainder();
    tail.is_empty() || {
        x = xorshift(x);
        tail == &x.to_le_bytes()[..tail.len()]
    }
}

fn stream_seed(block_seed: u64, layer: usize, kv: usize) -> u64 {
    // Mixed through FNV rather than xor'd in, so (layer, kv) pairs never cancel out; `| 1`
    // keeps xorshift off its all-zero fixed point.
    fnv(block_seed, &((layer as u64) << 8 | kv as u64).to_le_bytes()) | 1
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_matches_agree_and_differ_per_input() {
        let seeds = prefix_seeds(model_seed("m", 0), &[1, 2, 3, 4, 5, 6, 7], 4);
        assert_eq!(seeds.len(), 2);
        // 37 bytes: the tail path too.
        let mut a = vec![0; 37];
        fill(&mut a, seeds[0], 1, 0);
        assert!(matches(&a, seeds[0], 1, 0));
        assert!(!matches(&a, seeds[1], 1, 0));
        assert!(!matches(&a, seeds[0], 0, 0));
        assert!(!matches(&a, seeds[0], 1, 1));
        a[36] ^= 1;
        assert!(!matches(&a, seeds[0], 1, 0));
        // The model and the TP rank change every block's bytes.
        let other = prefix_seeds(model_seed("m", 1), &[1, 2, 3, 4], 4);
        assert_ne!(other[0], seeds[0]);
        // A prefix's seeds do not depend on what follows it.
        assert_eq!(
            prefix_seeds(model_seed("m", 0), &[1, 2, 3, 4, 9], 4)[0],
            seeds[0]
        );
        // A partial block differs from the full block it grows into.
        assert_ne!(prefix_seeds(model_seed("m", 0), &[1, 2, 3], 4)[0], seeds[0]);
    }
}
