//! The storage node's configuration (the `[store]` part of a kvpool config file).

use kvpool_proto::ByteSize;
use serde::{Deserialize, Serialize};

/// Default data-plane port of a storage node.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50052";
/// Default master RPC address (docs/design.md, names and defaults).
pub const DEFAULT_MASTER: &str = "127.0.0.1:50051";
/// The node's HTTP address (metrics and probes) by default: loopback, port 9004.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9004";

/// How a storage node runs. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// Data-plane address to listen on ["127.0.0.1:50052"]. Port 0 picks a free port. Used by
    /// whoever binds the listener (the CLI); [`crate::run`] takes the bound listener.
    pub listen: String,
    /// HTTP address of `/metrics`, `/health` and `/ready` ["127.0.0.1:9004"]; empty: none.
    pub http: String,
    /// Address the master hands to clients for this node [unset: the listener's address, or,
    /// when it listens on an unspecified IP (0.0.0.0, ::), the local IP that routes to the
    /// master]. Set it behind NAT or in containers.
    pub advertise: Option<String>,
    /// The master's RPC address ["127.0.0.1:50051"].
    pub master: String,
    /// Size of the DRAM segment this node contributes [256MiB].
    pub dram: ByteSize,
    /// Back the segment with 2 MiB huge pages [false]: hugetlb pages if the pool
    /// (`vm.nr_hugepages`) has enough, else transparent huge pages, else base pages.
    pub huge_pages: bool,
    /// Name shown in `kvpool status` and logs [unset: the host name].
    pub name: Option<String>,
    /// etcd endpoints to find the leading master through (HA), e.g. ["http://10.0.0.1:2379"]
    /// [empty: use `master`]. The node follows a new leader without a restart.
    pub etcd: Vec<String>,
    /// Cluster name whose leader to follow when `etcd` is set ["default"].
    pub cluster: String,
    /// File holding the cluster token (first line) [unset: no token]. The node presents it
    /// to the master and requires it of every client of its data server.
    pub token_file: Option<std::path::PathBuf>,
    /// The cluster token itself, once read (from `token_file`, `--token-file` or
    /// `KVPOOL_TOKEN`); never in the file, and its `Debug` is redacted.
    #[serde(skip)]
    pub token: Option<kvpool_proto::Token>,
    /// The NVMe tier (`[store.nvme]`) [unset: DRAM only].
    pub nvme: Option<crate::nvme::NvmeConfig>,
    /// Share the DRAM segments with clients on this host [true]: they map the segment memory
    /// (handed over `shm-socket` after the token check) and copy in and out directly instead
    /// of going through TCP.
    pub shm: bool,
    /// The Unix socket same-host clients attach through [unset: `$XDG_RUNTIME_DIR`, else the
    /// temporary directory, `kvpool-store-<pid>-<port>.sock`]. Removed when the node stops.
    pub shm_socket: Option<std::path::PathBuf>,
    /// Stream read answers to clients that ask for it [true]: each op's bytes go out as soon
    /// as it and the ops before it are read, instead of after the whole request (matters for
    /// the NVMe tier). `false` answers every read in the plain layout.
    pub stream_reads: bool,
    /// Publish which replicas the node holds in a read-only memory file for same-host
    /// clients [true] (`transport::shm::board`): a get from a client's cached location is then
    /// checked with two memory loads instead of a round trip to the node. `false`: such gets
    /// are checked over the socket, so clients send them through the master instead.
    pub replica_board: bool,
    /// Hand same-host clients a read-only O_DIRECT descriptor of the NVMe tier's file [true]
    /// (`transport::shm::DiskFile`): they read NVMe-resident values straight off the disk and
    /// check each record's header as the node does. `false`: such gets go through the node.
    pub share_nvme: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            listen: DEFAULT_LISTEN.to_string(),
            http: DEFAULT_HTTP.to_string(),
            advertise: None,
            master: DEFAULT_MASTER.to_string(),
            dram: ByteSize::mib(256),
            huge_pages: false,
            name: None,
            etcd: Vec::new(),
            cluster: "default".into(),
            token_file: None,
            token: None,
            nvme: None,
            shm: true,
            shm_socket: None,
            stream_reads: true,
            replica_board: true,
            share_nvme: true,
        }
    }
}

impl StoreConfig {
    /// Reads `token_file` into `token` unless a token is already set (flags and the
    /// environment win over the file).
    pub fn load_token(&mut self) -> Result<(), String> {
        if self.token.is_none() {
            if let Some(p) = &self.token_file {
                self.token = Some(
                    kvpool_transport::auth::read_token_file(p)
                        .map_err(|e| format!("store.token-file: {e}"))?,
                );
            }
        }
        Ok(())
    }

    /// Checks what serde cannot: a segment must hold at least one page.
    pub fn validate(&self) -> Result<(), String> {
        if self.dram.0 < 4096 {
            return Err(format!("dram = {} is too small (at least 4KiB)", self.dram));
        }
        if usize::try_from(self.dram.0).is_err() {
            return Err(format!(
                "dram = {} does not fit this machine's address space",
                self.dram
            ));
        }
        if self.master.is_empty() {
            return Err("master address is empty".into());
        }
        // A typo is refused now; only a well-formed but unreachable etcd is retried.
        for e in &self.etcd {
            kvpool_ha::check_etcd_endpoint(e).map_err(|e| format!("store.etcd: {e}"))?;
        }
        if let Some(n) = &self.nvme {
            n.validate().map_err(|e| format!("store.nvme: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c: StoreConfig = toml::from_str("").unwrap();
        assert_eq!(c, StoreConfig::default());
        assert_eq!(c.dram, ByteSize(256 << 20));
        assert_eq!(c.listen, "127.0.0.1:50052");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn reads_kebab_case_and_human_sizes() {
        let c: StoreConfig = toml::from_str(
            "listen = \"0.0.0.0:7000\"\nadvertise = \"10.0.0.5:7000\"\nmaster = \"m:1\"\n\
             dram = \"4GiB\"\nhuge-pages = true\nname = \"n1\"\n",
        )
        .unwrap();
        assert_eq!(c.dram, ByteSize(4 << 30));
        assert!(c.huge_pages);
        assert_eq!(c.advertise.as_deref(), Some("10.0.0.5:7000"));
        assert_eq!(c.name.as_deref(), Some("n1"));
    }

    #[test]
    fn refuses_unknown_fields_and_tiny_segments() {
        assert!(toml::from_str::<StoreConfig>("hugepages = true").is_err());
        let c: StoreConfig = toml::from_str("dram = \"1KiB\"").unwrap();
        assert!(c.validate().is_err());
    }
}
