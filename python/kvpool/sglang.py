"""``KVPoolStorage``: kvpool as an SGLang HiCache storage backend (the L3 tier).

Start SGLang with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvpool",
        "module_path": "kvpool.sglang", "class_name": "KVPoolStorage",
        "interface_v1": 1, "master": "10.0.0.1:50051"}'

``interface_v1: 1`` is SGLang's switch for the zero-copy page API (``batch_get_v1`` /
``batch_set_v1``): without it SGLang copies every page through a temporary tensor and calls
the legacy ``batch_get`` / ``batch_set``. Both paths store the same objects, so either reads
what the other wrote.

Configuration (keys of the extra config, each with its fallback):

- ``master``: the master's "host:port", or "etcd://host:port,.../cluster"
  [``KVPOOL_MASTER``, else 127.0.0.1:50051]
- ``token``: the cluster token [``KVPOOL_TOKEN``]
- ``tenant``: the namespace the pages live in [none]
- ``replicas``: copies of each page, on distinct nodes [1]
- ``timeout``: seconds one call may retry transient failures
  [``KVPOOL_CLIENT_DEADLINE``, else 30]

Objects. A page is one object per K/V half and rank, named like SGLang's Mooncake backend
names them, under a namespace that says what the bytes are::

    sglang/{model}/{layout}-{dtype}/{page_hash}_{shard}_{k|v}

``shard`` is ``tp{rank}of{size}`` for MHA (each TP rank holds its own heads: ``_k`` and
``_v``) and ``mla`` for MLA (the latent cache is the same on every TP rank: one ``_k``
object, written by the rank SGLang names its storage writer, read by all), followed by
``_pp{rank}of{size}`` / ``_cp{rank}of{size}`` under pipeline / context parallelism. The
host layout and dtype are in the name because they fix the byte order: an instance with
another layout misses instead of loading bytes in the wrong order. An object's bytes are
those of the host pool's page, buffers in the order ``get_page_buffer_meta`` lists them
(which is also the K-then-V order of a flat data page), gathered and scattered in place:
nothing is copied on the way.

Errors never leave a batch call: a page that could not be moved is ``False`` (``None`` /
``0`` where SGLang expects those), and each call that had failures logs one line with the
first reason. The constructor, by contrast, raises on a bad configuration or an unreachable
master, so a misconfigured server fails at start.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .client import Client
from .errors import check, is_failure
from .metrics import ConnectorMetrics, serve_from_env

logger = logging.getLogger(__name__)

try:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base

    _SGLANG_MISSING: Optional[str] = None
except Exception as e:  # noqa: BLE001 - any failure (not only ImportError: a broken torch
    # raises OSError) must leave `import kvpool.sglang` working; the class says why on use.
    _Base = object
    _SGLANG_MISSING = f"{type(e).__name__}: {e}"

#: Put outcomes that leave the object in the pool: a page another writer stored (or is
#: storing: same hash, same bytes) needs no second copy.
_ALREADY_THERE = ("AlreadyExists", "Processing")


@dataclass
class _Objects:
    """A batch of pool objects in the native client's gather/scatter form."""

    keys: List[str]
    ptrs: List[int]
    sizes: List[int]
    counts: List[int]  # buffers per object
    lengths: List[int]  # bytes per object
    per_page: int  # objects per page (2 for MHA, 1 for MLA)

    def pages(self, ok: Sequence[bool]) -> List[bool]:
        return _per_page(ok, self.per_page)


def _per_page(ok: Sequence[bool], n: int) -> List[bool]:
    """Per-object outcomes -> per-page: a page is whole only if all its n objects are."""
    return [all(ok[i : i + n]) for i in range(0, len(ok), n)]


