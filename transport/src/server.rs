//! A generic server for request/response services whose messages carry no payload (the
//! master). The service is synchronous: it maps an opcode and body to a response body, so
//! the state behind it can be a plain struct under a lock, with no awaits inside.

use std::{future::Future, sync::Arc};

use kvpool_proto::{encode_body, ErrorCode, FrameLimits, LocalResponse, Opcode, Token, WireError};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixStream},
    sync::mpsc,
};
use tracing::{debug, warn};

use crate::{
    dataplane::RawSocket,
    frame,
    listen::{self, Gate},
};

/// What a control-plane server does with one request.
pub trait RpcService: Send + Sync + 'static {
    /// Handles one request; returns the encoded response body or a request-level error.
    fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError>;

    /// Flag bits to set on every successful response to `opcode`, besides
    /// [`kvpool_proto::header::FLAG_RESPONSE`]: what the service says of its answers as a
    /// whole (the master's `FLAG_NO_PROMOTION`). None by default.
    fn response_flags(&self, _opcode: Opcode) -> u8 {
        0
    }
}

/// How a control-plane server guards and bounds its connections.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub limits: FrameLimits,
    /// The cluster token. When set, every connection must start with a `Hello` carrying it;
    /// anything else is answered `Unauthorized` and the connection closed.
    pub token: Option<Token>,
    /// The Unix socket this service is also served on, named to same-host clients that ask
    /// (`Local`), so they skip loopback TCP.
    pub local_socket: Option<String>,
}

/// A connected socket a server reads requests from and writes answers to, each half on its
/// own task.
pub trait Duplex: RawSocket {
    type Rd: AsyncRead + Unpin + Send + 'static;
    type Wr: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Rd, Self::Wr);
}

impl Duplex for TcpStream {
    type Rd = tokio::net::tcp::OwnedReadHalf;
    type Wr = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
}

impl Duplex for UnixStream {
    type Rd = tokio::net::unix::OwnedReadHalf;
    type Wr = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
}

/// Accepts connections until `shutdown` completes, then stops every connection task. No
/// token: see [`serve_rpc_with`].
pub async fn serve_rpc<S: RpcService>(
    listener: TcpListener,
    service: Arc<S>,
    limits: FrameLimits,
    shutdown: impl Future<Output = ()>,
) {
    let opts = ServerOptions {
        limits,
        ..ServerOptions::default()
    };
    serve_rpc_with(listener, service, opts, shutdown).await
}

/// Accepts connections until `shutdown` completes, then stops every connection task.
pub async fn serve_rpc_with<S: RpcService, L: listen::Listener>(
    listener: L,
    service: Arc<S>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) where
    L::Stream: Duplex,
{
    let opts = Arc::new(opts);
    listen::accept_loop(listener, shutdown, |stream, peer| {
        let service = service.clone();
        let opts = opts.clone();
        async move {
            match serve_conn(stream, service, &opts).await {
                Ok(()) => {}
                Err(crate::TransportError::Remote(e)) => {
                    warn!(%peer, "refused a connection: {e}");
                }
                Err(e) => debug!(%peer, "rpc connection ended: {e}"),
            }
        }
    })
    .await
}

