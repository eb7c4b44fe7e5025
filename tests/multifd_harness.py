"""A test-only multifd receiver: the sans-IO parsers driven by qioc_green's public channels.

A stepping stone for the tests, which the receiver's own multifd support (issue 10) replaces.
It takes the main channel and N multifd channels on one listening channel, in whatever order
they connect, tells them apart by their first 4 bytes (``sniff_channel``, as QEMU's
``migration_ioc_process_incoming`` does), and reads each in its own IOThread: the main stream
with the migration stream parser, each multifd channel with a ``MultifdParser``. RAM goes to one
sparse file per block in ``ram_dir`` with positional writes. The sync protocol is QEMU's
(``multifd_recv_sync_main``): a channel that reads its k-th SYNC packet waits until the main
stream has reached its k-th MULTIFD_FLUSH, and the main stream waits there until every channel
has read its k-th SYNC, so no page of a later round is written before one of an earlier round.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import qioc_green as q
from qioc_green.migration import (
    NEED_BLOCKS,
    NEED_DATA,
    ChannelEnd,
    ChannelInit,
    Configuration,
    MultifdChannels,
    MultifdParser,
    RamBlocks,
    RamFlush,
    RamPacket,
    RamPages,
    StreamEnd,
    StreamParser,
    SyncPacket,
    ZeroPages,
    sniff_channel,
)

READ_SIZE = 1 << 20


@dataclass
class ChannelReport:
    """What one connection carried and which thread read it."""

    kind: str  # "main" or "multifd"
    connection: str
    thread: str = ""
    channel_id: int | None = None
    bytes: int = 0
    packets: int = 0
    syncs: int = 0  # SYNC packets (multifd) or MULTIFD_FLUSH records (main)


@dataclass
class Received:
    blocks: dict[str, int]
    reports: list[ChannelReport]
    machine: str = ""
    capabilities: tuple[str, ...] = ()
    described: bool = False


def block_path(ram_dir: str, name: str) -> str:
    """Where the harness writes RAM block ``name``."""
    return os.path.join(ram_dir, urllib.parse.quote(name, safe=""))


class _SyncPoints:
    """QEMU's sync between the main stream and the multifd channels (see the module notes)."""

    def __init__(self, channels: int, timeout: float) -> None:
        self.channels = channels
        self.timeout = timeout
        self._lock = threading.Lock()
        self._arrived: dict[int, int] = {}
        self._events: dict[int, tuple[q.Event, q.Event]] = {}
        self.failed = False

    def _pair(self, k: int) -> tuple[q.Event, q.Event]:
        with self._lock:
            if k not in self._events:
                self._events[k] = (q.Event(), q.Event())
            return self._events[k]

    def channel(self, k: int, name: str) -> None:
        all_in, released = self._pair(k)
        with self._lock:
            self._arrived[k] = self._arrived.get(k, 0) + 1
            everyone = self._arrived[k] == self.channels
        if everyone:
            all_in.set()
        if not released.wait(self.timeout) or self.failed:
            raise RuntimeError(f"{name}: sync {k}: the main stream never reached its flush {k}")

    def main(self, k: int) -> None:
        all_in, released = self._pair(k)
        if not all_in.wait(self.timeout) or self.failed:
            raise RuntimeError(f"main stream: flush {k}: only {self._arrived.get(k, 0)} of "
                               f"{self.channels} multifd channels reached their sync {k}")
        released.set()

    def fail(self) -> None:
        self.failed = True
        with self._lock:
            pairs = list(self._events.values())
        for a, b in pairs:
            a.set()
            b.set()


