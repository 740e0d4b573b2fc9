//! Hot reads in one round trip: a client's location cache sends a repeated get straight to
//! the storage node, and the node's replica check turns every stale location into a clean
//! fallback to the master, never into another key's bytes. A real master and storage node as
//! processes, clients in this process, the master's request counters read off `/metrics`.

use std::time::Duration;

use kvpool_client::{Client, ClientConfig, LocationCache, TransportMode};
use kvpool_proto::PutOptions;
use kvpool_tests::{
    alive_nodes, config_file, free_port,
    http::{scrape, value as sample},
    master_with, transport_matrix, value, wait_until, Proc,
};

const LIMIT: Duration = Duration::from_secs(30);

/// Fast heartbeats (frees reach the node quickly), a short node TTL (a killed node is dead
/// soon), and a long lease (cached locations outlive a slow test machine).
const CONFIG: &str =
    "[master]\nnode-ttl = \"2s\"\nheartbeat-interval = \"100ms\"\nlease-ttl = \"60s\"\n";

struct Pool {
    master: Proc,
    store: Proc,
    /// The master's RPC address and its HTTP endpoint.
    m: String,
    http: String,
    /// The storage node's data port (fixed, so a restarted node comes back at the address
    /// clients cached).
    port: u16,
}

fn start_store(m: &str, port: u16) -> Proc {
    start_store_with(m, port, &[])
}

/// A node with more flags before `store` (`--config FILE`).
fn start_store_with(m: &str, port: u16, pre: &[&str]) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut args = pre.to_vec();
    args.extend_from_slice(&[
        "store",
        "--master",
        m,
        "--listen",
        &listen,
        "--dram",
        "64MiB",
        "--name",
        "hot-node",
        "--http",
        "127.0.0.1:0",
    ]);
    Proc::start(&args)
}

async fn pool() -> Pool {
    pool_with(&[]).await
}

/// A pool whose node starts with `pre` before `store`.
async fn pool_with(pre: &[&str]) -> Pool {
    let master = master_with(CONFIG);
    let (m, http) = (master.addr("master"), master.addr("http"));
    let port = free_port().expect("a free port");
    let store = start_store_with(&m, port, pre);
    let c = cached(&m, TransportMode::Tcp);
    wait_until("the node's registration", LIMIT, || async {
        alive_nodes(&c).await == 1
    })
    .await;
    Pool {
        master,
        store,
        m,
        http,
        port,
    }
}

/// GetReplicas requests the master has answered so far.
fn lookups(http: &str) -> f64 {
    sample(
        &scrape(http),
        "kvpool_master_requests_total{op=\"GetReplicas\"}",
    )
}

fn configured(m: &str, transport: TransportMode, edit: impl FnOnce(&mut ClientConfig)) -> Client {
    let mut cfg = ClientConfig::with_master(m);
    cfg.deadline = Duration::from_secs(10);
    cfg.transport = transport;
    // On: the clients' default is off (docs/semantics.md, "Hot reads").
    cfg.location_cache.enabled = true;
    // Off: these tests are about the location cache, which the master's index (on for
    // same-host clients) would answer before (its tests: same_host_lookups.rs).
    cfg.master_index = false;
    edit(&mut cfg);
    Client::new(cfg)
}

/// A client with the location cache on (the clients' default is off).
fn cached(m: &str, transport: TransportMode) -> Client {
    configured(m, transport, |_| {})
}

fn uncached(m: &str, transport: TransportMode) -> Client {
    configured(m, transport, |c| {
        c.location_cache = LocationCache {
            enabled: false,
            ..LocationCache::default()
        }
    })
}

/// Puts a 4 KiB `small` and a 3 MiB `large` value (large enough to be copied by several
/// threads over shared memory) and reads both twice: the first two gets of each ask the
/// master (one batch each: a key is cached from its second lookup on, so a key read once
/// costs no cache insertion). Returns the values.
async fn put_and_warm(p: &Pool, c: &Client, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let small = value(seed, 4096);
    let large = value(seed + 1, 3 << 20);
    c.put(b"small", &small, &PutOptions::default())
        .await
        .unwrap();
    c.put(b"large", &large, &PutOptions::default())
        .await
        .unwrap();
    let first = lookups(&p.http);
    for _ in 0..2 {
        let got = c.get_batch(&[b"small", b"large"]).await;
        assert_eq!(got[0].as_ref().unwrap().as_deref(), Some(&small[..]));
        assert_eq!(got[1].as_ref().unwrap().as_deref(), Some(&large[..]));
    }
    assert_eq!(lookups(&p.http) - first, 2.0, "the first gets are lookups");
    (small, large)
}

