//! `kvpool inspect KEY`: where an object lives (replicas, tier, node, segment, offset), its
//! size and checksum, and the read lease a lookup grants. It asks the master exactly as a
//! reader does (`GetReplicas`), so it takes a read lease and counts as a lookup.

use std::process::ExitCode;

use anyhow::{bail, Context};
use kvpool_client::Client;
use kvpool_proto::ByteSize;
use serde_json::json;

use super::{json_key, nodes::segment_state, print_json, show_key, table::Table};

pub async fn inspect(c: &Client, key: &str, json_out: bool) -> anyhow::Result<ExitCode> {
    let info = match c.locate(&[key.as_bytes()]).await.pop() {
        Some(Ok(Some(info))) => info,
        Some(Ok(None)) => bail!("inspect {key:?}: not found"),
        Some(Err(e)) => return Err(e).with_context(|| format!("inspect {key:?}")),
        None => bail!("inspect {key:?}: no result"),
    };
    let status = c.status().await.context("status")?;
    let node_of = |id| status.nodes.iter().find(|n| n.id == id);
    let state_of = |r: &kvpool_proto::ReplicaDesc| {
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
        let replicas: Vec<_> = info
            .replicas
            .iter()
            .map(|r| {
                json!({
                    "id": r.id.0.to_string(),
                    "node": r.node.to_string(),
                    "name": node_of(r.node).map(|n| n.name.clone()),
                    "addr": r.addr,
                    "segment": r.segment.to_string(),
                    "tier": r.tier.to_string(),
                    "offset": r.offset,
                    "len": r.len,
                    "state": state_of(r),
                })
            })
            .collect();
        doc.insert("size".into(), info.len.into());
        doc.insert("checksum".into(), format!("{:08x}", info.checksum).into());
        doc.insert("lease_ms".into(), info.lease_ms.into());
        doc.insert("replicas".into(), replicas.into());
        print_json(&doc.into());
        return Ok(ExitCode::SUCCESS);
    }
    println!("key       {}", show_key(key.as_bytes()));
    println!("size      {} ({} bytes)", ByteSize(info.len), info.len);
    println!("checksum  crc32c {:08x}", info.checksum);
    println!("lease     {} ms (granted by this lookup)", info.lease_ms);
    println!("replicas  {}", info.replicas.len());
    let mut t = Table::new(&[
        "REPLICA", "TIER", "NODE", "NAME", "ADDRESS", "SEGMENT", ">OFFSET", "STATE",
    ]);
    for r in &info.replicas {
        t.row(vec![
            r.id.0.to_string(),
            r.tier.to_string(),
            r.node.to_string(),
            node_of(r.node).map(|n| n.name.clone()).unwrap_or_default(),
            r.addr.clone(),
            r.segment.to_string(),
            r.offset.to_string(),
            state_of(r).to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(ExitCode::SUCCESS)
}
