//! The storage node's shared state: identity, segments, inventory.

use kvpool_proto::{
    ErrorCode, FrameLimits, NodeId, ObjectTag, Register, ReplicaId, SegmentId, SegmentInfo,
    WireError,
};

use kvpool_transport::shm::{board as shm_board, BoardWriter};

use crate::{inventory::Inventory, metrics::NodeMetrics, segment::Segment, tiered::NvmeSegment};

/// One storage node, shared by the data server's connection tasks and the master agent.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    name: String,
    addr: String,
    segments: Vec<Segment>,
    /// The second tier, when the node has a disk configured.
    nvme: Option<NvmeSegment>,
    inventory: Inventory,
    limits: FrameLimits,
    metrics: NodeMetrics,
}

impl Node {
    /// A node with a fresh random id. `addr` is the data address the master gives clients.
    pub fn new(name: String, addr: String, segments: Vec<Segment>) -> Node {
        Self::with_nvme(name, addr, segments, None, true)
    }

    /// A node with DRAM segments and, optionally, an NVMe segment; with a replica board for
    /// same-host clients when `board`.
    pub fn with_nvme(
        name: String,
        addr: String,
        segments: Vec<Segment>,
        nvme: Option<NvmeSegment>,
        board: bool,
    ) -> Node {
        let dram: u64 = segments.iter().map(Segment::size).sum();
        let made = board
            .then(|| BoardWriter::new(shm_board::slots_for(dram)).and_then(Inventory::with_board));
        let inventory = match made {
            None => Inventory::new(),
            Some(Ok(inv)) => inv,
            Some(Err(e)) => {
                tracing::warn!(
                    "no replica board ({e}): same-host clients check cached locations over \
                     the socket"
                );
                Inventory::new()
            }
        };
        Node {
            id: NodeId(rand::random()),
            name,
            addr,
            segments,
            nvme,
            inventory,
            limits: FrameLimits::default(),
            metrics: NodeMetrics::new(),
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

    /// The node's counters (served on its HTTP endpoint).
    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
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

    /// The NVMe segment with this id, if it is this node's.
    pub fn nvme(&self, id: SegmentId) -> Option<&NvmeSegment> {
        self.nvme.as_ref().filter(|n| n.id() == id)
    }

    /// The node's NVMe segment, if it has one.
    pub fn nvme_segment(&self) -> Option<&NvmeSegment> {
        self.nvme.as_ref()
    }

    pub fn segment_infos(&self) -> Vec<SegmentInfo> {
        let mut v: Vec<SegmentInfo> = self.segments.iter().map(Segment::info).collect();
        v.extend(self.nvme.as_ref().map(NvmeSegment::info));
        v
    }

    /// Forgets replicas the master freed, on whichever tier holds them.
    pub fn free(&self, ids: &[ReplicaId]) {
        self.inventory.free(ids);
        if let Some(n) = &self.nvme {
            for id in ids {
                n.free(*id);
            }
        }
    }

    /// Segments that should get no new data (an I/O error or a full disk).
    pub fn unhealthy(&self) -> Vec<SegmentId> {
        self.nvme
            .iter()
            .filter(|n| !n.healthy())
            .map(NvmeSegment::id)
            .collect()
    }

    /// Replicas dropped on this node as corrupt since the last call, for a heartbeat.
    pub fn take_lost(&self) -> Vec<ReplicaId> {
        self.nvme
            .as_ref()
            .map_or_else(Vec::new, |n| n.lost().take())
    }

    /// A heartbeat that carried `lost` failed: they go in the next one.
    pub fn put_back_lost(&self, lost: Vec<ReplicaId>) {
        if let Some(n) = &self.nvme {
            n.lost().put_back(lost);
        }
    }

    /// Records a write's tag if it names a range of one of this node's segments; a tag that
    /// does not is the writer's bug and is ignored (it could never be reported anyway).
    pub fn record_tag(&self, tag: ObjectTag) {
        let replica = tag.replica.0;
        if let Err(e) = self.commit_tag(tag) {
            tracing::debug!(replica, "ignoring object tag: {e}");
        }
    }

    /// Records a write's tag, or says why its range is none of this node's DRAM segments.
    pub fn commit_tag(&self, tag: ObjectTag) -> Result<(), WireError> {
        self.segment(tag.segment)?.check(tag.offset, tag.len)?;
        self.inventory.record(tag);
        Ok(())
    }

    /// A registration carrying a fresh inventory report (checksums every entry's bytes).
    pub fn register_msg(&self) -> Register {
        Register {
            node: self.id,
            name: self.name.clone(),
            addr: self.addr.clone(),
            segments: self.segment_infos(),
            inventory: {
                let mut inv = self.inventory.report(&self.segments);
                inv.extend(self.nvme.iter().flat_map(NvmeSegment::inventory));
                inv
            },
        }
    }
}
