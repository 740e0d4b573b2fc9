//! The engine: a paged KV cache with a free list, and the life of one request on it (find the
//! prefix, load it, verify it, compute the rest, save, answer, free).
//!
//! Requests take the cache's lock from their first load to their last save, one at a time, the
//! way an engine's forward loop runs one step at a time. The price: a consumer waiting on a
//! slow producer holds up the requests behind it (up to `--consumer-timeout`).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kvpool_connector::{BlockHasher, BlockKey, HostKvCache, LayerGroups, PoolConnector};
use serde::Serialize;

use crate::{
    kv,
    pd::{HandoffParams, PdSide},
};

/// The model's KV shape and the cache's size and layout.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: String,
    pub layers: usize,
    /// Bytes of one layer's K (or V) for one block: block_size × kv_heads × head_dim × dtype.
    pub block_bytes: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub groups: LayerGroups,
    pub tp_rank: u32,
    /// Modelled GPU prefill cost; 0 models an infinitely fast GPU (pure pool overhead).
    pub prefill_us_per_token: f64,
    /// Whether newly computed full blocks go to the pool (not for a pure kv_consumer).
    pub save: bool,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Can never be served by this engine (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// Not enough free blocks right now (HTTP 503, retry later).
    #[error("{0}")]
    Busy(String),
}

/// What the caller asks of the pool side for one request.
pub enum Transfer {
    /// Look the prefix up in the pool and load it.
    Local,
    /// Prefill, then hand the blocks off to a decoder (kv_producer).
    RemoteDecode,
    /// Receive the prefill's blocks from a producer (kv_consumer).
    RemotePrefill(Box<HandoffParams>),
}

/// The `kvpool` object of a response.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub blocks: usize,
    pub computed_blocks: usize,
    pub loaded_blocks: usize,
    pub mismatched_blocks: usize,
    pub verified_bytes: u64,
    pub computed_tokens: usize,
    /// Wall time from the request's start to the end of prefill (its first token).
    pub ttft_us: u64,
    /// The virtual timeline's TTFT: measured pool time plus modelled compute, with a layer
    /// group's compute overlapping the next group's load.
    pub ttft_model_us: u64,
    pub lookup_us: u64,
    pub load_us: u64,
    pub save_us: u64,
    pub recomputed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_transfer_failed: Option<String>,
}

pub struct Answer {
    pub report: Report,
    pub output: Vec<u32>,
    /// The hand-off for the decoder (producer requests only).
    pub handoff: Option<HandoffParams>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    loaded_blocks: AtomicU64,
    computed_blocks: AtomicU64,
    mismatched_blocks: AtomicU64,
    verified_bytes: AtomicU64,
    saved_blocks: AtomicU64,
    save_errors: AtomicU64,
    pool_errors: AtomicU64,
    handoffs: AtomicU64,
    handoff_errors: AtomicU64,
    received: AtomicU64,
    transfer_failed: AtomicU64,
    recomputed: AtomicU64,
}

/// `GET /stats`, less the producer's hold figures (added by the HTTP layer).
#[derive(Debug, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub loaded_blocks: u64,
    pub computed_blocks: u64,
    pub mismatched_blocks: u64,
    pub verified_bytes: u64,
    pub saved_blocks: u64,
    pub save_errors: u64,
    pub pool_errors: u64,
    pub handoffs: u64,
    pub handoff_errors: u64,
    pub received: u64,
    pub transfer_failed: u64,
    pub recomputed: u64,
    pub free_blocks: usize,
    pub num_blocks: usize,
}

pub struct Engine {
    cfg: EngineConfig,
    hasher: BlockHasher,
    conn: Arc<PoolConnector>,
    /// Seeds the simulated KV: the model and TP rank.
    seed: u64,
    cache: tokio::sync::Mutex<HostKvCache>,
    /// The first layer group's key tag: [`Engine::probe_keys`] names that object per block.
    first_group: Option<usize>,
    free: Mutex<Vec<usize>>,
    stats: Counters,
    pub pd: PdSide,
}

