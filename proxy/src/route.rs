//! The HTTP side: the OpenAI routes (prefill, then decode, the decoder's answer streamed back
//! as it comes) and the engine client.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State as Extract};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_64;

use crate::backends::{Backend, Backends, InFlight};
use crate::metrics::{Choice, OpenStream, Outcome, ProxyMetrics};
use crate::placement::{self, Placement};
use crate::ProxyConfig;

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The prefiller that served a request's prefill (a response header).
const PREFILLER: HeaderName = HeaderName::from_static("x-kvpool-prefiller");
/// Leading prompt blocks the master found on that prefiller's host (a response header; absent
/// when placement was not asked).
const PREFIX_BLOCKS: HeaderName = HeaderName::from_static("x-kvpool-prefix-blocks");

#[derive(Clone)]
pub(crate) struct State {
    backends: Arc<Backends>,
    pub(crate) http: HttpClient,
    request_timeout: Duration,
    affinity_tokens: usize,
    next_id: Arc<AtomicU64>,
    placement: Option<Arc<Placement>>,
    metrics: Arc<ProxyMetrics>,
}

impl State {
    pub(crate) fn new(
        backends: Arc<Backends>,
        metrics: Arc<ProxyMetrics>,
        cfg: &ProxyConfig,
    ) -> Self {
        State {
            backends,
            metrics,
            http: Client::builder(TokioExecutor::new()).build_http(),
            request_timeout: cfg.request_timeout,
            affinity_tokens: cfg.affinity_tokens,
            next_id: Arc::new(AtomicU64::new(0)),
            placement: cfg
                .pool
                .clone()
                .map(|c| Arc::new(Placement::new(c, cfg.prefix_namespace.as_ref()))),
        }
    }
}

/// Which OpenAI route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }

    /// The part of a request that is the prompt.
    fn prompt(self, req: &Value) -> &Value {
        match self {
            Api::Completions => &req["prompt"],
            Api::Chat => &req["messages"],
        }
    }
}

