//! `NativeClient`: the Rust client behind `kvpool.Client` and `kvpool.mooncake`.
//!
//! Every call takes a whole batch, detaches from the interpreter while the batch runs, and
//! answers one entry per item (see [`crate::outcome`]). Buffers arrive as addresses
//! ([`crate::buffers`]) and the bytes move straight between them and the storage nodes through
//! the client's gather/scatter paths: no copy on our side, whatever the Python type was.

use std::{sync::Arc, time::Duration};

use kvpool_client::{Client, ClientConfig, ClientError};
use kvpool_proto::{NodeId, PutOptions, Token};
use pyo3::{
    exceptions::{PyTypeError, PyValueError},
    prelude::*,
    pybacked::{PyBackedBytes, PyBackedStr},
    types::{PyBytes, PyDict, PyString},
    IntoPyObjectExt,
};

use crate::{buffers, outcome, runtime::block_on};

/// A key as Python gives it: `str` (UTF-8 bytes on the wire, as Mooncake keys are) or `bytes`.
pub enum Key {
    Str(PyBackedStr),
    Bytes(PyBackedBytes),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Key {
    type Error = PyErr;

    // By hand: a derived impl tries the variants in turn and builds (then drops) a Python
    // exception for every key that is not the first, which made 256 `bytes` keys cost 0.6 ms.
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(Key::Str(PyBackedStr::try_from(s.to_owned())?));
        }
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(Key::Bytes(PyBackedBytes::from(b.to_owned())));
        }
        Err(PyTypeError::new_err(format!(
            "a key must be str or bytes, not {}",
            obj.get_type().name()?
        )))
    }
}

impl Key {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Str(s) => s.as_bytes(),
            Key::Bytes(b) => b,
        }
    }
}

fn key_slices(keys: &[Key]) -> Vec<&[u8]> {
    keys.iter().map(Key::as_bytes).collect()
}

/// The same failure for every item of a batch refused as a whole.
fn all_invalid<'py>(py: Python<'py>, n: usize, msg: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    (0..n).map(|_| outcome::invalid(py, msg)).collect()
}

#[pyclass(module = "kvpool._native", frozen)]
pub struct NativeClient {
    client: Arc<Client>,
}

impl NativeClient {
    /// The Rust client, for native classes that share this client's connections (the
    /// connector).
    pub(crate) fn shared(&self) -> Arc<Client> {
        self.client.clone()
    }
}

