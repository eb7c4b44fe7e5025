"""Sans-IO NBD: two state machines, bytes in, events out. This module: the server side.

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


import struct

from ._codec import (
    check_request,
    encode_extents,
)
from ._codec import (
    decode_option as _decode_option,
)
from ._codec import (
    encode_string as _encode_string,
)
from ._codec import (
    option_reply as _option_reply,
)
from ._constants import (
    CHUNK_HEADER as _CHUNK,
)
from ._constants import (
    CMD_BLOCK_STATUS as _BLOCK_STATUS,
)
from ._constants import (
    CMD_DISC as _DISC,
)
from ._constants import (
    CMD_READ as _READ,
)
from ._constants import (
    CMD_WRITE as _WRITE,
)
from ._constants import (
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from ._constants import (
    GREETING_HEADER as _GREETING,
)
from ._constants import (
    OPTION_HEADER as _OPTION,
)
from ._constants import (
    REP_ERR_BIT as _REP_ERR_BIT,
)
from ._constants import (
    REPLY_DONE as _DONE,
)
from ._constants import (
    REQUEST_HEADER as _REQUEST,
)
from ._constants import (
    REQUEST_SIZE as _REQUEST_SIZE,
)
from ._constants import (
    SIMPLE_HEADER as _SIMPLE,
)
from ._constants import (
    T_DATA as _T_DATA,
)
from ._constants import (
    T_ERROR as _T_ERROR,
)
from ._constants import (
    T_ERROR_OFFSET as _T_ERROR_OFFSET,
)
from ._constants import (
    T_HOLE as _T_HOLE,
)
from ._constants import (
    T_NONE as _T_NONE,
)
from ._constants import (
    T_STATUS as _T_STATUS,
)
from ._constants import (
    U16 as _U16,
)
from ._constants import (
    U32 as _U32,
)
from ._constants import (
    U64 as _U64,
)
from ._constants import (
    ZEROES as _ZEROES,
)
from ._constants import (
    name_of as _name,
)
from ._events import (
    Ack,
    BlockSize,
    BlockStatusChunk,
    Buffers,
    ClientFlags,
    Closed,
    ErrorChunk,
    Event,
    ExportDescription,
    ExportInfo,
    ExportName,
    Greeting,
    MetaContext,
    NoneChunk,
    OffsetData,
    OffsetHole,
    OptionError,
    Request,
    ServerEntry,
    SimpleReply,
    UnknownInfo,
    WriteData,
)
from ._state import (
    Connection,
    Phase,
    ServerRequest,
)
from ._util import (
    NEED_DATA,
    PAUSED,
    LocalProtocolError,
    Sentinel,
)


class ServerConnection(Connection):
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
        self._inflight: dict[int, ServerRequest] = {}
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
    def _parse(self) -> Event | Sentinel:
        phase = self._phase
        if phase == Phase.TRANSMISSION:
            return self._parse_request()
        if phase == Phase.OPTIONS:
            return self._parse_option()
        if phase == Phase.CLIENT_FLAGS:
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
            self._phase = Phase.OPTIONS
            return ClientFlags(flags)
        if phase == Phase.TLS:
            return self._tls_pause()
        if phase == Phase.CLOSED:
            if self._buf.size:
                raise self._remote("expected nothing after the client ended the session, got data")
            return Closed() if self._eof else NEED_DATA
        raise LocalProtocolError("next_event() before the greeting was sent")

    def _parse_option(self) -> Event | Sentinel:
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

    def _parse_request(self) -> Event | Sentinel:
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
            self._phase = Phase.CLOSED
        else:
            self._inflight[cookie] = ServerRequest(command, offset, length)
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
            if phase not in (Phase.TRANSMISSION, Phase.CLOSED):
                raise LocalProtocolError(f"cannot send {type(event).__name__} before transmission")
            return self._send_reply(event)
        if isinstance(event, Greeting):
            if phase != Phase.GREETING:
                raise LocalProtocolError("the greeting was already sent")
            known = 3  # FIXED_NEWSTYLE | NO_ZEROES (an int: ~IntFlag keeps only known bits)
            if event.flags & ~known or not event.flags & HandshakeFlag.FIXED_NEWSTYLE:
                raise LocalProtocolError("greeting flags must include FIXED_NEWSTYLE and only "
                                         "FIXED_NEWSTYLE|NO_ZEROES")
            self.handshake_flags = event.flags
            self._phase = Phase.CLIENT_FLAGS
            return [_GREETING.pack(NBDMAGIC, IHAVEOPT, event.flags)]
        if phase != Phase.OPTIONS or self._option is None:
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
                self._phase = Phase.CLOSED
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
        self._phase = Phase.TRANSMISSION

    def _request_for(self, cookie: int) -> ServerRequest:
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
            # two buffers, not a joined copy: joining freed the payload beside every queued
            # reply and fragmented the heap (a server holding 64 MiB of block status replies
            # took 122 MiB of RSS; 65 MiB as two buffers)
            out = [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _T_STATUS,
                               event.cookie, len(payload)), payload]
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

