//! Where a single same-host get's time goes: the master lookup (`locate`), the whole get, a
//! hot get (a client with the location cache, whose gets are checked on the node's replica
//! board: no round trip), and a memcpy and crc32c of the same bytes, each timed alone over
//! the same keys.
//! `cargo run --release -p kvpool-benches --example get_breakdown -- SIZE COUNT`

use std::{process::Command, time::Instant};

use kvpool_client::{Client, ClientConfig, TransportMode};
use kvpool_proto::PutOptions;
use kvpool_testkit::{up_args, Proc, READY_WITHIN};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let size: usize = a.get(1).map_or(Ok(1 << 20), |s| s.parse())?;
    let count: usize = a.get(2).map_or(Ok(64), |s| s.parse())?;
    let mut cmd = Command::new(kvpool_testkit::kvpool_bin()?);
    cmd.args(up_args("1GiB")).env("KVPOOL_LOG", "warn");
    let pool = Proc::spawn(cmd, READY_WITHIN)?;
    let mut cfg = ClientConfig::with_master(pool.field("master")?);
    cfg.transport = TransportMode::Shm;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let c = Client::new(cfg.clone());
    cfg.location_cache.enabled = true;
    let hot = Client::new(cfg);
    let src = vec![7u8; size * count];
    let mut dst = vec![1u8; size * count];
    let keys: Vec<Vec<u8>> = (0..count).map(|i| format!("gb/{i}").into_bytes()).collect();
    rt.block_on(async {
        let t = Instant::now();
        for (k, v) in keys.iter().zip(src.chunks(size)) {
            c.put(k, v, &PutOptions::default()).await?;
        }
        let put = t.elapsed() / count as u32;
        // A key is cached from its second lookup on.
        for _ in 0..2 {
            for (k, d) in keys.iter().zip(dst.chunks_mut(size)) {
                hot.get_into(k, d).await?;
            }
        }
        for round in 0..3 {
            let t = Instant::now();
            for k in &keys {
                c.locate(&[k]).await.pop().unwrap()?;
            }
            let locate = t.elapsed() / count as u32;
            let t = Instant::now();
            for (k, d) in keys.iter().zip(dst.chunks_mut(size)) {
                c.get_into(k, d).await?;
            }
            let get = t.elapsed() / count as u32;
            let t = Instant::now();
            for (k, d) in keys.iter().zip(dst.chunks_mut(size)) {
                hot.get_into(k, d).await?;
            }
            let hot_get = t.elapsed() / count as u32;
            let t = Instant::now();
            for (d, s) in dst.chunks_mut(size).zip(src.chunks(size)) {
                d.copy_from_slice(std::hint::black_box(s));
            }
            let copy = t.elapsed() / count as u32;
            let t = Instant::now();
            for d in dst.chunks(size) {
                std::hint::black_box(kvpool_proto::crc32c::crc32c(d));
            }
            let crc = t.elapsed() / count as u32;
            println!("round {round}: put {put:?} locate {locate:?} get {get:?} hot get {hot_get:?} memcpy {copy:?} crc {crc:?}");
        }
        anyhow::Ok(())
    })
}
