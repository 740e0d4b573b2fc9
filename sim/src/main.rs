//! kvpool-sim: the KV side of a paged-attention engine, for tests and benchmarks.
//!
//! It owns a block table over a host KV cache, "computes" KV bytes that are a deterministic
//! function of the token prefix (so it can check every byte it loads), looks prompt prefixes
//! up in the pool, loads and saves them, plays either side of a P/D hand-off, and serves an
//! OpenAI-like HTTP API. See docs/connector.md, "The engine simulator (kvpool-sim)".

mod engine;
mod http;
mod kv;
mod pd;

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context};
use clap::Parser;
use kvpool_client::{Client, ClientConfig};
use kvpool_connector::{
    BlockHasher, BlockShape, HostKvCache, LayerGroups, Namespace, PoolConnector,
};
use kvpool_proto::PutOptions;

use kvpool_connector::pd::PdConfig;

use crate::{
    engine::{Engine, EngineConfig},
    pd::{PdSide, Role},
};

/// Defaults are Llama-3-8B's KV shape (32 layers, 8 KV heads, head dim 128, bf16, 16-token
/// blocks: 2 MiB per block).
#[derive(Debug, Parser)]
#[command(name = "kvpool-sim", version, about)]
struct Args {
    /// The pool master's RPC address.
    #[arg(long, env = "KVPOOL_MASTER", default_value = "127.0.0.1:50051")]
    master: String,
    /// HTTP address to serve on (port 0: any free port; the `ready` line says which).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// none | kv_producer | kv_consumer | kv_both.
    #[arg(long, default_value = "none")]
    role: Role,
    #[arg(long, default_value = "meta-llama/Meta-Llama-3-8B")]
    model: String,
    #[arg(long, default_value_t = 32)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 2)]
    dtype_bytes: usize,
    /// The KV dtype's name in the namespace [bf16 for 2 bytes, fp8_e4m3 for 1, fp32 for 4].
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV cache size in blocks.
    #[arg(long, default_value_t = 512)]
    blocks: usize,
    /// Layers per pool object: `all` (one object per block) or N.
    #[arg(long, default_value = "all")]
    groups: String,
    /// paged (vLLM's per-layer tensors) | block-first (vLLM's cross-layer cache).
    #[arg(long, default_value = "paged")]
    layout: String,
    #[arg(long, default_value_t = 0)]
    dp_rank: u32,
    #[arg(long, default_value_t = 1)]
    tp_size: u32,
    #[arg(long, default_value_t = 0)]
    tp_rank: u32,
    /// Base bootstrap port (overrides VLLM_MOONCAKE_BOOTSTRAP_PORT / KVPOOL_BOOTSTRAP_PORT;
    /// 0: any free port). This worker listens on base + dp_rank * tp_size + tp_rank.
    #[arg(long)]
    bootstrap_port: Option<u16>,
    /// A producer drops a hand-off no consumer claimed in this time (e.g. 480s, 1s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    abort_timeout: Option<Duration>,
    /// A consumer gives up on a hand-off (and recomputes) after this time.
    #[arg(long, value_parser = humantime::parse_duration)]
    consumer_timeout: Option<Duration>,
    /// Modelled prefill cost per token in µs (0: no GPU time, only the pool's).
    #[arg(long, default_value_t = 0.0)]
    prefill_us_per_token: f64,
    /// Time between the tokens of a streamed answer (modelled decode speed; 0: all at once).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    token_interval: Duration,
    /// Save to (and hand off through) the storage nodes on this host first, as an engine
    /// does with its own host's node (the nodes' data address host, e.g. 127.0.0.2).
    #[arg(long)]
    prefer_host: Option<String>,
}

