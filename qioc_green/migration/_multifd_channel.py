"""One multifd channel of a migration, read in its own IOThread (the multifd receiver's part
that sees nearly every byte).

A :class:`ChannelReader` reads one connection that said it is a multifd channel: feeds a
:class:`~._multifd.MultifdParser`, checks the init packet against the other channels
(``MultifdChannels``), writes each packet's pages to the shared ``RamDir`` with positional
writes (one ``pwritev`` per run of consecutive pages: a packet is usually one run), meets the
main stream at every SYNC packet (``SyncPoints``), saves the channel's bytes and forwards them.
When the pages go nowhere (parsing only, over TCP) it reads each packet's header alone and
has the kernel drop the pages unread (``MSG_TRUNC``): the checks are the same, the copy gone.
With preallocated RAM files (``--ram-prealloc``) it reads headers the same way and receives
the pages straight into the mapped file at their offsets.
What it shares with the other readers it gets from the :class:`~._multifd_receiver.MultifdReceiver`
(``session``): the page size and RAM blocks the main stream announced, the registry, the sync
points, the RAM files, and whether another reader failed (then it stops at its next wait).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qioc_green import BrokenChannelError, Channel, FileChannel, IOCondition, SocketChannel

from ._events import RamPages, ZeroPages
from ._format import NEED_DATA
from ._multifd import MULTIFD_PACKET_SIZE, MultifdParser
from ._multifd_events import (
    NEED_BLOCKS,
    ChannelEnd,
    ChannelInit,
    DeviceStatePacket,
    MultifdError,
    PagesAhead,
    RamPacket,
    SyncPacket,
)
from ._multifd_sync import SyncFailed
from ._receiver import describe, set_rcvlowat
from ._sinks import Forwarder

if TYPE_CHECKING:
    from ._multifd_receiver import MultifdReceiver

TICK = 0.5  # s between checks for a failure elsewhere while waiting for the main stream
CHANNEL_WAIT = 0.005  # s: how long a channel reader waits for the low-water mark before it reads
#: "copy": read every channel through its buffer, even where the kernel could drop the pages
#: (the benchmark and the tests compare the two ways)
PAGES_ENV = "QIOC_MIGRATION_PAGES"


class Stopped(Exception):
    """A reader's one-line report, ready as it is (or ``stopped``: another reader failed)."""


def channel_path(save: str, j: int) -> str:
    """Where ``--save FILE`` puts the j-th multifd connection to arrive: ``FILE.multifd-J``."""
    return f"{save}.multifd-{j}"


@dataclass
class Connection:
    """One accepted connection: what it turned out to be, who read it, what it carried."""

    index: int
    # "main", "multifd", "unknown" (closed before saying), or "next" (the next migration's,
    # handed over to it with --keep-listening)
    kind: str = "unknown"
    iothread: str = ""
    channel_id: int | None = None
    bytes: int = 0
    forwarded: int = 0
    packets: int = 0
    syncs: int = 0
    compression: str | None = None
    sha256_in: str | None = None
    sha256_out: str | None = None
    blocks: dict[str, list[int]] = field(default_factory=dict)  # name -> [normal, zero] pages

    @property
    def name(self) -> str:
        if self.channel_id is not None:
            return f"multifd channel {self.channel_id}"
        return f"connection {self.index}"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "connection": self.index, "kind": self.kind, "iothread": self.iothread,
            "channel_id": self.channel_id, "bytes": self.bytes}
        if self.kind == "multifd":
            d.update(packets=self.packets, syncs=self.syncs, compression=self.compression,
                     normal_pages=sum(v[0] for v in self.blocks.values()),
                     zero_pages=sum(v[1] for v in self.blocks.values()))
        if self.forwarded:
            d["forwarded"] = self.forwarded
        if self.sha256_in is not None:
            d["sha256_in"] = self.sha256_in
        if self.sha256_out is not None:
            d["sha256_out"] = self.sha256_out
        return d


