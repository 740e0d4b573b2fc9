//! The location cache: where keys this client read recently live, so a repeated get goes
//! straight to the storage node (one round trip) instead of asking the master first (two).
//!
//! Why an entry can be trusted, and for how long (docs/semantics.md, "Hot reads"):
//! - it lives no longer than the read lease its lookup took, less a quarter kept for the read
//!   itself. While the lease runs the master neither evicts the object nor removes it without
//!   `force`, so a cached read is as safe as the read that followed the lookup;
//! - every read from it is a checked read: the node serves it only if the range still holds
//!   the replica the entry names (before and after its copy), else answers `StaleLocation`;
//! - the crc32c of the bytes is compared with the writer's, as for every get.
//!
//! Only replicas a cached read can check are kept: DRAM ones (the node's inventory tag), and
//! NVMe ones this client reads off the node's file (the record names its replica) when the
//! master moves nothing on reads (`FLAG_NO_PROMOTION`); the client decides which.
//!
//! A key enters the cache on its second lookup, not its first: a doorkeeper (one slot per
//! cache entry, holding the hash of the last key looked up there) remembers keys seen once.
//! A stream of keys each read once (a cold scan) then costs one hash per key instead of a
//! cache insertion and eviction per key, which measured slower than the lookup it saves
//! (docs/benchmarks.md).

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

#[cfg(test)]
use kvpool_proto::Tier;
use kvpool_proto::{ObjectInfo, ReplicaDesc};
use moka::sync::Cache;

use crate::config::LocationCache;

/// A key's location for one get: from a lookup at the master or from the cache.
#[derive(Clone)]
pub(crate) struct Located {
    pub info: Arc<ObjectInfo>,
    /// When the lookup that granted the lease was sent: the lease counts from here.
    pub sent: Instant,
    /// From the cache or the master's index: read with the node's replica check, and looked
    /// up again on failure.
    pub cached: bool,
    /// From the master's index: checked again after the read (and no lease to count).
    pub ticket: Option<crate::index::IndexTicket>,
}

#[derive(Clone)]
struct Entry {
    info: Arc<ObjectInfo>,
    sent: Instant,
    /// After this, the entry is not used: what is left of the lease is kept for the read.
    until: Instant,
}

/// The cache, and the doorkeeper that admits a key on its second lookup.
struct Inner {
    cache: Cache<Vec<u8>, Entry>,
    /// Per slot, the hash of the last key looked up there (0: none).
    seen: Box<[AtomicU64]>,
    hasher: RandomState,
}

/// The cache itself; `None` inside when turned off.
pub(crate) struct Locations(Option<Inner>);

impl Locations {
    pub fn new(cfg: &LocationCache) -> Self {
        let slots = usize::try_from(cfg.max_entries)
            .unwrap_or(usize::MAX)
            .min(1 << 22);
        Locations((cfg.enabled && cfg.max_entries > 0).then(|| Inner {
            cache: Cache::new(cfg.max_entries),
            seen: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
        }))
    }

    /// Whether the cache is on (off, it keeps and finds nothing).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `wire_key` was looked up before (its slot holds its hash); remembers it
    /// otherwise. Another key hashing to the same slot makes it forgotten: then it waits
    /// for one more lookup.
    fn seen_before(inner: &Inner, wire_key: &[u8]) -> bool {
        let (slot, h) = Self::slot(inner, wire_key);
        slot.swap(h, Ordering::Relaxed) == h
    }

    /// Whether `wire_key`'s slot names it, without remembering it.
    fn seen(inner: &Inner, wire_key: &[u8]) -> bool {
        let (slot, h) = Self::slot(inner, wire_key);
        slot.load(Ordering::Relaxed) == h
    }

