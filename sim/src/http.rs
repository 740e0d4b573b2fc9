//! The OpenAI-like HTTP front end: `POST /v1/completions` and `/v1/chat/completions` (whole
//! or streamed as server-sent events), `GET /v1/models`, `POST /tokenize`,
//! `POST /kvpool/block_keys`, `GET /stats`, `POST /abort`, `GET /health`. Bodies are parsed by hand from the raw bytes so that every malformed request
//! gets a 400 with a message that says what is wrong (never a panic, never axum's bare
//! rejection text).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::{
    engine::{Engine, ServeError, Transfer},
    pd::HandoffParams,
};

/// In-flight requests by id: the sender aborts the request, and the params (a consumer's) say
/// which producer to tell.
type InFlightMap = HashMap<String, (watch::Sender<bool>, Option<HandoffParams>)>;

pub struct App {
    pub engine: Engine,
    in_flight: Mutex<InFlightMap>,
    next_id: AtomicU64,
    aborted: AtomicU64,
    bad_requests: AtomicU64,
    /// Time between streamed tokens (`--token-interval`).
    token_interval: Duration,
    streams: Mutex<VecDeque<(String, Vec<u8>)>>,
}

type Reply = (StatusCode, Json<Value>);

fn error(status: StatusCode, msg: impl Into<String>) -> Reply {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (
        status,
        Json(json!({"error": {"message": msg.into(), "type": kind, "code": status.as_u16()}})),
    )
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/kvpool/block_keys", post(block_keys))
        .route("/debug/streams/{id}", get(debug_stream))
        .route("/stats", get(stats))
        .route("/abort", post(abort))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        // Token ids as JSON are ~7 bytes each: room for a 1M-token prompt, past axum's 2 MB.
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(app)
}

impl App {
    pub fn new(engine: Engine, token_interval: Duration) -> Self {
        Self {
            engine,
            in_flight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            token_interval,
            streams: Mutex::new(VecDeque::new()),
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlightMap> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bad(&self, msg: impl Into<String>) -> Reply {
        self.bad_requests.fetch_add(1, Relaxed);
        error(StatusCode::BAD_REQUEST, msg)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Tokens(Vec<u32>),
    /// Text is "tokenized" one Unicode scalar per token: enough for prefix sharing by hand.
    Text(String),
}

/// A chat message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A completion or chat request. Other OpenAI fields (model, temperature, ...) are accepted
/// and ignored, as a proxy forwards whatever its client sent.
#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`; wins when both are given.
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    kv_transfer_params: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// Which OpenAI route a request came in on: it decides where the prompt is and the answer's
/// shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

/// The chat template: each message as `<|ROLE|>\n` + its text + `\n`, then `<|assistant|>\n`
/// (the generation prompt). Text parts of a list content are concatenated; other part types
/// are refused.
fn render_chat(messages: &[Message]) -> Result<String, String> {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|");
        out.push_str(&m.role);
        out.push_str("|>\n");
        match &m.content {
            None => {}
            Some(Content::Text(t)) => out.push_str(t),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (k, _) => {
                            return Err(format!(
                                "message content of type {k:?} is not supported (text only)"
                            ))
                        }
                    }
                }
            }
        }
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    Ok(out)
}

/// The prompt's token ids: a completion's `prompt` (ids, or text one character per token), a
/// chat's `messages` rendered by [`render_chat`] and tokenized the same way.
fn tokens_of(req: &CompletionRequest, api: Api) -> Result<Vec<u32>, String> {
    let text = |s: &str| s.chars().map(u32::from).collect();
    match api {
        Api::Completions => match &req.prompt {
            Some(Prompt::Tokens(t)) => Ok(t.clone()),
            Some(Prompt::Text(s)) => Ok(text(s)),
            None => Err("invalid request body: missing field `prompt`".into()),
        },
        Api::Chat => match &req.messages {
            Some(m) if m.is_empty() => Err("messages is empty".into()),
            Some(m) => Ok(text(&render_chat(m)?)),
            None => Err("invalid request body: missing field `messages`".into()),
        },
    }
}

/// For the routes that take either (`/tokenize`, `/kvpool/block_keys`): chat when the body has
/// `messages`.
fn api_of(req: &CompletionRequest) -> Api {
    if req.messages.is_some() {
        Api::Chat
    } else {
        Api::Completions
    }
}

/// The most tokens one request may ask to generate: the sim does no decode work per token, but
/// an absurd figure is a client bug worth a 400.
const MAX_NEW_TOKENS: usize = 1 << 20;

/// Removes the request from the in-flight map however it ends (an abort, a dropped
/// connection, an answer, the end of its stream).
struct InFlight {
    app: Arc<App>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.app.in_flight().remove(&self.id);
    }
}

