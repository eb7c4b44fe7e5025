"""The events and errors of the multifd channel parser (``_multifd.py``), h11's ``_events``."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from ._format import NEED_DATA, MigrationStreamError, NeedData

__all__ = [
    "NEED_BLOCKS",
    "NEED_DATA",
    "ChannelEnd",
    "ChannelInit",
    "DeviceStatePacket",
    "Event",
    "MultifdError",
    "NeedBlocks",
    "NeedData",
    "PagesAhead",
    "RamPacket",
    "SyncPacket",
]


class MultifdError(MigrationStreamError):
    """A multifd channel sent what QEMU never sends (or what we refuse).

    ``channel`` names the channel, ``offset`` is the offset in it; the message starts with both.
    A :class:`MigrationStreamError`, so one ``except`` takes every stream's errors.
    """

    def __init__(self, channel: str, offset: int, message: str) -> None:
        ValueError.__init__(self, f"{channel}: offset {offset}: {message}")
        self.channel = channel
        self.offset = offset


class NeedBlocks(enum.Enum):
    NEED_BLOCKS = "NEED_BLOCKS"

    def __repr__(self) -> str:
        return "NEED_BLOCKS"


#: MultifdParser.next_event(): call set_blocks() with the main stream's RAM blocks, then ask
#: again. (For more input it returns the package's one NEED_DATA.)
NEED_BLOCKS: Final = NeedBlocks.NEED_BLOCKS


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelInit:
    """The init packet: which channel this is, and of which source (``uuid``, 16 bytes)."""

    channel_id: int
    uuid: bytes
    version: int


@dataclass(frozen=True, slots=True)
class RamPacket:
    """One RAM packet's pages of ``block``: ``normal`` offsets with their bytes, ``zero`` offsets
    that are zero pages (no bytes). Page ``i``'s bytes are ``data[i*page_size:(i+1)*page_size]``,
    decompressed. ``offset`` is the channel offset of the packet header."""

    block: str
    normal: tuple[int, ...]
    zero: tuple[int, ...]
    data: memoryview
    page_size: int
    packet_num: int
    compression: str
    offset: int

    def iov(self) -> list[memoryview]:
        """The normal pages as views, in the order of ``normal``."""
        d, p = self.data, self.page_size
        return [d[i : i + p] for i in range(0, len(self.normal) * p, p)]

    def pages(self) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(block_offset, page_view)`` for each normal page."""
        return zip(self.normal, self.iov())


@dataclass(frozen=True, slots=True)
class PagesAhead:
    """An uncompressed RAM packet whose pages are left to the caller
    (``MultifdParser(take_pages=True)``): its header is checked, and its ``size`` bytes of raw
    pages (``normal``'s, in order) follow on the channel. The first ``len(head)`` of them had
    already been fed (``head`` views them); the other ``size - len(head)`` are the caller's to
    move (a ``splice``, a discarding read) and are never fed: the parser counts them as parsed.
    ``offset`` is the channel offset of the packet header, ``at`` that of its first page."""

    block: str
    normal: tuple[int, ...]
    zero: tuple[int, ...]
    page_size: int
    packet_num: int
    offset: int
    at: int
    head: memoryview

    @property
    def size(self) -> int:
        return len(self.normal) * self.page_size

    @property
    def remaining(self) -> int:
        """Bytes of the pages still on the channel, after ``head``."""
        return len(self.normal) * self.page_size - len(self.head)


@dataclass(frozen=True, slots=True)
class SyncPacket:
    """A SYNC packet: this channel's side of one synchronisation (the main stream has a
    MULTIFD_FLUSH, or an EOS, for each)."""

    packet_num: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeviceStatePacket:
    """A device-state packet (VFIO sends these with x-migration-multifd-transfer)."""

    idstr: str
    instance_id: int
    data: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class ChannelEnd:
    """The channel ended cleanly, between packets."""

    offset: int
    packets: int
    syncs: int


Event = ChannelInit | RamPacket | PagesAhead | SyncPacket | DeviceStatePacket | ChannelEnd
