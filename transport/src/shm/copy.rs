//! The copies of the shared-memory transport: between mapped segment memory and the caller's
//! buffers, checksummed as they go, and spread over a few threads when a request is large.
//!
//! One thread's `memcpy` does not fill the memory bus (on this project's 2-core machine one
//! thread copies 1 MiB in ~175 µs, two in ~140 µs with a thread started per copy), and a
//! same-host get or put is nothing but its copy and the checksum. So a request of at least
//! [`PARALLEL_MIN`] bytes is cut into stretches of at most [`STRETCH`] bytes, handed out in
//! contiguous groups to the caller's thread and to a small pool of copy threads
//! ([`COPY_THREADS_ENV`]); each stretch's crc32c is computed over its pieces, and each item's
//! crc is folded from its stretches' in order (`crc32c_combine`), so the result is the same
//! as one pass.

use std::sync::OnceLock;

use kvpool_proto::{
    crc32c::{crc32c_append, crc32c_combine},
    ErrorCode, ItemResult, WireError,
};

use crate::memory::SharedRange;

/// Bytes copied and then checksummed at a time: small enough that the piece is still in
/// L1/L2 when the checksum reads it, so the value crosses the memory bus once.
const COPY_PIECE: usize = 64 << 10;

/// The most bytes one thread takes at a time: the unit the work is balanced in.
const STRETCH: usize = 256 << 10;

/// Requests smaller than this are copied on the caller's thread alone: waking another
/// thread costs more than it saves.
pub const PARALLEL_MIN: usize = 512 << 10;

/// The environment variable that sets how many threads help copy (besides the caller's):
/// `0` copies on the caller's thread only. Default: one less than the CPUs, at most 3 (four
/// threads move more bytes than one DRAM channel pair takes on common servers).
pub const COPY_THREADS_ENV: &str = "KVPOOL_COPY_THREADS";

/// Which way a stretch's bytes go.
pub(super) enum Local<'a> {
    /// Out of shared memory into the caller's buffer (a get).
    Into(&'a mut [u8]),
    /// From the caller's buffer into shared memory (a put).
    From(&'a [u8]),
}

impl Local<'_> {
    fn len(&self) -> usize {
        match self {
            Local::Into(b) => b.len(),
            Local::From(b) => b.len(),
        }
    }
}

/// One contiguous run of an item's bytes: a shared range and the caller's slice of the same
/// length.
pub(super) struct Stretch<'a> {
    item: usize,
    shared: SharedRange,
    local: Local<'a>,
}

/// The stretches of a request's items, in item order and, within an item, in byte order.
#[derive(Default)]
pub(super) struct Plan<'a> {
    stretches: Vec<Stretch<'a>>,
    bytes: usize,
}

impl<'a> Plan<'a> {
    /// Adds item `item`: `shared` (the item's range) against the caller's `parts`, in order.
    /// The parts must not cover more than the range.
    pub fn add(
        &mut self,
        item: usize,
        shared: SharedRange,
        parts: impl IntoIterator<Item = Local<'a>>,
    ) -> Result<(), WireError> {
        let start = self.stretches.len();
        let mut at = 0;
        for part in parts {
            let mut rest = Some(part);
            while let Some(part) = rest.take() {
                let (head, tail) = split(part, STRETCH);
                rest = tail;
                let n = head.len();
                let Some(range) = shared.sub(at, n) else {
                    self.stretches.truncate(start);
                    return Err(WireError::new(
                        ErrorCode::InvalidArgument,
                        "buffers longer than the op",
                    ));
                };
                self.stretches.push(Stretch {
                    item,
                    shared: range,
                    local: head,
                });
                at += n;
            }
        }
        self.bytes += at;
        Ok(())
    }

