//! High availability for the kvpool master: leader election and leader discovery through etcd.
//!
//! - [`Election`]: a master campaigns for the key `/kvpool/<cluster>/leader`. It grants a
//!   lease (TTL [5 s]) and creates the key, holding its RPC address, in a transaction that
//!   succeeds only if the key is absent. The winner keeps the lease alive; the others retry
//!   every second.
//! - [`Resolver`]: clients and storage nodes read (and watch) that key to find the leader.
//!
//! # The one invariant
//!
//! A master acts as leader only while its lease is certainly live. etcd starts a lease's TTL
//! when it *receives* a grant or keep-alive, which is after we sent it, so the lease lives at
//! least until `sent + TTL`. The leader stops acting a safety margin before that
//! ([`LeaseClock`]), whether or not etcd answered anything, so when etcd, the network or this
//! process stall, this master has stopped before etcd can expire the key and let a standby
//! win. Two masters therefore never act as leader at once. The check is made on every
//! request ([`Election::leader_term`]), not only by the campaign task, so a late task cannot
//! stretch a term.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

mod addr;
pub mod fence;
pub use addr::{check_etcd_endpoint, check_host_port, AddrError};

/// Lease TTL a leader holds (docs/design.md §3, high availability: Mooncake's default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// Cluster name when none is given (`--cluster` / `KVPOOL_CLUSTER`).
pub const DEFAULT_CLUSTER: &str = "default";
/// How often a standby tries to win, and how often a leader renews (at most).
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Limit for one etcd call: a stalled etcd must not stall the loops that depend on it.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// The etcd key that names the leader of `cluster`.
pub fn leader_key(cluster: &str) -> String {
    format!("/kvpool/{cluster}/leader")
}

/// The master address form that means "the leader, found through etcd":
/// `etcd://HOST:PORT[,HOST:PORT...][/CLUSTER]` (cluster [default]). Anything else is a plain
/// master address.
pub fn etcd_target(endpoints: &[String], cluster: &str) -> String {
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| {
            e.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
        })
        .collect();
    format!("etcd://{}/{cluster}", hosts.join(","))
}

/// Splits an `etcd://` master address into etcd endpoints (`http://HOST:PORT`) and the
/// cluster name; `None` for a plain address.
pub fn parse_etcd_target(master: &str) -> Option<(Vec<String>, String)> {
    let rest = master.strip_prefix("etcd://")?;
    let (hosts, cluster) = match rest.split_once('/') {
        Some((h, c)) if !c.is_empty() => (h, c),
        Some((h, _)) => (h, DEFAULT_CLUSTER),
        None => (rest, DEFAULT_CLUSTER),
    };
    let endpoints: Vec<String> = hosts
        .split([',', ';'])
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    (!endpoints.is_empty()).then(|| (endpoints, cluster.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Lost(&'static str),
}

async fn timed<T>(f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, HaError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(HaError::Timeout(OP_TIMEOUT)),
    }
}

async fn connect(endpoints: &[String]) -> Result<Client, HaError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(OP_TIMEOUT)
        .with_timeout(OP_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), OP_TIMEOUT);
    timed(Client::connect(endpoints, Some(opts))).await
}

/// The sans-I/O part of the election: until when this master may act as leader.
///
/// Each successful grant or keep-alive sent at `sent` with a TTL of `ttl` proves the lease
/// lives until at least `sent + ttl`; the master acts until `margin` before that.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    margin: Duration,
    act_until: Option<Instant>,
}

impl LeaseClock {
    /// A clock for leases of `ttl`, with the default safety margin ([`safety_margin`]).
    pub fn new(ttl: Duration) -> Self {
        LeaseClock {
            margin: safety_margin(ttl),
            act_until: None,
        }
    }

    /// A grant or keep-alive sent at `sent` succeeded and etcd reported `ttl` left.
    pub fn renewed(&mut self, sent: Instant, ttl: Duration) {
        let until = sent + ttl.saturating_sub(self.margin);
        // A slow answer to an older request must not shorten what a newer one proved.
        self.act_until = Some(self.act_until.map_or(until, |u| u.max(until)));
    }