class ChannelReader:
    """Read multifd connection ``conn`` (the j-th to arrive) to its end, for ``session``."""

    def __init__(self, session: MultifdReceiver, conn: Connection, j: int) -> None:
        self.session = session
        self.conn = conn
        self.j = j
        self._packet: memoryview | None = None  # a packet's pages (--ram-prealloc, see _receive)

    def run(self, ch: Channel, prefix: bytes) -> None:
        """Read ``ch`` (its first bytes, ``prefix``, already taken) to its end. May park.
        Raises MultifdError (or Stopped) with the one-line report."""
        s = self.session
        conn = self.conn
        # the page size fixes the packet size: wait for the main stream's configuration
        while not s.config_ready.wait(TICK):
            pass
        if s.failed:
            raise Stopped("stopped")
        if (s.ram is None and not s.save and not s.digest and s.forward is None
                and isinstance(ch, SocketChannel) and _tcp(ch)
                and os.environ.get(PAGES_ENV) != "copy"):
            self._run_dropping(ch, prefix)
            return
        if (s.ram is not None and s.ram.preallocated and not s.save and not s.digest
                and s.forward is None and isinstance(ch, SocketChannel)
                and os.environ.get(PAGES_ENV) != "copy"):
            self._run_dropping(ch, prefix, into_ram=True)
            return
        parser = MultifdParser(name=conn.name, page_size=s.page_size,
                               compression=s.settings.multifd_compression)
        save = FileChannel.open(channel_path(s.save, self.j), "w",
                                name=f"save-multifd-{self.j}") if s.save else None
        fwd: Forwarder | None = None
        if s.forward is not None and not s.main_forward_open():
            raise Stopped("stopped")
        if s.forward is not None:
            fwd = Forwarder(s.forward, s.forward_context(conn).context, chunk=s.chunk,
                            buffers=s.buffers, digest=s.digest, connect=s.forward_connect)
        relay = _Relay(fwd)
        sha = hashlib.sha256() if s.digest else None
        own = memoryview(bytearray(s.chunk)) if fwd is None else None
        # Woken once packets are queued (see _low_water), and a lone SYNC packet (what ends a
        # round; the main stream waits for it) is read within CHANNEL_WAIT, not LOWAT_WAIT.
        wait = CHANNEL_WAIT if set_rcvlowat(ch, _low_water(parser, s.chunk)) else None
        carry = prefix
        received = 0
        finished = False
        try:
            while True:
                buf = fwd.acquire() if fwd is not None else None
                view = memoryview(buf) if buf is not None else own
                assert view is not None
                if carry:
                    n = len(carry)
                    view[:n] = carry
                    carry = b""
                else:
                    try:
                        n = ch.readinto(view, timeout=wait)
                    except TimeoutError:  # below the low-water mark: read what is there
                        if buf is not None:
                            relay.give_back(buf)
                        continue
                    except BrokenChannelError as exc:
                        raise MultifdError(parser.name, received,
                                           f"{describe(exc)}; {_what_was_cut(parser)}") from exc
                if n == 0:
                    if buf is not None:
                        relay.give_back(buf)
                    break
                s.touch()
                data = view[:n]
                if save is not None:
                    save.write_all(data)
                if sha is not None:
                    sha.update(data)
                relay.chunk(buf, n, received)
                parser.feed(data)
                received += n
                conn.bytes = received
                self._apply(parser, relay)
                relay.end_chunk()
            parser.close()
            self._apply(parser, relay)
            if fwd is not None:
                fwd.finish()
                finished = True
        finally:
            conn.compression = parser.compression
            if fwd is not None:
                if not finished:
                    fwd.abort()
                conn.forwarded = fwd.bytes_out
                conn.sha256_out = fwd.sha256
            if sha is not None:
                conn.sha256_in = sha.hexdigest()
            if save is not None:
                save.close()

    def _run_dropping(self, ch: SocketChannel, prefix: bytes, into_ram: bool = False) -> None:
        """Read a TCP channel whose pages go nowhere (no --ram-dir, --save, --digest or
        --forward) packet by packet: each header through the parser, never a byte past it (its
        ``want()``), then the packet's pages dropped by the kernel (``MSG_TRUNC``: TCP discards
        them without copying them to us). Every check is the same as when they are read.
        ``into_ram`` (--ram-prealloc, a socket of any family): the pages are received instead,
        straight into the preallocated block's mapped file at their offsets (``_receive``)."""
        s, conn = self.session, self.conn
        parser = MultifdParser(name=conn.name, page_size=s.page_size,
                               compression=s.settings.multifd_compression, take_pages=True)
        buf = memoryview(bytearray(s.chunk))
        wait = CHANNEL_WAIT if set_rcvlowat(ch, _low_water(parser, s.chunk)) else None
        # Our own fd for the socket: a close() of the channel from another thread (how a
        # failure elsewhere wakes this reader) cannot then hand its number to another file
        # under a recv; the reader still parks on the channel, which that close wakes.
        sock = ch.socket.dup()
        received = 0
        try:
            parser.feed(prefix)
            received = len(prefix)
            while True:
                while (ev := parser.next_event()) is not NEED_DATA:
                    if type(ev) is PagesAhead:
                        assert isinstance(ev, PagesAhead)
                        if into_ram:  # counts the pages
                            self._receive(ch, sock, wait, ev, parser.name)
                        else:
                            self._drop(ch, sock, buf, wait, ev, parser.name)
                            self._count(ev.block, ev.normal, ev.zero)
                        received += ev.remaining
                        conn.bytes = received
                        conn.packets += 1
                    else:
                        self._event(parser, ev, None)
                try:
                    n = ch.readinto(buf[: parser.want()], timeout=wait)
                except TimeoutError:  # below the low-water mark: read what is there
                    continue
                except BrokenChannelError as exc:
                    raise MultifdError(parser.name, received,
                                       f"{describe(exc)}; {_what_was_cut(parser)}") from exc
                if n == 0:
                    break
                s.touch()
                parser.feed(buf[:n])
                received += n
                conn.bytes = received
            parser.close()
            while (ev := parser.next_event()) is not NEED_DATA:
                self._event(parser, ev, None)
        finally:
            conn.compression = parser.compression
            sock.close()

    def _drop(self, ch: SocketChannel, sock: socket.socket, buf: memoryview, wait: float | None,
              ev: PagesAhead, name: str) -> None:
        """Discard the ``ev.remaining`` bytes of pages that follow on the channel (parking until
        they are there)."""
        self._recv_pages(ch, wait, ev, name, len(ev.head), ev.remaining, lambda done: sock.recv_into(
            buf, min(ev.remaining - done, len(buf)), socket.MSG_TRUNC))

    def _receive(self, ch: SocketChannel, sock: socket.socket, wait: float | None,
                 ev: PagesAhead, name: str) -> None:
        """Receive the packet's pages straight into the preallocated block's mapping, run by
        run (the part already read, ``ev.head``, copied first); a block that was not
        preallocated gets them through a packet-sized buffer and positional writes. Counts
        the pages; then the zero pages."""
        ram = self.session.ram
        assert ram is not None
        ps = ev.page_size
        m = ram.mapping(ev.block)
        if m is None:
            size = ev.size  # at most MULTIFD_PACKET_SIZE (the parser checks)
            if self._packet is None:
                self._packet = memoryview(bytearray(MULTIFD_PACKET_SIZE))
            buf = self._packet
            buf[: len(ev.head)] = ev.head
            self._recv_into(ch, sock, buf[len(ev.head) : size], wait, ev, len(ev.head), name)
            self._pages(RamPacket(ev.block, ev.normal, ev.zero, buf[:size], ps, ev.packet_num,
                                  "none", ev.offset))
            return
        head = ev.head
        pos = 0  # bytes of the packet's pages placed
        for start, count, _ in runs(ev.normal, ps):
            with m[start : start + count * ps] as dst:
                k = max(0, min(len(head) - pos, len(dst)))
                if k:
                    dst[:k] = head[pos : pos + k]
                self._recv_into(ch, sock, dst[k:], wait, ev, pos + k, name)
                pos += len(dst)
        self._count(ev.block, ev.normal, ev.zero)
        for start, count, _ in runs(ev.zero, ps):
            ram.zeros(ZeroPages(ev.block, start, count, 0, ps))

    def _recv_into(self, ch: SocketChannel, sock: socket.socket, dst: memoryview,
                   wait: float | None, ev: PagesAhead, placed: int, name: str) -> None:
        """Fill ``dst`` from the socket (parking until the bytes are there): the pages of
        ``ev`` from ``placed`` bytes in (``ev.head`` included)."""
        self._recv_pages(ch, wait, ev, name, placed, len(dst), lambda done: sock.recv_into(dst[done:]))

    def _recv_pages(self, ch: SocketChannel, wait: float | None, ev: PagesAhead, name: str,
                    placed: int, want: int, recv: Callable[[int], int]) -> None:
        """Take ``want`` bytes of ``ev``'s pages, ``placed`` bytes in (``ev.head`` included),
        with ``recv(done)`` (bytes taken; parking until they are there). A reset or EOF among
        them is one line naming the channel, the offset and the pages cut."""
        done = 0
        while done < want:
            try:
                k = recv(done)
            except BlockingIOError:
                try:
                    ch.yield_(IOCondition.IN, timeout=wait)
                except TimeoutError:
                    pass
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                raise MultifdError(
                    name, ev.at + placed + done,
                    f"{_read_failed(exc, ch.name)}; "
                    f"{_cut_pages(ev, placed + done - len(ev.head))}") from exc
            if k == 0:
                raise MultifdError(name, ev.at + placed + done,
                                   _cut_pages(ev, placed + done - len(ev.head)))
            self.session.touch()
            done += k

    def _apply(self, parser: MultifdParser, relay: _Relay) -> None:
        """Drain the parser: pages to RAM, the init packet checked, SYNCs met, the end noted."""
        while (ev := parser.next_event()) is not NEED_DATA:
            self._event(parser, ev, relay)

    def _event(self, parser: MultifdParser, ev: Any, relay: _Relay | None) -> None:
        """One event of the channel's parser (but PagesAhead: the packet reader's own)."""
        s, conn = self.session, self.conn
        if ev is NEED_BLOCKS:
            while not s.blocks_ready.wait(TICK):
                pass
            if s.failed:
                raise Stopped("stopped")
            parser.set_blocks(s.blocks)
            return
        t = type(ev)
        if t is RamPacket:
            assert isinstance(ev, RamPacket)
            self._pages(ev)
            conn.packets += 1
        elif t is SyncPacket:
            assert isinstance(ev, SyncPacket)
            conn.packets += 1
            conn.syncs += 1
            if relay is not None:
                relay.pass_on(parser.offset)
            try:
                s.sync.channel(parser.syncs, parser.name, ev.offset)
            except SyncFailed:
                raise Stopped("stopped") from None
        elif t is ChannelInit:
            assert isinstance(ev, ChannelInit)
            s.registry.register(ev, conn.name)
            conn.channel_id = ev.channel_id
            s.channel_in()
        elif t is ChannelEnd:
            assert isinstance(ev, ChannelEnd)
            s.sync.channel_ended(parser.name, ev.syncs, ev.offset)
        elif t is DeviceStatePacket:
            assert isinstance(ev, DeviceStatePacket)
            raise MultifdError(parser.name, ev.offset, "device-state packet (VFIO state, "
                               "x-migration-multifd-transfer) is not supported")

    def _count(self, block: str, normal: tuple[int, ...], zero: tuple[int, ...]) -> None:
        counts = self.conn.blocks.get(block)
        if counts is None:
            counts = self.conn.blocks[block] = [0, 0]
        counts[0] += len(normal)
        counts[1] += len(zero)

    def _pages(self, ev: RamPacket) -> None:
        """One packet's pages: runs of consecutive offsets, each one positional write."""
        self._count(ev.block, ev.normal, ev.zero)
        ram = self.session.ram
        if ram is None:
            return
        ps = ev.page_size
        for start, count, i in runs(ev.normal, ps):
            ram.pages(RamPages(ev.block, start, count, ev.data[i * ps : (i + count) * ps], ps, ps))
        for start, count, _ in runs(ev.zero, ps):
            ram.zeros(ZeroPages(ev.block, start, count, 0, ps))


