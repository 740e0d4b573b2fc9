//! Prefix-aware prefiller choice: which prefiller's host already holds the longest prefix of
//! this prompt, asked of the pool's master.
//!
//! 1. The prompt's block keys come from an engine (`POST /kvpool/block_keys` on the first
//!    prefiller in affinity order): the engine tokenizes and hashes in its own namespace, so
//!    the proxy needs no tokenizer, block size or namespace of its own. Or, given the engines'
//!    namespace ([`KeyNamespace`], for vLLM), the proxy hashes tokens itself: a token-id
//!    prompt as it is, text and chat through the prefiller's `POST /tokenize`.
//! 2. The master says where each key's replicas are (`Client::locate`, one batched
//!    `GetReplicas`; it grants a short read lease, as an engine's own lookup does, so the
//!    blocks found stay until the chosen prefiller's lookup follows).
//! 3. A prefiller's score is the number of leading blocks with a replica on a node whose data
//!    address has the prefiller URL's host. The highest score wins; ties and zero keep the
//!    affinity order.
//!
//! Any failure (an engine without the endpoint, such as vLLM today; the master unreachable)
//! keeps the affinity order; a master failure also turns placement off for [`BACKOFF`], so a
//! dead master costs one timeout, not one per request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvpool_client::{Client, ClientConfig, ObjectInfo};
use kvpool_connector::{BlockHasher, Namespace};
use serde::Deserialize;

/// The limit for each placement step (keys from the engine, then the master).
pub(crate) const LIMIT: Duration = Duration::from_secs(2);
/// How long placement stays off after the master failed to answer.
pub(crate) const BACKOFF: Duration = Duration::from_secs(5);

/// The engines' key namespace as the proxy is given it (`--prefix-namespace`, JSON): what
/// the engines' connector hashes block keys in, at TP rank 0 and PP rank 0 (whose blocks stand
/// for the whole prefix). `layout` is the full layout tag, grouping included (e.g.
/// `vllm-nhd/all`, `vllm-lbnhc/l4`): with a grouping other than `all` the first group's object
/// (`#g0`) stands for each block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyNamespace {
    pub model: String,
    pub kv_dtype: String,
    pub layout: String,
    pub block_size: u32,
    #[serde(default = "one")]
    pub tp_size: u32,
    #[serde(default = "one")]
    pub pp_size: u32,
}

fn one() -> u32 {
    1
}

impl KeyNamespace {
    pub fn parse(json: &str) -> anyhow::Result<Self> {
        let ns: KeyNamespace = serde_json::from_str(json).map_err(|e| {
            anyhow::anyhow!(
                "--prefix-namespace {json:?}: {e} (want {{\"model\", \"kv_dtype\", \"layout\", \"block_size\", \"tp_size\", \"pp_size\"}})"
            )
        })?;
        anyhow::ensure!(
            ns.block_size > 0,
            "--prefix-namespace: block_size must be > 0"
        );
        anyhow::ensure!(
            ns.layout.contains('/'),
            "--prefix-namespace: layout {:?} lacks its grouping (e.g. vllm-nhd/all)",
            ns.layout
        );
        Ok(ns)
    }

    /// The hasher, and the layer group whose object names a block in the pool.
    pub(crate) fn hasher(&self) -> (BlockHasher, Option<usize>) {
        let grouped = !self.layout.ends_with("/all");
        let ns = Namespace {
            model: self.model.clone(),
            kv_dtype: self.kv_dtype.clone(),
            layout: self.layout.clone(),
            block_size: self.block_size,
            tp_rank: 0,
            tp_size: self.tp_size,
            pp_rank: 0,
            pp_size: self.pp_size,
        };
        (BlockHasher::new(ns), grouped.then_some(0))
    }
}

pub(crate) struct Placement {
    client: Client,
    off_until: Mutex<Option<Instant>>,
    /// Set: the proxy hashes keys itself; unset: it asks the engine.
    pub(crate) hasher: Option<(BlockHasher, Option<usize>)>,
}

impl Placement {
    pub(crate) fn new(cfg: ClientConfig, ns: Option<&KeyNamespace>) -> Self {
        Placement {
            client: Client::new(cfg),
            off_until: Mutex::new(None),
            hasher: ns.map(KeyNamespace::hasher),
        }
    }

    /// The pool keys of the full blocks of `tokens`, hashed here.
    pub(crate) fn keys_of(&self, tokens: &[u32]) -> Option<Vec<String>> {
        let (h, group) = self.hasher.as_ref()?;
        Some(h.keys(tokens).iter().map(|k| k.wire(*group)).collect())
    }

    pub(crate) fn is_off(&self) -> bool {
        let off = self.off_until.lock().unwrap_or_else(|e| e.into_inner());
        off.is_some_and(|t| Instant::now() < t)
    }

