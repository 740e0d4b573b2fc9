"""A drop-in for Mooncake's ``mooncake.store.MooncakeDistributedStore``.

Code written for Mooncake runs on kvpool after changing one import::

    from kvpool.mooncake import MooncakeDistributedStore, ReplicateConfig

Same method names, argument order, defaults and return conventions as Mooncake's Python
binding: ``0`` or a byte count on success, Mooncake's negative error codes on failure (never
an exception where Mooncake returns a code), ``b""`` from ``get`` on a miss, ``1/0/-1`` from
``is_exist``. Where kvpool differs, it is written down in ``docs/python.md`` ("Mooncake
compatibility"). For code that cannot change its import, :func:`install_import_shim` makes
``import mooncake.store`` resolve here.
"""

from __future__ import annotations

import atexit
import ctypes
import enum
import json
import os
import re
import sys
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import _native
from ._buffer import Pinned, flat

# ---------------------------------------------------------------------------- error codes

#: Mooncake's error codes (``mooncake-store/include/types.h``) that kvpool answers with.
OK = 0
INTERNAL_ERROR = -1
BUFFER_OVERFLOW = -10
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
ILLEGAL_CLIENT = -601
INVALID_REPLICA = -702
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
LEASE_EXPIRED = -707
OBJECT_REPLICA_BUSY = -714
TRANSFER_FAIL = -800
CHECKSUM_MISMATCH = -801
RPC_FAIL = -900
RPC_TIMEOUT = -901

#: kvpool's error names (docs/error-codes.md) -> Mooncake's codes. One table, used by every
#: method; a name not listed is INTERNAL_ERROR.
_CODE_OF: Dict[str, int] = {
    "NotFound": OBJECT_NOT_FOUND,
    "AlreadyExists": OBJECT_ALREADY_EXISTS,
    # Mooncake's PutStart refuses a key that has metadata, written or not.
    "Processing": OBJECT_ALREADY_EXISTS,
    "HasLease": OBJECT_HAS_LEASE,
    "Pinned": OBJECT_REPLICA_BUSY,
    "NotWriter": ILLEGAL_CLIENT,
    "KeyTooLong": INVALID_PARAMS,
    "ValueTooLarge": INVALID_PARAMS,
    "InvalidArgument": INVALID_PARAMS,
    "BufferTooSmall": INVALID_PARAMS,
    "NoSpace": NO_AVAILABLE_HANDLE,
    "NoSpaceYet": NO_AVAILABLE_HANDLE,
    "NoSegment": NO_AVAILABLE_HANDLE,
    "UnknownNode": TRANSFER_FAIL,
    "NeedRegister": TRANSFER_FAIL,
    "NodeDead": TRANSFER_FAIL,
    "TransportUnsupported": TRANSFER_FAIL,
    "OutOfRange": INVALID_REPLICA,
    "UnknownSegment": INVALID_REPLICA,
    "ChecksumMismatch": CHECKSUM_MISMATCH,
    "LeaseExpired": LEASE_EXPIRED,
    "Timeout": RPC_TIMEOUT,
    "ConnectionClosed": RPC_FAIL,
    "Io": RPC_FAIL,
    "NotLeader": RPC_FAIL,
    "Unauthorized": ILLEGAL_CLIENT,
}


def _code(failure: tuple) -> int:
    return _CODE_OF.get(failure[1], INTERNAL_ERROR)


def _int_results(items: list) -> List[int]:
    """Native batch entries -> Mooncake ints: a byte count / 0, or a negative code."""
    try:
        # All successes (the common case): already Mooncake's ints. sum() checks that in C,
        # 15x faster than the loop below for a 256-item batch.
        sum(items)
        return items
    except TypeError:
        pass
    out = []
    for r in items:
        if type(r) is tuple:
            out.append(_code(r))
        elif r is None:
            out.append(OBJECT_NOT_FOUND)
        else:
            out.append(int(r))
    return out


# ---------------------------------------------------------------------------- config


class SoftPinAction(enum.IntEnum):
    """What a put does to the object's soft pin (Mooncake's ``SoftPinAction``)."""

    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2


