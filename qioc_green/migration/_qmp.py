"""A QMP server connection, sans-IO: bytes in, requests out; replies and events in, bytes out.

What QEMU's QMP server does (``docs/interop/qmp-spec.rst``, ``monitor/qmp.c``,
``qapi/qmp-dispatch.c``, ``qobject/json-streamer.c``; checked against QEMU 10.0 and 7.2)
--------------------------------------------------------------------------------------------

- It speaks first: ``{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
  "package": "..."}, "capabilities": ["oob"]}}``. Every message it sends is one JSON object on
  one line ending in CRLF, ASCII only.
- Input is a stream of JSON values, *not* lines: a value may span lines, a line may hold
  several. Strings may also be single-quoted, and ``\\'`` is an extra escape.
- Until ``qmp_capabilities`` succeeds, every other command gets ``CommandNotFound`` "Expecting
  capabilities negotiation with 'qmp_capabilities'", and no event is sent. Afterwards
  ``qmp_capabilities`` gets ``CommandNotFound`` "Capabilities negotiation is already complete,
  command ignored". Unknown commands: ``CommandNotFound`` "The command X has not been found".
- A request is an object with ``execute`` (a string), optional ``arguments`` (an object) and
  ``id`` (any value, echoed in the reply, including error replies about the request itself);
  ``exec-oob`` only when ``oob`` was enabled; anything else is "QMP input member 'X' is
  unexpected". A value that is not an object: "QMP input must be a JSON object" (no id). These,
  and every JSON error, are ``GenericError``.
- Replies: ``{"return": value, "id": id}``; ``{"id": id, "error": {"class": C, "desc": D}}``.
  Events: ``{"timestamp": {"seconds": S, "microseconds": U}, "event": NAME, "data": {...}}``.
- Bad input never closes the connection. A JSON error gets ``"JSON parse error, ..."`` and
  parsing resumes after it; an ASCII control character (not tab, CR, LF) or a byte that can
  never be UTF-8 (0xFF...) is a lexical error that resets the parser (the spec's way to
  resynchronise). Limits: 1024 levels of nesting, 64 MiB per token, 2 Mi tokens per value
  ("JSON nesting depth limit exceeded", "JSON token size limit exceeded"). Seen with 10.0: a
  1 MiB string in a command is accepted; a 1 MiB bare word gets one error; a 65 MiB string
  gets two; an over-deep value gets one error and then one per remaining bracket (about a
  thousand replies), because the rest of the value is parsed as new input. The connection
  stays usable in every case.

Decisions
---------

- Same framing, replies, classes and texts as QEMU for what a migration destination needs;
  ``capabilities`` is empty (no out-of-band commands here), so ``exec-oob`` is an unexpected
  member, as on a QEMU whose monitor cannot do OOB.
- **Bounded**: a value may hold at most ``max_message`` bytes (1 MiB) and nest
  ``max_depth`` levels (256: Python's JSON decoder recurses, and no command here nests more than
  3). Past either limit the value gets one error and is *skipped to its end* without being
  kept (strings and nesting still tracked, so the rest of it is not mistaken for new input):
  one reply where QEMU may send a thousand. A bare word at the top level is kept to 64 bytes.
  Memory is one message plus the caller's read chunk; the caller reads only when
  :meth:`QmpConnection.next_event` says :data:`NEED_DATA`.
- **At most one error reply per line of malformed input**: after an error, further errors are
  not reported until the next newline (a random binary line gets one reply, not one per
  brace); well-formed requests on that line are still answered.
- One request at a time, as QEMU runs in-band commands: after a :class:`QmpRequest` (or
  :class:`QmpBadRequest`), ``next_event()`` returns :data:`PAUSED` until its reply is sent.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ._format import NEED_DATA, LocalProtocolError, NeedData

__all__ = [
    "NO_ID",
    "PAUSED",
    "ErrorClass",
    "QmpBadRequest",
    "QmpClosed",
    "QmpConnection",
    "QmpError",
    "QmpEvent",
    "QmpGreeting",
    "QmpRequest",
    "QmpReturn",
]


class _Sentinel(enum.Enum):
    PAUSED = "PAUSED"
    NO_ID = "NO_ID"

    def __repr__(self) -> str:
        return self.value


#: next_event(): send the reply to the last request first
PAUSED: Final = _Sentinel.PAUSED
#: a request without an ``id`` member (``"id": null`` is an id)
NO_ID: Final = _Sentinel.NO_ID


class ErrorClass(enum.StrEnum):
    """QMP's error classes (``qapi/control.json`` ``QapiErrorClass``)."""

    GenericError = "GenericError"
    CommandNotFound = "CommandNotFound"
    DeviceNotActive = "DeviceNotActive"
    DeviceNotFound = "DeviceNotFound"
    KVMMissingCap = "KVMMissingCap"


