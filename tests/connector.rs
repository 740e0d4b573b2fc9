//! The connector against a real `kvpool up`: two engines (separate caches, connectors and
//! clients) share a prompt prefix through the pool, and every loaded byte is checked against
//! what the first engine computed.

use std::sync::Arc;

use kvpool_connector::{
    BlockHasher, BlockKey, BlockShape, HostKvCache, LayerGroups, Namespace, PoolConnector,
};
use kvpool_tests::{client, up};

/// A small Llama-like shape: 4 layers, 2 KV heads, head dim 64, bf16, 16-token blocks.
const LAYERS: usize = 4;
const SHAPE: BlockShape = BlockShape {
    block_size: 16,
    kv_heads: 2,
    head_dim: 64,
    dtype_bytes: 2,
};
const CACHE_BLOCKS: usize = 16;

fn namespace(grouping: &str) -> Namespace {
    Namespace {
        model: "test/llama-tiny".into(),
        kv_dtype: "bf16".into(),
        layout: format!("vllm-nhd/{grouping}"),
        block_size: SHAPE.block_size as u32,
        tp_rank: 0,
        tp_size: 1,
        pp_rank: 0,
        pp_size: 1,
    }
}

/// FNV-1a over the token prefix: independent of the key hash, so a block loaded under the
/// wrong key (or into the wrong slot) shows up as wrong bytes.
fn prefix_hash(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
        t.to_le_bytes()
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    })
}

