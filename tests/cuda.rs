//! GPU KV caches against a real `kvpool up`: blocks written into device memory are saved
//! through pinned staging, loaded into a second GPU cache (another layout) and into a host
//! cache, and read back byte for byte; a host-saved block is loaded into GPU memory.
//!
//! Needs a CUDA device: where none is found (no driver, no GPU) every test reports itself
//! skipped (`kvpool_tests::skipped`: listed in `scripts/test.sh`'s summary) and returns.

use std::sync::Arc;

use kvpool_connector::cuda::{
    open_device, CopyMode, CudaContext, GpuAlloc, GpuError, GpuKvCache, GpuOptions,
};
use kvpool_connector::{
    BlockHasher, BlockKey, BlockShape, HostKvCache, LayerGroups, Namespace, PoolConnector,
};
use kvpool_tests::kv::{self, prompt};
use kvpool_tests::{client, up};

/// Llama-like but small: 6 layers, 2 KV heads, head dim 64, bf16, 16-token blocks (4 KiB
/// per K or V block), 3 layer groups of 2 layers.
const LAYERS: usize = 6;
const SHAPE: BlockShape = BlockShape {
    block_size: 16,
    kv_heads: 2,
    head_dim: 64,
    dtype_bytes: 2,
};
const GROUPS: LayerGroups = LayerGroups::PerObject(2);
const CACHE_BLOCKS: usize = 32;

fn gpu(test: &str) -> Option<Arc<CudaContext>> {
    match open_device(0) {
        Ok(ctx) => Some(ctx),
        Err(GpuError::NoDevice(why)) => {
            kvpool_tests::skipped(&format!("cuda {test}"), &format!("no CUDA device: {why}"));
            None
        }
        Err(e) => panic!("opening CUDA device 0: {e}"),
    }
}

fn namespace() -> Namespace {
    Namespace {
        model: "test/llama-tiny-gpu".into(),
        kv_dtype: "bf16".into(),
        layout: "vllm-nhd/l2".into(),
        block_size: SHAPE.block_size as u32,
        tp_rank: 0,
        tp_size: 1,
        pp_rank: 0,
        pp_size: 1,
    }
}

/// The "KV" of prompt block `block` for one layer's K (`kv = 0`) or V (`kv = 1`).
fn kv_bytes(tokens: &[u32], block: usize, layer: usize, kv: usize) -> Vec<u8> {
    kv::block_bytes(tokens, SHAPE.block_size, SHAPE.bytes(), block, layer, kv)
}

fn gpu_cache(ctx: &Arc<CudaContext>, alloc: GpuAlloc, mode: CopyMode) -> GpuKvCache {
    // Staging for 3 objects of a group: a 5-block batch takes two rounds per group, so the
    // double buffering and the buffer reuse across groups are exercised.
    let opts = GpuOptions {
        staging_bytes: 3 * 2 * 2 * SHAPE.bytes(),
        copy_mode: mode,
    };
    GpuKvCache::alloc(
        ctx,
        alloc,
        LAYERS,
        true,
        CACHE_BLOCKS,
        SHAPE.bytes(),
        GROUPS,
        opts,
    )
    .unwrap()
}

fn prefill_gpu(cache: &GpuKvCache, tokens: &[u32], slots: &[usize]) {
    for (i, &slot) in slots.iter().enumerate() {
        for layer in 0..LAYERS {
            for kv in 0..2 {
                cache
                    .write_region_block(layer, kv, slot, &kv_bytes(tokens, i, layer, kv))
                    .unwrap();
            }
        }
    }
}

fn assert_gpu_block(cache: &GpuKvCache, tokens: &[u32], i: usize, slot: usize) {
    for layer in 0..LAYERS {
        for kv in 0..2 {
            assert!(
                cache.read_region_block(layer, kv, slot).unwrap() == kv_bytes(tokens, i, layer, kv),
                "GPU block {i} (slot {slot}) layer {layer} kv {kv}: bytes differ"
            );
        }
    }
}

