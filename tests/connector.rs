//! The connector against a real `kvpool up`: two engines (separate caches, connectors and
//! clients) share a prompt prefix through the pool, and every loaded byte is checked against
//! what the first engine computed.

use std::sync::Arc;

use std::time::{Duration, Instant};

use kvpool_connector::pd::{Consumer, HandoffParams, PdConfig, PdError, Producer, Role};
use kvpool_connector::{
    BlockHasher, BlockKey, BlockShape, HostKvCache, LayerGroups, Namespace, PoolConnector,
};
use kvpool_proto::ErrorCode;
use kvpool_tests::kv::{self, prompt};
use kvpool_tests::{client, up, wait_until};

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

/// The "KV" of prompt block `block` for one layer's K (`kv = 0`) or V (`kv = 1`).
fn kv_bytes(tokens: &[u32], block: usize, layer: usize, kv: usize) -> Vec<u8> {
    kv::block_bytes(tokens, SHAPE.block_size, SHAPE.bytes(), block, layer, kv)
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

struct Engine {
    hasher: BlockHasher,
    cache: HostKvCache,
    conn: Arc<PoolConnector>,
}

fn engine(master: &str, groups: LayerGroups, block_first: bool) -> Engine {
    let cache = if block_first {
        HostKvCache::block_first(LAYERS, true, CACHE_BLOCKS, SHAPE.bytes(), groups)
    } else {
        HostKvCache::layer_first(LAYERS, true, CACHE_BLOCKS, SHAPE.bytes(), groups)
    }
    .unwrap();
    let hasher = BlockHasher::new(namespace(&cache.layout().grouping_tag()));
    let conn = Arc::new(PoolConnector::new(Arc::new(client(master)), cache.layout()));
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

/// Layer-wise: with one object per layer group, group 0 is handed back (with its bytes) before
/// the later groups, and every group's bytes are the saved KV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layerwise_load_hands_back_groups_in_order() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let mut a = engine(&master, LayerGroups::PerObject(1), false);
    let mut b = engine(&master, LayerGroups::PerObject(1), true);
    let p = prompt(5, 128);
    let keys = a.hasher.keys(&p);
    let slots: Vec<usize> = (0..8).collect();
    prefill(&mut a.cache, &p, &slots);
    // A detached save: the handle and the per-request report agree.
    let handle = a
        .conn
        .save_detached("req-a", &a.cache, &pairs(&keys, &slots));
    for r in handle.wait().await {
        r.unwrap();
    }
    let finished = a.conn.finished_saves();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].0, "req-a");
    assert!(finished[0].1.iter().all(|r| r.is_ok()));
    assert!(a.conn.finished_saves().is_empty());

    let dest: Vec<usize> = (8..16).rev().collect();
    let conn = Arc::clone(&b.conn);
    let mut load = conn
        .load_layerwise(&mut b.cache, &pairs(&keys, &dest), 2)
        .unwrap();
    let mut order = Vec::new();
    while let Some(g) = load.next().await {
        order.push(g.group);
        // Group g is layer g (one layer per object): K then V of each block.
        for (i, parts) in g.blocks.iter().enumerate() {
            assert!(matches!(g.results[i], Ok(true)));
            let got: Vec<u8> = parts.concat();
            let want = [kv_bytes(&p, i, g.group, 0), kv_bytes(&p, i, g.group, 1)].concat();
            assert!(got == want, "group {} block {i}: bytes differ", g.group);
        }
    }
    assert_eq!(order, (0..LAYERS).collect::<Vec<_>>());
    assert!(load.finish().iter().all(|r| matches!(r, Ok(true))));
    for (i, &slot) in dest.iter().enumerate() {
        assert_block(&b.cache, &p, i, slot);
    }
}

/// A P/D pair of one model: producer and consumer engines with their own caches, clients and
/// connectors, the producer's bootstrap on a free port.
struct PdPair {
    prod_engine: Engine,
    producer: Producer,
    cons_engine: Engine,
    consumer: Consumer,
}

async fn pd_pair(master: &str, abort: Duration, consumer_timeout: Duration) -> PdPair {
    pd_pair_grouped(master, abort, consumer_timeout, LayerGroups::All).await
}

