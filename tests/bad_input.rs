//! Bad input on real sockets: every malformed frame gets a clear error (or a clean close), and
//! the server keeps serving everyone else, and the offending connection when it can.

use std::time::Duration;

use kvpool_proto::{
    decode_body, encode_body, ErrorCode, FrameHeader, FrameLimits, Opcode, PutOptions, SegmentId,
    Status, StatusResponse, UnitResponse, Write, WriteOp, HEADER_LEN,
};
use kvpool_tests::{client, up, value, Proc};
use kvpool_transport::frame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn connect(addr: &str) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Reads one response; returns its header and body.
async fn response(s: &mut TcpStream) -> (FrameHeader, Vec<u8>) {
    let read = async {
        let h = frame::read_header(s, &FrameLimits::default())
            .await
            .unwrap()
            .expect("a response, not EOF");
        let body = frame::read_body(s, h.body_len).await.unwrap();
        (h, body)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response within 10 s")
}

/// The server closed the connection (EOF within the deadline).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn request(opcode: u8, id: u64, body: &[u8], payload_len: u64) -> Vec<u8> {
    let mut f = FrameHeader::request(opcode, id, body.len() as u32, payload_len)
        .encode()
        .to_vec();
    f.extend_from_slice(body);
    f
}

async fn still_serving(pool: &Proc, round: u64) {
    let c = client(&pool.addr("master"));
    let key = format!("alive/{round}");
    let v = value(round, 10_000);
    c.put(key.as_bytes(), &v, &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        c.get(key.as_bytes()).await.unwrap().as_deref(),
        Some(&v[..])
    );
}

