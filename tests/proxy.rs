//! `kvpool proxy` end to end: real `kvpool up`, `kvpool-sim` prefillers and decoders and the
//! proxy, on loopback, spoken to with HTTP/1.1 by hand (tests/engines). Streams are read one
//! event at a time as they arrive; the decoder keeps the exact bytes it streamed
//! (`GET /debug/streams/{id}`), so what the client got through the proxy is compared with
//! them byte for byte.

mod engines;

use std::time::{Duration, Instant};

use engines::*;
use kvpool_tests::http::{get, scrape, value};
use kvpool_tests::kv::prompt;
use kvpool_tests::{alive_nodes, client, up, wait_until, Proc};
use serde_json::{json, Value};

fn url(p: &Proc) -> String {
    format!("http://{}", p.addr("http"))
}

/// `kvpool proxy` on a free port with `args` (its `--prefill` / `--decode` / ... flags).
fn proxy(args: &[&str]) -> Proc {
    let mut a = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--health-interval",
        "200ms",
    ];
    a.extend_from_slice(args);
    Proc::start(&a)
}

/// The concatenated text of a completion stream's chunks, or a chat stream's deltas.
fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            let ch = &c["choices"][0];
            ch["text"].as_str().or(ch["delta"]["content"].as_str())
        })
        .collect()
}

