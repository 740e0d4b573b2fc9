//! Work-request batching, sans I/O: a batch of gets and puts becomes one-sided RDMA READ and
//! WRITE work requests, spread over a peer's lanes (queue pairs) and grouped in chains.
//!
//! - A transfer is one contiguous range of a peer's region and the local pieces (a gather
//!   list for a put, a scatter list for a get) its bytes come from or go to, as the TCP
//!   engine's items are. Its local pieces must lie in registered regions, its remote range in
//!   one of the peer's; a transfer that breaks either is refused alone, with its own error,
//!   and the rest of the batch runs.
//! - A work request carries at most `max_sge` scatter/gather entries and at most
//!   [`Limits::wr_bytes`] bytes (the port's maximum message size, and `stripe`, so that a
//!   large transfer is split across lanes instead of crawling down one). Adjacent pieces in
//!   the same region share one entry.
//! - Each work request goes to the lane with the fewest bytes so far, so lanes finish
//!   together.
//! - A lane's requests are cut into chains of [`Plan::chain_len`] requests, posted with one
//!   `ibv_post_send` each; only the last of a chain is signaled (one completion per chain,
//!   not per request), and at most [`Plan::chains_in_flight`] chains are outstanding per
//!   lane, so the send queue (`max_send_wr` deep) never overflows: unsignaled requests free
//!   their slots only when a later signaled one completes.

use super::{handshake::RemoteRegions, registry::Registry, RdmaError};

/// The direction of a transfer, from this side's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Remote → local (a get): RDMA READ.
    Read,
    /// Local → remote (a put): RDMA WRITE.
    Write,
}

/// A run of local memory, by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub addr: u64,
    pub len: u64,
}

/// One contiguous remote range and the local pieces that hold its bytes, in order: the TCP
/// engine's `WriteItem` / `ReadItem` (`op.segment` is `region`, `op.offset` is `offset`,
/// each slice a piece by address). Empty pieces are skipped, as the engine skips empty
/// slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub op: Op,
    /// The peer's region (a node's segment id) and the range's offset in it.
    pub region: u64,
    pub offset: u64,
    pub local: Vec<Piece>,
}

impl Transfer {
    pub fn len(&self) -> u64 {
        self.local.iter().map(|p| p.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the device allows per queue pair, and how finely to stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Send-queue depth of each queue pair.
    pub max_send_wr: u32,
    /// Scatter/gather entries per work request (for READs the device's `max_sge_rd` too).
    pub max_sge: u32,
    /// The port's largest message.
    pub max_msg_size: u64,
    /// Largest work request the planner makes, so large transfers use every lane [1 MiB].
    pub stripe: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_send_wr: 128,
            max_sge: 4,
            max_msg_size: 1 << 30,
            stripe: 1 << 20,
        }
    }
}

impl Limits {
    /// Bytes in one work request: the smallest of the message size, the stripe and what an
    /// entry's 32-bit length holds.
    pub fn wr_bytes(&self) -> u64 {
        self.max_msg_size.min(self.stripe).min(u64::from(u32::MAX))
    }

    pub fn validate(&self) -> Result<(), RdmaError> {
        if self.max_send_wr == 0 || self.max_sge == 0 || self.wr_bytes() == 0 {
            return Err(RdmaError::InvalidArgument(format!(
                "RDMA limits must be positive: {self:?}"
            )));
        }
        Ok(())
    }
}

/// One scatter/gather entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// One RDMA READ or WRITE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkRequest {
    /// The transfer (batch index) whose bytes this moves.
    pub item: usize,
    pub op: Op,
    pub remote_addr: u64,
    pub rkey: u32,
    pub sges: Vec<Sge>,
    /// Asks for a completion: the last request of each chain.
    pub signaled: bool,
}

impl WorkRequest {
    pub fn len(&self) -> u64 {
        self.sges.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.sges.is_empty()
    }
}

/// A batch, planned.
#[derive(Debug)]
pub struct Plan {
    /// Per lane, its chains in posting order.
    pub lanes: Vec<Vec<Vec<WorkRequest>>>,
    /// Per transfer: the error that kept it from being planned, if any.
    pub refused: Vec<Option<RdmaError>>,
    /// Per transfer: how many work requests carry its bytes.
    pub item_wrs: Vec<u32>,
    pub chain_len: usize,
    pub chains_in_flight: usize,
    /// Start addresses of the local regions the batch uses (pinned while it runs).
    pub local_regions: Vec<u64>,
}

