//! Faults with real processes: a storage node killed with SIGKILL, a master killed and
//! restarted. Nothing may ever come back with wrong bytes.

use std::time::Duration;

use kvpool_proto::PutOptions;
use kvpool_tests::{alive_nodes, client, config_file, store, value, wait_until, Proc};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_storage_node_gives_misses_or_other_replicas_never_wrong_bytes() {
    let cfg = config_file(FAST_TTL);
    let m = master(&cfg, "127.0.0.1:0");
    let addr = m.addr("master");
    let _a = store(&addr, "a");
    let mut b = store(&addr, "b");
    let c = client(&addr);
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