def runs(offsets: tuple[int, ...], ps: int) -> list[tuple[int, int, int]]:
    """``(first offset, page count, index)`` of each run of consecutive pages."""
    n = len(offsets)
    if not n:
        return []
    first = offsets[0]
    if offsets[-1] == first + (n - 1) * ps and offsets == tuple(range(first, first + n * ps, ps)):
        return [(first, n, 0)]  # the usual packet: one run
    runs = []
    i = 0
    while i < n:
        j = i + 1
        while j < n and offsets[j] == offsets[j - 1] + ps:
            j += 1
        runs.append((offsets[i], j - i, i))
        i = j
    return runs


class _Relay:
    """A multifd channel's forwarding: the chunk being parsed, and how much of it is passed on.

    Channels hold nothing back (the main stream's end is what the destination waits for), but a
    chunk is passed on only once parsed, except that a reader about to park at a sync point
    passes on what it has parsed first (see the module notes).
    """

    def __init__(self, fwd: Forwarder | None) -> None:
        self.fwd = fwd
        self._buf: bytearray | None = None
        self._n = 0
        self._base = 0
        self._sent = 0

    def chunk(self, buf: bytearray | None, n: int, base: int) -> None:
        self._buf, self._n, self._base, self._sent = buf, n, base, 0

    def pass_on(self, parsed: int) -> None:
        end = min(parsed - self._base, self._n)
        if self.fwd is not None and self._buf is not None and end > self._sent:
            self.fwd.submit(self._buf, end, start=self._sent, release=False)
            self._sent = end

    def end_chunk(self) -> None:
        if self.fwd is not None and self._buf is not None:
            self.fwd.submit(self._buf, self._n, start=self._sent)
        self._buf = None

    def give_back(self, buf: bytearray) -> None:
        assert self.fwd is not None
        self.fwd.release(buf)


