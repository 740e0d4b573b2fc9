//! The data server over real loopback TCP, driven with raw frames.

mod common;

use common::*;
use kvpool_proto::{
    header::FLAG_RESPONSE, ErrorCode, FrameHeader, ObjectTag, Opcode, Read, ReadOp, ReplicaId,
    SegmentId, Write, WriteOp, HEADER_LEN,
};
use kvpool_transport::frame;
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_back_byte_for_byte() {
    let node = start_node(32 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;

    // Sizes on both sides of the buffered/direct threshold, and a multi-op batch.
    let sizes = [
        1usize,
        4096,
        64 << 10,
        (64 << 10) - 1,
        300_000,
        3 << 20,
        5 << 20,
    ];
    let blobs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64, n))
        .collect();
    let mut ops = Vec::new();
    let mut off = 12_345u64;
    for b in &blobs {
        ops.push((seg, off, b.as_slice()));
        off += b.len() as u64 + 7;
    }
    let wid = c.send_write(&ops, vec![]).await;
    // Pipelined: the read goes out before the write's answer is read.
    let rops: Vec<_> = ops
        .iter()
        .map(|&(s, o, b)| (s, o, b.len() as u64))
        .collect();
    let rid = c.send_read(&rops).await;

    let w = c.recv().await.unwrap();
    assert_eq!(w.header.request_id, wid);
    assert_eq!(w.header.opcode, Opcode::Write as u8);
    assert_eq!(w.header.flags & FLAG_RESPONSE, FLAG_RESPONSE);
    assert!(w.unit().items.iter().all(|r| r.is_ok()));
    let r = c.recv().await.unwrap();
    assert_eq!(r.header.request_id, rid);
    assert_eq!(r.unit().items.len(), blobs.len());
    let expected: Vec<u8> = blobs.concat();
    assert_eq!(r.payload.len(), expected.len());
    assert!(r.payload == expected, "bytes differ");

    // Many small pipelined round trips on one connection.
    for i in 0..200u64 {
        c.send_write(
            &[(seg, 20 * MIB + i * 4096, &pattern(1000 + i, 4096))],
            vec![],
        )
        .await;
    }
    for _ in 0..200 {
        assert_eq!(c.recv().await.unwrap().unit().items, vec![Ok(())]);
    }
    let rops: Vec<_> = (0..200u64)
        .map(|i| (seg, 20 * MIB + i * 4096, 4096))
        .collect();
    c.send_read(&rops).await;
    let r = c.recv().await.unwrap();
    let expected: Vec<u8> = (0..200u64).flat_map(|i| pattern(1000 + i, 4096)).collect();
    assert!(r.payload == expected);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranges_fail_per_op_and_the_connection_keeps_serving() {
    let node = start_node(4 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;
    let a = pattern(1, 1000);
    let b = pattern(2, 2000);
    let oob = pattern(3, 100);
    let c2 = pattern(4, 3000);
    c.send_write(
        &[
            (seg, 0, &a),
            (seg, 4 * MIB - 50, &oob),
            (SegmentId(seg.0 ^ 1), 0, &b),
            (seg, 10_000, &c2),
        ],
        vec![],
    )
    .await;
    let items = c.recv().await.unwrap().unit().items;
    assert!(items[0].is_ok() && items[3].is_ok());
    assert_eq!(items[1].as_ref().unwrap_err().code, ErrorCode::OutOfRange);
    assert_eq!(
        items[2].as_ref().unwrap_err().code,
        ErrorCode::UnknownSegment
    );

    // The refused ops' bytes were skipped, so the good ones landed intact.
    c.send_read(&[
        (seg, 0, 1000),
        (seg, u64::MAX, 2),
        (seg, 10_000, 3000),
        (seg, 4 * MIB, 1),
    ])
    .await;
    let r = c.recv().await.unwrap();
    let items = r.unit().items;
    assert!(items[0].is_ok() && items[2].is_ok());
    assert_eq!(items[1].as_ref().unwrap_err().code, ErrorCode::OutOfRange);
    assert_eq!(items[3].as_ref().unwrap_err().code, ErrorCode::OutOfRange);
    assert_eq!(r.header.payload_len, 4000);
    assert!(r.payload == [a.as_slice(), c2.as_slice()].concat());

    c.round_trip(seg, 50_000, &pattern(5, 70_000)).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skippable_bad_requests_get_errors_and_the_connection_keeps_serving() {
    let node = start_node(4 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;

    let id = c.send_raw(0x5e, b"whatever", &[1, 2, 3]).await;
    let r = c.recv().await.unwrap();
    assert_eq!((r.header.request_id, r.header.opcode), (id, 0x5e));
    assert_eq!(r.header.code(), ErrorCode::UnknownOpcode);
    assert!(r.message().contains("0x5e"), "{}", r.message());

    let id = c
        .send_raw(Opcode::GetReplicas as u8, b"\x01\x01k", &[])
        .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r.header.request_id, id);
    assert_eq!(r.header.code(), ErrorCode::WrongService);

    // A write whose body does not decode: its payload is skipped.
    let id = c
        .send_raw(Opcode::Write as u8, &[0xff; 11], &pattern(9, 5000))
        .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r.header.request_id, id);
    assert_eq!(r.header.code(), ErrorCode::MalformedBody);

    // Trailing bytes after a valid Read body are malformed too.
    let mut body = encode(&Read {
        ops: vec![ReadOp {
            segment: seg,
            offset: 0,
            len: 1,
        }],
        expect: vec![],
    });
    body.push(0);
    c.send_raw(Opcode::Read as u8, &body, &[]).await;
    assert_eq!(
        c.recv().await.unwrap().header.code(),
        ErrorCode::MalformedBody
    );

    c.round_trip(seg, 0, &pattern(10, 100_000)).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_never_waits_for_the_rest_of_a_partly_sent_next_frame() {
    let node = start_node(4 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;
    let first = frame::encode_request(
        1,
        &Read {
            ops: vec![ReadOp {
                segment: seg,
                offset: 0,
                len: 8,
            }],
            expect: vec![],
        },
        0,
    );
    let second = frame::encode_request(
        2,
        &Read {
            ops: vec![ReadOp {
                segment: seg,
                offset: 8,
                len: 8,
            }],
            expect: vec![],
        },
        0,
    );
    // The first request, then part of the second's header, then part of its body.
    for split in [HEADER_LEN / 2, HEADER_LEN + 1] {
        let mut bytes = first.clone();
        bytes.extend_from_slice(&second[..split]);
        c.s.write_all(&bytes).await.unwrap();
        let r = c.recv().await.unwrap();
        assert_eq!(r.header.request_id, 1);
        c.s.write_all(&second[split..]).await.unwrap();
        assert_eq!(c.recv().await.unwrap().header.request_id, 2);
    }
    node.shutdown().await;
}

/// Opens a connection, sends `bytes`, and expects one error response with `code`, then a close.
async fn expect_fatal(
    addr: std::net::SocketAddr,
    bytes: &[u8],
    half_close: bool,
    code: ErrorCode,
) -> u64 {
    let mut c = RawClient::connect(addr).await;
    c.s.write_all(bytes).await.unwrap();
    if half_close {
        c.s.shutdown().await.unwrap();
    }
    let r = c.recv().await.expect("an error response before the close");
    assert_eq!(r.header.code(), code, "{}", r.message());
    assert!(!r.message().is_empty());
    c.expect_closed().await;
    r.header.request_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_get_an_error_and_a_close_while_others_keep_working() {
    let node = start_node(4 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let addr = node.local_addr();
    // A healthy connection open across all the abuse.
    let mut good = RawClient::connect(addr).await;
    good.round_trip(seg, 0, &pattern(1, 10_000)).await;

    // Wrong version (the header is otherwise valid).
    let mut h = FrameHeader::request(Opcode::Read as u8, 5, 0, 0).encode();
    h[2] = 9;
    expect_fatal(addr, &h, false, ErrorCode::UnsupportedVersion).await;

    // Random bytes: not a kvpool peer.
    expect_fatal(addr, &pattern(77, 4096), false, ErrorCode::BadMagic).await;

    // A header corrupted in flight.
    let mut h = FrameHeader::request(Opcode::Read as u8, 5, 0, 0).encode();
    h[12] ^= 0x40;
    expect_fatal(addr, &h, false, ErrorCode::BadHeaderChecksum).await;

    // An oversized body is refused before anything is allocated, with the request's id.
    let h = FrameHeader::request(Opcode::Write as u8, 4242, u32::MAX, 0).encode();
    assert_eq!(
        expect_fatal(addr, &h, false, ErrorCode::FrameTooLarge).await,
        4242
    );

    // Truncated: a header promising a body that never comes, then end of stream.
    let body = encode(&Write {
        ops: vec![WriteOp {
            segment: seg,
            offset: 0,
            len: 100,
        }],
        tags: vec![],
    });
    let h = FrameHeader::request(Opcode::Write as u8, 7, body.len() as u32, 100).encode();
    let mut bytes = h.to_vec();
    bytes.extend_from_slice(&body[..body.len() / 2]);
    assert_eq!(
        expect_fatal(addr, &bytes, true, ErrorCode::Truncated).await,
        7
    );
    // ... a payload cut short ...
    let mut bytes = h.to_vec();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(&[0u8; 60]);
    assert_eq!(
        expect_fatal(addr, &bytes, true, ErrorCode::Truncated).await,
        7
    );
    // ... and half a header.
    expect_fatal(addr, &h[..HEADER_LEN / 2], true, ErrorCode::Truncated).await;

    // Op lengths that disagree with the payload length: the framing is not trusted.
    let h = FrameHeader::request(Opcode::Write as u8, 8, body.len() as u32, 99).encode();
    let mut bytes = h.to_vec();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(&[0u8; 99]);
    assert_eq!(
        expect_fatal(addr, &bytes, false, ErrorCode::MalformedBody).await,
        8
    );

    // A client that connects and leaves without a byte is just a closed connection.
    drop(RawClient::connect(addr).await);

    good.round_trip(seg, 20_000, &pattern(2, 200_000)).await;
    let mut fresh = RawClient::connect(addr).await;
    fresh.round_trip(seg, 300_000, &pattern(3, 1000)).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_build_an_inventory_that_drops_overwritten_objects() {
    let node = start_node(4 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;
    let tag = |replica: u64, offset: u64, data: &[u8]| {
        object_tag(replica, &format!("k{replica}"), seg, offset, data)
    };
    let a = pattern(1, 100_000);
    let b = pattern(2, 5000);
    // b is written in two stripes over two requests, its tag going with the first.
    c.send_write(
        &[(seg, 0, &a), (seg, 200_000, &b[..3000])],
        vec![tag(1, 0, &a), tag(2, 200_000, &b)],
    )
    .await;
    c.recv().await.unwrap();
    // Before the second stripe lands, b's bytes do not match and it is not reported.
    let report = node.node().inventory().report(node.node().segments());
    assert_eq!(report.iter().map(|e| e.replica.0).collect::<Vec<_>>(), [1]);

    c.send_write(&[(seg, 203_000, &b[3000..])], vec![tag(2, 200_000, &b)])
        .await;
    c.recv().await.unwrap();
    let report = node.node().inventory().report(node.node().segments());
    assert_eq!(
        report.iter().map(|e| e.replica.0).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(report[0].key, b"k1");
    assert_eq!(report[1].checksum, kvpool_proto::crc32c::crc32c(&b));

    // Space of a reused without a tag (the new writer's tag went on another connection):
    // a's bytes no longer match, so it is dropped from the report.
    c.send_write(&[(seg, 50_000, &pattern(3, 10))], vec![])
        .await;
    c.recv().await.unwrap();
    let report = node.node().inventory().report(node.node().segments());
    assert_eq!(report.iter().map(|e| e.replica.0).collect::<Vec<_>>(), [2]);

    // A new tag overlapping b replaces it outright.
    let d = pattern(4, 100);
    c.send_write(&[(seg, 204_950, &d)], vec![tag(4, 204_950, &d)])
        .await;
    c.recv().await.unwrap();
    assert!(node.node().inventory().get(ReplicaId(2)).is_none());
    // A tag outside the segment is ignored.
    c.send_write(
        &[],
        vec![ObjectTag {
            offset: 4 * MIB,
            ..tag(5, 0, &d)
        }],
    )
    .await;
    c.recv().await.unwrap();
    assert!(node.node().inventory().get(ReplicaId(5)).is_none());
    node.shutdown().await;
}

/// A read from a client's cached location names the replica it expects: served while the
/// node's inventory holds that replica's tag over the range, `StaleLocation` once the tag
/// is gone (freed) or names another replica, and never with bytes for a refused op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_read_is_served_only_while_the_range_holds_the_replica() {
    let node = start_node(4 * MIB, &dead_addr().await).await;
    let seg = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;
    // One value above the direct-send threshold, one below it.
    let (a, b) = (pattern(1, 100_000), pattern(2, 4096));
    c.send_write(
        &[(seg, 0, &a), (seg, 200_000, &b)],
        vec![
            object_tag(7, "a", seg, 0, &a),
            object_tag(8, "b", seg, 200_000, &b),
        ],
    )
    .await;
    c.recv().await.unwrap().unit();
    let ops = vec![
        ReadOp {
            segment: seg,
            offset: 0,
            len: a.len() as u64,
        },
        ReadOp {
            segment: seg,
            offset: 200_000,
            len: b.len() as u64,
        },
    ];
    let r = checked_read(&mut c, &ops, vec![Some(ReplicaId(7)), Some(ReplicaId(8))]).await;
    assert_eq!(r.unit().items, vec![Ok(()), Ok(())]);
    assert!(r.payload == [a.clone(), b.clone()].concat());

    // The wrong replica for the first op: refused, and only the second op's bytes follow.
    let r = checked_read(&mut c, &ops, vec![Some(ReplicaId(8)), None]).await;
    let items = r.unit().items;
    assert_eq!(
        items[0].as_ref().unwrap_err().code,
        ErrorCode::StaleLocation
    );
    assert_eq!(items[1], Ok(()));
    assert!(r.payload == b);

    // Freed (as a heartbeat's frees do): stale from then on.
    node.node().free(&[ReplicaId(7)]);
    let r = checked_read(&mut c, &ops, vec![Some(ReplicaId(7)), Some(ReplicaId(8))]).await;
    let items = r.unit().items;
    assert_eq!(
        items[0].as_ref().unwrap_err().code,
        ErrorCode::StaleLocation
    );
    assert_eq!(items[1], Ok(()));
    assert!(r.payload == b);

    // One expectation for two ops is malformed as a whole.
    let r = checked_read(&mut c, &ops, vec![Some(ReplicaId(8))]).await;
    assert_eq!(r.header.code(), ErrorCode::InvalidArgument);
    node.shutdown().await;
}

async fn checked_read(
    c: &mut RawClient,
    ops: &[ReadOp],
    expect: Vec<Option<ReplicaId>>,
) -> Response {
    let body = encode(&Read {
        ops: ops.to_vec(),
        expect,
    });
    c.send_raw(Opcode::Read as u8, &body, &[]).await;
    c.recv().await.unwrap()
}
