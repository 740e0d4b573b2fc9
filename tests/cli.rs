//! The `kvpool` binary as a user runs it: `up`, then the verbs in other processes, with
//! exit codes and messages checked.

use std::process::Output;

use kvpool_tests::{config_file, run_kvpool, stderr, up, value};

fn kvpool(args: &[&str], master: &str, stdin: Option<&[u8]>) -> Output {
    run_kvpool(args, &[("KVPOOL_MASTER", master)], stdin)
}

#[test]
fn put_get_exists_rm_status_through_the_binary() {
    let pool = up("128MiB", &[]);
    let m = pool.addr("master");
    let v = value(1, 3 << 20);

    let o = kvpool(&["put", "blob", "-"], &m, Some(&v));
    assert!(o.status.success(), "put: {}", stderr(&o));
    let o = kvpool(&["get", "blob"], &m, None);
    assert!(o.status.success(), "get: {}", stderr(&o));
    assert!(o.stdout == v, "get returned other bytes");

    let dir = config_file("");
    let out = dir.with_file_name("out.bin");
    let o = kvpool(&["get", "blob", "-o", out.to_str().unwrap()], &m, None);
    assert!(o.status.success());
    assert!(std::fs::read(&out).unwrap() == v);
    let input = dir.with_file_name("in.bin");
    std::fs::write(&input, b"from a file").unwrap();
    assert!(kvpool(&["put", "file", input.to_str().unwrap()], &m, None)
        .status
        .success());
    assert_eq!(kvpool(&["get", "file"], &m, None).stdout, b"from a file");

    // Immutable keys: a second put fails clearly, with overwrite it succeeds.
    let o = kvpool(&["put", "blob", "-"], &m, Some(b"x"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("AlreadyExists"), "{}", stderr(&o));
    assert!(kvpool(&["put", "blob", "--overwrite", "-"], &m, Some(b"x"))
        .status
        .success());
    assert_eq!(kvpool(&["get", "blob"], &m, None).stdout, b"x");

    let o = kvpool(&["exists", "blob"], &m, None);
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"yes\n"[..])
    );
    let o = kvpool(&["exists", "nope"], &m, None);
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(1), &b"no\n"[..])
    );

    let o = kvpool(&["status"], &m, None);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("1 node(s) (1 alive)")
            && text.contains("2 object(s)")
            && text.contains("dram:"),
        "{text}"
    );
    let o = kvpool(&["status", "--raw"], &m, None);
    assert!(String::from_utf8_lossy(&o.stdout).contains("capacity=134217728"));

    // The gets above hold a read lease: a plain rm waits for it, --force does not.
    let o = kvpool(&["rm", "blob"], &m, None);
    assert!(
        !o.status.success() && stderr(&o).contains("HasLease"),
        "{}",
        stderr(&o)
    );
    assert!(kvpool(&["rm", "blob", "--force"], &m, None)
        .status
        .success());
    let o = kvpool(&["get", "blob"], &m, None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    let o = kvpool(&["rm", "blob"], &m, None);
    assert!(!o.status.success() && stderr(&o).contains("not found"));
}

#[test]
fn verbs_fail_clearly_without_a_master() {
    // Nothing listens on this port: bind one and drop it to get a free port.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let cfg = config_file("[client]\ndeadline = \"1s\"\n");
    let o = run_kvpool(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "get",
            "k",
            "--master",
            &free,
        ],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("get \"k\"") && (e.contains("refused") || e.contains("Connection")),
        "{e}"
    );

    let bad = config_file("[master]\nno-such-key = 1\n");
    let o = run_kvpool(&["--config", bad.to_str().unwrap(), "status"], &[], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no-such-key"), "{}", stderr(&o));
}

#[test]
fn config_prints_every_default() {
    let o = run_kvpool(&["config"], &[], None);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for key in [
        "listen = \"127.0.0.1:50051\"",
        "lease-ttl = \"10s\"",
        "dram = \"256MiB\"",
        "high-watermark = 0.9",
    ] {
        assert!(text.contains(key), "missing {key} in:\n{text}");
    }
}

#[test]
fn status_shows_the_transport_to_each_node() {
    let pool = up("64MiB", &[]);
    let m = pool.addr("master");
    let data = pool.addr("store");
    // The test's own environment may pick a transport (a matrix run): each case sets it.
    let status = |transport: &str, args: &[&str]| {
        let o = run_kvpool(
            args,
            &[("KVPOOL_MASTER", &m), ("KVPOOL_TRANSPORT", transport)],
            None,
        );
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The node's row: the one naming its data address.
    let row = |text: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.contains(&data))
            .unwrap_or_else(|| panic!("no row for {data} in:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let json_transport = |text: &str| -> String {
        let doc: serde_json::Value = serde_json::from_str(text).expect("status --json");
        let t = &doc["transports"];
        assert_eq!(t.as_array().map(Vec::len), Some(1), "{doc:#}");
        assert_eq!(t[0]["addr"], data.as_str(), "{doc:#}");
        t[0]["transport"].as_str().expect("transport").to_string()
    };

    // By default a node on this host that shares its memory is reached through it.
    let text = status("auto", &["status"]);
    assert!(text.contains("TRANSPORT"), "{text}");
    assert_eq!(row(&text)[3], "shm", "{text}");
    assert_eq!(
        json_transport(&status("auto", &["status", "--json"])),
        "shm"
    );
    assert!(status("auto", &["status", "--raw"]).contains("transport=shm"));

    // Told to use TCP, the client shows TCP for the same node.
    let text = status("tcp", &["status"]);
    assert_eq!(row(&text)[3], "tcp", "{text}");
    assert_eq!(json_transport(&status("tcp", &["status", "--json"])), "tcp");
    assert!(status("tcp", &["status", "--raw"]).contains("transport=tcp"));

    // Forced to RDMA, on a host without a device (or a build without the `rdma` feature):
    // the node cannot be reached that way, so it shows `-` and a put fails naming why.
    let text = status("rdma", &["status"]);
    assert_eq!(row(&text)[3], "-", "{text}");
    assert_eq!(json_transport(&status("rdma", &["status", "--json"])), "-");
    let o = run_kvpool(
        &["put", "forced-rdma", "-"],
        &[("KVPOOL_MASTER", &m), ("KVPOOL_TRANSPORT", "rdma")],
        Some(b"bytes"),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("transport = rdma") && err.contains("TransportUnsupported"),
        "{err}"
    );
}
