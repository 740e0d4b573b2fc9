//! The master's per-key cost of a batched lookup, without sockets: what the server does for
//! one `GetReplicas` request (decode the body, the core's `get_replicas`, encode the answer),
//! timed over a pool of committed objects. The figure `kvpool-bench` cannot isolate on a
//! shared machine (docs/benchmarks.md, "Master per-key cost").
//!
//! ```text
//! cargo run --release -p kvpool-master --example get_cost -- [OBJECTS] [BATCH] [ROUNDS]
//! ```
//!
//! Prints, per pass over all objects in key order (cold: each key read once per pass) and
//! over a hot set of 4,096 keys, the best nanoseconds per key of `ROUNDS` passes.

use std::time::{Duration, Instant};

use kvpool_master::{CoreConfig, MasterCore};
use kvpool_proto::{
    decode_body, encode_body, ClientId, GetReplicas, NodeId, PutEnd, PutOptions, PutStart,
    PutStartItem, Register, SegmentId, SegmentInfo, Tier,
};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// A core with one node of two 4 GiB DRAM segments holding `n` committed 4 KiB objects.
fn pool(n: usize, keys: &[Vec<u8>]) -> MasterCore {
    let mut core = MasterCore::new(CoreConfig::default(), 1_000);
    let now = Duration::from_secs(1);
    core.register(
        now,
        Register {
            node: NodeId(1),
            name: "node-1".into(),
            addr: "127.0.0.1:40000".into(),
            segments: (0..2)
                .map(|s| SegmentInfo {
                    id: SegmentId(10 + s),
                    size: 4 << 30,
                    tier: Tier::Dram,
                })
                .collect(),
            inventory: Vec::new(),
        },
    );
    let client = ClientId(7);
    for chunk in keys[..n].chunks(64) {
        let started = core.put_start(
            now,
            PutStart {
                client,
                items: chunk
                    .iter()
                    .map(|k| PutStartItem {
                        key: k.clone(),
                        len: 4096,
                        options: PutOptions::default(),
                    })
                    .collect(),
            },
        );
        assert!(started.items.iter().all(Result::is_ok), "put_start failed");
        let ended = core.put_end(
            now,
            PutEnd {
                client,
                keys: chunk.to_vec(),
                checksums: vec![1; chunk.len()],
            },
        );
        assert!(ended.items.iter().all(Result::is_ok), "put_end failed");
    }
    core
}

/// One pass: every key of `keys` looked up once, `batch` per request, as the server would
/// (request decoded from its body, answer encoded). Returns nanoseconds per key.
fn pass(core: &mut MasterCore, bodies: &[Vec<u8>], keys: usize, now: Duration) -> f64 {
    let start = Instant::now();
    let mut answer_bytes = 0usize;
    for body in bodies {
        let req: GetReplicas = decode_body(body).expect("decode");
        let resp = core.get_replicas(now, req);
        answer_bytes += encode_body(&resp).len();
    }
    assert!(answer_bytes > 0);
    start.elapsed().as_nanos() as f64 / keys as f64
}

fn bodies(keys: &[Vec<u8>], batch: usize) -> Vec<Vec<u8>> {
    keys.chunks(batch)
        .map(|c| encode_body(&GetReplicas { keys: c.to_vec() }))
        .collect()
}

fn main() {
    let n = arg(1, 262_144);
    let batch = arg(2, 64).max(1);
    let rounds = arg(3, 5).max(1);
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("kvpool-bench/4KiB/c0/{i:010}").into_bytes())
        .collect();
    let mut core = pool(n, &keys);
    let all = bodies(&keys, batch);
    let hot = bodies(&keys[..n.min(4096)], batch);
    let mut now = Duration::from_secs(2);
    let (mut cold_best, mut hot_best) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        now += Duration::from_millis(1);
        cold_best = cold_best.min(pass(&mut core, &all, n, now));
        for _ in 0..(n / 4096).max(1) {
            now += Duration::from_millis(1);
            hot_best = hot_best.min(pass(&mut core, &hot, n.min(4096), now));
        }
    }
    println!(
        "objects {n}, batch {batch}: cold {cold_best:.0} ns/key, hot 4096 {hot_best:.0} ns/key"
    );
}