async fn pd_pair_grouped(
    master: &str,
    abort: Duration,
    consumer_timeout: Duration,
    groups: LayerGroups,
) -> PdPair {
    let prod_engine = engine(master, groups, false);
    let cons_engine = engine(master, groups, true);
    let mut pcfg = PdConfig::new(Role::Producer, 0, 1, 0);
    pcfg.base_port = 0;
    pcfg.abort_timeout = abort;
    pcfg.hold_renew = Duration::from_millis(200);
    let producer = Producer::start(Arc::clone(&prod_engine.conn), pcfg)
        .await
        .unwrap();
    let mut ccfg = PdConfig::new(Role::Consumer, 0, 1, 0);
    ccfg.consumer_timeout = consumer_timeout;
    let consumer = Consumer::new(Arc::clone(&cons_engine.conn), ccfg);
    PdPair {
        prod_engine,
        producer,
        cons_engine,
        consumer,
    }
}

/// Prefills a 6-block prompt on the producer and hands it off.
async fn prefill_and_hand_off(
    pd: &mut PdPair,
    seed: u32,
    request: &str,
) -> (Vec<u32>, HandoffParams) {
    let p = prompt(seed, 96);
    let keys = pd.prod_engine.hasher.keys(&p);
    let slots: Vec<usize> = (0..keys.len()).collect();
    prefill(&mut pd.prod_engine.cache, &p, &slots);
    let params = pd
        .producer
        .hand_off(request, &pd.prod_engine.cache, &pairs(&keys, &slots))
        .await
        .unwrap();
    (p, params)
}

