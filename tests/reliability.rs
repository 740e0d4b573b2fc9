//! Reliability with the real binary: bad configuration is refused at start naming the bad
//! value, a start that fails after `ready` still exits non-zero, and a panic inside the
//! master's state machine stops that master (exit non-zero, reason on stderr) so that a
//! standby takes over instead of anyone serving a half-applied update. Removes are fenced:
//! a removed object does not come back after a leader failover, a node declared dead and
//! back, a node killed before it acknowledged the free, or a failed NVMe index delete.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kvpool_client::Client;
use kvpool_proto::{PutOptions, Tier};
use kvpool_tests::{
    client, config_file, disk_dir, etcd_client, probe, run_kvpool, stderr, the_leader, value,
    wait_until, Etcd, Proc,
};

fn log_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kvpool-reliability-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("log dir");
    dir.join(name)
}

#[test]
fn malformed_addresses_are_refused_at_start_naming_the_value() {
    for args in [
        &["master", "--listen", "127.0.0.1:0", "--etcd", "::bad::"][..],
        &[
            "master",
            "--listen",
            "127.0.0.1:0",
            "--advertise",
            "no-port",
        ],
        &["store", "--listen", "127.0.0.1:0", "--etcd", "::bad::"],
    ] {
        let o = run_kvpool(args, &[], None);
        let bad = args[args.len() - 1];
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{bad:?}")),
            "{args:?}: the error names the value: {}",
            stderr(&o)
        );
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("ready"),
            "{args:?} refused before ready"
        );
    }
}

