//! `kvpool proxy`: a P/D router in front of prefill (`kv_producer`) and decode
//! (`kv_consumer`) engines, speaking the OpenAI API (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`). User documentation: docs/proxy.md.
//!
//! A request goes to a prefiller with `max_tokens = 1`, `stream = false` and
//! `kv_transfer_params = {"do_remote_decode": true}`; the hand-off parameters it answers with
//! go to a decoder with the original request, and the decoder's answer (server-sent events
//! when the caller asked for a stream) is passed back to the caller as it arrives. The KV
//! itself moves through the pool (docs/connector.md, "P/D hand-off").
//!
//! Beyond vLLM's example proxy: several prefillers and decoders; health checks that take a
//! failing engine out of rotation and put it back when it answers again; a prefill that fails
//! is retried on the next prefiller; the prefiller is the one whose host holds the longest
//! prefix of the prompt (asked of the master, `placement`), else by prefix affinity
//! (rendezvous hashing of the first `affinity_tokens` tokens). With no prefillers it is a
//! plain router over the decoders.

mod backends;
mod metrics;
mod placement;
mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use backends::{Backend, Backends};
pub use metrics::{ProxyMetrics, ProxyProbe};
pub use placement::KeyNamespace;

/// Where `kvpool proxy` serves `/metrics`, `/health` and `/ready` unless told: loopback, the
/// port after the master's (9003) and the storage node's (9004), so all three fit on one host.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9005";

/// How the proxy is set up.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: String,
    /// Base URLs (`http://host:port`) of prefill engines.
    pub prefillers: Vec<String>,
    /// Base URLs of decode engines.
    pub decoders: Vec<String>,
    /// How often each engine's `GET /health` is polled [2 s].
    pub health_interval: Duration,
    /// Limit for one engine request [600 s]: long generations are legitimate.
    pub request_timeout: Duration,
    /// Prompt tokens (or characters of a text prompt) that pick the prefiller [256].
    pub affinity_tokens: usize,
    /// The pool's master, asked where a prompt's prefix lives to pick the prefiller holding
    /// it [none: affinity only].
    pub pool: Option<kvpool_client::ClientConfig>,
    /// The engines' key namespace: the proxy then hashes block keys itself (tokens from the
    /// prefiller's `/tokenize`) instead of asking the engine's `/kvpool/block_keys` [none].
    pub prefix_namespace: Option<KeyNamespace>,
}

impl ProxyConfig {
    pub fn new(prefillers: Vec<String>, decoders: Vec<String>) -> Self {
        ProxyConfig {
            listen: "127.0.0.1:8000".into(),
            prefillers,
            decoders,
            health_interval: Duration::from_secs(2),
            request_timeout: Duration::from_secs(600),
            affinity_tokens: 256,
            pool: None,
            prefix_namespace: None,
        }
    }
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub backends: Arc<Backends>,
    pub metrics: Arc<ProxyMetrics>,
}

impl Proxy {
    /// The proxy as a part of a `kvpool-ops` endpoint: its metrics and its readiness.
    pub fn probe(&self) -> Arc<ProxyProbe> {
        Arc::new(ProxyProbe {
            metrics: Arc::clone(&self.metrics),
            backends: Arc::clone(&self.backends),
        })
    }
}

/// Binds, starts the health checker, and serves until `shutdown` completes (in a spawned
/// task; the returned handle ends with the server).
pub async fn start(
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(Proxy, tokio::task::JoinHandle<()>)> {
    anyhow::ensure!(
        !cfg.decoders.is_empty(),
        "the proxy needs at least one decoder (prefillers are optional)"
    );
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let backends = Arc::new(Backends::new(&cfg.prefillers, &cfg.decoders)?);
    let metrics = Arc::new(ProxyMetrics::new());
    let state = route::State::new(Arc::clone(&backends), Arc::clone(&metrics), &cfg);
    let health = tokio::spawn(backends::check_health(
        Arc::clone(&backends),
        state.http.clone(),
        cfg.health_interval,
    ));
    let app = route::router(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        health.abort();
        if let Err(e) = served {
            tracing::error!("proxy server: {e}");
        }
    });
    Ok((
        Proxy {
            addr,
            backends,
            metrics,
        },
        task,
    ))
}
