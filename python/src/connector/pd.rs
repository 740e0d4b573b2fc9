//! The P/D hand-off (`kvpool_connector::pd`) over a `Connector`'s pool client: `PdProducer`
//! (the bootstrap server and the holds of a prefill worker) and `PdConsumer` (claim / done /
//! abort at a producer's bootstrap port). The blocks themselves move through the connector's
//! own save and load, so they may be in host or GPU memory given by address; these classes
//! only hold them (renewing their read leases) and exchange the three hand-off messages.
//!
//! Settings come from the environment as the Rust engine's do (`PdConfig::from_env`:
//! `KVPOOL_BOOTSTRAP_PORT` / `VLLM_MOONCAKE_BOOTSTRAP_PORT`, `KVPOOL_ABORT_REQUEST_TIMEOUT` /
//! `VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT`, `KVPOOL_CONSUMER_TIMEOUT`, `KVPOOL_BOOTSTRAP_HOST` /
//! `VLLM_HOST_IP`, `KVPOOL_TOKEN`); keyword arguments override them.

use std::collections::HashMap;
use std::time::Duration;

use kvpool_connector::pd::{Consumer, HandoffParams, Outcome, PdConfig, PdError, Producer, Role};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::{prelude::*, IntoPyObjectExt};

use super::batch::Failure;
use super::keys::BlockKey;
use super::Connector;
use crate::runtime;

fn secs(name: &str, v: f64) -> PyResult<Duration> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(PyValueError::new_err(format!(
            "{name} = {v}: must be a non-negative number of seconds"
        )))
    }
}

fn config_err(e: PdError) -> PyErr {
    match e {
        PdError::Bind { .. } => PyOSError::new_err(e.to_string()),
        e => PyValueError::new_err(e.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
fn config(
    role: &str,
    dp_rank: u32,
    tp_size: u32,
    tp_rank: u32,
    host: Option<String>,
    base_port: Option<u16>,
    abort_timeout: Option<f64>,
    consumer_timeout: Option<f64>,
    hold_renew: Option<f64>,
) -> PyResult<PdConfig> {
    let role: Role = role.parse().map_err(config_err)?;
    let mut cfg = PdConfig::from_env(role, dp_rank, tp_size, tp_rank).map_err(config_err)?;
    if let Some(h) = host {
        cfg.host = h;
    }
    if let Some(p) = base_port {
        cfg.base_port = p;
    }
    if let Some(t) = abort_timeout {
        cfg.abort_timeout = secs("abort_timeout", t)?;
    }
    if let Some(t) = consumer_timeout {
        cfg.consumer_timeout = secs("consumer_timeout", t)?;
    }
    if let Some(t) = hold_renew {
        cfg.hold_renew = secs("hold_renew", t)?;
        if cfg.hold_renew.is_zero() {
            return Err(PyValueError::new_err("hold_renew = 0: must be positive"));
        }
    }
    cfg.bootstrap_port().map_err(config_err)?;
    Ok(cfg)
}

fn params(transfer_id: String, bootstrap_addr: String) -> HandoffParams {
    HandoffParams {
        transfer_id,
        bootstrap_addr,
        block_keys: Vec::new(),
    }
}

/// A prefill worker's side of the hand-off: the bootstrap server consumers claim transfers
/// at (port `base + dp_rank * tp_size + tp_rank`), and the holds. Dropping it (or `close`)
/// stops both; the held blocks' leases then lapse and they stay in the pool as ordinary
/// prefix-cache entries.
#[pyclass(module = "kvpool._native", frozen)]
pub struct PdProducer {
    inner: std::sync::Mutex<Option<Producer>>,
    addr: String,
    port: u16,
    abort_timeout: Duration,
}

impl PdProducer {
    fn with<T>(&self, f: impl FnOnce(&Producer) -> T) -> PyResult<T> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(p) => Ok(f(p)),
            None => Err(PyValueError::new_err("the P/D producer is closed")),
        }
    }
}

#[pymethods]
impl PdProducer {
    /// Binds the bootstrap port and starts the hold keeper over `connector`'s pool client.
    #[new]
    #[pyo3(signature = (
        connector, *, role="kv_producer", dp_rank=0, tp_size=1, tp_rank=0, host=None,
        base_port=None, abort_timeout=None, hold_renew=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        connector: Bound<'_, Connector>,
        role: &str,
        dp_rank: u32,
        tp_size: u32,
        tp_rank: u32,
        host: Option<String>,
        base_port: Option<u16>,
        abort_timeout: Option<f64>,
        hold_renew: Option<f64>,
    ) -> PyResult<Self> {
        let cfg = config(
            role,
            dp_rank,
            tp_size,
            tp_rank,
            host,
            base_port,
            abort_timeout,
            None,
            hold_renew,
        )?;
        let abort_timeout = cfg.abort_timeout;
        let conn = connector.get().conn.clone();
        let producer = runtime::block_on(py, Producer::start(conn, cfg))?.map_err(config_err)?;
        Ok(PdProducer {
            addr: producer.bootstrap_addr().to_string(),
            port: producer.local_addr().port(),
            inner: std::sync::Mutex::new(Some(producer)),
            abort_timeout,
        })
    }

    /// `host:port` as consumers dial it.
    #[getter]
    fn bootstrap_addr(&self) -> String {
        self.addr.clone()
    }

    /// The bound port (the real one when the base port was 0).
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Seconds an unclaimed hold lasts.
    #[getter]
    fn abort_timeout(&self) -> f64 {
        self.abort_timeout.as_secs_f64()
    }

    /// Holds `keys` (already saved) for `request_id` under `transfer_id` (or a new id) until
    /// a consumer claims and loads them, either side aborts, or the abort timeout passes.
    /// Returns the transfer id. The first lease renewal is made during the call.
    #[pyo3(signature = (request_id, keys, transfer_id=None))]
    fn hold(
        &self,
        py: Python<'_>,
        request_id: String,
        keys: Vec<PyRef<'_, BlockKey>>,
        transfer_id: Option<String>,
    ) -> PyResult<String> {
        let keys: Vec<kvpool_connector::BlockKey> = keys.iter().map(|k| k.0.clone()).collect();
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let p = g
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the P/D producer is closed"))?;
        let params = runtime::block_on(py, p.hold(&request_id, transfer_id, keys))?;
        Ok(params.transfer_id)
    }

    /// How `transfer_id` ended: `"released"` (its consumer loaded it), `"aborted"`,
    /// `"expired"`, or `None` while held (or unknown).
    fn outcome(&self, transfer_id: &str) -> PyResult<Option<&'static str>> {
        self.with(|p| {
            p.outcome(transfer_id).map(|o| match o {
                Outcome::Released => "released",
                Outcome::Aborted => "aborted",
                Outcome::Expired => "expired",
            })
        })
    }

    /// The engine aborted `request_id`: its holds end (a later claim is told
    /// `TransferAborted`). Returns how many ended.
    fn abort(&self, request_id: &str) -> PyResult<usize> {
        self.with(|p| p.abort(request_id))
    }

    /// Counters: held, held_blocks, handed_off, claimed, released, expired, aborted.
    fn stats(&self) -> PyResult<HashMap<&'static str, u64>> {
        self.with(|p| {
            let s = p.stats();
            HashMap::from([
                ("held", s.held as u64),
                ("held_blocks", s.held_blocks as u64),
                ("handed_off", s.handed_off),
                ("claimed", s.claimed),
                ("released", s.released),
                ("expired", s.expired),
                ("aborted", s.aborted),
            ])
        })
    }

    /// Stops the bootstrap server and the holds' renewal.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let p = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = p {
            runtime::block_on(py, p.shutdown())?;
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("<kvpool PdProducer {}>", self.addr)
    }
}

