//! The producer's hand-offs as a sans-I/O state machine: time comes in as an argument, so the
//! abort timeout, claims and aborts are tested without sockets or sleeps.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use kvpool_proto::{ErrorCode, WireError};

use crate::keys::BlockKey;

/// How many ended transfers are remembered, so a late claim learns *why* it failed
/// (aborted, expired) instead of an unexplained `TransferUnknown`.
const REMEMBERED: usize = 4096;

/// How a hand-off ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The consumer loaded it and said so.
    Released,
    /// An engine on either side aborted it.
    Aborted,
    /// No consumer claimed it within the abort timeout.
    Expired,
}

/// Counters for `/stats`-style reporting; `held` is the current number of hand-offs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    pub held: usize,
    pub held_blocks: usize,
    pub handed_off: u64,
    pub claimed: u64,
    pub released: u64,
    pub expired: u64,
    pub aborted: u64,
}

#[derive(Debug)]
struct Hold {
    request_id: String,
    keys: Vec<BlockKey>,
    deadline: Duration,
}

/// Hand-offs a producer holds, by transfer id.
#[derive(Debug)]
pub struct HoldTable {
    abort_timeout: Duration,
    holds: HashMap<String, Hold>,
    ended: HashMap<String, Outcome>,
    ended_order: VecDeque<String>,
    stats: ProducerStats,
}

impl HoldTable {
    pub fn new(abort_timeout: Duration) -> Self {
        HoldTable {
            abort_timeout,
            holds: HashMap::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            stats: ProducerStats::default(),
        }
    }

    /// Starts holding `keys` for `transfer_id` until claimed and done, aborted, or
    /// `now + abort_timeout`.
    pub fn insert(
        &mut self,
        now: Duration,
        transfer_id: &str,
        request_id: &str,
        keys: Vec<BlockKey>,
    ) {
        self.stats.handed_off += 1;
        self.holds.insert(
            transfer_id.to_string(),
            Hold {
                request_id: request_id.to_string(),
                keys,
                deadline: now.saturating_add(self.abort_timeout),
            },
        );
    }

    /// A consumer is about to load: the abort timer restarts so a slow load is not cut off by
    /// a timer that started at prefill. Answers the number of blocks held.
    pub fn claim(&mut self, now: Duration, transfer_id: &str) -> Result<u32, WireError> {
        let timeout = self.abort_timeout;
        match self.holds.get_mut(transfer_id) {
            Some(h) => {
                h.deadline = now.saturating_add(timeout);
                self.stats.claimed += 1;
                Ok(u32::try_from(h.keys.len()).unwrap_or(u32::MAX))
            }
            None => Err(self.gone(transfer_id)),
        }
    }

    /// The consumer loaded every block: the hold ends.
    pub fn done(&mut self, transfer_id: &str) -> Result<(), WireError> {
        self.end(transfer_id, Outcome::Released)
    }

    /// A consumer gave up on `transfer_id`.
    pub fn abort_transfer(&mut self, transfer_id: &str) -> Result<(), WireError> {
        self.end(transfer_id, Outcome::Aborted)
    }

    /// The producer's engine aborted `request_id`: every hand-off of it ends. Returns how
    /// many did.
    pub fn abort_request(&mut self, request_id: &str) -> usize {
        let ids: Vec<String> = self
            .holds
            .iter()
            .filter(|(_, h)| h.request_id == request_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            // Present: just listed.
            let _ = self.end(id, Outcome::Aborted);
        }
        ids.len()
    }

