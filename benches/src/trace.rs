//! Request traces in the format of Mooncake's public FAST'25 traces (JSON lines with
//! `input_length` and `hash_ids`: one id per 512-token prompt block, equal ids meaning equal
//! prefixes) and the reference caches the pool is compared with: unbounded, and an LRU of a
//! given number of blocks. Sans-I/O: [`parse`] takes text, the caches take requests.
//!
//! Matching is prefix-only, as an engine's is: a request is served the tokens of its leading
//! blocks present in the cache, and the first absent block ends the match (block `i`'s KV is
//! useless without blocks `0..i`). Every block of the request is then (re)inserted, as the
//! engine saves what it computed.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Tokens per block in Mooncake's traces.
pub const BLOCK_TOKENS: u64 = 512;

#[derive(Debug, Clone, Deserialize)]
pub struct Request {
    pub input_length: u64,
    pub hash_ids: Vec<u64>,
}

impl Request {
    /// Tokens of the first `n` blocks: 512 each, but the last block holds what is left of
    /// `input_length` (a trace line whose blocks do not fit its length is refused by `parse`).
    pub fn prefix_tokens(&self, n: usize) -> u64 {
        (n as u64 * BLOCK_TOKENS).min(self.input_length)
    }
}

/// Parses a JSON-lines trace; blank lines are skipped; an error names the line.
pub fn parse(text: &str) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Request =
            serde_json::from_str(line).with_context(|| format!("trace line {}", n + 1))?;
        let blocks = r.hash_ids.len() as u64;
        if blocks * BLOCK_TOKENS < r.input_length || (blocks > 0 && r.input_length == 0) {
            bail!(
                "trace line {}: {} blocks cannot hold input_length {}",
                n + 1,
                blocks,
                r.input_length
            );
        }
        out.push(r);
    }
    Ok(out)
}

/// A cache of block ids, replayed request by request.
pub trait BlockCache {
    /// How many leading blocks of `ids` the cache holds (prefix-only).
    fn matched(&mut self, ids: &[u64]) -> usize;
    /// Records that the request's blocks are (now) cached, in order.
    fn insert(&mut self, ids: &[u64]);
}

/// Every block ever seen: the ceiling no finite cache can beat.
#[derive(Default)]
pub struct Unbounded(std::collections::HashSet<u64>);

impl BlockCache for Unbounded {
    fn matched(&mut self, ids: &[u64]) -> usize {
        ids.iter().take_while(|id| self.0.contains(id)).count()
    }
    fn insert(&mut self, ids: &[u64]) {
        self.0.extend(ids.iter().copied());
    }
}

/// Least recently used, `capacity` blocks; a match touches the matched blocks, an insert
/// touches every block of the request. A plain LRU touches them in prompt order, so a
/// prompt's head is older than its tail and, all else equal, evicted first, which breaks
/// every later match of that prefix; [`Lru::prefix_aware`] touches them tail first, so a
/// prefix loses its tail before its head.
pub struct Lru {
    capacity: usize,
    tail_first: bool,
    clock: u64,
    last_use: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl Lru {
    pub fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            tail_first: false,
            clock: 0,
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    pub fn prefix_aware(capacity: usize) -> Self {
        Lru {
            tail_first: true,
            ..Lru::new(capacity)
        }
    }

    fn touch_all(&mut self, ids: &[u64]) {
        if self.tail_first {
            ids.iter().rev().for_each(|&id| self.touch(id));
        } else {
            ids.iter().for_each(|&id| self.touch(id));
        }
    }

    fn touch(&mut self, id: u64) {
        self.clock += 1;
        if let Some(old) = self.last_use.insert(id, self.clock) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.clock, id);
        while self.last_use.len() > self.capacity {
            let (_, victim) = self.by_age.pop_first().expect("non-empty");
            self.last_use.remove(&victim);
        }
    }
}

impl BlockCache for Lru {
    fn matched(&mut self, ids: &[u64]) -> usize {
        let n = ids
            .iter()
            .take_while(|id| self.last_use.contains_key(id))
            .count();
        self.touch_all(&ids[..n]);
        n
    }
    fn insert(&mut self, ids: &[u64]) {
        self.touch_all(ids);
    }
}

/// Prompt tokens served from the cache against all prompt tokens.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Served {
    pub tokens: u64,
    pub total: u64,
}

impl Served {
    pub fn add(&mut self, r: &Request, matched_blocks: usize) {
        self.tokens += r.prefix_tokens(matched_blocks);
        self.total += r.input_length;
    }

    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.tokens as f64 / self.total as f64
        }
    }
}

/// Replays `trace` through `cache`.
pub fn replay(trace: &[Request], cache: &mut impl BlockCache) -> Served {
    let mut s = Served::default();
    for r in trace {
        let n = cache.matched(&r.hash_ids);
        s.add(r, n);
        cache.insert(&r.hash_ids);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(len: u64, ids: &[u64]) -> Request {
        Request {
            input_length: len,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn the_last_block_holds_what_is_left_of_the_prompt() {
        let r = req(1100, &[1, 2, 3]);
        assert_eq!(r.prefix_tokens(1), 512);
        assert_eq!(r.prefix_tokens(2), 1024);
        assert_eq!(r.prefix_tokens(3), 1100);
    }

    #[test]
    fn a_hole_ends_the_match_and_lru_evicts_the_oldest() {
        let trace = vec![
            req(1536, &[1, 2, 3]),
            req(1536, &[1, 9, 3]),
            req(1024, &[1, 2]),
        ];
        let got = replay(&trace, &mut Unbounded::default());
        // Second request: block 9 is new, so block 3 (cached) does not count.
        assert_eq!(got.tokens, 512 + 1024);
        // LRU of 3: after request 2, blocks 1, 9, 3 are the newest; 2 is gone.
        let got = replay(&trace, &mut Lru::new(3));
        assert_eq!(got.tokens, 512 + 512);
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line() {
        let e = parse("{\"input_length\": 10, \"hash_ids\": [1]}\n{\"input_length\": 2000, \"hash_ids\": [1]}")
            .unwrap_err();
        assert!(format!("{e:#}").contains("trace line 2"), "{e:#}");
        let e = parse("\n{\"input_length\": 1}").unwrap_err();
        assert!(format!("{e:#}").contains("trace line 2"), "{e:#}");
    }

    /// The reference figures for the shared trace, when it is present.
    #[test]
    fn the_reference_figures_of_the_shared_trace() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/mooncake_synthetic_trace.jsonl"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            kvpool_testkit::skip::skipped(
                "trace the_reference_figures_of_the_shared_trace",
                &format!("{path} not present (the team's shared data, outside the repo)"),
            );
            return;
        };
        let trace = parse(&text).unwrap();
        assert_eq!(trace.len(), 3993);
        let pct = |s: Served| (s.ratio() * 1000.0).round() / 10.0;
        assert_eq!(pct(replay(&trace, &mut Unbounded::default())), 65.1);
        assert_eq!(pct(replay(&trace, &mut Lru::new(5_000))), 28.4);
        assert_eq!(pct(replay(&trace, &mut Lru::new(20_000))), 58.2);
        for cap in [5_000, 20_000] {
            let plain = replay(&trace, &mut Lru::new(cap)).ratio();
            let aware = replay(&trace, &mut Lru::prefix_aware(cap)).ratio();
            println!("LRU {cap}: plain {plain:.4}, prefix-aware {aware:.4}");
            assert!(aware >= plain, "dropping tails first never loses here");
        }
    }
}
