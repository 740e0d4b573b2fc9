//! The consumer side: claim at the producer's bootstrap port, load from the pool, report
//! done, all within the consumer timeout.

use std::sync::Arc;
use std::time::Duration;

use kvpool_proto::{ErrorCode, HandoffAbort, HandoffClaim, HandoffDone};
use kvpool_transport::rpc::{RpcClient, RpcOptions};
use tracing::warn;

use super::{HandoffParams, PdConfig, PdError};
use crate::cache::HostKvCache;
use crate::pool::{clone_err, GroupLoaded, PoolConnector};

/// How long an abort sent after a failure may take: it is a courtesy to the producer (its
/// abort timeout releases the hold anyway), so it must not hold up the engine.
const ABORT_SEND_LIMIT: Duration = Duration::from_secs(2);

/// Layer groups in flight at once: group 0 does not share the link with every later group,
/// and the next group is already on its way when one lands.
const LOAD_WINDOW: usize = 2;

/// A consumer engine worker's hand-off side.
pub struct Consumer {
    connector: Arc<PoolConnector>,
    cfg: PdConfig,
}

impl Consumer {
    pub fn new(connector: Arc<PoolConnector>, cfg: PdConfig) -> Self {
        Consumer { connector, cfg }
    }

    fn rpc(&self, addr: &str, limit: Duration) -> RpcClient {
        RpcClient::new(
            addr,
            RpcOptions {
                connect_timeout: limit.min(Duration::from_secs(3)),
                request_timeout: limit,
                token: self.cfg.token.clone(),
                ..RpcOptions::default()
            },
        )
    }

    /// Loads a hand-off into `block_ids` of `cache` (one id per block of `params`, in
    /// order): claim, load, done. Any failure, or the consumer timeout, fails the request
    /// (the engine recomputes) and tells the producer to release its hold; a producer-side
    /// abort shows up here as `TransferAborted`.
    pub async fn receive(
        &self,
        params: &HandoffParams,
        cache: &mut HostKvCache,
        block_ids: &[usize],
    ) -> Result<(), PdError> {
        self.receive_layerwise(params, cache, block_ids, |_| {})
            .await
    }

    /// [`Self::receive`], layer-wise: `on_group` sees each layer group (in order, with its
    /// bytes) as soon as every block's object of that group has landed, while later groups
    /// are still in flight, so a decode engine can start on layer group `g` early. The
    /// request still fails as a whole if any group of any block misses.
    pub async fn receive_layerwise(
        &self,
        params: &HandoffParams,
        cache: &mut HostKvCache,
        block_ids: &[usize],
        mut on_group: impl FnMut(&GroupLoaded<'_>) + Send,
    ) -> Result<(), PdError> {
        let keys = params.keys()?;
        if keys.len() != block_ids.len() {
            return Err(PdError::BadParams(format!(
                "{} blocks handed off, {} destination blocks",
                keys.len(),
                block_ids.len()
            )));
        }
        let limit = self.cfg.consumer_timeout;
        let rpc = self.rpc(&params.bootstrap_addr, limit);
        let producer_err = |source| PdError::Producer {
            addr: params.bootstrap_addr.clone(),
            source,
        };
        let work = async {
            let claimed = rpc
                .call(&HandoffClaim {
                    transfer_id: params.transfer_id.clone(),
                })
                .await
                .map_err(producer_err)?;
            if claimed.blocks as usize != keys.len() {
                return Err(PdError::BadParams(format!(
                    "producer holds {} blocks, the parameters list {}",
                    claimed.blocks,
                    keys.len()
                )));
            }
            let blocks: Vec<_> = keys
                .iter()
                .cloned()
                .zip(block_ids.iter().copied())
                .collect();
            let mut load = self
                .connector
                .load_layerwise(cache, &blocks, LOAD_WINDOW)
                .map_err(PdError::Load)?;
            while let Some(group) = load.next().await {
                for (i, r) in group.results.iter().enumerate() {
                    match r {
                        Ok(true) => {}
                        Ok(false) => return Err(PdError::Missing { block: i }),
                        Err(e) => return Err(PdError::Load(clone_err(e))),
                    }
                }
                on_group(&group);
            }
            rpc.call(&HandoffDone {
                transfer_id: params.transfer_id.clone(),
            })
            .await
            .map_err(producer_err)?;
            Ok(())
        };
        let res = match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(PdError::Timeout(limit)),
        };
        if let Err(e) = &res {
            // A producer that answered with a hand-off error has already ended the hold (or
            // never had it); everyone else hears about the failure.
            let hold_gone = matches!(
                e.code(),
                ErrorCode::TransferUnknown
                    | ErrorCode::TransferAborted
                    | ErrorCode::TransferExpired
            );
            if !hold_gone {
                self.send_abort(params, &e.to_string());
            }
        }
        res
    }