def _tcp(ch: SocketChannel) -> bool:
    return ch.socket.family in (socket.AF_INET, socket.AF_INET6)


def _low_water(parser: MultifdParser, chunk: int) -> int:
    """The receive low-water mark of a channel: four whole packets (headers and pages), or half
    the buffer. Woken for fewer bytes, a reader parks more often, and each wake is a hub switch
    and an ``epoll_wait`` (one packet's worth cost a parsing receiver about a quarter more CPU:
    docs/design-notes.md)."""
    return min(chunk // 2, 4 * (parser.packet_size + MULTIFD_PACKET_SIZE))


def _read_failed(exc: OSError, name: str) -> str:
    """A receive on the channel's socket that failed, as the channel's own read says it."""
    reset = exc.errno in (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE)
    return f"{name}: read failed: {'connection reset by peer' if reset else exc.strerror or exc}"


def _cut_pages(ev: PagesAhead, done: int) -> str:
    """What a channel that ends inside pages left to the kernel was in the middle of."""
    return (f"channel ends inside the payload of the packet at offset {ev.offset} "
            f"({len(ev.head) + done} of {ev.size} bytes)")


def _what_was_cut(parser: MultifdParser) -> str:
    """What the channel's parser was in the middle of, as an end of input would report it."""
    parser.close()
    try:
        while parser.next_event() is not NEED_DATA:
            pass
    except MultifdError as exc:
        return str(exc).split(": ", 2)[-1]
    return "between packets"


