//! A multiplexed request/response client for small control messages (master RPCs).
//!
//! Many requests share one TCP connection: each carries a request id. A `block_on` caller
//! writes its frame to the socket itself when nothing else is queued; a task's frame, and any
//! frame that meets a busy socket, joins a queue that a flusher task writes many frames at a
//! time (`outbox`); a reader task routes each response to its caller
//! by id; one watchdog timer per connection answers `Timeout` to callers past their deadline.
//! A broken connection fails every request in flight with a retryable error, and the next
//! call dials again, so callers never hold a dead connection.
//!
//! Each connection is dialed over TCP; a server on this host that also serves on a Unix
//! socket says so when asked (`Local`), and the connection then moves there, skipping
//! loopback TCP (docs/transports.md, "The master's Unix socket").
//!
//! A client made [`RpcClient::with_resolver`] follows a server that moves (the HA master's
//! leader): it asks the resolver for the address on every dial, and drops its connection on
//! a `NotLeader` answer, a broken connection or a timeout, so the next call finds the leader.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kvpool_proto::{ErrorCode, FrameHeader, FrameLimits, Local, Message, Token, WireError};
use tokio::{
    io::AsyncRead,
    net::{TcpStream, UnixStream},
    sync::oneshot,
};

use crate::{frame, TransportError};

mod outbox;

use outbox::{lock, Link, WriteHalf};

/// How an [`RpcClient`] dials and waits.
#[derive(Debug, Clone)]
pub struct RpcOptions {
    /// Limit for dialing the server.
    pub connect_timeout: Duration,
    /// Limit for one request, from send to response.
    pub request_timeout: Duration,
    pub limits: FrameLimits,
    /// The cluster token, sent in a `Hello` as the first frame of every connection (within
    /// `connect_timeout`). A refused token fails the call with `Unauthorized`.
    pub token: Option<Token>,
    /// Ask the server for its Unix socket (`Local`) on each new connection and, when it is on
    /// this host, talk to it there instead of over loopback TCP [true].
    pub same_host: bool,
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            limits: FrameLimits::default(),
            token: None,
            same_host: true,
        }
    }
}

type Reply = Result<(FrameHeader, Vec<u8>), TransportError>;

/// Callers waiting for a response on one connection, by request id; `None` once the
/// connection died, so no new request may wait on it.
type Pending = Arc<Mutex<Option<HashMap<u64, Waiter>>>>;

/// One caller waiting for its response.
struct Waiter {
    tx: oneshot::Sender<Reply>,
    /// When the caller gives up. Every request on a client has the same timeout, so
    /// deadlines grow with the request id and the watchdog sleeps until the oldest one.
    deadline: Instant,
}

/// The client's end of one connection: its write side ([`Outbox`]) and its waiters.
struct Conn {
    link: Arc<Link>,
    pending: Pending,
    /// "unix" or "tcp".
    via: &'static str,
}

impl Conn {
    fn is_alive(&self) -> bool {
        !lock(&self.link.out).failed && lock(&self.pending).is_some()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The flusher writes what is queued, then ends; dropping the last reference to the
        // link closes the write side, which ends the connection in order.
        lock(&self.link.out).closing = true;
        self.link.flush.notify_one();
    }
}
/// Looks up the address to dial: `None` when there is none now (no leader elected).
pub type Resolve =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

