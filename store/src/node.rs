//! The storage node's shared state: identity, segments, inventory.

use kvpool_proto::{
    ErrorCode, FrameLimits, NodeId, ObjectTag, Register, SegmentId, SegmentInfo, WireError,
};

use crate::{inventory::Inventory, segment::Segment};

/// One storage node, shared by the data server's connection tasks and the master agent.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    name: String,
    addr: String,
    segments: Vec<Segment>,
    inventory: Inventory,
    limits: FrameLimits,
}

impl Node {
    /// A node with a fresh random id. `addr` is the data address the master gives clients.
    pub fn new(name: String, addr: String, segments: Vec<Segment>) -> Node {
        Node {
            id: NodeId(rand::random()),
            name,
            addr,
            segments,
            inventory: Inventory::new(),
            limits: FrameLimits::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The advertised data address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Frame size limits enforced on the data plane.
    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// The segment with this id. A linear scan: a node has one segment per memory tier or
    /// NUMA node, a handful at most.
    pub fn segment(&self, id: SegmentId) -> Result<&Segment, WireError> {
        self.segments.iter().find(|s| s.id() == id).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownSegment,
                format!("segment {id} is not on this node"),
            )
        })
    }

    pub fn segment_infos(&self) -> Vec<SegmentInfo> {
        self.segments.iter().map(Segment::info).collect()
    }

    /// Records a write's tag if it names a range of one of this node's segments; a tag that
    /// does not is the writer's bug and is ignored (it could never be reported anyway).
    pub fn record_tag(&self, tag: ObjectTag) {
        match self
            .segment(tag.segment)
            .and_then(|s| s.check(tag.offset, tag.len))
        {
            Ok(_) => self.inventory.record(tag),
            Err(e) => tracing::debug!(replica = tag.replica.0, "ignoring object tag: {e}"),
        }
    }

    /// A registration carrying a fresh inventory report (checksums every entry's bytes).
    pub fn register_msg(&self) -> Register {
        Register {
            node: self.id,
            name: self.name.clone(),
            addr: self.addr.clone(),
            segments: self.segment_infos(),
            inventory: self.inventory.report(&self.segments),
        }
    }
}
