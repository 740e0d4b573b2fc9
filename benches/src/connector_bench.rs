//! `kvpool-connector-bench`: prefix save and load of a Llama-3-8B-shaped host KV cache
//! through `PoolConnector`, read against the plain client moving the same bytes as contiguous
//! 2 MiB objects, loopback TCP and memcpy, all in one run.
//!
//! ```text
//! cargo build --release --bins && target/release/kvpool-connector-bench
//! ```
//!
//! It starts `kvpool up` (found beside this executable, or `--kvpool PATH`) on loopback. Per
//! case (cache layout × layer grouping), each trial: every engine puts its 512 MiB with the
//! plain client, saves its 4096-token prefix (256 blocks of 2 MiB) with the connector, gets
//! the plain objects back, and looks up and loads the prefix into a poisoned cache; then every
//! byte is checked (untimed) and the pool is emptied. The plain client runs in the same trials
//! as the connector, so drift of the shared machine hits both columns of a row alike. The
//! markdown report goes to standard output, progress to standard error.

mod connector_case;
mod limits;
// Shared with kvpool-bench, which uses the Redis half; this binary starts only `kvpool up`.
#[allow(dead_code)]
mod procs;
#[allow(dead_code)]
mod resp;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use kvpool_client::{Client, ClientConfig};
use kvpool_connector::LayerGroups;
use kvpool_proto::ByteSize;

use crate::{
    connector_case::{concurrently, Engine, Variant, BLOCK_BYTES, LAYERS, PREFIX_BYTES},
    limits::{LimitPlan, Limits},
};

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-connector-bench",
    about = "Connector prefix save/load against the plain client, loopback TCP and memcpy"
)]
struct Args {
    /// The kvpool binary [the `kvpool` beside this executable].
    #[arg(long)]
    kvpool: Option<PathBuf>,
    /// DRAM given to the kvpool node; a trial stores 1 GiB per engine (plain and connector).
    #[arg(long, default_value = "4GiB")]
    dram: ByteSize,
    /// Timed trials per case; the median is reported (one more, untimed, warms up each case).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Concurrent engines, each with its own client, caches and task; one case per count.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    engines: Vec<usize>,
    /// Layer groupings: `all` (one 2 MiB object per block) or N (one object per N layers).
    #[arg(long, value_delimiter = ',', default_value = "all,8")]
    groups: Vec<String>,
    /// Cache layouts: `paged` (vLLM's layer-first) and/or `block-first`.
    #[arg(long, value_delimiter = ',', default_value = "paged,block-first")]
    layouts: Vec<String>,
    /// Skip the memcpy / TCP / crc32c measurements (a quick look at the connector alone).
    #[arg(long)]
    no_limits: bool,
}

impl Args {
    fn variants(&self) -> Result<Vec<Variant>> {
        let mut out = Vec::new();
        for layout in &self.layouts {
            let block_first = match layout.as_str() {
                "paged" | "layer-first" => false,
                "block-first" => true,
                other => anyhow::bail!("unknown layout {other:?} (paged, block-first)"),
            };
            for g in &self.groups {
                let groups = match g.as_str() {
                    "all" => LayerGroups::All,
                    n => {
                        let n: usize = n.parse().with_context(|| format!("--groups {n:?}"))?;
                        ensure!((1..=LAYERS).contains(&n), "--groups {n}: 1..={LAYERS}");
                        LayerGroups::PerObject(n)
                    }
                };
                out.push(Variant {
                    block_first,
                    groups,
                });
            }
        }
        Ok(out)
    }
}

/// The medians (and spread) of one case's trials, GB/s over all engines together.
struct Row {
    variant: Variant,
    engines: usize,
    save: Figures,
    load: Figures,
    /// The 1-minute load average when the case started and ended.
    loadavg: (f64, f64),
}