pub(crate) fn router(state: State) -> Router {
    Router::new()
        .route(
            "/v1/completions",
            post(|st: Extract<State>, body: Bytes| handle(st, body, Api::Completions)),
        )
        .route(
            "/v1/chat/completions",
            post(|st: Extract<State>, body: Bytes| handle(st, body, Api::Chat)),
        )
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/backends", get(backends))
        // Token ids as JSON are ~7 bytes each: room for long prompts, past axum's 2 MB (the
        // engines set their own limits).
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

fn raw(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn health(Extract(st): Extract<State>) -> Response {
    let up = |v: &[Arc<Backend>]| v.iter().any(|b| b.is_healthy());
    let prefill_ok = st.backends.prefillers.is_empty() || up(&st.backends.prefillers);
    if prefill_ok && up(&st.backends.decoders) {
        (StatusCode::OK, "ok").into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy prefiller or no healthy decoder",
        )
    }
}

async fn backends(Extract(st): Extract<State>) -> Response {
    Json(st.backends.views()).into_response()
}

/// `GET /v1/models`: the first engine to answer, decoders first (they serve the answers),
/// healthy ones first.
async fn models(Extract(st): Extract<State>) -> Response {
    let mut order = st.backends.decode_order();
    let mut prefill = st.backends.prefill_order(0);
    prefill.sort_by_key(|b| !b.is_healthy());
    order.extend(prefill);
    let mut failures = Vec::new();
    for b in order {
        match get_body(
            &st.http,
            &format!("{}/v1/models", b.url),
            st.request_timeout,
        )
        .await
        {
            Ok((status, body)) if status.is_success() => return raw(status, body),
            Ok((status, _)) => failures.push(format!("{}: HTTP {status}", b.url)),
            Err(e) => failures.push(format!("{}: {e}", b.url)),
        }
    }
    error(
        StatusCode::BAD_GATEWAY,
        format!("no engine answered /v1/models: {}", failures.join("; ")),
    )
}

/// The hash that picks the prefiller: the first `n` tokens of a token-id prompt, or the
/// first `n` characters of a text prompt (a prefix of the text is a prefix of the tokens,
/// near enough for routing); a chat's messages as JSON text.
fn affinity(prompt: &Value, n: usize) -> u64 {
    match prompt {
        Value::Array(ids) if ids.iter().all(Value::is_number) => {
            let bytes: Vec<u8> = ids
                .iter()
                .take(n)
                .flat_map(|t| t.as_u64().unwrap_or(u64::MAX).to_le_bytes())
                .collect();
            xxh3_64(&bytes)
        }
        Value::String(s) => {
            let end = s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
            xxh3_64(&s.as_bytes()[..end])
        }
        Value::Null => 0,
        other => affinity(&Value::String(other.to_string()), n),
    }
}

/// Where an engine's answer carries the hand-off: at the top level (vLLM) or under
/// `kvpool` (older kvpool-sim answers).
fn handoff_params(answer: &Value) -> Option<Value> {
    [
        &answer["kv_transfer_params"],
        &answer["kvpool"]["kv_transfer_params"],
    ]
    .into_iter()
    .find(|v| v.is_object())
    .cloned()
}

/// The prefill request: the caller's, cut to one token and not streamed (as vLLM's P/D
/// proxies send it), asking the producer to hold the KV for a remote decode.
fn prefill_request(req: &Value, api: Api) -> Value {
    let mut p = req.clone();
    p["max_tokens"] = json!(1);
    if api == Api::Chat {
        p["max_completion_tokens"] = json!(1);
    }
    p["stream"] = json!(false);
    if let Some(o) = p.as_object_mut() {
        o.remove("stream_options");
        o.remove("min_tokens");
    }
    p["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false});
    p
}

async fn handle(Extract(st): Extract<State>, body: Bytes, api: Api) -> Response {
    let (resp, outcome) = serve(&st, body, api).await;
    st.metrics.request(api == Api::Chat, outcome);
    resp
}

/// What `status` from an engine, passed back to the caller, counts as.
fn outcome_of(status: StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Ok
    } else {
        Outcome::Rejected
    }
}

/// One request, prefill then decode: the answer and how it ended (for the metrics).
async fn serve(st: &State, body: Bytes, api: Api) -> (Response, Outcome) {
    let rejected = |m: String| (error(StatusCode::BAD_REQUEST, m), Outcome::Rejected);
    let mut req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return rejected("the request must be a JSON object".into()),
        Err(e) => return rejected(format!("bad JSON: {e}")),
    };
    let id = match req.get("request_id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => format!("proxy-{}", st.next_id.fetch_add(1, Ordering::Relaxed)),
    };
    req["request_id"] = json!(id);

    let mut prefilled = None;
    let mut handed_off = false;
    if !st.backends.prefillers.is_empty() {
        let (order, prefix) = prefill_order(st, &req, api).await;
        let started = Instant::now();
        let answer = match first_answer(st, order, api, &id, &prefill_request(&req, api)).await {
            Ok((status, body, _)) if !status.is_success() => {
                return (raw(status, body), outcome_of(status))
            }
            Ok((_, body, url)) => {
                st.metrics.prefilled(started);
                let blocks = prefix
                    .iter()
                    .flatten()
                    .find(|(u, _)| *u == url)
                    .map_or(0, |(_, n)| *n);
                let why = if blocks > 0 {
                    Choice::Prefix
                } else {
                    Choice::Affinity
                };
                st.metrics.chosen(why, blocks);
                prefilled = Some((url, prefix));
                body
            }
            Err(failures) => {
                return (
                    error(
                        StatusCode::BAD_GATEWAY,
                        format!("no prefiller answered: {failures}"),
                    ),
                    Outcome::NoPrefiller,
                )
            }
        };
        // A prefiller that answers without a hand-off (not a kv_producer) leaves the decoder
        // to compute the prompt itself.
        if let Some(mut params) = serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| handoff_params(&v))
        {
            params["do_remote_prefill"] = json!(true);
            params["do_remote_decode"] = json!(false);
            req["kv_transfer_params"] = params;
            handed_off = true;
            st.metrics.handoff("started");
        }
    }
    let mut resp = match forward(st, st.backends.decode_order(), api, &id, &req).await {
        Ok(r) => r,
        Err(failures) => {
            if handed_off {
                st.metrics.handoff("failed");
            }
            return (
                error(
                    StatusCode::BAD_GATEWAY,
                    format!("no decoder answered: {failures}"),
                ),
                Outcome::NoDecoder,
            );
        }
    };
    let outcome = outcome_of(resp.status());
    if let Some((url, prefix)) = prefilled {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&url) {
            h.insert(PREFILLER, v);
        }
        if let Some((_, n)) = prefix.iter().flatten().find(|(u, _)| *u == url) {
            h.insert(PREFIX_BLOCKS, HeaderValue::from(*n));
        }
    }
    (resp, outcome)
}

