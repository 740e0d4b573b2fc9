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

/// Bytes per buffer in the memcpy test: far larger than any cache, so it measures DRAM.
const MEMCPY_BUF: usize = 64 << 20;
/// Bytes per `write`/`read` call in the TCP test, like a large value's stripe.
const TCP_CHUNK: usize = 1 << 20;

/// Measured ceilings, in GB/s (10^9 bytes per second).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memcpy: f64,
    pub tcp1: f64,
    pub tcp4: f64,
    pub crc32c: f64,
}

/// How long and how much each limit test runs.
pub struct LimitPlan {
    /// How long the memcpy and the crc32c tests each run.
    pub compute_time: Duration,
    /// Bytes the TCP tests move, over all streams.
    pub tcp_bytes: u64,
}

pub fn measure(plan: &LimitPlan) -> io::Result<Limits> {
    Ok(Limits {
        memcpy: memcpy_gbps(plan.compute_time),
        tcp1: tcp_gbps(1, plan.tcp_bytes)?,
        tcp4: tcp_gbps(4, plan.tcp_bytes)?,
        crc32c: crc32c_gbps(plan.compute_time),
    })
}

/// Copies a 64 MiB buffer into another until `time` has passed (at least 4 times).
fn memcpy_gbps(time: Duration) -> f64 {
    // Both buffers are written first so page faults are not part of the measurement.
    let src = vec![0xA5u8; MEMCPY_BUF];
    let mut dst = vec![1u8; MEMCPY_BUF];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    let mut copies = 0u64;
    while copies < 4 || start.elapsed() < time {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        copies += 1;
    }
    gbps(copies * MEMCPY_BUF as u64, start.elapsed())
}

/// Checksums a 64 MiB buffer (one core) until `time` has passed (at least 4 times).
fn crc32c_gbps(time: Duration) -> f64 {
    let buf = vec![0xA5u8; MEMCPY_BUF];
    let start = Instant::now();
    let mut passes = 0u64;
    while passes < 4 || start.elapsed() < time {
        black_box(crc32c::crc32c(black_box(&buf)));
        passes += 1;
    }
    gbps(passes * MEMCPY_BUF as u64, start.elapsed())
}

/// Moves `total` bytes over `streams` loopback TCP connections at once, each with a blocking
/// writer thread and a blocking reader thread; the rate is what all readers received.
fn tcp_gbps(streams: usize, total: u64) -> io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let per_stream = total / streams as u64;
    let mut pairs = Vec::with_capacity(streams);
    for _ in 0..streams {
        let tx = TcpStream::connect(addr)?;
        let (rx, _) = listener.accept()?;
        pairs.push((tx, rx));
    }
    let start = Instant::now();
    thread::scope(|s| {
        let handles: Vec<_> = pairs
            .into_iter()
            .flat_map(|(tx, rx)| {
                [
                    s.spawn(move || send(tx, per_stream)),
                    s.spawn(move || receive(rx, per_stream)),
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

fn send(mut tx: TcpStream, bytes: u64) -> io::Result<()> {
    let buf = vec![0x5Au8; TCP_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(TCP_CHUNK as u64) as usize;
        tx.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn receive(mut rx: TcpStream, bytes: u64) -> io::Result<()> {
    let mut buf = vec![1u8; TCP_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let want = left.min(TCP_CHUNK as u64) as usize;
        match rx.read(&mut buf[..want])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => left -= n as u64,
        }
    }
    Ok(())
}

pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e9
}