/// Connector and plain-client GB/s of one op, one value per trial.
#[derive(Default)]
struct Figures {
    connector: Vec<f64>,
    plain: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.trials >= 1, "--trials must be at least 1");
    let variants = args.variants()?;
    let bin = procs::kvpool_bin(args.kvpool.as_deref())?;
    let most = args.engines.iter().copied().max().unwrap_or(1).max(1);
    // Plain and connector objects of every engine are in the pool at once until the trial's
    // cleanup; a little slack for allocator rounding.
    let need = most as u64 * 2 * PREFIX_BYTES;
    ensure!(
        args.dram.0 >= need + need / 8,
        "--dram {} is too small for {most} engines: a trial stores {}",
        args.dram,
        ByteSize(need)
    );
    let plan = LimitPlan {
        compute_time: Duration::from_secs(1),
        tcp_bytes: 2_000_000_000,
    };
    let before = (!args.no_limits)
        .then(|| measure_limits(&plan, "before"))
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rows = runtime.block_on(run(&args, &bin, &variants))?;
    drop(runtime);
    let after = (!args.no_limits)
        .then(|| measure_limits(&plan, "after"))
        .transpose()?;
    print!("{}", render(&args, &rows, before, after));
    Ok(())
}

fn measure_limits(plan: &LimitPlan, when: &str) -> Result<Limits> {
    eprintln!("measuring memcpy, loopback TCP and crc32c ({when} the cases) ...");
    let l = limits::measure(plan).context("measuring the machine's limits")?;
    eprintln!(
        "memcpy {:.2} GB/s, TCP 1 stream {:.2} GB/s, 4 streams {:.2} GB/s, crc32c {:.2} GB/s; load {:.2}",
        l.memcpy,
        l.tcp1,
        l.tcp4,
        l.crc32c,
        loadavg()
    );
    Ok(l)
}

async fn run(args: &Args, bin: &std::path::Path, variants: &[Variant]) -> Result<Vec<Row>> {
    let pool = procs::start_kvpool(bin, &args.dram.to_string())?;
    let most = args.engines.iter().copied().max().unwrap_or(1).max(1);
    eprintln!(
        "kvpool up at {}; filling {most} engine(s)' buffers ...",
        pool.addr
    );
    let mut all: Vec<Engine> = (0..most)
        .map(|id| {
            let client = Client::new(ClientConfig::with_master(pool.addr.clone()));
            Engine::new(id, Arc::new(client))
        })
        .collect();
    let mut rows = Vec::new();
    // Distinct for every trial of every case, so no key is ever saved twice.
    let mut run_id = 0u64;
    for &n in &args.engines {
        let n = n.max(1);
        for &v in variants {
            let mut engines: Vec<Engine> = all.drain(..n).collect();
            let load0 = loadavg();
            eprint!(
                "{} × {} object(s)/block × {n} engine(s), load {load0:.2}:",
                v.layout_name(),
                v.objects_per_block()
            );
            for e in engines.iter_mut() {
                e.begin_case(v)?;
            }
            let mut save = Figures::default();
            let mut load = Figures::default();
            // Trial 0 is a warm-up: it opens connections and faults in the pool's memory.
            for trial in 0..=args.trials {
                for e in engines.iter_mut() {
                    e.prepare_trial(run_id)?;
                }
                run_id += 1;
                let bytes = PREFIX_BYTES * n as u64;
                let (es, t_put) = concurrently(engines, Engine::plain_put).await?;
                let (es, t_save) = concurrently(es, Engine::connector_save).await?;
                let (es, t_get) = concurrently(es, Engine::plain_get).await?;
                let (es, t_load) = concurrently(es, Engine::connector_load).await?;
                engines = es;
                for e in &engines {
                    e.verify()?;
                }
                engines[0]
                    .client
                    .remove_all(true)
                    .await
                    .context("emptying the pool")?;
                let g = |t| limits::gbps(bytes, t);
                eprint!(
                    " [{trial}{} save {:.2}/{:.2} load {:.2}/{:.2}]",
                    if trial == 0 { " warm-up" } else { "" },
                    g(t_save),
                    g(t_put),
                    g(t_load),
                    g(t_get)
                );
                if trial > 0 {
                    save.connector.push(g(t_save));
                    save.plain.push(g(t_put));
                    load.connector.push(g(t_load));
                    load.plain.push(g(t_get));
                }
            }
            for e in engines.iter_mut() {
                e.end_case();
            }
            let load1 = loadavg();
            eprintln!(" load {load1:.2}");
            all.splice(0..0, engines);
            rows.push(Row {
                variant: v,
                engines: n,
                save,
                load,
                loadavg: (load0, load1),
            });
        }
    }
    Ok(rows)
}

