//! The storage node's metrics (names in `docs/operations.md`) and its `/ready` rule. Counters
//! are bumped by hooks in the data server (requests, bytes), the copy-task runner
//! (demotions, promotions) and the agent (registered or not); the node's shape (capacity,
//! objects, tier health) is read at scrape time.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use kvpool_ops::per_op::{PerOp, PerOpSpec};
use kvpool_ops::prometheus_client::{
    encoding::text::encode_registry,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use kvpool_proto::{Opcode, Tier};

use crate::node::Node;

type Labels = Vec<(&'static str, String)>;

/// The data-plane operations counted one by one; others (a misdirected master request, an
/// unknown opcode) count as `other`.
const OPS: [&str; 3] = ["Read", "Write", "other"];

/// The node's counters. Lives in [`Node`], so every part that holds the node can count.
pub struct NodeMetrics {
    registry: Registry,
    per_op: PerOp<&'static str>,
    errors: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    tasks: Family<Labels, Counter>,
    registered: AtomicBool,
    registered_gauge: Gauge,
    capacity: Family<Labels, Gauge>,
    objects: Gauge,
    board: Gauge,
    nvme_healthy: Gauge,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics")
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    pub fn new() -> NodeMetrics {
        let mut root = Registry::default();
        let reg = root.sub_registry_with_prefix("kvpool_store");
        // 20 µs to about 1.3 s: a small DRAM read, up to a large striped NVMe one.
        let spec = PerOpSpec {
            requests_help: "Data-plane requests served, by operation (a batch counts once)",
            duration_help: "Time to serve a data-plane request, payload included, by operation",
            first_bucket: 20e-6,
            buckets: 17,
        };
        let per_op = PerOp::register(reg, spec, OPS.map(|op| (op, op.to_string())));
        let errors = Family::<Labels, Counter>::default();
        reg.register(
            "request_errors",
            "Data-plane requests that ended their connection (a broken stream, a refused frame)",
            errors.clone(),
        );
        for op in OPS {
            let _ = errors.get_or_create(&vec![("op", op.to_string())]);
        }
        let bytes = Family::<Labels, Counter>::default();
        reg.register_with_unit(
            "transfer",
            "Object bytes moved, by direction (in: written, out: read) and transport",
            Unit::Bytes,
            bytes.clone(),
        );
        let tasks = Family::<Labels, Counter>::default();
        reg.register(
            "copy_tasks",
            "Copy tasks run, by kind (demotion, promotion) and outcome (done, failed)",
            tasks.clone(),
        );
        let registered_gauge = Gauge::default();
        reg.register(
            "registered",
            "1 while the node is registered with a master, else 0",
            registered_gauge.clone(),
        );
        let capacity = Family::<Labels, Gauge>::default();
        reg.register_with_unit(
            "capacity",
            "Bytes the node contributes, by tier",
            Unit::Bytes,
            capacity.clone(),
        );
        let objects = Gauge::default();
        reg.register(
            "objects",
            "Replicas the node holds in DRAM (its inventory)",
            objects.clone(),
        );
        let board = Gauge::default();
        reg.register(
            "board_published",
            "Replicas on the replica board same-host clients check cached locations against \
             (below objects when the board is full; 0 without a board)",
            board.clone(),
        );
        let nvme_healthy = Gauge::default();
        reg.register(
            "nvme_healthy",
            "1 while the NVMe tier takes data, 0 after an I/O error or a full disk (absent tier: 1)",
            nvme_healthy.clone(),
        );
        let m = NodeMetrics {
            registry: root,
            per_op,
            errors,
            bytes,
            tasks,
            registered: AtomicBool::new(false),
            registered_gauge,
            capacity,
            objects,
            board,
            nvme_healthy,
        };
        for kind in ["demotion", "promotion"] {
            for outcome in ["done", "failed"] {
                let _ = m.tasks.get_or_create(&task_labels(kind, outcome));
            }
        }
        // Every series exists from the start, so a dashboard shows 0 rather than nothing.
        for (dir, transport) in [("in", "tcp"), ("out", "tcp"), ("in", "shm"), ("in", "rdma")] {
            let _ = m.bytes.get_or_create(&bytes_labels(dir, transport));
        }
        m
    }

    /// Counts one data-plane request: its kind, how long it took, whether it kept the
    /// connection.
    pub fn request(&self, opcode: u8, started: Instant, ok: bool) {
        let op = match Opcode::try_from(opcode) {
            Ok(Opcode::Read) => "Read",
            Ok(Opcode::Write) => "Write",
            _ => "other",
        };
        self.per_op.observe(&op, started);
        if !ok {
            self.errors
                .get_or_create(&vec![("op", op.to_string())])
                .inc();
        }
    }

    /// Object bytes read out of the node over TCP. (Same-host clients read shared memory
    /// without the node: those reads are not counted.)
    pub fn bytes_out(&self, n: u64) {
        self.bytes
            .get_or_create(&bytes_labels("out", "tcp"))
            .inc_by(n);
    }

    /// Object bytes written into the node, over `transport` ("tcp"; "shm" or "rdma": counted
    /// when a client commits what it copied into shared memory or wrote with RDMA WRITEs).
    pub fn bytes_in(&self, transport: &str, n: u64) {
        self.bytes
            .get_or_create(&bytes_labels("in", transport))
            .inc_by(n);
    }

    /// A copy task ended: a demotion when it copied into the NVMe tier, else a promotion.
    pub fn task(&self, to: Option<Tier>, ok: bool) {
        let kind = match to {
            Some(Tier::Nvme) => "demotion",
            _ => "promotion",
        };
        let outcome = if ok { "done" } else { "failed" };
        self.tasks.get_or_create(&task_labels(kind, outcome)).inc();
    }

    /// The agent registered (or lost its registration).
    pub fn set_registered(&self, yes: bool) {
        self.registered.store(yes, Ordering::Relaxed);
    }

    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    fn encode(&self, node: &Node, out: &mut String) -> std::fmt::Result {
        self.registered_gauge.set(i64::from(self.registered()));
        let dram: u64 = node.segments().iter().map(|s| s.size()).sum();
        self.capacity
            .get_or_create(&vec![("tier", Tier::Dram.to_string())])
            .set(dram as i64);
        let nvme = node.nvme_segment().map_or(0, |n| n.info().size);
        self.capacity
            .get_or_create(&vec![("tier", Tier::Nvme.to_string())])
            .set(nvme as i64);
        self.objects.set(node.inventory().len() as i64);
        self.board
            .set(node.inventory().board_published().unwrap_or(0) as i64);
        self.nvme_healthy
            .set(i64::from(node.nvme_segment().is_none_or(|n| n.healthy())));
        encode_registry(out, &self.registry)
    }
}

fn task_labels(kind: &str, outcome: &str) -> Labels {
    vec![("kind", kind.to_string()), ("outcome", outcome.to_string())]
}

fn bytes_labels(direction: &str, transport: &str) -> Labels {
    vec![
        ("direction", direction.to_string()),
        ("transport", transport.to_string()),
    ]
}

/// The node as a part of the HTTP endpoint.
pub struct NodeProbe(pub Arc<Node>);

impl kvpool_ops::Probe for NodeProbe {
    fn name(&self) -> &str {
        "store"
    }

    fn encode(&self, out: &mut String) -> std::fmt::Result {
        self.0.metrics().encode(&self.0, out)
    }

    /// Ready once registered: before that the master hands out none of its space.
    fn ready(&self) -> Result<(), String> {
        if self.0.metrics().registered() {
            Ok(())
        } else {
            Err("not registered with a master".to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use kvpool_ops::Probe;
    use kvpool_proto::SegmentId;

    use super::*;
    use crate::segment::Segment;

    #[test]
    fn counts_and_readiness() {
        let seg = Segment::new(SegmentId(1), 1 << 20, false).unwrap();
        let node = Arc::new(Node::new("n".into(), "127.0.0.1:1".into(), vec![seg]));
        let probe = NodeProbe(node.clone());
        assert!(probe.ready().is_err());
        node.metrics().set_registered(true);
        assert!(probe.ready().is_ok());
        node.metrics()
            .request(Opcode::Write as u8, Instant::now(), true);
        node.metrics().bytes_in("tcp", 10);
        node.metrics().task(Some(Tier::Nvme), true);
        let mut out = String::new();
        probe.encode(&mut out).unwrap();
        for line in [
            "kvpool_store_requests_total{op=\"Write\"} 1",
            "kvpool_store_transfer_bytes_total{direction=\"in\",transport=\"tcp\"} 10",
            "kvpool_store_copy_tasks_total{kind=\"demotion\",outcome=\"done\"} 1",
            "kvpool_store_copy_tasks_total{kind=\"promotion\",outcome=\"failed\"} 0",
            "kvpool_store_capacity_bytes{tier=\"dram\"} 1048576",
            "kvpool_store_registered 1",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
    }
}
