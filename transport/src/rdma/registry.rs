//! Registration bookkeeping: which memory is registered with the device, under which keys.
//!
//! Memory is registered once (registration pins pages and costs milliseconds) and then named
//! by its keys in every transfer: a node registers its segments at start-up with
//! [`Access::Remote`] (peers read and write them), a client its buffers with
//! [`Access::Local`] (only its own requests use them: no peer can touch a client's memory,
//! whatever keys it guesses). The Python `register_buffer` maps to a client registration. The registry refuses an empty or wrapping range and any overlap with a
//! registered one, so an address has at most one region and one `lkey`; a lookup must fall
//! inside one region (a transfer's scatter/gather piece names exactly one `lkey`). A region in
//! use by a running batch is pinned and cannot be unregistered: deregistering memory the
//! device is still reading or writing would fail those transfers with protection errors.
//!
//! Sans-I/O: the device's handle for a region is a type parameter, so the rules are tested
//! without a device and the device layer stores its memory-region handle here.

use std::collections::BTreeMap;

use kvpool_proto::rdma::RegionDesc;

use super::RdmaError;

/// Who may use a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// This side's requests only (a client's buffers): registered for local access alone and
    /// never described to a peer.
    Local,
    /// Peers too (a node's segments): remote read and write, described in the handshake.
    Remote,
}

/// A registered region, as transfers and the handshake see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Chosen by the owner: a segment id on a node, a buffer id on a client.
    pub id: u64,
    pub addr: u64,
    pub len: u64,
    /// Local key: names the region in this side's scatter/gather entries.
    pub lkey: u32,
    /// Remote key: lets the peer read and write it (meaningless for [`Access::Local`]).
    pub rkey: u32,
    pub access: Access,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    pub fn desc(&self) -> RegionDesc {
        RegionDesc {
            id: self.id,
            addr: self.addr,
            len: self.len,
            rkey: self.rkey,
        }
    }
}

#[derive(Debug)]
struct Entry<H> {
    region: Region,
    handle: H,
    pins: u32,
}

/// The registered regions of one protection domain, keyed by start address.
#[derive(Debug)]
pub struct Registry<H> {
    by_addr: BTreeMap<u64, Entry<H>>,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Registry {
            by_addr: BTreeMap::new(),
        }
    }
}

/// `[addr, addr + len)`, refusing empty and wrapping ranges.
fn range_end(addr: u64, len: u64) -> Result<u64, RdmaError> {
    match addr.checked_add(len) {
        Some(end) if len > 0 => Ok(end),
        _ => Err(RdmaError::InvalidArgument(format!(
            "range [{addr:#x}, +{len}) is empty or wraps the address space"
        ))),
    }
}

impl<H> Registry<H> {
    /// Checks that `[addr, addr + len)` may be registered under `id`: non-empty, no wrap, no
    /// overlap, a new id. Called before the device registers anything, so a refused range
    /// never reaches the device.
    pub fn check_new(&self, id: u64, addr: u64, len: u64) -> Result<(), RdmaError> {
        let end = range_end(addr, len)?;
        if self.by_addr.values().any(|e| e.region.id == id) {
            return Err(RdmaError::InvalidArgument(format!(
                "region id {id} is already registered"
            )));
        }
        // The only candidates are the last region starting before `end`: regions do not
        // overlap each other, so an earlier one ends before that one starts.
        if let Some((_, e)) = self.by_addr.range(..end).next_back() {
            if e.region.end() > addr {
                return Err(RdmaError::Overlap {
                    addr,
                    len,
                    existing: e.region.id,
                    existing_addr: e.region.addr,
                    existing_len: e.region.len,
                });
            }
        }
        Ok(())
    }

    /// Records a region the device registered.
    pub fn insert(&mut self, region: Region, handle: H) -> Result<&Region, RdmaError> {
        self.check_new(region.id, region.addr, region.len)?;
        let e = self.by_addr.entry(region.addr).or_insert(Entry {
            region,
            handle,
            pins: 0,
        });
        Ok(&e.region)
    }

    /// The region that holds all of `[addr, addr + len)`.
    pub fn lookup(&self, addr: u64, len: u64) -> Result<&Region, RdmaError> {
        let end = range_end(addr, len)?;
        match self.by_addr.range(..=addr).next_back() {
            Some((_, e)) if e.region.end() >= end => Ok(&e.region),
            _ => Err(RdmaError::NotRegistered { addr, len }),
        }
    }

    /// Marks the region starting at `addr` as used by a running batch.
    pub fn pin(&mut self, addr: u64) {
        if let Some(e) = self.by_addr.get_mut(&addr) {
            e.pins += 1;
        }
    }

