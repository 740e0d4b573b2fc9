//! The transfer engine's RDMA path: whether a node is reached over RDMA, the client's
//! registered buffers, and running a batch as one-sided READs (gets) and WRITEs (puts).
//!
//! Selection per node, after shared memory: RDMA when this process opened a device (feature
//! `rdma`, a device with an active port) and the node answered `RdmaConnect` on a dedicated
//! data connection; otherwise TCP. `transport = "rdma"` makes a node that cannot be reached
//! over RDMA an error (`TransportUnsupported`, naming the node and why); `auto` falls back
//! silently, with one info line per reason (no device here; a node without one).
//!
//! Pieces of caller memory inside a buffer registered with [`RdmaPath::register`] move
//! straight between it and the node's segment; other pieces go through one registered bounce
//! buffer ([`BOUNCE_SIZE`]): copied into it before WRITEs, out of it after READs. A batch
//! needing more bounce bytes than that goes over TCP (registering per batch would cost more
//! than the copy it saves).
//!
//! Without the feature only the bookkeeping of registered buffers exists (the same rules as
//! with a device, so Python's `register_buffer` behaves the same everywhere).

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};

use kvpool_proto::{ErrorCode, WireError};

use crate::{
    rdma::{
        registry::{Access, Region, Registry},
        RdmaError,
    },
    TransportError,
};

/// Bytes of the registered bounce buffer through which unregistered caller memory moves.
pub const BOUNCE_SIZE: usize = 64 << 20;

/// What the RDMA path did with a batch: ran it, or hands it back for TCP.
pub(super) enum Via<I, R> {
    // Only the device path (feature `rdma`) runs batches.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Done(Vec<kvpool_proto::ItemResult<R>>),
    Tcp(Vec<I>),
}

/// The error of a request forced onto RDMA (`transport = "rdma"`) that cannot use it.
pub(super) fn forced(addr: &str, why: &str) -> TransportError {
    TransportError::Remote(WireError::new(
        ErrorCode::TransportUnsupported,
        format!("transport = rdma: node at {addr}: {why}"),
    ))
}

/// The client's RDMA state: its registered buffers and, with the feature, its device and
/// per-node connections.
#[derive(Default)]
pub(super) struct RdmaPath {
    /// Every buffer `register`ed, by address: the record kept with or without a device, so
    /// registering and unregistering follow one set of rules (`rdma::registry`).
    buffers: Mutex<Registry<()>>,
    next_buffer: AtomicU64,
    #[cfg(feature = "rdma")]
    dev: device::Lazy,
    #[cfg(feature = "rdma")]
    peers: Mutex<std::collections::HashMap<String, device::State>>,
}

impl RdmaPath {
    fn buffers(&self) -> MutexGuard<'_, Registry<()>> {
        // Every change is one insert or remove: a poisoned lock still holds a consistent map.
        self.buffers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (and, with a device, registers for local access) `[addr, addr + len)`.
    /// Registering exactly the same range again is a no-op; an empty, wrapping or null
    /// range, or one overlapping another registered range, is refused (`InvalidArgument`).
    ///
    /// # Safety
    /// The memory must stay mapped until [`RdmaPath::unregister`] returns `Ok` for it: the
    /// device may read and write it during any later transfer that names it.
    pub(super) unsafe fn register(&self, addr: u64, len: u64) -> Result<(), WireError> {
        if addr == 0 {
            return Err(RdmaError::InvalidArgument("a null address".into()).into_wire());
        }
        let mut buffers = self.buffers();
        if buffers
            .lookup(addr, len)
            .is_ok_and(|r| r.addr == addr && r.len == len)
        {
            return Ok(());
        }
        let id = self.next_buffer.fetch_add(1, Ordering::Relaxed);
        buffers
            .check_new(id, addr, len)
            .map_err(RdmaError::into_wire)?;
        #[cfg(feature = "rdma")]
        if let Some(dev) = self.dev.opened() {
            // SAFETY: the caller keeps the memory mapped until it is unregistered.
            unsafe { dev.register(id, addr, len, Access::Local) }.map_err(RdmaError::into_wire)?;
        }
        let region = Region {
            id,
            addr,
            len,
            lkey: 0,
            rkey: 0,
            access: Access::Local,
        };
        buffers.insert(region, ()).map_err(RdmaError::into_wire)?;
        Ok(())
    }