/// Leading prompt blocks found on each prefiller's host, by URL.
type Held = Vec<(String, usize)>;

/// Prefillers in the order to try, and how many leading blocks each one's host holds
/// (`None`: placement was not asked or could not answer). Affinity order, with the
/// prefillers whose host holds the longest prefix moved to the front when the pool knows.
async fn prefill_order(st: &State, req: &Value, api: Api) -> (Vec<Arc<Backend>>, Option<Held>) {
    let prompt = api.prompt(req);
    let order = st
        .backends
        .prefill_order(affinity(prompt, st.affinity_tokens));
    let Some(pl) = &st.placement else {
        return (order, None);
    };
    if order.len() < 2 || pl.is_off() {
        return (order, None);
    }
    // Each step has its own limit (`placement::LIMIT`): a master that does not answer in time
    // turns placement off for a while (in `locate`); a slow engine only costs this request.
    let found = async {
        let keys = match &pl.hasher {
            None => block_keys(st, &order[0], api, prompt).await?,
            Some(_) => {
                let tokens = tokens(st, &order[0], api, req).await?;
                pl.keys_of(&tokens).unwrap_or_default()
            }
        };
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        pl.locate(&keys).await
    };
    let found = match found.await {
        Ok(f) => {
            st.metrics.lookup(true);
            f
        }
        Err(e) => {
            st.metrics.lookup(false);
            tracing::debug!("prefix placement unavailable, affinity decides: {e}");
            return (order, None);
        }
    };
    let mut ranked: Vec<(usize, Arc<Backend>)> = order
        .into_iter()
        .map(|b| {
            let n = placement::leading_on_host(&found, placement::url_host(&b.url));
            (n, b)
        })
        .collect();
    // Stable: equal prefixes keep the affinity order; unhealthy engines stay last.
    ranked.sort_by_key(|(n, b)| (!b.is_healthy(), std::cmp::Reverse(*n)));
    let held = ranked.iter().map(|(n, b)| (b.url.clone(), *n)).collect();
    (ranked.into_iter().map(|(_, b)| b).collect(), Some(held))
}

/// The prompt's block keys as the engine at `b` computes them (`POST /kvpool/block_keys`).
async fn block_keys(
    st: &State,
    b: &Backend,
    api: Api,
    prompt: &Value,
) -> Result<Vec<String>, String> {
    let body = match api {
        Api::Completions => json!({ "prompt": prompt }),
        Api::Chat => json!({ "messages": prompt }),
    };
    let url = format!("{}/kvpool/block_keys", b.url);
    let v = ask_engine(st, &url, &body).await?;
    v["keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .ok_or_else(|| format!("{url}: no `keys` in the answer"))
}

/// A placement question to an engine (`POST url` with `body`, within the placement limit):
/// its JSON answer, or why there is none, naming `url`.
async fn ask_engine(st: &State, url: &str, body: &Value) -> Result<Value, String> {
    let (status, answer) = post_json(&st.http, url, body, None, placement::LIMIT)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    serde_json::from_slice(&answer).map_err(|e| format!("{url}: {e}"))
}

/// What of a request shapes its tokens besides the prompt, passed on to `/tokenize` (vLLM's
/// tokenize requests take the same fields, so the chat template renders alike).
const TOKENIZE_FIELDS: &[&str] = &[
    "add_special_tokens",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "tools",
];

/// The body of a `/tokenize` request for `req`.
fn tokenize_request(req: &Value, api: Api) -> Value {
    let mut body = match api {
        Api::Completions => json!({ "prompt": req["prompt"] }),
        Api::Chat => json!({ "messages": req["messages"], "add_generation_prompt": true }),
    };
    for f in TOKENIZE_FIELDS {
        if let Some(v) = req.get(*f) {
            body[*f] = v.clone();
        }
    }
    body
}

/// The prompt's token ids: a token-id prompt as it is; text, or a chat's messages (through
/// the engine's chat template), from the engine at `b` (`POST /tokenize`, vLLM's route).
async fn tokens(st: &State, b: &Backend, api: Api, req: &Value) -> Result<Vec<u32>, String> {
    if let (Api::Completions, Value::Array(ids)) = (api, &req["prompt"]) {
        return ids
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| "a prompt that is not one list of token ids".to_string());
    }
    let body = tokenize_request(req, api);
    let url = format!("{}/tokenize", b.url);
    let v = ask_engine(st, &url, &body).await?;
    v["tokens"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        })
        .ok_or_else(|| format!("{url}: no `tokens` in the answer"))
}

