//! One engine's side of the connector benchmark: its caches, its plain-client buffers, and the
//! four timed operations (connector save / load, plain put / get) plus their untimed checks.
//!
//! An engine is moved into a spawned task for each timed operation and handed back, so several
//! engines run on the runtime's worker threads at once, as separate engine processes would.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use kvpool_client::Client;
use kvpool_connector::{BlockHasher, BlockKey, HostKvCache, LayerGroups, Namespace, PoolConnector};
use kvpool_proto::PutOptions;

/// Llama-3-8B's KV cache: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks.
pub const LAYERS: usize = 32;
pub const BLOCK_TOKENS: usize = 16;
/// One layer's K (or V) bytes of one block: 16 tokens × 8 heads × 128 × 2 bytes = 32 KiB.
pub const REGION_BYTES: usize = BLOCK_TOKENS * 8 * 128 * 2;
/// A block's bytes over all layers, K and V: 2 MiB, and the plain client's object size.
pub const BLOCK_BYTES: usize = LAYERS * 2 * REGION_BYTES;
/// The prefix every trial saves and loads: 4096 tokens.
pub const PREFIX_BLOCKS: usize = 256;
/// Bytes one engine moves per operation: 512 MiB.
pub const PREFIX_BYTES: u64 = (PREFIX_BLOCKS * BLOCK_BYTES) as u64;
/// Cache blocks: exactly the prefix, so the loaded blocks fill the destination cache.
const CACHE_BLOCKS: usize = PREFIX_BLOCKS;
/// What destinations hold before a load, so a load that wrote nothing fails the check.
const POISON: u8 = 0xEE;

/// How the connector's cache is laid out and grouped: one benchmark case.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// `[block][layer][K,V]` (one 2 MiB slice per object) instead of vLLM's paged
    /// `[layer][K,V][block]` (64 slices of 32 KiB per object).
    pub block_first: bool,
    pub groups: LayerGroups,
}

impl Variant {
    pub fn layout_name(&self) -> &'static str {
        if self.block_first {
            "block-first"
        } else {
            "paged (layer-first)"
        }
    }

    pub fn objects_per_block(&self) -> usize {
        match self.groups {
            LayerGroups::PerObject(n) => LAYERS.div_ceil(n.max(1)),
            _ => 1,
        }
    }

    fn cache(&self) -> Result<HostKvCache> {
        Ok(if self.block_first {
            HostKvCache::block_first(LAYERS, true, CACHE_BLOCKS, REGION_BYTES, self.groups)
        } else {
            HostKvCache::layer_first(LAYERS, true, CACHE_BLOCKS, REGION_BYTES, self.groups)
        }?)
    }
}

/// The plain client's buffers: the same 512 MiB as 256 contiguous 2 MiB objects. Kept for
/// the whole run; each case's caches come and go.
pub struct Plain {
    src: Vec<u8>,
    dst: Vec<u8>,
    keys: Vec<Vec<u8>>,
}

impl Plain {
    pub fn new(engine: usize) -> Self {
        let mut src = vec![0u8; PREFIX_BLOCKS * BLOCK_BYTES];
        for (i, chunk) in src.chunks_mut(REGION_BYTES).enumerate() {
            fill(chunk, (engine as u64) << 40 | i as u64);
        }
        Plain {
            src,
            // Written (poisoned) before the first get, so page faults are never timed.
            dst: vec![0u8; PREFIX_BLOCKS * BLOCK_BYTES],
            keys: Vec::new(),
        }
    }
}

/// One engine: its client, its plain buffers, and (during a case) its connector and caches.
pub struct Engine {
    pub id: usize,
    pub client: Arc<Client>,
    pub plain: Plain,
    case: Option<ConnectorCase>,
}

struct ConnectorCase {
    conn: PoolConnector,
    hasher: BlockHasher,
    src: HostKvCache,
    dst: HostKvCache,
    /// This trial's keys, block `i` of the prefix at index `i`.
    keys: Vec<BlockKey>,
}

