//! Eviction: pins, leases, the watermark pass and eviction on allocation failure.

use kvpool_proto::*;

use super::{code, hard_pinned, secs, soft_pinned, World, A, MIB};
use crate::core::CoreConfig;

// ------------------------------------------------------------------ pins and leases

#[test]
fn hard_pinned_objects_need_force_and_are_never_evicted() {
    let cfg = CoreConfig {
        high_watermark: 0.5,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 16 * MIB)]);
    w.put_with("pinned", 4 * MIB, hard_pinned());
    for i in 0..10 {
        w.put(&format!("filler{i}"), 2 * MIB);
        w.pass(secs(1));
    }
    assert!(w.exists("pinned"));
    assert_eq!(code(w.remove("pinned", false)), ErrorCode::Pinned);
    w.core.remove_all(
        w.now,
        RemoveAll {
            force: false,
            prefix: None,
        },
    );
    assert!(w.exists("pinned"));
    w.remove("pinned", true).unwrap();
}

#[test]
fn soft_pinned_objects_go_only_in_a_second_eviction_pass() {
    // Given a segment holding a cold soft-pinned object and newer plain ones.
    let cfg = CoreConfig {
        high_watermark: 0.5,
        eviction_ratio: 0.01,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg.clone());
    w.node(1, &[(10, 16 * MIB)]);
    w.put_with("soft", 2 * MIB, soft_pinned());
    w.put("plain1", 2 * MIB);
    w.put("plain2", 2 * MIB);
    // When the segment crosses the watermark...
    w.put("plain3", 3 * MIB);
    w.pass(secs(11));
    // ...then the plain objects go first, coldest first, and the soft-pinned one stays.
    assert!(w.exists("soft"));
    assert!(!w.exists("plain1"));

    // Given soft-pinned objects only, eviction takes them in the second pass.
    let mut w = World::with(cfg.clone());
    w.node(1, &[(10, 16 * MIB)]);
    for i in 0..5 {
        w.put_with(&format!("s{i}"), 2 * MIB, soft_pinned());
    }
    w.pass(secs(11));
    assert!(!w.exists("s0"));
    assert!(w.used(10) <= 8 * MIB);

    // Unless the configuration forbids it.
    let mut w = World::with(CoreConfig {
        allow_evict_soft_pinned: false,
        ..cfg
    });
    w.node(1, &[(10, 16 * MIB)]);
    for i in 0..5 {
        w.put_with(&format!("s{i}"), 2 * MIB, soft_pinned());
    }
    w.pass(secs(11));
    assert!((0..5).all(|i| w.exists(&format!("s{i}"))));
}

#[test]
fn a_leased_object_is_not_evicted() {
    let cfg = CoreConfig {
        high_watermark: 0.5,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 16 * MIB)]);
    w.put("old", 3 * MIB);
    w.put("mid", 3 * MIB);
    w.put("new", 3 * MIB);
    // Coldest by commit order, but leased by a reader (which also makes it the hottest; move
    // "mid" and "new" above it so only the lease protects it).
    w.get("old").unwrap();
    w.get("mid").unwrap();
    w.get("new").unwrap();
    w.core.tick(w.now);
    assert!(
        w.exists("old") && w.exists("mid") && w.exists("new"),
        "all leased: nothing to evict"
    );
    w.pass(secs(11));
    assert!(!w.exists("old"), "lease expired: the coldest goes");
}

// ------------------------------------------------------------------ watermark and full pools