    /// The claim alone, for an engine that loads the blocks itself (from memory that is not
    /// a [`HostKvCache`]): the producer restarts its abort timer and answers how many blocks
    /// it holds. Bounded by the consumer timeout. After the load, [`Self::done`]; after a
    /// failure, [`Self::abort_in_background`].
    pub async fn claim(&self, params: &HandoffParams) -> Result<u32, PdError> {
        let limit = self.cfg.consumer_timeout;
        let rpc = self.rpc(&params.bootstrap_addr, limit);
        let msg = HandoffClaim {
            transfer_id: params.transfer_id.clone(),
        };
        let call = rpc.call(&msg);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(r)) => Ok(r.blocks),
            Ok(Err(source)) => Err(PdError::Producer {
                addr: params.bootstrap_addr.clone(),
                source,
            }),
            Err(_) => Err(PdError::Timeout(limit)),
        }
    }

    /// Tells the producer the blocks are loaded: its hold ends. Bounded by the consumer
    /// timeout.
    pub async fn done(&self, params: &HandoffParams) -> Result<(), PdError> {
        let limit = self.cfg.consumer_timeout;
        let rpc = self.rpc(&params.bootstrap_addr, limit);
        let msg = HandoffDone {
            transfer_id: params.transfer_id.clone(),
        };
        let call = rpc.call(&msg);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(PdError::Producer {
                addr: params.bootstrap_addr.clone(),
                source,
            }),
            Err(_) => Err(PdError::Timeout(limit)),
        }
    }

    /// Tells the producer to release its hold, in the background (a spawned task, at most
    /// 2 s): the engine must not wait on a producer that may be why the request failed.
    /// Must be called inside a tokio runtime.
    pub fn abort_in_background(&self, params: &HandoffParams, reason: &str) {
        self.send_abort(params, reason)
    }

    /// The engine aborted the request: the producer releases its hold.
    pub async fn abort(&self, params: &HandoffParams, reason: &str) -> Result<(), PdError> {
        let rpc = self.rpc(&params.bootstrap_addr, ABORT_SEND_LIMIT);
        rpc.call(&HandoffAbort {
            transfer_id: params.transfer_id.clone(),
            reason: reason.to_string(),
        })
        .await
        .map(|_| ())
        .map_err(|source| PdError::Producer {
            addr: params.bootstrap_addr.clone(),
            source,
        })
    }

    /// Tells the producer in the background: the engine must not wait on a producer that
    /// may be the reason for the failure.
    fn send_abort(&self, params: &HandoffParams, reason: &str) {
        let rpc = self.rpc(&params.bootstrap_addr, ABORT_SEND_LIMIT);
        let msg = HandoffAbort {
            transfer_id: params.transfer_id.clone(),
            reason: reason.to_string(),
        };
        tokio::spawn(async move {
            if let Err(e) = rpc.call(&msg).await {
                warn!(transfer_id = %msg.transfer_id, "could not tell the producer: {e}");
            }
        });
    }
}
