//! One benchmark client of either system, behind the three calls the workload needs.

use anyhow::{bail, ensure, Context, Result};
use kvpool_client::{Client, ClientConfig};
use kvpool_proto::PutOptions;

use crate::resp::RespConn;

/// Which system a row's figures belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Kvpool,
    Redis,
}

/// Client defaults a diagnostic run turns off.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    /// Gets check the crc32c (off: `--no-checksum-verify`, to show what the check costs).
    pub verify: bool,
    /// Repeated gets skip the master (off: `--no-location-cache`, every get asks it).
    pub location_cache: bool,
    /// Cold same-host gets find keys in the master's index (off: `--no-master-index`, every
    /// cold get asks the master).
    pub master_index: bool,
}

/// One client connection. Each concurrent benchmark task owns one, so kvpool clients share
/// no connection pool and Redis clients share no socket.
pub enum Conn {
    // Boxed: a client is several times the size of a Redis connection.
    Kvpool(Box<Client>),
    Redis(RespConn),
}

impl Conn {
    /// A client of `system` at `addr`. kvpool clients use the default settings (what a user
    /// gets), except where `knobs` turns a default off to show what it is worth.
    pub async fn connect(system: System, addr: &str, knobs: Knobs) -> Result<Self> {
        Ok(match system {
            System::Kvpool => {
                let mut cfg = ClientConfig {
                    verify_checksum: knobs.verify,
                    ..ClientConfig::with_master(addr)
                };
                cfg.location_cache.enabled = knobs.location_cache;
                cfg.master_index = knobs.master_index;
                Conn::Kvpool(Box::new(Client::new(cfg)))
            }
            System::Redis => Conn::Redis(RespConn::connect(addr).await?),
        })
    }

    /// Stores every item in one request (kvpool batch, Redis pipeline).
    pub async fn put(&mut self, items: &[(&[u8], &[u8])]) -> Result<()> {
        match self {
            Conn::Kvpool(c) => {
                for (r, (key, _)) in c
                    .put_batch(items, &PutOptions::default())
                    .await
                    .into_iter()
                    .zip(items)
                {
                    r.with_context(|| format!("kvpool put {}", String::from_utf8_lossy(key)))?;
                }
                Ok(())
            }
            Conn::Redis(c) => c.set_many(items).await,
        }
    }

    /// Reads every key into its buffer, which is exactly as long as the value was.
    pub async fn get(&mut self, keys: &[&[u8]], dsts: &mut [Vec<u8>]) -> Result<()> {
        match self {
            Conn::Kvpool(c) => kvpool_get(c, keys, dsts).await,
            Conn::Redis(c) => c.get_many(keys, dsts).await,
        }
    }

    /// Empties the store between cases so it never fills up or evicts.
    pub async fn clear(&mut self) -> Result<()> {
        match self {
            Conn::Kvpool(c) => {
                c.remove_all(true).await.context("kvpool remove_all")?;
            }
            Conn::Redis(c) => {
                let reply = c.command(&[b"FLUSHALL"]).await?;
                ensure!(reply == "OK", "FLUSHALL answered {reply:?}");
            }
        }
        Ok(())
    }
}

/// The zero-copy get: the engine reads each value straight into the caller's buffer (what a
/// KV-cache connector does with its layer buffers), so no per-get allocation is measured.
async fn kvpool_get(c: &Client, keys: &[&[u8]], dsts: &mut [Vec<u8>]) -> Result<()> {
    let want: Vec<usize> = dsts.iter().map(Vec::len).collect();
    let mut single: Vec<[&mut [u8]; 1]> = dsts.iter_mut().map(|d| [d.as_mut_slice()]).collect();
    let mut parts: Vec<&mut [&mut [u8]]> = single.iter_mut().map(|p| &mut p[..]).collect();
    let results = c.get_batch_into_parts(keys, &mut parts).await;
    for ((r, key), want) in results.into_iter().zip(keys).zip(want) {
        let name = || String::from_utf8_lossy(key).into_owned();
        match r.with_context(|| format!("kvpool get {}", name()))? {
            Some(len) if len == want as u64 => {}
            Some(len) => bail!("kvpool get {}: {len} bytes, expected {want}", name()),
            None => bail!("kvpool get {}: not found", name()),
        }
    }
    Ok(())
}
