//! The master's configuration file section (`[master]` in kvpool.toml).

use kvpool_proto::{ByteSize, HumanDuration};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::core::{Admission, CoreConfig};

/// The master's HTTP address (metrics and probes) by default: loopback, port 9003.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9003";

/// Every key has a default (Mooncake's where one exists); the file overrides the defaults and
/// flags override the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MasterConfig {
    /// RPC listen address ["127.0.0.1:50051"].
    pub listen: String,
    /// Also serve on a Unix socket (`kvpool-master-<pid>-<port>.sock` in `$XDG_RUNTIME_DIR`
    /// or the temporary folder), which same-host clients use instead of loopback TCP [true].
    pub unix_socket: bool,
    /// Publish where each object is in shared memory (`kvpool-master-<pid>-<port>.index` in
    /// `/dev/shm`), so that clients on this host find keys without asking [true]. Needs
    /// `unix-socket`.
    pub location_index: bool,
    /// Slots of the location index (a power of two, 1024 to 16 Mi; 72 bytes each): it holds
    /// up to three quarters as many objects, and gets of the others ask the master [262144].
    pub location_index_slots: u64,
    /// HTTP address of `/metrics`, `/health` and `/ready` ["127.0.0.1:9003"]; empty: none.
    /// Served by whoever runs the master (the CLI), like the RPC listener.
    pub http: String,
    /// Read lease granted by a lookup ["10s"].
    pub lease_ttl: HumanDuration,
    /// Soft-pin lifetime ["30m"].
    pub soft_pin_ttl: HumanDuration,
    /// After this, a new put of the key may preempt an unfinished put ["30s"].
    pub put_discard_timeout: HumanDuration,
    /// After this, the space of an unfinished put is freed ["10m"].
    pub put_release_timeout: HumanDuration,
    /// A node silent this long is dead ["10s"].
    pub node_ttl: HumanDuration,
    /// How often nodes heartbeat ["1s"].
    pub heartbeat_interval: HumanDuration,
    /// Segment use above which eviction starts [0.90].
    pub high_watermark: f64,
    /// Share of a segment freed by one eviction round [0.05].
    pub eviction_ratio: f64,
    /// Soft-pinned objects may go in a second eviction pass [true].
    pub allow_evict_soft_pinned: bool,
    /// Largest value accepted ["1GiB"].
    pub max_value: ByteSize,
    /// How often the master runs liveness, zombie-put and eviction checks ["20ms"].
    pub tick: HumanDuration,
    /// NVMe segment use above which eviction starts [0.90].
    pub nvme_high_watermark: f64,
    /// NVMe segment use an eviction round brings it down to [0.80].
    pub nvme_low_watermark: f64,
    /// What goes to NVMe: "write-through" (every object, at commit), "always" (every DRAM
    /// eviction victim) or "after-read" (victims read at least once since their put)
    /// ["write-through"].
    pub nvme_admission: Admission,
    /// NVMe-only reads after which an object is promoted back to DRAM [2]; 0: never (reads
    /// move nothing, and clients may then cache NVMe locations).
    pub promote_after_hits: u32,
    /// A demotion or promotion copy not reported done within this fails ["60s"].
    pub task_timeout: HumanDuration,
    /// How long a removed key stays fenced, so that a node registering with an old replica of
    /// it (back after being declared dead, restarted on its NVMe tier) cannot bring it back;
    /// under HA the fences are kept in etcd for as long ["1h"].
    pub remove_fence_ttl: HumanDuration,
    /// etcd endpoints for high availability, e.g. ["http://10.0.0.1:2379"] [empty: a single
    /// master, no election]. With them the master campaigns for leadership and answers
    /// `NotLeader` while a standby.
    pub etcd: Vec<String>,
    /// Cluster name: the leader key is `/kvpool/<cluster>/leader` ["default"].
    pub cluster: String,
    /// TTL of the leader's etcd lease; a dead leader is replaced within about this ["5s"].
    pub leader_ttl: HumanDuration,
    /// Address published in etcd for clients and nodes to dial [unset: the listen address;
    /// required when listening on a wildcard address].
    pub advertise: Option<String>,
    /// File holding the cluster token (first line) [unset: no token, every peer served].
    pub token_file: Option<std::path::PathBuf>,
    /// The cluster token itself, once read (from `token_file`, `--token-file` or
    /// `KVPOOL_TOKEN`); never in the file, and its `Debug` is redacted.
    #[serde(skip)]
    pub token: Option<kvpool_proto::Token>,
}

