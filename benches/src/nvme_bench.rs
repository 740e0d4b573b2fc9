//! `kvpool-nvme-bench`: the NVMe tier alone (no server, no network), next to `fio` on the
//! same file with the same block size and queue depth.
//!
//! ```text
//! cargo build --release -p kvpool-benches && target/release/kvpool-nvme-bench
//! ```
//!
//! Phases, each for `--seconds` with `--qd` tasks issuing requests back to back:
//! sequential 1 MiB record writes, sequential 1 MiB whole-value reads (crc32c-verified), then
//! random 64 KiB writes and reads (every record is written once, untimed, before reads).
//! Each phase runs `--trials` times, tier and fio alternating, and the median trial counts.
//! The tier is measured with each engine asked for; fio runs `--ioengine=io_uring --direct=1`
//! with the same block size and depth on the same file right after the tier's phase, so
//! drift of the shared machine hits both alike. Bandwidth counts value bytes for the tier
//! (each record also moves a 4 KiB header block) and transferred bytes for fio. Tier writes
//! are durable when acknowledged (fdatasync and an index WAL sync per group of concurrent
//! writes); fio's are not, so writes also get a fio row with `--fdatasync=QD`.

mod fio;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kvpool_proto::ByteSize;
use kvpool_store::nvme::{record_len, IoEngineKind, NvmeConfig, NvmeTier};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-nvme-bench",
    about = "NVMe tier bandwidth against fio on the same file"
)]
struct Args {
    /// Folder for the tier file and its index (on the disk to measure, not tmpfs).
    #[arg(long, default_value = "target/nvme-bench")]
    dir: PathBuf,
    /// Size of the tier file.
    #[arg(long, default_value = "512MiB")]
    size: ByteSize,
    /// Requests in flight (tier tasks, ring depth, fio iodepth).
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Tier engines to measure.
    #[arg(long, value_delimiter = ',', default_value = "uring,psync")]
    engines: Vec<String>,
    /// The fio binary; without it the fio columns say "–".
    #[arg(long, default_value = "fio")]
    fio: String,
    /// Trials of each phase (tier and fio alternating); the median of each is reported,
    /// because the shared VM's disk varies more between trials (host cache bursts) than
    /// the engines differ.
    #[arg(long, default_value_t = 3)]
    trials: u32,
    /// Only the read phases (the records are still written once, untimed).
    #[arg(long)]
    reads_only: bool,
    /// A short smoke run (64 MiB file, 0.5 s phases).
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    SeqWrite,
    SeqRead,
    RandWrite,
    RandRead,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::SeqWrite,
        Phase::SeqRead,
        Phase::RandWrite,
        Phase::RandRead,
    ];

    fn block(self) -> usize {
        match self {
            Phase::SeqWrite | Phase::SeqRead => 1 << 20,
            Phase::RandWrite | Phase::RandRead => 64 << 10,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Phase::SeqWrite => "sequential write 1 MiB",
            Phase::SeqRead => "sequential read 1 MiB",
            Phase::RandWrite => "random write 64 KiB",
            Phase::RandRead => "random read 64 KiB",
        }
    }

    fn fio_rw(self) -> &'static str {
        match self {
            Phase::SeqWrite => "write",
            Phase::SeqRead => "read",
            Phase::RandWrite => "randwrite",
            Phase::RandRead => "randread",
        }
    }

    fn writes(self) -> bool {
        matches!(self, Phase::SeqWrite | Phase::RandWrite)
    }
}

const KEY_LEN: usize = 16;

fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:010}").into_bytes()
}

struct Bench {
    tier: Arc<NvmeTier>,
    qd: u32,
    dur: Duration,
    /// Replica ids, unique across phases (a rewrite of a slot replaces the old record).
    next_replica: Arc<AtomicU64>,
    values: Arc<Vec<(Vec<u8>, u32)>>,
}

impl Bench {
    fn slots(&self, block: usize) -> u64 {
        self.tier.capacity() / record_len(KEY_LEN, block as u64)
    }

