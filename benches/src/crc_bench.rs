//! `kvpool-crc-bench`: what a checksummed copy costs against a plain memcpy, with kvpool's
//! CRC-32C (`kvpool_proto::crc32c`, over `crc-fast`) and the `crc32c` crate it replaced.
//!
//! ```text
//! kvpool-crc-bench [--sizes 1MiB,16MiB] [--pool 256MiB] [--rounds 3]
//! ```
//!
//! A shared-memory put copies the caller's value into a segment and checksums each piece of
//! the source right after copying it, while it is still in cache; a get copies from the
//! segment and checksums the destination piece. Each figure copies values of `size` between
//! rotating buffers of a `pool`-byte set (so neither side stays in cache between values, as a
//! segment does not), one core, and reports GB/s of value bytes: memcpy alone, each checksum
//! alone, a copy followed by a checksum of the whole value (two passes), and the copy fused
//! with the checksum piece by piece (16, 64 and 256 KiB pieces); then the cost of combining two
//! checksums (one per stretch of a value copied in parts). Markdown on standard output.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Parser;
use kvpool_proto::ByteSize;

#[derive(Debug, Parser)]
#[command(
    name = "kvpool-crc-bench",
    about = "memcpy against copies checksummed with CRC-32C, one table"
)]
struct Args {
    /// Value sizes.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,16MiB")]
    sizes: Vec<ByteSize>,
    /// Bytes of source buffers and as many of destination buffers the values rotate over.
    #[arg(long, default_value = "256MiB")]
    pool: ByteSize,
    /// Passes over the pool per figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

type Crc = fn(u32, &[u8]) -> u32;

const KVPOOL: Crc = kvpool_proto::crc32c::crc32c_append;
const CRATE: Crc = crc32c::crc32c_append;

fn main() -> Result<()> {
    let args = Args::parse();
    println!("| value | figure | GB/s | / memcpy |");
    println!("|---|---|---:|---:|");
    for size in &args.sizes {
        let len = size.0 as usize;
        ensure!(len > 0, "--sizes: a value of 0 bytes");
        let count = (args.pool.0 as usize / len).max(2);
        let srcs: Vec<Vec<u8>> = (0..count)
            .map(|i| kvpool_testkit::value(i as u64, len))
            .collect();
        let mut dsts: Vec<Vec<u8>> = (0..count).map(|_| vec![1u8; len]).collect();
        for s in &srcs {
            ensure!(
                KVPOOL(0, s) == CRATE(0, s),
                "kvpool's CRC-32C disagrees with the crc32c crate"
            );
        }
        let mut run = |f: &dyn Fn(&[u8], &mut [u8]) -> u32| -> f64 {
            let n = count * args.rounds.max(1);
            let start = Instant::now();
            for i in 0..n {
                // Sources and destinations rotate out of step, as values and segments do.
                black_box(f(&srcs[(i * 7) % count], &mut dsts[i % count]));
            }
            (n * len) as f64 / start.elapsed().as_secs_f64() / 1e9
        };
        let memcpy = run(&|s, d| {
            d.copy_from_slice(s);
            0
        });
        let mut rows = vec![("memcpy".to_string(), memcpy)];
        for (name, crc) in [("kvpool (crc-fast)", KVPOOL), ("crc32c crate", CRATE)] {
            rows.push((format!("{name}: checksum alone"), run(&|s, _| crc(0, s))));
            rows.push((
                format!("{name}: copy, then checksum"),
                run(&|s, d| {
                    d.copy_from_slice(s);
                    crc(0, d)
                }),
            ));
            for piece in [16usize << 10, 64 << 10, 256 << 10] {
                rows.push((
                    format!("{name}: fused, {} KiB pieces", piece >> 10),
                    run(&|s, d| fused(s, d, piece, crc)),
                ));
            }
        }
        for (name, gbps) in rows {
            println!(
                "| {size} | {name} | {gbps:.2} | {:.0} % |",
                100.0 * gbps / memcpy
            );
        }
    }
    // Folding the checksums of a value's stretches (copies on several threads, TCP chunks,
    // NVMe chunks) costs one combine per stretch.
    println!();
    println!("| combine of two checksums, second part 256 KiB | ns per combine |");
    println!("|---|---:|");
    type Combine = fn(u32, u32, usize) -> u32;
    let combines: [(&str, Combine); 2] = [
        (
            "kvpool (GF(2) powers table)",
            kvpool_proto::crc32c::crc32c_combine,
        ),
        ("crc32c crate", crc32c::crc32c_combine),
    ];
    for (name, f) in combines {
        let n = 20_000u32;
        let start = Instant::now();
        let mut acc = 0u32;
        for i in 0..n {
            acc = f(black_box(acc ^ i), black_box(i), black_box(256 << 10));
        }
        black_box(acc);
        let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
        println!("| {name} | {ns:.0} |");
    }
    Ok(())
}

/// A put's copy: each piece copied, then the source piece (in cache) checksummed.
fn fused(src: &[u8], dst: &mut [u8], piece: usize, crc: Crc) -> u32 {
    src.chunks(piece)
        .zip(dst.chunks_mut(piece))
        .fold(0, |c, (s, d)| {
            d.copy_from_slice(s);
            crc(c, s)
        })
}
