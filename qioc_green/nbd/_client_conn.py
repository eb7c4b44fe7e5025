"""The client side of one NBD connection (sans-IO)."""

from __future__ import annotations

import bisect
import struct

from ._codec import (
    decode_extents,
)
from ._codec import (
    decode_string as _string,
)
from ._codec import (
    encode_option as _encode_option,
)
from ._constants import (
    CHUNK_ERR_BIT as _CHUNK_ERR_BIT,
)
from ._constants import (
    CHUNK_HEADER as _CHUNK,
)
from ._constants import (
    CHUNK_SIZE as _CHUNK_SIZE,
)
from ._constants import (
    CLISERV_MAGIC,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
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
    FLAG_REQ_ONE as _REQ_ONE,
)
from ._constants import (
    GREETING_HEADER as _GREETING,
)
from ._constants import (
    MAX_CHUNK as _MAX_CHUNK,
)
from ._constants import (
    OPTION_HEADER as _OPTION,
)
from ._constants import (
    OPTION_REPLY_HEADER as _OPTION_REPLY,
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
    SIMPLE_HEADER as _SIMPLE,
)
from ._constants import (
    SIMPLE_SIZE as _SIMPLE_SIZE,
)
from ._constants import (
    T_DATA as _T_DATA,
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
    name_of as _name,
)
from ._events import (
    Ack,
    BlockSize,
    BlockStatus,
    Buffers,
    ClientFlags,
    Closed,
    Event,
    ExportDescription,
    ExportInfo,
    ExportName,
    Greeting,
    MetaContext,
    OptionError,
    OptStartTLS,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
    Request,
    ServerEntry,
    TLSUpgrade,
    UnknownInfo,
)
from ._state import (
    ClientRequest,
    Connection,
    Phase,
)
from ._util import (
    NEED_DATA,
    LocalProtocolError,
    RemoteProtocolError,
    Sentinel,
)


class ClientConnection(Connection):
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
        self._inflight: dict[int, ClientRequest] = {}
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
            if phase != Phase.CLIENT_FLAGS:
                raise LocalProtocolError("client flags go right after the server's greeting")
            if event.flags & ~(int(self.handshake_flags) & 3):
                raise LocalProtocolError(f"client flags 0x{event.flags:x} not offered by the server "
                                         f"(0x{self.handshake_flags:x})")
            self.client_flags = event.flags
            self._phase = Phase.OPTIONS
            return [_U32.pack(event.flags)]
        if phase != Phase.OPTIONS:
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
        if self._phase not in (Phase.TRANSMISSION,) or self._sent_disc:
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
        self._inflight[req.cookie] = ClientRequest(cmd, req.offset, req.length, req.flags)
        if cmd == _WRITE and req.length:
            assert req.data is not None
            return [header, req.data]
        return [header]

    # -- receiving -----------------------------------------------------------------------------
    def _parse(self) -> Event | Sentinel:
        phase = self._phase
        if phase == Phase.TRANSMISSION:
            return self._parse_reply()
        if phase == Phase.OPTIONS:
            return self._parse_option_reply()
        if phase == Phase.GREETING:
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
            self._phase = Phase.CLIENT_FLAGS
            return Greeting(flags)
        if phase == Phase.TLS:
            return self._tls_pause()
        # CLIENT_FLAGS (we have not answered) or CLOSED: the server has nothing to say.
        if self._buf.size:
            raise self._remote("expected nothing from the server now, got data")
        return self._at_boundary()

    def _parse_option_reply(self) -> Event | Sentinel:
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
                self._phase = Phase.CLOSED  # the spec allows hanging up instead of acking ABORT
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
                self._phase = Phase.CLOSED
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
        self._phase = Phase.TRANSMISSION

    def _parse_reply(self) -> Event | Sentinel:
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

    def _stream_data(self) -> Event | Sentinel:
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

    def _check_done(self, req: ClientRequest, cookie: int) -> None:
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

    def _parse_chunk(self) -> Event | Sentinel:
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

    def _claim(self, req: ClientRequest, cookie: int, offset: int, size: int) -> None:
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
