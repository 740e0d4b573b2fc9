//! `BlockHasher` and `BlockKey`: the block keys of docs/connector.md §1 (a wire protocol,
//! pinned by golden vectors), computed by the Rust code so Python and Rust engines agree byte
//! for byte.

use kvpool_connector::keys::{self, hex};
use kvpool_connector::{BlockId, Namespace};
use pyo3::{
    exceptions::{PyOverflowError, PyTypeError, PyValueError},
    prelude::*,
    types::{PyBytes, PyInt, PyType},
};

/// One block's key: the namespace digest and the block's chained (or external) hash.
///
/// Hashable and comparable; pickles as its `to_param()` text, so keys computed by a scheduler
/// process reach the workers unchanged.
#[pyclass(module = "kvpool._native", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BlockKey(pub(crate) keys::BlockKey);

#[pymethods]
impl BlockKey {
    /// The key whose `to_param()` is `param`.
    #[new]
    fn new(param: &str) -> PyResult<Self> {
        Self::from_param(param)
    }

    /// The inverse of `to_param`: `<hex(ns digest)>:<hex(h_i)>`, or `:x<hex>` for an external
    /// hash. `ValueError` for anything else.
    #[staticmethod]
    fn from_param(param: &str) -> PyResult<Self> {
        keys::BlockKey::from_param(param)
            .map(BlockKey)
            .ok_or_else(|| PyValueError::new_err(format!("not a block key parameter: {param:?}")))
    }

    /// The self-contained text form (whole namespace digest), for hand-off parameters.
    fn to_param(&self) -> String {
        self.0.to_param()
    }

    /// The object key in the pool: `kvp1/<ns16>/<hash>`, plus `/g<group>` when the layout
    /// stores one object per layer group.
    #[pyo3(signature = (group=None))]
    fn wire(&self, group: Option<usize>) -> String {
        self.0.wire(group)
    }

    /// The 16-byte namespace digest.
    #[getter]
    fn ns_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.ns)
    }

    /// The block's hash: `h_i` (16 bytes) for a chained key, the caller's bytes for an
    /// external one.
    #[getter]
    fn hash<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        match &self.0.id {
            BlockId::Chained(h) => PyBytes::new(py, h),
            BlockId::External(b) => PyBytes::new(py, b),
        }
    }

    /// Whether the key names a caller's hash (`from_external`) rather than a chained one.
    #[getter]
    fn external(&self) -> bool {
        matches!(self.0.id, BlockId::External(_))
    }

    fn __repr__(&self) -> String {
        format!("BlockKey({:?})", self.0.to_param())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> (Bound<'py, PyType>, (String,)) {
        (slf.get_type(), (slf.get().0.to_param(),))
    }
}

/// Computes the block keys of one namespace (docs/connector.md §1.2–1.5).
#[pyclass(module = "kvpool._native", frozen)]
pub struct BlockHasher(keys::BlockHasher);

