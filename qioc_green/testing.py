"""Helpers for testing channels: the conformance routine every kind runs, a scripted channel for
error paths, and a way to see which thread saw an fd become ready.

The conformance routine is QEMU's ``tests/unit/io-channel-helpers.c`` idea: 1 MB in 250 buffers of
4194 bytes, each filled with its index, written by one greenlet and read by another at once,
compared at the end.  ``placement`` says where the two run:

* ``"one-hub"``: both in the calling thread;
* ``"two-iothreads"``: reader and writer each in its own IOThread, the channel(s) following;
* ``"iohandler"``: reader in an IOThread on a channel that has not opted in to follow.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import _hub
from ._buffers import advance
from ._context import current_context
from .channel import Channel, IOCondition
from .errors import WouldBlock
from .threads import IOThread

NBUFFERS = 250
BUFLEN = 4194  # 250 * 4194 = 1,048,500 bytes, as in QEMU's helper


def pattern_buffers(nbuffers: int = NBUFFERS, buflen: int = BUFLEN) -> list[bytes]:
    """Buffer i is filled with the byte i % 256."""
    return [bytes([i % 256]) * buflen for i in range(nbuffers)]


def _write_all_nonblocking(ch: Channel, buffers: Sequence[bytes]) -> None:
    views = [memoryview(b) for b in buffers]
    while views:
        try:
            n = ch.writev(views)
        except WouldBlock:
            ch.yield_(IOCondition.OUT)
            continue
        views = advance(views, n)


def _read_all_nonblocking(ch: Channel, buffers: Sequence[bytearray]) -> None:
    views = [memoryview(b) for b in buffers]
    while views:
        try:
            n = ch.readv(views)
        except WouldBlock:
            ch.yield_(IOCondition.IN)
            continue
        if n == 0:
            raise EOFError("eof before all data was read")
        views = advance(views, n)


def run_pattern(writer: Channel, reader: Channel, *, blocking: bool = True, placement: str = "one-hub",
                timeout: float = 30.0, after_write: Callable[[Channel], None] | None = None) -> dict[str, Any]:
    """Send the pattern through ``writer`` and read it from ``reader`` at once; verify it.

    ``after_write(writer)`` runs in the writer's greenlet when it is done (e.g. a half-close).
    Returns where things ran: ``{"reader_thread": ..., "writer_thread": ...}``.  Raises
    AssertionError on a mismatch.  ``writer`` and ``reader`` may be the same channel.
    """
    src = pattern_buffers()
    dst = [bytearray(BUFLEN) for _ in range(NBUFFERS)]
    where: dict[str, Any] = {}

    def write() -> None:
        writer.set_blocking(blocking)
        if blocking:
            writer.writev_all(src)
        else:
            _write_all_nonblocking(writer, src)
        where["writer_thread"] = _hub.thread_name()
        if after_write is not None:
            after_write(writer)

    def read() -> None:
        reader.set_blocking(blocking)
        if blocking:
            reader.readv_all(dst)
        else:
            _read_all_nonblocking(reader, dst)
        where["reader_thread"] = _hub.thread_name()

    def both(fw: Any, fr: Any) -> None:
        end = time.monotonic() + timeout
        try:
            fw.result(timeout)
            fr.result(max(end - time.monotonic(), 0.0))
        finally:
            fw.cancel()
            fr.cancel()

    if placement == "one-hub":
        for ch in (writer, reader):
            ch.set_follow_coroutine_ctx(True)
        here = current_context()
        both(here.spawn(write), here.spawn(read))
    elif placement in ("two-iothreads", "iohandler"):
        follow = placement == "two-iothreads"
        for ch in (writer, reader):
            ch.set_follow_coroutine_ctx(follow)
        with IOThread("pattern-reader") as tr, IOThread("pattern-writer") as tw:
            fr = tr.context.spawn(read)
            both(tw.context.spawn(write), fr)
    else:
        raise ValueError(f"unknown placement {placement!r}")
    for i, (want, got) in enumerate(zip(src, dst)):
        if want != got:
            raise AssertionError(f"buffer {i} differs after the transfer")
    return where


@contextlib.contextmanager
def trace_readiness() -> Iterator[list[tuple[str, int, int]]]:
    """Record ``(thread name, fd, events)`` each time a hub sees a waited-on fd become ready."""
    seen: list[tuple[str, int, int]] = []
    lock = _hub.OSLock()

    def tr(fd: int, events: int) -> None:
        with lock:
            seen.append((_hub.thread_name(), fd, events))

    previous = _hub.trace
    _hub.trace = tr
    try:
        yield seen
    finally:
        _hub.trace = previous


class ScriptedChannel(Channel):
    """A channel whose hooks play a script, for the error paths real kernels rarely show.

    ``reads`` and ``writes`` are lists of steps: bytes (a read returns them; for writes, an int
    says how many bytes to accept), ``"eagain"`` (would block; the wait returns at once),
    ``"eintr"``, ``"eof"``, or an OSError instance to raise.  An exhausted read script is EOF; an
    exhausted write script accepts everything.  ``written`` collects what was accepted.
    """

    kind = "scripted"

    def __init__(self, reads: Sequence[Any] = (), writes: Sequence[Any] = (), *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.reads = list(reads)
        self.writes = list(writes)
        self.written = bytearray()

    def _io_fd(self, cond: IOCondition) -> int | None:
        return None

    def _step(self, script: list[Any]) -> Any:
        step = script.pop(0) if script else None
        if step == "eagain":
            raise BlockingIOError(11, "scripted EAGAIN")
        if step == "eintr":
            raise InterruptedError(4, "scripted EINTR")
        if isinstance(step, OSError):
            raise step
        return step

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        step = self._step(self.reads)
        if step is None or step == "eof":
            return 0, []
        data = bytes(step)
        room = sum(len(b) for b in buffers)
        if len(data) > room:  # keep what does not fit for the next read
            self.reads.insert(0, data[room:])
            data = data[:room]
        pos = 0
        for b in buffers:
            chunk = data[pos:pos + len(b)]
            b[: len(chunk)] = chunk
            pos += len(chunk)
            if pos == len(data):
                break
        return len(data), []

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        step = self._step(self.writes)
        data = b"".join(bytes(b) for b in buffers)
        n = len(data) if step is None else min(int(step), len(data))
        self.written += data[:n]
        return n


__all__ = ["BUFLEN", "NBUFFERS", "ScriptedChannel", "pattern_buffers", "run_pattern", "trace_readiness"]