/// The exact bytes decoder `addr` streamed for `id` (kept once the stream has ended).
async fn decoder_sent(addr: &str, id: &str) -> String {
    let path = format!("/debug/streams/{id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http(addr, "GET", &path, "").await;
        if status == 200 {
            return body.as_str().map(String::from).unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "the decoder kept no stream {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Streaming completions and chat through prefill then decode: the client gets its first
/// event while the decoder is still generating, every byte the decoder streamed arrives
/// unchanged, the decode loaded exactly the prefiller's KV; a client that goes away
/// mid-stream aborts the decoder's request; `/v1/models`; a dead sole prefiller is a 502
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_streams_completions_and_chat() {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let mut p = sim(&master, &["--role", "kv_producer", "--bootstrap-port", "0"]);
    let mut d = sim(
        &master,
        &[
            "--role",
            "kv_consumer",
            "--consumer-timeout",
            "10s",
            "--token-interval",
            "200ms",
        ],
    );
    let dc = d.addr("http");
    let px = proxy(&["--prefill", &url(&p), "--decode", &url(&d)]);
    let px = px.addr("proxy");

    // /v1/models: the engines' model.
    let (status, m) = http(&px, "GET", "/v1/models", "").await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["data"][0]["id"], "test/llama-tiny", "{m}");

    // A streamed completion: 100 tokens (6 full blocks), 6 generated, 200 ms apart.
    let toks = prompt(31, 100);
    let body = json!({"prompt": toks, "max_tokens": 6, "stream": true, "request_id": "s1"});
    let mut s = Stream::open(&px, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert_eq!(header(&s.head, "content-type"), Some("text/event-stream"));
    let first = s.next_event().await.expect("a first event");
    // The decoder is still generating (five more tokens, a second to go): nothing buffered
    // the whole body on the way.
    let st = stats(&dc).await;
    assert_eq!(
        st["in_flight"].u(),
        1,
        "the first event came after the last: {st}"
    );
    let got = first + &s.rest().await;
    assert_eq!(
        got,
        decoder_sent(&dc, "s1").await,
        "bytes changed on the way"
    );
    let (chunks, done) = events(&got);
    assert!(done, "no [DONE]: {got}");
    assert_eq!(chunks.len(), 6, "{got}");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    // The decode loaded the 6 full blocks the prefiller handed off, byte for byte.
    assert_kv(last, 7, 6);
    assert_eq!(last["kvpool"]["kv_transfer_failed"], Value::Null, "{last}");
    // A whole (unstreamed) answer to the same prompt says the same.
    let whole = complete(&px, &json!({"prompt": toks, "max_tokens": 6}).to_string()).await;
    assert_eq!(whole["choices"][0]["text"].s(), streamed_text(&chunks));

    // A streamed chat, with usage: the template renders the messages into the prompt.
    let (sys, user) = (
        "You are a terse test.",
        "Tell me about KV caches, at length please.",
    );
    let rendered = format!("<|system|>\n{sys}\n<|user|>\n{user}\n<|assistant|>\n");
    let n = rendered.chars().count();
    let body = json!({
        "model": "test/llama-tiny",
        "messages": [{"role": "system", "content": sys},
                     {"role": "user", "content": [{"type": "text", "text": user}]}],
        "max_completion_tokens": 3, "stream": true,
        "stream_options": {"include_usage": true}, "request_id": "c1",
    });
    let mut s = Stream::open(&px, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(s.status, 200, "{}", s.head);
    let got = s.rest().await;
    assert_eq!(got, decoder_sent(&dc, "c1").await);
    let (chunks, done) = events(&got);
    assert!(done);
    // Role, 3 tokens, usage.
    assert_eq!(chunks.len(), 5, "{got}");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_kv(&chunks[3], n.div_ceil(BS) as u64, (n / BS) as u64);
    assert_eq!(chunks[4]["usage"]["prompt_tokens"].u(), n as u64);
    assert_eq!(chunks[4]["usage"]["completion_tokens"].u(), 3);
    // The same chat unstreamed.
    let mut whole_chat = body.clone();
    whole_chat["stream"] = json!(false);
    whole_chat["request_id"] = json!("c2");
    let (status, r) = http(&px, "POST", "/v1/chat/completions", &whole_chat.to_string()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        r["choices"][0]["message"]["content"].s(),
        streamed_text(&chunks)
    );

    // A client that goes away mid-stream: the decoder's request is aborted (its connection
    // from the proxy is dropped), not generated to the end.
    let aborted = stats(&dc).await["aborted_requests"].u();
    let body = json!({"prompt": prompt(32, 40), "max_tokens": 100, "stream": true});
    let mut s = Stream::open(&px, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(s.status, 200);
    s.next_event().await.expect("a first event");
    drop(s);
    wait_until(
        "the decoder aborts the request",
        Duration::from_secs(10),
        || {
            let dc = dc.clone();
            async move {
                let st = stats(&dc).await;
                st["aborted_requests"].u() == aborted + 1 && st["in_flight"].u() == 0
            }
        },
    )
    .await;
    assert_eq!(stats(&dc).await["free_blocks"].u(), 64);

    // The decoder dies mid-stream: the client's stream ends at once, without `[DONE]` and
    // without HTTP's last chunk (the proxy cuts the response short rather than pretend it
    // finished).
    let body = json!({"prompt": prompt(33, 40), "max_tokens": 100, "stream": true});
    let mut s = Stream::open(&px, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(s.status, 200);
    s.next_event().await.expect("a first event");
    d.kill();
    let rest = tokio::time::timeout(Duration::from_secs(10), s.rest())
        .await
        .expect("the stream ends when its decoder dies");
    assert!(!rest.contains("[DONE]"), "{rest}");
    assert!(
        !s.ended_cleanly(),
        "a cut-off stream must not look complete"
    );

    // The only prefiller dies: a 502 that names it.
    let dead = url(&p);
    p.kill();
    let (status, j) = http(
        &px,
        "POST",
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string(),
    )
    .await;
    assert_eq!(status, 502, "{j}");
    let msg = j["error"]["message"].s();
    assert!(
        msg.contains("no prefiller answered") && msg.contains(&dead),
        "{msg}"
    );
}

/// No prefillers: the proxy is a router over decoders, streams included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_without_prefillers_streams_from_the_engine() {
    let pool = up("64MiB", &[]);
    let e = sim(&pool.addr("master"), &["--token-interval", "50ms"]);
    let px = proxy(&["--decode", &url(&e)]);
    let px = px.addr("proxy");
    let body =
        json!({"prompt": "hello, world", "max_tokens": 4, "stream": true, "request_id": "x1"});
    let mut s = Stream::open(&px, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(s.status, 200, "{}", s.head);
    let got = s.rest().await;
    assert_eq!(got, decoder_sent(&e.addr("http"), "x1").await);
    let (chunks, done) = events(&got);
    assert!(done && chunks.len() == 4, "{got}");
    // The engine's own errors pass through as they are.
    let (status, j) = http(&px, "POST", "/v1/completions", r#"{"prompt": []}"#).await;
    assert_eq!(status, 400, "{j}");
    assert!(j["error"]["message"].s().contains("empty"), "{j}");
    // A 3 MB body (400k token ids) reaches the engine, whose answer is about its cache.
    let big = json!({"prompt": prompt(6, 400_000), "max_tokens": 1}).to_string();
    assert!(big.len() > 2 << 20);
    let (status, j) = http(&px, "POST", "/v1/completions", &big).await;
    assert_eq!(status, 400, "{j}");
    assert!(j["error"]["message"].s().contains("KV blocks"), "{j}");
}

/// Two prefillers on two simulated hosts (127.0.0.1 and 127.0.0.2, each with its own storage
/// node and saving there first): a request goes to the prefiller whose host holds the longest
/// prefix of its prompt, whatever prefix affinity would say; with nothing stored, or no
/// master, affinity decides and requests are still served. Keys from the engine
/// (`/kvpool/block_keys`, token-id prompts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_prefers_the_prefiller_holding_the_prefix() {
    prefix_choice(false).await;
}

/// The same with keys hashed by the proxy in the engines' namespace (`--prefix-namespace`,
/// the path for vLLM), tokens from the prefiller's `/tokenize`, on chat requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_prefers_the_prefiller_holding_the_prefix_by_namespace() {
    prefix_choice(true).await;
}

/// Prefix `i`'s request with a tail from `seed`: (route, body, full blocks shared with every
/// other request on prefix `i`). Token ids, or (`chat`) a long system message then a user one.
fn prefix_request(chat: bool, i: usize, seed: u32) -> (&'static str, Value, usize) {
    if chat {
        let sys = format!("{i} {}", "You are a helpful assistant. ".repeat(4));
        let user = format!("{seed}: tell me more");
        // "<|system|>\n" + sys + "\n<|user|>\n", then the user text differs at once.
        let shared = 11 + sys.chars().count() + 1 + 9;
        let body = json!({"messages": [{"role": "system", "content": sys},
                                       {"role": "user", "content": user}], "max_tokens": 2});
        ("/v1/chat/completions", body, shared / BS)
    } else {
        let mut toks = prompt(50 + i as u32, 6 * BS);
        toks.extend(prompt(seed, 40));
        let body = json!({"prompt": toks, "max_tokens": 2});
        ("/v1/completions", body, 6)
    }
}

async fn prefix_choice(by_namespace: bool) {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let _host_b = Proc::start(&[
        "store",
        "--master",
        &master,
        "--listen",
        "127.0.0.2:0",
        "--dram",
        "128MiB",
        "--name",
        "host-b",
    ]);
    let c = client(&master);
    wait_until("both nodes are up", Duration::from_secs(10), || {
        let c = &c;
        async move { alive_nodes(c).await == 2 }
    })
    .await;
    let prefiller = |host: &str| {
        let listen = format!("{host}:0");
        let mut args = vec![
            "--master",
            &master,
            "--listen",
            &listen,
            "--role",
            "kv_producer",
            "--bootstrap-port",
            "0",
            "--prefer-host",
            host,
        ];
        args.extend_from_slice(SHAPE);
        Proc::start_program(&sim_bin(), &args)
    };
    let hosts = [prefiller("127.0.0.1"), prefiller("127.0.0.2")];
    let d = sim(
        &master,
        &["--role", "kv_consumer", "--consumer-timeout", "10s"],
    );
    let (p0, p1, du) = (url(&hosts[0]), url(&hosts[1]), url(&d));
    let ns = r#"{"model": "test/llama-tiny", "kv_dtype": "bf16", "layout": "vllm-nhd/all", "block_size": 16}"#;
    let mut args = vec![
        "--prefill",
        &p0,
        "--prefill",
        &p1,
        "--decode",
        &du,
        "--master",
        &master,
        "--http",
        "127.0.0.1:0",
    ];
    if by_namespace {
        args.extend_from_slice(&["--prefix-namespace", ns]);
    }
    let px = proxy(&args);
    let ops = px.addr("http");
    let px = px.addr("proxy");

    // Nothing stored yet: affinity picks, and the header says no block was found.
    let (path, body, _) = prefix_request(by_namespace, 9, 1);
    let (status, head, r) = http_head(&px, "POST", path, &body.to_string()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(header(&head, "x-kvpool-prefix-blocks"), Some("0"), "{head}");

    // Four long prefixes, each computed on one host by a direct request.
    for i in 0..4 {
        let (path, body, _) = prefix_request(by_namespace, i, 2);
        let (status, r) = http(&hosts[i % 2].addr("http"), "POST", path, &body.to_string()).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["kvpool"]["loaded_blocks"].u(), 0, "{r}");
    }
    // Through the proxy, a request sharing a prefix goes to the host holding it (affinity
    // alone would get all four right one time in sixteen).
    let mut matched = 0;
    for i in 0..4 {
        let (path, body, shared) = prefix_request(by_namespace, i, 3);
        let (status, head, r) = http_head(&px, "POST", path, &body.to_string()).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            header(&head, "x-kvpool-prefiller"),
            Some(url(&hosts[i % 2]).as_str()),
            "prefix {i}: {head}"
        );
        matched += shared;
        let found = shared.to_string();
        assert_eq!(
            header(&head, "x-kvpool-prefix-blocks"),
            Some(found.as_str()),
            "{head}"
        );
        // The decoder got every full block from the hand-off, byte for byte.
        let k = &r["kvpool"];
        assert_eq!(k["mismatched_blocks"].u(), 0, "{r}");
        assert_eq!(k["loaded_blocks"].u(), k["blocks"].u() - 1, "{r}");
        assert_eq!(k["kv_transfer_failed"], Value::Null, "{r}");
    }
    for h in &hosts {
        // Each prefiller: its 2 direct requests and its 2 routed ones (and maybe the first).
        let n = stats(&h.addr("http")).await["requests"].u();
        assert!((4..=5).contains(&n), "{n}");
    }
    // The proxy's metrics say the same: five questions to the master, the first prefill by
    // affinity (nothing stored), four by the prefix found.
    let m = scrape(&ops);
    let series =
        |name: &str, label: &str| value(&m, &format!("kvpool_proxy_{name}_total{{{label}}}"));
    assert_eq!(
        series("prefix_lookups", "outcome=\"answered\""),
        5.0,
        "{m:?}"
    );
    assert_eq!(series("prefill_choices", "reason=\"prefix\""), 4.0, "{m:?}");
    assert_eq!(
        series("prefill_choices", "reason=\"affinity\""),
        1.0,
        "{m:?}"
    );
    assert_eq!(
        value(&m, "kvpool_proxy_prefix_blocks_matched_total"),
        matched as f64
    );

    // A proxy whose master does not answer still serves, by affinity.
    let mut args = vec![
        "--prefill",
        &p0,
        "--prefill",
        &p1,
        "--decode",
        &du,
        "--master",
        "127.0.0.1:1",
    ];
    if by_namespace {
        args.extend_from_slice(&["--prefix-namespace", ns]);
    }
    let px2 = proxy(&args);
    let (path, body, _) = prefix_request(by_namespace, 0, 4);
    let (status, head, r) = http_head(&px2.addr("proxy"), "POST", path, &body.to_string()).await;
    assert_eq!(status, 200, "{r}");
    assert!(header(&head, "x-kvpool-prefiller").is_some(), "{head}");
    assert_eq!(header(&head, "x-kvpool-prefix-blocks"), None, "{head}");
}

/// `kvpool proxy` in front of two prefillers and a decoder: requests go prefill, then
/// decode with the hand-off, and the decoder's answer carries exactly the prefiller's KV;
/// requests sharing a prefix stick to one prefiller; a dead prefiller is routed around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_routes_prefill_then_decode() {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let producer = ["--role", "kv_producer", "--bootstrap-port", "0"];
    let mut p = [sim(&master, &producer), sim(&master, &producer)];
    let d = sim(
        &master,
        &["--role", "kv_consumer", "--consumer-timeout", "10s"],
    );
    let url = |proc: &Proc| format!("http://{}", proc.addr("http"));
    let proxy = Proc::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--prefill",
        &url(&p[0]),
        "--prefill",
        &url(&p[1]),
        "--decode",
        &url(&d),
        "--health-interval",
        "200ms",
        "--affinity-tokens",
        "64",
    ]);
    let px = proxy.addr("proxy");
    let (status, _) = http(&px, "GET", "/health", "").await;
    assert_eq!(status, 200);

    // Two requests sharing their first 64 tokens, through the proxy.
    let shared = prompt(21, 64);
    let mut served_by = Vec::new();
    for seed in [22, 23] {
        let mut toks = shared.clone();
        toks.extend(prompt(seed, 80));
        let r = complete(
            &px,
            &format!(r#"{{"prompt": {}, "max_tokens": 4}}"#, ids(&toks)),
        )
        .await;
        // The decoder's answer: all 9 full blocks loaded from the hand-off, byte for byte.
        assert_kv(&r, 9, 9);
        assert_eq!(r["kvpool"]["kv_transfer_failed"], Value::Null, "{r}");
        let mut reqs = Vec::new();
        for x in &p {
            reqs.push(stats(&x.addr("http")).await["requests"].u());
        }
        served_by.push(reqs);
    }
    // Both went to the same prefiller (prefix affinity), none to the other.
    let last = served_by.last().unwrap().clone();
    let (hot, cold) = if last[0] == 2 { (0, 1) } else { (1, 0) };
    assert_eq!((last[hot], last[cold]), (2, 0), "{served_by:?}");

    // The affine prefiller dies: the next request with that prefix is prefilled by the other.
    p[hot].kill();
    let mut toks = shared.clone();
    toks.extend(prompt(24, 80));
    let r = complete(
        &px,
        &format!(r#"{{"prompt": {}, "max_tokens": 4}}"#, ids(&toks)),
    )
    .await;
    assert_kv(&r, 9, 9);
    assert_eq!(stats(&p[cold].addr("http")).await["requests"].u(), 1);
    let (status, b) = http(&px, "GET", "/backends", "").await;
    assert_eq!(status, 200);
    let Some(list) = b.as_array() else {
        panic!("{b}")
    };
    let dead = format!("http://{}", p[hot].addr("http"));
    assert!(
        list.iter().any(|e| e["url"] == dead && !e["healthy"].b()),
        "{b}"
    );

    // Bad JSON is the caller's error, answered by the proxy itself.
    let (status, _) = http(&px, "POST", "/v1/completions", "{not json").await;
    assert_eq!(status, 400);

    // No decoder left: a clear 502 naming it, and the proxy reports itself unhealthy.
    let mut d = d;
    d.kill();
    let (status, j) = http(
        &px,
        "POST",
        "/v1/completions",
        &format!(r#"{{"prompt": {}, "max_tokens": 4}}"#, ids(&toks)),
    )
    .await;
    assert_eq!(status, 502, "{j}");
    assert!(j.to_string().contains("no decoder answered"), "{j}");
    wait_until(
        "the proxy reports itself unhealthy",
        Duration::from_secs(10),
        || {
            let px = px.clone();
            async move { http(&px, "GET", "/health", "").await.0 == 503 }
        },
    )
    .await;
}

/// `kvpool proxy --http`: `/ready` follows the engines' health, and the counters move with a
/// streamed completion, an unstreamed chat and a request no decoder can take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_exports_its_metrics() {
    let pool = up("128MiB", &[]);
    let master = pool.addr("master");
    let producer = ["--role", "kv_producer", "--bootstrap-port", "0"];
    let mut p = [sim(&master, &producer), sim(&master, &producer)];
    let mut d = sim(
        &master,
        &[
            "--role",
            "kv_consumer",
            "--consumer-timeout",
            "10s",
            "--token-interval",
            "200ms",
        ],
    );
    let (pu, p2u, du) = (url(&p[0]), url(&p[1]), url(&d));
    let px = proxy(&[
        "--prefill",
        &pu,
        "--prefill",
        &p2u,
        "--decode",
        &du,
        "--http",
        "127.0.0.1:0",
    ]);
    let (api, ops) = (px.addr("proxy"), px.addr("http"));
    let up_series =
        |u: &str, role: &str| format!("kvpool_proxy_engine_up{{engine=\"{u}\",role=\"{role}\"}}");
    let req = |route: &str, outcome: &str| {
        format!("kvpool_proxy_requests_total{{route=\"{route}\",outcome=\"{outcome}\"}}")
    };
    let handoffs = |e: &str| format!("kvpool_proxy_handoffs_total{{event=\"{e}\"}}");

    assert_eq!(get(&ops, "/health").0, 200);
    let (code, why) = get(&ops, "/ready");
    assert_eq!(code, 200, "{why}");
    let m = scrape(&ops);
    assert_eq!(value(&m, &up_series(&pu, "prefill")), 1.0, "{m:?}");
    assert_eq!(value(&m, &up_series(&du, "decode")), 1.0, "{m:?}");
    assert_eq!(value(&m, &req("completions", "ok")), 0.0);
    assert!(
        m.contains_key(&req("chat", "no_decoder")),
        "zeros exported: {m:?}"
    );

    // A streamed completion: open while its events flow.
    let body = json!({"prompt": prompt(41, 40), "max_tokens": 3, "stream": true});
    let mut s = Stream::open(&api, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(s.status, 200, "{}", s.head);
    let first = s.next_event().await.expect("a first event");
    assert_eq!(value(&scrape(&ops), "kvpool_proxy_streams_open"), 1.0);
    let (_, done) = events(&(first + &s.rest().await));
    assert!(done, "the stream ended without [DONE]");

    // An unstreamed chat.
    let body = json!({
        "model": "test/llama-tiny", "max_completion_tokens": 2,
        "messages": [{"role": "user", "content": "Tell me about KV caches, at length please."}],
    });
    let (status, r) = http(&api, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200, "{r}");

    // The decode's time is taken when its body ends, after the caller has the last byte.
    let o = ops.clone();
    wait_until("both decodes observed", Duration::from_secs(10), || {
        let o = o.clone();
        async move { value(&scrape(&o), "kvpool_proxy_decode_duration_seconds_count") == 2.0 }
    })
    .await;
    let m = scrape(&ops);
    assert_eq!(value(&m, &req("completions", "ok")), 1.0, "{m:?}");
    assert_eq!(value(&m, &req("chat", "ok")), 1.0, "{m:?}");
    assert_eq!(value(&m, &handoffs("started")), 2.0, "{m:?}");
    assert_eq!(value(&m, &handoffs("failed")), 0.0, "{m:?}");
    assert_eq!(value(&m, "kvpool_proxy_streams_total"), 1.0, "{m:?}");
    assert_eq!(value(&m, "kvpool_proxy_streams_open"), 0.0, "{m:?}");
    assert_eq!(
        value(&m, "kvpool_proxy_prefill_duration_seconds_count"),
        2.0
    );
    // No --master: the affinity hash chose both times, and the master was never asked.
    assert_eq!(
        value(
            &m,
            "kvpool_proxy_prefill_choices_total{reason=\"affinity\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "kvpool_proxy_prefix_lookups_total{outcome=\"answered\"}"
        ),
        0.0
    );

    // The decoder dies: the health check takes it out, /ready says why, and a request that
    // was handed off reaches no decoder.
    d.kill();
    let o = ops.clone();
    wait_until("/ready turns 503", Duration::from_secs(10), || {
        let o = o.clone();
        async move { get(&o, "/ready").0 == 503 }
    })
    .await;
    let (_, why) = get(&ops, "/ready");
    assert!(why.contains("no healthy decoder"), "{why}");
    let body = json!({"prompt": prompt(42, 40), "max_tokens": 2});
    let (status, r) = http(&api, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(status, 502, "{r}");
    let m = scrape(&ops);
    assert_eq!(value(&m, &up_series(&du, "decode")), 0.0, "{m:?}");
    assert_eq!(value(&m, &req("completions", "no_decoder")), 1.0, "{m:?}");
    assert_eq!(value(&m, &handoffs("started")), 3.0, "{m:?}");
    assert_eq!(value(&m, &handoffs("failed")), 1.0, "{m:?}");
    assert_eq!(value(&m, &handoffs("retried")), 0.0, "{m:?}");

    // Both prefillers die: the prefill is tried on one, retried on the other, and fails.
    for x in &mut p {
        x.kill();
    }
    let (status, r) = http(&api, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(status, 502, "{r}");
    let m = scrape(&ops);
    assert_eq!(value(&m, &handoffs("retried")), 1.0, "{m:?}");
    assert_eq!(value(&m, &req("completions", "no_prefiller")), 1.0, "{m:?}");
    assert_eq!(value(&m, &handoffs("started")), 3.0, "{m:?}");
}
