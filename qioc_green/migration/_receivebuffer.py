"""The parser's input: fed chunks held as views, contiguous reads across chunk ends.

A fed chunk is kept as a memoryview (never copied) until :meth:`ReceiveBuffer._starve` says
NEED_DATA; only an item cut by a chunk end is joined (a header, a few hundred bytes at most).
:class:`Cursor` reads one item from contiguous bytes and raises :class:`Short` when they run out,
so an item is parsed all or nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

from ._format import BE16, BE32, BE64, NEED_DATA, MigrationStreamError, NeedData

T = TypeVar("T")
#: :meth:`ReceiveBuffer._item`'s "input ran out" (distinct from any parse result)
SHORT = object()


class Short(Exception):
    """An item needs ``need`` contiguous bytes from its start; fewer are there."""

    def __init__(self, need: int) -> None:
        self.need = need


class Cursor:
    """Reads one item from contiguous bytes; raises _Short when they run out."""

    __slots__ = ("base", "buf", "pos", "start")

    def __init__(self, buf: memoryview, pos: int, base: int) -> None:
        self.buf = buf
        self.start = pos
        self.pos = pos
        self.base = base

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _have(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise Short(self.pos + n - self.start)

    def u8(self) -> int:
        self._have(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def peek_u8(self) -> int:
        self._have(1)
        return self.buf[self.pos]

    def be16(self) -> int:
        self._have(2)
        (v,) = BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def be32(self) -> int:
        self._have(4)
        (v,) = BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def be64(self) -> int:
        self._have(8)
        (v,) = BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def peek_be64(self) -> int:
        self._have(8)
        (v,) = BE64.unpack_from(self.buf, self.pos)
        return v

    def take(self, n: int) -> bytes:
        self._have(n)
        v = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return v

    def string(self, what: str) -> str:
        """A byte length and that many bytes, as text (QEMU idstrs are ASCII)."""
        at = self.offset
        n = self.u8()
        if n == 0:
            raise MigrationStreamError(at, f"{what} has length 0")
        return self.take(n).decode("utf-8", "backslashreplace")


class ReceiveBuffer:
    """The input half of the parser: the current chunk, its stream offset, the chunks after it.

    Subclassed by the parser; its methods never block or switch greenlets.
    """

    def __init__(self) -> None:
        self._buf = memoryview(b"")
        self._pos = 0
        self._base = 0
        self._more: deque[memoryview] = deque()
        self._closed = False

    @property
    def offset(self) -> int:
        """Stream bytes parsed so far."""
        return self._base + self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input. The parser keeps a view of ``data`` until next_event() says NEED_DATA.

        Never blocks. Raises ``RuntimeError`` after close().
        """
        if self._closed:
            raise RuntimeError("feed() after close()")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view):
            self._more.append(view)

    def _err(self, message: str, offset: int | None = None) -> MigrationStreamError:
        return MigrationStreamError(self.offset if offset is None else offset, message)

    def _next_chunk(self) -> bool:
        """Make the current chunk non-empty if any input is pending."""
        while self._pos >= len(self._buf):
            if not self._more:
                return False
            self._base += len(self._buf)
            self._buf = self._more.popleft()
            self._pos = 0
        return True

    def _ensure(self, n: int) -> bool:
        """Make n bytes contiguous at the current position (copying only across chunks)."""
        if len(self._buf) - self._pos >= n:
            return True
        self._next_chunk()
        if len(self._buf) - self._pos >= n:
            return True
        have = len(self._buf) - self._pos + sum(map(len, self._more))
        parts = [self._buf[self._pos :]]
        got = len(parts[0])
        while self._more and got < n:
            c = self._more.popleft()
            if got + len(c) > n:
                cut = n - got
                parts.append(c[:cut])
                self._more.appendleft(c[cut:])
                got = n
            else:
                parts.append(c)
                got += len(c)
        self._base += self._pos
        self._buf = memoryview(b"".join(parts))
        self._pos = 0
        return have >= n

    def _starve(self, what: str) -> NeedData:
        """Out of input while expecting ``what``: NEED_DATA, or an error after close()."""
        if self._closed:
            raise self._err(f"stream ends inside {what}")
        # drop every reference to the caller's buffers: copy the few bytes left over
        rest = bytes(self._buf[self._pos :]) + b"".join(self._more)
        self._more.clear()
        self._base += self._pos
        self._buf = memoryview(rest)
        self._pos = 0
        return NEED_DATA

    def _item(self, parse: Callable[[Cursor], T]) -> T | object:
        """Run ``parse`` on contiguous input; return its result, or _SHORT if input ran out."""
        while True:
            cur = Cursor(self._buf, self._pos, self._base)
            try:
                result = parse(cur)
            except Short as short:
                if not self._ensure(short.need):
                    return SHORT
                continue
            self._pos = cur.pos
            return result
