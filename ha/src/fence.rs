//! Remove fences in etcd: what a newly elected master needs so that objects removed under an
//! earlier leader do not come back from the nodes' inventories (docs/reliability.md, "Removes
//! are fenced").
//!
//! A fence is `(key, upto)`: every replica of `key` whose id is at most `upto` belongs to a
//! removed object. The leader writes the fences of a remove under
//! `/kvpool/<cluster>/removed/<hex key>` before it acknowledges the remove, in a transaction
//! that succeeds only while its own leader key (the one its term created) still exists, so a
//! deposed leader can never write a fence that the next leader's load missed. The next leader
//! loads them all right after it wins, before it admits any inventory. Each fence lives on an
//! etcd lease of the fence TTL (plus up to one [`LEASE_REUSE`]), so etcd forgets them on its own.
//!
//! The master's request path is synchronous (`RpcService::handle`), so the store runs its
//! etcd client on a thread of its own with its own small runtime, and callers block on the
//! answer with a deadline.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::{connect, leader_key, timed, HaError};

/// One fence: replicas of `key` with ids up to `upto` are of removed objects.
pub type Fence = (Vec<u8>, u64);

/// A lease granted for fences is reused for this long, so a burst of removes costs one grant.
pub const LEASE_REUSE: Duration = Duration::from_secs(60);
/// etcd's default `--max-txn-ops` is 128: one transaction carries at most this many fences.
const PER_TXN: usize = 100;
/// Keys per page when a new leader loads the fences (keeps each answer well under gRPC's
/// message limit with 4 KiB keys).
const PER_PAGE: i64 = 1_000;
/// How long a caller waits for the store's thread: a few etcd round trips, plus
/// [`PER_ROUND_TRIP`] for each transaction or page beyond the first.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// What each further transaction of a large remove may add to its wait.
const PER_ROUND_TRIP: Duration = Duration::from_secs(1);
/// A new leader's load is not bounded by the caller: it waits while pages keep coming, up to
/// this (20 000 fences load in 0.2 s on the 2-core test machine, so a million in about 10 s).
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The etcd key prefix of `cluster`'s fences.
pub fn fence_prefix(cluster: &str) -> String {
    format!("/kvpool/{cluster}/removed/")
}

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

enum Cmd {
    Load {
        reply: mpsc::Sender<Result<Vec<Fence>, HaError>>,
    },
    Record {
        term: i64,
        fences: Vec<Fence>,
        reply: mpsc::Sender<Result<(), HaError>>,
    },
}

/// The fences of one cluster in etcd, reached from synchronous code.
pub struct FenceStore {
    tx: mpsc::Sender<Cmd>,
}

impl FenceStore {
    /// Starts the store's thread; it connects to etcd on first use (and again after a
    /// failure). `ttl` is how long a fence must outlive its remove.
    pub fn start(endpoints: Vec<String>, cluster: String, ttl: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("kvpool-fences".into())
            .spawn(move || {
                let mut worker = Worker {
                    endpoints,
                    cluster,
                    ttl,
                    client: None,
                    lease: None,
                };
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::Load { reply } => {
                            let r = rt.block_on(worker.load());
                            worker.forget_on_error(&r);
                            let _ = reply.send(r);
                        }
                        Cmd::Record {
                            term,
                            fences,
                            reply,
                        } => {
                            let r = rt.block_on(worker.record(term, &fences));
                            worker.forget_on_error(&r);
                            let _ = reply.send(r);
                        }
                    }
                }
            })?;
        Ok(FenceStore { tx })
    }

    /// Every fence etcd still holds (blocks; for a leader at the start of its term).
    pub fn load(&self) -> Result<Vec<Fence>, HaError> {
        let (reply, rx) = mpsc::channel();
        self.call(Cmd::Load { reply }, rx, LOAD_TIMEOUT)
    }

    /// Writes `fences`, only while the leader key created at revision `term` exists (blocks).
    /// `Err` means some may not be written: the removes they fence must not be acknowledged.
    pub fn record(&self, term: i64, fences: Vec<Fence>) -> Result<(), HaError> {
        if fences.is_empty() {
            return Ok(());
        }
        let txns = fences.len().div_ceil(PER_TXN) as u32;
        let limit = CALL_TIMEOUT + PER_ROUND_TRIP * (txns - 1);
        let (reply, rx) = mpsc::channel();
        self.call(
            Cmd::Record {
                term,
                fences,
                reply,
            },
            rx,
            limit,
        )
    }

    fn call<T>(
        &self,
        cmd: Cmd,
        rx: mpsc::Receiver<Result<T, HaError>>,
        limit: Duration,
    ) -> Result<T, HaError> {
        self.tx
            .send(cmd)
            .map_err(|_| HaError::Lost("the fence store's thread is gone"))?;
        let wait = || match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => Err(HaError::Timeout(limit)),
        };
        // A tokio worker thread must say it blocks, so the runtime moves its other tasks
        // away; a current-thread runtime cannot, and then the wait is short and bounded.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }
}

