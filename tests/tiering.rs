//! The NVMe tier end to end: real processes, real files with O_DIRECT on the work disk.
//! Objects demoted from DRAM come back byte for byte, the pool holds ten times its DRAM, a
//! node killed with SIGKILL serves its NVMe objects again after a restart, and a corrupted
//! record is a miss, never wrong bytes. Both I/O engines run the same tests.

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use kvpool_client::{Client, ClientConfig};
use kvpool_proto::{PutOptions, Tier};
use kvpool_tests::{alive_nodes, client, config_file, disk_dir, tier_use, value, wait_until, Proc};

/// Demotion starts at half of DRAM so that a steady writer keeps finding room.
fn config(engine: &str) -> std::path::PathBuf {
    config_file(&format!(
        "[master]\nheartbeat-interval = \"100ms\"\nnode-ttl = \"3s\"\nhigh-watermark = 0.5\n\
         eviction-ratio = 0.1\nnvme-admission = \"always\"\n\n[store.nvme]\nengine = \"{engine}\"\n"
    ))
}

/// Waits until DRAM is below 70 % full, so the next put finds room without dropping anything.
async fn wait_for_room(c: &Client) {
    wait_until("demotion to free DRAM", Duration::from_secs(60), || async {
        let (cap, used) = tier_use(c, Tier::Dram).await;
        cap > 0 && used * 10 <= cap * 7
    })
    .await;
}

/// `kvpool up` on free ports (its HTTP endpoint too) with `dram` of DRAM and an NVMe tier of
/// `size` at `nvme`.
fn tiered_pool(cfg: &Path, dram: &str, nvme: &Path, size: &str) -> Proc {
    let (cfg, nvme) = (cfg.to_str().unwrap(), nvme.to_str().unwrap());
    let mut args = vec!["--config", cfg];
    args.extend(kvpool_tests::up_args(dram));
    args.extend(["--nvme", nvme, "--nvme-size", size, "--http", "127.0.0.1:0"]);
    Proc::start(&args)
}

/// Waits until the node `id` (its ready line's `node=`) is registered and alive.
async fn wait_for_node(c: &Client, id: &str) {
    wait_until(
        "restarted node registered",
        Duration::from_secs(20),
        || async {
            c.status()
                .await
                .map(|st| st.nodes.iter().any(|n| n.alive && n.id.to_string() == id))
                .unwrap_or(false)
        },
    )
    .await;
}

async fn tiers_of(c: &Client, key: &str) -> Vec<Tier> {
    match c.locate(&[key.as_bytes()]).await.pop() {
        Some(Ok(Some(info))) => info.replicas.iter().map(|r| r.tier).collect(),
        _ => Vec::new(),
    }
}

