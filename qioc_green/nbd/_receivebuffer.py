"""Bytes received and not yet parsed, held as views (payloads are never copied here)."""

from __future__ import annotations

from collections import deque


class ReceiveBuffer:
    """Bytes received and not yet parsed: a queue of views into the objects the glue passed in.

    Headers are small and are joined when they straddle two pieces; payloads are handed out
    as views (``take_view``), so they are never copied here.
    """

    __slots__ = ("_chunks", "size")

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self.size = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse a mutable buffer: keep our own copy
        if data:
            self._chunks.append(memoryview(data))
            self.size += len(data)

    def peek(self, n: int) -> bytes | memoryview:
        """The first ``n`` bytes (caller checked ``size >= n``), without consuming them."""
        if not n:
            return b""
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        parts = []
        need = n
        for chunk in self._chunks:
            parts.append(chunk[:need])
            need -= len(parts[-1])
            if not need:
                break
        return b"".join(parts)

    def skip(self, n: int) -> None:
        self.size -= n
        chunks = self._chunks
        while n:
            first = chunks[0]
            if len(first) > n:
                chunks[0] = first[n:]
                return
            n -= len(first)
            chunks.popleft()

    def take(self, n: int) -> bytes:
        data = bytes(self.peek(n))
        self.skip(n)
        return data

    def take_view(self, n: int) -> memoryview:
        """Up to ``n`` bytes from the first piece, as a view (never copied)."""
        first = self._chunks[0]
        if len(first) > n:
            self._chunks[0] = first[n:]
            view = first[:n]
        else:
            self._chunks.popleft()
            view = first
        self.size -= len(view)
        return view

    def take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self.size = 0
        return data

