//! Prefix save and load bandwidth between a Llama-3-8B-shaped KV cache in GPU memory and a
//! running pool, against the pinned host<->device copy limit measured in the same run.
//!
//! ```text
//! kvpool up --dram 8GiB &            # prints the master address
//! cargo run --release -p kvpool-connector --features cuda --example gpu_bench -- \
//!     --master 127.0.0.1:50051 [--blocks 256] [--trials 3] [--layout paged|block-first|layer-first]
//!     [--layers-per-object 0] [--staging-mib 256] [--copy auto|batched|per-segment]
//! ```
//!
//! Shape: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks: 32 KiB per K (or V) per
//! layer per block, 2 MiB per block (vLLM's paged layout: 64 copies of 32 KiB per block).
//! Every trial uses fresh keys (a new namespace), so saves really write; the load reads back
//! what that trial saved and one block is checked byte for byte.

use std::sync::Arc;
use std::time::Instant;

use kvpool_client::{Client, ClientConfig};
use kvpool_connector::cuda::{
    open_device, CopyMode, CudaContext, GpuAlloc, GpuKvCache, GpuOptions,
};
use kvpool_connector::{BlockHasher, BlockKey, LayerGroups, Namespace, PoolConnector};

const LAYERS: usize = 32;
const BLOCK_TOKENS: usize = 16;
/// 16 tokens x 8 KV heads x 128 x bf16.
const REGION_BLOCK: usize = BLOCK_TOKENS * 8 * 128 * 2;

struct Args {
    master: String,
    blocks: usize,
    trials: usize,
    layout: GpuAlloc,
    layers_per_object: usize,
    staging_mib: usize,
    copy: CopyMode,
}

fn usage(msg: &str) -> ! {
    eprintln!("gpu_bench: {msg}");
    eprintln!(
        "usage: gpu_bench --master ADDR [--blocks N] [--trials N] \
         [--layout paged|block-first|layer-first] [--layers-per-object N (0 = all)] \
         [--staging-mib N] [--copy auto|batched|per-segment]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        master: String::new(),
        blocks: 256,
        trials: 3,
        layout: GpuAlloc::Paged,
        layers_per_object: 0,
        staging_mib: 256,
        copy: CopyMode::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| -> usize {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{v:?} is not a number")))
        };
        match flag.as_str() {
            "--master" => a.master = val(),
            "--blocks" => a.blocks = num(val()),
            "--trials" => a.trials = num(val()),
            "--layers-per-object" => a.layers_per_object = num(val()),
            "--staging-mib" => a.staging_mib = num(val()),
            "--layout" => {
                a.layout = match val().as_str() {
                    "paged" => GpuAlloc::Paged,
                    "block-first" => GpuAlloc::BlockFirst,
                    "layer-first" => GpuAlloc::LayerFirst,
                    v => usage(&format!("unknown layout {v:?}")),
                }
            }
            "--copy" => {
                a.copy = match val().as_str() {
                    "auto" => CopyMode::Auto,
                    "batched" => CopyMode::Batched,
                    "per-segment" => CopyMode::PerSegment,
                    v => usage(&format!("unknown copy mode {v:?}")),
                }
            }
            "-h" | "--help" => usage("help"),
            f => usage(&format!("unknown flag {f}")),
        }
    }
    if a.master.is_empty() {
        usage("--master is required (the address `kvpool up` prints)");
    }
    if a.blocks == 0 || a.trials == 0 {
        usage("--blocks and --trials must be at least 1");
    }
    a
}

/// Best and mean GB/s of pinned host<->device copies of `bytes` (one large copy each way).
fn pinned_limit(ctx: &Arc<CudaContext>, bytes: usize, iters: usize) -> ((f64, f64), (f64, f64)) {
    let stream = ctx.new_stream().expect("stream");
    // SAFETY: flags 0 = plain pinned memory; it is written by the first copy before any read
    // of it matters (the figures only time copies).
    let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.expect("pinned alloc");
    let mut dev = stream.alloc_zeros::<u8>(bytes).expect("device alloc");
    let mut h2d = Vec::new();
    let mut d2h = Vec::new();
    for i in 0..=iters {
        let t = Instant::now();
        stream.memcpy_htod(&host, &mut dev).expect("H2D");
        stream.synchronize().expect("sync");
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        stream.memcpy_dtoh(&dev, &mut host).expect("D2H");
        stream.synchronize().expect("sync");
        let b = t.elapsed().as_secs_f64();
        if i > 0 {
            // The first round is a warm-up.
            h2d.push(bytes as f64 / a / 1e9);
            d2h.push(bytes as f64 / b / 1e9);
        }
    }
    (best_mean(&h2d), best_mean(&d2h))
}

fn best_mean(v: &[f64]) -> (f64, f64) {
    let best = v.iter().cloned().fold(0.0, f64::max);
    (best, v.iter().sum::<f64>() / v.len().max(1) as f64)
}

