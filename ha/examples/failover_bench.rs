//! Failover benchmark: etcd, 3 masters and 2 storage nodes as processes; puts N objects,
//! SIGKILLs the leader, and measures (1) the time until a standby serves and (2) the time
//! until every one of the N objects is gettable again (byte for byte).
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/failover_bench [--objects N] [--size BYTES] [--trials T] [--kvpool PATH]
//! ```

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kvpool_client::{Client, ClientConfig, ErrorCode};
use kvpool_proto::{PutOptions, Status};
use kvpool_testkit::{free_port, value as val, Guard, Proc, READY_WITHIN};
use kvpool_transport::{
    rpc::{RpcClient, RpcOptions},
    TransportError,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn start_etcd(dir: &std::path::Path) -> Res<(Guard, String)> {
    let (cp, pp) = (free_port()?, free_port()?);
    let client = format!("http://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let child = Command::new(std::env::var("KVPOOL_ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
        .args(["--name", "b", "--data-dir"])
        .arg(dir)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("b={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting etcd (install etcd-server): {e}"))?;
    Ok((Guard::new(child), client))
}

/// Starts `kvpool ARGS` (through the testkit) and returns it with the `ready` line's
/// `what=` value.
fn start(kvpool: &PathBuf, args: &[&str], what: &str) -> Res<(Proc, String)> {
    let mut cmd = Command::new(kvpool);
    cmd.args(args)
        .env("KVPOOL_LOG", "error")
        .stderr(Stdio::null());
    let proc = Proc::spawn(cmd, READY_WITHIN)?;
    let addr = proc.field(what)?;
    Ok((proc, addr))
}

async fn leads(addr: &str) -> bool {
    let p = RpcClient::new(
        addr,
        RpcOptions {
            connect_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_millis(200),
            ..RpcOptions::default()
        },
    );
    match p.call(&Status {}).await {
        Ok(_) => true,
        Err(TransportError::Remote(w)) if w.code == ErrorCode::NotLeader => false,
        Err(_) => false,
    }
}

struct Trial {
    to_leader: Duration,
    to_all: Duration,
    recovered: usize,
}

async fn trial(kvpool: &PathBuf, n: u64, size: usize, t: usize) -> Res<Trial> {
    let dir = std::env::temp_dir().join(format!("kvpool-failover-{}-{t}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_etcd, url) = start_etcd(&dir)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut masters = Vec::new();
    for _ in 0..3 {
        masters.push(start(
            kvpool,
            &["master", "--listen", "127.0.0.1:0", "--etcd", &url],
            "master",
        )?);
    }
    let leader = loop {
        let mut found = None;
        for (i, (_, a)) in masters.iter().enumerate() {
            if leads(a).await {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        if Instant::now() > deadline {
            return Err("no leader elected within 30s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stores = Vec::new();
    for _ in 0..2 {
        stores.push(start(
            kvpool,
            &[
                "store",
                "--listen",
                "127.0.0.1:0",
                "--etcd",
                &url,
                "--dram",
                "1GiB",
            ],
            "store",
        )?);
    }
    let client = Client::new(ClientConfig {
        etcd: vec![url.clone()],
        deadline: Duration::from_secs(30),
        ..ClientConfig::default()
    });
    loop {
        let alive = match client.status().await {
            Ok(s) => s.nodes.iter().filter(|n| n.alive).count(),
            Err(_) => 0,
        };
        if alive == 2 {
            break;
        }
        if Instant::now() > deadline {
            return Err("storage nodes did not register within 30s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..n {
        client
            .put(
                format!("o{i}").as_bytes(),
                &val(i, size),
                &PutOptions::default(),
            )
            .await?;
    }

    drop(masters.remove(leader));
    let killed = Instant::now();
    let standbys: Vec<String> = masters.iter().map(|(_, a)| a.clone()).collect();
    let to_leader = loop {
        let mut any = false;
        for a in &standbys {
            any |= leads(a).await;
        }
        if any {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            return Err("no standby took over within 30s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Every object gettable again: poll the ones still missing until none is.
    let mut missing: Vec<u64> = (0..n).collect();
    while !missing.is_empty() {
        let mut still = Vec::new();
        for &i in &missing {
            match client.get(format!("o{i}").as_bytes()).await {
                Ok(Some(v)) if v == val(i, size) => {}
                Ok(Some(_)) => return Err(format!("o{i}: wrong bytes after failover").into()),
                _ => still.push(i),
            }
        }
        missing = still;
        if killed.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let to_all = killed.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Trial {
        to_leader,
        to_all,
        recovered: (n as usize) - missing.len(),
    })
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut n = 10_000u64;
    let mut size = 16 << 10;
    let mut trials = 3usize;
    let mut kvpool = kvpool_testkit::kvpool_bin()?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--objects" => n = v.parse()?,
            "--size" => size = v.parse()?,
            "--trials" => trials = v.parse()?,
            "--kvpool" => kvpool = PathBuf::from(v),
            _ => return Err(format!("unknown flag {a}").into()),
        }
    }
    println!("objects={n} size={size} trials={trials} (3 masters, 2 stores, TTL 5s)");
    for t in 0..trials {
        let r = trial(&kvpool, n, size, t).await?;
        println!(
            "trial {t}: standby serves after {:.2}s; all objects gettable after {:.2}s; recovered {}/{n}",
            r.to_leader.as_secs_f64(),
            r.to_all.as_secs_f64(),
            r.recovered
        );
    }
    Ok(())
}