async fn status_ok(s: &mut TcpStream, id: u64) {
    s.write_all(&request(
        Opcode::Status as u8,
        id,
        &encode_body(&Status {}),
        0,
    ))
    .await
    .unwrap();
    let (h, body) = response(s).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::Ok, id));
    decode_body::<StatusResponse>(&body).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_refuses_bad_frames_and_keeps_serving() {
    let pool = up("64MiB", &[]);
    let master = pool.addr("master");

    // Wrong version: a clear error, then the connection closes.
    let mut s = connect(&master).await;
    let mut f = request(Opcode::Status as u8, 1, &[], 0);
    f[2] = 9;
    s.write_all(&f).await.unwrap();
    let (h, body) = response(&mut s).await;
    assert_eq!(h.code(), ErrorCode::UnsupportedVersion);
    assert!(String::from_utf8_lossy(&body).contains("version 9"));
    assert!(closed(&mut s).await);
    still_serving(&pool, 1).await;

    // Random bytes (not kvpool at all).
    let mut s = connect(&master).await;
    let junk: Vec<u8> = (0..HEADER_LEN * 4)
        .map(|_| rand::random::<u8>() | 1)
        .collect();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    s.write_all(&junk).await.unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!(h.code(), ErrorCode::BadMagic);
    assert!(closed(&mut s).await);

    // Oversized frame: refused from the header, before any allocation.
    let mut s = connect(&master).await;
    s.write_all(&FrameHeader::request(Opcode::Status as u8, 2, u32::MAX, 0).encode())
        .await
        .unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!(h.code(), ErrorCode::FrameTooLarge);
    assert!(closed(&mut s).await);
    still_serving(&pool, 2).await;

    // Unknown opcode and malformed body: answered, and the same connection keeps working.
    let mut s = connect(&master).await;
    s.write_all(&request(0xEE, 3, b"abc", 0)).await.unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::UnknownOpcode, 3));
    s.write_all(&request(Opcode::PutStart as u8, 4, &[0xff; 40], 0))
        .await
        .unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::MalformedBody, 4));
    // A data-plane op sent to the master.
    s.write_all(&request(
        Opcode::Read as u8,
        5,
        &encode_body(&kvpool_proto::Read {
            ops: vec![],
            expect: vec![],
        }),
        0,
    ))
    .await
    .unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::WrongService, 5));
    status_ok(&mut s, 6).await;

    // Truncated frames: half a header, and a header whose body never comes.
    let mut s = connect(&master).await;
    s.write_all(&request(Opcode::Status as u8, 7, &[], 0)[..10])
        .await
        .unwrap();
    drop(s);
    let mut s = connect(&master).await;
    s.write_all(&FrameHeader::request(Opcode::Status as u8, 8, 100, 0).encode())
        .await
        .unwrap();
    s.write_all(&[0u8; 10]).await.unwrap();
    drop(s);
    still_serving(&pool, 3).await;
    let mut s = connect(&master).await;
    status_ok(&mut s, 9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_node_refuses_bad_writes_and_keeps_serving() {
    let pool = up("64MiB", &[]);
    let data = pool.addr("store");
    let c = client(&pool.addr("master"));
    let seg = c.status().await.unwrap().nodes[0].segments[0].id;

    // A write beyond the segment: a per-op OutOfRange; its bytes are skipped, the stream
    // stays in step, and the next request on the connection works.
    let mut s = connect(&data).await;
    let body = encode_body(&Write {
        ops: vec![WriteOp {
            segment: seg,
            offset: (64 << 20) - 10,
            len: 100,
        }],
        tags: vec![],
    });
    s.write_all(&request(Opcode::Write as u8, 1, &body, 100))
        .await
        .unwrap();
    s.write_all(&[7u8; 100]).await.unwrap();
    let (h, body) = response(&mut s).await;
    assert_eq!(h.code(), ErrorCode::Ok);
    let items = decode_body::<UnitResponse>(&body).unwrap().items;
    assert_eq!(items[0].as_ref().unwrap_err().code, ErrorCode::OutOfRange);
    // Unknown segment, same connection.
    let body = encode_body(&Write {
        ops: vec![WriteOp {
            segment: SegmentId(42),
            offset: 0,
            len: 5,
        }],
        tags: vec![],
    });
    s.write_all(&request(Opcode::Write as u8, 2, &body, 5))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    let (h, body) = response(&mut s).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::Ok, 2));
    let items = decode_body::<UnitResponse>(&body).unwrap().items;
    assert_eq!(
        items[0].as_ref().unwrap_err().code,
        ErrorCode::UnknownSegment
    );
    // A control op sent to a node.
    s.write_all(&request(
        Opcode::Status as u8,
        3,
        &encode_body(&Status {}),
        0,
    ))
    .await
    .unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!((h.code(), h.request_id), (ErrorCode::WrongService, 3));

    // Payload length that disagrees with the ops: refused, connection closed.
    let mut s = connect(&data).await;
    let body = encode_body(&Write {
        ops: vec![WriteOp {
            segment: seg,
            offset: 0,
            len: 10,
        }],
        tags: vec![],
    });
    s.write_all(&request(Opcode::Write as u8, 4, &body, 3))
        .await
        .unwrap();
    s.write_all(b"abc").await.unwrap();
    let (h, _) = response(&mut s).await;
    assert_ne!(h.code(), ErrorCode::Ok);

    // Wrong version and random bytes on the data port.
    let mut s = connect(&data).await;
    let mut f = request(Opcode::Read as u8, 5, &[], 0);
    f[2] = kvpool_proto::header::VERSION + 1;
    s.write_all(&f).await.unwrap();
    let (h, _) = response(&mut s).await;
    assert_eq!(h.code(), ErrorCode::UnsupportedVersion);
    assert!(closed(&mut s).await);
    let mut s = connect(&data).await;
    let junk: Vec<u8> = (0..1000).map(|_| rand::random::<u8>()).collect();
    s.write_all(b"xx").await.unwrap();
    let _ = s.write_all(&junk).await;
    let (h, _) = response(&mut s).await;
    assert_eq!(h.code(), ErrorCode::BadMagic);
    assert!(closed(&mut s).await);

    // A write cut off mid-payload by a dying client. It targets the segment's last MiB: the
    // node may still be copying its bytes when the next put, which the master places at the
    // start of the empty segment, is written, and a raw write over that range would corrupt it
    // (a real client only writes ranges the master gave it).
    let mut s = connect(&data).await;
    let body = encode_body(&Write {
        ops: vec![WriteOp {
            segment: seg,
            offset: (64 << 20) - (1 << 20),
            len: 1 << 20,
        }],
        tags: vec![],
    });
    s.write_all(&request(Opcode::Write as u8, 6, &body, 1 << 20))
        .await
        .unwrap();
    s.write_all(&[1u8; 1000]).await.unwrap();
    drop(s);

    still_serving(&pool, 10).await;
}
