"""kvpool: a multi-level KV-cache pool for LLM inference, from Python.

- :class:`kvpool.Client`: put / get / exists / remove and their batches, over any
  buffer-protocol object or raw addresses, zero-copy, GIL released.
- :mod:`kvpool.mooncake`: ``MooncakeDistributedStore``, a drop-in for Mooncake's class.
- :mod:`kvpool.sglang`: ``KVPoolStorage``, an SGLang HiCache storage backend.
- :mod:`kvpool.errors`: the typed exceptions.
- :mod:`kvpool.metrics`: the connectors' counters, and a ``/metrics`` endpoint for them.

Start a pool with ``kvpool up`` (``./scripts/up.sh``); see ``docs/python.md``.
"""

from . import _native
from .client import Client
from .errors import (
    AlreadyExistsError,
    BufferTooSmallError,
    BusyError,
    CorruptError,
    InvalidArgumentError,
    KvpoolError,
    NoSpaceError,
    NotFoundError,
    ProtocolError,
    UnauthorizedError,
    UnavailableError,
)

__version__ = _native.__version__

__all__ = [
    "Client",
    "KvpoolError",
    "NotFoundError",
    "AlreadyExistsError",
    "BusyError",
    "InvalidArgumentError",
    "BufferTooSmallError",
    "NoSpaceError",
    "UnavailableError",
    "UnauthorizedError",
    "CorruptError",
    "ProtocolError",
]
