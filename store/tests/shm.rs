//! The shared-memory transport against a real node in this process: its Unix socket, the
//! token gate on it, memfds passed and mapped, puts and gets through the mapping, and the
//! commits that fill the node's inventory.

mod common;

use common::{dead_addr, object_tag, pattern, seg, within};
use kvpool_proto::{
    ErrorCode, FrameHeader, FrameLimits, NodeId, ReadOp, ShmAttach, Token, WriteOp, HEADER_LEN,
};
use kvpool_store::{StoreConfig, StoreHandle};
use kvpool_transport::{
    engine::{EngineOptions, Peer, ReadItem, TransferEngine, WriteItem},
    frame,
    shm::TransportMode,
    TransportError,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixStream},
};

async fn node_with(token: Option<&str>) -> StoreHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = StoreConfig {
        dram: kvpool_proto::ByteSize(8 << 20),
        master: dead_addr().await,
        name: Some("shm-node".into()),
        token: token.map(|t| Token::new(t).unwrap()),
        ..StoreConfig::default()
    };
    kvpool_store::start(cfg, listener).await.unwrap()
}

fn engine(mode: TransportMode, token: Option<&str>) -> TransferEngine {
    TransferEngine::new(EngineOptions {
        transport: mode,
        token: token.map(|t| Token::new(t).unwrap()),
        ..EngineOptions::default()
    })
}

/// Reads one response frame's header and body off `s`.
async fn response<S: AsyncReadExt + Unpin>(s: &mut S) -> (FrameHeader, Vec<u8>) {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).await.unwrap();
    let h = FrameHeader::decode(&head, &FrameLimits::default()).unwrap();
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).await.unwrap();
    (h, body)
}

#[tokio::test]
async fn puts_and_gets_go_through_the_mapping_and_commits_fill_the_inventory() {
    let node = node_with(Some("s3cret")).await;
    let addr = node.local_addr().to_string();
    let s = seg(&node);
    let e = engine(TransportMode::Shm, Some("s3cret"));
    let data = pattern(1, 3 << 20);
    let (a, b) = data.split_at(12_345);
    let tag = object_tag(7, "obj", s, 4096, &data);
    let peer = Peer {
        addr: &addr,
        node: Some(node.node().id()),
    };
    let op = WriteOp {
        segment: s,
        offset: 4096,
        len: data.len() as u64,
    };
    let put = WriteItem {
        op,
        data: vec![a, b],
    };
    let r = within("shm write", e.write(peer, vec![put], vec![tag])).await;
    assert!(r.unwrap()[0].is_ok());
    assert_eq!(e.transport_to(&addr), "shm");
    // The node holds the bytes (its own view, not the client's mapping) and the tag.
    let seen = node.node().segments()[0]
        .range(4096, data.len() as u64)
        .unwrap()
        .to_vec();
    assert!(seen == data, "node sees other bytes");
    assert_eq!(node.node().inventory().len(), 1);
    // A get scatters into a different shape; the crc32c is of what the caller got.
    let mut back = vec![0u8; data.len()];
    let (x, y) = back.split_at_mut(1 << 20);
    let get = ReadItem {
        op: ReadOp {
            segment: s,
            offset: 4096,
            len: data.len() as u64,
        },
        dst: vec![x, y],
    };
    let crc = within("shm read", e.read(peer, vec![get])).await.unwrap();
    assert_eq!(
        crc[0].as_ref().unwrap(),
        &kvpool_proto::crc32c::crc32c(&data)
    );
    assert!(back == data, "bytes differ");
    // Out-of-range ranges fail alone, as over TCP.
    let mut one = [0u8];
    let bad = ReadItem {
        op: ReadOp {
            segment: s,
            offset: 8 << 20,
            len: 1,
        },
        dst: vec![&mut one[..]],
    };
    let r = e.read(peer, vec![bad]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().code, ErrorCode::OutOfRange);
    node.shutdown().await;
}

#[tokio::test]
async fn the_socket_requires_the_token_and_tcp_cannot_attach() {
    let node = node_with(Some("s3cret")).await;
    let path = node
        .shm_socket()
        .expect("the node shares memory")
        .to_owned();
    // No Hello on the socket: refused, like TCP.
    let mut u = UnixStream::connect(&path).await.unwrap();
    u.write_all(&frame::encode_request(5, &ShmAttach {}, 0))
        .await
        .unwrap();
    let (h, _) = within("refusal", response(&mut u)).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::Unauthorized, 5));
    // A wrong token: the engine never maps anything, and a shm-only engine says why.
    let e = engine(TransportMode::Shm, Some("wrong"));
    let addr = node.local_addr().to_string();
    let r = e.read(addr.as_str(), Vec::new()).await;
    assert!(
        matches!(&r, Err(TransportError::Remote(w)) if w.code == ErrorCode::InvalidArgument),
        "{r:?}"
    );
    // Over TCP (with the token), ShmAttach is answered WrongService: descriptors need a
    // Unix socket.
    let mut t = TcpStream::connect(node.local_addr()).await.unwrap();
    kvpool_transport::auth::client_hello(
        &mut t,
        &Token::new("s3cret").unwrap(),
        &FrameLimits::default(),
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    t.write_all(&frame::encode_request(6, &ShmAttach {}, 0))
        .await
        .unwrap();
    let (h, _) = within("tcp attach", response(&mut t)).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::WrongService, 6));
    node.shutdown().await;
    assert!(!path.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn auto_uses_tcp_for_a_node_that_is_not_the_expected_one_and_shm_refuses() {
    let node = node_with(None).await;
    let addr = node.local_addr().to_string();
    let s = seg(&node);
    let stranger = Peer {
        addr: &addr,
        node: Some(NodeId(node.node().id().0 ^ 1)),
    };
    let data = pattern(2, 100_000);
    let mut back = vec![0u8; data.len()];
    node.node().segments()[0]
        .range(0, data.len() as u64)
        .unwrap()
        .copy_from(&data);
    let op = ReadOp {
        segment: s,
        offset: 0,
        len: data.len() as u64,
    };
    // Auto: the mapping belongs to another node than the master named, so TCP serves it.
    let auto = engine(TransportMode::Auto, None);
    let r = auto
        .read(stranger, vec![ReadItem::new(op, &mut back)])
        .await
        .unwrap();
    assert!(r[0].is_ok() && back == data);
    // Shm only: refused with the reason.
    let shm = engine(TransportMode::Shm, None);
    let r = shm.read(stranger, vec![ReadItem::new(op, &mut back)]).await;
    match r {
        Err(TransportError::Remote(w)) => assert!(w.message.contains("not"), "{}", w.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A status display's probe: auto attaches, TCP only never does.
    assert_eq!(auto.probe(&addr).await, "shm");
    assert_eq!(engine(TransportMode::Tcp, None).probe(&addr).await, "tcp");
    // TCP only never attaches.
    let tcp = engine(TransportMode::Tcp, None);
    tcp.read(addr.as_str(), vec![ReadItem::new(op, &mut back)])
        .await
        .unwrap();
    assert_eq!(tcp.transport_to(&addr), "tcp");
    node.shutdown().await;
}
