"""A sans-IO parser of QEMU's live-migration stream (as QEMU 7.2 sends it with ``migrate``).

Bytes go in with :meth:`StreamParser.feed`, events come out of :meth:`StreamParser.next_event`
(or :data:`NEED_DATA`), :meth:`StreamParser.close` says the input ended. No sockets, no clock, no
files: the receiver program drives this with channels, the tests drive it with byte strings.

The format, as learnt from QEMU's ``migration/savevm.c``, ``ram.c``, ``vmstate*.c`` and
``scripts/analyze-migration.py`` and checked against streams captured from QEMU 7.2
------------------------------------------------------------------------------------------------

All integers are big-endian. ``QEVM`` (be32 0x5145564d), be32 version 3. Then, if the machine
type sends it (every current one does), the *configuration*: byte 0x07, be32 length, the machine
type name (``pc-i440fx-7.2``), then optional subsections (see below) named
``configuration/target-page-bits`` (be32), ``configuration/capabilities`` (be32 count, then per
capability a byte length and its name; only capabilities both ends must agree on are listed,
in 7.2 just ``x-ignore-shared``) and ``configuration/uuid`` (16 bytes). It has no footer.

Then a sequence of *sections*, each introduced by a type byte:

- START (0x01) and FULL (0x04): be32 section id, byte length + idstr, be32 instance id,
  be32 version id, then the section's data;
- PART (0x02) and END (0x03): be32 section id (of a section STARTed before), then data;
- after the data of every one of these four, a footer: 0x7e and the be32 section id again;
- COMMAND (0x08): be16 command, be16 length, data (open return path, ping, the postcopy
  commands, PACKAGED, ...);
- EOF (0x00): the device state is complete.

After EOF, unless the machine says ``suppress-vmdesc=on`` or postcopy is on, comes the *VM
description*: 0x06, be32 length, and that many bytes of JSON (``{"page_size": 4096, "devices":
[...]}``) describing, in stream order, each FULL section: name, instance id, and the fields the
device wrote with the number of bytes each took (``"size"``, per element; arrays of equal
elements are folded with ``"array_len"``; ``"struct"`` fields nest a description) and the
subsections it sent. The stream ends with the JSON; nothing follows it.

A *subsection* sits at the end of a vmstate's fields: 0x05, byte length + name, be32 version,
then its own fields and subsections. The loader spots one by peeking for the 0x05 byte.

Iterable sections (START, PARTs, END) come first: in 7.2 only ``ram`` for our VMs. Its data is a
run of records, each a be64 whose low bits (below the target page size, 4096 on x86) are flags
and whose high bits are an offset: MEM_SIZE 0x04 (offset = total bytes; then per block a byte
length + idstr and be64 used length, plus be64 page size when postcopy is on and the block's
page size differs from the host's, plus be64 region address with ``x-ignore-shared``), ZERO
0x02 (one fill byte follows), PAGE 0x08 (a page of data follows), each of those two preceded by a
byte length + block name unless CONTINUE 0x20 says "same block as the previous record" (which
holds across sections), EOS 0x10 (end of this section's data), MULTIFD_FLUSH 0x200 (newer QEMUs),
XBZRLE 0x40 and COMPRESS_PAGE 0x100 (encoded pages) and HOOK 0x80 (RDMA).

Device sections (FULL, and the data of any iterable section other than ``ram``) carry *no
length*: QEMU's loader knows each device's layout from its own code. That is why the description
JSON exists, and why it comes last.

Decisions
---------

*Page data is never buffered.* A receiver parses a 1 GiB stream at ~1.9 GB/s, about 460,000
pages a second: a Python event per page would cost more than the receiving. So one
:class:`RamPages` event covers a *run* of consecutive page records of one block at consecutive
offsets (the common case: the bulk of a migration is ``PAGE|CONTINUE`` records in order), checked
with one ``struct`` call over all their headers, and it carries a memoryview of the fed buffer:
page ``i`` is ``data[i*stride : i*stride + page_size]``, its guest offset ``offset + i*page_size``
(so ``os.pwritev(fd, ev.iov(), ev.offset)`` writes a run in one call). Zero-page records are
folded into :class:`ZeroPages` runs the same way. A page cut by the end of a fed chunk is the one
thing copied (into a fresh 4 KiB buffer), so every event holds whole pages. How records fall into
runs therefore depends on how the input was chunked; the pages, offsets and bytes do not
(:func:`expand_pages` gives the chunking-free view, and every other event is identical whatever
the chunking).

*Lifetime of the fed buffers.* ``RamPages.data`` views the buffer given to :meth:`feed`. Once
:meth:`next_event` has returned :data:`NEED_DATA`, the parser keeps no reference to any fed
buffer (a partial header or page left over is copied), so the caller may reuse its receive
buffer then, after it has consumed the events that view it.

*Device sections are framed by their footers and split exactly by the JSON.* A device section's
bytes are buffered (capped: ``max_device_bytes``, 64 MiB by default, then an error) and its end is
found online by its footer, 0x7e + be32 of *its* id, accepted only when what follows is a
plausible next item (a section header with a printable idstr, a PART/END of a live section, a
known command, EOF followed by 0x06 + a sane length + ``{``, or the end of the input). The events
of FULL sections (and everything after them) are *held* until the JSON arrives; the JSON is then
walked, as analyze-migration does, to find where each described section's fields and subsections
end, and that exact split must agree with the framing, byte for byte, subsection markers and
names included, or the stream is refused. Only then are the held events released, followed by
:class:`VmDescription`. Without a JSON (QEMU may omit it) the held events are released at
:meth:`close` as framed by the footers, and :class:`StreamEnd` says ``described=False``. If
anything but device state follows a held section (RAM records, a command), the held events are
released first, so events always come out in stream order; the JSON still checks them at the end.
Section footers are required (QEMU has sent them since machine types of 2.4).

What framing by footers cannot know, and the rules chosen:

- A footer pattern inside device data followed by a plausible next item would cut a section
  short. The next-item check makes that very unlikely (for the last section it needs the
  7 bytes ``7e <id> 00 06``), and with a JSON the exact split catches it.
- An iterable section other than ``ram`` (block migration, dirty bitmaps...) is framed by its
  footers and passed on as DeviceState; the JSON does not describe those, so nothing checks
  them. A ``ram`` whose header was damaged into another name becomes such a section; the
  summary then shows no RAM blocks.
- When no candidate footer fits, the error at close names the first one rejected and the byte
  that made it implausible (``expected a section type, EOF or a description after the footer
  of section 40 ('globalstate') at offset 251723, got 0x42``).
- A stream cut right after its EOF byte is a complete stream without a description: QEMU sends
  exactly that with ``suppress-vmdesc=on`` or postcopy, and nothing tells the two apart.
- On an error, held (unchecked) device events are dropped; events already returned stay valid.

*Memory is bounded whatever the input*: page data is not buffered; headers are at most a few
hundred bytes; device data and the JSON have caps; a length over a cap is an error at once, not
after buffering.

*Speed, measured* (2 shared cores, CPython 3.11, a 64 MiB random-RAM capture from QEMU 7.2 fed
as memoryview slices, events folded into the summary): 6 GB/s with 64 KiB chunks, 14.5 GB/s
with 256 KiB, 21 GB/s with 1 MiB, 24 GB/s with 4 MiB, so at the ~1.9 GB/s QEMU sends, parsing
costs about a tenth of a core with 1 MiB receives. Run structs are compiled once per run
length and shared by all parsers.

*Not supported, refused with a clear error*: XBZRLE and compressed pages (switch those
capabilities off), RDMA hooks, PACKAGED (postcopy's device-state package: the receiver would need
to answer on the return path anyway), streams without section footers.

Errors are all :class:`MigrationStreamError` (a ``ValueError``), whose message starts with the
stream offset: ``offset 1234: expected section footer 0x7e for section 5, got 0x12``. Misuse of
the parser (feeding after close) is a ``RuntimeError``.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

__all__ = [
    "NEED_DATA",
    "Command",
    "Configuration",
    "DeviceState",
    "EndOfState",
    "Event",
    "MigrationStreamError",
    "RamBlock",
    "RamBlocks",
    "RamFlush",
    "RamPages",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionHeader",
    "SectionPart",
    "SectionStart",
    "StreamEnd",
    "StreamHeader",
    "StreamParser",
    "VmDescription",
    "ZeroPages",
    "expand_pages",
]

# -- format constants (QEMU's names) ----------------------------------------------------------

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

RAM_SECTION = "ram"
RAM_VERSION = 4

#: command number -> (name, required data length or None when variable)
COMMANDS: dict[int, tuple[str, int | None]] = {
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", None),  # 0 or 16 bytes
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", None),
    7: ("POSTCOPY_RESUME", 0),
    8: ("PACKAGED", 4),
    9: ("RECV_BITMAP", None),
    10: ("ENABLE_COLO", 0),
    11: ("SWITCHOVER_START", 0),
}
MIG_CMD_PACKAGED = 8

_SECTION_KINDS = {
    QEMU_VM_SECTION_START: "START",
    QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END",
    QEMU_VM_SECTION_FULL: "FULL",
}

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_MAX_RUN = 512  # records checked by one struct call (512 pages = 2 MiB of data)
_SCAN_WINDOW = 64 * 1024  # device bytes copied per footer search step
# struct formats for runs of n records, compiled on first use and shared by all parsers
_RUN_STRUCTS: dict[tuple[int, int], struct.Struct] = {}
_ZERO_STRUCTS: dict[int, struct.Struct] = {}


class MigrationStreamError(ValueError):
    """The stream is not a well-formed QEMU migration stream (or uses what we refuse).

    ``offset`` is the stream offset the message talks about; the message starts with it.
    """

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset


class _Need(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`StreamParser.next_event` when it needs more input.
NEED_DATA = _Need.NEED_DATA


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """``QEVM`` and the stream version (always 3)."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """The configuration section: machine type name and the subsections that came with it."""

    machine: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] = ()
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """Base of the four section headers. ``offset``: stream offset of the type byte.

    PART and END headers do not repeat idstr, instance and version in the stream; the parser
    fills them in from the section's START.
    """

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int

    @property
    def kind(self) -> str:
        return type(self).__name__.removeprefix("Section").upper()


@dataclass(frozen=True, slots=True)
class SectionStart(SectionHeader):
    """QEMU_VM_SECTION_START: the first piece of an iterable section (RAM)."""


@dataclass(frozen=True, slots=True)
class SectionPart(SectionHeader):
    """QEMU_VM_SECTION_PART: a further piece of an iterable section."""


@dataclass(frozen=True, slots=True)
class SectionEnd(SectionHeader):
    """QEMU_VM_SECTION_END: the last piece of an iterable section."""


@dataclass(frozen=True, slots=True)
class SectionFull(SectionHeader):
    """QEMU_VM_SECTION_FULL: a device's whole state in one piece."""


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """The footer (0x7e + id) closing a section piece; ``offset`` is that of the 0x7e byte."""

    section_id: int
    idstr: str
    offset: int


