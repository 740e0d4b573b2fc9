//! One benchmark case: `clients` concurrent tasks put, then get, objects of one size in
//! requests of `batch` objects, bounded by an object count and a time limit.

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rand::RngCore;

use crate::backend::Conn;

/// Every this many objects one get is compared byte for byte with what was put (after its
/// buffer was zeroed, so a get that wrote nothing cannot pass on stale bytes).
const VERIFY_EVERY: u64 = 16;
/// Distinct values per case: value `i` starts `(i % WINDOWS) * WINDOW_STEP` bytes into one
/// random buffer, so a get answered with a neighbour's bytes fails the check.
const WINDOWS: u64 = 64;
const WINDOW_STEP: usize = 64;
/// Fewest requests each task makes, so even the largest values give some latency samples.
const MIN_REQUESTS_PER_TASK: u64 = 4;

/// How much one phase (all puts, or all gets, of a case) may do, whichever runs out first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub bytes: u64,
    pub time: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub size: usize,
    pub clients: usize,
    pub batch: usize,
}

/// What one phase achieved. Latency is per request, i.e. per batch of `batch` objects.
#[derive(Debug, Clone)]
pub struct Measured {
    pub objects: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl Measured {
    pub fn objects_per_s(&self) -> f64 {
        self.objects as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn gbps(&self) -> f64 {
        crate::limits::gbps(self.bytes, self.elapsed)
    }
}

/// The put and get figures of one case on one system.
pub struct CaseResult {
    pub put: Measured,
    pub get: Measured,
}

/// The values of one case: windows of one random buffer, so no time goes into making them.
pub struct Values {
    data: Vec<u8>,
    size: usize,
}

impl Values {
    pub fn new(size: usize) -> Self {
        let mut data = vec![0u8; size + WINDOWS as usize * WINDOW_STEP];
        rand::thread_rng().fill_bytes(&mut data);
        Values { data, size }
    }

    pub fn get(&self, i: u64) -> &[u8] {
        let off = (i % WINDOWS) as usize * WINDOW_STEP;
        &self.data[off..off + self.size]
    }
}

/// The work of one phase, shared by its tasks: they claim batches of object indices from
/// one counter until the count or the time runs out.
struct Plan {
    prefix: String,
    values: Arc<Values>,
    batch: usize,
    /// Objects this phase may touch.
    total: u64,
    /// Distinct keys: index `i` means key `i % keyspace` (gets cycle over what was put).
    keyspace: u64,
    /// If set, index `i` means key `slots[i % slots.len()]` instead (gets of a chosen subset).
    slots: Option<Arc<Vec<u64>>>,
    deadline: Instant,
    next: AtomicU64,
}

impl Plan {
    /// The next batch of indices, or `None` once the budget is spent. A claimed batch is
    /// always finished, so the objects done are exactly the batches claimed.
    fn claim(&self) -> Option<Range<u64>> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let start = self.next.fetch_add(self.batch as u64, Ordering::Relaxed);
        (start < self.total).then(|| start..(start + self.batch as u64).min(self.total))
    }

    fn slot(&self, i: u64) -> u64 {
        match &self.slots {
            Some(s) => s[(i % s.len() as u64) as usize],
            None => i % self.keyspace,
        }
    }

    fn key(&self, i: u64) -> Vec<u8> {
        key(&self.prefix, self.slot(i))
    }

    fn value(&self, i: u64) -> &[u8] {
        self.values.get(self.slot(i))
    }
}

/// The key of object `slot` of a case whose keys start with `prefix`.
pub fn key(prefix: &str, slot: u64) -> Vec<u8> {
    format!("{prefix}/{slot:010}").into_bytes()
}

/// Latency samples and object count of one task.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    objects: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.objects += other.objects;
    }

    fn measured(mut self, size: usize, elapsed: Duration) -> Measured {
        self.latencies.sort_unstable();
        Measured {
            objects: self.objects,
            bytes: self.objects * size as u64,
            elapsed,
            p50: percentile(&self.latencies, 0.50),
            p99: percentile(&self.latencies, 0.99),
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Puts then gets one case with the first `case.clients` connections of `conns`, then
/// empties the store. `id` makes this case's keys unique. With `hot_keys`, gets cycle over
/// only the first that many keys put (a hot set, read again and again), else over all.
/// Returns the connections for reuse.
pub async fn run_case(
    conns: Vec<Conn>,
    case: Case,
    budget: Budget,
    id: usize,
    hot_keys: Option<u64>,
) -> Result<(Vec<Conn>, CaseResult)> {
    let values = Arc::new(Values::new(case.size));
    let total = object_budget(case, budget);
    let prefix = format!("bench/{id}/{}", case.size);

    let put_plan = plan(&prefix, &values, case, total, total, None, budget);
    let (conns, put) = run_phase(conns, put_plan, Op::Put, case.size).await?;
    if put.objects == 0 {
        bail!("no object was put within {:?}", budget.time);
    }
    let keyspace = hot_keys.map_or(put.objects, |h| h.clamp(1, put.objects));
    let get_plan = plan(&prefix, &values, case, total, keyspace, None, budget);
    let (mut conns, get) = run_phase(conns, get_plan, Op::Get, case.size).await?;
    conns[0].clear().await?;
    Ok((conns, CaseResult { put, get }))
}

/// Gets only, of objects already stored under `prefix` with `values` (see [`key`]): the
/// objects `slots`, cycled over until the budget runs out. Stores nothing and removes nothing.
pub async fn run_gets(
    conns: Vec<Conn>,
    case: Case,
    budget: Budget,
    prefix: &str,
    values: &Arc<Values>,
    slots: Arc<Vec<u64>>,
) -> Result<(Vec<Conn>, Measured)> {
    if slots.is_empty() {
        bail!("no objects to get");
    }
    let total = object_budget(case, budget);
    let n = slots.len() as u64;
    let get_plan = plan(prefix, values, case, total, n, Some(slots), budget);
    run_phase(conns, get_plan, Op::Get, case.size).await
}

/// Objects per phase: the byte budget's worth, but at least a few requests per task.
fn object_budget(case: Case, budget: Budget) -> u64 {
    let min = (case.clients * case.batch) as u64 * MIN_REQUESTS_PER_TASK;
    (budget.bytes / case.size as u64).max(min)
}

fn plan(
    prefix: &str,
    values: &Arc<Values>,
    case: Case,
    total: u64,
    keyspace: u64,
    slots: Option<Arc<Vec<u64>>>,
    budget: Budget,
) -> Arc<Plan> {
    Arc::new(Plan {
        prefix: prefix.to_string(),
        values: values.clone(),
        batch: case.batch,
        total,
        keyspace,
        slots,
        deadline: Instant::now() + budget.time,
        next: AtomicU64::new(0),
    })
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Put,
    Get,
}

/// Runs one task per connection and times the phase from the first spawn to the last finish.
async fn run_phase(
    conns: Vec<Conn>,
    plan: Arc<Plan>,
    op: Op,
    size: usize,
) -> Result<(Vec<Conn>, Measured)> {
    // Get buffers are made and written before the clock starts, so neither allocation nor
    // first-touch page faults are measured (for 16 MiB values that is milliseconds).
    let mut buffers = conns
        .iter()
        .map(|_| match op {
            Op::Put => Vec::new(),
            Op::Get => (0..plan.batch).map(|_| vec![1u8; size]).collect(),
        })
        .collect::<Vec<Vec<Vec<u8>>>>()
        .into_iter();
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|conn| match op {
            Op::Put => tokio::spawn(put_task(conn, plan.clone())),
            Op::Get => tokio::spawn(get_task(
                conn,
                plan.clone(),
                buffers.next().unwrap_or_default(),
            )),
        })
        .collect();
    let mut conns = Vec::with_capacity(tasks.len());
    let mut tally = Tally::default();
    for t in tasks {
        let (conn, task_tally) = t.await.context("a benchmark task panicked")??;
        conns.push(conn);
        tally.merge(task_tally);
    }
    Ok((conns, tally.measured(size, start.elapsed())))
}

async fn put_task(mut conn: Conn, plan: Arc<Plan>) -> Result<(Conn, Tally)> {
    let mut tally = Tally::default();
    while let Some(range) = plan.claim() {
        let keys: Vec<Vec<u8>> = range.clone().map(|i| plan.key(i)).collect();
        let items: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(range)
            .map(|(k, i)| (k.as_slice(), plan.value(i)))
            .collect();
        let t = Instant::now();
        conn.put(&items).await?;
        tally.latencies.push(t.elapsed());
        tally.objects += items.len() as u64;
    }
    Ok((conn, tally))
}

/// `dsts`: one buffer per object of a batch, each as long as a value.
async fn get_task(
    mut conn: Conn,
    plan: Arc<Plan>,
    mut dsts: Vec<Vec<u8>>,
) -> Result<(Conn, Tally)> {
    let mut tally = Tally::default();
    while let Some(range) = plan.claim() {
        let n = (range.end - range.start) as usize;
        let keys: Vec<Vec<u8>> = range.clone().map(|i| plan.key(i)).collect();
        let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let sampled: Vec<(usize, u64)> = range
            .enumerate()
            .filter(|(_, i)| i % VERIFY_EVERY == 0)
            .collect();
        for &(slot, _) in &sampled {
            dsts[slot].fill(0);
        }
        let t = Instant::now();
        conn.get(&key_refs, &mut dsts[..n]).await?;
        tally.latencies.push(t.elapsed());
        tally.objects += n as u64;
        for &(slot, i) in &sampled {
            verify(&dsts[slot], plan.value(i), &keys[slot])?;
        }
    }
    Ok((conn, tally))
}

/// A wrong byte means the store (or this benchmark) is broken: no figure counts after that.
fn verify(got: &[u8], want: &[u8], key: &[u8]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    bail!(
        "get {} returned wrong bytes: first difference at byte {at} of {} (got {} bytes)",
        String::from_utf8_lossy(key),
        want.len(),
        got.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let ms = |n| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.50), ms(50));
        assert_eq!(percentile(&sorted, 0.99), ms(99));
        assert_eq!(percentile(&[ms(7)], 0.99), ms(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn claims_cover_the_budget_once() {
        let values = Arc::new(Values::new(16));
        let case = Case {
            size: 16,
            clients: 1,
            batch: 3,
        };
        let budget = Budget {
            bytes: 16 * 10,
            time: Duration::from_secs(60),
        };
        let p = plan("t", &values, case, 10, 10, None, budget);
        let claimed: Vec<Range<u64>> = std::iter::from_fn(|| p.claim()).collect();
        assert_eq!(claimed, vec![0..3, 3..6, 6..9, 9..10]);
    }

    #[test]
    fn chosen_slots_are_cycled_over() {
        let values = Arc::new(Values::new(16));
        let case = Case {
            size: 16,
            clients: 1,
            batch: 2,
        };
        let budget = Budget {
            bytes: 16 * 5,
            time: Duration::from_secs(60),
        };
        let p = plan(
            "t",
            &values,
            case,
            5,
            3,
            Some(Arc::new(vec![4, 7, 9])),
            budget,
        );
        let keys: Vec<Vec<u8>> = (0..5).map(|i| p.key(i)).collect();
        let want: Vec<Vec<u8>> = [4, 7, 9, 4, 7].iter().map(|&s| key("t", s)).collect();
        assert_eq!(keys, want);
        assert_eq!(p.value(3), values.get(4));
    }

    #[test]
    fn a_wrong_byte_is_an_error() {
        assert!(verify(b"abcd", b"abcd", b"k").is_ok());
        let e = verify(b"abXd", b"abcd", b"k").unwrap_err().to_string();
        assert!(e.contains("byte 2"), "{e}");
    }

    #[test]
    fn neighbouring_values_differ() {
        let v = Values::new(4096);
        assert_ne!(v.get(0), v.get(1));
        assert_eq!(v.get(0), v.get(WINDOWS));
    }
}