async fn ten_times_dram_round_trips(engine: &str) {
    let dir = disk_dir("tier");
    let nvme = dir.join("nvme.dat");
    let cfg = config(engine);
    let pool = tiered_pool(&cfg, "32MiB", &nvme, "512MiB");
    let c = client(&pool.addr("master"));
    let len = 256 << 10;
    let n = 1280u64; // 320 MiB: ten times the DRAM
    for i in 0..n {
        if i.is_multiple_of(8) {
            wait_for_room(&c).await;
        }
        c.put(
            format!("t/{i}").as_bytes(),
            &value(i, len),
            &PutOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("put t/{i}: {e}"));
    }
    let (_, nvme_used) = tier_use(&c, Tier::Nvme).await;
    assert!(
        nvme_used >= 250 << 20,
        "only {nvme_used} bytes reached NVMe"
    );
    let keys: Vec<String> = (0..n).map(|i| format!("t/{i}")).collect();
    for chunk in keys.chunks(64) {
        let refs: Vec<&[u8]> = chunk.iter().map(|k| k.as_bytes()).collect();
        for (k, r) in chunk.iter().zip(c.get_batch(&refs).await) {
            let i: u64 = k[2..].parse().unwrap();
            let v = r
                .unwrap_or_else(|e| panic!("get {k}: {e}"))
                .unwrap_or_else(|| panic!("{k} lost"));
            assert!(v == value(i, len), "{k}: wrong bytes");
        }
    }
    // Repeated hits on an NVMe-only object bring it back to DRAM.
    let cold = "t/0";
    assert_eq!(tiers_of(&c, cold).await, vec![Tier::Nvme]);
    c.get(cold.as_bytes()).await.unwrap();
    wait_until(
        "promotion back to DRAM",
        Duration::from_secs(20),
        || async { tiers_of(&c, cold).await.contains(&Tier::Dram) },
    )
    .await;
    assert_eq!(
        c.get(cold.as_bytes()).await.unwrap().as_deref(),
        Some(&value(0, len)[..])
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_holds_ten_times_its_dram_io_uring() {
    ten_times_dram_round_trips("uring").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_holds_ten_times_its_dram_psync() {
    ten_times_dram_round_trips("psync").await;
}

fn store(cfg: &std::path::Path, master: &str, nvme: &std::path::Path) -> Proc {
    Proc::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "store",
        "--master",
        master,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        "16MiB",
        "--nvme",
        nvme.to_str().unwrap(),
        "--nvme-size",
        "256MiB",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_during_writes_serves_its_nvme_objects_after_restart() {
    let dir = disk_dir("kill");
    let nvme = dir.join("nvme.dat");
    let cfg = config("uring");
    let m = Proc::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "master",
        "--listen",
        "127.0.0.1:0",
    ]);
    let master = m.addr("master");
    let mut s = store(&cfg, &master, &nvme);
    let c = client(&master);
    wait_until("node registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 1
    })
    .await;

    let len = 100_000;
    let mut next = 0u64;
    // Write until a good share has reached NVMe.
    let mut on_nvme: HashSet<u64> = HashSet::new();
    while on_nvme.len() < 100 {
        if next.is_multiple_of(8) {
            wait_for_room(&c).await;
        }
        c.put(
            format!("k/{next}").as_bytes(),
            &value(next, len),
            &PutOptions::default(),
        )
        .await
        .unwrap();
        next += 1;
        if next.is_multiple_of(32) {
            for i in 0..next {
                if !on_nvme.contains(&i)
                    && tiers_of(&c, &format!("k/{i}")).await.contains(&Tier::Nvme)
                {
                    on_nvme.insert(i);
                }
            }
        }
    }
    // Kill the node in the middle of more writes (puts run concurrently with the kill).
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (master, done) = (master.clone(), done.clone());
        tokio::spawn(async move {
            let c = client(&master);
            for i in 10_000..10_200u64 {
                let _ = c
                    .put(
                        format!("k/{i}").as_bytes(),
                        &value(i, len),
                        &PutOptions::default(),
                    )
                    .await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until("the writer under way", Duration::from_secs(20), || {
        let n = done.load(Ordering::Relaxed);
        async move { n >= 5 }
    })
    .await;
    s.kill();
    writer.await.unwrap();

    let s2 = store(&cfg, &master, &nvme);
    let new_node = s2.addr("node");
    wait_for_node(&c, &new_node).await;
    for &i in &on_nvme {
        let got = c.get(format!("k/{i}").as_bytes()).await;
        let got = got.unwrap_or_else(|e| panic!("k/{i}: {e}"));
        assert!(
            got.as_deref() == Some(&value(i, len)[..]),
            "k/{i} (on NVMe before the kill) not served again"
        );
    }
    // Nothing ever comes back wrong, whatever survived.
    for i in (0..next).chain(10_000..10_200) {
        if let Ok(Some(v)) = c.get(format!("k/{i}").as_bytes()).await {
            assert!(v == value(i, len), "k/{i}: wrong bytes after the restart");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_record_is_a_miss_and_the_master_forgets_it() {
    let dir = disk_dir("corrupt");
    let nvme = dir.join("nvme.dat");
    let cfg = config("psync");
    let pool = tiered_pool(&cfg, "16MiB", &nvme, "128MiB");
    let c = client(&pool.addr("master"));
    let len = 1 << 20;
    for i in 0..40u64 {
        if i.is_multiple_of(4) {
            wait_for_room(&c).await;
        }
        c.put(
            format!("c/{i}").as_bytes(),
            &value(i, len),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }
    wait_until("c/0..c/2 only on NVMe", Duration::from_secs(30), || async {
        for k in ["c/0", "c/1", "c/2"] {
            if tiers_of(&c, k).await != vec![Tier::Nvme] {
                return false;
            }
        }
        true
    })
    .await;
    let info = c.locate(&[b"c/0"]).await.pop().unwrap().unwrap().unwrap();
    let offset = info.replicas[0].offset;
    // Flip bytes in the middle of the value, on disk.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&nvme)
            .unwrap();
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, offset + 1000).unwrap();
        for x in &mut b {
            *x ^= 0x5a;
        }
        f.write_all_at(&b, offset + 1000).unwrap();
        f.sync_all().unwrap();
    }
    // One request of three NVMe reads, the corrupt one in the middle: the node streams the
    // answer, so the corruption is found after the head went out; that op alone is a miss and
    // its neighbours' bytes are whole.
    let batch = c.get_batch(&[b"c/1", b"c/0", b"c/2"]).await;
    assert_eq!(batch.len(), 3);
    assert_eq!(
        batch[0].as_ref().unwrap().as_deref(),
        Some(&value(1, len)[..])
    );
    assert!(
        batch[1].as_ref().unwrap().is_none(),
        "a corrupt record must read as a miss, in a batch too"
    );
    assert_eq!(
        batch[2].as_ref().unwrap().as_deref(),
        Some(&value(2, len)[..])
    );
    assert!(
        c.get(b"c/0").await.unwrap().is_none(),
        "a corrupt record must read as a miss"
    );
    // The node reports the dropped record in its next heartbeat and the master forgets it:
    // lookups stop counting c/0 as a hit (before, it stayed a "hit" that every load missed).
    wait_until(
        "the master forgot the corrupt replica",
        Duration::from_secs(10),
        || async { matches!(c.exists(&[b"c/0"], false).await[..], [Ok(false)]) },
    )
    .await;
    assert!(c.locate(&[b"c/0"]).await.pop().unwrap().unwrap().is_none());
    assert!(c.get(b"c/0").await.unwrap().is_none());
    // Its neighbours are untouched.
    assert_eq!(
        c.get(b"c/1").await.unwrap().as_deref(),
        Some(&value(1, len)[..])
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A tier that does not fit its disk is refused at start with a message naming the cause,
/// instead of failing later in the middle of demotions. Needs root and a loop device (to make
/// a small filesystem); skipped with a message where either is missing.
#[test]
fn a_tier_larger_than_its_disk_is_refused_clearly() {
    use std::process::Command;
    let dir = disk_dir("full");
    let img = dir.join("fs.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))
        || !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))
    {
        kvpool_tests::skipped(
            "tiering a_tier_larger_than_its_disk_is_refused_clearly",
            "cannot make and mount a small filesystem here (needs root and a loop device)",
        );
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    let out = Command::new(kvpool_tests::kvpool_bin())
        .args([
            "store",
            "--master",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--dram",
            "8MiB",
        ])
        .arg("--nvme")
        .arg(mnt.join("nvme.dat"))
        .args(["--nvme-size", "256MiB"])
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NVMe") && err.contains("full"), "{err}");
}

/// Issue 13's new-user case with the default configuration (write-through): 80 puts of 8 MiB
/// from the CLI, one process each, into a node with 64 MiB of DRAM and a 2 GiB NVMe tier.
/// Writers faster than the disk are held back (`NoSpaceYet`, retried by the client) instead
/// of the pool dropping data, so all 80 are kept, byte for byte, and once written through
/// they survive a SIGKILL of the node and its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_puts_of_eight_mib_into_64_mib_of_dram_are_all_kept_across_a_node_kill() {
    let dir = disk_dir("wt80");
    let nvme = dir.join("nvme.dat");
    let m = Proc::start(&["master", "--listen", "127.0.0.1:0"]);
    let master = m.addr("master");
    let node = |nvme: &Path| {
        Proc::start(&[
            "store",
            "--master",
            &master,
            "--listen",
            "127.0.0.1:0",
            "--dram",
            "64MiB",
            "--nvme",
            nvme.to_str().unwrap(),
            "--nvme-size",
            "2GiB",
        ])
    };
    let mut s = node(&nvme);
    let c = client(&master);
    wait_until("node registered", Duration::from_secs(20), || async {
        alive_nodes(&c).await == 1
    })
    .await;
    let len = 8 << 20;
    let file = dir.join("value.bin");
    for i in 0..80u64 {
        std::fs::write(&file, value(i, len)).unwrap();
        let o = kvpool_tests::run_kvpool(
            &["put", &format!("big/{i}"), file.to_str().unwrap()],
            &[("KVPOOL_MASTER", &master)],
            None,
        );
        assert!(
            o.status.success(),
            "put big/{i}: {}",
            kvpool_tests::stderr(&o)
        );
    }
    let keys: Vec<String> = (0..80).map(|i| format!("big/{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let got = c.get(k.as_bytes()).await.unwrap();
        assert!(
            got.as_deref() == Some(&value(i as u64, len)[..]),
            "{k} lost or wrong"
        );
    }
    wait_until(
        "every object written through to NVMe",
        Duration::from_secs(60),
        || async {
            for k in &keys {
                if !tiers_of(&c, k).await.contains(&Tier::Nvme) {
                    return false;
                }
            }
            true
        },
    )
    .await;

    s.kill();
    let s2 = node(&nvme);
    let restarted = s2.addr("node");
    wait_for_node(&c, &restarted).await;
    for (i, k) in keys.iter().enumerate() {
        let got = c.get(k.as_bytes()).await;
        let got = got.unwrap_or_else(|e| panic!("{k} after the restart: {e}"));
        assert!(
            got.as_deref() == Some(&value(i as u64, len)[..]),
            "{k} not served again after the node's restart"
        );
    }
    drop(s2);
    let _ = std::fs::remove_dir_all(dir);
}

/// `direct_len(i)` bytes: 64 KiB + 1 (a value whose last block is mostly padding) for even
/// `i`, 1 MiB for odd.
fn direct_len(i: u64) -> usize {
    if i.is_multiple_of(2) {
        (64 << 10) + 1
    } else {
        1 << 20
    }
}

/// Puts `d/0..d/47` (`value(i, direct_len(i))`) into a pool of 16 MiB of DRAM, waiting for
/// demotion to make room, until `d/0..d/7` are on NVMe only; returns the count and those.
async fn fill_past_dram(c: &Client) -> (u64, Vec<u64>) {
    let n = 48u64;
    for i in 0..n {
        if i.is_multiple_of(4) {
            wait_for_room(c).await;
        }
        let v = value(i, direct_len(i));
        c.put(format!("d/{i}").as_bytes(), &v, &PutOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put d/{i}: {e}"));
    }
    let on_nvme: Vec<u64> = (0..8).collect();
    wait_until("d/0..d/7 only on NVMe", Duration::from_secs(30), || async {
        for i in &on_nvme {
            if tiers_of(c, &format!("d/{i}")).await != vec![Tier::Nvme] {
                return false;
            }
        }
        true
    })
    .await;
    (n, on_nvme)
}

/// Object bytes the node has sent over its sockets (`kvpool up`'s metrics at `http`).
fn node_bytes_out(http: &str) -> f64 {
    kvpool_tests::http::value(
        &kvpool_tests::http::scrape(http),
        "kvpool_store_transfer_bytes_total{direction=\"out\",transport=\"tcp\"}",
    )
}

/// A same-host client reads NVMe-resident values straight off the node's tier file
/// (`ShmNvme`, docs/transports.md "NVMe reads off the node's file"): the node sends none of
/// their bytes, and they are whole, alone, in batches and next to DRAM-resident ones. A
/// record damaged on disk is not taken from the file: the client goes to the node, which
/// finds the damage and answers a miss. With `store.share-nvme = false` the same gets go
/// through the node. (Promotion is out of reach: every get here is of an NVMe replica.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_clients_read_nvme_records_off_the_file_and_check_them() {
    for share in [true, false] {
        let dir = disk_dir("direct");
        let nvme = dir.join("nvme.dat");
        let cfg = config_file(&format!(
            "[master]\nheartbeat-interval = \"100ms\"\nhigh-watermark = 0.5\n\
             eviction-ratio = 0.1\nnvme-admission = \"always\"\npromote-after-hits = 1000000\n\n\
             [store]\nshare-nvme = {share}\n"
        ));
        let pool = tiered_pool(&cfg, "16MiB", &nvme, "256MiB");
        let c = client(&pool.addr("master"));
        let http = pool.addr("http");
        let (n, on_nvme) = fill_past_dram(&c).await;
        let in_dram = n - 1;
        assert!(tiers_of(&c, &format!("d/{in_dram}"))
            .await
            .contains(&Tier::Dram));

        let before = node_bytes_out(&http);
        let mut keys: Vec<String> = on_nvme.iter().map(|i| format!("d/{i}")).collect();
        keys.push(format!("d/{in_dram}"));
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        for (k, r) in keys.iter().zip(c.get_batch(&refs).await) {
            let i: u64 = k[2..].parse().unwrap();
            let got = r.unwrap_or_else(|e| panic!("get {k}: {e}"));
            assert!(
                got.as_deref() == Some(&value(i, direct_len(i))[..]),
                "{k} in a batch"
            );
        }
        for i in &on_nvme {
            let got = c.get(format!("d/{i}").as_bytes()).await.unwrap();
            assert!(
                got.as_deref() == Some(&value(*i, direct_len(*i))[..]),
                "d/{i} alone"
            );
        }
        let sent = node_bytes_out(&http) - before;
        let nvme_bytes: u64 = on_nvme.iter().map(|&i| 2 * direct_len(i) as u64).sum();
        if share {
            assert_eq!(
                sent, 0.0,
                "the node sent NVMe-resident bytes to a same-host client"
            );
        } else {
            assert!(
                sent >= nvme_bytes as f64,
                "without sharing, the node sends them ({sent} of {nvme_bytes} bytes)"
            );
        }

        // Damage d/0's value on disk: never returned, from the file or from the node.
        let info = c.locate(&[b"d/0"]).await.pop().unwrap().unwrap().unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&nvme)
                .unwrap();
            let at = info.replicas[0].offset + 777;
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, at).unwrap();
            for x in &mut b {
                *x ^= 0xa5;
            }
            f.write_all_at(&b, at).unwrap();
            f.sync_all().unwrap();
        }
        let batch = c.get_batch(&[b"d/1", b"d/0", b"d/2"]).await;
        assert!(
            batch[1].as_ref().unwrap().is_none(),
            "a damaged record must be a miss"
        );
        for (r, i) in [(&batch[0], 1u64), (&batch[2], 2)] {
            assert!(r.as_ref().unwrap().as_deref() == Some(&value(i, direct_len(i))[..]));
        }
        drop(pool);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// With promotion off (`master.promote-after-hits = 0`) the master marks its lookups
/// `FLAG_NO_PROMOTION`, and a same-host client with the location cache keeps the NVMe
/// locations it can check (docs/semantics.md, "Hot reads"): a hot get of an NVMe-resident
/// value is a read of the node's file and nothing else, shown with the pool stopped
/// (SIGSTOP). A cached record that no longer holds its replica (overwritten in place by
/// another record) is never returned: the get asks the master again, and the node finds the
/// record damaged (a miss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_promotion_off_hot_nvme_gets_read_the_file_and_ask_nobody() {
    let dir = disk_dir("hot-nvme");
    let nvme = dir.join("nvme.dat");
    let cfg = config_file(
        "[master]\nheartbeat-interval = \"100ms\"\nhigh-watermark = 0.5\n\
         eviction-ratio = 0.1\nnvme-admission = \"always\"\npromote-after-hits = 0\n",
    );
    let pool = tiered_pool(&cfg, "16MiB", &nvme, "256MiB");
    let m = pool.addr("master");
    let c = client(&m);
    let hot = {
        let mut cfg = ClientConfig::with_master(&m);
        cfg.deadline = Duration::from_secs(10);
        cfg.location_cache.enabled = true;
        Client::new(cfg)
    };
    let http = pool.addr("http");
    let lookups = || {
        kvpool_tests::http::value(
            &kvpool_tests::http::scrape(&http),
            "kvpool_master_requests_total{op=\"GetReplicas\"}",
        )
    };
    let (_, on_nvme) = fill_past_dram(&c).await;
    let keys: Vec<String> = on_nvme.iter().map(|i| format!("d/{i}")).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let all_whole = |got: Vec<kvpool_client::Result<Option<Vec<u8>>>>, when: &str| {
        for (i, r) in on_nvme.iter().zip(got) {
            let v = r.unwrap_or_else(|e| panic!("get d/{i} {when}: {e}"));
            assert!(
                v.as_deref() == Some(&value(*i, direct_len(*i))[..]),
                "d/{i} {when}"
            );
        }
    };
    // A key is cached from its second lookup on.
    for pass in ["first", "second"] {
        all_whole(hot.get_batch(&refs).await, pass);
    }
    let before = lookups();
    all_whole(hot.get_batch(&refs).await, "from the cache");
    all_whole(hot.get_batch(&refs[..1]).await, "alone");
    assert_eq!(lookups(), before, "hot NVMe gets asked the master");
    assert_eq!(
        tiers_of(&c, "d/0").await,
        vec![Tier::Nvme],
        "nothing was promoted"
    );

    pool.signal(libc::SIGSTOP);
    let stopped = tokio::time::timeout(Duration::from_secs(10), hot.get_batch(&refs)).await;
    pool.signal(libc::SIGCONT);
    all_whole(
        stopped.expect("a hot NVMe get waited for the stopped pool"),
        "with the pool stopped",
    );

    // d/2's record (same key and value lengths) copied over d/0's: d/0's cached location now
    // holds another replica.
    let at = |info: &kvpool_proto::ObjectInfo| {
        info.replicas[0].offset - kvpool_proto::layout::value_offset(3)
    };
    let info = |k: &'static [u8]| {
        let c = &c;
        async move { c.locate(&[k]).await.pop().unwrap().unwrap().unwrap() }
    };
    let (zero, two) = (info(b"d/0").await, info(b"d/2").await);
    {
        use std::os::unix::fs::FileExt;
        let len = kvpool_proto::layout::record_len(3, zero.len) as usize;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&nvme)
            .unwrap();
        let mut record = vec![0u8; len];
        f.read_exact_at(&mut record, at(&two)).unwrap();
        f.write_all_at(&record, at(&zero)).unwrap();
        f.sync_all().unwrap();
    }
    let got = hot.get_batch(&[b"d/0", b"d/2"]).await;
    assert!(
        got[0].as_ref().unwrap().is_none(),
        "a record that holds another replica must be a miss"
    );
    assert!(got[1].as_ref().unwrap().as_deref() == Some(&value(2, direct_len(2))[..]));
    drop(pool);
    let _ = std::fs::remove_dir_all(dir);
}
