//! `EmbeddedNode`: a storage node inside the Python process, so the process lends its own
//! DRAM to the pool as a Mooncake client with `global_segment_size > 0` does. It registers
//! with the master like any node and leaves on `stop` (the Python layer also stops it when
//! the store is closed or the interpreter exits).

use std::sync::Mutex;

use kvpool_proto::{ByteSize, Token};
use kvpool_store::{StoreConfig, StoreHandle};
use pyo3::{
    exceptions::{PyRuntimeError, PyValueError},
    prelude::*,
};
use tokio::net::TcpListener;

use crate::runtime::{block_on, runtime};

#[pyclass(module = "kvpool._native", frozen)]
pub struct EmbeddedNode {
    handle: Mutex<Option<StoreHandle>>,
    id: u64,
    addr: String,
    name: String,
}

#[pymethods]
impl EmbeddedNode {
    /// Maps `dram` bytes, listens on `listen` ("host:port", port 0 picks one) and registers
    /// with the master. `name` defaults to the advertised address.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (master, dram, *, listen="127.0.0.1:0".to_string(), name=None, token=None, etcd=Vec::new(), cluster=None))]
    fn start(
        py: Python<'_>,
        master: String,
        dram: u64,
        listen: String,
        name: Option<String>,
        token: Option<String>,
        etcd: Vec<String>,
        cluster: Option<String>,
    ) -> PyResult<Self> {
        let token = token
            .map(|t| Token::new(t.into_bytes()))
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("token: {e}")))?;
        let defaults = StoreConfig::default();
        let mut cfg = StoreConfig {
            listen: listen.clone(),
            master,
            dram: ByteSize(dram),
            name,
            etcd,
            cluster: cluster.unwrap_or(defaults.cluster.clone()),
            token,
            ..defaults
        };
        cfg.validate()
            .map_err(|e| PyValueError::new_err(format!("embedded storage node: {e}")))?;
        let started = block_on(py, async move {
            let listener = TcpListener::bind(&listen)
                .await
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            if cfg.name.is_none() {
                // Mooncake names a client's segment by its "host:port"; so do we, so
                // `get_hostname()` and `preferred_segment` agree with the pool's node list.
                cfg.name = Some(
                    listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|_| listen.clone()),
                );
            }
            kvpool_store::start(cfg, listener)
                .await
                .map_err(|e| e.to_string())
        })?
        .map_err(|e| PyRuntimeError::new_err(format!("embedded storage node: {e}")))?;
        Ok(EmbeddedNode {
            id: started.node().id().0,
            addr: started.node().addr().to_string(),
            name: started.node().name().to_string(),
            handle: Mutex::new(Some(started)),
        })
    }

    /// The node's id, as the master lists it.
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// The data address clients reach it at.
    #[getter]
    fn addr(&self) -> &str {
        &self.addr
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node still serves.
    #[getter]
    fn running(&self) -> bool {
        self.handle.lock().map(|h| h.is_some()).unwrap_or(false)
    }

    /// Leaves the pool and stops serving; the objects it held are gone. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self
            .handle
            .lock()
            .map_err(|_| PyRuntimeError::new_err("embedded node state poisoned"))?
            .take();
        if let Some(h) = handle {
            block_on(py, h.shutdown())?;
        }
        Ok(())
    }
}

impl Drop for EmbeddedNode {
    fn drop(&mut self) {
        // Not stopped by Python (an exception unwound past `close`): stop it here so the
        // master hears the node leave instead of waiting for its TTL.
        let handle = self.handle.get_mut().ok().and_then(Option::take);
        if let (Some(h), Ok(rt)) = (handle, runtime()) {
            rt.block_on(h.shutdown());
        }
    }
}