class ReplicateConfig:
    """Placement and retention of a put (Mooncake's ``ReplicateConfig``)."""

    def __init__(self) -> None:
        self.replica_num: int = 1
        self.with_soft_pin: bool = False
        self.soft_pin_action: SoftPinAction = SoftPinAction.PRESERVE
        self.with_hard_pin: bool = False
        self.preferred_segment: str = ""
        self.preferred_segments: List[str] = []
        self.prefer_alloc_in_same_node: Union[bool, str] = False

    def soft_pin(self) -> bool:
        if self.soft_pin_action == SoftPinAction.ENABLE:
            return True
        if self.soft_pin_action == SoftPinAction.DISABLE:
            return False
        return bool(self.with_soft_pin)

    def __repr__(self) -> str:
        return (
            f"ReplicateConfig(replica_num={self.replica_num}, with_soft_pin={self.with_soft_pin}, "
            f"with_hard_pin={self.with_hard_pin}, preferred_segments="
            f"{[s for s in [self.preferred_segment, *self.preferred_segments] if s]})"
        )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: Union[int, float, str]) -> int:
    """A byte count from an int or a string such as "4gb", "512MiB", "1024" (1024-based)."""
    if isinstance(value, bool):
        raise ValueError(f"size {value!r}: expected a number of bytes")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size {value!r} is negative")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"size {value!r}: expected bytes or a number with kb/mb/gb/tb")
    scale = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * scale)


@dataclass
class MooncakeConfig:
    """Mooncake's client configuration, from a JSON file (``MOONCAKE_CONFIG_PATH``) or the
    ``MOONCAKE_*`` environment, as Mooncake's integrations read it."""

    local_hostname: str = "localhost"
    metadata_server: str = "P2PHANDSHAKE"
    global_segment_size: int = 3355443200  # 3.125 GiB, Mooncake's default
    local_buffer_size: int = 1073741824  # 1 GiB
    protocol: str = "tcp"
    device_name: str = ""
    master_server_address: str = "127.0.0.1:50051"
    tenant_id: str = "default"
    extra: dict = field(default_factory=dict)

    @staticmethod
    def from_file(path: str) -> "MooncakeConfig":
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"MOONCAKE_CONFIG_PATH={path}: {e}") from None
        return MooncakeConfig.from_dict(raw, source=path)

    @staticmethod
    def from_dict(raw: dict, source: str = "config") -> "MooncakeConfig":
        c = MooncakeConfig()
        known = {f for f in c.__dataclass_fields__ if f != "extra"}
        aliases = {"master_server_addr": "master_server_address", "rdma_devices": "device_name"}
        for k, v in raw.items():
            k2 = aliases.get(k, k)
            if k2 in ("global_segment_size", "local_buffer_size"):
                try:
                    v = parse_size(v)
                except ValueError as e:
                    raise ValueError(f"{source}: {k}: {e}") from None
            if k2 in known:
                setattr(c, k2, v)
            else:
                c.extra[k] = v
        return c

    @staticmethod
    def load_from_env() -> "MooncakeConfig":
        """The JSON at ``MOONCAKE_CONFIG_PATH`` if set, else the ``MOONCAKE_*`` variables."""
        path = os.environ.get("MOONCAKE_CONFIG_PATH")
        if path:
            return MooncakeConfig.from_file(path)
        env = os.environ
        c = MooncakeConfig()
        pairs = [
            ("MOONCAKE_LOCAL_HOSTNAME", "local_hostname"),
            ("MOONCAKE_TE_META_DATA_SERVER", "metadata_server"),
            ("MOONCAKE_PROTOCOL", "protocol"),
            ("MOONCAKE_DEVICE", "device_name"),
            ("MOONCAKE_MASTER", "master_server_address"),
            ("MOONCAKE_TENANT_ID", "tenant_id"),
        ]
        for var, attr in pairs:
            if env.get(var):
                setattr(c, attr, env[var])
        for var, attr in [
            ("MOONCAKE_GLOBAL_SEGMENT_SIZE", "global_segment_size"),
            ("MOONCAKE_LOCAL_BUFFER_SIZE", "local_buffer_size"),
        ]:
            if env.get(var):
                try:
                    setattr(c, attr, parse_size(env[var]))
                except ValueError as e:
                    raise ValueError(f"{var}: {e}") from None
        return c


# ---------------------------------------------------------------------------- buffers


