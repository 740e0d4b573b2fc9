//! `kvpool-transport-bench`: the data transports side by side in one run: memcpy (the
//! ceiling), TCP and same-host shared memory, puts and gets at 64 KiB, 1 MiB and 16 MiB.
//!
//! ```text
//! cargo build --release -p kvpool-benches -p kvpool-cli
//! target/release/kvpool-transport-bench [--bytes 256MiB] [--rounds 5] [--batch 1]
//! ```
//!
//! It starts `kvpool up` (beside this executable, or `--kvpool PATH`) on loopback. For each
//! size, `bytes / size` objects are consecutive slices of one random region (an engine's
//! registered KV region). Each round, back to back: memcpy copies every object region to
//! region; a client with `transport = tcp`, then one with `transport = shm`, puts them all,
//! `--batch` objects per `put_batch_parts` (each: crc32c, allocation, copy, commit), gets them
//! all into the second region (`get_batch_into_parts` of `--batch`, with the lease check and
//! crc32c verification, as any get), compares one object in 16, and removes them; before the
//! removal, a third client (shared memory, with the location cache) reads every object twice
//! untimed and a third time timed: the hot get, checked on the node's replica board with no
//! round trip. After one
//! unmeasured warm-up round, it reports the median of `--rounds` rounds of each figure, in
//! GB/s (10^9 B/s) of value bytes, and the median of the rounds' shm / memcpy ratios (each
//! round's figures were taken seconds apart, under the same load); a markdown table on
//! standard output.

// Shared with kvpool-bench: starting `kvpool up` (procs needs resp for its Redis helper).
#[allow(dead_code)]
mod procs;
#[allow(dead_code)]
mod resp;

