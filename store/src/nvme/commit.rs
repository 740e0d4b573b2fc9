//! The group-commit pipeline: a sync thread fdatasyncs the device once for every write whose
//! bytes landed, then an index thread writes their entries and syncs RocksDB's WAL once,
//! while the sync thread already syncs the next group.

use std::{
    io,
    sync::{mpsc, Arc},
    thread::JoinHandle,
};

use tokio::sync::oneshot;

use super::{tier::Shared, NvmeError, NvmeRecordInfo, NvmeTier};

pub(super) struct Commit {
    info: NvmeRecordInfo,
    reply: oneshot::Sender<Result<(), NvmeError>>,
}

/// An io::Error with the same errno (or kind) and message, for reporting one failure to
/// every writer of a commit group.
fn dup_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Starts the sync stage and the index stage; returns the channel writes are committed
/// through and the two threads.
pub(super) fn start(
    shared: &Arc<Shared>,
) -> Result<(mpsc::Sender<Commit>, Vec<JoinHandle<()>>), NvmeError> {
    let (commit_tx, rx) = mpsc::channel();
    let (indexed_tx, indexed_rx) = mpsc::channel();
    let spawn_err = |e| NvmeError::Io {
        op: "start the commit threads",
        offset: 0,
        len: 0,
        source: e,
    };
    let s = shared.clone();
    let index_stage = std::thread::Builder::new()
        .name("kvpool-nvme-index".into())
        .spawn(move || s.index_stage(indexed_rx))
        .map_err(spawn_err)?;
    let s = shared.clone();
    let sync_stage = std::thread::Builder::new()
        .name("kvpool-nvme-sync".into())
        .spawn(move || s.sync_stage(rx, indexed_tx))
        .map_err(spawn_err)?;
    Ok((commit_tx, vec![sync_stage, index_stage]))
}

impl NvmeTier {
    /// Hands a record whose bytes are written to the commit pipeline, and waits until it is
    /// durable and indexed.
    pub(super) async fn commit(&self, info: NvmeRecordInfo) -> Result<(), NvmeError> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .commit_tx
            .as_ref()
            .is_some_and(|tx| tx.send(Commit { info, reply }).is_ok());
        if !sent {
            return Err(NvmeError::Unhealthy("the commit thread stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(NvmeError::Unhealthy("the commit thread stopped".into())))
    }
}

impl Shared {
    /// First commit stage: takes every write whose bytes are on the device, makes them
    /// durable with one fdatasync, and passes them to the index stage. While the index stage
    /// syncs one group's entries, this stage already syncs the next group's data.
    fn sync_stage(&self, rx: mpsc::Receiver<Commit>, next: mpsc::Sender<Vec<Commit>>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            group.extend(rx.try_iter());
            if let Some(group) = self.sync_group(group) {
                if let Err(mpsc::SendError(group)) = next.send(group) {
                    for c in group {
                        let _ = c
                            .reply
                            .send(Err(NvmeError::Unhealthy("the index stage stopped".into())));
                    }
                }
            }
        }
    }

    /// Second commit stage: indexes synced writes (all groups waiting, at once) and makes
    /// the index durable with one WAL sync.
    fn index_stage(&self, rx: mpsc::Receiver<Vec<Commit>>) {
        while let Ok(mut group) = rx.recv() {
            for more in rx.try_iter() {
                group.extend(more);
            }
            self.index_group(group);
        }
    }

    /// Syncs the device for `group`; on failure answers every writer and returns None.
    fn sync_group(&self, group: Vec<Commit>) -> Option<Vec<Commit>> {
        if let Err(e) = self.engine.sync() {
            let msg = format!("fdatasync of the tier failed: {e}");
            self.mark_unhealthy(&msg);
            for c in group {
                let _ = c.reply.send(Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                    NvmeError::NoSpace(msg.clone())
                } else {
                    NvmeError::Io {
                        op: "sync",
                        offset: c.info.offset,
                        len: c.info.record_len(),
                        source: dup_io(&e),
                    }
                }));
            }
            return None;
        }
        Some(group)
    }

    fn index_group(&self, group: Vec<Commit>) {
        // Plan under the lock: a later record of the group wins over an earlier one it
        // overlaps, and both over indexed records they overlap.
        let mut st = self.lock();
        let mut puts: Vec<&NvmeRecordInfo> = Vec::with_capacity(group.len());
        let mut deletes: Vec<u64> = Vec::new();
        for c in &group {
            if st.pending.get(&c.info.replica) == Some(&true) {
                continue; // removed while being written
            }
            let (o, l) = (c.info.offset, c.info.record_len());
            puts.retain(|p| p.offset + p.record_len() <= o || o + l <= p.offset);
            deletes.extend(
                st.overlapping(o, l)
                    .into_iter()
                    .filter(|&id| id != c.info.replica),
            );
            puts.push(&c.info);
        }
        let written = self.index.write(&puts, &deletes, &[], false);
        if written.is_ok() {
            for id in &deletes {
                st.remove(*id);
                tracing::debug!(replica = id, "nvme record overwritten by a new record");
            }
            for p in &puts {
                st.insert((*p).clone());
            }
        }
        drop(st);
        // The WAL sync outside the lock, so reads and touches do not wait on it.
        let r = written
            .map_err(|e| match e {
                NvmeError::Index(m) => m,
                e => e.to_string(),
            })
            .and_then(|()| {
                self.index.sync_wal().map_err(|e| match e {
                    NvmeError::Index(m) => m,
                    e => e.to_string(),
                })
            });
        if let Err(msg) = &r {
            self.mark_unhealthy(&format!("nvme index: {msg}"));
        }
        for c in group {
            let _ = c.reply.send(r.clone().map_err(NvmeError::Index));
        }
    }
}