/// Whether an engine's answer means the engine (not the request) failed: try the next one.
fn engine_failed(status: StatusCode) -> bool {
    status.is_server_error()
}

/// Sends `body` to each engine in `order` until one answers with success or a client error
/// (the request's own fault: every engine would say the same), and reads the whole answer.
/// A connection failure, a timeout or a 5xx takes the engine out of rotation until its health
/// check passes, and the next is tried. `Err` lists why each engine failed, by URL.
async fn first_answer(
    st: &State,
    order: Vec<Arc<Backend>>,
    api: Api,
    id: &str,
    body: &Value,
) -> Result<(StatusCode, Bytes, String), String> {
    let mut failures = Vec::new();
    for (i, b) in order.into_iter().enumerate() {
        if i > 0 {
            // The engine before this one failed: the request moves on.
            st.metrics.handoff("retried");
        }
        let _busy = b.begin();
        let url = format!("{}{}", b.url, api.path());
        match post_json(&st.http, &url, body, Some(id), st.request_timeout).await {
            Ok((status, answer)) if !engine_failed(status) => {
                b.record(true);
                return Ok((status, answer, b.url.clone()));
            }
            Ok((status, _)) => {
                b.record(false);
                failures.push(format!("{}: HTTP {status}", b.url));
            }
            Err(e) => {
                b.record(false);
                failures.push(format!("{}: {e}", b.url));
            }
        }
    }
    Err(failures.join("; "))
}

/// Like [`first_answer`], but the answer's body is passed through as it arrives (a stream's
/// events, or a whole JSON answer) rather than read first. Only the response head is awaited
/// within the request timeout; once it is in, the engine has the request and the body flows
/// for as long as it takes. Dropping the returned response (the client went away) drops the
/// engine connection, which is how vLLM (and kvpool-sim) learn to abort the request.
async fn forward(
    st: &State,
    order: Vec<Arc<Backend>>,
    api: Api,
    id: &str,
    body: &Value,
) -> Result<Response, String> {
    let mut failures = Vec::new();
    let bytes = Bytes::from(serde_json::to_vec(body).map_err(|e| e.to_string())?);
    for (i, b) in order.into_iter().enumerate() {
        if i > 0 {
            st.metrics.handoff("retried");
        }
        let started = Instant::now();
        let busy = b.begin();
        let url = format!("{}{}", b.url, api.path());
        let req = match request(&url, bytes.clone(), Some(id)) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: {e}", b.url));
                continue;
            }
        };
        match tokio::time::timeout(st.request_timeout, st.http.request(req)).await {
            Ok(Ok(resp)) if !engine_failed(resp.status()) => {
                b.record(true);
                let (head, incoming) = resp.into_parts();
                let streamed = head
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/event-stream"));
                let mut out = Response::new(Body::new(Guarded {
                    inner: incoming,
                    _busy: busy,
                    _stream: streamed.then(|| st.metrics.stream()),
                    metrics: Arc::clone(&st.metrics),
                    started,
                }));
                *out.status_mut() = head.status;
                for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
                    if let Some(v) = head.headers.get(&name) {
                        out.headers_mut().insert(name, v.clone());
                    }
                }
                return Ok(out);
            }
            Ok(Ok(resp)) => {
                b.record(false);
                failures.push(format!("{}: HTTP {}", b.url, resp.status()));
            }
            Ok(Err(e)) => {
                b.record(false);
                failures.push(format!("{}: {e}", b.url));
            }
            Err(_) => {
                b.record(false);
                failures.push(format!(
                    "{}: no answer within {:?}",
                    b.url, st.request_timeout
                ));
            }
        }
    }
    Err(failures.join("; "))
}

