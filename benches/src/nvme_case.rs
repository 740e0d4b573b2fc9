//! The NVMe case: gets of objects that live only on the NVMe tier, through the whole pool
//! (client, master, node, O_DIRECT read on the node, loopback socket, crc32c on the client),
//! next to fio's random reads of the same block size and depth on the same file system.
//!
//! Per value size, a fresh `kvpool up` with a small DRAM segment and an NVMe segment on the
//! work disk is filled by one writer that waits for demotion to make room before every few
//! puts; only objects whose every replica is on NVMe are then read back. Promotion is off
//! (`promote-after-hits = 0`), so every get in the phase is served by the disk; with it off, a
//! same-host client's location cache keeps NVMe locations, and a repeated get is a read of
//! the node's file without asking the master (docs/semantics.md, "Hot reads").

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use kvpool_client::{Client, ClientConfig};
use kvpool_proto::{ByteSize, PutOptions, Tier};

use crate::{
    backend::{Conn, Knobs, System},
    fio, procs,
    report::{latency, rate},
    workload::{self, Budget, Case, Measured, Values},
};

/// The node's DRAM: small, so that the data set lives on NVMe.
const DRAM: &str = "64MiB";
const NVME_SIZE: &str = "2GiB";
/// Demotion starts at half of DRAM and frees a tenth per pass; heartbeats every 100 ms carry
/// the copy tasks. Promotion is off, so gets stay on NVMe.
const CONFIG: &str = "[master]\nnvme-admission = \"always\"\nhigh-watermark = 0.5\n\
                      eviction-ratio = 0.1\nheartbeat-interval = \"100ms\"\n\
                      promote-after-hits = 0\n";
/// The writer waits until DRAM is at most this full ...
const ROOM: f64 = 0.70;
/// ... before every this many bytes of puts, so a put never finds DRAM full (which would
/// drop instead of demote).
const PACE_BYTES: usize = 4 << 20;
/// Longest the writer waits for demotion to make room.
const ROOM_TIMEOUT: Duration = Duration::from_secs(120);
/// Batches of the get cases: one object, and four per request.
const BATCHES: [usize; 2] = [1, 4];
/// Keys per `locate` call.
const LOCATE_CHUNK: usize = 256;

pub struct Plan<'a> {
    pub bin: &'a Path,
    /// Folder on the work disk for the tier files (removed afterwards).
    pub dir: PathBuf,
    pub sizes: Vec<usize>,
    pub clients: Vec<usize>,
    /// Bytes of values written per size.
    pub bytes: u64,
    /// Per get phase.
    pub budget: Budget,
    pub verify: bool,
    /// Cold gets find NVMe locations in the master's index (the case runs with promotion off).
    pub master_index: bool,
    /// Gets cycle over only the first N objects on NVMe only (`--hot-keys`).
    pub hot_keys: Option<u64>,
    /// The fio binary, if installed.
    pub fio: Option<String>,
}

/// fio's file, in the case's folder. fio lays it out at its first run after a size's fill and
/// it is removed after that size's rows, so it is always written after the tier's records:
/// if this machine's virtual disk reads what was written last faster (the host's cache), that
/// favours fio, never kvpool.
const FIO_FILE: &str = "fio.dat";

pub struct Row {
    pub case: Case,
    pub get: Measured,
    /// fio random reads of `case.size` on a file of the same size in the same folder, bytes/s:
    /// the mean of a run just before the gets and one just after.
    pub fio: Option<Limit>,
}

/// What the disk does for one row, bytes/s.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// `clients × batch` reads always in flight (fio's `iodepth`).
    pub steady: f64,
    /// With batches (batch > 1): `clients` jobs, each submitting `batch` reads together and
    /// waiting for all of them before the next `batch`, as a client's batched get does.
    pub batched: Option<f64>,
}

impl Limit {
    fn mean(a: Limit, b: Limit) -> Limit {
        Limit {
            steady: (a.steady + b.steady) / 2.0,
            batched: a.batched.zip(b.batched).map(|(x, y)| (x + y) / 2.0),
        }
    }
}

