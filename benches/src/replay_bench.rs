//! `kvpool-replay-bench`: the share of prompt tokens a real pool serves on a request trace,
//! beside an unbounded cache and LRUs of the same size (`trace.rs`), in one run.
//!
//! ```text
//! cargo build --release --bins && target/release/kvpool-replay-bench \
//!     --trace ../shared/data/mooncake_synthetic_trace.jsonl --dram-blocks 5000 --nvme-blocks 50000
//! ```
//!
//! The trace is Mooncake's FAST'25 format (JSON lines with `input_length` and `hash_ids` of
//! 512-token blocks). For each request, as an engine's connector does: one `exists` over the
//! request's block keys (with read leases), a get of the leading present blocks (each
//! verified byte for byte; a block that went away between the two ends the match), then puts
//! of every block from the first miss on (a block already there answers AlreadyExists). The
//! pool is `kvpool up` with DRAM for `--dram-blocks` objects of `--block-bytes` and an NVMe
//! tier file for `--nvme-blocks` (0: none); `--config` passes master settings (admission,
//! watermarks) to compare policies. Requests run back to back, one at a time: the figure is
//! the pool's policy at this pace, not its speed.

// Shared with kvpool-bench, which uses all of them.
#[allow(dead_code)]
mod procs;
#[allow(dead_code)]
mod resp;
mod trace;

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kvpool_client::{Client, ClientConfig, ErrorCode};
use kvpool_proto::{ByteSize, PutOptions, Tier};
use trace::{Lru, Request, Served, Unbounded};

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-replay-bench",
    about = "Prompt tokens a real pool serves on a request trace, beside unbounded and LRU caches"
)]
struct Args {
    /// JSON-lines trace (Mooncake FAST'25 format).
    #[arg(long, default_value = "../shared/data/mooncake_synthetic_trace.jsonl")]
    trace: PathBuf,
    /// Bytes of each block's pool object (the figure does not depend on it; the pool's
    /// capacity is sized in blocks of this size).
    #[arg(long, default_value = "16KiB")]
    block_bytes: ByteSize,
    /// DRAM of the pool, in blocks.
    #[arg(long, default_value_t = 5_000)]
    dram_blocks: u64,
    /// NVMe tier of the pool, in blocks (0: DRAM only).
    #[arg(long, default_value_t = 50_000)]
    nvme_blocks: u64,
    /// Folder for the NVMe tier file (on a real disk), removed afterwards.
    #[arg(long, default_value = "target/replay-bench")]
    dir: PathBuf,
    /// A kvpool config file for the pool (`[master]` admission, watermarks).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Replay only the first N requests (0: all).
    #[arg(long, default_value_t = 0)]
    requests: usize,
    /// The kvpool binary (default: beside this one).
    #[arg(long)]
    kvpool: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("reading the trace {}", args.trace.display()))?;
    let mut requests = trace::parse(&text)?;
    if args.requests > 0 {
        requests.truncate(args.requests);
    }
    if requests.is_empty() {
        bail!("{}: no requests", args.trace.display());
    }
    let bin = procs::kvpool_bin(args.kvpool.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    let pool = rt.block_on(replay_pool(&args, &bin, &requests))?;

    let total = args.dram_blocks + args.nvme_blocks;
    let refs: Vec<(String, Served)> = vec![
        (
            "unbounded".into(),
            trace::replay(&requests, &mut Unbounded::default()),
        ),
        (
            format!("LRU, {total} blocks"),
            trace::replay(&requests, &mut Lru::new(total as usize)),
        ),
        (
            format!("LRU dropping tails first, {total} blocks"),
            trace::replay(&requests, &mut Lru::prefix_aware(total as usize)),
        ),
        (
            format!("LRU, {} blocks (the DRAM alone)", args.dram_blocks),
            trace::replay(&requests, &mut Lru::new(args.dram_blocks as usize)),
        ),
    ];
    println!(
        "Trace {} ({} requests, {} prompt tokens), blocks of 512 tokens as {} objects.\n",
        args.trace.display(),
        requests.len(),
        pool.served.total,
        args.block_bytes
    );
    println!("| cache | prompt tokens served |\n|---|---|");
    println!(
        "| kvpool: {} blocks DRAM + {} blocks NVMe{} | {:.1} % |",
        args.dram_blocks,
        args.nvme_blocks,
        args.config
            .as_ref()
            .map(|c| format!(" ({})", c.display()))
            .unwrap_or_default(),
        pool.served.ratio() * 100.0
    );
    for (name, s) in &refs {
        println!("| {name} | {:.1} % |", s.ratio() * 100.0);
    }
    println!(
        "\nThe pool at the end: {} objects, {} in DRAM, {} on NVMe; {} evictions; {} blocks put, \
         {} lost between exists and get; {:.1} s.",
        pool.objects,
        pool.dram_used,
        pool.nvme_used,
        pool.evictions,
        pool.puts,
        pool.vanished,
        pool.seconds
    );
    if !pool.refused.is_empty() {
        println!("Puts refused: {:?}.", pool.refused);
    }
    Ok(())
}

