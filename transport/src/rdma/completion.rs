//! Completion bookkeeping, sans I/O: which chains to post next, which batch items a
//! completion (or an error completion) finishes, and what a deadline does.
//!
//! Rules, from how reliable-connection queue pairs behave:
//! - Work requests on one QP execute and complete in order, so a chain's signaled last
//!   request completing means the whole chain (and every earlier one on the lane) succeeded.
//! - An error completion for request `i` of a chain means requests before `i` succeeded and
//!   `i` failed; the QP is now in the error state, so the rest of that chain and every later
//!   chain of the lane fail without running (flushed), and the lane is dead for this peer.
//! - A batch item succeeds when every work request carrying its bytes succeeded, and fails
//!   with the first failure among them.
//! - At the deadline every unfinished item fails with `Timeout`; the lanes that still have
//!   chains posted are returned so the caller moves their QPs to the error state (the device
//!   then stops touching the batch's memory) before the batch returns.
//! - A posted chain stays "outstanding" until a completion for its last request arrives,
//!   whatever its status (flushed requests complete too), so the caller can wait until the
//!   device is done with every buffer of the batch.
//!
//! A work request id packs `(lane, chain, index)`; see [`WrId`].

use std::{collections::VecDeque, time::Instant};

use super::{plan::Plan, RdmaError};

/// A work request's position in a batch, packed into the 64-bit `wr_id` the device echoes:
/// the batch's epoch in bits 48..64 (so a late completion of an earlier batch on the same
/// completion queue is recognized and ignored), the lane in 40..48, the chain in 16..40 and
/// the index in the chain in 0..16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrId {
    pub epoch: u16,
    pub lane: u8,
    /// 24 bits.
    pub chain: u32,
    pub index: u16,
}

impl WrId {
    pub fn encode(self) -> u64 {
        (u64::from(self.epoch) << 48)
            | (u64::from(self.lane) << 40)
            | (u64::from(self.chain & 0x00ff_ffff) << 16)
            | u64::from(self.index)
    }

    pub fn decode(v: u64) -> WrId {
        WrId {
            epoch: (v >> 48) as u16,
            lane: (v >> 40) as u8,
            chain: ((v >> 16) as u32) & 0x00ff_ffff,
            index: v as u16,
        }
    }
}

/// How a work request ended badly, as the device reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WcError {
    pub status: u32,
    pub status_name: &'static str,
    pub vendor_err: u32,
}

#[derive(Debug, Clone)]
enum Failure {
    Completion(WcError),
    Flushed(WcError),
    Timeout(std::time::Duration),
}

impl Failure {
    fn into_error(self) -> RdmaError {
        match self {
            Failure::Completion(e) => RdmaError::Completion {
                status: e.status,
                status_name: e.status_name,
                vendor_err: e.vendor_err,
            },
            Failure::Flushed(e) => RdmaError::Flushed(e.status_name.to_string()),
            Failure::Timeout(after) => RdmaError::Timeout { after },
        }
    }
}

#[derive(Debug, Default)]
struct Lane {
    /// The next chain to post.
    next: usize,
    /// Posted chains whose last request has not completed, in posting order.
    posted: VecDeque<usize>,
    dead: bool,
}

/// The state of one batch on one peer's lanes.
#[derive(Debug)]
pub struct Tracker {
    epoch: u16,
    lanes: Vec<Lane>,
    wrs_left: Vec<u32>,
    failed: Vec<Option<Failure>>,
    started: Instant,
    deadline: Instant,
}

impl Tracker {
    pub fn new(plan: &Plan, epoch: u16, started: Instant, deadline: Instant) -> Tracker {
        Tracker {
            epoch,
            lanes: plan.lanes.iter().map(|_| Lane::default()).collect(),
            wrs_left: plan.item_wrs.clone(),
            failed: vec![None; plan.item_wrs.len()],
            started,
            deadline,
        }
    }

