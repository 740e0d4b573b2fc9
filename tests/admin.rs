//! The inspection verbs through the binary against a live pool: `nodes`, `segments`, `keys`,
//! `inspect`, `rm --prefix`, `status` and `exists`, each in its human form and with `--json`.

use std::process::Output;

use kvpool_tests::{run_kvpool, stderr, up};
use serde_json::Value;

fn kvpool(args: &[&str], master: &str, stdin: Option<&[u8]>) -> Output {
    let o = run_kvpool(args, &[("KVPOOL_MASTER", master)], stdin);
    assert!(o.status.code().is_some(), "{args:?} was killed");
    o
}

/// Runs a verb that must succeed; its standard output.
fn ok(args: &[&str], master: &str) -> String {
    let o = kvpool(args, master, None);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    String::from_utf8(o.stdout).expect("UTF-8 output")
}

/// Runs a verb with `--json`; its document.
fn json(args: &[&str], master: &str) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(&a, master);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{a:?} printed no JSON ({e}): {out}"))
}

fn put(key: &str, value: &[u8], master: &str) {
    let o = kvpool(&["put", key, "-"], master, Some(value));
    assert!(o.status.success(), "put {key}: {}", stderr(&o));
}

#[test]
fn nodes_and_segments() {
    let pool = up("64MiB", &[]);
    let m = pool.addr("master");
    put("k", &[7u8; 1000], &m);

    let text = ok(&["nodes"], &m);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("STATE"),
        "{text}"
    );
    assert!(
        lines[1].contains(" up ") && lines[1].contains("64MiB"),
        "{text}"
    );
    assert_eq!(lines.last(), Some(&"1 node(s), 1 alive"));
    let doc = json(&["nodes"], &m);
    let node = &doc["nodes"][0];
    assert_eq!(node["state"], "up");
    assert_eq!(node["alive"], true);
    assert_eq!(node["objects"], 1);
    assert_eq!(node["dram"]["capacity"], 64u64 << 20);
    assert!(node["dram"]["used"].as_u64().unwrap() >= 1000);
    assert_eq!(node["addr"], pool.addr("store"));

    let text = ok(&["segments"], &m);
    assert!(
        text.lines().next().unwrap().starts_with("SEGMENT"),
        "{text}"
    );
    assert!(text.contains("dram") && text.contains(node["id"].as_str().unwrap()));
    let doc = json(&["segments"], &m);
    let seg = &doc["segments"][0];
    assert_eq!(
        (
            seg["tier"].as_str(),
            seg["healthy"].as_bool(),
            seg["objects"].as_u64()
        ),
        (Some("dram"), Some(true), Some(1))
    );
    assert_eq!(seg["node"], node["id"]);
}

