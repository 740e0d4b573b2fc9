//! The data server's two RDMA requests: `RdmaConnect` (set up queue pairs over this
//! connection) and `RdmaWritten` (the object tags of a put written with one-sided WRITEs).
//!
//! Both are answered whatever the build: without the `rdma` feature, or without a device,
//! `RdmaConnect` gets [`rdma_unsupported`], which the client reads as "use shared memory or
//! TCP"; `RdmaWritten` is only a message and is always served, since the tags it carries are
//! what keeps the node's inventory true after bytes arrived that its CPU never saw.

use kvpool_proto::{ErrorCode, FrameHeader, UnitResponse, WireError};
use tokio::io::AsyncWriteExt;

use super::{small_request, Close, Conn, DataServerOptions, Io, SegmentStore};
use crate::frame;

/// The answer to `RdmaConnect` from a node that cannot set up RDMA lanes, saying why. The
/// one place this answer is made (the RDMA layer's `answer_connect` uses it too).
pub fn rdma_unsupported(why: &str) -> WireError {
    WireError::new(
        ErrorCode::TransportUnsupported,
        format!("{why}; use shared memory or TCP"),
    )
}

/// The RDMA lanes a connection set up; they live exactly as long as the connection (dropping
/// them destroys the node's queue pairs), so the connection's task owns them.
#[derive(Default)]
pub(super) struct Lanes {
    #[cfg(feature = "rdma")]
    peer: Option<crate::rdma::RdmaPeer>,
}

/// Answers `RdmaConnect`: the node's endpoint with its lanes ready to receive, or why not.
pub(super) async fn connect<S: Conn>(
    io: &mut Io<S>,
    opts: &DataServerOptions,
    h: &FrameHeader,
    lanes: &mut Lanes,
) -> Result<(), Close> {
    let body = frame::read_body(io, h.body_len).await?;
    frame::discard(io, h.payload_len).await?;
    #[cfg(feature = "rdma")]
    let answer = {
        let (answer, peer) =
            crate::rdma::wire::answer_connect(opts.rdma.as_ref(), h.request_id, &body);
        if peer.is_some() {
            // A second handshake on one connection replaces the first one's lanes.
            lanes.peer = peer;
        }
        answer
    };
    #[cfg(not(feature = "rdma"))]
    let answer = {
        let _ = (body, opts, &lanes);
        let e = rdma_unsupported("this storage node was built without RDMA (feature `rdma`)");
        frame::encode_error(h.opcode, h.request_id, &e)
    };
    io.get_mut().write_all(&answer).await?;
    Ok(())
}

/// Records the tags of a put whose bytes a client wrote with one-sided RDMA WRITEs: one
/// result per tag, a tag outside the node's DRAM segments refused.
pub(super) async fn written<S: Conn, T: SegmentStore>(
    io: &mut Io<S>,
    store: &T,
    h: &FrameHeader,
) -> Result<(), Close> {
    let Some(kvpool_proto::rdma::RdmaWritten { tags }) = small_request(io, h).await? else {
        return Ok(());
    };
    let items = tags.into_iter().map(|t| store.commit_rdma_tag(t)).collect();
    let f = frame::encode_response(h.opcode, h.request_id, &UnitResponse { items }, 0);
    io.get_mut().write_all(&f).await?;
    Ok(())
}