#[test]
fn a_start_that_fails_after_ready_exits_non_zero_with_the_reason() {
    // A wildcard listen address with etcd needs --advertise; the election cannot start.
    let o = run_kvpool(
        &[
            "master",
            "--listen",
            "0.0.0.0:0",
            "--etcd",
            "http://127.0.0.1:9",
        ],
        &[],
        None,
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("ready master="));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("advertise"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_state_machine_stops_the_master_with_a_non_zero_exit() {
    let log = log_path("master.log");
    let mut master = Proc::start_logged(
        &["master", "--listen", "127.0.0.1:0"],
        &[("KVPOOL_FAULT_MASTER_PANIC", "PutStart")],
        &log,
    );
    let m = master.addr("master");
    let _node = kvpool_tests::store(&m, "n1");
    let c = Arc::new(client(&m));
    kvpool_tests::wait_until("the node registered", Duration::from_secs(20), || {
        let c = c.clone();
        async move { kvpool_tests::alive_nodes(&c).await == 1 }
    })
    .await;
    assert!(
        c.put(b"k", &value(1, 4096), &PutOptions::default())
            .await
            .is_err(),
        "the put whose request panicked is not acknowledged"
    );
    let st = tokio::task::spawn_blocking(move || {
        let st = master.wait_exit(Duration::from_secs(20));
        (st, master)
    })
    .await
    .unwrap()
    .0
    .expect("the master exits after the panic");
    assert_eq!(st.code(), Some(2), "exit status {st:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("injected fault"),
        "the panic is logged: {text}"
    );
    assert!(
        text.contains("state machine panicked"),
        "the reason is on stderr: {text}"
    );
    // It no longer answers at all: nothing is served from the poisoned map.
    assert!(c.status().await.is_err());
}

/// etcd, a leading master started with one fault switch (its log kept beside the test's),
/// a standby and a registered node, and a client that finds the leader through etcd.
struct HaPool {
    first: Proc,
    c: Arc<kvpool_client::Client>,
    _etcd: Etcd,
    _standby: Proc,
    _node: Proc,
}

async fn ha_pool_with_faulty_leader(fault: (&str, &str)) -> HaPool {
    let etcd = Etcd::start();
    let log = log_path("leader.log");
    let first = Proc::start_logged(
        &["master", "--listen", "127.0.0.1:0", "--etcd", &etcd.url],
        &[fault],
        &log,
    );
    let probes = [probe(&first.addr("master"))];
    assert_eq!(the_leader(&probes, Duration::from_secs(20)).await, 0);
    let _standby = Proc::start(&["master", "--listen", "127.0.0.1:0", "--etcd", &etcd.url]);
    let _node = Proc::start(&[
        "store",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
        "--dram",
        "64MiB",
    ]);
    let c = Arc::new(etcd_client(&etcd.url));
    kvpool_tests::wait_until("the node registered", Duration::from_secs(20), || {
        let c = c.clone();
        async move { kvpool_tests::alive_nodes(&c).await == 1 }
    })
    .await;
    HaPool {
        first,
        c,
        _etcd: etcd,
        _standby,
        _node,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_leader_exits_and_a_standby_takes_over() {
    let HaPool {
        mut first,
        c,
        _etcd,
        _standby,
        _node,
    } = ha_pool_with_faulty_leader(("KVPOOL_FAULT_MASTER_PANIC", "PutStart")).await;
    // The client's first try panics the leader; its retries reach the standby, which takes
    // the put once the node has registered with it. Until then the new leader has no segment
    // and answers `NoSpaceYet` (retryable: nodes register within a heartbeat), so the one put
    // call succeeds.
    let v = value(7, 8192);
    c.put(b"after-failover", &v, &PutOptions::default())
        .await
        .expect("the put after the failover");
    assert_eq!(c.get(b"after-failover").await.expect("get"), Some(v));
    let st = tokio::task::spawn_blocking(move || first.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the poisoned leader exited");
    assert_eq!(st.code(), Some(2));
}

/// How long after its last write a node assumes a put has ended
/// (`kvpool_store::inventory::UNCONFIRMED_GRACE`), plus two heartbeats for the leader's
/// answers that prove a put was never committed.
const ABANDON_AFTER: Duration = Duration::from_secs(5 + 2);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_restores_pins_and_never_commits_an_unacknowledged_put() {
    // The first leader refuses (unapplied) the PutEnd of keys containing "zombie": those
    // puts are fully written and never committed.
    let HaPool {
        mut first,
        c,
        _etcd,
        _standby,
        _node,
    } = ha_pool_with_faulty_leader(("KVPOOL_FAULT_MASTER_REFUSE", "PutEnd@zombie")).await;

    let pinned = PutOptions {
        hard_pin: true,
        ..PutOptions::default()
    };
    c.put(b"pinned", &value(1, 4096), &pinned).await.unwrap();
    c.put(b"plain", &value(2, 4096), &PutOptions::default())
        .await
        .unwrap();
    let e = c
        .put(b"zombie-1", &value(3, 4096), &PutOptions::default())
        .await
        .expect_err("the leader refuses this put's commit");
    assert!(e.to_string().contains("injected fault"), "{e}");
    // The commits reach the node's inventory (notices acknowledged)...
    kvpool_tests::wait_until(
        "commit notices acknowledged",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            async move {
                c.status()
                    .await
                    .is_ok_and(|s| s.nodes.iter().all(|n| n.pending_commits == 0))
            }
        },
    )
    .await;
    // ...and the zombie's grace runs out while the leader keeps answering heartbeats: a rule
    // about elapsed time, so this waits that time rather than a condition.
    tokio::time::sleep(ABANDON_AFTER).await;

    first.kill();
    // Only the new leader can report the node (the old one is gone).
    kvpool_tests::wait_until(
        "the node registered with the new leader",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move { kvpool_tests::alive_nodes(&c).await == 1 }
        },
    )
    .await;
    c.put(b"after", &value(4, 4096), &PutOptions::default())
        .await
        .expect("the new leader takes puts");

    let found = c
        .exists(&[b"pinned", b"plain", b"zombie-1", b"after"], false)
        .await;
    let found: Vec<bool> = found.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        found,
        [true, true, false, true],
        "committed puts survive; the never-committed one does not come back"
    );
    assert_eq!(c.get(b"plain").await.unwrap(), Some(value(2, 4096)));
    // The pin came back with the inventory: a plain remove is refused.
    let r = c.remove(&[b"pinned"], false).await.pop().unwrap();
    assert_eq!(
        r.expect_err("still hard-pinned").code(),
        kvpool_proto::ErrorCode::Pinned
    );
    c.remove(&[b"pinned"], true).await.pop().unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// Removes are fenced (docs/reliability.md, "Removes are fenced"): a removed object never
// comes back, whichever way its free was lost. Each test removes `gone` while the free cannot
// reach the node, loses the free, and checks that `kept` (same node, same inventory) came
// back while `gone` did not: without the fence both would.
// ---------------------------------------------------------------------------------------

/// Short timings, so each fault plays out in seconds.
const FENCE_CONFIG: &str = "[master]\nheartbeat-interval = \"200ms\"\nnode-ttl = \"2s\"\n\
                            leader-ttl = \"3s\"\n";

/// A node with 32 MiB of DRAM and an NVMe tier (write-through: every object also on NVMe),
/// registered through `target` (`--master ADDR` or `--etcd URL`).
fn fence_node(cfg: &Path, target: [&str; 2], nvme: &Path, env: &[(&str, &str)]) -> Proc {
    Proc::start_with_env(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "store",
            target[0],
            target[1],
            "--listen",
            "127.0.0.1:0",
            "--dram",
            "32MiB",
            "--nvme",
            nvme.to_str().unwrap(),
            "--nvme-size",
            "64MiB",
        ],
        env,
    )
}

fn pause(p: &Proc) {
    // SAFETY: kill(2) on a child this test started and still owns (not yet reaped).
    unsafe { libc::kill(p.pid() as i32, libc::SIGSTOP) };
}

fn resume(p: &Proc) {
    // SAFETY: as in `pause`.
    unsafe { libc::kill(p.pid() as i32, libc::SIGCONT) };
}

async fn tiers(c: &Client, key: &[u8]) -> Vec<Tier> {
    match c.locate(&[key]).await.pop() {
        Some(Ok(Some(info))) => info.replicas.iter().map(|r| r.tier).collect(),
        _ => Vec::new(),
    }
}

/// Puts `gone` and `kept` and waits until each has its NVMe copy and the node has
/// acknowledged every commit notice (so both are in its inventory as committed).
async fn put_both(c: &Arc<Client>) {
    for (seed, key) in [(1, &b"gone"[..]), (2, b"kept")] {
        c.put(key, &value(seed, 64 << 10), &PutOptions::default())
            .await
            .unwrap();
    }
    wait_until(
        "NVMe copies and commit notices",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            async move {
                tiers(&c, b"gone").await.contains(&Tier::Nvme)
                    && tiers(&c, b"kept").await.contains(&Tier::Nvme)
                    && c.status().await.is_ok_and(|s| {
                        s.nodes
                            .iter()
                            .all(|n| n.pending_commits == 0 && n.pending_frees == 0)
                    })
            }
        },
    )
    .await;
}

/// Waits until `kept` is served again (the node's inventory was admitted), then checks that
/// `gone` (and any `also` key) did not come back with it.
async fn only_kept_came_back(c: &Arc<Client>, also: &[&[u8]]) {
    wait_until(
        "the node's inventory admitted",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move { matches!(c.get(b"kept").await, Ok(Some(_))) }
        },
    )
    .await;
    assert_eq!(c.get(b"kept").await.unwrap(), Some(value(2, 64 << 10)));
    for key in std::iter::once(&b"gone"[..]).chain(also.iter().copied()) {
        assert!(
            !c.exists(&[key], false).await.pop().unwrap().unwrap(),
            "{} came back after its remove",
            String::from_utf8_lossy(key)
        );
        assert_eq!(c.get(key).await.unwrap(), None);
    }
}