use std::{hint::black_box, time::Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use kvpool_client::{Client, ClientConfig, TransportMode};
use kvpool_proto::{ByteSize, PutOptions};
use rand::RngCore;

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-transport-bench",
    about = "memcpy vs TCP vs shared memory, puts and gets, one table"
)]
struct Args {
    /// The kvpool binary [the `kvpool` beside this executable].
    #[arg(long)]
    kvpool: Option<std::path::PathBuf>,
    /// Value sizes.
    #[arg(long, value_delimiter = ',', default_value = "64KiB,1MiB,16MiB")]
    sizes: Vec<ByteSize>,
    /// Value bytes per phase (the region size).
    #[arg(long, default_value = "256MiB")]
    bytes: ByteSize,
    /// Measured rounds per size; medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Objects per put or get request (one master round trip each way per request).
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

/// One round's figures, GB/s: memcpy, then TCP put and get, then shared-memory put and get,
/// back to back, so that one round's ratios compare moments of the same load.
#[derive(Clone, Copy, Default)]
struct Round {
    memcpy: f64,
    tcp_put: f64,
    tcp_get: f64,
    shm_put: f64,
    shm_get: f64,
    /// Gets by a client with the location cache, of keys it read before: checked on the
    /// node's replica board, no round trip at all.
    shm_hot: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.rounds > 0 && args.batch > 0,
        "--rounds and --batch must be > 0"
    );
    let bin = procs::kvpool_bin(args.kvpool.as_deref())?;
    // The pool holds one phase's objects with room to spare (no eviction while measuring).
    let dram = format!("{}MiB", (args.bytes.0 * 2 + (64 << 20)) >> 20);
    let pool = procs::start_kvpool(&bin, &dram)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = |mode| {
        let mut cfg = ClientConfig::with_master(&pool.addr);
        cfg.transport = mode;
        Client::new(cfg)
    };
    let (tcp, shm) = (client(TransportMode::Tcp), client(TransportMode::Shm));
    let hot = {
        let mut cfg = ClientConfig::with_master(&pool.addr);
        cfg.transport = TransportMode::Shm;
        cfg.location_cache.enabled = true;
        Client::new(cfg)
    };
    println!(
        "| value | memcpy | TCP put | TCP get | shm put | shm get | shm hot get | shm put / memcpy | shm get / memcpy | shm hot get / memcpy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for size in &args.sizes {
        let size = usize::try_from(size.0).context("size")?;
        let n = usize::try_from(args.bytes.0 / size as u64)
            .context("count")?
            .max(1);
        eprintln!("{} x {n}", ByteSize(size as u64));
        let mut src = vec![0u8; n * size];
        rand::thread_rng().fill_bytes(&mut src);
        let mut dst = vec![1u8; n * size];
        let mut rounds = Vec::new();
        // One extra, unmeasured round first: connections, the shared-memory attach, faults.
        for round in 0..=args.rounds {
            let memcpy = memcpy(&src, &mut dst, size);
            let (tcp_put, tcp_get, _) = rt.block_on(transfers(
                &tcp, None, "tcp", &src, &mut dst, size, args.batch,
            ))?;
            let (shm_put, shm_get, shm_hot) = rt.block_on(transfers(
                &shm,
                Some(&hot),
                "shm",
                &src,
                &mut dst,
                size,
                args.batch,
            ))?;
            if round > 0 {
                rounds.push(Round {
                    memcpy,
                    tcp_put,
                    tcp_get,
                    shm_put,
                    shm_get,
                    shm_hot,
                });
            }
        }
        let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} % | {:.0} % | {:.0} % |",
            ByteSize(size as u64),
            med(&|r| r.memcpy),
            med(&|r| r.tcp_put),
            med(&|r| r.tcp_get),
            med(&|r| r.shm_put),
            med(&|r| r.shm_get),
            med(&|r| r.shm_hot),
            100.0 * med(&|r| r.shm_put / r.memcpy),
            100.0 * med(&|r| r.shm_get / r.memcpy),
            100.0 * med(&|r| r.shm_hot / r.memcpy),
        );
    }
    rt.block_on(async {
        let addr = node_addr(&shm).await?;
        ensure!(
            shm.transport_to(&addr) == "shm" && tcp.transport_to(&addr) == "tcp",
            "the clients did not use the transports they were set to"
        );
        Ok(())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Copies every object from `src` to `dst`, object by object.
fn memcpy(src: &[u8], dst: &mut [u8], size: usize) -> f64 {
    let t = Instant::now();
    for (d, s) in dst.chunks_mut(size).zip(src.chunks(size)) {
        d.copy_from_slice(black_box(s));
    }
    black_box(&mut *dst);
    gbps(src.len(), t.elapsed().as_secs_f64())
}

/// The timed gets of every object by `client` into `dst`, `batch` per request: GB/s.
async fn gets(
    client: &Client,
    keys: &[Vec<u8>],
    dst: &mut [u8],
    size: usize,
    batch: usize,
    mode: &str,
) -> Result<f64> {
    let t = Instant::now();
    for (ks, ds) in keys.chunks(batch).zip(dst.chunks_mut(batch * size)) {
        let refs: Vec<&[u8]> = ks.iter().map(Vec::as_slice).collect();
        let mut single: Vec<[&mut [u8]; 1]> = ds.chunks_mut(size).map(|d| [d]).collect();
        let mut dests: Vec<&mut [&mut [u8]]> = single.iter_mut().map(|p| &mut p[..]).collect();
        for got in client.get_batch_into_parts(&refs, &mut dests).await {
            let got = got.with_context(|| format!("{mode} get"))?;
            ensure!(got == Some(size as u64), "{mode} get: {got:?}");
        }
    }
    Ok(gbps(dst.len(), t.elapsed().as_secs_f64()))
}

/// One round of puts and gets of every object by `client`: GB/s of each, and of the gets by
/// `hot` (a client with the location cache) once it has read every object twice (0 without).
async fn transfers(
    client: &Client,
    hot: Option<&Client>,
    mode: &str,
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    batch: usize,
) -> Result<(f64, f64, f64)> {
    let keys: Vec<Vec<u8>> = (0..src.len() / size)
        .map(|i| format!("tb/{i:08}").into_bytes())
        .collect();
    let t = Instant::now();
    for (ks, vs) in keys.chunks(batch).zip(src.chunks(batch * size)) {
        let parts: Vec<[&[u8]; 1]> = vs.chunks(size).map(|v| [v]).collect();
        let items: Vec<(&[u8], &[&[u8]])> = ks
            .iter()
            .zip(&parts)
            .map(|(k, p)| (k.as_slice(), &p[..]))
            .collect();
        for r in client.put_batch_parts(&items, &PutOptions::default()).await {
            r.with_context(|| format!("{mode} put"))?;
        }
    }
    let put = gbps(src.len(), t.elapsed().as_secs_f64());
    dst.fill(0);
    let get = gets(client, &keys, dst, size, batch, mode).await?;
    for i in (0..keys.len()).step_by(16) {
        ensure!(
            dst[i * size..][..size] == src[i * size..][..size],
            "{mode}: object {i} differs"
        );
    }
    let mut hot_get = 0.0;
    if let Some(h) = hot {
        // A key is cached from its second lookup on: two untimed passes, then the timed one.
        for _ in 0..2 {
            gets(h, &keys, dst, size, batch, "hot").await?;
        }
        dst.fill(0);
        hot_get = gets(h, &keys, dst, size, batch, "hot").await?;
        ensure!(dst[..size] == src[..size], "hot: object 0 differs");
    }
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    for r in client.remove(&refs, true).await {
        r.context("remove")?;
    }
    Ok((put, get, hot_get))
}

/// The data address of the pool's (one) node.
async fn node_addr(c: &Client) -> Result<String> {
    let s = c.status().await.context("status")?;
    s.nodes
        .first()
        .map(|n| n.addr.clone())
        .context("no node in the pool")
}