#[pymethods]
impl BlockHasher {
    /// The namespace's fields, as §1.2 names them. `layout` is the engine's in-block layout and
    /// its layer grouping, e.g. `"vllm-nhd/all"` (`KvLayout.grouping_tag` gives the part
    /// after the slash).
    #[new]
    #[pyo3(signature = (model, kv_dtype, layout, block_size, *, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: String,
        kv_dtype: String,
        layout: String,
        block_size: u32,
        tp_rank: u32,
        tp_size: u32,
        pp_rank: u32,
        pp_size: u32,
    ) -> PyResult<Self> {
        if block_size == 0 {
            return Err(PyValueError::new_err("block_size = 0: must be at least 1"));
        }
        for (name, s) in [
            ("model", &model),
            ("kv_dtype", &kv_dtype),
            ("layout", &layout),
        ] {
            if u32::try_from(s.len()).is_err() {
                return Err(PyValueError::new_err(format!(
                    "{name} is longer than 4 GiB"
                )));
            }
        }
        Ok(BlockHasher(keys::BlockHasher::new(Namespace {
            model,
            kv_dtype,
            layout,
            block_size,
            tp_rank,
            tp_size,
            pp_rank,
            pp_size,
        })))
    }

    /// The keys of the full blocks of `token_ids` (a partial trailing block gets none). With
    /// `parent`, the last key of an earlier call, the chain continues from it: the tokens are
    /// the ones after that call's, so a growing sequence is hashed once.
    #[pyo3(signature = (token_ids, parent=None))]
    fn keys(
        &self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        parent: Option<PyRef<'_, BlockKey>>,
    ) -> PyResult<Vec<BlockKey>> {
        let ns = self.0.ns_digest();
        let start = match parent.as_deref() {
            None => ns,
            Some(BlockKey(keys::BlockKey { ns: pns, .. })) if *pns != ns => {
                return Err(PyValueError::new_err(
                    "parent is a key of another namespace",
                ))
            }
            Some(BlockKey(keys::BlockKey {
                id: BlockId::Chained(h),
                ..
            })) => *h,
            Some(_) => {
                return Err(PyValueError::new_err(
                    "parent is an external key: external hashes do not chain",
                ))
            }
        };
        let hashes = py.detach(|| self.0.hashes_from(start, &token_ids));
        Ok(hashes
            .into_iter()
            .map(|h| {
                BlockKey(keys::BlockKey {
                    ns,
                    id: BlockId::Chained(h),
                })
            })
            .collect())
    }

    /// Keys for an engine's own block hashes, kept verbatim (§1.5): an `int` in
    /// `[0, 2**64)` becomes its 8 big-endian bytes, `bytes` (e.g. vLLM's 32-byte
    /// `sha256_cbor`) are used as given.
    // The Rust connector's name for it (`BlockHasher::from_external`).
    #[allow(clippy::wrong_self_convention)]
    fn from_external(&self, hashes: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<BlockKey>> {
        let ns = self.0.ns_digest();
        hashes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let bytes = if h.is_instance_of::<PyInt>() {
                    let v: u64 = h.extract().map_err(|_| {
                        PyOverflowError::new_err(format!(
                            "hash {i} = {h}: an integer hash must be in [0, 2**64)"
                        ))
                    })?;
                    v.to_be_bytes().to_vec()
                } else if let Ok(b) = h.cast::<PyBytes>() {
                    if b.as_bytes().is_empty() {
                        return Err(PyValueError::new_err(format!("hash {i} is empty")));
                    }
                    b.as_bytes().to_vec()
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "hash {i}: expected int or bytes, got {}",
                        h.get_type().name()?
                    )));
                };
                Ok(BlockKey(keys::BlockKey {
                    ns,
                    id: BlockId::External(bytes),
                }))
            })
            .collect()
    }

    /// The 16-byte namespace digest (`ns_digest` of every key this hasher makes).
    #[getter]
    fn ns_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.ns_digest())
    }

    #[getter]
    fn model(&self) -> &str {
        &self.0.namespace().model
    }

    #[getter]
    fn kv_dtype(&self) -> &str {
        &self.0.namespace().kv_dtype
    }

    #[getter]
    fn layout(&self) -> &str {
        &self.0.namespace().layout
    }

    #[getter]
    fn block_size(&self) -> u32 {
        self.0.namespace().block_size
    }

    #[getter]
    fn tp_rank(&self) -> u32 {
        self.0.namespace().tp_rank
    }

    #[getter]
    fn tp_size(&self) -> u32 {
        self.0.namespace().tp_size
    }

    #[getter]
    fn pp_rank(&self) -> u32 {
        self.0.namespace().pp_rank
    }

    #[getter]
    fn pp_size(&self) -> u32 {
        self.0.namespace().pp_size
    }

    fn __repr__(&self) -> String {
        let ns = self.0.namespace();
        format!(
            "BlockHasher(model={:?}, kv_dtype={:?}, layout={:?}, block_size={}, tp={}/{}, pp={}/{}, ns={})",
            ns.model,
            ns.kv_dtype,
            ns.layout,
            ns.block_size,
            ns.tp_rank,
            ns.tp_size,
            ns.pp_rank,
            ns.pp_size,
            &hex(&self.0.ns_digest())[..16]
        )
    }
}