fn render(args: &Args, rows: &[Row], before: Option<Limits>, after: Option<Limits>) -> String {
    let mut out = String::new();
    out.push_str("## kvpool-connector-bench\n\n");
    out.push_str(&format!(
        "Machine: {}. Pool: `kvpool up --dram {}` on loopback. KV cache: {LAYERS} layers, 8 KV \
         heads, head dim 128, bf16, 16-token blocks ({} per block over all layers), in host \
         memory. One op = one engine's 4096-token prefix (256 blocks, {}); GB/s = 10^9 bytes/s \
         over all engines; median of {} trials (min–max in brackets) after one warm-up trial. \
         Plain client: the same bytes as 256 contiguous {} objects, `put_batch` / \
         `get_batch_into_parts`, in the same trials. Default client settings (crc32c on put and \
         get).\n\n",
        limits::machine(),
        args.dram,
        ByteSize(BLOCK_BYTES as u64),
        ByteSize(PREFIX_BYTES),
        args.trials,
        ByteSize(BLOCK_BYTES as u64),
    ));
    let best = match (before, after) {
        (Some(b), Some(a)) => {
            out.push_str(&limits::table(&b, &a));
            Some((b.tcp1.max(a.tcp1), b.memcpy.max(a.memcpy)))
        }
        _ => None,
    };
    out.push_str(
        "| layout | objects/block | engines | op | connector GB/s | plain client GB/s \
         | connector / plain | connector / TCP 1 stream | load avg |\n\
         |---|---:|---:|---|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        for (op, f) in [("save", &r.save), ("lookup + load", &r.load)] {
            let (c, p) = (median(&f.connector), median(&f.plain));
            let tcp = best.map_or_else(|| "–".into(), |(tcp, _)| pct(c / tcp));
            out.push_str(&format!(
                "| {} | {} | {} | {op} | {} | {} | {} | {tcp} | {:.1}–{:.1} |\n",
                r.variant.layout_name(),
                r.variant.objects_per_block(),
                r.engines,
                spread(&f.connector),
                spread(&f.plain),
                pct(c / p),
                r.loadavg.0,
                r.loadavg.1,
            ));
        }
    }
    out.push('\n');
    out.push_str(
        "Target (issue 5): connector >= 80 % of the transfer path's bandwidth (the plain client \
         moving the same bytes).\n\n",
    );
    for r in rows {
        for (op, f) in [("save", &r.save), ("load", &r.load)] {
            let share = median(&f.connector) / median(&f.plain);
            out.push_str(&format!(
                "- {} × {}/block × {} engine(s), {op}: {} of plain — {}\n",
                r.variant.layout_name(),
                r.variant.objects_per_block(),
                r.engines,
                pct(share),
                if share >= 0.8 { "met" } else { "**missed**" }
            ));
        }
    }
    out
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// "1.23 (1.01–1.40)".
fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2} ({lo:.2}–{hi:.2})", median(v))
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

/// The 1-minute load average: the machine is shared, so every figure comes with it.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn llama_block_is_two_mib() {
        assert_eq!(BLOCK_BYTES, 2 << 20);
        assert_eq!(PREFIX_BYTES, 512 << 20);
    }
}