pub struct Outcome {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

/// Removes the case's folder (tier file, its index, the config, fio's file) on drop.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(plan: &Plan<'_>) -> Result<Outcome> {
    std::fs::create_dir_all(&plan.dir).with_context(|| format!("creating {:?}", plan.dir))?;
    let _cleanup = DirGuard(plan.dir.clone());
    let mut notes = Vec::new();
    if fio::is_tmpfs(&plan.dir) {
        notes.push(format!(
            "Warning: {} is tmpfs: these figures measure memory, not a disk.",
            plan.dir.display()
        ));
    }
    let mut rows = Vec::new();
    for (n, &size) in plan.sizes.iter().enumerate() {
        let (mut r, note) = one_size(plan, size, n).await?;
        rows.append(&mut r);
        notes.push(note);
    }
    Ok(Outcome { rows, notes })
}

/// One value size on a fresh pool: fill, check placement, get. Returns the rows and a note.
async fn one_size(plan: &Plan<'_>, size: usize, n: usize) -> Result<(Vec<Row>, String)> {
    let dir = plan.dir.join(format!("pool-{n}"));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = DirGuard(dir.clone());
    let cfg = dir.join("kvpool.toml");
    std::fs::write(&cfg, CONFIG)?;
    let nvme = dir.join("nvme.dat");
    let extra: [&OsStr; 4] = [
        "--nvme".as_ref(),
        nvme.as_os_str(),
        "--nvme-size".as_ref(),
        NVME_SIZE.as_ref(),
    ];
    let pool = procs::start_kvpool_with(plan.bin, DRAM, Some(&cfg), &extra)?;
    let client = Client::new(ClientConfig::with_master(&pool.addr));
    let values = Arc::new(Values::new(size));
    let prefix = format!("nvme/{size}");
    let count = (plan.bytes / size as u64).max(1);

    eprintln!(
        "NVMe case {}: putting {count} objects ({}) into {DRAM} DRAM + {NVME_SIZE} NVMe ...",
        ByteSize(size as u64),
        ByteSize(count * size as u64)
    );
    let every = (PACE_BYTES / size).max(1) as u64;
    let start = Instant::now();
    let mut waited = Duration::ZERO;
    for i in 0..count {
        if i % every == 0 {
            let t = Instant::now();
            wait_for_room(&client).await?;
            waited += t.elapsed();
        }
        let key = workload::key(&prefix, i);
        client
            .put(&key, values.get(i), &PutOptions::default())
            .await
            .with_context(|| format!("put {}", String::from_utf8_lossy(&key)))?;
    }
    let fill = start.elapsed();

    let placed = placement(&client, &prefix, count).await?;
    eprintln!(
        "  filled in {:.1} s ({:.0} MB/s, {:.1} s waiting for room): {} on NVMe only, {} with a DRAM replica, {} missing",
        fill.as_secs_f64(),
        (count * size as u64) as f64 / fill.as_secs_f64() / 1e6,
        waited.as_secs_f64(),
        placed.nvme_only.len(),
        placed.with_dram,
        placed.missing
    );
    // Up to the high watermark's worth of the newest objects stays in DRAM by design.
    if (placed.nvme_only.len() as u64) * 4 < count {
        bail!(
            "only {} of {count} objects are on NVMe only: demotion did not keep up",
            placed.nvme_only.len()
        );
    }
    if placed.missing > 0 {
        bail!(
            "{} of {count} objects were lost while filling",
            placed.missing
        );
    }
    let nvme_only = placed.nvme_only.len();
    let mut slots = placed.nvme_only;
    if let Some(n) = plan.hot_keys {
        slots.truncate(usize::try_from(n).unwrap_or(usize::MAX).max(1));
    }
    let slots = Arc::new(slots);

    let most = plan.clients.iter().copied().max().unwrap_or(1).max(1);
    let mut conns = Vec::with_capacity(most);
    for _ in 0..most {
        let mut c = Conn::connect(
            System::Kvpool,
            &pool.addr,
            Knobs {
                verify: plan.verify,
                location_cache: true,
                master_index: plan.master_index,
            },
        )
        .await?;
        // Untimed: opens the client's connections to the master and the node.
        let warm: Vec<Vec<u8>> = slots
            .iter()
            .take(BATCHES[1])
            .map(|&s| workload::key(&prefix, s))
            .collect();
        let refs: Vec<&[u8]> = warm.iter().map(Vec::as_slice).collect();
        let mut bufs = vec![vec![0u8; size]; refs.len()];
        c.get(&refs, &mut bufs).await.context("warm-up get")?;
        conns.push(c);
    }

    let mut rows = Vec::new();
    for &clients in &plan.clients {
        for batch in BATCHES {
            let case = Case {
                size,
                clients: clients.clamp(1, most),
                batch,
            };
            let used: Vec<Conn> = conns.drain(..case.clients).collect();
            // The disk's figure moves between runs (0.8-1.6 GB/s for the same job on this
            // machine): fio runs right before and right after the gets, so the ratio compares
            // the same minutes.
            let before = disk_limit(plan, case)?;
            let (used, get) =
                workload::run_gets(used, case, plan.budget, &prefix, &values, slots.clone())
                    .await
                    .with_context(|| format!("NVMe gets ×{} b{batch}", case.clients))?;
            let after = disk_limit(plan, case)?;
            conns.splice(0..0, used);
            eprintln!(
                "  ×{} b{batch}: {:.0}/s {:.2} GB/s p50 {} p99 {}",
                case.clients,
                get.objects_per_s(),
                get.gbps(),
                latency(get.p50),
                latency(get.p99)
            );
            let fio = before.zip(after).map(|(b, a)| Limit::mean(b, a));
            rows.push(Row { case, get, fio });
        }
    }

    // Every get above must have been served by NVMe: nothing may have moved back to DRAM.
    let after = placement(&client, &prefix, count).await?;
    let stayed = slots
        .iter()
        .filter(|s| after.nvme_only.binary_search(s).is_ok())
        .count();
    if stayed < slots.len() {
        bail!(
            "{} of the {} NVMe-only objects gained a DRAM replica during the gets",
            slots.len() - stayed,
            slots.len()
        );
    }
    let _ = std::fs::remove_file(plan.dir.join(FIO_FILE));
    let note = format!(
        "{}: {count} objects ({}) put by one writer in {:.1} s ({:.0} MB/s including {:.1} s \
         waiting for demotion to make room); {nvme_only} of them on NVMe only, of which {} \
         read below ({}), {} still with a DRAM replica (not read); all {} read still on NVMe \
         only after the gets.",
        ByteSize(size as u64),
        ByteSize(count * size as u64),
        fill.as_secs_f64(),
        (count * size as u64) as f64 / fill.as_secs_f64() / 1e6,
        waited.as_secs_f64(),
        slots.len(),
        ByteSize(slots.len() as u64 * size as u64),
        placed.with_dram,
        stayed
    );
    drop(pool);
    Ok((rows, note))
}

