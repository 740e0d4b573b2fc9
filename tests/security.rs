//! Cluster security and tenants, with real processes: a pool started with a token refuses
//! every connection without it (clients, nodes, raw sockets) and keeps serving those with it;
//! tenants see only their own keys.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    time::Duration,
};

use kvpool_client::{Client, ClientConfig, ClientError, ErrorCode};
use kvpool_proto::{
    encode_body, FrameHeader, FrameLimits, Hello, Opcode, PutOptions, Read as ReadMsg, ReadOp,
    SegmentId, Status, Token, HEADER_LEN,
};
use kvpool_tests::{config_file, run_kvpool as kvpool, stderr, up, value, wait_until, Proc};

const TOKEN: &str = "correct horse battery staple";

/// A token file holding `TOKEN` (with a trailing newline and spaces, as an editor leaves it).
fn token_file() -> PathBuf {
    let p = config_file("").with_file_name("token");
    std::fs::write(&p, format!("  {TOKEN}  \nsecond line is ignored\n")).unwrap();
    p
}

fn client_with(master: &str, token: Option<&str>, tenant: Option<&str>) -> Client {
    let mut cfg = ClientConfig::with_master(master);
    cfg.deadline = Duration::from_secs(10);
    cfg.engine.io_timeout = Duration::from_secs(10);
    cfg.token = token.map(|t| Token::new(t).unwrap());
    cfg.tenant = tenant.map(str::to_string);
    Client::new(cfg)
}

