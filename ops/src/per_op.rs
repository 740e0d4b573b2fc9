//! Requests and their latency per operation: the `requests` counter and the
//! `request_duration` histogram every kvpool server exports under its own prefix, with one
//! series per operation made at start, so the request path neither allocates nor locks a
//! family.

use std::{collections::HashMap, hash::Hash, time::Instant};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

type Labels = Vec<(&'static str, String)>;

/// What a server says of its requests: the help texts of the two families, and where the
/// latency buckets start (seconds) and how many doublings they span.
pub struct PerOpSpec<'a> {
    pub requests_help: &'a str,
    pub duration_help: &'a str,
    pub first_bucket: f64,
    pub buckets: u16,
}

/// One counter and one histogram per operation `K`, labelled `op`.
pub struct PerOp<K> {
    series: HashMap<K, (Counter, Histogram)>,
}

impl<K: Hash + Eq> PerOp<K> {
    /// Registers `requests` and `request_duration` in `reg` with a series for each
    /// `(operation, label)` of `ops`.
    pub fn register(
        reg: &mut Registry,
        spec: PerOpSpec<'_>,
        ops: impl IntoIterator<Item = (K, String)>,
    ) -> PerOp<K> {
        let requests = Family::<Labels, Counter>::default();
        reg.register("requests", spec.requests_help, requests.clone());
        let (first, n) = (spec.first_bucket, spec.buckets);
        let latency = Family::<Labels, Histogram, _>::new_with_constructor(move || {
            Histogram::new(exponential_buckets(first, 2.0, n))
        });
        reg.register_with_unit(
            "request_duration",
            spec.duration_help,
            Unit::Seconds,
            latency.clone(),
        );
        let series = ops
            .into_iter()
            .map(|(op, label)| {
                let l: Labels = vec![("op", label)];
                let s = (
                    requests.get_or_create(&l).clone(),
                    latency.get_or_create(&l).clone(),
                );
                (op, s)
            })
            .collect();
        PerOp { series }
    }

    /// Counts one request of `op` that started at `started`; false (nothing counted) for an
    /// operation that was not registered.
    pub fn observe(&self, op: &K, started: Instant) -> bool {
        let Some((count, latency)) = self.series.get(op) else {
            return false;
        };
        count.inc();
        latency.observe(started.elapsed().as_secs_f64());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode_registry;

    #[test]
    fn each_operation_counts_in_its_own_series() {
        let mut reg = Registry::default();
        let spec = PerOpSpec {
            requests_help: "requests",
            duration_help: "time",
            first_bucket: 1e-3,
            buckets: 4,
        };
        let ops = PerOp::register(&mut reg, spec, [(1u8, "A".into()), (2, "B".into())]);
        assert!(ops.observe(&1, Instant::now()));
        assert!(ops.observe(&1, Instant::now()));
        assert!(
            !ops.observe(&3, Instant::now()),
            "unregistered: not counted"
        );
        let mut out = String::new();
        encode_registry(&mut out, &reg).unwrap();
        assert!(out.contains("requests_total{op=\"A\"} 2"), "{out}");
        assert!(out.contains("requests_total{op=\"B\"} 0"), "{out}");
        assert!(
            out.contains("request_duration_seconds_count{op=\"A\"} 2"),
            "{out}"
        );
    }
}