/// fio's random reads of the case's block size on [`FIO_FILE`], if fio is installed: at depth
/// `clients × batch`, and in the gets' own pattern (`clients` jobs, `batch` reads at a time).
fn disk_limit(plan: &Plan<'_>, case: Case) -> Result<Option<Limit>> {
    let Some(bin) = &plan.fio else {
        return Ok(None);
    };
    let size = ByteSize(case.size as u64);
    let run = |jobs: usize, depth: usize, in_batches: bool| {
        fio::Job {
            file: &plan.dir.join(FIO_FILE),
            size: plan.bytes,
            rw: "randread",
            block: case.size,
            iodepth: depth as u32,
            jobs: jobs as u32,
            in_batches,
            runtime: plan.budget.time,
            fdatasync: None,
        }
        .run(bin)
    };
    let steady = run(1, case.clients * case.batch, false)?;
    eprintln!(
        "  fio randread bs {size} iodepth {}: {:.2} GB/s",
        case.clients * case.batch,
        steady / 1e9
    );
    let batched = match case.batch {
        1 => None,
        b => {
            let bw = run(case.clients, b, true)?;
            eprintln!(
                "  fio randread bs {size} {} jobs × batches of {b}: {:.2} GB/s",
                case.clients,
                bw / 1e9
            );
            Some(bw)
        }
    };
    Ok(Some(Limit { steady, batched }))
}

