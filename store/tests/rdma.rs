//! RDMA wiring that runs without a device, against a real node in this process on loopback:
//! the node's answer to `RdmaConnect` (`TransportUnsupported`, the connection still usable),
//! `RdmaWritten` filling the inventory exactly as a client sends it after its one-sided
//! WRITEs, and the transfer engine's selection: `auto` falls back (a put/get round trip
//! works, the transport shown is the one used), `rdma` forced fails naming why, registered
//! buffers are recorded. Run with and without `--features rdma`: without a device both
//! builds must behave the same here. Where a device exists (feature `rdma`), the no-device
//! tests log their skip and `over_a_device_puts_and_gets_go_over_rdma` runs instead; where
//! none does, that one logs its skip.

mod common;

use common::{dead_addr, encode, object_tag, pattern, seg, within, RawClient};
use kvpool_proto::{
    rdma::{LinkLayer, QpEndpoint, RdmaEndpoint, RdmaPort, RdmaWritten, RDMA_VERSION},
    ErrorCode, Opcode, ReadOp, ReplicaId, ShmInfo, WriteOp,
};
use kvpool_store::{StoreConfig, StoreHandle};
use kvpool_transport::{
    engine::{EngineOptions, ReadItem, TransferEngine, WriteItem},
    shm::TransportMode,
    TransportError,
};
use tokio::net::TcpListener;

async fn node(shm: bool) -> StoreHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = StoreConfig {
        dram: kvpool_proto::ByteSize(8 << 20),
        master: dead_addr().await,
        name: Some("rdma-node".into()),
        shm,
        ..StoreConfig::default()
    };
    kvpool_store::start(cfg, listener).await.unwrap()
}

/// Whether this host has a usable RDMA device (and this build the feature).
fn device_present() -> bool {
    #[cfg(feature = "rdma")]
    {
        use kvpool_transport::rdma::{DeviceOptions, RdmaDevice};
        RdmaDevice::open(&DeviceOptions::from_env()).is_ok()
    }
    #[cfg(not(feature = "rdma"))]
    false
}

/// Skips a test that asserts there is no RDMA device, where there is one.
fn skip_with_a_device(test: &str) -> bool {
    let present = device_present();
    if present {
        kvpool_testkit::skip::skipped(test, "this host has an RDMA device; the test needs none");
    }
    present
}

fn engine(mode: TransportMode) -> TransferEngine {
    TransferEngine::new(EngineOptions {
        transport: mode,
        ..EngineOptions::default()
    })
}

/// A well-formed handshake request, as a client with a RoCE device would send it.
fn connect_body() -> Vec<u8> {
    RdmaEndpoint {
        version: RDMA_VERSION,
        port: RdmaPort {
            link_layer: LinkLayer::Ethernet,
            lid: 0,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            mtu: 1024,
        },
        qps: vec![QpEndpoint {
            qp_num: 0x11,
            psn: 0x1234,
        }],
        regions: vec![],
    }
    .encode()
}

#[tokio::test]
async fn a_node_without_a_device_answers_rdma_connect_unsupported_and_keeps_serving() {
    if skip_with_a_device(
        "rdma a_node_without_a_device_answers_rdma_connect_unsupported_and_keeps_serving",
    ) {
        return;
    }
    let node = node(false).await;
    let s = seg(&node);
    let mut c = RawClient::connect(node.local_addr()).await;
    let id = c
        .send_raw(Opcode::RdmaConnect as u8, &connect_body(), &[])
        .await;
    let r = c.recv().await.expect("an answer, not a closed connection");
    assert_eq!(r.header.request_id, id);
    assert_eq!(r.header.opcode, Opcode::RdmaConnect as u8);
    assert_eq!(
        r.header.code(),
        ErrorCode::TransportUnsupported,
        "{}",
        r.message()
    );
    assert!(
        r.message().contains("use shared memory or TCP"),
        "{}",
        r.message()
    );
    // Even a body no device would accept is answered the same way: the node never got as
    // far as reading it.
    c.send_raw(Opcode::RdmaConnect as u8, b"junk", &[]).await;
    let r = c.recv().await.expect("an answer");
    assert_eq!(r.header.code(), ErrorCode::TransportUnsupported);
    // The connection still carries the TCP data plane.
    c.round_trip(s, 4096, &pattern(9, 100_000)).await;
    c.send_raw(Opcode::ShmInfo as u8, &encode(&ShmInfo {}), &[])
        .await;
    assert_eq!(c.recv().await.unwrap().header.code(), ErrorCode::Ok);
    node.shutdown().await;
}

