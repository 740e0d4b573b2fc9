//! `kvpool inspect KEY`: the master's record of one object (`Inspect`): size, checksum,
//! state, the read lease and pins it holds, reads since commit, and each replica's tier,
//! node, segment, offset and copy state. Read-only: it takes no lease and changes nothing.

use std::process::ExitCode;

use anyhow::{bail, Context};
use kvpool_client::Client;
use kvpool_proto::ByteSize;
use serde_json::json;

use super::{json_key, nodes::segment_state, print_json, show_key, table::Table};

pub async fn inspect(c: &Client, key: &str, json_out: bool) -> anyhow::Result<ExitCode> {
    let Some(d) = c
        .inspect(key.as_bytes())
        .await
        .with_context(|| format!("inspect {key:?}"))?
    else {
        bail!("inspect {key:?}: not found");
    };
    let status = c.status().await.context("status")?;
    let node_of = |id| status.nodes.iter().find(|n| n.id == id);
    // Where the replica's segment stands now (its node may have died since).
    let segment = |r: &kvpool_proto::ReplicaDesc| {
        node_of(r.node)
            .and_then(|n| {
                n.segments
                    .iter()
                    .find(|s| s.id == r.segment)
                    .map(|s| segment_state(n, s))
            })
            .unwrap_or("gone")
    };
    if json_out {
        let mut doc = json_key(key.as_bytes());
        let replicas: Vec<_> = d
            .replicas
            .iter()
            .map(|r| {
                let p = &r.replica;
                json!({
                    "id": p.id.0.to_string(),
                    "node": p.node.to_string(),
                    "name": node_of(p.node).map(|n| n.name.clone()),
                    "addr": p.addr,
                    "segment": p.segment.to_string(),
                    "tier": p.tier.to_string(),
                    "offset": p.offset,
                    "len": p.len,
                    "state": r.state,
                    "segment_state": segment(p),
                })
            })
            .collect();
        doc.insert("size".into(), d.len.into());
        doc.insert("checksum".into(), format!("{:08x}", d.checksum).into());
        doc.insert("state".into(), d.state.clone().into());
        doc.insert("lease_left_ms".into(), d.lease_left_ms.into());
        doc.insert("soft_pin_left_ms".into(), d.soft_pin_left_ms.into());
        doc.insert("hard_pin".into(), d.hard_pin.into());
        doc.insert("reads".into(), d.reads.into());
        doc.insert("replicas".into(), replicas.into());
        print_json(&doc.into());
        return Ok(ExitCode::SUCCESS);
    }
    let pins = match (d.hard_pin, d.soft_pin_left_ms) {
        (true, _) => "hard (never evicted)".to_string(),
        (false, Some(ms)) => format!("soft, {:.0}s left", ms as f64 / 1000.0),
        (false, None) => "none".to_string(),
    };
    println!("key       {}", show_key(key.as_bytes()));
    println!("state     {}", d.state);
    println!("size      {} ({} bytes)", ByteSize(d.len), d.len);
    println!("checksum  crc32c {:08x}", d.checksum);
    println!("lease     {:.1}s left", d.lease_left_ms as f64 / 1000.0);
    println!("pin       {pins}");
    println!("reads     {}", d.reads);
    println!("replicas  {}", d.replicas.len());
    let mut t = Table::new(&[
        "REPLICA",
        "TIER",
        "STATE",
        "NODE",
        "NAME",
        "ADDRESS",
        "SEGMENT",
        ">OFFSET",
        "SEGMENT STATE",
    ]);
    for r in &d.replicas {
        let p = &r.replica;
        t.row(vec![
            p.id.0.to_string(),
            p.tier.to_string(),
            r.state.clone(),
            p.node.to_string(),
            node_of(p.node).map(|n| n.name.clone()).unwrap_or_default(),
            p.addr.to_string(),
            p.segment.to_string(),
            p.offset.to_string(),
            segment(p).to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(ExitCode::SUCCESS)
}