# -- events in (from the client) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QmpRequest:
    """A well-formed command: run it and send a :class:`QmpReturn` or :class:`QmpError` with ``id``."""

    command: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class QmpBadRequest:
    """Input that gets an error reply from the protocol itself: send ``QmpError(...)`` of it."""

    error_class: ErrorClass
    desc: str
    id: Any = NO_ID

    def reply(self) -> QmpError:
        return QmpError(self.error_class, self.desc, self.id)


@dataclass(frozen=True, slots=True)
class QmpClosed:
    """The client hung up (a value it had not finished is dropped, as QEMU does)."""


# -- events out (to the client) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QmpGreeting:
    """The server's first message. ``version``: as ``query-version`` returns it."""

    version: dict[str, Any]
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QmpReturn:
    value: Any
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class QmpError:
    error_class: ErrorClass | str
    desc: str
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """An asynchronous event; ``timestamp`` in seconds since the epoch (the caller's clock)."""

    name: str
    data: dict[str, Any] | None
    timestamp: float


# -- the framer ----------------------------------------------------------------------------------

# bytes that end a plain run: structure, quotes, and what is a lexical error anywhere
_IN_VALUE = re.compile(rb"[\[\]{}\"'\x00-\x08\x0b\x0c\x0e-\x1f\xc0\xc1\xf5-\xff]")
_IN_DQ = re.compile(rb"[\"\\\x00-\x1f\xc0\xc1\xf5-\xff]")
_IN_SQ = re.compile(rb"['\"\\\x00-\x1f\xc0\xc1\xf5-\xff]")
_TOP_SKIP = re.compile(rb"[ \t\r\n]*")
_WORD_END = re.compile(rb"[ \t\r\n\[\]{}\"'\x00-\x08\x0b\x0c\x0e-\x1f\xc0\xc1\xf5-\xff]")
_LEXICAL_ERROR = frozenset(set(range(0x20)) - {0x09, 0x0A, 0x0D}) | {0xC0, 0xC1} | set(range(0xF5, 0x100))
_WORD_KEPT = 64


class _Mode(enum.Enum):
    TOP = 0
    VALUE = 1
    DQ = 2  # in a double-quoted string
    SQ = 3  # in a single-quoted string
    WORD = 4  # a bare word at the top level (a number, true, or garbage)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _stray(byte: int, token: bytes = b"") -> str:
    # QEMU names the token the character ends (a byte that cannot be UTF-8 shows as U+FFFD)
    text = token[:_WORD_KEPT].decode("utf-8", "replace") + ("..." if len(token) > _WORD_KEPT else "")
    return f"JSON parse error, stray '{text}{chr(0xFFFD if byte >= 0x80 else byte)}'"