    /// Runs the copies; per item (of `items`, those added), the crc32c of its bytes as the
    /// caller has them (0 unless `checksum`).
    pub fn run(self, items: usize, checksum: bool) -> Vec<u32> {
        let Plan {
            mut stretches,
            bytes,
        } = self;
        let mut crcs = vec![0u32; stretches.len()];
        let pool = if bytes >= PARALLEL_MIN { pool() } else { None };
        let helpers = pool.map_or(0, |p| p.current_num_threads());
        let groups = (helpers + 1).min(bytes / STRETCH).max(1);
        match pool {
            Some(pool) if groups > 1 => {
                let target = bytes.div_ceil(groups);
                pool.in_place_scope(|scope| {
                    let mut rest_s = &mut stretches[..];
                    let mut rest_c = &mut crcs[..];
                    let mut mine = None;
                    while !rest_s.is_empty() {
                        // A contiguous group of about `target` bytes.
                        let mut n = 0;
                        let mut sum = 0;
                        while n < rest_s.len() && (sum < target || n == 0) {
                            sum += rest_s[n].local.len();
                            n += 1;
                        }
                        let (s, s_rest) = std::mem::take(&mut rest_s).split_at_mut(n);
                        let (c, c_rest) = std::mem::take(&mut rest_c).split_at_mut(n);
                        rest_s = s_rest;
                        rest_c = c_rest;
                        // The caller's thread takes the first group itself.
                        if mine.is_none() {
                            mine = Some((s, c));
                        } else {
                            scope.spawn(move |_| copy_all(s, c, checksum));
                        }
                    }
                    if let Some((s, c)) = mine {
                        copy_all(s, c, checksum);
                    }
                });
            }
            _ => copy_all(&mut stretches, &mut crcs, checksum),
        }
        // An item's first stretch is its checksum so far; each later one is folded in (most
        // items are one stretch: no combine at all).
        let mut out = vec![0u32; items];
        let mut prev = None;
        for (s, crc) in stretches.iter().zip(crcs) {
            if let Some(o) = out.get_mut(s.item) {
                *o = if prev == Some(s.item) {
                    crc32c_combine(*o, crc, s.local.len())
                } else {
                    crc
                };
            }
            prev = Some(s.item);
        }
        out
    }
}

/// Splits `part` after `n` bytes (the tail is `None` when nothing is left).
fn split(part: Local<'_>, n: usize) -> (Local<'_>, Option<Local<'_>>) {
    if part.len() <= n {
        return (part, None);
    }
    match part {
        Local::Into(b) => {
            let (h, t) = b.split_at_mut(n);
            (Local::Into(h), Some(Local::Into(t)))
        }
        Local::From(b) => {
            let (h, t) = b.split_at(n);
            (Local::From(h), Some(Local::From(t)))
        }
    }
}

/// Copies each stretch piece by piece, each piece checksummed right after its copy from the
/// caller's side (never from the shared copy, which another process may write).
fn copy_all(stretches: &mut [Stretch<'_>], crcs: &mut [u32], checksum: bool) {
    for (s, out) in stretches.iter_mut().zip(crcs) {
        let mut crc = 0;
        let mut at = 0;
        match &mut s.local {
            Local::Into(dst) => {
                for piece in dst.chunks_mut(COPY_PIECE) {
                    if let Some(src) = s.shared.sub(at, piece.len()) {
                        src.copy_to(piece);
                    }
                    if checksum {
                        crc = crc32c_append(crc, piece);
                    }
                    at += piece.len();
                }
            }
            Local::From(src) => {
                for piece in src.chunks(COPY_PIECE) {
                    if let Some(dst) = s.shared.sub(at, piece.len()) {
                        dst.copy_from(piece);
                    }
                    if checksum {
                        crc = crc32c_append(crc, piece);
                    }
                    at += piece.len();
                }
            }
        }
        *out = crc;
    }
}

/// The copy threads: `None` when there are none (one CPU, or [`COPY_THREADS_ENV`] is 0), the
/// pool could not start, or this process is a fork of the one that started it (a child has
/// none of its parent's threads: waiting on them would never end). Then every copy runs on
/// the caller's thread.
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<(u32, rayon::ThreadPool)>> = OnceLock::new();
    let (pid, pool) = POOL
        .get_or_init(|| {
            let threads = copy_threads(
                std::env::var(COPY_THREADS_ENV).ok().as_deref(),
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            );
            if threads == 0 {
                return None;
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("kvpool-copy-{i}"))
                .build()
                .inspect_err(|e| tracing::warn!("no copy threads ({e}): copies run on one thread"))
                .ok()
                .map(|p| (std::process::id(), p))
        })
        .as_ref()?;
    (*pid == std::process::id()).then_some(pool)
}

