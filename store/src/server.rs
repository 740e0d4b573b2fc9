//! The node's side of the data plane: what [`kvpool_transport::dataplane`]'s server needs of a
//! node (where a range's bytes are, what to keep of a write). The server itself (accept loop,
//! token gate, frame limits, Read/Write, payload I/O) is the transport crate's, shared by
//! every transport that carries frames.

use std::{future::Future, sync::Arc};

use std::os::fd::BorrowedFd;

use kvpool_proto::{
    FrameLimits, NodeId, ObjectTag, ReplicaId, SegmentId, ShmNvmeFile, ShmSegment, Token, WireError,
};
use kvpool_transport::{
    dataplane::{self, DataServerOptions, OwnedBytes, OwnedPayload, SegmentStore, Source},
    memory::SharedRange,
};
use tokio::net::TcpListener;

use crate::node::Node;

pub use kvpool_transport::dataplane::DIRECT_MIN;

/// A part of a value read off the NVMe tier, as the data server sends it.
struct DiskPart(crate::nvme::Part);

impl OwnedPayload for DiskPart {
    fn slices(&self) -> Vec<&[u8]> {
        vec![self.0.bytes()]
    }
}

impl SegmentStore for Node {
    fn limits(&self) -> &FrameLimits {
        Node::limits(self)
    }

    fn request_done(&self, opcode: u8, started: std::time::Instant, ok: bool) {
        self.metrics().request(opcode, started, ok);
    }

    fn payload_moved(&self, read: bool, bytes: u64) {
        if read {
            self.metrics().bytes_out(bytes);
        } else {
            self.metrics().bytes_in("tcp", bytes);
        }
    }

    fn read_range(
        &self,
        segment: SegmentId,
        offset: u64,
        len: u64,
    ) -> Result<Source<'_>, WireError> {
        if let Some(nvme) = self.nvme(segment) {
            let parts = nvme.read_parts(offset, len)?;
            return Ok(Source::Disk(Box::pin(futures::StreamExt::map(
                parts,
                |p| p.map(|p| Box::new(DiskPart(p)) as OwnedBytes),
            ))));
        }
        // A reader only reads ranges the master handed out to it; concurrent writes to the
        // same bytes happen only after the object was freed or evicted, and then the client's
        // lease check and checksum reject what it read.
        self.segment(segment)?
            .range(offset, len)
            .map(Source::Memory)
    }

    fn write_range(
        &self,
        segment: SegmentId,
        offset: u64,
        len: u64,
    ) -> Result<SharedRange, WireError> {
        if self.nvme(segment).is_some() {
            return Err(WireError::new(
                kvpool_proto::ErrorCode::InvalidArgument,
                "an NVMe segment is written by its node only (demotion), not by clients",
            ));
        }
        self.segment(segment)?.range(offset, len)
    }

    fn holds(&self, segment: SegmentId, offset: u64, len: u64, replica: ReplicaId) -> bool {
        // NVMe records carry no inventory tag: a cached location there is always stale, and
        // the client asks the master (clients cache DRAM locations only).
        self.inventory().holds(replica, segment, offset, len)
    }

    fn record_tags(&self, tags: Vec<ObjectTag>) {
        for tag in tags {
            self.record_tag(tag);
        }
    }

    fn commit_tag(&self, tag: ObjectTag) -> Result<(), WireError> {
        let len = tag.len;
        Node::commit_tag(self, tag)?;
        self.metrics().bytes_in("shm", len);
        Ok(())
    }

    fn commit_rdma_tag(&self, tag: ObjectTag) -> Result<(), WireError> {
        let len = tag.len;
        Node::commit_tag(self, tag)?;
        self.metrics().bytes_in("rdma", len);
        Ok(())
    }

    fn node_id(&self) -> NodeId {
        self.id()
    }

    fn board(&self) -> Option<(u64, BorrowedFd<'_>)> {
        self.inventory().board()
    }

    fn nvme_files(&self) -> Vec<(ShmNvmeFile, BorrowedFd<'_>)> {
        self.nvme_segment()
            .and_then(|n| {
                let file = ShmNvmeFile {
                    segment: n.id(),
                    size: n.tier().capacity(),
                };
                n.shared_file().map(|fd| (file, fd))
            })
            .into_iter()
            .collect()
    }

    fn shared_segments(&self) -> Vec<(ShmSegment, BorrowedFd<'_>)> {
        self.segments()
            .iter()
            .map(|s| {
                let seg = ShmSegment {
                    id: s.id(),
                    size: s.size(),
                    mapped: s.mapped_len(),
                };
                (seg, s.memfd())
            })
            .collect()
    }
}

/// Serves data-plane connections from `listener` until `shutdown` completes; then stops
/// accepting and ends every connection. No token: see [`serve_with_token`].
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    serve_with_token(listener, node, None, shutdown).await
}

/// [`serve`], requiring `token` (when set) in a `Hello` as the first frame of every
/// connection; anything else is answered `Unauthorized` and the connection closed.
pub async fn serve_with_token(
    listener: TcpListener,
    node: Arc<Node>,
    token: Option<Token>,
    shutdown: impl Future<Output = ()>,
) {
    let opts = DataServerOptions {
        token,
        ..DataServerOptions::default()
    };
    dataplane::serve(listener, node, opts, shutdown).await
}
