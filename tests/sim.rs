//! The engine simulator end to end: real `kvpool up` and `kvpool-sim` processes, spoken to over
//! HTTP. Every loaded block is verified by the simulator itself against its own computation of
//! that block (bytes that depend on the whole token prefix), so `mismatched_blocks == 0` is
//! the byte-for-byte check, and `loaded_blocks` / `computed_blocks` say where the KV came from.
//!
//! No HTTP client crate: a request is one HTTP/1.1 exchange over a `TcpStream` with
//! `Connection: close`, and responses are read as `serde_json` values.

use std::time::{Duration, Instant};

use kvpool_tests::kv::prompt;
use kvpool_tests::{up, wait_until};
use serde_json::Value;

mod engines;

use engines::*;

/// Two engines (one with vLLM's paged per-layer cache, one block-first) share a pool: what one
/// computed, the other loads, byte for byte, into whatever blocks it has free.
async fn shared_prefix(groups: &str) {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let a = sim(&master, &["--groups", groups]);
    let b = sim(&master, &["--groups", groups, "--layout", "block-first"]);
    let (a, b) = (a.addr("http"), b.addr("http"));

    // 100 tokens: 6 full blocks and a 4-token partial one (never saved: its KV still grows).
    let p1 = prompt(1, 100);
    let r = ask(&a, &p1).await;
    assert_kv(&r, 7, 0);
    assert!(!r["kvpool"]["recomputed"].b());
    let first_answer = r["choices"][0]["token_ids"].clone();

    // The same prompt on the other engine: the 6 full blocks come from the pool, and the
    // answer (a function of the KV) is the same.
    let r = ask(&b, &p1).await;
    assert_kv(&r, 7, 6);
    assert_eq!(r["kvpool"]["computed_tokens"].u(), 4);
    assert_eq!(r["choices"][0]["token_ids"], first_answer);

    // Shares 64 tokens (4 blocks), then differs: only the new blocks are computed.
    let mut p2 = p1[..64].to_vec();
    p2.extend(prompt(2, 30));
    let r = ask(&b, &p2).await;
    assert_kv(&r, 6, 4);
    assert_eq!(r["kvpool"]["computed_tokens"].u(), 30);

    // B saved p2's new full block: A now loads 5.
    let r = ask(&a, &p2).await;
    assert_kv(&r, 6, 5);

    // A prefix never seen: everything computed.
    let r = ask(&a, &prompt(3, 80)).await;
    assert_kv(&r, 5, 0);

    // A prompt differing at token 20 shares only block 0.
    let mut p4 = p1.clone();
    p4[20] += 1;
    let r = ask(&b, &p4).await;
    assert_kv(&r, 7, 1);

    let s = stats(&b).await;
    assert_eq!(s["requests"].u(), 3);
    assert_eq!(s["loaded_blocks"].u(), 6 + 4 + 1);
    assert_eq!(s["mismatched_blocks"].u(), 0);
    assert_eq!(s["free_blocks"].u(), 64, "blocks leaked: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sims_share_a_prefix() {
    shared_prefix("all").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sims_share_a_prefix_per_layer_group() {
    shared_prefix("2").await;
}

/// Keys are per namespace: another model (or another TP rank, or grouping) never loads this
/// one's blocks, even for the same tokens; a namespace bug would show up here as loaded blocks
/// with wrong bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_do_not_share() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let a = sim(&master, &[]);
    let other_model = sim(&master, &["--model", "test/other"]);
    let other_rank = sim(&master, &["--tp-size", "2", "--tp-rank", "1"]);
    let other_grouping = sim(&master, &["--groups", "1"]);
    let p = prompt(9, 64);
    assert_kv(&ask(&a.addr("http"), &p).await, 4, 0);
    for s in [&other_model, &other_rank, &other_grouping] {
        assert_kv(&ask(&s.addr("http"), &p).await, 4, 0);
    }
    assert_kv(&ask(&a.addr("http"), &p).await, 4, 4);
}

/// Malformed requests get a 400 with a message, and the engine keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400() {
    let pool = up("64MiB", &[]);
    let s = sim(&pool.addr("master"), &[]);
    let addr = s.addr("http");
    let cases: &[(&str, &str, &str)] = &[
        ("/v1/completions", "{not json", "invalid request body"),
        (
            "/v1/completions",
            r#"{"max_tokens": 3}"#,
            "invalid request body",
        ),
        (
            "/v1/completions",
            r#"{"prompt": 5}"#,
            "invalid request body",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [-1]}"#,
            "invalid request body",
        ),
        ("/v1/completions", r#"{"prompt": []}"#, "empty"),
        (
            "/v1/completions",
            r#"{"prompt": [1], "kv_transfer_params": "x"}"#,
            "must be an object",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [1], "kv_transfer_params": {"do_remote_decode": 1}}"#,
            "must be a boolean",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [1], "kv_transfer_params": {"do_remote_decode": true}}"#,
            "kv_producer",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [1], "kv_transfer_params": {"do_remote_prefill": true}}"#,
            "kv_consumer",
        ),
        (
            "/v1/chat/completions",
            r#"{"prompt": [1]}"#,
            "missing field `messages`",
        ),
        ("/v1/chat/completions", r#"{"messages": []}"#, "empty"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            "not supported",
        ),
        ("/abort", "[]", "invalid abort body"),
    ];
    for (path, body, want) in cases {
        let (status, j) = http(&addr, "POST", path, body).await;
        assert_eq!(status, 400, "{body}: {j}");
        let msg = j["error"]["message"].s();
        assert!(msg.contains(want), "{body}: {msg:?} lacks {want:?}");
    }
    // More blocks than the whole cache: a 400 (it can never fit), not a hang.
    let (status, j) = http(
        &addr,
        "POST",
        "/v1/completions",
        &format!(r#"{{"prompt": {}}}"#, ids(&prompt(1, 65 * BS))),
    )
    .await;
    assert_eq!(status, 400, "{j}");
    assert!(j["error"]["message"].s().contains("KV blocks"));

    let (status, _) = http(&addr, "GET", "/health", "").await;
    assert_eq!(status, 200);
    let st = stats(&addr).await;
    assert_eq!(st["bad_requests"].u(), cases.len() as u64 + 1);
    assert_eq!(st["requests"].u(), 0);
    assert_kv(&ask(&addr, &prompt(1, 20)).await, 2, 0);
}

