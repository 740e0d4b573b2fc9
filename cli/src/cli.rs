//! Command-line arguments. Flags override the config file, which overrides the defaults.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use kvpool_proto::ByteSize;

use crate::{admin, config::Config, serve, top, verbs};

#[derive(Debug, Parser)]
#[command(
    name = "kvpool",
    version,
    about = "A multi-level KV-cache pool for LLM inference"
)]
pub struct Cli {
    /// Config file (TOML); see `kvpool config`.
    #[arg(long, global = true, env = "KVPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output (-v info, -vv debug); KVPOOL_LOG takes a full filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log lines as text (colours only on a terminal) or JSON, one object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "KVPOOL_LOG_FORMAT"
    )]
    pub log_format: crate::logs::LogFormat,
    /// File holding the cluster token (first line). KVPOOL_TOKEN gives the token itself.
    /// Servers require it of every connection; clients present it.
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn log_level(&self) -> &'static str {
        match (&self.command, self.verbose) {
            (_, 2..) => "debug",
            (_, 1) => "info",
            (Command::Up(_) | Command::Master(_) | Command::Store(_) | Command::Proxy(_), 0) => {
                "info"
            }
            _ => "warn",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Master and one storage node in one process: a ready pool on one box.
    Up(UpArgs),
    /// The metadata master.
    Master(MasterArgs),
    /// A storage node contributing DRAM to the pool.
    Store(StoreArgs),
    /// Put a value from a file or standard input.
    Put(PutArgs),
    /// Get a value to a file or standard output.
    Get(GetArgs),
    /// Remove a key.
    Rm(RmArgs),
    /// Whether a key is in the pool: exit 0 if it is, 1 if not.
    Exists(KeyArgs),
    /// Nodes, segments, capacity, use and object count.
    Status(StatusArgs),
    /// Drain a storage node (by id or name): it takes no new data and its replicas are
    /// released; shows progress until it is empty.
    Drain(DrainArgs),
    /// Storage nodes: state, heartbeat age, DRAM and NVMe use, objects.
    Nodes(ListArgs),
    /// Segments of every node: tier, state, capacity, use, objects.
    Segments(ListArgs),
    /// Committed keys, in byte order.
    Keys(KeysArgs),
    /// A key's object: replicas and their tier, size, checksum, lease, pins, reads.
    Inspect(InspectArgs),
    /// A live view: throughput, hit ratio, tier use and node health, refreshed every
    /// second (q quits).
    Top(TopArgs),
    /// Print the default config file, every key with its default.
    Config,
    /// A P/D router (OpenAI completions, chat completions, models; streaming): prefill on a
    /// kv_producer engine, then decode on a kv_consumer engine with the hand-off parameters;
    /// the KV moves through the pool. See docs/proxy.md.
    Proxy(ProxyArgs),
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address to serve the OpenAI API on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// A prefill engine's base URL (`http://host:port`); repeat for several. None: requests
    /// go straight to the decoders.
    #[arg(long = "prefill")]
    pub prefill: Vec<String>,
    /// A decode engine's base URL; repeat for several.
    #[arg(long = "decode", required = true)]
    pub decode: Vec<String>,
    /// How often each engine's /health is polled.
    #[arg(long, default_value = "2s")]
    pub health_interval: kvpool_proto::HumanDuration,
    /// Limit for one engine request.
    #[arg(long, default_value = "600s")]
    pub request_timeout: kvpool_proto::HumanDuration,
    /// Prompt tokens that pick the prefiller (requests sharing them go to the same one).
    #[arg(long, default_value_t = 256)]
    pub affinity_tokens: usize,
    /// The pool master's RPC address: the prefiller is then the one whose host holds the
    /// longest prefix of the prompt (affinity when nothing is stored or the master is down).
    #[arg(long)]
    pub master: Option<String>,
    /// The engines' block-key namespace as JSON (`{"model", "kv_dtype", "layout",
    /// "block_size", "tp_size", "pp_size"}`): with --master, the proxy hashes the prompt's
    /// block keys itself (tokens from the prefiller's /tokenize), for engines without
    /// /kvpool/block_keys such as vLLM.
    #[arg(long, requires = "master")]
    pub prefix_namespace: Option<String>,
    /// HTTP address for the proxy's /metrics, /health and /ready (ready: a healthy decoder
    /// and, when any is given, a healthy prefiller) [127.0.0.1:9005]; empty: none.
    #[arg(long, env = "KVPOOL_HTTP", value_name = "ADDR", default_value = kvpool_proxy::DEFAULT_HTTP)]
    pub http: String,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Master RPC address [127.0.0.1:50051].
    #[arg(long)]
    pub listen: Option<String>,
    /// Storage node data address [127.0.0.1:50052].
    #[arg(long)]
    pub data_listen: Option<String>,
    /// HTTP address for /metrics, /health and /ready [127.0.0.1:9003, the master's and the node's metrics together]; empty: none.
    #[arg(long, env = "KVPOOL_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    #[command(flatten)]
    pub tiers: TierArgs,
}

/// The memory a storage node contributes: shared by `kvpool up` and `kvpool store`.
#[derive(Debug, Args)]
pub struct TierArgs {
    /// DRAM the node contributes, e.g. 256MiB, 4GiB.
    #[arg(long)]
    pub dram: Option<ByteSize>,
    /// Back DRAM with huge pages when available.
    #[arg(long)]
    pub huge_pages: bool,
    /// A file or block device for the NVMe tier (second tier under DRAM).
    #[arg(long)]
    pub nvme: Option<PathBuf>,
    /// Size of the NVMe tier, e.g. 64GiB (required for a file).
    #[arg(long)]
    pub nvme_size: Option<ByteSize>,
}