/// How many threads help copy: `env` when it is a number, else one less than `cpus`, at
/// most 3.
fn copy_threads(env: Option<&str>, cpus: usize) -> usize {
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => v.parse().unwrap_or_else(|_| {
            tracing::warn!("{COPY_THREADS_ENV}={v:?} is not a number; using the default");
            cpus.saturating_sub(1).min(3)
        }),
        None => cpus.saturating_sub(1).min(3),
    }
}

/// One item's result from a plan: its crc, or why it was refused.
pub(super) fn results(refused: Vec<Option<WireError>>, crcs: Vec<u32>) -> Vec<ItemResult<u32>> {
    refused
        .into_iter()
        .zip(crcs)
        .map(|(e, crc)| match e {
            Some(e) => Err(e),
            None => Ok(crc),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::ptr::NonNull;

    use kvpool_proto::crc32c::crc32c;

    use super::*;

    /// A range over an owned buffer (no reference to it is used while the range is).
    fn range_over(buf: &mut Vec<u8>) -> SharedRange {
        // SAFETY: the buffer outlives every use of the range in these tests, and the tests
        // touch it only through the range until they read it back after the copies.
        unsafe { SharedRange::new(NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len()) }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn large_and_small_items_round_trip_with_the_one_pass_checksum() {
        // Sizes around the piece, stretch and parallel thresholds, several items per plan,
        // scattered parts of uneven lengths.
        let sizes = [1, 4096, COPY_PIECE + 3, STRETCH, PARALLEL_MIN + 1, 3 << 20];
        let mut segment = vec![0u8; sizes.iter().sum::<usize>()];
        let shared = range_over(&mut segment);
        let values: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u8))
            .collect();
        let mut put = Plan::default();
        let mut at = 0;
        for (i, v) in values.iter().enumerate() {
            let (a, b) = v.split_at(v.len() / 3);
            let parts = [Local::From(a), Local::From(b)];
            put.add(i, shared.sub(at, v.len()).unwrap(), parts).unwrap();
            at += v.len();
        }
        let put_crcs = put.run(values.len(), true);
        let want: Vec<u32> = values.iter().map(|v| crc32c(v)).collect();
        assert_eq!(put_crcs, want);

        let mut got: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let mut get = Plan::default();
        let mut at = 0;
        for (i, g) in got.iter_mut().enumerate() {
            let n = g.len();
            let cut = (n / 2).max(1).min(n);
            let (a, b) = g.split_at_mut(cut);
            let parts = [Local::Into(a), Local::Into(b)];
            get.add(i, shared.sub(at, n).unwrap(), parts).unwrap();
            at += n;
        }
        assert_eq!(get.run(sizes.len(), true), want);
        assert_eq!(got, values);
        let mut unchecked = Plan::default();
        let mut one = vec![0u8; 4096];
        unchecked
            .add(0, shared.sub(1, 4096).unwrap(), [Local::Into(&mut one[..])])
            .unwrap();
        assert_eq!(unchecked.run(1, false), vec![0]);
        assert_eq!(one, values[1]);
    }

    #[test]
    fn parts_longer_than_the_range_are_refused_and_leave_the_plan_as_it_was() {
        let mut segment = vec![0u8; 100];
        let shared = range_over(&mut segment);
        let long = [1u8; 101];
        let mut plan = Plan::default();
        let e = plan
            .add(0, shared, [Local::From(&long[..])])
            .expect_err("longer than the range");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(plan.stretches.is_empty() && plan.bytes == 0);
    }

    #[test]
    fn copy_threads_follow_the_environment_else_the_cpus() {
        assert_eq!(copy_threads(None, 1), 0);
        assert_eq!(copy_threads(None, 2), 1);
        assert_eq!(copy_threads(None, 64), 3);
        assert_eq!(copy_threads(Some("0"), 64), 0);
        assert_eq!(copy_threads(Some(" 6 "), 2), 6);
        assert_eq!(copy_threads(Some("many"), 2), 1);
        assert_eq!(copy_threads(Some(""), 8), 3);
    }
}
