//! The get path: look up replicas (taking a read lease) at the master, or find them in this
//! client's location cache; read one replica per object into the caller's buffers, fall back
//! to the next replica on failure, and accept the bytes only if the lease outlived the
//! transfer and the crc32c matches. A read from a cached location that fails in any way
//! (the node says the range no longer holds the replica, a checksum mismatch, a dead node)
//! drops the entry and is done again through the master.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;
use kvpool_proto::NodeId;
use kvpool_proto::{
    header::FLAG_NO_PROMOTION, ErrorCode, GetReplicas, ObjectInfo, ReadOp, ReplicaDesc, ReplicaId,
    Tier,
};
use kvpool_transport::engine::{Peer, ReadItem};

use crate::locations::Located;
use crate::{clone_err, Client, ClientError, Result};

/// Per key: where it is, `Ok(None)` for a miss.
type Lookup = Vec<Result<Option<Located>>>;

impl Client {
    /// Gets many values; `Ok(None)` is a miss. One result per key, in order.
    pub async fn get_batch(&self, keys: &[&[u8]]) -> Vec<Result<Option<Vec<u8>>>> {
        let (mut out, stale) = self.get_batch_once(keys, true).await;
        if !stale.is_empty() {
            let again: Vec<&[u8]> = stale.iter().map(|&i| keys[i]).collect();
            let (got, _) = self.get_batch_once(&again, false).await;
            for (i, r) in stale.into_iter().zip(got) {
                out[i] = r;
            }
        }
        out
    }

