//! Reads and removal: batched answers, leases taken by gets and exists, remove and remove_all.

use kvpool_proto::*;

use super::{code, hard_pinned, secs, World, A, MIB};

// ------------------------------------------------------------------ batches

#[test]
fn batches_answer_per_item_in_order() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("a", 10);
    let r = w.core.exists(
        w.now,
        Exists {
            keys: vec![b"a".to_vec(), b"zz".to_vec(), Vec::new(), b"a".to_vec()],
            lease: false,
        },
    );
    assert_eq!(r.items[0], Ok(true));
    assert_eq!(r.items[1], Ok(false));
    assert_eq!(r.items[2].clone().unwrap_err().code, ErrorCode::KeyTooLong);
    assert_eq!(r.items[3], Ok(true));
}

// ------------------------------------------------------------------ leases

#[test]
fn a_lease_blocks_remove_until_it_expires() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("k", 100);
    assert_eq!(w.get("k").unwrap().lease_ms, 10_000);
    assert_eq!(code(w.remove("k", false)), ErrorCode::HasLease);
    w.pass(secs(9));
    assert_eq!(code(w.remove("k", false)), ErrorCode::HasLease);
    w.pass(secs(1));
    w.remove("k", false).unwrap();
    assert!(!w.exists("k"));
    assert_eq!(code(w.remove("k", false)), ErrorCode::NotFound);
}

#[test]
fn exists_leases_only_when_asked_and_force_overrides_a_lease() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("k", 100);
    assert!(w.exists("k"));
    w.remove("k", false).unwrap();

    w.put("k", 100);
    let r = w.core.exists(
        w.now,
        Exists {
            keys: vec![b"k".to_vec()],
            lease: true,
        },
    );
    assert_eq!(r.items[0], Ok(true));
    assert_eq!(code(w.remove("k", false)), ErrorCode::HasLease);
    w.remove("k", true).unwrap();
}

// ------------------------------------------------------------------ remove_all

#[test]
fn remove_all_skips_leased_and_pinned_unless_forced() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("plain", 10);
    w.put("leased", 10);
    w.put_with("pinned", 10, hard_pinned());
    w.start(A, "writing", 10).unwrap();
    w.get("leased").unwrap();
    assert_eq!(
        w.core
            .remove_all(
                w.now,
                RemoveAll {
                    force: false,
                    prefix: None
                }
            )
            .removed,
        1
    );
    assert_eq!(
        w.core
            .remove_all(
                w.now,
                RemoveAll {
                    force: true,
                    prefix: None
                }
            )
            .removed,
        2
    );
    let st = w.core.status(w.now);
    assert_eq!(
        (st.objects, st.processing),
        (0, 1),
        "puts in progress are not committed objects"
    );
}

#[test]
fn remove_all_with_a_prefix_removes_only_those_keys() {
    // A tenant's remove_all: keys are `tenant 0x00 key` on the wire.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("a\0k1", 10);
    w.put("a\0k2", 10);
    w.put("b\0k1", 10);
    w.put("plain", 10);
    let removed = w
        .core
        .remove_all(
            w.now,
            RemoveAll {
                force: false,
                prefix: Some(b"a\0".to_vec()),
            },
        )
        .removed;
    assert_eq!(removed, 2);
    assert!(!w.exists("a\0k1") && !w.exists("a\0k2"));
    assert!(w.exists("b\0k1") && w.exists("plain"));
    // An empty prefix is every key.
    let removed = w
        .core
        .remove_all(
            w.now,
            RemoveAll {
                force: false,
                prefix: Some(Vec::new()),
            },
        )
        .removed;
    assert_eq!(removed, 2);
}
