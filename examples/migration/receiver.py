"""The glue between qioc_green channels and the sans-IO parser: a migration stream receiver.

``examples/migration_receiver.py`` is the program; this module is its engine, kept thin: it
moves bytes from a channel into :class:`~migration.stream.StreamParser` and hands the events to
the sinks (raw copy, rebuilt RAM files, summary, forwarding).

How the bytes flow
------------------
One greenlet, in an IOThread, reads in blocking style: ``channel.readinto(buffer)`` parks it on
its own hub until data arrives (the channels follow the calling greenlet's context). Each chunk
is, in this order: written to the ``--save`` file (raw, so everything received is on disk before
it is judged), fed to the parser as a memoryview, drained of events with ``next_event()`` until
``NEED_DATA`` (page events view the chunk, so RAM pages go from the receive buffer straight to
``os.pwritev`` at their guest offset; zero pages are left as holes), and only then reused (the
parser keeps no reference to a chunk once it has said NEED_DATA).

Forwarding adds a second greenlet in a second IOThread that writes to the destination. The two
share a fixed pool of receive buffers (``buffers`` x ``chunk`` bytes) through two one-consumer
queues that cross threads: the reader takes a free buffer, fills it, parses it and passes it to
the writer; the writer sends it and gives it back. When the destination is slow the pool runs
dry, the reader stops reading, the kernel's socket buffers fill and the source is held back by
TCP itself: back-pressure, with memory bounded by the pool (plus the parser's own caps). No byte
is copied on the way through; the chunk the parser checked is the chunk that is sent, and a chunk
that fails to parse is never forwarded (the destination's connection is dropped instead, so it
fails rather than loading a stream we refused).

Speed, measured (``bench/migration.py``: a 1 GiB random-RAM VM, 2 shared cores, CPython 3.11)
-------------------------------------------------------------------------------------------
Receiving while parsing keeps up with QEMU's sender (~2 GB/s; 1.02x a plain blocking
``recv_into`` loop, medians of 5 interleaved rounds), thanks to the kernel's low-water mark
(see ``_set_rcvlowat``): 0.14 s of CPU per GiB against the plain loop's 0.25 s.

Forwarding runs at the speed of a C relay: 1.66 GB/s, 1.05x of ``socat -b 1M`` relaying the same
migration in the same run (medians of 5 rounds, 1 GiB), and 0.61x of a direct migration into the
same destination (socat: 0.58x). On two cores, three processes share the CPU and the relay adds a
loopback hop, i.e. two more kernel copies of every byte; the relay itself spends 0.4 s of CPU per
GiB. Tried without a clear change: buffers of 256 KiB to 4 MiB (256 KiB costs more CPU), 8 to 64
of them, reader and writer in one IOThread or pinned, and ``splice``/``tee`` through pipes
(0.33-0.65 s of CPU per GiB: loopback TCP copies anyway).

Errors are reported as one line that names the stream offset: the parser's own
(``offset 1234: expected section footer ...``), or the channel's translated into the same shape
(``offset 5000: connection broken: ...``). Whatever was saved up to then is flushed and kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from qioc_green import (
    BrokenChannelError,
    Channel,
    ChannelClosedError,
    ChannelError,
    CommandChannel,
    Context,
    FileChannel,
    Future,
    Shutdown,
    SocketChannel,
)

from .stream import (
    NEED_DATA,
    MigrationStreamError,
    RamBlocks,
    RamPages,
    SectionHeader,
    StreamParser,
    ZeroPages,
)
from .summary import Summary

__all__ = [
    "Endpoint",
    "Forwarder",
    "Incoming",
    "Outcome",
    "RamDir",
    "ReceiveError",
    "Receiver",
    "open_outgoing",
    "parse_uri",
]

CHUNK = 4 << 20  # receive buffer size: the parser runs at ~20-24 GB/s on 1-4 MiB chunks
BUFFERS = 8  # buffers shared with the forwarding writer: the memory bound of a relay
LOWAT_WAIT = 0.05  # s; see _set_rcvlowat()


class ReceiveError(Exception):
    """A migration did not complete; the message is the one-line report (with the offset)."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset


# -- URIs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A URI in QEMU's ``-incoming`` / ``migrate`` spelling, parsed."""

    kind: str  # tcp, unix, fd, exec, file
    address: str = ""  # tcp/unix/fd: the socket address in qioc_green's spelling
    path: str = ""  # unix, file
    command: str = ""  # exec
    fd: int = -1  # fd
    offset: int = 0  # file

    def __str__(self) -> str:
        if self.kind == "exec":
            return f"exec:{self.command}"
        if self.kind == "file":
            return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")
        return self.address


def parse_uri(uri: str) -> Endpoint:
    """Parse ``tcp:[HOST]:PORT``, ``unix:PATH``, ``fd:N``, ``exec:CMDLINE``, ``file:PATH[,offset=N]``.

    Raises ValueError with a message fit for the user.
    """
    kind, sep, rest = uri.partition(":")
    if not sep:
        raise ValueError(f"{uri!r}: expected tcp:[HOST]:PORT, unix:PATH, fd:N, exec:CMDLINE "
                         "or file:PATH[,offset=N]")
    if kind == "tcp":
        from qioc_green.address import parse_address

        sa = parse_address(uri)  # validates host and port
        return Endpoint("tcp", address=str(sa))
    if kind == "unix":
        if not rest:
            raise ValueError(f"{uri!r}: empty path")
        if len(rest.encode()) > 107:
            raise ValueError(f"{uri!r}: a UNIX socket path must be under 108 bytes")
        return Endpoint("unix", address=uri, path=rest)
    if kind == "fd":
        try:
            fd = int(rest)
        except ValueError:
            raise ValueError(f"{uri!r}: fd must be a number") from None
        if fd < 0:
            raise ValueError(f"{uri!r}: fd must not be negative")
        return Endpoint("fd", address=uri, fd=fd)
    if kind == "exec":
        if not rest.strip():
            raise ValueError(f"{uri!r}: empty command line")
        return Endpoint("exec", command=rest)
    if kind == "file":
        path, _, opts = rest.partition(",")
        offset = 0
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key != "offset":
                raise ValueError(f"{uri!r}: unknown option {key!r} (only offset=N)")
            try:
                offset = int(value, 0)
            except ValueError:
                raise ValueError(f"{uri!r}: offset {value!r} is not a number") from None
            if offset < 0:
                raise ValueError(f"{uri!r}: offset must not be negative")
        if not path:
            raise ValueError(f"{uri!r}: empty path")
        return Endpoint("file", path=path, offset=offset)
    raise ValueError(f"{uri!r}: unknown kind {kind!r} (tcp, unix, fd, exec, file)")