impl Default for MasterConfig {
    fn default() -> Self {
        let core = CoreConfig::default();
        MasterConfig {
            listen: "127.0.0.1:50051".into(),
            unix_socket: true,
            location_index: true,
            location_index_slots: 1 << 18,
            http: DEFAULT_HTTP.into(),
            lease_ttl: HumanDuration(core.lease_ttl),
            soft_pin_ttl: HumanDuration(core.soft_pin_ttl),
            put_discard_timeout: HumanDuration(core.put_discard_timeout),
            put_release_timeout: HumanDuration(core.put_release_timeout),
            node_ttl: HumanDuration(core.node_ttl),
            heartbeat_interval: HumanDuration(core.heartbeat_interval),
            high_watermark: core.high_watermark,
            eviction_ratio: core.eviction_ratio,
            allow_evict_soft_pinned: core.allow_evict_soft_pinned,
            max_value: ByteSize(core.max_value_len),
            tick: HumanDuration(Duration::from_millis(20)),
            nvme_high_watermark: core.nvme_high_watermark,
            nvme_low_watermark: core.nvme_low_watermark,
            nvme_admission: core.nvme_admission,
            promote_after_hits: core.promote_after_hits,
            task_timeout: HumanDuration(core.task_timeout),
            remove_fence_ttl: HumanDuration(core.remove_fence_ttl),
            etcd: Vec::new(),
            cluster: "default".into(),
            leader_ttl: HumanDuration(Duration::from_secs(5)),
            advertise: None,
            token_file: None,
            token: None,
        }
    }
}

