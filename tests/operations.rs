//! Operating the pool from outside: the HTTP endpoint of a live master and storage node
//! (`/health`, `/ready` false then true, `/metrics` counters moving as puts, gets, misses
//! and evictions happen).

use std::time::Duration;

use kvpool_client::TransportMode;
use kvpool_proto::PutOptions;
use kvpool_tests::{
    client, client_over, config_file,
    http::{get, scrape, value},
    value as bytes, wait_until, wait_until_blocking, Proc,
};

const LIMIT: Duration = Duration::from_secs(30);

fn ready(addr: &str) -> bool {
    get(addr, "/ready").0 == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_a_node_and_metrics_follow_the_traffic() {
    // A small DRAM and a low watermark, so a few puts make the master evict.
    let cfg = config_file(
        "[master]\nhigh-watermark = 0.5\neviction-ratio = 0.2\nnode-ttl = \"2s\"\nheartbeat-interval = \"200ms\"\n",
    );
    let cfg = cfg.to_str().unwrap();
    let master = Proc::start(&[
        "--config",
        cfg,
        "master",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let (m, mh) = (master.addr("master"), master.addr("http"));
    assert_eq!(get(&mh, "/health"), (200, "ok\n".to_string()));
    // Not ready while starting, then because no node is registered.
    wait_until_blocking("the master's reason to be not ready", LIMIT, || {
        let (code, body) = get(&mh, "/ready");
        assert_eq!(code, 503, "a master without nodes is not ready: {body}");
        body.contains("no storage node")
    });

    let store = Proc::start(&[
        "store",
        "--master",
        &m,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        "16MiB",
        "--name",
        "ops-node",
        "--http",
        "127.0.0.1:0",
    ]);
    let sh = store.addr("http");
    wait_until_blocking("the node's /ready", LIMIT, || ready(&sh));
    wait_until_blocking("the master's /ready", LIMIT, || ready(&mh));
    let before = scrape(&mh);
    assert_eq!(value(&before, "kvpool_master_nodes{state=\"alive\"}"), 1.0);
    assert_eq!(
        value(&before, "kvpool_master_capacity_bytes{tier=\"dram\"}"),
        (16 << 20) as f64
    );
    assert_eq!(value(&before, "kvpool_master_leader"), 1.0);

    // Over TCP: a same-host client would move the bytes through shared memory (below).
    let c = client_over(&m, TransportMode::Tcp);
    let v = bytes(7, 1 << 20);
    c.put(b"present", &v, &PutOptions::default()).await.unwrap();
    assert_eq!(c.get(b"present").await.unwrap().as_deref(), Some(&v[..]));
    assert_eq!(c.get(b"absent").await.unwrap(), None);

    let after = scrape(&mh);
    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(moved("kvpool_master_lookup_hits_total"), 1.0);
    assert_eq!(moved("kvpool_master_lookup_misses_total"), 1.0);
    assert!(moved("kvpool_master_requests_total{op=\"PutStart\"}") >= 1.0);
    assert!(moved("kvpool_master_requests_total{op=\"PutEnd\"}") >= 1.0);
    assert!(moved("kvpool_master_request_duration_seconds_count{op=\"GetReplicas\"}") >= 2.0);
    assert_eq!(value(&after, "kvpool_master_objects"), 1.0);
    assert_eq!(
        value(&after, "kvpool_master_leased_objects"),
        1.0,
        "the get's lease"
    );
    assert_eq!(
        value(&after, "kvpool_master_pinned_objects{kind=\"hard\"}"),
        0.0
    );
    assert_eq!(
        value(&after, "kvpool_master_used_bytes{tier=\"dram\"}"),
        (1 << 20) as f64
    );

    let node = scrape(&sh);
    assert_eq!(value(&node, "kvpool_store_registered"), 1.0);
    assert_eq!(
        value(
            &node,
            "kvpool_store_transfer_bytes_total{direction=\"in\",transport=\"tcp\"}"
        ),
        (1 << 20) as f64
    );
    assert_eq!(
        value(
            &node,
            "kvpool_store_transfer_bytes_total{direction=\"out\",transport=\"tcp\"}"
        ),
        (1 << 20) as f64
    );
    assert!(value(&node, "kvpool_store_requests_total{op=\"Write\"}") >= 1.0);
    assert_eq!(value(&node, "kvpool_store_objects"), 1.0);
    // Published for same-host clients, as every replica is while the board has room.
    assert_eq!(value(&node, "kvpool_store_board_published"), 1.0);

    // Through shared memory the node sees the commit, and counts the bytes under "shm".
    let shared = client_over(&m, TransportMode::Shm);
    shared
        .put(b"shared", &bytes(8, 1 << 20), &PutOptions::default())
        .await
        .unwrap();
    let node = scrape(&sh);
    assert_eq!(
        value(
            &node,
            "kvpool_store_transfer_bytes_total{direction=\"in\",transport=\"shm\"}"
        ),
        (1 << 20) as f64
    );

    // Past the watermark (8 of 16 MiB) the master evicts; the counter says so.
    for i in 0..12u64 {
        let key = format!("fill-{i}");
        c.put(key.as_bytes(), &bytes(i, 1 << 20), &PutOptions::default())
            .await
            .unwrap();
    }
    wait_until("evictions counted", LIMIT, || async {
        value(&scrape(&mh), "kvpool_master_evictions_total") > 0.0
    })
    .await;

    // A node that leaves takes the master's readiness with it.
    drop(store);
    wait_until_blocking("the master's /ready to fail", LIMIT, || !ready(&mh));
}

#[test]
fn kvpool_up_serves_both_parts_on_one_address() {
    let pool = kvpool_tests::up("32MiB", &["--http", "127.0.0.1:0"]);
    let h = pool.addr("http");
    assert!(
        ready(&h),
        "`kvpool up` prints ready only once its node is registered"
    );
    let m = scrape(&h);
    assert_eq!(value(&m, "kvpool_master_nodes{state=\"alive\"}"), 1.0);
    assert_eq!(value(&m, "kvpool_store_registered"), 1.0);
}

#[test]
fn an_http_address_that_cannot_be_bound_stops_the_server() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = kvpool_tests::run_kvpool(
        &["master", "--listen", "127.0.0.1:0", "--http", &addr],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = kvpool_tests::stderr(&o);
    assert!(err.contains("binding the HTTP endpoint"), "{err}");
}

/// The metric's documented name: histograms' series carry a suffix the docs leave out.
fn base_name(series_name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| series_name.strip_suffix(s))
        .unwrap_or(series_name)
}

#[test]
fn every_exported_metric_is_documented() {
    let pool = kvpool_tests::up("32MiB", &["--http", "127.0.0.1:0"]);
    let mut names = kvpool_tests::http::names(&pool.addr("http"));
    assert!(names.len() > 20, "too few metrics: {names:?}");
    // The proxy's too (its engines need not answer for its families to be declared).
    let proxy = Proc::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--decode",
        "http://127.0.0.1:1",
    ]);
    let proxied = kvpool_tests::http::names(&proxy.addr("http"));
    assert!(
        proxied.iter().any(|n| n.starts_with("kvpool_proxy_")),
        "{proxied:?}"
    );
    names.extend(proxied);
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let missing: Vec<_> = names
        .iter()
        .map(|n| base_name(n))
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
}