fn region_bytes(block: usize, layer: usize, kv: usize) -> Vec<u8> {
    let mut x = (block as u64) << 40 ^ (layer as u64) << 8 ^ kv as u64 | 1;
    (0..REGION_BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() {
    let args = parse_args();
    let ctx = match open_device(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            std::process::exit(1);
        }
    };
    let groups = match args.layers_per_object {
        0 => LayerGroups::All,
        n => LayerGroups::PerObject(n),
    };
    let cache = GpuKvCache::alloc(
        &ctx,
        args.layout,
        LAYERS,
        true,
        args.blocks,
        REGION_BLOCK,
        groups,
        GpuOptions {
            staging_bytes: args.staging_mib << 20,
            copy_mode: args.copy,
        },
    )
    .expect("GPU cache");
    let block_bytes = LAYERS * 2 * REGION_BLOCK;
    let prefix = args.blocks * block_bytes;
    println!(
        "device: {} | prefix: {} blocks x {} KiB = {} MiB | layout {:?}, {} | copies per block object: {} | batched copies: {} | staging 2 x {} MiB",
        ctx.name().unwrap_or_default(),
        args.blocks,
        block_bytes >> 10,
        prefix >> 20,
        args.layout,
        cache.layout().grouping_tag(),
        (0..cache.layout().num_groups())
            .map(|g| cache.layout().segments(0, g).len())
            .sum::<usize>(),
        cache.batched(),
        cache.staging_bytes() >> 20,
    );
    for b in 0..args.blocks {
        for layer in 0..LAYERS {
            for kv in 0..2 {
                cache
                    .write_region_block(layer, kv, b, &region_bytes(b, layer, kv))
                    .expect("fill");
            }
        }
    }
    let limit_bytes = prefix.min(1 << 30);
    let (h2d, d2h) = pinned_limit(&ctx, limit_bytes, args.trials.max(3));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = Arc::new(cache);
    let (save, load) = runtime.block_on(async {
        let mut cfg = ClientConfig::with_master(args.master.clone());
        cfg.deadline = std::time::Duration::from_secs(60);
        let client = Arc::new(Client::new(cfg));
        let conn = PoolConnector::new(client.clone(), cache.layout());
        let slots: Vec<usize> = (0..args.blocks).collect();
        let mut save = Vec::new();
        let mut load = Vec::new();
        for trial in 0..args.trials {
            let hasher = BlockHasher::new(Namespace {
                model: format!("bench/llama3-8b#{}-{trial}", std::process::id()),
                kv_dtype: "bf16".into(),
                layout: format!("vllm-nhd/{}", cache.layout().grouping_tag()),
                block_size: BLOCK_TOKENS as u32,
                tp_rank: 0,
                tp_size: 1,
                pp_rank: 0,
                pp_size: 1,
            });
            let tokens: Vec<u32> = (0..(args.blocks * BLOCK_TOKENS) as u32).collect();
            let keys: Vec<BlockKey> = hasher.keys(&tokens);
            let pairs: Vec<(BlockKey, usize)> = keys.iter().cloned().zip(slots.clone()).collect();

            let t = Instant::now();
            for r in cache.save(&conn, &pairs).await {
                r.expect("save");
            }
            save.push(prefix as f64 / t.elapsed().as_secs_f64() / 1e9);

            // Scribble over one block so the check below sees the load's bytes, not the
            // ones that were already there.
            let mid = args.blocks / 2;
            let want = cache.read_object(mid, 0).expect("read");
            for layer in 0..LAYERS {
                for kv in 0..2 {
                    cache
                        .write_region_block(layer, kv, mid, &region_bytes(mid + 1, layer, kv))
                        .expect("scribble");
                }
            }
            let t = Instant::now();
            let res = cache.load(&conn, &pairs).await.wait_all();
            load.push(prefix as f64 / t.elapsed().as_secs_f64() / 1e9);
            assert!(res.iter().all(|r| matches!(r, Ok(true))), "load: {res:?}");
            assert_eq!(cache.read_object(mid, 0).expect("read"), want);

            let wire: Vec<String> = keys
                .iter()
                .flat_map(|k| {
                    (0..cache.layout().num_groups()).map(|g| k.wire(cache.layout().key_group(g)))
                })
                .collect();
            let refs: Vec<&[u8]> = wire.iter().map(|k| k.as_bytes()).collect();
            for r in client.remove(&refs, true).await {
                r.expect("cleanup");
            }
        }
        (best_mean(&save), best_mean(&load))
    });

    println!();
    println!("| op | best GB/s | mean GB/s | of the pinned limit (best) |");
    println!("|---|---|---|---|");
    println!(
        "| pinned H2D, one {} MiB copy | {:.2} | {:.2} | limit |",
        limit_bytes >> 20,
        h2d.0,
        h2d.1
    );
    println!(
        "| pinned D2H, one {} MiB copy | {:.2} | {:.2} | limit |",
        limit_bytes >> 20,
        d2h.0,
        d2h.1
    );
    println!(
        "| save {} MiB prefix (D2H + put) | {:.2} | {:.2} | {:.0}% of D2H |",
        prefix >> 20,
        save.0,
        save.1,
        100.0 * save.0 / d2h.0
    );
    println!(
        "| load {} MiB prefix (get + H2D) | {:.2} | {:.2} | {:.0}% of H2D |",
        prefix >> 20,
        load.0,
        load.1,
        100.0 * load.0 / h2d.0
    );
}