/// A cheap-to-clone handle to one server; reconnects on demand.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    /// With a resolver, `addr` only describes the target; each dial resolves the address.
    resolver: Option<Resolve>,
    opts: RpcOptions,
    next_id: AtomicU64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl RpcClient {
    /// A client for `addr`; nothing is dialed until the first call.
    pub fn new(addr: impl Into<String>, opts: RpcOptions) -> Self {
        RpcClient {
            inner: Arc::new(Inner {
                addr: addr.into(),
                resolver: None,
                opts,
                next_id: AtomicU64::new(1),
                conn: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// A client that dials whatever `resolver` names at the time (the current leader), and
    /// re-resolves after a `NotLeader` answer or a failed connection. `describe` is what
    /// [`RpcClient::addr`] shows in logs.
    pub fn with_resolver(describe: impl Into<String>, resolver: Resolve, opts: RpcOptions) -> Self {
        RpcClient {
            inner: Arc::new(Inner {
                addr: describe.into(),
                resolver: Some(resolver),
                opts,
                next_id: AtomicU64::new(1),
                conn: tokio::sync::Mutex::new(None),
            }),
        }
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// How the current connection reaches the server: "unix" (its Unix socket, on this
    /// host) or "tcp"; `None` before the first call or after a failure.
    pub async fn via(&self) -> Option<&'static str> {
        let conn = self.inner.conn.lock().await;
        conn.as_ref().filter(|c| c.is_alive()).map(|c| c.via)
    }

    /// Sends one request and waits for its response; a client with a resolver forgets its
    /// connection after an answer that says the server is not (or no longer) the one to ask.
    pub async fn call<M: Message>(&self, msg: &M) -> Result<M::Response, TransportError> {
        self.call_flagged(msg).await.map(|(r, _)| r)
    }

    /// [`RpcClient::call`], also giving the response frame's flag bits (what the server says
    /// of its answer as a whole, such as the master's `FLAG_NO_PROMOTION`).
    pub async fn call_flagged<M: Message>(
        &self,
        msg: &M,
    ) -> Result<(M::Response, u8), TransportError> {
        let r = self.call_once(msg).await;
        if self.inner.resolver.is_some() {
            if let Err(e) = &r {
                let moved = match e {
                    TransportError::Remote(w) => w.code == ErrorCode::NotLeader,
                    // A paused or partitioned server times out with its connection still
                    // open: dial the (maybe new) leader next time rather than wait on it.
                    other => other.is_retryable(),
                };
                if moved {
                    *self.inner.conn.lock().await = None;
                }
            }
        }
        r
    }

    async fn call_once<M: Message>(&self, msg: &M) -> Result<(M::Response, u8), TransportError> {
        let timeout = self.inner.opts.request_timeout;
        let conn = self.connection().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&conn.pending);
            let Some(map) = pending.as_mut() else {
                return Err(TransportError::Closed);
            };
            let deadline = Instant::now() + timeout;
            map.insert(id, Waiter { tx, deadline });
        }
        // Removes the entry if this future is dropped before the reply.
        let _guard = PendingGuard {
            pending: &conn.pending,
            id,
        };
        // A caller outside the runtime's tasks writes its frame itself: handing it to the
        // flusher would wake a worker thread. A task hands it over: the flusher then runs next
        // on the same worker, after the task has done what it does before it waits (writing
        // from the task measured slower for batched puts, docs/benchmarks.md).
        let direct = tokio::task::try_id().is_none();
        if let Err(e) = conn.link.send(&frame::encode_request(id, msg, 0), direct) {
            fail_all(&conn.pending, &e);
            return Err(e);
        }
        // The connection's watchdog answers Timeout at the deadline: no timer per call (a
        // timer that is the runtime's earliest wakes its I/O driver, a syscall per call).
        let (header, body) = match rx.await {
            Ok(reply) => reply?,
            Err(_) => return Err(TransportError::Closed),
        };
        Ok((frame::decode_response(&header, &body)?, header.flags))
    }

    async fn connection(&self) -> Result<Arc<Conn>, TransportError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let opts = &self.inner.opts;
        let addr = match &self.inner.resolver {
            None => self.inner.addr.clone(),
            Some(resolve) => match tokio::time::timeout(opts.connect_timeout, resolve()).await {
                Ok(Some(a)) => a,
                // NotLeader is retryable: callers wait for an election as for any failover.
                Ok(None) | Err(_) => {
                    return Err(TransportError::Remote(WireError::new(
                        ErrorCode::NotLeader,
                        format!("no leader known for {}", self.inner.addr),
                    )))
                }
            },
        };
        let mut stream =
            match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&addr)).await {
                Ok(s) => s?,
                Err(_) => {
                    return Err(TransportError::Timeout {
                        op: "connect",
                        after: opts.connect_timeout,
                    })
                }
            };
        stream.set_nodelay(true)?;
        if let Some(token) = &opts.token {
            crate::auth::client_hello(&mut stream, token, &opts.limits, opts.connect_timeout)
                .await?;
        }
        let conn = match self.same_host_socket(&mut stream).await? {
            Some(unix) => {
                let (rd, wr) = unix.into_split();
                spawn_conn(rd, WriteHalf::Unix(wr), "unix", opts)
            }
            None => {
                let (rd, wr) = stream.into_split();
                spawn_conn(rd, WriteHalf::Tcp(wr), "tcp", opts)
            }
        };
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// The server's Unix socket, connected (and past its `Hello`), when the server on the
    /// other end of `tcp` runs on this host and has one; `None` means TCP (also when the
    /// server predates `Local`, or anything on the way fails: the TCP connection is fine).
    /// `Err` only when the server refused the connection (no token where one is required).
    async fn same_host_socket(
        &self,
        tcp: &mut TcpStream,
    ) -> Result<Option<UnixStream>, TransportError> {
        let opts = &self.inner.opts;
        if !opts.same_host {
            return Ok(None);
        }
        // No longer than a request may take: a server that does not answer is not waited for
        // twice (its answer, if late, has request id 0, which no caller waits for).
        let ask = crate::frame::exchange(tcp, &Local {}, &opts.limits);
        let limit = opts.connect_timeout.min(opts.request_timeout);
        let path = match tokio::time::timeout(limit, ask).await {
            Ok(Ok(a)) if a.host == crate::shm::net_host_id() => match a.socket {
                Some(p) => p,
                None => return Ok(None),
            },
            Ok(Err(TransportError::Remote(w))) if w.code == ErrorCode::Unauthorized => {
                return Err(TransportError::Remote(w));
            }
            _ => return Ok(None),
        };
        let dial = async {
            let mut unix = UnixStream::connect(&path).await?;
            if let Some(token) = &opts.token {
                crate::auth::client_hello(&mut unix, token, &opts.limits, opts.connect_timeout)
                    .await?;
            }
            Ok::<_, TransportError>(unix)
        };
        Ok(
            match tokio::time::timeout(opts.connect_timeout, dial).await {
                Ok(Ok(unix)) => Some(unix),
                Ok(Err(e)) => {
                    tracing::debug!(%path, "the server's Unix socket failed, staying on TCP: {e}");
                    None
                }
                Err(_) => None,
            },
        )
    }
}

struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(map) = lock(self.pending).as_mut() {
            map.remove(&self.id);
        }
    }
}

/// Fails every caller waiting on a dead connection with (a copy of) why it died, and refuses
/// new waiters on it. A connection that broke (closed, reset, cut mid-frame) fails them with
/// a retryable error: the next call dials again.
fn fail_all(pending: &Pending, why: &TransportError) {
    let waiters = lock(pending).take().unwrap_or_default();
    for (_, w) in waiters {
        let _ = w.tx.send(Err(copy_error(why)));
    }
}

/// The same failure for another caller (errors that own an `io::Error` are not `Clone`).
fn copy_error(e: &TransportError) -> TransportError {
    match e {
        TransportError::Io(io) => {
            TransportError::Io(std::io::Error::new(io.kind(), io.to_string()))
        }
        TransportError::Truncated => TransportError::Truncated,
        TransportError::Closed => TransportError::Closed,
        TransportError::Timeout { op, after } => TransportError::Timeout { op, after: *after },
        TransportError::Remote(w) => TransportError::Remote(w.clone()),
        other => TransportError::Protocol(other.to_string()),
    }
}

fn spawn_conn<R: AsyncRead + Unpin + Send + 'static>(
    rd: R,
    wr: WriteHalf,
    via: &'static str,
    opts: &RpcOptions,
) -> Conn {
    let (limits, timeout) = (opts.limits, opts.request_timeout);
    let link = Link::new(wr);
    let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));

    let (flusher, flush_pending) = (link.clone(), pending.clone());
    tokio::spawn(async move {
        if let Err(e) = flusher.flusher().await {
            fail_all(&flush_pending, &e);
        }
    });
    tokio::spawn(read_responses(rd, limits, pending.clone()));
    tokio::spawn(watchdog(pending.clone(), timeout));
    Conn { link, pending, via }
}