#[tokio::test]
async fn rdma_written_records_the_tags_of_bytes_the_node_never_saw_arrive() {
    let node = node(false).await;
    let s = seg(&node);
    let data = pattern(4, 300_000);
    // The bytes land in the segment without any tag, as a one-sided WRITE leaves them (here
    // by an untagged TCP Write: the node's CPU records nothing either way).
    let mut c = RawClient::connect(node.local_addr()).await;
    c.send_write(&[(s, 8192, &data)], vec![]).await;
    assert_eq!(c.recv().await.unwrap().unit().items, vec![Ok(())]);
    assert!(node.node().inventory().get(ReplicaId(7)).is_none());

    let good = object_tag(7, "obj", s, 8192, &data);
    let past_end = object_tag(8, "past", s, (8 << 20) - 10, &data);
    let other = object_tag(9, "other", kvpool_proto::SegmentId(s.0 ^ 1), 0, &data);
    let msg = RdmaWritten {
        tags: vec![good.clone(), past_end, other],
    };
    let id = c
        .send_raw(Opcode::RdmaWritten as u8, &encode(&msg), &[])
        .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r.header.request_id, id);
    let items = r.unit().items;
    assert_eq!(items[0], Ok(()));
    assert_eq!(items[1].as_ref().unwrap_err().code, ErrorCode::OutOfRange);
    assert_eq!(
        items[2].as_ref().unwrap_err().code,
        ErrorCode::UnknownSegment
    );
    assert_eq!(node.node().inventory().get(ReplicaId(7)), Some(good));
    assert!(node.node().inventory().get(ReplicaId(8)).is_none());
    // The report a restarted master would get lists it: its bytes match the checksum.
    let report = node.node().inventory().report(node.node().segments());
    assert!(
        report.iter().any(|e| e.replica == ReplicaId(7)),
        "{report:?}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn auto_falls_back_and_shows_the_transport_it_used() {
    if skip_with_a_device("rdma auto_falls_back_and_shows_the_transport_it_used") {
        return;
    }
    for shm in [false, true] {
        let node = node(shm).await;
        let addr = node.local_addr().to_string();
        let s = seg(&node);
        let e = engine(TransportMode::Auto);
        let data = pattern(5, 2 << 20);
        let (a, b) = data.split_at(777_777);
        let op = WriteOp {
            segment: s,
            offset: 0,
            len: data.len() as u64,
        };
        let tag = object_tag(11, "k", s, 0, &data);
        let put = WriteItem {
            op,
            data: vec![a, b],
        };
        let r = within("write", e.write(addr.as_str(), vec![put], vec![tag])).await;
        assert_eq!(r.unwrap(), vec![Ok(kvpool_proto::crc32c::crc32c(&data))]);
        let mut back = vec![0u8; data.len()];
        let get = ReadItem::new(
            ReadOp {
                segment: s,
                offset: 0,
                len: data.len() as u64,
            },
            &mut back,
        );
        let r = within("read", e.read(addr.as_str(), vec![get])).await;
        assert_eq!(r.unwrap(), vec![Ok(kvpool_proto::crc32c::crc32c(&data))]);
        assert!(back == data, "read back different bytes");
        assert!(node.node().inventory().get(ReplicaId(11)).is_some());
        // What was used, and what a status display would show: never rdma without a device.
        let want = if shm { "shm" } else { "tcp" };
        assert_eq!(e.transport_to(&addr), want, "shm = {shm}");
        assert_eq!(within("probe", e.probe(&addr)).await, want);
        node.shutdown().await;
    }
}

