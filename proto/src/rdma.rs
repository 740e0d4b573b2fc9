//! The RDMA handshake, carried over a data-plane (TCP) connection to a storage node.
//!
//! A client that wants one-sided RDMA to a node sends [`RdmaConnect`] on an (authenticated)
//! data connection; the node answers with its own [`RdmaEndpoint`]. Each side describes its
//! port (LID, GID, MTU, link layer), one reliable-connection queue pair per lane (QP number
//! and starting packet sequence number) and the memory regions the other side may address
//! (`addr`/`len`/`rkey`; for a node, its segments keyed by segment id). The node answers only
//! after its queue pairs are ready to receive, so the client may post as soon as it has moved
//! its own to ready-to-send: one round trip sets everything up.
//!
//! The body is postcard like every other message, with the RDMA version first:
//! [`RdmaEndpoint::decode`] reads the version before anything else, so a peer speaking another
//! version gets `UnsupportedVersion` rather than a confusing `MalformedBody` about fields that
//! moved. Every decoded endpoint is validated ([`RdmaEndpoint::validate`]): the numbers the
//! device will be handed (24-bit QP numbers and PSNs, MTU, GID) and the regions (non-empty,
//! no address overflow, unique ids) are checked here, once, for both sides.
//!
//! A node without an RDMA device (or built without RDMA) answers `RdmaConnect` with
//! `TransportUnsupported` (a node from before that code with `WrongService`, one from before
//! this message with `UnknownOpcode`); each tells the client to use another transport.
//!
//! A one-sided WRITE never reaches the node's CPU, so after a put's WRITEs completed the
//! client sends [`RdmaWritten`] with the put's object tags on the same TCP connection: the
//! node's inventory (how a restarted master recovers objects) stays true.

use serde::{Deserialize, Serialize};

use crate::{
    decode_body, encode_body, ErrorCode, Message, ObjectTag, Opcode, UnitResponse, WireError,
};

/// The version of the handshake body (independent of the frame version).
pub const RDMA_VERSION: u16 = 1;

/// Most queue pairs (lanes) one peer may ask for.
pub const MAX_QPS_PER_PEER: usize = 64;

/// Most regions one endpoint may describe (a node's segments, a client's buffers).
pub const MAX_REGIONS: usize = 4096;

/// QP numbers and packet sequence numbers are 24-bit quantities on the wire of every RDMA
/// transport (InfiniBand, RoCE).
pub const MAX_24BIT: u32 = 0x00ff_ffff;

/// The link layer of an RDMA port. InfiniBand routes by LID; Ethernet (RoCE) needs a GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkLayer {
    Infiniband,
    Ethernet,
}

/// The path MTUs RDMA knows, in bytes.
pub const MTUS: [u16; 5] = [256, 512, 1024, 2048, 4096];

/// Where a peer's queue pairs live: enough for the other side to address packets to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaPort {
    pub link_layer: LinkLayer,
    /// The port's local identifier (InfiniBand; 0 on Ethernet).
    pub lid: u16,
    /// The GID used for global routing (RoCE always, InfiniBand across subnets); all zero
    /// when unused.
    pub gid: [u8; 16],
    /// The port's active MTU in bytes, one of [`MTUS`]; the path uses the smaller of the two.
    pub mtu: u16,
}

/// One reliable-connection queue pair, as its peer must know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpEndpoint {
    /// The QP number (24 bits).
    pub qp_num: u32,
    /// The first packet sequence number this QP sends (24 bits); the peer expects it.
    pub psn: u32,
}

/// A registered memory region the peer may read and write one-sidedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// Names the region: a segment id on a node, a buffer id on a client.
    pub id: u64,
    /// Virtual address of the first byte, in the owner's address space.
    pub addr: u64,
    pub len: u64,
    /// The remote key that authorizes access to the region.
    pub rkey: u32,
}

/// What each side of the handshake sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaEndpoint {
    /// Always [`RDMA_VERSION`] when sent by this build; encoded first.
    pub version: u16,
    pub port: RdmaPort,
    /// One queue pair per lane; the answer has exactly as many, lane `i` connected to lane
    /// `i` of the request.
    pub qps: Vec<QpEndpoint>,
    pub regions: Vec<RegionDesc>,
}

/// 0x48, client → storage node: set up RDMA lanes over this connection. Answered with the
/// node's [`RdmaEndpoint`]. The lanes live as long as the TCP connection that set them up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaConnect {
    pub endpoint: RdmaEndpoint,
}

impl Message for RdmaConnect {
    const OPCODE: Opcode = Opcode::RdmaConnect;
    type Response = RdmaEndpoint;
}

/// 0x49, client → storage node, after the one-sided WRITEs of a put completed: the objects
/// the bytes belong to (key, replica, range and the writer's crc32c), for the node's
/// inventory, as `Write.tags` carries them over TCP and `ShmCommit` over shared memory. One
/// result per tag; a tag naming a range outside the node's DRAM segments fails
/// (`UnknownSegment` / `OutOfRange`). The round trip also proves the node alive after the
/// WRITEs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaWritten {
    pub tags: Vec<ObjectTag>,
}