#[pymethods]
impl NativeClient {
    /// A client of the pool whose master is `master` ("host:port", or
    /// "etcd://host:port,.../cluster" to follow the leader of an HA pool).
    #[new]
    #[pyo3(signature = (
        master, *, token=None, tenant=None, etcd=Vec::new(), cluster=None, deadline=30.0,
        verify_checksum=true, local_node=None, max_batch=1024, location_cache=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        master: String,
        token: Option<String>,
        tenant: Option<String>,
        etcd: Vec<String>,
        cluster: Option<String>,
        deadline: f64,
        verify_checksum: bool,
        local_node: Option<u64>,
        max_batch: usize,
        location_cache: Option<bool>,
    ) -> PyResult<Self> {
        let token = token
            .map(|t| Token::new(t.into_bytes()))
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("token: {e}")))?;
        if !(deadline.is_finite() && deadline > 0.0) {
            return Err(PyValueError::new_err(format!(
                "deadline = {deadline}: must be a positive number of seconds"
            )));
        }
        if max_batch == 0 {
            return Err(PyValueError::new_err("max_batch = 0: must be at least 1"));
        }
        let defaults = ClientConfig::default();
        let location_cache = kvpool_client::LocationCache {
            enabled: location_cache.unwrap_or(defaults.location_cache.enabled),
            ..defaults.location_cache
        };
        let cfg = ClientConfig {
            master,
            token,
            tenant,
            etcd,
            cluster: cluster.unwrap_or(defaults.cluster.clone()),
            deadline: Duration::from_secs_f64(deadline),
            verify_checksum,
            local_node: local_node.map(NodeId),
            max_batch,
            location_cache,
            ..defaults
        };
        cfg.validate().map_err(PyValueError::new_err)?;
        Ok(NativeClient {
            client: Arc::new(Client::new(cfg)),
        })
    }

    /// Puts `keys[i]` gathered from its buffers (see `buffers`); `0` or a failure per item.
    #[pyo3(signature = (
        keys, ptrs, sizes, counts=None, *, replicas=1, preferred=Vec::new(), soft_pin=false,
        hard_pin=false, overwrite=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn put_from<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Key>,
        ptrs: Vec<usize>,
        sizes: Vec<usize>,
        counts: Option<Vec<usize>>,
        replicas: u8,
        preferred: Vec<u64>,
        soft_pin: bool,
        hard_pin: bool,
        overwrite: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let opts = put_options(replicas, preferred, soft_pin, hard_pin, overwrite);
        // SAFETY: the Python API's contract (module docs of `buffers`): the buffers outlive
        // this call, which holds them only until `block_on` returns, and nobody writes them
        // meanwhile.
        let parts = match unsafe { buffers::sources(keys.len(), &ptrs, &sizes, counts.as_deref()) }
        {
            Ok(p) => p,
            Err(e) => return all_invalid(py, keys.len(), &e.0),
        };
        let keys = key_slices(&keys);
        let items: Vec<(&[u8], &[&[u8]])> =
            keys.iter().zip(&parts).map(|(k, p)| (*k, &p[..])).collect();
        let client = &self.client;
        let results = block_on(py, client.put_batch_parts(&items, &opts))?;
        outcome::list(py, results.into_iter().map(|r| r.map(|()| 0u8)))
    }

    /// Puts `keys[i]` = `values[i]` (`bytes`, read in place); `0` or a failure per item.
    #[pyo3(signature = (
        keys, values, *, replicas=1, preferred=Vec::new(), soft_pin=false, hard_pin=false,
        overwrite=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn put_values<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Key>,
        values: Vec<PyBackedBytes>,
        replicas: u8,
        preferred: Vec<u64>,
        soft_pin: bool,
        hard_pin: bool,
        overwrite: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        if keys.len() != values.len() {
            let msg = format!("{} values for {} keys", values.len(), keys.len());
            return all_invalid(py, keys.len(), &msg);
        }
        let opts = put_options(replicas, preferred, soft_pin, hard_pin, overwrite);
        let keys = key_slices(&keys);
        let items: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| (*k, &v[..]))
            .collect();
        let client = &self.client;
        let results = block_on(py, client.put_batch(&items, &opts))?;
        outcome::list(py, results.into_iter().map(|r| r.map(|()| 0u8)))
    }

    /// Gets `keys[i]` scattered into its buffers; its length, `None` on a miss, or a failure.
    #[pyo3(signature = (keys, ptrs, sizes, counts=None))]
    fn get_into<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Key>,
        ptrs: Vec<usize>,
        sizes: Vec<usize>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        // SAFETY: the Python API's contract (module docs of `buffers`): the buffers outlive
        // this call and nobody else touches them until `block_on` returns.
        let mut dests =
            match unsafe { buffers::destinations(keys.len(), &ptrs, &sizes, counts.as_deref()) } {
                Ok(d) => d,
                Err(e) => return all_invalid(py, keys.len(), &e.0),
            };
        let keys = key_slices(&keys);
        let mut dests: Vec<&mut [&mut [u8]]> = dests.iter_mut().map(|d| &mut d[..]).collect();
        let client = &self.client;
        let results = block_on(py, client.get_batch_into_parts(&keys, &mut dests))?;
        outcome::list(py, results)
    }

    /// Gets each key as a new `bytes`; `None` on a miss, or a failure.
    fn get_values<'py>(&self, py: Python<'py>, keys: Vec<Key>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let keys = key_slices(&keys);
        let client = &self.client;
        let results = block_on(py, client.get_batch(&keys))?;
        results
            .into_iter()
            .map(|r| match r {
                Ok(Some(v)) => v.as_slice().into_bound_py_any(py),
                Ok(None) => Ok(py.None().into_bound(py)),
                Err(e) => outcome::error(py, &e),
            })
            .collect()
    }

    /// Each key's value length; `None` on a miss, or a failure.
    fn sizes<'py>(&self, py: Python<'py>, keys: Vec<Key>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let keys = key_slices(&keys);
        let client = &self.client;
        let results = block_on(py, client.locate(&keys))?;
        outcome::list(py, results.into_iter().map(|r| r.map(|i| i.map(|i| i.len))))
    }

    /// Whether each key is committed; `True`/`False`, or a failure.
    #[pyo3(signature = (keys, lease=false))]
    fn exists<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Key>,
        lease: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let keys = key_slices(&keys);
        let client = &self.client;
        let results = block_on(py, client.exists(&keys, lease))?;
        outcome::list(py, results)
    }

    /// Removes each key (leased or hard-pinned ones only with `force`); `0` or a failure.
    #[pyo3(signature = (keys, force=false))]
    fn remove<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Key>,
        force: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let keys = key_slices(&keys);
        let client = &self.client;
        let results = block_on(py, client.remove(&keys, force))?;
        outcome::list(py, results.into_iter().map(|r| r.map(|()| 0u8)))
    }

    /// Removes every object of this client's tenant; how many went, or a failure.
    #[pyo3(signature = (force=false))]
    fn remove_all<'py>(&self, py: Python<'py>, force: bool) -> PyResult<Bound<'py, PyAny>> {
        let client = &self.client;
        let r = block_on(py, client.remove_all(force))?;
        single(py, r)
    }

    /// Removes every object of this client's tenant whose key matches `pattern` (a search,
    /// like `re.search`); how many went, or a failure (`InvalidArgument` for a bad pattern).
    #[pyo3(signature = (pattern, force=false))]
    fn remove_regex<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        force: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = &self.client;
        let r = block_on(py, client.remove_regex(&pattern, force))?;
        single(py, r)
    }

    /// One page of committed keys starting with `prefix`, in byte order, after `start_after`:
    /// `[keys as bytes, more]` (a list: tuples are failures), or a failure.
    #[pyo3(signature = (prefix, start_after=None, limit=1000))]
    fn list_keys<'py>(
        &self,
        py: Python<'py>,
        prefix: Key,
        start_after: Option<Key>,
        limit: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = &self.client;
        let after = start_after.as_ref().map(Key::as_bytes);
        let r = block_on(py, client.list_keys(prefix.as_bytes(), after, limit))?;
        match r {
            Ok((keys, more)) => {
                let keys: Vec<Bound<'py, PyBytes>> =
                    keys.iter().map(|k| PyBytes::new(py, k)).collect();
                [keys.into_bound_py_any(py)?, more.into_bound_py_any(py)?].into_bound_py_any(py)
            }
            Err(e) => outcome::error(py, &e),
        }
    }

    /// The pool as the master sees it: a dict (`nodes`, `objects`, `processing`, `evictions`),
    /// or a failure.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = &self.client;
        let s = match block_on(py, client.status())? {
            Ok(s) => s,
            Err(e) => return outcome::error(py, &e),
        };
        let nodes = s
            .nodes
            .iter()
            .map(|n| {
                let d = PyDict::new(py);
                d.set_item("id", n.id.0)?;
                d.set_item("name", &n.name)?;
                d.set_item("addr", &n.addr)?;
                d.set_item("alive", n.alive)?;
                d.set_item("draining", n.draining)?;
                let segs = n
                    .segments
                    .iter()
                    .map(|g| {
                        let sd = PyDict::new(py);
                        sd.set_item("id", g.id.0)?;
                        sd.set_item("tier", format!("{:?}", g.tier).to_lowercase())?;
                        sd.set_item("capacity", g.capacity)?;
                        sd.set_item("used", g.used)?;
                        sd.set_item("objects", g.objects)?;
                        sd.set_item("healthy", g.healthy)?;
                        Ok(sd)
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                d.set_item("segments", segs)?;
                Ok(d)
            })
            .collect::<PyResult<Vec<_>>>()?;
        let d = PyDict::new(py);
        d.set_item("nodes", nodes)?;
        d.set_item("objects", s.objects)?;
        d.set_item("processing", s.processing)?;
        d.set_item("evictions", s.evictions)?;
        Ok(d.into_any())
    }

    /// Registers `[ptr, ptr + size)` for RDMA: transfers from and into it move straight
    /// between it and the node's segment. Without an RDMA device (or a build without the
    /// `rdma` feature) the region is only recorded. The same range twice is a no-op; a null,
    /// empty or wrapping range, or one overlapping another registered range, raises
    /// `ValueError`. The caller keeps the memory alive until `unregister_buffer(ptr)`.
    fn register_buffer(&self, ptr: u64, size: u64) -> PyResult<()> {
        // SAFETY: the documented contract of this method: the Python caller keeps the memory
        // mapped until it unregisters it (as with Mooncake's `register_buffer`).
        unsafe { self.client.register_buffer(ptr, size) }
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Unregisters the buffer registered at `ptr`: `True` if one was, `False` if none starts
    /// there (so unregistering twice is harmless).
    fn unregister_buffer(&self, ptr: u64) -> PyResult<bool> {
        self.client
            .unregister_buffer(ptr)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// The registered buffers, as `(ptr, size)` in address order.
    fn registered_buffers(&self) -> Vec<(u64, u64)> {
        self.client.registered_buffers()
    }

    /// The configured master address (for messages and `repr`).
    #[getter]
    fn master(&self) -> String {
        self.client.config().master.clone()
    }

    /// The tenant this client's keys live in, if any.
    #[getter]
    fn tenant(&self) -> Option<String> {
        self.client.config().tenant.clone()
    }
}

fn put_options(
    replicas: u8,
    preferred: Vec<u64>,
    soft_pin: bool,
    hard_pin: bool,
    overwrite: bool,
) -> PutOptions {
    PutOptions {
        replicas: replicas.max(1),
        preferred_nodes: preferred.into_iter().map(NodeId).collect(),
        soft_pin,
        hard_pin,
        overwrite,
    }
}

/// A single result: the value converted, or the failure tuple.
fn single<'py, T: IntoPyObject<'py>>(
    py: Python<'py>,
    r: Result<T, ClientError>,
) -> PyResult<Bound<'py, PyAny>> {
    match r {
        Ok(v) => v.into_bound_py_any(py),
        Err(e) => outcome::error(py, &e),
    }
}
