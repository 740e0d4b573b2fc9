//! A multiplexed request/response client for small control messages (master RPCs).
//!
//! Many requests share one TCP connection: each carries a request id, a writer task coalesces
//! outgoing frames into few syscalls, and a reader task routes each response to its caller by
//! id. A broken connection fails every request in flight with a retryable error, and the next
//! call dials again, so callers never hold a dead connection.
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
    time::Duration,
};

use kvpool_proto::{ErrorCode, FrameHeader, FrameLimits, Message, Token, WireError};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use crate::{frame, TransportError};

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
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            limits: FrameLimits::default(),
            token: None,
        }
    }
}

type Reply = Result<(FrameHeader, Vec<u8>), TransportError>;
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// `None` once the connection died: no new request may wait on it.
    pending: Pending,
}

impl Conn {
    fn is_alive(&self) -> bool {
        !self.tx.is_closed() && lock(&self.pending).is_some()
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

    /// Sends one request and waits for its response; a client with a resolver forgets its
    /// connection after an answer that says the server is not (or no longer) the one to ask.
    pub async fn call<M: Message>(&self, msg: &M) -> Result<M::Response, TransportError> {
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

    async fn call_once<M: Message>(&self, msg: &M) -> Result<M::Response, TransportError> {
        let timeout = self.inner.opts.request_timeout;
        let conn = self.connection().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&conn.pending);
            let Some(map) = pending.as_mut() else {
                return Err(TransportError::Closed);
            };
            map.insert(id, tx);
        }
        // Removes the entry if this future is dropped or times out before the reply.
        let _guard = PendingGuard {
            pending: &conn.pending,
            id,
        };
        if conn.tx.send(frame::encode_request(id, msg, 0)).is_err() {
            return Err(TransportError::Closed);
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply?,
            Ok(Err(_)) => return Err(TransportError::Closed),
            Err(_) => {
                return Err(TransportError::Timeout {
                    op: "rpc",
                    after: timeout,
                })
            }
        };
        let (header, body) = reply;
        frame::decode_response(&header, &body)
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
        let conn = Arc::new(spawn_conn(stream, opts.limits));
        *slot = Some(conn.clone());
        Ok(conn)
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_conn(stream: TcpStream, limits: FrameLimits) -> Conn {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));

    tokio::spawn(frame::write_coalesced(wr, rx));

    let reader_pending = pending.clone();
    tokio::spawn(async move {
        let mut rd = tokio::io::BufReader::with_capacity(64 << 10, &mut rd);
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
            let waiter = lock(&reader_pending)
                .as_mut()
                .and_then(|m| m.remove(&header.request_id));
            if let Some(w) = waiter {
                let _ = w.send(Ok((header, body)));
            }
        };
        // Fail everyone still waiting, and refuse new waiters on this connection.
        let waiters = lock(&reader_pending).take().unwrap_or_default();
        for (_, w) in waiters {
            let _ = w.send(Err(match &err {
                TransportError::Closed => TransportError::Closed,
                other => TransportError::Protocol(other.to_string()),
            }));
        }
    });

    Conn { tx, pending }
}