    /// Whether this master may act as leader at `now`.
    pub fn acting(&self, now: Instant) -> bool {
        self.act_until.is_some_and(|u| now < u)
    }

    /// When acting must stop unless renewed again.
    pub fn act_until(&self) -> Option<Instant> {
        self.act_until
    }

    /// Leadership ended (stepped down or lost).
    pub fn reset(&mut self) {
        self.act_until = None;
    }
}

/// How long before the lease's earliest possible expiry a leader stops acting: 30 % of the
/// TTL (1.5 s of 5 s), enough for a scheduling hiccup and clock-rate drift between this host
/// and etcd, yet leaving room for two missed one-second renewals.
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl * 3 / 10).max(Duration::from_millis(100))
}

/// A master's role, as published on [`Election::role`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Leading; `term` is the etcd revision that created the leader key (unique per term).
    Leader {
        term: i64,
    },
}

/// What an [`Election`] campaigns with.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// The value of the leader key: this master's RPC address as clients should dial it.
    pub address: String,
    pub ttl: Duration,
}

#[derive(Debug)]
struct State {
    clock: LeaseClock,
    term: i64,
    lease: Option<i64>,
    leader_hint: Option<String>,
}

/// A running campaign. Dropping it stops campaigning (the lease then expires within its TTL;
/// [`Election::resign`] releases it at once).
pub struct Election {
    state: Arc<Mutex<State>>,
    role: watch::Receiver<Role>,
    task: JoinHandle<()>,
    endpoints: Vec<String>,
}

impl Election {
    /// Starts campaigning in the background.
    pub fn start(cfg: ElectionConfig) -> Election {
        let state = Arc::new(Mutex::new(State {
            clock: LeaseClock::new(cfg.ttl),
            term: 0,
            lease: None,
            leader_hint: None,
        }));
        let (tx, rx) = watch::channel(Role::Follower);
        let endpoints = cfg.endpoints.clone();
        let task = tokio::spawn(campaign(cfg, state.clone(), tx));
        Election {
            state,
            role: rx,
            task,
            endpoints,
        }
    }

    /// Role changes, as the campaign task sees them. For the decision whether to act on a
    /// request use [`Election::leader_term`], which also honours the lease clock.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// `Some(term)` while this master may act as leader, right now.
    pub fn leader_term(&self) -> Option<i64> {
        let s = lock(&self.state);
        s.clock.acting(Instant::now()).then_some(s.term)
    }

    /// The leader's address as last seen by this master's campaign, if any.
    pub fn leader_hint(&self) -> Option<String> {
        lock(&self.state).leader_hint.clone()
    }

