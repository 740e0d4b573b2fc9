//! The server verbs. Each binds its listeners first and then prints one `ready` line on
//! standard output (`ready master=ADDR store=ADDR`), so scripts and tests that ask for port 0
//! learn the real addresses.

use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
    cli::{MasterArgs, StoreArgs, TierArgs, UpArgs},
    config::Config,
    ops,
};

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} to {addr}"))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn ready(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {line}");
    let _ = out.flush();
}

pub async fn master(mut cfg: Config, a: MasterArgs) -> anyhow::Result<ExitCode> {
    if let Some(l) = a.listen {
        cfg.master.listen = l;
    }
    if !a.etcd.is_empty() {
        cfg.master.etcd = a.etcd;
    }
    if let Some(c) = a.cluster {
        cfg.master.cluster = c;
    }
    if let Some(ad) = a.advertise {
        cfg.master.advertise = Some(ad);
    }
    if let Some(h) = a.http {
        cfg.master.http = h;
    }
    cfg.master.validate().map_err(anyhow::Error::msg)?;
    let listener = bind(&cfg.master.listen, "master").await?;
    let addr = listener.local_addr()?;
    let (ops, http) = ops::start(&cfg.master.http, kvpool_master::config::DEFAULT_HTTP).await?;
    tracing::info!(%addr, "master listening");
    ready(&format!("master={addr}{}", ops::ready_field(http)));
    // Failing after `ready` still exits non-zero with the reason: a supervisor restarts it.
    kvpool_master::server::run_with_ops(listener, &cfg.master, Some(&ops), shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}

fn apply_store_flags(cfg: &mut Config, a: &StoreArgs) {
    if let Some(m) = &a.leader.master {
        cfg.store.master = m.clone();
    }
    if let Some(l) = &a.listen {
        cfg.store.listen = l.clone();
    }
    if !a.leader.etcd.is_empty() {
        cfg.store.etcd = a.leader.etcd.clone();
    }
    if let Some(c) = &a.leader.cluster {
        cfg.store.cluster = c.clone();
    }
    if let Some(ad) = &a.advertise {
        cfg.store.advertise = Some(ad.clone());
    }
    if let Some(n) = &a.name {
        cfg.store.name = Some(n.clone());
    }
    if let Some(h) = &a.http {
        cfg.store.http = h.clone();
    }
    apply_tier_flags(cfg, &a.tiers);
}

/// `--dram`, `--huge-pages`, and `--nvme PATH` / `--nvme-size SIZE` (which set, or create,
/// the `[store.nvme]` section).
fn apply_tier_flags(cfg: &mut Config, t: &TierArgs) {
    if let Some(d) = t.dram {
        cfg.store.dram = d;
    }
    if t.huge_pages {
        cfg.store.huge_pages = true;
    }
    if t.nvme.is_none() && t.nvme_size.is_none() {
        return;
    }
    let nvme = cfg.store.nvme.get_or_insert_with(Default::default);
    if let Some(p) = &t.nvme {
        nvme.path = p.clone();
    }
    if let Some(s) = t.nvme_size {
        nvme.size = s;
    }
}

pub async fn store(mut cfg: Config, a: StoreArgs) -> anyhow::Result<ExitCode> {
    apply_store_flags(&mut cfg, &a);
    cfg.store.validate().map_err(anyhow::Error::msg)?;
    let listener = bind(&cfg.store.listen, "storage node").await?;
    let (ops, http) = ops::start(&cfg.store.http, kvpool_store::config::DEFAULT_HTTP).await?;
    let handle = kvpool_store::start(cfg.store.clone(), listener).await?;
    ops.add(handle.probe());
    ready(&format!(
        "store={} node={}{}",
        handle.local_addr(),
        handle.node().id(),
        ops::ready_field(http)
    ));
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn up(mut cfg: Config, a: UpArgs) -> anyhow::Result<ExitCode> {
    if let Some(l) = a.listen {
        cfg.master.listen = l;
    }
    if let Some(l) = a.data_listen {
        cfg.store.listen = l;
    }
    // One process, one endpoint: the master's address serves both parts' metrics.
    if let Some(h) = a.http {
        cfg.master.http = h;
    }
    apply_tier_flags(&mut cfg, &a.tiers);
    cfg.master.validate().map_err(anyhow::Error::msg)?;
    cfg.store.validate().map_err(anyhow::Error::msg)?;
    let master_listener = bind(&cfg.master.listen, "master").await?;
    let master_addr = master_listener.local_addr()?;
    let store_listener = bind(&cfg.store.listen, "storage node").await?;
    cfg.store.master = master_addr.to_string();
    let (ops, http) = ops::start(&cfg.master.http, kvpool_master::config::DEFAULT_HTTP).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let master_cfg = cfg.master.clone();
    let mut master_rx = stop_rx.clone();
    let master_ops = ops.clone();
    let mut master = tokio::spawn(async move {
        let stop = async move {
            let _ = master_rx.wait_for(|s| *s).await;
        };
        kvpool_master::server::run_with_ops(master_listener, &master_cfg, Some(&master_ops), stop)
            .await
    });
    // One process, one cluster: a token given only for the master guards the node too.
    if cfg.store.token.is_none() {
        cfg.store.token = cfg.master.token.clone();
    }
    let store = kvpool_store::start(cfg.store.clone(), store_listener).await?;
    ops.add(store.probe());
    // Ready means usable: wait until the node has registered, so a put right after works.
    let mut probe = kvpool_client::ClientConfig::with_master(master_addr.to_string());
    probe.token = cfg.master.token.clone();
    let client = kvpool_client::Client::new(probe);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if master.is_finished() {
            // It failed to start (or stopped): say why instead of waiting out the deadline.
            store.shutdown().await;
            (&mut master).await.context("the master task")??;
            anyhow::bail!("the master stopped before the storage node registered");
        }
        match client.status().await {
            // The node's own view too: its /ready must hold once `ready` is printed.
            Ok(s) if s.nodes.iter().any(|n| n.alive) && store.node().metrics().registered() => {
                break
            }
            _ if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("the storage node did not register with the master within 30s")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    ready(&format!(
        "master={master_addr} store={}{}",
        store.local_addr(),
        ops::ready_field(http)
    ));
    eprintln!(
        "kvpool is up: master {master_addr}, storage node {} with {} of DRAM. Try: kvpool put hello - <<< world",
        store.local_addr(),
        cfg.store.dram
    );
    // The master may stop on its own (a poisoned state machine): then the whole process
    // stops and says why, rather than keep a node serving for a master that is gone.
    let master_stopped = tokio::select! {
        () = shutdown_signal() => None,
        r = &mut master => Some(r),
    };
    store.shutdown().await;
    let _ = stop_tx.send(true);
    let outcome = match master_stopped {
        Some(r) => r,
        None => master.await,
    };
    drop(stop_rx);
    outcome.context("the master task")??;
    Ok(ExitCode::SUCCESS)
}

pub async fn proxy(config: Config, a: crate::cli::ProxyArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = kvpool_proxy::ProxyConfig::new(a.prefill, a.decode);
    cfg.listen = a.listen;
    cfg.health_interval = a.health_interval.0;
    cfg.request_timeout = a.request_timeout.0;
    cfg.affinity_tokens = a.affinity_tokens;
    if let Some(m) = a.master.as_deref() {
        // The client config (token included) as every kvpool client has it.
        let c = config.client.to_client_config(Some(m));
        c.validate().map_err(anyhow::Error::msg)?;
        cfg.pool = Some(c);
    }
    if let Some(ns) = a.prefix_namespace.as_deref() {
        cfg.prefix_namespace = Some(kvpool_proxy::KeyNamespace::parse(ns)?);
    }
    // Bound before the proxy starts: a chosen address that cannot be had stops it at once.
    let (ops, http) = ops::start(&a.http, kvpool_proxy::DEFAULT_HTTP).await?;
    let (proxy, task) = kvpool_proxy::start(cfg, shutdown_signal()).await?;
    ops.add(proxy.probe());
    tracing::info!(addr = %proxy.addr, "proxy listening");
    ready(&format!("proxy={}{}", proxy.addr, ops::ready_field(http)));
    task.await?;
    Ok(ExitCode::SUCCESS)
}
