//! The HTTP side: the completions route (prefill, then decode) and the engine client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_64;

use crate::backends::Backends;
use crate::ProxyConfig;

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
pub(crate) struct State {
    backends: Arc<Backends>,
    pub(crate) http: HttpClient,
    request_timeout: Duration,
    affinity_tokens: usize,
    next_id: Arc<AtomicU64>,
}

impl State {
    pub(crate) fn new(backends: Arc<Backends>, cfg: &ProxyConfig) -> Self {
        State {
            backends,
            http: Client::builder(TokioExecutor::new()).build_http(),
            request_timeout: cfg.request_timeout,
            affinity_tokens: cfg.affinity_tokens,
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }
}

pub(crate) fn router(state: State) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/backends", get(backends))
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
    let up = |v: &[Arc<crate::Backend>]| v.iter().any(|b| b.is_healthy());
    if up(&st.backends.prefillers) && up(&st.backends.decoders) {
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

/// The hash that picks the prefiller: the first `n` tokens of a token-id prompt, or the
/// first `n` characters of a text prompt (a prefix of the text is a prefix of the tokens,
/// near enough for routing).
fn affinity(prompt: &Value, n: usize) -> u64 {
    match prompt {
        Value::Array(ids) => {
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
        _ => 0,
    }
}

/// Where an engine's answer carries the hand-off: at the top level (vLLM) or under
/// `kvpool` (kvpool-sim also reports its own counters there).
fn handoff_params(answer: &Value) -> Option<Value> {
    [
        &answer["kv_transfer_params"],
        &answer["kvpool"]["kv_transfer_params"],
    ]
    .into_iter()
    .find(|v| v.is_object())
    .cloned()
}

async fn completions(Extract(st): Extract<State>, body: Bytes) -> Response {
    let mut req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the request must be a JSON object"),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")),
    };
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return error(StatusCode::BAD_REQUEST, "streaming is not supported yet");
    }
    let id = match req.get("request_id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => format!("proxy-{}", st.next_id.fetch_add(1, Ordering::Relaxed)),
    };
    req["request_id"] = json!(id);
    let key = affinity(&req["prompt"], st.affinity_tokens);

    let mut prefill = req.clone();
    prefill["max_tokens"] = json!(1);
    prefill["kv_transfer_params"] = json!({"do_remote_decode": true});
    let answer = match first_answer(&st, st.backends.prefill_order(key), &prefill).await {
        Ok((status, body)) if status.is_success() => body,
        Ok((status, body)) => return raw(status, body),
        Err(failures) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("no prefiller answered: {failures}"),
            )
        }
    };
    // A prefiller that answers without a hand-off (not a kv_producer) leaves the decoder to
    // compute the prompt itself.
    if let Some(mut params) = serde_json::from_slice::<Value>(&answer)
        .ok()
        .and_then(|v| handoff_params(&v))
    {
        params["do_remote_prefill"] = json!(true);
        req["kv_transfer_params"] = params;
    }
    match first_answer(&st, st.backends.decode_order(), &req).await {
        Ok((status, body)) => raw(status, body),
        Err(failures) => error(
            StatusCode::BAD_GATEWAY,
            format!("no decoder answered: {failures}"),
        ),
    }
}

/// Sends `body` to each engine in `order` until one answers with success or a client error
/// (the request's own fault: every engine would say the same). A connection failure, a
/// timeout or a 5xx takes the engine out of rotation until its health check passes, and the
/// next is tried; a decode retried elsewhere finds the hand-off claimed or gone and
/// recomputes: slower, but the caller gets an answer. `Err` lists why each engine failed.
async fn first_answer(
    st: &State,
    order: Vec<Arc<crate::Backend>>,
    body: &Value,
) -> Result<(StatusCode, Bytes), String> {
    let mut failures = Vec::new();
    for b in order {
        let _busy = b.begin();
        let url = format!("{}/v1/completions", b.url);
        match post_json(&st.http, &url, body, st.request_timeout).await {
            Ok((status, answer)) if status.is_success() || status.is_client_error() => {
                b.record(true);
                return Ok((status, answer));
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

async fn post_json(
    http: &HttpClient,
    url: &str,
    body: &Value,
    limit: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = hyper::Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
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
}
