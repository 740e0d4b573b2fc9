//! What `kvpool top` shows, computed from samples without any I/O: each refresh hands in the
//! master's status and its metrics (either may have failed) with the time, and rates come
//! from the counters' change since the previous refresh.

use std::time::Duration;

use kvpool_ops::scrape::{sum, Samples};
use kvpool_proto::{StatusResponse, Tier};

/// One node's row.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub name: String,
    pub id: String,
    pub addr: String,
    pub state: &'static str,
    pub silent_ms: u64,
    pub dram: (u64, u64),
    pub nvme: (u64, u64),
    pub objects: u64,
}

/// Everything on the screen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Refreshes so far (1 after the first).
    pub refresh: u64,
    pub master: String,
    /// Why the status could not be read this time (the rest shows the last good one).
    pub status_error: Option<String>,
    /// Why the metrics could not be read; rates are then unknown.
    pub metrics_error: Option<String>,
    pub lookups_per_s: Option<f64>,
    pub puts_per_s: Option<f64>,
    /// Hits over lookups in the last interval (None: no lookups in it).
    pub hit_ratio: Option<f64>,
    /// Hits over lookups since the master started.
    pub hit_ratio_total: Option<f64>,
    pub bytes_in_per_s: Option<f64>,
    pub bytes_out_per_s: Option<f64>,
    pub evictions_per_s: Option<f64>,
    /// (used, capacity) per tier over live nodes; NVMe only when some node has it.
    pub tiers: Vec<(Tier, u64, u64)>,
    pub objects: u64,
    pub puts_in_progress: u64,
    pub nodes: Vec<NodeRow>,
}

/// The state between refreshes.
#[derive(Debug, Default)]
pub struct Model {
    prev: Option<(Duration, Samples)>,
    pub view: View,
}

const HITS: &str = "kvpool_master_lookup_hits_total";
const MISSES: &str = "kvpool_master_lookup_misses_total";
const PUTS: &str = "kvpool_master_requests_total{op=\"PutEnd\"}";
const EVICTIONS: &str = "kvpool_master_evictions_total";
const BYTES_IN: &str = "kvpool_store_transfer_bytes_total{direction=\"in\",transport=\"tcp\"}";
const BYTES_OUT: &str = "kvpool_store_transfer_bytes_total{direction=\"out\",transport=\"tcp\"}";

impl Model {
    pub fn new(master: String) -> Model {
        Model {
            prev: None,
            view: View {
                master,
                ..View::default()
            },
        }
    }

    /// One refresh at `now` (any monotonic clock).
    pub fn update(
        &mut self,
        now: Duration,
        status: Result<StatusResponse, String>,
        metrics: Result<Samples, String>,
    ) {
        let v = &mut self.view;
        v.refresh += 1;
        match status {
            Ok(s) => {
                v.status_error = None;
                apply_status(v, &s);
            }
            Err(e) => v.status_error = Some(e),
        }
        match metrics {
            Ok(m) => {
                v.metrics_error = None;
                let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
                let (hits, misses) = (sum(&m, HITS), sum(&m, MISSES));
                v.hit_ratio_total = ratio(hits, hits + misses);
                let rate = |prev: &Samples, dt: f64, k: &str| {
                    // A counter that went down belongs to a restarted server: no rate.
                    let d = get(k) - prev.get(k).copied().unwrap_or(0.0);
                    (d >= 0.0).then(|| d / dt)
                };
                match &self.prev {
                    Some((then, prev)) if now > *then => {
                        let dt = (now - *then).as_secs_f64();
                        let (ph, pm) = (sum(prev, HITS), sum(prev, MISSES));
                        let (dh, dm) = (hits - ph, misses - pm);
                        v.lookups_per_s = (dh >= 0.0 && dm >= 0.0).then(|| (dh + dm) / dt);
                        v.hit_ratio = ratio(dh, dh + dm);
                        v.puts_per_s = rate(prev, dt, PUTS);
                        v.evictions_per_s = rate(prev, dt, EVICTIONS);
                        v.bytes_in_per_s = rate(prev, dt, BYTES_IN).filter(|_| has(&m, BYTES_IN));
                        v.bytes_out_per_s =
                            rate(prev, dt, BYTES_OUT).filter(|_| has(&m, BYTES_OUT));
                    }
                    _ => {}
                }
                self.prev = Some((now, m));
            }
            Err(e) => {
                v.metrics_error = Some(e);
                // Rates over a gap would mix two intervals: start again.
                self.prev = None;
                v.lookups_per_s = None;
                v.puts_per_s = None;
                v.hit_ratio = None;
                v.evictions_per_s = None;
                v.bytes_in_per_s = None;
                v.bytes_out_per_s = None;
            }
        }
    }
}

