//! `kvpool-client-bench`: the Rust client alone, in the shape of an inference engine's
//! zero-copy path, as the baseline `benches/python_client.py` compares the Python binding
//! with.
//!
//! ```text
//! kvpool-client-bench --master ADDR --size 1MiB --count 256 --batch 4 [--rounds 1]
//! kvpool-client-bench --limits        # memcpy / loopback TCP / crc32c, one JSON line
//! ```
//!
//! One `Client`, one task. The values are consecutive `size`-byte slices of one random region
//! (object `i` at offset `i * size`, as an engine's registered KV region); gets scatter into
//! a second region laid out the same way. Per round: put all `count` objects in batches of
//! `batch` (`put_batch_parts`), get them all back (`get_batch_into_parts`), check one object
//! in 16 byte for byte, and remove them (force). Keys are `{prefix}/{i:010}`. Regions, keys
//! and a warm-up round trip are made before the clock starts. Each timed phase prints one
//! JSON line on standard output:
//! `{"phase":"put","round":0,"size":..,"batch":..,"objects":..,"bytes":..,"secs":..,"cpu_secs":..}`
//! (`cpu_secs`: user + system time of the whole process, every thread, during the phase).

// Shared with kvpool-bench; this binary prints the limits as JSON, not as its table.
#[allow(dead_code)]
mod limits;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use kvpool_client::{Client, ClientConfig};
use kvpool_proto::{ByteSize, PutOptions};
use rand::RngCore;

/// One object in this many is compared byte for byte after the gets.
const VERIFY_EVERY: usize = 16;

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-client-bench",
    about = "Batched zero-copy puts and gets of one Rust client, one JSON line per phase"
)]
struct Args {
    /// The master's address ("host:port").
    #[arg(long, required_unless_present = "limits")]
    master: Option<String>,
    /// Bytes per object.
    #[arg(long, default_value = "1MiB")]
    size: ByteSize,
    /// Objects per phase.
    #[arg(long, default_value_t = 256)]
    count: usize,
    /// Objects per request.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Rounds of put, get, verify, remove.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Key prefix.
    #[arg(long, default_value = "clientbench")]
    prefix: String,
    /// Only measure this machine's memcpy, loopback TCP and crc32c (`benches/src/limits.rs`,
    /// 0.3 s per compute test and 768 MB per TCP figure, a third of `kvpool-bench`'s) and
    /// print them as one JSON line.
    #[arg(long)]
    limits: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.limits {
        let l = limits::measure(&limits::LimitPlan {
            compute_time: Duration::from_millis(300),
            tcp_bytes: 768_000_000,
        })
        .context("measuring the machine's limits")?;
        println!(
            "{{\"phase\":\"limits\",\"machine\":{:?},\"memcpy\":{:.3},\"tcp1\":{:.3},\"tcp4\":{:.3},\"tcp1_hot\":{:.3},\"crc32c\":{:.3}}}",
            limits::machine(),
            l.memcpy,
            l.tcp1,
            l.tcp4,
            l.tcp1_hot,
            l.crc32c
        );
        return Ok(());
    }
    let size = usize::try_from(args.size.0).context("--size")?;
    ensure!(
        size > 0 && args.count > 0 && args.batch > 0,
        "--size, --count and --batch must be > 0"
    );
    let master = args.master.clone().context("--master")?;
    // A multi-thread runtime driven by `block_on` from this thread: what the Python binding
    // does (python/src/runtime.rs), so both sides schedule the same way.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(&args, &master, size))
}

