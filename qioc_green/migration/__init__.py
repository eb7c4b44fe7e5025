"""QEMU live migration for qioc_green: a sans-IO stream parser and a drop-in receiver.

The parser (``StreamParser``, its events, ``MigrationStreamError``) and the summary fold
(``Summary``) touch no socket, file or clock. ``Receiver`` drives them with qioc_green channels:
it reads a stream where a destination QEMU's ``-incoming`` would stand, and saves, rebuilds RAM
(``RamDir``) and forwards (``Forwarder``) what it parses. The ``qioc-migration-receiver``
command (``python -m qioc_green.migration``) is ``cli.main``. ``qioc_green.migration.qemu``
starts real QEMU processes for demos and tests (it needs ``qemu.qmp``); it is not imported here.

Modules, h11-style: ``_format`` (the numbers), ``_events``, ``_receivebuffer``, ``_ram``,
``_vmdesc``, ``_parser`` (the state machine), ``_summary``; ``_uri``, ``_sinks``,
``_receiver`` (the glue); ``cli``.
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
from ._format import COMMANDS, NEED_DATA, MigrationStreamError
from ._parser import StreamParser
from ._receiver import Outcome, ReceiveError, Receiver
from ._sinks import Forwarder, RamDir
from ._summary import Summary
from ._uri import Endpoint, Incoming, open_outgoing, parse_uri

__all__ = [
    "COMMANDS",
    "Command",
    "Configuration",
    "DeviceState",
    "EndOfState",
    "Endpoint",
    "Event",
    "Forwarder",
    "Incoming",
    "MigrationStreamError",
    "NEED_DATA",
    "Outcome",
    "RamBlock",
    "RamBlocks",
    "RamDir",
    "RamFlush",
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
    "VmDescription",
    "ZeroPages",
    "expand_pages",
    "open_outgoing",
    "parse_uri",
]