    /// Forgets the buffer registered at `addr` (deregistering it from the device): `true` if
    /// one was, `false` if none starts there (unregistering twice is harmless). Refused
    /// (`InvalidArgument`) while a transfer uses it.
    pub(super) fn unregister(&self, addr: u64) -> Result<bool, WireError> {
        let mut buffers = self.buffers();
        if buffers.lookup(addr, 1).map_or(true, |r| r.addr != addr) {
            return Ok(false);
        }
        #[cfg(feature = "rdma")]
        if let Some(dev) = self.dev.opened() {
            match dev.unregister(addr) {
                // Recorded while the device was being opened, and so never registered with
                // it (its transfers went through the bounce buffer).
                Ok(_) | Err(RdmaError::NotRegistered { .. }) => {}
                Err(e) => return Err(e.into_wire()),
            }
        }
        buffers.remove(addr).map_err(RdmaError::into_wire)?;
        Ok(true)
    }

    /// The buffers registered, as `(addr, len)` in address order.
    pub(super) fn registered(&self) -> Vec<(u64, u64)> {
        self.buffers().regions().map(|r| (r.addr, r.len)).collect()
    }
}

#[cfg(not(feature = "rdma"))]
impl RdmaPath {
    /// Why RDMA is not used in this build.
    const NO_FEATURE: &'static str =
        "this client was built without RDMA (cargo feature `rdma` of kvpool-transport)";

    pub(super) fn describe(&self, _addr: &str) -> Option<&'static str> {
        None
    }

    pub(super) async fn probe(
        &self,
        _addr: &str,
        _opts: &super::EngineOptions,
    ) -> Result<(), String> {
        Err(Self::NO_FEATURE.into())
    }

    pub(super) async fn write<'a>(
        &self,
        addr: &str,
        items: Vec<super::WriteItem<'a>>,
        _tags: &[kvpool_proto::ObjectTag],
        opts: &super::EngineOptions,
    ) -> Result<Via<super::WriteItem<'a>, ()>, TransportError> {
        self.unavailable(addr, items, opts)
    }

    pub(super) async fn read<'a>(
        &self,
        addr: &str,
        items: Vec<super::ReadItem<'a>>,
        opts: &super::EngineOptions,
    ) -> Result<Via<super::ReadItem<'a>, u32>, TransportError> {
        self.unavailable(addr, items, opts)
    }

    fn unavailable<I, R>(
        &self,
        addr: &str,
        items: Vec<I>,
        opts: &super::EngineOptions,
    ) -> Result<Via<I, R>, TransportError> {
        match opts.transport {
            crate::shm::TransportMode::Rdma => Err(forced(addr, Self::NO_FEATURE)),
            _ => Ok(Via::Tcp(items)),
        }
    }
}

#[cfg(feature = "rdma")]
mod device;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_validates_and_is_idempotent() {
        let path = RdmaPath::default();
        let buf = vec![0u8; 8192];
        let addr = buf.as_ptr() as u64;
        // SAFETY: `buf` outlives `path`'s use of it (all the calls below); no transfer runs.
        unsafe {
            path.register(addr, 4096).unwrap();
            path.register(addr, 4096).unwrap();
            // Adjacent is fine; overlapping, empty, wrapping or null is not.
            path.register(addr + 4096, 4096).unwrap();
            for (a, l, why) in [
                (addr + 100, 10, "overlaps"),
                (addr, 8192, "overlaps"),
                (addr + 9000, 0, "empty"),
                (u64::MAX - 1, 4, "wraps"),
                (0, 16, "null"),
            ] {
                let e = path.register(a, l).unwrap_err();
                assert_eq!(e.code, ErrorCode::InvalidArgument, "{why}");
                assert!(e.message.contains(why), "{why}: {}", e.message);
            }
        }
        assert_eq!(path.registered(), vec![(addr, 4096), (addr + 4096, 4096)]);
        assert!(path.unregister(addr).unwrap());
        assert!(!path.unregister(addr).unwrap());
        // Not the start of a region: nothing is removed.
        assert!(!path.unregister(addr + 4097).unwrap());
        assert_eq!(path.registered(), vec![(addr + 4096, 4096)]);
        // SAFETY: as above.
        unsafe { path.register(addr, 4096).unwrap() };
        assert_eq!(path.registered().len(), 2);
    }
}
