"""QEMU live-migration stream, sans-IO: a parser (``stream``) and a summary fold (``summary``).

Nothing here touches a socket, a file or a clock; the receiver program drives these with channels.
"""

from .stream import (
    NEED_DATA,
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    Event,
    MigrationStreamError,
    RamBlock,
    RamBlocks,
    RamFlush,
    RamPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionPart,
    SectionStart,
    StreamEnd,
    StreamHeader,
    StreamParser,
    VmDescription,
    ZeroPages,
    expand_pages,
)
from .summary import Summary

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
    "Summary",
    "VmDescription",
    "ZeroPages",
    "expand_pages",
]
