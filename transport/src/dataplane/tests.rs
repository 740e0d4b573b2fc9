//! The streamed read answer over a real socket, against a store whose slower-tier reads the
//! test completes in the order it chooses (a real disk cannot be made to finish a request's
//! first read last on demand). The client side is the real transfer engine, or raw frames
//! where the test checks the bytes on the wire and when they arrive.

use std::{
    collections::{HashMap, HashSet},
    os::fd::BorrowedFd,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::StreamExt;
use kvpool_proto::{
    decode_body, header::FLAG_STREAMED, ErrorCode, FrameLimits, NodeId, ObjectTag, Read, ReadOp,
    ReadStatus, ReplicaId, SegmentId, ShmSegment, UnitResponse, WireError,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use super::{serve, DataServerOptions, OwnedBytes, SegmentStore, Source};
use crate::{
    engine::{EngineOptions, ReadItem, TransferEngine},
    frame,
    memory::SharedRange,
    shm::TransportMode,
};

/// Parts a value is read in.
const PART: usize = 96 << 10;

/// Longest a test waits for anything.
const WAIT: Duration = Duration::from_secs(10);

/// One value of the test store: its bytes, or the error its read ends with.
type Value = Result<Vec<u8>, WireError>;

/// A store of one "disk" segment: the value at an offset is read once the test opens that
/// offset's gate (ungated offsets read at once).
#[derive(Default)]
struct Gated {
    values: HashMap<u64, Value>,
    /// Offsets whose read fails after its first part landed (a check after the last part).
    torn: HashSet<u64>,
    gates: Mutex<HashMap<u64, oneshot::Receiver<()>>>,
    /// Reads that finished, and reads dropped before they finished.
    landed: AtomicUsize,
    dropped: Arc<AtomicUsize>,
}

/// Counts a read dropped before it finished.
struct DropCount(Option<Arc<AtomicUsize>>);

impl Drop for DropCount {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Gated {
    fn with(values: Vec<(u64, Value)>) -> Gated {
        Gated {
            values: values.into_iter().collect(),
            ..Gated::default()
        }
    }

    /// Makes the read at `offset` wait for the returned sender.
    fn gate(&self, offset: u64) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.gates.lock().unwrap().insert(offset, rx);
        tx
    }
}

impl SegmentStore for Gated {
    fn limits(&self) -> &FrameLimits {
        static LIMITS: FrameLimits = FrameLimits {
            max_body: 64 << 20,
            max_payload: 4 << 30,
        };
        &LIMITS
    }

    fn read_range(&self, _: SegmentId, offset: u64, len: u64) -> Result<Source<'_>, WireError> {
        let Some(v) = self.values.get(&offset) else {
            return Err(WireError::new(ErrorCode::OutOfRange, "no value there"));
        };
        if v.as_ref().is_ok_and(|b| b.len() as u64 != len) {
            return Err(WireError::new(ErrorCode::OutOfRange, "wrong length"));
        }
        let gate = self.gates.lock().unwrap().remove(&offset);
        let dropped = self.dropped.clone();
        let torn = self.torn.contains(&offset);
        let read = async move {
            let mut guard = DropCount(Some(dropped));
            if let Some(g) = gate {
                let _ = g.await;
            }
            guard.0 = None;
            self.landed.fetch_add(1, Ordering::SeqCst);
            v.clone()
        };
        // In parts, as the NVMe tier yields a split read; a torn value fails after its first.
        let parts = futures::stream::once(read).flat_map(move |v| {
            let parts: Vec<Result<OwnedBytes, WireError>> = match v {
                Ok(b) => {
                    let mut p: Vec<_> = b
                        .chunks(PART)
                        .map(|c| Ok(Box::new(c.to_vec()) as OwnedBytes))
                        .collect();
                    if torn {
                        p.truncate(1);
                        p.push(Err(WireError::new(ErrorCode::NotFound, "torn: dropped")));
                    }
                    p
                }
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(parts)
        });
        Ok(Source::Disk(Box::pin(parts)))
    }

    fn write_range(&self, _: SegmentId, _: u64, _: u64) -> Result<SharedRange, WireError> {
        Err(WireError::new(ErrorCode::InvalidArgument, "read-only"))
    }
    fn holds(&self, _: SegmentId, _: u64, _: u64, _: ReplicaId) -> bool {
        false
    }
    fn record_tags(&self, _: Vec<ObjectTag>) {}
    fn commit_tag(&self, _: ObjectTag) -> Result<(), WireError> {
        Err(WireError::new(ErrorCode::InvalidArgument, "read-only"))
    }
    fn node_id(&self) -> NodeId {
        NodeId(1)
    }
    fn shared_segments(&self) -> Vec<(ShmSegment, BorrowedFd<'_>)> {
        Vec::new()
    }
}

/// Serves `store` on a loopback port until the test ends.
async fn start(store: Arc<Gated>, plain_reads: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let opts = DataServerOptions {
        plain_reads,
        ..DataServerOptions::default()
    };
    tokio::spawn(serve(l, store, opts, std::future::pending()));
    addr
}

fn engine() -> TransferEngine {
    TransferEngine::new(EngineOptions {
        transport: TransportMode::Tcp,
        ..EngineOptions::default()
    })
}

fn op(offset: u64, len: usize) -> ReadOp {
    ReadOp {
        segment: SegmentId(0),
        offset,
        len: len as u64,
    }
}

/// Polls `cond` until it holds, failing the test after [`WAIT`].
async fn until(what: &str, cond: impl Fn() -> bool) {
    kvpool_testkit::wait_until(what, WAIT, || std::future::ready(cond())).await
}

/// Distinct bytes per position and seed, so a misplaced byte shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    kvpool_testkit::value(seed, len)
}

/// A request of several disk ops whose first finishes last still lands every op's bytes in
/// its own destination, over the streamed answer and the plain one alike.
#[tokio::test]
async fn first_op_slowest_still_lands_every_op() {
    for plain in [false, true] {
        let sizes = [1 << 20, 4096, 100 << 10, 64 << 10];
        let values: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u64))
            .collect();
        let store = Gated::with(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as u64, Ok(v.clone())))
                .collect(),
        );
        let first = store.gate(0);
        let store = Arc::new(store);
        let addr = start(store.clone(), plain).await;
        let e = engine();
        let mut dst: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let items: Vec<ReadItem<'_>> = dst
            .iter_mut()
            .enumerate()
            .map(|(i, d)| ReadItem::new(op(i as u64, d.len()), d))
            .collect();
        let read = e.read(addr.as_str(), items);
        let release = async {
            // Every later op has landed before the first is let go.
            until("the later ops landed", || {
                store.landed.load(Ordering::SeqCst) == 3
            })
            .await;
            first.send(()).unwrap();
        };
        let (got, ()) = tokio::time::timeout(WAIT, async { tokio::join!(read, release) })
            .await
            .expect("read answered");
        let got = got.unwrap();
        for (i, r) in got.iter().enumerate() {
            assert_eq!(
                *r.as_ref().unwrap(),
                kvpool_proto::crc32c::crc32c(&values[i]),
                "op {i} (plain {plain})"
            );
        }
        assert!(dst == values, "bytes differ (plain {plain})");
    }
}