/// A bootstrap base whose next port is free too (two TP ranks of one engine listen on base and
/// base + 1). Another process may take either before the sims bind them: then a sim fails to
/// start and the test says so, rather than passing on the wrong ports.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let p = a.local_addr().expect("local addr").port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free loopback ports in 100 tries");
}

fn port(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// The prefiller's side of a P/D request: prefill `tokens` and hand the blocks off.
async fn prefill(addr: &str, request_id: &str, tokens: &[u32]) -> Value {
    let r = complete(
        addr,
        &format!(
            r#"{{"prompt": {}, "max_tokens": 1, "request_id": "{request_id}",
                "kv_transfer_params": {{"do_remote_decode": true}}}}"#,
            ids(tokens)
        ),
    )
    .await;
    let p = &r["kv_transfer_params"];
    assert!(p["do_remote_prefill"].b(), "no hand-off: {r}");
    let Some(keys) = p["block_keys"].as_array() else {
        panic!("no block_keys: {r}");
    };
    assert_eq!(keys.len(), tokens.len() / BS);
    r
}

/// The decoder's side: the same prompt with the prefiller's `kv_transfer_params`, as a P/D
/// proxy passes them on.
async fn decode(addr: &str, request_id: &str, tokens: &[u32], prefilled: &Value) -> Value {
    complete(
        addr,
        &format!(
            r#"{{"prompt": {}, "max_tokens": 4, "request_id": "{request_id}",
                "kv_transfer_params": {}}}"#,
            ids(tokens),
            prefilled["kv_transfer_params"]
        ),
    )
    .await
}