/// A decode worker's side of the hand-off: claim at the producer's bootstrap port before
/// loading the blocks through the connector, done after, abort on failure.
#[pyclass(module = "kvpool._native", frozen)]
pub struct PdConsumer {
    inner: Consumer,
    timeout: Duration,
}

#[pymethods]
impl PdConsumer {
    #[new]
    #[pyo3(signature = (connector, *, dp_rank=0, tp_size=1, tp_rank=0, consumer_timeout=None))]
    fn new(
        connector: Bound<'_, Connector>,
        dp_rank: u32,
        tp_size: u32,
        tp_rank: u32,
        consumer_timeout: Option<f64>,
    ) -> PyResult<Self> {
        let cfg = config(
            "kv_consumer",
            dp_rank,
            tp_size,
            tp_rank,
            None,
            None,
            None,
            consumer_timeout,
            None,
        )?;
        let timeout = cfg.consumer_timeout;
        Ok(PdConsumer {
            inner: Consumer::new(connector.get().conn.clone(), cfg),
            timeout,
        })
    }

    /// Seconds a claim or a done may take.
    #[getter]
    fn timeout(&self) -> f64 {
        self.timeout.as_secs_f64()
    }

    /// Claims `transfer_id` at `bootstrap_addr`: the number of blocks the producer holds, or
    /// a failure tuple (producer unreachable, `TransferAborted`, `TransferExpired`,
    /// `TransferUnknown`, `Timeout`).
    fn claim<'py>(
        &self,
        py: Python<'py>,
        transfer_id: String,
        bootstrap_addr: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = params(transfer_id, bootstrap_addr);
        match runtime::block_on(py, self.inner.claim(&p))? {
            Ok(n) => n.into_bound_py_any(py),
            Err(e) => Failure::new(e.code(), e.to_string()).to_py(py),
        }
    }

    /// Tells the producer the blocks are loaded (its hold ends): `True` or a failure tuple.
    fn done<'py>(
        &self,
        py: Python<'py>,
        transfer_id: String,
        bootstrap_addr: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = params(transfer_id, bootstrap_addr);
        match runtime::block_on(py, self.inner.done(&p))? {
            Ok(()) => true.into_bound_py_any(py),
            Err(e) => Failure::new(e.code(), e.to_string()).to_py(py),
        }
    }

    /// Asks the producer to release its hold, in the background (returns at once).
    fn abort(&self, transfer_id: String, bootstrap_addr: String, reason: &str) -> PyResult<()> {
        let rt = runtime::runtime()?;
        let _g = rt.enter();
        self.inner
            .abort_in_background(&params(transfer_id, bootstrap_addr), reason);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("<kvpool PdConsumer timeout={:?}>", self.timeout)
    }
}
