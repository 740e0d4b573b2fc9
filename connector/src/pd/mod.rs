//! The prefill-to-decode hand-off as a pool case (docs/connector.md, "P/D hand-off").
//!
//! A producer engine (`kv_producer`) saves a finished prefill's blocks into the pool and
//! *holds* them: it keeps renewing their read leases, so eviction leaves them alone, and
//! returns [`HandoffParams`] (the block keys, its bootstrap address, a transfer id). The
//! consumer engine (`kv_consumer`) claims the transfer at the producer's bootstrap port,
//! loads the blocks from the pool and reports done, which ends the hold. Nothing but the
//! claim/done/abort messages goes between the two engines: the KV itself moves through the
//! pool, so a hand-off is a prefix-cache entry like any other once the hold ends.
//!
//! Timeouts on both sides: the producer releases a hold no consumer claimed within its abort
//! timeout (`TransferExpired`), and the consumer fails the request (the engine recomputes)
//! when the producer is gone or slow past its own timeout. An abort on either side reaches
//! the other: a consumer's abort releases the producer's hold, and a producer's abort makes
//! the consumer's next claim or done fail with `TransferAborted`.

mod config;
mod consumer;
mod holds;
mod producer;

pub use config::{PdConfig, Role};
pub use consumer::Consumer;
pub use holds::{HoldTable, Outcome, ProducerStats};
pub use producer::Producer;

use kvpool_proto::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::keys::BlockKey;
use crate::pool::ConnectorError;

/// What a producer hands the proxy for the consumer (vLLM's `kv_transfer_params`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffParams {
    pub transfer_id: String,
    /// `host:port` of the producer's bootstrap server.
    pub bootstrap_addr: String,
    /// The blocks in order, as [`BlockKey::to_param`] strings.
    pub block_keys: Vec<String>,
}

impl HandoffParams {
    /// The block keys, or which one does not parse.
    pub fn keys(&self) -> Result<Vec<BlockKey>, PdError> {
        self.block_keys
            .iter()
            .map(|s| {
                BlockKey::from_param(s)
                    .ok_or_else(|| PdError::BadParams(format!("block key {s:?} does not parse")))
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PdError {
    #[error("P/D configuration: {0}")]
    Config(String),
    #[error("cannot listen for P/D bootstrap on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("bad hand-off parameters: {0}")]
    BadParams(String),
    #[error("saving the hand-off's blocks: {0}")]
    Save(ConnectorError),
    #[error("loading the hand-off's blocks: {0}")]
    Load(ConnectorError),
    #[error("block {block} of the hand-off is not in the pool")]
    Missing { block: usize },
    /// The producer answered with an error or could not be reached.
    #[error("producer {addr}: {source}")]
    Producer {
        addr: String,
        source: kvpool_transport::TransportError,
    },
    #[error("hand-off not finished within the consumer timeout ({0:?})")]
    Timeout(std::time::Duration),
}

impl PdError {
    /// The stable code, as the engine would report the request's failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            PdError::Config(_) | PdError::BadParams(_) => ErrorCode::InvalidArgument,
            PdError::Bind { .. } => ErrorCode::Io,
            PdError::Save(e) | PdError::Load(e) => e.code(),
            PdError::Missing { .. } => ErrorCode::NotFound,
            PdError::Producer { source, .. } => source.code(),
            PdError::Timeout(_) => ErrorCode::Timeout,
        }
    }
}