    /// Stops campaigning and revokes the lease if leading, so a standby takes over at once.
    pub async fn resign(&self) {
        self.task.abort();
        let lease = {
            let mut s = lock(&self.state);
            s.clock.reset();
            s.lease.take()
        };
        if let Some(id) = lease {
            revoke(&self.endpoints, id).await;
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few field writes; a panic cannot leave them half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn revoke(endpoints: &[String], id: i64) {
    if let Ok(mut c) = connect(endpoints).await {
        if let Err(e) = timed(c.lease_revoke(id)).await {
            tracing::debug!("revoking lease {id:x} failed (it expires by itself): {e}");
        }
    }
}

async fn campaign(cfg: ElectionConfig, state: Arc<Mutex<State>>, role: watch::Sender<Role>) {
    let key = leader_key(&cfg.cluster);
    let ttl_secs = cfg.ttl.as_secs().max(1) as i64;
    let mut client: Option<Client> = None;
    let mut warned = false;
    loop {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&cfg.endpoints).await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    if !warned {
                        tracing::warn!(endpoints = ?cfg.endpoints, "cannot reach etcd, retrying: {e}");
                        warned = true;
                    }
                    tokio::time::sleep(RETRY_EVERY).await;
                    continue;
                }
            },
        };
        match try_acquire(c, &key, &cfg.address, ttl_secs).await {
            Ok(Acquire::Won {
                lease,
                sent,
                ttl,
                term,
            }) => {
                warned = false;
                {
                    let mut s = lock(&state);
                    s.clock.reset();
                    s.clock.renewed(sent, ttl);
                    s.term = term;
                    s.lease = Some(lease);
                    s.leader_hint = Some(cfg.address.clone());
                }
                tracing::info!(key, term, address = cfg.address, "elected leader");
                let _ = role.send(Role::Leader { term });
                let why = lead(c, &key, lease, term, &state).await;
                {
                    let mut s = lock(&state);
                    s.clock.reset();
                    s.lease = None;
                    s.leader_hint = None;
                }
                let _ = role.send(Role::Follower);
                tracing::warn!(key, term, "stepped down: {why}");
                // Release the key at once if etcd is reachable, so a standby need not wait
                // for the lease to expire; a stalled etcd expires it by itself.
                let endpoints = cfg.endpoints.clone();
                tokio::spawn(async move { revoke(&endpoints, lease).await });
            }
            Ok(Acquire::Lost { leader }) => {
                warned = false;
                lock(&state).leader_hint = leader;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!("campaign failed, retrying: {e}");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

enum Acquire {
    Won {
        lease: i64,
        sent: Instant,
        ttl: Duration,
        term: i64,
    },
    Lost {
        leader: Option<String>,
    },
}

async fn try_acquire(
    c: &mut Client,
    key: &str,
    address: &str,
    ttl_secs: i64,
) -> Result<Acquire, HaError> {
    let sent = Instant::now();
    let grant = timed(c.lease_grant(ttl_secs, None)).await?;
    let lease = grant.id();
    let ttl = Duration::from_secs(grant.ttl().max(0) as u64);
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            address,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let resp = match timed(c.txn(txn)).await {
        Ok(r) => r,
        Err(e) => {
            // The txn may still have gone through; if so, the key expires with this lease,
            // which nobody keeps alive.
            let _ = timed(c.lease_revoke(lease)).await;
            return Err(e);
        }
    };
    if resp.succeeded() {
        let term = resp.header().map(|h| h.revision()).unwrap_or_default();
        return Ok(Acquire::Won {
            lease,
            sent,
            ttl,
            term,
        });
    }
    let _ = timed(c.lease_revoke(lease)).await;
    let leader = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_string),
        _ => None,
    });
    Ok(Acquire::Lost { leader })
}

/// Keeps the lease alive and the key ours until that can no longer be proven in time;
/// returns why leadership ended.
async fn lead(c: &mut Client, key: &str, lease: i64, term: i64, state: &Mutex<State>) -> HaError {
    let mut stream = None;
    loop {
        let Some(until) = lock(state).clock.act_until() else {
            return HaError::Lost("leadership reset");
        };
        let sent = Instant::now();
        if sent >= until {
            return HaError::Lost("lease not renewed in time");
        }
        let round = tokio::time::timeout_at(
            until.min(sent + OP_TIMEOUT),
            renew(c, &mut stream, key, lease, term),
        )
        .await;
        match round {
            Ok(Ok(ttl)) => lock(state).clock.renewed(sent, ttl),
            Ok(Err(e @ HaError::Lost(_))) => return e,
            Ok(Err(e)) => {
                tracing::debug!("lease renewal failed: {e}");
                stream = None;
            }
            Err(_) => {
                tracing::debug!("lease renewal timed out");
                stream = None;
            }
        }
        let until = lock(state).clock.act_until().unwrap_or(sent);
        tokio::time::sleep_until((sent + RETRY_EVERY).min(until)).await;
    }
}

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// One renewal: a keep-alive, then a check that the key is still the one this term created
/// (an operator may delete it by hand). Returns the TTL etcd reports.
async fn renew(
    c: &mut Client,
    stream: &mut Option<KeepAlive>,
    key: &str,
    lease: i64,
    term: i64,
) -> Result<Duration, HaError> {
    let (keeper, responses) = match stream {
        Some(s) => s,
        None => stream.insert(c.lease_keep_alive(lease).await?),
    };
    keeper.keep_alive().await?;
    let ttl = match responses.message().await? {
        Some(r) if r.ttl() > 0 => Duration::from_secs(r.ttl() as u64),
        Some(_) => return Err(HaError::Lost("the lease expired")),
        None => return Err(HaError::Timeout(OP_TIMEOUT)),
    };
    let got = c.get(key, None).await?;
    match got.kvs().first() {
        Some(kv) if kv.create_revision() == term && kv.lease() == lease => Ok(ttl),
        _ => Err(HaError::Lost("the leader key is gone or was replaced")),
    }
}

