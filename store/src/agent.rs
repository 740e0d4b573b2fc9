//! The node's link to the master: register (with an inventory report), then heartbeat, and
//! leave when the node shuts down.
//!
//! The master may restart, fail over, or declare this node dead at any time; the agent then
//! registers again with a fresh report, so the master re-learns what the node holds. While
//! the master is unreachable the agent retries forever with a capped back-off; the data
//! server keeps serving meanwhile. On shutdown the agent sends `Leave`, so the master stops
//! handing out this node's replicas at once instead of after the node TTL.

use std::{future::Future, sync::Arc, time::Duration};

use kvpool_proto::{ErrorCode, Heartbeat, Leave, Register, RegisterResponse};
use kvpool_transport::{
    engine::TransferEngine,
    rpc::{RpcClient, RpcOptions},
    TransportError,
};

use crate::node::Node;

/// Heartbeat interval used when the master does not name one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// First retry delay after a failed registration; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a node shutting down waits for the master to acknowledge its `Leave`; past it
/// the node stops anyway and the master drops it after the node TTL.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` completes, then leaves the pool.
pub async fn run_agent(node: Arc<Node>, master: String, shutdown: impl Future<Output = ()>) {
    run_agent_with_token(node, master, None, shutdown).await
}

/// Runs the agent until `shutdown` completes, presenting `token` to the master, then leaves
/// the pool (waiting at most [`LEAVE_TIMEOUT`] for the master). A master that refuses the
/// token is retried like an unreachable one (the operator may fix either side).
pub async fn run_agent_with_token(
    node: Arc<Node>,
    master: String,
    token: Option<kvpool_proto::Token>,
    shutdown: impl Future<Output = ()>,
) {
    // Drain moves pull values from other nodes: their data servers want the same token.
    let engine = Arc::new(TransferEngine::new(
        kvpool_transport::engine::EngineOptions {
            token: token.clone(),
            checksum_reads: true,
            ..Default::default()
        },
    ));
    let opts = RpcOptions {
        token,
        connect_timeout: Duration::from_secs(1),
        // A registration checksums the whole inventory first, but that happens before the
        // call; the master's answer itself is quick.
        request_timeout: Duration::from_secs(10),
        ..RpcOptions::default()
    };
    // `etcd://...` (set when the node runs with --etcd): follow the elected leader.
    let client = match kvpool_ha::parse_etcd_target(&master) {
        Some((endpoints, cluster)) => {
            let resolver = kvpool_ha::Resolver::new(endpoints, &cluster);
            RpcClient::with_resolver(master, resolver.as_fn(), opts)
        }
        None => RpcClient::new(master, opts),
    };
    tokio::select! {
        () = shutdown => {}
        () = agent_loop(&node, &client, &engine) => {}
    }
    leave(&node, &client).await;
}

/// Tells the master this node is going away. One attempt, bounded by [`LEAVE_TIMEOUT`]: a
/// node shutting down must not hang on an unreachable master, and one that could not leave
/// is dropped after the node TTL anyway, as if it had died.
async fn leave(node: &Node, client: &RpcClient) {
    let msg = Leave { node: node.id() };
    let answer = match tokio::time::timeout(LEAVE_TIMEOUT, client.call(&msg)).await {
        Ok(Ok(r)) => r.items.into_iter().next().unwrap_or(Ok(())),
        Ok(Err(TransportError::Remote(e))) => Err(e),
        Ok(Err(e)) => {
            tracing::warn!(
                master = client.addr(),
                "could not leave the pool (the master drops this node after its TTL): {e}"
            );
            return;
        }
        Err(_) => {
            tracing::warn!(master = client.addr(), "no answer to leaving the pool within {LEAVE_TIMEOUT:?} (the master drops this node after its TTL)");
            return;
        }
    };
    match answer {
        Ok(()) => tracing::info!(node = %node.id(), "left the pool"),
        // Never registered, or already declared dead: there is nothing to leave.
        Err(e) if e.code == ErrorCode::UnknownNode => {
            tracing::info!(node = %node.id(), "the master does not know this node: {e}")
        }
        Err(e) => tracing::warn!(node = %node.id(), "the master refused the leave: {e}"),
    }
}

