//! Two-phase puts: put_start/put_end/put_revoke, who may end a put, immutability and
//! overwrite, and stale (zombie) puts.

use kvpool_proto::*;

use super::{code, ids, overwriting, replicated, secs, World, A, B, MIB};

// ------------------------------------------------------------------ two-phase put

#[test]
fn a_put_is_readable_only_after_put_end() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let descs = w.start(A, "k", 1000).unwrap();
    assert_eq!(descs.len(), 1);
    assert_eq!(&*descs[0].addr, "10.0.0.1:9000");
    assert_eq!(descs[0].len, 1000);

    assert_eq!(
        code(w.get("k")),
        ErrorCode::NotFound,
        "Processing is invisible to get"
    );
    assert!(!w.exists("k"), "Processing is invisible to exists");
    assert_eq!(code(w.remove("k", true)), ErrorCode::NotFound);
    assert_eq!(w.core.status(w.now).processing, 1);

    w.end(A, "k").unwrap();
    let info = w.get("k").unwrap();
    assert_eq!(
        (info.len, info.checksum, info.replicas.clone()),
        (1000, 1000, descs)
    );
    assert!(w.exists("k"));
    assert_eq!(w.core.status(w.now).objects, 1);
}

#[test]
fn the_checksum_comes_with_put_end_and_a_retry_must_repeat_it() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.start(A, "k", 1000).unwrap();
    w.start(A, "j", 1000).unwrap();
    let end = |w: &mut World, keys: &[&str], checksums: Vec<u32>| {
        w.core
            .put_end(
                w.now,
                PutEnd {
                    client: A,
                    keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
                    checksums,
                },
            )
            .items
    };
    // A count that does not match the keys ends nothing, and says why for every key.
    let r = end(&mut w, &["k", "j"], vec![5]);
    assert_eq!(r.len(), 2);
    for item in r {
        let e = item.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(
            e.message.contains("1 checksums for 2 keys"),
            "{}",
            e.message
        );
    }
    assert_eq!(code(w.get("k")), ErrorCode::NotFound);

    assert_eq!(end(&mut w, &["k"], vec![0xabcd]), vec![Ok(())]);
    assert_eq!(w.get("k").unwrap().checksum, 0xabcd);
    // A retry whose first answer was lost repeats the checksum; another is refused and
    // changes nothing.
    assert_eq!(end(&mut w, &["k"], vec![0xabcd]), vec![Ok(())]);
    let e = end(&mut w, &["k"], vec![0x1234]).remove(0).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("0x0000abcd"), "{}", e.message);
    assert_eq!(w.get("k").unwrap().checksum, 0xabcd);
}

#[test]
fn bad_put_arguments_are_refused() {
    let mut w = World::new();
    // A young master without nodes says they are coming (retryable); after a node TTL with
    // none, the pool has no segment.
    w.core.tick(w.now);
    assert_eq!(code(w.start(A, "k", 10)), ErrorCode::NoSpaceYet);
    w.now += w.core.config().node_ttl;
    assert_eq!(code(w.start(A, "k", 10)), ErrorCode::NoSegment);
    w.node(1, &[(10, 64 * MIB)]);
    assert_eq!(code(w.start(A, "", 10)), ErrorCode::KeyTooLong);
    assert_eq!(
        code(w.start(A, &"x".repeat(MAX_KEY_LEN + 1), 10)),
        ErrorCode::KeyTooLong
    );
    assert_eq!(code(w.start(A, "k", 0)), ErrorCode::ValueTooLarge);
    assert_eq!(
        code(w.start(A, "k", (1 << 30) + 1)),
        ErrorCode::ValueTooLarge
    );
    let zero = replicated(0);
    assert_eq!(
        code(w.start_with(A, "k", 10, zero)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(w.start(A, "k", 65 * MIB)), ErrorCode::NoSpace);
}

#[test]
fn only_the_writer_ends_or_revokes_a_put() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    w.start(A, "k", 100).unwrap();
    assert_eq!(code(w.end(B, "k")), ErrorCode::NotWriter);
    assert_eq!(code(w.revoke(B, "k")), ErrorCode::NotWriter);
    w.end(A, "k").unwrap();
    w.end(A, "k").unwrap(); // a retried end is a no-op
    assert_eq!(code(w.end(B, "k")), ErrorCode::NotWriter);
    assert_eq!(code(w.end(A, "missing")), ErrorCode::NotFound);
    assert_eq!(
        code(w.revoke(A, "k")),
        ErrorCode::InvalidArgument,
        "committed: use remove"
    );
}