class RamBlock(NamedTuple):
    """One RAM block announced by MEM_SIZE. ``page_size``/``addr`` only when QEMU sent them."""

    name: str
    size: int
    page_size: int | None = None
    addr: int | None = None


@dataclass(frozen=True, slots=True)
class RamBlocks:
    """MEM_SIZE: the RAM blocks (in stream order) and their total size."""

    blocks: tuple[RamBlock, ...]
    total: int


@dataclass(frozen=True, slots=True)
class RamPages:
    """``count`` whole pages of ``block`` at guest offsets ``offset + i * page_size``.

    Page ``i``'s bytes are ``data[i * stride : i * stride + page_size]`` (``stride`` is the
    distance between pages in the stream: page size + 8 for a run of CONTINUE records).
    ``data`` views the fed buffer (see the module notes on its lifetime) or a private copy.
    """

    block: str
    offset: int
    count: int
    data: memoryview
    stride: int
    page_size: int

    def iov(self) -> list[memoryview]:
        """The pages as a list of views, in order (for ``os.pwritev(fd, iov, offset)``)."""
        d, s, p = self.data, self.stride, self.page_size
        return [d[i : i + p] for i in range(0, self.count * s, s)]

    def pages(self) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(guest_offset, page_view)`` for each page."""
        off, p = self.offset, self.page_size
        for i, view in enumerate(self.iov()):
            yield off + i * p, view


@dataclass(frozen=True, slots=True)
class ZeroPages:
    """``count`` pages of ``block`` from ``offset`` on, each filled with byte ``fill`` (0)."""

    block: str
    offset: int
    count: int
    fill: int
    page_size: int


@dataclass(frozen=True, slots=True)
class RamFlush:
    """MULTIFD_FLUSH: the multifd channels were synchronised here (no data on this stream)."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The data of a device section piece (between its header and footer), as bytes."""

    section_id: int
    idstr: str
    instance_id: int
    data: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class Command:
    """QEMU_VM_COMMAND: ``name`` is QEMU's (``OPEN_RETURN_PATH``, ``POSTCOPY_ADVISE``...)."""

    command: int
    name: str
    data: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class EndOfState:
    """QEMU_VM_EOF: all sections have been sent."""

    offset: int