impl Message for RdmaWritten {
    const OPCODE: Opcode = Opcode::RdmaWritten;
    type Response = UnitResponse;
}

fn invalid(msg: String) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

impl RdmaEndpoint {
    /// Encodes the endpoint as a body (the response, or inside [`RdmaConnect`]).
    pub fn encode(&self) -> Vec<u8> {
        encode_body(self)
    }

    /// Decodes and validates an endpoint: `UnsupportedVersion` for another version (checked
    /// before the rest is parsed), `MalformedBody` for a truncated or trailing body,
    /// `InvalidArgument` for values no device accepts.
    pub fn decode(body: &[u8]) -> Result<RdmaEndpoint, WireError> {
        check_version(body)?;
        let e: RdmaEndpoint = decode_body(body)?;
        e.validate()?;
        Ok(e)
    }

    /// Checks every value a device will be handed, and the regions' consistency.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.version != RDMA_VERSION {
            return Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "RDMA handshake version {} (this build speaks {RDMA_VERSION})",
                    self.version
                ),
            ));
        }
        let p = &self.port;
        if !MTUS.contains(&p.mtu) {
            return Err(invalid(format!(
                "RDMA MTU {} is not one of {MTUS:?}",
                p.mtu
            )));
        }
        match p.link_layer {
            LinkLayer::Ethernet if p.gid == [0; 16] => {
                return Err(invalid("RoCE (Ethernet) port without a GID".into()));
            }
            LinkLayer::Infiniband if p.lid == 0 && p.gid == [0; 16] => {
                return Err(invalid("InfiniBand port with neither LID nor GID".into()));
            }
            _ => {}
        }
        if self.qps.is_empty() || self.qps.len() > MAX_QPS_PER_PEER {
            return Err(invalid(format!(
                "{} queue pairs (allowed 1..={MAX_QPS_PER_PEER})",
                self.qps.len()
            )));
        }
        for (i, qp) in self.qps.iter().enumerate() {
            if qp.qp_num > MAX_24BIT || qp.psn > MAX_24BIT {
                return Err(invalid(format!(
                    "queue pair {i}: QP number {:#x} or PSN {:#x} exceeds 24 bits",
                    qp.qp_num, qp.psn
                )));
            }
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(invalid(format!(
                "{} regions (allowed at most {MAX_REGIONS})",
                self.regions.len()
            )));
        }
        let mut ids = std::collections::HashSet::with_capacity(self.regions.len());
        for r in &self.regions {
            if r.len == 0 || r.addr.checked_add(r.len).is_none() {
                return Err(invalid(format!(
                    "region {}: [{:#x}, +{}) is empty or wraps the address space",
                    r.id, r.addr, r.len
                )));
            }
            if !ids.insert(r.id) {
                return Err(invalid(format!("region id {} appears twice", r.id)));
            }
        }
        Ok(())
    }
}

impl RdmaConnect {
    /// Decodes and validates a request (see [`RdmaEndpoint::decode`]).
    pub fn decode(body: &[u8]) -> Result<RdmaConnect, WireError> {
        Ok(RdmaConnect {
            endpoint: RdmaEndpoint::decode(body)?,
        })
    }
}