#[derive(Debug, Args)]
pub struct MasterArgs {
    /// RPC address [127.0.0.1:50051].
    #[arg(long)]
    pub listen: Option<String>,
    /// HTTP address for /metrics, /health and /ready [127.0.0.1:9003]; empty: none.
    #[arg(long, env = "KVPOOL_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// etcd endpoints (comma-separated, e.g. http://10.0.0.1:2379): campaign for leadership
    /// with the other masters of the cluster (HA). Without them this is the only master.
    #[arg(long, env = "KVPOOL_ETCD", value_delimiter = ',', value_name = "URLS")]
    pub etcd: Vec<String>,
    /// Cluster name in etcd [default].
    #[arg(long, env = "KVPOOL_CLUSTER")]
    pub cluster: Option<String>,
    /// Address published in etcd for clients and nodes [the listen address].
    #[arg(long)]
    pub advertise: Option<String>,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub leader: LeaderArgs,
    /// Data address [127.0.0.1:50052].
    #[arg(long)]
    pub listen: Option<String>,
    /// HTTP address for /metrics, /health and /ready [127.0.0.1:9004]; empty: none.
    #[arg(long, env = "KVPOOL_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// Address clients should use for this node, if not the listen address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Name shown in `kvpool status`.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub tiers: TierArgs,
}

/// How a node or a client finds the master: an address, or etcd (HA).
#[derive(Debug, Args)]
pub struct LeaderArgs {
    /// The master's RPC address [127.0.0.1:50051].
    #[arg(long, env = "KVPOOL_MASTER")]
    pub master: Option<String>,
    /// etcd endpoints (comma-separated, e.g. http://10.0.0.1:2379) to find the leading
    /// master through (HA); overrides --master.
    #[arg(long, env = "KVPOOL_ETCD", value_delimiter = ',', value_name = "URLS")]
    pub etcd: Vec<String>,
    /// Cluster name in etcd [default].
    #[arg(long, env = "KVPOOL_CLUSTER")]
    pub cluster: Option<String>,
}

#[derive(Debug, Args)]
pub struct MasterAddr {
    #[command(flatten)]
    pub leader: LeaderArgs,
    /// The tenant (namespace) whose keys this command sees.
    #[arg(long, env = "KVPOOL_TENANT")]
    pub tenant: Option<String>,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    pub key: String,
    /// File to read the value from; `-` or nothing reads standard input.
    pub file: Option<PathBuf>,
    /// Replicas on distinct nodes.
    #[arg(long, default_value_t = 1)]
    pub replicas: u8,
    /// Replace an existing value.
    #[arg(long)]
    pub overwrite: bool,
    /// Keep out of the first eviction pass for the soft-pin TTL.
    #[arg(long)]
    pub soft_pin: bool,
    /// Never evict.
    #[arg(long)]
    pub hard_pin: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    pub key: String,
    /// Write the value here instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    /// The key to remove (or give --prefix).
    #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
    pub key: Option<String>,
    /// Remove every key that starts with this instead.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Remove even if leased or hard-pinned.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `--json`: one JSON document on standard output instead of text for people.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    /// Only keys that start with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Print at most this many keys.
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    /// The master's HTTP address, for rates and the hit ratio (its /metrics).
    #[arg(long, default_value = "127.0.0.1:9003", value_name = "ADDR")]
    pub metrics: String,
    /// Time between refreshes.
    #[arg(long, default_value = "1s")]
    pub interval: kvpool_proto::HumanDuration,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    pub key: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    pub key: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    /// Print JSON-like machine output (one `key=value` line per figure) instead of a table.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub addr: MasterAddr,
    /// The node's id (as `kvpool status` prints it) or its name.
    pub node: String,
    /// Take the node back into placement instead.
    #[arg(long)]
    pub cancel: bool,
    /// Start the drain and return without waiting for it to finish.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (leased objects wait for their lease).
    #[arg(long, default_value = "10m")]
    pub timeout: kvpool_proto::HumanDuration,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    let env_token = std::env::var("KVPOOL_TOKEN").ok();
    cfg.resolve_tokens(cli.token_file.as_deref(), env_token.as_deref())?;
    match cli.command {
        Command::Up(a) => serve::up(cfg, a).await,
        Command::Master(a) => serve::master(cfg, a).await,
        Command::Store(a) => serve::store(cfg, a).await,
        Command::Put(a) => verbs::put(cfg, a).await,
        Command::Get(a) => verbs::get(cfg, a).await,
        Command::Rm(a) => verbs::rm(cfg, a).await,
        Command::Exists(a) => verbs::exists(cfg, a).await,
        Command::Status(a) => verbs::status(cfg, a).await,
        Command::Drain(a) => verbs::drain(cfg, a).await,
        Command::Nodes(a) => admin::nodes(&verbs::client(&cfg, &a.addr)?, a.out.json).await,
        Command::Segments(a) => admin::segments(&verbs::client(&cfg, &a.addr)?, a.out.json).await,
        Command::Keys(a) => {
            let c = verbs::client(&cfg, &a.addr)?;
            admin::keys(&c, &a.prefix, a.limit, a.out.json).await
        }
        Command::Top(a) => {
            let c = verbs::client(&cfg, &a.addr)?;
            let master = c.config().master.clone();
            let every = a.interval.0.max(std::time::Duration::from_millis(100));
            top::top(&c, master, &a.metrics, every).await
        }
        Command::Inspect(a) => {
            admin::inspect(&verbs::client(&cfg, &a.addr)?, &a.key, a.out.json).await
        }
        Command::Proxy(a) => serve::proxy(cfg, a).await,
        Command::Config => {
            print!("{}", Config::default_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}