@dataclass(frozen=True, slots=True)
class VmDescription:
    """The description JSON (already checked against the device sections it describes)."""

    description: dict[str, Any] = field(repr=False)
    offset: int
    length: int

    @property
    def devices(self) -> list[str]:
        return [str(d.get("name")) for d in self.description.get("devices", [])]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The stream is complete. ``described``: it ended with a VM description."""

    offset: int
    described: bool


Event = (
    StreamHeader | Configuration | SectionStart | SectionPart | SectionEnd | SectionFull
    | SectionFooter | RamBlocks | RamPages | ZeroPages | RamFlush | DeviceState | Command
    | EndOfState | VmDescription | StreamEnd
)


def expand_pages(events: list[Event]) -> list[Any]:
    """Events with page runs expanded to one tuple per page: a chunking-independent view.

    RamPages become ``("page", block, offset, bytes)``, ZeroPages ``("zero", block, offset,
    fill)``; every other event is kept as is. Meant for tests and tools, not the fast path.
    """
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, RamPages):
            out.extend(("page", ev.block, off, bytes(v)) for off, v in ev.pages())
        elif isinstance(ev, ZeroPages):
            out.extend(("zero", ev.block, ev.offset + i * ev.page_size, ev.fill)
                       for i in range(ev.count))
        else:
            out.append(ev)
    return out


# -- reading helpers --------------------------------------------------------------------------


class _Short(Exception):
    """An item needs ``need`` contiguous bytes from its start; fewer are there."""

    def __init__(self, need: int) -> None:
        self.need = need


class _Cursor:
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
            raise _Short(self.pos + n - self.start)

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
        (v,) = _BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def be32(self) -> int:
        self._have(4)
        (v,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def be64(self) -> int:
        self._have(8)
        (v,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def peek_be64(self) -> int:
        self._have(8)
        (v,) = _BE64.unpack_from(self.buf, self.pos)
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


class _Section(NamedTuple):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    is_ram: bool


class _Retained(NamedTuple):
    """A FULL device section kept until the JSON can check it."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    data: bytes
    offset: int  # stream offset of its first data byte


def _printable(b: bytes | bytearray | memoryview) -> bool:
    return all(0x20 < c < 0x7F for c in b)


_Step = Callable[[], "Event | None | _Need"]
_T = TypeVar("_T")
_SHORT = object()


