//! Block keys: a token sequence cut into full blocks, each named by a chained hash inside a
//! namespace. The exact bytes are specified in `docs/connector.md` and pinned by the golden
//! vectors in this module's tests: any change to what is hashed, or how, is a protocol break
//! (keys written by one build would silently miss in another, which is the bug that cost peers
//! like LMCache months).

use std::fmt::Write as _;

use xxhash_rust::xxh3::xxh3_128;

/// Domain tag in front of the namespace encoding: it versions the scheme and keeps the
/// namespace digest apart from any other XXH3 use of the same bytes.
const NS_TAG: &[u8] = b"kvpool-ns-v1";

/// Prefix of every block key on the wire; bumping it (kvp2) is how a future scheme coexists.
pub const KEY_PREFIX: &str = "kvp1";

/// A 128-bit digest, stored big-endian so that its hex is XXH3-128's canonical form.
pub type Digest = [u8; 16];

/// What a block's KV depends on besides its tokens: keys from different models, dtypes,
/// layouts, block sizes or parallel ranks must never meet, so all of it is hashed into the
/// chain's seed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// Model id, e.g. `"meta-llama/Meta-Llama-3-8B"` (plus a LoRA/revision tag if any).
    pub model: String,
    /// KV-cache dtype, e.g. `"bf16"`, `"fp8_e4m3"`.
    pub kv_dtype: String,
    /// The engine's in-block layout and layer grouping, e.g. `"vllm-nhd/all"`; it must change
    /// whenever an object's bytes would (see docs/connector.md, "Object format").
    pub layout: String,
    pub block_size: u32,
    pub tp_rank: u32,
    pub tp_size: u32,
    pub pp_rank: u32,
    pub pp_size: u32,
}