class BufferHandle(bytearray):
    """What ``get_buffer`` returns: the value in memory of its own, exposing the buffer
    protocol (``memoryview(h)``, ``np.frombuffer(h)``) plus Mooncake's ``ptr()`` and
    ``size()``. The value is read straight into it, not copied from elsewhere."""

    def ptr(self) -> int:
        if not len(self):
            return 0
        return ctypes.addressof(ctypes.c_char.from_buffer(self))

    def size(self) -> int:
        return len(self)


# ---------------------------------------------------------------------------- the store

_open_stores: "weakref.WeakSet[MooncakeDistributedStore]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # A process that contributed memory leaves the pool cleanly instead of waiting for the
    # master to declare its node dead.
    for s in list(_open_stores):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _client_deadline() -> float:
    raw = os.environ.get("KVPOOL_CLIENT_DEADLINE", "")
    try:
        return float(raw) if raw else 30.0
    except ValueError:
        return 30.0


def _master_target(addr: str) -> str:
    """Mooncake's master address forms -> kvpool's: "host:port" as is; an etcd list
    ("etcd://h1:p1;h2:p2") with commas."""
    if addr.startswith("etcd://"):
        return addr.replace(";", ",")
    return addr


class MooncakeDistributedStore:
    """kvpool behind Mooncake's store API. Create, ``setup(...)``, use, ``close()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Optional[_native.NativeClient] = None
        self._probe: Optional[_native.NativeClient] = None
        self._node: Optional[_native.EmbeddedNode] = None
        self._hostname = ""
        self._registered: Dict[int, int] = {}
        self._segments: Dict[str, int] = {}
        self._segments_at = 0.0

    # ------------------------------------------------------------------ setup

    def setup(
        self,
        local_hostname: Union[str, dict, None] = None,
        metadata_server: str = "P2PHANDSHAKE",
        global_segment_size: int = 16 * 1024 * 1024,
        local_buffer_size: int = 16 * 1024 * 1024,
        protocol: str = "tcp",
        rdma_devices: str = "",
        master_server_addr: str = "127.0.0.1:50051",
        engine: object = None,
        enable_ssd_offload: bool = False,
        ssd_offload_path: str = "",
        tenant_id: str = "default",
        **_ignored,
    ) -> int:
        """Connects to the master at ``master_server_addr`` and, when
        ``global_segment_size > 0``, lends that much of this process's DRAM to the pool (an
        embedded storage node at ``local_hostname``). ``setup(dict)`` takes the same keys as
        Mooncake's JSON config; ``setup()`` reads ``MOONCAKE_CONFIG_PATH`` / ``MOONCAKE_*``.
        ``metadata_server``, ``local_buffer_size`` and ``engine`` are accepted and not needed:
        kvpool has no separate metadata service and moves bytes without a staging buffer.
        Returns 0, or a negative code (the reason is logged on stderr)."""
        if isinstance(local_hostname, dict) or local_hostname is None:
            try:
                cfg = (
                    MooncakeConfig.from_dict(local_hostname, "setup(config)")
                    if isinstance(local_hostname, dict)
                    else MooncakeConfig.load_from_env()
                )
            except ValueError as e:
                _warn(f"setup: {e}")
                return INVALID_PARAMS
            if isinstance(local_hostname, dict) and "global_segment_size" not in local_hostname:
                cfg.global_segment_size = 16 * 1024 * 1024  # the dict form's C++ default
            local_hostname = cfg.local_hostname
            global_segment_size = cfg.global_segment_size
            protocol = cfg.protocol
            master_server_addr = cfg.master_server_address
            tenant_id = cfg.tenant_id
        try:
            segment = parse_size(global_segment_size)
        except ValueError as e:
            _warn(f"setup: global_segment_size: {e}")
            return INVALID_PARAMS
        if protocol not in ("tcp", "rdma", ""):
            _warn(f"setup: protocol {protocol!r}: kvpool speaks tcp (rdma falls back to tcp)")
            return INVALID_PARAMS
        if protocol == "rdma":
            _warn("setup: protocol 'rdma' is not available yet; using tcp")
        with self._lock:
            if self._client is not None:
                _warn("setup: already set up; close() first")
                return INVALID_PARAMS
            master = _master_target(master_server_addr)
            token = os.environ.get("KVPOOL_TOKEN") or None
            tenant = None if tenant_id in ("", "default") else tenant_id
            host = str(local_hostname or "localhost")
            node = None
            try:
                if segment > 0:
                    listen = host if ":" in host.rsplit("]", 1)[-1] else f"{host}:0"
                    node = _native.EmbeddedNode(master, segment, listen=listen, token=token)
                self._client = _native.NativeClient(
                    master,
                    token=token,
                    tenant=tenant,
                    deadline=_client_deadline(),
                    local_node=node.id if node else None,
                )
                self._probe = _native.NativeClient(master, token=token, tenant=tenant, deadline=2.0)
            except (ValueError, RuntimeError) as e:
                if node is not None:
                    node.stop()
                self._client = None
                _warn(f"setup: {e}")
                return INVALID_PARAMS
            self._node = node
            self._hostname = node.name if node else host
            _open_stores.add(self)
        return OK

    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int, server_address: str) -> int:
        """Mooncake's dummy client attaches to a local real client; kvpool clients need no
        such helper, so this connects straight to the master at ``server_address`` and
        lends no memory (``mem_pool_size`` and ``local_buffer_size`` are not needed)."""
        return self.setup(
            "localhost", "P2PHANDSHAKE", 0, local_buffer_size, "tcp", "", server_address
        )

    def close(self) -> int:
        """Leaves the pool (the embedded node, if any, goes first) and closes. Idempotent."""
        with self._lock:
            node, self._node = self._node, None
            self._client = None
            self._probe = None
            self._registered.clear()
            _open_stores.discard(self)
        if node is not None:
            node.stop()
        return OK

    def health_check(self) -> int:
        """0 healthy, 1 closed or never set up, 2 the master cannot be reached."""
        probe = self._probe
        if probe is None:
            return 1
        return 0 if type(probe.status()) is dict else 2

    def get_hostname(self) -> str:
        """This process's segment name ("host:port" of its embedded node), or the
        ``local_hostname`` given to ``setup`` when it lends no memory."""
        return self._hostname

    # ------------------------------------------------------------------ internals

    def _c(self) -> Optional[_native.NativeClient]:
        c = self._client
        if c is None:
            _warn("the store is not set up (call setup() first) or is closed")
        return c

    def _opts(self, config: Optional[ReplicateConfig], overwrite: bool = False) -> dict:
        config = config or ReplicateConfig()
        preferred: List[int] = []
        names = [s for s in [config.preferred_segment, *config.preferred_segments] if s]
        if names:
            preferred = [n for n in (self._segment_id(s) for s in names) if n is not None]
        same_node = config.prefer_alloc_in_same_node
        if isinstance(same_node, str):
            same_node = same_node.strip().lower() in ("1", "true", "yes")
        if same_node and self._node is not None and self._node.id not in preferred:
            preferred.insert(0, self._node.id)
        return {
            "replicas": max(1, int(config.replica_num)),
            "preferred": preferred,
            "soft_pin": config.soft_pin(),
            "hard_pin": bool(config.with_hard_pin),
            "overwrite": overwrite,
        }

    def _segment_id(self, name: str) -> Optional[int]:
        """A Mooncake segment name ("host:port", or a node's name) -> the node's id; names
        are refreshed from the master at most once a second."""
        if name not in self._segments and time.monotonic() - self._segments_at > 1.0:
            c = self._client
            status = c.status() if c is not None else None
            self._segments_at = time.monotonic()
            if type(status) is dict:
                self._segments = {}
                for n in status["nodes"]:
                    self._segments[n["name"]] = n["id"]
                    self._segments[n["addr"]] = n["id"]
        return self._segments.get(name)

    def _put_from(self, keys, ptrs, sizes, counts, config, overwrite) -> List[int]:
        c = self._c()
        if c is None:
            return [INTERNAL_ERROR] * len(keys)
        if not _same_len(ptrs, sizes) or (counts is None and len(keys) != len(ptrs)):
            return [INVALID_PARAMS] * len(keys)
        return _int_results(
            # The caller's lists go down as they are: the native side reads any sequence.
            c.put_from(keys, ptrs, sizes, counts, **self._opts(config, overwrite))
        )

    def _put_buffers(self, keys, values, config, overwrite) -> List[int]:
        c = self._c()
        if c is None:
            return [INTERNAL_ERROR] * len(keys)
        if len(keys) != len(values):
            return [INVALID_PARAMS] * len(keys)
        opts = self._opts(config, overwrite)
        if all(type(v) is bytes for v in values):
            return _int_results(c.put_values(keys, values, **opts))
        try:
            with Pinned() as pinned:
                ptrs, sizes, counts = flat(pinned, [[v] for v in values], writable=False)
                return _int_results(c.put_from(keys, ptrs, sizes, counts, **opts))
        except (BufferError, TypeError) as e:
            _warn(f"put: {e}")
            return [INVALID_PARAMS] * len(keys)

    def _put_parts(self, key, parts, config, overwrite) -> int:
        c = self._c()
        if c is None:
            return INTERNAL_ERROR
        try:
            with Pinned() as pinned:
                ptrs, sizes, counts = flat(pinned, [parts], writable=False)
                return _int_results(
                    c.put_from([key], ptrs, sizes, counts, **self._opts(config, overwrite))
                )[0]
        except (BufferError, TypeError) as e:
            _warn(f"put_parts: {e}")
            return INVALID_PARAMS

    # ------------------------------------------------------------------ copying API

    def put(self, key: str, value, config: Optional[ReplicateConfig] = None) -> int:
        return self._put_buffers([key], [value], config, False)[0]

    def put_batch(
        self, keys: List[str], values: list, config: Optional[ReplicateConfig] = None
    ) -> int:
        """0 when every value was stored, else the first failure's code."""
        return _first_error(self._put_buffers(keys, values, config, False))

    def put_parts(self, key: str, *parts, config: Optional[ReplicateConfig] = None) -> int:
        return self._put_parts(key, parts, config, False)

    def upsert(self, key: str, value, config: Optional[ReplicateConfig] = None) -> int:
        return self._put_buffers([key], [value], config, True)[0]

    def upsert_batch(
        self, keys: List[str], values: list, config: Optional[ReplicateConfig] = None
    ) -> int:
        return _first_error(self._put_buffers(keys, values, config, True))

    def upsert_parts(self, key: str, *parts, config: Optional[ReplicateConfig] = None) -> int:
        return self._put_parts(key, parts, config, True)

    def get(self, key: str) -> bytes:
        """The value, or ``b""`` on a miss or an error."""
        return self.get_batch([key])[0]

    def get_batch(self, keys: List[str]) -> List[bytes]:
        c = self._c()
        if c is None:
            return [b""] * len(keys)
        out = []
        for r in c.get_values(keys):
            if type(r) is bytes:
                out.append(r)
            else:
                if type(r) is tuple and r[1] != "NotFound":
                    _warn(f"get: {r[2]}")
                out.append(b"")
        return out

    def get_buffer(self, key: str) -> Optional[BufferHandle]:
        """The value in a :class:`BufferHandle`, or ``None`` on a miss or an error."""
        return self.batch_get_buffer([key])[0]

    def batch_get_buffer(self, keys: List[str]) -> List[Optional[BufferHandle]]:
        c = self._c()
        if c is None:
            return [None] * len(keys)
        keys = list(keys)
        out: List[Optional[BufferHandle]] = [None] * len(keys)
        todo = list(range(len(keys)))
        # Sized first, then read straight into the handles; a value replaced in between by a
        # larger one fails as too small and is sized again (twice at most).
        for _ in range(2):
            sizes = c.sizes([keys[i] for i in todo])
            want = [(i, s) for i, s in zip(todo, sizes) if type(s) is int]
            if not want:
                break
            handles = [BufferHandle(max(s, 1)) for _, s in want]
            with Pinned() as pinned:
                ptrs, lens, counts = flat(pinned, [[h] for h in handles], writable=True)
                got = c.get_into([keys[i] for i, _ in want], ptrs, lens, counts)
            todo = []
            for (i, _), h, r in zip(want, handles, got):
                if type(r) is int:
                    del h[r:]
                    out[i] = h
                elif type(r) is tuple and r[1] == "BufferTooSmall":
                    todo.append(i)
            if not todo:
                break
        return out

    # ------------------------------------------------------------------ zero-copy API

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        """Records a region callers will pass by address. kvpool's TCP transport needs no
        registration (every address works); the record is what the RDMA transport will
        register with the NIC. 0, or INVALID_PARAMS for a null or empty region."""
        if not buffer_ptr or size <= 0:
            return INVALID_PARAMS
        self._registered[int(buffer_ptr)] = int(size)
        return OK

    def unregister_buffer(self, buffer_ptr: int) -> int:
        return OK if self._registered.pop(int(buffer_ptr), None) is not None else INVALID_PARAMS

    def put_from(
        self, key: str, buffer_ptr: int, size: int, config: Optional[ReplicateConfig] = None
    ) -> int:
        return self._put_from([key], [buffer_ptr], [size], None, config, False)[0]

    def upsert_from(
        self, key: str, buffer_ptr: int, size: int, config: Optional[ReplicateConfig] = None
    ) -> int:
        return self._put_from([key], [buffer_ptr], [size], None, config, True)[0]

    def batch_put_from(
        self,
        keys: List[str],
        buffer_ptrs: List[int],
        sizes: List[int],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]:
        return self._put_from(keys, buffer_ptrs, sizes, None, config, False)

    def batch_upsert_from(
        self,
        keys: List[str],
        buffer_ptrs: List[int],
        sizes: List[int],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]:
        return self._put_from(keys, buffer_ptrs, sizes, None, config, True)

    def batch_put_from_multi_buffers(
        self,
        keys: List[str],
        all_buffer_ptrs: List[List[int]],
        all_sizes: List[List[int]],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]:
        """Each object gathered from its list of buffers (one per layer, say), in order."""
        flat_ptrs, flat_sizes, counts = _flatten(all_buffer_ptrs, all_sizes)
        if counts is None or len(counts) != len(keys):
            return [INVALID_PARAMS] * len(keys)
        return self._put_from(keys, flat_ptrs, flat_sizes, counts, config, False)

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        """Bytes read into the buffer, or a negative code (OBJECT_NOT_FOUND on a miss,
        INVALID_PARAMS when the value does not fit)."""
        return self.batch_get_into([key], [buffer_ptr], [size])[0]

    def batch_get_into(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int]
    ) -> List[int]:
        c = self._c()
        if c is None:
            return [INTERNAL_ERROR] * len(keys)
        if not _same_len(keys, buffer_ptrs, sizes):
            return [INVALID_PARAMS] * len(keys)
        return _int_results(c.get_into(keys, buffer_ptrs, sizes))

    def batch_get_into_multi_buffers(
        self,
        keys: List[str],
        all_buffer_ptrs: List[List[int]],
        all_sizes: List[List[int]],
        prefer_alloc_in_same_node: bool = False,
    ) -> List[int]:
        """Each object scattered over its list of buffers, filled in order."""
        c = self._c()
        if c is None:
            return [INTERNAL_ERROR] * len(keys)
        flat_ptrs, flat_sizes, counts = _flatten(all_buffer_ptrs, all_sizes)
        if counts is None or len(counts) != len(keys):
            return [INVALID_PARAMS] * len(keys)
        return _int_results(c.get_into(keys, flat_ptrs, flat_sizes, counts))

    def get_into_ranges(
        self,
        buffer_ptrs: List[int],
        all_keys: List[List[str]],
        all_dst_offsets: List[List[List[int]]],
        all_src_offsets: List[List[List[int]]],
        all_sizes: List[List[List[int]]],
    ) -> List[List[List[int]]]:
        """Byte ranges of objects into buffers (Mooncake's buffer-major shape:
        ``results[i][j][k]`` is fragment k of key j into buffer i, its size or a negative
        code). Each object is read whole (checksum-verified) once, then its fragments are
        copied out; see docs/python.md."""
        c = self._c()
        if c is None or not _same_len(
            buffer_ptrs, all_keys, all_dst_offsets, all_src_offsets, all_sizes
        ):
            return [[[INTERNAL_ERROR if c is None else INVALID_PARAMS]] for _ in buffer_ptrs]
        names = sorted({k for ks in all_keys for k in ks})
        values = dict(zip(names, self.batch_get_buffer(names)))
        out: List[List[List[int]]] = []
        for i, ptr in enumerate(buffer_ptrs):
            per_key = []
            size_of_dst = self._registered.get(int(ptr))
            for j, key in enumerate(all_keys[i]):
                dsts, srcs, lens = all_dst_offsets[i][j], all_src_offsets[i][j], all_sizes[i][j]
                if not _same_len(dsts, srcs, lens):
                    per_key.append([INVALID_PARAMS] * max(1, len(lens)))
                    continue
                v = values.get(key)
                frags = []
                for d, s, n in zip(dsts, srcs, lens):
                    if v is None:
                        frags.append(OBJECT_NOT_FOUND)
                    elif n < 0 or d < 0 or s < 0 or s + n > len(v):
                        frags.append(INVALID_PARAMS)
                    elif size_of_dst is not None and d + n > size_of_dst:
                        frags.append(BUFFER_OVERFLOW)
                    elif not ptr:
                        frags.append(INVALID_PARAMS)
                    else:
                        if n:
                            ctypes.memmove(int(ptr) + d, v.ptr() + s, n)
                        frags.append(n)
                per_key.append(frags)
            out.append(per_key)
        return out

    # ------------------------------------------------------------------ metadata

    def is_exist(self, key: str) -> int:
        """1 present, 0 absent, -1 error."""
        return self.batch_is_exist([key])[0]

    def batch_is_exist(self, keys: List[str]) -> List[int]:
        c = self._c()
        if c is None:
            return [-1] * len(keys)
        return [(1 if r else 0) if type(r) is bool else -1 for r in c.exists(keys)]

    def get_size(self, key: str) -> int:
        """The value's length in bytes, or a negative code (OBJECT_NOT_FOUND)."""
        c = self._c()
        if c is None:
            return INTERNAL_ERROR
        return _int_results(c.sizes([key]))[0]

    # ------------------------------------------------------------------ removal

    def remove(self, key: str, force: bool = False) -> int:
        return self.batch_remove([key], force)[0]

    def batch_remove(self, keys: List[str], force: bool = False) -> List[int]:
        c = self._c()
        if c is None:
            return [INTERNAL_ERROR] * len(keys)
        return _int_results(c.remove(keys, force))

    def remove_by_regex(self, regex: str, force: bool = False) -> int:
        """Removes every object whose key matches ``regex`` (a search, as ``re.search``);
        returns how many went, or a negative code (INVALID_PARAMS for a bad pattern)."""
        c = self._c()
        if c is None:
            return INTERNAL_ERROR
        r = c.remove_regex(regex, force)
        return _code(r) if type(r) is tuple else int(r)

    def remove_all(self, force: bool = False) -> int:
        """Removes every object; returns how many went, or a negative code."""
        c = self._c()
        if c is None:
            return INTERNAL_ERROR
        r = c.remove_all(force)
        return _code(r) if type(r) is tuple else int(r)