struct Worker {
    endpoints: Vec<String>,
    cluster: String,
    ttl: Duration,
    client: Option<Client>,
    /// The lease fences are written with, and when it was granted.
    lease: Option<(i64, Instant)>,
}

impl Worker {
    async fn client(&mut self) -> Result<&mut Client, HaError> {
        if self.client.is_none() {
            self.client = Some(connect(&self.endpoints).await?);
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    /// A failed call may leave a broken connection or a lease etcd no longer has.
    fn forget_on_error<T>(&mut self, r: &Result<T, HaError>) {
        if r.is_err() {
            self.client = None;
            self.lease = None;
        }
    }

    async fn load(&mut self) -> Result<Vec<Fence>, HaError> {
        let prefix = fence_prefix(&self.cluster);
        let end = {
            // The prefix ends in '/', so the next byte up bounds it.
            let mut e = prefix.clone().into_bytes();
            *e.last_mut().expect("non-empty") += 1;
            e
        };
        let c = self.client().await?;
        let mut out = Vec::new();
        let mut from = prefix.clone().into_bytes();
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PER_PAGE);
            let resp = timed(c.get(from.clone(), Some(opts))).await?;
            for kv in resp.kvs() {
                let parsed = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .and_then(unhex)
                    .zip(kv.value_str().ok().and_then(|v| v.parse::<u64>().ok()));
                match parsed {
                    Some(f) => out.push(f),
                    None => tracing::warn!(key = ?kv.key_str(), "unreadable remove fence ignored"),
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    async fn lease(&mut self) -> Result<i64, HaError> {
        if let Some((id, at)) = self.lease {
            if at.elapsed() < LEASE_REUSE {
                return Ok(id);
            }
        }
        let ttl = (self.ttl + LEASE_REUSE).as_secs().max(1) as i64;
        let c = self.client().await?;
        let id = timed(c.lease_grant(ttl, None)).await?.id();
        self.lease = Some((id, Instant::now()));
        Ok(id)
    }

    async fn record(&mut self, term: i64, fences: &[Fence]) -> Result<(), HaError> {
        let lease = self.lease().await?;
        let prefix = fence_prefix(&self.cluster);
        let leader = leader_key(&self.cluster);
        let c = self.client().await?;
        for chunk in fences.chunks(PER_TXN) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|(key, upto)| {
                    TxnOp::put(
                        format!("{prefix}{}", hex(key)),
                        upto.to_string(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            let txn = Txn::new()
                .when([Compare::create_revision(
                    leader.as_str(),
                    CompareOp::Equal,
                    term,
                )])
                .and_then(puts);
            if !timed(c.txn(txn)).await?.succeeded() {
                return Err(HaError::Lost(
                    "this master's leader key is gone: a later leader may not see this remove",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_hex() {
        for key in [&b"a"[..], b"\x00\xff/x", &[7u8; 300]] {
            assert_eq!(unhex(&hex(key)).as_deref(), Some(key));
        }
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn the_prefix_is_per_cluster() {
        assert_eq!(fence_prefix("c1"), "/kvpool/c1/removed/");
        assert!(!leader_key("c1").starts_with(&fence_prefix("c1")));
    }
}
