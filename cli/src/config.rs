//! The one config file (TOML): `[master]`, `[store]` and `[client]` sections. Loading order:
//! defaults, then the file (`--config` / `KVPOOL_CONFIG`), then flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kvpool_master::config::MasterConfig;
use kvpool_proto::{ByteSize, HumanDuration, Token};
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
    /// etcd endpoints to find the leading master through (HA) [empty: use `master`];
    /// `--etcd` / `KVPOOL_ETCD` override it.
    pub etcd: Vec<String>,
    /// Cluster name whose leader to follow ["default"]; `--cluster` / `KVPOOL_CLUSTER`.
    pub cluster: String,
    /// File holding the cluster token (first line) [unset: no token].
    pub token_file: Option<PathBuf>,
    /// The tenant (namespace) the verbs' keys live in [unset: the shared namespace];
    /// `--tenant` / `KVPOOL_TENANT` override it.
    pub tenant: Option<String>,
    /// How storage nodes are reached: "auto" (shared memory on the same host, else TCP),
    /// "tcp" or "shm" ["auto"]; `KVPOOL_TRANSPORT` overrides it.
    pub transport: kvpool_client::TransportMode,
    /// The cluster token, once read; never in the file.
    #[serde(skip)]
    pub token: Option<Token>,
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
            etcd: c.etcd,
            cluster: c.cluster,
            token_file: None,
            tenant: None,
            transport: c.transport,
            token: None,
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
        c.etcd = self.etcd.clone();
        c.cluster = self.cluster.clone();
        c.token = self.token.clone();
        c.tenant = self.tenant.clone();
        c.transport = self.transport;
        c
    }
}

impl Config {
    /// Reads `path` if given (an absent path gives the defaults), then applies the
    /// `KVPOOL_<SECTION>_<KEY>` variables of the environment over it
    /// ([`crate::envcfg`]); flags apply later, over both.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                // Parsed as the config first, so the file's own errors name the file.
                let _: Config = toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
        };
        crate::envcfg::overlay(
            &mut table,
            &Config::key_types()?,
            std::env::vars(),
            crate::envcfg::check_table::<Config>,
        )?;
        Ok(toml::Value::Table(table).try_into()?)
    }

    /// Fills every section's token: `--token-file` first, then `KVPOOL_TOKEN` (both apply to
    /// all sections), then each section's own `token-file`. An empty `KVPOOL_TOKEN` counts as
    /// unset. Errors name the file, never the token.
    pub fn resolve_tokens(
        &mut self,
        flag_file: Option<&Path>,
        env_token: Option<&str>,
    ) -> anyhow::Result<()> {
        let given = match (flag_file, env_token.filter(|t| !t.trim().is_empty())) {
            (Some(p), _) => Some(
                kvpool_transport::auth::read_token_file(p)
                    .map_err(|e| anyhow::anyhow!("--token-file: {e}"))?,
            ),
            (None, Some(t)) => {
                Some(Token::from_file_text(t).map_err(|e| anyhow::anyhow!("KVPOOL_TOKEN: {e}"))?)
            }
            (None, None) => None,
        };
        if let Some(t) = given {
            self.master.token = Some(t.clone());
            self.store.token = Some(t.clone());
            self.client.token = Some(t);
        }
        self.master.load_token().map_err(anyhow::Error::msg)?;
        self.store.load_token().map_err(anyhow::Error::msg)?;
        if self.client.token.is_none() {
            if let Some(p) = &self.client.token_file {
                self.client.token = Some(
                    kvpool_transport::auth::read_token_file(p)
                        .map_err(|e| anyhow::anyhow!("client.token-file: {e}"))?,
                );
            }
        }
        Ok(())
    }

    /// Every key with its default value, whose types the environment's values are read as:
    /// the defaults, and the NVMe tier's keys, which the defaults leave out (the tier is off
    /// unless configured).
    fn key_types() -> anyhow::Result<toml::Table> {
        let mut t: toml::Table = toml::from_str(&Config::default_toml())?;
        let nvme = toml::Value::try_from(kvpool_store::nvme::NvmeConfig::default())?;
        if let Some(store) = t.get_mut("store").and_then(toml::Value::as_table_mut) {
            store.entry("nvme").or_insert(nvme);
        }
        Ok(t)
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
    fn nvme_numbers_from_the_environment_are_numbers() {
        let mut table = toml::Table::new();
        let vars = [
            ("KVPOOL_STORE_NVME_PATH", "/data/kv"),
            ("KVPOOL_STORE_NVME_QUEUE_DEPTH", "8"),
            ("KVPOOL_STORE_NVME_READ_PARTS", "2"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        crate::envcfg::overlay(
            &mut table,
            &Config::key_types().unwrap(),
            vars,
            crate::envcfg::check_table::<Config>,
        )
        .unwrap();
        let c: Config = toml::Value::Table(table).try_into().unwrap();
        let nvme = c.store.nvme.expect("the nvme section");
        assert_eq!((nvme.queue_depth, nvme.read_parts), (8, 2));
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
    fn tokens_resolve_flag_then_env_then_file() {
        let dir = std::env::temp_dir().join(format!("kvpool-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "from-flag\n").unwrap();
        std::fs::write(&b, "from-file\n").unwrap();
        let text = format!("[client]\ntoken-file = {:?}\n", b.display().to_string());
        let base: Config = toml::from_str(&text).unwrap();

        let mut c = base.clone();
        c.resolve_tokens(Some(&a), Some("from-env")).unwrap();
        assert!(c.client.token.as_ref().unwrap().matches(b"from-flag"));
        assert!(c.master.token.as_ref().unwrap().matches(b"from-flag"));
        let mut c = base.clone();
        c.resolve_tokens(None, Some("from-env")).unwrap();
        assert!(c.store.token.as_ref().unwrap().matches(b"from-env"));
        let mut c = base.clone();
        c.resolve_tokens(None, Some("")).unwrap();
        assert!(c.client.token.as_ref().unwrap().matches(b"from-file"));
        assert!(c.master.token.is_none());
        let mut c = base;
        let err = c
            .resolve_tokens(Some(&dir.join("missing")), None)
            .unwrap_err();
        assert!(err.to_string().contains("token file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[master]\nlisten-on = \"x\"").is_err());
    }
}