class Incoming:
    """Where migrations come from: a listener (tcp, unix, a listening fd) or a single stream.

    ``open()`` never parks (it binds and listens); ``next_channel()`` may park (accept). Every
    channel it gives out follows the calling greenlet's context. ``close()`` from any thread
    wakes a greenlet parked in ``next_channel()`` with ChannelClosedError.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.listener: SocketChannel | None = None
        self._used = False

    @property
    def listening(self) -> str | None:
        """The address actually listened on (``tcp:127.0.0.1:40219``), or None."""
        if self.listener is None:
            return None
        return self.listener.local_address

    @property
    def can_repeat(self) -> bool:
        return self.listener is not None

    def open(self) -> None:
        ep = self.endpoint
        if ep.kind in ("tcp", "unix"):
            self.listener = SocketChannel.listen(ep.address, 1, name=f"incoming-{ep}")
        elif ep.kind == "fd" and _is_listening_socket(ep.fd):
            self.listener = SocketChannel.listen(ep.address, name=f"incoming-{ep}")
        if self.listener is not None:
            self.listener.set_follow_coroutine_ctx(True)

    def next_channel(self, *, timeout: float | None = None) -> Channel:
        """The next incoming stream. May park (accept). Raises EOFError when there is none."""
        ep = self.endpoint
        if self.listener is not None:
            ch: Channel = self.listener.accept(timeout=timeout)
            ch.set_follow_coroutine_ctx(True)
            return ch
        if self._used:
            raise EOFError(f"{ep} gives one stream only")
        self._used = True
        if ep.kind == "exec":
            ch = CommandChannel.spawn(["/bin/sh", "-c", ep.command], "r", name="exec-source")
        elif ep.kind == "file":
            ch = FileChannel.open(ep.path, os.O_RDONLY)
            if ep.offset:
                ch.seek(ep.offset)
        elif ep.kind == "fd":
            ch = _channel_from_fd(ep.fd, "fd-source")
        else:
            raise AssertionError(ep.kind)
        ch.set_follow_coroutine_ctx(True)
        return ch

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


def _is_listening_socket(fd: int) -> bool:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with s:
        try:
            return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            return False


def _channel_from_fd(fd: int, name: str) -> Channel:
    """A socket fd becomes a SocketChannel, anything else (pipe, file) a FileChannel."""
    import stat

    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        return SocketChannel.from_socket(socket.socket(fileno=fd), name=name)
    return FileChannel.from_fd(fd, name=name)


def open_outgoing(endpoint: Endpoint, *, timeout: float | None = 30.0) -> Channel:
    """Connect to a forwarding destination: tcp, unix, fd, exec (its stdin) or file. May park."""
    ep = endpoint
    if ep.kind in ("tcp", "unix"):
        ch: Channel = SocketChannel.connect(ep.address, timeout=timeout, name=f"forward-{ep}",
                                            follow=True)
    elif ep.kind == "fd":
        ch = _channel_from_fd(ep.fd, f"forward-{ep}")
    elif ep.kind == "exec":
        ch = CommandChannel.spawn(["/bin/sh", "-c", ep.command], "w", name="forward-exec")
    elif ep.kind == "file":
        ch = FileChannel.open(ep.path, os.O_WRONLY | os.O_CREAT, name=f"forward-{ep}")
        ch.seek(ep.offset)
    else:
        raise AssertionError(ep.kind)
    ch.set_follow_coroutine_ctx(True)
    return ch


# -- RAM blocks as files ------------------------------------------------------------------------


class RamDir:
    """Each RAM block rebuilt as a sparse file in ``path`` (zero pages stay holes).

    Files are named after the block (``pc.ram``; characters outside ``[A-Za-z0-9._@-]`` become
    ``_``, so ``/rom@etc/acpi/tables`` is ``rom@etc_acpi_tables``); ``blocks.json`` maps block
    names to files and sizes. A page sent again (dirtied during a live migration) is written
    again; a zero page over a range that already holds data is written as zeros (the kernel's
    SEEK_DATA says whether it does, so no per-page state is kept, whatever sizes the stream
    announces), so each file ends as the guest's final RAM. Writes never park (regular files).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self._files: dict[str, FileChannel] = {}
        self._index: dict[str, dict[str, Any]] = {}

    def blocks(self, ev: RamBlocks) -> None:
        """MEM_SIZE: create (truncate) one sparse file per block, and the index."""
        import json

        taken = {v["file"] for v in self._index.values()}
        for b in ev.blocks:
            if b.name in self._files:
                continue
            fname = re.sub(r"[^A-Za-z0-9._@-]", "_", b.name).strip("_.") or "block"
            while fname in taken or fname == "blocks.json":
                fname += "_"
            taken.add(fname)
            ch = FileChannel.open(os.path.join(self.path, fname), "w+", name=f"ram-{b.name}")
            self._files[b.name] = ch
            self._index[b.name] = {"file": fname, "size": b.size}
            try:
                os.ftruncate(ch.fileno(), b.size)
            except OSError as exc:
                raise OSError(exc.errno, f"RAM block {b.name!r} of {b.size} bytes: "
                                         f"{exc.strerror}") from None
        with open(os.path.join(self.path, "blocks.json"), "w") as f:
            json.dump(self._index, f, indent=1)

    def pages(self, ev: RamPages) -> None:
        n = self._files[ev.block].pwritev(ev.iov(), ev.offset)
        if n != ev.count * ev.page_size:
            raise OSError(f"short write to {self._index[ev.block]['file']}: {n} bytes")

    def zeros(self, ev: ZeroPages) -> None:
        ch = self._files[ev.block]
        start, size = ev.offset, ev.count * ev.page_size
        if ev.fill == 0:
            try:
                data_at = os.lseek(ch.fileno(), start, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data from there to the end
                    raise
                return
            if data_at >= start + size:
                return  # a hole already
        fill = bytes([ev.fill]) * min(size, 1 << 20)
        for off in range(0, size, len(fill)):
            ch.pwritev([fill[: size - off]], start + off)

    def close(self) -> None:
        for ch in self._files.values():
            ch.close()


# -- forwarding ---------------------------------------------------------------------------------


class _Handoff:
    """A queue between two threads with one consumer, whose ``get()`` parks that greenlet.

    ``put()`` never blocks (the pool of buffers bounds what can be in flight); ``fail(exc)``
    makes the consumer's pending and future ``get()`` raise ``exc``. The consumer parks on a
    qioc_green Future, which wakes it in its own thread whichever thread completes it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[Any] = deque()
        self._waiter: Future[Any] | None = None
        self._error: BaseException | None = None

    def put(self, item: Any) -> None:
        with self._lock:
            waiter, self._waiter = self._waiter, None
            if waiter is None:
                self._items.append(item)
                return
        waiter.set_result(item)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set_exception(exc)

    def get(self) -> Any:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._items:
                return self._items.popleft()
            fut: Future[Any] = Future()
            self._waiter = fut
        return fut.result()


class _Abort(Exception):
    """Tells the writer the stream was refused: drop the destination, send nothing more."""


class Forwarder:
    """A writer greenlet in another context, fed from a fixed pool of receive buffers.

    ``acquire()`` (reader side) parks until a buffer is free; ``submit(buf, n)`` passes its
    first ``n`` bytes to the writer; ``finish()`` says the stream ended (the writer then closes
    the destination, which sees EOF) and waits for the writer; ``abort(reason)`` drops the
    destination without sending what is queued. A writer failure surfaces in the reader's next
    ``acquire()`` as BrokenChannelError. ``high_water`` is the most buffers ever in flight.
    """

    def __init__(self, endpoint: Endpoint, context: Context, *, chunk: int = CHUNK,
                 buffers: int = BUFFERS, digest: bool = False,
                 connect_timeout: float | None = 30.0) -> None:
        if buffers < 2:
            raise ValueError("forwarding needs at least 2 buffers")
        self.endpoint = endpoint
        self._free = _Handoff()
        self._full = _Handoff()
        for _ in range(buffers):
            self._free.put(bytearray(chunk))
        self.buffers = buffers
        self._submitted = 0
        self._returned = 0
        self.high_water = 0
        self.bytes_out = 0
        self._sha = hashlib.sha256() if digest else None
        self._connect_timeout = connect_timeout
        self._channel: Channel | None = None
        self._done: Future[None] = context.spawn(self._run)

    @property
    def sha256(self) -> str | None:
        return self._sha.hexdigest() if self._sha is not None else None

    def acquire(self) -> bytearray:
        """A free buffer; parks while all are queued or being sent. Reader side."""
        buf = self._free.get()
        return buf

    def submit(self, buf: bytearray, n: int) -> None:
        """Queue ``buf[:n]`` for the destination. Never parks."""
        # each counter has one writer thread, so the difference is a safe (if stale) count
        self._submitted += 1
        in_flight = self._submitted - self._returned
        self.high_water = max(self.high_water, in_flight)
        self._full.put((buf, n))

    def release(self, buf: bytearray) -> None:
        """Give back a buffer that carries nothing to send (EOF read into it)."""
        self._free.put(buf)

    def finish(self, timeout: float | None = None) -> None:
        """The stream ended well: wait until the writer has sent everything and closed."""
        self._full.put(None)
        self._done.result(timeout)

    def abort(self, timeout: float | None = 10.0) -> None:
        """Drop the destination now (it must not load a stream we refused). Never raises."""
        self._full.fail(_Abort())
        ch = self._channel
        if ch is not None:
            ch.close()  # wakes the writer if it is parked on the destination
        # the stream error is the one to report; the writer's own end does not matter now
        with contextlib.suppress(BaseException):
            self._done.result(timeout)

    def _run(self) -> None:
        """The writer greenlet. Any failure reaches the reader as one BrokenChannelError,
        through ``acquire()`` or ``finish()``, whichever it calls next."""
        try:
            self._write()
        except _Abort:
            pass
        except Exception as exc:
            err = BrokenChannelError(f"forward to {self.endpoint}: {exc}")
            self._free.fail(err)
            raise err from exc
        except BaseException as exc:  # stopped (GreenletExit...): tell the reader, go on
            self._free.fail(BrokenChannelError(f"forward to {self.endpoint}: {exc!r}"))
            raise

    def _write(self) -> None:
        ch = open_outgoing(self.endpoint, timeout=self._connect_timeout)
        self._channel = ch
        sha = self._sha
        try:
            while True:
                item = self._full.get()  # raises _Abort when the stream was refused
                if item is None:
                    break
                buf, n = item
                view = memoryview(buf)[:n]
                ch.write_all(view)
                if sha is not None:
                    sha.update(view)
                self.bytes_out += n
                self._returned += 1
                self._free.put(buf)
            if isinstance(ch, CommandChannel):
                ch.shutdown(Shutdown.WRITE)
                ch.wait_exit(self._connect_timeout)
        finally:
            ch.close()


# -- the receiver -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one migration came to: the summary dict, and the error line if it failed."""

    summary: dict[str, Any]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Receiver:
    """Receive one migration stream from a channel, parse it on the fly, feed the sinks.

    ``save``: path for the raw stream; ``ram_dir``: directory for the RAM blocks; ``forward``:
    a destination endpoint, written by a greenlet in ``forward_context``; ``allow_undescribed``:
    accept a stream that ends without the VM description (QEMU's ``suppress-vmdesc``, postcopy);
    ``digest``: put the sha256 of the bytes received (and forwarded) into the summary;
    ``progress``: a text stream for a progress line (a terminal); ``idle_timeout``: give up
    when no byte arrives for that long.
    """

    def __init__(self, *, save: str | None = None, ram_dir: str | None = None,
                 forward: Endpoint | None = None, forward_context: Context | None = None,
                 chunk: int = CHUNK, buffers: int = BUFFERS, allow_undescribed: bool = False,
                 digest: bool = False, progress: IO[str] | None = None,
                 idle_timeout: float | None = None,
                 parser_factory: Callable[[], StreamParser] = StreamParser) -> None:
        if forward is not None and forward_context is None:
            raise ValueError("forwarding needs a context for its writer")
        self.save = save
        self.ram_dir = ram_dir
        self.forward = forward
        self.forward_context = forward_context
        self.chunk = chunk
        self.buffers = buffers
        self.allow_undescribed = allow_undescribed
        self.digest = digest
        self.progress = progress
        self.idle_timeout = idle_timeout
        self.parser_factory = parser_factory
        self.received = 0
        self.section = ""
        self._progress_shown = False

    def receive(self, channel: Channel) -> Outcome:
        """Read ``channel`` to its end, parse, save, forward; close it. May park.

        Never raises for a bad stream, a broken peer or destination: the Outcome carries the
        error line. (ChannelClosedError and ContextStoppedError, meaning we were told to stop,
        are reported the same way.)
        """
        parser = self.parser_factory()
        summary = Summary()
        save: FileChannel | None = None
        ram: RamDir | None = None
        fwd: Forwarder | None = None
        sha = hashlib.sha256() if self.digest else None
        error: str | None = None
        finished = False
        t0 = time.monotonic()
        cpu0 = time.process_time()
        try:
            if self.save is not None:
                save = FileChannel.open(self.save, "w", name="save")
            if self.ram_dir is not None:
                ram = RamDir(self.ram_dir)
            if self.forward is not None:
                assert self.forward_context is not None
                fwd = Forwarder(self.forward, self.forward_context, chunk=self.chunk,
                                buffers=self.buffers, digest=self.digest)
            last = self._pump(channel, parser, summary, save, ram, fwd, sha)
            if not summary.complete:  # pragma: no cover - close() raises first
                raise ReceiveError(self.received, "stream incomplete")
            if not summary.described and not self.allow_undescribed:
                summary.complete = False
                raise ReceiveError(self.received, "expected the VM description (0x06) after "
                                   "EOF, the stream ended (--allow-undescribed accepts that)")
            if fwd is not None:
                if last is not None:
                    fwd.submit(*last)
                fwd.finish()
                finished = True
        except MigrationStreamError as exc:
            error = str(exc)
        except ReceiveError as exc:
            error = str(exc)
        except (ChannelError, OSError, TimeoutError) as exc:
            error = f"offset {self.received}: {_describe(exc)}"
        finally:
            if fwd is not None and not finished:
                fwd.abort()
            channel.close()
            if save is not None:
                save.close()
            if ram is not None:
                ram.close()
            if self.progress is not None and self._progress_shown:
                self.progress.write("\n")
                self.progress.flush()
        elapsed = time.monotonic() - t0
        d = summary.as_dict(elapsed_s=round(elapsed, 6), bytes_total=self.received)
        d["cpu_s"] = round(time.process_time() - cpu0, 4)  # the whole process: all threads
        if error is not None:
            d["complete"] = False
            d["error"] = error
        if sha is not None:
            d["sha256_in"] = sha.hexdigest()
        if fwd is not None:
            d["forward"] = {"uri": str(fwd.endpoint), "bytes": fwd.bytes_out,
                            "buffers_high_water": fwd.high_water,
                            "buffer_bytes": self.buffers * self.chunk}
            if fwd.sha256 is not None:
                d["sha256_out"] = fwd.sha256
        return Outcome(d, error)

    def _pump(self, ch: Channel, parser: StreamParser, summary: Summary,
              save: FileChannel | None, ram: RamDir | None, fwd: Forwarder | None,
              sha: Any) -> tuple[bytearray, int] | None:
        """The hot loop: read a chunk, save it, parse it, apply its events, pass it on.

        Returns the last chunk, not yet forwarded (None when not forwarding).
        """
        own = memoryview(bytearray(self.chunk)) if fwd is None else None
        add = summary.add
        feed = parser.feed
        next_event = parser.next_event
        idle = self.idle_timeout
        wait = idle
        if _set_rcvlowat(ch, self.chunk // 4):
            wait = LOWAT_WAIT if idle is None else min(idle, LOWAT_WAIT)
        progress = self.progress
        next_progress = time.monotonic() + 0.5 if progress is not None else float("inf")
        t0 = last = time.monotonic()
        pending: tuple[bytearray, int] | None = None
        while True:
            if fwd is not None:
                buf = fwd.acquire()
                view = memoryview(buf)
            else:
                assert own is not None
                buf = None
                view = own
            try:
                n = ch.readinto(view, timeout=wait)
            except BrokenChannelError as exc:  # the sender vanished: say what it was sending
                raise ReceiveError(self.received,
                                   f"{_describe(exc)}; {_what_was_cut(parser)}") from exc
            except TimeoutError:
                # With a low-water mark, a quiet sender may leave fewer bytes than the mark
                # waiting: the retry's read takes them (it tries before it parks).
                if idle is not None and time.monotonic() - last >= idle:
                    raise ReceiveError(self.received, f"no data for {idle} s") from None
                if fwd is not None:
                    assert buf is not None
                    fwd.release(buf)
                continue
            if wait is not None:
                last = time.monotonic()
            if n == 0:
                if buf is not None and fwd is not None:
                    fwd.release(buf)
                break
            data = view[:n]
            if save is not None:
                save.write_all(data)
            if sha is not None:
                sha.update(data)
            feed(data)
            try:
                while (ev := next_event()) is not NEED_DATA:
                    tev = type(ev)
                    if tev is RamPages:
                        if ram is not None:
                            ram.pages(ev)  # type: ignore[arg-type]
                    elif tev is ZeroPages:
                        if ram is not None:
                            ram.zeros(ev)  # type: ignore[arg-type]
                    elif isinstance(ev, SectionHeader):
                        self.section = ev.idstr
                    elif tev is RamBlocks and ram is not None:
                        ram.blocks(ev)  # type: ignore[arg-type]
                    add(ev)
            finally:
                self.received += n
            if fwd is not None:
                # Pass on the chunk before this one: it is held back until the next one has
                # parsed (or the stream has ended and been judged), so a stream we refuse at
                # its very end never reaches the destination whole.
                if pending is not None:
                    fwd.submit(*pending)
                pending = (buf, n)  # type: ignore[assignment]
            if progress is not None:
                now = time.monotonic()
                if now >= next_progress:
                    next_progress = now + 0.5
                    rate = self.received / max(now - t0, 1e-9) / 1e6
                    progress.write(f"\r{self.received / 1e6:10.1f} MB  {rate:8.1f} MB/s  "
                                   f"section {self.section[:32]:<32}")
                    progress.flush()
                    self._progress_shown = True
        parser.close()  # raises MigrationStreamError when the stream is cut short
        while (ev := next_event()) is not NEED_DATA:
            add(ev)
        return pending


def _set_rcvlowat(ch: Channel, lowat: int) -> bool:
    """Ask the kernel to wake our reader only once ``lowat`` bytes are queued (TCP only).

    A live migration arrives at ~2 GB/s; woken at every segment, the reader would make
    thousands of small reads, each a park and a resume on the hub, and use about twice the CPU
    of a plain blocking ``recv_into`` loop (measured here: 0.36-0.48 s against 0.19-0.29 s
    per GiB). Woken at 1 MiB it reads in big chunks, which the parser also prefers, and costs
    about what the plain loop does (0.16-0.26 s). The kernel still wakes us at EOF or an error;
    a non-blocking read returns whatever is queued, however little; and a sender that goes
    quiet with fewer bytes queued than the mark is caught by a short timeout on the wait
    (LOWAT_WAIT), after which the read takes what is there.
    """
    if not isinstance(ch, SocketChannel) or ch.socket.family not in (socket.AF_INET,
                                                                       socket.AF_INET6):
        return False
    try:
        ch.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
    except OSError:
        return False
    return True


def _what_was_cut(parser: StreamParser) -> str:
    """What the parser was in the middle of, as an end of input would report it."""
    try:
        parser.close()
    except MigrationStreamError as exc:
        return str(exc).partition(": ")[2]
    return "the stream had ended"


def _describe(exc: BaseException) -> str:
    """A channel or OS error as a short fragment for the one-line report."""
    from qioc_green import ContextStoppedError, UnexpectedEOF

    if isinstance(exc, ContextStoppedError):
        return "stopped"
    if isinstance(exc, ChannelClosedError):
        return "stopped (channel closed)"
    if isinstance(exc, UnexpectedEOF):
        return f"peer closed early: {exc}"
    if isinstance(exc, BrokenChannelError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def numbered(path: str, n: int) -> str:
    """``path`` for the n-th migration of a ``--keep-listening`` run.

    A ``{n}`` in the path is replaced; otherwise ``-N`` goes before the extension
    (``out.mig`` -> ``out-2.mig``, ``ramdir`` -> ``ramdir-2``).
    """
    if "{n}" in path:
        return path.replace("{n}", str(n))
    head, tail = os.path.split(path)
    stem, dot, ext = tail.partition(".") if not tail.startswith(".") else (tail, "", "")
    return os.path.join(head, f"{stem}-{n}{dot}{ext}")


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