fn assert_unauthorized<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) -> String {
    match r {
        Err(e) if e.code() == ErrorCode::Unauthorized => {
            let msg = e.to_string();
            assert!(
                !msg.contains(TOKEN),
                "{what}: the error shows the token: {msg}"
            );
            msg
        }
        other => panic!("{what}: expected Unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pool_with_a_token_serves_only_clients_that_present_it() {
    let tf = token_file();
    let pool = up("64MiB", &["--token-file", tf.to_str().unwrap()]);
    let m = pool.addr("master");

    let none = client_with(&m, None, None);
    let msg = assert_unauthorized(none.status().await, "no token: status");
    assert!(msg.contains("token"), "the refusal should say why: {msg}");
    assert_unauthorized(
        none.put(b"k", b"v", &PutOptions::default()).await,
        "no token: put",
    );
    let wrong = client_with(&m, Some("wrong"), None);
    let msg = assert_unauthorized(wrong.status().await, "wrong token: status");
    assert!(msg.contains("wrong cluster token"), "{msg}");
    assert_unauthorized(wrong.get(b"k").await, "wrong token: get");

    let right = client_with(&m, Some(TOKEN), None);
    let v = value(7, (1 << 20) + 13);
    right
        .put(b"big", &v, &PutOptions::default())
        .await
        .expect("put with the token");
    let got = right.get(b"big").await.expect("get with the token");
    assert!(got.as_deref() == Some(&v[..]), "bytes differ");

    // The refused clients did not hurt the server: a new right client still works.
    let again = client_with(&m, Some(TOKEN), None);
    assert_eq!(
        again.get(b"big").await.unwrap().map(|b| b.len()),
        Some(v.len())
    );
}

#[tokio::test]
async fn a_node_without_the_token_cannot_register() {
    let tf = token_file();
    let tf = tf.to_str().unwrap();
    let master = Proc::start(&["master", "--listen", "127.0.0.1:0", "--token-file", tf]);
    let m = master.addr("master");
    let admin = client_with(&m, Some(TOKEN), None);

    let outsider = Proc::start(&[
        "store",
        "--master",
        &m,
        "--listen",
        "127.0.0.1:0",
        "--dram",
        "16MiB",
    ]);
    let outsider_id = outsider.addr("node");
    // The node retries every second at most; three seconds is several refused attempts. A
    // sleep on purpose: what is under test is that nothing happens within the window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = admin.status().await.unwrap();
    assert!(
        s.nodes.is_empty(),
        "a node without the token registered: {s:?}"
    );

    let member = Proc::start_with_env(
        &[
            "store",
            "--master",
            &m,
            "--listen",
            "127.0.0.1:0",
            "--dram",
            "16MiB",
        ],
        &[("KVPOOL_TOKEN", TOKEN)],
    );
    let member_id = member.addr("node");
    wait_until(
        "the node with the token registers",
        Duration::from_secs(20),
        || async {
            admin.status().await.is_ok_and(|s| {
                s.nodes
                    .iter()
                    .any(|n| n.id.to_string() == member_id && n.alive)
            })
        },
    )
    .await;
    let s = admin.status().await.unwrap();
    assert!(
        s.nodes.iter().all(|n| n.id.to_string() != outsider_id),
        "the outsider is in the pool: {s:?}"
    );
    // The member's data server requires the token too, and serves with it.
    let v = value(3, 100_000);
    admin
        .put(b"via-member", &v, &PutOptions::default())
        .await
        .unwrap();
    assert!(admin.get(b"via-member").await.unwrap().as_deref() == Some(&v[..]));
}

/// Sends `frames`, then reads one response header and body, then expects the connection to
/// close (within 5 s).
fn exchange_then_close(addr: &str, frames: &[u8]) -> (FrameHeader, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(frames).unwrap();
    let (h, body) = read_response(&mut s);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server closes the connection");
    assert!(rest.is_empty(), "{} bytes after the refusal", rest.len());
    (h, body)
}

fn read_response(s: &mut TcpStream) -> (FrameHeader, String) {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let h = FrameHeader::decode(&head, &FrameLimits::default()).unwrap();
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).unwrap();
    (h, String::from_utf8_lossy(&body).into_owned())
}

fn frame<M: kvpool_proto::Message>(id: u64, msg: &M) -> Vec<u8> {
    let body = encode_body(msg);
    let mut f = FrameHeader::request(M::OPCODE as u8, id, body.len() as u32, 0)
        .encode()
        .to_vec();
    f.extend_from_slice(&body);
    f
}

fn hello(token: &str) -> Hello {
    Hello {
        token: token.as_bytes().to_vec(),
        client_version: 1,
    }
}

#[tokio::test]
async fn raw_frames_without_hello_are_refused_and_closed() {
    let tf = token_file();
    let pool = up("32MiB", &["--token-file", tf.to_str().unwrap()]);
    let (m, st) = (pool.addr("master"), pool.addr("store"));
    let read = ReadMsg {
        ops: vec![ReadOp {
            segment: SegmentId(1),
            offset: 0,
            len: 8,
        }],
        expect: vec![],
    };

    // A request before any Hello, pipelined with a second: one refusal, then close.
    let mut two = frame(41, &Status {});
    two.extend_from_slice(&frame(42, &Status {}));
    let (h, msg) = exchange_then_close(&m, &two);
    assert_eq!(
        (h.code(), h.request_id),
        (ErrorCode::Unauthorized, 41),
        "{msg}"
    );
    assert!(msg.contains("token"), "{msg}");
    let (h, _) = exchange_then_close(&st, &frame(43, &read));
    assert_eq!((h.code(), h.request_id), (ErrorCode::Unauthorized, 43));

    // A wrong token, to either server.
    for addr in [&m, &st] {
        let (h, msg) = exchange_then_close(addr, &frame(5, &hello("nope")));
        assert_eq!(h.code(), ErrorCode::Unauthorized, "{addr}: {msg}");
        assert!(!msg.contains(TOKEN));
    }

    // A write with a payload before Hello: refused without reading the payload.
    let write = kvpool_proto::Write {
        ops: vec![kvpool_proto::WriteOp {
            segment: SegmentId(1),
            offset: 0,
            len: 4096,
        }],
        tags: vec![],
    };
    let body = encode_body(&write);
    let mut f = FrameHeader::request(Opcode::Write as u8, 44, body.len() as u32, 4096)
        .encode()
        .to_vec();
    f.extend_from_slice(&body);
    f.extend_from_slice(&[0xAB; 4096]);
    let (h, _) = exchange_then_close(&st, &f);
    assert_eq!((h.code(), h.request_id), (ErrorCode::Unauthorized, 44));

    // The right Hello opens the connection for requests.
    let mut s = TcpStream::connect(&m).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame(1, &hello(TOKEN))).unwrap();
    let (h, _) = read_response(&mut s);
    assert_eq!((h.code(), h.request_id), (ErrorCode::Ok, 1));
    s.write_all(&frame(2, &Status {})).unwrap();
    let (h, _) = read_response(&mut s);
    assert_eq!((h.code(), h.request_id), (ErrorCode::Ok, 2));

    // And both servers kept serving everyone else.
    let c = client_with(&m, Some(TOKEN), None);
    c.put(b"after", b"still serving", &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        c.get(b"after").await.unwrap().as_deref(),
        Some(&b"still serving"[..])
    );
}

