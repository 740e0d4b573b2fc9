"""``kvpool.Client``: the pool from Python, idiomatically.

Values are any buffer-protocol object (bytes, bytearray, memoryview, numpy arrays) or raw
memory given by address (``tensor.data_ptr()``); bytes move straight between that memory
and the storage nodes, never through an intermediate copy. Every call releases the GIL while
it runs, so threads overlap their transfers. Failures raise the typed exceptions of
:mod:`kvpool.errors`; batch calls run every item and then raise the first failure, or, with
``raise_on_error=False``, return the exception in that item's place.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from . import _native
from ._buffer import Pinned, flat
from .errors import InvalidArgumentError, KvpoolError, check, from_failure, is_failure, result

Key = Union[str, bytes]
Buffer = object  # anything exposing the buffer protocol

DEFAULT_MASTER = "127.0.0.1:50051"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name}={raw!r}: expected a number of seconds") from None


class Client:
    """A handle to the pool. Thread-safe; share one per process.

    ``master``: "host:port" of the master, or "etcd://host:port,.../cluster" to follow the
    leader of an HA pool [``KVPOOL_MASTER``, else 127.0.0.1:50051]. ``token``: the cluster
    token [``KVPOOL_TOKEN``]. ``tenant``: the namespace this client's keys live in.
    ``timeout``: seconds one call may keep retrying transient failures
    [``KVPOOL_CLIENT_DEADLINE``, else 30]. ``location_cache``: remember where keys read
    recently live, so a repeated get skips the master (and, for a node on this host, the node
    too) [off; ``KVPOOL_LOCATION_CACHE`` overrides]; right for content-addressed keys that are
    never overwritten with other bytes (docs/semantics.md, "Hot reads").
    """

    def __init__(
        self,
        master: Optional[str] = None,
        *,
        token: Optional[str] = None,
        tenant: Optional[str] = None,
        etcd: Sequence[str] = (),
        cluster: Optional[str] = None,
        timeout: Optional[float] = None,
        verify_checksum: bool = True,
        max_batch: int = 1024,
        local_node: Optional[int] = None,
        location_cache: Optional[bool] = None,
    ) -> None:
        master = master or os.environ.get("KVPOOL_MASTER") or DEFAULT_MASTER
        token = token if token is not None else (os.environ.get("KVPOOL_TOKEN") or None)
        if timeout is None:
            timeout = _env_float("KVPOOL_CLIENT_DEADLINE", 30.0)
        try:
            self._native = _native.NativeClient(
                master,
                token=token,
                tenant=tenant,
                etcd=list(etcd),
                cluster=cluster,
                deadline=float(timeout),
                verify_checksum=verify_checksum,
                local_node=local_node,
                max_batch=max_batch,
                location_cache=location_cache,
            )
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Closes the client; later calls raise. Idempotent."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        tenant = f", tenant={self._native.tenant!r}" if self._native.tenant else ""
        state = " closed" if self._closed else ""
        return f"<kvpool.Client master={self._native.master!r}{tenant}{state}>"

    @property
    def native(self) -> "_native.NativeClient":
        """The native client, for layers that build on this one."""
        self._check_open()
        return self._native

    def _check_open(self) -> None:
        if self._closed:
            raise KvpoolError("the client is closed", code=0, name="Closed")

    # ------------------------------------------------------------------ registration

    def register_buffer(self, ptr: int, size: int) -> None:
        """Registers ``size`` bytes at address ``ptr`` for RDMA: puts from and gets into
        the region then move straight between it and the node's memory, with no bounce copy.
        Optional: every address works unregistered. Without an RDMA device (or a kvpool built
        without RDMA) the region is only recorded. Registering the same region again does
        nothing; a null, empty or wrapping region, or one overlapping another registered
        region, raises :class:`InvalidArgumentError`. Keep the memory alive until
        :meth:`unregister_buffer`."""
        self._check_open()
        if not isinstance(ptr, int) or not isinstance(size, int) or ptr < 0 or size < 0:
            raise InvalidArgumentError(f"register_buffer({ptr!r}, {size!r}): non-negative ints")
        try:
            self._native.register_buffer(ptr, size)
        except (ValueError, OverflowError) as e:
            raise InvalidArgumentError(str(e)) from None

    def unregister_buffer(self, ptr: int) -> bool:
        """Unregisters the region registered at ``ptr``: ``True`` if one was, ``False`` if
        none starts there (unregistering twice is harmless)."""
        self._check_open()
        if not isinstance(ptr, int) or ptr < 0:
            raise InvalidArgumentError(f"unregister_buffer({ptr!r}): a non-negative int")
        try:
            return self._native.unregister_buffer(ptr)
        except (ValueError, OverflowError) as e:
            raise InvalidArgumentError(str(e)) from None

    @property
    def registered_buffers(self) -> List[Tuple[int, int]]:
        """The registered regions, as ``(ptr, size)`` in address order."""
        return self._native.registered_buffers()

    # ------------------------------------------------------------------ puts

    def put(self, key: Key, value: Buffer, **opts) -> None:
        """Stores ``value`` under ``key``. Options: ``replicas`` (on distinct nodes),
        ``preferred_nodes`` (node ids tried first), ``soft_pin``, ``hard_pin`` and
        ``overwrite`` (replace a committed value instead of raising AlreadyExistsError)."""
        self.put_batch([(key, value)], **opts)

    def put_parts(self, key: Key, parts: Sequence[Buffer], **opts) -> None:
        """Stores the concatenation of ``parts`` under ``key`` (gathered, not copied)."""
        self.put_batch_parts([key], [parts], **opts)

    def put_batch(
        self,
        items: Iterable[Tuple[Key, Buffer]],
        *,
        raise_on_error: bool = True,
        **opts,
    ) -> List[Optional[KvpoolError]]:
        """Stores many values; per item ``None`` or the exception (see the module docs)."""
        keys: List[Key] = []
        values: List[Buffer] = []
        for k, v in items:
            keys.append(k)
            values.append(v)
        if all(type(v) is bytes for v in values):
            self._check_open()
            out = self._native.put_values(keys, values, **_put_opts(opts))
            return _unit_results(out, raise_on_error)
        return self.put_batch_parts(
            keys, [[v] for v in values], raise_on_error=raise_on_error, **opts
        )

    def put_batch_parts(
        self,
        keys: Sequence[Key],
        parts: Sequence[Sequence[Buffer]],
        *,
        raise_on_error: bool = True,
        **opts,
    ) -> List[Optional[KvpoolError]]:
        """Stores each key's value gathered from its list of buffers."""
        self._check_open()
        with Pinned() as pinned:
            ptrs, sizes, counts = flat(pinned, parts, writable=False)
            out = self._native.put_from(list(keys), ptrs, sizes, counts, **_put_opts(opts))
        return _unit_results(out, raise_on_error)

    def put_from(self, key: Key, address: int, size: int, **opts) -> None:
        """Stores ``size`` bytes at ``address`` (e.g. ``tensor.data_ptr()``). The memory must
        stay allocated and unwritten until the call returns."""
        self.put_batch_from([key], [address], [size], **opts)

    def put_batch_from(
        self,
        keys: Sequence[Key],
        addresses: Sequence[int],
        sizes: Sequence[int],
        counts: Optional[Sequence[int]] = None,
        *,
        raise_on_error: bool = True,
        **opts,
    ) -> List[Optional[KvpoolError]]:
        """Stores each key from memory given by address: one (address, size) per key, or,
        with ``counts``, ``counts[i]`` consecutive buffers gathered for key ``i``."""
        self._check_open()
        out = self._native.put_from(
            list(keys),
            list(addresses),
            list(sizes),
            None if counts is None else list(counts),
            **_put_opts(opts),
        )
        return _unit_results(out, raise_on_error)

    # ------------------------------------------------------------------ gets

    def get(self, key: Key) -> Optional[bytes]:
        """The value of ``key`` as bytes, or ``None`` when it is not in the pool."""
        return self.get_batch([key])[0]

    def get_batch(
        self, keys: Sequence[Key], *, raise_on_error: bool = True
    ) -> List[Optional[bytes]]:
        """Each key's value as bytes (``None`` on a miss)."""
        self._check_open()
        return _results(self._native.get_values(list(keys)), raise_on_error)

    def get_into(self, key: Key, buffer: Buffer) -> Optional[int]:
        """Reads the value of ``key`` into ``buffer`` (writable, e.g. a bytearray or numpy
        array); returns its length, or ``None`` on a miss. Raises BufferTooSmallError."""
        return self.get_batch_into_parts([key], [[buffer]])[0]

    def get_into_parts(self, key: Key, buffers: Sequence[Buffer]) -> Optional[int]:
        """Reads the value of ``key`` scattered over ``buffers``, filled in order."""
        return self.get_batch_into_parts([key], [buffers])[0]

    def get_batch_into(
        self, keys: Sequence[Key], buffers: Sequence[Buffer], *, raise_on_error: bool = True
    ) -> List[Optional[int]]:
        """Reads each key into its buffer; each value's length or ``None``."""
        return self.get_batch_into_parts(
            keys, [[b] for b in buffers], raise_on_error=raise_on_error
        )

    def get_batch_into_parts(
        self,
        keys: Sequence[Key],
        buffers: Sequence[Sequence[Buffer]],
        *,
        raise_on_error: bool = True,
    ) -> List[Optional[int]]:
        """Reads each key scattered over its list of buffers."""
        self._check_open()
        with Pinned() as pinned:
            ptrs, sizes, counts = flat(pinned, buffers, writable=True)
            out = self._native.get_into(list(keys), ptrs, sizes, counts)
        return _results(out, raise_on_error)

    def get_into_address(self, key: Key, address: int, size: int) -> Optional[int]:
        """Reads the value of ``key`` into ``size`` bytes at ``address``."""
        return self.get_batch_into_address([key], [address], [size])[0]

    def get_batch_into_address(
        self,
        keys: Sequence[Key],
        addresses: Sequence[int],
        sizes: Sequence[int],
        counts: Optional[Sequence[int]] = None,
        *,
        raise_on_error: bool = True,
    ) -> List[Optional[int]]:
        """Reads each key into memory given by address (see :meth:`put_batch_from`)."""
        self._check_open()
        out = self._native.get_into(
            list(keys), list(addresses), list(sizes), None if counts is None else list(counts)
        )
        return _results(out, raise_on_error)

    # ------------------------------------------------------------------ metadata

    def exists(self, key: Key) -> bool:
        return self.exists_batch([key])[0]

    def __contains__(self, key: Key) -> bool:
        return self.exists(key)

    def exists_batch(self, keys: Sequence[Key]) -> List[bool]:
        self._check_open()
        return _results(self._native.exists(list(keys)), True)

    def size(self, key: Key) -> Optional[int]:
        """The length of the value of ``key``, or ``None`` when absent."""
        self._check_open()
        return _results(self._native.sizes([key]), True)[0]

    def remove(self, key: Key, *, force: bool = False) -> bool:
        """Removes ``key``; False when it was not there. Leased or hard-pinned objects need
        ``force`` (else BusyError)."""
        return self.remove_batch([key], force=force)[0]

    def remove_batch(self, keys: Sequence[Key], *, force: bool = False) -> List[bool]:
        self._check_open()
        out = []
        for item in self._native.remove(list(keys), force):
            if is_failure(item):
                if item[1] == "NotFound":
                    out.append(False)
                    continue
                raise from_failure(item)
            out.append(True)
        return out

    def remove_all(self, *, force: bool = False) -> int:
        """Removes every object (of this client's tenant); returns how many went."""
        self._check_open()
        return check(self._native.remove_all(force))

    def remove_regex(self, pattern: str, *, force: bool = False) -> int:
        """Removes every object (of this client's tenant) whose key matches ``pattern``
        (searched, as ``re.search``; Rust regex syntax); returns how many went."""
        self._check_open()
        return check(self._native.remove_regex(pattern, force))

    def keys(
        self, prefix: Key = b"", *, limit: Optional[int] = None, page: int = 1000
    ) -> Iterator[bytes]:
        """Committed keys starting with ``prefix``, in byte order, fetched ``page`` at a
        time (at most ``limit`` in all). Keys written meanwhile may or may not appear."""
        self._check_open()
        after: Optional[bytes] = None
        left = limit
        while left is None or left > 0:
            n = page if left is None else min(page, left)
            keys, more = check(self._native.list_keys(prefix, after, n))
            yield from keys
            if left is not None:
                left -= len(keys)
            if not more or not keys:
                return
            after = keys[-1]

    def status(self) -> dict:
        """Nodes, segments, capacity and use, as the master sees them."""
        self._check_open()
        return check(self._native.status())


def _put_opts(opts: dict) -> dict:
    unknown = set(opts) - {"replicas", "preferred_nodes", "soft_pin", "hard_pin", "overwrite"}
    if unknown:
        raise TypeError(f"unknown put option(s): {', '.join(sorted(unknown))}")
    return {
        "replicas": int(opts.get("replicas", 1)),
        "preferred": [int(n) for n in opts.get("preferred_nodes", ())],
        "soft_pin": bool(opts.get("soft_pin", False)),
        "hard_pin": bool(opts.get("hard_pin", False)),
        "overwrite": bool(opts.get("overwrite", False)),
    }


def _results(items: list, raise_on_error: bool) -> list:
    out = []
    first = None
    for item in items:
        r = result(item)
        if first is None and isinstance(r, KvpoolError):
            first = r
        out.append(r)
    if first is not None and raise_on_error:
        raise first
    return out


def _unit_results(items: list, raise_on_error: bool) -> List[Optional[KvpoolError]]:
    return [None if r == 0 else r for r in _results(items, raise_on_error)]
