"""Typed exceptions of :class:`kvpool.Client`.

Every failure carries the pool's stable error code (``code``, a number, and ``name``, as in
``docs/error-codes.md``) and a message that names the bad input. Catch :class:`KvpoolError`
for all of them, or a subclass for one kind.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

from . import _native


class KvpoolError(Exception):
    """A kvpool operation failed. ``code`` and ``name`` are the pool's stable error code."""

    code: int = 0
    name: str = "Unknown"

    def __init__(self, message: str, code: int | None = None, name: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if name is not None:
            self.name = name

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFoundError(KvpoolError, KeyError):
    """The key is not in the pool."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class AlreadyExistsError(KvpoolError):
    """The key already has a committed value (put without ``overwrite``)."""


class BusyError(KvpoolError):
    """The key is being written, or is leased or pinned: retry later, or force."""


class InvalidArgumentError(KvpoolError, ValueError):
    """A key, value, buffer or option is invalid (the message names which)."""


class BufferTooSmallError(InvalidArgumentError):
    """The destination buffer cannot hold the value."""


class NoSpaceError(KvpoolError):
    """No segment had room for the value, even after eviction; or the pool has no segment."""


class UnavailableError(KvpoolError, ConnectionError):
    """The master or a storage node could not be reached in time, or no master leads."""


class UnauthorizedError(KvpoolError, PermissionError):
    """The cluster token is missing or wrong."""


class CorruptError(KvpoolError):
    """The bytes read did not match what was written, or the read lease expired."""


class ProtocolError(KvpoolError):
    """A peer sent something this build cannot understand (version, opcode, frame)."""


#: The pool's error codes: name -> number (from the Rust side, the single source of truth).
CODES: Dict[str, int] = {name: num for num, name in _native.error_codes()}

_BY_NAME: Dict[str, Type[KvpoolError]] = {
    "NotFound": NotFoundError,
    "AlreadyExists": AlreadyExistsError,
    "Processing": BusyError,
    "HasLease": BusyError,
    "Pinned": BusyError,
    "NotWriter": BusyError,
    "KeyTooLong": InvalidArgumentError,
    "ValueTooLarge": InvalidArgumentError,
    "InvalidArgument": InvalidArgumentError,
    "BufferTooSmall": BufferTooSmallError,
    "NoSpace": NoSpaceError,
    "NoSpaceYet": NoSpaceError,
    "NoSegment": NoSpaceError,
    "Timeout": UnavailableError,
    "ConnectionClosed": UnavailableError,
    "Io": UnavailableError,
    # A transport forced in the config (`KVPOOL_TRANSPORT=rdma`) that a node cannot use.
    "TransportUnsupported": UnavailableError,
    "NotLeader": UnavailableError,
    "NodeDead": UnavailableError,
    "UnknownNode": UnavailableError,
    "NeedRegister": UnavailableError,
    "Unauthorized": UnauthorizedError,
    "ChecksumMismatch": CorruptError,
    "LeaseExpired": CorruptError,
    "BadMagic": ProtocolError,
    "UnsupportedVersion": ProtocolError,
    "UnknownOpcode": ProtocolError,
    "FrameTooLarge": ProtocolError,
    "MalformedBody": ProtocolError,
    "Truncated": ProtocolError,
    "BadHeaderChecksum": ProtocolError,
    "WrongService": ProtocolError,
}

Failure = Tuple[int, str, str]


def is_failure(item: object) -> bool:
    """Whether a native batch entry is a failure tuple ``(code, name, message)``."""
    return type(item) is tuple


def from_failure(f: Failure) -> KvpoolError:
    """The typed exception for a native failure tuple."""
    code, name, message = f
    cls = _BY_NAME.get(name, KvpoolError)
    return cls(message, code=code, name=name)


def result(item):
    """A native batch entry as Python hands it out: the typed exception in a failure's place,
    anything else as it is."""
    return from_failure(item) if type(item) is tuple else item


def check(item):
    """Returns a native batch entry, raising it if it is a failure."""
    if type(item) is tuple:
        raise from_failure(item)
    return item


__all__ = [
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
    "CODES",
]