/// Which pool side `kv_transfer_params` asks for, or why it cannot be had.
fn transfer(app: &App, params: Option<&Value>) -> Result<Transfer, String> {
    let Some(p) = params else {
        return Ok(Transfer::Local);
    };
    let Some(obj) = p.as_object() else {
        return Err("kv_transfer_params must be an object".into());
    };
    let flag = |name: &str| -> Result<bool, String> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(format!(
                "kv_transfer_params.{name} must be a boolean, not {v}"
            )),
        }
    };
    let role = app.engine.pd.role;
    match (flag("do_remote_decode")?, flag("do_remote_prefill")?) {
        (true, true) => {
            Err("kv_transfer_params: do_remote_decode and do_remote_prefill are exclusive".into())
        }
        (true, false) if !app.engine.pd.produces() => Err(format!(
            "do_remote_decode needs --role kv_producer or kv_both; this engine is {role:?}"
        )),
        (true, false) => Ok(Transfer::RemoteDecode),
        (false, true) if !app.engine.pd.consumes() => Err(format!(
            "do_remote_prefill needs --role kv_consumer or kv_both; this engine is {role:?}"
        )),
        (false, true) => serde_json::from_value::<HandoffParams>(p.clone())
            .map(|h| Transfer::RemotePrefill(Box::new(h)))
            .map_err(|e| format!("kv_transfer_params: not a kvpool hand-off: {e}")),
        (false, false) => Ok(Transfer::Local),
    }
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    serve(app, body, Api::Completions).await
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    serve(app, body, Api::Chat).await
}

/// What every answer (whole or streamed) is made of.
struct Outcome {
    id: String,
    api: Api,
    created: u64,
    model: String,
    prompt_tokens: usize,
    output: Vec<u32>,
    finish: &'static str,
    report: Option<Value>,
    handoff: Option<Value>,
}

