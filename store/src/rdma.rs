//! The node's RDMA device (feature `rdma`): opened at start-up, each DRAM segment registered
//! once for remote access (its rkey travels in every `RdmaConnect` answer), and deregistered
//! before the segment's memory can go.
//!
//! A node without a device (or a device without an active port) serves exactly as before and
//! answers `RdmaConnect` with `TransportUnsupported`, so its clients use shared memory or TCP.
//! The NVMe tier is never registered: its bytes are not in memory.

use std::sync::Arc;

use kvpool_transport::rdma::{Access, DeviceOptions, RdmaDevice};

use crate::node::Node;

/// The node's device with its segments registered. Holds the node, so the segments stay
/// mapped until this is dropped, and deregisters them first.
pub struct Registration {
    dev: Arc<RdmaDevice>,
    node: Arc<Node>,
    addrs: Vec<u64>,
}

impl Registration {
    /// Opens the device (`KVPOOL_RDMA_DEVICE`, `KVPOOL_RDMA_GID_INDEX`) and registers every
    /// DRAM segment of `node`; `None`, with one info line saying why, when there is no device
    /// or a segment cannot be registered (then the node does not offer RDMA at all: a client
    /// reaching some segments over RDMA and others not would gain little). Blocking: it pins
    /// every segment page.
    pub fn open(node: &Arc<Node>) -> Option<Registration> {
        let dev = match RdmaDevice::open(&DeviceOptions::from_env()) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!("no RDMA device; RdmaConnect is answered TransportUnsupported: {e}");
                return None;
            }
        };
        let mut reg = Registration {
            dev,
            node: node.clone(),
            addrs: Vec::new(),
        };
        for s in node.segments() {
            let whole = match s.range(0, s.size()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(segment = %s.id(), "no RDMA: {e}");
                    return None;
                }
            };
            // SAFETY: the segment is mapped as long as the node lives, and `reg` holds the
            // node until its `Drop` has deregistered the segment. Remote peers writing it is
            // what segments are for (the master hands out disjoint ranges).
            let r = unsafe {
                reg.dev
                    .register(s.id().0, whole.addr(), s.size(), Access::Remote)
            };
            match r {
                Ok(_) => reg.addrs.push(whole.addr()),
                Err(e) => {
                    tracing::warn!(segment = %s.id(), "cannot register the segment for RDMA: {e}");
                    return None;
                }
            }
        }
        tracing::info!(
            device = reg.dev.name(),
            segments = reg.addrs.len(),
            "serving one-sided RDMA"
        );
        Some(reg)
    }

    /// The device, for the data server's `RdmaConnect` answers.
    pub fn device(&self) -> Arc<RdmaDevice> {
        self.dev.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for &a in &self.addrs {
            if let Err(e) = self.dev.unregister(a) {
                tracing::warn!(addr = a, "deregistering a segment: {e}");
            }
        }
        tracing::debug!(node = %self.node.id(), "segments deregistered");
    }
}
