//! The control plane's whole-namespace requests and a node's clean exit, with real
//! processes: listing keys page by page, removal by regular expression (both per tenant),
//! and a storage node stopped with SIGTERM whose objects are misses at once, long before
//! the node TTL would have declared it dead.

use std::time::{Duration, Instant};

use kvpool_client::{Client, ClientConfig, ErrorCode};
use kvpool_proto::{NodeId, PutOptions};
use kvpool_tests::{alive_nodes, client, config_file, store, up, value, wait_until, Proc};

fn tenant_client(master: &str, tenant: &str) -> Client {
    let mut cfg = ClientConfig::with_master(master);
    cfg.deadline = Duration::from_secs(10);
    cfg.tenant = Some(tenant.to_string());
    Client::new(cfg)
}

async fn put(c: &Client, key: &str) {
    c.put(key.as_bytes(), key.as_bytes(), &PutOptions::default())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// Every key with `prefix`, read `page` keys at a time; also how many pages that took.
async fn list_all(c: &Client, prefix: &str, page: u32) -> (Vec<String>, usize) {
    let (mut keys, mut pages) = (Vec::new(), 0);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (got, more) = c
            .list_keys(prefix.as_bytes(), after.as_deref(), page)
            .await
            .unwrap();
        pages += 1;
        assert!(got.len() <= page as usize);
        after = got.last().cloned().or(after);
        keys.extend(got.into_iter().map(|k| String::from_utf8(k).unwrap()));
        if !more {
            return (keys, pages);
        }
    }
}

#[tokio::test]
async fn keys_are_listed_page_by_page_and_removed_by_regex_per_tenant() {
    let pool = up("64MiB", &[]);
    let m = pool.addr("master");
    let shared = client(&m);
    let tenant = tenant_client(&m, "t1");
    // Out of order, so that the listing's order is the master's doing.
    let mut expected: Vec<String> = (0..25).rev().map(|i| format!("page/{i:02}")).collect();
    for k in &expected {
        put(&shared, k).await;
        put(&tenant, k).await;
    }
    put(&shared, "other/1").await;
    put(&tenant, "other/1").await;

    expected.sort();
    assert_eq!(list_all(&shared, "page/", 10).await, (expected.clone(), 3));
    // The tenant's listing strips its prefix and sees only its own keys.
    assert_eq!(list_all(&tenant, "page/", 10).await, (expected.clone(), 3));
    let (all, _) = list_all(&tenant, "", 1000).await;
    assert_eq!(all.len(), 26);
    // Without a tenant, a tenant's keys are wire keys like any other.
    let (wire, _) = list_all(&shared, "t1\0", 7).await;
    assert_eq!(wire.len(), 26);
    assert!(wire.iter().all(|k| k.starts_with("t1\0")));

    // A search inside the tenant's own keys: `^` is the start of the key after the tenant.
    assert_eq!(
        tenant.remove_regex("^page/1[0-4]$", false).await.unwrap(),
        5
    );
    assert_eq!(tenant.remove_regex("/1", false).await.unwrap(), 6);
    assert_eq!(tenant.get(b"page/12").await.unwrap(), None);
    assert_eq!(
        tenant.get(b"page/20").await.unwrap().as_deref(),
        Some(&b"page/20"[..])
    );
    assert_eq!(list_all(&tenant, "", 1000).await.0.len(), 26 - 11);
    assert_eq!(
        list_all(&shared, "page/", 10).await.0,
        expected,
        "other tenants' keys stay"
    );

    // A malformed pattern removes nothing and says why.
    let e = shared.remove_regex("page/(", true).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument);
    assert!(e.to_string().contains("page/("), "{e}");
    // Without a tenant, the pattern sees whole wire keys (tenants' included).
    assert_eq!(shared.remove_regex("^page/", false).await.unwrap(), 25);
    assert_eq!(list_all(&shared, "", 1000).await.0.len(), 1 + 15);
}