#[test]
fn watermark_eviction_frees_the_coldest_first() {
    // Given a 20 MiB segment holding 13 objects of 1.5 MiB (above the 18 MiB watermark), the
    // oldest of which was just read.
    let cfg = CoreConfig {
        eviction_ratio: 0.2,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 20 * MIB)]);
    for i in 0..13 {
        w.put(&format!("k{i}"), 3 * MIB / 2);
    }
    w.get("k0").unwrap();
    // When the core ticks.
    w.pass(secs(1));
    // Then at least 4 MiB (20 %) went, coldest first, sparing the object just read.
    assert!(w.used(10) <= 16 * MIB);
    let evicted: Vec<usize> = (0..13).filter(|i| !w.exists(&format!("k{i}"))).collect();
    assert!(!evicted.is_empty());
    assert!(!evicted.contains(&0), "the recently read object survives");
    let expected: Vec<usize> = (1..=evicted.len()).collect();
    assert_eq!(
        evicted, expected,
        "eviction follows commit order for the untouched ones"
    );
    assert_eq!(w.core.status(w.now).evictions, evicted.len() as u64);
    let frees = w.heartbeat(1, 0).frees;
    assert_eq!(
        frees.len(),
        evicted.len(),
        "evicted replicas reach the node"
    );
}

#[test]
fn eviction_goes_by_latest_use_though_reads_leave_the_recency_order_alone() {
    // Given a 20 MiB segment at its 18 MiB watermark with twelve objects of 1.5 MiB, k2 and
    // then k0 read after all were committed, and their (short) leases over.
    let cfg = CoreConfig {
        eviction_ratio: 0.2,
        lease_ttl: secs(1),
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 20 * MIB)]);
    for i in 0..12 {
        w.put(&format!("k{i}"), 3 * MIB / 2);
    }
    let coldest = |w: &World| {
        let seg = &w.core.cluster.segments[&SegmentId(10)];
        *seg.recency.values().next().unwrap()
    };
    let k0 = w.core.objects.id_of(b"k0").unwrap();
    assert_eq!(coldest(&w), k0);
    w.get("k2").unwrap();
    w.get("k0").unwrap();
    // A read only stamps the object: k0 still heads the recency order, marked stale.
    assert_eq!(coldest(&w), k0, "a read moves nothing in the recency order");
    assert!(w.core.objects.get(k0).unwrap().stale());
    w.pass(secs(2));
    assert_eq!(
        w.used(10),
        18 * MIB,
        "at the watermark, nothing evicted yet"
    );

    // When one more put takes the segment above its watermark and the core ticks.
    w.put("k12", 3 * MIB / 2);
    w.pass(secs(1));

    // Then the three coldest by latest use went (k1, k3, k4), not the three oldest
    // entries (k0, k1, k2): eviction refiled the stale ones it met on its way.
    assert!(!w.core.objects.get(k0).unwrap().stale(), "k0 was refiled");
    let evicted: Vec<usize> = (0..13).filter(|i| !w.exists(&format!("k{i}"))).collect();
    assert_eq!(evicted, vec![1, 3, 4]);
}

#[test]
fn puts_on_a_full_pool_evict_and_succeed() {
    // No watermark eviction: only allocation failure makes room.
    let cfg = CoreConfig {
        high_watermark: 1.0,
        ..CoreConfig::default()
    };
    let mut w = World::with(cfg);
    w.node(1, &[(10, 32 * MIB)]);
    w.node(2, &[(20, 32 * MIB)]);
    // Write ten times the pool's size in MiB-sized blocks.
    for i in 0..640 {
        let len = MIB + (i % 3) * 300_000;
        w.start(A, &format!("k{i}"), len)
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
        w.end(A, &format!("k{i}")).unwrap();
    }
    let st = w.core.status(w.now);
    assert!(st.evictions > 500);
    assert!(st.objects > 30);
    assert!(w.exists("k639") && !w.exists("k0"));
}

#[test]
fn a_full_pool_of_unevictable_objects_says_no_space() {
    let mut w = World::new();
    w.node(1, &[(10, 8 * MIB)]);
    w.put_with("a", 4 * MIB, hard_pinned());
    w.put("b", 3 * MIB);
    w.get("b").unwrap();
    assert_eq!(code(w.start(A, "c", 3 * MIB)), ErrorCode::NoSpace);
    w.now += secs(11);
    w.heartbeat(1, 0);
    w.start(A, "c", 3 * MIB).unwrap();
    assert!(!w.exists("b"));
}