class _Ram:
    """One sparse file per RAM block; positional writes from any thread."""

    def __init__(self, ram_dir: str) -> None:
        self.ram_dir = ram_dir
        self.fds: dict[str, int] = {}
        self._zero = bytes(512 * 1024)

    def open(self, blocks: dict[str, int]) -> None:
        for name, size in blocks.items():
            fd = os.open(block_path(self.ram_dir, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, size)
            self.fds[name] = fd

    def write(self, block: str, offsets: tuple[int, ...], iov: list[memoryview], ps: int) -> None:
        fd = self.fds[block]
        i = 0
        while i < len(offsets):  # one pwritev per run of consecutive pages
            j = i + 1
            while j < len(offsets) and offsets[j] == offsets[j - 1] + ps:
                j += 1
            os.pwritev(fd, iov[i:j], offsets[i])
            i = j

    def zero(self, block: str, offsets: tuple[int, ...], ps: int) -> None:
        fd = self.fds[block]
        for off in offsets:
            os.pwrite(fd, self._zero[:ps], off)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _read_main(ch: q.SocketChannel, first: bytes, state: _State, report: ChannelReport) -> None:
    report.thread = threading.current_thread().name
    parser = StreamParser()
    parser.feed(first)
    buf = bytearray(READ_SIZE)
    report.bytes = len(first)
    eof = False
    while True:
        while (ev := parser.next_event()) is not NEED_DATA:
            if isinstance(ev, Configuration):
                state.received.machine = ev.machine
                state.received.capabilities = ev.capabilities
                state.page_size = 1 << ev.target_page_bits if ev.target_page_bits else 4096
                if ev.uuid is not None:
                    state.registry.set_uuid(ev.uuid)
                state.config_ready.set()
            elif isinstance(ev, RamBlocks):
                blocks = {b.name: b.size for b in ev.blocks}
                state.ram.open(blocks)
                state.received.blocks = blocks
                state.blocks_ready.set()
            elif isinstance(ev, RamPages):
                state.ram.write(ev.block, tuple(o for o, _ in ev.pages()), ev.iov(), ev.page_size)
            elif isinstance(ev, ZeroPages):
                if ev.fill:
                    raise RuntimeError("main stream: ZERO record with a non-zero fill")
                state.ram.zero(ev.block, tuple(range(ev.offset, ev.offset + ev.count * ev.page_size,
                                                     ev.page_size)), ev.page_size)
            elif isinstance(ev, RamFlush):
                report.syncs += 1
                state.sync.main(report.syncs)
            elif isinstance(ev, StreamEnd):
                state.received.described = ev.described
        if eof:
            return
        n = ch.readinto(buf)
        report.bytes += n
        if n == 0:
            parser.close()
            eof = True
        else:
            parser.feed(memoryview(buf)[:n])


def _read_multifd(ch: q.SocketChannel, first: bytes, state: _State, report: ChannelReport) -> None:
    report.thread = threading.current_thread().name
    if not state.config_ready.wait(state.timeout):
        raise RuntimeError(f"{ch.name}: the main stream's configuration never came")
    parser = MultifdParser(name=ch.name, page_size=state.page_size)
    parser.feed(first)
    buf = bytearray(READ_SIZE)
    report.bytes = len(first)
    eof = False
    while True:
        while (ev := parser.next_event()) is not NEED_DATA:
            if ev is NEED_BLOCKS:
                if not state.blocks_ready.wait(state.timeout):
                    raise RuntimeError(f"{parser.name}: the main stream never listed its RAM blocks")
                parser.set_blocks(state.received.blocks)
            elif isinstance(ev, ChannelInit):
                state.registry.register(ev, ch.name)
                report.channel_id = ev.channel_id
            elif isinstance(ev, RamPacket):
                state.ram.write(ev.block, ev.normal, ev.iov(), ev.page_size)
                state.ram.zero(ev.block, ev.zero, ev.page_size)
            elif isinstance(ev, SyncPacket):
                state.sync.channel(parser.syncs, parser.name)
            elif isinstance(ev, ChannelEnd):
                report.packets, report.syncs = ev.packets, ev.syncs
        if eof:
            return
        n = ch.readinto(buf)
        report.bytes += n
        if n == 0:
            parser.close()
            eof = True
        else:
            parser.feed(memoryview(buf)[:n])


@dataclass
class _State:
    ram: _Ram
    registry: MultifdChannels
    sync: _SyncPoints
    timeout: float
    received: Received = field(default_factory=lambda: Received({}, []))
    page_size: int = 4096
    config_ready: q.Event = field(default_factory=q.Event)
    blocks_ready: q.Event = field(default_factory=q.Event)


def receive(listener: q.SocketChannel, *, channels: int, ram_dir: str,
            timeout: float = 30.0) -> Received:
    """Accept the main channel and ``channels`` multifd channels, read them to their ends, and
    return what came. May park the caller (accepting); raises the first error any channel hit,
    after closing every channel and stopping every IOThread."""
    deadline = time.monotonic() + timeout
    state = _State(_Ram(ram_dir), MultifdChannels(channels), _SyncPoints(channels, timeout), timeout)
    conns: list[q.SocketChannel] = []
    threads: list[q.IOThread] = []
    done: q.Queue[BaseException | None] = q.Queue()

    def run(reader: Any, *args: Any) -> None:
        try:
            reader(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to receive(), which raises it
            done.put(exc)
        else:
            done.put(None)

    errors: list[BaseException] = []

    def failed(exc: BaseException) -> None:
        errors.append(exc)
        state.sync.fail()  # wake whoever waits at a sync point
        for c in conns:
            c.close()  # wake whoever waits on a channel

    try:
        mains = 0
        for k in range(channels + 1):
            ch = listener.accept(timeout=max(0.0, deadline - time.monotonic()),
                                 name=f"connection {k}")
            ch.set_follow_coroutine_ctx(True)  # waits park on the reading IOThread's hub
            conns.append(ch)
            first = ch.read_all(4, timeout=max(0.0, deadline - time.monotonic()))
            kind = sniff_channel(first, ch.name)
            if kind == "main":
                mains += 1
                if mains > 1:
                    raise RuntimeError(f"{ch.name}: a second main stream")
            report = ChannelReport(str(kind), ch.name)
            state.received.reports.append(report)
            t = q.IOThread(f"{kind}-{k}").start()
            threads.append(t)
            t.context.spawn(run, _read_main if kind == "main" else _read_multifd, ch, first, state,
                            report)
        for _ in threads:  # in the order they end: the first error stops the others
            exc = done.get(max(0.0, deadline - time.monotonic()))
            if exc is not None and not errors:
                failed(exc)
        if errors:
            raise errors[0]
        missing = state.registry.missing
        if missing:
            raise RuntimeError(f"multifd channels {missing} never connected")
        return state.received
    finally:
        state.sync.fail()
        for c in conns:
            c.close()
        for t in threads:
            t.stop()
        state.ram.close()