/// `kvpool top` in a pseudo-terminal: the screen (as a terminal would show it) after two
/// refreshes has the pool's figures, and `q` ends it with status 0 and the terminal given
/// back (alternate screen left, cursor shown).
#[test]
fn top_refreshes_and_quits_cleanly_on_q() {
    use std::{
        io::{Read, Write},
        sync::mpsc,
    };

    use portable_pty::{native_pty_system, CommandBuilder, PtySize};

    let pool = kvpool_tests::up("32MiB", &["--http", "127.0.0.1:0"]);
    let (m, h) = (pool.addr("master"), pool.addr("http"));
    let (rows, cols) = (24, 100);
    let pair = native_pty_system()
        .openpty(PtySize {
            rows,
            cols,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("a pseudo-terminal");
    let mut cmd = CommandBuilder::new(kvpool_tests::kvpool_bin());
    cmd.args(["top", "--master", &m, "--metrics", &h]);
    cmd.env("TERM", "xterm-256color");
    let mut child = pair.slave.spawn_command(cmd).expect("spawn kvpool top");
    drop(pair.slave);
    let mut reader = pair.master.try_clone_reader().unwrap();
    let mut writer = pair.master.take_writer().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = vt100::Parser::new(rows, cols, 0);
    let mut all = Vec::new();
    let pump = |screen: &mut vt100::Parser, all: &mut Vec<u8>| {
        while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(20)) {
            screen.process(&bytes);
            all.extend_from_slice(&bytes);
        }
    };
    let shows = |screen: &vt100::Parser, what: &str| screen.screen().contents().contains(what);

    wait_until_blocking("the first refresh", LIMIT, || {
        pump(&mut screen, &mut all);
        shows(&screen, "refresh 1")
    });
    // Traffic between the refreshes, for the second one to count.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client(&m);
        c.put(b"top-key", &bytes(1, 4096), &PutOptions::default())
            .await
            .unwrap();
        assert!(c.get(b"top-key").await.unwrap().is_some());
        assert!(c.get(b"top-miss").await.unwrap().is_none());
    });
    wait_until_blocking("the second refresh with the put counted", LIMIT, || {
        pump(&mut screen, &mut all);
        shows(&screen, "refresh 2") && shows(&screen, "objects 1")
    });
    let text = screen.screen().contents();
    for want in [
        "throughput",
        "hit ratio",
        "dram",
        "of 32MiB",
        "nodes 1 (1 alive)",
        " up ",
    ] {
        assert!(text.contains(want), "{want:?} not on the screen:\n{text}");
    }
    println!("--- kvpool top ---\n{text}\n---");

    writer.write_all(b"q").unwrap();
    writer.flush().unwrap();
    let mut status = None;
    wait_until_blocking("top to exit on q", LIMIT, || {
        pump(&mut screen, &mut all);
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(
        status.as_ref().unwrap().success(),
        "top exited with {status:?}"
    );
    pump(&mut screen, &mut all);
    let out = String::from_utf8_lossy(&all);
    let left = out
        .rfind("\x1b[?1049l")
        .expect("the alternate screen was left");
    assert!(
        out.rfind("\x1b[?1049h").unwrap() < left,
        "left, then entered again"
    );
    assert!(out.contains("\x1b[?25h"), "the cursor was shown again");
    assert!(
        !screen.screen().alternate_screen(),
        "still on the alternate screen"
    );
}

#[test]
fn top_refuses_without_a_terminal() {
    let o = kvpool_tests::run_kvpool(&["top", "--master", "127.0.0.1:1"], &[], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(kvpool_tests::stderr(&o).contains("top needs a terminal"));
}

/// A master that logs a few lines and stops at once (etcd given, but a wildcard address and
/// nothing to advertise): its standard error, as a log file would get it.
fn short_master_log(extra: &[&str]) -> String {
    let mut args = extra.to_vec();
    args.extend([
        "master",
        "--listen",
        "0.0.0.0:0",
        "--etcd",
        "http://127.0.0.1:1",
        "--http",
        "",
    ]);
    let o = kvpool_tests::run_kvpool(&args, &[], None);
    kvpool_tests::stderr(&o)
}

#[test]
fn logs_are_plain_text_off_a_terminal_and_json_on_request() {
    let text = short_master_log(&[]);
    assert!(text.contains("master listening"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "escape codes in a log file: {text:?}"
    );

    let json = short_master_log(&["--log-format", "json"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "master listening"),
        "{json}"
    );
    assert!(!json.contains('\x1b'));
}

/// The master's log at the default level, through the real binary: one `node joined` and one
/// `node left` line for a node that registers, serves puts and gets, and stops; nothing
/// between them for the requests it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_logs_events_not_requests() {
    let dir = std::env::temp_dir().join(format!(
        "kvpool-ops-log-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("master.log");
    let master = Proc::start_logged(
        &["master", "--listen", "127.0.0.1:0", "--http", ""],
        // The default level of `kvpool master`, set so that a KVPOOL_LOG in the environment
        // running the tests cannot change what is checked.
        &[("KVPOOL_LOG", "info")],
        &log,
    );
    let m = master.addr("master");
    let mut node = Proc::start(&[
        "store",
        "--master",
        &m,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        "16MiB",
        "--name",
        "log-node",
        "--http",
        "",
    ]);
    let c = client(&m);
    wait_until("the node registered", LIMIT, || {
        let c = &c;
        async move { kvpool_tests::alive_nodes(c).await == 1 }
    })
    .await;
    let opts = PutOptions::default();
    for i in 0..20u64 {
        let key = format!("log-{i}");
        c.put(key.as_bytes(), &bytes(i, 4096), &opts).await.unwrap();
        assert_eq!(c.get(key.as_bytes()).await.unwrap(), Some(bytes(i, 4096)));
        assert_eq!(c.get(format!("absent-{i}").as_bytes()).await.unwrap(), None);
    }
    let st = node.terminate();
    assert!(st.success(), "the node stops cleanly: {st:?}");
    let mut text = String::new();
    wait_until_blocking("the master logs the node's leaving", LIMIT, || {
        text = std::fs::read_to_string(&log).unwrap();
        text.contains("node left")
    });
    let lines: Vec<&str> = text.lines().collect();
    let at = |what: &str| -> Vec<usize> {
        (0..lines.len())
            .filter(|&i| lines[i].contains(what))
            .collect()
    };
    let (joined, left) = (at("node joined"), at("node left"));
    assert_eq!((joined.len(), left.len()), (1, 1), "{text}");
    let node_field = |l: &str| {
        l.split_whitespace()
            .find(|w| w.starts_with("node="))
            .map(str::to_owned)
    };
    let id = node_field(lines[joined[0]]).expect("a node= field");
    assert_eq!(node_field(lines[left[0]]), Some(id), "{text}");
    // Twenty puts, forty gets, and not one line for them.
    let between = &lines[joined[0] + 1..left[0]];
    assert!(
        between.is_empty(),
        "per-request lines at the default level: {between:#?}"
    );
    assert!(!text.contains("log-1"), "a key in the log: {text}");
}

/// A pool that evicts hundreds of replicas in a few seconds says so in one `eviction burst`
/// line (at most one per 10 s), not one line per put that made room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_burst_is_one_line() {
    let dir = std::env::temp_dir().join(format!(
        "kvpool-ops-burst-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("master.log");
    let cfg = config_file("[master]\nhigh-watermark = 0.5\neviction-ratio = 0.2\n");
    let master = Proc::start_logged(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "master",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        &[("KVPOOL_LOG", "info")],
        &log,
    );
    let (m, mh) = (master.addr("master"), master.addr("http"));
    let _node = Proc::start(&[
        "store",
        "--master",
        &m,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        "16MiB",
        "--http",
        "",
    ]);
    let c = client(&m);
    wait_until("the node registered", LIMIT, || {
        let c = &c;
        async move { kvpool_tests::alive_nodes(c).await == 1 }
    })
    .await;
    let started = std::time::Instant::now();
    // 300 × 64 KiB = 18.75 MiB into 16 MiB: well over a hundred evictions.
    for i in 0..300u64 {
        c.put(
            format!("burst-{i}").as_bytes(),
            &bytes(i, 64 << 10),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let evicted = value(&scrape(&mh), "kvpool_master_evictions_total");
    assert!(evicted >= 64.0, "only {evicted} evictions");
    let mut text = String::new();
    wait_until_blocking("the burst line", LIMIT, || {
        text = std::fs::read_to_string(&log).unwrap();
        text.contains("eviction burst")
    });
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("eviction burst"))
        .collect();
    // One line per 10 s at most, however many puts evicted.
    let most = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        lines.len() <= most,
        "{} burst lines in {:?}: {text}",
        lines.len(),
        started.elapsed()
    );
    assert!(
        lines[0].contains("objects=") && lines[0].contains("bytes="),
        "{}",
        lines[0]
    );
}

/// file < environment < flag, shown on the HTTP address: the file's is unbindable, the
/// environment's works, and a flag beats an unbindable environment one.
#[test]
fn config_keys_come_from_file_then_environment_then_flags() {
    let cfg = config_file("[master]\nhttp = \"192.0.2.1:9\"\n");
    let cfg = cfg.to_str().unwrap();
    let base = ["--config", cfg, "master", "--listen", "127.0.0.1:0"];

    let o = kvpool_tests::run_kvpool(&base, &[], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(kvpool_tests::stderr(&o).contains("binding the HTTP endpoint to 192.0.2.1:9"));

    let m = Proc::start_with_env(&base, &[("KVPOOL_MASTER_HTTP", "127.0.0.1:0")]);
    assert_eq!(get(&m.addr("http"), "/health").0, 200);

    let mut args = base.to_vec();
    args.extend(["--http", "127.0.0.1:0"]);
    let m = Proc::start_with_env(&args, &[("KVPOOL_MASTER_HTTP", "192.0.2.1:9")]);
    assert_eq!(get(&m.addr("http"), "/health").0, 200);

    let o = kvpool_tests::run_kvpool(&base, &[("KVPOOL_MASTER_LEASE_TTL", "soon")], None);
    assert_eq!(o.status.code(), Some(2));
    let err = kvpool_tests::stderr(&o);
    assert!(
        err.contains("KVPOOL_MASTER_LEASE_TTL (config key master.lease-ttl, from the environment)"),
        "{err}"
    );
}

/// Demotions to NVMe and promotions back show up on both sides: the master counts the copy
/// tasks it issues and evictions, the node the copies it made, by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demotions_and_promotions_are_counted() {
    let dir = kvpool_tests::disk_dir("ops-tier");
    let nvme = dir.join("nvme.dat");
    let cfg = config_file(
        "[master]\nheartbeat-interval = \"100ms\"\nhigh-watermark = 0.5\neviction-ratio = 0.2\n\
         nvme-admission = \"always\"\npromote-after-hits = 1\n\n[store.nvme]\nengine = \"psync\"\n",
    );
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(kvpool_tests::up_args("16MiB"));
    args.extend([
        "--nvme",
        nvme.to_str().unwrap(),
        "--nvme-size",
        "64MiB",
        "--http",
        "127.0.0.1:0",
    ]);
    let pool = Proc::start(&args);
    let (m, h) = (pool.addr("master"), pool.addr("http"));
    let c = client(&m);
    for i in 0..12u64 {
        let key = format!("cold-{i}");
        c.put(key.as_bytes(), &bytes(i, 1 << 20), &PutOptions::default())
            .await
            .unwrap();
    }
    let demoted = "kvpool_store_copy_tasks_total{kind=\"demotion\",outcome=\"done\"}";
    wait_until("a demotion counted", LIMIT, || async {
        value(&scrape(&h), demoted) > 0.0
    })
    .await;
    let s = scrape(&h);
    assert!(value(&s, "kvpool_master_evictions_total") > 0.0);
    assert!(value(&s, "kvpool_master_copy_tasks_issued_total") >= value(&s, demoted));
    assert!(value(&s, "kvpool_master_capacity_bytes{tier=\"nvme\"}") > 0.0);
    assert_eq!(value(&s, "kvpool_store_nvme_healthy"), 1.0);

    // An object only on NVMe, read once, is promoted back to DRAM (promote-after-hits 1).
    let cold = wait_for_nvme_only(&c).await;
    assert!(c.get(cold.as_bytes()).await.unwrap().is_some());
    wait_until("a promotion counted", LIMIT, || async {
        value(
            &scrape(&h),
            "kvpool_store_copy_tasks_total{kind=\"promotion\",outcome=\"done\"}",
        ) > 0.0
    })
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A key whose only replica is on NVMe (polled with a deadline).
async fn wait_for_nvme_only(c: &kvpool_client::Client) -> String {
    let keys: Vec<String> = (0..12).map(|i| format!("cold-{i}")).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        for (k, r) in keys.iter().zip(c.locate(&refs).await) {
            if let Ok(Some(info)) = r {
                if info
                    .replicas
                    .iter()
                    .all(|r| r.tier == kvpool_proto::Tier::Nvme)
                {
                    return k.clone();
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no object only on NVMe within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