async fn run(args: &Args, master: &str, size: usize) -> Result<()> {
    let client = Client::new(ClientConfig::with_master(master));
    let n = args.count;
    // Both regions written before the clock starts, so page faults are not measured.
    let mut src = vec![0u8; n * size];
    rand::thread_rng().fill_bytes(&mut src);
    let mut dst = vec![1u8; n * size];
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{}/{i:010}", args.prefix).into_bytes())
        .collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    warm_up(&client, &args.prefix).await?;

    for round in 0..args.rounds {
        dst.fill(0);
        // Put: object i is src[i * size..][..size], one part each.
        let started = Started::now();
        for (b, chunk) in src.chunks(args.batch * size).enumerate() {
            let parts: Vec<[&[u8]; 1]> = chunk.chunks(size).map(|v| [v]).collect();
            let items: Vec<(&[u8], &[&[u8]])> = parts
                .iter()
                .enumerate()
                .map(|(j, p)| (key_refs[b * args.batch + j], &p[..]))
                .collect();
            for (r, (key, _)) in client
                .put_batch_parts(&items, &PutOptions::default())
                .await
                .into_iter()
                .zip(&items)
            {
                r.with_context(|| format!("put {}", String::from_utf8_lossy(key)))?;
            }
        }
        started.report("put", round, size, args.batch, n);

        // Get: object i into dst[i * size..][..size].
        let started = Started::now();
        for (b, chunk) in dst.chunks_mut(args.batch * size).enumerate() {
            let ks = &key_refs[b * args.batch..][..chunk.len() / size];
            let mut single: Vec<[&mut [u8]; 1]> = chunk.chunks_mut(size).map(|d| [d]).collect();
            let mut dests: Vec<&mut [&mut [u8]]> = single.iter_mut().map(|p| &mut p[..]).collect();
            for (r, key) in client
                .get_batch_into_parts(ks, &mut dests)
                .await
                .into_iter()
                .zip(ks)
            {
                let name = || String::from_utf8_lossy(key).into_owned();
                match r.with_context(|| format!("get {}", name()))? {
                    Some(len) if len == size as u64 => {}
                    Some(len) => bail!("get {}: {len} bytes, expected {size}", name()),
                    None => bail!("get {}: not found", name()),
                }
            }
        }
        started.report("get", round, size, args.batch, n);

        for i in (0..n).step_by(VERIFY_EVERY) {
            let (want, got) = (&src[i * size..][..size], &dst[i * size..][..size]);
            if want != got {
                let at = want.iter().zip(got).position(|(w, g)| w != g).unwrap_or(0);
                bail!(
                    "get {}: wrong byte at {at}",
                    String::from_utf8_lossy(&keys[i])
                );
            }
        }
        for r in client.remove(&key_refs, true).await {
            r.context("remove")?;
        }
    }
    Ok(())
}

/// A 4 KiB and a 16 MiB round trip, so the clock does not include connecting (the large one
/// opens every striped data connection), as `kvpool-bench` warms up.
async fn warm_up(client: &Client, prefix: &str) -> Result<()> {
    for size in [4usize << 10, 16 << 20] {
        let key = format!("{prefix}-warmup/{size}").into_bytes();
        let value = vec![0x42u8; size];
        client
            .put_batch_parts(&[(&key[..], &[&value[..]][..])], &PutOptions::default())
            .await
            .remove(0)
            .context("warm-up put")?;
        let mut buf = vec![0u8; size];
        client
            .get_into(&key, &mut buf)
            .await
            .context("warm-up get")?;
        ensure!(buf == value, "warm-up get returned wrong bytes");
        client
            .remove(&[&key[..]], true)
            .await
            .remove(0)
            .context("warm-up remove")?;
    }
    Ok(())
}

/// When a phase started, by the clock and by this process's CPU time.
struct Started {
    at: Instant,
    cpu: f64,
}

impl Started {
    fn now() -> Self {
        Started {
            at: Instant::now(),
            cpu: cpu_secs(),
        }
    }

    /// The phase's JSON line: wall time and CPU time since `now()`.
    fn report(&self, phase: &str, round: usize, size: usize, batch: usize, objects: usize) {
        let (secs, cpu) = (self.at.elapsed().as_secs_f64(), cpu_secs() - self.cpu);
        println!(
            "{{\"phase\":\"{phase}\",\"round\":{round},\"size\":{size},\"batch\":{batch},\
             \"objects\":{objects},\"bytes\":{},\"secs\":{secs:.6},\"cpu_secs\":{cpu:.2}}}",
            objects * size
        );
    }
}

/// CPU time (user + system) of this whole process so far, all threads, from `/proc/self/stat`
/// (in clock ticks of 10 ms: Linux's USER_HZ is 100), so a phase's CPU is the difference of
/// two readings. What Python's `os.times()` reports for its side.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that closes the command name: state is the 1st, utime the 12th,
    // stime the 13th (fields 14 and 15 of proc(5)).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}