fn has(m: &Samples, k: &str) -> bool {
    m.contains_key(k)
}

fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0 && part >= 0.0).then(|| part / whole)
}

fn apply_status(v: &mut View, s: &StatusResponse) {
    v.objects = s.objects;
    v.puts_in_progress = s.processing;
    let tier_use = |n: &kvpool_proto::NodeStatus, tier: Tier| {
        n.segments
            .iter()
            .filter(|seg| seg.tier == tier)
            .fold((0, 0), |(u, c), seg| (u + seg.used, c + seg.capacity))
    };
    v.tiers = [Tier::Dram, Tier::Nvme]
        .into_iter()
        .map(|t| {
            let (u, c) = s
                .nodes
                .iter()
                .filter(|n| n.alive)
                .map(|n| tier_use(n, t))
                .fold((0, 0), |(u, c), (nu, nc)| (u + nu, c + nc));
            (t, u, c)
        })
        .filter(|&(t, _, c)| t == Tier::Dram || c > 0)
        .collect();
    v.nodes = s
        .nodes
        .iter()
        .map(|n| NodeRow {
            name: n.name.clone(),
            id: n.id.to_string(),
            addr: n.addr.clone(),
            state: crate::admin::node_state(n),
            silent_ms: n.silent_ms,
            dram: tier_use(n, Tier::Dram),
            nvme: tier_use(n, Tier::Nvme),
            objects: n.segments.iter().map(|s| s.objects).sum(),
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use kvpool_ops::scrape::parse;

    use super::*;

    fn metrics(hits: u64, misses: u64, puts: u64) -> Result<Samples, String> {
        Ok(parse(&format!(
            "{HITS} {hits}\n{MISSES} {misses}\n{PUTS} {puts}\n"
        )))
    }

    #[test]
    fn rates_and_ratios_come_from_the_change_between_refreshes() {
        let mut m = Model::new("m".into());
        let empty = || StatusResponse {
            nodes: vec![],
            objects: 3,
            processing: 0,
            evictions: 0,
        };
        m.update(Duration::from_secs(1), Ok(empty()), metrics(10, 10, 5));
        assert_eq!(m.view.refresh, 1);
        assert_eq!(m.view.lookups_per_s, None, "no rate before a second sample");
        assert_eq!(m.view.hit_ratio_total, Some(0.5));
        m.update(Duration::from_secs(3), Ok(empty()), metrics(28, 12, 9));
        assert_eq!(m.view.lookups_per_s, Some(10.0));
        assert_eq!(m.view.hit_ratio, Some(0.9));
        assert_eq!(m.view.puts_per_s, Some(2.0));
        assert_eq!(m.view.objects, 3);
        assert_eq!(m.view.tiers, vec![(Tier::Dram, 0, 0)]);

        m.update(
            Duration::from_secs(4),
            Err("down".into()),
            Err("refused".into()),
        );
        assert_eq!(m.view.metrics_error.as_deref(), Some("refused"));
        assert_eq!(m.view.lookups_per_s, None);
        assert_eq!(m.view.objects, 3, "the last good status stays on screen");
        // A restarted master's counters start again: no negative rate.
        m.update(Duration::from_secs(5), Ok(empty()), metrics(1, 0, 0));
        m.update(Duration::from_secs(6), Ok(empty()), metrics(1, 0, 0));
        assert_eq!(m.view.hit_ratio, None, "no lookups in the interval");
        assert_eq!(m.view.lookups_per_s, Some(0.0));
        assert_eq!(m.view.refresh, 5);
    }
}
