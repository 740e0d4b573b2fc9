//! `kvpool-bench`: kvpool put/get throughput and latency, read against this machine's own
//! limits (memcpy, loopback TCP, crc32c) and against Redis on the same machine, in one run.
//!
//! ```text
//! cargo build --release --bins && target/release/kvpool-bench [--quick]
//! ```
//!
//! It starts `kvpool up` (found beside this executable, or `--kvpool PATH`) and
//! `redis-server` (skipped with a note if not installed) on free loopback ports, runs every
//! case against both, kills both, and prints a markdown report on standard output; progress
//! goes to standard error.

mod backend;
mod fio;
mod limits;
mod nvme_case;
mod procs;
mod report;
mod resp;
mod workload;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use kvpool_proto::ByteSize;

use crate::{
    backend::{Conn, Knobs, System},
    limits::{LimitPlan, Limits},
    report::{Report, Row},
    workload::{Budget, Case, CaseResult},
};

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-bench",
    about = "kvpool throughput and latency against machine limits and Redis"
)]
struct Args {
    /// The kvpool binary [the `kvpool` beside this executable].
    #[arg(long)]
    kvpool: Option<PathBuf>,
    /// The Redis server binary; if it cannot be started the Redis columns stay empty.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Skip Redis.
    #[arg(long)]
    no_redis: bool,
    /// Diagnostic: kvpool gets skip the crc32c check (puts still compute the checksum).
    #[arg(long)]
    no_checksum_verify: bool,
    /// Diagnostic: kvpool clients keep no location cache, so every get asks the master.
    #[arg(long)]
    no_location_cache: bool,
    /// Diagnostic: kvpool clients do not read the master's location index, so every cold get
    /// asks the master.
    #[arg(long)]
    no_master_index: bool,
    /// Gets cycle over only the first N keys a case put (a hot set read again and again)
    /// instead of over every key once; in the NVMe case, over the first N of the objects on
    /// NVMe only [all keys].
    #[arg(long)]
    hot_keys: Option<u64>,
    /// A fast smoke run: small counts, short phases, short limit tests.
    #[arg(long)]
    quick: bool,
    /// Value sizes.
    #[arg(long, value_delimiter = ',', default_value = "4KiB,64KiB,1MiB,16MiB")]
    sizes: Vec<ByteSize>,
    /// Concurrent clients (separate client instances, one task each).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// DRAM given to the kvpool node; a case stores at most half of it.
    #[arg(long, default_value = "2GiB")]
    dram: ByteSize,
    /// Most bytes one phase (a case's puts, or its gets) moves [1GiB; 16MiB with --quick].
    #[arg(long)]
    bytes: Option<ByteSize>,
    /// Longest one phase runs, in seconds [3; 0.3 with --quick].
    #[arg(long)]
    seconds: Option<f64>,
    /// Skip the NVMe case (gets of NVMe-resident objects through a second, NVMe-backed pool).
    #[arg(long)]
    no_nvme_case: bool,
    /// Only the NVMe case: no limits, no DRAM cases, no Redis.
    #[arg(long, conflicts_with = "no_nvme_case")]
    only_nvme_case: bool,
    /// Folder for the NVMe case's tier file, on the disk to measure (not tmpfs); removed
    /// afterwards [`kvpool-bench-nvme-PID` in the target folder this executable is in].
    #[arg(long)]
    nvme_dir: Option<PathBuf>,
    /// Value sizes of the NVMe case.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,64KiB")]
    nvme_sizes: Vec<ByteSize>,
    /// Bytes of values the NVMe case writes per size [1GiB; 128MiB with --quick].
    #[arg(long)]
    nvme_bytes: Option<ByteSize>,
    /// The fio binary for the NVMe case's disk limit; without it the fio column says "–".
    #[arg(long, default_value = "fio")]
    fio: String,
}

impl Args {
    /// The per-phase budget. A case stores at most half the pool, so kvpool never evicts
    /// (an evicted key would fail its get) and both systems hold the same data.
    fn budget(&self) -> Budget {
        let (bytes, secs) = if self.quick {
            (16 << 20, 0.3)
        } else {
            (1 << 30, 3.0)
        };
        Budget {
            bytes: self.bytes.map_or(bytes, |b| b.0).min(self.dram.0 / 2),
            time: Duration::from_secs_f64(self.seconds.unwrap_or(secs)),
        }
    }