struct PoolRun {
    served: Served,
    /// Puts refused, by error code.
    refused: std::collections::BTreeMap<String, u64>,
    puts: u64,
    vanished: u64,
    objects: u64,
    dram_used: ByteSize,
    nvme_used: ByteSize,
    evictions: u64,
    seconds: f64,
}

/// Removes the bench's folder (tier file and index) on drop.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn replay_pool(args: &Args, bin: &Path, requests: &[Request]) -> Result<PoolRun> {
    let size = args.block_bytes.0 as usize;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {:?}", args.dir))?;
    let _cleanup = DirGuard(args.dir.clone());
    let nvme = args.dir.join("nvme.dat");
    let key_len = key(0).len();
    // Whole MiBs, so the size reads back as written.
    let mib = |b: u64| format!("{}MiB", b.div_ceil(1 << 20).max(1));
    let dram = mib(args.dram_blocks * size as u64);
    let nvme_size = mib(args.nvme_blocks * kvpool_store::nvme::record_len(key_len, size as u64));
    let mut extra: Vec<&OsStr> = Vec::new();
    if args.nvme_blocks > 0 {
        extra.extend([
            "--nvme".as_ref(),
            nvme.as_os_str(),
            "--nvme-size".as_ref(),
            nvme_size.as_ref(),
        ]);
    }
    let server = procs::start_kvpool_with(bin, &dram, args.config.as_deref(), &extra)?;
    let client = Client::new(ClientConfig::with_master(&server.addr));
    let opts = PutOptions::default();
    let mut run = PoolRun {
        served: Served::default(),
        refused: Default::default(),
        puts: 0,
        vanished: 0,
        objects: 0,
        dram_used: ByteSize(0),
        nvme_used: ByteSize(0),
        evictions: 0,
        seconds: 0.0,
    };
    let start = Instant::now();
    for (n, r) in requests.iter().enumerate() {
        let keys: Vec<Vec<u8>> = r.hash_ids.iter().map(|&id| key(id)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let present = client
            .exists(&refs, true)
            .await
            .into_iter()
            .take_while(|e| matches!(e, Ok(true)))
            .count();
        let mut matched = 0;
        for (got, &id) in client
            .get_batch(&refs[..present])
            .await
            .into_iter()
            .zip(&r.hash_ids)
        {
            match got {
                Ok(Some(v)) if v == value(id, size) => matched += 1,
                Ok(Some(_)) => bail!("block {id}: the pool returned other bytes"),
                _ => break,
            }
        }
        run.vanished += (present - matched) as u64;
        run.served.add(r, matched);
        let values: Vec<Vec<u8>> = r.hash_ids[matched..]
            .iter()
            .map(|&id| value(id, size))
            .collect();
        let items: Vec<(&[u8], &[u8])> = refs[matched..]
            .iter()
            .zip(&values)
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        for res in client.put_batch(&items, &opts).await {
            match res {
                Ok(()) => run.puts += 1,
                Err(e) if matches!(e.code(), ErrorCode::AlreadyExists | ErrorCode::Processing) => {}
                // A full pool refuses a put; the engine recomputes next time, as here.
                Err(e) => *run.refused.entry(format!("{:?}", e.code())).or_default() += 1,
            }
        }
        if (n + 1) % 500 == 0 {
            eprintln!(
                "{} / {} requests, {:.1} % of prompt tokens served so far",
                n + 1,
                requests.len(),
                run.served.ratio() * 100.0
            );
        }
    }
    run.seconds = start.elapsed().as_secs_f64();
    let st = client.status().await?;
    run.objects = st.objects;
    run.evictions = st.evictions;
    for seg in st.nodes.iter().flat_map(|n| &n.segments) {
        match seg.tier {
            Tier::Dram => run.dram_used.0 += seg.used,
            Tier::Nvme => run.nvme_used.0 += seg.used,
        }
    }
    Ok(run)
}

fn key(id: u64) -> Vec<u8> {
    format!("replay/{id:016x}").into_bytes()
}

/// `size` bytes that differ per block (the testkit's values from the id), so a mixed-up block
/// fails the check.
use kvpool_testkit::value;
