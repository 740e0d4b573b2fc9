//! What this node holds, so that a new or restarted master can rebuild its object map.
//!
//! Clients name each replica's object with an [`ObjectTag`] sent along one of its writes. The
//! node keeps the tags, forgets those the master frees, and when it (re-)registers reports
//! only the entries whose bytes still match the writer's checksum: a write that never finished
//! or bytes that were overwritten since are never reported as an object.
//!
//! Each entry also says what the node knows of its put's commit ([`CommitState`]): the
//! master sends a commit notice (with the object's pins) for every replica of a committed put
//! in a heartbeat response. An entry without one is `Abandoned` once the master has answered
//! a heartbeat sent [`UNCONFIRMED_GRACE`] after the write landed (a put that had been
//! committed by then would have been announced in that answer), else `Unconfirmed`.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use kvpool_proto::{CommitNotice, CommitState, InventoryEntry, ObjectTag, ReplicaId, SegmentId};
use kvpool_transport::shm::BoardWriter;

use crate::segment::Segment;

/// The replicas this node holds, by id and by position.
#[derive(Debug, Default)]
pub struct Inventory {
    inner: Mutex<Inner>,
    /// The board's slot count and memory file, handed to same-host clients.
    board: Option<(u64, OwnedFd)>,
}

/// How long after its last write a put is assumed to end (`PutEnd`). A put committed later
/// than this, by a master that then fails before its next heartbeat answer, is refused by the
/// next master; a put abandoned less than this before a failover is admitted by it.
pub const UNCONFIRMED_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Inner {
    tags: HashMap<ReplicaId, ObjectTag>,
    /// Per entry, when it landed and the commit heard of (with its pins), if any.
    commits: HashMap<ReplicaId, Known>,
    /// Per segment, the entries by start offset. Entries never overlap (recording a tag drops
    /// the ones it overlaps), so ends are sorted like starts.
    by_pos: HashMap<SegmentId, BTreeMap<u64, ReplicaId>>,
    /// When the newest heartbeat was sent whose answer carried every notice the master had
    /// for this node.
    heard: Option<Instant>,
    /// Notices for replicas whose tags have not arrived yet, and when each came: a
    /// shared-memory put's tags travel to the node while its commit travels to the master,
    /// so the commit's notice can come first. Kept for [`UNCONFIRMED_GRACE`].
    early: HashMap<ReplicaId, (CommitNotice, Instant)>,
    /// Where the ids of `tags` are published for same-host clients (`shm::board`): `record`
    /// and `Inner::remove`, the only places that change `tags`, update it under the lock.
    board: Option<BoardWriter>,
}

#[derive(Debug, Clone, Copy)]
struct Known {
    landed: Instant,
    commit: Option<CommitNotice>,
}

impl Inner {
    fn commit_state(&self, id: ReplicaId) -> CommitState {
        match self.commits.get(&id) {
            Some(Known {
                commit: Some(n), ..
            }) => CommitState::Committed {
                hard_pin: n.hard_pin,
                soft_pin: n.soft_pin,
            },
            Some(k)
                if self
                    .heard
                    .is_some_and(|h| k.landed + UNCONFIRMED_GRACE <= h) =>
            {
                CommitState::Abandoned
            }
            _ => CommitState::Unconfirmed,
        }
    }

    fn remove(&mut self, id: ReplicaId) -> Option<ObjectTag> {
        self.commits.remove(&id);
        let tag = self.tags.remove(&id)?;
        if let Some(b) = &mut self.board {
            b.remove(id.0);
        }
        if let Some(pos) = self.by_pos.get_mut(&tag.segment) {
            if pos.get(&tag.offset) == Some(&id) {
                pos.remove(&tag.offset);
            }
            if pos.is_empty() {
                self.by_pos.remove(&tag.segment);
            }
        }
        Some(tag)
    }
}

impl Inventory {
    pub fn new() -> Self {
        Self::default()
    }

    /// An inventory that publishes its replica ids on `board` for same-host clients.
    pub fn with_board(board: BoardWriter) -> std::io::Result<Self> {
        let fd = board.fd().try_clone_to_owned()?;
        Ok(Inventory {
            board: Some((board.slots() as u64, fd)),
            inner: Mutex::new(Inner {
                board: Some(board),
                ..Inner::default()
            }),
        })
    }

