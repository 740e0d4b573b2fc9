//! The master's metrics (names in `docs/operations.md`): requests, errors and latency per
//! operation, counted by [`Metered`] around the RPC service; lookup hits and misses and copy
//! tasks issued, counted from the core's answers; and the cluster's shape (capacity and use
//! per tier, objects, nodes, leadership), read from the core's status at scrape time so that
//! no request pays for it.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use kvpool_ops::per_op::{PerOp, PerOpSpec};
use kvpool_ops::prometheus_client::{
    encoding::text::encode_registry,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use kvpool_proto::{
    ErrorCode, GetReplicasResponse, HeartbeatResponse, Opcode, StatusResponse, Tier, UnitResponse,
    WireError,
};
use kvpool_transport::server::RpcService;

use crate::core::ObjectStats;

type Labels = Vec<(&'static str, String)>;

/// Every metric the master exports. Cheap to share: counters are atomics.
pub struct MasterMetrics {
    registry: Registry,
    /// Per opcode, made once so the request path neither allocates nor locks a family.
    per_op: PerOp<Opcode>,
    errors: Family<Labels, Counter>,
    hits: Counter,
    misses: Counter,
    index_reads: Counter,
    tasks_issued: Counter,
    evictions: Counter,
    /// The core's eviction count at the last scrape: the core's figure restarts with each
    /// term, the exported counter must not go down.
    evictions_seen: Mutex<u64>,
    nodes: Family<Labels, Gauge>,
    node_up: Family<Labels, Gauge>,
    capacity: Family<Labels, Gauge>,
    used: Family<Labels, Gauge>,
    segments: Family<Labels, Gauge>,
    objects: Gauge,
    processing: Gauge,
    leader: Gauge,
    term: Gauge,
    leased: Gauge,
    pinned: Family<Labels, Gauge>,
}

impl Default for MasterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MasterMetrics {
    pub fn new() -> MasterMetrics {
        let mut root = Registry::default();
        let reg = root.sub_registry_with_prefix("kvpool_master");
        // 50 µs to about 1.6 s: a lookup takes microseconds, a registration with a large
        // inventory can take a second. Only the master's own opcodes (connection and control
        // plane, below 0x40): the others are refused with WrongService and would be series
        // that are always zero.
        let spec = PerOpSpec {
            requests_help: "Requests answered, by operation (a batch counts once)",
            duration_help: "Time to answer a request, by operation",
            first_bucket: 50e-6,
            buckets: 16,
        };
        let ops = Opcode::ALL
            .iter()
            .filter(|&&op| (op as u8) < 0x40)
            .map(|&op| (op, format!("{op:?}")));
        let per_op = PerOp::register(reg, spec, ops);
        let errors = Family::<Labels, Counter>::default();
        reg.register(
            "request_errors",
            "Requests answered with an error as a whole, by operation and error code",
            errors.clone(),
        );
        let hits = Counter::default();
        reg.register(
            "lookup_hits",
            "Keys looked up (GetReplicas) that were found, and reads served by the location index",
            hits.clone(),
        );
        let misses = Counter::default();
        reg.register(
            "lookup_misses",
            "Keys looked up (GetReplicas) that were not found",
            misses.clone(),
        );
        let index_reads = Counter::default();
        reg.register(
            "index_reads",
            "Reads clients served from the location index, as they reported them (Touch)",
            index_reads.clone(),
        );
        let tasks_issued = Counter::default();
        reg.register(
            "copy_tasks_issued",
            "Copy tasks (demotions to NVMe, promotions to DRAM) sent to nodes",
            tasks_issued.clone(),
        );
        let evictions = Counter::default();
        reg.register(
            "evictions",
            "Replicas evicted (dropped or demoted) above a watermark",
            evictions.clone(),
        );
        let nodes = Family::<Labels, Gauge>::default();
        reg.register(
            "nodes",
            "Storage nodes known, by state (alive, dead, draining)",
            nodes.clone(),
        );
        let node_up = Family::<Labels, Gauge>::default();
        reg.register(
            "node_up",
            "1 while a storage node heartbeats, 0 once it is silent past the node TTL",
            node_up.clone(),
        );
        let capacity = Family::<Labels, Gauge>::default();
        reg.register_with_unit(
            "capacity",
            "Bytes the live nodes contribute, by tier",
            Unit::Bytes,
            capacity.clone(),
        );
        let used = Family::<Labels, Gauge>::default();
        reg.register_with_unit(
            "used",
            "Bytes allocated on live nodes, by tier",
            Unit::Bytes,
            used.clone(),
        );
        let segments = Family::<Labels, Gauge>::default();
        reg.register(
            "segments",
            "Segments on live nodes, by tier and health",
            segments.clone(),
        );
        let objects = Gauge::default();
        reg.register(
            "objects",
            "Committed objects (one per key)",
            objects.clone(),
        );
        let processing = Gauge::default();
        reg.register(
            "puts_in_progress",
            "Puts started and not yet ended or revoked",
            processing.clone(),
        );
        let leader = Gauge::default();
        reg.register(
            "leader",
            "1 while this master serves (the leader, or the only master), 0 while a standby",
            leader.clone(),
        );
        let term = Gauge::default();
        reg.register(
            "leader_term",
            "The etcd term this master leads (0 without HA or while a standby)",
            term.clone(),
        );
        let leased = Gauge::default();
        reg.register(
            "leased_objects",
            "Committed objects holding a live read lease (eviction and remove skip them)",
            leased.clone(),
        );
        let pinned = Family::<Labels, Gauge>::default();
        reg.register(
            "pinned_objects",
            "Committed objects with a pin, by kind (soft: not yet expired; hard: never evicted)",
            pinned.clone(),
        );
        MasterMetrics {
            registry: root,
            per_op,
            errors,
            hits,
            misses,
            index_reads,
            tasks_issued,
            evictions,
            evictions_seen: Mutex::new(0),
            nodes,
            node_up,
            capacity,
            used,
            segments,
            objects,
            processing,
            leader,
            term,
            leased,
            pinned,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, op: Opcode, started: Instant, answer: &Result<Vec<u8>, WireError>) {
        self.per_op.observe(&op, started);
        if let Err(e) = answer {
            self.error(op, e.code);
        }
    }

    fn error(&self, op: Opcode, code: ErrorCode) {
        let mut l = op_labels(op);
        l.push(("code", code.name().to_string()));
        self.errors.get_or_create(&l).inc();
    }

    /// Counts a lookup's hits and misses; returns the answer unchanged (a hook in `call`).
    pub fn lookups(&self, resp: GetReplicasResponse) -> GetReplicasResponse {
        for item in &resp.items {
            match item {
                Ok(_) => self.hits.inc(),
                Err(e) if e.code == ErrorCode::NotFound => self.misses.inc(),
                Err(_) => 0,
            };
        }
        resp
    }

    /// Counts the reads a `Touch` reported that found their object, also as lookup hits
    /// (each is a lookup the index answered, so the hit ratio keeps counting every get);
    /// returns the answer unchanged.
    pub fn index_reads(&self, resp: UnitResponse) -> UnitResponse {
        let found = resp.items.iter().filter(|i| i.is_ok()).count() as u64;
        self.index_reads.inc_by(found);
        self.hits.inc_by(found);
        resp
    }

    /// Counts the copy tasks a heartbeat answer carries; returns it unchanged.
    pub fn heartbeat(&self, resp: HeartbeatResponse) -> HeartbeatResponse {
        self.tasks_issued.inc_by(resp.tasks.len() as u64);
        resp
    }

    /// Refreshes the scrape-time gauges from the core's status (`None`: a standby, whose map
    /// is empty) and appends every metric in the text format.
    pub fn encode(&self, snap: &Snapshot, out: &mut String) -> std::fmt::Result {
        let status = snap.serving.as_ref().map(|(s, _)| s);
        let stats = snap.serving.as_ref().map(|(_, o)| *o).unwrap_or_default();
        self.leader.set(i64::from(status.is_some()));
        self.term.set(snap.term.unwrap_or(0));
        self.leased.set(stats.leased as i64);
        self.pinned
            .get_or_create(&vec![("kind", "soft".to_string())])
            .set(stats.soft_pinned as i64);
        self.pinned
            .get_or_create(&vec![("kind", "hard".to_string())])
            .set(stats.hard_pinned as i64);
        self.nodes.clear();
        self.node_up.clear();
        self.capacity.clear();
        self.used.clear();
        self.segments.clear();
        let empty = StatusResponse {
            nodes: Vec::new(),
            objects: 0,
            processing: 0,
            evictions: 0,
        };
        let s = status.unwrap_or(&empty);
        self.count_evictions(s.evictions);
        self.objects.set(s.objects as i64);
        self.processing.set(s.processing as i64);
        for state in ["alive", "dead", "draining"] {
            // Present at zero, so a dashboard's query has a series before the first node.
            self.nodes
                .get_or_create(&vec![("state", state.to_string())])
                .set(0);
        }
        for tier in [Tier::Dram, Tier::Nvme] {
            self.capacity.get_or_create(&tier_labels(tier)).set(0);
            self.used.get_or_create(&tier_labels(tier)).set(0);
        }
        for n in &s.nodes {
            let state = match (n.alive, n.draining) {
                (false, _) => "dead",
                (true, true) => "draining",
                (true, false) => "alive",
            };
            self.nodes
                .get_or_create(&vec![("state", state.to_string())])
                .inc();
            self.node_up
                .get_or_create(&vec![("node", n.id.to_string()), ("name", n.name.clone())])
                .set(i64::from(n.alive));
            if !n.alive {
                continue;
            }
            for seg in &n.segments {
                let l = tier_labels(seg.tier);
                self.capacity.get_or_create(&l).inc_by(seg.capacity as i64);
                self.used.get_or_create(&l).inc_by(seg.used as i64);
                let mut sl = l;
                sl.push(("healthy", seg.healthy.to_string()));
                self.segments.get_or_create(&sl).inc();
            }
        }
        encode_registry(out, &self.registry)
    }

    fn count_evictions(&self, now: u64) {
        let mut seen = self
            .evictions_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A smaller figure means a new term's core: everything it counted is new.
        let new = if now >= *seen { now - *seen } else { now };
        self.evictions.inc_by(new);
        *seen = now;
    }
}

fn op_labels(op: Opcode) -> Labels {
    vec![("op", format!("{op:?}"))]
}

fn tier_labels(tier: Tier) -> Labels {
    vec![("tier", tier.to_string())]
}

/// An RPC service with every request counted and timed.
pub struct Metered<S> {
    pub inner: Arc<S>,
    pub metrics: Arc<MasterMetrics>,
}

impl<S: RpcService> RpcService for Metered<S> {
    fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError> {
        let started = Instant::now();
        let answer = self.inner.handle(opcode, body);
        self.metrics.request(opcode, started, &answer);
        answer
    }

    fn response_flags(&self, opcode: Opcode) -> u8 {
        self.inner.response_flags(opcode)
    }
}

/// What the master looks like from outside at one moment.
pub struct Snapshot {
    /// Its status and object counts while it serves; `None` while a standby.
    pub serving: Option<(StatusResponse, ObjectStats)>,
    /// The etcd term it leads, under HA.
    pub term: Option<i64>,
}

/// The master as a part of the HTTP endpoint.
pub struct MasterProbe {
    pub metrics: Arc<MasterMetrics>,
    pub snapshot: Box<dyn Fn() -> Snapshot + Send + Sync>,
}

impl kvpool_ops::Probe for MasterProbe {
    fn name(&self) -> &str {
        "master"
    }

    fn encode(&self, out: &mut String) -> std::fmt::Result {
        self.metrics.encode(&(self.snapshot)(), out)
    }

    /// Ready once a storage node is registered and alive: before that every put fails. A
    /// standby is ready: answering `NotLeader` with the leader's address is its whole job,
    /// and an orchestrator that waits for readiness (a rolling update) must not wait forever.
    fn ready(&self) -> Result<(), String> {
        match (self.snapshot)().serving {
            None => Ok(()),
            Some((s, _)) if s.nodes.iter().any(|n| n.alive) => Ok(()),
            Some(_) => Err("no storage node is registered".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_counts_appear_in_the_text() {
        let m = MasterMetrics::new();
        let err = Err(WireError::new(ErrorCode::NotLeader, "standby"));
        m.request(Opcode::GetReplicas, Instant::now(), &Ok(vec![]));
        m.request(Opcode::GetReplicas, Instant::now(), &err);
        m.lookups(GetReplicasResponse {
            items: vec![Err(WireError::new(ErrorCode::NotFound, "no"))],
        });
        let mut out = String::new();
        let standby = Snapshot {
            serving: None,
            term: None,
        };
        m.encode(&standby, &mut out).unwrap();
        for line in [
            "kvpool_master_requests_total{op=\"GetReplicas\"} 2",
            "kvpool_master_request_errors_total{op=\"GetReplicas\",code=\"NotLeader\"} 1",
            "kvpool_master_lookup_misses_total 1",
            "kvpool_master_lookup_hits_total 0",
            "kvpool_master_leader 0",
            "kvpool_master_capacity_bytes{tier=\"dram\"} 0",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
        assert!(out.contains("kvpool_master_request_duration_seconds_bucket{"));
    }

    #[test]
    fn evictions_never_go_down_across_terms() {
        let m = MasterMetrics::new();
        m.count_evictions(5);
        m.count_evictions(7);
        m.count_evictions(2); // a new term's core
        assert_eq!(m.evictions.get(), 9);
    }
}
