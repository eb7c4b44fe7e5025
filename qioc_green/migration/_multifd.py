"""Sans-IO parsers of QEMU 10's multifd channels, and the sniff that tells them from the main stream.

Bytes in with :meth:`MultifdParser.feed`, events out of :meth:`MultifdParser.next_event` (or
:data:`NEED_DATA`; :data:`NEED_BLOCKS` when a packet names RAM blocks before the main stream has
announced them), :meth:`MultifdParser.close` when the channel ends. No sockets, no clock, no
threads: one parser per channel, driven by whatever reads that channel (an IOThread each, in the
receiver). The format, learnt from QEMU 10.0's ``migration/multifd.c``, ``multifd.h``,
``multifd-nocomp.c``, ``multifd-zlib.c``, ``multifd-zstd.c`` and ``migration.c`` and checked
against channels captured from QEMU 10.0.2, is written up in ``docs/migration-formats.md``; in
short (all integers big-endian):

- *Which channel is which.* With multifd the source opens the main channel and N more to one
  address, in no promised order. The destination peeks at each one's first 4 bytes
  (``migration_ioc_process_incoming``): ``QEVM`` is the main stream, anything else goes to
  multifd, whose first bytes must then be ``MULTIFD_MAGIC`` 0x11223344. :func:`sniff_channel`.
- *Init packet* (``MultiFDInit_t``, 64 bytes): magic, version 1, the source's 16-byte UUID
  (``-uuid``; all zero by default), the channel id (one byte), 39 reserved bytes.
- *Packets*: a 12-byte header (magic, version 1, flags). Flag 0x40 (DEVICE_STATE) makes it a
  device-state packet (276 bytes: idstr[256], instance id, payload size; then the payload: VFIO
  state). Otherwise a RAM packet of fixed size, 320 bytes + 8 per page a packet can hold
  (``MULTIFD_PACKET_SIZE`` 512 KiB / the target page size: 1,344 bytes for 4 KiB pages),
  whatever it carries: pages_alloc, normal_pages, next_packet_size, packet_num (be64, global
  across channels), zero_pages, 28 reserved bytes, the RAM block name (NUL-terminated in 256
  bytes), then the offsets of the normal pages followed by those of the zero pages. Then the
  payload: the normal pages, raw (``none``) or one zlib/zstd flush of them (next_packet_size
  bytes). Flag 0x01 (SYNC) marks a packet that ends an iteration; since QEMU 9.0 it carries no
  pages. Bits 0x3e are the compression method (0 none, 2 zlib, 4 zstd; 8, 16, 32 are QPL,
  UADK, QATzip, hardware we do not decode).

Decisions
---------

*The page size is the main stream's* (``configuration/target-page-bits``, else 4 KiB): it fixes
the packet size, which no field of the packet states. Page sizes are held to the stream
parser's rule (``_ram.check_page_size``: powers of two, 1 KiB to 64 KiB).

*Nothing is allocated from a peer's number.* Every count and size is checked against what QEMU
can send before its bytes are awaited (at most 512 KiB of pages, 1 MiB of compressed payload, a
device-state cap), and what is awaited grows only as it arrives. Decompression is bounded by the
announced page count (see ``_multifd_compress``).

*Offsets are checked against the blocks the main stream announced* (:meth:`set_blocks`): a page
must lie wholly inside its block and be page aligned (QEMU checks the first only; it never sends
an unaligned one). A packet that needs the blocks before they are known makes next_event()
return :data:`NEED_BLOCKS`, holding the packet: the multifd channels race the main one.

*Payload lifetime*, as the main stream parser's: a payload that arrived in one fed chunk is a
view of it (no copy) until the caller reuses that buffer; one cut by chunk ends is copied once.

*Pages the caller moves itself* (``take_pages=True``): an uncompressed packet's pages need no
parsing, only a place, so the parser can stop at the checked header (:class:`PagesAhead`) and
leave them on the channel for the caller (received straight into a mapped RAM file, or
dropped by a read that discards); :meth:`MultifdParser.want` says how many bytes to read so
that a reader never reads past a header into the pages.

*Errors* are :class:`MultifdError` (a ``ValueError``) naming the channel (``multifd channel 2``
once its init packet has said so, the caller's name before) and the offset in that channel:
``multifd channel 1: offset 2752: normal page offset 0x1000000 is past block 'pc.ram' (size
0x1000000)``.
Misuse (feeding after close) is a ``RuntimeError``. What spans channels (ids, UUIDs, how many)
is :class:`MultifdChannels`.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Mapping
from functools import reduce
from typing import Literal, NamedTuple

from ._format import QEMU_VM_FILE_MAGIC
from ._multifd_compress import COMPRESSIONS, DecompressError, Decompressor, decompressor_for
from ._multifd_events import (
    NEED_BLOCKS,
    NEED_DATA,
    ChannelEnd,
    ChannelInit,
    DeviceStatePacket,
    Event,
    MultifdError,
    NeedBlocks,
    NeedData,
    PagesAhead,
    RamPacket,
    SyncPacket,
)
from ._ram import check_page_size

__all__ = [
    "INIT_PACKET_SIZE",
    "MULTIFD_MAGIC",
    "NEED_BLOCKS",
    "NEED_DATA",
    "ChannelEnd",
    "ChannelInit",
    "DeviceStatePacket",
    "Event",
    "MultifdChannels",
    "MultifdError",
    "MultifdParser",
    "PagesAhead",
    "RamPacket",
    "SyncPacket",
    "packet_size",
    "sniff_channel",
]

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
INIT_PACKET_SIZE = 64
MULTIFD_PACKET_SIZE = 512 * 1024  # bytes of pages one RAM packet holds
_HDR_SIZE = 12
_RAM_FIXED = 320  # MultiFDPacket_t without the offsets
_DEV_SIZE = 276  # MultiFDPacketDeviceState_t
_NAME_SIZE = 256

FLAG_SYNC = 0x01
FLAG_COMPRESSION_MASK = 0x3E
FLAG_DEVICE_STATE = 0x40
_COMPRESSION_FLAGS = {0x00: "none", 0x02: "zlib", 0x04: "zstd", 0x08: "qpl", 0x10: "uadk",
                      0x20: "qatzip"}
_KNOWN_FLAGS = FLAG_SYNC | FLAG_COMPRESSION_MASK | FLAG_DEVICE_STATE

_INIT = struct.Struct(">II16sB")
_HDR = struct.Struct(">III")
_RAM = struct.Struct(">IIIQI")  # pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages
_DEV = struct.Struct(">256sII")


def packet_size(page_size: int = 4096) -> int:
    """Bytes of one RAM packet's header for this target page size (1,344 for 4 KiB)."""
    return _RAM_FIXED + 8 * (MULTIFD_PACKET_SIZE // check_page_size(page_size))


def sniff_channel(first: bytes | bytearray | memoryview, name: str = "channel") -> str | None:
    """Say what a new connection is from its first bytes: ``"main"``, ``"multifd"``, or None if
    fewer than 4 bytes are given. Raises MultifdError for anything else (QEMU would take it for
    a multifd channel and then refuse its init packet)."""
    if len(first) < 4:
        return None
    (magic,) = struct.unpack_from(">I", first)
    if magic == QEMU_VM_FILE_MAGIC:
        return "main"
    if magic == MULTIFD_MAGIC:
        return "multifd"
    raise MultifdError(name, 0, f"first bytes 0x{magic:08x} are neither a main stream "
                                f"(QEVM, 0x5145564d) nor a multifd channel (0x11223344)")


class _RamHeader(NamedTuple):
    block: str
    normal: tuple[int, ...]
    zero: tuple[int, ...]
    packet_num: int
    payload: int  # bytes of payload that follow


# -- the parser -------------------------------------------------------------------------------


class _Input:
    """Fed chunks plus an owned accumulator for an item cut by chunk ends (each byte copied once).

    ``take(n)`` returns n bytes once they are all there: a view of a fed chunk when one chunk
    holds them, else the accumulator itself (handed over, not copied again)."""

    __slots__ = ("acc", "chunks", "offset", "pos")

    def __init__(self) -> None:
        self.chunks: deque[memoryview] = deque()
        self.pos = 0  # in chunks[0]
        self.acc = bytearray()
        self.offset = 0  # channel offset of the next byte not yet taken

    def available(self) -> int:
        return len(self.acc) + sum(map(len, self.chunks)) - self.pos

    def take(self, n: int) -> memoryview | None:
        if not self.acc and self.chunks and len(self.chunks[0]) - self.pos >= n:
            c = self.chunks[0]
            view = c[self.pos : self.pos + n]
            self.pos += n
            if self.pos == len(c):
                self.chunks.popleft()
                self.pos = 0
            self.offset += n
            return view
        while len(self.acc) < n and self.chunks:
            c = self.chunks[0]
            k = min(n - len(self.acc), len(c) - self.pos)
            self.acc += c[self.pos : self.pos + k]
            self.pos += k
            if self.pos == len(c):
                self.chunks.popleft()
                self.pos = 0
        if len(self.acc) < n:
            return None
        out, self.acc = self.acc, bytearray()
        self.offset += n
        return memoryview(out)

    def take_upto(self, n: int) -> memoryview:
        """What is there of the next ``n`` bytes (maybe nothing), taken."""
        k = min(n, self.available())
        return memoryview(b"") if k == 0 else self.take(k)  # type: ignore[return-value]

    def let_go(self) -> None:
        """Copy what is left of the fed chunks, so the caller may reuse its buffers."""
        while self.chunks:
            c = self.chunks.popleft()
            self.acc += c[self.pos :]
            self.pos = 0

    def clear(self) -> None:
        self.chunks.clear()
        self.acc = bytearray()
        self.pos = 0


class MultifdParser:
    """Parse one multifd channel, sans-IO. Never blocks, never switches greenlets.

    ``name``: what errors call the channel until its init packet gives its id. ``page_size``: the
    target page size (the main stream's). ``blocks``: RAM block name -> size in bytes (may come
    later, :meth:`set_blocks`). ``compression``: ``"none"``, ``"zlib"``, ``"zstd"``, or None to take
    the method of the first packet that carries pages and hold the channel to it.
    ``max_device_bytes``: cap on one device-state packet's payload. ``take_pages``: give each
    uncompressed RAM packet with pages as :class:`PagesAhead` (its pages left on the channel for
    the caller, see the module notes) instead of :class:`RamPacket`.
    """

    def __init__(self, *, name: str = "multifd channel", page_size: int = 4096,
                 blocks: Mapping[str, int] | None = None, compression: str | None = None,
                 max_device_bytes: int = 16 << 20, take_pages: bool = False) -> None:
        self.page_size = check_page_size(page_size)
        self.page_count = MULTIFD_PACKET_SIZE // page_size
        self.packet_size = packet_size(page_size)
        if compression is not None and compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        self.compression = compression
        self.max_device_bytes = max_device_bytes
        self.take_pages = take_pages
        self.name = name
        self.channel_id: int | None = None
        self.uuid: bytes | None = None
        self.packets = 0
        self.syncs = 0
        self._blocks: dict[str, int] | None = dict(blocks) if blocks is not None else None
        self._decomp: Decompressor | None = None
        self._in = _Input()
        self._closed = False
        self._done = False
        self._error: MultifdError | None = None
        self._state = self._st_init
        self._at = 0  # channel offset of the item being parsed
        self._ram: _RamHeader | None = None
        self._dev: tuple[str, int, int] | None = None
        self._pending: deque[Event] = deque()

    # -- public API ---------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Channel bytes parsed so far."""
        return self._in.offset

    @property
    def complete(self) -> bool:
        """True once the channel has ended cleanly (ChannelEnd produced)."""
        return self._done

    def want(self) -> int:
        """How many bytes to feed next (at least 1): what the item being parsed lacks, between
        packets a RAM packet header, so a reader never feeds the pages ``take_pages`` leaves it
        (a device-state packet, never sent without VFIO, is shorter: what follows is parsed)."""
        state = self._state
        if state == self._st_ram:
            size = self.packet_size - _HDR_SIZE if self._ram is None else self._ram.payload
        elif state == self._st_dev:
            size = _DEV_SIZE - _HDR_SIZE if self._dev is None else self._dev[2]
        else:  # the init packet, or between packets
            size = INIT_PACKET_SIZE if state == self._st_init else self.packet_size
        return max(size - self._in.available(), 1)

    def set_blocks(self, blocks: Mapping[str, int]) -> None:
        """The RAM blocks (name -> size) the main stream announced with MEM_SIZE."""
        self._blocks = dict(blocks)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; the parser may keep a view of ``data`` until next_event() says NEED_DATA."""
        if self._closed:
            raise RuntimeError("feed() after close()")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view):
            self._in.chunks.append(view)

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA, NeedBlocks.NEED_BLOCKS]:
        """The next event, NEED_DATA or NEED_BLOCKS. Raises MultifdError (again on each call).

        After NEED_DATA the parser holds no view of any fed buffer; after NEED_BLOCKS it still
        may (the held packet's bytes): call set_blocks() and ask again before reusing them.
        """
        if self._pending:
            return self._pending.popleft()
        if self._error is not None:
            raise self._error
        try:
            while True:
                ev = self._state()
                if ev is None:
                    continue
                if ev is NEED_DATA:
                    if self._closed:
                        return self._at_close()
                    self._in.let_go()
                return ev
        except MultifdError as exc:
            self._error = exc
            self._in.clear()
            self._pending.clear()
            raise

    def close(self) -> None:
        """Say the channel has ended. Events already parsed stay available from next_event(),
        which raises MultifdError if the channel ended inside an item."""
        self._closed = True

    # -- plumbing -----------------------------------------------------------------------------

    def _err(self, message: str, offset: int | None = None) -> MultifdError:
        return MultifdError(self.name, self._at if offset is None else offset, message)

    def _at_close(self) -> Event | Literal[NeedData.NEED_DATA]:
        if self._done:
            return NEED_DATA
        have = self._in.available()
        end = self._in.offset + have  # where the channel ended
        state = self._state
        if state == self._st_header and have == 0:
            self._done = True
            return ChannelEnd(self._in.offset, self.packets, self.syncs)
        if self._ram is not None or self._dev is not None:
            size = self._ram.payload if self._ram is not None else self._dev[2]  # type: ignore[index]
            raise self._err(f"channel ends inside the payload of the packet at offset {self._at} "
                            f"({have} of {size} bytes)", end)
        if state == self._st_init:
            what, size = "the init packet", INIT_PACKET_SIZE
        elif state == self._st_header:
            what, size = "a packet header", _HDR_SIZE
        else:
            what = "a RAM packet header" if state == self._st_ram else "a device-state packet header"
            size = (self.packet_size if state == self._st_ram else _DEV_SIZE) - _HDR_SIZE
            have += _HDR_SIZE
            size += _HDR_SIZE
        raise self._err(f"channel ends inside {what} at offset {self._at} ({have} of {size} "
                        f"bytes)", end)

    # -- states -------------------------------------------------------------------------------

    def _st_init(self) -> Event | None | NeedData | NeedBlocks:
        buf = self._in.take(INIT_PACKET_SIZE)
        if buf is None:
            return NEED_DATA
        magic, version, uuid, cid = _INIT.unpack_from(buf)
        if magic != MULTIFD_MAGIC:
            raise self._err(f"init packet magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}")
        if version != MULTIFD_VERSION:
            raise self._err(f"init packet version {version}, expected {MULTIFD_VERSION}", 4)
        self.channel_id = cid
        self.uuid = bytes(uuid)
        self.name = f"multifd channel {cid}"
        self._state = self._st_header
        return ChannelInit(cid, self.uuid, version)

    def _st_header(self) -> Event | None | NeedData | NeedBlocks:
        self._at = self._in.offset
        buf = self._in.take(_HDR_SIZE)
        if buf is None:
            return NEED_DATA
        magic, version, flags = _HDR.unpack_from(buf)
        if magic != MULTIFD_MAGIC:
            raise self._err(f"packet magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}")
        if version != MULTIFD_VERSION:
            raise self._err(f"packet version {version}, expected {MULTIFD_VERSION}")
        if flags & ~_KNOWN_FLAGS:
            raise self._err(f"unknown packet flags 0x{flags & ~_KNOWN_FLAGS:x} (in 0x{flags:x})")
        self._flags = flags
        self._state = self._st_dev if flags & FLAG_DEVICE_STATE else self._st_ram
        return None

    def _st_dev(self) -> Event | None | NeedData | NeedBlocks:
        if self._dev is None:
            buf = self._in.take(_DEV_SIZE - _HDR_SIZE)
            if buf is None:
                return NEED_DATA
            raw, instance_id, size = _DEV.unpack_from(buf)
            if self._flags & FLAG_SYNC:
                raise self._err("SYNC flag on a device-state packet")
            if self._flags & FLAG_COMPRESSION_MASK:
                raise self._err(f"compression flags 0x{self._flags & FLAG_COMPRESSION_MASK:x} on a "
                                "device-state packet")
            end = raw.find(0)
            if end < 0:
                raise self._err("device-state idstr is not NUL-terminated in 256 bytes")
            if size == 0:
                raise self._err("empty device-state packet")
            if size > self.max_device_bytes:
                raise self._err(f"device-state payload of {size} bytes is over the "
                                f"{self.max_device_bytes}-byte cap")
            self._dev = (raw[:end].decode("utf-8", "backslashreplace"), instance_id, size)
        idstr, instance_id, size = self._dev
        data = self._in.take(size)
        if data is None:
            return NEED_DATA
        self._dev = None
        self.packets += 1
        self._state = self._st_header
        return DeviceStatePacket(idstr, instance_id, bytes(data), self._at)

    def _st_ram(self) -> Event | None | NeedData | NeedBlocks:
        if self._ram is None:
            buf = self._in.take(self.packet_size - _HDR_SIZE)
            if buf is None:
                return NEED_DATA
            self._ram = self._parse_ram_header(buf)
        name, normal, zero, num, psize = self._ram
        if (normal or zero) and self._blocks is None:
            return NEED_BLOCKS
        if normal or zero:
            self._check_offsets(name, normal, zero)
        method = self.compression or "none"
        if self.take_pages and normal and method == "none":
            return self._pages_ahead(name, normal, zero, num, psize)
        payload = self._in.take(psize) if psize else memoryview(b"")
        if payload is None:
            return NEED_DATA
        self._ram = None
        self.packets += 1
        self._state = self._st_header
        sync = SyncPacket(num, self._at) if self._flags & FLAG_SYNC else None
        if sync is not None:
            self.syncs += 1
        if not (normal or zero):
            return sync  # a SYNC packet (or, harmlessly, an empty one)
        if normal and method != "none":
            assert self._decomp is not None
            try:
                data = memoryview(self._decomp.decompress(payload, len(normal) * self.page_size))
            except DecompressError as exc:
                raise self._err(f"{method} payload of the packet: {exc}") from None
        else:
            data = payload
        ev = RamPacket(name, normal, zero, data, self.page_size, num, method, self._at)
        if sync is not None:  # QEMU < 9.0 sends pages with SYNC
            self._pending.append(sync)
        return ev

    def _pages_ahead(self, name: str, normal: tuple[int, ...], zero: tuple[int, ...], num: int,
                     size: int) -> PagesAhead:
        """The packet's pages are the caller's: what was fed of them, and the rest skipped."""
        at = self._in.offset
        head = self._in.take_upto(size)
        self._in.offset += size - len(head)
        self._ram = None
        self.packets += 1
        self._state = self._st_header
        if self._flags & FLAG_SYNC:  # QEMU < 9.0 sends pages with SYNC
            self.syncs += 1
            self._pending.append(SyncPacket(num, self._at))
        return PagesAhead(name, normal, zero, self.page_size, num, self._at, at, head)

    def _parse_ram_header(self, buf: memoryview) -> _RamHeader:
        alloc, n_normal, next_size, num, n_zero = _RAM.unpack_from(buf)
        at = self._at
        if alloc > self.page_count:
            raise self._err(f"packet holds {alloc} pages, at most {self.page_count} fit in "
                            f"{MULTIFD_PACKET_SIZE // 1024} KiB of {self.page_size}-byte pages")
        if n_normal > alloc:
            raise self._err(f"packet has {n_normal} normal pages, more than the {alloc} it holds")
        if n_zero > alloc - n_normal:
            raise self._err(f"packet has {n_zero} zero pages, at most {alloc - n_normal} fit "
                            f"beside its {n_normal} normal pages")
        flags = self._flags
        if n_normal or n_zero:
            code = flags & FLAG_COMPRESSION_MASK
            method = _COMPRESSION_FLAGS.get(code)
            if method is None:
                raise self._err(f"unknown compression flags 0x{code:x}")
            if method not in COMPRESSIONS:
                raise self._err(f"multifd-compression {method} is not supported "
                                f"({', '.join(COMPRESSIONS)})")
            if self.compression is None:
                self.compression = method
            elif method != self.compression:
                raise self._err(f"packet compressed with {method}, the channel uses "
                                f"{self.compression}")
            if self._decomp is None and method != "none":
                try:
                    self._decomp = decompressor_for(method)
                except DecompressError as exc:
                    raise self._err(str(exc)) from None
        # payload size: raw pages, or the compressed bytes (at most QEMU's 2x buffer); none
        # without normal pages, whatever next_packet_size says: QEMU's receivers read no
        # payload then, and QEMU before 9.0 leaves the previous packet's size in the field
        if n_normal == 0:
            next_size = 0
        elif (self.compression or "none") == "none":
            want = n_normal * self.page_size
            if next_size != want:
                raise self._err(f"packet announces a {next_size}-byte payload for {n_normal} "
                                f"normal pages of {self.page_size} bytes ({want})")
        elif not 0 < next_size <= 2 * MULTIFD_PACKET_SIZE:
            raise self._err(f"compressed payload of {next_size} bytes for {n_normal} pages "
                            f"(QEMU sends 1 to {2 * MULTIFD_PACKET_SIZE})")
        name = ""
        if n_normal or n_zero:
            raw = bytes(buf[_RAM_FIXED - _HDR_SIZE - _NAME_SIZE : _RAM_FIXED - _HDR_SIZE])
            end = raw.find(0)
            if end <= 0:
                raise self._err("RAM block name is empty" if end == 0 else
                                "RAM block name is not NUL-terminated in 256 bytes", at + 64)
            name = raw[:end].decode("utf-8", "backslashreplace")
        k = n_normal + n_zero
        offs = struct.unpack_from(f">{k}Q", buf, _RAM_FIXED - _HDR_SIZE) if k else ()
        return _RamHeader(name, offs[:n_normal], offs[n_normal:], num, next_size)

    def _check_offsets(self, name: str, normal: tuple[int, ...], zero: tuple[int, ...]) -> None:
        assert self._blocks is not None
        size = self._blocks.get(name)
        if size is None:
            raise self._err(f"unknown RAM block {name!r}", self._at + 64)
        ps = self.page_size
        for kind, offs in (("normal", normal), ("zero", zero)):
            if not offs:
                continue
            first, last = offs[0], offs[-1]
            if last - first == (len(offs) - 1) * ps and offs == tuple(range(first, last + 1, ps)):
                hi, odd = last, first & (ps - 1)  # one run, as QEMU sends them: cheap
            else:
                hi, odd = max(offs), reduce(int.__or__, offs) & (ps - 1)
            if hi > size - ps:
                raise self._err(f"{kind} page offset 0x{hi:x} is past block {name!r} "
                                f"(size 0x{size:x})")
            if odd:
                bad = next(o for o in offs if o & (ps - 1))
                raise self._err(f"{kind} page offset 0x{bad:x} in block {name!r} is not a "
                                f"multiple of the {ps}-byte page size")


class MultifdChannels:
    """What spans the channels of one migration: each id once, below the announced count, from
    one source (one UUID, and the configuration's ``configuration/uuid`` when it has one).

    Thread-safe (each channel is read in its own thread); nothing here blocks.
    """

    def __init__(self, channels: int, *, uuid: bytes | None = None) -> None:
        if not 1 <= channels <= 255:
            raise ValueError(f"multifd channels {channels}: QEMU allows 1 to 255")
        self.channels = channels
        self._uuid = uuid
        self._seen: dict[int, str] = {}
        self._lock = threading.Lock()

    def register(self, init: ChannelInit, name: str) -> None:
        """Record a channel's init packet (``name``: the connection, for messages)."""
        with self._lock:
            if init.channel_id >= self.channels:
                raise MultifdError(name, 24, f"channel id {init.channel_id}, but the migration "
                                             f"has {self.channels} multifd channels (0 to "
                                             f"{self.channels - 1})")
            if init.channel_id in self._seen:
                raise MultifdError(name, 24, f"channel id {init.channel_id} again (first on "
                                             f"{self._seen[init.channel_id]})")
            if self._uuid is None:
                self._uuid = init.uuid
            elif init.uuid != self._uuid:
                raise MultifdError(name, 8, f"source UUID {init.uuid.hex()} differs from "
                                            f"{self._uuid.hex()} (another source?)")
            self._seen[init.channel_id] = name

    def set_uuid(self, uuid: bytes) -> None:
        """The main stream's configuration/uuid (sent with validate-uuid): channels must match."""
        with self._lock:
            if self._seen and self._uuid != uuid:
                cid, name = next(iter(self._seen.items()))
                raise MultifdError(name, 8, f"source UUID {(self._uuid or b'').hex()} of "
                                            f"channel {cid} differs from the main stream's "
                                            f"{uuid.hex()}")
            self._uuid = uuid

    @property
    def missing(self) -> list[int]:
        """Channel ids not seen yet."""
        with self._lock:
            return [i for i in range(self.channels) if i not in self._seen]
