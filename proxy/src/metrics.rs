//! The proxy's metrics (names in `docs/operations.md`), served by the `kvpool-ops` endpoint
//! (`kvpool proxy --http`): requests by route and outcome, prefill and decode latency,
//! hand-offs, streams, the prefiller choice and what the master found, and each engine's
//! health. Counters are atomics bumped on the request path; engine health and load are read
//! from [`Backends`] at scrape time.

use std::sync::Arc;
use std::time::Instant;

use kvpool_ops::prometheus_client::{
    encoding::text::encode_registry,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

use crate::backends::{Backend, Backends};

type Labels = Vec<(&'static str, String)>;

/// How a request through the proxy ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The decoder answered with success (2xx).
    Ok,
    /// Refused as the caller's fault: not a JSON object, or an engine's 4xx passed back.
    Rejected,
    /// No prefiller answered (each failed or timed out).
    NoPrefiller,
    /// No decoder answered.
    NoDecoder,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::NoPrefiller => "no_prefiller",
            Outcome::NoDecoder => "no_decoder",
        }
    }
}

/// Why a prefiller was chosen (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Its host holds the longest prefix of the prompt in the pool (at least one block).
    Prefix,
    /// The affinity hash's order decided (no placement, nothing stored, or a tie at zero).
    Affinity,
}

/// Every metric the proxy exports. Cheap to share: counters are atomics.
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    prefill: Histogram,
    decode: Histogram,
    handoffs: Family<Labels, Counter>,
    streams: Counter,
    streams_open: Gauge,
    choices: Family<Labels, Counter>,
    lookups: Family<Labels, Counter>,
    blocks_matched: Counter,
    engine_up: Family<Labels, Gauge>,
    engine_inflight: Family<Labels, Gauge>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency buckets shared by prefill and decode: 1 ms to about 65 s (a prefill of a long
/// prompt takes seconds, a decode of a long generation a minute).
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

impl ProxyMetrics {
    pub fn new() -> ProxyMetrics {
        let mut root = Registry::default();
        let reg = root.sub_registry_with_prefix("kvpool_proxy");
        let requests = Family::<Labels, Counter>::default();
        reg.register(
            "requests",
            "Requests by route (completions, chat) and outcome (ok, rejected, no_prefiller, no_decoder)",
            requests.clone(),
        );
        let prefill = latency();
        reg.register_with_unit(
            "prefill_duration",
            "Time from the first prefill attempt to a prefiller's answer, retries included",
            Unit::Seconds,
            prefill.clone(),
        );
        let decode = latency();
        reg.register_with_unit(
            "decode_duration",
            "Time from sending to a decoder until its answer's body ended or the caller left",
            Unit::Seconds,
            decode.clone(),
        );
        let handoffs = Family::<Labels, Counter>::default();
        reg.register(
            "handoffs",
            "P/D hand-offs by event: started (prefill answered with parameters), failed (no decoder took it), retried (an engine failed and the next was tried)",
            handoffs.clone(),
        );
        let streams = Counter::default();
        reg.register(
            "streams",
            "Streamed (server-sent events) answers started",
            streams.clone(),
        );
        let streams_open = Gauge::default();
        reg.register(
            "streams_open",
            "Streamed answers being passed through now",
            streams_open.clone(),
        );
        let choices = Family::<Labels, Counter>::default();
        reg.register(
            "prefill_choices",
            "Prefills served, by why the prefiller was chosen (prefix: its host held the longest prefix in the pool; affinity: the affinity hash)",
            choices.clone(),
        );
        let lookups = Family::<Labels, Counter>::default();
        reg.register(
            "prefix_lookups",
            "Questions to the master about where a prompt's blocks are, by outcome (answered, unavailable)",
            lookups.clone(),
        );
        let blocks_matched = Counter::default();
        reg.register(
            "prefix_blocks_matched",
            "Leading prompt blocks the master found on the chosen prefiller's host",
            blocks_matched.clone(),
        );
        let engine_up = Family::<Labels, Gauge>::default();
        reg.register(
            "engine_up",
            "1 while an engine is in rotation (its health check passes), by engine URL and role",
            engine_up.clone(),
        );
        let engine_inflight = Family::<Labels, Gauge>::default();
        reg.register(
            "engine_inflight",
            "Requests in flight on an engine",
            engine_inflight.clone(),
        );
        // Every label set the proxy can produce exists from the start, so a dashboard sees
        // zeros rather than no series before the first event.
        for route in ["completions", "chat"] {
            for o in [
                Outcome::Ok,
                Outcome::Rejected,
                Outcome::NoPrefiller,
                Outcome::NoDecoder,
            ] {
                let _ = requests.get_or_create(&request_labels(route, o));
            }
        }
        for e in ["started", "failed", "retried"] {
            let _ = handoffs.get_or_create(&vec![("event", e.to_string())]);
        }
        for c in [Choice::Prefix, Choice::Affinity] {
            let _ = choices.get_or_create(&choice_labels(c));
        }
        for o in ["answered", "unavailable"] {
            let _ = lookups.get_or_create(&vec![("outcome", o.to_string())]);
        }
        ProxyMetrics {
            registry: root,
            requests,
            prefill,
            decode,
            handoffs,
            streams,
            streams_open,
            choices,
            lookups,
            blocks_matched,
            engine_up,
            engine_inflight,
        }
    }

    pub(crate) fn request(&self, chat: bool, outcome: Outcome) {
        let route = if chat { "chat" } else { "completions" };
        self.requests
            .get_or_create(&request_labels(route, outcome))
            .inc();
    }

    pub(crate) fn prefilled(&self, since: Instant) {
        self.prefill.observe(since.elapsed().as_secs_f64());
    }

    pub(crate) fn decoded(&self, since: Instant) {
        self.decode.observe(since.elapsed().as_secs_f64());
    }

    pub(crate) fn handoff(&self, event: &'static str) {
        self.handoffs
            .get_or_create(&vec![("event", event.to_string())])
            .inc();
    }

    /// A streamed answer starts; the returned guard counts it open until dropped.
    pub(crate) fn stream(self: &Arc<Self>) -> OpenStream {
        self.streams.inc();
        self.streams_open.inc();
        OpenStream(Arc::clone(self))
    }

    pub(crate) fn chosen(&self, why: Choice, blocks: usize) {
        self.choices.get_or_create(&choice_labels(why)).inc();
        self.blocks_matched.inc_by(blocks as u64);
    }

    pub(crate) fn lookup(&self, answered: bool) {
        let o = if answered { "answered" } else { "unavailable" };
        self.lookups
            .get_or_create(&vec![("outcome", o.to_string())])
            .inc();
    }

    /// The text format, engine gauges refreshed from `backends` first.
    pub fn encode(&self, backends: &Backends, out: &mut String) -> std::fmt::Result {
        let set = |b: &Backend, role: &'static str| {
            let l = vec![("engine", b.url.clone()), ("role", role.to_string())];
            self.engine_up
                .get_or_create(&l)
                .set(i64::from(b.is_healthy()));
            self.engine_inflight
                .get_or_create(&l)
                .set(b.inflight() as i64);
        };
        for b in &backends.prefillers {
            set(b, "prefill");
        }
        for b in &backends.decoders {
            set(b, "decode");
        }
        encode_registry(out, &self.registry)
    }
}

