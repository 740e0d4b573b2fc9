//! `kvpool nodes` and `kvpool segments`: the master's view of the storage nodes.

use std::process::ExitCode;

use anyhow::Context;
use kvpool_client::Client;
use kvpool_proto::{ByteSize, NodeStatus, SegmentStatus, Tier};
use serde_json::json;

use super::{print_json, table::Table};

/// A node's state as the tables show it.
pub fn node_state(n: &NodeStatus) -> &'static str {
    match (n.alive, n.draining) {
        (false, _) => "down",
        (true, true) => "drain",
        (true, false) => "up",
    }
}

/// A segment's state: its node's, or `FAIL` on a live node that reported it unhealthy.
pub fn segment_state(n: &NodeStatus, seg: &SegmentStatus) -> &'static str {
    if n.alive && !seg.healthy {
        "FAIL"
    } else {
        node_state(n)
    }
}

/// Used and capacity of one tier on one node.
fn tier_use(n: &NodeStatus, tier: Tier) -> (u64, u64) {
    n.segments
        .iter()
        .filter(|s| s.tier == tier)
        .fold((0, 0), |(u, c), s| (u + s.used, c + s.capacity))
}

fn use_cell((used, cap): (u64, u64)) -> String {
    if cap == 0 {
        "-".to_string()
    } else {
        format!("{} / {}", ByteSize(used), ByteSize(cap))
    }
}

pub async fn nodes(c: &Client, json_out: bool) -> anyhow::Result<ExitCode> {
    let s = c.status().await.context("status")?;
    if json_out {
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                let (du, dc) = tier_use(n, Tier::Dram);
                let (nu, nc) = tier_use(n, Tier::Nvme);
                json!({
                    "id": n.id.to_string(),
                    "name": n.name,
                    "addr": n.addr,
                    "state": node_state(n),
                    "alive": n.alive,
                    "draining": n.draining,
                    "silent_ms": n.silent_ms,
                    "pending_frees": n.pending_frees,
                    "objects": n.segments.iter().map(|s| s.objects).sum::<u64>(),
                    "dram": {"used": du, "capacity": dc},
                    "nvme": {"used": nu, "capacity": nc},
                })
            })
            .collect();
        print_json(&json!({ "nodes": nodes }));
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "NODE", "NAME", "ADDRESS", "STATE", ">SILENT", ">DRAM", ">NVME", ">OBJECTS",
    ]);
    for n in &s.nodes {
        t.row(vec![
            n.id.to_string(),
            n.name.clone(),
            n.addr.clone(),
            node_state(n).to_string(),
            format!("{:.1}s", n.silent_ms as f64 / 1000.0),
            use_cell(tier_use(n, Tier::Dram)),
            use_cell(tier_use(n, Tier::Nvme)),
            n.segments
                .iter()
                .map(|s| s.objects)
                .sum::<u64>()
                .to_string(),
        ]);
    }
    print!("{}", t.render());
    println!(
        "{} node(s), {} alive",
        s.nodes.len(),
        s.nodes.iter().filter(|n| n.alive).count()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn segments(c: &Client, json_out: bool) -> anyhow::Result<ExitCode> {
    let s = c.status().await.context("status")?;
    let all = s
        .nodes
        .iter()
        .flat_map(|n| n.segments.iter().map(move |seg| (n, seg)));
    if json_out {
        let segs: Vec<_> = all
            .map(|(n, seg)| {
                json!({
                    "id": seg.id.to_string(),
                    "node": n.id.to_string(),
                    "name": n.name,
                    "tier": seg.tier.to_string(),
                    "state": segment_state(n, seg),
                    "healthy": seg.healthy,
                    "capacity": seg.capacity,
                    "used": seg.used,
                    "objects": seg.objects,
                })
            })
            .collect();
        print_json(&json!({ "segments": segs }));
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "SEGMENT",
        "NODE",
        "NAME",
        "TIER",
        "STATE",
        ">CAPACITY",
        ">USED",
        ">USE",
        ">OBJECTS",
    ]);
    for (n, seg) in all {
        let pct = if seg.capacity == 0 {
            0.0
        } else {
            seg.used as f64 * 100.0 / seg.capacity as f64
        };
        t.row(vec![
            seg.id.to_string(),
            n.id.to_string(),
            n.name.clone(),
            seg.tier.to_string(),
            segment_state(n, seg).to_string(),
            ByteSize(seg.capacity).to_string(),
            ByteSize(seg.used).to_string(),
            format!("{pct:.1}%"),
            seg.objects.to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(ExitCode::SUCCESS)
}