/// Plans `transfers` over `lanes` lanes.
pub fn plan<H>(
    transfers: &[Transfer],
    local: &Registry<H>,
    remote: &RemoteRegions,
    lanes: usize,
    limits: &Limits,
) -> Result<Plan, RdmaError> {
    limits.validate()?;
    if lanes == 0 {
        return Err(RdmaError::InvalidArgument(
            "a peer needs at least one lane".into(),
        ));
    }
    // Request ids hold a chain index of 16 bits (`completion::WrId`).
    let chain_len = (limits.max_send_wr as usize / 2).clamp(1, usize::from(u16::MAX));
    let chains_in_flight = (limits.max_send_wr as usize / chain_len).max(1);
    let mut refused = Vec::with_capacity(transfers.len());
    let mut item_wrs = vec![0u32; transfers.len()];
    let mut local_regions = Vec::new();
    let mut per_lane: Vec<Vec<WorkRequest>> = vec![Vec::new(); lanes];
    let mut lane_bytes = vec![0u64; lanes];
    for (item, t) in transfers.iter().enumerate() {
        match split(item, t, local, remote, limits) {
            Ok((wrs, regions)) => {
                item_wrs[item] = wrs.len() as u32;
                local_regions.extend(regions);
                for wr in wrs {
                    let lane = (0..lanes).min_by_key(|&l| lane_bytes[l]).unwrap_or(0);
                    lane_bytes[lane] += wr.len();
                    per_lane[lane].push(wr);
                }
                refused.push(None);
            }
            Err(e) => refused.push(Some(e)),
        }
    }
    local_regions.sort_unstable();
    local_regions.dedup();
    let lanes = per_lane
        .into_iter()
        .map(|wrs| {
            // Moved, not copied, into chains of `chain_len`.
            let mut chains: Vec<Vec<WorkRequest>> = Vec::new();
            for wr in wrs {
                match chains.last_mut() {
                    Some(chain) if chain.len() < chain_len => chain.push(wr),
                    _ => chains.push(vec![wr]),
                }
            }
            for chain in &mut chains {
                if let Some(last) = chain.last_mut() {
                    last.signaled = true;
                }
            }
            chains
        })
        .collect();
    Ok(Plan {
        lanes,
        refused,
        item_wrs,
        chain_len,
        chains_in_flight,
        local_regions,
    })
}

