"""QEMU live migration for qioc_green: a sans-IO stream parser and a drop-in receiver.

The parser (``StreamParser``, its events, ``MigrationStreamError``) and the summary fold
(``Summary``) touch no socket, file or clock. ``Receiver`` drives them with qioc_green channels:
it reads a stream where a destination QEMU's ``-incoming`` would stand, and saves, rebuilds RAM
(``RamDir``) and forwards (``Forwarder``) what it parses. The ``qioc-migration-receiver``
command (``python -m qioc_green.migration``) is ``cli.main``. ``qioc_green.migration.qemu``
starts real QEMU processes for demos and tests (it needs ``qemu.qmp``); it is not imported here.

Modules, h11-style: ``_format`` (the numbers), ``_events``, ``_receivebuffer``, ``_ram``,
``_vmdesc``, ``_parser`` (the state machine), ``_summary``; QEMU 10's multifd channels
(``_multifd_events``, ``_multifd_compress``, ``_multifd``) and mapped-ram files
(``_mapped_ram``); ``_uri``, ``_sinks``, ``_receiver`` (the glue); ``cli``.
"""

from ._events import (
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    Event,
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
    VmDescription,
    ZeroPages,
    expand_pages,
)
from ._format import COMMANDS, NEED_DATA, MigrationStreamError, check_page_size
from ._mapped_ram import MappedRamBlock, MappedRamError, MappedRamFile
from ._multifd import MultifdChannels, MultifdParser, packet_size, sniff_channel
from ._multifd_compress import COMPRESSIONS
from ._multifd_events import (
    NEED_BLOCKS,
    ChannelEnd,
    ChannelInit,
    DeviceStatePacket,
    MultifdError,
    RamPacket,
    SyncPacket,
)
from ._parser import StreamParser
from ._receiver import Outcome, ReceiveError, Receiver
from ._sinks import Forwarder, RamDir
from ._summary import Summary
from ._uri import Endpoint, Incoming, open_outgoing, parse_uri

__all__ = [
    "COMMANDS",
    "COMPRESSIONS",
    "ChannelEnd",
    "ChannelInit",
    "Command",
    "Configuration",
    "DeviceState",
    "DeviceStatePacket",
    "EndOfState",
    "Endpoint",
    "Event",
    "Forwarder",
    "Incoming",
    "MappedRamBlock",
    "MappedRamError",
    "MappedRamFile",
    "MigrationStreamError",
    "MultifdChannels",
    "MultifdError",
    "MultifdParser",
    "NEED_BLOCKS",
    "NEED_DATA",
    "Outcome",
    "RamBlock",
    "RamBlocks",
    "RamDir",
    "RamFlush",
    "RamPacket",
    "RamPages",
    "ReceiveError",
    "Receiver",
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
    "SyncPacket",
    "VmDescription",
    "ZeroPages",
    "check_page_size",
    "expand_pages",
    "open_outgoing",
    "packet_size",
    "parse_uri",
    "sniff_channel",
]
