//! The handshake on a data connection: the two calls a client and a node make to set up RDMA
//! lanes over an authenticated TCP data connection (after its `Hello`).
//!
//! - node: on a frame with opcode `RdmaConnect`, [`answer_connect`] gives the response frame
//!   to write and, on success, the [`RdmaPeer`] that owns the node's queue pairs; keep it
//!   with the connection and drop it when the connection closes. A node without a device
//!   passes `None` and answers `TransportUnsupported`, which the client takes as "use TCP".
//! - client: [`connect_over`] sends the request, reads the answer and connects the lanes.

use std::sync::Arc;

use kvpool_proto::{
    rdma::{RdmaConnect, RdmaEndpoint},
    ErrorCode, FrameLimits, Opcode, WireError,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{RdmaDevice, RdmaError, RdmaPeer};
use crate::frame;

/// Node side: the response frame to an `RdmaConnect` with `body`, and the lanes it set up.
pub fn answer_connect(
    dev: Option<&Arc<RdmaDevice>>,
    request_id: u64,
    body: &[u8],
) -> (Vec<u8>, Option<RdmaPeer>) {
    let op = Opcode::RdmaConnect as u8;
    let Some(dev) = dev else {
        let e = crate::dataplane::rdma_unsupported("this storage node has no RDMA device");
        return (frame::encode_error(op, request_id, &e), None);
    };
    let answered = RdmaConnect::decode(body)
        .map_err(RdmaError::Handshake)
        .and_then(|req| dev.accept(&req));
    match answered {
        Ok((endpoint, peer)) => (
            frame::encode_response(op, request_id, &endpoint, 0),
            Some(peer),
        ),
        Err(e) => {
            tracing::info!(error = %e, "refused an RDMA handshake");
            (frame::encode_error(op, request_id, &e.into_wire()), None)
        }
    }
}

/// Client side: sets up RDMA lanes over `stream` (a data connection, after its `Hello`).
/// An error that [`RdmaError::is_fallback`] says so means the node cannot do RDMA: use TCP.
pub async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    dev: &Arc<RdmaDevice>,
    request_id: u64,
    limits: &FrameLimits,
) -> Result<RdmaPeer, RdmaError> {
    let connecting = dev.connect()?;
    let request = frame::encode_request(request_id, &connecting.request(), 0);
    stream.write_all(&request).await.map_err(transport)?;
    let header = frame::read_header(stream, limits)
        .await
        .map_err(RdmaError::Connection)?
        .ok_or(RdmaError::Connection(crate::TransportError::Closed))?;
    let body = frame::read_body(stream, header.body_len)
        .await
        .map_err(RdmaError::Connection)?;
    if header.payload_len != 0 || header.request_id != request_id {
        return Err(RdmaError::Connection(crate::TransportError::Protocol(
            format!(
                "RdmaConnect answered with request id {} and {} payload bytes",
                header.request_id, header.payload_len
            ),
        )));
    }
    if header.code() != ErrorCode::Ok {
        return Err(RdmaError::Handshake(WireError::new(
            header.code(),
            String::from_utf8_lossy(&body).into_owned(),
        )));
    }
    let answer = RdmaEndpoint::decode(&body)?;
    connecting.finish(&answer)
}

fn transport(e: std::io::Error) -> RdmaError {
    RdmaError::Connection(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_proto::FrameHeader;

    #[test]
    fn a_node_without_a_device_answers_transport_unsupported() {
        let (bytes, peer) = answer_connect(None, 42, b"whatever");
        assert!(peer.is_none());
        let header = FrameHeader::decode(
            bytes[..kvpool_proto::HEADER_LEN].try_into().unwrap(),
            &FrameLimits::default(),
        )
        .unwrap();
        assert_eq!(header.request_id, 42);
        assert_eq!(header.opcode, Opcode::RdmaConnect as u8);
        let err =
            frame::decode_response::<RdmaEndpoint>(&header, &bytes[kvpool_proto::HEADER_LEN..])
                .unwrap_err();
        let crate::TransportError::Remote(w) = err else {
            panic!("not a remote error: {err}");
        };
        assert_eq!(w.code, ErrorCode::TransportUnsupported);
        // What the client makes of it: fall back to TCP.
        assert!(RdmaError::Handshake(w).is_fallback());
    }
}
