//! Same-host lookups: a client on the master's host finds keys in the master's location index
//! (shared memory) instead of asking, so a cold get is a memory probe and a copy. What must
//! hold: the bytes are the key's, a remove or an overwrite is seen as soon as it is
//! acknowledged, gets racing eviction never return other bytes, the master still learns of
//! the reads (deferred), and an index whose master stopped or died is not trusted. A real
//! master and storage node as processes, clients in this process, the master's counters read
//! off `/metrics`.

use std::time::Duration;

use kvpool_client::{Client, ClientConfig, TransportMode};
use kvpool_proto::PutOptions;
use kvpool_tests::{
    alive_nodes,
    http::{scrape, value as sample},
    master_with, store_of, value, wait_until, Proc,
};

const LIMIT: Duration = Duration::from_secs(30);

struct Pool {
    master: Proc,
    store: Proc,
    m: String,
    http: String,
}

/// A master and a node of `dram` on this host.
async fn pool(dram: &str) -> Pool {
    let master = master_with("[master]\nheartbeat-interval = \"100ms\"\n");
    let (m, http) = (master.addr("master"), master.addr("http"));
    let store = store_of(&m, "lookups-node", dram);
    let c = client(&m, |_| {});
    wait_until("the node's registration", LIMIT, || async {
        alive_nodes(&c).await == 1
    })
    .await;
    Pool {
        master,
        store,
        m,
        http,
    }
}

/// A shared-memory client (the index's default is on), edited by `edit`.
fn client(m: &str, edit: impl FnOnce(&mut ClientConfig)) -> Client {
    let mut cfg = ClientConfig::with_master(m);
    cfg.deadline = Duration::from_secs(10);
    cfg.transport = TransportMode::Shm;
    edit(&mut cfg);
    Client::new(cfg)
}

/// GetReplicas requests the master has answered, and the reads served by its index that
/// clients reported.
fn lookups(http: &str) -> (f64, f64) {
    let s = scrape(http);
    (
        sample(&s, "kvpool_master_requests_total{op=\"GetReplicas\"}"),
        sample(&s, "kvpool_master_index_reads_total"),
    )
}

/// How many index files `master` has where masters put them.
fn index_files(master: &Proc) -> usize {
    let prefix = format!("kvpool-master-{}-", master.pid());
    std::fs::read_dir(kvpool_transport::shm::index::default_dir())
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with(&prefix) && name.ends_with(".index")
                })
                .count()
        })
        .unwrap_or(0)
}

async fn put_all(c: &Client, keys: &[String], len: usize) {
    for k in keys {
        let n: u64 = k.rsplit('/').next().unwrap().parse().unwrap();
        c.put(k.as_bytes(), &value(n, len), &PutOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put {k}: {e}"));
    }
}

/// Gets of keys another client put: the first asks the master (where its index is, and
/// where the key is: the node's address), every other one finds its key in the index. The
/// master hears of the reads in a few background batches, not one request per get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_same_host_get_finds_its_key_in_the_index_and_asks_nobody() {
    let p = pool("64MiB").await;
    let keys: Vec<String> = (0..300).map(|i| format!("cold/{i}")).collect();
    put_all(&client(&p.m, |_| {}), &keys, 4096).await;

    let r = client(&p.m, |_| {});
    let (requests, hits) = lookups(&p.http);
    for k in &keys {
        let n: u64 = k[5..].parse().unwrap();
        assert!(
            r.get(k.as_bytes()).await.unwrap() == Some(value(n, 4096)),
            "{k}"
        );
    }
    let (requests_after, _) = lookups(&p.http);
    assert!(
        requests_after - requests <= 1.0,
        "{} lookups for 300 cold gets: the index was not used",
        requests_after - requests
    );
    // The reads reach the master all the same (their recency, read counts and leases), in
    // batches sent after them, the last one 100 ms after its first read: all but the first,
    // which was a lookup (the client had not heard of the node yet).
    wait_until("the master hears of every read", LIMIT, || async {
        lookups(&p.http).1 - hits == 299.0
    })
    .await;
    // And they lease their keys: another client's remove without force is refused.
    let w = client(&p.m, |_| {});
    let refused = w.remove(&[keys[1].as_bytes()], false).await.pop().unwrap();
    assert_eq!(
        refused.unwrap_err().code(),
        kvpool_client::ErrorCode::HasLease
    );

    // The counter counts: with the index off, every get is a request.
    let off = client(&p.m, |c| c.master_index = false);
    let (before, _) = lookups(&p.http);
    for k in &keys[..10] {
        assert!(off.get(k.as_bytes()).await.unwrap().is_some());
    }
    assert_eq!(lookups(&p.http).0 - before, 10.0);
    drop(p.store);
}