#[test]
fn cli_verbs_honour_kvpool_token_and_token_file() {
    let tf = token_file();
    let tf = tf.to_str().unwrap();
    let pool = up("32MiB", &["--token-file", tf]);
    let m = pool.addr("master");
    let env = [("KVPOOL_MASTER", m.as_str())];

    let o = kvpool(&["put", "k", "-"], &env, Some(b"v1"));
    assert_eq!(
        o.status.code(),
        Some(2),
        "a verb without the token must fail"
    );
    assert!(stderr(&o).contains("Unauthorized"), "{}", stderr(&o));
    assert!(!stderr(&o).contains(TOKEN));
    let o = kvpool(&["status"], &[env[0], ("KVPOOL_TOKEN", "wrong")], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Unauthorized"), "{}", stderr(&o));

    let o = kvpool(
        &["put", "k", "-"],
        &[env[0], ("KVPOOL_TOKEN", TOKEN)],
        Some(b"v1"),
    );
    assert!(o.status.success(), "put with KVPOOL_TOKEN: {}", stderr(&o));
    let o = kvpool(&["get", "k", "--token-file", tf], &env, None);
    assert!(o.status.success(), "get with --token-file: {}", stderr(&o));
    assert_eq!(o.stdout, b"v1");
    let o = kvpool(&["--token-file", tf, "status"], &env, None);
    assert!(o.status.success(), "status: {}", stderr(&o));

    // Tenants through the binary: the same key, two namespaces.
    let with = |tenant: &'static str| [env[0], ("KVPOOL_TOKEN", TOKEN), ("KVPOOL_TENANT", tenant)];
    let o = kvpool(&["put", "k", "-"], &with("a"), Some(b"tenant a"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kvpool(&["get", "k"], &with("a"), None);
    assert_eq!(o.stdout, b"tenant a");
    let o = kvpool(
        &["get", "k", "--tenant", "b", "--token-file", tf],
        &env,
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    let o = kvpool(&["get", "k", "--token-file", tf], &env, None);
    assert_eq!(o.stdout, b"v1", "the shared namespace keeps its own value");
}

#[tokio::test]
async fn tenants_see_only_their_own_keys() {
    let pool = up("64MiB", &[]);
    let m = pool.addr("master");
    let a = client_with(&m, None, Some("tenant-a"));
    let b = client_with(&m, None, Some("tenant-b"));
    let opts = PutOptions::default();

    let (va, vb) = (value(1, 50_000), value(2, 70_000));
    a.put(b"shared-name", &va, &opts).await.unwrap();
    b.put(b"shared-name", &vb, &opts).await.unwrap();
    assert!(a.get(b"shared-name").await.unwrap().as_deref() == Some(&va[..]));
    assert!(b.get(b"shared-name").await.unwrap().as_deref() == Some(&vb[..]));

    // A tenant cannot read, test or remove another's key.
    a.put(b"only-a", b"secret of a", &opts).await.unwrap();
    assert_eq!(b.get(b"only-a").await.unwrap(), None);
    assert!(!b.exists(&[b"only-a"], false).await[0].as_ref().unwrap());
    let r = b.remove(&[b"only-a"], true).await;
    assert_eq!(r[0].as_ref().unwrap_err().code(), ErrorCode::NotFound);
    assert!(a.exists(&[b"only-a"], false).await[0].as_ref().unwrap());

    // remove_all of one tenant leaves the other's keys.
    b.put(b"b2", b"more of b", &opts).await.unwrap();
    assert_eq!(a.remove_all(true).await.unwrap(), 2);
    assert_eq!(a.get(b"shared-name").await.unwrap(), None);
    assert_eq!(a.get(b"only-a").await.unwrap(), None);
    assert!(b.get(b"shared-name").await.unwrap().as_deref() == Some(&vb[..]));
    assert_eq!(
        b.get(b"b2").await.unwrap().as_deref(),
        Some(&b"more of b"[..])
    );

    // A tenant name with the separator is refused before any request.
    let bad = client_with(&m, None, Some("a\0b"));
    let e = bad.get(b"k").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument);
}
