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

// ------------------------------------------------------------------ list_keys

#[test]
fn list_keys_pages_through_committed_keys_in_key_order() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    // Put out of order: a listing is in key order whatever the order of the puts.
    for i in [7, 2, 9, 0, 4, 1, 8, 3, 6, 5] {
        w.put(&format!("k{i}"), 10);
    }
    w.put("other", 10);
    w.start(A, "k00-writing", 10).unwrap();

    let (page, more) = w.list("k", None, 4);
    assert_eq!(
        page,
        ["k0", "k1", "k2", "k3"],
        "a put in progress is not listed"
    );
    assert!(more);
    let (page, more) = w.list("k", Some("k3"), 4);
    assert_eq!(page, ["k4", "k5", "k6", "k7"]);
    assert!(more);
    // Keys removed and added between pages: the next page neither repeats nor skips a key
    // that was there throughout.
    w.remove("k8", false).unwrap();
    w.put("k75", 10);
    w.put("k10", 10);
    let (page, more) = w.list("k", Some("k7"), 2);
    assert_eq!(page, ["k75", "k9"]);
    assert!(!more, "a page that ends with the last key says so");
    // A limit of 0 only says whether any key matches.
    assert_eq!(w.list("k", None, 0), (Vec::new(), true));
    assert_eq!(w.list("nothing", None, 0), (Vec::new(), false));
    // The empty prefix is every key; a start before the range changes nothing.
    assert_eq!(w.list("", Some("a"), 100).0.len(), 12);
    // Listing is not a use: it takes no lease.
    w.remove("k0", false).unwrap();
}

#[test]
fn list_keys_with_a_tenant_prefix_lists_only_its_keys() {
    // The core lists wire keys; the client strips its tenant's prefix.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    for k in ["a\0k2", "b\0k1", "a\0k1", "plain", "a\0x"] {
        w.put(k, 10);
    }
    assert_eq!(
        w.list("a\0", None, 10),
        (vec!["a\0k1".into(), "a\0k2".into(), "a\0x".into()], false)
    );
    assert_eq!(
        w.list("a\0k", Some("a\0k1"), 10),
        (vec!["a\0k2".into()], false)
    );
    assert_eq!(w.list("a\0", Some("a\0"), 1), (vec!["a\0k1".into()], true));
}

#[test]
fn list_keys_caps_a_page_at_the_maximum() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let n = MAX_LIST_KEYS as usize + 5;
    for i in 0..n {
        w.put(&format!("k{i:05}"), 1);
    }
    let (page, more) = w.list("k", None, u32::MAX);
    assert_eq!(page.len(), MAX_LIST_KEYS as usize);
    assert!(more);
    assert_eq!(page.last().unwrap(), &format!("k{:05}", MAX_LIST_KEYS - 1));
    let (rest, more) = w.list("k", page.last().map(String::as_str), u32::MAX);
    assert_eq!(rest.len(), 5);
    assert!(!more);
}

// ------------------------------------------------------------------ remove_regex

#[test]
fn remove_regex_searches_keys_and_skips_leased_and_pinned_unless_forced() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    for k in ["layer/0/a", "layer/1/a", "layer/1/leased", "other/1"] {
        w.put(k, 10);
    }
    w.put_with("layer/1/pinned", 10, hard_pinned());
    w.start(A, "layer/1/writing", 10).unwrap();
    w.get("layer/1/leased").unwrap();

    // A search: `1/` matches inside the key, not only at its start.
    assert_eq!(w.remove_regex("1/", None, false), Ok(1));
    assert!(!w.exists("layer/1/a"));
    assert!(w.exists("layer/1/leased") && w.exists("layer/1/pinned"));
    assert_eq!(w.remove_regex("1/", None, true), Ok(2));
    assert!(!w.exists("layer/1/leased") && !w.exists("layer/1/pinned"));
    assert_eq!(
        w.core.status(w.now).processing,
        1,
        "a put in progress is not removed"
    );
    // `^` anchors at the start of the key.
    assert_eq!(w.remove_regex("^other", None, false), Ok(1));
    assert_eq!(w.remove_regex("^a", None, false), Ok(0));
    assert!(w.exists("layer/0/a"));
}

#[test]
fn remove_regex_with_a_prefix_matches_the_rest_of_the_key() {
    // A tenant's remove_regex: the pattern sees the tenant's own keys, so `^` anchors after
    // `tenant 0x00`, and other tenants' keys are never candidates.
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    for k in ["a\0k1", "a\0k2", "a\0xk", "b\0k1", "k1"] {
        w.put(k, 10);
    }
    assert_eq!(w.remove_regex("^k", Some("a\0"), false), Ok(2));
    assert!(w.exists("a\0xk") && w.exists("b\0k1") && w.exists("k1"));
    assert_eq!(
        w.remove_regex("^k", None, false),
        Ok(1),
        "without a prefix, the wire key"
    );
    assert!(w.exists("b\0k1"));
}

#[test]
fn a_bad_pattern_is_refused_naming_it_and_removes_nothing() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.put("k(", 10);
    let e = w.remove_regex("k(", None, true).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.contains("\"k(\"") && e.message.contains("unclosed"),
        "{e}"
    );
    // A pattern whose compiled form would be huge is refused before it costs the master.
    let e = w.remove_regex(r"\w{1000}{1000}", None, true).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("size limit"), "{e}");
    let e = w
        .remove_regex(&"k".repeat(MAX_PATTERN_LEN + 1), None, true)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(w.exists("k("));
}
