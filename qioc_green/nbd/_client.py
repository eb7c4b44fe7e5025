"""An NBD client whose blocking calls may come from greenlets in any IOThread at once.

This is the case that motivated QEMU's "follow coroutine AioContext" change: one coroutine reads
replies while request coroutines in other AioContexts write requests on the same connection.

How it works
------------
* **One reply reader per connection**, a greenlet in a context chosen at connect time. It reads
  the channel, feeds ``protocol.ClientConnection``, copies READ data into each request's buffer,
  and completes the request's ``qioc_green.Future``. Completing a future from the reader's thread
  wakes the requester in *its own* thread (through that thread's inbox): no greenlet ever moves.
* **Requesters write their own requests.** The channel allows one parked writer per direction
  (``ChannelBusyError`` for a second), so writers take a ``qioc_green.Lock``, which parks
  greenlets of any thread and hands itself to the oldest waiter (QEMU's ``send_mutex`` is a
  CoMutex for the same reason). It is held while the request is written,
  never while waiting for the reply. The protocol machine is shared by the reader and the
  writers of every thread, so each touch of it is under a plain ``threading.Lock`` that is never
  held across a park (a thread blocked on it blocks for microseconds, not for I/O).
* **Multi-conn.** With ``connections=N`` and a server that advertises CAN_MULTI_CONN, requests
  are spread round-robin over N connections, each with its own reader.
* A request that is abandoned (its caller timed out or was killed) stays in flight; its reply
  is still read and dropped. A broken connection fails every request in flight on it with
  ``ConnectionError``.
"""

from __future__ import annotations

import itertools
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import qioc_green
from qioc_green import Channel, ChannelError, Future, Lock, Shutdown, SocketChannel, TLSChannel

from . import protocol as p
from .protocol import NEED_DATA

__all__ = ["Client", "NBDError", "URI", "parse_uri"]

READ_SIZE = 256 * 1024  # measured here: 1 MiB reads were slower (cache misses)
DEFAULT_PORT = 10809


class NBDError(OSError):
    """The server answered a request with an error (``errno`` is the NBD error value)."""

    def __init__(self, nbd_errno: int, message: str = "") -> None:
        name = p.name_of(p.Errno, nbd_errno)
        super().__init__(nbd_errno, f"{name}{': ' + message if message else ''}")


@dataclass(frozen=True)
class URI:
    address: str  # QEMU spelling: unix:PATH or tcp:HOST:PORT
    export: str
    tls: bool
    host: str = ""


