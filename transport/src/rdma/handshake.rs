//! The queue-pair handshake, sans I/O: what this side sends, and how the peer's answer turns
//! into the parameters each lane's queue pair is moved to ready-to-receive and ready-to-send
//! with. The messages themselves (and their validation) are `kvpool_proto::rdma`.

use std::{
    collections::{hash_map::RandomState, HashMap},
    hash::{BuildHasher, Hasher},
};

use kvpool_proto::rdma::{LinkLayer, RdmaEndpoint, RdmaPort, RegionDesc, MAX_24BIT};
use kvpool_proto::{ErrorCode, WireError};

use super::RdmaError;

/// What one lane's queue pair needs to reach its peer (INIT → RTR → RTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneParams {
    /// The peer QP this one is connected to.
    pub dest_qp_num: u32,
    /// The PSN the peer starts sending with (our receive side expects it).
    pub rq_psn: u32,
    /// The PSN we start sending with (what we told the peer).
    pub sq_psn: u32,
    /// The smaller of the two ports' MTUs, in bytes.
    pub path_mtu: u16,
    pub dlid: u16,
    /// Set when packets must carry a global route header: always on RoCE, and on InfiniBand
    /// when the peer has no LID.
    pub dgid: Option<[u8; 16]>,
}

/// A fresh starting PSN. Random, so that packets of an earlier connection that reused the
/// same QP number are not taken for this one's.
pub fn initial_psn() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() as u32) & MAX_24BIT
}

/// Pairs our lanes with the peer's, lane `i` with lane `i`, as many as the shorter side has
/// (a node answers at most its own lane count; the requester drops the rest). Refuses a peer
/// whose endpoint is invalid or runs on another link layer.
pub fn pair(local: &RdmaEndpoint, remote: &RdmaEndpoint) -> Result<Vec<LaneParams>, RdmaError> {
    remote.validate()?;
    let refuse =
        |msg: String| RdmaError::Handshake(WireError::new(ErrorCode::InvalidArgument, msg));
    if local.port.link_layer != remote.port.link_layer {
        return Err(refuse(format!(
            "link layers differ: ours {:?}, the peer's {:?}",
            local.port.link_layer, remote.port.link_layer
        )));
    }
    let path_mtu = local.port.mtu.min(remote.port.mtu);
    let dgid = needs_grh(&remote.port).then_some(remote.port.gid);
    Ok(local
        .qps
        .iter()
        .zip(&remote.qps)
        .map(|(ours, theirs)| LaneParams {
            dest_qp_num: theirs.qp_num,
            rq_psn: theirs.psn,
            sq_psn: ours.psn,
            path_mtu,
            dlid: remote.port.lid,
            dgid,
        })
        .collect())
}

fn needs_grh(port: &RdmaPort) -> bool {
    port.link_layer == LinkLayer::Ethernet || port.lid == 0
}

/// The peer's regions by id, to turn `(region, offset, len)` into a remote address and key.
#[derive(Debug, Clone, Default)]
pub struct RemoteRegions {
    by_id: HashMap<u64, RegionDesc>,
}

impl RemoteRegions {
    pub fn new(regions: &[RegionDesc]) -> RemoteRegions {
        RemoteRegions {
            by_id: regions.iter().map(|r| (r.id, *r)).collect(),
        }
    }

    /// Whether the peer described region `region` (a node's DRAM segment; its NVMe tier is
    /// never registered, so those reads go over TCP).
    pub fn contains(&self, region: u64) -> bool {
        self.by_id.contains_key(&region)
    }