/// Where block `i` of the prefix is loaded: a permutation of the cache's blocks (97 is odd,
/// so coprime with 256), so a block scattered into its source slot, or another block's, fails
/// the check.
fn dst_slot(i: usize) -> usize {
    (i * 97 + 13) % CACHE_BLOCKS
}

impl Engine {
    pub fn new(id: usize, client: Arc<Client>) -> Self {
        Engine {
            id,
            client,
            plain: Plain::new(id),
            case: None,
        }
    }

    /// Builds the case's caches and fills the source with bytes unique to every (block,
    /// layer, K/V) region, so a misplaced region cannot compare equal.
    pub fn begin_case(&mut self, v: Variant) -> Result<()> {
        let mut src = v.cache()?;
        for b in 0..CACHE_BLOCKS {
            for l in 0..LAYERS {
                for kv in 0..2 {
                    let seed = (self.id as u64) << 40 | ((b * LAYERS + l) * 2 + kv) as u64;
                    fill(src.region_block_mut(l, kv, b), seed);
                }
            }
        }
        let dst = v.cache()?;
        let hasher = BlockHasher::new(Namespace {
            model: "meta-llama/Meta-Llama-3-8B".into(),
            kv_dtype: "bf16".into(),
            layout: format!("vllm-nhd/{}", src.layout().grouping_tag()),
            block_size: BLOCK_TOKENS as u32,
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        });
        self.case = Some(ConnectorCase {
            conn: PoolConnector::new(self.client.clone(), src.layout()),
            hasher,
            src,
            dst,
            keys: Vec::new(),
        });
        Ok(())
    }

    pub fn end_case(&mut self) {
        self.case = None;
    }

    /// Fresh keys for both paths (`run` tells trials of every case apart), and poisoned
    /// destinations; untimed.
    pub fn prepare_trial(&mut self, run: u64) -> Result<()> {
        let c = self.case.as_mut().context("no case begun")?;
        // Tokens 0 and 1 carry the trial and the engine: the chained hash makes every block's
        // key differ, so engines never race to put one key (that is a shared-prefix case, not
        // a bandwidth one).
        let tokens: Vec<u32> = (0..PREFIX_BLOCKS * BLOCK_TOKENS)
            .map(|t| match t {
                0 => run as u32,
                1 => self.id as u32,
                _ => (t % 128_000) as u32,
            })
            .collect();
        c.keys = c.hasher.keys(&tokens);
        ensure!(c.keys.len() == PREFIX_BLOCKS, "{} keys", c.keys.len());
        for b in 0..CACHE_BLOCKS {
            for l in 0..LAYERS {
                for kv in 0..2 {
                    c.dst.region_block_mut(l, kv, b).fill(POISON);
                }
            }
        }
        self.plain.keys = (0..PREFIX_BLOCKS)
            .map(|i| format!("plain/{}/{run}/{i}", self.id).into_bytes())
            .collect();
        self.plain.dst.fill(POISON);
        Ok(())
    }

    /// `PoolConnector::save` of the whole prefix from source blocks `0..256`.
    pub async fn connector_save(mut self) -> Result<Self> {
        let c = self.case.as_mut().context("no case begun")?;
        let pairs: Vec<(BlockKey, usize)> = c.keys.iter().cloned().zip(0..).collect();
        for (i, r) in c.conn.save(&c.src, &pairs).await.into_iter().enumerate() {
            r.with_context(|| format!("engine {} saving block {i}", self.id))?;
        }
        Ok(self)
    }