    /// One pass of [`Client::get_batch`]; also the items read from a cached location that
    /// failed (their entries dropped), to be done again through the master.
    async fn get_batch_once(
        &self,
        keys: &[&[u8]],
        use_cache: bool,
    ) -> (Vec<Result<Option<Vec<u8>>>>, Vec<usize>) {
        let infos = self.lookup(keys, use_cache).await;
        let mut values: Vec<Vec<u8>> = infos
            .iter()
            .map(|i| match i {
                Ok(Some(l)) => vec![0u8; usize::try_from(l.info.len).unwrap_or(0)],
                _ => Vec::new(),
            })
            .collect();
        let fetched = {
            let mut dests: Vec<Vec<&mut [u8]>> = Vec::with_capacity(keys.len());
            let mut refs: Vec<&Located> = Vec::with_capacity(keys.len());
            for (i, v) in values.iter_mut().enumerate() {
                if let Ok(Some(l)) = &infos[i] {
                    dests.push(vec![v.as_mut_slice()]);
                    refs.push(l);
                }
            }
            self.fetch(&refs, dests).await
        };
        let mut stale = Vec::new();
        let mut fetched = fetched.into_iter();
        let mut values = values.into_iter();
        let out = infos
            .into_iter()
            .enumerate()
            .map(|(i, info)| {
                let v = values.next().unwrap_or_default();
                match info {
                    Ok(Some(l)) => match fetched.next() {
                        Some(Ok(())) => Ok(Some(v)),
                        Some(Err(e)) => self.read_failed(keys[i], &l, e).unwrap_or_else(|| {
                            stale.push(i);
                            Ok(None)
                        }),
                        None => Err(crate::internal("fetch lost a result")),
                    },
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .collect();
        (out, stale)
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
        let (mut out, stale) = self.get_into_parts_once(keys, dests, true).await;
        if !stale.is_empty() {
            let again: Vec<&[u8]> = stale.iter().map(|&i| keys[i]).collect();
            let mut again_dests: Vec<&mut [&mut [u8]]> = dests
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| stale.binary_search(i).is_ok())
                .map(|(_, d)| &mut **d)
                .collect();
            let (got, _) = self
                .get_into_parts_once(&again, &mut again_dests, false)
                .await;
            for (i, r) in stale.into_iter().zip(got) {
                out[i] = r;
            }
        }
        out
    }

    /// One pass of [`Client::get_batch_into_parts`]; also the items read from a cached
    /// location that failed (their entries dropped), in order.
    async fn get_into_parts_once(
        &self,
        keys: &[&[u8]],
        dests: &mut [&mut [&mut [u8]]],
        use_cache: bool,
    ) -> (Vec<Result<Option<u64>>>, Vec<usize>) {
        let infos = self.lookup(keys, use_cache).await;
        let mut out: Vec<Result<Option<u64>>> = Vec::with_capacity(keys.len());
        let mut todo_dests = Vec::new();
        let mut todo_infos = Vec::new();
        let mut todo_idx = Vec::new();
        for (i, (info, parts)) in infos.iter().zip(dests.iter_mut()).enumerate() {
            match info {
                Ok(Some(l)) => {
                    let len = l.info.len;
                    let have: u64 = parts.iter().map(|p| p.len() as u64).sum();
                    if have < len {
                        out.push(Err(ClientError::BufferTooSmall { need: len, have }));
                        continue;
                    }
                    // Cover exactly `len` bytes with the leading parts.
                    let mut left = len;
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
                    todo_infos.push(l);
                    todo_idx.push(i);
                    out.push(Ok(Some(len)));
                }
                Ok(None) => out.push(Ok(None)),
                Err(e) => out.push(Err(clone_err(e))),
            }
        }
        let fetched = self.fetch(&todo_infos, todo_dests).await;
        let mut stale = Vec::new();
        for ((i, r), l) in todo_idx.into_iter().zip(fetched).zip(&todo_infos) {
            if let Err(e) = r {
                match self.read_failed(keys[i], l, e) {
                    Some(r) => out[i] = r,
                    None => stale.push(i),
                }
            }
        }
        (out, stale)
    }

    /// What a failed read of `key` makes of its item: `None` when it was read from a cached
    /// location (the entry is dropped; the caller does it again through the master), else a
    /// miss when the object is gone, or the error.
    fn read_failed<T>(&self, key: &[u8], l: &Located, e: ClientError) -> Option<Result<Option<T>>> {
        if l.cached {
            self.locations.forget(&self.wire_key(key));
            return None;
        }
        Some(if e.is_gone() { Ok(None) } else { Err(e) })
    }

    /// Where each key's replicas live (node, segment, tier, offset), taking a read lease on
    /// the present ones; `Ok(None)` for a miss. For placement-aware callers (a connector that
    /// routes a request to the node holding its prefix) and for operators. Always asks the
    /// master (never the location cache): placement may have changed.
    pub async fn locate(&self, keys: &[&[u8]]) -> Vec<Result<Option<ObjectInfo>>> {
        self.lookup(keys, false)
            .await
            .into_iter()
            .map(|r| r.map(|o| o.map(|l| Arc::unwrap_or_clone(l.info))))
            .collect()
    }

    /// Where each key lives: from the location cache when `use_cache` and it has the key,
    /// else from the master (and then kept in the cache). A missing key is `Ok(None)`.
    async fn lookup(&self, keys: &[&[u8]], use_cache: bool) -> Lookup {
        if let Err(e) = self.check_tenant() {
            return keys.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let mut out: Lookup = Vec::with_capacity(keys.len());
        let now = Instant::now();
        let index = match use_cache {
            true => self.index.current(&self.master, now).await,
            false => None,
        };
        let mut touched = Vec::new();
        // The keys to ask the master about: their items, and their wire keys (moved into the
        // requests, not copied).
        let mut ask: Vec<usize> = Vec::new();
        let mut ask_keys: Vec<Vec<u8>> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let wire = self.wire_key(k);
            let cached = use_cache
                .then(|| self.locations.get(&wire))
                .flatten()
                .filter(|l| !self.cache_saves_nothing(&l.info))
                .or_else(|| self.located_by_index(index.as_ref()?, &wire, now));
            match cached {
                Some(l) => {
                    // Served by the master's index: reported to the master afterwards.
                    if l.ticket.is_some() {
                        touched.push(wire);
                    }
                    out.push(Ok(Some(l)));
                }
                None => {
                    out.push(Ok(None));
                    ask.push(i);
                    ask_keys.push(wire);
                }
            }
        }
        self.index.touch(&self.master, touched);
        let mut ask_keys = ask_keys.into_iter();
        for chunk in ask.chunks(self.cfg.max_batch.max(1)) {
            // The lease is counted from before the request left: conservative, like Mooncake.
            let sent = Instant::now();
            let msg = GetReplicas {
                keys: ask_keys.by_ref().take(chunk.len()).collect(),
            };
            match self.master_call_flagged(&msg).await {
                Ok((r, flags)) if r.items.len() == chunk.len() => {
                    let stays = flags & FLAG_NO_PROMOTION != 0;
                    for ((i, wire), item) in chunk.iter().zip(&msg.keys).zip(r.items) {
                        out[*i] = match item {
                            Ok(info) => {
                                self.index.learn(&info.replicas);
                                let info = Arc::new(info);
                                // Also on a second pass: the next get of the key is hot again.
                                // (The transport check only where there is a cache to fill:
                                // it is a map lookup per replica on every get.)
                                if self.locations.enabled() && !self.cache_saves_nothing(&info) {
                                    self.locations.insert(wire, &info, sent, |r| {
                                        self.checkable(r, stays, wire.len())
                                    });
                                }
                                Ok(Some(Located {
                                    info,
                                    sent,
                                    cached: false,
                                    ticket: None,
                                }))
                            }
                            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
                            Err(e) => Err(ClientError::Remote(e)),
                        };
                    }
                }
                Ok(_) => {
                    for i in chunk {
                        out[*i] = Err(crate::internal("wrong result count"));
                    }
                }
                Err(e) => {
                    for i in chunk {
                        out[*i] = Err(clone_err(&e));
                    }
                }
            }
        }
        out
    }

    /// Reads each object into its destination parts (which cover exactly its length), trying
    /// its replicas in order of preference until one gives back the right bytes.
    /// Items from the location cache are read with the node's replica check.
    async fn fetch(&self, found: &[&Located], mut dests: Vec<Vec<&mut [u8]>>) -> Vec<Result<()>> {
        let n = found.len();
        let infos: Vec<&ObjectInfo> = found.iter().map(|l| &*l.info).collect();
        let mut done: Vec<Option<Result<()>>> = (0..n).map(|_| None).collect();
        let mut last_err: Vec<Option<ClientError>> = (0..n).map(|_| None).collect();
        let rounds = infos.iter().map(|i| i.replicas.len()).max().unwrap_or(0);
        // Per item, this round's outcome: its crc32c over all its parts in order, or why not.
        let mut outcome: Vec<Option<std::result::Result<u32, ClientError>>> =
            (0..n).map(|_| None).collect();

        for round in 0..rounds {
            // Per address, and whether checked: the item of each read, the reads, the
            // replicas they read. A batch's keys sit on a few nodes, so a short list searched
            // in place beats hashing an address per key.
            type Batch<'b> = (
                Vec<usize>,
                Vec<ReadItem<'b>>,
                Option<NodeId>,
                Vec<ReplicaId>,
            );
            let mut by_addr: Vec<((&str, bool), Batch<'_>)> = Vec::new();
            for (i, parts) in dests.iter_mut().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                let Some(ri) = self.replica_at(infos[i], round) else {
                    continue;
                };
                let r = &infos[i].replicas[ri];
                let checked = found[i].cached;
                let at = (&*r.addr, checked);
                let slot = match by_addr.iter().position(|(a, _)| *a == at) {
                    Some(slot) => slot,
                    None => {
                        by_addr.push((at, Batch::default()));
                        by_addr.len() - 1
                    }
                };
                let batch = &mut by_addr[slot].1;
                batch.2 = Some(r.node);
                // Checked reads need them; the others let a same-host node's NVMe records be
                // read off its file and checked against them.
                batch.3.push(r.id);
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
                |((addr, checked), (owners, reads, node, expect))| async move {
                    let peer = Peer { addr, node };
                    let res = if checked {
                        self.engine.read_checked(peer, reads, &expect).await
                    } else {
                        self.engine.read_replicas(peer, reads, &expect).await
                    };
                    if res.is_err() {
                        self.engine.forget(addr);
                    }
                    (owners, res)
                },
            ))
            .await;
            // Each waiting item had one read this round, in one batch.
            for (owners, res) in results {
                match res {
                    Ok(items) => {
                        for (i, r) in owners.into_iter().zip(items) {
                            outcome[i] = Some(r.map_err(ClientError::Remote));
                        }
                    }
                    Err(e) => {
                        for i in owners {
                            outcome[i] = Some(Err(ClientError::Remote(
                                kvpool_proto::WireError::new(e.code(), e.to_string()),
                            )));
                        }
                    }
                }
            }
            for (i, o) in outcome.iter_mut().enumerate() {
                let crc = match o.take() {
                    None => continue,
                    Some(Err(e)) => {
                        last_err[i] = Some(e);
                        continue;
                    }
                    Some(Ok(crc)) => crc,
                };
                if self.cfg.verify_checksum && crc != infos[i].checksum {
                    // A torn read (space reused after eviction) or corruption: another
                    // replica may still be good.
                    last_err[i] = Some(ClientError::ChecksumMismatch {
                        want: infos[i].checksum,
                        got: crc,
                    });
                    continue;
                }
                done[i] = Some(Ok(()));
            }
        }

        let finished = Instant::now();
        done.into_iter()
            .zip(last_err)
            .zip(found)
            .map(|((d, last), l)| match d {
                // After the copy: the index entry stood throughout it, and the master still
                // vouches for its index.
                Some(Ok(())) if l.ticket.as_ref().is_some_and(|t| !t.still()) => {
                    Err(ClientError::Remote(kvpool_proto::WireError::new(
                        ErrorCode::StaleLocation,
                        "the location index changed during the read",
                    )))
                }
                Some(Ok(()))
                    if l.ticket.is_none()
                        && finished > l.sent + Duration::from_millis(l.info.lease_ms) =>
                {
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

    /// `wire_key`'s location from the master's index, when it has one this client can read
    /// with a check: a DRAM replica, or an NVMe one whose record this client reads off the
    /// node's file (the master publishes NVMe replicas only with promotion off).
    fn located_by_index(
        &self,
        index: &Arc<kvpool_transport::shm::IndexReader>,
        wire_key: &[u8],
        now: Instant,
    ) -> Option<Located> {
        let (info, ticket) = self.index.find(index, wire_key)?;
        if !info
            .replicas
            .iter()
            .all(|r| self.checkable(r, true, wire_key.len()))
        {
            return None;
        }
        Some(Located {
            info,
            sent: now,
            cached: true,
            ticket: Some(ticket),
        })
    }

    /// Whether a replica of `info` is on a node this client copies from through shared
    /// memory but cannot check there: a node without a replica board (an older node). A read
    /// from a cached location there is checked by asking the node, a round trip like the
    /// lookup it saves, so such gets go through the master. Nodes with a board are checked
    /// with two memory loads: a cached get of them makes no round trip at all.
    fn cache_saves_nothing(&self, info: &ObjectInfo) -> bool {
        info.replicas
            .iter()
            .any(|r| self.engine.shm_board(&r.addr) == Some(false))
    }

    /// Whether a read from a cached location of replica `r` can be checked: on DRAM, by the
    /// node's inventory tag (its board, or the node itself); on NVMe, only where this client
    /// reads the node's file and the record (of a `key_len`-byte wire key) names its replica,
    /// and only when the master moves nothing on reads (`stays`: with promotion on, a cached
    /// NVMe location would keep a hot object's reads on the disk after the master copied it
    /// back to DRAM).
    fn checkable(&self, r: &ReplicaDesc, stays: bool, key_len: usize) -> bool {
        match r.tier {
            Tier::Dram => true,
            Tier::Nvme => stays && self.engine.reads_file(&r.addr, r.segment, key_len),
        }
    }

    /// The replica to try in `round` (0 first): replicas on this client's own node first,
    /// then the master's order. Computed in place, per item and round, rather than as an
    /// order kept per item (a batch's keys mostly have one replica, and one round).
    fn replica_at(&self, info: &ObjectInfo, round: usize) -> Option<usize> {
        let reps = &info.replicas;
        let Some(local) = self.cfg.local_node else {
            return (round < reps.len()).then_some(round);
        };
        let here = (0..reps.len()).filter(|&i| reps[i].node == local);
        let there = (0..reps.len()).filter(|&i| reps[i].node != local);
        here.chain(there).nth(round)
    }
}
