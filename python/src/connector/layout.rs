//! `KvLayout`: an engine's KV cache registered by address (docs/connector.md §2), checked so
//! that the connector may turn its block ranges into slices.
//!
//! Beyond `kvpool_connector::KvLayout::new`'s checks, a layout given from Python must have no
//! null base, end below `isize::MAX` (a slice's limit) and have **no byte in two block
//! ranges**: a load writes each (region, block) range through its own `&mut` slice, so two
//! ranges sharing a byte would be two aliasing destinations. With that and distinct block ids
//! (checked per call), every destination of a load is disjoint from every other.

use std::sync::Arc;

use kvpool_connector::{layout, LayerGroups, LayerRegion};
use pyo3::{exceptions::PyValueError, prelude::*};

/// A KV cache's regions by address, its block count and its layer grouping, plus where the
/// memory is (host, or a CUDA device) and the Python objects that own it (kept alive while
/// the layout, or a connector over it, exists).
#[pyclass(module = "kvpool._native", frozen)]
pub struct KvLayout {
    pub(crate) inner: Arc<layout::KvLayout>,
    /// `None`: host memory; `Some(ordinal)`: device memory of that CUDA device.
    pub(crate) device: Option<usize>,
    /// False for [`KvLayout::without_memory`]: the grouping only, for lookups.
    pub(crate) memory: bool,
    _owners: Vec<Py<PyAny>>,
}

/// Why a layout without memory refuses what needs memory.
pub(crate) const NO_MEMORY: &str =
    "the layout has no memory (KvLayout.without_memory): it only looks blocks up";

impl KvLayout {
    fn checked(
        inner: Result<layout::KvLayout, layout::LayoutError>,
        device: Option<usize>,
        owners: Vec<Py<PyAny>>,
    ) -> PyResult<Self> {
        let inner = inner.map_err(|e| PyValueError::new_err(e.to_string()))?;
        check_addresses(&inner).map_err(PyValueError::new_err)?;
        check_disjoint(&inner).map_err(PyValueError::new_err)?;
        Ok(KvLayout {
            inner: Arc::new(inner),
            device,
            memory: true,
            _owners: owners,
        })
    }

    fn check_memory(&self) -> PyResult<()> {
        if !self.memory {
            return Err(PyValueError::new_err(NO_MEMORY));
        }
        Ok(())
    }
}

fn groups(layers_per_group: Option<usize>) -> LayerGroups {
    layers_per_group.map_or(LayerGroups::All, LayerGroups::PerObject)
}

fn per_layer(k_and_v: bool) -> usize {
    if k_and_v {
        2
    } else {
        1
    }
}

#[pymethods]
impl KvLayout {
    /// A layout from explicit regions `(base, block_stride, block_bytes)`, ordered layer 0
    /// (K, V), layer 1 (K, V), ... (one region per layer when `regions_per_layer` is 1: MLA).
    /// `layers_per_group`: `None` stores all layers of a block in one object, `n` one object
    /// per `n` layers. `device`: `None` for host memory, a CUDA ordinal for device memory.
    /// `keepalive`: objects owning the memory (tensors, arrays), referenced as long as this
    /// layout is.
    #[new]
    #[pyo3(signature = (regions, regions_per_layer, num_blocks, layers_per_group=None, *, device=None, keepalive=Vec::new()))]
    fn new(
        regions: Vec<(usize, usize, usize)>,
        regions_per_layer: usize,
        num_blocks: usize,
        layers_per_group: Option<usize>,
        device: Option<usize>,
        keepalive: Vec<Py<PyAny>>,
    ) -> PyResult<Self> {
        let regions = regions
            .into_iter()
            .map(|(base, block_stride, block_bytes)| LayerRegion {
                base,
                block_stride,
                block_bytes,
            })
            .collect();
        let l = layout::KvLayout::new(
            regions,
            regions_per_layer,
            num_blocks,
            groups(layers_per_group),
        );
        Self::checked(l, device, keepalive)
    }