async fn producer_stat(addr: &str, what: &str) -> u64 {
    stats(addr).await["producer"][what].u()
}

/// A failed hand-off: reported, and the decoder computed every block itself (nothing wrong
/// loaded, nothing half-loaded used).
fn assert_recomputed(r: &Value, blocks: u64) {
    let k = &r["kvpool"];
    assert!(
        k["kv_transfer_failed"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{r}"
    );
    assert!(k["recomputed"].b(), "{r}");
    assert_kv(r, blocks, 0);
}

/// The hand-off's happy path and the producer's abort: a prefiller (kv_producer) and a
/// decoder (kv_consumer); the decoder gets exactly the prefiller's KV through the pool, and
/// the prefiller's hold ends when the decoder says done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_handoff_releases_the_hold() {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let base = free_port_pair();
    let b = base.to_string();
    let tp = |rank: &'static str| ["--tp-size", "2", "--tp-rank", rank];
    let mut args = vec!["--role", "kv_producer", "--bootstrap-port", &b];
    args.extend(tp("0"));
    let p0 = sim(&master, &args);
    // TP ranks of one engine: same base, distinct ports (base + dp_rank * tp_size + tp_rank).
    args.truncate(4);
    args.extend(tp("1"));
    let p1 = sim(&master, &args);
    assert_eq!(port(&p0.addr("bootstrap")), base);
    assert_eq!(port(&p1.addr("bootstrap")), base + 1);
    let mut dargs = vec!["--role", "kv_consumer", "--consumer-timeout", "10s"];
    dargs.extend(tp("0"));
    let d = sim(&master, &dargs);
    assert!(
        !d.ready.contains_key("bootstrap"),
        "a consumer serves no bootstrap port"
    );
    let (pf, dc) = (p0.addr("http"), d.addr("http"));

    // 150 tokens: 9 full blocks handed off, the 6-token tail computed by the decoder.
    let toks = prompt(5, 150);
    let r = prefill(&pf, "req-1", &toks).await;
    assert_kv(&r, 10, 0);
    assert_eq!(producer_stat(&pf, "held").await, 1);
    assert_eq!(
        stats(&pf).await["free_blocks"].u(),
        64,
        "the prefiller keeps no blocks"
    );

    let rd = decode(&dc, "req-1", &toks, &r).await;
    assert_kv(&rd, 10, 9);
    assert_eq!(rd["kvpool"]["kv_transfer_failed"], Value::Null, "{rd}");
    assert!(!rd["kvpool"]["recomputed"].b());
    // The decoder's first token is the prefiller's: same KV, same answer.
    assert_eq!(
        rd["choices"][0]["token_ids"][0],
        r["choices"][0]["token_ids"][0]
    );
    wait_until(
        "the prefiller releases its hold",
        Duration::from_secs(10),
        || {
            let pf = pf.clone();
            async move {
                let s = stats(&pf).await;
                s["producer"]["held"].u() == 0 && s["producer"]["released"].u() == 1
            }
        },
    )
    .await;
    assert_eq!(producer_stat(&pf, "claimed").await, 1);

    // The prefiller's engine aborts a handed-off request: the hold ends now, and a decoder
    // that comes later is told and recomputes.
    let toks2 = prompt(6, 40);
    let r = prefill(&pf, "req-2", &toks2).await;
    let (status, a) = http(&pf, "POST", "/abort", r#"{"request_id": "req-2"}"#).await;
    assert_eq!(status, 200, "{a}");
    assert!(a["released"].b(), "{a}");
    assert_eq!(producer_stat(&pf, "aborted").await, 1);
    assert_eq!(producer_stat(&pf, "held").await, 0);
    let rd = decode(&dc, "req-2", &toks2, &r).await;
    assert_recomputed(&rd, 3);

    // A hand-off that names other blocks than the prompt's is refused as a bad request.
    let r = prefill(&pf, "req-3", &toks).await;
    let (status, j) = http(
        &dc,
        "POST",
        "/v1/completions",
        &format!(
            r#"{{"prompt": {}, "kv_transfer_params": {}}}"#,
            ids(&toks2),
            r["kv_transfer_params"]
        ),
    )
    .await;
    assert_eq!(status, 400, "{j}");

    let s = stats(&dc).await;
    assert_eq!(s["mismatched_blocks"].u(), 0);
    assert_eq!(s["received"].u(), 1);
    assert_eq!(s["transfer_failed"].u(), 1);
    assert_eq!(s["free_blocks"].u(), 64, "blocks leaked: {s}");
}

/// A hand-off no decoder claims is released after the producer's abort timeout, and a late
/// claim fails cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_unclaimed_handoff_expires() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let p = sim(
        &master,
        &[
            "--role",
            "kv_producer",
            "--bootstrap-port",
            "0",
            "--abort-timeout",
            "1s",
        ],
    );
    let d = sim(
        &master,
        &["--role", "kv_consumer", "--consumer-timeout", "10s"],
    );
    let pf = p.addr("http");
    let toks = prompt(7, 64);
    let r = prefill(&pf, "req-x", &toks).await;
    wait_until(
        "the unclaimed hand-off expires",
        Duration::from_secs(10),
        || {
            let pf = pf.clone();
            async move {
                let s = stats(&pf).await;
                s["producer"]["expired"].u() == 1 && s["producer"]["held"].u() == 0
            }
        },
    )
    .await;
    assert_eq!(producer_stat(&pf, "released").await, 0);
    let rd = decode(&d.addr("http"), "req-x", &toks, &r).await;
    assert_recomputed(&rd, 4);
}