impl Outcome {
    fn text(tokens: &[u32]) -> String {
        tokens.iter().map(|t| format!("<{t}>")).collect()
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output.len(),
            "total_tokens": self.prompt_tokens + self.output.len(),
        })
    }

    /// The whole answer, for `"stream": false`.
    fn whole(&self) -> Value {
        let text = Self::text(&self.output);
        let choice = match self.api {
            Api::Completions => json!({
                "index": 0, "text": text, "token_ids": self.output,
                "logprobs": null, "finish_reason": self.finish,
            }),
            Api::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "token_ids": self.output, "logprobs": null, "finish_reason": self.finish,
            }),
        };
        let mut out = json!({
            "id": self.id,
            "object": match self.api { Api::Completions => "text_completion", Api::Chat => "chat.completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        });
        self.extras(&mut out);
        out
    }

    /// The `kvpool` report and, for a producer, the hand-off at the top level (where vLLM
    /// puts it and where P/D proxies read it from).
    fn extras(&self, out: &mut Value) {
        if let Some(r) = &self.report {
            out["kvpool"] = r.clone();
        }
        if let Some(h) = &self.handoff {
            out["kv_transfer_params"] = h.clone();
        }
    }

    /// One streamed chunk: `tokens` as its text (chat: its delta), `finish` on the last.
    fn chunk(&self, tokens: &[u32], role: bool, finish: Option<&str>) -> Value {
        let text = Self::text(tokens);
        let choice = match self.api {
            Api::Completions => json!({
                "index": 0, "text": text, "token_ids": tokens,
                "logprobs": null, "finish_reason": finish,
            }),
            Api::Chat => {
                let delta = if role {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({
                    "index": 0, "delta": delta, "token_ids": tokens,
                    "logprobs": null, "finish_reason": finish,
                })
            }
        };
        let mut c = json!({
            "id": self.id,
            "object": match self.api { Api::Completions => "text_completion", Api::Chat => "chat.completion.chunk" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if finish.is_some() {
            self.extras(&mut c);
        }
        c
    }

    fn usage_chunk(&self) -> Value {
        json!({
            "id": self.id,
            "object": match self.api { Api::Completions => "text_completion", Api::Chat => "chat.completion.chunk" },
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        })
    }
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

async fn serve(app: Arc<App>, body: Bytes, api: Api) -> Response {
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return app
                .bad(format!("invalid request body: {e}"))
                .into_response()
        }
    };
    let tokens = match tokens_of(&req, api) {
        Ok(t) => t,
        Err(e) => return app.bad(e).into_response(),
    };
    if tokens.is_empty() {
        return app.bad("the prompt is empty").into_response();
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(16);
    if max_tokens > MAX_NEW_TOKENS {
        return app
            .bad(format!("max_tokens {max_tokens} is over {MAX_NEW_TOKENS}"))
            .into_response();
    }
    let transfer = match transfer(&app, req.kv_transfer_params.as_ref()) {
        Ok(t) => t,
        Err(e) => return app.bad(e).into_response(),
    };
    let id = req.request_id.clone().unwrap_or_else(|| {
        format!(
            "cmpl-{}-{}",
            std::process::id(),
            app.next_id.fetch_add(1, Relaxed)
        )
    });
    let params = match &transfer {
        Transfer::RemotePrefill(p) => Some((**p).clone()),
        _ => None,
    };
    let (tx, mut rx) = watch::channel(false);
    {
        let mut map = app.in_flight();
        if map.contains_key(&id) {
            drop(map);
            return app
                .bad(format!("request_id {id:?} is already in flight"))
                .into_response();
        }
        map.insert(id.clone(), (tx, params.clone()));
    }
    let guard = InFlight {
        app: Arc::clone(&app),
        id: id.clone(),
    };

    let served = tokio::select! {
        r = app.engine.serve(&id, &tokens, max_tokens, transfer) => Some(r),
        _ = rx.wait_for(|a| *a) => None,
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = Outcome {
        id: id.clone(),
        api,
        created,
        model: app.engine.config().model.clone(),
        prompt_tokens: tokens.len(),
        output: Vec::new(),
        finish: "abort",
        report: None,
        handoff: None,
    };
    match served {
        None => {
            // The serve future is dropped: its blocks went back to the free list. The
            // producer is told so it drops its hold now rather than at its abort timeout.
            app.aborted.fetch_add(1, Relaxed);
            app.engine.pd.abort(&id, params.as_ref()).await;
        }
        Some(Err(ServeError::BadRequest(m))) => return app.bad(m).into_response(),
        Some(Err(ServeError::Busy(m))) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, m).into_response()
        }
        Some(Ok(a)) => {
            out.output = a.output;
            out.finish = "length";
            out.report = serde_json::to_value(a.report).ok();
            out.handoff = a.handoff.map(|h| {
                let mut p = serde_json::to_value(h).unwrap_or(Value::Null);
                if let Some(o) = p.as_object_mut() {
                    o.insert("do_remote_prefill".into(), Value::Bool(true));
                    o.insert("do_remote_decode".into(), Value::Bool(false));
                }
                p
            });
        }
    }
    if req.stream != Some(true) {
        return (StatusCode::OK, Json(out.whole())).into_response();
    }
    let usage = req.stream_options.unwrap_or_default().include_usage;
    let (chunks, body) = mpsc::channel::<Bytes>(1);
    tokio::spawn(stream(app, out, usage, guard, rx, chunks));
    let body = futures::stream::unfold(body, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Sends an answer as server-sent events: a chat's role delta, then one event per generated
/// token, `--token-interval` apart (the last one carries `finish_reason`, the `kvpool` report
/// and any hand-off), the usage chunk when `stream_options.include_usage`, and `[DONE]`. A
/// `POST /abort` ends it with `finish_reason: "abort"`; a client that goes away (the body is
/// dropped, so the next send fails) ends it too, counted as aborted. The request stays in
/// flight until its last event is sent. What was sent is kept for `GET /debug/streams/{id}`.
async fn stream(
    app: Arc<App>,
    out: Outcome,
    include_usage: bool,
    guard: InFlight,
    mut abort: watch::Receiver<bool>,
    chunks: mpsc::Sender<Bytes>,
) {
    let mut sent: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    if out.api == Api::Chat {
        events.push((false, out.chunk(&[], true, None)));
    }
    let n = out.output.len();
    for (i, t) in out.output.iter().enumerate() {
        let finish = (i + 1 == n).then_some(out.finish);
        events.push((i > 0, out.chunk(&[*t], false, finish)));
    }
    if n == 0 {
        events.push((false, out.chunk(&[], false, Some(out.finish))));
    }
    let mut gone = false;
    let mut aborted = false;
    for (wait, e) in events {
        if wait && !app.token_interval.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(app.token_interval) => {}
                _ = abort.wait_for(|a| *a) => { aborted = true; }
            }
        }
        let e = if aborted {
            out.chunk(&[], false, Some("abort"))
        } else {
            e
        };
        let b = event(&e);
        sent.extend_from_slice(&b);
        if chunks.send(b).await.is_err() {
            gone = true;
            break;
        }
        if aborted {
            break;
        }
    }
    if !gone {
        let mut tail = Vec::new();
        if include_usage {
            tail.push(event(&out.usage_chunk()));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for b in tail {
            sent.extend_from_slice(&b);
            if chunks.send(b).await.is_err() {
                gone = true;
                break;
            }
        }
    }
    if gone || aborted {
        app.aborted.fetch_add(1, Relaxed);
    }
    drop(guard);
    let mut kept = app.streams.lock().unwrap_or_else(|e| e.into_inner());
    if kept.len() >= KEPT_STREAMS {
        kept.pop_front();
    }
    kept.push_back((out.id, sent));
}

/// Streams kept for `GET /debug/streams/{id}`.
const KEPT_STREAMS: usize = 64;

/// `GET /debug/streams/{id}`: the exact bytes of a finished stream's body (the last
/// [`KEPT_STREAMS`]), so a test can compare what a client got through a proxy with what the
/// engine sent.
async fn debug_stream(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let kept = app.streams.lock().unwrap_or_else(|e| e.into_inner());
    match kept.iter().rev().find(|(i, _)| *i == id) {
        Some((_, b)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/event-stream")],
            b.clone(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no finished stream {id:?}")).into_response(),
    }
}

/// `GET /v1/models`: the one model this engine serves.
async fn models(State(app): State<Arc<App>>) -> Reply {
    let c = app.engine.config();
    let model = c.model.clone();
    (
        StatusCode::OK,
        Json(json!({
            "object": "list",
            "data": [{
                "id": model, "object": "model", "created": 0, "owned_by": "kvpool-sim",
                "root": model, "max_model_len": c.num_blocks * c.block_size,
            }],
        })),
    )
}

/// `POST /tokenize` (vLLM's): `{"prompt"}` or `{"messages"}` to the token ids this engine
/// would prefill.
async fn tokenize(State(app): State<Arc<App>>, body: Bytes) -> Reply {
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad(format!("invalid request body: {e}")),
    };
    match tokens_of(&req, api_of(&req)) {
        Ok(t) => {
            let c = app.engine.config();
            (
                StatusCode::OK,
                Json(
                    json!({"count": t.len(), "max_model_len": c.num_blocks * c.block_size, "tokens": t}),
                ),
            )
        }
        Err(e) => app.bad(e),
    }
}

/// `POST /kvpool/block_keys`: a completion or chat body (`prompt` or `messages`) to the pool
/// keys of its full blocks in this engine's namespace (the first layer group's object of each
/// block), what this engine's prefix lookup would ask for. `kvpool proxy` asks the master
/// where these live to pick the prefiller holding the longest prefix.
async fn block_keys(State(app): State<Arc<App>>, body: Bytes) -> Reply {
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad(format!("invalid request body: {e}")),
    };
    match tokens_of(&req, api_of(&req)) {
        Ok(t) => (
            StatusCode::OK,
            Json(json!({
                "tokens": t.len(),
                "block_size": app.engine.config().block_size,
                "keys": app.engine.probe_keys(&t),
            })),
        ),
        Err(e) => app.bad(e),
    }
}

async fn stats(State(app): State<Arc<App>>) -> Reply {
    let mut s = serde_json::to_value(app.engine.stats()).unwrap_or_else(|_| json!({}));
    s["role"] = json!(format!("{:?}", app.engine.pd.role));
    s["aborted_requests"] = json!(app.aborted.load(Relaxed));
    s["bad_requests"] = json!(app.bad_requests.load(Relaxed));
    s["in_flight"] = json!(app.in_flight().len());
    if let Some(p) = app.engine.pd.producer_stats() {
        s["producer"] = p;
    }
    (StatusCode::OK, Json(s))
}

#[derive(Deserialize)]
struct AbortRequest {
    request_id: String,
}

async fn abort(State(app): State<Arc<App>>, body: Bytes) -> Reply {
    let req: AbortRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad(format!("invalid abort body: {e}")),
    };
    // An in-flight request ends itself (and tells its producer); a finished producer request
    // still has a hold to drop.
    let in_flight = match app.in_flight().get(&req.request_id) {
        Some((tx, _)) => {
            let _ = tx.send(true);
            true
        }
        None => false,
    };
    let released = if in_flight {
        false
    } else {
        app.engine.pd.abort(&req.request_id, None).await
    };
    (
        StatusCode::OK,
        Json(json!({"request_id": req.request_id, "in_flight": in_flight, "released": released})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value) -> CompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn chat_messages_render_through_the_template() {
        let r = req(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant"},
        ]}));
        let want = "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n\n<|assistant|>\n";
        assert_eq!(render_chat(r.messages.as_ref().unwrap()).unwrap(), want);
        let toks = tokens_of(&r, Api::Chat).unwrap();
        assert_eq!(toks, want.chars().map(u32::from).collect::<Vec<_>>());
        assert_eq!(api_of(&r), Api::Chat);
        // A completion's text prompt: one token per character.
        let c = req(json!({"prompt": "hé"}));
        assert_eq!(tokens_of(&c, Api::Completions).unwrap(), vec![104, 233]);
        assert!(tokens_of(&c, Api::Chat).unwrap_err().contains("messages"));
        let img = req(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}));
        assert!(tokens_of(&img, Api::Chat)
            .unwrap_err()
            .contains("not supported"));
    }
}
