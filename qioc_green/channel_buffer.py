"""BufferChannel and NullChannel: in-memory channels that never wait.

QEMU: ``io/channel-buffer.c`` (a growable, seekable buffer: writes land at the position and grow
it; reads take from the position to the end and give EOF there) and ``io/channel-null.c``
(writes vanish, reads give EOF).  Their watches are always ready.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ._buffers import Buffer
from .channel import Channel, Feature, IOCondition


class BufferChannel(Channel):
    """An in-memory, growable, seekable channel.  ``getvalue()`` returns its contents."""

    kind = "buffer"

    def __init__(self, data: Buffer = b"", *, name: str | None = None) -> None:
        super().__init__(name=name, features=Feature.SEEKABLE)
        self._data = bytearray(data)
        self._offset = 0

    def getvalue(self) -> bytes:
        return bytes(self._data)

    @property
    def position(self) -> int:
        return self._offset

    def __len__(self) -> int:
        return len(self._data)

    def _io_fd(self, cond: IOCondition) -> int | None:
        return None

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        data = self._data
        pos = self._offset
        total = 0
        for buf in buffers:
            chunk = min(len(buf), len(data) - pos)
            if chunk <= 0:
                break
            buf[:chunk] = data[pos:pos + chunk]
            pos += chunk
            total += chunk
        if not flags:  # MSG_PEEK leaves the position alone
            self._offset = pos
        return total, []

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        data = self._data
        pos = self._offset
        if pos > len(data):
            data.extend(bytes(pos - len(data)))
        total = 0
        for buf in buffers:
            n = len(buf)
            data[pos:pos + n] = buf
            pos += n
            total += n
        self._offset = pos
        return total

    def _io_seek(self, offset: int, whence: int) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._offset, os.SEEK_END: len(self._data)}.get(whence)
        if base is None:
            raise ValueError(f"{self.name}: unsupported whence {whence}")
        pos = base + offset
        if pos < 0:
            raise ValueError(f"{self.name}: negative position {pos}")
        self._offset = pos
        return pos


class NullChannel(Channel):
    """Writes vanish, reads give EOF; never waits.  QEMU: ``qio_channel_null_new()``."""

    kind = "null"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def _io_fd(self, cond: IOCondition) -> int | None:
        return None

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        return 0, []

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        return sum(len(b) for b in buffers)


__all__ = ["BufferChannel", "NullChannel"]