    fn turn_off(&self) {
        *self.off_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + BACKOFF);
    }

    /// Where each of `keys` lives: `None` for a miss. `Err` when the master did not answer
    /// (placement then stays off for [`BACKOFF`]).
    pub(crate) async fn locate(&self, keys: &[String]) -> Result<Vec<Option<ObjectInfo>>, String> {
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let found = match tokio::time::timeout(LIMIT, self.client.locate(&refs)).await {
            Ok(r) => r,
            Err(_) => {
                self.turn_off();
                return Err(format!("the master did not answer within {LIMIT:?}"));
            }
        };
        let mut out = Vec::with_capacity(found.len());
        for r in found {
            match r {
                Ok(info) => out.push(info),
                // A key the master cannot answer for ends the usable prefix like a miss; a
                // master that cannot be reached at all fails every key.
                Err(e) if out.is_empty() => {
                    self.turn_off();
                    return Err(format!("asking the master: {e}"));
                }
                Err(_) => out.push(None),
            }
        }
        Ok(out)
    }
}

/// The host part of `http://host:port/...` (as written: no name resolution).
pub(crate) fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    host_of(authority)
}

/// The host of `host:port` (`[v6]:port` keeps its brackets, as nodes advertise it).
fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => h,
        _ => addr,
    }
}

/// How many leading blocks have a replica on `host`.
pub(crate) fn leading_on_host(found: &[Option<ObjectInfo>], host: &str) -> usize {
    found
        .iter()
        .take_while(|f| {
            f.as_ref()
                .is_some_and(|info| info.replicas.iter().any(|r| host_of(&r.addr) == host))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_client::{NodeId, ReplicaDesc, Tier};
    use kvpool_proto::{ReplicaId, SegmentId};

    fn at(hosts: &[&str]) -> Option<ObjectInfo> {
        Some(ObjectInfo {
            len: 1,
            checksum: 0,
            lease_ms: 0,
            replicas: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| ReplicaDesc {
                    id: ReplicaId(i as u64),
                    node: NodeId(i as u64),
                    addr: format!("{h}:5000").into(),
                    segment: SegmentId(0),
                    offset: 0,
                    len: 1,
                    tier: Tier::Dram,
                })
                .collect(),
        })
    }

    #[test]
    fn a_namespace_is_parsed_and_hashes_like_the_engines() {
        let ns = KeyNamespace::parse(
            r#"{"model": "m", "kv_dtype": "bf16", "layout": "vllm-nhd/all", "block_size": 4}"#,
        )
        .unwrap();
        assert_eq!((ns.tp_size, ns.pp_size), (1, 1));
        let (h, g) = ns.hasher();
        assert_eq!(g, None);
        let keys = h.keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(keys.len(), 2, "full blocks only");
        let engine = BlockHasher::new(Namespace {
            model: "m".into(),
            kv_dtype: "bf16".into(),
            layout: "vllm-nhd/all".into(),
            block_size: 4,
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        });
        assert_eq!(keys, engine.keys(&[1, 2, 3, 4, 5, 6, 7, 8]));
        let grouped = KeyNamespace::parse(
            r#"{"model": "m", "kv_dtype": "bf16", "layout": "vllm-nhd/l2", "block_size": 4}"#,
        )
        .unwrap();
        assert_eq!(grouped.hasher().1, Some(0));
        for bad in [
            r#"{"model": "m"}"#,
            r#"{"model": "m", "kv_dtype": "bf16", "layout": "nhd", "block_size": 4}"#,
            r#"{"model": "m", "kv_dtype": "bf16", "layout": "a/all", "block_size": 0}"#,
            r#"{"model": "m", "kv_dtype": "bf16", "layout": "a/all", "block_size": 4, "x": 1}"#,
        ] {
            assert!(KeyNamespace::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_from_urls_and_addresses() {
        assert_eq!(url_host("http://10.0.0.2:8100"), "10.0.0.2");
        assert_eq!(url_host("http://10.0.0.2:8100/v1"), "10.0.0.2");
        assert_eq!(url_host("http://gpu-3"), "gpu-3");
        assert_eq!(url_host("http://[::1]:8100"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
    }

    #[test]
    fn the_prefix_counts_only_up_to_its_first_hole_on_that_host() {
        let found = vec![
            at(&["10.0.0.1"]),
            at(&["10.0.0.2", "10.0.0.1"]),
            at(&["10.0.0.2"]),
            None,
            at(&["10.0.0.1"]),
        ];
        assert_eq!(leading_on_host(&found, "10.0.0.1"), 2);
        assert_eq!(leading_on_host(&found, "10.0.0.2"), 0);
        assert_eq!(leading_on_host(&found, "10.0.0.3"), 0);
        assert_eq!(leading_on_host(&[], "10.0.0.1"), 0);
    }
}
