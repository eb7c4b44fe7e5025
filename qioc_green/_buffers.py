"""Buffer lists, for the channel base and the channel kinds: QEMU's ``iov`` helpers.

A buffer is anything with the buffer protocol (bytes, bytearray, memoryview, array, mmap).  The
channel hooks receive lists of flat, non-empty ``memoryview``s made by ``views()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Buffer = Any  # bytes-like: bytes, bytearray, memoryview, array, mmap


def views(buffers: Iterable[Buffer]) -> list[memoryview]:
    """Flat byte views of ``buffers``, empty ones dropped."""
    return [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]


def writable_views(buffers: Iterable[Buffer], name: str) -> list[memoryview]:
    """``views()`` for a read: TypeError naming the channel for a read-only buffer that is not
    empty (the same error on the compiled hot path and on pure Python, before anything is read;
    empty ones are dropped as before)."""
    out = []
    for b in buffers:
        v = memoryview(b).cast("B")
        if len(v):
            if v.readonly:
                raise read_only(name, b)
            out.append(v)
    return out


def read_only(name: str, buf: Buffer) -> TypeError:
    return TypeError(f"{name}: a read needs writable buffers, not a read-only {type(buf).__name__}")


def nbytes(buffers: Iterable[memoryview]) -> int:
    return sum(len(v) for v in buffers)


def advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop ``n`` bytes from the front of a view list (QEMU's ``iov_discard_front``)."""
    i = 0
    while n:
        length = len(bufs[i])
        if n >= length:
            n -= length
            i += 1
        else:
            bufs[i] = bufs[i][n:]
            n = 0
    return bufs[i:]


def head(buffers: Iterable[Buffer], n: int) -> bytes:
    """The first ``n`` bytes held by ``buffers``, as one bytes object."""
    out = bytearray()
    for b in buffers:
        if len(out) >= n:
            break
        out += memoryview(b).cast("B")[: n - len(out)]
    return bytes(out)


def fill(bufs: list[memoryview], data: bytes) -> int:
    """Copy as much of ``data`` as fits into ``bufs``; return how much."""
    pos = 0
    for b in bufs:
        if pos == len(data):
            break
        k = min(len(b), len(data) - pos)
        b[:k] = data[pos:pos + k]
        pos += k
    return pos


__all__ = ["Buffer", "advance", "fill", "head", "nbytes", "read_only", "views", "writable_views"]