class StreamParser:
    """Parse one QEMU migration stream, sans-IO (h11-style).

    ``feed(data)`` adds input, ``next_event()`` returns the next event or :data:`NEED_DATA`,
    ``close()`` says the input has ended (and raises if the stream is incomplete), ``offset``
    is the number of stream bytes parsed so far. None of these ever blocks or switches greenlets.

    ``page_size``: the target page size (4096 on x86; a ``target-page-bits`` configuration
    subsection overrides it). ``max_device_bytes``: cap on buffered device-section bytes.
    ``max_json_bytes``: cap on the description JSON. ``max_ram_blocks``: cap on MEM_SIZE's list.
    """

    def __init__(
        self,
        *,
        page_size: int = 4096,
        max_device_bytes: int = 64 << 20,
        max_json_bytes: int = 16 << 20,
        max_ram_blocks: int = 4096,
    ) -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two >= 512")
        self.max_device_bytes = max_device_bytes
        self.max_json_bytes = max_json_bytes
        self.max_ram_blocks = max_ram_blocks
        self._set_page_size(page_size)

        # input: the current chunk, its stream offset, the chunks fed after it
        self._buf = memoryview(b"")
        self._pos = 0
        self._base = 0
        self._more: deque[memoryview] = deque()
        self._closed = False
        self._error: MigrationStreamError | None = None
        self._events: deque[Event] = deque()
        self._step: _Step = self._st_header

        self._sections: dict[int, _Section] = {}  # START/FULL seen, by id
        self._live: set[int] = set()  # STARTed and not yet ENDed
        self._cur: _Section | None = None  # section whose data is being parsed
        self._cur_offset = 0
        self._cur_kind = 0
        self._seen_section = False

        # RAM
        self._blocks: dict[str, RamBlock] = {}
        self._block: RamBlock | None = None  # CONTINUE's block
        self._ignore_shared = False
        self._page_left = 0  # bytes still missing from a page cut by a chunk end
        self._page_buf = bytearray()
        self._page_at = ("", 0)

        # device sections
        self._body = bytearray()
        self._body_start = 0
        self._scan = 0
        self._rejected: tuple[int, bytes] | None = None
        self._device_bytes = 0
        self._retained: list[_Retained] = []
        self._held: list[Event] | None = None

        # description
        self._json = bytearray()
        self._json_len = 0
        self._json_offset = 0
        self._done = False

    def _set_page_size(self, page_size: int) -> None:
        self.page_size = page_size
        self._mask = page_size - 1
        self._rec = page_size + 8

    # -- public API ---------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Stream bytes parsed so far."""
        return self._base + self._pos

    @property
    def complete(self) -> bool:
        """True once the stream has been seen to its end (StreamEnd produced)."""
        return self._done

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

    def next_event(self) -> Event | Literal[_Need.NEED_DATA]:
        """Return the next event, or NEED_DATA when the input fed so far is used up.

        Never blocks. Raises MigrationStreamError when the stream is malformed (and again on
        every later call).
        """
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        try:
            while True:
                ev = self._step()
                if ev is None:
                    if self._events:
                        return self._events.popleft()
                    continue
                return ev
        except MigrationStreamError as exc:
            self._fail(exc)
            raise

    def close(self) -> None:
        """Say the input has ended: parse what is left and check the stream is complete.

        Events not yet taken stay available from next_event() (which then ends with
        StreamEnd and NEED_DATA). Raises MigrationStreamError if the stream is incomplete or
        malformed; events that came before the problem are still returned by next_event().
        """
        if self._closed:
            if self._error is not None:
                raise self._error
            return
        self._closed = True
        if self._error is not None:
            raise self._error
        try:
            while True:
                ev = self._step()
                if ev is NEED_DATA:
                    break
                if ev is not None:
                    self._events.append(ev)
        except MigrationStreamError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: MigrationStreamError) -> None:
        self._error = exc
        self._held = None
        self._more.clear()
        self._base += self._pos
        self._buf = memoryview(b"")
        self._pos = 0

    # -- input plumbing -----------------------------------------------------------------------

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

    def _starve(self, what: str) -> Event | None | _Need:
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

    def _item(self, parse: Callable[[_Cursor], _T]) -> _T | object:
        """Run ``parse`` on contiguous input; return its result, or _SHORT if input ran out."""
        while True:
            cur = _Cursor(self._buf, self._pos, self._base)
            try:
                result = parse(cur)
            except _Short as short:
                if not self._ensure(short.need):
                    return _SHORT
                continue
            self._pos = cur.pos
            return result

    def _emit(self, ev: Event) -> Event | None:
        """Return ev, or hold it if device events are being held."""
        if self._held is not None:
            self._held.append(ev)
            return None
        return ev

    def _release(self) -> None:
        if self._held:
            self._events.extend(self._held)
        self._held = None

    def _released_then(self, ev: Event) -> Event | None:
        """Release held events, then ev (queued behind them, so order is kept)."""
        if self._held is None:
            return ev
        self._release()
        self._events.append(ev)
        return None

    # -- states -------------------------------------------------------------------------------

    def _st_header(self) -> Event | None | _Need:
        if not self._ensure(8):
            return self._starve("the stream header (QEVM, version)")
        magic, version = struct.unpack_from(">II", self._buf, self._pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._err(f"expected magic QEVM (0x5145564d), got 0x{magic:08x}")
        if version != QEMU_VM_FILE_VERSION:
            raise self._err(f"expected stream version 3, got {version}", self.offset + 4)
        self._pos += 8
        self._step = self._st_section
        return StreamHeader(version)

    def _st_section(self) -> Event | None | _Need:
        if not self._ensure(1):
            return self._starve("the next section (no EOF marker yet)")
        t = self._buf[self._pos]
        at = self.offset
        if t in _SECTION_KINDS:
            res = self._item(lambda c: self._parse_section_header(c, t))
            if res is _SHORT:
                return self._starve(f"a {_SECTION_KINDS[t]} section header")
            return res  # type: ignore[return-value]
        if t == QEMU_VM_EOF:
            self._pos += 1
            self._step = self._st_after_eof
            return self._emit(EndOfState(at))
        if t == QEMU_VM_COMMAND:
            res = self._item(self._parse_command)
            if res is _SHORT:
                return self._starve("a command")
            return self._released_then(res)  # type: ignore[arg-type]
        if t == QEMU_VM_CONFIGURATION:
            if self._seen_section:
                raise self._err("configuration section after other sections")
            res = self._item(self._parse_configuration)
            if res is _SHORT:
                return self._starve("the configuration section")
            self._seen_section = True
            return res  # type: ignore[return-value]
        if t == QEMU_VM_VMDESCRIPTION:
            raise self._err("VM description (0x06) before the EOF marker")
        if t == QEMU_VM_SUBSECTION:
            raise self._err("subsection (0x05) outside a section")
        if t == QEMU_VM_SECTION_FOOTER:
            raise self._err("section footer (0x7e) outside a section")
        raise self._err(f"unknown section type 0x{t:02x}")

    def _parse_configuration(self, c: _Cursor) -> Event:
        c.u8()
        at = c.offset
        n = c.be32()
        if not 0 < n <= 256:
            raise MigrationStreamError(at, f"machine name length {n} is absurd (expected 1..256)")
        machine = c.take(n).decode("utf-8", "backslashreplace")
        page_bits: int | None = None
        caps: list[str] = []
        uuid: bytes | None = None
        while c.peek_u8() == QEMU_VM_SUBSECTION:
            c.u8()
            at = c.offset
            name = c.string("configuration subsection name")
            c.be32()  # version
            if name == "configuration/target-page-bits":
                page_bits = c.be32()
                if not 9 <= page_bits <= 30:
                    raise MigrationStreamError(at, f"target page bits {page_bits} is absurd")
            elif name == "configuration/capabilities":
                count = c.be32()
                if count > 256:
                    raise MigrationStreamError(at, f"capability count {count} is absurd")
                caps.extend(c.string("capability name") for _ in range(count))
            elif name == "configuration/uuid":
                uuid = c.take(16)
            else:
                raise MigrationStreamError(at, f"unknown configuration subsection {name!r}")
        if page_bits is not None:
            self._set_page_size(1 << page_bits)
        self._ignore_shared = "x-ignore-shared" in caps
        return Configuration(machine, page_bits, tuple(caps), uuid)

    def _parse_command(self, c: _Cursor) -> Event:
        at = c.offset
        c.u8()
        cmd = c.be16()
        length = c.be16()
        known = COMMANDS.get(cmd)
        if known is None:
            raise MigrationStreamError(at, f"unknown command {cmd}")
        name, want = known
        if want is not None and length != want:
            raise MigrationStreamError(at, f"command {name} has length {length}, expected {want}")
        data = c.take(length)
        if cmd == MIG_CMD_PACKAGED:
            (size,) = _BE32.unpack(data)
            raise MigrationStreamError(
                at, f"PACKAGED command (postcopy device state, {size} bytes) is not supported")
        return Command(cmd, name, data, at)

    def _parse_section_header(self, c: _Cursor, t: int) -> Event | None:
        at = c.offset
        c.u8()
        sid = c.be32()
        sec: _Section | None
        if t in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            idstr_at = c.offset
            idstr = c.string("section idstr")
            instance_id = c.be32()
            version_id = c.be32()
            if not idstr.isprintable() or not idstr.isascii() or " " in idstr:
                raise MigrationStreamError(idstr_at, f"section idstr {idstr!r} is not printable")
            is_ram = idstr == RAM_SECTION
            if is_ram and instance_id != 0:
                raise MigrationStreamError(at, f"ram section with instance id {instance_id}")
            if sid in self._live:
                raise MigrationStreamError(at, f"section {sid} started again while still live")
            if is_ram and t == QEMU_VM_SECTION_FULL:
                raise MigrationStreamError(at, "ram sent as a FULL section")
            if is_ram and version_id != RAM_VERSION:
                raise MigrationStreamError(at, f"ram section version {version_id}, expected 4")
            sec = _Section(sid, idstr, instance_id, version_id, is_ram)
            self._sections[sid] = sec
            if t == QEMU_VM_SECTION_START:
                self._live.add(sid)
        else:
            if sid not in self._live:
                what = "PART" if t == QEMU_VM_SECTION_PART else "END"
                raise MigrationStreamError(at, f"{what} for section {sid}, never started")
            sec = self._sections[sid]
        self._seen_section = True
        self._cur = sec
        self._cur_offset = at
        cls = (SectionStart, SectionPart, SectionEnd, SectionFull)[t - 1]
        ev = cls(sid, sec.idstr, sec.instance_id, sec.version_id, at)
        self._cur_kind = t
        if sec.is_ram:
            self._step = self._st_ram
            return self._released_then(ev)
        if t == QEMU_VM_SECTION_FULL and self._held is None:
            self._held = []
        self._body = bytearray()
        self._body_start = c.offset
        self._scan = 0
        self._rejected = None
        self._step = self._st_device
        return self._emit(ev)

    # -- RAM ----------------------------------------------------------------------------------

    def _st_ram(self) -> Event | None | _Need:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 8:
            if not self._ensure(8):
                return self._starve("a RAM record")
            buf = self._buf
            pos = self._pos
        (hdr,) = _BE64.unpack_from(buf, pos)
        flags = hdr & self._mask
        if flags == RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE:
            return self._page_run(hdr)
        if flags == RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE:
            return self._zero_run(hdr)
        return self._ram_record(hdr, flags)

    def _block_for(self, offset: int, count: int) -> RamBlock:
        block = self._block
        if block is None:
            raise self._err("RAM record with CONTINUE before any block was named")
        if offset + count * self.page_size > block.size:
            raise self._err(f"page at offset 0x{offset:x} is beyond block {block.name!r} "
                            f"(size 0x{block.size:x})")
        return block

    def _page_run(self, hdr: int) -> Event | None | _Need:
        """One or more PAGE|CONTINUE records at consecutive offsets: one RamPages event."""
        buf = self._buf
        pos = self._pos
        ps = self.page_size
        rec = self._rec
        n = (len(buf) - pos) // rec
        if n == 0:
            block = self._block_for(hdr & ~self._mask, 1)
            self._pos = pos + 8
            return self._page_partial(block, hdr & ~self._mask)
        if n > 1:
            n = min(n, _MAX_RUN)
            st = _RUN_STRUCTS.get((ps, n))
            if st is None:
                st = _RUN_STRUCTS[ps, n] = struct.Struct(">" + f"Q{ps}x" * n)
            hdrs = st.unpack_from(buf, pos)
            want = tuple(range(hdr, hdr + n * ps, ps))
            if hdrs != want:
                n = _common_prefix(hdrs, want)
        offset = hdr & ~self._mask
        block = self._block_for(offset, n)
        self._pos = pos + n * rec
        return RamPages(block.name, offset, n, buf[pos + 8 : pos + n * rec], rec, ps)

    def _zero_run(self, hdr: int) -> Event | None | _Need:
        """One or more ZERO|CONTINUE records at consecutive offsets with one fill byte."""
        buf = self._buf
        pos = self._pos
        ps = self.page_size
        n = (len(buf) - pos) // 9
        if n == 0:
            if not self._ensure(9):
                return self._starve("a zero-page record")
            buf = self._buf
            pos = self._pos
            n = 1
        if n > 1:
            n = min(n, _MAX_RUN)
            st = _ZERO_STRUCTS.get(n)
            if st is None:
                st = _ZERO_STRUCTS[n] = struct.Struct(">" + "QB" * n)
            vals = st.unpack_from(buf, pos)
            hdrs = vals[0::2]
            fills = vals[1::2]
            want = tuple(range(hdr, hdr + n * ps, ps))
            if hdrs != want:
                n = _common_prefix(hdrs, want)
            if fills.count(fills[0]) != len(fills):
                n = min(n, _common_prefix(fills, (fills[0],) * len(fills)))
        fill = buf[pos + 8]
        offset = hdr & ~self._mask
        block = self._block_for(offset, n)
        self._pos = pos + n * 9
        return ZeroPages(block.name, offset, n, fill, ps)

    def _page_partial(self, block: RamBlock, offset: int) -> Event | None | _Need:
        """Copy a page whose data the current chunk cuts; continue in _st_page_rest."""
        self._page_buf = bytearray()
        self._page_left = self.page_size
        self._page_at = (block.name, offset)
        self._step = self._st_page_rest
        return None

    def _st_page_rest(self) -> Event | None | _Need:
        while self._page_left:
            if not self._next_chunk():
                return self._starve(f"the data of a page at offset 0x{self._page_at[1]:x}")
            take = min(self._page_left, len(self._buf) - self._pos)
            self._page_buf += self._buf[self._pos : self._pos + take]
            self._pos += take
            self._page_left -= take
        self._step = self._st_ram
        name, offset = self._page_at
        ps = self.page_size
        return RamPages(name, offset, 1, memoryview(self._page_buf), ps, ps)

    def _ram_record(self, hdr: int, flags: int) -> Event | None | _Need:
        at = self.offset
        base = flags & ~RAM_SAVE_FLAG_CONTINUE
        if base == RAM_SAVE_FLAG_EOS and flags == base:
            self._pos += 8
            self._step = self._st_footer
            return None
        if base == RAM_SAVE_FLAG_MULTIFD_FLUSH and flags == base:
            self._pos += 8
            return RamFlush()
        if base == RAM_SAVE_FLAG_MEM_SIZE and flags == base:
            res = self._item(self._parse_mem_size)
            if res is _SHORT:
                return self._starve("the RAM block list (MEM_SIZE)")
            return res  # type: ignore[return-value]
        if base in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
            res = self._item(self._parse_named_page)
            if res is _SHORT:
                return self._starve("a RAM page record header")
            if isinstance(res, ZeroPages):
                return res
            assert isinstance(res, tuple)
            block, offset = res
            ps = self.page_size
            if len(self._buf) - self._pos >= ps:
                p = self._pos
                self._pos = p + ps
                return RamPages(block.name, offset, 1, self._buf[p : p + ps], ps, ps)
            return self._page_partial(block, offset)
        if base == RAM_SAVE_FLAG_XBZRLE:
            raise self._err("XBZRLE-encoded page (RAM flag 0x40) is not supported: "
                            "switch the xbzrle capability off", at)
        if base == RAM_SAVE_FLAG_COMPRESS_PAGE:
            raise self._err("compressed page (RAM flag 0x100) is not supported: "
                            "switch the compress capability off", at)
        if base == RAM_SAVE_FLAG_HOOK:
            raise self._err("RDMA hook record (RAM flag 0x80) is not supported", at)
        raise self._err(f"unknown RAM record flags 0x{flags:x}", at)

    def _parse_named_page(self, c: _Cursor) -> ZeroPages | tuple[RamBlock, int]:
        hdr = c.be64()
        flags = hdr & self._mask
        offset = hdr & ~self._mask
        if not flags & RAM_SAVE_FLAG_CONTINUE:
            at = c.offset
            name = c.string("RAM block name")
            block = self._blocks.get(name)
            if block is None:
                raise MigrationStreamError(at, f"unknown RAM block {name!r}")
            self._block = block
        if flags & RAM_SAVE_FLAG_ZERO:
            fill = c.u8()
            block = self._block_for(offset, 1)
            return ZeroPages(block.name, offset, 1, fill, self.page_size)
        return self._block_for(offset, 1), offset

    def _parse_mem_size(self, c: _Cursor) -> Event:
        hdr = c.be64()
        total = left = hdr & ~self._mask
        blocks: list[RamBlock] = []
        while left > 0:
            if len(blocks) >= self.max_ram_blocks:
                raise MigrationStreamError(c.offset, f"more than {self.max_ram_blocks} RAM blocks")
            at = c.offset
            name = c.string("RAM block name")
            size = c.be64()
            if size > left:
                raise MigrationStreamError(
                    at, f"RAM block {name!r} of 0x{size:x} bytes exceeds the 0x{left:x} left "
                        f"of the announced total 0x{total:x}")
            left -= size
            page_size = addr = None
            # Postcopy adds the block's page size when it differs from the host's; nothing in
            # the stream says so, but the next item tells: another block starts with a
            # non-zero name length, a RAM record has flag bits, and a page size (or a region
            # address) is page aligned with a zero first byte.
            if self._ignore_shared:
                first = c.be64()
                if left > 0:
                    follows = c.peek_u8() == 0
                else:
                    follows = c.peek_be64() & self._mask == 0
                if follows:
                    page_size, addr = first, c.be64()
                else:
                    addr = first
            elif (c.peek_u8() == 0) if left > 0 else (c.peek_be64() & self._mask == 0):
                page_size = c.be64()
            if page_size is not None and (page_size & (page_size - 1) or page_size == 0):
                raise MigrationStreamError(at, f"RAM block {name!r}: page size {page_size} "
                                               "is not a power of two")
            blocks.append(RamBlock(name, size, page_size, addr))
        self._blocks = {b.name: b for b in blocks}
        self._block = None
        return RamBlocks(tuple(blocks), total)

    def _st_footer(self) -> Event | None | _Need:
        sec = self._cur
        assert sec is not None
        if not self._ensure(5):
            return self._starve(f"the footer of section {sec.section_id}")
        buf = self._buf
        pos = self._pos
        if buf[pos] != QEMU_VM_SECTION_FOOTER:
            raise self._err(f"expected section footer 0x7e for section {sec.section_id}, "
                            f"got 0x{buf[pos]:02x}")
        (sid,) = _BE32.unpack_from(buf, pos + 1)
        if sid != sec.section_id:
            raise self._err(f"section footer names section {sid}, "
                            f"expected {sec.section_id} ({sec.idstr!r})")
        at = self.offset
        self._pos = pos + 5
        self._step = self._st_section
        self._cur = None
        if self._cur_kind == QEMU_VM_SECTION_END:
            self._live.discard(sid)
        ev = SectionFooter(sid, sec.idstr, at)
        return ev if sec.is_ram else self._emit(ev)

    # -- device sections ----------------------------------------------------------------------

    def _st_device(self) -> Event | None | _Need:
        """Copy a device section's data until its footer (validated by what follows)."""
        sec = self._cur
        assert sec is not None
        footer = bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(sec.section_id)
        body = self._body
        while True:
            q = body.find(footer, self._scan)
            while q != -1:
                verdict = self._plausible_next(body, q + 5)
                if verdict is None:
                    break
                if verdict:
                    return self._device_framed(sec, q)
                if self._rejected is None:
                    self._rejected = (self._body_start + q, bytes(body[q + 5 : q + 7]))
                q = body.find(footer, q + 1)
            self._scan = q if q != -1 else max(0, len(body) - 4)
            if not self._next_chunk():
                if self._closed and self._rejected is not None:
                    at, after = self._rejected
                    where = f"the footer of section {sec.section_id} ({sec.idstr!r}) at offset {at}"
                    if after[0] == QEMU_VM_EOF:
                        raise self._err(f"expected the end or a VM description (0x06) after EOF "
                                        f"after {where}, got 0x{after[1]:02x}", at + 6)
                    raise self._err(f"expected a section type, EOF or a description after "
                                    f"{where}, got 0x{after[0]:02x}", at + 5)
                if self._closed:
                    raise self._err(f"stream ends inside section {sec.section_id} "
                                    f"({sec.idstr!r}) before its footer", self._cur_offset)
                return self._starve("device data")
            take = min(len(self._buf) - self._pos, _SCAN_WINDOW)
            if self._device_bytes + len(body) + take > self.max_device_bytes:
                raise self._err(
                    f"device data over the {self.max_device_bytes}-byte cap in section "
                    f"{sec.section_id} ({sec.idstr!r}) (no footer found)", self._cur_offset)
            body += self._buf[self._pos : self._pos + take]
            self._pos += take

    def _device_framed(self, sec: _Section, q: int) -> Event | None:
        body = self._body
        # give back what follows the data (the footer onwards) as input to parse next
        rest = self._buf[self._pos :]
        if len(rest):
            self._more.appendleft(rest)
        self._buf = memoryview(bytes(body[q:]))
        self._base = self._body_start + q
        self._pos = 0
        data = bytes(body[:q])
        self._body = bytearray()
        if self._cur_kind == QEMU_VM_SECTION_FULL:
            self._device_bytes += len(data)
            self._retained.append(
                _Retained(sec.section_id, sec.idstr, sec.instance_id, sec.version_id, data,
                          self._body_start))
        self._step = self._st_footer
        return self._emit(
            DeviceState(sec.section_id, sec.idstr, sec.instance_id, data, self._body_start))

    def _plausible_next(self, data: bytearray, i: int) -> bool | None:
        """Is data[i:] a plausible start of what follows a footer? None: cannot tell yet."""
        end = len(data)
        unsure = not self._closed

        def short(n: int) -> bool:
            return i + n > end

        if short(1):
            return None if unsure else True
        t = data[i]
        if t == QEMU_VM_EOF:
            if short(2):
                return None if unsure else True
            # EOF then the description marker: its length and JSON are checked after
            return data[i + 1] == QEMU_VM_VMDESCRIPTION
        if t in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            if short(6):
                return None if unsure else True
            n = data[i + 5]
            if n == 0:
                return False
            if short(6 + n + 8):
                return None if unsure else True
            (version,) = _BE32.unpack_from(data, i + 6 + n + 4)
            return _printable(data[i + 6 : i + 6 + n]) and version < 0x10000
        if t in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            if short(5):
                return None if unsure else True
            (sid,) = _BE32.unpack_from(data, i + 1)
            return sid in self._live
        if t == QEMU_VM_COMMAND:
            if short(5):
                return None if unsure else True
            cmd, length = struct.unpack_from(">HH", data, i + 1)
            known = COMMANDS.get(cmd)
            return known is not None and (known[1] is None or known[1] == length)
        return False

    # -- after EOF ----------------------------------------------------------------------------

    def _st_after_eof(self) -> Event | None | _Need:
        if not self._ensure(1):
            if self._closed:
                self._check_described(None)
                self._done = True
                self._step = self._st_done
                return self._released_then(StreamEnd(self.offset, False))
            return self._starve("the VM description")
        t = self._buf[self._pos]
        if t != QEMU_VM_VMDESCRIPTION:
            raise self._err(f"expected VM description 0x06 or the end after EOF, got 0x{t:02x}")
        if not self._ensure(5):
            return self._starve("the VM description length")
        (length,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if not 0 < length <= self.max_json_bytes:
            raise self._err(f"VM description length {length} is absurd "
                            f"(cap {self.max_json_bytes})")
        self._json_offset = self.offset
        self._json_len = length
        self._json = bytearray()
        self._pos += 5
        self._step = self._st_json
        return None

    def _st_json(self) -> Event | None | _Need:
        while len(self._json) < self._json_len:
            if not self._next_chunk():
                return self._starve(f"the VM description ({len(self._json)} of "
                                    f"{self._json_len} bytes)")
            take = min(self._json_len - len(self._json), len(self._buf) - self._pos)
            self._json += self._buf[self._pos : self._pos + take]
            self._pos += take
        at = self._json_offset
        try:
            desc = json.loads(bytes(self._json))
        except (ValueError, RecursionError) as exc:
            raise self._err(f"VM description is not valid JSON: {exc}", at + 5) from None
        if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
            raise self._err("VM description has no device list", at + 5)
        self._check_described(desc)
        self._json = bytearray()
        self._release()
        self._events.append(VmDescription(desc, at, self._json_len))
        self._events.append(StreamEnd(self.offset, True))
        self._done = True
        self._step = self._st_done
        return None

    def _check_described(self, desc: dict[str, Any] | None) -> None:
        """Split the retained FULL sections with the description; refuse any disagreement."""
        retained, self._retained = self._retained, []
        self._device_bytes = 0
        if desc is None:
            return
        devices = desc["devices"]
        at = self._json_offset
        if len(devices) != len(retained):
            raise self._err(f"VM description lists {len(devices)} devices, the stream has "
                            f"{len(retained)} FULL sections", at)
        for dev, sec in zip(devices, retained):
            if not isinstance(dev, dict):
                raise self._err("VM description: a device entry is not an object", at)
            if dev.get("name") != sec.idstr or dev.get("instance_id") != sec.instance_id:
                raise self._err(
                    f"VM description names {dev.get('name')!r} instance "
                    f"{dev.get('instance_id')!r} where the stream has section "
                    f"{sec.section_id} {sec.idstr!r} instance {sec.instance_id}", at)
            version = dev.get("version")
            if version is not None and version != sec.version_id:
                raise self._err(
                    f"VM description gives {sec.idstr!r} version {version!r}, its section "
                    f"{sec.section_id} header says {sec.version_id}", at)
            try:
                end = _walk_vmsd(dev, sec.data, 0, 0)
            except _Short:
                end = -1
            except (KeyError, TypeError, ValueError, IndexError, RecursionError,
                    AttributeError) as exc:
                raise self._err(f"VM description of {sec.idstr!r} is malformed "
                                f"({type(exc).__name__}: {exc})", at) from None
            except _WalkError as exc:
                raise self._err(f"section {sec.section_id} ({sec.idstr!r}): {exc}",
                                sec.offset + exc.pos) from None
            if end != len(sec.data):
                said = "more than" if end < 0 else str(end)
                raise self._err(
                    f"section {sec.section_id} ({sec.idstr!r}): the VM description accounts "
                    f"for {said} bytes, the footer comes after {len(sec.data)}", sec.offset)

    def _st_done(self) -> Event | None | _Need:
        if self._next_chunk():
            extra = len(self._buf) - self._pos + sum(map(len, self._more))
            raise self._err(f"{extra} bytes after the end of the stream")
        self._base += self._pos  # let go of the caller's (used up) buffer
        self._buf = memoryview(b"")
        self._pos = 0
        return NEED_DATA


class _WalkError(Exception):
    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of two equal-length tuples (a[0] == b[0]); C-speed compares."""
    lo, hi = 1, len(a)  # a[:lo] == b[:lo]; a[:hi+1] != b[:hi+1] or hi == len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _walk_vmsd(desc: dict[str, Any], data: bytes, pos: int, depth: int) -> int:
    """Where the fields and subsections a vmstate description lists end, from data[pos:].

    Every field carries the bytes it took ("size", per element; "array_len" elements); a
    "struct" field nests a description. Subsections are checked: 0x05, the name, a be32 version.
    """
    if depth > 64:
        raise _WalkError(pos, "description nests too deep")
    for fld in desc.get("fields", ()):
        count = fld.get("array_len", 1)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"bad array_len {count!r}")
        sub = fld.get("struct")
        if isinstance(sub, dict):
            for _ in range(count):
                before = pos
                pos = _walk_vmsd(sub, data, pos, depth + 1)
                if pos == before:  # an empty struct: all its elements are empty too
                    break
        elif fld.get("type") == "capability":
            for _ in range(count):
                if pos >= len(data):
                    raise _Short(pos)
                pos += 1 + data[pos]
        else:
            size = fld["size"]
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"bad size {size!r}")
            pos += size * count
        if pos > len(data):
            raise _Short(pos)
    for sub in desc.get("subsections", ()):
        name = str(sub["vmsd_name"]).encode()
        if pos + 2 > len(data):
            raise _Short(pos)
        if data[pos] != QEMU_VM_SUBSECTION:
            raise _WalkError(pos, f"expected subsection {sub['vmsd_name']!r} (0x05), "
                                  f"got 0x{data[pos]:02x}")
        n = data[pos + 1]
        if data[pos + 2 : pos + 2 + n] != name:
            raise _WalkError(pos, f"expected subsection {sub['vmsd_name']!r}, got "
                                  f"{data[pos + 2 : pos + 2 + n]!r}")
        pos += 2 + n + 4
        if pos > len(data):
            raise _Short(pos)
        pos = _walk_vmsd(sub, data, pos, depth + 1)
    return pos