/// Blocks taken from the free list, given back when dropped: an aborted or failed request
/// (its future dropped half way) cannot leak them.
struct Lease<'a> {
    engine: &'a Engine,
    ids: Vec<usize>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut free = self.engine.free.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(self.ids.drain(..).rev());
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        cache: HostKvCache,
        hasher: BlockHasher,
        conn: Arc<PoolConnector>,
        pd: PdSide,
    ) -> Self {
        // Popped from the end: block 0 first, so a small test touches the same low blocks,
        // which are then stale from earlier requests (what verification must see through).
        let free = (0..cfg.num_blocks).rev().collect();
        let seed = kv::model_seed(&cfg.model, cfg.tp_rank);
        let first_group = cache.layout().key_group(0);
        Self {
            cfg,
            hasher,
            conn,
            seed,
            first_group,
            cache: tokio::sync::Mutex::new(cache),
            free: Mutex::new(free),
            stats: Counters::default(),
            pd,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The pool keys of the first layer group's object of each full block of `tokens`: what
    /// a router asks the master about to find where this prompt's prefix lives.
    pub fn probe_keys(&self, tokens: &[u32]) -> Vec<String> {
        self.hasher
            .keys(tokens)
            .iter()
            .map(|k| k.wire(self.first_group))
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let s = &self.stats;
        Stats {
            requests: s.requests.load(Relaxed),
            loaded_blocks: s.loaded_blocks.load(Relaxed),
            computed_blocks: s.computed_blocks.load(Relaxed),
            mismatched_blocks: s.mismatched_blocks.load(Relaxed),
            verified_bytes: s.verified_bytes.load(Relaxed),
            saved_blocks: s.saved_blocks.load(Relaxed),
            save_errors: s.save_errors.load(Relaxed),
            pool_errors: s.pool_errors.load(Relaxed),
            handoffs: s.handoffs.load(Relaxed),
            handoff_errors: s.handoff_errors.load(Relaxed),
            received: s.received.load(Relaxed),
            transfer_failed: s.transfer_failed.load(Relaxed),
            recomputed: s.recomputed.load(Relaxed),
            free_blocks: self.free.lock().unwrap_or_else(|e| e.into_inner()).len(),
            num_blocks: self.cfg.num_blocks,
        }
    }

    fn allocate(&self, n: usize) -> Result<Lease<'_>, ServeError> {
        if n > self.cfg.num_blocks {
            return Err(ServeError::BadRequest(format!(
                "the prompt needs {n} KV blocks of {} tokens; this engine has {}",
                self.cfg.block_size, self.cfg.num_blocks
            )));
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < n {
            return Err(ServeError::Busy(format!(
                "the prompt needs {n} KV blocks, {} are free; retry later",
                free.len()
            )));
        }
        let at = free.len() - n;
        let ids = free.split_off(at).into_iter().rev().collect();
        Ok(Lease { engine: self, ids })
    }

    /// Prefill `tokens` (and "decode" `max_tokens`), with the pool side `transfer` asks for.
    pub async fn serve(
        &self,
        request_id: &str,
        tokens: &[u32],
        max_tokens: usize,
        transfer: Transfer,
    ) -> Result<Answer, ServeError> {
        let start = Instant::now();
        let bs = self.cfg.block_size;
        if tokens.is_empty() {
            return Err(ServeError::BadRequest("the prompt is empty".into()));
        }
        let keys = self.hasher.keys(tokens);
        let full = keys.len();
        let seeds = kv::prefix_seeds(self.seed, tokens, bs);
        if let Transfer::RemotePrefill(params) = &transfer {
            // Another prompt's (or namespace's) blocks would load "successfully" and be wrong.
            let n = params.block_keys.len();
            if n > full || PdSide::param_keys(&keys[..n]) != params.block_keys {
                return Err(ServeError::BadRequest(format!(
                    "kv_transfer_params.block_keys ({n}) are not this prompt's first blocks \
                     in this engine's namespace"
                )));
            }
        }
        let lease = self.allocate(seeds.len())?;
        let slots = &lease.ids;
        self.stats.requests.fetch_add(1, Relaxed);
        let mut rep = Report {
            blocks: seeds.len(),
            ..Report::default()
        };

        let mut cache = self.cache.lock().await;
        // When each layer group's KV is in the cache, on the virtual timeline (µs from start).
        let groups = self.conn.num_groups();
        let mut group_ready = vec![0u64; groups];
        let loaded = match &transfer {
            Transfer::RemotePrefill(params) => {
                let n = params.block_keys.len();
                let t = Instant::now();
                let r = self
                    .pd
                    .receive(params, &mut cache, &slots[..n], |g| {
                        group_ready[g] = us(t.elapsed());
                    })
                    .await;
                rep.load_us = us(t.elapsed());
                if r.is_err() {
                    group_ready.fill(rep.load_us);
                }
                match r {
                    Ok(()) => {
                        self.stats.received.fetch_add(1, Relaxed);
                        n
                    }
                    Err(e) => {
                        // As an engine would: the request still gets its answer, from KV it
                        // computes itself.
                        self.stats.transfer_failed.fetch_add(1, Relaxed);
                        self.stats.recomputed.fetch_add(1, Relaxed);
                        rep.kv_transfer_failed = Some(e);
                        rep.recomputed = true;
                        0
                    }
                }
            }
            Transfer::Local | Transfer::RemoteDecode => {
                let t = Instant::now();
                let hit = match self.conn.lookup(&keys).await {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!("lookup failed, computing the prompt: {e}");
                        self.stats.pool_errors.fetch_add(1, Relaxed);
                        0
                    }
                };
                rep.lookup_us = us(t.elapsed());
                group_ready.fill(rep.lookup_us);
                if hit > 0 {
                    self.load(
                        &mut cache,
                        &keys[..hit],
                        &slots[..hit],
                        &mut rep,
                        &mut group_ready,
                    )
                    .await
                } else {
                    0
                }
            }
        };

        // Compute everything past the loaded prefix (at least the last token: its logits give
        // the first output token, as vLLM recomputes it on a full hit).
        let computed_tokens = (tokens.len() - loaded * bs).max(1);
        for (i, &slot) in slots.iter().enumerate().skip(loaded) {
            self.compute(&mut cache, seeds[i], slot);
        }
        rep.loaded_blocks = loaded;
        rep.computed_blocks = seeds.len() - loaded;
        rep.computed_tokens = computed_tokens;
        rep.ttft_us = us(start.elapsed());
        rep.ttft_model_us = self.timeline(&group_ready, computed_tokens);

        // Verification is the simulator's own check, not engine work: off the TTFT clock.
        for (i, &slot) in slots.iter().enumerate().take(loaded) {
            if !self.verify(&cache, seeds[i], slot) {
                rep.mismatched_blocks += 1;
                tracing::error!(
                    "request {request_id}: block {i} (slot {slot}) loaded with wrong bytes"
                );
                // Serve the right KV anyway so one bad block is counted once, not saved on.
                self.compute(&mut cache, seeds[i], slot);
            }
            rep.verified_bytes += self.block_bytes() as u64;
        }

        let mut handoff = None;
        let blocks: Vec<(BlockKey, usize)> =
            keys.iter().cloned().zip(slots.iter().copied()).collect();
        let t = Instant::now();
        match transfer {
            Transfer::RemoteDecode => match self.pd.hand_off(request_id, &cache, &blocks).await {
                Ok(p) => {
                    self.stats.handoffs.fetch_add(1, Relaxed);
                    handoff = Some(p);
                }
                Err(e) => {
                    self.stats.handoff_errors.fetch_add(1, Relaxed);
                    rep.kv_transfer_failed = Some(e);
                }
            },
            _ if self.cfg.save && full > loaded => {
                for r in self.conn.save(&cache, &blocks[loaded..full]).await {
                    match r {
                        Ok(()) => self.stats.saved_blocks.fetch_add(1, Relaxed),
                        Err(e) => {
                            tracing::warn!("request {request_id}: save failed: {e}");
                            self.stats.save_errors.fetch_add(1, Relaxed)
                        }
                    };
                }
            }
            _ => {}
        }
        rep.save_us = us(t.elapsed());
        drop(cache);
        drop(lease);

        let s = &self.stats;
        s.loaded_blocks.fetch_add(loaded as u64, Relaxed);
        s.computed_blocks
            .fetch_add(rep.computed_blocks as u64, Relaxed);
        s.mismatched_blocks
            .fetch_add(rep.mismatched_blocks as u64, Relaxed);
        s.verified_bytes.fetch_add(rep.verified_bytes, Relaxed);
        Ok(Answer {
            output: decode(seeds[seeds.len() - 1], max_tokens),
            report: rep,
            handoff,
        })
    }

    /// Loads `keys` into `slots` layer-wise (every group in flight, handed back in group
    /// order as each lands), recording when each group is in; returns the usable prefix.
    async fn load(
        &self,
        cache: &mut HostKvCache,
        keys: &[BlockKey],
        slots: &[usize],
        rep: &mut Report,
        group_ready: &mut [u64],
    ) -> usize {
        let t = Instant::now();
        let blocks: Vec<(BlockKey, usize)> =
            keys.iter().cloned().zip(slots.iter().copied()).collect();
        let results = match self.conn.load_layerwise(cache, &blocks, usize::MAX) {
            Ok(mut l) => {
                while let Some(g) = l.next().await {
                    group_ready[g.group] += us(t.elapsed());
                }
                l.finish()
            }
            Err(e) => {
                tracing::warn!("load refused: {e}");
                self.stats.pool_errors.fetch_add(1, Relaxed);
                return 0;
            }
        };
        rep.load_us = us(t.elapsed());
        for (i, r) in results.iter().enumerate() {
            if let Err(e) = r {
                tracing::warn!("load of block {i} failed: {e}");
                self.stats.pool_errors.fetch_add(1, Relaxed);
            }
        }
        // Lookup's lease makes a miss here rare (eviction past the lease); a hole ends the
        // usable prefix, and everything after it is recomputed.
        results.iter().take_while(|r| matches!(r, Ok(true))).count()
    }

    /// TTFT on the virtual timeline: group `g`'s compute starts when its KV is in and group
    /// `g - 1`'s compute is done (layer `l` needs layer `l - 1`'s output), and takes its share
    /// of the layers.
    fn timeline(&self, group_ready: &[u64], computed_tokens: usize) -> u64 {
        let total = self.cfg.prefill_us_per_token * computed_tokens as f64;
        let layers = self.cfg.layers as f64;
        let mut done = 0f64;
        for (g, &ready) in group_ready.iter().enumerate() {
            let n = self.group_layers(g) as f64;
            done = done.max(ready as f64) + total * n / layers;
        }
        done.round() as u64
    }

    fn group_layers(&self, g: usize) -> usize {
        match self.cfg.groups {
            LayerGroups::All => self.cfg.layers,
            LayerGroups::PerObject(n) => {
                let n = n.max(1);
                (self.cfg.layers - g * n).min(n)
            }
        }
    }

    fn block_bytes(&self) -> usize {
        self.cfg.layers * 2 * self.cfg.block_bytes
    }

    /// The forward pass for one block: every layer's K and V.
    fn compute(&self, cache: &mut HostKvCache, seed: u64, slot: usize) {
        for layer in 0..self.cfg.layers {
            for k_or_v in 0..2 {
                kv::fill(
                    cache.region_block_mut(layer, k_or_v, slot),
                    seed,
                    layer,
                    k_or_v,
                );
            }
        }
    }

    fn verify(&self, cache: &HostKvCache, seed: u64, slot: usize) -> bool {
        (0..self.cfg.layers).all(|layer| {
            (0..2).all(|k_or_v| {
                kv::matches(cache.region_block(layer, k_or_v, slot), seed, layer, k_or_v)
            })
        })
    }
}

/// The "generated" tokens: a function of the whole prompt (the last block's seed), so two
/// engines that served the same prompt answer the same.
fn decode(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 128_000) as u32
        })
        .collect()
}
