//! High availability against a real etcd: masters, storage nodes and clients as separate
//! processes that find the leader through etcd. Every wait is a deadline poll; every loop
//! is bounded.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kvpool_proto::PutOptions;
use kvpool_tests::{
    ask_master, etcd_client, leaders, probe, the_leader, value, wait_until, Answer, Etcd, Proc,
};
use kvpool_transport::rpc::RpcClient;

/// The leader's lease TTL (the default).
const TTL: Duration = Duration::from_secs(5);

fn master(etcd: &Etcd) -> Proc {
    Proc::start(&["master", "--listen", "127.0.0.1:0", "--etcd", &etcd.url])
}

fn store(etcd: &Etcd, name: &str) -> Proc {
    Proc::start(&[
        "store",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
        "--dram",
        "64MiB",
        "--name",
        name,
    ])
}

fn val(i: u64) -> Vec<u8> {
    value(i, 1024 + (i as usize % 16) * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_under_load_a_standby_takes_over_and_nothing_acknowledged_is_lost() {
    let etcd = Etcd::start();
    let mut masters: Vec<Proc> = (0..3).map(|_| master(&etcd)).collect();
    let probes: Vec<RpcClient> = masters.iter().map(|m| probe(&m.addr("master"))).collect();
    let leader = the_leader(&probes, Duration::from_secs(20)).await;
    let _stores: Vec<Proc> = (0..3).map(|i| store(&etcd, &format!("s{i}"))).collect();
    let client = Arc::new(etcd_client(&etcd.url));
    wait_until(
        "3 nodes registered with the leader",
        Duration::from_secs(20),
        || {
            let c = client.clone();
            async move { kvpool_tests::alive_nodes(&c).await == 3 }
        },
    )
    .await;
    assert_eq!(leaders(&probes).await, vec![leader], "exactly one leader");

    // Objects acknowledged before the kill.
    let acked: Arc<Mutex<HashMap<u64, ()>>> = Arc::default();
    for i in 0..200u64 {
        client
            .put(format!("k{i}").as_bytes(), &val(i), &PutOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put k{i} before the kill: {e}"));
        acked.lock().unwrap().insert(i, ());
    }

    // A bounded put/get load that runs across the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicUsize::new(0));
    let load = {
        let (client, acked, stop, wrong) =
            (client.clone(), acked.clone(), stop.clone(), wrong.clone());
        tokio::spawn(async move {
            for (next, round) in (10_000u64..).zip(0..100_000u64) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if client
                    .put(
                        format!("k{next}").as_bytes(),
                        &val(next),
                        &PutOptions::default(),
                    )
                    .await
                    .is_ok()
                {
                    acked.lock().unwrap().insert(next, ());
                }
                let k = round % 200;
                // Correct bytes, a miss or an error are all fine mid-failover; wrong bytes never.
                if let Ok(Some(v)) = client.get(format!("k{k}").as_bytes()).await {
                    if v != val(k) {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let acked_now = || acked.lock().unwrap().len();
    wait_until(
        "the load running before the kill",
        Duration::from_secs(20),
        || {
            let n = acked_now();
            async move { n >= 210 }
        },
    )
    .await;

    masters[leader].kill();
    let killed = Instant::now();
    let survivors: Vec<RpcClient> = probes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, p)| p.clone())
        .collect();
    the_leader(&survivors, Duration::from_secs(10)).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    eprintln!("a standby leads {took:?} after the kill");

    wait_until(
        "3 nodes re-registered with the new leader",
        Duration::from_secs(20),
        || {
            let c = client.clone();
            async move { kvpool_tests::alive_nodes(&c).await == 3 }
        },
    )
    .await;
    let before = acked_now();
    wait_until(
        "the load running against the new leader",
        Duration::from_secs(20),
        || {
            let n = acked_now();
            async move { n >= before + 10 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a get returned wrong bytes"
    );

    let keys: Vec<u64> = acked.lock().unwrap().keys().copied().collect();
    assert!(keys.len() >= 200);
    for i in keys {
        let got = client
            .get(format!("k{i}").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("get k{i} after the failover: {e}"));
        assert_eq!(got.as_deref(), Some(&val(i)[..]), "k{i} after the failover");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_etcd_steps_down_before_its_lease_ends() {
    let etcd = Etcd::start();
    let masters: Vec<Proc> = (0..2).map(|_| master(&etcd)).collect();
    let probes: Vec<RpcClient> = masters.iter().map(|m| probe(&m.addr("master"))).collect();
    let leader = the_leader(&probes, Duration::from_secs(20)).await;

    // Watch both masters throughout: at no poll may two answer as leader.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (probes, stop) = (probes.clone(), stop.clone());
        tokio::spawn(async move {
            let mut polls = 0u64;
            while !stop.load(Ordering::Relaxed) && polls < 10_000 {
                let l = leaders(&probes).await;
                assert!(
                    l.len() <= 1,
                    "two masters answered as leader at once: {l:?}"
                );
                polls += 1;
                // The sampling interval of a watch that runs until told to stop, not a wait
                // for a condition.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            polls
        })
    };

    etcd.pause();
    let paused = Instant::now();
    let old = &probes[leader];
    wait_until(
        "the leader to step down after etcd stalled (past this, its lease may have expired)",
        TTL,
        || async move {
            match ask_master(old).await {
                Answer::NotLeader => true,
                a => {
                    assert_eq!(a, Answer::Leader);
                    false
                }
            }
        },
    )
    .await;
    let stepped = paused.elapsed();
    eprintln!("the leader stepped down {stepped:?} after etcd stalled");
    assert!(stepped < TTL, "stepped down after {stepped:?}");
    // Nobody else can lead while etcd is stalled.
    assert!(leaders(&probes).await.is_empty());

    etcd.resume();
    the_leader(&probes, Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    let polls = watcher.await.expect("no two leaders");
    assert!(polls > 10, "the watcher polled only {polls} times");
}