    /// The NVMe case's plan. Its get phases have the time limit of the DRAM cases and no
    /// byte limit beyond the data set (gets cycle over it).
    fn nvme_plan<'a>(&self, bin: &'a Path) -> Result<nvme_case::Plan<'a>> {
        let dir = match &self.nvme_dir {
            Some(d) => d.clone(),
            None => {
                // target/release/kvpool-bench -> target/kvpool-bench-nvme-PID
                let exe = std::env::current_exe().context("locating kvpool-bench itself")?;
                let target = exe
                    .parent()
                    .and_then(Path::parent)
                    .context("no folder above this executable's")?;
                target.join(format!("kvpool-bench-nvme-{}", std::process::id()))
            }
        };
        let bytes = self
            .nvme_bytes
            .map_or(if self.quick { 128 << 20 } else { 1 << 30 }, |b| b.0);
        Ok(nvme_case::Plan {
            bin,
            dir,
            sizes: self
                .nvme_sizes
                .iter()
                .map(|s| usize::try_from(s.0).unwrap_or(usize::MAX).max(1))
                .collect(),
            clients: self.clients.iter().map(|&c| c.max(1)).collect(),
            bytes,
            budget: Budget {
                bytes,
                time: self.budget().time,
            },
            verify: !self.no_checksum_verify,
            master_index: !self.no_master_index,
            hot_keys: self.hot_keys,
            fio: fio::available(&self.fio).then(|| self.fio.clone()),
        })
    }

    fn limit_plan(&self) -> LimitPlan {
        if self.quick {
            LimitPlan {
                compute_time: Duration::from_millis(200),
                tcp_bytes: 256_000_000,
            }
        } else {
            LimitPlan {
                compute_time: Duration::from_secs(1),
                tcp_bytes: 2_000_000_000,
            }
        }
    }

    /// Every (size, clients, batch) to run, in order.
    fn cases(&self) -> Vec<Case> {
        let mut cases = Vec::new();
        for size in &self.sizes {
            let size = usize::try_from(size.0).unwrap_or(usize::MAX).max(1);
            for &clients in &self.clients {
                for batch in batches(size) {
                    cases.push(Case {
                        size,
                        clients: clients.max(1),
                        batch,
                    });
                }
            }
        }
        cases
    }
}

/// Objects per request: one, and a batch of about 256 KiB to 4 MiB, the range where per-request
/// costs (master round trips, syscalls) are amortized but a request still fits one 4 MiB
/// stripe of the transfer engine. 16 MiB values are already striped, so they run unbatched.
fn batches(size: usize) -> Vec<usize> {
    let batched = match size {
        0..=4096 => 64,
        4097..=65536 => 16,
        65537..=1048576 => 4,
        _ => 1,
    };
    if batched > 1 {
        vec![1, batched]
    } else {
        vec![1]
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Found first, so a missing binary fails before seconds of limit tests.
    let bin = procs::kvpool_bin(args.kvpool.as_deref())?;
    if args.only_nvme_case {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let nvme = runtime.block_on(run_nvme_case(&args, &bin))?;
        print!("{}", nvme_case::render(&nvme));
        return Ok(());
    }
    // Measured before the servers start and again after they are gone, so nothing of ours
    // competes for the cores, and the two figures show how much the shared machine drifted.
    let before = measure_limits(&args, "before")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(run(&args, &bin))?;
    let after = measure_limits(&args, "after")?;
    // After the DRAM cases and their limits, on a pool of its own.
    let nvme = if args.no_nvme_case {
        None
    } else {
        Some(runtime.block_on(run_nvme_case(&args, &bin))?)
    };
    drop(runtime);
    let report = Report {
        machine: limits::machine(),
        before,
        after,
        rows: &outcome.rows,
        notes: &outcome.notes,
    };
    print!("{}", report.render());
    if let Some(n) = &nvme {
        print!("\n{}", nvme_case::render(n));
    }
    Ok(())
}

async fn run_nvme_case(args: &Args, bin: &Path) -> Result<nvme_case::Outcome> {
    let plan = args.nvme_plan(bin)?;
    if plan.fio.is_none() {
        eprintln!(
            "`{}` not found: the NVMe case has no fio column (apt-get install -y fio)",
            args.fio
        );
    }
    nvme_case::run(&plan).await.context("the NVMe case")
}

fn measure_limits(args: &Args, when: &str) -> Result<Limits> {
    eprintln!("measuring memcpy, loopback TCP and crc32c ({when} the cases) ...");
    let l = limits::measure(&args.limit_plan()).context("measuring the machine's limits")?;
    eprintln!(
        "memcpy {:.2} GB/s, TCP 1 stream {:.2} GB/s, 4 streams {:.2} GB/s, 1 stream cache-hot {:.2} GB/s, \
         crc32c {:.2} GB/s",
        l.memcpy, l.tcp1, l.tcp4, l.tcp1_hot, l.crc32c
    );
    Ok(l)
}

/// The table rows and the notes that qualify them.
struct Outcome {
    rows: Vec<Row>,
    notes: Vec<String>,
}

/// Starts the servers, runs every case on each system in turn, and returns the rows. The
/// servers are killed when their guards drop at the end, on success or error.
async fn run(args: &Args, bin: &Path) -> Result<Outcome> {
    let budget = args.budget();
    let mut notes = vec![format!(
        "Each phase (a case's puts, then its gets) stops after {} of values or {:.1} s, whichever \
         comes first. Latency is per request (one request = one batch). GB/s = 10^9 bytes/s. \
         kvpool: default client settings (crc32c of every value checked on get), gets into \
         caller buffers (`get_batch_into_parts`); Redis: pipelined SET/GET, one connection per client.",
        ByteSize(budget.bytes),
        budget.time.as_secs_f64()
    )];
    let kvpool = procs::start_kvpool(bin, &args.dram.to_string())?;
    let redis = if args.no_redis {
        None
    } else {
        procs::start_redis(&args.redis_server).await?
    };
    notes.push(match (&redis, args.no_redis) {
        (Some(_), _) => procs::redis_version(&args.redis_server),
        (None, true) => "Redis skipped (--no-redis).".to_string(),
        (None, false) => format!(
            "`{}` not found, Redis columns skipped (install: `apt-get install -y redis-server`).",
            args.redis_server
        ),
    });
    eprintln!("{}", notes[notes.len() - 1]);
    if args.no_checksum_verify {
        notes.push(
            "Diagnostic run: kvpool gets do NOT verify crc32c (--no-checksum-verify).".into(),
        );
    }

    let most = args.clients.iter().copied().max().unwrap_or(1).max(1);
    if args.no_location_cache {
        notes.push(
            "Diagnostic run: kvpool clients keep no location cache (--no-location-cache).".into(),
        );
    }
    if args.no_master_index {
        notes.push(
            "Diagnostic run: kvpool clients do not read the master's location index (--no-master-index).".into(),
        );
    }
    if let Some(n) = args.hot_keys {
        notes.push(format!(
            "Hot-set run: gets cycle over the first {n} keys of each case (--hot-keys), both systems."
        ));
    }
    let knobs = Knobs {
        verify: !args.no_checksum_verify,
        location_cache: !args.no_location_cache,
        master_index: !args.no_master_index,
    };
    let mut kv_conns = connect(System::Kvpool, &kvpool.addr, most, knobs).await?;
    let mut redis_conns = match &redis {
        Some(r) => Some(connect(System::Redis, &r.addr, most, knobs).await?),
        None => None,
    };

    let cases = args.cases();
    let mut rows = Vec::new();
    for (id, case) in cases.iter().copied().enumerate() {
        eprint!(
            "[{}/{}] {} ×{} batch {}:",
            id + 1,
            cases.len(),
            ByteSize(case.size as u64),
            case.clients,
            case.batch
        );
        // Both systems run each case back to back, so drift of the shared machine hits
        // both columns of a row alike.
        let kv = run_on(&mut kv_conns, case, budget, id, args.hot_keys)
            .await
            .context("kvpool")?;
        progress("kvpool", &kv);
        let rd = match redis_conns.as_mut() {
            Some(conns) => Some(
                run_on(conns, case, budget, id, args.hot_keys)
                    .await
                    .context("Redis")?,
            ),
            None => None,
        };
        if let Some(r) = &rd {
            progress("redis", r);
        }
        eprintln!();
        let (rd_put, rd_get) = rd.map_or((None, None), |r| (Some(r.put), Some(r.get)));
        rows.push(Row {
            case,
            op: "put",
            kvpool: kv.put,
            redis: rd_put,
        });
        rows.push(Row {
            case,
            op: "get",
            kvpool: kv.get,
            redis: rd_get,
        });
    }
    Ok(Outcome { rows, notes })
}

/// `n` connections to one system, each warmed up.
async fn connect(system: System, addr: &str, n: usize, knobs: Knobs) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = Conn::connect(system, addr, knobs).await?;
        warm_up(&mut c, i)
            .await
            .with_context(|| format!("warming up {system:?} client {i}"))?;
        conns.push(c);
    }
    if let Some(c) = conns.first_mut() {
        c.clear().await?;
    }
    Ok(conns)
}