def _never_raises(fallback: Callable[[int], Any]):
    """A batch method that answers ``fallback(len(keys))`` instead of raising."""

    def wrap(method):
        @functools.wraps(method)
        def safe(self, keys, *args, **kwargs):
            try:
                return method(self, keys, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - HiCache's threads must not die
                logger.warning("kvpool: %s of %d page(s) failed: %s", method.__name__, len(keys), e)
                return fallback(len(keys))

        return safe

    return wrap


class KVPoolStorage(_Base):
    """SGLang's ``HiCacheStorage`` over a kvpool pool (see the module docs)."""

    def __init__(self, storage_config: Any, kwargs: Optional[dict] = None) -> None:
        # `kwargs`: what SGLang's factory passes dynamic backends besides the config (nothing
        # this backend uses).
        if _SGLANG_MISSING is not None:
            raise ImportError(f"kvpool.sglang.KVPoolStorage needs SGLang: {_SGLANG_MISSING}")
        cfg = storage_config
        if getattr(cfg, "dcp_size", 1) > 1 or getattr(cfg, "should_split_heads", False):
            raise NotImplementedError(
                "kvpool: decode context parallelism and split heads (tp_lcm_size) are not "
                "supported by this backend"
            )
        extra = dict(cfg.extra_config or {})
        if not extra.get("interface_v1"):
            logger.info(
                'kvpool: "interface_v1" is not set in the extra config: SGLang will copy '
                'every page through the legacy calls; set "interface_v1": 1 for zero-copy'
            )
        self._replicas = int(extra.get("replicas", 1))
        if self._replicas < 1:
            raise ValueError(f"kvpool: replicas = {self._replicas}: must be at least 1")
        timeout = extra.get("timeout")
        client = Client(
            extra.get("master"),
            token=extra.get("token"),
            tenant=extra.get("tenant"),
            timeout=None if timeout is None else float(timeout),
            # Page keys are content hashes, never overwritten with other bytes.
            location_cache=bool(extra.get("location_cache", True)),
        )
        self._native = client.native
        self._check_reachable()
        self._model = (cfg.model_name or "model").replace("/", "-")
        self._shard = _shard(cfg)
        self._halves = ("k",) if cfg.is_mla_model else ("k", "v")
        self._namespace: Optional[str] = None  # set by register_mem_pool_host
        self._object_lengths: List[int] = []
        self._metrics = _Metrics() if cfg.enable_storage_metrics else None
        #: kvpool's own connector counters (docs/operations.md), whatever SGLang's setting.
        self.counters = ConnectorMetrics()
        serve_from_env()
        self.mem_pool_host = None

    def _check_reachable(self) -> None:
        check(self._native.exists(["sglang/probe"])[0])

    # ------------------------------------------------------------------ host pool

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Takes the host KV pool whose pages the v1 calls move. Its layout and dtype name
        the objects; its one-page buffer list gives each object's length (checked against
        every value the legacy calls pass)."""
        if getattr(mem_pool_host, "kv_buffer", None) is None:
            raise NotImplementedError(
                f"kvpool: {type(mem_pool_host).__name__} has no KV buffer of its own "
                "(hybrid pools need the v2 API, which this backend does not implement)"
            )
        self.mem_pool_host = mem_pool_host
        dtype = str(mem_pool_host.dtype).replace("torch.", "")
        self._namespace = f"sglang/{self._model}/{mem_pool_host.layout}-{dtype}/"
        # Any page's objects have the same lengths; the first page's, under any name.
        self._object_lengths = self._page_objects(["-"], _first_page(mem_pool_host)).lengths

    def close(self) -> None:
        """Drops the connection; later calls fail (False / None / 0)."""
        self._native = None

    def _client(self) -> Any:
        if self._native is None:
            raise RuntimeError("the backend is closed")
        return self._native

    # ------------------------------------------------------------------ keys

    def _object_keys(self, page_key: str) -> List[str]:
        if self._namespace is None:
            raise RuntimeError("no host pool registered (register_mem_pool_host first)")
        return [f"{self._namespace}{page_key}_{self._shard}_{h}" for h in self._halves]

    def _page_objects(self, keys: List[str], host_indices: Any) -> _Objects:
        """The pool objects of ``keys``' pages at ``host_indices``: each half's buffers, as
        the host pool lists them (page-major, K and V alternating for MHA)."""
        pool = self.mem_pool_host
        if len(host_indices) != len(keys) * pool.page_size:
            raise ValueError(
                f"{len(host_indices)} host indices for {len(keys)} pages of {pool.page_size}"
            )
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        per_page, rest = divmod(len(ptrs), max(1, len(keys)))
        halves = len(self._halves)
        if rest or per_page % halves or len(sizes) != len(ptrs):
            raise ValueError(
                f"the host pool listed {len(ptrs)} buffers for {len(keys)} pages "
                f"({halves} half/halves each)"
            )
        out = _Objects([], [], [], [], [], halves)
        for i, key in enumerate(keys):
            first = i * per_page
            for h, name in enumerate(self._object_keys(key)):
                picked = range(first + h, first + per_page, halves)
                out.keys.append(name)
                out.ptrs.extend(ptrs[j] for j in picked)
                out.sizes.extend(sizes[j] for j in picked)
                out.counts.append(len(picked))
                out.lengths.append(sum(sizes[j] for j in picked))
        return out

    # ------------------------------------------------------------------ zero-copy pages

    @_never_raises(lambda n: [False] * n)
    def batch_set_v1(
        self, keys: List[str], host_indices: Any, extra_info: Any = None
    ) -> List[bool]:
        """Stores each page from the host pool, in place. A page already in the pool counts
        as stored (it is not written again)."""
        if not keys:
            return []
        objs = self._page_objects(list(keys), host_indices)
        return self._count("saved", objs.pages(self._put(objs, "batch_set_v1")))

    @_never_raises(lambda n: [False] * n)
    def batch_get_v1(
        self, keys: List[str], host_indices: Any, extra_info: Any = None
    ) -> List[bool]:
        """Reads each page straight into the host pool; True where the whole page came."""
        if not keys:
            return []
        objs = self._page_objects(list(keys), host_indices)
        return self._count("loaded", objs.pages(self._get(objs, "batch_get_v1")))

    @_never_raises(lambda n: 0)
    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """How many pages from the start are in the pool, all their halves present."""
        names = [name for key in keys for name in self._object_keys(key)]
        found = self._client().exists(names)
        _log_failures("batch_exists", found)
        pages = _per_page([r is True for r in found], len(self._halves))
        hit = pages.index(False) if False in pages else len(pages)
        tokens = self._page_tokens()
        self.counters.add("lookups")
        self.counters.add("prompt_tokens", len(keys) * tokens)
        self.counters.add("matched_tokens", hit * tokens)
        return hit

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ------------------------------------------------------------------ legacy (by value)

    @_never_raises(lambda n: False)
    def batch_set(
        self,
        keys: List[str],
        values: Optional[List[Any]] = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        """Stores each flat data page (a CPU tensor, as ``get_data_page`` gives it); True
        if all were stored. The same objects as ``batch_set_v1``."""
        if values is None or len(values) != len(keys):
            raise ValueError(f"{0 if values is None else len(values)} values for {len(keys)} keys")
        tensors = [_contiguous(v) for v in values]  # kept alive until the put returns
        objs = self._value_objects(list(keys), tensors, writable=False)
        return all(self._count("saved", objs.pages(self._put(objs, "batch_set"))))

    @_never_raises(lambda n: [None] * n)
    def batch_get(
        self,
        keys: List[str],
        target_locations: Optional[List[Any]] = None,
        target_sizes: Any = None,
    ) -> List[Optional[Any]]:
        """Reads each page into its target (a contiguous CPU tensor of one flat data page);
        the target, or None where the page is missing or failed."""
        if target_locations is None or len(target_locations) != len(keys):
            raise ValueError("one target tensor per key is required")
        if not keys:
            return []
        objs = self._value_objects(list(keys), list(target_locations), writable=True)
        ok = self._count("loaded", objs.pages(self._get(objs, "batch_get")))
        return [t if good else None for t, good in zip(target_locations, ok)]

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        return self.batch_set([key], [value])

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Optional[Any]:
        return self.batch_get([key], [target_location])[0]

    def _value_objects(self, keys: List[str], tensors: List[Any], writable: bool) -> _Objects:
        """Flat data pages as pool objects: each tensor cut into the halves' lengths."""
        lengths = self._object_lengths
        if not lengths:
            raise RuntimeError("no host pool registered (register_mem_pool_host first)")
        out = _Objects([], [], [], [], [], len(lengths))
        for key, t in zip(keys, tensors):
            ptr, size = _cpu_span(t, writable)
            if size != sum(lengths):
                raise ValueError(f"page {key}: {size} bytes, a page here is {sum(lengths)}")
            for name, length in zip(self._object_keys(key), lengths):
                out.keys.append(name)
                out.ptrs.append(ptr)
                out.sizes.append(length)
                out.counts.append(1)
                out.lengths.append(length)
                ptr += length
        return out

    # ------------------------------------------------------------------ transfers

    def _put(self, objs: _Objects, op: str) -> List[bool]:
        start = time.perf_counter()
        results = self._client().put_from(
            objs.keys, objs.ptrs, objs.sizes, objs.counts, replicas=self._replicas
        )
        ok = [r == 0 or (is_failure(r) and r[1] in _ALREADY_THERE) for r in results]
        _log_failures(op, [r for r, good in zip(results, ok) if not good])
        self._record("backup", objs, start)
        return ok

    def _get(self, objs: _Objects, op: str) -> List[bool]:
        start = time.perf_counter()
        results = self._client().get_into(objs.keys, objs.ptrs, objs.sizes, objs.counts)
        # A value of another length is not this page (another geometry): a miss.
        ok = [type(r) is int and r == n for r, n in zip(results, objs.lengths)]
        _log_failures(op, results)
        self._record("prefetch", objs, start)
        return ok

    # ------------------------------------------------------------------ admin

    def clear(self) -> bool:
        """Removes this model's pages in this layout and dtype (every rank's) from the pool;
        other models and other users of the pool keep theirs."""
        if self._namespace is None or self._native is None:
            return False
        # Forced: pages just read are under a read lease, and a clear means all of them (a
        # read still in flight then fails its lease check and counts as a miss).
        removed = self._native.remove_regex("^" + _regex_literal(self._namespace), True)
        if is_failure(removed):
            logger.warning("kvpool: clear failed: %s", removed[2])
            return False
        logger.info("kvpool: cleared %d objects under %s", removed, self._namespace)
        return True

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call (pages per batch and GiB/s of
        prefetches and backups), or None when storage metrics are off."""
        if self._metrics is None:
            return None
        return self._metrics.take()

    def _page_tokens(self) -> int:
        pool = self.mem_pool_host
        return int(pool.page_size) if pool is not None else 0

    def _count(self, op: str, ok: List[bool]) -> List[bool]:
        """Counts pages moved (``op``: "loaded" or "saved") and failed, as tokens."""
        tokens = self._page_tokens()
        good = sum(ok)
        self.counters.add(f"{op}_tokens", good * tokens)
        failed = "load_failed" if op == "loaded" else "save_failed"
        self.counters.add(f"{failed}_tokens", (len(ok) - good) * tokens)
        return ok

    def _record(self, kind: str, objs: _Objects, start: float) -> None:
        if self._metrics is not None:
            seconds = max(time.perf_counter() - start, 1e-9)
            pages = len(objs.keys) // objs.per_page
            self._metrics.add(kind, pages, sum(objs.lengths) / seconds / (1 << 30))


class _Metrics:
    """What ``get_stats`` hands SGLang, accumulated between its calls."""

    def __init__(self) -> None:
        self._lists = self._empty()

    @staticmethod
    def _empty() -> dict:
        kinds = ("prefetch", "backup")
        return {f"{k}_{m}": [] for k in kinds for m in ("pgs", "bandwidth")}

    def add(self, kind: str, pages: int, gib_per_s: float) -> None:
        self._lists[f"{kind}_pgs"].append(pages)
        self._lists[f"{kind}_bandwidth"].append(gib_per_s)

    def take(self) -> Any:
        from sglang.srt.observability.metrics_collector import StorageMetrics

        lists, self._lists = self._lists, self._empty()
        return StorageMetrics(**lists)


# ---------------------------------------------------------------------------- helpers


def _shard(cfg: Any) -> str:
    """Whose slice of a page an object holds (see the module docs)."""
    parts = ["mla" if cfg.is_mla_model else f"tp{cfg.tp_rank}of{cfg.tp_size}"]
    if cfg.pp_size > 1:
        parts.append(f"pp{cfg.pp_rank}of{cfg.pp_size}")
    if getattr(cfg, "attn_cp_size", 1) > 1:
        parts.append(f"cp{cfg.attn_cp_rank}of{cfg.attn_cp_size}")
    return "_".join(parts)


def _first_page(pool: Any) -> Any:
    import torch

    return torch.arange(pool.page_size, dtype=torch.int64)


def _contiguous(t: Any) -> Any:
    if t is None:
        raise ValueError("a page tensor is required")
    # Flat pages of a layer_first pool come as copies already; others are views, and a
    # view that is not contiguous has to be packed before it can be sent by address.
    return t if t.is_contiguous() else t.contiguous()


def _cpu_span(t: Any, writable: bool) -> Tuple[int, int]:
    """(address, bytes) of a tensor the pool can read or fill by address."""
    if t is None:
        raise ValueError("a target page tensor is required")
    if t.device.type != "cpu":
        raise ValueError(f"page tensors must be in host memory, got one on {t.device}")
    if writable and not t.is_contiguous():
        raise ValueError("a target page tensor must be contiguous")
    return t.data_ptr(), t.numel() * t.element_size()


def _regex_literal(s: str) -> str:
    """``s`` as a regular expression matching exactly it (the pool's regex dialect escapes
    any ASCII punctuation; alphanumerics must stay bare)."""
    return "".join(c if c.isalnum() or not c.isascii() else "\\" + c for c in s)


def _log_failures(op: str, results: Sequence[Any]) -> None:
    failures = [r for r in results if is_failure(r)]
    if failures:
        logger.warning(
            "kvpool: %s: %d object(s) failed, first: %s", op, len(failures), failures[0][2]
        )


__all__ = ["KVPoolStorage"]
