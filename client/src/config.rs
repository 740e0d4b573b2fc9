use std::time::Duration;

use kvpool_proto::{NodeId, Token};
use kvpool_transport::{engine::EngineOptions, rpc::RpcOptions, shm::TransportMode};

/// The environment variable that overrides [`ClientConfig::transport`] for every client of a
/// process ("auto", "tcp", "shm" or "rdma").
pub const TRANSPORT_ENV: &str = "KVPOOL_TRANSPORT";
/// The environment variable that turns [`ClientConfig::location_cache`] on (`1`, `true`,
/// `on`) or off (`0`, `false`, `off`) for every client of a process.
pub const LOCATION_CACHE_ENV: &str = "KVPOOL_LOCATION_CACHE";

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
    /// etcd endpoints to find the leading master through (HA) [empty: use `master`]. The
    /// client follows a new leader without being re-created.
    pub etcd: Vec<String>,
    /// Cluster name whose leader to follow when `etcd` is set ["default"].
    pub cluster: String,
    /// The cluster token, presented on every connection to the master and to storage nodes.
    /// When set it replaces `rpc.token` and `engine.token`.
    pub token: Option<Token>,
    /// The tenant (namespace) this client's keys live in [unset: the shared namespace]. Key
    /// `k` of tenant `t` is `t 0x00 k` on the wire, so tenants never see each other's keys;
    /// a name containing 0x00 is refused. An empty name is the same as none.
    pub tenant: Option<String>,
    /// How storage nodes are reached [auto]: shared memory for nodes on this host, RDMA for
    /// the others where both sides have a device (feature `rdma`), TCP otherwise; `tcp`,
    /// `shm` or `rdma` force one (`shm` and `rdma` fail requests to nodes they cannot use,
    /// naming why). [`TRANSPORT_ENV`] overrides it. Replaces `engine.transport`.
    pub transport: TransportMode,
    /// The cache of replica locations that lets a repeated get skip the master
    /// ([`LocationCache`]) [off; 65 536 keys when on]. [`LOCATION_CACHE_ENV`] overrides it.
    pub location_cache: LocationCache,
    /// Find keys in the master's location index when the master runs on this host, instead
    /// of asking it (docs/semantics.md, "Same-host lookups") [true]. Needs `rpc.same_host`
    /// (off with the `tcp` transport).
    pub master_index: bool,
}

/// A client's cache of where keys live, so that a get of a key read recently goes straight
/// to its storage node in one round trip instead of asking the master first. An entry lives
/// no longer than the read lease its lookup took (less a quarter of it, kept for the read
/// itself), and the node checks every read from it against the replica it expects, so a
/// stale entry costs a miss at the node and a lookup at the master, never wrong bytes
/// (docs/semantics.md, "Hot reads").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocationCache {
    /// Use the cache [false: off until it pays for itself on cold reads, see
    /// docs/semantics.md "Hot reads"]. Off, every get asks the master.
    pub enabled: bool,
    /// Keys whose location is kept, at most [65 536]; the least recently used go first.
    pub max_entries: u64,
}

impl Default for LocationCache {
    fn default() -> Self {
        LocationCache {
            enabled: false,
            max_entries: 65_536,
        }
    }
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
            etcd: Vec::new(),
            cluster: "default".into(),
            token: None,
            tenant: None,
            transport: TransportMode::Auto,
            location_cache: LocationCache::default(),
            master_index: true,
        }
    }
}

impl ClientConfig {
    /// Checks what the types cannot: a tenant name must not contain 0x00 (the separator).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.tenant {
            if t.as_bytes().contains(&0) {
                return Err(format!(
                    "tenant {t:?} contains a 0x00 byte, which separates tenant and key"
                ));
            }
        }
        Ok(())
    }

    /// The transport after the environment's override: `Err` names a value that is not a
    /// transport.
    pub fn effective_transport(&self) -> Result<TransportMode, String> {
        match std::env::var(TRANSPORT_ENV) {
            Ok(v) if !v.trim().is_empty() => v.parse().map_err(|e| format!("{TRANSPORT_ENV}: {e}")),
            _ => Ok(self.transport),
        }
    }

    /// The location cache after the environment's override: `Err` names a value that is
    /// neither on nor off.
    pub fn effective_location_cache(&self) -> Result<LocationCache, String> {
        let env = std::env::var(LOCATION_CACHE_ENV).unwrap_or_default();
        let enabled = switch(&env)
            .map_err(|e| format!("{LOCATION_CACHE_ENV}: {e}"))?
            .unwrap_or(self.location_cache.enabled);
        Ok(LocationCache {
            enabled,
            ..self.location_cache
        })
    }

    pub fn with_master(master: impl Into<String>) -> Self {
        ClientConfig {
            master: master.into(),
            ..Default::default()
        }
    }
}

/// An on/off setting from the environment: `None` when empty (unset).
fn switch(v: &str) -> Result<Option<bool>, String> {
    match v.trim() {
        "" => Ok(None),
        "1" | "true" | "on" => Ok(Some(true)),
        "0" | "false" | "off" => Ok(Some(false)),
        other => Err(format!(
            "{other:?} is not on or off (1, true, on / 0, false, off)"
        )),
    }
}

#[cfg(test)]
mod switch_tests {
    use super::switch;

    #[test]
    fn switches_read_on_off_and_name_bad_values() {
        assert_eq!(switch(""), Ok(None));
        assert_eq!(switch(" on "), Ok(Some(true)));
        assert_eq!(switch("0"), Ok(Some(false)));
        assert!(switch("maybe").unwrap_err().contains("\"maybe\""));
    }
}
