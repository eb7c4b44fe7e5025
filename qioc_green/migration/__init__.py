"""QEMU live migration for qioc_green: a sans-IO stream parser and a drop-in receiver.

The parser (``StreamParser``, its events, ``MigrationStreamError``) and the summary fold
(``Summary``) touch no socket, file or clock. ``Receiver`` drives them with qioc_green channels:
it reads a stream where a destination QEMU's ``-incoming`` would stand, and saves, rebuilds RAM
(``RamDir``) and forwards (``Forwarder``) what it parses. The ``qioc-migration-receiver``
command (``python -m qioc_green.migration``) is ``cli.main``. ``qioc_green.migration.qemu``
starts real QEMU processes for demos and tests (it needs ``qemu.qmp``); it is not imported here.

What a destination owes its source, also sans-IO: the return path (``DestinationReturnPath``
answers the stream's commands; ``ReturnPathReader`` checks a destination's answers as the source
does) and a QMP monitor (``QmpConnection``: one client's framing; ``QmpDispatcher``: a
destination's commands over a ``MigrationTarget``). See docs/migration-destination.md.

Modules, h11-style: ``_format`` (the numbers), ``_events``, ``_receivebuffer``, ``_ram``,
``_vmdesc``, ``_parser`` (the state machine), ``_summary``; QEMU 10's multifd channels
(``_multifd_events``, ``_multifd_compress``, ``_multifd``) and mapped-ram files
(``_mapped_ram``); ``_return_path`` and ``_rp_codec`` (the return path), ``_qmp`` and
``_qmp_dispatch`` (QMP); ``_uri``, ``_sinks``, ``_receiver`` (the glue); ``_incoming`` (what
a multifd migration is told, and the configuration's capabilities checked),
``_multifd_sync``, ``_multifd_channel``, ``_multifd_tls`` and ``_multifd_receiver`` (the main
channel and N multifd channels, each handshaken and read in its own IOThread), ``_file_input`` (saved multifd migrations,
mapped-ram files); ``cli``.
"""

from ._destination import Destination
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
from ._format import COMMANDS, NEED_DATA, LocalProtocolError, MigCommand, MigrationStreamError
from ._incoming import IncomingSettings, check_configuration
from ._mapped_ram import MappedRamBlock, MappedRamError, MappedRamFile, NotMappedRam
from ._monitor import Monitor
from ._multifd import MultifdChannels, MultifdParser, packet_size, sniff_channel
from ._multifd_compress import COMPRESSIONS
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
from ._multifd_receiver import MultifdReceiver
from ._parser import StreamParser
from ._qmp import (
    NO_ID,
    PAUSED,
    ErrorClass,
    QmpBadRequest,
    QmpClosed,
    QmpConnection,
    QmpError,
    QmpEvent,
    QmpGreeting,
    QmpRequest,
    QmpReturn,
)
from ._qmp_dispatch import (
    CAPABILITIES,
    DEFAULT_PARAMETERS,
    SOURCE_ONLY_CAPABILITIES,
    BroadcastEvent,
    CloseClient,
    CommandError,
    IncomingInfo,
    MigrationTarget,
    QmpDispatcher,
    RamStats,
    SendReply,
)
from ._receiver import Outcome, ReceiveError, Receiver
from ._return_path import DestinationReturnPath, PostcopyState, decode_advise, decode_ram_discard
from ._rp_codec import (
    MAX_MESSAGE_DATA,
    Pong,
    RecvBitmap,
    ReqPages,
    ResumeAck,
    ReturnPathError,
    ReturnPathReader,
    RpMessage,
    RpType,
    Shut,
    SwitchoverAck,
    encode_message,
    encode_pong,
    encode_req_pages,
    encode_resume_ack,
    encode_shut,
    encode_switchover_ack,
)
from ._settings import DestinationSettings
from ._sinks import Forwarder, RamDir
from ._summary import Summary
from ._tls import TlsCreds, TlsError, accept_tls, connect_tls
from ._uri import Endpoint, Incoming, open_outgoing, parse_uri

__all__ = [
    "BroadcastEvent",
    "CAPABILITIES",
    "COMMANDS",
    "COMPRESSIONS",
    "ChannelEnd",
    "ChannelInit",
    "CloseClient",
    "Command",
    "CommandError",
    "Configuration",
    "DEFAULT_PARAMETERS",
    "Destination",
    "DestinationReturnPath",
    "DestinationSettings",
    "DeviceState",
    "DeviceStatePacket",
    "EndOfState",
    "Endpoint",
    "ErrorClass",
    "Event",
    "Forwarder",
    "Incoming",
    "IncomingInfo",
    "IncomingSettings",
    "LocalProtocolError",
    "MAX_MESSAGE_DATA",
    "MappedRamBlock",
    "MappedRamError",
    "MappedRamFile",
    "MappedRamReceiver",
    "MigCommand",
    "MigrationStreamError",
    "MigrationTarget",
    "Monitor",
    "MultifdChannels",
    "MultifdError",
    "MultifdParser",
    "MultifdReceiver",
    "NEED_BLOCKS",
    "NEED_DATA",
    "NO_ID",
    "NotMappedRam",
    "Outcome",
    "PAUSED",
    "PagesAhead",
    "Pong",
    "PostcopyState",
    "QmpBadRequest",
    "QmpClosed",
    "QmpConnection",
    "QmpDispatcher",
    "QmpError",
    "QmpEvent",
    "QmpGreeting",
    "QmpRequest",
    "QmpReturn",
    "RamBlock",
    "RamBlocks",
    "RamDir",
    "RamEos",
    "RamFlush",
    "RamPacket",
    "RamPages",
    "RamStats",
    "ReceiveError",
    "Receiver",
    "RecvBitmap",
    "ReqPages",
    "ResumeAck",
    "ReturnPathError",
    "ReturnPathReader",
    "RpMessage",
    "RpType",
    "SOURCE_ONLY_CAPABILITIES",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionHeader",
    "SectionPart",
    "SectionStart",
    "SendReply",
    "Shut",
    "StreamEnd",
    "StreamHeader",
    "StreamParser",
    "Summary",
    "SwitchoverAck",
    "SyncPacket",
    "TlsCreds",
    "TlsError",
    "VmDescription",
    "ZeroPages",
    "accept_tls",
    "check_configuration",
    "connect_tls",
    "decode_advise",
    "decode_ram_discard",
    "encode_message",
    "encode_pong",
    "encode_req_pages",
    "encode_resume_ack",
    "encode_shut",
    "encode_switchover_ack",
    "expand_pages",
    "open_outgoing",
    "packet_size",
    "parse_uri",
    "sniff_channel",
]
