//! `kvpool-transport-bench`: the data transports side by side in one run: memcpy (the
//! ceiling), TCP and same-host shared memory, puts and gets at 64 KiB, 1 MiB and 16 MiB.
//!
//! ```text
//! cargo build --release -p kvpool-benches -p kvpool-cli
//! target/release/kvpool-transport-bench [--bytes 256MiB] [--rounds 3]
//! ```
//!
//! It starts `kvpool up` (beside this executable, or `--kvpool PATH`) on loopback. For each
//! size, `bytes / size` objects are consecutive slices of one random region (an engine's
//! registered KV region); one client (`transport = tcp`, then `shm`) puts them all,
//! `--batch` objects per `put_batch_parts` (each: crc32c, allocation, copy, commit), gets them
//! all into a second region (`get_batch_into_parts` of `--batch`, with the lease check and
//! crc32c verification, as any get), compares one object in 16, and removes them. memcpy copies the same objects
//! region to region. Every figure is the best of `--rounds` rounds, in GB/s (10^9 B/s) of
//! value bytes; it prints a markdown table on standard output.

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
    /// Rounds per case; the best is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Objects per put or get request (one master round trip each way per request).
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

/// One size's figures, GB/s.
#[derive(Default)]
struct Row {
    memcpy: f64,
    tcp_put: f64,
    tcp_get: f64,
    shm_put: f64,
    shm_get: f64,
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
    let mut rows = Vec::new();
    for size in &args.sizes {
        let size = usize::try_from(size.0).context("size")?;
        let n = usize::try_from(args.bytes.0 / size as u64)
            .context("count")?
            .max(1);
        eprintln!("{} x {n}", ByteSize(size as u64));
        let mut src = vec![0u8; n * size];
        rand::thread_rng().fill_bytes(&mut src);
        let mut dst = vec![1u8; n * size];
        let mut row = Row {
            memcpy: best(args.rounds, || memcpy(&src, &mut dst, size)),
            ..Row::default()
        };
        for mode in [TransportMode::Tcp, TransportMode::Shm] {
            let (put, get) =
                rt.block_on(transfers(&pool.addr, mode, &src, &mut dst, size, &args))?;
            match mode {
                TransportMode::Tcp => (row.tcp_put, row.tcp_get) = (put, get),
                _ => (row.shm_put, row.shm_get) = (put, get),
            }
        }
        rows.push((size, row));
    }
    println!("| value | memcpy | TCP put | TCP get | shm put | shm get | shm put / memcpy | shm get / memcpy |");
    println!("|---|---|---|---|---|---|---|---|");
    for (size, r) in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} % | {:.0} % |",
            ByteSize(size as u64),
            r.memcpy,
            r.tcp_put,
            r.tcp_get,
            r.shm_put,
            r.shm_get,
            100.0 * r.shm_put / r.memcpy,
            100.0 * r.shm_get / r.memcpy
        );
    }
    Ok(())
}

fn best(rounds: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..rounds).map(|_| f()).fold(0.0, f64::max)
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

/// Best put and get GB/s of one client over `mode`.
async fn transfers(
    master: &str,
    mode: TransportMode,
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    args: &Args,
) -> Result<(f64, f64)> {
    let mut cfg = ClientConfig::with_master(master);
    cfg.transport = mode;
    let client = Client::new(cfg);
    let keys: Vec<Vec<u8>> = (0..src.len() / size)
        .map(|i| format!("tb/{i:08}").into_bytes())
        .collect();
    let (mut put, mut get) = (0f64, 0f64);
    // One extra, unmeasured round first: connections, the shared-memory attach, page faults.
    let batch = args.batch;
    for round in 0..=args.rounds {
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
        let p = gbps(src.len(), t.elapsed().as_secs_f64());
        dst.fill(0);
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
        let g = gbps(src.len(), t.elapsed().as_secs_f64());
        for i in (0..keys.len()).step_by(16) {
            ensure!(
                dst[i * size..][..size] == src[i * size..][..size],
                "{mode}: object {i} differs"
            );
        }
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        for r in client.remove(&refs, true).await {
            r.context("remove")?;
        }
        if round > 0 {
            put = put.max(p);
            get = get.max(g);
        }
    }
    if mode == TransportMode::Shm {
        ensure!(
            client.transport_to(&node_addr(&client).await?) == "shm",
            "the shm client did not use shared memory"
        );
    }
    Ok((put, get))
}

/// The data address of the pool's (one) node.
async fn node_addr(c: &Client) -> Result<String> {
    let s = c.status().await.context("status")?;
    s.nodes
        .first()
        .map(|n| n.addr.clone())
        .context("no node in the pool")
}
