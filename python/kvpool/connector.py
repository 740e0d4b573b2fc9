"""``kvpool.connector``: an engine's KV cache, saved to and loaded from the pool by block.

The engine owns its KV cache (vLLM: one tensor per layer); kvpool is told where it is once,
as a :class:`KvLayout`, and then moves whole blocks between it and the pool, batched, with
the GIL released::

    from kvpool import connector as kc

    layout = kc.paged_layout(kv_caches, layers_per_group=None)   # vLLM's per-layer tensors
    hasher = kc.BlockHasher("meta-llama/Meta-Llama-3-8B", "bf16",
                            "vllm-nhd/" + layout.grouping_tag, block_size=16)
    conn = kc.Connector(layout, "10.0.0.1:50051")
    keys = hasher.keys(prompt_token_ids)            # one key per full block
    hit = conn.lookup(keys)                         # leading blocks in the pool
    load = conn.start_load(keys[:hit], block_ids[:hit])
    for g in range(load.num_groups):
        load.wait_group(g)                          # layer group g has landed
    errors = conn.save(keys[hit:], block_ids[hit:len(keys)])

Block keys are docs/connector.md §1 (a wire protocol, computed by the Rust code, so Python
and Rust engines share blocks); the object format is §2.1 (layers ascending, K then V, the
engine's bytes verbatim), so a cache of another layout (block-first, layer-first) with the
same namespace shares objects too.

**Memory contract.** Tensors and arrays are taken by address (``data_ptr()``,
``__array_interface__``) and kept referenced by the layout, so they stay allocated while the
layout, a connector or a load uses them; raw addresses (``KvLayout(regions, ...)``) are the
caller's promise. A block being saved must not be written until the call returns (a GPU
cache's ``save_detached``: until ``finished_saves`` reports the request); a block being
loaded must not be read or written by anyone else until its load reports it (``load``
returned, ``wait_group`` for its group, or the load handle was dropped). GPU caches (built
with the ``cuda`` feature): the engine's writes to a block must be complete on the device
(e.g. ``torch.cuda.current_stream().synchronize()``) before it is saved.

What kvpool checks: the layout (no null region, no byte in two block ranges, tensor extents),
and per call that keys and ids pair up, ids are in range, and a load lists no id twice (two
destinations would alias). Those refusals raise :class:`~kvpool.errors.InvalidArgumentError`
before any byte moves. Per-block outcomes are returned, one per block, never raised: a failed
block is a miss to the engine, which recomputes it.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native
from .client import Client
from .errors import (
    CODES,
    InvalidArgumentError,
    KvpoolError,
    check,
    from_failure,
    is_failure,
    result,
)

BlockHasher = _native.BlockHasher
BlockKey = _native.BlockKey
KvLayout = _native.KvLayout

#: A load's per-block outcome: ``True`` loaded, ``False`` a miss, or the error.
LoadResult = Union[bool, KvpoolError]


def cuda_unavailable(device: int = 0) -> Optional[str]:
    """Why GPU memory of CUDA ``device`` cannot be used here (no ``cuda`` feature in this
    build, no driver, no such device), or ``None`` when it can."""
    return _native.cuda_unavailable(device)


def _invalid(why: object) -> InvalidArgumentError:
    """The typed error for an argument refused before anything moved."""
    return InvalidArgumentError(str(why), code=CODES["InvalidArgument"], name="InvalidArgument")


def _checked(call, *args, **kwargs):
    """Calls into the native layer, whose refusals (``ValueError``, or ``OverflowError`` for
    a negative or huge number) become :class:`~kvpool.errors.InvalidArgumentError`."""
    try:
        return call(*args, **kwargs)
    except (ValueError, OverflowError) as e:
        raise _invalid(e) from None


# ---------------------------------------------------------------------- layouts


class _Memory:
    """What a tensor or array says about its memory: address, shape, strides in bytes."""

    __slots__ = ("addr", "shape", "strides", "itemsize", "device")

    def __init__(self, t: Any) -> None:
        if hasattr(t, "data_ptr") and hasattr(t, "element_size"):  # torch.Tensor
            self.itemsize = t.element_size()
            self.addr = t.data_ptr()
            self.shape = tuple(t.shape)
            self.strides = tuple(s * self.itemsize for s in t.stride())
            kind = t.device.type
            if kind == "cpu":
                self.device = None
            elif kind == "cuda":
                self.device = t.get_device()
            else:
                raise _invalid(f"tensor on {t.device}: only cpu and cuda memory are supported")
        elif hasattr(t, "__array_interface__"):  # numpy.ndarray and friends
            ai = t.__array_interface__
            addr, readonly = ai["data"]
            if readonly:
                raise _invalid("the array is read-only: loads write into it")
            self.addr = addr
            self.shape = tuple(ai["shape"])
            self.itemsize = int(ai["typestr"][2:])
            strides = ai.get("strides")
            if strides is None:  # C-contiguous
                strides, step = [], self.itemsize
                for n in reversed(self.shape):
                    strides.append(step)
                    step *= n
                strides = tuple(reversed(strides))
            self.strides = tuple(strides)
            self.device = None
        else:
            raise TypeError(f"expected a torch tensor or a numpy array, got {type(t).__name__}")
        if any(s < 0 for s in self.strides):
            raise _invalid(f"negative strides {self.strides}: not a KV cache layout")

    def nbytes_if_contiguous(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        if _dense(self.shape, self.strides, self.itemsize) != n:
            raise _invalid(f"not contiguous (shape {self.shape}, strides {self.strides})")
        return n


def _dense(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> Optional[int]:
    """The bytes these dims span if they pack densely in some order (a block whose inner
    dims are permuted, as vLLM's HND stride orders do, is still one byte range), else None."""
    dims = sorted((st, n) for n, st in zip(shape, strides) if n != 1)
    expect = itemsize
    for st, n in dims:
        if st != expect:
            return None
        expect *= n
    return expect


def _layer_regions(
    m: _Memory, mla: bool, kv_dim: Optional[int]
) -> Tuple[List[Tuple[int, int, int]], int]:
    """One vLLM per-layer tensor's regions ``(base, block_stride, block_bytes)`` and block
    count: MLA ``[num_blocks, ...]``, or K and V along ``kv_dim`` (0: FlashAttention's
    ``[2, num_blocks, ...]``, 1: FlashInfer's ``[num_blocks, 2, ...]``)."""
    if mla:
        block_dim, inner = 0, range(1, len(m.shape))
    else:
        if len(m.shape) < 3:
            raise _invalid(
                f"shape {m.shape}: expected [2, num_blocks, ...] or [num_blocks, 2, ...]"
            )
        if kv_dim is None:
            kv_dim = 0 if m.shape[0] == 2 else 1 if m.shape[1] == 2 else None
            if kv_dim is None:
                raise _invalid(f"shape {m.shape}: no K/V dimension of size 2 in front")
        if kv_dim not in (0, 1) or m.shape[kv_dim] != 2:
            raise _invalid(f"shape {m.shape}: dimension {kv_dim} is not K/V")
        block_dim, inner = 1 - kv_dim, range(2, len(m.shape))
    block_bytes = _dense([m.shape[i] for i in inner], [m.strides[i] for i in inner], m.itemsize)
    if block_bytes is None:
        raise _invalid(f"shape {m.shape}, strides {m.strides}: a block's bytes are not contiguous")
    stride = m.strides[block_dim]
    if mla:
        return [(m.addr, stride, block_bytes)], m.shape[block_dim]
    v = m.strides[kv_dim]
    return [(m.addr, stride, block_bytes), (m.addr + v, stride, block_bytes)], m.shape[block_dim]


def paged_layout(
    kv_caches: Union[Mapping[str, Any], Sequence[Any]],
    *,
    layers_per_group: Optional[int] = None,
    mla: Optional[bool] = None,
    kv_dim: Optional[int] = None,
) -> KvLayout:
    """The layout of vLLM's paged cache: one tensor (torch or numpy) per layer, in layer
    order (a dict as ``register_kv_caches`` gets it keeps insertion order).

    Each tensor is ``[2, num_blocks, block_size, heads, head_dim]`` (FlashAttention; K then
    V), ``[num_blocks, 2, ...]`` (FlashInfer), or ``[num_blocks, block_size, head_dim]``
    (MLA, one region per layer). ``mla`` and ``kv_dim`` (0 or 1) override the guess from the
    shape (3 dims is MLA; else the K/V dimension is the first one of size 2). A block's bytes
    must be one contiguous range (its inner dims may be permuted: the bytes are copied as the
    engine lays them out, which is why the namespace's ``layout`` names the in-block layout).
    ``layers_per_group``: ``None`` stores a block's layers in one object, ``n`` one object
    per ``n`` layers (for layer-wise loading).
    """
    tensors = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
    if not tensors:
        raise _invalid("no KV cache tensors")
    mems = [_Memory(t) for t in tensors]
    if mla is None:
        mla = len(mems[0].shape) == 3
    regions: List[Tuple[int, int, int]] = []
    num_blocks = None
    for i, m in enumerate(mems):
        r, n = _layer_regions(m, mla, kv_dim)
        if num_blocks is not None and n != num_blocks:
            raise _invalid(f"layer {i} has {n} blocks, layer 0 {num_blocks}")
        if m.device != mems[0].device:
            raise _invalid(f"layer {i} is on another device than layer 0")
        num_blocks = n
        regions += r
    return _checked(
        KvLayout,
        regions,
        1 if mla else 2,
        num_blocks,
        layers_per_group,
        device=mems[0].device,
        keepalive=tensors,
    )


def block_first_layout(
    buffer: Any,
    *,
    num_layers: int,
    num_blocks: int,
    k_and_v: bool = True,
    layers_per_group: Optional[int] = None,
) -> KvLayout:
    """The layout of one contiguous tensor ``[num_blocks][num_layers][K, V][block]`` (vLLM's
    cross-layer cache): a block's object is one range, the fastest layout to move."""
    return _contiguous(
        KvLayout.block_first, buffer, num_layers, num_blocks, k_and_v, layers_per_group
    )


def layer_first_layout(
    buffer: Any,
    *,
    num_layers: int,
    num_blocks: int,
    k_and_v: bool = True,
    layers_per_group: Optional[int] = None,
) -> KvLayout:
    """The layout of one contiguous tensor ``[num_layers][K, V][num_blocks][block]``."""
    return _contiguous(
        KvLayout.layer_first, buffer, num_layers, num_blocks, k_and_v, layers_per_group
    )


def _contiguous(make, buffer, num_layers, num_blocks, k_and_v, layers_per_group) -> KvLayout:
    m = _Memory(buffer)
    total = m.nbytes_if_contiguous()
    parts = num_layers * num_blocks * (2 if k_and_v else 1)
    if parts <= 0 or total % parts:
        raise _invalid(
            f"{total} bytes do not split into {num_layers} layers x {num_blocks} blocks"
            f"{' x K/V' if k_and_v else ''}"
        )
    return _checked(
        make,
        m.addr,
        num_layers,
        num_blocks,
        total // parts,
        k_and_v=k_and_v,
        layers_per_group=layers_per_group,
        device=m.device,
        keepalive=[buffer],
    )


# ---------------------------------------------------------------------- the connector


def _ids(block_ids: Any) -> List[int]:
    """Block ids from a list, a numpy array or a tensor."""
    if hasattr(block_ids, "tolist"):
        block_ids = block_ids.tolist()
    return list(block_ids)


def _save_result(item: Any) -> Optional[KvpoolError]:
    return from_failure(item) if is_failure(item) else None


class Connector:
    """The pool side of one engine rank (one TP/PP rank): lookup, save and load of the
    blocks of the KV cache ``layout`` describes. Thread-safe.

    ``master``: "host:port" of the master, or "etcd://host:port,.../cluster" for an HA pool
    [``KVPOOL_MASTER``, else 127.0.0.1:50051]; ``token`` [``KVPOOL_TOKEN``], ``tenant``,
    ``timeout`` (seconds one call may retry transient failures, [``KVPOOL_CLIENT_DEADLINE``,
    else 30]) as for :class:`kvpool.Client`. Saves use ``replicas``, ``preferred_nodes``
    (node ids tried first: the engine's own host's) and ``soft_pin``. A client made here
    keeps a location cache (block keys are content hashes, never overwritten with other
    bytes): a prefix loaded again skips the master, and a node on this host too.
    """

    def __init__(
        self,
        layout: KvLayout,
        master: Optional[str] = None,
        *,
        client: Optional[Client] = None,
        token: Optional[str] = None,
        tenant: Optional[str] = None,
        timeout: Optional[float] = None,
        replicas: int = 1,
        preferred_nodes: Sequence[int] = (),
        soft_pin: bool = False,
        etcd: Sequence[str] = (),
        cluster: Optional[str] = None,
        verify_checksum: bool = True,
        max_batch: int = 1024,
    ) -> None:
        # One client per process is the norm: pass `client` to share its connections; the
        # other arguments (defaults and environment as kvpool.Client's) make a new one.
        if client is None:
            client = Client(
                master,
                token=token,
                tenant=tenant,
                timeout=timeout,
                etcd=etcd,
                cluster=cluster,
                verify_checksum=verify_checksum,
                max_batch=max_batch,
                location_cache=True,
            )
        self._client = client
        self._native = _checked(
            _native.Connector,
            layout,
            client.native,
            replicas=replicas,
            preferred_nodes=[int(n) for n in preferred_nodes],
            soft_pin=soft_pin,
        )

    @property
    def client(self) -> Client:
        """The client this connector moves blocks with."""
        return self._client

    @property
    def layout(self) -> KvLayout:
        return self._native.layout

    @property
    def num_groups(self) -> int:
        """Pool objects per block (one per layer group)."""
        return self._native.num_groups

    def __repr__(self) -> str:
        return repr(self._native)

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many leading blocks of ``keys`` are in the pool, every layer group of them (a
        hole ends the match). They get a read lease, which keeps them for the load that
        follows. Raises the typed error of a failure inside the matched prefix."""
        return check(self._native.lookup(list(keys)))

    def save(
        self, keys: Sequence[BlockKey], block_ids: Sequence[int]
    ) -> List[Optional[KvpoolError]]:
        """Saves block ``block_ids[i]`` under ``keys[i]``; per block ``None`` (saved, or
        already in the pool: same key, same KV) or the error."""
        return [_save_result(r) for r in _checked(self._native.save, list(keys), _ids(block_ids))]

    def load(self, keys: Sequence[BlockKey], block_ids: Sequence[int]) -> List[LoadResult]:
        """Loads ``keys[i]`` into block ``block_ids[i]`` (ids distinct); per block ``True``,
        ``False`` (a miss: recompute it, its bytes may be partly overwritten) or the error."""
        return [result(r) for r in _checked(self._native.load, list(keys), _ids(block_ids))]

    def start_load(
        self, keys: Sequence[BlockKey], block_ids: Sequence[int], *, window: int = 2
    ) -> "LayerwiseLoad":
        """Starts a layer-wise load and returns at once: one batch per layer group, at most
        ``window`` in flight, each group published as it lands (see :class:`LayerwiseLoad`).
        Dropping the handle cancels the load and waits until nothing more is written."""
        return LayerwiseLoad(_checked(self._native.start_load, list(keys), _ids(block_ids), window))

    def save_detached(
        self,
        request_id: str,
        keys: Sequence[BlockKey],
        block_ids: Sequence[int],
        groups: Optional[Sequence[int]] = None,
        after_event: Optional[int] = None,
    ) -> None:
        """Saves in the background and returns at once; :meth:`finished_saves` reports
        ``request_id`` when it ends (once per call). ``groups``: the layer groups to save
        (default all), for a layer-wise save that starts each group as soon as the forward has
        written it. Host memory is copied during the call (the blocks may be reused at once);
        GPU memory must stay unchanged until the request is reported, and is copied after
        ``after_event`` (a ``CUevent`` handle, such as a recorded ``torch.cuda.Event``'s
        ``cuda_event``, from the stream that wrote the blocks)."""
        _checked(
            self._native.save_detached,
            request_id,
            list(keys),
            _ids(block_ids),
            None if groups is None else [int(g) for g in groups],
            after_event,
        )

    def finished_saves(self) -> List[Tuple[str, List[Optional[KvpoolError]]]]:
        """The requests whose detached saves ended since the last call, in the order they
        ended, each with its per-block outcomes as :meth:`save` gives them."""
        return [(rid, [_save_result(r) for r in rs]) for rid, rs in self._native.finished_saves()]

    def wait_saves(self, timeout: Optional[float] = None) -> bool:
        """Blocks until no detached save is in flight, at most ``timeout`` seconds; whether
        none is. Their outcomes stay queued for :meth:`finished_saves`."""
        return self._native.wait_saves(timeout)


class LayerwiseLoad:
    """A load in flight, one layer group at a time: the engine waits for group ``g`` (vLLM:
    ``wait_for_layer_load``) and computes on it while later groups are still landing."""

    __slots__ = ("_native",)

    def __init__(self, native: "_native.LayerwiseLoad") -> None:
        self._native = native

    @property
    def num_groups(self) -> int:
        return self._native.num_groups

    def wait_group(self, group: int) -> Optional[List[LoadResult]]:
        """Blocks until layer group ``group`` has landed (GIL released). Host memory: the
        group's per-block outcomes. GPU memory: ``None`` (the per-block outcomes come from
        :meth:`wait`). Groups may be waited for in any order, and again."""
        rs = _checked(self._native.wait_group, group)
        return None if rs is None else [result(r) for r in rs]

    def wait(self) -> List[LoadResult]:
        """Blocks until every group has landed; per block ``True`` (all groups loaded),
        ``False`` (a miss) or the error."""
        return [result(r) for r in self._native.wait()]

    def done(self) -> bool:
        """Whether the load has ended (GPU: fetched and copies enqueued)."""
        return self._native.done()

    def __repr__(self) -> str:
        return repr(self._native)


# ---------------------------------------------------------------------- the P/D hand-off


class PdProducer:
    """A prefill worker's side of the P/D hand-off (docs/connector.md §4): the bootstrap
    server consumers claim transfers at, and the holds. The blocks are saved through
    ``connector`` first (any memory); :meth:`hold` then keeps them in the pool (renewing
    their read leases) until the consumer reports them loaded, either side aborts, or the
    abort timeout passes.

    Port ``base + dp_rank * tp_size + tp_rank``; base from ``base_port``, else
    ``KVPOOL_BOOTSTRAP_PORT`` / ``VLLM_MOONCAKE_BOOTSTRAP_PORT`` [8998] (0: a free port). Host
    from ``host``, else ``KVPOOL_BOOTSTRAP_HOST`` / ``VLLM_HOST_IP`` [127.0.0.1]: bound and
    advertised. ``abort_timeout`` (seconds), else ``KVPOOL_ABORT_REQUEST_TIMEOUT`` /
    ``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT`` [480].
    """

    def __init__(
        self,
        connector: Connector,
        *,
        role: str = "kv_producer",
        dp_rank: int = 0,
        tp_size: int = 1,
        tp_rank: int = 0,
        host: Optional[str] = None,
        base_port: Optional[int] = None,
        abort_timeout: Optional[float] = None,
        hold_renew: Optional[float] = None,
    ) -> None:
        self._native = _checked(
            _native.PdProducer,
            connector._native,
            role=role,
            dp_rank=dp_rank,
            tp_size=tp_size,
            tp_rank=tp_rank,
            host=host,
            base_port=base_port,
            abort_timeout=abort_timeout,
            hold_renew=hold_renew,
        )

    @property
    def bootstrap_addr(self) -> str:
        """``host:port`` as consumers dial it."""
        return self._native.bootstrap_addr

    @property
    def port(self) -> int:
        return self._native.port

    @property
    def abort_timeout(self) -> float:
        return self._native.abort_timeout

    def hold(
        self, request_id: str, keys: Sequence[BlockKey], transfer_id: Optional[str] = None
    ) -> str:
        """Holds ``keys`` (already saved) for ``request_id``; returns the transfer id
        (``transfer_id``, or a new one)."""
        return _checked(self._native.hold, request_id, list(keys), transfer_id)

    def outcome(self, transfer_id: str) -> Optional[str]:
        """``"released"`` (the consumer loaded it), ``"aborted"``, ``"expired"``, or ``None``
        while held (or unknown)."""
        return _checked(self._native.outcome, transfer_id)

    def abort(self, request_id: str) -> int:
        """Ends ``request_id``'s holds (a later claim is told ``TransferAborted``)."""
        return _checked(self._native.abort, request_id)

    def stats(self) -> dict:
        return _checked(self._native.stats)

    def close(self) -> None:
        """Stops the bootstrap server and the renewals (also done when garbage collected)."""
        self._native.close()

    def __repr__(self) -> str:
        return repr(self._native)