/// Cuts one transfer into work requests; also returns the local regions it touches.
fn split<H>(
    item: usize,
    t: &Transfer,
    local: &Registry<H>,
    remote: &RemoteRegions,
    limits: &Limits,
) -> Result<(Vec<WorkRequest>, Vec<u64>), RdmaError> {
    let total = t
        .local
        .iter()
        .try_fold(0u64, |acc, p| acc.checked_add(p.len))
        .ok_or_else(|| RdmaError::InvalidArgument(format!("transfer {item}: length overflows")))?;
    if total == 0 {
        return Err(RdmaError::InvalidArgument(format!(
            "transfer {item}: no bytes to move"
        )));
    }
    let (remote_base, rkey) = remote.resolve(t.region, t.offset, total)?;
    let cap = limits.wr_bytes();
    let max_sge = limits.max_sge as usize;
    let mut wrs = Vec::new();
    let mut regions = Vec::new();
    let mut cur_len = 0u64;
    let mut done = 0u64;
    // Ends the current request; the next starts where this one's bytes end remotely.
    let fresh = |remote_addr: u64| WorkRequest {
        item,
        op: t.op,
        remote_addr,
        rkey,
        sges: Vec::with_capacity(max_sge.min(t.local.len())),
        signaled: false,
    };
    let flush = |wrs: &mut Vec<WorkRequest>, cur: &mut WorkRequest, done: u64| {
        wrs.push(std::mem::replace(cur, fresh(remote_base + done)));
    };
    let mut cur = fresh(remote_base);
    // Empty pieces are skipped, as the TCP engine skips empty slices.
    for p in t.local.iter().filter(|p| p.len > 0) {
        let region = local.lookup(p.addr, p.len)?;
        regions.push(region.addr);
        let mut at = 0u64;
        while at < p.len {
            let addr = p.addr + at;
            let contiguous = |cur: &WorkRequest| {
                cur.sges.last().is_some_and(|last| {
                    last.lkey == region.lkey && last.addr + u64::from(last.len) == addr
                })
            };
            if !contiguous(&cur) && cur.sges.len() == max_sge {
                flush(&mut wrs, &mut cur, done);
                cur_len = 0;
            }
            let take = (p.len - at).min(cap - cur_len);
            if contiguous(&cur) {
                if let Some(last) = cur.sges.last_mut() {
                    // Cannot overflow: a request holds at most `cap` <= u32::MAX bytes.
                    last.len += take as u32;
                }
            } else {
                cur.sges.push(Sge {
                    addr,
                    len: take as u32,
                    lkey: region.lkey,
                });
            }
            at += take;
            cur_len += take;
            done += take;
            if cur_len == cap && done < total {
                flush(&mut wrs, &mut cur, done);
                cur_len = 0;
            }
        }
    }
    wrs.push(cur);
    Ok((wrs, regions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::registry::{Access, Region};
    use kvpool_proto::rdma::RegionDesc;

    const SEG: u64 = 7;

    fn local() -> Registry<()> {
        let mut r = Registry::default();
        // Two client buffers: 1 MiB at 0x100000 (lkey 1) and 1 MiB at 0x200000 (lkey 2),
        // adjacent but registered separately.
        for (id, addr) in [(1u64, 0x10_0000u64), (2, 0x20_0000)] {
            r.insert(
                Region {
                    id,
                    addr,
                    len: 1 << 20,
                    lkey: id as u32,
                    rkey: 0,
                    access: Access::Local,
                },
                (),
            )
            .unwrap();
        }
        r
    }

    fn remote() -> RemoteRegions {
        RemoteRegions::new(&[RegionDesc {
            id: SEG,
            addr: 0x9000_0000,
            len: 1 << 30,
            rkey: 55,
        }])
    }

    fn get(offset: u64, pieces: &[(u64, u64)]) -> Transfer {
        Transfer {
            op: Op::Read,
            region: SEG,
            offset,
            local: pieces
                .iter()
                .map(|&(addr, len)| Piece { addr, len })
                .collect(),
        }
    }

    fn limits(max_send_wr: u32, max_sge: u32, stripe: u64) -> Limits {
        Limits {
            max_send_wr,
            max_sge,
            max_msg_size: 1 << 30,
            stripe,
        }
    }

    fn all_wrs(p: &Plan) -> Vec<&WorkRequest> {
        p.lanes.iter().flatten().flatten().collect()
    }

    /// Every byte of every transfer is moved exactly once, to the right remote address.
    fn assert_covers(p: &Plan, transfers: &[Transfer], remote: &RemoteRegions) {
        for (item, t) in transfers.iter().enumerate() {
            if p.refused[item].is_some() {
                assert_eq!(p.item_wrs[item], 0);
                continue;
            }
            let (base, _) = remote.resolve(t.region, t.offset, t.len()).unwrap();
            let mut wrs: Vec<_> = all_wrs(p).into_iter().filter(|w| w.item == item).collect();
            assert_eq!(wrs.len() as u32, p.item_wrs[item]);
            wrs.sort_by_key(|w| w.remote_addr);
            // The remote side: contiguous from the base, no gap, no overlap.
            let mut at = base;
            let mut local_bytes = Vec::new();
            for w in wrs {
                assert_eq!(w.remote_addr, at);
                assert_eq!(w.op, t.op);
                at += w.len();
                for s in &w.sges {
                    local_bytes.push((s.addr, u64::from(s.len)));
                }
            }
            assert_eq!(at - base, t.len());
            // The local side: the pieces, in order, possibly cut.
            let mut expect = t
                .local
                .iter()
                .filter(|p| p.len > 0)
                .map(|p| (p.addr, p.len))
                .collect::<Vec<_>>();
            let merge = |v: &mut Vec<(u64, u64)>| {
                let mut out: Vec<(u64, u64)> = Vec::new();
                for &(a, l) in v.iter() {
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == a => last.1 += l,
                        _ => out.push((a, l)),
                    }
                }
                *v = out;
            };
            merge(&mut local_bytes);
            merge(&mut expect);
            assert_eq!(local_bytes, expect, "item {item}");
        }
    }

    #[test]
    fn a_large_transfer_is_striped_over_every_lane() {
        let t = vec![get(4096, &[(0x10_0000, 1 << 20)])];
        let p = plan(&t, &local(), &remote(), 4, &limits(128, 4, 256 << 10)).unwrap();
        assert_eq!(p.item_wrs, vec![4]);
        for lane in &p.lanes {
            let wrs: Vec<_> = lane.iter().flatten().collect();
            assert_eq!(wrs.len(), 1, "one 256 KiB request per lane");
            assert_eq!(wrs[0].len(), 256 << 10);
            assert_eq!(wrs[0].rkey, 55);
            assert_eq!(wrs[0].sges[0].lkey, 1);
        }
        assert_covers(&p, &t, &remote());
        assert_eq!(p.local_regions, vec![0x10_0000]);
    }

    #[test]
    fn the_message_size_caps_a_request_even_with_a_larger_stripe() {
        let mut l = limits(128, 4, 1 << 30);
        l.max_msg_size = 64 << 10;
        let t = vec![get(0, &[(0x10_0000, 200 << 10)])];
        let p = plan(&t, &local(), &remote(), 1, &l).unwrap();
        let lens: Vec<u64> = all_wrs(&p).iter().map(|w| w.len()).collect();
        assert_eq!(lens, vec![64 << 10, 64 << 10, 64 << 10, 8 << 10]);
        assert_covers(&p, &t, &remote());
    }

    #[test]
    fn scattered_pieces_fill_entries_up_to_max_sge() {
        // Ten 4 KiB pieces with gaps (a paged cache): at most 3 entries per request.
        let pieces: Vec<(u64, u64)> = (0..10).map(|i| (0x10_0000 + i * 8192, 4096)).collect();
        let t = vec![get(0, &pieces)];
        let p = plan(&t, &local(), &remote(), 1, &limits(128, 3, 1 << 20)).unwrap();
        let sges: Vec<usize> = all_wrs(&p).iter().map(|w| w.sges.len()).collect();
        assert_eq!(sges, vec![3, 3, 3, 1]);
        assert_covers(&p, &t, &remote());
    }

    #[test]
    fn contiguous_pieces_in_one_region_share_an_entry_across_regions_they_do_not() {
        let t = vec![Transfer {
            op: Op::Write,
            ..get(
                0,
                &[
                    (0x10_0000, 100),
                    (0x10_0064, 100),   // continues the first: merged
                    (0x1f_ff00, 0x100), // end of buffer 1
                    (0x20_0000, 0x100), // start of buffer 2: adjacent, another lkey
                ],
            )
        }];
        let p = plan(&t, &local(), &remote(), 1, &limits(128, 4, 1 << 20)).unwrap();
        let wrs = all_wrs(&p);
        assert_eq!(wrs.len(), 1);
        let keys: Vec<(u64, u32, u32)> = wrs[0]
            .sges
            .iter()
            .map(|s| (s.addr, s.len, s.lkey))
            .collect();
        assert_eq!(
            keys,
            vec![
                (0x10_0000, 200, 1),
                (0x1f_ff00, 0x100, 1),
                (0x20_0000, 0x100, 2)
            ]
        );
        assert_eq!(wrs[0].op, Op::Write);
        assert_covers(&p, &t, &remote());
    }

    #[test]
    fn a_piece_cut_at_the_stripe_continues_in_the_next_request() {
        let t = vec![get(0, &[(0x10_0000, 3000), (0x10_2000, 3000)])];
        let p = plan(&t, &local(), &remote(), 2, &limits(128, 4, 4096)).unwrap();
        let lens: Vec<u64> = all_wrs(&p).iter().map(|w| w.len()).collect();
        assert_eq!(lens.iter().sum::<u64>(), 6000);
        assert!(lens.iter().all(|&l| l <= 4096));
        assert_covers(&p, &t, &remote());
    }

    #[test]
    fn chains_respect_the_send_queue_and_only_their_last_is_signaled() {
        // 40 small gets on one lane, send queue 16 deep: chains of 8, two in flight.
        let t: Vec<Transfer> = (0..40)
            .map(|i| get(i * 4096, &[(0x10_0000 + i * 4096, 4096)]))
            .collect();
        let p = plan(&t, &local(), &remote(), 1, &limits(16, 4, 1 << 20)).unwrap();
        assert_eq!((p.chain_len, p.chains_in_flight), (8, 2));
        let chains = &p.lanes[0];
        assert_eq!(chains.iter().map(Vec::len).collect::<Vec<_>>(), vec![8; 5]);
        for chain in chains {
            let signaled: Vec<bool> = chain.iter().map(|w| w.signaled).collect();
            assert!(signaled[..7].iter().all(|s| !s));
            assert!(signaled[7]);
        }
        assert!(p.chain_len * p.chains_in_flight <= 16);
        assert_covers(&p, &t, &remote());
        // A send queue of one: chains of one, one in flight.
        let p = plan(&t[..3], &local(), &remote(), 1, &limits(1, 4, 1 << 20)).unwrap();
        assert_eq!((p.chain_len, p.chains_in_flight), (1, 1));
        assert!(all_wrs(&p).iter().all(|w| w.signaled));
    }

    #[test]
    fn lanes_are_balanced_by_bytes() {
        // One big and many small: the small ones go to the other lanes.
        let mut t = vec![get(0, &[(0x10_0000, 512 << 10)])];
        t.extend((0..6).map(|i| get((1 << 20) + i * 4096, &[(0x20_0000 + i * 4096, 4096)])));
        let p = plan(&t, &local(), &remote(), 3, &limits(128, 4, 1 << 20)).unwrap();
        let bytes: Vec<u64> = p
            .lanes
            .iter()
            .map(|l| l.iter().flatten().map(WorkRequest::len).sum())
            .collect();
        assert_eq!(bytes[0], 512 << 10);
        assert_eq!(bytes[1] + bytes[2], 6 * 4096);
        assert_eq!(bytes[1], bytes[2]);
    }

    #[test]
    fn bad_items_are_refused_alone() {
        let t = vec![
            get(0, &[(0x10_0000, 10)]),
            get(0, &[(0x30_0000, 10)]),   // local memory not registered
            get(0, &[(0x1f_fff0, 0x20)]), // straddles the end of buffer 1
            get((1 << 30) - 4, &[(0x10_0000, 10)]), // past the node's region
            Transfer {
                region: 99,
                ..get(0, &[(0x10_0000, 10)])
            }, // unknown region
            get(0, &[]),                  // nothing to move
            get(0, &[(0x10_0000, 0)]),    // only an empty piece: nothing either
            get(64, &[(0x30_0000, 0), (0x20_0000, 10)]), // an empty piece is skipped
        ];
        let p = plan(&t, &local(), &remote(), 2, &limits(128, 4, 1 << 20)).unwrap();
        let codes: Vec<Option<kvpool_proto::ErrorCode>> = p
            .refused
            .iter()
            .map(|e| e.as_ref().map(RdmaError::code))
            .collect();
        use kvpool_proto::ErrorCode::*;
        assert_eq!(
            codes,
            vec![
                None,
                Some(InvalidArgument),
                Some(InvalidArgument),
                Some(OutOfRange),
                Some(OutOfRange),
                Some(InvalidArgument),
                Some(InvalidArgument),
                None
            ]
        );
        assert!(matches!(
            p.refused[1],
            Some(RdmaError::NotRegistered {
                addr: 0x30_0000,
                len: 10
            })
        ));
        assert_eq!(all_wrs(&p).len(), 2);
        assert_covers(&p, &t, &remote());
    }

    #[test]
    fn impossible_limits_and_zero_lanes_are_refused() {
        let t = vec![get(0, &[(0x10_0000, 10)])];
        for l in [limits(0, 4, 1), limits(1, 0, 1), limits(1, 1, 0)] {
            assert!(matches!(
                plan(&t, &local(), &remote(), 1, &l),
                Err(RdmaError::InvalidArgument(_))
            ));
        }
        assert!(plan(&t, &local(), &remote(), 0, &Limits::default()).is_err());
    }
}