/// The index says what the master's map says by the time the master answers: a reader sees a
/// remove, a new put and an overwrite by another client as soon as they are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removes_and_overwrites_by_another_client_are_seen_at_once() {
    let p = pool("64MiB").await;
    let w = client(&p.m, |_| {});
    let r = client(&p.m, |_| {});
    let (v1, v2, v3) = (value(1, 4096), value(2, 8192), value(3, 100));
    w.put(b"k", &v1, &PutOptions::default()).await.unwrap();
    w.put(b"other", &v1, &PutOptions::default()).await.unwrap();
    // Learn the node (and map the index) through one lookup.
    assert_eq!(r.get(b"other").await.unwrap(), Some(v1.clone()));
    let overwrite = PutOptions {
        overwrite: true,
        ..PutOptions::default()
    };
    for round in 0..20 {
        assert_eq!(
            r.get(b"k").await.unwrap(),
            Some(v1.clone()),
            "round {round}"
        );
        w.remove(&[b"k"], true).await.pop().unwrap().unwrap();
        assert_eq!(r.get(b"k").await.unwrap(), None, "removed, round {round}");
        w.put(b"k", &v2, &PutOptions::default()).await.unwrap();
        assert_eq!(
            r.get(b"k").await.unwrap(),
            Some(v2.clone()),
            "round {round}"
        );
        w.put(b"k", &v3, &overwrite).await.unwrap();
        assert_eq!(
            r.get(b"k").await.unwrap(),
            Some(v3.clone()),
            "round {round}"
        );
        w.put(b"k", &v1, &overwrite).await.unwrap();
    }
    drop(p.store);
}

/// A node of 8 MiB under a stream of 64 KiB puts evicts all the time, and freed ranges are
/// handed to new puts at once: readers of recent keys race both. Every value read is its
/// key's, byte for byte; the others are misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gets_racing_eviction_never_return_other_bytes() {
    let p = pool("8MiB").await;
    let w = client(&p.m, |_| {});
    let total = 1_500u64;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        async move {
            for n in 0..total {
                let k = format!("churn/{n}");
                // A put may be refused while eviction makes room: the key is then a miss.
                let _ = w
                    .put(k.as_bytes(), &value(n, 65536), &PutOptions::default())
                    .await;
                written.store(n + 1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let r = client(&p.m, |_| {});
            let written = written.clone();
            tokio::spawn(async move {
                let (mut hits, mut gets) = (0u64, 0u64);
                let mut x = 0x9E37_79B9_u64.wrapping_mul(i + 1);
                loop {
                    let upto = written.load(std::sync::atomic::Ordering::Relaxed);
                    if upto >= total {
                        return (hits, gets);
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = upto.saturating_sub(1 + x % 150);
                    let got = r.get(format!("churn/{n}").as_bytes()).await.unwrap();
                    gets += 1;
                    if let Some(v) = got {
                        assert!(v == value(n, 65536), "churn/{n}: other bytes");
                        hits += 1;
                    }
                }
            })
        })
        .collect();
    writer.await;
    let (mut hits, mut gets) = (0, 0);
    for r in readers {
        let (h, g) = r.await.expect("a reader panicked");
        hits += h;
        gets += g;
    }
    assert!(gets > 300 && hits > 0, "{hits} hits in {gets} gets");
    drop(p.store);
}

/// An index is trusted only while its master renews it: a stopped master's within a quarter
/// of a second, a killed one's likewise. Gets then ask the master (and fail while it cannot
/// answer) rather than read where it last said. A master that exits removes its index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_is_not_trusted_once_its_master_stops_renewing_it() {
    let mut p = pool("64MiB").await;
    let w = client(&p.m, |_| {});
    let v = value(7, 4096);
    w.put(b"k", &v, &PutOptions::default()).await.unwrap();
    let quick = |m: &str| {
        client(m, |c| {
            c.deadline = Duration::from_millis(500);
            c.rpc.request_timeout = Duration::from_millis(500);
        })
    };
    let r = quick(&p.m);
    assert_eq!(r.get(b"k").await.unwrap(), Some(v.clone()));
    let (before, _) = lookups(&p.http);
    assert_eq!(r.get(b"k").await.unwrap(), Some(v.clone()));
    assert_eq!(lookups(&p.http).0, before, "served by the index");
    assert_eq!(index_files(&p.master), 1, "the master's index");

    p.master.signal(libc::SIGSTOP);
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        wait_until(
            "gets stop trusting a stopped master's index",
            LIMIT,
            || async { r.get(b"k").await.is_err() },
        )
        .await
    })
    .await;
    p.master.signal(libc::SIGCONT);
    stopped.expect("a get waited on a stopped master");
    wait_until("the master answers again", LIMIT, || async {
        r.get(b"k").await.ok() == Some(Some(v.clone()))
    })
    .await;

    p.master.kill();
    wait_until(
        "gets stop trusting a dead master's index",
        LIMIT,
        || async { r.get(b"k").await.is_err() },
    )
    .await;
    drop(p.store);

    // A master that exits on SIGTERM takes its index with it.
    let mut q = pool("64MiB").await;
    assert_eq!(index_files(&q.master), 1);
    q.master.terminate();
    assert_eq!(index_files(&q.master), 0, "removed at exit");
    drop(q.store);
}