/// The consumer loads `params` into `dest` and every block is the prompt's KV.
async fn receive_and_check(pd: &mut PdPair, params: &HandoffParams, p: &[u32], dest: &[usize]) {
    pd.consumer
        .receive(params, &mut pd.cons_engine.cache, dest)
        .await
        .unwrap();
    for (i, &slot) in dest.iter().enumerate() {
        assert_block(&pd.cons_engine.cache, p, i, slot);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_reaches_the_consumer_and_the_hold_ends() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let mut pd = pd_pair(&master, Duration::from_secs(60), Duration::from_secs(10)).await;
    // The pool's one node is on this host: it is the producer's local node.
    let local = pd.prod_engine.conn.local_nodes("127.0.0.1").await.unwrap();
    assert_eq!(local.len(), 1);
    assert!(pd
        .prod_engine
        .conn
        .local_nodes("10.9.9.9")
        .await
        .unwrap()
        .is_empty());
    let (p, params) = prefill_and_hand_off(&mut pd, 7, "r1").await;
    assert_eq!(params.block_keys.len(), 6);
    assert_eq!(pd.producer.stats().held, 1);
    // Params travel as JSON-ish text between engines; the keys parse back.
    assert_eq!(params.keys().unwrap(), pd.prod_engine.hasher.keys(&p));

    let dest = [9, 2, 14, 5, 0, 11];
    receive_and_check(&mut pd, &params, &p, &dest).await;
    let st = pd.producer.stats();
    assert_eq!((st.held, st.claimed, st.released), (0, 1, 1), "{st:?}");
    // Claiming again is refused with a reason.
    let e = pd
        .consumer
        .receive(&params, &mut pd.cons_engine.cache, &dest)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TransferUnknown, "{e}");
    // Wrong number of destination blocks: refused before anything moves.
    let e = pd
        .consumer
        .receive(&params, &mut pd.cons_engine.cache, &dest[..2])
        .await
        .unwrap_err();
    assert!(matches!(e, PdError::BadParams(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_hand_off_is_released_after_the_abort_timeout() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let mut pd = pd_pair(&master, Duration::from_millis(800), Duration::from_secs(10)).await;
    let (_, params) = prefill_and_hand_off(&mut pd, 8, "r1").await;
    let started = Instant::now();
    let producer = &pd.producer;
    wait_until("the hold expires", Duration::from_secs(10), || async {
        producer.stats().expired == 1
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(pd.producer.stats().held, 0);
    let e = pd
        .consumer
        .receive(&params, &mut pd.cons_engine.cache, &[0, 1, 2, 3, 4, 5])
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TransferExpired, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_reach_the_other_side() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let mut pd = pd_pair(&master, Duration::from_secs(60), Duration::from_secs(10)).await;
    // Producer-side abort: the consumer's claim is told.
    let (_, params) = prefill_and_hand_off(&mut pd, 9, "r1").await;
    assert_eq!(pd.producer.abort("r1"), 1);
    let e = pd
        .consumer
        .receive(&params, &mut pd.cons_engine.cache, &[0, 1, 2, 3, 4, 5])
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TransferAborted, "{e}");
    // Consumer-side abort: the producer's hold ends.
    let (_, params) = prefill_and_hand_off(&mut pd, 10, "r2").await;
    assert_eq!(pd.producer.stats().held, 1);
    pd.consumer
        .abort(&params, "request cancelled")
        .await
        .unwrap();
    let st = pd.producer.stats();
    assert_eq!((st.held, st.aborted), (0, 2), "{st:?}");
}

/// A producer that is gone (its process died: nothing listens) or hung (accepts, never
/// answers) fails the consumer's request within the consumer timeout, never later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_fails_cleanly_when_the_producer_is_gone() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let limit = Duration::from_millis(1500);
    let mut pd = pd_pair(&master, Duration::from_secs(60), limit).await;
    let (_, mut params) = prefill_and_hand_off(&mut pd, 11, "r1").await;
    // Dead: the bootstrap server stops with the producer.
    let dead = params.bootstrap_addr.clone();
    drop(pd.producer);
    let started = Instant::now();
    let e = pd
        .consumer
        .receive(&params, &mut pd.cons_engine.cache, &[0, 1, 2, 3, 4, 5])
        .await
        .unwrap_err();
    assert!(started.elapsed() < limit + Duration::from_secs(1), "{e}");
    assert!(
        matches!(e, PdError::Producer { .. } | PdError::Timeout(_)),
        "{e}"
    );
    assert_ne!(dead, "");

    // Hung: a listener that accepts and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    params.bootstrap_addr = hung.local_addr().unwrap().to_string();
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let started = Instant::now();
    let e = pd
        .consumer
        .receive(&params, &mut pd.cons_engine.cache, &[0, 1, 2, 3, 4, 5])
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= limit - Duration::from_millis(100) && took < limit + Duration::from_secs(1),
        "{took:?}: {e}"
    );
    assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
    keep.abort();
}

/// The bootstrap port is a kvpool server like the others: junk, another service's request
/// and a malformed body get errors, and the producer keeps serving its hand-offs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_port_refuses_bad_input_and_keeps_serving() {
    use kvpool_transport::rpc::{RpcClient, RpcOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let mut pd = pd_pair(&master, Duration::from_secs(60), Duration::from_secs(10)).await;
    let (p, params) = prefill_and_hand_off(&mut pd, 12, "r1").await;
    let addr = params.bootstrap_addr.clone();

    // Random bytes: the server closes the connection (bad magic), nothing else happens.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0x5a; 64]).await.unwrap();
    let mut buf = vec![0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "junk must close the connection");

    // A master request on the bootstrap port: WrongService.
    let rpc = RpcClient::new(addr.clone(), RpcOptions::default());
    let e = rpc.call(&kvpool_proto::Status {}).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::WrongService, "{e}");
    // An unknown transfer: TransferUnknown, and the real one is untouched.
    let e = rpc
        .call(&kvpool_proto::HandoffDone {
            transfer_id: "no-such".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TransferUnknown, "{e}");
    assert_eq!(pd.producer.stats().held, 1);

    receive_and_check(&mut pd, &params, &p, &[3, 4, 5, 6, 7, 8]).await;
    assert_eq!(pd.producer.stats().released, 1);
}

/// Two engines that computed the same prefix save it at the same moment: both saves succeed
/// (one writes, the other finds it written or being written), and the prefix reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_saves_of_one_prefix_both_succeed() {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let mut a = engine(&master, LayerGroups::All, false);
    let mut b = engine(&master, LayerGroups::All, true);
    let p = prompt(13, 256);
    let keys = a.hasher.keys(&p);
    let slots: Vec<usize> = (0..keys.len()).collect();
    prefill(&mut a.cache, &p, &slots);
    prefill(&mut b.cache, &p, &slots);
    let blocks = pairs(&keys, &slots);
    let (ra, rb) = tokio::join!(
        a.conn.save(&a.cache, &blocks),
        b.conn.save(&b.cache, &blocks)
    );
    for r in ra.into_iter().chain(rb) {
        r.unwrap();
    }
    assert_eq!(a.conn.lookup(&keys).await.unwrap(), keys.len());
}

/// A decoder receiving layer-wise sees each layer group, in order, with the producer's bytes,
/// before the hand-off completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_received_layer_by_layer() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let secs = Duration::from_secs;
    let mut pd = pd_pair_grouped(&master, secs(60), secs(10), LayerGroups::PerObject(1)).await;
    let (p, params) = prefill_and_hand_off(&mut pd, 14, "r1").await;
    let mut seen = Vec::new();
    let mut wrong = 0;
    pd.consumer
        .receive_layerwise(
            &params,
            &mut pd.cons_engine.cache,
            &[5, 4, 3, 2, 1, 0],
            |g| {
                seen.push(g.group);
                for (i, parts) in g.blocks.iter().enumerate() {
                    let want = [kv_bytes(&p, i, g.group, 0), kv_bytes(&p, i, g.group, 1)].concat();
                    if parts.concat() != want {
                        wrong += 1;
                    }
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(seen, (0..LAYERS).collect::<Vec<_>>());
    assert_eq!(wrong, 0);
    assert_eq!(pd.producer.stats().released, 1);
}

/// A full pool loses a prefix's tail before its head: what is left of every prefix is still a
/// prefix that lookup can reach (the connector sends each batch tail first, so a prefix's
/// first block is its most recently touched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_what_remains_of_a_prefix_usable() {
    const N: usize = 200;
    let pool = up("32MiB", &[]);
    let master = pool.addr("master");
    let cache = HostKvCache::block_first(LAYERS, true, N, SHAPE.bytes(), LayerGroups::All).unwrap();
    let hasher = BlockHasher::new(namespace(&cache.layout().grouping_tag()));
    let conn = PoolConnector::new(Arc::new(client(&master)), cache.layout());
    // Six 200-block prefixes of 32 KiB blocks: 37.5 MiB into a 32 MiB pool.
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| prompt(100 + i, N * SHAPE.block_size))
        .collect();
    let slots: Vec<usize> = (0..N).collect();
    for p in &prompts {
        for r in conn.save(&cache, &pairs(&hasher.keys(p), &slots)).await {
            r.unwrap();
        }
    }
    // The last save may leave the segment above its high watermark (an allocation evicts only
    // what it needs); the master's next tick then evicts the coldest. Let that happen before
    // looking: each `exists` below warms what it finds, so a tick between two of them would
    // evict the tail of a prefix not looked at yet instead of the oldest one.
    let settled = |s: &kvpool_proto::StatusResponse| {
        s.nodes
            .iter()
            .flat_map(|n| &n.segments)
            .all(|g| g.used as f64 <= 0.9 * g.capacity as f64)
    };
    wait_until(
        "the pool to settle below its high watermark",
        Duration::from_secs(10),
        || async { conn.client().status().await.is_ok_and(|s| settled(&s)) },
    )
    .await;
    let mut kept = Vec::new();
    for p in &prompts {
        let wire: Vec<String> = hasher.keys(p).iter().map(|k| k.wire(None)).collect();
        let refs: Vec<&[u8]> = wire.iter().map(|k| k.as_bytes()).collect();
        let present: Vec<bool> = conn
            .client()
            .exists(&refs, false)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let k = present.iter().take_while(|&&b| b).count();
        assert!(
            present[k..].iter().all(|&b| !b),
            "a prefix kept blocks past a hole: {} of {N} present, first {k} leading",
            present.iter().filter(|&&b| b).count()
        );
        kept.push(k);
    }
    // Eviction happened, the oldest prefix went first, and the newest is whole.
    assert!(kept[0] < N, "{kept:?}");
    assert_eq!(kept[5], N, "{kept:?}");
    assert!(kept.windows(2).all(|w| w[0] <= w[1]), "{kept:?}");
}
