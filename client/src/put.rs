//! The put path: allocate (PutStart), write every replica's bytes straight to its node,
//! then commit (PutEnd, with the checksum the transfer computed while it copied the bytes) or
//! give the space back (PutRevoke).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use kvpool_proto::{
    ErrorCode, ItemResult, ObjectTag, PutEnd, PutOptions, PutRevoke, PutStart, PutStartItem,
    PutStartResponse, ReplicaDesc, WireError, WriteOp,
};
use kvpool_transport::engine::{Confirmation, Peer, WriteItem};

use crate::{clone_err, Client, ClientError, Result};

impl Client {
    /// Puts many values, each gathered from its parts; one result per item.
    ///
    /// A value is committed only if every replica the master allocated was written; otherwise
    /// the put is revoked and the item fails (a retry may then succeed elsewhere).
    pub async fn put_batch_parts(
        &self,
        items: &[(&[u8], &[&[u8]])],
        opts: &PutOptions,
    ) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.cfg.max_batch.max(1)) {
            out.extend(self.put_chunk(chunk, opts).await);
        }
        out
    }

    /// Phase one for a batch. Items the master answers `NoSpaceYet` (its DRAM is held by
    /// copies to NVMe in flight) are asked again, alone, with backoff until the deadline:
    /// the writer waits for the disk instead of failing a put the pool will soon have room
    /// for. One result per item, in order.
    async fn start_puts(&self, start: &PutStart) -> Result<PutStartResponse> {
        let began = Instant::now();
        let mut backoff = Duration::from_millis(5);
        let mut resp = self.master_call(start).await?;
        if resp.items.len() != start.items.len() {
            return Ok(resp); // the caller reports the mismatch
        }
        let out = &mut resp.items;
        loop {
            let waiting: Vec<usize> = (0..out.len())
                .filter(|&i| matches!(&out[i], Err(e) if e.code == ErrorCode::NoSpaceYet))
                .collect();
            if waiting.is_empty() || began.elapsed() + backoff >= self.cfg.deadline {
                return Ok(resp);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
            let again = PutStart {
                client: start.client,
                items: waiting.iter().map(|&i| start.items[i].clone()).collect(),
            };
            let got = self.master_call(&again).await?.items;
            if got.len() != waiting.len() {
                return Ok(resp);
            }
            for (i, r) in waiting.into_iter().zip(got) {
                out[i] = r;
            }
        }
    }

    async fn put_chunk(&self, items: &[(&[u8], &[&[u8]])], opts: &PutOptions) -> Vec<Result<()>> {
        if let Err(e) = self.check_tenant() {
            return items.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let mut opts = opts.clone();
        if let Some(local) = self.cfg.local_node {
            if !opts.preferred_nodes.contains(&local) {
                opts.preferred_nodes.insert(0, local);
            }
        }
        let start = PutStart {
            client: self.id,
            items: items
                .iter()
                .map(|(key, parts)| PutStartItem {
                    key: self.wire_key(key),
                    len: parts.iter().map(|p| p.len() as u64).sum(),
                    options: opts.clone(),
                })
                .collect(),
        };
        // A key this client writes is not read from an older location again by this client.
        for item in &start.items {
            self.locations.forget(&item.key);
        }
        let allocated = match self.start_puts(&start).await {
            Ok(r) if r.items.len() == items.len() => r.items,
            Ok(r) => {
                let e = crate::internal(&format!(
                    "{} results for {} puts",
                    r.items.len(),
                    items.len()
                ));
                return items.iter().map(|_| Err(clone_err(&e))).collect();
            }
            Err(e) => return items.iter().map(|_| Err(clone_err(&e))).collect(),
        };

        let mut results: Vec<Result<()>> = allocated
            .iter()
            .map(|a| {
                a.as_ref()
                    .map(|_| ())
                    .map_err(|e| ClientError::Remote(e.clone()))
            })
            .collect();
        let (written, confirmations) = self.write_replicas(items, &start.items, &allocated).await;
        let mut checksums = vec![0; items.len()];
        for ((r, w), crc) in results.iter_mut().zip(written).zip(&mut checksums) {
            if r.is_ok() {
                match w {
                    Ok(c) => *crc = c,
                    Err(e) => *r = Err(ClientError::Remote(e)),
                }
            }
        }

        let (mut commit, mut revoke) = (Vec::new(), Vec::new());
        for (i, r) in results.iter().enumerate() {
            if allocated[i].is_ok() {
                if r.is_ok() {
                    commit.push(i);
                } else {
                    revoke.push(i);
                }
            }
        }
        if !revoke.is_empty() {
            let msg = PutRevoke {
                client: self.id,
                keys: revoke.iter().map(|&i| start.items[i].key.clone()).collect(),
            };
            if let Err(e) = self.master_call(&msg).await {
                // The master frees the space itself when the put times out.
                tracing::warn!("revoking {} failed puts: {e}", revoke.len());
            }
        }
        // The commit and the nodes' confirmations of shared-memory copies travel at once: the
        // caller waits for two round trips (PutStart, then both), not three. A confirmation
        // that fails after the commit fails the item although the master made it readable:
        // its bytes were copied before the commit, so a reader gets them or a miss (the
        // master drops the replicas of a node that stopped answering), never other bytes.
        let end = async {
            if commit.is_empty() {
                return None;
            }
            let msg = PutEnd {
                client: self.id,
                keys: commit.iter().map(|&i| start.items[i].key.clone()).collect(),
                checksums: commit.iter().map(|&i| checksums[i]).collect(),
            };
            Some(self.master_call(&msg).await)
        };
        let confirm = join_all(confirmations.into_iter().map(|c| async move {
            let res = c.confirmation.await;
            if res.is_err() {
                self.engine.forget(c.addr);
            }
            (c.owners, res)
        }));
        let (ended, confirmed) = tokio::join!(end, confirm);
        match ended {
            Some(Ok(r)) => {
                for (&i, item) in commit.iter().zip(r.items) {
                    if let Err(e) = item {
                        results[i] = Err(ClientError::Remote(e));
                    }
                }
            }
            Some(Err(e)) => {
                for &i in &commit {
                    results[i] = Err(clone_err(&e));
                }
            }
            None => {}
        }
        for (owners, res) in confirmed {
            if let Err(e) = res {
                let w = node_failure(&e);
                for i in owners {
                    if results[i].is_ok() {
                        results[i] = Err(ClientError::Remote(w.clone()));
                    }
                }
            }
        }
        results
    }

    /// Writes every allocated replica, grouped into one batch per node, all nodes at once.
    /// Returns, per item, the crc32c of its bytes as written, or the first write error of any
    /// of its replicas (replicas whose checksums differ, because the caller changed the
    /// buffer while it was written, fail the item: no replica may hold other bytes than
    /// another); and the nodes' confirmations still to await.
    async fn write_replicas<'a>(
        &self,
        items: &[(&[u8], &[&[u8]])],
        starts: &[PutStartItem],
        allocated: &'a [ItemResult<Vec<ReplicaDesc>>],
    ) -> (Vec<ItemResult<u32>>, Vec<Pending<'a>>) {
        struct NodeBatch<'a> {
            node: kvpool_proto::NodeId,
            owners: Vec<usize>,
            writes: Vec<WriteItem<'a>>,
            tags: Vec<ObjectTag>,
        }
        let mut by_node: HashMap<&str, NodeBatch<'_>> = HashMap::new();
        for (i, alloc) in allocated.iter().enumerate() {
            let Ok(replicas) = alloc else { continue };
            self.index.learn(replicas);
            for r in replicas {
                let b = by_node.entry(&*r.addr).or_insert_with(|| NodeBatch {
                    node: r.node,
                    owners: Vec::new(),
                    writes: Vec::new(),
                    tags: Vec::new(),
                });
                // The replica's range is contiguous however scattered the parts are: one
                // write, gathered from all of them.
                b.owners.push(i);
                b.writes.push(WriteItem {
                    op: WriteOp {
                        segment: r.segment,
                        offset: r.offset,
                        len: starts[i].len,
                    },
                    data: items[i].1.to_vec(),
                });
                b.tags.push(ObjectTag {
                    replica: r.id,
                    key: starts[i].key.clone(),
                    segment: r.segment,
                    offset: r.offset,
                    len: starts[i].len,
                    // Set by the transfer, from the bytes it writes.
                    checksum: 0,
                });
            }
        }
        let mut out: Vec<ItemResult<Option<u32>>> = vec![Ok(None); items.len()];
        let batches: Vec<_> = by_node.into_iter().collect();
        let results = join_all(batches.into_iter().map(|(addr, b)| async move {
            let owners = b.owners;
            let peer = Peer {
                addr,
                node: Some(b.node),
            };
            let res = self.engine.write_then_confirm(peer, b.writes, b.tags).await;
            if res.is_err() {
                self.engine.forget(addr);
            }
            (addr, owners, res)
        }))
        .await;
        let mut pending = Vec::new();
        for (addr, owners, res) in results {
            match res {
                Ok((rs, confirmation)) => {
                    pending.push(Pending {
                        addr,
                        owners: owners.clone(),
                        confirmation,
                    });
                    for (i, r) in owners.into_iter().zip(rs) {
                        out[i] = match (&out[i], r) {
                            (Err(_), _) => continue,
                            (Ok(_), Err(e)) => Err(e),
                            (Ok(None), Ok(crc)) => Ok(Some(crc)),
                            (Ok(Some(seen)), Ok(crc)) if *seen == crc => continue,
                            (Ok(Some(seen)), Ok(crc)) => Err(WireError::new(
                                ErrorCode::InvalidArgument,
                                format!(
                                    "the value changed while it was written: replicas read \
                                     {seen:#010x} and {crc:#010x}"
                                ),
                            )),
                        };
                    }
                }
                Err(e) => {
                    let w = node_failure(&e);
                    for i in owners {
                        if out[i].is_ok() {
                            out[i] = Err(w.clone());
                        }
                    }
                }
            }
        }
        // An item with no replica was not allocated; its result is never read.
        let out = out
            .into_iter()
            .map(|r| r.map(Option::unwrap_or_default))
            .collect();
        (out, pending)
    }
}

/// A node's confirmation of a batch of writes, still to come, and the items it covers.
struct Pending<'a> {
    addr: &'a str,
    owners: Vec<usize>,
    confirmation: Confirmation,
}

/// A storage node's failure as an item's error.
fn node_failure(e: &kvpool_transport::TransportError) -> WireError {
    WireError::new(e.code(), format!("writing to the storage node: {e}"))
}
