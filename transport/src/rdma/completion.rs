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

    /// Posting `(lane, chain)` failed at request `index` (the device refused it before it
    /// ran): as an error completion there, and the device will report nothing for the chain.
    pub fn post_failed(
        &mut self,
        plan: &Plan,
        lane: usize,
        chain: usize,
        index: usize,
        e: WcError,
    ) {
        self.fail_from(plan, lane, chain, index, e);
        self.lanes[lane].posted.retain(|&c| c != chain);
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
        let mut reset = Vec::new();
        for (l, lane) in self.lanes.iter_mut().enumerate() {
            if !lane.dead && !lane.posted.is_empty() {
                reset.push(l);
            }
            lane.dead = true;
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
