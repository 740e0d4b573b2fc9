//! A generic server for request/response services whose messages carry no payload (the
//! master). The service is synchronous: it maps an opcode and body to a response body, so
//! the state behind it can be a plain struct under a lock, with no awaits inside.

use std::{future::Future, sync::Arc};

use kvpool_proto::{ErrorCode, FrameLimits, Opcode, WireError};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::frame;

/// What a control-plane server does with one request.
pub trait RpcService: Send + Sync + 'static {
    /// Handles one request; returns the encoded response body or a request-level error.
    fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError>;
}

/// Accepts connections until `shutdown` completes, then stops every connection task.
pub async fn serve_rpc<S: RpcService>(
    listener: TcpListener,
    service: Arc<S>,
    limits: FrameLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let service = service.clone();
                    tasks.spawn(async move {
                        if let Err(e) = serve_conn(stream, service, limits).await {
                            debug!(%peer, "rpc connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn serve_conn<S: RpcService>(
    stream: TcpStream,
    service: Arc<S>,
    limits: FrameLimits,
) -> Result<(), crate::TransportError> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(first) = rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&first);
            while buf.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });

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
        } else {
            Opcode::try_from(header.opcode).and_then(|op| service.handle(op, &body))
        };
        let frame = match reply {
            Ok(body) => {
                let h = kvpool_proto::FrameHeader::response(
                    header.opcode,
                    header.request_id,
                    ErrorCode::Ok,
                    u32::try_from(body.len()).unwrap_or(u32::MAX),
                    0,
                );
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
    result
}
