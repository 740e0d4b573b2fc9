//! The operator's HTTP endpoint, one implementation for every kvpool server: `/metrics`
//! (Prometheus / OpenMetrics text), `/health` (liveness: the process answers) and `/ready`
//! (readiness: every part in the process can serve).
//!
//! A server builds an [`Endpoint`], binds its HTTP listener, starts [`Endpoint::serve`], and
//! adds one [`Probe`] per part it runs (`kvpool up` adds the master's and the storage
//! node's). Parts own their metrics (`kvpool_master::metrics`, `kvpool_store::metrics`);
//! this crate only serves them, so master and store stay independent of each other.

use std::{
    fmt::Write as _,
    future::Future,
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::net::TcpListener;

pub mod per_op;
pub mod scrape;

pub use prometheus_client;

/// The OpenMetrics text content type `prometheus-client` encodes; Prometheus negotiates it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One part of a server, as an operator sees it.
pub trait Probe: Send + Sync + 'static {
    /// A short name for `/ready` answers ("master", "store").
    fn name(&self) -> &str;
    /// Appends this part's metrics in the text format, without the closing `# EOF` (the
    /// endpoint writes it once after every part). Gauges read at scrape time are refreshed
    /// here.
    fn encode(&self, out: &mut String) -> std::fmt::Result;
    /// `Ok` when the part can serve, else why not (one line).
    fn ready(&self) -> Result<(), String>;
}

/// The probes of one process, served over HTTP. Cheap to clone.
#[derive(Clone, Default)]
pub struct Endpoint {
    probes: Arc<RwLock<Vec<Arc<dyn Probe>>>>,
}

impl Endpoint {
    pub fn new() -> Endpoint {
        Endpoint::default()
    }

    /// Adds a part; `/ready` answers for every part added.
    pub fn add(&self, probe: Arc<dyn Probe>) {
        self.probes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(probe);
    }

    fn probes(&self) -> Vec<Arc<dyn Probe>> {
        self.probes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The `/metrics` body: every part's metrics, then `# EOF`.
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        for p in self.probes() {
            p.encode(&mut out)?;
        }
        out.push_str("# EOF\n");
        Ok(out)
    }

    /// `Ok` when at least one part is added and every part is ready; else one line per part
    /// that is not (a process whose parts are still starting is not ready either).
    pub fn readiness(&self) -> Result<(), String> {
        let probes = self.probes();
        if probes.is_empty() {
            return Err("starting".to_string());
        }
        let mut why = String::new();
        for p in &probes {
            if let Err(e) = p.ready() {
                let _ = writeln!(why, "{}: {e}", p.name());
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }

    /// Serves `/metrics`, `/health` and `/ready` on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .with_state(self);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn metrics(State(ep): State<Endpoint>) -> Response {
    match ep.metrics_text() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded\n",
        )
            .into_response(),
    }
}

/// Liveness: the process runs and its runtime answers. Deliberately checks nothing else, so
/// that an orchestrator restarts only a wedged process, never one waiting for its master.
async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(ep): State<Endpoint>) -> Response {
    match ep.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{why}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    struct Part(AtomicBool);

    impl Probe for Part {
        fn name(&self) -> &str {
            "part"
        }
        fn encode(&self, out: &mut String) -> std::fmt::Result {
            writeln!(out, "# TYPE part_up gauge\npart_up 1")
        }
        fn ready(&self) -> Result<(), String> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("not yet".into())
            }
        }
    }

    #[test]
    fn ready_needs_every_part_and_at_least_one() {
        let ep = Endpoint::new();
        assert_eq!(ep.readiness(), Err("starting".to_string()));
        let part = Arc::new(Part(AtomicBool::new(false)));
        ep.add(part.clone());
        assert_eq!(ep.readiness(), Err("part: not yet\n".to_string()));
        part.0.store(true, Ordering::Relaxed);
        assert_eq!(ep.readiness(), Ok(()));
        assert_eq!(
            ep.metrics_text().unwrap(),
            "# TYPE part_up gauge\npart_up 1\n# EOF\n"
        );
    }
}