/// Routes each response to its caller; when the connection ends, fails everyone waiting.
async fn read_responses<R: AsyncRead + Unpin>(rd: R, limits: FrameLimits, pending: Pending) {
    let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    let err = loop {
        let header = match frame::read_header(&mut rd, &limits).await {
            Ok(Some(h)) => h,
            Ok(None) => break TransportError::Closed,
            Err(e) => break e,
        };
        if !header.is_response() || header.payload_len != 0 {
            break TransportError::Protocol("unexpected frame from server".into());
        }
        let body = match frame::read_body(&mut rd, header.body_len).await {
            Ok(b) => b,
            Err(e) => break e,
        };
        let waiter = lock(&pending)
            .as_mut()
            .and_then(|m| m.remove(&header.request_id));
        if let Some(w) = waiter {
            let _ = w.tx.send(Ok((header, body)));
        }
    };
    fail_all(&pending, &err);
}

/// Answers `Timeout` to each caller whose deadline passed, sleeping until the oldest
/// deadline. Its one timer is always armed and never earlier than a new call's deadline, so
/// calls arm none. Ends with the connection.
async fn watchdog(pending: Pending, timeout: Duration) {
    let mut next = Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        let mut guard = lock(&pending);
        let Some(map) = guard.as_mut() else { return };
        let expired: Vec<u64> = map
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(w) = map.remove(&id) {
                let _ = w.tx.send(Err(TransportError::Timeout {
                    op: "rpc",
                    after: timeout,
                }));
            }
        }
        next = map
            .values()
            .map(|w| w.deadline)
            .min()
            .unwrap_or(now + timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{serve_rpc, RpcService};
    use kvpool_proto::{encode_body, ListKeys, ListKeysResponse, Opcode};
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// Answers `ListKeys` with its own prefix, so each caller can tell its answer.
    struct Mirror;

    impl RpcService for Mirror {
        fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError> {
            let req: ListKeys = kvpool_proto::decode_body(body)?;
            assert_eq!(opcode, Opcode::ListKeys);
            Ok(encode_body(&ListKeysResponse {
                keys: vec![req.prefix],
                more: false,
            }))
        }
    }

    fn list(prefix: Vec<u8>) -> ListKeys {
        ListKeys {
            prefix,
            start_after: None,
            limit: 1,
        }
    }

    /// A `Mirror` server on TCP alone; its address.
    async fn mirror_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve_rpc(
            listener,
            Arc::new(Mirror),
            FrameLimits::default(),
            std::future::pending(),
        ));
        addr
    }

    fn opts(request_timeout: Duration) -> RpcOptions {
        RpcOptions {
            request_timeout,
            ..RpcOptions::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_on_one_connection_each_get_their_own_answer() {
        let addr = mirror_server().await;
        let client = RpcClient::new(addr, opts(Duration::from_secs(30)));
        // Tasks hand their frames to the flusher; threads outside the runtime (as `block_on`
        // callers) write theirs directly, racing the flusher for the socket.
        let calls = |client: RpcClient, t: usize| async move {
            for i in 0..20usize {
                // Some frames are larger than a socket buffer: a direct writer leaves the
                // rest to the flusher, between others' frames.
                let pad = if (t + i).is_multiple_of(7) {
                    600 << 10
                } else {
                    i * 31
                };
                let mut prefix = format!("{t}/{i}/").into_bytes();
                prefix.resize(prefix.len() + pad, b'x');
                let got = client.call(&list(prefix.clone())).await.unwrap();
                assert_eq!(got.keys, vec![prefix], "caller {t} call {i}");
            }
        };
        let tasks: Vec<_> = (0..24)
            .map(|t| tokio::spawn(calls(client.clone(), t)))
            .collect();
        let handle = tokio::runtime::Handle::current();
        let threads: Vec<_> = (24..32)
            .map(|t| {
                let (handle, fut) = (handle.clone(), calls(client.clone(), t));
                std::thread::spawn(move || handle.block_on(fut))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for t in threads {
            tokio::task::spawn_blocking(move || t.join().unwrap())
                .await
                .unwrap();
        }
        let conn = client.inner.conn.lock().await.clone().unwrap();
        assert!(conn.is_alive());
        assert!(lock(&conn.pending).as_ref().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_killed_mid_write_fails_every_caller_retryably() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // Part of the first frame, then the connection is gone (with unread bytes: a
            // reset).
            let mut some = vec![0u8; 64 << 10];
            s.read_exact(&mut some).await.unwrap();
            // No listener either: a caller that dials again is refused, not left waiting.
            drop((s, listener));
        });
        let client = RpcClient::new(addr, opts(Duration::from_secs(30)));
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let client = client.clone();
                tokio::spawn(async move { client.call(&list(vec![t; 4 << 20])).await })
            })
            .collect();
        for t in tasks {
            match t.await.unwrap() {
                Err(e) => {
                    assert!(e.is_retryable(), "{e:?}");
                    assert!(!matches!(e, TransportError::Timeout { .. }), "{e:?}");
                }
                Ok(r) => panic!("answered without a server: {r:?}"),
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        server.await.unwrap();
        let conn = client.inner.conn.lock().await.clone().unwrap();
        assert!(!conn.is_alive(), "a dead connection is not reused");
    }

    /// A server on TCP and on a Unix socket (named to clients that ask `Local`), with an
    /// optional token; its TCP address.
    async fn two_way_server(socket: &std::path::Path, token: Option<&str>) -> String {
        use crate::server::{serve_rpc_with, ServerOptions};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _ = std::fs::remove_file(socket);
        let unix = tokio::net::UnixListener::bind(socket).unwrap();
        let opts = ServerOptions {
            limits: FrameLimits::default(),
            token: token.map(|t| Token::new(t).unwrap()),
            local_socket: Some(socket.display().to_string()),
        };
        let service = Arc::new(Mirror);
        let pending = std::future::pending::<()>;
        tokio::spawn(serve_rpc_with(
            listener,
            service.clone(),
            opts.clone(),
            pending(),
        ));
        tokio::spawn(serve_rpc_with(unix, service, opts, pending()));
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_same_host_server_is_reached_through_its_unix_socket() {
        let socket =
            std::env::temp_dir().join(format!("kvpool-rpc-test-{}.sock", std::process::id()));
        for token in [None, Some("s3cret")] {
            let addr = two_way_server(&socket, token).await;
            let with = |same_host: bool| RpcOptions {
                same_host,
                token: token.map(|t| Token::new(t).unwrap()),
                ..RpcOptions::default()
            };
            for (same_host, via) in [(true, "unix"), (false, "tcp")] {
                let client = RpcClient::new(addr.clone(), with(same_host));
                assert_eq!(client.via().await, None, "nothing dialed yet");
                for i in 0..3u8 {
                    let got = client.call(&list(vec![i; 100])).await.unwrap();
                    assert_eq!(got.keys, vec![vec![i; 100]]);
                }
                assert_eq!(client.via().await, Some(via), "token {token:?}");
            }
            // A socket that is gone (the server moved, or its file was removed): TCP, and
            // every call answered.
            std::fs::remove_file(&socket).unwrap();
            assert_eq!(
                answered_via(&RpcClient::new(addr, with(true))).await,
                Some("tcp")
            );
        }
    }

    /// How `client` reached the server for a call that was answered right.
    async fn answered_via(client: &RpcClient) -> Option<&'static str> {
        let got = client.call(&list(b"k".to_vec())).await.unwrap();
        assert_eq!(got.keys, vec![b"k".to_vec()]);
        client.via().await
    }

    #[tokio::test]
    async fn a_server_without_a_unix_socket_is_reached_over_tcp() {
        let addr = mirror_server().await;
        let client = RpcClient::new(addr, RpcOptions::default());
        assert_eq!(answered_via(&client).await, Some("tcp"));
    }

    #[tokio::test]
    async fn a_silent_server_times_every_caller_out_at_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Reads everything, answers nothing.
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let timeout = Duration::from_millis(300);
        let client = RpcClient::new(addr, opts(timeout));
        let calls: Vec<_> = (0..4u8)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let t = std::time::Instant::now();
                    let r = client.call(&list(vec![i])).await;
                    (r, t.elapsed())
                })
            })
            .collect();
        for c in calls {
            let (r, took) = c.await.unwrap();
            match r {
                Err(TransportError::Timeout { op: "rpc", after }) => assert_eq!(after, timeout),
                other => panic!("expected a timeout, got {other:?}"),
            }
            assert!(took >= timeout, "{took:?}");
            assert!(took < timeout * 10, "{took:?}");
        }
        // A caller that gave up leaves nothing behind.
        let conn = client.inner.conn.lock().await.clone().unwrap();
        assert!(lock(&conn.pending).as_ref().unwrap().is_empty());
    }
}