/// A disk op that fails after the head went out (a corrupt record) fails alone: its filler is
/// never taken for bytes, and the ops around it land.
#[tokio::test]
async fn an_op_failing_mid_stream_fails_alone() {
    for plain in [false, true] {
        let good = pattern(200 << 10, 3);
        let small = pattern(3000, 9);
        let store = Gated::with(vec![
            (0, Ok(good.clone())),
            (
                1,
                Err(WireError::new(ErrorCode::NotFound, "corrupt and dropped")),
            ),
            (2, Ok(small.clone())),
        ]);
        let addr = start(Arc::new(store), plain).await;
        let e = engine();
        let (mut a, mut b, mut c) = (vec![0u8; good.len()], vec![7u8; 80 << 10], vec![0u8; 3000]);
        let items = vec![
            ReadItem::new(op(0, a.len()), &mut a),
            ReadItem::new(op(1, b.len()), &mut b),
            ReadItem::new(op(2, c.len()), &mut c),
        ];
        let got = tokio::time::timeout(WAIT, e.read(addr.as_str(), items))
            .await
            .expect("read answered")
            .unwrap();
        assert!(got[0].is_ok() && got[2].is_ok(), "plain {plain}: {got:?}");
        assert_eq!(
            got[1].as_ref().unwrap_err().code,
            ErrorCode::NotFound,
            "plain {plain}"
        );
        assert!(a == good && c == small, "plain {plain}: good ops' bytes");
    }
}

