//! The sim's side of the P/D hand-off: the connector's `Producer` and `Consumer` behind one
//! small API, with errors flattened to the message a response reports.

use std::sync::Arc;

use kvpool_connector::{
    pd::{Consumer, PdConfig, Producer},
    BlockKey, HostKvCache, PoolConnector,
};
use serde_json::{json, Value};

pub use kvpool_connector::pd::{HandoffParams, PdError, Role};

pub struct PdSide {
    pub role: Role,
    producer: Option<Producer>,
    consumer: Option<Consumer>,
}

impl PdSide {
    /// Starts the producer's bootstrap server when `cfg.role` produces.
    pub async fn start(conn: &Arc<PoolConnector>, cfg: PdConfig) -> Result<Self, PdError> {
        let producer = if cfg.role.produces() {
            Some(Producer::start(Arc::clone(conn), cfg.clone()).await?)
        } else {
            None
        };
        let consumer = cfg
            .role
            .consumes()
            .then(|| Consumer::new(Arc::clone(conn), cfg.clone()));
        Ok(Self {
            role: cfg.role,
            producer,
            consumer,
        })
    }

    pub fn produces(&self) -> bool {
        self.producer.is_some()
    }

    pub fn consumes(&self) -> bool {
        self.consumer.is_some()
    }

    pub fn bootstrap_addr(&self) -> Option<String> {
        self.producer
            .as_ref()
            .map(|p| p.bootstrap_addr().to_string())
    }

    /// `keys` as a hand-off names them, to check a consumer's prompt against its params.
    pub fn param_keys(keys: &[BlockKey]) -> Vec<String> {
        keys.iter().map(BlockKey::to_param).collect()
    }

    pub async fn hand_off(
        &self,
        request_id: &str,
        cache: &HostKvCache,
        blocks: &[(BlockKey, usize)],
    ) -> Result<HandoffParams, String> {
        let p = self.producer.as_ref().ok_or("not a kv_producer")?;
        p.hand_off(request_id, cache, blocks)
            .await
            .map_err(|e| e.to_string())
    }

    /// Receives a hand-off layer-wise; `on_group(g)` runs as layer group `g` lands.
    pub async fn receive(
        &self,
        params: &HandoffParams,
        cache: &mut HostKvCache,
        slots: &[usize],
        mut on_group: impl FnMut(usize) + Send,
    ) -> Result<(), String> {
        let c = self.consumer.as_ref().ok_or("not a kv_consumer")?;
        c.receive_layerwise(params, cache, slots, |g| on_group(g.group))
            .await
            .map_err(|e| e.to_string())
    }

    /// Ends `request_id` on this side and tells the other: a consumer's abort releases the
    /// producer's hold; a producer's drops its own. Whether anything was ended.
    pub async fn abort(&self, request_id: &str, params: Option<&HandoffParams>) -> bool {
        let mut ended = false;
        if let (Some(c), Some(p)) = (&self.consumer, params) {
            match c.abort(p, "request aborted by the decoder").await {
                Ok(()) => ended = true,
                Err(e) => tracing::warn!("request {request_id}: telling the producer: {e}"),
            }
        }
        if let Some(p) = &self.producer {
            ended |= p.abort(request_id) > 0;
        }
        ended
    }

    pub fn producer_stats(&self) -> Option<Value> {
        self.producer.as_ref().map(|p| {
            let s = p.stats();
            json!({
                "held": s.held,
                "held_blocks": s.held_blocks,
                "handed_off": s.handed_off,
                "claimed": s.claimed,
                "released": s.released,
                "expired": s.expired,
                "aborted": s.aborted,
            })
        })
    }
}