/// An engine's response body, counted in flight on its engine (and as an open stream) until
/// it ends or is dropped; the decode's duration is observed then, so a stream counts its
/// whole length, not just its first event.
struct Guarded {
    inner: Incoming,
    _busy: InFlight,
    _stream: Option<OpenStream>,
    metrics: Arc<ProxyMetrics>,
    started: Instant,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.metrics.decoded(self.started);
    }
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn request(
    url: &str,
    body: Bytes,
    id: Option<&str>,
) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
    let mut r = hyper::Request::post(url).header(header::CONTENT_TYPE, "application/json");
    if let Some(id) = id {
        // vLLM takes the request id from this header (its P/D proxies send it to both).
        r = r.header("x-request-id", id);
    }
    Ok(r.body(Full::new(body))?)
}

async fn post_json(
    http: &HttpClient,
    url: &str,
    body: &Value,
    id: Option<&str>,
    limit: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = request(url, Bytes::from(serde_json::to_vec(body)?), id)?;
    let exchange = async {
        let resp = http.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {limit:?}"))?
}

async fn get_body(
    http: &HttpClient,
    url: &str,
    limit: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = hyper::Request::get(url).body(Full::new(Bytes::new()))?;
    let exchange = async {
        let resp = http.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {limit:?}"))?
}

pub(crate) async fn get_ok(http: &HttpClient, url: &str, limit: Duration) -> bool {
    let Ok(req) = hyper::Request::get(url).body(Full::new(Bytes::new())) else {
        return false;
    };
    matches!(
        tokio::time::timeout(limit, http.request(req)).await,
        Ok(Ok(resp)) if resp.status().is_success()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_the_prefix() {
        let a = json!([1, 2, 3, 4, 5]);
        let b = json!([1, 2, 3, 9, 9]);
        assert_eq!(affinity(&a, 3), affinity(&b, 3));
        assert_ne!(affinity(&a, 4), affinity(&b, 4));
        assert_eq!(
            affinity(&json!("héllo world"), 5),
            affinity(&json!("héllo there"), 5)
        );
        assert_eq!(affinity(&json!(null), 5), 0);
        // Chat messages: their JSON text's first characters.
        let m = |s: &str| json!([{"role": "system", "content": "You are kind."}, {"role": "user", "content": s}]);
        assert_eq!(affinity(&m("hi"), 40), affinity(&m("ho"), 40));
        assert_ne!(affinity(&m("hi"), 200), affinity(&m("ho"), 200));
    }

    #[test]
    fn params_found_at_either_place() {
        let p = json!({"transfer_id": "t"});
        assert_eq!(
            handoff_params(&json!({"kv_transfer_params": p})),
            Some(p.clone())
        );
        assert_eq!(
            handoff_params(&json!({"kvpool": {"kv_transfer_params": p}})),
            Some(p)
        );
        assert_eq!(handoff_params(&json!({"kvpool": {}})), None);
    }

    #[test]
    fn tokenize_gets_what_shapes_the_tokens() {
        let req = json!({
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "chat_template_kwargs": {"enable_thinking": false}, "tools": [],
            "add_generation_prompt": false,
        });
        assert_eq!(
            tokenize_request(&req, Api::Chat),
            json!({
                "messages": req["messages"], "add_generation_prompt": false,
                "chat_template_kwargs": {"enable_thinking": false}, "tools": [],
            })
        );
        assert_eq!(
            tokenize_request(&json!({"prompt": "x", "stream": true}), Api::Completions),
            json!({"prompt": "x"})
        );
    }

    #[test]
    fn the_prefill_is_one_token_unstreamed_and_asks_for_a_remote_decode() {
        let req = json!({
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
            "stream": true, "stream_options": {"include_usage": true}, "min_tokens": 3,
        });
        let p = prefill_request(&req, Api::Chat);
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["stream"], false);
        assert!(p.get("stream_options").is_none() && p.get("min_tokens").is_none());
        assert_eq!(
            p["kv_transfer_params"],
            json!({"do_remote_decode": true, "do_remote_prefill": false})
        );
        assert_eq!(p["messages"], req["messages"]);
        let c = prefill_request(&json!({"prompt": "x"}), Api::Completions);
        assert!(c.get("max_completion_tokens").is_none());
    }
}