    /// Ends every hold whose deadline passed; returns their transfer ids.
    pub fn expire(&mut self, now: Duration) -> Vec<String> {
        let ids: Vec<String> = self
            .holds
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            let _ = self.end(id, Outcome::Expired);
        }
        ids
    }

    /// The earliest deadline, for the timer that calls [`Self::expire`].
    pub fn next_deadline(&self) -> Option<Duration> {
        self.holds.values().map(|h| h.deadline).min()
    }

    /// Every held block's key (for lease renewal).
    pub fn held_keys(&self) -> Vec<BlockKey> {
        self.holds
            .values()
            .flat_map(|h| h.keys.iter().cloned())
            .collect()
    }

    pub fn outcome(&self, transfer_id: &str) -> Option<Outcome> {
        self.ended.get(transfer_id).copied()
    }

    pub fn stats(&self) -> ProducerStats {
        ProducerStats {
            held: self.holds.len(),
            held_blocks: self.holds.values().map(|h| h.keys.len()).sum(),
            ..self.stats
        }
    }

    fn end(&mut self, transfer_id: &str, outcome: Outcome) -> Result<(), WireError> {
        if self.holds.remove(transfer_id).is_none() {
            return Err(self.gone(transfer_id));
        }
        match outcome {
            Outcome::Released => self.stats.released += 1,
            Outcome::Aborted => self.stats.aborted += 1,
            Outcome::Expired => self.stats.expired += 1,
        }
        if self.ended_order.len() == REMEMBERED {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
        self.ended_order.push_back(transfer_id.to_string());
        self.ended.insert(transfer_id.to_string(), outcome);
        Ok(())
    }

    /// Why `transfer_id` is not held.
    fn gone(&self, transfer_id: &str) -> WireError {
        match self.ended.get(transfer_id) {
            Some(Outcome::Aborted) => WireError::new(
                ErrorCode::TransferAborted,
                format!("hand-off {transfer_id} was aborted"),
            ),
            Some(Outcome::Expired) => WireError::new(
                ErrorCode::TransferExpired,
                format!(
                    "hand-off {transfer_id} was not claimed within {:?}; its blocks were released",
                    self.abort_timeout
                ),
            ),
            Some(Outcome::Released) => WireError::new(
                ErrorCode::TransferUnknown,
                format!("hand-off {transfer_id} was already loaded and released"),
            ),
            None => WireError::new(
                ErrorCode::TransferUnknown,
                format!("no hand-off {transfer_id} here"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::BlockId;

    const T: Duration = Duration::from_secs(10);

    fn keys(n: u8) -> Vec<BlockKey> {
        (0..n)
            .map(|i| BlockKey {
                ns: [1; 16],
                id: BlockId::Chained([i; 16]),
            })
            .collect()
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn claim_then_done_releases() {
        let mut t = HoldTable::new(T);
        t.insert(s(0), "t1", "r1", keys(3));
        assert_eq!(t.held_keys().len(), 3);
        assert_eq!(t.claim(s(1), "t1").unwrap(), 3);
        t.done("t1").unwrap();
        let st = t.stats();
        assert_eq!((st.held, st.claimed, st.released), (0, 1, 1));
        assert!(t.held_keys().is_empty());
        // A second done is refused: the hold is gone, and the error says so.
        assert_eq!(t.done("t1").unwrap_err().code, ErrorCode::TransferUnknown);
    }

    #[test]
    fn unclaimed_hold_expires_at_the_abort_timeout() {
        let mut t = HoldTable::new(T);
        t.insert(s(0), "t1", "r1", keys(2));
        t.insert(s(5), "t2", "r2", keys(1));
        assert_eq!(t.next_deadline(), Some(s(10)));
        assert!(t.expire(s(9)).is_empty());
        assert_eq!(t.expire(s(10)), vec!["t1".to_string()]);
        assert_eq!(t.stats().held, 1);
        let e = t.claim(s(11), "t1").unwrap_err();
        assert_eq!(e.code, ErrorCode::TransferExpired);
        assert_eq!(t.outcome("t1"), Some(Outcome::Expired));
    }

    #[test]
    fn a_claim_restarts_the_timer() {
        let mut t = HoldTable::new(T);
        t.insert(s(0), "t1", "r1", keys(1));
        t.claim(s(8), "t1").unwrap();
        assert!(
            t.expire(s(17)).is_empty(),
            "claimed at 8 s: held until 18 s"
        );
        assert_eq!(t.expire(s(18)).len(), 1);
    }

    #[test]
    fn aborts_from_either_side() {
        let mut t = HoldTable::new(T);
        t.insert(s(0), "t1", "r1", keys(1));
        t.insert(s(0), "t2", "r1", keys(1));
        t.insert(s(0), "t3", "r2", keys(1));
        // The producer's engine aborts request r1: both its hand-offs end.
        assert_eq!(t.abort_request("r1"), 2);
        assert_eq!(
            t.claim(s(1), "t1").unwrap_err().code,
            ErrorCode::TransferAborted
        );
        // The consumer aborts t3.
        t.abort_transfer("t3").unwrap();
        assert_eq!(t.done("t3").unwrap_err().code, ErrorCode::TransferAborted);
        let st = t.stats();
        assert_eq!((st.held, st.aborted), (0, 3));
        assert_eq!(
            t.claim(s(1), "never").unwrap_err().code,
            ErrorCode::TransferUnknown
        );
    }

    #[test]
    fn ended_transfers_are_forgotten_oldest_first() {
        let mut t = HoldTable::new(T);
        for i in 0..=REMEMBERED {
            let id = format!("t{i}");
            t.insert(s(0), &id, "r", keys(1));
            t.done(&id).unwrap();
        }
        assert_eq!(t.outcome("t0"), None);
        assert_eq!(t.outcome("t1"), Some(Outcome::Released));
    }
}
