"""Sans-IO NBD: two state machines, bytes in, events out.

The protocol facts that shape this module (from ``doc/proto.md`` of NetworkBlockDevice/nbd):

* **Two phases.** The handshake is strictly request/response: the server greets (``NBDMAGIC``,
  ``IHAVEOPT``, 16 handshake flags), the client answers with 32 client flags, then sends one option
  at a time and MUST wait for the option's final reply (``NBD_REP_ACK`` or an error; ``LIST`` and
  ``INFO``/``GO`` send several replies before it). ``NBD_OPT_GO`` acked, or ``NBD_OPT_EXPORT_NAME``
  answered (size, flags, maybe 124 zeroes, never an error: refusing it means hanging up), moves both
  sides to transmission. Transmission is the opposite: any number of requests in flight, replies in
  any order, matched by the 64-bit cookie (the spec's old name is "handle").
* **Only WRITE carries a request payload, only READ a reply payload.** Without structured replies
  a simple reply does not say whether data follows: only the client's memory of which cookie was a
  READ can split the stream. Structured replies (negotiated) are self-describing chunks with a
  length, and a READ may be answered by several data and hole chunks in any order, the last one
  flagged DONE.
* **STARTTLS** is an in-band upgrade: after the server's ACK the next bytes on the wire are TLS,
  and everything negotiated before it is forgotten.
* **Metadata contexts belong to an export.** BLOCK_STATUS is only allowed if the last
  SET_META_CONTEXT named the export finally chosen; nbdkit already forgets the contexts when a
  later INFO names another export, so both machines do the same.
* **Limits.** Strings are at most 4096 bytes; servers must accept 32 MiB payloads (2^25) and may
  hang up on larger ones; block status replies carry at most 2^20 extents.

What that means here, and the decisions:

1. **h11's shape.** ``receive_data(bytes)`` (``b""`` means EOF), ``next_event()`` returns one event,
   ``NEED_DATA`` or ``PAUSED``; ``send(event)`` returns bytes and ``send_iov(event)`` a list of
   buffers for ``writev`` (the payload is never copied into a header). No sockets, clock or files.
2. **One option at a time.** After the server machine returns an option event it returns ``PAUSED``
   until the glue has sent that option's final reply (the client side shows the same thing as
   ``pending_option``), so replies always belong to the option they
   answer, and bytes pipelined behind a STARTTLS stay untouched (they are the TLS ClientHello:
   ``take_trailing_data()`` hands them over). The upgrade itself is an event, ``TLSUpgrade``, on both
   sides; the glue wraps its channel and calls ``tls_started()``.
3. **Payloads stream.** A WRITE is a ``Request`` event followed by ``WriteData`` events (the last
   flagged), a READ reply on the client side is ``ReadData``/``ReadHole`` events: each data event is a
   ``memoryview`` into the ``bytes`` object the glue passed to ``receive_data``, so a payload is
   never copied, never buffered whole, and memory per connection is bounded by what the glue feeds
   between two ``next_event`` loops plus one header or one option (``max_option_length``). Data
   events may be split anywhere; only their concatenation is meaningful.
4. **Errors.** ``RemoteProtocolError`` is the peer's fault (wrong magic, a length over the limit, a
   request before negotiation, a reply for a cookie not in flight, EOF in the middle of a message):
   the glue hangs up. ``LocalProtocolError`` is ours (sending an event the state does not allow).
   Messages name what was expected and the byte offset in the received stream; after a remote
   error the machine stays broken and raises it again. What the spec wants answered rather than
   fatal is answered: an option with bad syntax is an ``OptInvalid`` event (reply
   ``NBD_REP_ERR_INVALID``), an unknown option an ``OptUnknown`` (reply ``NBD_REP_ERR_UNSUP``), and an
   unknown command or flag a normal ``Request`` for which ``check_request()`` gives ``EINVAL`` (the
   spec says SHOULD return EINVAL, not hang up; only WRITE has a payload, so the stream stays in
   step). Checks that need the export (bounds, alignment, read-only) live in ``check_request()``
   so the glue stays thin.
5. **Cookies are the glue's.** The client machine tracks every request in flight by cookie
   (``new_cookie()`` is a convenience counter), refuses a duplicate, matches each reply chunk to
   its request, checks data chunks against the request's range (no overlap, full coverage before
   a successful DONE) and turns block status payloads into ``Extent`` tuples.
6. **Not here.** Oldstyle negotiation, extended headers (64-bit lengths), resize. A server's
   extended-header request magic is reported as such, then refused.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

__all__ = [
    "BASE_ALLOCATION",
    "CLISERV_MAGIC",
    "EXTENDED_REQUEST_MAGIC",
    "IHAVEOPT",
    "MAX_EXTENTS",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "NBDMAGIC",
    "NEED_DATA",
    "OPTION_REPLY_MAGIC",
    "PAUSED",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "Ack",
    "BlockSize",
    "BlockStatus",
    "BlockStatusChunk",
    "ClientConnection",
    "ClientFlag",
    "ClientFlags",
    "Closed",
    "Cmd",
    "CmdFlag",
    "Errno",
    "ErrorChunk",
    "Event",
    "ExportDescription",
    "ExportInfo",
    "ExportName",
    "Extent",
    "Greeting",
    "HandshakeFlag",
    "Info",
    "LocalProtocolError",
    "MetaContext",
    "NoneChunk",
    "OffsetData",
    "OffsetHole",
    "Opt",
    "OptAbort",
    "OptExportName",
    "OptGo",
    "OptInfo",
    "OptInvalid",
    "OptList",
    "OptListMetaContext",
    "OptSetMetaContext",
    "OptStartTLS",
    "OptStructuredReply",
    "OptUnknown",
    "OptionError",
    "ProtocolError",
    "ReadData",
    "ReadHole",
    "RemoteProtocolError",
    "Rep",
    "ReplyDone",
    "ReplyError",
    "ReplyFlag",
    "ReplyType",
    "Request",
    "ServerConnection",
    "ServerEntry",
    "SimpleReply",
    "StateFlag",
    "TLSUpgrade",
    "TransmissionFlag",
    "UnknownInfo",
    "WriteData",
    "check_request",
    "decode_extents",
    "decode_request_header",
    "encode_extents",
    "encode_request",
]

# ---------------------------------------------------------------------------------------------
# Constants

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting (not supported)
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # extended headers (not supported)

MAX_PAYLOAD = 32 * 1024 * 1024  # every server must take 2^25 byte payloads
MAX_STRING = 4096  # names, descriptions, messages
MAX_OPTION_LENGTH = 64 * 1024  # our bound on one option (or option reply) held in memory
MAX_EXTENTS = 1 << 20  # servers SHOULD NOT send more per block status chunk
BASE_ALLOCATION = "base:allocation"


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Extent flags of the ``base:allocation`` metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


# Plain ints for the hot paths (enum attribute lookups cost more than a global).
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES, _BLOCK_STATUS = range(8)
_FUA, _NO_HOLE, _DF, _REQ_ONE, _FAST_ZERO = 1, 2, 4, 8, 16
_DONE = 1
_T_NONE, _T_DATA, _T_HOLE, _T_STATUS = 0, 1, 2, 5
_T_ERROR, _T_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2
_REP_ERR_BIT = 1 << 31
_CHUNK_ERR_BIT = 1 << 15

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_EXTENT = struct.Struct(">II")
_ZEROES = bytes(124)
_REQUEST_SIZE = _REQUEST.size  # 28
_SIMPLE_SIZE = _SIMPLE.size  # 16
_CHUNK_SIZE = _CHUNK.size  # 20
# The largest non-data chunk the client holds in memory: a block status chunk of 2^20 extents.
_MAX_CHUNK = 4 + 8 * MAX_EXTENTS

# Which command flags each command accepts (FUA is accepted everywhere once SEND_FUA is
# advertised; the spec says existing clients set it on any command).
_CMD_FLAGS = {
    _READ: _FUA | _DF,
    _WRITE: _FUA,
    _DISC: _FUA,
    _FLUSH: _FUA,
    _TRIM: _FUA,
    _CACHE: _FUA,
    _WRITE_ZEROES: _FUA | _NO_HOLE | _FAST_ZERO,
    _BLOCK_STATUS: _FUA | _REQ_ONE,
}


def _name(enum: type[IntEnum], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


# ---------------------------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """The NBD conversation cannot go on; ``offset`` is the byte in the received stream (or None)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol state does not allow (a bug in the glue)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; hang up."""


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""``next_event()``: feed more bytes with ``receive_data()``."""
PAUSED = _Sentinel("PAUSED")
"""``next_event()``: nothing is parsed until we send a reply (or finish the TLS upgrade)."""