/// Finds the leader through etcd: for storage nodes and clients.
pub struct Resolver {
    endpoints: Vec<String>,
    key: String,
    client: tokio::sync::Mutex<Option<Client>>,
    last: Mutex<Option<String>>,
}

/// The shape [`Resolver::as_fn`] returns: what `kvpool_transport::rpc::RpcClient::with_resolver`
/// takes.
pub type ResolveFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

impl Resolver {
    /// A resolver for `cluster`; nothing is dialed until the first lookup.
    pub fn new(endpoints: Vec<String>, cluster: &str) -> Arc<Resolver> {
        Arc::new(Resolver {
            endpoints,
            key: leader_key(cluster),
            client: tokio::sync::Mutex::new(None),
            last: Mutex::new(None),
        })
    }

    /// The current leader's address, read from etcd now; the last one seen if etcd does not
    /// answer, `None` if there is no leader (or none was ever seen).
    pub async fn leader(&self) -> Option<String> {
        match self.read().await {
            Ok(v) => {
                (*lock(&self.last)).clone_from(&v);
                v
            }
            Err(e) => {
                tracing::debug!(key = self.key, "leader lookup failed: {e}");
                lock(&self.last).clone()
            }
        }
    }

    /// The last leader address seen, without asking etcd.
    pub fn cached(&self) -> Option<String> {
        lock(&self.last).clone()
    }