impl Namespace {
    /// The canonical byte encoding: `"kvpool-ns-v1"`, then each string as u32-LE length +
    /// UTF-8 bytes (length-prefixed so `("ab","c")` and `("a","bc")` differ), then the six
    /// integers as u32 LE in declaration order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            NS_TAG.len() + 12 + self.model.len() + self.kv_dtype.len() + self.layout.len() + 24,
        );
        out.extend_from_slice(NS_TAG);
        for s in [&self.model, &self.kv_dtype, &self.layout] {
            // A string over 4 GiB is not a namespace; refusing it beats a silent truncation.
            let len = u32::try_from(s.len()).expect("namespace string longer than u32::MAX");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        for v in [
            self.block_size,
            self.tp_rank,
            self.tp_size,
            self.pp_rank,
            self.pp_size,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `XXH3-128(encode())`, big-endian.
    pub fn digest(&self) -> Digest {
        xxh3_128(&self.encode()).to_be_bytes()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// How a block is named: by our own chained hash, or by the caller's (vLLM's) hash bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BlockId {
    /// `h_i` of the kvpool chain.
    Chained(Digest),
    /// A caller's block hash, kept verbatim so the keys can be matched against the engine's
    /// own events (llm-d / vLLM KV events) without re-hashing.
    External(Vec<u8>),
}

/// One block's key: the namespace digest plus the block's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub ns: Digest,
    pub id: BlockId,
}

impl BlockKey {
    /// The key on the wire: `kvp1/<hex(ns)[..16]>/<hex(h_i)>` for chained ids,
    /// `kvp1/<hex(ns)[..16]>/x<hex(bytes)>` for external ones, plus `/g<group>` (decimal) when
    /// the layout stores one object per layer group. The `x` keeps the two id spaces apart as
    /// strings, whatever the hash values.
    pub fn wire(&self, group: Option<usize>) -> String {
        let mut s = String::with_capacity(5 + 16 + 2 + 64 + 8);
        s.push_str(KEY_PREFIX);
        s.push('/');
        s.push_str(&hex(&self.ns)[..16]);
        s.push('/');
        match &self.id {
            BlockId::Chained(h) => s.push_str(&hex(h)),
            BlockId::External(b) => {
                s.push('x');
                s.push_str(&hex(b));
            }
        }
        if let Some(g) = group {
            let _ = write!(s, "/g{g}");
        }
        s
    }
}

impl BlockKey {
    /// A self-contained text form for hand-off parameters, which travel as JSON between
    /// engines: `<hex(ns)>:<hex(h_i)>`, or `<hex(ns)>:x<hex(bytes)>` for external ids. Unlike
    /// [`Self::wire`] it keeps the whole namespace digest, so it parses back.
    pub fn to_param(&self) -> String {
        match &self.id {
            BlockId::Chained(h) => format!("{}:{}", hex(&self.ns), hex(h)),
            BlockId::External(b) => format!("{}:x{}", hex(&self.ns), hex(b)),
        }
    }

    /// The inverse of [`Self::to_param`]; `None` for anything else.
    pub fn from_param(s: &str) -> Option<BlockKey> {
        let (ns, id) = s.split_once(':')?;
        let ns: Digest = unhex(ns)?.try_into().ok()?;
        let id = match id.strip_prefix('x') {
            Some(ext) => BlockId::External(unhex(ext)?),
            None => BlockId::Chained(unhex(id)?.try_into().ok()?),
        };
        Some(BlockKey { ns, id })
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A caller-provided block hash: vLLM's builtin hash is an integer, its `sha256_cbor` hash is
/// 32 bytes; both become the same key shape.
pub trait ExternalHash {
    /// The bytes that go into the key (integers big-endian, so the hex reads like the number).
    fn key_bytes(&self) -> Vec<u8>;
}

impl ExternalHash for u64 {
    fn key_bytes(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
}

impl<const N: usize> ExternalHash for [u8; N] {
    fn key_bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
}

/// Computes the chained block hashes of one namespace.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    ns: Namespace,
    ns_digest: Digest,
}

impl BlockHasher {
    /// # Panics
    /// If `ns.block_size` is 0 (no block could ever be full).
    pub fn new(ns: Namespace) -> Self {
        assert!(ns.block_size > 0, "block_size must be > 0");
        let ns_digest = ns.digest();
        Self { ns, ns_digest }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    pub fn ns_digest(&self) -> Digest {
        self.ns_digest
    }

    /// `h_0 = H(ns_digest || block 0)`, `h_i = H(h_{i-1} || block i)`, tokens as u32 LE, H =
    /// XXH3-128 (seed 0) output big-endian. Only full blocks are hashed: a partial trailing
    /// block's KV will still change as tokens arrive, so it gets no key.
    pub fn hashes(&self, tokens: &[u32]) -> Vec<Digest> {
        self.hashes_from(self.ns_digest, tokens)
    }

    /// Continues a chain after `parent` (the last hash of an earlier call), so a growing
    /// sequence is hashed once, not from the start at every step. `hashes(t)` is
    /// `hashes_from(ns_digest(), t)`.
    pub fn hashes_from(&self, parent: Digest, tokens: &[u32]) -> Vec<Digest> {
        let bs = self.ns.block_size as usize;
        let mut out = Vec::with_capacity(tokens.len() / bs);
        // Sized by a block only when one is full: a huge `block_size` (from a peer's
        // hand-off parameters) must not reserve memory for tokens that are not there.
        let mut buf = Vec::with_capacity(if tokens.len() >= bs { 16 + 4 * bs } else { 0 });
        let mut prev = parent;
        for block in tokens.chunks_exact(bs) {
            buf.clear();
            buf.extend_from_slice(&prev);
            for t in block {
                buf.extend_from_slice(&t.to_le_bytes());
            }
            prev = xxh3_128(&buf).to_be_bytes();
            out.push(prev);
        }
        out
    }

    /// The keys of the full blocks of `tokens`, in order.
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        self.hashes(tokens)
            .into_iter()
            .map(|h| BlockKey {
                ns: self.ns_digest,
                id: BlockId::Chained(h),
            })
            .collect()
    }

    /// Keys from a caller's own block hashes (already chained by the caller, as vLLM's are),
    /// under this namespace. They are not re-hashed, so they never equal a chained key for the
    /// same tokens: a pool must be fed by one scheme per namespace to share prefixes.
    pub fn from_external<H: ExternalHash>(&self, hashes: &[H]) -> Vec<BlockKey> {
        hashes
            .iter()
            .map(|h| BlockKey {
                ns: self.ns_digest,
                id: BlockId::External(h.key_bytes()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_huge_block_size_hashes_nothing_and_reserves_nothing() {
        let h = BlockHasher::new(Namespace {
            model: "m".into(),
            kv_dtype: "bf16".into(),
            layout: "l".into(),
            block_size: u32::MAX,
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        });
        // Before: 16 GiB reserved up front for a block that 10 tokens never fill.
        assert!(h.hashes(&[1; 10]).is_empty());
    }

    #[test]
    fn param_form_round_trips_and_rejects_junk() {
        let h = BlockHasher::new(Namespace {
            model: "m".into(),
            kv_dtype: "bf16".into(),
            layout: "l".into(),
            block_size: 4,
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        });
        let mut keys = h.keys(&[1, 2, 3, 4, 5, 6, 7, 8]);
        keys.extend(h.from_external(&[7u64]));
        for k in &keys {
            assert_eq!(BlockKey::from_param(&k.to_param()).as_ref(), Some(k));
        }
        let good = keys[0].to_param();
        for bad in [
            "",
            "nocolon",
            &good[1..],
            &good[..good.len() - 1],
            &good.replace(':', ";"),
            &format!("{}:+a", &good[..32]),
        ] {
            assert_eq!(BlockKey::from_param(bad), None, "{bad:?}");
        }
    }

    use super::*;

    /// The golden namespace: Llama-3-8B, bf16, vLLM paged layout, all layers in one object.
    fn golden_ns() -> Namespace {
        Namespace {
            model: "meta-llama/Meta-Llama-3-8B".into(),
            kv_dtype: "bf16".into(),
            layout: "vllm-nhd/all".into(),
            block_size: 4,
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        }
    }

    #[test]
    fn namespace_encoding_bytes() {
        let ns = Namespace {
            model: "m".into(),
            kv_dtype: "bf16".into(),
            layout: "L".into(),
            block_size: 16,
            tp_rank: 1,
            tp_size: 2,
            pp_rank: 0,
            pp_size: 1,
        };
        let mut want = b"kvpool-ns-v1".to_vec();
        want.extend_from_slice(&[1, 0, 0, 0, b'm']);
        want.extend_from_slice(&[4, 0, 0, 0, b'b', b'f', b'1', b'6']);
        want.extend_from_slice(&[1, 0, 0, 0, b'L']);
        want.extend_from_slice(&[16, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(ns.encode(), want);
    }

    /// These strings are the spec (docs/connector.md, "Golden vectors"). If this test fails,
    /// the change breaks every key already in every pool: do not update the constants, fix the
    /// code, or introduce `kvp2` deliberately.
    #[test]
    fn golden_vectors() {
        let h = BlockHasher::new(golden_ns());
        assert_eq!(hex(&h.ns_digest()), GOLDEN_NS);
        // 10 tokens at block_size 4: two full blocks, the trailing 2 tokens get no key.
        let tokens: Vec<u32> = (1..=10).collect();
        let keys: Vec<String> = h.keys(&tokens).iter().map(|k| k.wire(None)).collect();
        assert_eq!(keys, GOLDEN_KEYS);
        // Large token ids exercise all four little-endian bytes.
        let big = [0x0102_0304u32, 0xffff_ffff, 0, 128_000];
        assert_eq!(hex(&h.hashes(&big)[0]), GOLDEN_BIG);
        // External hashes and the group suffix.
        let ext = h.from_external(&[0x0123_4567_89ab_cdefu64]);
        assert_eq!(ext[0].wire(Some(3)), GOLDEN_EXT);
    }

    // Cross-checked against an independent Python implementation (python-xxhash, i.e. the C
    // xxHash library): see docs/connector.md.
    const GOLDEN_NS: &str = "51e79b2b68e7113fa191c0c66fecd558";
    const GOLDEN_KEYS: [&str; 2] = [
        "kvp1/51e79b2b68e7113f/b0097b15bce0f7db9c18da8a9cdbcee4",
        "kvp1/51e79b2b68e7113f/3f56a781e881f72e5a33106a2cc89bcb",
    ];
    const GOLDEN_BIG: &str = "c3495ea1ad908e0bc1e26d5bcd69cb13";
    const GOLDEN_EXT: &str = "kvp1/51e79b2b68e7113f/x0123456789abcdef/g3";

    #[test]
    fn only_full_blocks_get_keys() {
        let h = BlockHasher::new(golden_ns());
        assert!(h.hashes(&[1, 2, 3]).is_empty());
        assert_eq!(h.hashes(&[1, 2, 3, 4]).len(), 1);
        assert_eq!(h.hashes(&(0..11).collect::<Vec<_>>()).len(), 2);
        assert_eq!(h.hashes(&(0..12).collect::<Vec<_>>()).len(), 3);
    }

    #[test]
    fn chain_is_a_prefix_property() {
        // Same prefix => same leading keys; a change in block 1 changes keys 1.. but not 0.
        let h = BlockHasher::new(golden_ns());
        let a: Vec<u32> = (0..16).collect();
        let mut b = a.clone();
        b[5] = 999;
        let (ka, kb) = (h.hashes(&a), h.hashes(&b));
        assert_eq!(ka[0], kb[0]);
        assert!(ka[1..].iter().zip(&kb[1..]).all(|(x, y)| x != y));
        // The same block content at a different position gets a different key (chaining).
        let rep = [7u32; 8];
        let kr = h.hashes(&rep);
        assert_ne!(kr[0], kr[1]);
    }

    #[test]
    fn hashes_from_continues_the_chain() {
        let h = BlockHasher::new(golden_ns());
        let t: Vec<u32> = (100..124).collect();
        let all = h.hashes(&t);
        let first = h.hashes(&t[..8]);
        let rest = h.hashes_from(*first.last().unwrap(), &t[8..]);
        assert_eq!([first, rest].concat(), all);
    }

    #[test]
    fn every_namespace_field_changes_the_digest() {
        let base = golden_ns();
        let variants: Vec<Namespace> = vec![
            Namespace {
                model: "other".into(),
                ..base.clone()
            },
            Namespace {
                kv_dtype: "fp8".into(),
                ..base.clone()
            },
            Namespace {
                layout: "lmcache".into(),
                ..base.clone()
            },
            Namespace {
                block_size: 16,
                ..base.clone()
            },
            Namespace {
                tp_rank: 1,
                ..base.clone()
            },
            Namespace {
                tp_size: 2,
                ..base.clone()
            },
            Namespace {
                pp_rank: 1,
                ..base.clone()
            },
            Namespace {
                pp_size: 2,
                ..base.clone()
            },
            // Length prefixes: moving a byte between adjacent strings must matter.
            Namespace {
                model: "meta-llama/Meta-Llama-3-8Bb".into(),
                kv_dtype: "f16".into(),
                ..base.clone()
            },
        ];
        let d0 = base.digest();
        let mut seen = std::collections::HashSet::from([d0]);
        for v in &variants {
            assert!(seen.insert(v.digest()), "collision for {v:?}");
        }
        // And the namespace reaches the block keys, not only the key prefix.
        let t: Vec<u32> = (0..4).collect();
        let h0 = BlockHasher::new(base).hashes(&t);
        let h1 = BlockHasher::new(variants[4].clone()).hashes(&t);
        assert_ne!(h0, h1);
    }

    #[test]
    fn external_keys() {
        let h = BlockHasher::new(golden_ns());
        let ns16 = &hex(&h.ns_digest())[..16];
        let sha = [0xabu8; 32];
        let k = h.from_external(&[sha]);
        assert_eq!(k[0].wire(None), format!("kvp1/{ns16}/x{}", "ab".repeat(32)));
        let k = h.from_external(&[1u64, 2]);
        assert_eq!(k[1].wire(None), format!("kvp1/{ns16}/x0000000000000002"));
        assert_eq!(
            k[1].wire(Some(0)),
            format!("kvp1/{ns16}/x0000000000000002/g0")
        );
    }

    #[test]
    fn wire_shape() {
        let h = BlockHasher::new(golden_ns());
        let k = &h.keys(&[1, 2, 3, 4])[0];
        let s = k.wire(Some(12));
        let parts: Vec<&str> = s.split('/').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "kvp1");
        assert_eq!(parts[1].len(), 16);
        assert_eq!(parts[2].len(), 32);
        assert!(parts[2]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(parts[3], "g12");
    }
}