async fn agent_loop(node: &Arc<Node>, client: &RpcClient, engine: &Arc<TransferEngine>) {
    loop {
        let interval = register(node, client).await;
        heartbeat_until_lost(node, client, engine, interval).await;
    }
}

/// Registers, retrying until the master accepts; returns the heartbeat interval it asked for.
async fn register(node: &Arc<Node>, client: &RpcClient) -> Duration {
    node.metrics().set_registered(false);
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        match try_register(node, client).await {
            Ok(resp) => {
                if !resp.rejected.is_empty() {
                    tracing::info!(
                        rejected = resp.rejected.len(),
                        "master refused some reported replicas; forgetting them"
                    );
                    node.free(&resp.rejected);
                }
                let interval = match resp.heartbeat_ms {
                    0 => DEFAULT_HEARTBEAT,
                    ms => Duration::from_millis(ms).clamp(Duration::from_millis(10), MAX_HB),
                };
                node.metrics().set_registered(true);
                tracing::info!(
                    node = %node.id(),
                    master = client.addr(),
                    objects = node.inventory().len(),
                    ?interval,
                    "registered with the master"
                );
                return interval;
            }
            Err(e) => {
                // The first failure is worth a warning; a master that stays down is not worth
                // one line per second.
                if failures == 0 {
                    tracing::warn!(master = client.addr(), "registration failed, retrying: {e}");
                } else {
                    tracing::debug!(master = client.addr(), failures, "registration failed: {e}");
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Longest heartbeat interval honoured: the master declares a node dead after 10 s of silence.
const MAX_HB: Duration = Duration::from_secs(5);

async fn try_register(
    node: &Arc<Node>,
    client: &RpcClient,
) -> Result<RegisterResponse, TransportError> {
    // Checksumming the inventory reads every held byte: keep it off the async workers.
    let n = node.clone();
    let msg: Register = tokio::task::spawn_blocking(move || n.register_msg())
        .await
        .map_err(|e| TransportError::Protocol(format!("inventory report failed: {e}")))?;
    client.call(&msg).await
}

/// Heartbeats every `interval`, applying the master's frees, until the master asks the node to
/// register again (it restarted, failed over, or declared the node dead).
async fn heartbeat_until_lost(
    node: &Arc<Node>,
    client: &RpcClient,
    engine: &Arc<TransferEngine>,
    interval: Duration,
) {
    let mut acked = 0u64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let tasks = crate::tasks::Runner::new(node.clone(), engine.clone());
    loop {
        // A finished copy is reported at once rather than a whole interval later: the
        // master frees the demoted DRAM range only when it hears of it.
        tokio::select! {
            _ = ticker.tick() => {}
            () = tasks.finished() => {}
        }
        let done = tasks.take_done();
        let sent = done.clone();
        let lost = node.take_lost();
        let lost_sent = lost.clone();
        let sent_at = std::time::Instant::now();
        match client
            .call(&Heartbeat {
                node: node.id(),
                acked,
                done,
                unhealthy: node.unhealthy(),
                lost,
            })
            .await
        {
            Ok(resp) => {
                if failing {
                    tracing::info!(master = client.addr(), "master reachable again");
                    failing = false;
                }
                if resp.need_register {
                    tracing::info!(node = %node.id(), "master asks this node to register again");
                    return;
                }
                // Commits first: a free later in the same sequence wins over them.
                node.inventory().confirm(&resp.commits);
                if !resp.frees.is_empty() {
                    node.free(&resp.frees);
                }
                if !resp.more {
                    node.inventory().heard_from_master(sent_at);
                }
                acked = acked.max(resp.frees_upto);
                for task in resp.tasks {
                    tasks.spawn(task);
                }
            }
            Err(TransportError::Remote(e))
                if matches!(
                    e.code,
                    ErrorCode::NeedRegister | ErrorCode::UnknownNode | ErrorCode::NodeDead
                ) =>
            {
                tracing::info!(node = %node.id(), "master no longer knows this node: {e}");
                return;
            }
            Err(e) => {
                // The master may not have heard of these; say them again next time.
                tasks.put_back(sent);
                node.put_back_lost(lost_sent);
                // Keep heartbeating: a master that comes back answers need_register if it lost
                // this node, and a transient failure costs nothing.
                if !failing {
                    tracing::warn!(master = client.addr(), "heartbeat failed: {e}");
                    failing = true;
                }
            }
        }
    }
}