/// Waits until the node's DRAM is at most [`ROOM`] full.
async fn wait_for_room(c: &Client) -> Result<()> {
    let deadline = Instant::now() + ROOM_TIMEOUT;
    loop {
        let s = c.status().await.context("status")?;
        let (cap, used) = s
            .nodes
            .iter()
            .filter(|n| n.alive)
            .flat_map(|n| &n.segments)
            .filter(|seg| seg.tier == Tier::Dram)
            .fold((0u64, 0u64), |(c, u), seg| (c + seg.capacity, u + seg.used));
        if cap > 0 && used as f64 <= cap as f64 * ROOM {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("DRAM still {used} of {cap} bytes full after {ROOM_TIMEOUT:?}: no demotion");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where objects `0..count` live.
struct Placement {
    /// Slots whose every replica is on NVMe, ascending.
    nvme_only: Vec<u64>,
    with_dram: u64,
    missing: u64,
}

async fn placement(c: &Client, prefix: &str, count: u64) -> Result<Placement> {
    let mut p = Placement {
        nvme_only: Vec::new(),
        with_dram: 0,
        missing: 0,
    };
    let slots: Vec<u64> = (0..count).collect();
    for chunk in slots.chunks(LOCATE_CHUNK) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|&s| workload::key(prefix, s)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        for (&slot, r) in chunk.iter().zip(c.locate(&refs).await) {
            match r.context("locate")? {
                Some(info)
                    if !info.replicas.is_empty()
                        && info.replicas.iter().all(|r| r.tier == Tier::Nvme) =>
                {
                    p.nvme_only.push(slot)
                }
                Some(_) => p.with_dram += 1,
                None => p.missing += 1,
            }
        }
    }
    Ok(p)
}

/// The section of the report: one row per (size, clients, batch), with fio's figure beside.
pub fn render(o: &Outcome) -> String {
    let mut out = String::from("### Gets of NVMe-resident objects\n\n");
    out.push_str(&format!(
        "`kvpool up --dram {DRAM} --nvme FILE --nvme-size {NVME_SIZE}` on the work disk, \
         master config: `{}`. Every object read is on NVMe only (checked with `locate` before \
         and after the gets), so every get is an O_DIRECT read of its record: by the client \
         itself off the node's file (the pool is on the client's host), after a lookup at the \
         master or, from a key's second lookup on, from the client's location cache (promotion \
         is off, so the master lets clients keep NVMe locations). fio: `--rw=randread --direct=1 --ioengine=io_uring` on a file of the same \
         size in the same folder (laid out after the fill), block = value size, run just \
         before and just after each row's gets (the mean of the two is shown): \
         \"fio steady\" keeps clients × batch reads in flight (`--iodepth`); \"fio in batches\" \
         (batch > 1) runs one job per client, each submitting a batch's reads together and \
         waiting for all of them before the next (`--numjobs=clients --iodepth=batch \
         --iodepth_batch_submit=batch --iodepth_batch_complete_min=batch`), as a batched get \
         does.\n\n",
        CONFIG.trim().replace('\n', "; ")
    ));
    for note in &o.notes {
        out.push_str(&format!("{note}\n\n"));
    }
    out.push_str(
        "| size | clients | batch | kvpool obj/s | kvpool GB/s | p50 | p99 | fio steady GB/s | kvpool/steady | fio in batches GB/s | kvpool/in batches |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &o.rows {
        let versus = |limit: Option<f64>| match limit {
            Some(f) if f > 0.0 => (
                format!("{:.2}", f / 1e9),
                format!("{:.0} %", r.get.gbps() * 1e9 / f * 100.0),
            ),
            _ => ("–".into(), "–".into()),
        };
        let (steady, steady_share) = versus(r.fio.map(|l| l.steady));
        let (batched, batched_share) = versus(r.fio.and_then(|l| l.batched));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {steady} | {steady_share} | {batched} | {batched_share} |\n",
            ByteSize(r.case.size as u64),
            r.case.clients,
            r.case.batch,
            rate(r.get.objects_per_s()),
            r.get.gbps(),
            latency(r.get.p50),
            latency(r.get.p99),
        ));
    }
    out.push('\n');
    out
}
