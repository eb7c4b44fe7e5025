"""NBD events: immutable values compared field by field, one per protocol message (or piece of
a payload). Which side sends or receives each is said where it is declared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ._constants import (
    ClientFlag,
    HandshakeFlag,
)


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