    /// vLLM's paged cache: per layer, K and V (or one MLA region, `k_and_v=False`) of
    /// `num_blocks` blocks of `block_bytes`, back to back; `bases` is block 0 of each region
    /// in layout order (for FlashAttention's `[2, num_blocks, ...]` tensor, V's base is K's
    /// plus `num_blocks * block_bytes`).
    #[staticmethod]
    #[pyo3(signature = (bases, block_bytes, num_blocks, *, k_and_v=true, layers_per_group=None, device=None, keepalive=Vec::new()))]
    fn paged_vllm(
        bases: Vec<usize>,
        block_bytes: usize,
        num_blocks: usize,
        k_and_v: bool,
        layers_per_group: Option<usize>,
        device: Option<usize>,
        keepalive: Vec<Py<PyAny>>,
    ) -> PyResult<Self> {
        let per = per_layer(k_and_v);
        if !bases.len().is_multiple_of(per) {
            return Err(PyValueError::new_err(format!(
                "{} bases is not a multiple of {per} regions per layer",
                bases.len()
            )));
        }
        // `paged_vllm` takes the block's shape only for its byte count.
        let shape = layout::BlockShape {
            block_size: 1,
            kv_heads: 1,
            head_dim: 1,
            dtype_bytes: block_bytes,
        };
        let l = layout::KvLayout::paged_vllm(
            bases.len() / per,
            k_and_v,
            shape,
            num_blocks,
            &bases,
            groups(layers_per_group),
        );
        Self::checked(l, device, keepalive)
    }