/// A decoder whose prefiller died after the hand-off (SIGKILL), or hangs (SIGSTOP), answers
/// within its consumer timeout, from KV it computed itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_dead_producer_fails_within_the_consumer_timeout() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let timeout = Duration::from_secs(3);
    let d = sim(
        &master,
        &["--role", "kv_consumer", "--consumer-timeout", "3s"],
    );
    let dc = d.addr("http");
    let producer = || sim(&master, &["--role", "kv_producer", "--bootstrap-port", "0"]);

    let mut killed = producer();
    let toks = prompt(8, 100);
    let r = prefill(&killed.addr("http"), "req-k", &toks).await;
    killed.kill();
    let t = Instant::now();
    let rd = decode(&dc, "req-k", &toks, &r).await;
    assert!(
        t.elapsed() < timeout + Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_recomputed(&rd, 7);

    let stopped = producer();
    let r = prefill(&stopped.addr("http"), "req-s", &toks).await;
    // SAFETY: kill(2) on a child the harness spawned and has not reaped; no memory effects.
    unsafe {
        libc::kill(stopped.pid() as i32, libc::SIGSTOP);
    }
    let t = Instant::now();
    let rd = decode(&dc, "req-s", &toks, &r).await;
    let took = t.elapsed();
    // A stopped producer accepts connections (the kernel does) but never answers: only the
    // consumer's own timeout ends the wait.
    assert!(
        took >= timeout.mul_f64(0.9) && took < timeout + Duration::from_secs(5),
        "took {took:?}"
    );
    assert_recomputed(&rd, 7);
    assert_eq!(stats(&dc).await["free_blocks"].u(), 64);
}

/// `kv_both` engines play either side, and a finished hand-off is a prefix-cache entry like any
/// other: a later plain request for the same prompt loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_both_plays_either_side() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let both = ["--role", "kv_both", "--bootstrap-port", "0"];
    let (a, b) = (sim(&master, &both), sim(&master, &both));
    let (a, b) = (a.addr("http"), b.addr("http"));
    let toks = prompt(10, 70);
    let r = prefill(&a, "req-b", &toks).await;
    assert_kv(&decode(&b, "req-b", &toks, &r).await, 5, 4);
    wait_until("the hold is released", Duration::from_secs(10), || {
        let a = a.clone();
        async move { producer_stat(&a, "released").await == 1 }
    })
    .await;
    // The other way round, with the first prompt's blocks now shared as a prefix.
    let mut toks2 = toks[..64].to_vec();
    toks2.extend(prompt(11, 20));
    let r = prefill(&b, "req-c", &toks2).await;
    assert_kv(&r, 6, 4);
    assert_kv(&decode(&a, "req-c", &toks2, &r).await, 6, 5);
    assert_kv(&ask(&a, &toks).await, 5, 4);
}

