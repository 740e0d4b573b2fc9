//! The get path: look up replicas (taking a read lease), read one replica per object into
//! the caller's buffers, fall back to the next replica on failure, and accept the bytes only
//! if the lease outlived the transfer and the crc32c matches.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures::future::join_all;
use kvpool_proto::NodeId;
use kvpool_proto::{ErrorCode, GetReplicas, ObjectInfo, ReadOp};
use kvpool_transport::engine::{Peer, ReadItem};

use crate::{clone_err, Client, ClientError, Result};

impl Client {
    /// Gets many values; `Ok(None)` is a miss. One result per key, in order.
    pub async fn get_batch(&self, keys: &[&[u8]]) -> Vec<Result<Option<Vec<u8>>>> {
        let (infos, sent) = self.lookup(keys).await;
        let mut values: Vec<Vec<u8>> = infos
            .iter()
            .map(|i| match i {
                Ok(Some(info)) => vec![0u8; usize::try_from(info.len).unwrap_or(0)],
                _ => Vec::new(),
            })
            .collect();
        let found: Vec<usize> = (0..keys.len())
            .filter(|&i| matches!(infos[i], Ok(Some(_))))
            .collect();
        let fetched = {
            let mut dests: Vec<Vec<&mut [u8]>> = Vec::with_capacity(found.len());
            let mut refs: Vec<&ObjectInfo> = Vec::with_capacity(found.len());
            for (i, v) in values.iter_mut().enumerate() {
                if let Ok(Some(info)) = &infos[i] {
                    dests.push(vec![v.as_mut_slice()]);
                    refs.push(info);
                }
            }
            self.fetch(&refs, dests, sent).await
        };
        let mut fetched = fetched.into_iter();
        let mut values = values.into_iter();
        infos
            .into_iter()
            .map(|info| {
                let v = values.next().unwrap_or_default();
                match info {
                    Ok(Some(_)) => match fetched.next() {
                        Some(Ok(())) => Ok(Some(v)),
                        Some(Err(e)) if e.is_gone() => Ok(None),
                        Some(Err(e)) => Err(e),
                        None => Err(crate::internal("fetch lost a result")),
                    },
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .collect()
    }

    /// Gets many values, each scattered over its parts (filled in order); returns each
    /// value's length, or `None` on a miss.
    pub async fn get_batch_into_parts(
        &self,
        keys: &[&[u8]],
        dests: &mut [&mut [&mut [u8]]],
    ) -> Vec<Result<Option<u64>>> {
        if dests.len() != keys.len() {
            let e = ClientError::Remote(kvpool_proto::WireError::new(
                ErrorCode::InvalidArgument,
                format!("{} destinations for {} keys", dests.len(), keys.len()),
            ));
            return keys.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let (infos, sent) = self.lookup(keys).await;
        let mut out: Vec<Result<Option<u64>>> = Vec::with_capacity(keys.len());
        let mut todo_dests = Vec::new();
        let mut todo_infos = Vec::new();
        let mut todo_idx = Vec::new();
        for (i, (info, parts)) in infos.iter().zip(dests.iter_mut()).enumerate() {
            match info {
                Ok(Some(info)) => {
                    let have: u64 = parts.iter().map(|p| p.len() as u64).sum();
                    if have < info.len {
                        out.push(Err(ClientError::BufferTooSmall {
                            need: info.len,
                            have,
                        }));
                        continue;
                    }
                    // Cover exactly `len` bytes with the leading parts.
                    let mut left = info.len;
                    let mut cover = Vec::new();
                    for p in parts.iter_mut() {
                        if left == 0 {
                            break;
                        }
                        let take = (p.len() as u64).min(left) as usize;
                        cover.push(&mut p[..take]);
                        left -= take as u64;
                    }
                    todo_dests.push(cover);
                    todo_infos.push(info);
                    todo_idx.push(i);
                    out.push(Ok(Some(info.len)));
                }
                Ok(None) => out.push(Ok(None)),
                Err(e) => out.push(Err(clone_err(e))),
            }
        }
        let fetched = self.fetch(&todo_infos, todo_dests, sent).await;
        for (i, r) in todo_idx.into_iter().zip(fetched) {
            match r {
                Ok(()) => {}
                Err(e) if e.is_gone() => out[i] = Ok(None),
                Err(e) => out[i] = Err(e),
            }
        }
        out
    }

    /// Where each key's replicas live (node, segment, tier, offset), taking a read lease on
    /// the present ones; `Ok(None)` for a miss. For placement-aware callers (a connector that
    /// routes a request to the node holding its prefix) and for operators.
    pub async fn locate(&self, keys: &[&[u8]]) -> Vec<Result<Option<ObjectInfo>>> {
        self.lookup(keys).await.0
    }

    /// Asks the master where each key lives. A missing key is `Ok(None)`.
    async fn lookup(&self, keys: &[&[u8]]) -> (Vec<Result<Option<ObjectInfo>>>, Instant) {
        // The lease is counted from before the request left: conservative, like Mooncake.
        let sent = Instant::now();
        if let Err(e) = self.check_tenant() {
            return (keys.iter().map(|_| Err(clone_err(&e))).collect(), sent);
        }
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.cfg.max_batch.max(1)) {
            let msg = GetReplicas {
                keys: chunk.iter().map(|k| self.wire_key(k)).collect(),
            };
            match self.master_call(&msg).await {
                Ok(r) if r.items.len() == chunk.len() => {
                    out.extend(r.items.into_iter().map(|item| match item {
                        Ok(info) => Ok(Some(info)),
                        Err(e) if e.code == ErrorCode::NotFound => Ok(None),
                        Err(e) => Err(ClientError::Remote(e)),
                    }))
                }
                Ok(_) => out.extend(
                    chunk
                        .iter()
                        .map(|_| Err(crate::internal("wrong result count"))),
                ),
                Err(e) => out.extend(chunk.iter().map(|_| Err(clone_err(&e)))),
            }
        }
        (out, sent)
    }

    /// Reads each object into its destination parts (which cover exactly its length), trying
    /// its replicas in order of preference until one gives back the right bytes.
    async fn fetch(
        &self,
        infos: &[&ObjectInfo],
        mut dests: Vec<Vec<&mut [u8]>>,
        sent: Instant,
    ) -> Vec<Result<()>> {
        let n = infos.len();
        let orders: Vec<Vec<usize>> = infos.iter().map(|info| self.replica_order(info)).collect();
        let mut done: Vec<Option<Result<()>>> = (0..n).map(|_| None).collect();
        let mut last_err: Vec<Option<ClientError>> = (0..n).map(|_| None).collect();
        let rounds = orders.iter().map(Vec::len).max().unwrap_or(0);

        for round in 0..rounds {
            // Per address: the item of each read, and the reads.
            type Batch<'b> = (Vec<usize>, Vec<ReadItem<'b>>, Option<NodeId>);
            let mut by_addr: HashMap<&str, Batch<'_>> = HashMap::new();
            for (i, parts) in dests.iter_mut().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                let Some(&ri) = orders[i].get(round) else {
                    continue;
                };
                let r = &infos[i].replicas[ri];
                let batch = by_addr.entry(r.addr.as_str()).or_default();
                batch.2 = Some(r.node);
                // The replica's range is contiguous however scattered the parts are: one
                // read, scattered over all of them.
                batch.0.push(i);
                batch.1.push(ReadItem {
                    op: ReadOp {
                        segment: r.segment,
                        offset: r.offset,
                        len: infos[i].len,
                    },
                    dst: parts.iter_mut().map(|p| &mut **p).collect(),
                });
            }
            if by_addr.is_empty() {
                break;
            }
            let results = join_all(by_addr.into_iter().map(
                |(addr, (owners, reads, node))| async move {
                    let res = self.engine.read(Peer { addr, node }, reads).await;
                    if res.is_err() {
                        self.engine.forget(addr);
                    }
                    (owners, res)
                },
            ))
            .await;
            let mut round_err: HashMap<usize, ClientError> = HashMap::new();
            // Each item's crc32c, over all its parts in order.
            let mut crcs: HashMap<usize, u32> = HashMap::new();
            let mut tried: Vec<usize> = Vec::new();
            for (owners, res) in results {
                match res {
                    Ok(items) => {
                        for (i, r) in owners.into_iter().zip(items) {
                            tried.push(i);
                            match r {
                                Ok(crc) => {
                                    crcs.insert(i, crc);
                                }
                                Err(e) => {
                                    round_err.entry(i).or_insert(ClientError::Remote(e));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        for i in owners {
                            tried.push(i);
                            round_err.entry(i).or_insert_with(|| {
                                ClientError::Remote(kvpool_proto::WireError::new(
                                    e.code(),
                                    e.to_string(),
                                ))
                            });
                        }
                    }
                }
            }
            tried.sort_unstable();
            tried.dedup();
            for i in tried {
                if let Some(e) = round_err.remove(&i) {
                    last_err[i] = Some(e);
                    continue;
                }
                if self.cfg.verify_checksum {
                    let got = crcs.get(&i).copied().unwrap_or(0);
                    if got != infos[i].checksum {
                        // A torn read (space reused after eviction) or corruption: another
                        // replica may still be good.
                        last_err[i] = Some(ClientError::ChecksumMismatch {
                            want: infos[i].checksum,
                            got,
                        });
                        continue;
                    }
                }
                done[i] = Some(Ok(()));
            }
        }

        let finished = Instant::now();
        done.into_iter()
            .zip(last_err)
            .zip(infos)
            .map(|((d, last), info)| match d {
                Some(Ok(())) if finished > sent + Duration::from_millis(info.lease_ms) => {
                    Err(ClientError::LeaseExpired)
                }
                Some(r) => r,
                None => Err(ClientError::NoReadableReplica {
                    last: Box::new(
                        last.unwrap_or_else(|| crate::internal("object has no replica")),
                    ),
                }),
            })
            .collect()
    }

    /// Replicas on this client's own node first, then the master's order.
    fn replica_order(&self, info: &ObjectInfo) -> Vec<usize> {
        let mut order: Vec<usize> = (0..info.replicas.len()).collect();
        if let Some(local) = self.cfg.local_node {
            order.sort_by_key(|&i| info.replicas[i].node != local);
        }
        order
    }
}