    /// Writes every slot once, so reads find records.
    async fn fill(&self, block: usize) -> Result<()> {
        let slots = self.slots(block);
        let rec = record_len(KEY_LEN, block as u64);
        let counter = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..self.qd {
            let (tier, counter, values, ids) = (
                self.tier.clone(),
                counter.clone(),
                self.values.clone(),
                self.next_replica.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    let slot = counter.fetch_add(1, Ordering::Relaxed);
                    if slot >= slots {
                        return anyhow::Ok(());
                    }
                    let (v, crc) = &values[usize::from(block != 1 << 20)];
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    tier.write_record(slot * rec, id, &key(id), v, *crc).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }

    /// Runs one phase; returns value bytes per second.
    async fn run(&self, phase: Phase) -> Result<f64> {
        let block = phase.block();
        let slots = self.slots(block);
        if slots == 0 {
            bail!("the tier is smaller than one {block}-byte record");
        }
        let rec = record_len(KEY_LEN, block as u64);
        let qd = u64::from(self.qd);
        let counter = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + self.dur;
        let mut tasks = Vec::new();
        for t in 0..self.qd {
            let (tier, counter, values, ids) = (
                self.tier.clone(),
                counter.clone(),
                self.values.clone(),
                self.next_replica.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut bytes = 0u64;
                let (v, crc) = &values[usize::from(block != 1 << 20)];
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let slot = match phase {
                        Phase::SeqWrite | Phase::SeqRead => n % slots,
                        // Each task owns the slots equal to its number modulo the depth:
                        // two writes never share an extent at once (the master's allocator
                        // guarantees as much).
                        Phase::RandWrite | Phase::RandRead => {
                            let per_task = (slots / qd).max(1);
                            (rng.gen_range(0..per_task) * qd + t as u64) % slots
                        }
                    };
                    let offset = slot * rec;
                    if phase.writes() {
                        let id = ids.fetch_add(1, Ordering::Relaxed);
                        tier.write_record(offset, id, &key(id), v, *crc).await?;
                    } else {
                        let got = tier
                            .read_value(offset, KEY_LEN, block as u64, (0, block as u64))
                            .await?;
                        if got.len() != block {
                            bail!("read {} bytes, wanted {block}", got.len());
                        }
                    }
                    bytes += block as u64;
                }
                anyhow::Ok(bytes)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64())
    }
}

/// fio on the tier's file: bytes per second.
fn fio(args: &Args, file: &Path, size: u64, phase: Phase, fdatasync: bool) -> Result<f64> {
    fio::Job {
        file,
        size,
        rw: phase.fio_rw(),
        block: phase.block(),
        iodepth: args.qd,
        jobs: 1,
        in_batches: false,
        runtime: Duration::from_secs_f64(args_seconds(args)),
        fdatasync: fdatasync.then_some(args.qd),
    }
    .run(&args.fio)
}

fn args_seconds(a: &Args) -> f64 {
    if a.quick {
        0.5
    } else {
        a.seconds
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn mib(bps: f64) -> String {
    format!("{:.0}", bps / (1 << 20) as f64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size = if args.quick { 64 << 20 } else { args.size.0 };
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {:?}", args.dir))?;
    if fio::is_tmpfs(&args.dir) {
        eprintln!(
            "warning: {:?} is tmpfs; this measures memory, not a disk",
            args.dir
        );
    }
    let have_fio = fio::available(&args.fio);
    if !have_fio {
        eprintln!("fio not found ({}); fio columns stay empty", args.fio);
    }
    let engines: Vec<IoEngineKind> = args
        .engines
        .iter()
        .map(|e| match e.as_str() {
            "uring" => Ok(IoEngineKind::Uring),
            "psync" => Ok(IoEngineKind::Psync),
            other => bail!("unknown engine {other:?} (uring, psync)"),
        })
        .collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let values: Arc<Vec<(Vec<u8>, u32)>> = Arc::new(
        [1usize << 20, 64 << 10]
            .iter()
            .map(|&n| {
                let v: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
                let crc = kvpool_proto::crc32c::crc32c(&v);
                (v, crc)
            })
            .collect(),
    );
    let file = args.dir.join("tier");
    let index = args.dir.join("tier.index");
    // results[phase][engine]
    let mut tier_bw = vec![vec![Vec::new(); engines.len()]; Phase::ALL.len()];
    let mut fio_bw = vec![Vec::new(); Phase::ALL.len()];
    let mut fio_sync_bw = vec![Vec::new(); Phase::ALL.len()];
    for (ei, &kind) in engines.iter().enumerate() {
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir_all(&index);
        let cfg = NvmeConfig {
            path: file.clone(),
            size: ByteSize(size),
            engine: kind,
            queue_depth: args.qd,
            index_dir: Some(index.clone()),
            ..NvmeConfig::default()
        };
        let (tier, _) = NvmeTier::open(cfg).context("opening the tier")?;
        eprintln!("engine {}: {} MiB file", tier.engine_name(), size >> 20);
        let bench = Bench {
            tier: Arc::new(tier),
            qd: args.qd,
            dur: Duration::from_secs_f64(args_seconds(&args)),
            next_replica: Arc::new(AtomicU64::new(1)),
            values: values.clone(),
        };
        // fio's writes destroy the tier's records, so per block size: write trials (tier,
        // then fio, alternating), an untimed fill of every record, then read trials.
        let with_fio = have_fio && ei == 0;
        for pair in Phase::ALL.chunks(2) {
            let (w, r) = (pair[0], pair[1]);
            for _ in 0..if args.reads_only { 0 } else { args.trials } {
                let bw = rt.block_on(bench.run(w))?;
                eprintln!("  {:<24} tier {} MiB/s", w.name(), mib(bw));
                tier_bw[w as usize][ei].push(bw);
                if with_fio {
                    let f = fio(&args, &file, size, w, false)?;
                    eprintln!("  {:<24} fio  {} MiB/s", w.name(), mib(f));
                    fio_bw[w as usize].push(f);
                    let f = fio(&args, &file, size, w, true)?;
                    eprintln!("  {:<24} fio --fdatasync {} MiB/s", w.name(), mib(f));
                    fio_sync_bw[w as usize].push(f);
                }
            }
            eprintln!("  writing every {} KiB record", w.block() >> 10);
            rt.block_on(bench.fill(w.block()))?;
            for _ in 0..args.trials {
                let bw = rt.block_on(bench.run(r))?;
                eprintln!("  {:<24} tier {} MiB/s", r.name(), mib(bw));
                tier_bw[r as usize][ei].push(bw);
                if with_fio {
                    let f = fio(&args, &file, size, r, false)?;
                    eprintln!("  {:<24} fio  {} MiB/s", r.name(), mib(f));
                    fio_bw[r as usize].push(f);
                }
            }
        }
    }
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&index);

    let dash = || "–".to_string();
    print!("| test | QD |");
    for e in &args.engines {
        print!(" tier {e} MiB/s |");
    }
    println!(
        " fio io_uring MiB/s | tier {}/fio | fio --fdatasync={} MiB/s |",
        args.engines[0], args.qd
    );
    print!("|---|---|");
    for _ in &engines {
        print!("---|");
    }
    println!("---|---|---|");
    for (pi, phase) in Phase::ALL.iter().enumerate() {
        print!("| {} | {} |", phase.name(), args.qd);
        for bw in &tier_bw[pi] {
            print!(" {} |", median(bw).map_or_else(dash, mib));
        }
        let ratio = match (median(&tier_bw[pi][0]), median(&fio_bw[pi])) {
            (Some(t), Some(f)) if f > 0.0 => format!("{:.0} %", 100.0 * t / f),
            _ => dash(),
        };
        println!(
            " {} | {ratio} | {} |",
            median(&fio_bw[pi]).map_or_else(dash, mib),
            median(&fio_sync_bw[pi]).map_or_else(dash, mib)
        );
    }
    Ok(())
}
