"""Buffer-protocol objects as (address, length), without copying.

The native layer moves bytes between caller memory given by address and the storage nodes.
Python objects that expose the buffer protocol (bytes, bytearray, memoryview, numpy arrays,
mmap, ...) are turned into addresses here through the C API's ``PyObject_GetBuffer``, called
with ctypes so the extension can stay on the stable ABI (whose buffer API starts at 3.11).
A :class:`Pinned` holds every export until it is closed, so the memory cannot move or be
freed while a transfer uses it (a bytearray cannot resize, an array's memory stays alive).

Only C-contiguous buffers are accepted: a transfer is a byte range. A non-contiguous view
(``arr[:, ::2]``) is refused with a ``BufferError`` naming the problem.
"""

from __future__ import annotations

import ctypes
from typing import List, Sequence, Tuple

PyBUF_SIMPLE = 0
PyBUF_WRITABLE = 0x0001


class _Py_buffer(ctypes.Structure):
    # The layout of CPython's Py_buffer, unchanged since Python 3.3.
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
        ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Py_buffer)]
_release_buffer.restype = None


class Pinned:
    """Buffer exports held open; ``close()`` (or leaving the ``with``) releases them."""

    __slots__ = ("_views",)

    def __init__(self) -> None:
        self._views: List[_Py_buffer] = []

    def add(self, obj: object, writable: bool) -> Tuple[int, int]:
        """Exports ``obj``'s buffer and returns its (address, length)."""
        view = _Py_buffer()
        flags = PyBUF_WRITABLE if writable else PyBUF_SIMPLE
        try:
            _get_buffer(obj, ctypes.byref(view), flags)
        except (BufferError, ValueError) as e:
            what = type(obj).__name__
            need = "a writable, C-contiguous" if writable else "a C-contiguous"
            raise BufferError(f"{what} is not {need} buffer ({e})") from None
        except TypeError:
            raise TypeError(
                f"expected a buffer (bytes, bytearray, memoryview, numpy array), "
                f"got {type(obj).__name__}"
            ) from None
        self._views.append(view)
        return view.buf or 0, view.len

    def close(self) -> None:
        views, self._views = self._views, []
        for v in views:
            _release_buffer(ctypes.byref(v))

    def __enter__(self) -> "Pinned":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def flat(
    pinned: Pinned, buffers: Sequence[Sequence[object]], writable: bool
) -> Tuple[List[int], List[int], List[int]]:
    """Exports every buffer of every item: flat ``ptrs``, ``sizes`` and per-item ``counts``."""
    ptrs: List[int] = []
    sizes: List[int] = []
    counts: List[int] = []
    for item in buffers:
        counts.append(len(item))
        for b in item:
            p, n = pinned.add(b, writable)
            ptrs.append(p)
            sizes.append(n)
    return ptrs, sizes, counts
