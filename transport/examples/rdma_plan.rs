//! What the RDMA path costs the CPU per batch, with no device involved: planning a batch of
//! a Llama-3-8B-shaped prefix into work requests and accounting for its completions.
//!
//! A block of 16 tokens holds, per layer, a K and a V piece of 16 × 8 heads × 128 × 2 bytes
//! (32 KiB): 64 pieces, 2 MiB per block object. A 1024-token prefix is 64 blocks.
//!
//! `cargo run --release -p kvpool-transport --features rdma --example rdma_plan`

use std::time::{Duration, Instant};

use kvpool_proto::rdma::RegionDesc;
use kvpool_transport::rdma::{
    completion::Tracker,
    handshake::RemoteRegions,
    plan::{plan, Limits, Op, Piece, Transfer},
    registry::{Access, Region, Registry},
};

const LAYERS: u64 = 32;
const PIECE: u64 = 32 << 10;
const BLOCKS: u64 = 64;

fn main() {
    // The engine's KV cache: one region per layer and K/V (64 regions of 64 blocks each).
    let mut local = Registry::default();
    let region_len = PIECE * BLOCKS;
    for r in 0..LAYERS * 2 {
        let region = Region {
            id: r,
            addr: (1 << 40) + r * (region_len + (1 << 20)),
            len: region_len,
            lkey: r as u32,
            rkey: 0,
            access: Access::Local,
        };
        local.insert(region, ()).expect("regions do not overlap");
    }
    let remote = RemoteRegions::new(&[RegionDesc {
        id: 1,
        addr: 1 << 44,
        len: 64 << 30,
        rkey: 9,
    }]);
    let transfers: Vec<Transfer> = (0..BLOCKS)
        .map(|b| Transfer {
            op: Op::Read,
            region: 1,
            offset: b * LAYERS * 2 * PIECE,
            local: (0..LAYERS * 2)
                .map(|r| Piece {
                    addr: (1 << 40) + r * (region_len + (1 << 20)) + b * PIECE,
                    len: PIECE,
                })
                .collect(),
        })
        .collect();
    let limits = Limits::default();
    let rounds = 200;
    let (mut planning, mut accounting) = (Duration::ZERO, Duration::ZERO);
    let mut wrs = 0;
    for _ in 0..rounds {
        let t0 = Instant::now();
        let mut p = plan(&transfers, &local, &remote, 4, &limits).expect("valid limits");
        let t1 = Instant::now();
        let mut t = Tracker::new(&p, 0, t1, t1 + Duration::from_secs(10));
        loop {
            let posted = t.to_post(&p);
            if posted.is_empty() {
                break;
            }
            for (l, c) in posted {
                let last = p.lanes[l][c].len() - 1;
                t.complete(&p, t.wr_id(l, c, last).encode(), Ok(()));
            }
        }
        assert!(t.is_done() && t.is_quiescent());
        wrs = p.lanes.iter().flatten().map(Vec::len).sum::<usize>();
        let ok = t.results(&mut p).iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok as u64, BLOCKS);
        planning += t1 - t0;
        accounting += t1.elapsed();
    }
    let bytes = BLOCKS * LAYERS * 2 * PIECE;
    println!(
        "batch: {BLOCKS} blocks x {} pieces of {} KiB = {} MiB -> {wrs} work requests on 4 lanes",
        LAYERS * 2,
        PIECE >> 10,
        bytes >> 20
    );
    println!(
        "plan: {:?} per batch; completion accounting: {:?} per batch ({rounds} rounds)",
        planning / rounds,
        accounting / rounds
    );
}