#[tokio::test]
async fn forced_rdma_without_a_device_fails_naming_why() {
    if skip_with_a_device("rdma forced_rdma_without_a_device_fails_naming_why") {
        return;
    }
    // A same-host node that shares its memory: `rdma` must not quietly use shared memory.
    let node = node(true).await;
    let addr = node.local_addr().to_string();
    let s = seg(&node);
    let e = engine(TransportMode::Rdma);
    let data = pattern(6, 4096);
    let put = WriteItem::new(
        WriteOp {
            segment: s,
            offset: 0,
            len: 4096,
        },
        &data,
    );
    let err = within("write", e.write(addr.as_str(), vec![put], vec![]))
        .await
        .unwrap_err();
    let TransportError::Remote(w) = &err else {
        panic!("not a typed error: {err}");
    };
    assert_eq!(w.code, ErrorCode::TransportUnsupported);
    assert!(
        w.message.contains("transport = rdma") && w.message.contains(&addr),
        "{}",
        w.message
    );
    // The reason: this host has no device (here: no kernel RDMA at all), or this build no
    // RDMA.
    let why = if cfg!(feature = "rdma") {
        "RDMA unavailable"
    } else {
        "built without RDMA"
    };
    assert!(w.message.contains(why), "{}", w.message);
    let mut back = vec![0u8; 4096];
    let get = ReadItem::new(
        ReadOp {
            segment: s,
            offset: 0,
            len: 4096,
        },
        &mut back,
    );
    let err = within("read", e.read(addr.as_str(), vec![get]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::TransportUnsupported);
    assert_eq!(e.transport_to(&addr), "tcp");
    assert_eq!(within("probe", e.probe(&addr)).await, "-");
    // Nothing was written behind the error's back.
    let seen = node.node().segments()[0].range(0, 4096).unwrap().to_vec();
    assert!(seen.iter().all(|&b| b == 0));
    node.shutdown().await;
}

#[tokio::test]
async fn registered_buffers_are_recorded_and_transfers_from_them_work_anywhere() {
    let node = node(false).await;
    let addr = node.local_addr().to_string();
    let s = seg(&node);
    let e = engine(TransportMode::Auto);
    let data = pattern(8, 1 << 20);
    let base = data.as_ptr() as u64;
    // SAFETY: `data` outlives every use below and is unregistered before it is dropped.
    unsafe {
        e.register_buffer(base, data.len() as u64).unwrap();
        e.register_buffer(base, data.len() as u64).unwrap();
        let err = e.register_buffer(base + 1, 10).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }
    assert_eq!(e.registered_buffers(), vec![(base, data.len() as u64)]);
    let put = WriteItem::new(
        WriteOp {
            segment: s,
            offset: 65536,
            len: data.len() as u64,
        },
        &data,
    );
    let r = within("write", e.write(addr.as_str(), vec![put], vec![])).await;
    assert_eq!(r.unwrap(), vec![Ok(kvpool_proto::crc32c::crc32c(&data))]);
    let seen = node.node().segments()[0]
        .range(65536, data.len() as u64)
        .unwrap()
        .to_vec();
    assert!(seen == data);
    assert!(e.unregister_buffer(base).unwrap());
    assert!(!e.unregister_buffer(base).unwrap());
    assert!(e.registered_buffers().is_empty());
    node.shutdown().await;
}

/// The whole wiring on a real device: the node registers its segment and answers
/// `RdmaConnect`, the client puts with WRITEs (one piece from a registered buffer, one through
/// the bounce buffer) and the node records the tag from `RdmaWritten`; gets come back with
/// READs; `transport_to` says `rdma`. Skipped (and logged) where there is no device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_device_puts_and_gets_go_over_rdma() {
    if !device_present() {
        kvpool_testkit::skip::skipped(
            "rdma over_a_device_puts_and_gets_go_over_rdma",
            "no usable RDMA device on this host (or a build without the `rdma` feature)",
        );
        return;
    }
    let node = node(false).await;
    let addr = node.local_addr().to_string();
    let s = seg(&node);
    let e = engine(TransportMode::Rdma);
    let data = pattern(12, 3 << 20);
    // SAFETY: `data` outlives every transfer below and is unregistered before it is dropped.
    unsafe { e.register_buffer(data.as_ptr() as u64, 1 << 20).unwrap() };
    let (registered, bounced) = data.split_at(1 << 20);
    let tag = object_tag(21, "over-rdma", s, 4096, &data);
    let put = WriteItem {
        op: WriteOp {
            segment: s,
            offset: 4096,
            len: data.len() as u64,
        },
        data: vec![registered, bounced],
    };
    let r = within(
        "rdma write",
        e.write(addr.as_str(), vec![put], vec![tag.clone()]),
    )
    .await;
    assert_eq!(r.unwrap(), vec![Ok(kvpool_proto::crc32c::crc32c(&data))]);
    assert_eq!(e.transport_to(&addr), "rdma");
    assert_eq!(node.node().inventory().get(ReplicaId(21)), Some(tag));
    let seen = node.node().segments()[0]
        .range(4096, data.len() as u64)
        .unwrap()
        .to_vec();
    assert!(seen == data, "the segment holds other bytes");
    let mut back = vec![0u8; data.len()];
    let (a, b) = back.split_at_mut(12_345);
    let get = ReadItem {
        op: ReadOp {
            segment: s,
            offset: 4096,
            len: data.len() as u64,
        },
        dst: vec![a, b],
    };
    let r = within("rdma read", e.read(addr.as_str(), vec![get])).await;
    assert_eq!(r.unwrap(), vec![Ok(kvpool_proto::crc32c::crc32c(&data))]);
    assert!(back == data, "read back different bytes");
    assert!(e.unregister_buffer(data.as_ptr() as u64).unwrap());
    node.shutdown().await;
}
