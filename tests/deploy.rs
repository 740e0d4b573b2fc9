//! The deployment files agree with what they deploy: every metric the Grafana dashboard
//! queries is exported by a live pool or a live proxy, and every `kvpool` command line in the
//! Dockerfile, the compose file, the Kubernetes manifests and the systemd units uses only
//! flags that verb has (`kvpool VERB --help`). No docker here: the files are checked, not run.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use kvpool_tests::{http::names, run_kvpool, up};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `expr` in the dashboard, however deeply nested.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `kvpool_*` metric names a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kvpool_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/kvpool.json")).expect("dashboard JSON");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 20, "only {} queries found", all.len());
    let queried: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();

    // `kvpool up` serves the master's and the node's metrics on one address.
    let pool = up("32MiB", &["--http", "127.0.0.1:0"]);
    let mut exported = names(&pool.addr("http"));
    // And a proxy: every family is declared at start and each configured engine has its
    // series, so engines that do not answer (nothing listens on port 1) are enough here.
    let proxy = kvpool_tests::Proc::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--prefill",
        "http://127.0.0.1:1",
        "--decode",
        "http://127.0.0.1:1",
    ]);
    exported.extend(names(&proxy.addr("http")));
    // The engines' connector counters come from the Python package (vLLM's `/metrics`, or
    // its own endpoint): python/tests/test_metrics.py checks those names against it.
    let missing: Vec<_> = queried
        .difference(&exported)
        .filter(|n| !n.starts_with("kvpool_connector_"))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which no server exports (exported: {exported:?})"
    );
    // And it shows the pool's main figures (a dashboard that lost them would still pass the
    // check above).
    for name in [
        "kvpool_master_lookup_hits_total",
        "kvpool_master_used_bytes",
        "kvpool_master_node_up",
        "kvpool_master_request_duration_seconds_bucket",
        "kvpool_store_transfer_bytes_total",
        "kvpool_store_copy_tasks_total",
        "kvpool_proxy_requests_total",
        "kvpool_proxy_handoffs_total",
        "kvpool_proxy_decode_duration_seconds_bucket",
    ] {
        assert!(queried.contains(name), "the dashboard does not show {name}");
    }
}

/// The verbs `kvpool --help` lists.
fn verbs() -> BTreeSet<String> {
    let o = run_kvpool(&["--help"], &[], None);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|v| v != "help")
        .collect()
}

/// `(file, verb, flags)` for every `kvpool VERB ...` in `text`. JSON-array commands
/// (`["kvpool", "up", "--listen", ...]`) are read as the command line they stand for; a
/// command ends at the end of its line or at a shell separator.
fn commands(
    file: &str,
    text: &str,
    verbs: &BTreeSet<String>,
) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.replace("\", \"", " ").replace("\",\"", " ");
        let mut rest = line.as_str();
        while let Some(i) = rest.find("kvpool ") {
            rest = &rest[i + "kvpool ".len()..];
            let mut words = rest.split_whitespace();
            let Some(verb) = words.next() else { break };
            if !verbs.contains(verb) {
                continue;
            }
            let flags = words
                .take_while(|w| !matches!(*w, ";" | "&&" | "||" | "|"))
                .filter(|w| w.starts_with("--"))
                .map(|w| {
                    w.trim_end_matches(['"', ']', ',', '\''])
                        .split('=')
                        .next()
                        .unwrap_or(w)
                        .to_string()
                })
                .collect();
            out.push((file.to_string(), verb.to_string(), flags));
        }
    }
    out
}

#[test]
fn deployment_files_use_only_flags_the_binary_has() {
    let verbs = verbs();
    assert!(
        ["up", "master", "store", "status"]
            .iter()
            .all(|v| verbs.contains(*v)),
        "{verbs:?}"
    );
    let files = [
        "Dockerfile",
        "deploy/compose.yaml",
        "deploy/k8s/masters.yaml",
        "deploy/k8s/stores.yaml",
        "deploy/systemd/kvpool-master@.service",
        "deploy/systemd/kvpool-store.service",
    ];
    let mut found = Vec::new();
    for f in files {
        let cmds = commands(f, &read(f), &verbs);
        assert!(!cmds.is_empty(), "{f} runs no kvpool command");
        found.extend(cmds);
    }
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (file, verb, flags) in &found {
        let text = help.entry(verb.clone()).or_insert_with(|| {
            let o = run_kvpool(&[verb, "--help"], &[], None);
            assert!(o.status.success(), "kvpool {verb} --help failed");
            String::from_utf8_lossy(&o.stdout).into_owned()
        });
        for flag in flags {
            // Flags are listed as `--name <VALUE>` or `--name` at the end of a word.
            let listed = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .any(|w| w == flag);
            if !listed {
                wrong.push(format!("{file}: kvpool {verb} has no {flag}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The probes and the image are wired where they should be.
    let masters = read("deploy/k8s/masters.yaml");
    let stores = read("deploy/k8s/stores.yaml");
    for (name, text, port) in [("masters", &masters, "9003"), ("stores", &stores, "9004")] {
        assert!(
            text.contains(&format!("httpGet: {{path: /ready, port: {port}}}"))
                && text.contains(&format!("httpGet: {{path: /health, port: {port}}}")),
            "{name}.yaml lacks its probes on {port}"
        );
        assert!(text.contains("image: kvpool:latest"), "{name}.yaml image");
    }
    let compose = read("deploy/compose.yaml");
    for service in [
        "etcd:",
        "master-a:",
        "master-b:",
        "store-a:",
        "store-b:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "compose lacks {service}"
        );
    }
}

#[test]
fn the_command_scanner_reads_every_form() {
    let verbs: BTreeSet<String> = ["up", "store"].iter().map(|s| s.to_string()).collect();
    let c = commands(
        "f",
        "CMD [\"kvpool\", \"up\", \"--http\", \"0.0.0.0:9003\"]\n\
         args: [\"exec kvpool store --listen=x --dram 1GiB\"]\n\
         kvpool store --name a && kvpool nope --x\n",
        &verbs,
    );
    let flags: Vec<_> = c
        .iter()
        .map(|(_, v, f)| (v.as_str(), f.join(" ")))
        .collect();
    assert_eq!(
        flags,
        vec![
            ("up", "--http".to_string()),
            ("store", "--listen --dram".to_string()),
            ("store", "--name".to_string()),
        ]
    );
}
