//! The one config file (TOML): `[master]`, `[store]` and `[client]` sections. Loading order:
//! defaults, then the file (`--config` / `KVPOOL_CONFIG`), then flags.

use std::path::Path;

use anyhow::Context;
use kvpool_master::config::MasterConfig;
use kvpool_proto::{ByteSize, HumanDuration};
use kvpool_store::config::StoreConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub master: MasterConfig,
    pub store: StoreConfig,
    pub client: ClientSection,
}

/// How CLI verbs (and library users that read this file) reach the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientSection {
    /// Master RPC address ["127.0.0.1:50051"]; `--master` / `KVPOOL_MASTER` override it.
    pub master: String,
    /// Verify every get against the writer's crc32c [true].
    pub verify_checksum: bool,
    /// TCP connections used at once per storage node [4].
    pub conns_per_peer: usize,
    /// Large values are striped over connections in chunks of this size ["4MiB"].
    pub stripe_size: ByteSize,
    /// How long an operation retries transient failures ["30s"].
    pub deadline: HumanDuration,
}

impl Default for ClientSection {
    fn default() -> Self {
        let c = kvpool_client::ClientConfig::default();
        ClientSection {
            master: c.master,
            verify_checksum: c.verify_checksum,
            conns_per_peer: c.engine.conns_per_peer,
            stripe_size: ByteSize(c.engine.stripe_size),
            deadline: HumanDuration(c.deadline),
        }
    }
}

impl ClientSection {
    pub fn to_client_config(&self, master: Option<&str>) -> kvpool_client::ClientConfig {
        let mut c = kvpool_client::ClientConfig::with_master(master.unwrap_or(&self.master));
        c.verify_checksum = self.verify_checksum;
        c.engine.conns_per_peer = self.conns_per_peer.max(1);
        c.engine.stripe_size = self.stripe_size.0.max(4096);
        c.deadline = self.deadline.0;
        c
    }
}

impl Config {
    /// Reads `path` if given; an absent path gives the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let cfg: Config = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        Ok(cfg)
    }

    /// The defaults as a TOML file, every key present.
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Config::default()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_round_trips() {
        let text = Config::default_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, Config::default());
        assert!(text.contains("[master]") && text.contains("[store]") && text.contains("[client]"));
    }

    #[test]
    fn docs_document_every_key() {
        let doc = include_str!("../../docs/configuration.md");
        let value: toml::Value = toml::from_str(&Config::default_toml()).unwrap();
        for (section, table) in value.as_table().unwrap() {
            for key in table.as_table().unwrap().keys() {
                assert!(
                    doc.contains(&format!("`{section}.{key}`")),
                    "docs/configuration.md lacks `{section}.{key}`"
                );
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[master]\nlisten-on = \"x\"").is_err());
    }
}