#[test]
fn keys_inspect_and_rm_by_prefix() {
    let pool = up("64MiB", &[]);
    let m = pool.addr("master");
    for k in ["run/a", "run/b", "run/c", "other"] {
        put(k, k.as_bytes(), &m);
    }

    assert_eq!(
        ok(&["keys", "--prefix", "run/"], &m),
        "run/a\nrun/b\nrun/c\n"
    );
    let o = kvpool(&["keys", "--limit", "2"], &m, None);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "other\nrun/a\n");
    assert!(stderr(&o).contains("more keys match"), "{}", stderr(&o));
    let doc = json(&["keys", "--prefix", "run/", "--limit", "2"], &m);
    assert_eq!(doc["keys"][0]["key"], "run/a");
    assert_eq!(doc["keys"].as_array().unwrap().len(), 2);
    assert_eq!(doc["more"], true);

    // A get leases run/a; soft-pinned run/p shows its pin.
    let o = kvpool(&["put", "run/p", "--soft-pin", "-"], &m, Some(b"pinned"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(kvpool(&["get", "run/a"], &m, None).stdout, b"run/a");
    let text = ok(&["inspect", "run/a"], &m);
    assert!(text.contains("state     complete"), "{text}");
    assert!(text.contains("size      5B (5 bytes)"), "{text}");
    let crc = format!("{:08x}", kvpool_proto::crc32c::crc32c(b"run/a"));
    assert!(text.contains(&format!("checksum  crc32c {crc}")), "{text}");
    assert!(text.contains("pin       none"), "{text}");
    assert!(text.contains("reads     1"), "{text}");
    assert!(
        !text.contains("lease     0.0s left"),
        "the get's lease shows: {text}"
    );
    assert!(
        text.contains("REPLICA") && text.contains("dram  ready"),
        "{text}"
    );
    let doc = json(&["inspect", "run/b"], &m);
    assert_eq!(doc["key"], "run/b");
    assert_eq!(doc["size"], 5);
    assert_eq!(
        doc["checksum"],
        format!("{:08x}", kvpool_proto::crc32c::crc32c(b"run/b"))
    );
    assert_eq!(doc["lease_left_ms"], 0, "inspect takes no lease");
    assert_eq!(
        (doc["hard_pin"].as_bool(), doc["reads"].as_u64()),
        (Some(false), Some(0))
    );
    assert_eq!(doc["replicas"][0]["tier"], "dram");
    assert_eq!(doc["replicas"][0]["state"], "ready");
    assert_eq!(doc["replicas"][0]["addr"], pool.addr("store"));
    let doc = json(&["inspect", "run/p"], &m);
    assert!(doc["soft_pin_left_ms"].as_u64().unwrap() > 60_000, "{doc}");
    let o = kvpool(&["inspect", "nope"], &m, None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    // The get leased run/a: without --force it stays, the other three go.
    let text = ok(&["rm", "--prefix", "run/"], &m);
    assert!(text.starts_with("removed 3 key(s)"), "{text}");
    let doc = json(&["rm", "--prefix", "run/", "--force"], &m);
    assert_eq!(
        (doc["prefix"].as_str(), doc["removed"].as_u64()),
        (Some("run/"), Some(1))
    );
    assert_eq!(ok(&["keys"], &m), "other\n");
    let o = kvpool(&["rm", "--prefix", ""], &m, None);
    assert_eq!(o.status.code(), Some(2), "an empty prefix is refused");

    let doc = json(&["exists", "other"], &m);
    assert_eq!(doc["exists"], true);
    let doc = json(&["status"], &m);
    assert_eq!(
        (doc["objects"].as_u64(), doc["alive"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(doc["dram"]["capacity"], 64u64 << 20);
    let doc = json(&["rm", "other"], &m);
    assert_eq!(doc["removed"], 1);
    assert_eq!(
        json(&["keys"], &m)["keys"].as_array().map(Vec::len),
        Some(0)
    );
}

#[test]
fn drain_in_json_and_with_progress_lines_off_a_terminal() {
    let pool = up("64MiB", &[]);
    let m = pool.addr("master");
    let _extra = kvpool_tests::store(&m, "extra");
    kvpool_tests::wait_until_blocking("two nodes", std::time::Duration::from_secs(20), || {
        json(&["nodes"], &m)["nodes"].as_array().map(Vec::len) == Some(2)
    });
    for i in 0..6 {
        put(&format!("d/{i}"), &[i as u8; 4096], &m);
    }
    let doc = json(&["drain", "extra", "--timeout", "30s"], &m);
    assert_eq!(
        (doc["state"].as_str(), doc["replicas_left"].as_u64()),
        (Some("drained"), Some(0))
    );
    let id = doc["node"].as_str().unwrap().to_string();
    let nodes = json(&["nodes"], &m);
    let extra = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (extra["state"].as_str(), extra["objects"].as_u64()),
        (Some("drain"), Some(0))
    );

    let doc = json(&["drain", &id, "--cancel"], &m);
    assert_eq!(doc["state"], "serving");
    // Off a terminal, progress is one line per update on standard error.
    let o = kvpool(&["drain", "extra", "--timeout", "30s"], &m, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("replica(s) left"), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is drained"));
}