/// A decoder's request waiting on a hung producer ends at once when aborted, and gives its
/// blocks back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoder_abort_ends_a_waiting_request() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let p = sim(&master, &["--role", "kv_producer", "--bootstrap-port", "0"]);
    let d = sim(
        &master,
        &["--role", "kv_consumer", "--consumer-timeout", "60s"],
    );
    let dc = d.addr("http");
    let toks = prompt(12, 100);
    let r = prefill(&p.addr("http"), "req-a", &toks).await;
    // SAFETY: kill(2) on a child the harness spawned and has not reaped; no memory effects.
    unsafe {
        libc::kill(p.pid() as i32, libc::SIGSTOP);
    }
    let waiting = tokio::spawn({
        let dc = dc.clone();
        async move { decode(&dc, "req-a", &toks, &r).await }
    });
    wait_until(
        "the decoder waits on the producer",
        Duration::from_secs(10),
        || {
            let dc = dc.clone();
            async move { stats(&dc).await["in_flight"].u() == 1 }
        },
    )
    .await;
    let t = Instant::now();
    let (status, a) = http(&dc, "POST", "/abort", r#"{"request_id": "req-a"}"#).await;
    assert_eq!(status, 200, "{a}");
    assert!(a["in_flight"].b(), "{a}");
    let rd = waiting.await.expect("decode task");
    // Far below the 60 s consumer timeout: the abort ended it (telling the hung producer is
    // bounded by the connector's 2 s courtesy limit).
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(rd["choices"][0]["finish_reason"].s(), "abort", "{rd}");
    let s = stats(&dc).await;
    assert_eq!(s["aborted_requests"].u(), 1);
    assert_eq!(s["in_flight"].u(), 0);
    assert_eq!(s["free_blocks"].u(), 64, "blocks leaked: {s}");
}

/// A streamed answer: one event per token, `--token-interval` apart; `POST /abort` mid-stream
/// ends it with `finish_reason: "abort"` and `[DONE]`, and the request leaves the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_paced_and_can_be_aborted() {
    let pool = up("64MiB", &[]);
    let s = sim(&pool.addr("master"), &["--token-interval", "100ms"]);
    let addr = s.addr("http");
    let body = format!(
        r#"{{"prompt": {}, "max_tokens": 200, "stream": true, "request_id": "a1"}}"#,
        ids(&prompt(5, 40))
    );
    let mut st = Stream::open(&addr, "POST", "/v1/completions", &body).await;
    assert_eq!(st.status, 200, "{}", st.head);
    st.next_event().await.expect("a first event");
    assert_eq!(stats(&addr).await["in_flight"].u(), 1);
    let (status, j) = http(&addr, "POST", "/abort", r#"{"request_id": "a1"}"#).await;
    assert_eq!(status, 200, "{j}");
    assert!(j["in_flight"].b(), "{j}");
    let (chunks, done) = events(&st.rest().await);
    assert!(done);
    let last = chunks.last().expect("an abort event");
    assert_eq!(last["choices"][0]["finish_reason"], "abort", "{last}");
    // Far fewer than 200 tokens were sent.
    assert!(chunks.len() < 100, "{}", chunks.len());
    let s = stats(&addr).await;
    assert_eq!(s["aborted_requests"].u(), 1, "{s}");
    assert_eq!(s["in_flight"].u(), 0, "{s}");
    assert_eq!(s["free_blocks"].u(), 64, "{s}");
}
