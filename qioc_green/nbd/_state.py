"""What both state machines share: phases, the receive buffer, EOF, errors, the TLS upgrade and
the metadata contexts' export rule."""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from ._events import (
    Buffers,
    Closed,
    Event,
    OptExportName,
    OptGo,
    OptInfo,
    OptSetMetaContext,
    TLSUpgrade,
)
from ._receivebuffer import (
    ReceiveBuffer,
)
from ._util import (
    NEED_DATA,
    PAUSED,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Sentinel,
)


class Phase(IntEnum):
    GREETING = 0  # server: greeting not sent yet; client: waiting for it
    CLIENT_FLAGS = 1  # server: waiting for them; client: must send them
    OPTIONS = 2
    TLS = 3  # STARTTLS acked; waiting for tls_started()
    TRANSMISSION = 4
    CLOSED = 5  # after ABORT or DISC
    ERROR = 6


class Connection:
    """What both machines share: the receive buffer, EOF, errors and the byte count."""

    def __init__(self) -> None:
        self._buf = ReceiveBuffer()
        self._rx = 0  # bytes consumed from the received stream so far
        self._eof = False
        self._error: ProtocolError | None = None
        self._phase = Phase.GREETING
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

    def next_event(self) -> Event | Sentinel:
        """The next event, or NEED_DATA, or PAUSED. Raises ProtocolError (and keeps raising)."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._phase = Phase.ERROR
            self._error = exc
            raise

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event`` to the peer; raises LocalProtocolError if not allowed now."""
        return b"".join(self.send_iov(event))

    def send_iov(self, event: Event) -> Buffers:
        """As ``send``, as a list of buffers for writev: payloads are passed through uncopied."""
        if self._phase == Phase.ERROR:
            raise LocalProtocolError("cannot send after a protocol error")
        if self._phase == Phase.TLS:
            raise LocalProtocolError("cannot send while the TLS upgrade is pending; call tls_started()")
        return self._send(event)

    def take_trailing_data(self) -> bytes:
        """During the TLS upgrade: the bytes received after STARTTLS (they are TLS, not NBD)."""
        if self._phase != Phase.TLS:
            raise LocalProtocolError("take_trailing_data() is only for the TLS upgrade")
        return self._buf.take_all()

    def tls_started(self) -> None:
        """The TLS handshake is done; NBD continues over it with a clean negotiation state."""
        if self._phase != Phase.TLS:
            raise LocalProtocolError("tls_started() without an acknowledged STARTTLS")
        if self._buf.size:
            raise LocalProtocolError("take_trailing_data() first: bytes from before TLS are pending")
        self._phase = Phase.OPTIONS
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

    def _at_boundary(self) -> Event | Sentinel:
        """Nothing buffered at a message boundary: Closed at EOF, else NEED_DATA."""
        if self._eof:
            self._phase = Phase.CLOSED
            return Closed()
        return NEED_DATA

    def _option_names(self, event: Event) -> None:
        """Contexts belong to the export SET_META_CONTEXT named: an INFO, GO or EXPORT_NAME for
        another export drops them (the spec's rule for GO; nbdkit applies it to INFO too)."""
        if isinstance(event, OptSetMetaContext):
            self._meta_export = event.name
        elif isinstance(event, (OptInfo, OptGo, OptExportName)) and event.name != self._meta_export:
            self.meta_contexts = {}

    def _tls_pause(self) -> Event | Sentinel:
        if not self._tls_announced:
            self._tls_announced = True
            return TLSUpgrade()
        return PAUSED

    def _enter_tls(self) -> None:
        self._phase = Phase.TLS
        self._tls_announced = False

    def _parse(self) -> Event | Sentinel:
        raise NotImplementedError

    def _send(self, event: Event) -> Buffers:
        raise NotImplementedError


# Requests in flight, as each machine tracks them


class ServerRequest:
    """A request the server received and has not completely answered."""

    __slots__ = ("command", "length", "offset")

    def __init__(self, command: int, offset: int, length: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length


class ClientRequest:
    """A request the client sent, and what its reply chunks covered so far."""

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
