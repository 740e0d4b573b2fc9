//! Shared helpers: an in-process node on a loopback port and a raw-frame client.

#![allow(dead_code)]

use std::{future::Future, net::SocketAddr, time::Duration};

use kvpool_proto::{
    decode_body, encode_body, FrameHeader, FrameLimits, ObjectTag, Opcode, Read, ReadOp, ReplicaId,
    SegmentId, UnitResponse, Write, WriteOp,
};
use kvpool_store::{StoreConfig, StoreHandle};
use kvpool_transport::frame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A node with a small segment whose master is `master` (nothing need listen there).
pub async fn start_node(dram: u64, master: &str) -> StoreHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = StoreConfig {
        dram: kvpool_proto::ByteSize(dram),
        master: master.to_string(),
        name: Some("test-node".into()),
        ..StoreConfig::default()
    };
    kvpool_store::start(cfg, listener).await.unwrap()
}

/// An address where nothing listens (a free port, bound and released).
pub async fn dead_addr() -> String {
    let port = kvpool_testkit::free_port().expect("a free loopback port");
    format!("127.0.0.1:{port}")
}

pub fn seg(h: &StoreHandle) -> SegmentId {
    h.node().segments()[0].id()
}

/// Waits for `cond` to hold, polling with the testkit, up to [`DEADLINE`].
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    kvpool_testkit::wait_until(what, DEADLINE, || std::future::ready(cond())).await
}

/// Retries `attempt` every few milliseconds until it succeeds, up to [`DEADLINE`]; gives
/// its value.
pub async fn eventually_ok<T, E, Fut>(what: &str, mut attempt: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, E>>,
{
    let got = std::cell::RefCell::new(None);
    kvpool_testkit::wait_until(what, DEADLINE, || {
        let (fut, got) = (attempt(), &got);
        async move {
            match fut.await {
                Ok(v) => {
                    *got.borrow_mut() = Some(v);
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    got.into_inner().expect("set when the wait ended")
}

/// The tag of an object `replica` under `key`, whose bytes `data` are written at `offset`.
pub fn object_tag(replica: u64, key: &str, seg: SegmentId, offset: u64, data: &[u8]) -> ObjectTag {
    ObjectTag {
        replica: ReplicaId(replica),
        key: key.as_bytes().to_vec(),
        segment: seg,
        offset,
        len: data.len() as u64,
        checksum: kvpool_proto::crc32c::crc32c(data),
    }
}

/// Bounds a step of a test so that a server that hangs fails the test instead of stalling it.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Distinct, non-repeating bytes so that misplaced data is caught: the testkit's values.
pub use kvpool_testkit::value as pattern;

pub struct Response {
    pub header: FrameHeader,
    pub body: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Response {
    pub fn unit(&self) -> UnitResponse {
        assert_eq!(
            self.header.code(),
            kvpool_proto::ErrorCode::Ok,
            "{}",
            self.message()
        );
        decode_body(&self.body).unwrap()
    }

    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client that speaks raw frames, so tests control every byte.
pub struct RawClient {
    pub s: TcpStream,
    next_id: u64,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        RawClient { s, next_id: 100 }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send_write(
        &mut self,
        ops: &[(SegmentId, u64, &[u8])],
        tags: Vec<ObjectTag>,
    ) -> u64 {
        let id = self.id();
        let msg = Write {
            ops: ops
                .iter()
                .map(|&(segment, offset, data)| WriteOp {
                    segment,
                    offset,
                    len: data.len() as u64,
                })
                .collect(),
            tags,
        };
        let payload: u64 = ops.iter().map(|o| o.2.len() as u64).sum();
        self.s
            .write_all(&frame::encode_request(id, &msg, payload))
            .await
            .unwrap();
        for (_, _, data) in ops {
            self.s.write_all(data).await.unwrap();
        }
        id
    }

    pub async fn send_read(&mut self, ops: &[(SegmentId, u64, u64)]) -> u64 {
        let id = self.id();
        let msg = Read {
            ops: ops
                .iter()
                .map(|&(segment, offset, len)| ReadOp {
                    segment,
                    offset,
                    len,
                })
                .collect(),
            expect: vec![],
        };
        self.s
            .write_all(&frame::encode_request(id, &msg, 0))
            .await
            .unwrap();
        id
    }

    /// Sends a frame with an arbitrary opcode, body and payload.
    pub async fn send_raw(&mut self, opcode: u8, body: &[u8], payload: &[u8]) -> u64 {
        let id = self.id();
        let h = FrameHeader::request(opcode, id, body.len() as u32, payload.len() as u64);
        let mut buf = h.encode().to_vec();
        buf.extend_from_slice(body);
        buf.extend_from_slice(payload);
        self.s.write_all(&buf).await.unwrap();
        id
    }

    /// Reads one response frame; `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Response> {
        within("response", async {
            let header = frame::read_header(&mut self.s, &FrameLimits::default())
                .await
                .unwrap()?;
            assert!(header.is_response());
            let body = frame::read_body(&mut self.s, header.body_len)
                .await
                .unwrap();
            let mut payload = vec![0u8; header.payload_len as usize];
            frame::read_payload_into(&mut self.s, &mut payload)
                .await
                .unwrap();
            Some(Response {
                header,
                body,
                payload,
            })
        })
        .await
    }

    /// Expects the server to have closed the connection (after any responses already read).
    pub async fn expect_closed(&mut self) {
        within("close", async {
            let mut buf = [0u8; 64];
            if let Ok(n @ 1..) = self.s.read(&mut buf).await {
                panic!("expected the server to close, got {n} more bytes");
            }
        })
        .await
    }

    /// A full write-then-read round trip on this connection, checking the bytes.
    pub async fn round_trip(&mut self, segment: SegmentId, offset: u64, data: &[u8]) {
        let w = self.send_write(&[(segment, offset, data)], vec![]).await;
        let r = self.recv().await.expect("write response");
        assert_eq!(r.header.request_id, w);
        assert_eq!(r.unit().items, vec![Ok(())]);
        let id = self
            .send_read(&[(segment, offset, data.len() as u64)])
            .await;
        let r = self.recv().await.expect("read response");
        assert_eq!(r.header.request_id, id);
        assert_eq!(r.header.opcode, Opcode::Read as u8);
        assert_eq!(r.unit().items, vec![Ok(())]);
        assert!(r.payload == data, "read back different bytes");
    }
}

pub fn encode<T: serde::Serialize>(m: &T) -> Vec<u8> {
    encode_body(m)
}
