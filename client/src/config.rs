use std::time::Duration;

use kvpool_proto::NodeId;
use kvpool_transport::{engine::EngineOptions, rpc::RpcOptions};

/// How a [`crate::Client`] reaches the pool and how hard it tries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The master's RPC address ["127.0.0.1:50051"].
    pub master: String,
    pub rpc: RpcOptions,
    pub engine: EngineOptions,
    /// Verify every get against the writer's crc32c [true].
    pub verify_checksum: bool,
    /// How long one operation may keep retrying transient failures [30 s].
    pub deadline: Duration,
    /// Keys per master request; larger batches are split [1024].
    pub max_batch: usize,
    /// This client's own node, if it runs beside one: written first, read first.
    pub local_node: Option<NodeId>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            master: "127.0.0.1:50051".into(),
            rpc: RpcOptions::default(),
            engine: EngineOptions::default(),
            verify_checksum: true,
            deadline: Duration::from_secs(30),
            max_batch: 1024,
            local_node: None,
        }
    }
}

impl ClientConfig {
    pub fn with_master(master: impl Into<String>) -> Self {
        ClientConfig {
            master: master.into(),
            ..Default::default()
        }
    }
}