#[test]
fn revoke_frees_the_space() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.start(A, "k", MIB).unwrap();
    assert!(w.used(10) >= MIB);
    w.revoke(A, "k").unwrap();
    assert_eq!(w.used(10), 0);
    assert_eq!(code(w.end(A, "k")), ErrorCode::NotFound);
    assert_eq!(w.heartbeat(1, 0).frees, ids(&d));
}

#[test]
fn concurrent_put_starts_of_one_key_let_exactly_one_win() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let item = |len| PutStartItem {
        key: b"k".to_vec(),
        len,
        options: PutOptions::default(),
    };
    let r = w.core.put_start(
        w.now,
        PutStart {
            client: A,
            items: vec![item(10), item(20)],
        },
    );
    assert!(r.items[0].is_ok());
    assert_eq!(r.items[1].clone().unwrap_err().code, ErrorCode::Processing);
    assert_eq!(code(w.start(B, "k", 30)), ErrorCode::Processing);
    assert_eq!(code(w.end(B, "k")), ErrorCode::NotWriter);
    w.end(A, "k").unwrap();
    assert_eq!(w.get("k").unwrap().len, 10);
}

// ------------------------------------------------------------------ immutability

#[test]
fn committed_objects_are_immutable_unless_overwritten() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let old = w.put("k", 100);
    assert_eq!(code(w.start(B, "k", 200)), ErrorCode::AlreadyExists);

    let overwrite = overwriting();
    w.start_with(B, "k", 200, overwrite.clone()).unwrap();
    assert_eq!(
        code(w.get("k")),
        ErrorCode::NotFound,
        "the old value is gone, the new one not yet readable"
    );
    w.end(B, "k").unwrap();
    assert_eq!(w.get("k").unwrap().len, 200);
    assert_eq!(
        w.heartbeat(1, 0).frees,
        ids(&old),
        "the old replicas reach the node as frees"
    );

    // The get above leased it: the overwrite takes the key at once, but the leased bytes
    // stay reserved (not handed to the new put, not freed on the node) until the lease ends.
    let acked = w.heartbeat(1, 0).frees_upto;
    let used_before = w.core.status(w.now).nodes[0].segments[0].used;
    let leased = w.get("k").unwrap().replicas;
    w.start_with(A, "k", 300, overwrite).unwrap();
    assert!(w.core.status(w.now).nodes[0].segments[0].used >= used_before + 300);
    assert!(
        w.heartbeat(1, acked).frees.is_empty(),
        "leased bytes freed early"
    );
    w.pass(secs(11));
    w.core.tick(w.now);
    assert_eq!(
        w.heartbeat(1, acked).frees,
        ids(&leased),
        "freed when the lease ended"
    );
}

// ------------------------------------------------------------------ zombie puts

#[test]
fn a_stale_put_is_preempted_after_30s_and_its_space_freed_after_600s() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let zombie = w.start(A, "k", MIB).unwrap();
    w.pass(secs(29));
    assert_eq!(
        code(w.start(B, "k", MIB)),
        ErrorCode::Processing,
        "not stale yet"
    );
    w.pass(secs(2));
    let fresh = w.start(B, "k", MIB).unwrap();
    assert_ne!(
        zombie[0].offset, fresh[0].offset,
        "the zombie's bytes are not reused while it may write"
    );
    assert_eq!(
        code(w.end(A, "k")),
        ErrorCode::NotWriter,
        "the old writer lost the key"
    );
    w.end(B, "k").unwrap();
    let used_with_zombie = w.used(10);

    w.pass(secs(600 - 31 - 1));
    assert_eq!(w.used(10), used_with_zombie);
    assert!(w.heartbeat(1, 0).frees.is_empty());
    w.pass(secs(2));
    assert!(w.used(10) < used_with_zombie);
    assert_eq!(w.heartbeat(1, 0).frees, ids(&zombie));
    assert_eq!(w.get("k").unwrap().replicas, fresh);
}

#[test]
fn a_put_that_never_ends_is_released_after_600s() {
    let mut w = World::new();
    w.node(1, &[(10, 64 * MIB)]);
    let d = w.start(A, "k", MIB).unwrap();
    w.pass(secs(599));
    assert_eq!(w.core.status(w.now).processing, 1);
    w.pass(secs(1));
    assert_eq!(w.core.status(w.now).processing, 0);
    assert_eq!(w.used(10), 0);
    assert_eq!(w.heartbeat(1, 0).frees, ids(&d));
    assert_eq!(code(w.end(A, "k")), ErrorCode::NotFound);
}