    /// Replicas on the board, if this inventory publishes one.
    pub fn board_published(&self) -> Option<usize> {
        self.lock().board.as_ref().map(BoardWriter::live)
    }

    /// The board's slot count and memory file, if this inventory publishes one.
    pub fn board(&self) -> Option<(u64, BorrowedFd<'_>)> {
        self.board.as_ref().map(|(slots, fd)| (*slots, fd.as_fd()))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the node's inventory, so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a tag. The caller has checked that its range lies in a known segment. Entries
    /// of the same segment that overlap it are dropped: their bytes are being overwritten.
    pub fn record(&self, tag: ObjectTag) {
        if tag.len == 0 {
            return;
        }
        let end = tag.offset.saturating_add(tag.len);
        let mut inner = self.lock();
        inner.remove(tag.replica);
        let mut dropped = Vec::new();
        if let Some(pos) = inner.by_pos.get(&tag.segment) {
            for (&start, &id) in pos.range(..end).rev() {
                let other_end = inner
                    .tags
                    .get(&id)
                    .map_or(start, |t| start.saturating_add(t.len));
                if other_end <= tag.offset {
                    break;
                }
                dropped.push(id);
            }
        }
        for id in dropped {
            inner.remove(id);
            tracing::debug!(
                replica = id.0,
                by = tag.replica.0,
                "inventory entry overwritten"
            );
        }
        inner
            .by_pos
            .entry(tag.segment)
            .or_default()
            .insert(tag.offset, tag.replica);
        let commit = inner.early.remove(&tag.replica).map(|(n, _)| n);
        inner.commits.insert(
            tag.replica,
            Known {
                landed: Instant::now(),
                commit,
            },
        );
        let id = tag.replica;
        inner.tags.insert(id, tag);
        let Inner { board, tags, .. } = &mut *inner;
        if let Some(b) = board {
            // Not published (a full board): a same-host get from a cached location of this
            // replica misses on the board and goes through the master, as without a cache.
            b.insert(id.0, || tags.keys().map(|r| r.0).collect::<Vec<_>>());
        }
    }

    /// Applies commit notices from the master: those entries' puts are committed, pinned as
    /// the notice says. A notice for an unknown id is kept for [`UNCONFIRMED_GRACE`] in case
    /// its tag is still on its way (a shared-memory put), then dropped (the id was freed or
    /// overwritten since, or is an NVMe record's, which is always committed).
    pub fn confirm(&self, notices: &[CommitNotice]) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .early
            .retain(|_, (_, at)| now.duration_since(*at) < UNCONFIRMED_GRACE);
        for n in notices {
            match inner.commits.get_mut(&n.replica) {
                Some(k) => k.commit = Some(*n),
                None => {
                    inner.early.insert(n.replica, (*n, now));
                }
            }
        }
    }

    /// The master answered a heartbeat sent at `sent` with every notice it had for this node
    /// (`HeartbeatResponse.more` false): a put committed before `sent` has been announced.
    pub fn heard_from_master(&self, sent: Instant) {
        let mut inner = self.lock();
        inner.heard = Some(inner.heard.map_or(sent, |h| h.max(sent)));
    }

    /// What the node knows of a replica's commit (`Unconfirmed` for an unknown id).
    pub fn commit_state(&self, id: ReplicaId) -> CommitState {
        self.lock().commit_state(id)
    }