/// The "KV" of block `block` of `tokens` for one layer's K (`kv = 0`) or V (`kv = 1`): what a
/// forward pass would compute, a function of the whole prefix up to that block.
fn kv_bytes(tokens: &[u32], block: usize, layer: usize, kv: usize) -> Vec<u8> {
    let end = (block + 1) * SHAPE.block_size;
    let mut x = prefix_hash(&tokens[..end]) ^ ((layer as u64) << 32 | kv as u64) | 1;
    (0..SHAPE.bytes())
        .map(|_| {
            // xorshift64: cheap, deterministic, every byte position differs.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes the KV of the prompt's blocks `0..n` into cache blocks `slots[i]`, as prefill would.
fn prefill(cache: &mut HostKvCache, tokens: &[u32], slots: &[usize]) {
    for (i, &slot) in slots.iter().enumerate() {
        for layer in 0..LAYERS {
            for kv in 0..2 {
                cache
                    .region_block_mut(layer, kv, slot)
                    .copy_from_slice(&kv_bytes(tokens, i, layer, kv));
            }
        }
    }
}

/// Checks cache block `slot` holds the KV of the prompt's block `i`.
fn assert_block(cache: &HostKvCache, tokens: &[u32], i: usize, slot: usize) {
    for layer in 0..LAYERS {
        for kv in 0..2 {
            assert!(
                cache.region_block(layer, kv, slot) == kv_bytes(tokens, i, layer, kv).as_slice(),
                "block {i} (slot {slot}) layer {layer} kv {kv}: bytes differ"
            );
        }
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| seed.wrapping_mul(7919).wrapping_add(i * 31) % 128_000)
        .collect()
}

struct Engine {
    hasher: BlockHasher,
    cache: HostKvCache,
    conn: PoolConnector,
}

fn engine(master: &str, groups: LayerGroups, block_first: bool) -> Engine {
    let cache = if block_first {
        HostKvCache::block_first(LAYERS, true, CACHE_BLOCKS, SHAPE.bytes(), groups)
    } else {
        HostKvCache::layer_first(LAYERS, true, CACHE_BLOCKS, SHAPE.bytes(), groups)
    }
    .unwrap();
    let hasher = BlockHasher::new(namespace(&cache.layout().grouping_tag()));
    let conn = PoolConnector::new(Arc::new(client(master)), cache.layout());
    Engine {
        hasher,
        cache,
        conn,
    }
}

fn pairs(keys: &[BlockKey], slots: &[usize]) -> Vec<(BlockKey, usize)> {
    keys.iter().cloned().zip(slots.iter().copied()).collect()
}

/// The shared-prefix scenario for one grouping; engine A is layer-first and engine B
/// block-first, so the object bytes are also shown to be independent of the cache layout.
async fn shared_prefix(groups: LayerGroups) {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let mut a = engine(&master, groups, false);
    let mut b = engine(&master, groups, true);

    // Engine A: a 100-token prompt, 6 full blocks (the 4 trailing tokens get no key).
    let pa = prompt(1, 100);
    let ka = a.hasher.keys(&pa);
    assert_eq!(ka.len(), 6);
    let slots_a: Vec<usize> = (0..6).collect();
    prefill(&mut a.cache, &pa, &slots_a);
    assert_eq!(a.conn.lookup(&ka).await.unwrap(), 0);
    for r in a.conn.save(&a.cache, &pairs(&ka, &slots_a)).await {
        r.unwrap();
    }
    assert_eq!(a.conn.lookup(&ka).await.unwrap(), 6);
    // Saving again is not an error: the blocks are already there.
    for r in a.conn.save(&a.cache, &pairs(&ka, &slots_a)).await {
        r.unwrap();
    }

    // Engine B: shares the first 64 tokens (4 blocks), then differs.
    let mut pb = pa[..64].to_vec();
    pb.extend(prompt(2, 30));
    let kb = b.hasher.keys(&pb);
    assert_eq!(kb.len(), 5);
    let hit = b.conn.lookup(&kb).await.unwrap();
    assert_eq!(hit, 4);
    // Into other block ids than A used, in no particular order.
    let slots_b = [11, 3, 15, 7];
    let loaded = b
        .conn
        .load(&mut b.cache, &pairs(&kb[..hit], &slots_b))
        .await;
    assert!(loaded.iter().all(|r| matches!(r, Ok(true))), "{loaded:?}");
    for (i, &slot) in slots_b.iter().enumerate() {
        assert_block(&b.cache, &pb, i, slot);
        // And equal to what A holds for the same block, byte for byte.
        for g in 0..b.cache.layout().num_groups() {
            assert_eq!(
                b.cache.block_parts(slot, g).concat(),
                a.cache.block_parts(slots_a[i], g).concat()
            );
        }
    }
    // Block 4 of B's prompt was never saved: a miss, not an error.
    let miss = b.conn.load(&mut b.cache, &pairs(&kb[4..5], &[0])).await;
    assert!(matches!(miss[..], [Ok(false)]), "{miss:?}");

    // A prompt differing at token 20 shares only block 0.
    let mut pc = pa.clone();
    pc[20] += 1;
    assert_eq!(b.conn.lookup(&b.hasher.keys(&pc)).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_a_prefix() {
    shared_prefix(LayerGroups::All).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_a_prefix_per_layer_group() {
    shared_prefix(LayerGroups::PerObject(2)).await;
}

/// With one object per layer group, a block missing one group's object is a hole: lookup stops
/// before it, and loading it is a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_layer_group_is_a_hole() {
    let pool = up("64MiB", &[]);
    let master = pool.addr("master");
    let mut e = engine(&master, LayerGroups::PerObject(2), false);
    assert_eq!(e.conn.num_groups(), 2);
    let p = prompt(3, 64);
    let keys = e.hasher.keys(&p);
    let slots: Vec<usize> = (0..4).collect();
    prefill(&mut e.cache, &p, &slots);
    for r in e.conn.save(&e.cache, &pairs(&keys, &slots)).await {
        r.unwrap();
    }
    assert_eq!(e.conn.lookup(&keys).await.unwrap(), 4);
    let gone = keys[2].wire(Some(1));
    for r in e.conn.client().remove(&[gone.as_bytes()], true).await {
        r.unwrap();
    }
    assert_eq!(e.conn.lookup(&keys).await.unwrap(), 2);
    let r = e
        .conn
        .load(&mut e.cache, &pairs(&keys[1..3], &[8, 9]))
        .await;
    assert!(matches!(r[..], [Ok(true), Ok(false)]), "{r:?}");
    assert_block(&e.cache, &p, 1, 8);
    // Bad block ids are per-call errors, not panics.
    let r = e.conn.load(&mut e.cache, &pairs(&keys[..2], &[5, 5])).await;
    assert!(r.iter().all(|r| r.is_err()), "{r:?}");
    let r = e
        .conn
        .save(&e.cache, &pairs(&keys[..1], &[CACHE_BLOCKS]))
        .await;
    assert!(r[0].is_err());
}