def parse_uri(uri: str) -> URI:
    """``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``, and ``nbds`` forms."""
    u = urllib.parse.urlsplit(uri)
    scheme = u.scheme
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp"):
        raise ValueError(f"{uri!r}: not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    tls = scheme.startswith("nbds")
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if scheme.endswith("+unix"):
        query = urllib.parse.parse_qs(u.query)
        sock = query.get("socket")
        if not sock:
            raise ValueError(f"{uri!r}: nbd+unix needs ?socket=PATH")
        return URI(f"unix:{sock[0]}", export, tls)
    host = u.hostname or "localhost"
    port = u.port or DEFAULT_PORT
    shown = f"[{host}]" if ":" in host else host
    return URI(f"tcp:{shown}:{port}", export, tls, host)


class _Pending:
    """One request in flight: where its data goes, and how its caller is woken."""

    __slots__ = ("buf", "extents", "future", "offset")

    def __init__(self, offset: int, buf: memoryview | None) -> None:
        self.offset = offset
        self.buf = buf
        self.extents: list[p.Extent] = []
        self.future: Future[_Pending] = Future()


class _Connection:
    """One NBD connection in transmission: its channel, protocol machine, reader and writers."""

    def __init__(self, ch: Channel, proto: p.ClientConnection) -> None:
        self.ch = ch
        self.proto = proto
        self.name = ch.name
        self.send_lock = Lock()  # one writer on the channel at a time
        self.proto_lock = threading.Lock()  # the protocol machine; never held across a park
        self.pending: dict[int, _Pending] = {}
        self.dead: BaseException | None = None
        self.reader: Future[None] | None = None
        self.sent = 0  # requests written (statistics)

    def start_reader(self, ctx: qioc_green.Context) -> None:
        self.reader = ctx.spawn(self._read_loop)

    # -- requests (any thread) -----------------------------------------------------------------
    def submit(self, command: int, offset: int, length: int, flags: int = 0,
               data: Any = None, buf: memoryview | None = None) -> _Pending:
        """Write one request; return its pending entry (wait on ``.future``). May park."""
        pend = _Pending(offset, buf)
        self.send_lock.acquire()
        try:
            if self.dead is not None:
                raise ConnectionError(f"{self.name}: connection is down: {self.dead}")
            with self.proto_lock:
                cookie = self.proto.new_cookie()
                bufs = self.proto.send_iov(p.Request(command, cookie, offset, length, flags, data))
                self.pending[cookie] = pend
                self.sent += 1
            try:
                self.ch.writev_all(bufs)
            except ChannelError as exc:
                self._fail(exc)
                raise ConnectionError(f"{self.name}: cannot send request: {exc}") from exc
            except BaseException as exc:
                # Killed or timed out part-way through a request: the stream may now hold half
                # a request, and nothing can be sent after it. The connection is lost.
                self._fail(ConnectionError(f"{self.name}: a request was interrupted while "
                                           f"being sent ({type(exc).__name__})"))
                raise
        finally:
            self.send_lock.release()
        return pend

    # -- the reply reader (its own greenlet) -----------------------------------------------------
    def _read_loop(self) -> None:
        ch, proto, lock, pending = self.ch, self.proto, self.proto_lock, self.pending
        zeroes = b""
        try:
            while True:
                data = ch.read(READ_SIZE)
                events: list[Any] = []
                with lock:
                    proto.receive_data(data)
                    while True:
                        ev = proto.next_event()
                        if ev is NEED_DATA:
                            break
                        events.append(ev)
                        if type(ev) is p.Closed:
                            break
                for ev in events:
                    cls = type(ev)
                    if cls is p.ReadData:
                        pend = pending[ev.cookie]
                        if pend.buf is not None:
                            start = ev.offset - pend.offset
                            pend.buf[start:start + len(ev.data)] = ev.data
                    elif cls is p.ReplyDone:
                        pend = pending.pop(ev.cookie)
                        if ev.error:
                            pend.future.set_exception(NBDError(ev.error, ev.message))
                        else:
                            pend.future.set_result(pend)
                    elif cls is p.ReadHole:
                        pend = pending[ev.cookie]
                        if pend.buf is not None:
                            if len(zeroes) < ev.length:
                                zeroes = bytes(ev.length)
                            start = ev.offset - pend.offset
                            pend.buf[start:start + ev.length] = zeroes[:ev.length]
                    elif cls is p.BlockStatus:
                        pending[ev.cookie].extents.extend(ev.extents)
                    elif cls is p.Closed:
                        self._fail(ConnectionError(f"{self.name}: server closed the connection"))
                        return
                    # ReplyError: its error also comes in the ReplyDone that follows
        except (ChannelError, p.ProtocolError, qioc_green.ContextStoppedError) as exc:
            self._fail(exc)
        except KeyError as exc:  # _fail() from a writer emptied the table under us
            self._fail(self.dead or ConnectionError(f"{self.name}: reply for a dropped request {exc}"))

    def _fail(self, exc: BaseException) -> None:
        """The connection is unusable: fail every request in flight. Any thread; never parks."""
        if self.dead is None:
            self.dead = exc
        self.ch.close()
        with self.proto_lock:
            doomed = list(self.pending.values())
            self.pending.clear()
        for pend in doomed:
            if not pend.future.done():
                err = ConnectionError(f"{self.name}: connection lost with the request in flight: {exc}")
                pend.future.set_exception(err)

    def close(self, timeout: float) -> None:
        if self.dead is None and not self.pending:
            try:
                if not self.send_lock.acquire(timeout=timeout):
                    raise TimeoutError(f"{self.name}: a request is still being sent")
                try:
                    with self.proto_lock:
                        bufs = self.proto.send_iov(p.Request(p.Cmd.DISC, 0))
                    self.ch.writev_all(bufs, timeout=timeout)
                    self.ch.shutdown(Shutdown.WRITE)
                finally:
                    self.send_lock.release()
            except (OSError, ChannelError, p.ProtocolError):
                # The server may hang up as soon as it reads DISC: a TLS close_notify after it
                # can meet EPIPE (raw from TLSChannel's shutdown today; TimeoutError is an
                # OSError too). Nothing is lost: every request was answered.
                pass
        if self.reader is not None:
            try:
                self.reader.result(timeout)
            except Exception:  # noqa: BLE001 - the reader records its own failure
                self.ch.close()
        self.ch.close()
        if self.reader is not None:
            try:
                self.reader.result(timeout)
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------------
# Negotiation (one connection, in the caller's greenlet)


def _negotiate(ch: Channel, export: str, tls: ssl.SSLContext | None, server_hostname: str | None,
               timeout: float | None) -> tuple[Channel, p.ClientConnection]:
    proto = p.ClientConnection()

    def event() -> Any:
        while True:
            ev = proto.next_event()
            if ev is NEED_DATA:
                proto.receive_data(ch.read(65536, timeout=timeout))
                continue
            return ev

    def send(ev: p.Event) -> None:
        ch.writev_all(proto.send_iov(ev), timeout=timeout)

    def reply_to(ev: p.Event) -> list[Any]:
        send(ev)
        out = []
        while True:
            r = event()
            out.append(r)
            if proto.pending_option is None:
                return out

    greeting = event()
    if not isinstance(greeting, p.Greeting):
        raise p.RemoteProtocolError(f"expected a greeting, got {greeting!r}")
    send(p.ClientFlags(greeting.flags & (p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES)))
    if tls is not None:
        last = reply_to(p.OptStartTLS())[-1]
        if not isinstance(last, p.TLSUpgrade):
            why = f"{p.name_of(p.Rep, last.error)} {last.message}".rstrip() \
                if isinstance(last, p.OptionError) else str(last)
            raise ConnectionError(f"{ch.name}: server refused STARTTLS: {why}")
        proto.take_trailing_data()
        tls_ch = TLSChannel.client(ch, tls, server_hostname)
        tls_ch.handshake()
        ch = tls_ch
        proto.tls_started()
    reply_to(p.OptStructuredReply())
    if proto.structured:
        reply_to(p.OptSetMetaContext(export, (p.BASE_ALLOCATION,)))
    replies = reply_to(p.OptGo(export, (p.Info.BLOCK_SIZE,)))
    last = replies[-1]
    if isinstance(last, p.OptionError):
        name = p.name_of(p.Rep, last.error)
        raise ConnectionError(f"{ch.name}: server refused export {export!r}: {name} {last.message}".rstrip())
    return ch, proto


# ---------------------------------------------------------------------------------------------
# The client


class Client:
    """A connection (or several, with multi-conn) to one NBD export.

    Every request method may be called from greenlets in any thread at once; each parks only its
    caller until its own reply is in. The reply readers run in ``contexts`` (default: the
    connecting thread's context, which must keep running its hub: a thread whose main greenlet
    waits on a future or a channel does).

    Raises ``NBDError`` (an OSError with the server's errno) for a failed request,
    ``ConnectionError`` when the connection is down, ``TimeoutError`` from ``timeout``.
    """

    def __init__(self, uri: str, *, connections: int = 1,
                 contexts: qioc_green.Context | Sequence[qioc_green.Context] | None = None,
                 tls_context: ssl.SSLContext | None = None, timeout: float | None = 30.0) -> None:
        self.uri = parse_uri(uri)
        self.timeout = timeout
        if contexts is None:
            ctxs = [qioc_green.current_context()]
        elif isinstance(contexts, qioc_green.Context):
            ctxs = [contexts]
        else:
            ctxs = list(contexts)
        tls = None
        if self.uri.tls:
            tls = tls_context or ssl.create_default_context()
        self._conns: list[_Connection] = []
        self._rr = itertools.count()
        try:
            first = self._connect(0, tls)
            self.size = first.proto.export_size
            self.flags = first.proto.transmission_flags
            bs = first.proto.block_size
            self.block_size = bs or p.BlockSize(1, 4096, p.MAX_PAYLOAD)
            self.structured = first.proto.structured
            self.can_block_status = bool(first.proto.meta_contexts)
            if connections > 1 and self.can_multi_conn:
                for i in range(1, connections):
                    self._connect(i, tls)
            for i, conn in enumerate(self._conns):
                conn.start_reader(ctxs[i % len(ctxs)])
        except BaseException:
            for conn in self._conns:
                conn.ch.close()
            raise
        self.max_request = min(self.block_size.maximum, p.MAX_PAYLOAD)

    def _connect(self, i: int, tls: ssl.SSLContext | None) -> _Connection:
        ch: Channel = SocketChannel.connect(self.uri.address, timeout=self.timeout,
                                            name=f"nbd-client-{i}", follow=True)
        try:
            ch, proto = _negotiate(ch, self.uri.export, tls, self.uri.host or None, self.timeout)
        except BaseException:
            ch.close()
            raise
        conn = _Connection(ch, proto)
        self._conns.append(conn)
        return conn

    # -- facts ---------------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def requests_sent(self) -> list[int]:
        """Requests written on each connection so far."""
        return [conn.sent for conn in self._conns]

    def _flag(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(p.TransmissionFlag.CAN_MULTI_CONN)

    @property
    def read_only(self) -> bool:
        return self._flag(p.TransmissionFlag.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._flag(p.TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._flag(p.TransmissionFlag.SEND_FUA)

    @property
    def can_zero(self) -> bool:
        return self._flag(p.TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_trim(self) -> bool:
        return self._flag(p.TransmissionFlag.SEND_TRIM)

    # -- requests ------------------------------------------------------------------------------
    def _conn(self) -> _Connection:
        conns = self._conns
        return conns[next(self._rr) % len(conns)] if len(conns) > 1 else conns[0]

    def _wait(self, pend: _Pending) -> _Pending:
        return pend.future.result(self.timeout)

    def _spans(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        return [(pos, min(limit, length - pos)) for pos in range(0, length, limit)] or [(0, 0)]

    def pread_into(self, buf: Any, offset: int) -> None:
        """Fill ``buf`` from the export at ``offset``. Parks the caller until the data is in."""
        view = memoryview(buf).cast("B")
        pends = [self._conn().submit(p.Cmd.READ, offset + pos, n, 0, None, view[pos:pos + n])
                 for pos, n in self._spans(0, len(view), self.max_request)]
        for pend in pends:
            self._wait(pend)

    def pread(self, length: int, offset: int) -> bytearray:
        """``length`` bytes at ``offset``. Parks the caller."""
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return buf

    def pwrite(self, data: Any, offset: int, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (``fua``: durable before the reply). Parks the caller."""
        view = memoryview(data).cast("B")
        flags = p.CmdFlag.FUA if fua else 0
        pends = [self._conn().submit(p.Cmd.WRITE, offset + pos, n, flags, view[pos:pos + n])
                 for pos, n in self._spans(0, len(view), self.max_request)]
        for pend in pends:
            self._wait(pend)

    def flush(self) -> None:
        """Make every write already answered durable (on every connection, with multi-conn)."""
        self._wait(self._conn().submit(p.Cmd.FLUSH, 0, 0))

    def trim(self, length: int, offset: int, *, fua: bool = False) -> None:
        flags = p.CmdFlag.FUA if fua else 0
        pends = [self._conn().submit(p.Cmd.TRIM, offset + pos, n, flags)
                 for pos, n in self._spans(0, length, 1 << 30)]
        for pend in pends:
            self._wait(pend)

    def zero(self, length: int, offset: int, *, fua: bool = False, no_hole: bool = False,
             fast: bool = False) -> None:
        """Write zeroes (a hole where the server can, unless ``no_hole``)."""
        flags = (p.CmdFlag.FUA if fua else 0) | (p.CmdFlag.NO_HOLE if no_hole else 0) \
            | (p.CmdFlag.FAST_ZERO if fast else 0)
        pends = [self._conn().submit(p.Cmd.WRITE_ZEROES, offset + pos, n, flags)
                 for pos, n in self._spans(0, length, 1 << 30)]
        for pend in pends:
            self._wait(pend)

    def block_status(self, length: int, offset: int) -> list[p.Extent]:
        """base:allocation extents from ``offset`` (they may cover less than ``length``; the
        last one is clipped to it). Without the context, one data extent."""
        length = min(length, self.size - offset, 0xFFFFFFFF)
        if not self.can_block_status:
            return [p.Extent(length, 0)]
        pend = self._wait(self._conn().submit(p.Cmd.BLOCK_STATUS, offset, length))
        out: list[p.Extent] = []
        covered = 0
        for ext in pend.extents:
            n = min(ext.length, length - covered)
            if n <= 0:
                break
            out.append(p.Extent(n, ext.flags))
            covered += n
        return out

    def map(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, int]]:
        """``(offset, length, flags)`` for the whole range, merged like ``nbdinfo --map``."""
        end = self.size if length is None else min(self.size, offset + length)
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            exts = self.block_status(min(end - pos, 1 << 31), pos)
            if not exts:
                raise p.RemoteProtocolError(f"no extents at {pos}")
            for ext in exts:
                if out and out[-1][2] == ext.flags and out[-1][0] + out[-1][1] == pos:
                    o, n, f = out[-1]
                    out[-1] = (o, n + ext.length, f)
                else:
                    out.append((pos, ext.length, ext.flags))
                pos += ext.length
        return out

    # -- ending ----------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (DISC), join the readers, close the channels. Parks."""
        for conn in self._conns:
            conn.close(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