# ---------------------------------------------------------------------------- helpers


def _warn(msg: str) -> None:
    print(f"kvpool.mooncake: {msg}", file=sys.stderr)


def _same_len(*seqs: Sequence) -> bool:
    try:
        return len({len(s) for s in seqs}) <= 1
    except TypeError:
        return False


def _first_error(codes: List[int]) -> int:
    return next((c for c in codes if c < 0), OK)


def _flatten(all_ptrs, all_sizes) -> Tuple[List[int], List[int], Optional[List[int]]]:
    """Per-object buffer lists -> flat lists and counts; counts None when the shapes differ."""
    if len(all_ptrs) != len(all_sizes):
        return [], [], None
    ptrs: List[int] = []
    sizes: List[int] = []
    counts: List[int] = []
    for p, s in zip(all_ptrs, all_sizes):
        if len(p) != len(s):
            return [], [], None
        ptrs.extend(p)
        sizes.extend(s)
        counts.append(len(p))
    return ptrs, sizes, counts


def install_import_shim() -> None:
    """Makes ``import mooncake.store`` (and ``from mooncake.store import
    MooncakeDistributedStore``) resolve to this module, for code that cannot change its
    import. Does nothing when the real Mooncake package is importable. Call it early, e.g.
    from ``sitecustomize.py``."""
    try:
        import importlib.util

        if importlib.util.find_spec("mooncake") is not None and "mooncake" not in sys.modules:
            return
    except (ImportError, ValueError):
        pass
    pkg = sys.modules.get("mooncake")
    if pkg is None:
        pkg = types.ModuleType("mooncake")
        pkg.__path__ = []  # a package, so `mooncake.store` imports
        sys.modules["mooncake"] = pkg
    this = sys.modules[__name__]
    pkg.store = this
    sys.modules["mooncake.store"] = this


__all__ = [
    "MooncakeDistributedStore",
    "ReplicateConfig",
    "SoftPinAction",
    "BufferHandle",
    "MooncakeConfig",
    "install_import_shim",
    "parse_size",
]
