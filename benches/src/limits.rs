//! This machine's own ceilings, measured in the same run as the benchmark so the kvpool
//! figures can be read against them: memory copy bandwidth, loopback TCP bandwidth, and the
//! speed of crc32c, which the kvpool client computes over every byte it puts or gets.

use std::{
    hint::black_box,
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// Bytes per buffer in the memcpy, crc32c and DRAM-backed TCP tests: far larger than any
/// cache, so they measure memory, where a pool's values live.
const BIG_BUF: usize = 64 << 20;
/// Bytes per `write`/`read` call in the TCP tests, like a large value's stripe.
const TCP_CHUNK: usize = 1 << 20;

/// Measured ceilings, in GB/s (10^9 bytes per second).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memcpy: f64,
    /// One TCP stream whose writer and reader walk 64 MiB buffers (the data is in DRAM, as
    /// a pool's is).
    pub tcp1: f64,
    /// Four such streams at once.
    pub tcp4: f64,
    /// One stream writing and reading the same 1 MiB buffer over and over (cache-hot: an
    /// upper bound no store of DRAM-resident data reaches).
    pub tcp1_hot: f64,
    pub crc32c: f64,
}

/// How long and how much each limit test runs.
pub struct LimitPlan {
    /// How long the memcpy and the crc32c tests each run.
    pub compute_time: Duration,
    /// Bytes each TCP test moves, over all its streams and trials.
    pub tcp_bytes: u64,
}

pub fn measure(plan: &LimitPlan) -> io::Result<Limits> {
    Ok(Limits {
        memcpy: memcpy_gbps(plan.compute_time),
        tcp1: best_tcp_gbps(1, BIG_BUF, plan.tcp_bytes)?,
        tcp4: best_tcp_gbps(4, BIG_BUF, plan.tcp_bytes)?,
        tcp1_hot: best_tcp_gbps(1, TCP_CHUNK, plan.tcp_bytes)?,
        crc32c: crc32c_gbps(plan.compute_time),
    })
}

/// Copies a 64 MiB buffer into another until `time` has passed (at least 4 times).
fn memcpy_gbps(time: Duration) -> f64 {
    // Both buffers are written first so page faults are not part of the measurement.
    let src = vec![0xA5u8; BIG_BUF];
    let mut dst = vec![1u8; BIG_BUF];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    let mut copies = 0u64;
    while copies < 4 || start.elapsed() < time {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        copies += 1;
    }
    gbps(copies * BIG_BUF as u64, start.elapsed())
}

/// Checksums a 64 MiB buffer (one core) until `time` has passed (at least 4 times).
fn crc32c_gbps(time: Duration) -> f64 {
    let buf = vec![0xA5u8; BIG_BUF];
    let start = Instant::now();
    let mut passes = 0u64;
    while passes < 4 || start.elapsed() < time {
        black_box(kvpool_proto::crc32c::crc32c(black_box(&buf)));
        passes += 1;
    }
    gbps(passes * BIG_BUF as u64, start.elapsed())
}

/// Trials per TCP figure. On a shared 2-vCPU VM one trial varies by up to 2x with where the
/// scheduler puts the writer and reader threads; the best trial is the machine's ceiling.
const TCP_TRIALS: u64 = 3;

/// The best of [`TCP_TRIALS`] trials that together move `total` bytes.
fn best_tcp_gbps(streams: usize, buf: usize, total: u64) -> io::Result<f64> {
    let mut best = 0f64;
    for _ in 0..TCP_TRIALS {
        best = best.max(tcp_gbps(streams, buf, total / TCP_TRIALS)?);
    }
    Ok(best)
}

/// Moves `total` bytes over `streams` loopback TCP connections at once, each with a blocking
/// writer thread and a blocking reader thread that walk buffers of `buf` bytes in 1 MiB
/// calls; the rate is what all readers received.
fn tcp_gbps(streams: usize, buf: usize, total: u64) -> io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let per_stream = total / streams as u64;
    let mut ends = Vec::with_capacity(streams);
    for _ in 0..streams {
        let tx = TcpStream::connect(addr)?;
        let (rx, _) = listener.accept()?;
        // Allocated and written before the clock starts: page faults are not TCP.
        ends.push(((tx, vec![0x5Au8; buf]), (rx, vec![1u8; buf])));
    }
    let start = Instant::now();
    thread::scope(|s| {
        let handles: Vec<_> = ends
            .into_iter()
            .flat_map(|((tx, src), (rx, dst))| {
                [
                    s.spawn(move || send(tx, &src, per_stream)),
                    s.spawn(move || receive(rx, dst, per_stream)),
                ]
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("TCP test thread panicked")))
        })
    })?;
    Ok(gbps(per_stream * streams as u64, start.elapsed()))
}

/// Writes `bytes` bytes from `src`, 1 MiB per call, wrapping around at its end.
fn send(mut tx: TcpStream, src: &[u8], bytes: u64) -> io::Result<()> {
    let (mut left, mut at) = (bytes, 0usize);
    while left > 0 {
        let n = (left.min(TCP_CHUNK as u64) as usize).min(src.len() - at);
        tx.write_all(&src[at..at + n])?;
        left -= n as u64;
        at = (at + n) % src.len();
    }
    Ok(())
}

/// Reads `bytes` bytes into `dst`, up to 1 MiB per call, wrapping around at its end.
fn receive(mut rx: TcpStream, mut dst: Vec<u8>, bytes: u64) -> io::Result<()> {
    let (mut left, mut at) = (bytes, 0usize);
    while left > 0 {
        let want = (left.min(TCP_CHUNK as u64) as usize).min(dst.len() - at);
        match rx.read(&mut dst[at..at + want])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                left -= n as u64;
                at = (at + n) % dst.len();
            }
        }
    }
    black_box(&dst);
    Ok(())
}

pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e9
}

/// The limits measured before and after a run, as a markdown table (TCP figures are the best
/// of 3 trials, the rest one measurement).
pub fn table(b: &Limits, a: &Limits) -> String {
    let mut out =
        String::from("| limit, GB/s (TCP: best of 3 trials) | before | after |\n|---|---:|---:|\n");
    for (name, x, y) in [
        ("memcpy, 64 MiB buffers", b.memcpy, a.memcpy),
        ("loopback TCP, 1 stream, 64 MiB buffers", b.tcp1, a.tcp1),
        ("loopback TCP, 4 streams, 64 MiB buffers", b.tcp4, a.tcp4),
        (
            "loopback TCP, 1 stream, one 1 MiB buffer (cache-hot)",
            b.tcp1_hot,
            a.tcp1_hot,
        ),
        (
            "crc32c, one core (kvpool checks every byte)",
            b.crc32c,
            a.crc32c,
        ),
    ] {
        out.push_str(&format!("| {name} | {x:.2} | {y:.2} |\n"));
    }
    out.push('\n');
    out
}

/// "2 CPUs, AMD EPYC ..." from the OS, so a saved report says where it ran.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}
