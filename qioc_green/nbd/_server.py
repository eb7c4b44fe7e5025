"""An NBD server over qioc_green channels: the thin glue between ``protocol.ServerConnection``,
a channel, and an export (a file or memory).

How one connection runs (all of it in the one IOThread its handler was started in)
-------------------------------------------------------------------------------------
* **The reader** is the handler greenlet itself. It reads from the channel, feeds the protocol
  machine and acts on each event. Options are answered inline (the handshake is strictly one
  option at a time). In transmission a WRITE payload arrives as ``WriteData`` views into the
  bytes just received; the reader writes them to the export at once (``os.pwritev``: no copy,
  and the GIL is released while the kernel copies), so no payload is ever held whole.
* **Request greenlets**, at most ``max_requests`` per connection (a ``gevent.pool.Pool``; when it
  is full the reader parks, and the client's requests wait in the socket: back-pressure),
  serve everything else: READ, FLUSH and FUA (``fdatasync`` in a worker thread: the hub keeps
  serving other requests meanwhile), TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS. Many requests are
  in flight at once and may complete in any order, as the protocol allows.
* **One writer greenlet** writes replies. The channel allows one parked writer per direction
  (QEMU's send mutex), so request greenlets never write: they append their reply's buffers to
  a queue, and the writer sends whatever has gathered with one ``writev`` (small replies batch).
* **Memory and time are bounded** whatever a client sends: every queued reply counts against
  the connection's budget and the server's, and the reader stops reading while either is spent
  (back-pressure); the handshake has a time limit, and an optional idle timeout closes a
  connection that does nothing or stops reading its replies. The rules and measurements are
  in ``_limits``.

Errors: a request the export refuses gets the protocol's error reply; a peer that breaks the
protocol, or goes away, ends its own connection with one log line. Nothing here touches other
connections: each has its own greenlets and channel, and exports are shared only through
positional I/O (file) or a lock held for a copy (memory).

Accepting is ``qioc_green.NetListener``'s: ``NBDServer.serve(channel)`` is its client handler.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.event
import gevent.pool

from qioc_green import (
    BrokenChannelError,
    Channel,
    ChannelClosedError,
    ChannelError,
    ContextStoppedError,
    Shutdown,
    TLSChannel,
)

from . import protocol as p
from ._exports import Export, ExportError, nbd_errno
from ._limits import REPLY_COST, SharedBudget, fit_string, shown_name, writev_progressing
from .protocol import NEED_DATA, PAUSED

log = logging.getLogger("nbd.server")

__all__ = ["NBDServer"]

READ_SIZE = 256 * 1024  # bytes asked of the channel per read
MAX_REPLY_BATCH = 256  # buffers per writev (IOV_MAX is 1024)
CONTEXT_ID = 1  # our id for base:allocation
# ---------------------------------------------------------------------------------------------
# One connection


class _Hangup(Exception):
    """End this connection now (the reason is logged once)."""


class _Session:
    """One client connection, from greeting to close. Runs in its handler greenlet's thread."""

    _ids = itertools.count(1)

    def __init__(self, server: NBDServer, channel: Channel) -> None:
        self.server = server
        self.ch = channel
        self.id = next(self._ids)
        self.proto = p.ServerConnection(max_payload=server.max_payload)
        self.export: Export | None = None
        # transmission
        self.pool = gevent.pool.Pool(server.max_requests)
        self.replies: deque[tuple[list[Any], int]] = deque()
        self.wake_writer = gevent.event.Event()
        self.room = gevent.event.Event()  # set when the writer released budget
        self.reserved = 0  # bytes charged (READ payloads reserved, replies queued), not yet sent
        self.budget = server.budget
        self.done = False  # the connection has ended: nothing more is charged
        self.handshake_timer: gevent.Timeout | None = None
        self.closing = False
        self.writer: gevent.Greenlet | None = None
        self.write_error: BaseException | None = None
        self.pending_write: tuple[p.Request, int, str] | None = None  # WRITE awaiting its data

    @property
    def name(self) -> str:
        return self.ch.name

    # -- the handler ------------------------------------------------------------------------
    def run(self) -> None:
        graceful = False
        limit = self.server.handshake_limit
        self.handshake_timer = gevent.Timeout(
            limit, _Hangup(f"handshake not finished within {limit:g} s")) if limit else None
        try:
            if self.handshake_timer is not None:
                self.handshake_timer.start()
            self._send([p.Greeting()])
            self._loop()
            graceful = True
        except _Hangup as exc:
            log.warning("%s: %s; closing", self.name, exc)
        except p.RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s; closing", self.name, exc)
        except p.LocalProtocolError as exc:  # a bug here: say so, but keep serving others
            log.error("%s: internal error: %s; closing", self.name, exc)
        except (ChannelClosedError, ContextStoppedError):
            log.info("%s: closed by the server", self.name)
        except BrokenChannelError as exc:
            log.warning("%s: client went away: %s", self.name, exc)
        except ssl.SSLError as exc:
            log.warning("%s: TLS failed: %s; closing", self.name, exc)
        finally:
            if self.handshake_timer is not None:
                self.handshake_timer.close()
            try:
                self._wind_down(graceful)
            finally:  # whatever is still charged (requests never answered) goes back, once
                self.done = True
                self.budget.adjust(-self.reserved)
                self.reserved = 0

    def _wind_down(self, graceful: bool) -> None:
        if self.writer is None:
            return
        # After DISC or EOF, requests already started finish and are answered; after an error
        # the spec says hang up, so they are dropped.
        try:
            if graceful:
                self.pool.join(timeout=self.server.grace)
            else:
                self.ch.close()
        finally:
            self.pool.kill(block=False)
            self.closing = True
            self.wake_writer.set()
            self.writer.join(timeout=self.server.grace)
            if not self.writer.dead:
                self.ch.close()
                self.writer.kill(block=True, timeout=1)

    def _send(self, events: Sequence[p.Event]) -> None:
        """Handshake phase only (no writer greenlet yet): write replies at once."""
        bufs: list[Any] = []
        for ev in events:
            bufs += self.proto.send_iov(ev)
        self.ch.writev_all(bufs)

    def _loop(self) -> None:
        proto = self.proto
        ch = self.ch
        idle = self.server.idle_timeout
        while True:
            ev = proto.next_event()
            if ev is NEED_DATA:
                if self.write_error is not None:
                    return
                if self.export is None or idle is None:
                    proto.receive_data(ch.read(READ_SIZE))
                    continue
                try:
                    proto.receive_data(ch.read(READ_SIZE, timeout=idle))
                except TimeoutError:
                    if not self.pool and not self.replies and not self.reserved:
                        raise _Hangup(f"idle for {idle:g} s") from None
                continue
            cls = type(ev)
            if cls is p.WriteData:
                self._write_data(ev)  # type: ignore[arg-type]
            elif cls is p.Request:
                if not self._request(ev):  # type: ignore[arg-type]
                    return
            elif cls is p.Closed:
                return
            elif ev is PAUSED:
                raise p.LocalProtocolError("an option was left unanswered")
            elif cls is p.TLSUpgrade:
                self._start_tls()
                ch = self.ch  # from now on the bytes are TLS records
            elif cls is p.ClientFlags:
                pass
            else:
                if not self._option(ev):  # type: ignore[arg-type]
                    return

    # -- handshake -----------------------------------------------------------------------------
    def _find(self, name: str) -> Export | None:
        exports = self.server.exports
        if name in exports:
            return exports[name]
        if name == "" and exports:
            return next(iter(exports.values()))  # the default export
        return None

    def _option(self, ev: p.Event) -> bool:
        """Answer one option; False to hang up."""
        proto = self.proto
        server = self.server
        rep = p.Rep
        if (server.tls_required and not proto.tls_active
                and not isinstance(ev, (p.OptStartTLS, p.OptAbort))):
            if isinstance(ev, p.OptExportName) or (isinstance(ev, p.OptInvalid)
                                                   and ev.option == p.Opt.EXPORT_NAME):
                raise _Hangup("EXPORT_NAME before TLS, which this server requires")
            self._send([p.OptionError(rep.ERR_TLS_REQD, "TLS is required")])
            return True
        if isinstance(ev, p.OptList):
            entries: list[p.Event] = [p.ServerEntry(e.name, e.description)
                                      for e in server.exports.values()]
            self._send(entries + [p.Ack()])
        elif isinstance(ev, (p.OptInfo, p.OptGo)):
            export = self._find(ev.name)
            if export is None:
                self._send([p.OptionError(rep.ERR_UNKNOWN, f"no export named {shown_name(ev.name)}")])
                return True
            out: list[p.Event] = [p.ExportInfo(export.size, export.flags)]
            if p.Info.NAME in ev.requests:
                out.append(p.ExportName(export.name))
            if p.Info.DESCRIPTION in ev.requests and export.description:
                out.append(p.ExportDescription(fit_string(export.description)))
            out += [p.BlockSize(1, 4096, server.max_payload), p.Ack()]
            self._send(out)
            if isinstance(ev, p.OptGo):
                self._enter_transmission(export)
        elif isinstance(ev, p.OptExportName):
            export = self._find(ev.name)
            if export is None:
                raise _Hangup(f"EXPORT_NAME for unknown export {shown_name(ev.name)}")
            self._send([p.ExportInfo(export.size, export.flags)])
            self._enter_transmission(export)
        elif isinstance(ev, p.OptStructuredReply):
            self._send([p.Ack()])
        elif isinstance(ev, (p.OptListMetaContext, p.OptSetMetaContext)):
            if not proto.structured:
                self._send([p.OptionError(rep.ERR_INVALID, "negotiate structured replies first")])
            elif self._find(ev.name) is None:
                self._send([p.OptionError(rep.ERR_UNKNOWN, f"no export named {shown_name(ev.name)}")])
            else:
                listing = isinstance(ev, p.OptListMetaContext)
                if listing:
                    want = not ev.queries or any(q in ("base:", p.BASE_ALLOCATION) for q in ev.queries)
                else:
                    want = p.BASE_ALLOCATION in ev.queries
                ctx = [p.MetaContext(0 if listing else CONTEXT_ID, p.BASE_ALLOCATION)] if want else []
                self._send(ctx + [p.Ack()])
        elif isinstance(ev, p.OptStartTLS):
            if server.tls_context is None:
                self._send([p.OptionError(rep.ERR_UNSUP, "this server has no TLS")])
            elif proto.tls_active:
                self._send([p.OptionError(rep.ERR_INVALID, "TLS is already active")])
            else:
                self._send([p.Ack()])  # next_event() now gives TLSUpgrade
        elif isinstance(ev, p.OptAbort):
            try:
                self._send([p.Ack()])
            except BrokenChannelError:
                pass  # the spec lets the client hang up without waiting for this
            return False
        elif isinstance(ev, p.OptUnknown):
            self._send([p.OptionError(rep.ERR_UNSUP, f"option {ev.option} is not supported")])
        elif isinstance(ev, p.OptInvalid):
            if ev.option == p.Opt.EXPORT_NAME:
                raise _Hangup(f"malformed EXPORT_NAME: {fit_string(ev.reason, 200)}")
            self._send([p.OptionError(rep.ERR_INVALID, fit_string(ev.reason))])
        else:
            raise p.LocalProtocolError(f"unexpected event {ev!r}")
        return True

    def _start_tls(self) -> None:
        if self.proto.take_trailing_data():
            raise _Hangup("client sent data before the STARTTLS reply")
        assert self.server.tls_context is not None
        tls = TLSChannel.server(self.ch, self.server.tls_context)
        tls.handshake()
        self.ch = tls
        self.proto.tls_started()

    def _enter_transmission(self, export: Export) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.close()
        self.export = export
        self.writer = gevent.spawn(self._write_loop)

    # -- transmission: the reader's part ---------------------------------------------------------
    def _request(self, req: p.Request) -> bool:
        cmd = req.command
        if cmd == p.Cmd.DISC:
            return False
        self._room()
        err = self.proto.check_request(req)
        if cmd == p.Cmd.WRITE:
            self.pending_write = (req, err, "refused" if err else "")
            return True
        if err:
            self._reply(req.cookie, err, None, self._why(req, err))
            return True
        if cmd == p.Cmd.READ:
            self._room(req.length)
            self.pool.spawn(self._do, req, req.length)
        else:
            self.pool.spawn(self._do, req, 0)
        return True

    @staticmethod
    def _why(req: p.Request, err: int) -> str:
        what = p.name_of(p.Cmd, req.command)
        if err == p.Errno.EPERM:
            return f"{what} on a read-only export"
        return f"{what} at {req.offset} of {req.length} bytes refused ({p.name_of(p.Errno, err)})"

    def _write_data(self, ev: p.WriteData) -> None:
        assert self.pending_write is not None
        req, err, msg = self.pending_write
        if not err and ev.data:
            try:
                assert self.export is not None
                self.export.write(ev.offset, ev.data)
            except (OSError, ExportError) as exc:
                err, msg = self._failure(exc)
                self.pending_write = (req, err, msg)
        if not ev.last:
            return
        self.pending_write = None
        if not err and req.flags & p.CmdFlag.FUA:
            self.pool.spawn(self._do, req, 0)  # the flush parks; the reader goes on
        else:
            self._reply(req.cookie, err, None, msg)

    def _room(self, n: int = 0) -> None:
        """Park the reader (back-pressure) until ``n`` more bytes fit the connection's budget
        (a READ always does when nothing is held) and the server's; take them."""
        budget = self.budget
        if not n and self.reserved < self.server.reply_budget and budget.used < budget.limit:
            return  # the common case, without the lock
        while self.reserved and self.reserved + max(n, 1) > self.server.reply_budget:
            self.room.clear()
            self.room.wait()
            self._check_writer()
        budget.take(n, self._check_writer)
        self.reserved += n

    def _check_writer(self) -> None:
        if self.write_error is not None:
            raise BrokenChannelError(f"{self.name}: {self.write_error}")
        if self.ch.closed:  # close_all() while waiting for room: nothing parks on the channel
            raise ChannelClosedError(f"{self.name}: closed while waiting for room")

    def _charge(self, n: int) -> None:
        """Count ``n`` bytes held for replies (negative: released). Never parks."""
        if n and not self.done:
            self.reserved += n
            self.budget.adjust(n)

    @staticmethod
    def _failure(exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, ExportError):
            return exc.errno, str(exc)
        return nbd_errno(exc), (getattr(exc, "strerror", None) or str(exc))[:200]

    # -- transmission: request greenlets ---------------------------------------------------------
    def _do(self, req: p.Request, reserved: int) -> None:
        try:
            self._serve(req, reserved)
        except (ChannelClosedError, ContextStoppedError, gevent.GreenletExit):
            pass  # the connection is ending; its reader reports why
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("%s: request %s failed", self.name, req)
            self.ch.close()

    def _serve(self, req: p.Request, reserved: int) -> None:
        export = self.export
        assert export is not None
        cmd, flags = req.command, req.flags
        data = None
        err, msg = 0, ""
        try:
            if cmd == p.Cmd.READ:
                data = export.read(req.offset, req.length)
            elif cmd == p.Cmd.WRITE or cmd == p.Cmd.FLUSH:  # a WRITE here is FUA: its flush
                export.flush()
            elif cmd == p.Cmd.BLOCK_STATUS:
                self._block_status(req)
                return
            elif cmd == p.Cmd.TRIM:
                export.trim(req.offset, req.length)
            elif cmd == p.Cmd.WRITE_ZEROES:
                export.zero(req.offset, req.length, may_trim=not flags & p.CmdFlag.NO_HOLE,
                            fast=bool(flags & p.CmdFlag.FAST_ZERO))
            elif cmd == p.Cmd.CACHE:
                export.cache(req.offset, req.length)
            if flags & p.CmdFlag.FUA and cmd in (p.Cmd.TRIM, p.Cmd.WRITE_ZEROES):
                export.flush()
        except (OSError, ExportError, ChannelError) as exc:
            if isinstance(exc, (ChannelClosedError, ContextStoppedError)):
                raise
            err, msg = self._failure(exc)
            data = None
        self._reply(req.cookie, err, data, msg, reserved)

    def _block_status(self, req: p.Request) -> None:
        assert self.export is not None
        try:
            extents = self.export.extents(req.offset, req.length)
        except OSError as exc:
            err, msg = self._failure(exc)
            self._reply(req.cookie, err, None, msg)
            return
        if self.write_error is not None or self.proto.phase == "ERROR":
            return
        if req.flags & p.CmdFlag.REQ_ONE:
            extents = extents[:1]
        chunk = p.BlockStatusChunk(req.cookie, CONTEXT_ID, tuple(p.Extent(*e) for e in extents), done=True)
        self._queue(self.proto.send_iov(chunk), 0)

    def _reply(self, cookie: int, err: int, data: Any, msg: str, reserved: int = 0) -> None:
        if self.write_error is not None or self.proto.phase == "ERROR":
            return
        self._queue(self.proto.reply_iov(cookie, err, data if not err else None, msg), reserved)

    def _queue(self, bufs: list[Any], reserved: int) -> None:
        """Hand a reply to the writer; it is charged for its size now (a READ's payload was
        reserved before it was read: only the difference is charged)."""
        cost = REPLY_COST + sum(map(len, bufs))
        self._charge(cost - reserved)
        self.replies.append((bufs, cost))
        self.wake_writer.set()

    # -- transmission: the writer -------------------------------------------------------------------
    def _write_loop(self) -> None:
        replies = self.replies
        ch = self.ch
        idle = self.server.idle_timeout
        try:
            while True:
                if not replies:
                    if self.closing:
                        return
                    self.wake_writer.clear()
                    self.wake_writer.wait()
                    continue
                bufs: list[Any] = []
                released = 0
                while replies and len(bufs) < MAX_REPLY_BATCH:
                    b, n = replies.popleft()
                    bufs += b
                    released += n
                del b
                if idle is None:
                    ch.writev_all(bufs)
                else:
                    writev_progressing(ch, bufs, idle)
                bufs = []  # an idle connection holds no reply bytes
                self._charge(-released)
                self.room.set()
        except (ChannelError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                exc = BrokenChannelError(f"the client took no reply bytes for {idle:g} s")
            self.write_error = exc
            if not isinstance(exc, (ChannelClosedError, ContextStoppedError)):
                log.warning("%s: cannot send replies: %s; closing", self.name, exc)
            self._charge(-sum(n for _, n in replies))
            replies.clear()
            self.room.set()
            self.ch.close()  # wakes the reader


# ---------------------------------------------------------------------------------------------
# The server


class NBDServer:
    """Exports by name, and the policy every connection follows. ``serve(channel)`` is the
    client handler: it runs one connection to its end (parks; call it in a handler greenlet).

    Limits (``_limits`` says how each is kept): ``max_requests`` at once per connection;
    ``reply_budget`` bytes of replies held per connection, ``max_memory`` for all together;
    ``max_clients`` (None: no limit; past it a client is closed, counted in ``refused``);
    ``handshake_limit`` s to negotiate (0: none); ``idle_timeout`` s (None: none).
    """

    def __init__(self, exports: Sequence[Export], *, max_requests: int = 16,
                 reply_budget: int = 64 * 1024 * 1024, max_memory: int = 1024 * 1024 * 1024,
                 max_clients: int | None = 128, handshake_limit: float = 10.0,
                 idle_timeout: float | None = None, max_payload: int = p.MAX_PAYLOAD,
                 tls_context: ssl.SSLContext | None = None, tls_required: bool = False,
                 grace: float = 5.0, unix_sndbuf: int = 4 * 1024 * 1024) -> None:
        self.exports: dict[str, Export] = {}
        for e in exports:
            if e.name in self.exports:
                raise ValueError(f"export {e.name!r} given twice")
            raw = e.name.encode("utf-8")
            if len(raw) > p.MAX_STRING or b"\0" in raw:
                raise ValueError(f"export name {shown_name(e.name)}: at most {p.MAX_STRING} bytes "
                                 "of UTF-8 without NUL")
            self.exports[e.name] = e
        if max_clients is not None and max_clients < 1:
            raise ValueError("max_clients must be at least 1 (None: no limit)")
        if max_requests < 1:  # 0 would take requests and serve none, each client hung
            raise ValueError("max_requests must be at least 1")
        if handshake_limit < 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ValueError("handshake_limit must be >= 0 (0: none), idle_timeout > 0 or None")
        self.max_requests = max_requests
        self.reply_budget = max(reply_budget, max_payload)
        # one READ must always fit, or its reader would wait for ever
        self.budget = SharedBudget(max(max_memory, self.reply_budget))
        self.max_clients = max_clients
        self.handshake_limit = handshake_limit
        self.idle_timeout = idle_timeout
        self.refused = 0
        self.max_payload = max_payload
        self.tls_context = tls_context
        self.tls_required = tls_required
        if tls_required and tls_context is None:
            raise ValueError("TLS required but no TLS credentials given")
        self.grace = grace
        self.unix_sndbuf = unix_sndbuf
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._channels: set[Channel] = set()

    def serve(self, channel: Channel) -> None:
        """Run one connection to its end. Parks. Never raises for the client's faults."""
        channel.set_follow_coroutine_ctx(True)
        channel.set_name(f"nbd-server-{next(self._ids)}")
        sock = getattr(channel, "socket", None)
        if self.unix_sndbuf and isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
            # A UNIX socket's default send buffer (208 KiB) is smaller than one 256 KiB READ
            # reply, so every reply took two wake-ups; measured here with nbdcopy: +10-20 %.
            # (TCP is left to the kernel's autotuning, which a fixed SO_SNDBUF would turn off.)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.unix_sndbuf)
            except OSError:
                pass
        with self._lock:
            refuse = self.max_clients is not None and len(self._channels) >= self.max_clients
            if refuse:
                self.refused += 1
            else:
                self._channels.add(channel)
        if refuse:
            log.info("%s: refused: %d clients already", channel.name, self.max_clients)
            channel.close()
            return
        try:
            _Session(self, channel).run()
        finally:
            with self._lock:
                self._channels.discard(channel)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._channels)

    @property
    def memory_held(self) -> int:
        """Bytes of replies queued or reserved by all connections now."""
        return self.budget.used

    def disconnect_all(self) -> None:
        """Ask every connection to end: their reads see EOF, so requests already received are
        answered first (the graceful stop). Thread-safe; never switches."""
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            try:
                ch.shutdown(Shutdown.READ)
            except ChannelError:
                ch.close()

    def close_all(self) -> None:
        """Close every connection now (their greenlets see ChannelClosedError). Thread-safe."""
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            ch.close()

    def close(self) -> None:
        for e in self.exports.values():
            e.close()