fn request_labels(route: &str, o: Outcome) -> Labels {
    vec![
        ("route", route.to_string()),
        ("outcome", o.label().to_string()),
    ]
}

fn choice_labels(c: Choice) -> Labels {
    let r = match c {
        Choice::Prefix => "prefix",
        Choice::Affinity => "affinity",
    };
    vec![("reason", r.to_string())]
}

/// A streamed answer being passed through; counted in `streams_open` until dropped.
pub(crate) struct OpenStream(Arc<ProxyMetrics>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams_open.dec();
    }
}

/// The proxy as a part of the `kvpool-ops` endpoint.
pub struct ProxyProbe {
    pub(crate) metrics: Arc<ProxyMetrics>,
    pub(crate) backends: Arc<Backends>,
}

impl kvpool_ops::Probe for ProxyProbe {
    fn name(&self) -> &str {
        "proxy"
    }

    fn encode(&self, out: &mut String) -> std::fmt::Result {
        self.metrics.encode(&self.backends, out)
    }

    /// Ready while at least one decoder and (when any is configured) one prefiller are in
    /// rotation: the same rule as the proxy's own `GET /health`, since that is when a request
    /// can be served.
    fn ready(&self) -> Result<(), String> {
        let up = |v: &[Arc<Backend>]| v.iter().any(|b| b.is_healthy());
        let b = &self.backends;
        match (
            b.prefillers.is_empty() || up(&b.prefillers),
            up(&b.decoders),
        ) {
            (true, true) => Ok(()),
            (false, _) => Err("no healthy prefiller".to_string()),
            (true, false) => Err("no healthy decoder".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use kvpool_ops::Probe;

    use super::*;

    #[test]
    fn names_ready_and_engine_gauges() {
        let backends =
            Arc::new(Backends::new(&["http://p:1".into()], &["http://d:1".into()]).unwrap());
        let m = Arc::new(ProxyMetrics::new());
        m.request(true, Outcome::Ok);
        m.handoff("started");
        m.chosen(Choice::Prefix, 3);
        let open = m.stream();
        let probe = ProxyProbe {
            metrics: Arc::clone(&m),
            backends: Arc::clone(&backends),
        };
        let mut out = String::new();
        probe.encode(&mut out).unwrap();
        for line in [
            "kvpool_proxy_requests_total{route=\"chat\",outcome=\"ok\"} 1",
            "kvpool_proxy_requests_total{route=\"completions\",outcome=\"no_decoder\"} 0",
            "kvpool_proxy_handoffs_total{event=\"started\"} 1",
            "kvpool_proxy_prefill_choices_total{reason=\"prefix\"} 1",
            "kvpool_proxy_prefix_blocks_matched_total 3",
            "kvpool_proxy_streams_total 1",
            "kvpool_proxy_streams_open 1",
            "kvpool_proxy_engine_up{engine=\"http://p:1\",role=\"prefill\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
        }
        drop(open);
        let mut out = String::new();
        probe.encode(&mut out).unwrap();
        assert!(
            out.lines().any(|l| l == "kvpool_proxy_streams_open 0"),
            "{out}"
        );
        assert_eq!(probe.ready(), Ok(()));
        backends.decoders[0].set_healthy(false);
        assert_eq!(probe.ready(), Err("no healthy decoder".to_string()));
        backends.prefillers[0].set_healthy(false);
        assert_eq!(probe.ready(), Err("no healthy prefiller".to_string()));
    }
}
