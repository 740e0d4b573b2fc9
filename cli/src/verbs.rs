//! The admin verbs: thin wrappers over `kvpool-client`.

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use anyhow::{bail, Context};
use kvpool_client::{Client, ErrorCode};
use kvpool_proto::{ByteSize, PutOptions, Tier};

use crate::{
    cli::{DrainArgs, GetArgs, KeyArgs, MasterAddr, PutArgs, RmArgs, StatusArgs},
    config::Config,
};

pub fn client(cfg: &Config, addr: &MasterAddr) -> anyhow::Result<Client> {
    let mut c = cfg.client.to_client_config(addr.leader.master.as_deref());
    if let Some(t) = &addr.tenant {
        c.tenant = Some(t.clone());
    }
    if !addr.leader.etcd.is_empty() {
        c.etcd = addr.leader.etcd.clone();
    }
    if let Some(cl) = &addr.leader.cluster {
        c.cluster = cl.clone();
    }
    c.validate().map_err(anyhow::Error::msg)?;
    Ok(Client::new(c))
}

pub async fn put(cfg: Config, a: PutArgs) -> anyhow::Result<ExitCode> {
    let value = match a.file.as_deref() {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?
        }
        _ => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .context("reading standard input")?;
            v
        }
    };
    let opts = PutOptions {
        replicas: a.replicas,
        overwrite: a.overwrite,
        soft_pin: a.soft_pin,
        hard_pin: a.hard_pin,
        ..PutOptions::default()
    };
    client(&cfg, &a.addr)?
        .put(a.key.as_bytes(), &value, &opts)
        .await
        .with_context(|| format!("put {:?} ({})", a.key, ByteSize(value.len() as u64)))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn get(cfg: Config, a: GetArgs) -> anyhow::Result<ExitCode> {
    let value = client(&cfg, &a.addr)?
        .get(a.key.as_bytes())
        .await
        .with_context(|| format!("get {:?}", a.key))?;
    let Some(value) = value else {
        bail!("get {:?}: not found", a.key);
    };
    match a.output {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::write(&p, &value).with_context(|| format!("writing {}", p.display()))?
        }
        _ => {
            let mut out = std::io::stdout().lock();
            out.write_all(&value).context("writing standard output")?;
            out.flush().context("writing standard output")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rm(cfg: Config, a: RmArgs) -> anyhow::Result<ExitCode> {
    let c = client(&cfg, &a.addr)?;
    let key = match (&a.key, &a.prefix) {
        (_, Some(p)) => return crate::admin::rm_prefix(&c, p, a.force, a.out.json).await,
        (Some(k), None) => k,
        (None, None) => bail!("rm: give a key or --prefix"),
    };
    let mut r = c.remove(&[key.as_bytes()], a.force).await;
    match r.pop() {
        Some(Ok(())) => {
            if a.out.json {
                println!("{}", serde_json::json!({ "key": key, "removed": 1 }));
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Err(e)) if e.code() == ErrorCode::NotFound => bail!("rm {key:?}: not found"),
        Some(Err(e)) => Err(e).with_context(|| format!("rm {key:?}")),
        None => bail!("rm {key:?}: no result"),
    }
}

pub async fn exists(cfg: Config, a: KeyArgs) -> anyhow::Result<ExitCode> {
    let mut r = client(&cfg, &a.addr)?
        .exists(&[a.key.as_bytes()], false)
        .await;
    let say = |present: bool| {
        if a.out.json {
            println!("{}", serde_json::json!({ "key": a.key, "exists": present }));
        } else {
            println!("{}", if present { "yes" } else { "no" });
        }
    };
    match r.pop() {
        Some(Ok(true)) => {
            say(true);
            Ok(ExitCode::SUCCESS)
        }
        Some(Ok(false)) => {
            say(false);
            Ok(ExitCode::from(1))
        }
        Some(Err(e)) => Err(e).with_context(|| format!("exists {:?}", a.key)),
        None => bail!("exists {:?}: no result", a.key),
    }
}

/// How long `status` waits for one node's transport probe: a node that does not answer
/// must not hold up the whole display.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The transport this client would use to each node, by node id: `shm` or `tcp` as
/// `Client::probe_transport` finds it (attaching first where it may), `-` for a node that
/// is down or does not answer the probe in time (nothing is moved to it either way).
async fn node_transports(
    c: &Client,
    nodes: &[kvpool_proto::NodeStatus],
) -> std::collections::HashMap<kvpool_proto::NodeId, &'static str> {
    let mut out = std::collections::HashMap::new();
    for n in nodes {
        let t = if n.alive {
            tokio::time::timeout(PROBE_WAIT, c.probe_transport(&n.addr))
                .await
                .unwrap_or("-")
        } else {
            "-"
        };
        out.insert(n.id, t);
    }
    out
}

pub async fn status(cfg: Config, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let c = client(&cfg, &a.addr)?;
    let s = c.status().await.context("status")?;
    let transports = node_transports(&c, &s.nodes).await;
    let transport = |id: &kvpool_proto::NodeId| transports.get(id).copied().unwrap_or("-");
    let tier_total = |tier: Tier| -> (u64, u64) {
        s.nodes
            .iter()
            .flat_map(|n| &n.segments)
            .filter(|seg| seg.tier == tier)
            .fold((0, 0), |(c, u), seg| (c + seg.capacity, u + seg.used))
    };
    let (cap, used) = tier_total(Tier::Dram);
    let (ncap, nused) = tier_total(Tier::Nvme);
    let alive = s.nodes.iter().filter(|n| n.alive).count();
    if a.out.json {
        let tier = |(c, u): (u64, u64)| serde_json::json!({ "capacity": c, "used": u });
        let doc = serde_json::json!({
            "nodes": s.nodes.len(),
            "alive": alive,
            "objects": s.objects,
            "processing": s.processing,
            "evictions": s.evictions,
            "dram": tier((cap, used)),
            "nvme": tier((ncap, nused)),
            // Per node: the data transport this client (same config, same environment)
            // would use to reach it.
            "transports": s.nodes.iter().map(|n| serde_json::json!({
                "node": n.id.to_string(),
                "name": n.name,
                "addr": n.addr,
                "transport": transport(&n.id),
            })).collect::<Vec<_>>(),
        });
        println!("{doc:#}");
        return Ok(ExitCode::SUCCESS);
    }
    if a.raw {
        println!(
            "nodes={} alive={alive} capacity={cap} used={used} nvme_capacity={ncap} nvme_used={nused} objects={} processing={} evictions={}",
            s.nodes.len(),
            s.objects,
            s.processing,
            s.evictions
        );
        for n in &s.nodes {
            for seg in &n.segments {
                println!(
                    "node={} name={} addr={} alive={} draining={} pending_frees={} pending_commits={} segment={} tier={} healthy={} capacity={} used={} objects={} transport={}",
                    n.id, n.name, n.addr, n.alive, n.draining, n.pending_frees, n.pending_commits, seg.id, seg.tier, seg.healthy, seg.capacity, seg.used, seg.objects, transport(&n.id)
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let pct = |u: u64, c: u64| {
        if c == 0 {
            0.0
        } else {
            u as f64 * 100.0 / c as f64
        }
    };
    println!(
        "pool: {} node(s) ({alive} alive), {} object(s), {} put(s) in progress, {} eviction(s)",
        s.nodes.len(),
        s.objects,
        s.processing,
        s.evictions
    );
    println!(
        "  dram: {} of {} used ({:.1}%)",
        ByteSize(used),
        ByteSize(cap),
        pct(used, cap)
    );
    if ncap > 0 {
        println!(
            "  nvme: {} of {} used ({:.1}%)",
            ByteSize(nused),
            ByteSize(ncap),
            pct(nused, ncap)
        );
    }
    println!();
    println!(
        "{:<18} {:<16} {:<22} {:<9} {:<6} {:<18} {:<5} {:>10} {:>10} {:>9}",
        "NODE",
        "NAME",
        "ADDRESS",
        "TRANSPORT",
        "STATE",
        "SEGMENT",
        "TIER",
        "CAPACITY",
        "USED",
        "OBJECTS"
    );
    for n in &s.nodes {
        for seg in &n.segments {
            let state = crate::admin::segment_state(n, seg);
            println!(
                "{:<18} {:<16} {:<22} {:<9} {:<6} {:<18} {:<5} {:>10} {:>10} {:>9}",
                n.id.to_string(),
                n.name,
                n.addr,
                transport(&n.id),
                state,
                seg.id.to_string(),
                seg.tier.to_string(),
                ByteSize(seg.capacity).to_string(),
                ByteSize(seg.used).to_string(),
                seg.objects
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drain(cfg: Config, a: DrainArgs) -> anyhow::Result<ExitCode> {
    let c = client(&cfg, &a.addr)?;
    let status = c.status().await.context("status")?;
    let matches: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| n.id.to_string() == a.node || n.name == a.node)
        .collect();
    let node = match matches.as_slice() {
        [n] => n.id,
        [] => bail!(
            "drain: no node with id or name {:?} (see `kvpool status`)",
            a.node
        ),
        _ => bail!(
            "drain: {} nodes are named {:?}; give the id",
            matches.len(),
            a.node
        ),
    };
    let mut left = c.drain(node, a.cancel).await.context("drain")?;
    let done = |state: &str, left: u64| {
        if a.out.json {
            let doc = serde_json::json!({ "node": node.to_string(), "state": state, "replicas_left": left });
            println!("{doc}");
        }
    };
    if a.cancel {
        done("serving", left);
        if !a.out.json {
            println!("node {node} takes new data again ({left} replica(s) on it)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.no_wait {
        done("draining", left);
        if !a.out.json {
            println!("node {node} draining: {left} replica(s) left");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let start = std::time::Instant::now();
    let progress =
        crate::admin::progress::Progress::new(&format!("draining {node}"), left, a.out.json);
    loop {
        progress.left(left);
        if left == 0 {
            progress.finish();
            done("drained", 0);
            if !a.out.json {
                println!(
                    "node {node} is drained: it holds nothing and takes no new data; it can be stopped"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if start.elapsed() > a.timeout.0 {
            progress.finish();
            bail!(
                "drain {node}: {left} replica(s) still held after {} (leased or being copied)",
                a.timeout
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        left = c.drain(node, false).await.context("drain")?;
    }
}