fn assert_host_block(cache: &HostKvCache, tokens: &[u32], i: usize, slot: usize) {
    for layer in 0..LAYERS {
        for kv in 0..2 {
            assert!(
                cache.region_block(layer, kv, slot) == kv_bytes(tokens, i, layer, kv).as_slice(),
                "host block {i} (slot {slot}) layer {layer} kv {kv}: bytes differ"
            );
        }
    }
}

fn pairs(keys: &[BlockKey], slots: &[usize]) -> Vec<(BlockKey, usize)> {
    keys.iter().cloned().zip(slots.iter().copied()).collect()
}

fn connector(master: &str, layout: &kvpool_connector::KvLayout) -> PoolConnector {
    PoolConnector::new(Arc::new(client(master)), layout)
}

async fn round_trip(mode: CopyMode) {
    let Some(ctx) = gpu(&format!("round_trip({mode:?})")) else {
        return;
    };
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let hasher = BlockHasher::new(namespace());

    // Engine A: vLLM's paged layout (one allocation per layer, 2 copies per layer per block).
    let a = gpu_cache(&ctx, GpuAlloc::Paged, mode);
    let conn_a = connector(&master, a.layout());
    assert_eq!(conn_a.num_groups(), 3);
    let p = prompt(1, 5 * 16 + 7);
    let keys = hasher.keys(&p);
    assert_eq!(keys.len(), 5);
    let slots_a = [4, 5, 6, 20, 9];
    prefill_gpu(&a, &p, &slots_a);
    for r in a.save(&conn_a, &pairs(&keys, &slots_a)).await {
        r.unwrap();
    }
    assert_eq!(conn_a.lookup(&keys).await.unwrap(), 5);
    // Saving again: already there, not an error.
    for r in a.save(&conn_a, &pairs(&keys, &slots_a)).await {
        r.unwrap();
    }

    // Engine B: block-first GPU cache, other slots (two consecutive: merged copies).
    let b = gpu_cache(&ctx, GpuAlloc::BlockFirst, mode);
    let conn_b = connector(&master, b.layout());
    let slots_b = [11, 12, 0, 31, 7];
    let res = b.load(&conn_b, &pairs(&keys, &slots_b)).await.wait_all();
    assert!(res.iter().all(|r| matches!(r, Ok(true))), "{res:?}");
    for (i, &slot) in slots_b.iter().enumerate() {
        assert_gpu_block(&b, &p, i, slot);
        for g in 0..3 {
            assert_eq!(
                b.read_object(slot, g).unwrap(),
                a.read_object(slots_a[i], g).unwrap()
            );
        }
    }

    // Engine C: a host cache loads the GPU-saved objects.
    let mut c =
        HostKvCache::layer_first(LAYERS, true, CACHE_BLOCKS, SHAPE.bytes(), GROUPS).unwrap();
    let conn_c = connector(&master, c.layout());
    let slots_c = [1, 2, 3, 4, 5];
    let res = conn_c.load(&mut c, &pairs(&keys, &slots_c)).await;
    assert!(res.iter().all(|r| matches!(r, Ok(true))), "{res:?}");
    for (i, &slot) in slots_c.iter().enumerate() {
        assert_host_block(&c, &p, i, slot);
        for g in 0..3 {
            assert_eq!(
                c.block_parts(slot, g).concat(),
                a.read_object(slots_a[i], g).unwrap()
            );
        }
    }

    // The other way: a host-saved prompt loaded into GPU memory, layer-wise from a spawned
    // load (each group waited for in turn, as an engine's forward pass would).
    let q = prompt(2, 4 * 16);
    let qkeys = hasher.keys(&q);
    for (i, slot) in [10, 11, 12, 13].into_iter().enumerate() {
        for layer in 0..LAYERS {
            for kv in 0..2 {
                c.region_block_mut(layer, kv, slot)
                    .copy_from_slice(&kv_bytes(&q, i, layer, kv));
            }
        }
    }
    for r in conn_c.save(&c, &pairs(&qkeys, &[10, 11, 12, 13])).await {
        r.unwrap();
    }
    let a = Arc::new(a);
    let handle = a.start_load(Arc::new(conn_a), pairs(&qkeys, &[28, 27, 26, 25]));
    let res = tokio::task::spawn_blocking(move || {
        for g in 0..handle.num_groups() {
            handle.wait_group(g).unwrap();
        }
        handle.wait_all()
    })
    .await
    .unwrap();
    assert!(res.iter().all(|r| matches!(r, Ok(true))), "{res:?}");
    for (i, slot) in [28, 27, 26, 25].into_iter().enumerate() {
        assert_gpu_block(&a, &q, i, slot);
    }
    // A's earlier blocks are untouched by that load.
    for (i, &slot) in slots_a.iter().enumerate() {
        assert_gpu_block(&a, &p, i, slot);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_round_trip_auto_copies() {
    round_trip(CopyMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_round_trip_per_segment_copies() {
    round_trip(CopyMode::PerSegment).await;
}

/// Misses, a missing layer group, and bad block ids are per-block results, not panics, and a
/// miss leaves the block's device bytes untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_misses_and_bad_ids() {
    let Some(ctx) = gpu("gpu_misses_and_bad_ids") else {
        return;
    };
    let pool = up("64MiB", &[]);
    let master = pool.addr("master");
    let hasher = BlockHasher::new(namespace());
    let e = gpu_cache(&ctx, GpuAlloc::LayerFirst, CopyMode::Auto);
    let conn = connector(&master, e.layout());
    let p = prompt(3, 3 * 16);
    let keys = hasher.keys(&p);
    prefill_gpu(&e, &p, &[0, 1, 2]);
    for r in e.save(&conn, &pairs(&keys, &[0, 1, 2])).await {
        r.unwrap();
    }
    // Block 2 loses its last group's object: a hole for lookup, a miss for load.
    let gone = keys[2].wire(Some(2));
    for r in conn.client().remove(&[gone.as_bytes()], true).await {
        r.unwrap();
    }
    assert_eq!(conn.lookup(&keys).await.unwrap(), 2);
    let never = hasher.keys(&prompt(4, 16));
    let before = e.read_object(9, 0).unwrap();
    let res = e
        .load(
            &conn,
            &[
                (keys[1].clone(), 8),
                (keys[2].clone(), 10),
                (never[0].clone(), 9),
            ],
        )
        .await
        .wait_all();
    assert!(
        matches!(res[..], [Ok(true), Ok(false), Ok(false)]),
        "{res:?}"
    );
    assert_gpu_block(&e, &p, 1, 8);
    assert_eq!(e.read_object(9, 0).unwrap(), before);

    let res = e
        .load(
            &conn,
            &[
                (keys[0].clone(), 5),
                (keys[1].clone(), 5),
                (keys[0].clone(), CACHE_BLOCKS),
            ],
        )
        .await
        .wait_all();
    assert!(matches!(res[0], Err(GpuError::Duplicate(5))), "{res:?}");
    assert!(matches!(res[1], Err(GpuError::Duplicate(5))), "{res:?}");
    assert!(
        matches!(res[2], Err(GpuError::BlockOutOfRange { .. })),
        "{res:?}"
    );
    let res = e.save(&conn, &pairs(&keys[..1], &[CACHE_BLOCKS])).await;
    assert!(matches!(res[0], Err(GpuError::BlockOutOfRange { .. })));

    // A connector of another grouping is refused, not silently mixed.
    let host_all =
        HostKvCache::layer_first(LAYERS, true, 2, SHAPE.bytes(), LayerGroups::All).unwrap();
    let other = connector(&master, host_all.layout());
    let res = e.save(&other, &pairs(&keys[..1], &[0])).await;
    assert!(matches!(res[0], Err(GpuError::GroupMismatch { .. })));
}
