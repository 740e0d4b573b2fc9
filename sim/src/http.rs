//! The OpenAI-like HTTP front end: `POST /v1/completions`, `GET /stats`, `POST /abort`,
//! `GET /health`. Bodies are parsed by hand from the raw bytes so that every malformed request
//! gets a 400 with a message that says what is wrong (never a panic, never axum's bare
//! rejection text).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

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
        .route("/stats", get(stats))
        .route("/abort", post(abort))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        // Token ids as JSON are ~7 bytes each: room for a 1M-token prompt, past axum's 2 MB.
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(app)
}

impl App {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            in_flight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
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

/// Other OpenAI fields (model, temperature, stream, ...) are accepted and ignored, as a proxy
/// forwards whatever its client sent.
#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    kv_transfer_params: Option<Value>,
}

/// The most tokens one request may ask to generate: the sim does no decode work per token, but
/// an absurd figure is a client bug worth a 400.
const MAX_NEW_TOKENS: usize = 1 << 20;

/// Removes the request from the in-flight map however the handler ends (an abort, a dropped
/// connection, an answer).
struct InFlight<'a> {
    app: &'a App,
    id: String,
}

impl Drop for InFlight<'_> {
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

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Reply {
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad(format!("invalid request body: {e}")),
    };
    let tokens: Vec<u32> = match req.prompt {
        Prompt::Tokens(t) => t,
        Prompt::Text(s) => s.chars().map(u32::from).collect(),
    };
    if tokens.is_empty() {
        return app.bad("the prompt is empty");
    }
    let max_tokens = req.max_tokens.unwrap_or(16);
    if max_tokens > MAX_NEW_TOKENS {
        return app.bad(format!("max_tokens {max_tokens} is over {MAX_NEW_TOKENS}"));
    }
    let transfer = match transfer(&app, req.kv_transfer_params.as_ref()) {
        Ok(t) => t,
        Err(e) => return app.bad(e),
    };
    let id = req.request_id.unwrap_or_else(|| {
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
            return app.bad(format!("request_id {id:?} is already in flight"));
        }
        map.insert(id.clone(), (tx, params.clone()));
    }
    let _guard = InFlight {
        app: &app,
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
    let model = app.engine.config().model.clone();
    let answer = match served {
        None => {
            // The serve future is dropped: its blocks went back to the free list. The
            // producer is told so it drops its hold now rather than at its abort timeout.
            app.aborted.fetch_add(1, Relaxed);
            app.engine.pd.abort(&id, params.as_ref()).await;
            return (
                StatusCode::OK,
                Json(json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": "", "token_ids": [], "finish_reason": "abort"}],
                    "usage": {"prompt_tokens": tokens.len(), "completion_tokens": 0,
                              "total_tokens": tokens.len()},
                })),
            );
        }
        Some(Err(ServeError::BadRequest(m))) => return app.bad(m),
        Some(Err(ServeError::Busy(m))) => return error(StatusCode::SERVICE_UNAVAILABLE, m),
        Some(Ok(a)) => a,
    };
    let text: String = answer.output.iter().map(|t| format!("<{t}>")).collect();
    let mut out = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "text": text,
            "token_ids": answer.output,
            "finish_reason": "length",
        }],
        "usage": {
            "prompt_tokens": tokens.len(),
            "completion_tokens": answer.output.len(),
            "total_tokens": tokens.len() + answer.output.len(),
        },
        "kvpool": answer.report,
    });
    // Top level, where vLLM puts it and where P/D proxies read it from.
    if let Some(h) = answer.handoff {
        let mut p = serde_json::to_value(h).unwrap_or(Value::Null);
        if let Some(o) = p.as_object_mut() {
            o.insert("do_remote_prefill".into(), Value::Bool(true));
            o.insert("do_remote_decode".into(), Value::Bool(false));
        }
        out["kv_transfer_params"] = p;
    }
    (StatusCode::OK, Json(out))
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
