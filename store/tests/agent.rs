//! The node's agent against a scripted master speaking the real protocol over TCP.

mod common;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use common::*;
use kvpool_proto::{
    decode_body, ErrorCode, FrameLimits, Heartbeat, HeartbeatResponse, Leave, ObjectTag, Opcode,
    Register, RegisterResponse, ReplicaId, UnitResponse, WireError,
};
use kvpool_transport::frame;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

#[derive(Default)]
struct Script {
    registers: Vec<Register>,
    heartbeats: Vec<Heartbeat>,
    leaves: Vec<Leave>,
    /// Replicas to refuse at the next registration.
    reject: Vec<ReplicaId>,
    /// Answers for the next heartbeats; an empty queue answers "all well, nothing freed".
    answers: VecDeque<HeartbeatResponse>,
    /// Whether heartbeats from a node that never registered here get `need_register`.
    knows_nothing: bool,
}

type Shared = Arc<Mutex<Script>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Script> {
    s.lock().unwrap()
}

/// A master that records what nodes send and answers from its script.
async fn fake_master(listener: TcpListener, script: Shared) {
    let mut conns = JoinSet::new();
    loop {
        let (s, _) = listener.accept().await.unwrap();
        conns.spawn(master_conn(s, script.clone()));
    }
}

async fn master_conn(mut s: TcpStream, script: Shared) {
    while let Ok(Some(h)) = frame::read_header(&mut s, &FrameLimits::default()).await {
        let body = frame::read_body(&mut s, h.body_len).await.unwrap();
        let reply = if h.opcode == Opcode::Register as u8 {
            let reg: Register = decode_body(&body).unwrap();
            let mut sc = lock(&script);
            sc.registers.push(reg);
            let rejected = std::mem::take(&mut sc.reject);
            let resp = RegisterResponse {
                heartbeat_ms: 20,
                rejected,
            };
            frame::encode_response(h.opcode, h.request_id, &resp, 0)
        } else if h.opcode == Opcode::Heartbeat as u8 {
            let hb: Heartbeat = decode_body(&body).unwrap();
            let mut sc = lock(&script);
            sc.heartbeats.push(hb);
            if sc.knows_nothing && sc.registers.is_empty() {
                let e = WireError::new(ErrorCode::NeedRegister, "who are you?");
                frame::encode_error(h.opcode, h.request_id, &e)
            } else {
                let resp = sc.answers.pop_front().unwrap_or(HeartbeatResponse {
                    need_register: false,
                    frees: vec![],
                    frees_upto: 0,
                    tasks: Vec::new(),
                    commits: Vec::new(),
                    more: false,
                });
                frame::encode_response(h.opcode, h.request_id, &resp, 0)
            }
        } else if h.opcode == Opcode::Leave as u8 {
            lock(&script).leaves.push(decode_body(&body).unwrap());
            let resp = UnitResponse {
                items: vec![Ok(())],
            };
            frame::encode_response(h.opcode, h.request_id, &resp, 0)
        } else if h.opcode == Opcode::Local as u8 {
            // As a master from before `Local` answers: the agent stays on TCP.
            let e = WireError::new(ErrorCode::UnknownOpcode, "unknown opcode 0x02");
            frame::encode_error(h.opcode, h.request_id, &e)
        } else {
            panic!("unexpected opcode {:#x} at the master", h.opcode);
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn tag(replica: u64, offset: u64, data: &[u8], seg: kvpool_proto::SegmentId) -> ObjectTag {
    object_tag(replica, &format!("key{replica}"), seg, offset, data)
}

fn reported(r: &Register) -> Vec<u64> {
    r.inventory.iter().map(|e| e.replica.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_once_the_master_appears_then_follows_heartbeats() {
    let master = dead_addr().await;
    let node = start_node(1 << 20, &master).await;
    let seg = seg(&node);
    // Objects written while no master is reachable are reported when one appears.
    let mut c = RawClient::connect(node.local_addr()).await;
    let (a, b) = (pattern(1, 5000), pattern(2, 7000));
    c.send_write(
        &[(seg, 0, &a), (seg, 8192, &b)],
        vec![tag(1, 0, &a, seg), tag(2, 8192, &b, seg)],
    )
    .await;
    c.recv().await.unwrap();

    let script = Shared::default();
    lock(&script).reject = vec![ReplicaId(2)];
    let listener = TcpListener::bind(&master).await.unwrap();
    let m = tokio::spawn(fake_master(listener, script.clone()));

    eventually("registration", || !lock(&script).registers.is_empty()).await;
    {
        let sc = lock(&script);
        let reg = &sc.registers[0];
        assert_eq!(reg.node, node.node().id());
        assert_eq!(reg.name, "test-node");
        assert_eq!(reg.addr, node.local_addr().to_string());
        assert_eq!(reg.segments, vec![node.node().segments()[0].info()]);
        assert_eq!(reported(reg), [1, 2]);
        assert_eq!(reg.inventory[1].key, b"key2");
    }
    // The refused replica is forgotten; heartbeats flow at the master's interval.
    eventually("rejected replica dropped", || {
        node.node().inventory().get(ReplicaId(2)).is_none()
    })
    .await;
    eventually("heartbeats", || lock(&script).heartbeats.len() >= 3).await;
    assert!(lock(&script)
        .heartbeats
        .iter()
        .all(|h| h.node == node.node().id() && h.acked == 0));

    // Frees are applied and acknowledged.
    lock(&script).answers.push_back(HeartbeatResponse {
        need_register: false,
        frees: vec![ReplicaId(1), ReplicaId(999)],
        frees_upto: 5,
        tasks: Vec::new(),
        commits: Vec::new(),
        more: false,
    });
    eventually("free acked", || {
        lock(&script).heartbeats.iter().any(|h| h.acked == 5)
    })
    .await;
    assert!(node.node().inventory().is_empty());

    // The master asks for a new registration: the node reports what it holds now.
    let d = pattern(3, 300);
    c.send_write(&[(seg, 100_000, &d)], vec![tag(3, 100_000, &d, seg)])
        .await;
    c.recv().await.unwrap();
    // A commit notice: the inventory reports the put as committed, with its pins, from now.
    lock(&script).answers.push_back(HeartbeatResponse {
        need_register: false,
        frees: vec![],
        frees_upto: 6,
        tasks: Vec::new(),
        commits: vec![kvpool_proto::CommitNotice {
            replica: ReplicaId(3),
            hard_pin: true,
            soft_pin: false,
        }],
        more: false,
    });
    eventually("commit acked", || {
        lock(&script).heartbeats.iter().any(|h| h.acked == 6)
    })
    .await;
    lock(&script).answers.push_back(HeartbeatResponse {
        need_register: true,
        frees: vec![],
        frees_upto: 0,
        tasks: Vec::new(),
        commits: Vec::new(),
        more: false,
    });
    eventually("re-registration", || lock(&script).registers.len() == 2).await;
    assert_eq!(reported(&lock(&script).registers[1]), [3]);
    assert_eq!(
        lock(&script).registers[1].inventory[0].commit,
        kvpool_proto::CommitState::Committed {
            hard_pin: true,
            soft_pin: false
        }
    );
    // Entries written before any master answered were reported unconfirmed.
    assert!(lock(&script).registers[0]
        .inventory
        .iter()
        .all(|e| e.commit == kvpool_proto::CommitState::Unconfirmed));
    m.abort();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registers_with_a_restarted_master() {
    let master = dead_addr().await;
    let first = Shared::default();
    let listener = TcpListener::bind(&master).await.unwrap();
    let m1 = tokio::spawn(fake_master(listener, first.clone()));
    let node = start_node(1 << 20, &master).await;
    let seg = seg(&node);
    eventually("first registration", || lock(&first).heartbeats.len() >= 2).await;

    let mut c = RawClient::connect(node.local_addr()).await;
    let a = pattern(7, 4096);
    c.send_write(&[(seg, 4096, &a)], vec![tag(7, 4096, &a, seg)])
        .await;
    c.recv().await.unwrap();

    // The master dies (its connections with it) and a new one, knowing nothing, comes up on
    // the same address.
    m1.abort();
    let _ = m1.await;
    let second = Shared::default();
    lock(&second).knows_nothing = true;
    let listener = eventually_ok("rebind the master port", || TcpListener::bind(&master)).await;
    let m2 = tokio::spawn(fake_master(listener, second.clone()));
    eventually("registration with the new master", || {
        !lock(&second).registers.is_empty()
    })
    .await;
    assert_eq!(reported(&lock(&second).registers[0]), [7]);
    assert_eq!(lock(&second).registers[0].node, node.node().id());
    eventually("heartbeats to the new master", || {
        lock(&second).heartbeats.len() >= 3
    })
    .await;
    m2.abort();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_the_pool_on_shutdown() {
    let master = dead_addr().await;
    let script = Shared::default();
    let listener = TcpListener::bind(&master).await.unwrap();
    let m = tokio::spawn(fake_master(listener, script.clone()));
    let node = start_node(1 << 20, &master).await;
    let id = node.node().id();
    eventually("heartbeats", || lock(&script).heartbeats.len() >= 2).await;
    node.shutdown().await;
    assert_eq!(lock(&script).leaves, [Leave { node: id }]);
    m.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_leaving_a_master_that_does_not_answer() {
    // A master that accepts connections and never answers: the registration hangs, and so
    // does the Leave, which the node gives up on after a couple of seconds.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master = listener.local_addr().unwrap().to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let m = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
            let _ = tx.send(());
        }
    });
    let node = start_node(1 << 20, &master).await;
    rx.recv().await.expect("the agent connects");
    let start = std::time::Instant::now();
    node.shutdown().await;
    let took = start.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "shutdown took {took:?}"
    );
    m.abort();
}
