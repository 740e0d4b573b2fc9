//! Faults with real processes: a storage node killed with SIGKILL, a master killed and
//! restarted. Nothing may ever come back with wrong bytes.

use std::time::Duration;

use kvpool_client::TransportMode;
use kvpool_proto::PutOptions;
use kvpool_tests::{
    alive_nodes, client, client_over, config_file, store, transport_matrix, value, wait_until, Proc,
};

const FAST_TTL: &str = "[master]\nnode-ttl = \"2s\"\nheartbeat-interval = \"200ms\"\n";

fn master(cfg: &std::path::Path, listen: &str) -> Proc {
    Proc::start(&[
        "master",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        listen,
    ])
}

transport_matrix!(
    killed_storage_node_gives_misses_or_other_replicas_never_wrong_bytes,
    killed_node_gives_misses_or_other_replicas
);

async fn killed_node_gives_misses_or_other_replicas(transport: TransportMode) {
    let cfg = config_file(FAST_TTL);
    let m = master(&cfg, "127.0.0.1:0");
    let addr = m.addr("master");
    let _a = store(&addr, "a");
    let mut b = store(&addr, "b");
    let c = client_over(&addr, transport);
    wait_until("both nodes registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 2
    })
    .await;

    let len = 100 << 10;
    for i in 0..40u64 {
        let two = PutOptions {
            replicas: 2,
            ..Default::default()
        };
        c.put(format!("r2/{i}").as_bytes(), &value(i, len), &two)
            .await
            .unwrap();
        c.put(
            format!("r1/{i}").as_bytes(),
            &value(1000 + i, len),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }

    b.kill();
    let check = |phase: &'static str| {
        let c = &c;
        async move {
            let mut r1_present = 0;
            for i in 0..40u64 {
                let got = c.get(format!("r2/{i}").as_bytes()).await;
                assert_eq!(
                    got.unwrap().as_deref(),
                    Some(&value(i, len)[..]),
                    "{phase}: r2/{i}"
                );
                // A miss or an error is fine while the node is dead; wrong bytes never are.
                if let Ok(Some(v)) = c.get(format!("r1/{i}").as_bytes()).await {
                    assert!(v == value(1000 + i, len), "{phase}: r1/{i} wrong bytes");
                    r1_present += 1;
                }
            }
            r1_present
        }
    };
    // Before the master notices: replicated objects come from the survivor.
    let before = check("node killed, not yet declared dead").await;
    assert!(
        before < 40,
        "no single-replica object lived on the killed node"
    );
    wait_until(
        "the killed node declared dead",
        Duration::from_secs(20),
        || async { alive_nodes(&c).await == 1 },
    )
    .await;
    // After: the killed node's single replicas are clean misses.
    for i in 0..40u64 {
        let r = c.get(format!("r1/{i}").as_bytes()).await.unwrap();
        assert!(
            r.is_none() || r.as_deref() == Some(&value(1000 + i, len)[..]),
            "r1/{i}"
        );
    }
    assert_eq!(check("node declared dead").await, before);
    // The pool keeps serving writes.
    c.put(b"after-kill", &value(7, len), &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        c.get(b"after-kill").await.unwrap().as_deref(),
        Some(&value(7, len)[..])
    );

    // The node comes back (a new process, empty DRAM) and re-joins.
    let _b2 = store(&addr, "b");
    wait_until("the node re-joined", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 2
    })
    .await;
    let three = PutOptions {
        replicas: 2,
        ..Default::default()
    };
    c.put(b"after-rejoin", &value(8, len), &three)
        .await
        .unwrap();
    let info = c.status().await.unwrap();
    assert!(info
        .nodes
        .iter()
        .filter(|n| n.alive)
        .all(|n| n.segments.iter().all(|s| s.objects > 0 || s.used == 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_master_gets_objects_back_from_live_nodes() {
    let cfg = config_file(FAST_TTL);
    let mut m = master(&cfg, "127.0.0.1:0");
    let addr = m.addr("master");
    let _s1 = store(&addr, "s1");
    let _s2 = store(&addr, "s2");
    let c = client(&addr);
    wait_until("nodes registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 2
    })
    .await;

    let sizes = [1usize, 4096, 100_000, 1 << 20, 3 << 20];
    let mut keys = Vec::new();
    for i in 0..60u64 {
        let len = sizes[i as usize % sizes.len()];
        let key = format!("keep/{i}");
        let opts = PutOptions {
            replicas: 1 + (i % 2) as u8,
            ..Default::default()
        };
        c.put(key.as_bytes(), &value(i, len), &opts).await.unwrap();
        keys.push((key, i, len));
    }
    // One removed before the restart must stay removed... once the node applied the free.
    c.remove(&[b"keep/0"], false).await[0].as_ref().unwrap();
    wait_until(
        "removal reached the node",
        Duration::from_secs(10),
        || async {
            c.status()
                .await
                .map(|s| s.nodes.iter().all(|n| n.pending_frees == 0))
                .unwrap_or(false)
        },
    )
    .await;

    m.kill();
    let m2 = master(&cfg, &addr);
    assert_eq!(m2.addr("master"), addr);
    wait_until(
        "nodes re-registered with the new master",
        Duration::from_secs(20),
        || async { alive_nodes(&c).await == 2 },
    )
    .await;
    for (key, i, len) in &keys[1..] {
        let got = c
            .get(key.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(
            got.as_deref() == Some(&value(*i, *len)[..]),
            "{key} not back byte for byte"
        );
    }
    assert!(
        c.get(b"keep/0").await.unwrap().is_none(),
        "a removed object came back"
    );
    let status = c.status().await.unwrap();
    assert_eq!(status.objects, 59);
    // New puts do not land on top of recovered objects.
    for i in 0..30u64 {
        c.put(
            format!("new/{i}").as_bytes(),
            &value(5000 + i, 1 << 20),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }
    for (key, i, len) in &keys[1..] {
        let got = c.get(key.as_bytes()).await.unwrap();
        assert!(
            got.as_deref() == Some(&value(*i, *len)[..]),
            "{key} overwritten by a new put"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_node_moves_its_data_away_with_progress_and_takes_no_new_data() {
    let cfg = config_file(FAST_TTL);
    let m = master(&cfg, "127.0.0.1:0");
    let addr = m.addr("master");
    let _a = store(&addr, "a");
    let _b = store(&addr, "b");
    let c = client(&addr);
    wait_until("both nodes registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 2
    })
    .await;
    let len = 50_000;
    for i in 0..40u64 {
        let opts = PutOptions {
            replicas: 1 + (i % 2) as u8,
            ..Default::default()
        };
        c.put(format!("d/{i}").as_bytes(), &value(i, len), &opts)
            .await
            .unwrap();
    }
    let out = std::process::Command::new(kvpool_tests::kvpool_bin())
        .args(["drain", "b", "--master", &addr, "--timeout", "30s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "drain failed: {stderr}");
    assert!(
        stderr.contains("replica(s) left"),
        "no progress shown: {stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is drained"));
    let st = c.status().await.unwrap();
    let b = st.nodes.iter().find(|n| n.name == "b").unwrap();
    assert!(b.draining && b.segments.iter().all(|s| s.objects == 0 && s.used == 0));
    // Every object is intact on `a`: sole copies on `b` were moved there (a pulled them from
    // b's data server) before b let them go.
    for i in 0..40u64 {
        let key = format!("d/{i}");
        let got = c.get(key.as_bytes()).await.unwrap();
        assert_eq!(got.as_deref(), Some(&value(i, len)[..]), "{key}");
        let info = c.locate(&[key.as_bytes()]).await.pop().unwrap().unwrap();
        let info = info.expect("located");
        assert!(!info.replicas.is_empty(), "{key} has a replica");
        assert!(
            info.replicas.iter().all(|r| r.node != b.id),
            "{key} has no replica left on the drained node"
        );
    }
    // New data lands on `a` only.
    for i in 0..10u64 {
        let key = format!("after/{i}");
        c.put(key.as_bytes(), &value(i, len), &PutOptions::default())
            .await
            .unwrap();
        let info = c
            .locate(&[key.as_bytes()])
            .await
            .pop()
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            info.replicas.iter().all(|r| r.node != b.id),
            "{key} placed on the draining node"
        );
    }
}

transport_matrix!(
    a_node_killed_mid_transfer_never_gives_wrong_bytes,
    node_killed_mid_transfer
);

/// Gets of large values run back to back while their only node is killed: each answer is the
/// value, a miss or an error, never other bytes; then the client keeps working with a new
/// node (a shared-memory client drops its mapping of the dead node's memory).
async fn node_killed_mid_transfer(transport: TransportMode) {
    let cfg = config_file(FAST_TTL);
    let m = master(&cfg, "127.0.0.1:0");
    let addr = m.addr("master");
    let mut b = store(&addr, "b");
    let c = std::sync::Arc::new(client_over(&addr, transport));
    wait_until("the node registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 1
    })
    .await;
    let len = 8 << 20;
    let n = 6u64;
    for i in 0..n {
        c.put(
            format!("big/{i}").as_bytes(),
            &value(i, len),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The reader's hits so far: the kill waits for one, so it lands while gets flow.
    let flowing = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let (c, stop, flowing) = (c.clone(), stop.clone(), flowing.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; len];
            let (mut hits, mut failures) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("big/{}", i % n);
                buf.fill(0);
                match c.get_into(key.as_bytes(), &mut buf).await {
                    Ok(Some(got)) => {
                        assert_eq!(got, len as u64, "{key}");
                        assert!(buf == value(i % n, len), "{key}: wrong bytes");
                        hits += 1;
                        flowing.store(hits, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(None) | Err(_) => failures += 1,
                }
                i += 1;
            }
            (hits, failures)
        })
    };
    // Kill while gets are flowing: once the reader has completed one, so the next is in
    // flight (a get of the test's own could finish first on a loaded machine, and the kill
    // then lands before the reader's first get ends).
    wait_until("gets flowing", Duration::from_secs(20), || {
        let n = flowing.load(std::sync::atomic::Ordering::Relaxed);
        async move { n > 0 }
    })
    .await;
    b.kill();
    wait_until(
        "the killed node declared dead",
        Duration::from_secs(20),
        || async { alive_nodes(&c).await == 0 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (hits, failures) = reader.await.unwrap();
    assert!(hits > 0 && failures > 0, "hits {hits}, failures {failures}");
    // A new node: the same client reaches it (a shared-memory client attaches anew).
    let _b2 = store(&addr, "b2");
    wait_until(
        "the new node registered",
        Duration::from_secs(20),
        || async { alive_nodes(&c).await == 1 },
    )
    .await;
    c.put(b"after", &value(99, len), &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        c.get(b"after").await.unwrap().as_deref(),
        Some(&value(99, len)[..])
    );
}

/// Client processes (`kvpool get` over shared memory) killed at every moment of attaching
/// and mapping a node's segment: the node goes on serving, over shared memory and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_killed_while_mapping_leave_the_node_serving() {
    let pool = kvpool_tests::up("256MiB", &[]);
    let master = pool.addr("master");
    let len = 16 << 20;
    let c = client_over(&master, TransportMode::Shm);
    c.put(b"shared", &value(5, len), &PutOptions::default())
        .await
        .unwrap();
    let out = std::env::temp_dir().join(format!("kvpool-killed-client-{}", std::process::id()));
    for i in 0..12u64 {
        let mut child = std::process::Command::new(kvpool_tests::kvpool_bin())
            .args(["get", "--master", &master, "shared", "--output"])
            .arg(&out)
            .env("KVPOOL_TRANSPORT", "shm")
            .env("KVPOOL_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Staggered over the process's start, attach, mapping and copy.
        tokio::time::sleep(Duration::from_millis(i * 3)).await;
        let _ = child.kill();
        let _ = child.wait();
    }
    // One that is left to finish got the value through shared memory.
    let status = std::process::Command::new(kvpool_tests::kvpool_bin())
        .args(["get", "--master", &master, "shared", "--output"])
        .arg(&out)
        .env("KVPOOL_TRANSPORT", "shm")
        .env("KVPOOL_LOG", "error")
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&out).unwrap() == value(5, len));
    let _ = std::fs::remove_file(&out);
    for t in kvpool_tests::TRANSPORTS {
        let c = client_over(&master, t);
        assert_eq!(
            c.get(b"shared").await.unwrap().as_deref(),
            Some(&value(5, len)[..]),
            "{t}"
        );
        c.put(
            format!("after/{t}").as_bytes(),
            b"x",
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }
}

transport_matrix!(
    a_stale_reader_of_reused_space_gets_a_miss_or_the_right_bytes,
    stale_reader_of_reused_space
);

/// A reader copies an object while it is removed and its space taken by another object of
/// the same size, over and over: every get answers the object's own bytes or a miss (the
/// lease check and the crc32c reject torn bytes), never the other object's or a mix.
async fn stale_reader_of_reused_space(transport: TransportMode) {
    let pool = kvpool_tests::up("64MiB", &[]);
    let master = pool.addr("master");
    let len = 4 << 20;
    let writer = std::sync::Arc::new(client_over(&master, transport));
    let reader = std::sync::Arc::new(client_over(&master, transport));
    let (mut hits, mut misses) = (0u32, 0u32);
    for round in 0..30u64 {
        let key = format!("stale/{round}");
        let mine = value(round, len);
        writer
            .put(key.as_bytes(), &mine, &PutOptions::default())
            .await
            .unwrap();
        let get = {
            let (reader, key) = (reader.clone(), key.clone());
            tokio::spawn(async move { reader.get(key.as_bytes()).await })
        };
        // Remove (even under a lease) and overwrite the same space with other bytes.
        writer.remove(&[key.as_bytes()], true).await;
        let other = value(1_000 + round, len);
        writer
            .put(
                format!("other/{round}").as_bytes(),
                &other,
                &PutOptions::default(),
            )
            .await
            .unwrap();
        match get.await.unwrap() {
            Ok(Some(v)) => {
                assert!(
                    v == mine,
                    "round {round}: a get answered bytes that are not its object's"
                );
                hits += 1;
            }
            Ok(None) => misses += 1,
            Err(e) => panic!("round {round}: {e}"),
        }
        writer
            .remove(&[format!("other/{round}").as_bytes()], true)
            .await;
    }
    eprintln!("{transport}: {hits} hits, {misses} misses");
}