/// Over the network (here: TCP on loopback), a repeated get goes straight to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_get_skips_the_master() {
    let transport = TransportMode::Tcp;
    let p = pool().await;
    let c = cached(&p.m, transport);
    let (small, large) = put_and_warm(&p, &c, 1).await;
    // ... the next ones go straight to the node, byte for byte.
    let before = lookups(&p.http);
    for _ in 0..20 {
        assert_eq!(c.get(b"small").await.unwrap().as_deref(), Some(&small[..]));
        let mut buf = vec![0u8; large.len()];
        assert_eq!(
            c.get_into(b"large", &mut buf).await.unwrap(),
            Some(large.len() as u64)
        );
        assert!(buf == large, "the cached large get differs");
    }
    assert_eq!(lookups(&p.http), before, "hot gets asked the master");
    // The counter does count: with the cache off, every get is a lookup.
    let off = uncached(&p.m, transport);
    for _ in 0..5 {
        assert_eq!(
            off.get(b"small").await.unwrap().as_deref(),
            Some(&small[..])
        );
    }
    assert_eq!(lookups(&p.http) - before, 5.0);
    drop(p.store);
}

/// A node this client copies from through shared memory publishes its replica board: a
/// repeated get is checked there with two memory loads, so it asks neither the master nor the
/// node. Shown with both processes stopped (SIGSTOP): hot gets still return the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_get_over_shared_memory_needs_neither_master_nor_node() {
    let p = pool().await;
    let c = cached(&p.m, TransportMode::Shm);
    let (small, large) = put_and_warm(&p, &c, 3).await;
    let before = lookups(&p.http);
    for _ in 0..5 {
        assert_eq!(c.get(b"small").await.unwrap().as_deref(), Some(&small[..]));
    }
    assert_eq!(lookups(&p.http), before, "hot gets asked the master");
    p.master.signal(libc::SIGSTOP);
    p.store.signal(libc::SIGSTOP);
    let hot = async {
        for _ in 0..10 {
            assert_eq!(c.get(b"small").await.unwrap().as_deref(), Some(&small[..]));
            let mut buf = vec![0u8; large.len()];
            let n = c.get_into(b"large", &mut buf).await.unwrap();
            assert_eq!(n, Some(large.len() as u64));
            assert!(buf == large, "the cached large get differs");
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(10), hot).await;
    p.master.signal(libc::SIGCONT);
    p.store.signal(libc::SIGCONT);
    done.expect("a hot same-host get waited for a stopped master or node");
    assert_eq!(lookups(&p.http), before, "hot gets asked the master");
    drop(p.store);
}

/// A board with no slot left publishes what fits (a 64 MiB node: 8,192 slots, three quarters
/// of them usable); a cached same-host get of a replica left off it misses on the board and is
/// done again through the master, with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_left_off_a_full_board_cost_a_lookup_never_bytes() {
    let p = pool().await;
    let c = cached(&p.m, TransportMode::Shm);
    let n = 7_000u64;
    let keys: Vec<String> = (0..n).map(|i| format!("full/{i}")).collect();
    let want = |k: &str| value(k[5..].parse().expect("a numbered key"), 1024);
    for chunk in keys.chunks(500) {
        let values: Vec<Vec<u8>> = chunk.iter().map(|k| want(k)).collect();
        let items: Vec<(&[u8], &[u8])> = chunk
            .iter()
            .zip(&values)
            .map(|(k, v)| (k.as_bytes(), v.as_slice()))
            .collect();
        for r in c.put_batch(&items, &PutOptions::default()).await {
            r.unwrap();
        }
    }
    let node = scrape(&p.store.addr("http"));
    let published = sample(&node, "kvpool_store_board_published");
    assert_eq!(sample(&node, "kvpool_store_objects"), n as f64);
    assert_eq!(published, 6_144.0, "three quarters of 8,192 slots");
    // Three passes: the first two look up (and cache from the second), the third reads from
    // the cache; every value comes back, published on the board or not.
    for pass in 0..3 {
        for chunk in keys.chunks(500) {
            let refs: Vec<&[u8]> = chunk.iter().map(|k| k.as_bytes()).collect();
            for (k, got) in chunk.iter().zip(c.get_batch(&refs).await) {
                assert_eq!(got.unwrap(), Some(want(k)), "{k}, pass {pass}");
            }
        }
    }
    // A fourth pass looks up the keys the board cannot vouch for (the replicas left off it: a
    // board miss, then a lookup), not all 7,000.
    let hits = || sample(&scrape(&p.http), "kvpool_master_lookup_hits_total");
    let before = hits();
    for chunk in keys.chunks(500) {
        let refs: Vec<&[u8]> = chunk.iter().map(|k| k.as_bytes()).collect();
        for (k, got) in chunk.iter().zip(c.get_batch(&refs).await) {
            assert_eq!(got.unwrap(), Some(want(k)), "{k}, pass 4");
        }
    }
    // At least every key left off the board; a few more whose doorkeeper slot another key took
    // (the cache admits a key on its second lookup), far from all of them.
    let looked_up = hits() - before;
    assert!(
        looked_up >= n as f64 - published && looked_up < (n / 3) as f64,
        "{looked_up} keys looked up again for {n} hot gets with {published} on the board"
    );
    drop(p.store);
}

