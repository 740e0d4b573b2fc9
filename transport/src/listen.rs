//! What every kvpool server does the same way, written once: the accept loop (TCP or Unix
//! socket), the `Hello` gate, and the close-and-drain after a refusal.
//!
//! The master's RPC server ([`crate::server`]) and the storage node's data server
//! ([`crate::dataplane`]) differ in what they serve, not in how they guard a connection.

use std::{future::Future, io, time::Duration};

use kvpool_proto::{ErrorCode, FrameHeader, Opcode, Token, WireError};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    task::JoinSet,
};

use crate::{auth, frame, TransportError};

/// Back-off after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A listening socket: TCP for remote peers, Unix for same-host ones.
pub trait Listener: Send {
    type Stream: Send + 'static;
    /// The next connection and a printable name of its peer.
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> io::Result<(TcpStream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> io::Result<(UnixStream, String)> {
        let (s, _) = self.accept().await?;
        // Unix peers have no address worth printing; their credentials name them.
        let peer = s
            .peer_cred()
            .map(|c| format!("unix pid {}", c.pid().unwrap_or(0)))
            .unwrap_or_else(|_| "unix peer".into());
        Ok((s, peer))
    }
}

/// Accepts connections until `shutdown` completes, running `serve` on each in its own task;
/// then stops every connection task.
pub async fn accept_loop<L, F, Fut>(listener: L, shutdown: impl Future<Output = ()>, mut serve: F)
where
    L: Listener,
    F: FnMut(L::Stream, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept_one() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve(stream, peer));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("a connection task panicked: {e}");
                    }
                }
            }
        }
    }
    conns.shutdown().await;
}

/// What a server does with a request frame before it may serve it.
pub enum Gate {
    /// The frame is a `Hello` that was accepted: send this response frame, go on.
    Welcome(Vec<u8>),
    /// The peer is refused (no `Hello` first, wrong token, oversized `Hello`): send the
    /// error, close and [`linger`].
    Refuse(WireError),
    /// A malformed `Hello` to a server without a token: an ordinary bad request; answer it
    /// and go on.
    BadRequest(WireError),
    /// Not a `Hello`, and the connection may be served: the caller reads the frame.
    Serve,
}

/// Guards one request: a `Hello` is read (bounded: the peer is not trusted yet) and checked
/// against `token`; anything else passes only once `authed`. Reads nothing but a `Hello`'s
/// body.
pub async fn gate<R: AsyncRead + Unpin>(
    rd: &mut R,
    h: &FrameHeader,
    token: Option<&Token>,
    authed: &mut bool,
) -> Result<Gate, TransportError> {
    if h.opcode != Opcode::Hello as u8 || h.is_response() {
        return Ok(if *authed {
            Gate::Serve
        } else {
            // Neither body nor payload of an unauthenticated request is read.
            Gate::Refuse(auth::hello_required())
        });
    }
    if h.body_len > auth::MAX_HELLO_BODY || h.payload_len > 0 {
        return Ok(Gate::Refuse(auth::hello_too_large(
            h.body_len,
            h.payload_len,
        )));
    }
    let body = frame::read_body(rd, h.body_len).await?;
    Ok(match auth::check_hello(token, &body) {
        Ok(resp) => {
            *authed = true;
            Gate::Welcome(frame::encode_response(h.opcode, h.request_id, &resp, 0))
        }
        Err(e) if e.code == ErrorCode::Unauthorized => Gate::Refuse(e),
        Err(e) => Gate::BadRequest(e),
    })
}

/// After a refusal or a fatal error has been written and our side shut: keeps reading (and
/// discarding) for a moment, so the peer's unread requests do not turn the close into a reset
/// that loses the error.
pub async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let drain = async {
        let mut scratch = vec![0u8; 64 << 10];
        let mut total = 0;
        while total < auth::REFUSAL_LINGER_BYTES {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(auth::REFUSAL_LINGER, drain).await;
}
