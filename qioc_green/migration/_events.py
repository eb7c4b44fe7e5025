"""The events of the migration stream parser (immutable values; see ``_parser`` for when each
comes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


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