class QmpConnection:
    """One client of a QMP server, sans-IO (h11-style). Never blocks or switches greenlets.

    ``send(QmpGreeting(...))`` first; then ``receive_data(chunk)`` (``b""`` at EOF) and
    ``next_event()`` until :data:`NEED_DATA`; answer each :class:`QmpRequest` and
    :class:`QmpBadRequest` with ``send(QmpReturn(...))`` / ``send(QmpError(...))``; ``send(QmpEvent(...))``
    at any time (``b""`` while negotiating: events are not delivered then).
    """

    def __init__(self, *, max_message: int = 1 << 20, max_depth: int = 256) -> None:
        self.max_message = max_message
        self.max_depth = max_depth
        self.negotiated = False
        self.capabilities: tuple[str, ...] = ()
        self.requests = 0
        self.errors = 0
        self._greeted = False
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._closed_reported = False
        self._mode = _Mode.TOP
        self._msg = bytearray()  # the value being framed (single quotes already converted)
        self._size = 0  # bytes of the value seen (kept or not)
        self._depth = 0
        self._skipping = False  # over a limit: track the value to its end, keep nothing
        self._escape = False  # a backslash ended the last chunk inside a string
        self._string_at = 0  # where in _msg the current string starts (for error texts)
        self._quiet = False  # an error was reported on this line
        self._pending: str | None = None  # command awaiting its reply
        self._ready: list[QmpRequest | QmpBadRequest] = []

    # -- input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; ``b""`` means the client closed its end. Never blocks."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held: unparsed input plus the value being framed."""
        return len(self._buf) - self._pos + len(self._msg)

    def next_event(self) -> QmpRequest | QmpBadRequest | QmpClosed | Literal[
            NeedData.NEED_DATA, _Sentinel.PAUSED]:
        """The next request or error to answer, QmpClosed, PAUSED or NEED_DATA."""
        if self._pending is not None:
            return PAUSED
        while not self._ready:
            if not self._frame():
                if self._eof:
                    if self._closed_reported:
                        raise LocalProtocolError("next_event() after QmpClosed")
                    self._closed_reported = True
                    return QmpClosed()
                return NEED_DATA
        ev = self._ready.pop(0)
        self._pending = ev.command if isinstance(ev, QmpRequest) else ""
        return ev

    def _error(self, desc: str, id: Any = NO_ID, *, error_class: ErrorClass = ErrorClass.GenericError,
               force: bool = False) -> None:
        if self._quiet and not force:
            return
        self._quiet = True
        self._ready.append(QmpBadRequest(error_class, desc, id))

    def _frame(self) -> bool:
        """Advance through the buffer; True once something was queued in ``_ready``."""
        buf = self._buf
        end = len(buf)
        while self._pos < end and not self._ready:
            mode = self._mode
            if mode is _Mode.TOP:
                self._top(buf, end)
            elif mode is _Mode.WORD:
                self._word(buf, end)
            elif mode is _Mode.VALUE:
                self._value(buf, end)
            else:
                self._string(buf, end)
        if self._pos >= end:
            self._buf = bytearray()
            self._pos = 0
        return bool(self._ready)

    def _seen_newlines(self, buf: bytearray, start: int, stop: int) -> None:
        if self._quiet and buf.find(b"\n", start, stop) != -1:
            self._quiet = False

    def _top(self, buf: bytearray, end: int) -> None:
        m = _TOP_SKIP.match(buf, self._pos)
        assert m is not None
        if m.end() > m.start():
            self._seen_newlines(buf, m.start(), m.end())
            self._pos = m.end()
            if self._pos >= end:
                return
        b = buf[self._pos]
        self._msg = bytearray()
        self._size = 0
        self._depth = 0
        self._skipping = False
        if b in (0x7B, 0x5B):  # { [
            self._mode = _Mode.VALUE
        elif b in (0x22, 0x27):  # a string at the top level: a complete value, not an object
            self._mode = _Mode.VALUE
        elif b in (0x7D, 0x5D):
            self._pos += 1
            self._error(f"JSON parse error, unexpected '{chr(b)}'")
        elif b in _LEXICAL_ERROR:
            self._pos += 1
            self._error(_stray(b))
        else:
            self._mode = _Mode.WORD

    def _word(self, buf: bytearray, end: int) -> None:
        m = _WORD_END.search(buf, self._pos)
        stop = m.start() if m else end
        room = _WORD_KEPT - len(self._msg)
        if room > 0:
            self._msg += buf[self._pos : min(stop, self._pos + room)]
        self._size += stop - self._pos
        self._pos = stop
        if m is None and not self._eof:
            return
        self._mode = _Mode.TOP
        word = bytes(self._msg)
        if self._size <= _WORD_KEPT:
            try:
                json.loads(word, parse_constant=_reject_constant)
            except ValueError:
                pass
            else:
                self._error("QMP input must be a JSON object")
                return
        shown = word.decode("utf-8", "replace") + ("..." if self._size > _WORD_KEPT else "")
        self._error(f"JSON parse error, invalid keyword '{shown}'")

    def _keep(self, data: bytes | bytearray, start: int = 0, stop: int | None = None) -> None:
        """Append data[start:stop] to the value being framed, within the size limit."""
        stop = len(data) if stop is None else stop
        self._size += stop - start
        if self._skipping:
            return
        if self._size > self.max_message:
            self._skipping = True
            self._msg = bytearray()
            self._error(f"QMP input over {self.max_message} bytes (the limit of this server)")
            return
        self._msg += data[start:stop] if start or stop != len(data) else data

    def _value(self, buf: bytearray, end: int) -> None:
        start = self._pos
        m = _IN_VALUE.search(buf, start)
        stop = m.start() if m else end
        if stop > start:
            self._seen_newlines(buf, start, stop)
            self._keep(buf, start, stop)
        self._pos = stop
        if m is None:
            return
        b = buf[stop]
        self._pos = stop + 1
        if b in _LEXICAL_ERROR:
            self._abandon(b)
        elif b in (0x22, 0x27):
            self._string_at = len(self._msg)
            self._keep(b'"')
            self._mode = _Mode.DQ if b == 0x22 else _Mode.SQ
        else:
            self._keep(buf, stop, stop + 1)
            self._depth += 1 if b in (0x7B, 0x5B) else -1
            if self._depth > self.max_depth and not self._skipping:
                self._skipping = True
                self._msg = bytearray()
                self._error("JSON nesting depth limit exceeded")
            if self._depth <= 0:
                self._complete()

    def _string(self, buf: bytearray, end: int) -> None:
        single = self._mode is _Mode.SQ
        if self._escape:
            self._escape = False
            b = buf[self._pos]
            self._pos += 1
            if b in _LEXICAL_ERROR:
                self._abandon(b)
                return
            # \' is QEMU's extra escape; everything else is for the JSON decoder to judge
            self._keep(b"'" if b == 0x27 else bytes((0x5C, b)))
            return
        pattern = _IN_SQ if single else _IN_DQ
        start = self._pos
        m = pattern.search(buf, start)
        stop = m.start() if m else end
        if stop > start:
            self._keep(buf, start, stop)
        self._pos = stop
        if m is None:
            return
        b = buf[stop]
        self._pos = stop + 1
        if b == 0x5C:
            self._escape = True  # the escaped byte is looked at next (it may not be here yet)
        elif b in _LEXICAL_ERROR:
            self._abandon(b)
        elif b == 0x22 and single:
            self._keep(b'\\"')  # a double quote inside a single-quoted string
        else:  # the closing quote
            self._keep(b'"')
            self._mode = _Mode.VALUE
            if self._depth <= 0:
                self._complete()

    def _abandon(self, byte: int) -> None:
        """A lexical error inside a value: drop it and start over (QEMU's reset)."""
        in_string = self._mode in (_Mode.DQ, _Mode.SQ)
        token = bytes(self._msg[self._string_at :]) if in_string else b""
        self._mode = _Mode.TOP
        self._escape = False
        skipped, self._skipping = self._skipping, False
        self._msg = bytearray()
        if not skipped:
            self._error(_stray(byte, token))
        if byte == 0x0A:
            self._quiet = False  # a newline ends the line even when it is the error

    def _complete(self) -> None:
        self._mode = _Mode.TOP
        if self._skipping:
            self._skipping = False
            self._msg = bytearray()
            return
        raw, self._msg = bytes(self._msg), bytearray()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error("JSON parse error, invalid UTF-8 sequence in string")
            return
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            self._error(f"JSON parse error, {msg[0].lower() + msg[1:] if msg else 'invalid'}")
            return
        self._request(obj)

    def _request(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self._error("QMP input must be a JSON object")
            return
        rid = obj.get("id", NO_ID)
        # errors about a request that names its command are always answered (its client
        # waits for that reply); the others are malformed input, one reply per line
        named = isinstance(obj.get("execute"), str)
        execute = None
        for key, value in obj.items():
            if key == "execute" or (key == "exec-oob" and "oob" in self.capabilities):
                if not isinstance(value, str):
                    self._error(f"QMP input member '{key}' must be a string", rid, force=named)
                    return
                if execute is not None:
                    other = "exec-oob" if key == "execute" else "execute"
                    self._error(f"QMP input member '{key}' clashes with '{other}'", rid,
                                force=named)
                    return
                execute = value
            elif key == "arguments":
                if not isinstance(value, dict):
                    self._error("QMP input member 'arguments' must be an object", rid,
                                force=named)
                    return
            elif key != "id":
                self._error(f"QMP input member '{key}' is unexpected", rid, force=named)
                return
        if execute is None:
            self._error("QMP input lacks member 'execute'", rid)
            return
        args = obj.get("arguments", {})
        self.requests += 1
        if not self.negotiated:
            if execute != "qmp_capabilities":
                self._error("Expecting capabilities negotiation with 'qmp_capabilities'", rid,
                            error_class=ErrorClass.CommandNotFound, force=True)
                return
            bad = self._check_enable(args)
            if bad:
                self._error(bad, rid, force=True)
                return
        elif execute == "qmp_capabilities":
            self._error("Capabilities negotiation is already complete, command ignored", rid,
                        error_class=ErrorClass.CommandNotFound, force=True)
            return
        self._ready.append(QmpRequest(execute, args, rid))

    def _check_enable(self, args: dict[str, Any]) -> str | None:
        for key in args:
            if key != "enable":
                return f"Parameter '{key}' is unexpected"
        enable = args.get("enable", [])
        if not isinstance(enable, list):
            return "Invalid parameter type for 'enable', expected: array"
        for cap in enable:
            if not isinstance(cap, str):
                return "Invalid parameter type for 'enable', expected: string"
            if cap != "oob":
                return f"Parameter 'enable' does not accept value '{cap}'"
            if cap not in self.capabilities:
                return f"Capability '{cap}' not available"
        return None

    # -- output ---------------------------------------------------------------------------------

    def send(self, msg: QmpGreeting | QmpReturn | QmpError | QmpEvent) -> bytes:
        """The bytes for one message to the client. Never blocks.

        Raises LocalProtocolError for a reply with no request pending, anything before the
        greeting, or a second greeting.
        """
        if isinstance(msg, QmpGreeting):
            if self._greeted:
                raise LocalProtocolError("greeting sent twice")
            self._greeted = True
            self.capabilities = tuple(msg.capabilities)
            return _line({"QMP": {"version": msg.version, "capabilities": list(msg.capabilities)}})
        if not self._greeted:
            raise LocalProtocolError("send the greeting first")
        if isinstance(msg, QmpEvent):
            if not self.negotiated:
                return b""
            seconds = int(msg.timestamp)
            micro = int(round((msg.timestamp - seconds) * 1e6))
            if micro >= 1_000_000:
                seconds, micro = seconds + 1, micro - 1_000_000
            out: dict[str, Any] = {"timestamp": {"seconds": seconds, "microseconds": micro},
                                   "event": msg.name}
            if msg.data is not None:
                out["data"] = msg.data
            return _line(out)
        if self._pending is None:
            raise LocalProtocolError(f"{type(msg).__name__} with no request to answer")
        command, self._pending = self._pending, None
        if isinstance(msg, QmpReturn):
            if command == "qmp_capabilities":
                self.negotiated = True
            reply: dict[str, Any] = {"return": msg.value}
            if msg.id is not NO_ID:
                reply["id"] = msg.id
            return _line(reply)
        self.errors += 1
        err: dict[str, Any] = {}
        if msg.id is not NO_ID:
            err["id"] = msg.id
        cls = msg.error_class.value if isinstance(msg.error_class, ErrorClass) else msg.error_class
        err["error"] = {"class": cls, "desc": msg.desc}
        return _line(err)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\r\n"