impl MasterConfig {
    /// Refuses impossible settings with a message that names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.high_watermark) || self.high_watermark == 0.0 {
            return Err(format!(
                "master.high-watermark must be in (0, 1], got {}",
                self.high_watermark
            ));
        }
        if !(0.0..=1.0).contains(&self.eviction_ratio) || self.eviction_ratio == 0.0 {
            return Err(format!(
                "master.eviction-ratio must be in (0, 1], got {}",
                self.eviction_ratio
            ));
        }
        if self.node_ttl.0 <= self.heartbeat_interval.0 {
            return Err("master.node-ttl must be longer than master.heartbeat-interval".into());
        }
        if self.max_value.0 == 0 {
            return Err("master.max-value must be at least 1 byte".into());
        }
        let slots = self.location_index_slots;
        if !kvpool_transport::shm::index::valid_slots(slots) {
            let (lo, hi) = (
                kvpool_transport::shm::index::MIN_SLOTS,
                kvpool_transport::shm::index::MAX_SLOTS,
            );
            return Err(format!(
                "master.location-index-slots must be a power of two from {lo} to {hi}, got {slots}"
            ));
        }
        if self.tick.0.is_zero() {
            return Err("master.tick must be positive".into());
        }
        for (name, v) in [
            ("nvme-high-watermark", self.nvme_high_watermark),
            ("nvme-low-watermark", self.nvme_low_watermark),
        ] {
            if !(0.0..=1.0).contains(&v) || v == 0.0 {
                return Err(format!("master.{name} must be in (0, 1], got {v}"));
            }
        }
        if self.nvme_low_watermark > self.nvme_high_watermark {
            return Err(format!(
                "master.nvme-low-watermark ({}) must not exceed master.nvme-high-watermark ({})",
                self.nvme_low_watermark, self.nvme_high_watermark
            ));
        }
        if self.task_timeout.0.is_zero() {
            return Err("master.task-timeout must be positive".into());
        }
        if self.remove_fence_ttl.0.is_zero() {
            return Err("master.remove-fence-ttl must be positive".into());
        }
        if self.leader_ttl.0 < Duration::from_secs(2) {
            // etcd grants whole seconds, and the leader steps down 30 % early: shorter TTLs
            // leave no room for a renewal round trip.
            return Err("master.leader-ttl must be at least 2s".into());
        }
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err("master.cluster must be a non-empty name without '/'".into());
        }
        // A malformed address is a typo, not an outage: refuse it now rather than retry it
        // forever. Only well-formed but unreachable endpoints are retried.
        for e in &self.etcd {
            kvpool_ha::check_etcd_endpoint(e).map_err(|e| format!("master.etcd: {e}"))?;
        }
        if let Some(a) = &self.advertise {
            kvpool_ha::check_host_port(a).map_err(|e| format!("master.advertise: {e}"))?;
        }
        Ok(())
    }

    /// Reads `token_file` into `token` unless a token is already set (flags and the
    /// environment win over the file).
    pub fn load_token(&mut self) -> Result<(), String> {
        if self.token.is_none() {
            if let Some(p) = &self.token_file {
                self.token = Some(
                    kvpool_transport::auth::read_token_file(p)
                        .map_err(|e| format!("master.token-file: {e}"))?,
                );
            }
        }
        Ok(())
    }

    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            lease_ttl: self.lease_ttl.0,
            soft_pin_ttl: self.soft_pin_ttl.0,
            put_discard_timeout: self.put_discard_timeout.0,
            put_release_timeout: self.put_release_timeout.0,
            node_ttl: self.node_ttl.0,
            heartbeat_interval: self.heartbeat_interval.0,
            high_watermark: self.high_watermark,
            eviction_ratio: self.eviction_ratio,
            allow_evict_soft_pinned: self.allow_evict_soft_pinned,
            max_value_len: self.max_value.0,
            nvme_high_watermark: self.nvme_high_watermark,
            nvme_low_watermark: self.nvme_low_watermark,
            nvme_admission: self.nvme_admission,
            promote_after_hits: self.promote_after_hits,
            task_timeout: self.task_timeout.0,
            remove_fence_ttl: self.remove_fence_ttl.0,
            ..CoreConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::IntoDeserializer;

    #[test]
    fn tier_keys_default_validate_and_reach_the_core() {
        let c = MasterConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.core(), CoreConfig::default());
        let tuned = MasterConfig {
            nvme_high_watermark: 0.95,
            nvme_low_watermark: 0.5,
            nvme_admission: Admission::Always,
            promote_after_hits: 3,
            task_timeout: HumanDuration(Duration::from_secs(5)),
            ..MasterConfig::default()
        };
        let core = tuned.core();
        assert_eq!(
            (core.nvme_high_watermark, core.nvme_low_watermark),
            (0.95, 0.5)
        );
        assert_eq!(core.nvme_admission, Admission::Always);
        assert_eq!(core.promote_after_hits, 3);
        assert_eq!(core.task_timeout, Duration::from_secs(5));
    }

    #[test]
    fn impossible_tier_settings_are_refused_by_name() {
        let bad = [
            MasterConfig {
                nvme_high_watermark: 0.0,
                ..MasterConfig::default()
            },
            MasterConfig {
                nvme_low_watermark: 1.5,
                ..MasterConfig::default()
            },
            MasterConfig {
                nvme_high_watermark: 0.7,
                nvme_low_watermark: 0.8,
                ..MasterConfig::default()
            },
            MasterConfig {
                task_timeout: HumanDuration(Duration::ZERO),
                ..MasterConfig::default()
            },
        ];
        let keys = [
            "nvme-high-watermark",
            "nvme-low-watermark",
            "nvme-low-watermark",
            "task-timeout",
        ];
        for (c, key) in bad.iter().zip(keys) {
            let e = c.validate().expect_err(key);
            assert!(e.contains(&format!("master.{key}")), "{e}");
        }
    }

    #[test]
    fn malformed_addresses_are_refused_by_key_and_value() {
        let c = MasterConfig {
            etcd: vec!["http://127.0.0.1:2379".into(), "::bad::".into()],
            ..MasterConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(
            e.starts_with("master.etcd:") && e.contains("\"::bad::\""),
            "{e}"
        );
        let c = MasterConfig {
            advertise: Some("10.0.0.1".into()),
            ..MasterConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(
            e.starts_with("master.advertise:") && e.contains("\"10.0.0.1\""),
            "{e}"
        );
        let ok = MasterConfig {
            etcd: vec!["10.0.0.1:2379".into(), "http://etcd-1:2379/".into()],
            advertise: Some("[::1]:50051".into()),
            ..MasterConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn admission_is_spelled_in_kebab_case() {
        let parse = |s: &'static str| {
            let d: StrDeserializer<'_, Error> = s.into_deserializer();
            Admission::deserialize(d)
        };
        assert_eq!(parse("always").ok(), Some(Admission::Always));
        assert_eq!(parse("after-read").ok(), Some(Admission::AfterRead));
        assert_eq!(parse("write-through").ok(), Some(Admission::WriteThrough));
        assert!(parse("AfterRead").is_err());
    }
}