/// Reads the leading version varint alone, so that a body laid out by another version is
/// refused for its version and not for its fields.
fn check_version(body: &[u8]) -> Result<(), WireError> {
    match postcard::take_from_bytes::<u16>(body) {
        Ok((RDMA_VERSION, _)) => Ok(()),
        Ok((v, _)) => Err(WireError::new(
            ErrorCode::UnsupportedVersion,
            format!("RDMA handshake version {v} (this build speaks {RDMA_VERSION})"),
        )),
        Err(e) => Err(WireError::new(
            ErrorCode::MalformedBody,
            format!("RDMA handshake without a version: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn endpoint() -> RdmaEndpoint {
        RdmaEndpoint {
            version: RDMA_VERSION,
            port: RdmaPort {
                link_layer: LinkLayer::Ethernet,
                lid: 0,
                gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                mtu: 1024,
            },
            qps: vec![
                QpEndpoint {
                    qp_num: 0x11,
                    psn: 0x123456,
                },
                QpEndpoint {
                    qp_num: 0x12,
                    psn: 7,
                },
            ],
            regions: vec![RegionDesc {
                id: 9,
                addr: 0x7f00_0000_0000,
                len: 1 << 30,
                rkey: 0xabcd,
            }],
        }
    }

    #[test]
    fn round_trips_through_request_and_response() {
        let e = endpoint();
        assert_eq!(RdmaEndpoint::decode(&e.encode()).unwrap(), e);
        // The request is a one-field struct: its body is the endpoint's.
        let req = encode_body(&RdmaConnect {
            endpoint: e.clone(),
        });
        assert_eq!(req, e.encode());
        assert_eq!(RdmaConnect::decode(&req).unwrap().endpoint, e);
    }

    #[test]
    fn golden_bytes() {
        let e = RdmaEndpoint {
            version: 1,
            port: RdmaPort {
                link_layer: LinkLayer::Infiniband,
                lid: 3,
                gid: [0; 16],
                mtu: 4096,
            },
            qps: vec![QpEndpoint { qp_num: 5, psn: 6 }],
            regions: vec![RegionDesc {
                id: 1,
                addr: 2,
                len: 3,
                rkey: 4,
            }],
        };
        let mut want = vec![1, 0, 3];
        want.extend([0; 16]);
        want.extend([0x80, 0x20, 1, 5, 6, 1, 1, 2, 3, 4]);
        assert_eq!(e.encode(), want);
    }

    #[test]
    fn another_version_is_refused_before_its_fields_are_read() {
        // A version-2 body whose fields this build cannot parse at all.
        let mut body = encode_body(&2u16);
        body.extend([0xff; 3]);
        let err = RdmaEndpoint::decode(&body).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(err.message.contains("version 2"), "{}", err.message);
        // validate() says the same for a struct built in memory.
        let mut e = endpoint();
        e.version = 0;
        assert_eq!(
            e.validate().unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn truncated_and_trailing_bodies_are_malformed() {
        let body = endpoint().encode();
        assert_eq!(
            RdmaEndpoint::decode(&[]).unwrap_err().code,
            ErrorCode::MalformedBody
        );
        for cut in 1..body.len() {
            let err = RdmaEndpoint::decode(&body[..cut]).unwrap_err();
            assert_eq!(err.code, ErrorCode::MalformedBody, "cut at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert_eq!(
            RdmaEndpoint::decode(&long).unwrap_err().code,
            ErrorCode::MalformedBody
        );
    }

    #[test]
    fn values_no_device_accepts_are_invalid_arguments() {
        type Change = Box<dyn Fn(&mut RdmaEndpoint)>;
        let cases: Vec<(&str, Change)> = vec![
            ("MTU", Box::new(|e| e.port.mtu = 1500)),
            ("without a GID", Box::new(|e| e.port.gid = [0; 16])),
            (
                "neither LID nor GID",
                Box::new(|e| {
                    e.port.link_layer = LinkLayer::Infiniband;
                    e.port.gid = [0; 16];
                }),
            ),
            ("0 queue pairs", Box::new(|e| e.qps.clear())),
            (
                "65 queue pairs",
                Box::new(|e| e.qps = vec![e.qps[0]; MAX_QPS_PER_PEER + 1]),
            ),
            ("exceeds 24 bits", Box::new(|e| e.qps[1].psn = 1 << 24)),
            ("exceeds 24 bits", Box::new(|e| e.qps[0].qp_num = u32::MAX)),
            ("empty", Box::new(|e| e.regions[0].len = 0)),
            ("wraps", Box::new(|e| e.regions[0].addr = u64::MAX)),
            ("appears twice", Box::new(|e| e.regions.push(e.regions[0]))),
            (
                "regions",
                Box::new(|e| {
                    e.regions = (0..=MAX_REGIONS as u64)
                        .map(|id| RegionDesc {
                            id,
                            addr: 1,
                            len: 1,
                            rkey: 0,
                        })
                        .collect()
                }),
            ),
        ];
        for (what, change) in cases {
            let mut e = endpoint();
            change(&mut e);
            let err = RdmaEndpoint::decode(&e.encode()).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{what}");
            assert!(err.message.contains(what), "{what}: {}", err.message);
        }
    }

    #[test]
    fn rdma_written_carries_tags_with_their_checksums() {
        let tag = ObjectTag {
            replica: crate::ReplicaId(3),
            key: b"k".to_vec(),
            segment: crate::SegmentId(9),
            offset: 4096,
            len: 5,
            checksum: 0xdead_beef,
        };
        let msg = RdmaWritten {
            tags: vec![tag.clone(), tag],
        };
        let body = encode_body(&msg);
        assert_eq!(decode_body::<RdmaWritten>(&body).unwrap(), msg);
        // Golden: 2 tags; replica 3, key "k", segment 9, offset 4096 (varint), len 5, crc.
        let one = [3, 1, b'k', 9, 0x80, 0x20, 5, 0xef, 0xfd, 0xb6, 0xf5, 0x0d];
        let mut want = vec![2];
        want.extend(one);
        want.extend(one);
        assert_eq!(body, want);
        assert_eq!(Opcode::try_from(0x49).unwrap(), Opcode::RdmaWritten);
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = RdmaEndpoint::decode(&bytes);
            let _ = RdmaConnect::decode(&bytes);
        }
    }
}
