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
(``_mapped_ram``); ``_uri``, ``_sinks``, ``_receiver`` (the glue); ``_settings`` (what the
receiver is told, as QMP tells a destination), ``_multifd_sync``, ``_multifd_channel`` and
``_multifd_receiver`` (the main channel and N multifd channels, each in its own IOThread),
``_file_input`` (saved multifd migrations, mapped-ram files); ``cli``.
"""

from ._events import (
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    Event,
    RamBlock,
    RamBlocks,
    RamEos,
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
from ._file_input import MappedRamReceiver
from ._format import COMMANDS, NEED_DATA, MigrationStreamError
from ._mapped_ram import MappedRamBlock, MappedRamError, MappedRamFile, NotMappedRam
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
from ._multifd_receiver import MultifdReceiver
from ._parser import StreamParser
from ._receiver import Outcome, ReceiveError, Receiver
from ._settings import SUPPORTED_CAPABILITIES, IncomingSettings, check_configuration
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
    "IncomingSettings",
    "MappedRamBlock",
    "MappedRamError",
    "MappedRamFile",
    "MappedRamReceiver",
    "MigrationStreamError",
    "MultifdChannels",
    "MultifdError",
    "MultifdParser",
    "MultifdReceiver",
    "NEED_BLOCKS",
    "NEED_DATA",
    "NotMappedRam",
    "Outcome",
    "RamBlock",
    "RamBlocks",
    "RamDir",
    "RamEos",
    "RamFlush",
    "RamPacket",
    "RamPages",
    "ReceiveError",
    "Receiver",
    "SUPPORTED_CAPABILITIES",
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
    "check_configuration",
    "expand_pages",
    "open_outgoing",
    "packet_size",
    "parse_uri",
    "sniff_channel",
]