class PdConsumer:
    """A decode worker's side of the P/D hand-off: :meth:`claim` at the producer before
    loading the blocks through ``connector``, :meth:`done` after, :meth:`abort` when the
    load failed. Claims and dones are bounded by ``consumer_timeout`` (seconds), else
    ``KVPOOL_CONSUMER_TIMEOUT`` [60]."""

    def __init__(
        self,
        connector: Connector,
        *,
        dp_rank: int = 0,
        tp_size: int = 1,
        tp_rank: int = 0,
        consumer_timeout: Optional[float] = None,
    ) -> None:
        self._native = _checked(
            _native.PdConsumer,
            connector._native,
            dp_rank=dp_rank,
            tp_size=tp_size,
            tp_rank=tp_rank,
            consumer_timeout=consumer_timeout,
        )

    @property
    def timeout(self) -> float:
        return self._native.timeout

    def claim(self, transfer_id: str, bootstrap_addr: str) -> int:
        """The number of blocks the producer holds; raises the typed error (unreachable
        producer, ``TransferAborted`` / ``TransferExpired`` / ``TransferUnknown``, timeout)."""
        return check(self._native.claim(transfer_id, bootstrap_addr))

    def done(self, transfer_id: str, bootstrap_addr: str) -> None:
        """The blocks are loaded: the producer's hold ends. Raises the typed error."""
        check(self._native.done(transfer_id, bootstrap_addr))

    def abort(self, transfer_id: str, bootstrap_addr: str, reason: str = "aborted") -> None:
        """Asks the producer to release its hold, in the background."""
        self._native.abort(transfer_id, bootstrap_addr, reason)

    def __repr__(self) -> str:
        return repr(self._native)


__all__ = [
    "BlockHasher",
    "BlockKey",
    "KvLayout",
    "Connector",
    "LayerwiseLoad",
    "LoadResult",
    "paged_layout",
    "block_first_layout",
    "layer_first_layout",
    "cuda_unavailable",
    "PdProducer",
    "PdConsumer",
]