/// Serves one connection. `Err(Remote(Unauthorized))` means the peer was refused (no or a
/// wrong token) and the connection closed.
async fn serve_conn<S: RpcService, D: Duplex>(
    stream: D,
    service: Arc<S>,
    opts: &ServerOptions,
) -> Result<(), crate::TransportError> {
    let limits = opts.limits;
    // Nothing is served before the Hello when a token is configured.
    let mut authed = opts.token.is_none();
    stream.prepare()?;
    let (rd, wr) = stream.into_halves();
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(frame::write_coalesced(wr, rx));

    let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    let result = loop {
        let header = match frame::read_header(&mut rd, &limits).await {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(crate::TransportError::Header(e)) => {
                // The stream's framing can no longer be trusted: say why, then close.
                let _ = tx.send(frame::encode_error(
                    0,
                    0,
                    &WireError::new(e.code(), e.to_string()),
                ));
                break Err(crate::TransportError::Header(e));
            }
            Err(e) => break Err(e),
        };
        match listen::gate(&mut rd, &header, opts.token.as_ref(), &mut authed).await {
            Err(e) => break Err(e),
            Ok(Gate::Serve) => {}
            Ok(Gate::Welcome(f)) => {
                if tx.send(f).is_err() {
                    break Ok(());
                }
                continue;
            }
            Ok(Gate::BadRequest(e)) => {
                let f = frame::encode_error(header.opcode, header.request_id, &e);
                if tx.send(f).is_err() {
                    break Ok(());
                }
                continue;
            }
            Ok(Gate::Refuse(e)) => {
                let _ = tx.send(frame::encode_error(header.opcode, header.request_id, &e));
                break Err(crate::TransportError::Remote(e));
            }
        }
        let body = match frame::read_body(&mut rd, header.body_len).await {
            Ok(b) => b,
            Err(e) => break Err(e),
        };
        if header.payload_len > 0 {
            if let Err(e) = frame::discard(&mut rd, header.payload_len).await {
                break Err(e);
            }
        }
        let reply = if header.is_response() {
            Err(WireError::new(
                ErrorCode::InvalidArgument,
                "a response frame sent to a server",
            ))
        } else if header.payload_len > 0 {
            Err(WireError::new(
                ErrorCode::InvalidArgument,
                "control requests carry no payload",
            ))
        } else if header.opcode == Opcode::Local as u8 {
            // Answered here for every service: where it is served without TCP.
            Ok((
                encode_body(&LocalResponse {
                    host: crate::shm::net_host_id(),
                    socket: opts.local_socket.clone(),
                }),
                0,
            ))
        } else {
            Opcode::try_from(header.opcode)
                .and_then(|op| Ok((service.handle(op, &body)?, service.response_flags(op))))
        };
        let frame = match reply {
            Ok((body, flags)) => {
                let h = kvpool_proto::FrameHeader::response(
                    header.opcode,
                    header.request_id,
                    ErrorCode::Ok,
                    u32::try_from(body.len()).unwrap_or(u32::MAX),
                    0,
                )
                .with_flags(flags);
                let mut buf = Vec::with_capacity(kvpool_proto::HEADER_LEN + body.len());
                buf.extend_from_slice(&h.encode());
                buf.extend_from_slice(&body);
                buf
            }
            Err(e) => frame::encode_error(header.opcode, header.request_id, &e),
        };
        if tx.send(frame).is_err() {
            break Ok(());
        }
    };
    drop(tx);
    let _ = writer.await;
    if matches!(&result, Err(crate::TransportError::Remote(_))) {
        listen::linger(&mut rd).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        rpc::{RpcClient, RpcOptions},
        TransportError,
    };
    use kvpool_proto::{encode_body, FrameHeader, Status, StatusResponse, HEADER_LEN};
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    /// Answers Status with an empty cluster; everything else is unknown.
    struct Echo;

    impl RpcService for Echo {
        fn handle(&self, opcode: Opcode, _body: &[u8]) -> Result<Vec<u8>, WireError> {
            match opcode {
                Opcode::Status => Ok(encode_body(&StatusResponse {
                    nodes: Vec::new(),
                    objects: 7,
                    processing: 0,
                    evictions: 0,
                })),
                _ => Err(WireError::new(ErrorCode::WrongService, "not here")),
            }
        }
    }

    async fn server(token: Option<&str>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let opts = ServerOptions {
            limits: FrameLimits::default(),
            token: token.map(|t| Token::new(t).unwrap()),
            local_socket: None,
        };
        tokio::spawn(serve_rpc_with(
            listener,
            Arc::new(Echo),
            opts,
            std::future::pending(),
        ));
        addr
    }

    fn client(addr: &str, token: Option<&str>) -> RpcClient {
        RpcClient::new(
            addr,
            RpcOptions {
                token: token.map(|t| Token::new(t).unwrap()),
                ..RpcOptions::default()
            },
        )
    }

    fn unauthorized(r: Result<StatusResponse, TransportError>) -> String {
        match r {
            Err(TransportError::Remote(w)) if w.code == ErrorCode::Unauthorized => w.message,
            other => panic!("expected Unauthorized, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_token_server_refuses_all_but_the_right_token() {
        let addr = server(Some("s3cret")).await;
        let msg = unauthorized(client(&addr, None).call(&Status {}).await);
        assert!(msg.contains("requires a token"), "{msg}");
        let msg = unauthorized(client(&addr, Some("wrong")).call(&Status {}).await);
        assert!(msg.contains("wrong cluster token"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
        let ok = client(&addr, Some("s3cret"))
            .call(&Status {})
            .await
            .unwrap();
        assert_eq!(ok.objects, 7);
    }

    #[tokio::test]
    async fn an_open_server_accepts_clients_with_or_without_a_token() {
        let addr = server(None).await;
        assert_eq!(
            client(&addr, None).call(&Status {}).await.unwrap().objects,
            7
        );
        assert_eq!(
            client(&addr, Some("any"))
                .call(&Status {})
                .await
                .unwrap()
                .objects,
            7
        );
    }

    #[tokio::test]
    async fn raw_frames_without_hello_are_refused_then_closed() {
        let addr = server(Some("s3cret")).await;
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let body = encode_body(&Status {});
        let mut req = FrameHeader::request(Opcode::Status as u8, 42, body.len() as u32, 0)
            .encode()
            .to_vec();
        req.extend_from_slice(&body);
        // Two requests: the second must not be served either.
        s.write_all(&req).await.unwrap();
        s.write_all(&req).await.unwrap();
        let mut head = [0u8; HEADER_LEN];
        s.read_exact(&mut head).await.unwrap();
        let h = FrameHeader::decode(&head, &FrameLimits::default()).unwrap();
        assert_eq!((h.code(), h.request_id), (ErrorCode::Unauthorized, 42));
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), h.body_len as usize, "nothing after the refusal");
        // The server goes on serving others.
        let ok = client(&addr, Some("s3cret"))
            .call(&Status {})
            .await
            .unwrap();
        assert_eq!(ok.objects, 7);
    }

    #[tokio::test]
    async fn requests_that_arrive_together_are_all_answered_in_order() {
        let addr = server(None).await;
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let body = encode_body(&Status {});
        let mut reqs = Vec::new();
        for id in 1..=50u64 {
            reqs.extend_from_slice(
                &FrameHeader::request(Opcode::Status as u8, id, body.len() as u32, 0).encode(),
            );
            reqs.extend_from_slice(&body);
        }
        // One unknown opcode in the middle is answered in its place.
        reqs.extend_from_slice(&FrameHeader::request(Opcode::Read as u8, 51, 0, 0).encode());
        s.write_all(&reqs).await.unwrap();
        for id in 1..=51u64 {
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).await.unwrap();
            let h = FrameHeader::decode(&head, &FrameLimits::default()).unwrap();
            assert_eq!(h.request_id, id);
            let want = if id == 51 {
                ErrorCode::WrongService
            } else {
                ErrorCode::Ok
            };
            assert_eq!(h.code(), want, "request {id}");
            let mut body = vec![0u8; h.body_len as usize];
            s.read_exact(&mut body).await.unwrap();
        }
    }
}
