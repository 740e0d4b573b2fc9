//! What the connector's calls share: per-block outcomes without Python objects, and the
//! batches of every layer group run together on `PoolConnector`'s primitives.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use kvpool_client::{ClientError, ErrorCode};
use kvpool_connector::{BlockKey, ConnectorError, PoolConnector};
use pyo3::{prelude::*, IntoPyObjectExt};

use crate::outcome;

/// A block's failure, without Python objects, so background tasks can hold it and a result
/// can be handed out more than once.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    code: ErrorCode,
    name: &'static str,
    message: String,
}

impl Failure {
    pub(crate) fn new(code: ErrorCode, message: String) -> Self {
        Failure {
            code,
            name: code.name(),
            message,
        }
    }

    pub(crate) fn to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        outcome::failure(py, self.code, self.name, &self.message)
    }
}

impl From<&ConnectorError> for Failure {
    fn from(e: &ConnectorError) -> Self {
        match e {
            // The same name `NativeClient` gives it (it has no wire code of its own).
            ConnectorError::Client(c @ ClientError::BufferTooSmall { .. }) => Failure {
                code: c.code(),
                name: outcome::BUFFER_TOO_SMALL,
                message: c.to_string(),
            },
            e => Failure::new(e.code(), e.to_string()),
        }
    }
}

/// A block's save: saved, or why not.
pub(crate) type Saved = Result<(), Failure>;
/// A block's load: `Ok(true)` loaded, `Ok(false)` a miss, or why it failed.
pub(crate) type Loaded = Result<bool, Failure>;

pub(crate) fn saved_to_py<'py>(py: Python<'py>, r: &Saved) -> PyResult<Bound<'py, PyAny>> {
    match r {
        Ok(()) => true.into_bound_py_any(py),
        Err(f) => f.to_py(py),
    }
}

pub(crate) fn loaded_to_py<'py>(py: Python<'py>, r: &Loaded) -> PyResult<Bound<'py, PyAny>> {
    match r {
        Ok(b) => b.into_bound_py_any(py),
        Err(f) => f.to_py(py),
    }
}

/// Folds one group's results into a load's per-block results: a block is loaded only if
/// every group was; the first failure wins over a miss.
fn combine(into: &mut [Loaded], group: &[Loaded]) {
    for (c, r) in into.iter_mut().zip(group) {
        match (&*c, r) {
            (Ok(true), Ok(false)) => *c = Ok(false),
            (Ok(_), Err(e)) => *c = Err(e.clone()),
            _ => {}
        }
    }
}

/// Runs `futs` with at most `window` in flight, started in order, and hands each output to
/// `done` with its index as soon as it is ready. Layer groups are independent batches, so a
/// group that lands early is published early.
async fn windowed<F: Future>(futs: Vec<F>, window: usize, mut done: impl FnMut(usize, F::Output)) {
    let mut next = futs.into_iter().enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::new();
    loop {
        while running.len() < window.max(1) {
            match next.next() {
                Some((i, f)) => running.push((i, Box::pin(f))),
                None => break,
            }
        }
        if running.is_empty() {
            return;
        }
        let (k, out) = std::future::poll_fn(|cx| {
            for (k, (_, f)) in running.iter_mut().enumerate() {
                if let Poll::Ready(out) = f.as_mut().poll(cx) {
                    return Poll::Ready((k, out));
                }
            }
            Poll::Pending
        })
        .await;
        // A finished future is never polled again.
        let (i, _) = running.swap_remove(k);
        done(i, out);
    }
}

/// The put batches of layer groups `groups` at once; `objects[i][n]` is block `keys[n]`'s
/// gather list for group `groups[i]`. A block is saved only if every one of those groups
/// was (its first failure otherwise).
pub(crate) async fn save_groups(
    conn: &PoolConnector,
    keys: &[BlockKey],
    groups: &[usize],
    objects: &[Vec<Vec<&[u8]>>],
) -> Vec<Saved> {
    let futs = groups
        .iter()
        .zip(objects)
        .map(|(&g, per_block)| async move {
            let items: Vec<(BlockKey, &[&[u8]])> = keys
                .iter()
                .cloned()
                .zip(per_block.iter().map(Vec::as_slice))
                .collect();
            conn.save_parts(g, &items).await
        })
        .collect();
    let mut out: Vec<Saved> = vec![Ok(()); keys.len()];
    windowed(futs, usize::MAX, |_, res| {
        for (o, r) in out.iter_mut().zip(res) {
            if let (Ok(()), Err(e)) = (&*o, r) {
                *o = Err(Failure::from(&e));
            }
        }
    })
    .await;
    out
}

/// Every layer group's get batch, at most `window` at once, scattering into
/// `dests[g][n]` (block `keys[n]`'s scatter list for group `g`); `on_group` sees each group's
/// results as it lands. Returns the per-block results over all groups.
pub(crate) async fn load_groups(
    conn: &PoolConnector,
    keys: &[BlockKey],
    dests: Vec<Vec<Vec<&mut [u8]>>>,
    window: usize,
    mut on_group: impl FnMut(usize, Vec<Loaded>),
) -> Vec<Loaded> {
    let futs = dests
        .into_iter()
        .enumerate()
        .map(|(g, mut per_block)| async move {
            let mut refs: Vec<&mut [&mut [u8]]> =
                per_block.iter_mut().map(Vec::as_mut_slice).collect();
            let res = conn.load_parts(g, keys, &mut refs).await;
            res.iter()
                .map(|r| r.as_ref().map(|b| *b).map_err(Failure::from))
                .collect::<Vec<Loaded>>()
        })
        .collect();
    let mut combined: Vec<Loaded> = vec![Ok(true); keys.len()];
    windowed(futs, window, |g, res| {
        combine(&mut combined, &res);
        on_group(g, res);
    })
    .await;
    combined
}