/// A single master (no etcd) and a fenced node on a fresh disk folder.
struct FencePool {
    _master: Proc,
    master: String,
    cfg: PathBuf,
    nvme: PathBuf,
    c: Arc<Client>,
    /// The disk folder of `nvme`, removed when the pool goes (after the processes using it).
    _dir: kvpool_tests::DiskDir,
}

fn fence_pool() -> FencePool {
    let cfg = config_file(FENCE_CONFIG);
    let dir = disk_dir("fence");
    let nvme = dir.join("nvme.dat");
    let m = Proc::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "master",
        "--listen",
        "127.0.0.1:0",
    ]);
    let master = m.addr("master");
    let c = Arc::new(client(&master));
    FencePool {
        _master: m,
        master,
        cfg,
        nvme,
        c,
        _dir: dir,
    }
}

async fn one_alive(c: &Arc<Client>) {
    wait_until("one node alive", Duration::from_secs(30), || {
        let c = c.clone();
        async move { kvpool_tests::alive_nodes(&c).await == 1 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remove_survives_a_leader_failover() {
    let etcd = Etcd::start();
    let cfg = config_file(FENCE_CONFIG);
    let dir = disk_dir("fence-failover");
    let nvme = dir.join("nvme.dat");
    let master = |_: ()| {
        Proc::start(&[
            "--config",
            cfg.to_str().unwrap(),
            "master",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &etcd.url,
        ])
    };
    let mut masters = [master(()), master(())];
    let probes: Vec<_> = masters.iter().map(|m| probe(&m.addr("master"))).collect();
    let leader = the_leader(&probes, Duration::from_secs(20)).await;
    let node = fence_node(&cfg, ["--etcd", &etcd.url], &nvme, &[]);
    let c = Arc::new(etcd_client(&etcd.url));
    one_alive(&c).await;
    put_both(&c).await;

    // The free is queued for a node that cannot take it, and the leader that queued it dies:
    // the next leader rebuilds from an inventory that still lists `gone`.
    pause(&node);
    c.remove(&[b"gone"], true).await.pop().unwrap().unwrap();
    masters[leader].kill();
    resume(&node);
    only_kept_came_back(&c, &[]).await;

    // The fence covers the old replicas only: the key can be put again and read back.
    let v = value(3, 4096);
    c.put(b"gone", &v, &PutOptions::default()).await.unwrap();
    assert_eq!(c.get(b"gone").await.unwrap(), Some(v));
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remove_survives_its_node_declared_dead_and_back() {
    let p = fence_pool();
    let node = fence_node(&p.cfg, ["--master", &p.master], &p.nvme, &[]);
    one_alive(&p.c).await;
    put_both(&p.c).await;
    p.c.put(b"gone-too", &value(4, 4096), &PutOptions::default())
        .await
        .unwrap();

    pause(&node);
    p.c.remove(&[b"gone"], true).await.pop().unwrap().unwrap();
    // Declared dead (node-ttl 2 s): the master drops its replicas and the queued free, so
    // `kept`, held by that node alone, is a miss meanwhile.
    wait_until("the node declared dead", Duration::from_secs(20), || {
        let c = p.c.clone();
        async move {
            c.exists(&[b"kept"], false)
                .await
                .pop()
                .unwrap()
                .is_ok_and(|e| !e)
        }
    })
    .await;
    // A remove while the node is away finds nothing; the client takes NotFound as "gone".
    let r = p.c.remove(&[b"gone-too"], true).await.pop().unwrap();
    assert_eq!(r.unwrap_err().code(), kvpool_proto::ErrorCode::NotFound);
    resume(&node);
    one_alive(&p.c).await;
    only_kept_came_back(&p.c, &[b"gone-too"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remove_survives_a_node_killed_before_it_acknowledged_the_free() {
    let p = fence_pool();
    let mut node = fence_node(&p.cfg, ["--master", &p.master], &p.nvme, &[]);
    one_alive(&p.c).await;
    put_both(&p.c).await;

    pause(&node);
    p.c.remove(&[b"gone"], true).await.pop().unwrap().unwrap();
    node.kill();
    // Restarted on its NVMe tier: a new node id, and an index that still lists `gone`.
    let _node = fence_node(&p.cfg, ["--master", &p.master], &p.nvme, &[]);
    only_kept_came_back(&p.c, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remove_survives_a_failed_nvme_index_delete() {
    let p = fence_pool();
    let mut node = fence_node(
        &p.cfg,
        ["--master", &p.master],
        &p.nvme,
        &[("KVPOOL_FAULT_NVME_INDEX_FREE", "fail")],
    );
    one_alive(&p.c).await;
    put_both(&p.c).await;

    // The node applies and acknowledges the free, but its index delete fails (as on a full
    // disk), so the record stays listed on disk.
    p.c.remove(&[b"gone"], true).await.pop().unwrap().unwrap();
    wait_until("the free acknowledged", Duration::from_secs(20), || {
        let c = p.c.clone();
        async move {
            c.status()
                .await
                .is_ok_and(|s| s.nodes.iter().all(|n| n.pending_frees == 0))
        }
    })
    .await;
    node.kill();
    let _node = fence_node(&p.cfg, ["--master", &p.master], &p.nvme, &[]);
    only_kept_came_back(&p.c, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_in_etcd_are_written_only_under_the_term_holding_the_leader_key() {
    use kvpool_ha::{fence::FenceStore, Election, ElectionConfig};
    let etcd = Etcd::start();
    let cluster = "fence-store";
    let election = Election::start(ElectionConfig {
        endpoints: vec![etcd.url.clone()],
        cluster: cluster.into(),
        address: "127.0.0.1:1".into(),
        ttl: Duration::from_secs(3),
    });
    wait_until("elected", Duration::from_secs(20), || {
        let t = election.leader_term();
        async move { t.is_some() }
    })
    .await;
    let term = election.leader_term().expect("leading");
    let store = FenceStore::start(
        vec![etcd.url.clone()],
        cluster.into(),
        Duration::from_secs(60),
    )
    .expect("fence store");

    // More than one transaction's worth and one load page's worth, binary keys included.
    let mut fences: Vec<(Vec<u8>, u64)> = (0..1_203u64)
        .map(|i| (format!("k/{i}").into_bytes(), 1_000 + i))
        .collect();
    fences.push((vec![0, 0xff, b'/', 7], 42));
    store.record(term, fences.clone()).expect("recorded");
    assert!(
        store
            .record(term + 1, vec![(b"stale".to_vec(), 1)])
            .is_err(),
        "a term that does not hold the leader key writes nothing"
    );
    let mut loaded = store.load().expect("loaded");
    loaded.sort();
    fences.sort();
    assert_eq!(loaded, fences);

    // Once the leader key is gone (resigned, or expired and taken by another master), the
    // old term cannot add a fence the next leader's load would miss.
    election.resign().await;
    assert!(store.record(term, vec![(b"late".to_vec(), 1)]).is_err());
    assert_eq!(store.load().expect("loaded").len(), fences.len());
}