    /// One buffer at `base`, `[num_layers][K, V][num_blocks][block_bytes]`.
    #[staticmethod]
    #[pyo3(signature = (base, num_layers, num_blocks, block_bytes, *, k_and_v=true, layers_per_group=None, device=None, keepalive=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn layer_first(
        base: usize,
        num_layers: usize,
        num_blocks: usize,
        block_bytes: usize,
        k_and_v: bool,
        layers_per_group: Option<usize>,
        device: Option<usize>,
        keepalive: Vec<Py<PyAny>>,
    ) -> PyResult<Self> {
        let l = layout::KvLayout::layer_first_contiguous(
            base,
            num_layers,
            k_and_v,
            num_blocks,
            block_bytes,
            groups(layers_per_group),
        );
        Self::checked(l, device, keepalive)
    }

    /// One buffer at `base`, `[num_blocks][num_layers][K, V][block_bytes]` (vLLM's cross-layer
    /// cache): one copy per block object.
    #[staticmethod]
    #[pyo3(signature = (base, num_layers, num_blocks, block_bytes, *, k_and_v=true, layers_per_group=None, device=None, keepalive=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn block_first(
        base: usize,
        num_layers: usize,
        num_blocks: usize,
        block_bytes: usize,
        k_and_v: bool,
        layers_per_group: Option<usize>,
        device: Option<usize>,
        keepalive: Vec<Py<PyAny>>,
    ) -> PyResult<Self> {
        let l = layout::KvLayout::block_first_contiguous(
            base,
            num_layers,
            k_and_v,
            num_blocks,
            block_bytes,
            groups(layers_per_group),
        );
        Self::checked(l, device, keepalive)
    }

    /// A layout with no memory, for a process that only looks blocks up (vLLM's scheduler):
    /// a connector over it answers `lookup` and refuses saves and loads. Only the layer
    /// grouping matters to keys, so only the layer count and `layers_per_group` are given.
    #[staticmethod]
    #[pyo3(signature = (num_layers, layers_per_group=None))]
    fn without_memory(num_layers: usize, layers_per_group: Option<usize>) -> PyResult<Self> {
        // `PoolConnector` reads a layout's grouping only: one 1-byte region per layer at a
        // stand-in address, never turned into memory (`memory: false`).
        let l = layout::KvLayout::layer_first_contiguous(
            1,
            num_layers,
            false,
            1,
            1,
            groups(layers_per_group),
        );
        Ok(KvLayout {
            memory: false,
            ..Self::checked(l, None, Vec::new())?
        })
    }

    /// Whether the layout describes memory (false for `without_memory`).
    #[getter]
    fn has_memory(&self) -> bool {
        self.memory
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    /// 0 for a layout without memory.
    #[getter]
    fn num_blocks(&self) -> usize {
        if self.memory {
            self.inner.num_blocks()
        } else {
            0
        }
    }

    /// Pool objects per block.
    #[getter]
    fn num_groups(&self) -> usize {
        self.inner.num_groups()
    }

    #[getter]
    fn regions_per_layer(&self) -> usize {
        self.inner.regions().len() / self.inner.num_layers()
    }

    /// `None` (all layers in one object) or the layers per object.
    #[getter]
    fn layers_per_group(&self) -> Option<usize> {
        match self.inner.groups() {
            LayerGroups::All => None,
            LayerGroups::PerObject(n) => Some(n),
        }
    }

    /// `"all"` or `"l<n>"`: the grouping part of the namespace's `layout` field.
    #[getter]
    fn grouping_tag(&self) -> String {
        self.inner.grouping_tag()
    }

    /// `None` for host memory, else the CUDA device ordinal.
    #[getter]
    fn device(&self) -> Option<usize> {
        self.device
    }

    /// The regions, `(base, block_stride, block_bytes)`, in layout order.
    #[getter]
    fn regions(&self) -> Vec<(usize, usize, usize)> {
        if !self.memory {
            return Vec::new();
        }
        self.inner
            .regions()
            .iter()
            .map(|r| (r.base, r.block_stride, r.block_bytes))
            .collect()
    }

    /// Bytes of one block's object for `group`.
    fn object_len(&self, group: usize) -> PyResult<usize> {
        self.check_memory()?;
        check_group(&self.inner, group)?;
        Ok(self.inner.object_len(group))
    }

    /// The layers stored in object `group`, as `(start, end)`.
    fn group_layers(&self, group: usize) -> PyResult<(usize, usize)> {
        check_group(&self.inner, group)?;
        let r = self.inner.group_layers(group);
        Ok((r.start, r.end))
    }

    /// Block `block`'s object for `group` as address ranges `(address, length)`, in object
    /// order (layers ascending, K then V; adjacent ranges merged).
    fn segments(&self, block: usize, group: usize) -> PyResult<Vec<(usize, usize)>> {
        self.check_memory()?;
        check_group(&self.inner, group)?;
        check_ids(&self.inner, &[block], false)?;
        Ok(self
            .inner
            .segments(block, group)
            .into_iter()
            .map(|s| (s.addr, s.len))
            .collect())
    }

    fn __repr__(&self) -> String {
        let where_ = match (self.memory, self.device) {
            (false, _) => "no memory".to_string(),
            (true, None) => "host".to_string(),
            (true, Some(d)) => format!("cuda:{d}"),
        };
        format!(
            "KvLayout(layers={}, regions_per_layer={}, blocks={}, groups={} ({}), {where_})",
            self.inner.num_layers(),
            self.regions_per_layer(),
            self.num_blocks(),
            self.inner.num_groups(),
            self.inner.grouping_tag(),
        )
    }
}

fn check_group(l: &layout::KvLayout, group: usize) -> PyResult<()> {
    if group >= l.num_groups() {
        return Err(PyValueError::new_err(format!(
            "group {group} out of range (num_groups {})",
            l.num_groups()
        )));
    }
    Ok(())
}

/// Refuses block ids out of range, and (with `distinct`, for loads) an id listed twice: its
/// two objects would be scattered into the same bytes.
pub(crate) fn check_ids(l: &layout::KvLayout, ids: &[usize], distinct: bool) -> PyResult<()> {
    let n = l.num_blocks();
    if let Some((i, b)) = ids.iter().enumerate().find(|(_, b)| **b >= n) {
        return Err(PyValueError::new_err(format!(
            "block id {b} (item {i}) out of range (num_blocks {n})"
        )));
    }
    if let Some(b) = distinct.then(|| repeated(ids, n)).flatten() {
        return Err(PyValueError::new_err(format!(
            "block id {b} is listed twice: its destinations would alias"
        )));
    }
    Ok(())
}

/// The first of `items` (each below `n`) listed a second time.
fn repeated(items: &[usize], n: usize) -> Option<usize> {
    let mut seen = vec![false; n];
    items
        .iter()
        .copied()
        .find(|&x| std::mem::replace(&mut seen[x], true))
}

