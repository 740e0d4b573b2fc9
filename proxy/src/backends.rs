//! The engines behind the proxy: their health and how one is picked.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::route::HttpClient;

/// One engine.
#[derive(Debug)]
pub struct Backend {
    pub url: String,
    healthy: AtomicBool,
    inflight: AtomicUsize,
    served: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot for `GET /backends`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub url: String,
    pub role: &'static str,
    pub healthy: bool,
    pub inflight: usize,
    pub served: u64,
    pub failed: u64,
}

impl Backend {
    fn new(url: &str) -> anyhow::Result<Self> {
        let url = url.trim_end_matches('/').to_string();
        anyhow::ensure!(
            url.starts_with("http://"),
            "engine URL {url:?} must start with http://"
        );
        Ok(Backend {
            url,
            // Optimistic until the first check: a proxy started next to its engines serves
            // at once, and a dead engine is found by the first failed request anyway.
            healthy: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests in flight on this engine now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    pub(crate) fn record(&self, ok: bool) {
        if ok {
            self.served.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.set_healthy(false);
        }
    }

    fn view(&self, role: &'static str) -> BackendView {
        BackendView {
            url: self.url.clone(),
            role,
            healthy: self.is_healthy(),
            inflight: self.inflight.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

pub(crate) struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Prefillers and decoders.
#[derive(Debug)]
pub struct Backends {
    pub prefillers: Vec<Arc<Backend>>,
    pub decoders: Vec<Arc<Backend>>,
}

impl Backends {
    pub fn new(prefillers: &[String], decoders: &[String]) -> anyhow::Result<Self> {
        let make = |urls: &[String]| -> anyhow::Result<Vec<Arc<Backend>>> {
            urls.iter().map(|u| Backend::new(u).map(Arc::new)).collect()
        };
        Ok(Backends {
            prefillers: make(prefillers)?,
            decoders: make(decoders)?,
        })
    }

    /// Prefillers in the order to try for a prompt whose affinity hash is `affinity`:
    /// rendezvous (highest random weight) order over the healthy ones, so one prefix always
    /// lands on the same prefiller while it is up and moves to one other when it is not; the
    /// unhealthy ones last, in case every engine was marked down by a blip.
    pub fn prefill_order(&self, affinity: u64) -> Vec<Arc<Backend>> {
        let mut order: Vec<(bool, u64, Arc<Backend>)> = self
            .prefillers
            .iter()
            .map(|b| {
                let w = xxh3_64_with_seed(b.url.as_bytes(), affinity);
                (b.is_healthy(), w, Arc::clone(b))
            })
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        order.into_iter().map(|(_, _, b)| b).collect()
    }

    /// Decoders in the order to try: healthy first, fewest requests in flight first.
    pub fn decode_order(&self) -> Vec<Arc<Backend>> {
        let mut order: Vec<Arc<Backend>> = self.decoders.to_vec();
        order.sort_by_key(|b| (!b.is_healthy(), b.inflight.load(Ordering::Relaxed)));
        order
    }

    pub fn views(&self) -> Vec<BackendView> {
        self.prefillers
            .iter()
            .map(|b| b.view("prefill"))
            .chain(self.decoders.iter().map(|b| b.view("decode")))
            .collect()
    }
}

/// Polls every engine's `GET /health` forever.
pub(crate) async fn check_health(backends: Arc<Backends>, http: HttpClient, every: Duration) {
    loop {
        for b in backends.prefillers.iter().chain(&backends.decoders) {
            let ok = crate::route::get_ok(&http, &format!("{}/health", b.url), every).await;
            if ok != b.is_healthy() {
                tracing::info!(url = %b.url, healthy = ok, "engine health changed");
            }
            b.set_healthy(ok);
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Backends {
        let urls: Vec<String> = (0..n).map(|i| format!("http://10.0.0.{i}:8100")).collect();
        Backends::new(&urls, &urls[..1]).unwrap()
    }

    #[test]
    fn a_prefix_sticks_to_one_prefiller_and_moves_when_it_is_down() {
        let b = backends(4);
        let first = b.prefill_order(42)[0].url.clone();
        for _ in 0..10 {
            assert_eq!(b.prefill_order(42)[0].url, first);
        }
        // Different prefixes spread over the prefillers.
        let spread: std::collections::HashSet<String> = (0..64u64)
            .map(|a| b.prefill_order(a)[0].url.clone())
            .collect();
        assert!(spread.len() >= 3, "{spread:?}");
        // The chosen one goes down: the prefix moves, and only that prefix's choice changes.
        let down = b.prefillers.iter().find(|p| p.url == first).unwrap();
        down.set_healthy(false);
        let order = b.prefill_order(42);
        assert_ne!(order[0].url, first);
        assert_eq!(
            order.last().unwrap().url,
            first,
            "unhealthy ones are tried last"
        );
    }

    #[test]
    fn urls_are_checked() {
        assert!(Backends::new(&["localhost:1".into()], &["http://a:1".into()]).is_err());
        let b = Backends::new(&["http://a:1/".into()], &["http://b:2".into()]).unwrap();
        assert_eq!(b.prefillers[0].url, "http://a:1");
    }

    #[test]
    fn decoders_by_load() {
        let b = Backends::new(
            &["http://p:1".into()],
            &["http://d:1".into(), "http://d:2".into()],
        )
        .unwrap();
        let busy = b.decoders[0].begin();
        assert_eq!(b.decode_order()[0].url, "http://d:2");
        drop(busy);
        b.decoders[1].set_healthy(false);
        assert_eq!(b.decode_order()[0].url, "http://d:1");
    }
}