/// One small and one 16 MiB round trip, so the first case does not pay for connecting (the
/// large one opens every striped data connection of a kvpool client).
async fn warm_up(c: &mut Conn, i: usize) -> Result<()> {
    for size in [4 << 10, 16 << 20] {
        let key = format!("warmup/{i}/{size}").into_bytes();
        let value = vec![0x42u8; size];
        c.put(&[(&key, &value)]).await?;
        c.get(&[&key], &mut [vec![0u8; size]]).await?;
    }
    Ok(())
}

/// Runs one case with the first `case.clients` connections and puts them back.
async fn run_on(
    conns: &mut Vec<Conn>,
    case: Case,
    budget: Budget,
    id: usize,
    hot_keys: Option<u64>,
) -> Result<CaseResult> {
    let used: Vec<Conn> = conns.drain(..case.clients.min(conns.len())).collect();
    let (used, result) = workload::run_case(used, case, budget, id, hot_keys).await?;
    conns.splice(0..0, used);
    Ok(result)
}

fn progress(name: &str, r: &CaseResult) {
    eprint!(
        " {name} put {:.0}/s {:.2} GB/s get {:.0}/s {:.2} GB/s;",
        r.put.objects_per_s(),
        r.put.gbps(),
        r.get.objects_per_s(),
        r.get.gbps()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_per_value_size() {
        assert_eq!(batches(4 << 10), vec![1, 64]);
        assert_eq!(batches(64 << 10), vec![1, 16]);
        assert_eq!(batches(1 << 20), vec![1, 4]);
        assert_eq!(batches(16 << 20), vec![1]);
    }
}