    /// Forgets replicas the master freed (or refused). Unknown ids are ignored: frees may be
    /// delivered twice, and an overwrite may have dropped the entry already.
    pub fn free(&self, ids: &[ReplicaId]) {
        let mut inner = self.lock();
        for &id in ids {
            inner.remove(id);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tag recorded for a replica, if any.
    pub fn get(&self, id: ReplicaId) -> Option<ObjectTag> {
        self.lock().tags.get(&id).cloned()
    }

    /// Whether `replica`'s tag is recorded and its range covers `offset..offset+len` of
    /// `segment`: a read from a client's cached location may be served (no key copied).
    pub fn holds(&self, replica: ReplicaId, segment: SegmentId, offset: u64, len: u64) -> bool {
        self.lock().tags.get(&replica).is_some_and(|t| {
            t.segment == segment
                && t.offset <= offset
                && offset.saturating_add(len) <= t.offset.saturating_add(t.len)
        })
    }

    /// The entries whose bytes match their checksum, for a registration. Entries that do not
    /// match are dropped: either their write never completed (a put that a master restart
    /// failed anyway) or their space was reused. Checksums are computed without the lock held,
    /// so this may take a while for a large segment but never stalls the data path.
    pub fn report(&self, segments: &[Segment]) -> Vec<InventoryEntry> {
        let mut snapshot: Vec<(ObjectTag, CommitState)> = {
            let inner = self.lock();
            inner
                .tags
                .values()
                .map(|t| (t.clone(), inner.commit_state(t.replica)))
                .collect()
        };
        // In replica order, not the map's: a report is then the same bytes for the same
        // inventory (logs and tests compare them).
        snapshot.sort_unstable_by_key(|(t, _)| t.replica.0);
        let mut out = Vec::with_capacity(snapshot.len());
        let mut stale = Vec::new();
        for (tag, commit) in snapshot {
            let Some(seg) = segments.iter().find(|s| s.id() == tag.segment) else {
                stale.push(tag);
                continue;
            };
            // A writer racing this read (space reused, or the object's own write still in
            // flight) only makes the checksum fail, and a failed checksum keeps the entry out
            // of the report.
            let crc = match seg.range(tag.offset, tag.len) {
                Ok(bytes) => bytes.crc32c(),
                Err(_) => {
                    stale.push(tag);
                    continue;
                }
            };
            if crc == tag.checksum {
                out.push(InventoryEntry {
                    replica: tag.replica,
                    key: tag.key,
                    segment: tag.segment,
                    offset: tag.offset,
                    len: tag.len,
                    checksum: tag.checksum,
                    commit,
                });
            } else {
                stale.push(tag);
            }
        }
        if !stale.is_empty() {
            let mut inner = self.lock();
            for tag in &stale {
                // Only drop the entry we checked: a retried write may have re-recorded it.
                if inner.tags.get(&tag.replica) == Some(tag) {
                    inner.remove(tag.replica);
                }
            }
            tracing::info!(
                dropped = stale.len(),
                reported = out.len(),
                "inventory entries whose bytes no longer match their checksum were dropped"
            );
        }
        out.sort_by_key(|e| (e.segment, e.offset));
        out
    }
}

/// Replicas this node dropped on its own (a corrupt NVMe record found by a read), waiting
/// to be reported in the next heartbeat so the master stops handing them out.
#[derive(Debug, Default)]
pub struct LostReplicas(Mutex<Vec<ReplicaId>>);

impl LostReplicas {
    fn lock(&self) -> MutexGuard<'_, Vec<ReplicaId>> {
        // Pushes and swaps only: nothing a panic could leave half done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self, id: ReplicaId) {
        self.lock().push(id);
    }

    /// Everything recorded since the last take, for a heartbeat.
    pub fn take(&self) -> Vec<ReplicaId> {
        std::mem::take(&mut *self.lock())
    }

    /// A heartbeat that carried `ids` failed: report them again next time.
    pub fn put_back(&self, ids: Vec<ReplicaId>) {
        self.lock().extend(ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(replica: u64, seg: u64, offset: u64, len: u64, checksum: u32) -> ObjectTag {
        ObjectTag {
            replica: ReplicaId(replica),
            key: format!("key-{replica}").into_bytes(),
            segment: SegmentId(seg),
            offset,
            len,
            checksum,
        }
    }

    fn ids(inv: &Inventory) -> Vec<u64> {
        let mut v: Vec<u64> = inv.lock().tags.keys().map(|r| r.0).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn overlapping_tag_drops_older_entries_in_same_segment_only() {
        let inv = Inventory::new();
        inv.record(tag(1, 1, 0, 100, 0));
        inv.record(tag(2, 1, 100, 100, 0));
        inv.record(tag(3, 1, 200, 100, 0));
        inv.record(tag(4, 2, 150, 100, 0));
        assert_eq!(ids(&inv), [1, 2, 3, 4]);
        // Overlaps the tail of 1 and the head of 2, touches neither 3 nor segment 2.
        inv.record(tag(5, 1, 99, 2, 0));
        assert_eq!(ids(&inv), [3, 4, 5]);
        // Exactly adjacent ranges do not overlap.
        inv.record(tag(6, 1, 101, 99, 0));
        assert_eq!(ids(&inv), [3, 4, 5, 6]);
        // One range covering several entries drops them all.
        inv.record(tag(7, 1, 0, 1000, 0));
        assert_eq!(ids(&inv), [4, 7]);
        assert!(inv.lock().by_pos[&SegmentId(1)].len() == 1);
    }

    #[test]
    fn rerecording_a_replica_moves_it() {
        let inv = Inventory::new();
        inv.record(tag(1, 1, 0, 10, 0));
        inv.record(tag(1, 1, 50, 10, 0));
        assert_eq!(inv.len(), 1);
        assert_eq!(inv.get(ReplicaId(1)).unwrap().offset, 50);
        inv.record(tag(2, 1, 0, 10, 0));
        assert_eq!(ids(&inv), [1, 2]);
    }

    #[test]
    fn commit_state_follows_notices_and_the_masters_answers() {
        let inv = Inventory::new();
        let t0 = Instant::now();
        inv.record(tag(1, 1, 0, 10, 0));
        inv.record(tag(2, 1, 10, 10, 0));
        inv.record(tag(3, 1, 20, 10, 0));
        assert_eq!(inv.commit_state(ReplicaId(1)), CommitState::Unconfirmed);
        inv.confirm(&[
            CommitNotice {
                replica: ReplicaId(1),
                hard_pin: true,
                soft_pin: false,
            },
            // Unknown ids are ignored.
            CommitNotice {
                replica: ReplicaId(9),
                hard_pin: false,
                soft_pin: false,
            },
        ]);
        assert_eq!(
            inv.commit_state(ReplicaId(1)),
            CommitState::Committed {
                hard_pin: true,
                soft_pin: false
            }
        );
        // An answer to a heartbeat sent before the grace ran out proves nothing...
        inv.heard_from_master(t0);
        assert_eq!(inv.commit_state(ReplicaId(2)), CommitState::Unconfirmed);
        // ...one sent after it does: a commit would have been announced in it.
        inv.heard_from_master(Instant::now() + UNCONFIRMED_GRACE);
        assert_eq!(inv.commit_state(ReplicaId(2)), CommitState::Abandoned);
        // An older answer arriving late never moves the mark back.
        inv.heard_from_master(t0);
        assert_eq!(inv.commit_state(ReplicaId(3)), CommitState::Abandoned);
        // Committed entries stay committed; a re-recorded (rewritten) entry starts over.
        assert!(matches!(
            inv.commit_state(ReplicaId(1)),
            CommitState::Committed { .. }
        ));
        inv.record(tag(1, 1, 0, 10, 0));
        assert_eq!(inv.commit_state(ReplicaId(1)), CommitState::Unconfirmed);
        inv.free(&[ReplicaId(2)]);
        assert!(!inv.lock().commits.contains_key(&ReplicaId(2)));
    }

    #[test]
    fn lost_replicas_are_taken_once_and_put_back_after_a_failed_report() {
        let lost = LostReplicas::default();
        lost.record(ReplicaId(1));
        lost.record(ReplicaId(2));
        let sent = lost.take();
        assert_eq!(sent, [ReplicaId(1), ReplicaId(2)]);
        assert!(lost.take().is_empty());
        lost.record(ReplicaId(3));
        lost.put_back(sent);
        let mut again = lost.take();
        again.sort();
        assert_eq!(again, [ReplicaId(1), ReplicaId(2), ReplicaId(3)]);
    }

    #[test]
    fn a_commit_notice_that_arrives_before_its_tag_applies_when_the_tag_lands() {
        let inv = Inventory::new();
        let notice = |id| CommitNotice {
            replica: ReplicaId(id),
            hard_pin: true,
            soft_pin: false,
        };
        inv.confirm(&[notice(5)]);
        assert_eq!(inv.commit_state(ReplicaId(5)), CommitState::Unconfirmed);
        inv.record(tag(5, 1, 0, 10, 0));
        assert_eq!(
            inv.commit_state(ReplicaId(5)),
            CommitState::Committed {
                hard_pin: true,
                soft_pin: false
            }
        );
        assert!(inv.lock().early.is_empty(), "applied notices are not kept");
        // A notice whose tag never comes is dropped once the grace has passed.
        inv.confirm(&[notice(6)]);
        inv.lock().early.get_mut(&ReplicaId(6)).unwrap().1 -= UNCONFIRMED_GRACE;
        inv.confirm(&[]);
        assert!(inv.lock().early.is_empty());
        inv.record(tag(6, 1, 10, 10, 0));
        assert_eq!(inv.commit_state(ReplicaId(6)), CommitState::Unconfirmed);
    }

    #[test]
    fn holds_covers_only_the_recorded_range_of_a_live_tag() {
        let inv = Inventory::new();
        inv.record(tag(1, 1, 100, 50, 0));
        let r = ReplicaId(1);
        assert!(inv.holds(r, SegmentId(1), 100, 50));
        assert!(inv.holds(r, SegmentId(1), 120, 10));
        assert!(!inv.holds(r, SegmentId(1), 140, 20));
        assert!(!inv.holds(r, SegmentId(2), 100, 50));
        assert!(!inv.holds(ReplicaId(2), SegmentId(1), 100, 50));
        // Overwritten by another replica's write: no longer held.
        inv.record(tag(2, 1, 90, 20, 0));
        assert!(!inv.holds(r, SegmentId(1), 100, 50));
        inv.record(tag(3, 1, 0, 10, 0));
        inv.free(&[ReplicaId(3)]);
        assert!(!inv.holds(ReplicaId(3), SegmentId(1), 0, 10));
    }

    #[test]
    fn free_forgets_and_ignores_unknown_ids() {
        let inv = Inventory::new();
        inv.record(tag(1, 1, 0, 10, 0));
        inv.record(tag(2, 1, 10, 10, 0));
        inv.free(&[ReplicaId(1), ReplicaId(99), ReplicaId(1)]);
        assert_eq!(ids(&inv), [2]);
        inv.free(&[ReplicaId(2)]);
        assert!(inv.is_empty());
        assert!(inv.lock().by_pos.is_empty());
        inv.record(tag(3, 1, 0, 0, 0));
        assert!(inv.is_empty(), "empty ranges are not objects");
    }

    #[test]
    fn report_keeps_matching_and_drops_mismatching_entries() {
        let seg = Segment::new(SegmentId(7), 1 << 16, false).unwrap();
        let a = b"alpha bytes";
        let b = b"bravo bytes";
        seg.range(0, a.len() as u64).unwrap().copy_from(a);
        seg.range(100, b.len() as u64).unwrap().copy_from(b);
        let inv = Inventory::new();
        inv.record(tag(
            1,
            7,
            0,
            a.len() as u64,
            kvpool_proto::crc32c::crc32c(a),
        ));
        inv.record(tag(
            2,
            7,
            100,
            b.len() as u64,
            kvpool_proto::crc32c::crc32c(b),
        ));
        // A tag for a segment this node does not serve, and one whose write never happened.
        inv.record(tag(3, 8, 0, 4, 0));
        inv.record(tag(4, 7, 200, 4, kvpool_proto::crc32c::crc32c(b"nope")));
        let report = inv.report(std::slice::from_ref(&seg));
        assert_eq!(
            report.iter().map(|e| e.replica.0).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(report[0].key, b"key-1");
        assert_eq!((report[1].offset, report[1].len), (100, b.len() as u64));
        assert_eq!(ids(&inv), [1, 2]);

        // Overwrite one byte of entry 2 without a tag (space reused): no longer reported.
        let byte = seg.range(101, 1).unwrap();
        byte.copy_from(&[byte.to_vec()[0] ^ 0xff]);
        let report = inv.report(std::slice::from_ref(&seg));
        assert_eq!(report.iter().map(|e| e.replica.0).collect::<Vec<_>>(), [1]);
        assert_eq!(ids(&inv), [1]);
    }
}