    /// The remote address and key of `[offset, offset + len)` in region `region`.
    pub fn resolve(&self, region: u64, offset: u64, len: u64) -> Result<(u64, u32), RdmaError> {
        let err = |why| RdmaError::RemoteRange {
            region,
            offset,
            len,
            why,
        };
        let r = self
            .by_id
            .get(&region)
            .ok_or(err("names no region of the peer"))?;
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= r.len => Ok((r.addr + offset, r.rkey)),
            _ => Err(err("is empty or outside the region")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_proto::rdma::{QpEndpoint, RDMA_VERSION};

    fn endpoint(link_layer: LinkLayer, lid: u16, mtu: u16, qps: &[(u32, u32)]) -> RdmaEndpoint {
        RdmaEndpoint {
            version: RDMA_VERSION,
            port: RdmaPort {
                link_layer,
                lid,
                gid: [7; 16],
                mtu,
            },
            qps: qps
                .iter()
                .map(|&(qp_num, psn)| QpEndpoint { qp_num, psn })
                .collect(),
            regions: vec![],
        }
    }

    #[test]
    fn pairs_lane_by_lane_with_the_smaller_mtu() {
        let ours = endpoint(LinkLayer::Ethernet, 0, 4096, &[(10, 100), (11, 101)]);
        let theirs = endpoint(LinkLayer::Ethernet, 0, 1024, &[(20, 200), (21, 201)]);
        let lanes = pair(&ours, &theirs).unwrap();
        assert_eq!(
            lanes[1],
            LaneParams {
                dest_qp_num: 21,
                rq_psn: 201,
                sq_psn: 101,
                path_mtu: 1024,
                dlid: 0,
                dgid: Some([7; 16]),
            }
        );
        assert_eq!(lanes[0].dest_qp_num, 20);
    }

    #[test]
    fn infiniband_routes_by_lid_unless_the_peer_has_none() {
        let ours = endpoint(LinkLayer::Infiniband, 1, 2048, &[(10, 1)]);
        let lanes = pair(&ours, &endpoint(LinkLayer::Infiniband, 5, 4096, &[(20, 2)])).unwrap();
        assert_eq!((lanes[0].dlid, lanes[0].dgid), (5, None));
        assert_eq!(lanes[0].path_mtu, 2048);
        let lanes = pair(&ours, &endpoint(LinkLayer::Infiniband, 0, 4096, &[(20, 2)])).unwrap();
        assert_eq!(lanes[0].dgid, Some([7; 16]));
    }

    #[test]
    fn refuses_mismatched_peers() {
        let ours = endpoint(LinkLayer::Ethernet, 0, 1024, &[(10, 1), (11, 1)]);
        let cases = [
            (
                endpoint(LinkLayer::Infiniband, 3, 1024, &[(1, 1), (2, 2)]),
                "link layers",
            ),
            (
                endpoint(LinkLayer::Ethernet, 0, 1000, &[(1, 1), (2, 2)]),
                "MTU",
            ),
        ];
        for (theirs, what) in cases {
            let err = pair(&ours, &theirs).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert!(
                !err.is_fallback(),
                "a broken peer is an error, not a fallback"
            );
        }
        let mut old = endpoint(LinkLayer::Ethernet, 0, 1024, &[(1, 1), (2, 2)]);
        old.version = 2;
        let err = pair(&ours, &old).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        assert!(err.is_fallback(), "another version: stay on TCP");
    }

    #[test]
    fn pairs_as_many_lanes_as_the_shorter_side_has() {
        let four = endpoint(
            LinkLayer::Ethernet,
            0,
            1024,
            &[(1, 1), (2, 2), (3, 3), (4, 4)],
        );
        let two = endpoint(LinkLayer::Ethernet, 0, 1024, &[(8, 8), (9, 9)]);
        let lanes = pair(&four, &two).unwrap();
        assert_eq!(lanes.len(), 2);
        assert_eq!((lanes[1].dest_qp_num, lanes[1].sq_psn), (9, 2));
        assert_eq!(pair(&two, &four).unwrap().len(), 2);
    }

    #[test]
    fn psns_are_24_bit() {
        for _ in 0..64 {
            assert!(initial_psn() <= MAX_24BIT);
        }
    }

    #[test]
    fn remote_ranges_resolve_inside_their_region_only() {
        let regions = RemoteRegions::new(&[RegionDesc {
            id: 4,
            addr: 0x10_0000,
            len: 4096,
            rkey: 77,
        }]);
        assert_eq!(regions.resolve(4, 96, 4000).unwrap(), (0x10_0060, 77));
        for (region, offset, len, why) in [
            (5, 0, 1, "names no region"),
            (4, 0, 4097, "outside"),
            (4, 4096, 1, "outside"),
            (4, 1, 0, "empty"),
            (4, u64::MAX, 2, "outside"),
        ] {
            let err = regions.resolve(region, offset, len).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
        assert_eq!(
            regions.resolve(5, 0, 1).unwrap_err().code(),
            ErrorCode::OutOfRange
        );
    }
}