    /// `lookup` then `load` of the whole prefix into the permuted destination blocks.
    pub async fn connector_load(mut self) -> Result<Self> {
        let c = self.case.as_mut().context("no case begun")?;
        let hit = c.conn.lookup(&c.keys).await?;
        ensure!(
            hit == PREFIX_BLOCKS,
            "engine {}: lookup found {hit} of {PREFIX_BLOCKS} blocks",
            self.id
        );
        let pairs: Vec<(BlockKey, usize)> = c
            .keys
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, k)| (k, dst_slot(i)))
            .collect();
        for (i, r) in c
            .conn
            .load(&mut c.dst, &pairs)
            .await
            .into_iter()
            .enumerate()
        {
            match r {
                Ok(true) => {}
                Ok(false) => bail!("engine {}: block {i} missed on load", self.id),
                Err(e) => {
                    return Err(e).with_context(|| format!("engine {} loading block {i}", self.id))
                }
            }
        }
        Ok(self)
    }

    /// `Client::put_batch` of the 256 contiguous 2 MiB objects.
    pub async fn plain_put(self) -> Result<Self> {
        let items: Vec<(&[u8], &[u8])> = self
            .plain
            .keys
            .iter()
            .zip(self.plain.src.chunks(BLOCK_BYTES))
            .map(|(k, v)| (k.as_slice(), v))
            .collect();
        for (i, r) in self
            .client
            .put_batch(&items, &PutOptions::default())
            .await
            .into_iter()
            .enumerate()
        {
            r.with_context(|| format!("engine {} plain put {i}", self.id))?;
        }
        Ok(self)
    }

    /// `Client::get_batch_into_parts` of those objects, one part each.
    pub async fn plain_get(mut self) -> Result<Self> {
        let keys: Vec<&[u8]> = self.plain.keys.iter().map(Vec::as_slice).collect();
        let mut parts: Vec<[&mut [u8]; 1]> = self
            .plain
            .dst
            .chunks_mut(BLOCK_BYTES)
            .map(|c| [c])
            .collect();
        let mut dests: Vec<&mut [&mut [u8]]> = parts.iter_mut().map(|p| &mut p[..]).collect();
        let res = self.client.get_batch_into_parts(&keys, &mut dests).await;
        for (i, r) in res.into_iter().enumerate() {
            match r.with_context(|| format!("engine {} plain get {i}", self.id))? {
                Some(n) if n as usize == BLOCK_BYTES => {}
                other => bail!("engine {} plain get {i}: {other:?}", self.id),
            }
        }
        Ok(self)
    }

    /// Every loaded byte against its source (after the poisoning in `prepare_trial`); untimed.
    pub fn verify(&self) -> Result<()> {
        let c = self.case.as_ref().context("no case begun")?;
        for i in 0..PREFIX_BLOCKS {
            for l in 0..LAYERS {
                for kv in 0..2 {
                    ensure!(
                        c.dst.region_block(l, kv, dst_slot(i)) == c.src.region_block(l, kv, i),
                        "engine {}: connector load of block {i} (slot {}), layer {l}, kv {kv}: \
                         bytes differ",
                        self.id,
                        dst_slot(i)
                    );
                }
            }
        }
        ensure!(
            self.plain.dst == self.plain.src,
            "engine {}: plain get bytes differ",
            self.id
        );
        Ok(())
    }
}

/// Runs `op` on every engine at once, each in its own task, and returns the engines and the
/// time from the start until the last one finished.
pub async fn concurrently<F, Fut>(engines: Vec<Engine>, op: F) -> Result<(Vec<Engine>, Duration)>
where
    F: Fn(Engine) -> Fut,
    Fut: Future<Output = Result<Engine>> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = engines.into_iter().map(|e| tokio::spawn(op(e))).collect();
    let mut out = Vec::with_capacity(tasks.len());
    let mut first_err = None;
    for t in tasks {
        match t.await.context("engine task panicked")? {
            Ok(e) => out.push(e),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    let elapsed = start.elapsed();
    match first_err {
        Some(e) => Err(e),
        None => Ok((out, elapsed)),
    }
}

/// Fills `buf` with xorshift64 bytes from `seed`: the testkit's value bytes.
use kvpool_testkit::fill;