/// A node without a board (`store.replica-board = false`, or an older node): a cached
/// location would be checked by a round trip to the node, as costly as the lookup it saves,
/// so same-host gets go through the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_host_node_without_a_board_is_read_through_the_master() {
    let cfg = config_file("[store]\nreplica-board = false\n");
    let p = pool_with(&["--config", cfg.to_str().expect("utf-8 path")]).await;
    let c = cached(&p.m, TransportMode::Shm);
    let v = value(3, 4096);
    c.put(b"k", &v, &PutOptions::default()).await.unwrap();
    let before = lookups(&p.http);
    for _ in 0..5 {
        assert_eq!(c.get(b"k").await.unwrap().as_deref(), Some(&v[..]));
    }
    assert_eq!(lookups(&p.http) - before, 5.0);
    assert_eq!(
        c.transport_to(
            &c.locate(&[b"k"]).await[0]
                .as_ref()
                .unwrap()
                .as_ref()
                .unwrap()
                .replicas[0]
                .addr
        ),
        "shm"
    );
    drop(p.store);
}

transport_matrix!(
    a_removed_key_whose_range_is_reused_is_never_read_as_the_other_key,
    removed_and_reused_range
);

async fn removed_and_reused_range(transport: TransportMode) {
    let p = pool().await;
    let reader = cached(&p.m, transport);
    // A reader that does not check crc32c: only the node's replica check stands between its
    // cached location and the other key's bytes.
    let trusting = configured(&p.m, transport, |c| c.verify_checksum = false);
    let other = cached(&p.m, transport);
    let len = 64 << 10;
    let (va, vb) = (value(10, len), value(11, len));
    other.put(b"a", &va, &PutOptions::default()).await.unwrap();
    assert_eq!(reader.get(b"a").await.unwrap().as_deref(), Some(&va[..]));
    for _ in 0..2 {
        assert_eq!(trusting.get(b"a").await.unwrap().as_deref(), Some(&va[..]));
    }
    let where_a = reader.locate(&[b"a"]).await.remove(0).unwrap().unwrap();
    // Another client removes the key (forced: the reader holds a lease) and writes another
    // key of the same size, which the allocator places in the freed range.
    other.remove(&[b"a"], true).await.remove(0).unwrap();
    other.put(b"b", &vb, &PutOptions::default()).await.unwrap();
    let where_b = other.locate(&[b"b"]).await.remove(0).unwrap().unwrap();
    assert_eq!(
        (where_b.replicas[0].segment, where_b.replicas[0].offset),
        (where_a.replicas[0].segment, where_a.replicas[0].offset),
        "the test needs b in a's old range"
    );
    // The reader's cached location of `a` now names b's bytes: the node refuses it (b's
    // write replaced a's tag), the client asks the master, and `a` is gone.
    let before = lookups(&p.http);
    for c in [&reader, &trusting, &reader] {
        let got = c.get(b"a").await.unwrap();
        assert!(
            got.is_none(),
            "a removed key read back as {} bytes",
            got.unwrap().len()
        );
    }
    assert!(
        lookups(&p.http) > before,
        "the stale location fell back to the master"
    );
    assert_eq!(reader.get(b"b").await.unwrap().as_deref(), Some(&vb[..]));
    drop(p.store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_is_a_clean_fallback() {
    let mut p = pool().await;
    let c = cached(&p.m, TransportMode::Tcp);
    let v = value(20, 4096);
    c.put(b"k", &v, &PutOptions::default()).await.unwrap();
    for _ in 0..2 {
        assert_eq!(c.get(b"k").await.unwrap().as_deref(), Some(&v[..]));
    }
    // The node dies with its DRAM and a new one comes back at the same address: the cached
    // location reaches a node that never held the replica.
    p.store.kill();
    wait_until("the master to see the node dead", LIMIT, || async {
        alive_nodes(&c).await == 0
    })
    .await;
    let _store = start_store(&p.m, p.port);
    wait_until("the new node's registration", LIMIT, || async {
        alive_nodes(&c).await == 1
    })
    .await;
    let before = lookups(&p.http);
    assert_eq!(
        c.get(b"k").await.unwrap(),
        None,
        "the object died with its node"
    );
    assert!(
        lookups(&p.http) > before,
        "the stale location fell back to the master"
    );
    // Written again, it is read again, from the new location.
    let w = value(21, 4096);
    c.put(b"k", &w, &PutOptions::default()).await.unwrap();
    assert_eq!(c.get(b"k").await.unwrap().as_deref(), Some(&w[..]));
    assert_eq!(c.get(b"k").await.unwrap().as_deref(), Some(&w[..]));
}

/// A feature of the cache: while a location is cached (within its lease) the key is served
/// with the master down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_gets_are_served_while_the_master_is_down() {
    let mut p = pool().await;
    let c = cached(&p.m, TransportMode::Tcp);
    let v = value(30, 16 << 10);
    c.put(b"hot", &v, &PutOptions::default()).await.unwrap();
    for _ in 0..2 {
        assert_eq!(c.get(b"hot").await.unwrap().as_deref(), Some(&v[..]));
    }
    p.master.kill();
    for _ in 0..10 {
        let got = tokio::time::timeout(Duration::from_secs(5), c.get(b"hot"))
            .await
            .expect("a hot get waited for the dead master");
        assert_eq!(got.unwrap().as_deref(), Some(&v[..]));
    }
    drop(p.store);
}
