//! The whole RDMA path on a real device: registration, the handshake over a real TCP
//! connection on loopback, queue pairs connected to each other on one device, batched
//! one-sided WRITEs (puts) and READs (gets) with gather/scatter lists, and a bad item failing
//! alone. Where this host has no usable RDMA device (no NIC, no rxe or siw soft device, no
//! kernel support) the test prints `SKIPPED: <reason>` and checks only that the missing
//! device reads as a TCP fallback.
#![cfg(feature = "rdma")]

use std::{sync::Arc, time::Duration};

use kvpool_proto::{ErrorCode, FrameLimits, Opcode};
use kvpool_transport::{
    frame,
    rdma::{
        wire::{answer_connect, connect_over},
        Access, DeviceOptions, Op, Piece, RdmaDevice, Transfer,
    },
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

const SEG: u64 = 0x5e6;
const MIB: u64 = 1 << 20;

fn open_or_skip() -> Option<Arc<RdmaDevice>> {
    let opts = DeviceOptions {
        device: std::env::var("KVPOOL_RDMA_DEVICE").ok(),
        gid_index: std::env::var("KVPOOL_RDMA_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..DeviceOptions::default()
    };
    match RdmaDevice::open(&opts) {
        Ok(dev) => Some(dev),
        Err(e) => {
            assert!(
                e.is_fallback(),
                "no device must read as a TCP fallback, not {e:?}"
            );
            assert_eq!(e.code(), ErrorCode::TransportUnsupported);
            kvpool_testkit::skip::skipped(
                "rdma loopback_puts_and_gets_over_rdma",
                &format!("no usable RDMA device on this host ({e})"),
            );
            None
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_puts_and_gets_over_rdma() {
    let Some(dev) = open_or_skip() else {
        return;
    };
    let limits = FrameLimits::default();

    // The node's segment and the client's buffers, on one device (one protection domain).
    let mut segment = vec![0u8; 8 * MIB as usize].into_boxed_slice();
    let mut src = pattern(4 * MIB as usize, 7).into_boxed_slice();
    let mut dst = vec![0u8; 4 * MIB as usize].into_boxed_slice();
    let (seg_addr, src_addr, dst_addr) = (
        segment.as_mut_ptr() as u64,
        src.as_mut_ptr() as u64,
        dst.as_mut_ptr() as u64,
    );
    // SAFETY: the three buffers live until the end of the test, after the peers are gone and
    // the regions are unregistered; nothing touches them while a batch runs.
    unsafe {
        dev.register(SEG, seg_addr, segment.len() as u64, Access::Remote)
            .unwrap();
        dev.register(1, src_addr, src.len() as u64, Access::Local)
            .unwrap();
        dev.register(2, dst_addr, dst.len() as u64, Access::Local)
            .unwrap();
    }

    // The node answers one RdmaConnect and keeps its lanes until the client hangs up.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node_dev = dev.clone();
    let node = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let h = frame::read_header(&mut s, &limits).await.unwrap().unwrap();
        assert_eq!(h.opcode, Opcode::RdmaConnect as u8);
        let body = frame::read_body(&mut s, h.body_len).await.unwrap();
        let (answer, lanes) = answer_connect(Some(&node_dev), h.request_id, &body);
        s.write_all(&answer).await.unwrap();
        let lanes = lanes.expect("the node accepted");
        assert!(frame::read_header(&mut s, &limits).await.unwrap().is_none());
        drop(lanes);
    });
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut peer = connect_over(&mut stream, &dev, 1, &limits).await.unwrap();
    assert_eq!(peer.live_lanes(), DeviceOptions::default().lanes);

    // Puts: 1 MiB from one piece; 1 MiB gathered from two pieces; one past the segment.
    let puts = vec![
        Transfer {
            op: Op::Write,
            region: SEG,
            offset: 0,
            local: vec![Piece {
                addr: src_addr,
                len: MIB,
            }],
        },
        Transfer {
            op: Op::Write,
            region: SEG,
            offset: 3 * MIB + 4096,
            local: vec![
                Piece {
                    addr: src_addr + 3 * MIB,
                    len: MIB / 2,
                },
                Piece {
                    addr: src_addr + MIB,
                    len: MIB / 2,
                },
            ],
        },
        Transfer {
            op: Op::Write,
            region: SEG,
            offset: 8 * MIB - 10,
            local: vec![Piece {
                addr: src_addr,
                len: 11,
            }],
        },
    ];
    // SAFETY: every piece is in a registered buffer that nothing else touches meanwhile.
    let results =
        tokio::task::block_in_place(|| unsafe { peer.run(&puts, Duration::from_secs(10)) })
            .unwrap();
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert_eq!(
        results[2].as_ref().unwrap_err().code(),
        ErrorCode::OutOfRange
    );
    let m = MIB as usize;
    assert!(segment[..m] == src[..m], "first put landed");
    assert!(segment[3 * m + 4096..3 * m + 4096 + m / 2] == src[3 * m..3 * m + m / 2]);
    assert!(segment[3 * m + 4096 + m / 2..4 * m + 4096] == src[m..m + m / 2]);

    // Gets: both objects back, the second scattered in reverse order into two pieces.
    let gets = vec![
        Transfer {
            op: Op::Read,
            region: SEG,
            offset: 0,
            local: vec![Piece {
                addr: dst_addr,
                len: MIB,
            }],
        },
        Transfer {
            op: Op::Read,
            region: SEG,
            offset: 3 * MIB + 4096,
            local: vec![
                Piece {
                    addr: dst_addr + 2 * MIB + MIB / 2,
                    len: MIB / 2,
                },
                Piece {
                    addr: dst_addr + 2 * MIB,
                    len: MIB / 2,
                },
            ],
        },
    ];
    // SAFETY: as for the puts.
    let results =
        tokio::task::block_in_place(|| unsafe { peer.run(&gets, Duration::from_secs(10)) })
            .unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(dst[..m] == src[..m]);
    assert!(dst[2 * m + m / 2..3 * m] == src[3 * m..3 * m + m / 2]);
    assert!(dst[2 * m..2 * m + m / 2] == src[m..m + m / 2]);
    assert_eq!(peer.live_lanes(), DeviceOptions::default().lanes);

    // Only the segment is described to peers; the client's buffers are local-only.
    let described: Vec<u64> = dev.regions().iter().map(|r| r.id).collect();
    assert_eq!(described, vec![SEG]);

    // Hang up: the node drops its lanes; then the regions can go.
    drop(peer);
    drop(stream);
    node.await.unwrap();
    for a in [seg_addr, src_addr, dst_addr] {
        dev.unregister(a).unwrap();
    }
    assert!(dev.regions().is_empty());
}