# ---------------------------------------------------------------------------------------------
# Events


class Event:
    """Base of every event; events are immutable values compared field by field."""

    __slots__ = ()




class Extent(NamedTuple):
    length: int
    flags: int


# Handshake, server to client
@dataclass(frozen=True, slots=True)
class Greeting(Event):
    flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


# Handshake, client to server
@dataclass(frozen=True, slots=True)
class ClientFlags(Event):
    flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


@dataclass(frozen=True, slots=True)
class OptExportName(Event):
    name: str = ""


@dataclass(frozen=True, slots=True)
class OptAbort(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptList(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptStartTLS(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptInfo(Event):
    name: str = ""
    requests: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OptGo(Event):
    name: str = ""
    requests: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OptStructuredReply(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptListMetaContext(Event):
    name: str = ""
    queries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OptSetMetaContext(Event):
    name: str = ""
    queries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OptUnknown(Event):
    """An option this module does not know (reply ``Rep.ERR_UNSUP``); a client may send it as a
    raw, unchecked option (tests use that to play a misbehaving client)."""

    option: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class OptInvalid(Event):
    """A known option whose data is malformed: reply ``Rep.ERR_INVALID`` (hang up for EXPORT_NAME)."""

    option: int
    data: bytes
    reason: str


# Option replies, server to client
@dataclass(frozen=True, slots=True)
class Ack(Event):
    pass


@dataclass(frozen=True, slots=True)
class ServerEntry(Event):
    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class ExportInfo(Event):
    """NBD_INFO_EXPORT in reply to INFO/GO, and the whole reply to EXPORT_NAME."""

    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class ExportName(Event):
    name: str


@dataclass(frozen=True, slots=True)
class ExportDescription(Event):
    description: str


@dataclass(frozen=True, slots=True)
class BlockSize(Event):
    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class UnknownInfo(Event):
    info: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MetaContext(Event):
    context_id: int
    name: str


@dataclass(frozen=True, slots=True)
class OptionError(Event):
    """A final error reply to an option; ``error`` has bit 31 set (``Rep.ERR_*``)."""

    error: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class TLSUpgrade(Event):
    """STARTTLS was acknowledged: the next bytes are TLS. Call ``tls_started()`` when done."""


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The peer closed the stream at a message boundary (``receive_data(b"")``)."""


# Transmission, client to server
@dataclass(frozen=True, slots=True)
class Request(Event):
    """A request. Sending a WRITE needs ``data``; the server receives it as ``WriteData`` events."""

    command: int
    cookie: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: bytes | memoryview | None = None


@dataclass(frozen=True, slots=True)
class WriteData(Event):
    """A piece of a WRITE payload, at absolute export ``offset``; ``last`` ends the payload."""

    cookie: int
    offset: int
    data: bytes | memoryview
    last: bool


# Transmission, server to client (what the server sends)
@dataclass(frozen=True, slots=True)
class SimpleReply(Event):
    cookie: int
    error: int = 0
    data: bytes | memoryview | None = None


@dataclass(frozen=True, slots=True)
class OffsetData(Event):
    cookie: int
    offset: int
    data: bytes | memoryview
    done: bool = False


@dataclass(frozen=True, slots=True)
class OffsetHole(Event):
    cookie: int
    offset: int
    length: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class BlockStatusChunk(Event):
    cookie: int
    context_id: int
    extents: tuple[Extent, ...]
    done: bool = False


@dataclass(frozen=True, slots=True)
class ErrorChunk(Event):
    """An error chunk; with ``offset`` it is NBD_REPLY_TYPE_ERROR_OFFSET."""

    cookie: int
    error: int
    message: str = ""
    offset: int | None = None
    done: bool = True


@dataclass(frozen=True, slots=True)
class NoneChunk(Event):
    cookie: int


# Transmission, what the client receives (replies reassembled per request)
@dataclass(frozen=True, slots=True)
class ReadData(Event):
    """Read data for ``cookie`` at absolute export ``offset`` (a view; copy it out or keep it)."""

    cookie: int
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ReadHole(Event):
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatus(Event):
    cookie: int
    context_id: int
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class ReplyError(Event):
    """One error chunk (the request's final status comes in ``ReplyDone``)."""

    cookie: int
    error: int
    message: str = ""
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class ReplyDone(Event):
    """The request ``cookie`` is complete; ``error`` is 0 or the first error reported."""

    cookie: int
    error: int = 0
    message: str = ""


Buffers = list[bytes | memoryview]

# ---------------------------------------------------------------------------------------------
# Plain encode/decode helpers


def encode_request(request: Request) -> bytes:
    """The 28-byte request header (the WRITE payload, if any, is not included)."""
    return _REQUEST.pack(REQUEST_MAGIC, request.flags, request.command, request.cookie,
                         request.offset, request.length)


def decode_request_header(header: bytes | memoryview) -> Request:
    """Decode 28 header bytes; raises RemoteProtocolError for a wrong magic."""
    magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(header)
    if magic != REQUEST_MAGIC:
        raise RemoteProtocolError(f"expected request magic 0x{REQUEST_MAGIC:08x}, got 0x{magic:08x}", 0)
    return Request(command, cookie, offset, length, flags)


def encode_extents(context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    """The payload of a block status chunk."""
    flat: list[int] = []
    for length, flags in extents:
        flat.append(length)
        flat.append(flags)
    return struct.pack(f">I{len(flat)}I", context_id, *flat)


def decode_extents(payload: bytes | memoryview) -> tuple[int, tuple[Extent, ...]]:
    """(context id, extents) from a block status chunk payload (length 4 + 8n, n >= 1)."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise RemoteProtocolError(f"block status payload of {len(payload)} bytes is not 4 + 8n, n >= 1")
    (context_id,) = _U32.unpack_from(payload)
    extents = tuple(Extent(length, flags) for length, flags in _EXTENT.iter_unpack(payload[4:]))
    return context_id, extents


def _string(data: bytes | memoryview, what: str) -> str:
    """Decode a protocol string; ValueError (with a reason) if it breaks the rules."""
    if len(data) > MAX_STRING:
        raise ValueError(f"{what} of {len(data)} bytes is over {MAX_STRING}")
    raw = bytes(data)
    if b"\0" in raw:
        raise ValueError(f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None


def _encode_string(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise LocalProtocolError(f"{what} must be at most {MAX_STRING} bytes of UTF-8 without NUL")
    return raw


def _decode_option(option: int, data: bytes) -> Event:
    """An option's data into its event; malformed data of a known option gives OptInvalid."""
    try:
        if option == Opt.EXPORT_NAME:
            return OptExportName(_string(data, "export name"))
        if option == Opt.ABORT:
            return OptAbort()  # the spec: ignore any data
        if option in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY):
            if data:
                raise ValueError(f"{len(data)} bytes of data where none are allowed")
            return {Opt.LIST: OptList, Opt.STARTTLS: OptStartTLS,
                    Opt.STRUCTURED_REPLY: OptStructuredReply}[Opt(option)]()
        if option in (Opt.INFO, Opt.GO):
            if len(data) < 6:
                raise ValueError(f"{len(data)} bytes, at least 6 needed")
            (name_len,) = _U32.unpack_from(data)
            if name_len > len(data) - 6:
                raise ValueError(f"name length {name_len} exceeds the option's {len(data)} bytes")
            name = _string(data[4:4 + name_len], "export name")
            (count,) = _U16.unpack_from(data, 4 + name_len)
            if len(data) != 6 + name_len + 2 * count:
                raise ValueError(f"{count} information requests do not fill {len(data)} bytes")
            requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
            cls = OptInfo if option == Opt.INFO else OptGo
            return cls(name, requests)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if len(data) < 8:
                raise ValueError(f"{len(data)} bytes, at least 8 needed")
            (name_len,) = _U32.unpack_from(data)
            if name_len > len(data) - 8:
                raise ValueError(f"name length {name_len} exceeds the option's {len(data)} bytes")
            name = _string(data[4:4 + name_len], "export name")
            pos = 4 + name_len
            (count,) = _U32.unpack_from(data, pos)
            pos += 4
            if count * 4 > len(data) - pos:
                raise ValueError(f"{count} queries cannot fit in {len(data) - pos} bytes")
            queries = []
            for _ in range(count):
                if pos + 4 > len(data):
                    raise ValueError("query length runs past the option data")
                (qlen,) = _U32.unpack_from(data, pos)
                pos += 4
                if qlen > len(data) - pos:
                    raise ValueError(f"query length {qlen} runs past the option data")
                queries.append(_string(data[pos:pos + qlen], "query"))
                pos += qlen
            if pos != len(data):
                raise ValueError(f"{len(data) - pos} trailing bytes after the queries")
            cls2 = OptListMetaContext if option == Opt.LIST_META_CONTEXT else OptSetMetaContext
            return cls2(name, tuple(queries))
    except ValueError as exc:
        return OptInvalid(option, data, str(exc))
    return OptUnknown(option, data)


def _encode_option(event: Event) -> tuple[int, bytes]:
    if isinstance(event, OptExportName):
        return Opt.EXPORT_NAME, _encode_string(event.name, "export name")
    if isinstance(event, OptAbort):
        return Opt.ABORT, b""
    if isinstance(event, OptList):
        return Opt.LIST, b""
    if isinstance(event, OptStartTLS):
        return Opt.STARTTLS, b""
    if isinstance(event, OptStructuredReply):
        return Opt.STRUCTURED_REPLY, b""
    if isinstance(event, (OptInfo, OptGo)):
        name = _encode_string(event.name, "export name")
        reqs = tuple(event.requests)
        data = _U32.pack(len(name)) + name + struct.pack(f">H{len(reqs)}H", len(reqs), *reqs)
        return (Opt.INFO if isinstance(event, OptInfo) else Opt.GO), data
    if isinstance(event, (OptListMetaContext, OptSetMetaContext)):
        name = _encode_string(event.name, "export name")
        parts = [_U32.pack(len(name)), name, _U32.pack(len(event.queries))]
        for query in event.queries:
            raw = _encode_string(query, "query")
            parts += [_U32.pack(len(raw)), raw]
        opt = Opt.LIST_META_CONTEXT if isinstance(event, OptListMetaContext) else Opt.SET_META_CONTEXT
        return opt, b"".join(parts)
    if isinstance(event, OptUnknown):
        return event.option, bytes(event.data)
    raise LocalProtocolError(f"{event!r} is not an option")


def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


# ---------------------------------------------------------------------------------------------
# Request checks for the server glue


def check_request(request: Request, *, export_size: int, transmission_flags: int,
                  minimum_block: int = 1, max_payload: int = MAX_PAYLOAD,
                  structured: bool = False, meta_contexts: int = 0) -> int:
    """The NBD errno a server should answer ``request`` with, or 0 if it may be served.

    Semantic checks only (the state machine already checked the framing), in the spec's order
    of preference: unknown command or flag and commands not advertised (EINVAL), writes to a
    read-only export (EPERM), misalignment (EINVAL), a READ or WRITE over the maximum payload
    (EINVAL), a range past the end (ENOSPC for writes, EINVAL otherwise). DISC is never checked.
    """
    cmd, flags, offset, length = request.command, request.flags, request.offset, request.length
    allowed = _CMD_FLAGS.get(cmd)
    if allowed is None:
        return Errno.EINVAL
    if cmd == _DISC:
        return 0
    if flags & ~allowed:
        return Errno.EINVAL
    tf = transmission_flags
    if flags & _FUA and not tf & TransmissionFlag.SEND_FUA:
        return Errno.EINVAL
    if flags & _DF and not (structured and tf & TransmissionFlag.SEND_DF):
        return Errno.EINVAL
    if flags & _FAST_ZERO and not tf & TransmissionFlag.SEND_FAST_ZERO:
        return Errno.EINVAL
    if cmd == _FLUSH:
        if not tf & TransmissionFlag.SEND_FLUSH or offset or length:
            return Errno.EINVAL
        return 0
    if cmd == _TRIM and not tf & TransmissionFlag.SEND_TRIM:
        return Errno.EINVAL
    if cmd == _WRITE_ZEROES and not tf & TransmissionFlag.SEND_WRITE_ZEROES:
        return Errno.EINVAL
    if cmd == _BLOCK_STATUS and not (structured and meta_contexts):
        return Errno.EINVAL
    if cmd in (_WRITE, _TRIM, _WRITE_ZEROES) and tf & TransmissionFlag.READ_ONLY:
        return Errno.EPERM
    if minimum_block > 1 and (offset % minimum_block or length % minimum_block):
        return Errno.EINVAL
    if cmd in (_READ, _WRITE) and length > max_payload:
        return Errno.EINVAL
    if offset > export_size or length > export_size - offset:
        return Errno.ENOSPC if cmd in (_WRITE, _WRITE_ZEROES) else Errno.EINVAL
    return 0


# ---------------------------------------------------------------------------------------------
# Receive buffer


class _Buffer:
    """Bytes received and not yet parsed: a queue of views into the objects the glue passed in.

    Headers are small and are joined when they straddle two pieces; payloads are handed out
    as views (``take_view``), so they are never copied here.
    """

    __slots__ = ("_chunks", "size")

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self.size = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse a mutable buffer: keep our own copy
        if data:
            self._chunks.append(memoryview(data))
            self.size += len(data)

    def peek(self, n: int) -> bytes | memoryview:
        """The first ``n`` bytes (caller checked ``size >= n``), without consuming them."""
        if not n:
            return b""
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        parts = []
        need = n
        for chunk in self._chunks:
            parts.append(chunk[:need])
            need -= len(parts[-1])
            if not need:
                break
        return b"".join(parts)

    def skip(self, n: int) -> None:
        self.size -= n
        chunks = self._chunks
        while n:
            first = chunks[0]
            if len(first) > n:
                chunks[0] = first[n:]
                return
            n -= len(first)
            chunks.popleft()

    def take(self, n: int) -> bytes:
        data = bytes(self.peek(n))
        self.skip(n)
        return data

    def take_view(self, n: int) -> memoryview:
        """Up to ``n`` bytes from the first piece, as a view (never copied)."""
        first = self._chunks[0]
        if len(first) > n:
            self._chunks[0] = first[n:]
            view = first[:n]
        else:
            self._chunks.popleft()
            view = first
        self.size -= len(view)
        return view

    def take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self.size = 0
        return data


# ---------------------------------------------------------------------------------------------
# Common machinery


class _Phase(IntEnum):
    GREETING = 0  # server: greeting not sent yet; client: waiting for it
    CLIENT_FLAGS = 1  # server: waiting for them; client: must send them
    OPTIONS = 2
    TLS = 3  # STARTTLS acked; waiting for tls_started()
    TRANSMISSION = 4
    CLOSED = 5  # after ABORT or DISC
    ERROR = 6


class _Connection:
    """What both machines share: the receive buffer, EOF, errors and the byte count."""

    def __init__(self) -> None:
        self._buf = _Buffer()
        self._rx = 0  # bytes consumed from the received stream so far
        self._eof = False
        self._error: ProtocolError | None = None
        self._phase = _Phase.GREETING
        self._events: deque[Event] = deque()
        self._tls_announced = False
        self.structured = False  # structured replies negotiated
        self.meta_contexts: dict[int, str] = {}  # context id -> name, after SET_META_CONTEXT
        self._meta_export = ""  # the export the last SET_META_CONTEXT named
        self.tls_active = False

    # -- public API shared by both ---------------------------------------------------------
    @property
    def phase(self) -> str:
        """``GREETING``, ``CLIENT_FLAGS``, ``OPTIONS``, ``TLS``, ``TRANSMISSION``, ``CLOSED`` or ``ERROR``."""
        return self._phase.name

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return self._buf.size

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side (EOF)."""
        if self._eof and data:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        else:
            self._buf.append(data)

    def next_event(self) -> Event | _Sentinel:
        """The next event, or NEED_DATA, or PAUSED. Raises ProtocolError (and keeps raising)."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._phase = _Phase.ERROR
            self._error = exc
            raise

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event`` to the peer; raises LocalProtocolError if not allowed now."""
        return b"".join(self.send_iov(event))

    def send_iov(self, event: Event) -> Buffers:
        """As ``send``, as a list of buffers for writev: payloads are passed through uncopied."""
        if self._phase == _Phase.ERROR:
            raise LocalProtocolError("cannot send after a protocol error")
        if self._phase == _Phase.TLS:
            raise LocalProtocolError("cannot send while the TLS upgrade is pending; call tls_started()")
        return self._send(event)

    def take_trailing_data(self) -> bytes:
        """During the TLS upgrade: the bytes received after STARTTLS (they are TLS, not NBD)."""
        if self._phase != _Phase.TLS:
            raise LocalProtocolError("take_trailing_data() is only for the TLS upgrade")
        return self._buf.take_all()

    def tls_started(self) -> None:
        """The TLS handshake is done; NBD continues over it with a clean negotiation state."""
        if self._phase != _Phase.TLS:
            raise LocalProtocolError("tls_started() without an acknowledged STARTTLS")
        if self._buf.size:
            raise LocalProtocolError("take_trailing_data() first: bytes from before TLS are pending")
        self._phase = _Phase.OPTIONS
        self.tls_active = True
        self.structured = False
        self.meta_contexts = {}

    # -- helpers -----------------------------------------------------------------------------
    def _need(self, n: int, what: str) -> bool:
        """True if ``n`` bytes are buffered; at EOF, raise naming how far ``what`` got."""
        if self._buf.size >= n:
            return True
        if self._eof:
            raise RemoteProtocolError(
                f"peer closed after {self._buf.size} of {n} bytes of {what} at byte {self._rx}",
                self._rx + self._buf.size)
        return False

    def _consume(self, n: int) -> None:
        self._buf.skip(n)
        self._rx += n

    def _remote(self, message: str, offset: int = 0) -> RemoteProtocolError:
        return RemoteProtocolError(f"{message} at byte {self._rx + offset}", self._rx + offset)

    def _at_boundary(self) -> Event | _Sentinel:
        """Nothing buffered at a message boundary: Closed at EOF, else NEED_DATA."""
        if self._eof:
            self._phase = _Phase.CLOSED
            return Closed()
        return NEED_DATA

    def _option_names(self, event: Event) -> None:
        """Contexts belong to the export SET_META_CONTEXT named: an INFO, GO or EXPORT_NAME for
        another export drops them (the spec's rule for GO; nbdkit applies it to INFO too)."""
        if isinstance(event, OptSetMetaContext):
            self._meta_export = event.name
        elif isinstance(event, (OptInfo, OptGo, OptExportName)) and event.name != self._meta_export:
            self.meta_contexts = {}

    def _tls_pause(self) -> Event | _Sentinel:
        if not self._tls_announced:
            self._tls_announced = True
            return TLSUpgrade()
        return PAUSED

    def _enter_tls(self) -> None:
        self._phase = _Phase.TLS
        self._tls_announced = False

    def _parse(self) -> Event | _Sentinel:
        raise NotImplementedError

    def _send(self, event: Event) -> Buffers:
        raise NotImplementedError


class _ServerRequest:
    __slots__ = ("command", "length", "offset")

    def __init__(self, command: int, offset: int, length: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length


# ---------------------------------------------------------------------------------------------
# Server


class ServerConnection(_Connection):
    """The server side of one NBD connection.

    Drive it like this: ``send(Greeting())`` and write the bytes; then loop on ``next_event()``
    (feeding ``receive_data()`` on NEED_DATA). Each option event must be answered with its
    replies (``Ack``, ``OptionError``, ``ServerEntry``, ``ExportInfo``...) before the next option
    is parsed; for EXPORT_NAME the answer is ``ExportInfo`` (or hanging up). After ``Ack`` to
    ``OptGo`` (or ``ExportInfo`` to EXPORT_NAME), ``Request`` events come; answer each with
    ``SimpleReply`` or structured chunks (``reply_iov()`` picks), after consuming a WRITE's
    ``WriteData`` events. ``check_request()`` gives the errno for requests the export refuses.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD,
                 max_option_length: int = MAX_OPTION_LENGTH) -> None:
        super().__init__()
        self.max_payload = max_payload
        self.max_option_length = max_option_length
        self.handshake_flags = 0
        self.client_flags = 0
        self.export_size = 0
        self.transmission_flags = 0
        self.block_size = BlockSize(1, 4096, max_payload)
        self._option: int | None = None  # option awaiting its final reply
        self._pending_export: ExportInfo | None = None  # sent for the current INFO/GO
        self._pending_block: BlockSize | None = None
        self._pending_contexts: dict[int, str] = {}
        self._inflight: dict[int, _ServerRequest] = {}
        self._write_cookie = 0
        self._write_offset = 0
        self._write_left = 0  # WRITE payload bytes still to stream

    @property
    def in_flight(self) -> int:
        """Requests received and not yet completely answered."""
        return len(self._inflight)

    def check_request(self, request: Request) -> int:
        """``check_request()`` with what this connection negotiated and advertised."""
        return check_request(request, export_size=self.export_size,
                             transmission_flags=self.transmission_flags,
                             minimum_block=self.block_size.minimum,
                             max_payload=min(self.max_payload, self.block_size.maximum),
                             structured=self.structured, meta_contexts=len(self.meta_contexts))

    # -- receiving -----------------------------------------------------------------------------
    def _parse(self) -> Event | _Sentinel:
        phase = self._phase
        if phase == _Phase.TRANSMISSION:
            return self._parse_request()
        if phase == _Phase.OPTIONS:
            return self._parse_option()
        if phase == _Phase.CLIENT_FLAGS:
            if not self._buf.size and self._eof:
                return self._at_boundary()  # a probe that connected and left
            if not self._need(4, "client flags"):
                return NEED_DATA
            (flags,) = _U32.unpack(self._buf.peek(4))
            known = 3  # FIXED_NEWSTYLE | NO_ZEROES (an int: ~IntFlag keeps only known bits)
            if flags & ~known:
                raise self._remote(f"expected client flags within 0x{known:x}, got 0x{flags:08x}")
            if flags & ClientFlag.NO_ZEROES and not self.handshake_flags & HandshakeFlag.NO_ZEROES:
                raise self._remote("client flag NO_ZEROES set but the server did not offer it")
            self._consume(4)
            self.client_flags = flags
            self._phase = _Phase.OPTIONS
            return ClientFlags(flags)
        if phase == _Phase.TLS:
            return self._tls_pause()
        if phase == _Phase.CLOSED:
            if self._buf.size:
                raise self._remote("expected nothing after the client ended the session, got data")
            return Closed() if self._eof else NEED_DATA
        raise LocalProtocolError("next_event() before the greeting was sent")

    def _parse_option(self) -> Event | _Sentinel:
        if self._option is not None:
            return PAUSED
        buf = self._buf
        if not buf.size:
            return self._at_boundary()
        if not self._need(16, "an option header"):
            return NEED_DATA
        magic, option, length = _OPTION.unpack(buf.peek(16))
        if magic != IHAVEOPT:
            if magic >> 32 == REQUEST_MAGIC:
                raise self._remote("expected option magic IHAVEOPT, got a transmission request "
                                   "before negotiation finished")
            raise self._remote(f"expected option magic IHAVEOPT (0x{IHAVEOPT:016x}), got 0x{magic:016x}")
        if length > self.max_option_length:
            raise self._remote(f"option {_name(Opt, option)} length {length} is over the maximum "
                               f"{self.max_option_length}", 12)
        if not self._need(16 + length, f"option {_name(Opt, option)}"):
            return NEED_DATA
        self._consume(16)
        data = buf.take(length)
        self._rx += length
        self._option = option
        self._pending_export = self._pending_block = None
        self._pending_contexts = {}
        event = _decode_option(option, data)
        self._option_names(event)
        return event

    def _parse_request(self) -> Event | _Sentinel:
        buf = self._buf
        if self._write_left:
            if not buf.size:
                if self._eof:
                    raise self._remote(f"peer closed with {self._write_left} bytes of a WRITE "
                                       "payload still to come")
                return NEED_DATA
            view = buf.take_view(self._write_left)
            n = len(view)
            self._rx += n
            self._write_left -= n
            offset = self._write_offset
            self._write_offset += n
            return WriteData(self._write_cookie, offset, view, not self._write_left)
        if not buf.size:
            return self._at_boundary()
        if not self._need(_REQUEST_SIZE, "a request header"):
            return NEED_DATA
        magic, flags, command, cookie, offset, length = _REQUEST.unpack(buf.peek(_REQUEST_SIZE))
        if magic != REQUEST_MAGIC:
            if magic == EXTENDED_REQUEST_MAGIC:
                raise self._remote("expected request magic, got an extended-header request "
                                   "(extended headers were not negotiated)")
            raise self._remote(f"expected request magic 0x{REQUEST_MAGIC:08x}, got 0x{magic:08x}")
        if command == _WRITE and length > self.max_payload:
            raise self._remote(f"WRITE payload length {length} is over the maximum "
                               f"{self.max_payload}", 24)
        if command != _DISC and cookie in self._inflight:
            raise self._remote(f"request cookie 0x{cookie:x} is already in flight", 8)
        self._consume(_REQUEST_SIZE)
        if command == _DISC:
            self._phase = _Phase.CLOSED
        else:
            self._inflight[cookie] = _ServerRequest(command, offset, length)
        if command == _WRITE:
            self._write_cookie, self._write_offset = cookie, offset
            self._write_left = length
            if not length:
                self._events.append(WriteData(cookie, offset, b"", True))
        return Request(command, cookie, offset, length, flags)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, event: Event) -> Buffers:
        phase = self._phase
        if isinstance(event, (SimpleReply, OffsetData, OffsetHole, BlockStatusChunk,
                              ErrorChunk, NoneChunk)):
            if phase not in (_Phase.TRANSMISSION, _Phase.CLOSED):
                raise LocalProtocolError(f"cannot send {type(event).__name__} before transmission")
            return self._send_reply(event)
        if isinstance(event, Greeting):
            if phase != _Phase.GREETING:
                raise LocalProtocolError("the greeting was already sent")
            known = 3  # FIXED_NEWSTYLE | NO_ZEROES (an int: ~IntFlag keeps only known bits)
            if event.flags & ~known or not event.flags & HandshakeFlag.FIXED_NEWSTYLE:
                raise LocalProtocolError("greeting flags must include FIXED_NEWSTYLE and only "
                                         "FIXED_NEWSTYLE|NO_ZEROES")
            self.handshake_flags = event.flags
            self._phase = _Phase.CLIENT_FLAGS
            return [_GREETING.pack(NBDMAGIC, IHAVEOPT, event.flags)]
        if phase != _Phase.OPTIONS or self._option is None:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: no option awaits a reply")
        return [self._send_option_reply(self._option, event)]

    def _send_option_reply(self, option: int, event: Event) -> bytes:
        name = _name(Opt, option)
        if option == Opt.EXPORT_NAME:
            if not isinstance(event, ExportInfo):
                raise LocalProtocolError("EXPORT_NAME can only be answered with ExportInfo "
                                         "(or by hanging up)")
            self._enter_transmission(event, None)
            tail = b"" if self.client_flags & ClientFlag.NO_ZEROES else _ZEROES
            return struct.pack(">QH", event.size, event.flags) + tail
        if isinstance(event, OptionError):
            if not event.error & _REP_ERR_BIT:
                raise LocalProtocolError(f"option error 0x{event.error:x} lacks bit 31")
            if event.error == Rep.ERR_TLS_REQD and self.tls_active:
                raise LocalProtocolError("ERR_TLS_REQD must not be sent once TLS is active")
            self._option = None
            if option == Opt.SET_META_CONTEXT:
                self.meta_contexts = {}
            return _option_reply(option, event.error, _encode_string(event.message, "message"))
        if isinstance(event, Ack):
            if option not in (Opt.ABORT, Opt.LIST, Opt.STARTTLS, Opt.INFO, Opt.GO,
                              Opt.STRUCTURED_REPLY, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                raise LocalProtocolError(f"cannot acknowledge option {name}")
            if option in (Opt.INFO, Opt.GO) and self._pending_export is None:
                raise LocalProtocolError(f"{name} needs ExportInfo before Ack")
            if option == Opt.STARTTLS and self.tls_active:
                raise LocalProtocolError("STARTTLS with TLS already active must get ERR_INVALID")
            self._option = None
            data = _option_reply(option, Rep.ACK)
            if option == Opt.GO:
                assert self._pending_export is not None
                self._enter_transmission(self._pending_export, self._pending_block)
            elif option == Opt.STRUCTURED_REPLY:
                self.structured = True
            elif option == Opt.SET_META_CONTEXT:
                self.meta_contexts = self._pending_contexts
            elif option == Opt.STARTTLS:
                self._enter_tls()
            elif option == Opt.ABORT:
                self._phase = _Phase.CLOSED
            return data
        if isinstance(event, ServerEntry):
            if option != Opt.LIST:
                raise LocalProtocolError(f"ServerEntry answers LIST, not {name}")
            raw = _encode_string(event.name, "export name")
            desc = _encode_string(event.description, "description")
            return _option_reply(option, Rep.SERVER, _U32.pack(len(raw)) + raw + desc)
        if isinstance(event, MetaContext):
            if option not in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                raise LocalProtocolError(f"MetaContext answers a META_CONTEXT option, not {name}")
            if option == Opt.SET_META_CONTEXT:
                if event.context_id in self._pending_contexts:
                    raise LocalProtocolError(f"context id {event.context_id} used twice")
                self._pending_contexts[event.context_id] = event.name
            raw = _encode_string(event.name, "context name")
            return _option_reply(option, Rep.META_CONTEXT, _U32.pack(event.context_id) + raw)
        if isinstance(event, (ExportInfo, ExportName, ExportDescription, BlockSize, UnknownInfo)):
            if option not in (Opt.INFO, Opt.GO):
                raise LocalProtocolError(f"{type(event).__name__} answers INFO or GO, not {name}")
            if isinstance(event, ExportInfo):
                if not event.flags & TransmissionFlag.HAS_FLAGS:
                    raise LocalProtocolError("transmission flags must include HAS_FLAGS")
                self._pending_export = event
                payload = struct.pack(">HQH", Info.EXPORT, event.size, event.flags)
            elif isinstance(event, ExportName):
                payload = _U16.pack(Info.NAME) + _encode_string(event.name, "export name")
            elif isinstance(event, ExportDescription):
                payload = _U16.pack(Info.DESCRIPTION) + _encode_string(event.description,
                                                                       "description")
            elif isinstance(event, BlockSize):
                self._pending_block = event
                payload = struct.pack(">HIII", Info.BLOCK_SIZE, event.minimum, event.preferred,
                                      event.maximum)
            else:
                payload = _U16.pack(event.info) + bytes(event.data)
            return _option_reply(option, Rep.INFO, payload)
        raise LocalProtocolError(f"{type(event).__name__} is not an option reply")

    def _enter_transmission(self, export: ExportInfo, block: BlockSize | None) -> None:
        self.export_size = export.size
        self.transmission_flags = export.flags
        if block is not None:
            self.block_size = block
        self._phase = _Phase.TRANSMISSION

    def _request_for(self, cookie: int) -> _ServerRequest:
        req = self._inflight.get(cookie)
        if req is None:
            raise LocalProtocolError(f"no request with cookie 0x{cookie:x} is in flight")
        return req

    def _send_reply(self, event: Event) -> Buffers:
        if isinstance(event, SimpleReply):
            req = self._request_for(event.cookie)
            data = event.data
            if req.command == _READ and self.structured:
                raise LocalProtocolError("structured replies were negotiated: answer READ with chunks")
            if req.command == _READ and not event.error:
                if data is None or len(data) != req.length:
                    raise LocalProtocolError(f"a READ of {req.length} bytes needs exactly that much data")
            elif data:
                raise LocalProtocolError("only a successful READ reply carries data")
            del self._inflight[event.cookie]
            header = _SIMPLE.pack(SIMPLE_REPLY_MAGIC, event.error, event.cookie)
            return [header, data] if data else [header]
        if not self.structured:
            raise LocalProtocolError(f"{type(event).__name__} needs structured replies, not negotiated")
        assert isinstance(event, (OffsetData, OffsetHole, BlockStatusChunk, ErrorChunk, NoneChunk))
        req = self._request_for(event.cookie)
        done = True
        if isinstance(event, (OffsetData, OffsetHole)):
            if req.command != _READ:
                raise LocalProtocolError(f"{type(event).__name__} answers READ only")
            size = len(event.data) if isinstance(event, OffsetData) else event.length
            if size < 1 or event.offset < req.offset or event.offset + size > req.offset + req.length:
                raise LocalProtocolError(f"{type(event).__name__} [{event.offset}, +{size}) is not "
                                         f"within the READ [{req.offset}, +{req.length})")
            done = event.done
            if isinstance(event, OffsetData):
                header = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _T_DATA,
                                     event.cookie, 8 + size) + _U64.pack(event.offset)
                out: Buffers = [header, event.data]
            else:
                out = [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _T_HOLE,
                                   event.cookie, 12) + struct.pack(">QI", event.offset, size)]
        elif isinstance(event, BlockStatusChunk):
            if req.command != _BLOCK_STATUS:
                raise LocalProtocolError("BlockStatusChunk answers BLOCK_STATUS only")
            if event.context_id not in self.meta_contexts:
                raise LocalProtocolError(f"context id {event.context_id} was not negotiated")
            if not event.extents or any(length < 1 for length, _ in event.extents):
                raise LocalProtocolError("block status needs one or more extents of nonzero length")
            done = event.done
            payload = encode_extents(event.context_id, event.extents)
            out = [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _T_STATUS,
                               event.cookie, len(payload)) + payload]
        elif isinstance(event, ErrorChunk):
            if not event.error:
                raise LocalProtocolError("an error chunk needs a nonzero error")
            msg = _encode_string(event.message, "message")
            done = event.done
            body = _U32.pack(event.error) + _U16.pack(len(msg)) + msg
            rtype = _T_ERROR
            if event.offset is not None:
                rtype = _T_ERROR_OFFSET
                body += _U64.pack(event.offset)
            out = [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, rtype, event.cookie,
                               len(body)) + body]
        else:
            out = [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, _T_NONE, event.cookie, 0)]
        if done:
            del self._inflight[event.cookie]
        return out

    def reply_iov(self, cookie: int, error: int = 0, data: bytes | memoryview | None = None,
                  message: str = "") -> Buffers:
        """The whole reply to request ``cookie`` in the form negotiated: simple, or one chunk.

        A successful READ passes ``data``; a failure passes ``error`` (and, with structured
        replies, ``message``).
        """
        req = self._request_for(cookie)
        if not self.structured:
            return self.send_iov(SimpleReply(cookie, error, data if not error else None))
        if error:
            return self.send_iov(ErrorChunk(cookie, error, message))
        if req.command == _READ:
            if data is None or len(data) != req.length:
                raise LocalProtocolError(f"a READ of {req.length} bytes needs exactly that much data")
            if not req.length:
                return self.send_iov(NoneChunk(cookie))
            return self.send_iov(OffsetData(cookie, req.offset, data, done=True))
        return self.send_iov(SimpleReply(cookie))


# ---------------------------------------------------------------------------------------------
# Client


class _ClientRequest:
    __slots__ = (
        "command",
        "covered",
        "error",
        "flags",
        "length",
        "message",
        "offset",
        "spans",
        "statuses",
    )

    def __init__(self, command: int, offset: int, length: int, flags: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.covered = 0  # READ: bytes described by data and hole chunks
        self.spans: list[tuple[int, int]] = []  # READ: sorted (start, end) of those chunks
        self.error = 0
        self.message = ""
        self.statuses = 0  # BLOCK_STATUS: status chunks received


class ClientConnection(_Connection):
    """The client side of one NBD connection.

    Drive it like this: read the ``Greeting`` event, ``send(ClientFlags(...))``, then send options
    one at a time, each followed by its reply events up to ``Ack`` or ``OptionError`` (``ExportInfo``
    for EXPORT_NAME; ``TLSUpgrade`` for an acknowledged STARTTLS). After ``Ack`` to ``OptGo`` the
    connection is in transmission: send ``Request`` events (many in flight, each with its own
    cookie) and read ``ReadData``/``ReadHole``/``BlockStatus``/``ReplyError`` events, each request
    ending with exactly one ``ReplyDone``.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD,
                 max_option_length: int = MAX_OPTION_LENGTH) -> None:
        super().__init__()
        self.max_payload = max_payload
        self.max_option_length = max_option_length
        self.handshake_flags = 0
        self.client_flags = 0
        self.export_size = 0
        self.transmission_flags = 0
        self.block_size: BlockSize | None = None
        self._option: int | None = None
        self._pending_export: ExportInfo | None = None
        self._pending_block: BlockSize | None = None
        self._pending_contexts: dict[int, str] = {}
        self._inflight: dict[int, _ClientRequest] = {}
        self._sent_disc = False
        self._next_cookie = 1
        # READ payload being streamed: its cookie, next offset, bytes left, DONE flag
        self._stream_cookie = 0
        self._stream_offset = 0
        self._stream_left = 0
        self._stream_done = False

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def pending_option(self) -> int | None:
        """The option sent and not yet finally answered, or None (then the next may be sent)."""
        return self._option

    def new_cookie(self) -> int:
        """A cookie not in flight (a counter; any unique 64-bit value will do)."""
        while True:
            cookie = self._next_cookie
            self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF
            if cookie not in self._inflight:
                return cookie

    # -- sending -------------------------------------------------------------------------------
    def _send(self, event: Event) -> Buffers:
        phase = self._phase
        if isinstance(event, Request):
            return self._send_request(event)
        if isinstance(event, ClientFlags):
            if phase != _Phase.CLIENT_FLAGS:
                raise LocalProtocolError("client flags go right after the server's greeting")
            if event.flags & ~(int(self.handshake_flags) & 3):
                raise LocalProtocolError(f"client flags 0x{event.flags:x} not offered by the server "
                                         f"(0x{self.handshake_flags:x})")
            self.client_flags = event.flags
            self._phase = _Phase.OPTIONS
            return [_U32.pack(event.flags)]
        if phase != _Phase.OPTIONS:
            raise LocalProtocolError(f"cannot send {type(event).__name__} in phase {self.phase}")
        if self._option is not None:
            raise LocalProtocolError(f"option {_name(Opt, self._option)} still awaits its reply")
        option, data = _encode_option(event)
        self._option_names(event)
        if not self.handshake_flags & HandshakeFlag.FIXED_NEWSTYLE and option != Opt.EXPORT_NAME:
            raise LocalProtocolError("the server is not fixed newstyle: only EXPORT_NAME is possible")
        if isinstance(event, OptStartTLS) and self.tls_active:
            raise LocalProtocolError("TLS is already active")
        self._option = option
        self._pending_export = self._pending_block = None
        self._pending_contexts = {}
        return [_OPTION.pack(IHAVEOPT, option, len(data)) + data]

    def _send_request(self, req: Request) -> Buffers:
        if self._phase not in (_Phase.TRANSMISSION,) or self._sent_disc:
            raise LocalProtocolError(f"cannot send a request in phase {self.phase}"
                                     + (" after DISC" if self._sent_disc else ""))
        cmd = req.command
        if not 0 <= req.cookie < 1 << 64 or not 0 <= req.offset < 1 << 64 \
                or not 0 <= req.length < 1 << 32 or not 0 <= req.flags < 1 << 16 \
                or not 0 <= cmd < 1 << 16:
            raise LocalProtocolError(f"request field out of range: {req!r}")
        if req.cookie in self._inflight:
            raise LocalProtocolError(f"cookie 0x{req.cookie:x} is already in flight")
        if cmd == _WRITE:
            if req.data is None or len(req.data) != req.length:
                raise LocalProtocolError(f"a WRITE of {req.length} bytes needs exactly that much data")
        elif req.data is not None:
            raise LocalProtocolError("only WRITE carries data")
        if cmd == _BLOCK_STATUS and not self.meta_contexts:
            raise LocalProtocolError("BLOCK_STATUS needs a negotiated metadata context")
        header = _REQUEST.pack(REQUEST_MAGIC, req.flags, cmd, req.cookie, req.offset, req.length)
        if cmd == _DISC:
            self._sent_disc = True
            return [header]
        self._inflight[req.cookie] = _ClientRequest(cmd, req.offset, req.length, req.flags)
        if cmd == _WRITE and req.length:
            assert req.data is not None
            return [header, req.data]
        return [header]

    # -- receiving -----------------------------------------------------------------------------
    def _parse(self) -> Event | _Sentinel:
        phase = self._phase
        if phase == _Phase.TRANSMISSION:
            return self._parse_reply()
        if phase == _Phase.OPTIONS:
            return self._parse_option_reply()
        if phase == _Phase.GREETING:
            if not self._need(18, "the greeting"):
                return NEED_DATA
            magic, magic2, flags = _GREETING.unpack(self._buf.peek(18))
            if magic != NBDMAGIC:
                raise self._remote(f"expected NBDMAGIC, got 0x{magic:016x}")
            if magic2 == CLISERV_MAGIC:
                raise self._remote("oldstyle negotiation is not supported", 8)
            if magic2 != IHAVEOPT:
                raise self._remote(f"expected IHAVEOPT, got 0x{magic2:016x}", 8)
            self._consume(18)
            self.handshake_flags = flags
            self._phase = _Phase.CLIENT_FLAGS
            return Greeting(flags)
        if phase == _Phase.TLS:
            return self._tls_pause()
        # CLIENT_FLAGS (we have not answered) or CLOSED: the server has nothing to say.
        if self._buf.size:
            raise self._remote("expected nothing from the server now, got data")
        return self._at_boundary()

    def _parse_option_reply(self) -> Event | _Sentinel:
        option = self._option
        buf = self._buf
        if option is None:
            if buf.size:
                raise self._remote("expected nothing from the server with no option pending, got data")
            return self._at_boundary()
        if option == Opt.EXPORT_NAME:
            size = 10 if self.client_flags & ClientFlag.NO_ZEROES else 134
            if not self._need(size, "the EXPORT_NAME reply"):
                return NEED_DATA
            export_size, flags = struct.unpack(">QH", buf.peek(10))
            self._consume(size)
            self._option = None
            self._enter_transmission(ExportInfo(export_size, flags), None)
            return ExportInfo(export_size, flags)
        if not buf.size:
            if self._eof and option == Opt.ABORT:
                self._phase = _Phase.CLOSED  # the spec allows hanging up instead of acking ABORT
                return Closed()
            self._need(1, f"the reply to option {_name(Opt, option)}")
            return NEED_DATA
        if not self._need(20, "an option reply header"):
            return NEED_DATA
        magic, echo, reply, length = _OPTION_REPLY.unpack(buf.peek(20))
        if magic != OPTION_REPLY_MAGIC:
            raise self._remote(f"expected option reply magic 0x{OPTION_REPLY_MAGIC:x}, got 0x{magic:x}")
        if echo != option:
            raise self._remote(f"expected a reply to option {_name(Opt, option)}, got one to "
                               f"{_name(Opt, echo)}", 8)
        if length > self.max_option_length:
            raise self._remote(f"option reply length {length} is over the maximum "
                               f"{self.max_option_length}", 16)
        if not self._need(20 + length, f"the {_name(Rep, reply)} reply"):
            return NEED_DATA
        start = self._rx
        self._consume(20)
        data = buf.take(length)
        self._rx += length
        try:
            return self._option_reply_event(option, reply, data)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad {_name(Rep, reply)} reply to {_name(Opt, option)}: "
                                      f"{exc} at byte {start}", start) from None

    def _option_reply_event(self, option: int, reply: int, data: bytes) -> Event:
        if reply & _REP_ERR_BIT:
            self._option = None
            if option == Opt.SET_META_CONTEXT:
                self.meta_contexts = {}
            return OptionError(reply, bytes(data).decode("utf-8", "replace"))
        if reply == Rep.ACK:
            if data:
                raise ValueError("ACK carries data")
            self._option = None
            if option in (Opt.INFO, Opt.GO) and self._pending_export is None:
                raise ValueError("ACK without NBD_INFO_EXPORT")
            if option == Opt.GO:
                assert self._pending_export is not None
                self._enter_transmission(self._pending_export, self._pending_block)
            elif option == Opt.STRUCTURED_REPLY:
                self.structured = True
            elif option == Opt.SET_META_CONTEXT:
                self.meta_contexts = self._pending_contexts
            elif option == Opt.STARTTLS:
                self._enter_tls()
                self._tls_announced = True
                return TLSUpgrade()
            elif option == Opt.ABORT:
                self._phase = _Phase.CLOSED
            return Ack()
        if reply == Rep.SERVER and option == Opt.LIST:
            if len(data) < 4:
                raise ValueError(f"{len(data)} bytes")
            (name_len,) = _U32.unpack_from(data)
            if name_len > len(data) - 4:
                raise ValueError(f"name length {name_len} in {len(data)} bytes")
            return ServerEntry(_string(data[4:4 + name_len], "name"),
                               _string(data[4 + name_len:], "description"))
        if reply == Rep.META_CONTEXT and option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if len(data) < 4:
                raise ValueError(f"{len(data)} bytes")
            (context_id,) = _U32.unpack_from(data)
            name = _string(data[4:], "context name")
            if option == Opt.SET_META_CONTEXT:
                if context_id in self._pending_contexts:
                    raise ValueError(f"context id {context_id} given twice")
                self._pending_contexts[context_id] = name
            return MetaContext(context_id, name)
        if reply == Rep.INFO and option in (Opt.INFO, Opt.GO):
            if len(data) < 2:
                raise ValueError(f"{len(data)} bytes")
            (info,) = _U16.unpack_from(data)
            if info == Info.EXPORT:
                if len(data) != 12:
                    raise ValueError(f"NBD_INFO_EXPORT of {len(data)} bytes, 12 expected")
                size, flags = struct.unpack_from(">QH", data, 2)
                self._pending_export = ExportInfo(size, flags)
                return self._pending_export
            if info == Info.NAME:
                return ExportName(_string(data[2:], "name"))
            if info == Info.DESCRIPTION:
                return ExportDescription(_string(data[2:], "description"))
            if info == Info.BLOCK_SIZE:
                if len(data) != 14:
                    raise ValueError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, 14 expected")
                minimum, preferred, maximum = struct.unpack_from(">III", data, 2)
                self._pending_block = BlockSize(minimum, preferred, maximum)
                return self._pending_block
            return UnknownInfo(info, bytes(data[2:]))
        raise ValueError("reply type not valid for this option")

    def _enter_transmission(self, export: ExportInfo, block: BlockSize | None) -> None:
        self.export_size = export.size
        self.transmission_flags = export.flags
        self.block_size = block
        self._phase = _Phase.TRANSMISSION

    def _parse_reply(self) -> Event | _Sentinel:
        buf = self._buf
        if self._stream_left:
            return self._stream_data()
        if not buf.size:
            if self._eof and self._inflight:
                raise self._remote(f"server closed with {len(self._inflight)} requests in flight")
            return self._at_boundary()
        if not self._need(4, "a reply magic"):
            return NEED_DATA
        first = buf.peek(4)
        (magic,) = _U32.unpack(first)
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._parse_chunk()
        if magic != SIMPLE_REPLY_MAGIC:
            raise self._remote(f"expected a reply magic (0x{SIMPLE_REPLY_MAGIC:08x} or "
                               f"0x{STRUCTURED_REPLY_MAGIC:08x}), got 0x{magic:08x}")
        if not self._need(_SIMPLE_SIZE, "a simple reply"):
            return NEED_DATA
        _, error, cookie = _SIMPLE.unpack(buf.peek(_SIMPLE_SIZE))
        req = self._inflight.get(cookie)
        if req is None:
            raise self._remote(f"reply for cookie 0x{cookie:x}, which is not in flight", 8)
        if req.spans or req.statuses or req.error:
            raise self._remote(f"simple reply for cookie 0x{cookie:x} after structured chunks", 0)
        self._consume(_SIMPLE_SIZE)
        if req.command == _READ and not error and req.length:
            # Data follows; nothing but our memory of this cookie says how much.
            self._stream_cookie = cookie
            self._stream_offset, self._stream_left = req.offset, req.length
            self._stream_done = True
            req.covered = req.length
            return self._stream_data()
        del self._inflight[cookie]
        return ReplyDone(cookie, error, "")

    def _stream_data(self) -> Event | _Sentinel:
        buf = self._buf
        if not buf.size:
            if self._eof:
                raise self._remote(f"server closed with {self._stream_left} bytes of read data "
                                   "still to come")
            return NEED_DATA
        view = buf.take_view(self._stream_left)
        n = len(view)
        self._rx += n
        self._stream_left -= n
        offset = self._stream_offset
        self._stream_offset += n
        cookie = self._stream_cookie
        if not self._stream_left and self._stream_done:
            self._complete(cookie)
        return ReadData(cookie, offset, view)

    def _check_done(self, req: _ClientRequest, cookie: int) -> None:
        """A chunk flagged DONE arrived: check the reply as a whole (at its header, so that
        the error comes at the same point however the bytes were split)."""
        if req.error:
            return
        if req.command == _READ and req.covered != req.length:
            raise self._remote(f"READ reply for cookie 0x{cookie:x} claimed success after "
                               f"{req.covered} of {req.length} bytes")
        if req.command == _BLOCK_STATUS and not req.statuses:
            raise self._remote(f"BLOCK_STATUS reply for cookie 0x{cookie:x} ended without "
                               "a status chunk")

    def _complete(self, cookie: int) -> None:
        """The last chunk is through: the request leaves the table; queue its ReplyDone."""
        req = self._inflight.pop(cookie)
        self._events.append(ReplyDone(cookie, req.error, req.message))

    def _parse_chunk(self) -> Event | _Sentinel:
        buf = self._buf
        if not self._need(_CHUNK_SIZE, "a structured reply header"):
            return NEED_DATA
        if not self.structured:
            raise self._remote("structured reply chunk, but structured replies were not negotiated")
        _, flags, rtype, cookie, length = _CHUNK.unpack(buf.peek(_CHUNK_SIZE))
        req = self._inflight.get(cookie)
        if req is None:
            raise self._remote(f"reply chunk for cookie 0x{cookie:x}, which is not in flight", 8)
        done = bool(flags & _DONE)
        if rtype == _T_DATA:
            if req.command != _READ:
                raise self._remote(f"OFFSET_DATA chunk answers {_name(Cmd, req.command)}", 6)
            if length < 9:
                raise self._remote(f"OFFSET_DATA chunk length {length}, at least 9 needed", 16)
            if not self._need(_CHUNK_SIZE + 8, "an OFFSET_DATA chunk"):
                return NEED_DATA
            (offset,) = _U64.unpack(buf.peek(_CHUNK_SIZE + 8)[_CHUNK_SIZE:])
            self._claim(req, cookie, offset, length - 8)
            if done:
                self._check_done(req, cookie)
            self._consume(_CHUNK_SIZE + 8)
            self._stream_cookie = cookie
            self._stream_offset, self._stream_left = offset, length - 8
            self._stream_done = done
            return self._stream_data()
        if length > _MAX_CHUNK:
            raise self._remote(f"reply chunk length {length} is over the maximum {_MAX_CHUNK}", 16)
        if not self._need(_CHUNK_SIZE + length, f"a {_name(ReplyType, rtype)} chunk"):
            return NEED_DATA
        payload = bytes(buf.peek(_CHUNK_SIZE + length)[_CHUNK_SIZE:])
        event: Event
        if rtype == _T_HOLE:
            if req.command != _READ:
                raise self._remote(f"OFFSET_HOLE chunk answers {_name(Cmd, req.command)}", 6)
            if length != 12:
                raise self._remote(f"OFFSET_HOLE chunk length {length}, 12 expected", 16)
            offset, size = struct.unpack(">QI", payload)
            if not size:
                raise self._remote("OFFSET_HOLE of size 0", 28)
            self._claim(req, cookie, offset, size)
            event = ReadHole(cookie, offset, size)
        elif rtype == _T_STATUS:
            if req.command != _BLOCK_STATUS:
                raise self._remote(f"BLOCK_STATUS chunk answers {_name(Cmd, req.command)}", 6)
            try:
                context_id, extents = decode_extents(payload)
            except RemoteProtocolError as exc:
                raise self._remote(str(exc), 16) from None
            if context_id not in self.meta_contexts:
                raise self._remote(f"block status for context id {context_id}, not negotiated", 20)
            if any(not e.length for e in extents):
                raise self._remote("block status extent of length 0", 24)
            if req.flags & _REQ_ONE and len(extents) != 1:
                raise self._remote(f"{len(extents)} extents in reply to a REQ_ONE request", 24)
            req.statuses += 1
            event = BlockStatus(cookie, context_id, extents)
        elif rtype == _T_NONE:
            if length:
                raise self._remote(f"NONE chunk length {length}, 0 expected", 16)
            if not done:
                raise self._remote("NONE chunk without the DONE flag", 4)
            event = ReplyDone(cookie)  # replaced by _finish below
        elif rtype & _CHUNK_ERR_BIT:
            if length < 6:
                raise self._remote(f"error chunk length {length}, at least 6 needed", 16)
            error, msg_len = struct.unpack_from(">IH", payload)
            fixed = 14 if rtype == _T_ERROR_OFFSET else 6
            if length < fixed or msg_len > length - fixed:
                raise self._remote(f"error message length {msg_len} does not fit chunk length "
                                   f"{length}", 24)
            message = payload[6:6 + msg_len].decode("utf-8", "replace")
            err_offset = None
            if rtype == _T_ERROR_OFFSET:
                (err_offset,) = _U64.unpack_from(payload, 6 + msg_len)
            # The spec: an unknown or zero error value is treated as EINVAL.
            error = error if error in Errno._value2member_map_ else Errno.EINVAL
            if not req.error:
                req.error, req.message = error, message
            event = ReplyError(cookie, error, message, err_offset)
        else:
            raise self._remote(f"unknown reply chunk type {rtype}", 6)
        if done:
            self._check_done(req, cookie)
        self._consume(_CHUNK_SIZE + length)
        if done:
            self._complete(cookie)
            if rtype == _T_NONE:
                return self._events.popleft()
        return event

    def _claim(self, req: _ClientRequest, cookie: int, offset: int, size: int) -> None:
        """Check a data/hole chunk lies in its READ and overlaps no earlier one; record it."""
        end = offset + size
        if offset < req.offset or end > req.offset + req.length:
            raise self._remote(f"chunk [{offset}, +{size}) for cookie 0x{cookie:x} is outside the "
                               f"READ [{req.offset}, +{req.length})", 20)
        spans = req.spans
        i = bisect.bisect_left(spans, (offset, end))
        if (i and spans[i - 1][1] > offset) or (i < len(spans) and spans[i][0] < end):
            raise self._remote(f"chunk [{offset}, +{size}) for cookie 0x{cookie:x} overlaps an "
                               "earlier chunk", 20)
        spans.insert(i, (offset, end))
        req.covered += size