/// Sends a streamed `Read` of `ops` on a raw connection; returns the answer's head and the
/// connection.
async fn raw_read(addr: &str, ops: Vec<ReadOp>) -> (TcpStream, kvpool_proto::FrameHeader) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = Read {
        ops,
        expect: Vec::new(),
    };
    s.write_all(&frame::encode_request_flagged(7, &req, 0, FLAG_STREAMED))
        .await
        .unwrap();
    let h = frame::read_header(&mut s, &FrameLimits::default())
        .await
        .unwrap()
        .unwrap();
    (s, h)
}

/// Each op goes out as soon as it is read: the first op's bytes and status arrive while the
/// second is still on the "disk", laid out as docs/protocol.md says (bytes, then a 2-byte
/// status; the head counts both).
#[tokio::test]
async fn each_op_is_sent_as_soon_as_it_is_read() {
    let (a, b) = (pattern(300 << 10, 1), pattern(5000, 2));
    let store = Gated::with(vec![(0, Ok(a.clone())), (1, Ok(b.clone()))]);
    let second = store.gate(1);
    let addr = start(Arc::new(store), false).await;
    let (mut s, h) = raw_read(&addr, vec![op(0, a.len()), op(1, b.len())]).await;
    assert!(h.is_streamed(), "asked for, and got, a streamed answer");
    assert_eq!(
        h.payload_len,
        (a.len() + b.len() + 2 * ReadStatus::LEN) as u64
    );
    let body = frame::read_body(&mut s, h.body_len).await.unwrap();
    let items = decode_body::<UnitResponse>(&body).unwrap().items;
    assert!(items.iter().all(Result::is_ok));
    let mut got = vec![0u8; a.len() + ReadStatus::LEN];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("the first op arrives while the second is still being read")
        .unwrap();
    assert!(got[..a.len()] == a[..], "first op's bytes");
    assert_eq!(got[a.len()..], ReadStatus(ErrorCode::Ok).encode());
    second.send(()).unwrap();
    let mut got = vec![0u8; b.len() + ReadStatus::LEN];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("the second op")
        .unwrap();
    assert!(got[..b.len()] == b[..], "second op's bytes");
    assert_eq!(got[b.len()..], ReadStatus(ErrorCode::Ok).encode());
}

/// A client that leaves mid-answer costs the node nothing: the read it was waiting for is
/// dropped (not finished for nobody), and the node serves the next client.
#[tokio::test]
async fn a_client_leaving_mid_stream_drops_its_pending_reads() {
    let (a, b) = (pattern(100 << 10, 1), pattern(100 << 10, 2));
    let store = Gated::with(vec![(0, Ok(a.clone())), (1, Ok(b.clone()))]);
    // Never opened while the first client is there.
    let _stuck = store.gate(1);
    let store = Arc::new(store);
    let addr = start(store.clone(), false).await;
    let (mut s, h) = raw_read(&addr, vec![op(0, a.len()), op(1, b.len())]).await;
    let mut head_and_first = vec![0u8; h.body_len as usize + a.len() + ReadStatus::LEN];
    s.read_exact(&mut head_and_first).await.unwrap();
    drop(s);
    until("the node dropped the read nobody waits for", || {
        store.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    // The node still answers: op 1 is ungated now (its gate was taken by the first read).
    let e = engine();
    let mut dst = vec![0u8; b.len()];
    let got = tokio::time::timeout(
        WAIT,
        e.read(addr.as_str(), vec![ReadItem::new(op(1, b.len()), &mut dst)]),
    )
    .await
    .expect("answered")
    .unwrap();
    assert!(got[0].is_ok() && dst == b);
}

/// A value whose check fails after some of its parts were already sent (a crc32c mismatch
/// found once its last part landed) is filler, never bytes: that op fails, its neighbour lands.
#[tokio::test]
async fn a_value_failing_after_parts_were_sent_fails_alone() {
    let (torn, good) = (pattern(3 * PART, 5), pattern(2 * PART + 17, 6));
    let mut store = Gated::with(vec![(0, Ok(torn.clone())), (1, Ok(good.clone()))]);
    store.torn.insert(0);
    let addr = start(Arc::new(store), false).await;
    let e = engine();
    let (mut a, mut b) = (vec![0u8; torn.len()], vec![0u8; good.len()]);
    let items = vec![
        ReadItem::new(op(0, a.len()), &mut a),
        ReadItem::new(op(1, b.len()), &mut b),
    ];
    let got = tokio::time::timeout(WAIT, e.read(addr.as_str(), items))
        .await
        .expect("read answered")
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap_err().code, ErrorCode::NotFound);
    assert!(got[1].is_ok() && b == good, "the neighbour's bytes");
}
