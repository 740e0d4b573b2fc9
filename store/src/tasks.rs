//! Copy tasks the master hands a node in heartbeat responses: demotion (a DRAM range written
//! as an NVMe record) and promotion (an NVMe value copied into a DRAM range) run between the
//! node's own segments, with no network transfer; a drain's move (`from_addr` set) pulls a
//! value from another node's data server into this node's DRAM or NVMe.

use std::sync::{Arc, Mutex};

use kvpool_proto::{CopyTask, ErrorCode, ItemResult, ObjectTag, ReadOp, TaskDone, Tier, WireError};
use kvpool_transport::engine::{ReadItem, TransferEngine};
use tokio::{sync::Notify, task::JoinSet};

use crate::node::Node;

/// Copies running at once; more wait their turn (a demotion burst must not starve reads).
/// Enough that the NVMe tier's group commit syncs many small records per fdatasync: at 8,
/// write-through of 16 KiB blocks was sync-bound and DRAM filled with objects waiting for
/// their copy (docs/benchmarks.md, replay).
const MAX_RUNNING: usize = 64;

/// Runs tasks in the background and collects their outcomes for the next heartbeat. Dropping
/// it aborts the tasks still running (the master that sent them is gone).
pub struct Runner {
    node: Arc<Node>,
    /// Reads other nodes' values for drain moves.
    engine: Arc<TransferEngine>,
    running: Mutex<JoinSet<()>>,
    limit: Arc<tokio::sync::Semaphore>,
    done: Arc<Mutex<Vec<TaskDone>>>,
    finished: Arc<Notify>,
}

impl Runner {
    pub fn new(node: Arc<Node>, engine: Arc<TransferEngine>) -> Runner {
        Runner {
            node,
            engine,
            running: Mutex::new(JoinSet::new()),
            limit: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
            done: Arc::new(Mutex::new(Vec::new())),
            finished: Arc::new(Notify::new()),
        }
    }

    pub fn spawn(&self, task: CopyTask) {
        let (node, engine, limit, done, finished) = (
            self.node.clone(),
            self.engine.clone(),
            self.limit.clone(),
            self.done.clone(),
            self.finished.clone(),
        );
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // Reap what already ended so the set does not grow with every task ever run.
        while running.try_join_next().is_some() {}
        running.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let result = match &task.from_addr {
                Some(addr) => pull(&node, &engine, addr, &task).await,
                None => run(&node, &task).await,
            };
            node.metrics().task(tier_of(&node, task.to), result.is_ok());
            if let Err(e) = &result {
                tracing::warn!(task = task.id, key = %String::from_utf8_lossy(&task.key), "copy task failed: {e}");
            }
            done.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(TaskDone { id: task.id, result });
            finished.notify_one();
        });
    }

    /// Completes when a task has finished since the last call.
    pub async fn finished(&self) {
        self.finished.notified().await;
    }

    /// The outcomes not yet reported.
    pub fn take_done(&self) -> Vec<TaskDone> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Outcomes whose report did not reach the master, to send again.
    pub fn put_back(&self, mut outcomes: Vec<TaskDone>) {
        if outcomes.is_empty() {
            return;
        }
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.append(&mut done);
        *done = outcomes;
    }
}

fn refused(msg: String) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

async fn run(node: &Node, t: &CopyTask) -> ItemResult<()> {
    match (tier_of(node, t.from), tier_of(node, t.to)) {
        (Some(Tier::Dram), Some(Tier::Nvme)) => demote(node, t).await,
        (Some(Tier::Nvme), Some(Tier::Dram)) => promote(node, t).await,
        (from, to) => Err(refused(format!(
            "copy from {} ({from:?}) to {} ({to:?}) is not a demotion or a promotion",
            t.from, t.to
        ))),
    }
}

fn tier_of(node: &Node, s: kvpool_proto::SegmentId) -> Option<Tier> {
    if node.segment(s).is_ok() {
        Some(Tier::Dram)
    } else {
        node.nvme(s).map(|_| Tier::Nvme)
    }
}

async fn demote(node: &Node, t: &CopyTask) -> ItemResult<()> {
    let seg = node.segment(t.from)?;
    let nvme = node
        .nvme(t.to)
        .ok_or_else(|| refused(format!("no NVMe segment {}", t.to)))?;
    // The master keeps the source range allocated (its replica is Leaving) until this task is
    // reported done, so nothing writes it meanwhile; the checksum in `write` rejects the copy
    // if it was not the object's bytes. Copied out: segment memory is never borrowed.
    let value = seg.range(t.from_offset, t.len)?.to_vec();
    nvme.write(t.to_offset, t.replica, &t.key, &value, t.checksum)
        .await
}

async fn promote(node: &Node, t: &CopyTask) -> ItemResult<()> {
    let nvme = node
        .nvme(t.from)
        .ok_or_else(|| refused(format!("no NVMe segment {}", t.from)))?;
    let value = nvme.read(t.from_offset, t.len).await?;
    fill_dram(node, t, &value.slices().collect::<Vec<_>>())
}

/// A drain's move: reads the value from the node at `addr` (another node's segment
/// `t.from`), checks it against the object's checksum, and stores it in this node's DRAM
/// segment or as an NVMe record, as the master chose.
async fn pull(node: &Node, engine: &TransferEngine, addr: &str, t: &CopyTask) -> ItemResult<()> {
    let len = usize::try_from(t.len).map_err(|_| refused(format!("length {}", t.len)))?;
    let mut value = vec![0u8; len];
    let op = ReadOp {
        segment: t.from,
        offset: t.from_offset,
        len: t.len,
    };
    let read = engine
        .read(addr, vec![ReadItem::new(op, &mut value)])
        .await
        .map_err(|e| WireError::new(e.code(), format!("reading from {addr}: {e}")))?;
    read.into_iter()
        .next()
        .unwrap_or_else(|| Err(WireError::new(ErrorCode::Internal, "no read result")))?;
    match tier_of(node, t.to) {
        Some(Tier::Dram) => fill_dram(node, t, &[&value]),
        Some(Tier::Nvme) => {
            let nvme = node
                .nvme(t.to)
                .ok_or_else(|| refused(format!("no NVMe segment {}", t.to)))?;
            // The record's write checks the value against the checksum.
            nvme.write(t.to_offset, t.replica, &t.key, &value, t.checksum)
                .await
        }
        None => Err(refused(format!("segment {} is not on this node", t.to))),
    }
}

/// Writes a copied value (its parts, in order) into the task's DRAM target and records its
/// tag, after checking it against the object's length and checksum (a copy never lands wrong
/// bytes).
fn fill_dram(node: &Node, t: &CopyTask, parts: &[&[u8]]) -> ItemResult<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let crc = kvpool_proto::crc32c::crc32c_parts(parts.iter());
    if len as u64 != t.len || crc != t.checksum {
        return Err(WireError::new(
            ErrorCode::ChecksumMismatch,
            "copied value does not match its checksum",
        ));
    }
    let range = node.segment(t.to)?.range(t.to_offset, t.len)?;
    // The master allocated the target range to this task's replica alone (Filling, invisible
    // to readers) and frees it only after the task is reported done.
    let mut at = 0;
    for p in parts {
        if let Some(r) = range.sub(at, p.len()) {
            r.copy_from(p);
        }
        at += p.len();
    }
    node.record_tag(ObjectTag {
        replica: t.replica,
        key: t.key.clone(),
        segment: t.to,
        offset: t.to_offset,
        len: t.len,
        checksum: t.checksum,
    });
    Ok(())
}