fn groups(s: &str) -> anyhow::Result<LayerGroups> {
    if s == "all" {
        return Ok(LayerGroups::All);
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(LayerGroups::PerObject(n)),
        _ => bail!("--groups must be `all` or a layer count > 0, not {s:?}"),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(a: Args) -> anyhow::Result<()> {
    let groups = groups(&a.groups)?;
    let block_first = match a.layout.as_str() {
        "paged" => false,
        "block-first" => true,
        l => bail!("--layout must be paged or block-first, not {l:?}"),
    };
    if a.block_size == 0 || a.layers == 0 || a.blocks == 0 {
        bail!("--block-size, --layers and --blocks must be > 0");
    }
    if a.tp_rank >= a.tp_size {
        bail!(
            "--tp-rank {} must be below --tp-size {}",
            a.tp_rank,
            a.tp_size
        );
    }
    if !(a.prefill_us_per_token >= 0.0 && a.prefill_us_per_token.is_finite()) {
        bail!("--prefill-us-per-token must be a finite number >= 0");
    }
    let shape = BlockShape {
        block_size: a.block_size,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        dtype_bytes: a.dtype_bytes,
    };
    let block_bytes = shape.bytes();
    let cache = if block_first {
        HostKvCache::block_first(a.layers, true, a.blocks, block_bytes, groups)
    } else {
        HostKvCache::layer_first(a.layers, true, a.blocks, block_bytes, groups)
    }
    .context("KV cache layout")?;
    let kv_dtype = a.kv_dtype.clone().unwrap_or_else(|| {
        match a.dtype_bytes {
            1 => "fp8_e4m3",
            4 => "fp32",
            _ => "bf16",
        }
        .into()
    });
    // Both layouts give the same object bytes (docs/connector.md §3.1), so the in-block layout
    // tag is the same and a paged engine shares blocks with a block-first one.
    let ns = Namespace {
        model: a.model.clone(),
        kv_dtype,
        layout: format!("vllm-nhd/{}", cache.layout().grouping_tag()),
        block_size: a.block_size as u32,
        tp_rank: a.tp_rank,
        tp_size: a.tp_size,
        pp_rank: 0,
        pp_size: 1,
    };
    let mut ccfg = ClientConfig::with_master(&a.master);
    if let Ok(t) = std::env::var("KVPOOL_TOKEN") {
        ccfg.token = Some(kvpool_proto::Token::new(t.into_bytes()).context("KVPOOL_TOKEN")?);
    }
    let client = Arc::new(Client::new(ccfg));
    let mut conn = PoolConnector::new(client, cache.layout());
    if let Some(host) = &a.prefer_host {
        // Asked once at start: the nodes of a host rarely change, and a node that left is
        // skipped by the master's placement anyway.
        match conn.local_nodes(host).await {
            Ok(nodes) if !nodes.is_empty() => {
                conn = conn.with_put_options(PutOptions {
                    preferred_nodes: nodes,
                    ..PutOptions::default()
                });
            }
            Ok(_) => tracing::warn!("--prefer-host {host}: no live storage node on that host"),
            Err(e) => tracing::warn!("--prefer-host {host}: cannot list the nodes: {e}"),
        }
    }
    let conn = Arc::new(conn);
    let mut pd_cfg = PdConfig::from_env(a.role, a.dp_rank, a.tp_size, a.tp_rank)?;
    if let Some(p) = a.bootstrap_port {
        pd_cfg.base_port = p;
    }
    if let Some(t) = a.abort_timeout {
        pd_cfg.abort_timeout = t;
    }
    if let Some(t) = a.consumer_timeout {
        pd_cfg.consumer_timeout = t;
    }
    let pd = PdSide::start(&conn, pd_cfg).await.context("P/D hand-off")?;
    let cfg = EngineConfig {
        model: a.model.clone(),
        layers: a.layers,
        block_bytes,
        block_size: a.block_size,
        num_blocks: a.blocks,
        groups,
        tp_rank: a.tp_rank,
        prefill_us_per_token: a.prefill_us_per_token,
        save: !matches!(a.role, Role::Consumer),
    };
    let engine = Engine::new(cfg, cache, BlockHasher::new(ns), conn, pd);
    let bootstrap = engine.pd.bootstrap_addr();
    let app = Arc::new(http::App::new(engine, a.token_interval));
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    match bootstrap {
        Some(b) => println!("ready http={addr} bootstrap={b}"),
        None => println!("ready http={addr}"),
    }
    axum::serve(listener, http::router(app))
        .with_graceful_shutdown(shutdown())
        .await
        .context("HTTP server")?;
    Ok(())
}

/// SIGINT or SIGTERM: stop taking requests, finish the ones in flight, exit (the producer's
/// holds end with the process; their leases lapse).
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("no SIGTERM handler ({e}); only SIGINT stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