/// The layer groups a call names: all of them for `None`, else each in range and listed
/// once (a group saved twice in one call would be two puts of one key).
pub(crate) fn check_groups(num_groups: usize, groups: Option<Vec<usize>>) -> PyResult<Vec<usize>> {
    let Some(groups) = groups else {
        return Ok((0..num_groups).collect());
    };
    if let Some((i, g)) = groups.iter().enumerate().find(|(_, g)| **g >= num_groups) {
        return Err(PyValueError::new_err(format!(
            "layer group {g} (item {i}) out of range (num_groups {num_groups})"
        )));
    }
    if let Some(g) = repeated(&groups, num_groups) {
        return Err(PyValueError::new_err(format!(
            "layer group {g} is listed twice"
        )));
    }
    Ok(groups)
}

/// One past the last byte of region `r`'s last block (`KvLayout::new` checked it fits).
fn end(r: &LayerRegion, num_blocks: usize) -> usize {
    r.base + (num_blocks - 1) * r.block_stride + r.block_bytes
}

/// No null region, and every byte below `isize::MAX` (the most a slice may span).
fn check_addresses(l: &layout::KvLayout) -> Result<(), String> {
    for (i, r) in l.regions().iter().enumerate() {
        if r.base == 0 {
            return Err(format!("region {i} has a null base address"));
        }
        if end(r, l.num_blocks()) > isize::MAX as usize {
            return Err(format!("region {i} ends past isize::MAX"));
        }
    }
    Ok(())
}

/// Refuses a layout where two block ranges (of any regions and blocks) share a byte.
///
/// Regions whose extents (first block's start to last block's end) overlap form clusters;
/// a cluster of one region is disjoint by `block_stride >= block_bytes`. A larger cluster is
/// accepted at once in the shape interleaved layouts have (every region of the same stride
/// `s`, all block-0 ranges inside one period `[m, m + s)` and disjoint there: blocks `b` of
/// all regions then sit in `[m + b*s, m + (b+1)*s)`). Anything else is checked range by range.
fn check_disjoint(l: &layout::KvLayout) -> Result<(), String> {
    let n = l.num_blocks();
    let mut order: Vec<usize> = (0..l.regions().len()).collect();
    order.sort_by_key(|&i| l.regions()[i].base);
    let mut cluster: Vec<usize> = Vec::new();
    let mut cluster_end = 0;
    for i in order {
        let r = &l.regions()[i];
        if !cluster.is_empty() && r.base >= cluster_end {
            check_cluster(l, &cluster)?;
            cluster.clear();
        }
        cluster.push(i);
        cluster_end = cluster_end.max(end(r, n));
    }
    check_cluster(l, &cluster)
}

fn check_cluster(l: &layout::KvLayout, cluster: &[usize]) -> Result<(), String> {
    if cluster.len() < 2 {
        return Ok(());
    }
    let regions: Vec<&LayerRegion> = cluster.iter().map(|&i| &l.regions()[i]).collect();
    // Sorted by base (the caller's order), so the first is the period's start.
    let (m, s) = (regions[0].base, regions[0].block_stride);
    let periodic = regions.iter().all(|r| r.block_stride == s)
        && regions
            .windows(2)
            .all(|w| w[0].base + w[0].block_bytes <= w[1].base)
        && regions.iter().all(|r| r.base - m + r.block_bytes <= s);
    if periodic {
        return Ok(());
    }
    // Every block range of the cluster, sorted: adjacent ones must not overlap.
    let n = l.num_blocks();
    let mut ranges: Vec<(usize, usize, usize)> = cluster
        .iter()
        .flat_map(|&i| {
            let r = l.regions()[i];
            (0..n).map(move |b| (r.base + b * r.block_stride, r.block_bytes, i))
        })
        .collect();
    ranges.sort_unstable();
    match ranges.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
        Some(w) => Err(format!(
            "regions {} and {} overlap at address {:#x}: two blocks would share bytes",
            w[0].2.min(w[1].2),
            w[0].2.max(w[1].2),
            w[1].0
        )),
        None => Ok(()),
    }
}