    async fn read(&self) -> Result<Option<String>, HaError> {
        let mut slot = self.client.lock().await;
        let c = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(connect(&self.endpoints).await?),
        };
        let got = timed(c.get(self.key.as_str(), None)).await?;
        Ok(got
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_string))
    }

    /// Watches the leader key: the receiver holds the current leader (or `None`) and changes
    /// when the leader does. The watching task ends when every receiver is dropped.
    pub fn watch(self: &Arc<Self>) -> watch::Receiver<Option<String>> {
        let (tx, rx) = watch::channel(self.cached());
        let me = self.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                if let Err(e) = me.watch_once(&tx).await {
                    tracing::debug!(key = me.key, "leader watch failed, re-arming: {e}");
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
        });
        rx
    }

    async fn watch_once(&self, tx: &watch::Sender<Option<String>>) -> Result<(), HaError> {
        let mut c = connect(&self.endpoints).await?;
        let got = timed(c.get(self.key.as_str(), None)).await?;
        let current = got
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_string);
        let rev = got.header().map(|h| h.revision()).unwrap_or_default();
        (*lock(&self.last)).clone_from(&current);
        tx.send_replace(current);
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let mut stream = timed(c.watch(self.key.as_str(), Some(opts))).await?;
        loop {
            tokio::select! {
                () = tx.closed() => return Ok(()),
                msg = stream.message() => {
                    let Some(resp) = msg? else { return Ok(()) };
                    for ev in resp.events() {
                        let v = match ev.event_type() {
                            EventType::Put => ev.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string),
                            EventType::Delete => None,
                        };
                        (*lock(&self.last)).clone_from(&v);
                        tx.send_replace(v);
                    }
                }
            }
        }
    }

    /// This resolver as the lookup function an RPC client re-resolves through.
    pub fn as_fn(self: &Arc<Self>) -> ResolveFn {
        let me = self.clone();
        Arc::new(move || {
            let me = me.clone();
            Box::pin(async move { me.leader().await })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_down_before_the_lease_can_expire() {
        let ttl = Duration::from_secs(5);
        let mut c = LeaseClock::new(ttl);
        let t0 = Instant::now();
        assert!(!c.acting(t0), "not leader before a grant");
        c.renewed(t0, ttl);
        assert!(c.acting(t0 + Duration::from_secs(3)));
        // 1.5 s before the earliest expiry (t0 + 5 s), acting stops.
        assert!(!c.acting(t0 + Duration::from_millis(3500)));
        assert!(!c.acting(t0 + ttl));
        assert_eq!(c.act_until(), Some(t0 + Duration::from_millis(3500)));
    }

    #[test]
    fn a_renewal_extends_from_when_it_was_sent() {
        let ttl = Duration::from_secs(5);
        let mut c = LeaseClock::new(ttl);
        let t0 = Instant::now();
        c.renewed(t0, ttl);
        // Sent at t0+1s, answered late: the proof starts at the send, not the answer.
        c.renewed(t0 + Duration::from_secs(1), ttl);
        assert_eq!(c.act_until(), Some(t0 + Duration::from_millis(4500)));
        // A stale answer (an older send arriving last) never shortens the term.
        c.renewed(t0, ttl);
        assert_eq!(c.act_until(), Some(t0 + Duration::from_millis(4500)));
        // etcd may report less than asked (e.g. a lease near expiry): honour the shorter TTL.
        c.renewed(t0 + Duration::from_secs(2), Duration::from_secs(2));
        assert_eq!(c.act_until(), Some(t0 + Duration::from_millis(4500)));
    }

    #[test]
    fn missed_renewals_step_down_before_expiry() {
        // Renewals every second; etcd stalls after the one sent at t0+2s. The lease lives to
        // at least t0+7s; the leader stops at t0+5.5s.
        let ttl = Duration::from_secs(5);
        let mut c = LeaseClock::new(ttl);
        let t0 = Instant::now();
        for s in 0..=2 {
            c.renewed(t0 + Duration::from_secs(s), ttl);
        }
        let earliest_expiry = t0 + Duration::from_secs(7);
        let stop = c.act_until().unwrap();
        assert!(stop < earliest_expiry);
        assert_eq!(earliest_expiry - stop, safety_margin(ttl));
        assert!(c.acting(stop - Duration::from_millis(1)));
        assert!(!c.acting(stop));
        c.reset();
        assert!(!c.acting(t0));
    }

    #[test]
    fn margin_scales_with_ttl() {
        assert_eq!(
            safety_margin(Duration::from_secs(5)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            safety_margin(Duration::from_secs(1)),
            Duration::from_millis(300)
        );
        assert_eq!(
            safety_margin(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn etcd_targets_round_trip() {
        let eps = vec![
            "http://10.0.0.1:2379".to_string(),
            "10.0.0.2:2379".to_string(),
        ];
        let t = etcd_target(&eps, "prod");
        assert_eq!(t, "etcd://10.0.0.1:2379,10.0.0.2:2379/prod");
        let (back, cluster) = parse_etcd_target(&t).unwrap();
        assert_eq!(back, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(cluster, "prod");
        assert_eq!(
            parse_etcd_target("etcd://h:1").unwrap().1,
            DEFAULT_CLUSTER.to_string()
        );
        assert!(parse_etcd_target("127.0.0.1:50051").is_none());
        assert!(parse_etcd_target("etcd://").is_none());
    }

    #[test]
    fn key_layout() {
        assert_eq!(leader_key("default"), "/kvpool/default/leader");
    }
}
