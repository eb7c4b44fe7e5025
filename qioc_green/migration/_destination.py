"""The receiver as the source sees a destination: the return path, answered or relayed.

A source with ``return-path`` or ``postcopy-ram`` reads the main connection's other direction
in a thread of its own and waits there for PONGs, SWITCHOVER_ACK and, at the end, SHUT (see
``_return_path`` for the facts and docs/migration-destination.md). :class:`Destination` is the
glue between the receiving greenlet and that direction, one per migration:

- **Answering** (no ``--forward``, or one to a file or a command, which cannot answer):
  the reading greenlet feeds every command the parser reports to a
  :class:`~._return_path.DestinationReturnPath` and hands the bytes it returns to a *writer
  greenlet in another IOThread*, which writes them to the source's channel. The source's
  channel is then read in one IOThread while another writes it: the very case QEMU 8.2's
  "follow coroutine AioContext" change is about, and this library's point. The hand-off is a
  bounded cross-thread ``Queue``: a source that stops reading its return path holds the
  reader back instead of growing memory.
- **Relaying** (``--forward`` to a socket: a real destination answers): a greenlet in that
  same IOThread reads the destination's return path (the forward channel, which the
  forwarder's writer writes from a third IOThread), checks each message as the source would
  (``ReturnPathReader``) and passes it to the writer, re-encoded, so the source hears its real
  destination. Two channels, each read in one IOThread and written in another. The commands
  are still fed to a ``DestinationReturnPath``, for its checks and its postcopy state, but its
  answers are dropped.

When the stream has ended (after the VM description; at EOF in postcopy, which sends none; at
EOF with ``--allow-undescribed``), SHUT 0 goes back and the source closes. On any failure SHUT 1
goes back (once, if the return path was open and no SHUT went yet) before the channel closes.
A relayed message the source would refuse, RECV_BITMAP or RESUME_ACK (postcopy recovery, not
supported), anything after SHUT, or a destination that closes its return path without SHUT
fails the migration with one line (:attr:`Destination.error`): SHUT 1 to the source, the
source's channel closed under the reader.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import threading
from collections.abc import Callable
from typing import Any

from qioc_green import (
    BrokenChannelError,
    Channel,
    ChannelClosedError,
    Context,
    Future,
    Queue,
    QueueClosed,
    SocketChannel,
    TLSChannel,
)

from ._events import Command, Configuration, DeviceState, EndOfState, StreamEnd
from ._format import NEED_DATA, MigrationStreamError
from ._return_path import DestinationReturnPath, PostcopyState
from ._rp_codec import (
    Pong,
    RecvBitmap,
    ReqPages,
    ResumeAck,
    ReturnPathError,
    ReturnPathReader,
    RpMessage,
    Shut,
    SwitchoverAck,
    encode_pong,
    encode_req_pages,
    encode_shut,
    encode_switchover_ack,
)
from ._tls import connect_tls
from ._uri import Endpoint, open_outgoing

OUTBOX = 64  # return-path messages queued for the writer (each at most 516 bytes)
FINISH_TIMEOUT = 10.0  # s: the writer and the relay get this long to finish at the end

#: the events the receiver hands to :meth:`Destination.event`
EVENTS = (Command, Configuration, DeviceState, EndOfState, StreamEnd)
_CLOSE = None  # the writer's "write nothing more, close the source's channel"
_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")


def answers_back(endpoint: Endpoint) -> bool:
    """Does a destination at ``endpoint`` talk back (a socket), so its return path is relayed?"""
    if endpoint.kind in ("tcp", "unix"):
        return True
    if endpoint.kind == "fd":
        try:
            return stat.S_ISSOCK(os.fstat(endpoint.fd).st_mode)
        except OSError:
            return False
    return False


def machine_at_least(machine: str, version: tuple[int, int]) -> bool:
    """Is a versioned machine type (``pc-q35-10.0``) at least ``version``? False for an
    unversioned one (``none``): nothing then says how new the source is."""
    m = _MACHINE_VERSION.search(machine)
    return m is not None and (int(m[1]), int(m[2])) >= version


def runstate_of(globalstate: bytes) -> str | None:
    """The source's run state from its ``globalstate`` section (be32 size, then the name in a
    100-byte NUL-padded buffer)."""
    if len(globalstate) < 5:
        return None
    size = int.from_bytes(globalstate[:4], "big")
    name = globalstate[4 : 4 + min(size, 100)].split(b"\0")[0]
    return name.decode("ascii", "replace") if name else None


def open_destination(endpoint: Endpoint, tls: tuple[ssl.SSLContext, str | None] | None,
                     timeout: float | None) -> Channel:
    """Open a connection to a forwarding destination (the main channel's, or a multifd
    channel's), with TLS when ``tls`` is (ssl context, hostname; None: the URI's host). May
    park. Raises OSError, ChannelError, TlsError."""
    ch = open_outgoing(endpoint, timeout=timeout)
    if tls is not None:
        ctx, hostname = tls
        if hostname is None and endpoint.kind == "tcp":
            hostname = endpoint.address.removeprefix("tcp:").rsplit(":", 1)[0].strip("[]")
        ch = connect_tls(ch, ctx, hostname, timeout=timeout)
    return ch


def _writable(channel: Channel) -> bool:
    inner = channel.inner if isinstance(channel, TLSChannel) else channel
    return isinstance(inner, SocketChannel)


class Destination:
    """The return path of one incoming migration (see the module notes).

    ``context``: the IOThread for the writer (and the relay). ``switchover_ack``: send
    SWITCHOVER_ACK when the return path opens; None decides from the configuration's machine
    type (8.1 and newer, which know the message; a 7.2 source fails on it). ``postcopy_ram``:
    the capability, or None to accept what the source advises. ``relay``: a forwarding
    destination answers (see :func:`answers_back`). ``allow_undescribed``: the stream may end at
    EOF without a VM description, so SHUT goes back at EOF. ``forward_tls``: (ssl context,
    hostname) to speak TLS to the forwarding destination. ``status``: told ``active``,
    ``postcopy-active``, then ``completed`` or ``failed`` (from the receiving thread).
    ``write_timeout``: give up writing to a source that does not read its return path.
    """

    def __init__(self, context: Context, *, switchover_ack: bool | None = None,
                 postcopy_ram: bool | None = None, relay: bool = False,
                 allow_undescribed: bool = False,
                 forward_tls: tuple[ssl.SSLContext, str | None] | None = None,
                 status: Callable[[str], None] | None = None,
                 write_timeout: float | None = None) -> None:
        self.context = context
        self.rp = DestinationReturnPath(switchover_ack=bool(switchover_ack),
                                        postcopy_ram=postcopy_ram)
        self._auto_ack = switchover_ack is None
        self.relaying = relay
        self.allow_undescribed = allow_undescribed
        self.forward_tls = forward_tls
        self._status = status
        self.write_timeout = write_timeout
        self.done = False  # the source has been told (by us or the destination) the stream ended
        self.error: str | None = None  # one line, from the relay's side
        self.final_error: str | None = None  # the migration's own error line, at the end
        self.source_runstate: str | None = None
        self.relayed: dict[str, int] = {}  # messages relayed from the destination, by type
        self._out: Queue[bytes | None] = Queue(OUTBOX)
        self._source: Channel | None = None
        self._writer: Future[None] | None = None
        self._relay: Future[None] | None = None
        self._shut_relayed = False
        self._failed = False
        #: set by a multifd receiver: the migration turns ``active`` once every channel is in
        #: (:meth:`all_channels_in`), as QEMU's destination does, not when the main one is,
        #: and ``completed`` once every channel has ended (:meth:`ended`), not the main one
        self.multifd = False
        self._ended = False  # completed or failed was said: no "active" after it
        self._status_lock = threading.Lock()

    @property
    def postcopy(self) -> bool:
        """The source has switched to postcopy (POSTCOPY_LISTEN seen)."""
        return self.rp.postcopy in (PostcopyState.LISTENING, PostcopyState.RUNNING,
                                    PostcopyState.END)

    def as_dict(self) -> dict[str, Any]:
        """For the summary: what went on on the return path."""
        rp = self.rp
        return {"opened": rp.opened, "mode": "relayed" if self.relaying else "answered",
                "pings": rp.pings,
                "switchover_ack": rp.switchover_ack and rp.opened and not self.relaying,
                "postcopy": self.postcopy, "relayed": dict(self.relayed)}

    def _say(self, status: str) -> None:
        if self._status is not None:
            self._status(status)

    # -- the receiving greenlet's side ---------------------------------------------------------

    def start(self, channel: Channel) -> None:
        """The source's channel was accepted (and its TLS set up). Never parks."""
        if _writable(channel):
            self._source = channel
            self._writer = self.context.spawn(self._write, channel)
        if not self.multifd:
            self._say("active")

    def ended(self, error: str | None) -> None:
        """The whole migration is over (``error``: its one-line error): say ``completed`` or
        ``failed``, once. Never parks."""
        with self._status_lock:
            if self._ended:
                return
            self._ended = True
            self.final_error = error
            self._say("completed" if error is None else "failed")

    def all_channels_in(self) -> None:
        """Every connection of a multifd migration has said what it is: it is ``active``
        (QEMU: ``migration_has_all_channels()``). Any thread; never parks."""
        with self._status_lock:
            if not self._ended:
                self._say("active")

    def event(self, ev: Any) -> bool:
        """One of :data:`EVENTS`, in stream order. True when this is where the source waits for
        SHUT: everything up to here must reach the destination now. May park (a full outbox).
        Raises MigrationStreamError (at the event's offset) where QEMU's destination would
        fail."""
        try:
            return self._event(ev)
        except ReturnPathError as exc:
            raise MigrationStreamError(getattr(ev, "offset", 0), str(exc)) from None

    def _event(self, ev: Any) -> bool:
        if isinstance(ev, Command):
            before = self.rp.status
            out = self.rp.command(ev.command, ev.data)
            if out and not self.relaying:
                self._send(out)
            if self.rp.status != before:
                self._say(self.rp.status)
            return False
        if isinstance(ev, DeviceState):
            if ev.idstr == "globalstate":
                self.source_runstate = runstate_of(ev.data)
            return False
        if isinstance(ev, Configuration):
            if self._auto_ack:
                self.rp.switchover_ack = machine_at_least(ev.machine, (8, 1))
            if ev.target_page_bits is not None:
                self.rp.target_page_size = 1 << ev.target_page_bits
            return False
        if self.done:
            return False
        if isinstance(ev, EndOfState) and not (self.postcopy or self.allow_undescribed):
            return False  # precopy: the VM description comes after EOF
        self.done = True
        out = self.rp.end_of_stream()
        if out and not self.relaying:
            self._send(out)
        return True

    def finish(self, error: str | None) -> None:
        """The migration is over (``error``: its one-line error): SHUT 1 if it failed, then let
        the writer and the relay end (each bounded by FINISH_TIMEOUT). May park. Never raises."""
        ok = error is None
        self.final_error = error
        if not ok:
            self._fail_source()
        if not self.multifd:
            self.ended(error)
        if self._relay is not None:
            try:
                self._relay.result(FINISH_TIMEOUT)
            except BaseException:  # noqa: BLE001 - its error, if any, is in self.error
                pass
        self._out.close()
        if self._writer is not None:
            try:
                self._writer.result(FINISH_TIMEOUT)
            except BaseException:  # noqa: BLE001 - the source's channel is closed next anyway
                pass

    def _send(self, data: bytes | None) -> None:
        if self._source is None:
            return  # a one-way source (file, exec): nobody to answer
        try:
            self._out.put(data)
        except QueueClosed:
            pass  # the writer has gone: the source is gone too

    def _fail_source(self) -> None:
        """SHUT 1 to the source, once, if its return path is open and nothing shut it yet."""
        if self._failed:
            return
        self._failed = True
        if self.relaying:  # (maybe in the relay's thread: leave the receiver's state alone)
            out = b"" if self._shut_relayed or not self.rp.opened else encode_shut(1)
        else:
            out = self.rp.fail()
        if out:
            self._send(out)

    # -- the writer, in the return path's IOThread ----------------------------------------------

    def _write(self, channel: Channel) -> None:
        try:
            while True:
                data = self._out.get()
                if data is _CLOSE:
                    channel.close()  # wakes the receiving greenlet: see the relay's failure
                    return
                channel.write_all(data, timeout=self.write_timeout)
        except QueueClosed:
            return
        except (BrokenChannelError, ChannelClosedError, TimeoutError):
            self._out.close()  # the source is gone or stuck: later answers are dropped

    # -- the relay, in the same IOThread ---------------------------------------------------------

    def connect_forward(self, endpoint: Endpoint, timeout: float | None) -> Channel:
        """The forwarder's connect: open the destination, speak TLS if asked, and start
        relaying its return path. Runs in the forwarder's IOThread; may park."""
        ch = open_destination(endpoint, self.forward_tls, timeout)
        if self.relaying:
            self._relay = self.context.spawn(self._relay_from, ch)
        return ch

    def _relay_from(self, ch: Channel) -> None:
        reader = ReturnPathReader()
        try:
            while True:
                try:
                    data = ch.read(65536)
                except ChannelClosedError:
                    return  # the forwarder closed it: passed on to the end, or dropped
                except BrokenChannelError as exc:
                    if self._shut_relayed:
                        return  # a TLS destination may hang up without close_notify
                    raise ReturnPathError(f"the connection broke before SHUT ({exc})") from None
                if not data:
                    reader.close()
                    if self.rp.opened and not self._shut_relayed and not self._failed:
                        raise ReturnPathError("the destination closed its return path before "
                                              "SHUT (it failed: see its own log)")
                    return
                reader.feed(data)
                while (msg := reader.next_message()) is not NEED_DATA:
                    self._send(self._checked(msg))
        except ReturnPathError as exc:
            self.error = f"return path from the destination: {exc}"
            self._fail_source()
            self._send(_CLOSE)

    def _checked(self, msg: RpMessage) -> bytes:
        """A destination's message, as the source will get it; ReturnPathError for what this
        receiver cannot pass on."""
        name = type(msg).__name__
        if self._shut_relayed:
            raise ReturnPathError(f"{name} after SHUT")
        self.relayed[name] = self.relayed.get(name, 0) + 1
        if isinstance(msg, Shut):
            self._shut_relayed = True
            return encode_shut(msg.status)
        if isinstance(msg, Pong):
            return encode_pong(msg.value)
        if isinstance(msg, ReqPages):
            return encode_req_pages(msg.start, msg.length, msg.block)
        if isinstance(msg, SwitchoverAck):
            return encode_switchover_ack()
        assert isinstance(msg, (RecvBitmap, ResumeAck))
        raise ReturnPathError(f"{type(msg).__name__}: postcopy recovery is not supported "
                              "through this receiver")