#[tokio::test]
async fn a_node_stopped_with_sigterm_leaves_and_its_objects_are_misses_at_once() {
    // A node TTL far above the deadline below: only the Leave can explain a quick miss.
    let ttl = Duration::from_secs(60);
    let cfg = config_file("[master]\nnode-ttl = \"60s\"\n");
    let master = Proc::start(&[
        "master",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let m = master.addr("master");
    let _a = store(&m, "a");
    let mut b = store(&m, "b");
    let b_id = NodeId(u64::from_str_radix(&b.addr("node"), 16).unwrap());
    let c = client(&m);
    wait_until("both nodes registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 2
    })
    .await;
    let on_b = PutOptions {
        preferred_nodes: vec![b_id],
        ..PutOptions::default()
    };
    let on_both = PutOptions {
        replicas: 2,
        ..PutOptions::default()
    };
    for i in 0..10u64 {
        let v = value(i, 4096);
        c.put(format!("b/{i}").as_bytes(), &v, &on_b).await.unwrap();
        c.put(format!("both/{i}").as_bytes(), &v, &on_both)
            .await
            .unwrap();
    }
    let st = c.status().await.unwrap();
    let on_node_b = st.nodes.iter().find(|n| n.id == b_id).unwrap();
    assert_eq!(on_node_b.segments[0].objects, 20, "b holds both kinds");

    let stopped = Instant::now();
    assert!(
        b.terminate().success(),
        "a node stopped with SIGTERM exits cleanly"
    );
    wait_until(
        "the stopped node's sole replicas are misses",
        Duration::from_secs(5),
        || async {
            let mut gone = true;
            for i in 0..10u64 {
                // An error (a replica on the stopped node still handed out) is "not yet".
                gone &= matches!(c.get(format!("b/{i}").as_bytes()).await, Ok(None));
            }
            gone
        },
    )
    .await;
    let took = stopped.elapsed();
    assert!(
        took < ttl / 4,
        "misses after {took:?}, not well before the {ttl:?} TTL"
    );
    let st = c.status().await.unwrap();
    assert!(
        st.nodes.iter().all(|n| n.id != b_id),
        "the master forgot the node: {:?}",
        st.nodes
    );
    // Objects with a copy on the node left are served from it.
    for i in 0..10u64 {
        let got = c.get(format!("both/{i}").as_bytes()).await.unwrap();
        assert_eq!(got.as_deref(), Some(&value(i, 4096)[..]), "both/{i}");
    }
}

/// A client on the master's host reaches it through the master's Unix socket (`Local`,
/// docs/transports.md "The master's Unix socket"): every request of a put and a get goes
/// there. A TCP-only client, and every client of a master with `unix-socket = false`, use
/// TCP. A master's socket file is removed when it exits (SIGTERM) and, left behind by a
/// killed one, by the next master that starts.
#[tokio::test]
async fn a_same_host_client_reaches_the_master_through_its_unix_socket() {
    let sockets = kvpool_transport::shm::default_socket_dir();
    let file = |p: &Proc, m: &str| {
        let port = m.rsplit(':').next().unwrap();
        sockets.join(format!("kvpool-master-{}-{port}.sock", p.pid()))
    };
    let mut killed = None;
    for unix_socket in [true, false] {
        let cfg = config_file(&format!("[master]\nunix-socket = {unix_socket}\n"));
        let mut pool = up("64MiB", &["--config", cfg.to_str().unwrap()]);
        let m = pool.addr("master");
        assert_eq!(file(&pool, &m).exists(), unix_socket);
        let auto = client(&m);
        let tcp = kvpool_tests::client_over(&m, kvpool_client::TransportMode::Tcp);
        let auto_via = if unix_socket { "unix" } else { "tcp" };
        for (key, c, via) in [("auto", &auto, auto_via), ("tcp", &tcp, "tcp")] {
            assert_eq!(c.master_transport().await, None, "nothing dialed yet");
            put(c, key).await;
            assert_eq!(
                c.get(key.as_bytes()).await.unwrap().as_deref(),
                Some(key.as_bytes())
            );
            assert_eq!(c.master_transport().await, Some(via), "{key}");
        }
        if unix_socket {
            pool.signal(libc::SIGTERM);
            let path = file(&pool, &m);
            wait_until("the socket file removed", Duration::from_secs(10), || {
                let gone = !path.exists();
                async move { gone }
            })
            .await;
        } else {
            // A killed master's file (made up: this one has none) is cleared by the next.
            let stale = sockets.join("kvpool-master-4194399-1.sock");
            std::fs::write(&stale, b"").unwrap();
            pool.kill();
            killed = Some(stale);
        }
    }
    let stale = killed.unwrap();
    let _pool = up("64MiB", &[]);
    assert!(
        !stale.exists(),
        "a dead master's socket file was left behind"
    );
}