    /// The chains to post now, `(lane, chain)`, marked posted: on every live lane, the next
    /// ones while fewer than `chains_in_flight` are outstanding.
    pub fn to_post(&mut self, plan: &Plan) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if self.is_done() {
            return out;
        }
        for (l, lane) in self.lanes.iter_mut().enumerate() {
            while !lane.dead
                && lane.posted.len() < plan.chains_in_flight
                && lane.next < plan.lanes[l].len()
            {
                lane.posted.push_back(lane.next);
                out.push((l, lane.next));
                lane.next += 1;
            }
        }
        out
    }

    /// Posting `(lane, chain)` was refused at request `index`: requests before it were
    /// posted and will run, but unsignaled they will never report, so their items are not
    /// trusted either. The lane is dead; the chain stays outstanding (unless nothing of it
    /// was posted) until the lane's queue pair is destroyed.
    pub fn post_failed(
        &mut self,
        plan: &Plan,
        lane: usize,
        chain: usize,
        index: usize,
        e: WcError,
    ) {
        for wr in &plan.lanes[lane][chain][..index] {
            self.failed[wr.item].get_or_insert(Failure::Flushed(e));
        }
        self.fail_from(plan, lane, chain, index, e);
        if index == 0 {
            self.lanes[lane].posted.retain(|&c| c != chain);
        }
    }

    /// Applies one completion from the device.
    pub fn complete(&mut self, plan: &Plan, wr_id: u64, status: Result<(), WcError>) {
        let id = WrId::decode(wr_id);
        if id.epoch != self.epoch {
            return; // A late completion of an earlier batch on the same queue.
        }
        let (lane, chain, index) = (id.lane as usize, id.chain as usize, id.index as usize);
        let Some(chains) = plan.lanes.get(lane) else {
            return; // Not a lane of this batch: nothing to account.
        };
        let Some(wrs) = chains.get(chain) else {
            return;
        };
        let last = index + 1 == wrs.len();
        if self.lanes[lane].dead {
            // Flushes after the lane died: they only tell that the device let go of a chain.
            if last {
                self.lanes[lane].posted.retain(|&c| c != chain);
            }
            return;
        }
        match status {
            Ok(()) => {
                // In order: every chain posted before this one is complete too.
                while let Some(c) = self.lanes[lane].posted.pop_front() {
                    self.succeed(plan, lane, c, plan.lanes[lane][c].len());
                    if c == chain {
                        break;
                    }
                }
            }
            Err(e) => {
                while self.lanes[lane].posted.front().is_some_and(|&c| c != chain) {
                    let c = self.lanes[lane].posted.pop_front().unwrap_or(chain);
                    self.succeed(plan, lane, c, plan.lanes[lane][c].len());
                }
                self.succeed(plan, lane, chain, index);
                self.fail_from(plan, lane, chain, index, e);
                if last {
                    self.lanes[lane].posted.retain(|&c| c != chain);
                }
            }
        }
    }

    /// At or past the deadline, fails every unfinished item with `Timeout` and returns the
    /// lanes that still have chains on the device (their QPs must be moved to the error
    /// state). Before the deadline, does nothing.
    pub fn expire(&mut self, plan: &Plan, now: Instant) -> Vec<usize> {
        if now < self.deadline || (self.is_done() && self.is_quiescent()) {
            return Vec::new();
        }
        let after = self.deadline.saturating_duration_since(self.started);
        for (item, left) in self.wrs_left.iter().enumerate() {
            if *left > 0 && self.failed[item].is_none() && plan.refused[item].is_none() {
                self.failed[item] = Some(Failure::Timeout(after));
            }
        }
        // Lanes still holding requests must stop; idle lanes stay usable for later batches.
        let mut reset = Vec::new();
        for (l, lane) in self.lanes.iter_mut().enumerate() {
            if !lane.dead && !lane.posted.is_empty() {
                reset.push(l);
                lane.dead = true;
            }
        }
        reset
    }

    /// Every item has its outcome. Chains not yet posted then carry only failed items' bytes
    /// and are not posted.
    pub fn is_done(&self) -> bool {
        self.wrs_left
            .iter()
            .zip(&self.failed)
            .all(|(w, f)| *w == 0 || f.is_some())
    }

    /// The device holds no posted chain of this batch any more: its memory may be reused.
    pub fn is_quiescent(&self) -> bool {
        self.lanes.iter().all(|l| l.posted.is_empty())
    }

    /// The id of request `index` of `(lane, chain)`.
    pub fn wr_id(&self, lane: usize, chain: usize, index: usize) -> WrId {
        WrId {
            epoch: self.epoch,
            lane: lane as u8,
            chain: chain as u32,
            index: index as u16,
        }
    }

    /// Forgets the chains posted on `lane`: its QP was destroyed, so the device holds none of
    /// them and reports none.
    pub fn forget_lane(&mut self, lane: usize) {
        self.lanes[lane].posted.clear();
        self.lanes[lane].dead = true;
    }

    /// The device holds no posted chain of this batch on `lane`.
    pub fn is_lane_quiescent(&self, lane: usize) -> bool {
        self.lanes[lane].posted.is_empty()
    }

    /// Lanes that failed (or timed out) during this batch: their QPs cannot be used again.
    pub fn dead_lanes(&self) -> Vec<usize> {
        (0..self.lanes.len())
            .filter(|&l| self.lanes[l].dead)
            .collect()
    }

    /// One result per item of the batch, in order.
    pub fn results(self, plan: &mut Plan) -> Vec<Result<(), RdmaError>> {
        let refused = std::mem::take(&mut plan.refused);
        refused
            .into_iter()
            .zip(self.failed)
            .zip(self.wrs_left)
            .map(|((refused, failed), left)| match (refused, failed) {
                (Some(e), _) => Err(e),
                (None, Some(f)) => Err(f.into_error()),
                (None, None) if left == 0 => Ok(()),
                // Unreachable when the batch ran to `is_done`; kept total for safety.
                (None, None) => Err(RdmaError::Flushed("the batch stopped before it".into())),
            })
            .collect()
    }

    /// Requests `0..upto` of `(lane, chain)` succeeded.
    fn succeed(&mut self, plan: &Plan, lane: usize, chain: usize, upto: usize) {
        for wr in &plan.lanes[lane][chain][..upto] {
            self.wrs_left[wr.item] = self.wrs_left[wr.item].saturating_sub(1);
        }
    }

    /// Request `index` of `(lane, chain)` failed with `e`: its item fails with `e`, every
    /// later request on the lane is flushed, and the lane is dead.
    fn fail_from(&mut self, plan: &Plan, lane: usize, chain: usize, index: usize, e: WcError) {
        let chains = &plan.lanes[lane];
        let first = &chains[chain][index];
        self.failed[first.item].get_or_insert(Failure::Completion(e));
        let later = chains[chain][index + 1..]
            .iter()
            .chain(chains[chain + 1..].iter().flatten());
        for wr in later {
            self.failed[wr.item].get_or_insert(Failure::Flushed(e));
        }
        self.lanes[lane].dead = true;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kvpool_proto::{rdma::RegionDesc, ErrorCode};

    use super::*;
    use crate::rdma::{
        handshake::RemoteRegions,
        plan::{plan, Limits, Op, Piece, Transfer},
        registry::{Access, Region, Registry},
    };
    use std::collections::VecDeque;

    const KIB4: u64 = 4096;

    /// `sizes[i]` bytes for item `i` (multiples of 4 KiB; a stripe is 4 KiB, so an item of
    /// n × 4 KiB is n requests), planned on `lanes` lanes with a send queue of `sq`.
    fn planned(sizes: &[u64], lanes: usize, sq: u32) -> Plan {
        let mut reg = Registry::default();
        reg.insert(
            Region {
                id: 1,
                addr: 0x100_0000,
                len: 1 << 24,
                lkey: 1,
                rkey: 1,
                access: Access::Local,
            },
            (),
        )
        .unwrap();
        let remote = RemoteRegions::new(&[RegionDesc {
            id: 9,
            addr: 0,
            len: 1 << 30,
            rkey: 2,
        }]);
        let mut at = 0;
        let transfers: Vec<Transfer> = sizes
            .iter()
            .map(|&len| {
                let t = Transfer {
                    op: Op::Read,
                    region: if len == 0 { 1234 } else { 9 },
                    offset: at,
                    local: vec![Piece {
                        addr: 0x100_0000 + at,
                        len: len.max(1),
                    }],
                };
                at += len.max(1);
                t
            })
            .collect();
        let limits = Limits {
            max_send_wr: sq,
            max_sge: 4,
            max_msg_size: 1 << 30,
            stripe: KIB4,
        };
        plan(&transfers, &reg, &remote, lanes, &limits).unwrap()
    }

    fn tracker(plan: &Plan) -> (Tracker, Instant) {
        let t0 = Instant::now();
        (Tracker::new(plan, 3, t0, t0 + Duration::from_secs(1)), t0)
    }

    /// The id of the last request of `(lane, chain)`: the one signaled.
    fn last(t: &Tracker, p: &Plan, lane: usize, chain: usize) -> u64 {
        t.wr_id(lane, chain, p.lanes[lane][chain].len() - 1)
            .encode()
    }

    const FAIL: WcError = WcError {
        status: 12,
        status_name: "transport retry counter exceeded",
        vendor_err: 0x81,
    };

    fn codes(results: Vec<Result<(), RdmaError>>) -> Vec<Option<ErrorCode>> {
        results
            .iter()
            .map(|r| r.as_ref().err().map(RdmaError::code))
            .collect()
    }

    #[test]
    fn wr_ids_round_trip() {
        let id = WrId {
            epoch: 0xbeef,
            lane: 63,
            chain: 0x00ab_cdef,
            index: 65535,
        };
        assert_eq!(WrId::decode(id.encode()), id);
    }

    #[test]
    fn chains_post_within_the_window_and_complete_in_order() {
        // 6 items of one request each on one lane; send queue 4: chains of 2, 2 in flight.
        let mut p = planned(&[KIB4; 6], 1, 4);
        let (mut t, _) = tracker(&p);
        assert_eq!(t.to_post(&p), vec![(0, 0), (0, 1)]);
        assert!(t.to_post(&p).is_empty(), "the window is full");
        // An unsignaled request never completes on its own; the chain's last does.
        t.complete(&p, last(&t, &p, 0, 0), Ok(()));
        assert_eq!(t.to_post(&p), vec![(0, 2)]);
        assert!(!t.is_done());
        // Chain 2's completion implies chain 1's (one queue pair completes in order).
        t.complete(&p, last(&t, &p, 0, 2), Ok(()));
        assert!(t.is_done() && t.is_quiescent());
        assert_eq!(codes(t.results(&mut p)), vec![None; 6]);
    }

    #[test]
    fn an_error_completion_fails_its_item_and_flushes_the_rest_of_its_lane() {
        // Items 0..4 of 2 requests each on 2 lanes, queue 8: chains of 4.
        let mut p = planned(&[2 * KIB4, 2 * KIB4, 2 * KIB4, 2 * KIB4], 2, 8);
        let (mut t, _) = tracker(&p);
        let posted = t.to_post(&p);
        assert_eq!(posted.len(), 2, "one chain per lane: {posted:?}");
        // Lane 0 fails at its third request; lane 1 completes.
        let failing = &p.lanes[0][0][2];
        let failing_item = failing.item;
        t.complete(&p, t.wr_id(0, 0, 2).encode(), Err(FAIL));
        t.complete(&p, last(&t, &p, 1, 0), Ok(()));
        assert_eq!(t.dead_lanes(), vec![0]);
        assert!(t.to_post(&p).is_empty(), "a dead lane posts nothing");
        assert!(t.is_done(), "every item has its outcome");
        assert!(
            !t.is_quiescent(),
            "the failed chain's last request is still posted"
        );
        // Its flush arrives: the device let go of the chain.
        t.complete(&p, last(&t, &p, 0, 0), Err(WcError { status: 5, ..FAIL }));
        assert!(t.is_quiescent());
        let lane0_items: Vec<usize> = p.lanes[0][0].iter().map(|w| w.item).collect();
        let results = t.results(&mut p);
        for (item, r) in results.iter().enumerate() {
            match r {
                Err(RdmaError::Completion {
                    status: 12,
                    vendor_err: 0x81,
                    ..
                }) => {
                    assert_eq!(item, failing_item)
                }
                Err(RdmaError::Flushed(why)) => {
                    assert!(lane0_items[3..].contains(&item), "item {item}");
                    assert!(why.contains("retry"), "{why}");
                }
                Ok(()) => assert!(!lane0_items[2..].contains(&item), "item {item}"),
                Err(e) => panic!("item {item}: {e}"),
            }
        }
        assert!(results.iter().any(Result::is_ok));
    }

    #[test]
    fn an_item_split_over_lanes_fails_if_any_lane_fails() {
        // One item of 2 requests, one per lane.
        let mut p = planned(&[2 * KIB4], 2, 8);
        let (mut t, _) = tracker(&p);
        t.to_post(&p);
        t.complete(&p, last(&t, &p, 1, 0), Ok(()));
        assert!(!t.is_done());
        t.complete(&p, last(&t, &p, 0, 0), Err(FAIL));
        assert!(t.is_done() && t.is_quiescent());
        assert_eq!(codes(t.results(&mut p)), vec![Some(ErrorCode::Io)]);
    }

    #[test]
    fn completions_of_another_batch_or_lane_are_ignored() {
        let p = planned(&[KIB4], 1, 8);
        let (mut t, _) = tracker(&p);
        t.to_post(&p);
        let stale = WrId {
            epoch: 2,
            ..WrId::decode(last(&t, &p, 0, 0))
        };
        t.complete(&p, stale.encode(), Err(FAIL));
        t.complete(&p, t.wr_id(5, 0, 0).encode(), Err(FAIL));
        t.complete(&p, t.wr_id(0, 9, 0).encode(), Err(FAIL));
        assert!(!t.is_done());
        assert!(t.dead_lanes().is_empty());
    }

    #[test]
    fn the_deadline_fails_what_is_unfinished_and_names_the_lanes_to_stop() {
        // Two items on two lanes; lane 1 finishes, lane 0 hangs.
        let mut p = planned(&[KIB4, KIB4], 2, 8);
        let (mut t, t0) = tracker(&p);
        t.to_post(&p);
        t.complete(&p, last(&t, &p, 1, 0), Ok(()));
        assert!(t.expire(&p, t0 + Duration::from_millis(999)).is_empty());
        assert!(!t.is_done());
        assert_eq!(t.expire(&p, t0 + Duration::from_secs(1)), vec![0]);
        assert_eq!(t.dead_lanes(), vec![0], "the idle lane stays usable");
        assert!(t.is_done());
        assert!(!t.is_quiescent());
        t.forget_lane(0);
        assert!(t.is_quiescent());
        let hung = p.lanes[0][0][0].item;
        let results = t.results(&mut p);
        assert!(
            matches!(results[hung], Err(RdmaError::Timeout { after }) if after == Duration::from_secs(1))
        );
        assert!(results[1 - hung].is_ok());
    }

    #[test]
    fn a_refused_post_fails_the_whole_chain() {
        let mut p = planned(&[KIB4, KIB4, KIB4], 1, 8);
        let (mut t, _) = tracker(&p);
        t.to_post(&p);
        t.post_failed(&p, 0, 0, 1, FAIL);
        assert!(t.is_done());
        assert!(
            !t.is_quiescent(),
            "request 0 was posted: on the device until the lane is destroyed"
        );
        t.forget_lane(0);
        assert!(t.is_quiescent());
        let order: Vec<usize> = p.lanes[0][0].iter().map(|w| w.item).collect();
        let results = t.results(&mut p);
        assert!(
            matches!(results[order[0]], Err(RdmaError::Flushed(_))),
            "posted but unsignaled: never confirmed"
        );
        assert!(matches!(
            results[order[1]],
            Err(RdmaError::Completion { .. })
        ));
        assert!(matches!(results[order[2]], Err(RdmaError::Flushed(_))));

        // Refused at its first request: nothing reached the device.
        let p = planned(&[KIB4, KIB4], 1, 8);
        let (mut t, _) = tracker(&p);
        t.to_post(&p);
        t.post_failed(&p, 0, 0, 0, FAIL);
        assert!(t.is_done() && t.is_quiescent());
    }

    #[test]
    fn refused_items_keep_their_own_error() {
        // Item 1 names an unknown remote region (see `planned`).
        let mut p = planned(&[KIB4, 0, KIB4], 1, 8);
        let (mut t, _) = tracker(&p);
        t.to_post(&p);
        t.complete(&p, last(&t, &p, 0, 0), Ok(()));
        assert!(t.is_done());
        assert_eq!(
            codes(t.results(&mut p)),
            vec![None, Some(ErrorCode::OutOfRange), None]
        );
    }

    /// A device simulated lane by lane: posted chains run in order; a lane may fail at one
    /// request, after which its later requests complete as flushed (the signaled ones: the
    /// least a provider reports). Completions of different lanes interleave at random. For
    /// many random batches, every item must end with one outcome, succeed exactly when none
    /// of its requests is at or after a failure on its lane, and the batch must end
    /// quiescent.
    #[test]
    fn random_batches_on_a_simulated_device() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use std::collections::HashSet;

        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let sizes: Vec<u64> = (0..rng.gen_range(1..20))
                .map(|_| KIB4 * rng.gen_range(1..6))
                .collect();
            let lanes = rng.gen_range(1..5);
            let sq = rng.gen_range(1..9);
            let mut p = planned(&sizes, lanes, sq);
            // Per lane, maybe a failure at (chain, index).
            let fail_at: Vec<Option<(usize, usize)>> = p
                .lanes
                .iter()
                .map(|chains| {
                    (rng.gen_bool(0.3) && !chains.is_empty()).then(|| {
                        let c = rng.gen_range(0..chains.len());
                        (c, rng.gen_range(0..chains[c].len()))
                    })
                })
                .collect();
            // The model: items with a request at or after a failure point on its lane.
            let mut doomed = HashSet::new();
            for (l, f) in fail_at.iter().enumerate() {
                if let Some((fc, fi)) = *f {
                    for (c, chain) in p.lanes[l].iter().enumerate() {
                        for (i, wr) in chain.iter().enumerate() {
                            if (c, i) >= (fc, fi) {
                                doomed.insert(wr.item);
                            }
                        }
                    }
                }
            }
            let (mut t, _) = tracker(&p);
            let mut device: Vec<VecDeque<usize>> = vec![VecDeque::new(); lanes];
            let mut errored = vec![false; lanes];
            for _step in 0..10_000 {
                for (l, c) in t.to_post(&p) {
                    device[l].push_back(c);
                }
                let busy: Vec<usize> = (0..lanes).filter(|&l| !device[l].is_empty()).collect();
                if busy.is_empty() {
                    break;
                }
                let l = busy[rng.gen_range(0..busy.len())];
                let c = device[l].pop_front().unwrap_or_default();
                let n = p.lanes[l][c].len();
                if errored[l] {
                    t.complete(&p, last(&t, &p, l, c), Err(WcError { status: 5, ..FAIL }));
                } else if let Some((_, fi)) = fail_at[l].filter(|&(fc, _)| fc == c) {
                    errored[l] = true;
                    t.complete(&p, t.wr_id(l, c, fi).encode(), Err(FAIL));
                    if fi + 1 < n {
                        t.complete(&p, last(&t, &p, l, c), Err(WcError { status: 5, ..FAIL }));
                    }
                } else {
                    t.complete(&p, last(&t, &p, l, c), Ok(()));
                }
            }
            assert!(t.is_done(), "seed {seed}: every item has its outcome");
            assert!(t.is_quiescent(), "seed {seed}: the device holds nothing");
            let results = t.results(&mut p);
            for (item, r) in results.iter().enumerate() {
                assert_eq!(
                    r.is_err(),
                    doomed.contains(&item),
                    "seed {seed}, item {item}: {r:?}"
                );
            }
        }
    }
}
