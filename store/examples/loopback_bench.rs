//! A quick data-plane throughput check over loopback: one connection, raw frames, compared
//! with a bare TCP copy of the same sizes on the same machine. Not the project benchmark
//! (that lives in `benches/`); a sanity check while working on the server.
//!
//! `cargo run -p kvpool-store --example loopback_bench --release`

use std::time::{Duration, Instant};

use kvpool_proto::{FrameLimits, Read, ReadOp, SegmentId, Write, WriteOp};
use kvpool_store::StoreConfig;
use kvpool_transport::frame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const SEGMENT: u64 = 256 << 20;
const TOTAL: u64 = 2 << 30;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    for value in [1u64 << 20, 4 << 20, 16 << 20] {
        let base = bare_tcp(value).await;
        let (w, r) = store_large(value).await;
        println!(
            "value {:>3} MiB: bare TCP {:.2} GB/s | store write {:.2} GB/s ({:.0}%) read {:.2} GB/s ({:.0}%)",
            value >> 20,
            base,
            w,
            100.0 * w / base,
            r,
            100.0 * r / base
        );
    }
    let (w, r) = store_small(4096, 64).await;
    println!("4 KiB objects, 64 per request: write {w:.0}/s, read {r:.0}/s");
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

async fn bare_tcp(chunk: u64) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // Receive into rotating slots of a segment-sized buffer, as the store does, so both
        // sides pay the same cache misses.
        let mut buf = vec![1u8; SEGMENT as usize];
        let slots = SEGMENT / chunk;
        let mut got = 0;
        let mut i = 0;
        while got < TOTAL {
            let off = ((i % slots) * chunk) as usize;
            s.read_exact(&mut buf[off..off + chunk as usize])
                .await
                .unwrap();
            got += chunk;
            i += 1;
        }
        s.write_all(b"k").await.unwrap();
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let buf = vec![7u8; chunk as usize];
    let t = Instant::now();
    let mut sent = 0;
    while sent < TOTAL {
        s.write_all(&buf).await.unwrap();
        sent += chunk;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
    let d = t.elapsed();
    rx.await.unwrap();
    gbps(TOTAL, d)
}

async fn node() -> (kvpool_store::StoreHandle, SegmentId) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let cfg = StoreConfig {
        dram: kvpool_proto::ByteSize(SEGMENT),
        master: dead,
        ..StoreConfig::default()
    };
    let h = kvpool_store::start(cfg, l).await.unwrap();
    let seg = h.node().segments()[0].id();
    (h, seg)
}

async fn drain_responses(mut r: tokio::net::tcp::OwnedReadHalf, n: u64, mut sink: Vec<u8>) {
    for _ in 0..n {
        let h = frame::read_header(&mut r, &FrameLimits::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h.code, 0);
        frame::read_body(&mut r, h.body_len).await.unwrap();
        let mut left = h.payload_len as usize;
        while left > 0 {
            let k = left.min(sink.len());
            frame::read_payload_into(&mut r, &mut sink[..k])
                .await
                .unwrap();
            left -= k;
        }
    }
}

/// Writes then reads `TOTAL` bytes in `value`-sized objects, pipelined on one connection.
async fn store_large(value: u64) -> (f64, f64) {
    let (h, seg) = node().await;
    let s = TcpStream::connect(h.local_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, mut w) = s.into_split();
    let n = TOTAL / value;
    let slots = SEGMENT / value;
    let data = vec![5u8; value as usize];

    let drain = tokio::spawn(drain_responses(r, n, vec![0u8; 16 << 20]));
    let t = Instant::now();
    for i in 0..n {
        let op = WriteOp {
            segment: seg,
            offset: (i % slots) * value,
            len: value,
        };
        w.write_all(&frame::encode_request(
            i,
            &Write {
                ops: vec![op],
                tags: vec![],
            },
            value,
        ))
        .await
        .unwrap();
        w.write_all(&data).await.unwrap();
    }
    // The drain task owns the read half; wait for it by joining.
    let r = drain.await;
    let write = gbps(TOTAL, t.elapsed());
    r.unwrap();

    let s = TcpStream::connect(h.local_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, mut w) = s.into_split();
    let t = Instant::now();
    let drain = tokio::spawn(drain_responses(r, n, vec![0u8; value as usize]));
    for i in 0..n {
        let op = ReadOp {
            segment: seg,
            offset: (i % slots) * value,
            len: value,
        };
        w.write_all(&frame::encode_request(
            i,
            &Read {
                ops: vec![op],
                expect: vec![],
            },
            0,
        ))
        .await
        .unwrap();
    }
    drain.await.unwrap();
    let read = gbps(TOTAL, t.elapsed());
    h.shutdown().await;
    (write, read)
}

/// Objects per second for small values sent `batch` per request.
async fn store_small(value: u64, batch: u64) -> (f64, f64) {
    let (h, seg) = node().await;
    let requests = 4000u64;
    let slots = SEGMENT / value;
    let s = TcpStream::connect(h.local_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, mut w) = s.into_split();
    let payload = vec![3u8; (value * batch) as usize];
    let drain = tokio::spawn(drain_responses(r, requests, vec![0u8; 1 << 20]));
    let t = Instant::now();
    for i in 0..requests {
        let ops = (0..batch)
            .map(|j| WriteOp {
                segment: seg,
                offset: ((i * batch + j) % slots) * value,
                len: value,
            })
            .collect();
        let mut buf = frame::encode_request(i, &Write { ops, tags: vec![] }, value * batch);
        buf.extend_from_slice(&payload);
        w.write_all(&buf).await.unwrap();
    }
    drain.await.unwrap();
    let write = (requests * batch) as f64 / t.elapsed().as_secs_f64();

    let s = TcpStream::connect(h.local_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, mut w) = s.into_split();
    let drain = tokio::spawn(drain_responses(r, requests, vec![0u8; 1 << 20]));
    let t = Instant::now();
    for i in 0..requests {
        let ops = (0..batch)
            .map(|j| ReadOp {
                segment: seg,
                offset: ((i * batch + j) % slots) * value,
                len: value,
            })
            .collect();
        w.write_all(&frame::encode_request(
            i,
            &Read {
                ops,
                expect: vec![],
            },
            0,
        ))
        .await
        .unwrap();
    }
    drain.await.unwrap();
    let read = (requests * batch) as f64 / t.elapsed().as_secs_f64();
    h.shutdown().await;
    (write, read)
}
