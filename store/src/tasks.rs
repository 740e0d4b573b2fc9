//! Copy tasks the master hands a node in heartbeat responses: demotion (a DRAM range written
//! as an NVMe record) and promotion (an NVMe value copied into a DRAM range). Both run on the
//! node, between its own segments, with no network transfer.

use std::sync::{Arc, Mutex};

use kvpool_proto::{CopyTask, ErrorCode, ItemResult, ObjectTag, TaskDone, Tier, WireError};
use tokio::{sync::Notify, task::JoinSet};

use crate::node::Node;

/// Copies running at once; more wait their turn (a demotion burst must not starve reads).
const MAX_RUNNING: usize = 8;

/// Runs tasks in the background and collects their outcomes for the next heartbeat. Dropping
/// it aborts the tasks still running (the master that sent them is gone).
pub struct Runner {
    node: Arc<Node>,
    running: Mutex<JoinSet<()>>,
    limit: Arc<tokio::sync::Semaphore>,
    done: Arc<Mutex<Vec<TaskDone>>>,
    finished: Arc<Notify>,
}

impl Runner {
    pub fn new(node: Arc<Node>) -> Runner {
        Runner {
            node,
            running: Mutex::new(JoinSet::new()),
            limit: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
            done: Arc::new(Mutex::new(Vec::new())),
            finished: Arc::new(Notify::new()),
        }
    }

    pub fn spawn(&self, task: CopyTask) {
        let (node, limit, done, finished) = (
            self.node.clone(),
            self.limit.clone(),
            self.done.clone(),
            self.finished.clone(),
        );
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // Reap what already ended so the set does not grow with every task ever run.
        while running.try_join_next().is_some() {}
        running.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let result = run(&node, &task).await;
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
    // SAFETY: the master keeps the source range allocated (its replica is Leaving) until this
    // task is reported done, so nothing writes it meanwhile; the checksum in `write` rejects
    // the copy if it was not the object's bytes.
    let value = unsafe { seg.slice(t.from_offset, t.len) }?;
    nvme.write(t.to_offset, t.replica, &t.key, value, t.checksum)
        .await
}

async fn promote(node: &Node, t: &CopyTask) -> ItemResult<()> {
    let nvme = node
        .nvme(t.from)
        .ok_or_else(|| refused(format!("no NVMe segment {}", t.from)))?;
    let seg = node.segment(t.to)?;
    let value = nvme.read(t.from_offset, t.len).await?;
    if crc32c::crc32c(&value) != t.checksum {
        return Err(WireError::new(
            ErrorCode::ChecksumMismatch,
            "NVMe value does not match its checksum",
        ));
    }
    // SAFETY: the master allocated the target range to this task's replica alone (Filling,
    // invisible to readers) and frees it only after the task is reported done.
    let dst = unsafe { seg.slice_mut(t.to_offset, t.len) }?;
    dst.copy_from_slice(&value);
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