    /// Ends one [`Registry::pin`].
    pub fn unpin(&mut self, addr: u64) {
        if let Some(e) = self.by_addr.get_mut(&addr) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Forgets the region that starts exactly at `addr` and hands its device handle back to
    /// be deregistered. Refused while a batch uses it, and for an address that starts none.
    pub fn remove(&mut self, addr: u64) -> Result<(Region, H), RdmaError> {
        match self.by_addr.get(&addr) {
            None => Err(RdmaError::NotRegistered { addr, len: 0 }),
            Some(e) if e.pins > 0 => Err(RdmaError::Busy {
                id: e.region.id,
                pins: e.pins,
            }),
            Some(_) => {
                let e = self.by_addr.remove(&addr).expect("present: just looked up");
                Ok((e.region, e.handle))
            }
        }
    }

    /// Every region peers may use ([`Access::Remote`]), in address order, as the handshake
    /// describes them.
    pub fn descs(&self) -> Vec<RegionDesc> {
        self.by_addr
            .values()
            .filter(|e| e.region.access == Access::Remote)
            .map(|e| e.region.desc())
            .collect()
    }

    /// Every region, in address order.
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.by_addr.values().map(|e| &e.region)
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, addr: u64, len: u64) -> Region {
        Region {
            id,
            addr,
            len,
            lkey: id as u32 + 100,
            rkey: id as u32 + 200,
            access: if id == 2 {
                Access::Local
            } else {
                Access::Remote
            },
        }
    }

    fn registry() -> Registry<&'static str> {
        let mut r = Registry::default();
        r.insert(region(1, 0x1000, 0x1000), "a").unwrap();
        r.insert(region(2, 0x3000, 0x100), "b").unwrap();
        r
    }

    #[test]
    fn lookup_finds_the_covering_region() {
        let r = registry();
        assert_eq!(r.lookup(0x1000, 0x1000).unwrap().id, 1);
        assert_eq!(r.lookup(0x1800, 1).unwrap().lkey, 101);
        assert_eq!(r.lookup(0x30ff, 1).unwrap().rkey, 202);
        // Past the end, in the gap, before the first, straddling a region's end.
        for (addr, len) in [(0x1fff, 2), (0x2000, 1), (0x0fff, 1), (0x3000, 0x101)] {
            assert!(
                matches!(
                    r.lookup(addr, len),
                    Err(RdmaError::NotRegistered { addr: a, len: l }) if a == addr && l == len
                ),
                "[{addr:#x}, +{len})"
            );
        }
        assert!(matches!(
            r.lookup(0x1000, 0),
            Err(RdmaError::InvalidArgument(_))
        ));
    }

    #[test]
    fn overlaps_are_refused_adjacent_ranges_are_not() {
        let mut r = registry();
        for (addr, len, existing) in [
            (0x1000, 0x1000, 1), // the same range again: registered once
            (0x0800, 0x0801, 1), // reaches into the first
            (0x1fff, 0x10, 1),   // starts in its last byte
            (0x2000, 0x1001, 2), // reaches into the second
            (0x0, 0x10000, 2),   // swallows both (the later start is found)
        ] {
            let err = r.check_new(9, addr, len).unwrap_err();
            assert!(
                matches!(err, RdmaError::Overlap { existing: e, .. } if e == existing),
                "[{addr:#x}, +{len}): {err}"
            );
            assert_eq!(err.code(), kvpool_proto::ErrorCode::InvalidArgument);
        }
        r.insert(region(3, 0x2000, 0x1000), "c").unwrap();
        assert_eq!(r.len(), 3);
        assert!(r.check_new(3, 0x9000, 1).is_err(), "ids are unique");
        assert!(r.check_new(4, u64::MAX, 2).is_err(), "wraps");
        assert!(r.check_new(4, 0x9000, 0).is_err(), "empty");
    }

    #[test]
    fn unregister_needs_the_start_address_and_no_batch_in_flight() {
        let mut r = registry();
        assert!(matches!(
            r.remove(0x1800),
            Err(RdmaError::NotRegistered { .. })
        ));
        r.pin(0x1000);
        r.pin(0x1000);
        assert!(matches!(
            r.remove(0x1000),
            Err(RdmaError::Busy { id: 1, pins: 2 })
        ));
        r.unpin(0x1000);
        r.unpin(0x1000);
        let (region, handle) = r.remove(0x1000).unwrap();
        assert_eq!((region.id, handle), (1, "a"));
        assert!(r.lookup(0x1000, 1).is_err());
        // The range is free to register again. Region 2 is local: never described.
        r.insert(region, "a2").unwrap();
        assert_eq!(r.descs(), vec![region.desc()]);
    }
}