    /// `wire_key`'s doorkeeper slot and the hash it is remembered by (never 0: empty).
    fn slot<'a>(inner: &'a Inner, wire_key: &[u8]) -> (&'a AtomicU64, u64) {
        let h = inner.hasher.hash_one(wire_key).max(1);
        (&inner.seen[(h % inner.seen.len() as u64) as usize], h)
    }

    /// The cached location of `wire_key`, if one is still within its lease.
    pub fn get(&self, wire_key: &[u8]) -> Option<Located> {
        let inner = self.0.as_ref()?;
        // A key its slot does not name was not looked up lately, so it is hardly cached:
        // skipping the cache's own lookup keeps a cold scan at one hash per key.
        if !Self::seen(inner, wire_key) {
            return None;
        }
        let cache = &inner.cache;
        let e = cache.get(wire_key)?;
        if Instant::now() >= e.until {
            cache.invalidate(wire_key);
            return None;
        }
        Some(Located {
            info: e.info,
            sent: e.sent,
            cached: true,
            ticket: None,
        })
    }

    /// Keeps what a lookup sent at `sent` found for `wire_key` (from its second lookup on):
    /// the replicas a cached read can check (`checkable`), if any, until three quarters of
    /// the lease have passed.
    pub fn insert(
        &self,
        wire_key: &[u8],
        info: &Arc<ObjectInfo>,
        sent: Instant,
        checkable: impl Fn(&ReplicaDesc) -> bool,
    ) {
        let Some(inner) = &self.0 else {
            return;
        };
        if !Self::seen_before(inner, wire_key) {
            return;
        }
        let cache = &inner.cache;
        let life = Duration::from_millis(info.lease_ms.saturating_mul(3) / 4);
        if life.is_zero() {
            return;
        }
        let info = if info.replicas.iter().all(&checkable) {
            info.clone()
        } else {
            let kept: Vec<_> = info
                .replicas
                .iter()
                .filter(|r| checkable(r))
                .cloned()
                .collect();
            if kept.is_empty() {
                return;
            }
            Arc::new(ObjectInfo {
                replicas: kept,
                ..(**info).clone()
            })
        };
        let entry = Entry {
            info,
            sent,
            until: sent + life,
        };
        cache.insert(wire_key.to_vec(), entry);
    }

    /// Drops `wire_key`'s location: a read from it failed, or this client put or removed it.
    pub fn forget(&self, wire_key: &[u8]) {
        if let Some(inner) = &self.0 {
            inner.cache.invalidate(wire_key);
        }
    }

    /// Drops every location (this client removed keys by pattern or all of them).
    pub fn clear(&self) {
        if let Some(inner) = &self.0 {
            inner.cache.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_proto::{NodeId, ReplicaDesc, ReplicaId, SegmentId};

    fn info(tiers: &[Tier], lease_ms: u64) -> Arc<ObjectInfo> {
        Arc::new(ObjectInfo {
            len: 4,
            checksum: 1,
            replicas: tiers
                .iter()
                .enumerate()
                .map(|(i, &tier)| ReplicaDesc {
                    id: ReplicaId(i as u64),
                    node: NodeId(1),
                    addr: "127.0.0.1:1".into(),
                    segment: SegmentId(1),
                    offset: 0,
                    len: 4,
                    tier,
                })
                .collect(),
            lease_ms,
        })
    }

    #[test]
    fn keeps_checkable_replicas_only_and_within_the_lease() {
        let c = Locations::new(&LocationCache {
            enabled: true,
            ..LocationCache::default()
        });
        let now = Instant::now();
        let dram = |r: &ReplicaDesc| r.tier == Tier::Dram;
        c.insert(
            b"mixed",
            &info(&[Tier::Dram, Tier::Nvme], 10_000),
            now,
            dram,
        );
        assert!(
            c.get(b"mixed").is_none(),
            "admitted on the second lookup only"
        );
        c.insert(
            b"mixed",
            &info(&[Tier::Dram, Tier::Nvme], 10_000),
            now,
            dram,
        );
        let got = c.get(b"mixed").expect("cached");
        assert!(got.cached);
        assert_eq!(got.info.replicas.len(), 1);
        assert_eq!(got.info.replicas[0].tier, Tier::Dram);
        c.insert(b"disk", &info(&[Tier::Nvme], 10_000), now, dram);
        c.insert(b"disk", &info(&[Tier::Nvme], 10_000), now, dram);
        assert!(c.get(b"disk").is_none(), "NVMe locations cannot be checked");
        // Where they can, they are kept.
        let any = |_: &ReplicaDesc| true;
        c.insert(
            b"checked",
            &info(&[Tier::Dram, Tier::Nvme], 10_000),
            now,
            any,
        );
        c.insert(
            b"checked",
            &info(&[Tier::Dram, Tier::Nvme], 10_000),
            now,
            any,
        );
        assert_eq!(c.get(b"checked").expect("cached").info.replicas.len(), 2);
        // A lease whose last quarter has begun is not used.
        let old = now - Duration::from_millis(800);
        c.insert(b"late", &info(&[Tier::Dram], 1_000), old, dram);
        c.insert(b"late", &info(&[Tier::Dram], 1_000), old, dram);
        assert!(c.get(b"late").is_none());
        c.forget(b"mixed");
        assert!(c.get(b"mixed").is_none());
    }

    #[test]
    fn turned_off_keeps_nothing() {
        let c = Locations::new(&LocationCache {
            enabled: false,
            ..LocationCache::default()
        });
        for _ in 0..2 {
            c.insert(b"k", &info(&[Tier::Dram], 10_000), Instant::now(), |_| true);
        }
        assert!(c.get(b"k").is_none());
    }
}
