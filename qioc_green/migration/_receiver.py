"""The glue between qioc_green channels and the sans-IO parser: a migration stream receiver.

``cli`` (the ``qioc-migration-receiver`` command) is the program; this module is its engine,
kept thin: it moves bytes from a channel into :class:`~._parser.StreamParser` and hands the
events to the sinks (raw copy, rebuilt RAM files, summary, forwarding: ``_sinks``).

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
queues that cross threads (``qioc_green.Queue``): the reader takes a free buffer, fills it, parses it and passes it to
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
(see ``set_rcvlowat``): 0.14 s of CPU per GiB against the plain loop's 0.25 s.

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

import hashlib
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import gevent

from qioc_green import (
    BrokenChannelError,
    Channel,
    ChannelClosedError,
    ChannelError,
    CommandChannel,
    Context,
    ContextStoppedError,
    FileChannel,
    SocketChannel,
    UnexpectedEOF,
    current_context,
)

from ._children import EXIT_WAIT, end_command, failure
from ._destination import EVENTS, Destination
from ._events import Event, RamBlocks, RamPages, SectionHeader, ZeroPages
from ._format import NEED_DATA, MigrationStreamError
from ._parser import StreamParser
from ._sinks import BUFFERS, CHUNK, Forwarder, RamDir
from ._summary import Summary
from ._tls import early_close
from ._uri import Endpoint

LOWAT_WAIT = 0.05  # s; see set_rcvlowat()


class _Stop(Exception):
    """Thrown into the receiving greenlet by :meth:`Receiver.stop`; the message is the reason."""


class ReceiveError(Exception):
    """A migration did not complete; the message is the one-line report (with the offset)."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset


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
    when no byte arrives for that long (or a forward destination takes none). ``deadline``:
    give up when the migration has not ended that many seconds after it began; ``min_rate``:
    give up when fewer than ``min_rate`` bytes a second arrived over the last ``rate_window``
    seconds (a sender trickling a byte now and then is never idle). ``label``: how error
    lines name the source
    (``exec:CMD``; default: the channel's name).

    An ``exec:`` source (a CommandChannel) is waited for once its output ends and must exit
    with status 0, or the migration fails naming it; on any other end (an error, a timeout,
    a stop) it is ended with its descendants: SIGTERM, 2 s, SIGKILL, reaped (``_children``).

    ``stop(reason)``, from any thread, ends the migration being received (or the next one) at
    once: it is reported as failed with ``reason`` and cleaned up as any failure is.

    ``destination``: the return path of this migration (``_destination``): answered, or
    relayed from the forwarding destination.

    A multifd main channel gives ``prefix`` (read already: its first chunk), ``ram`` (shared,
    left open), ``on_event`` (non-page events; may park: :meth:`pass_on_parsed`), ``low_water``.
    """

    def __init__(self, *, save: str | None = None, ram_dir: str | None = None,
                 forward: Endpoint | None = None, forward_context: Context | None = None,
                 chunk: int = CHUNK, buffers: int = BUFFERS, allow_undescribed: bool = False,
                 digest: bool = False, progress: IO[str] | None = None,
                 idle_timeout: float | None = None, deadline: float | None = None,
                 min_rate: float | None = None, rate_window: float = 10.0,
                 label: str | None = None,
                 parser_factory: Callable[[], StreamParser] = StreamParser,
                 destination: Destination | None = None,
                 prefix: bytes = b"", ram: RamDir | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 low_water: bool = True) -> None:
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
        self.deadline = deadline
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.label = label
        self._t0 = 0.0
        self._window_end = self._next_check = float("inf")
        self._window_bytes = 0
        self.parser_factory = parser_factory
        self.destination = destination
        self.prefix = prefix
        self.ram = ram
        self.on_event = on_event
        self.low_water = low_water
        self.parser: StreamParser | None = None
        self.summary = Summary()  # of the migration being received: read by the QMP monitor
        self.received = 0
        self._eof = False  # the source's output ended (a read gave 0)
        self._stop_reason: str | None = None
        self._ctx: Context | None = None  # where receive() runs, while it does
        self._glet: Any = None
        self.section = ""
        self._progress_shown = False
        # forwarding: the chunk being parsed, how much of it is passed on, the one held back
        self._fwd: Forwarder | None = None
        self._chunk: tuple[bytearray, int] | None = None
        self._chunk_base = 0
        self._chunk_sent = 0
        self._pending: tuple[bytearray, int, int] | None = None

    def receive(self, channel: Channel) -> Outcome:
        """Read ``channel`` to its end, parse, save, forward; close it. May park.

        Never raises for a bad stream, a broken peer or destination: the Outcome carries the
        error line. (ChannelClosedError and ContextStoppedError, meaning we were told to stop,
        are reported the same way.)
        """
        parser = self.parser = self.parser_factory()
        summary = self.summary = Summary()
        dest = self.destination
        save: FileChannel | None = None
        ram: RamDir | None = self.ram
        fwd: Forwarder | None = None
        sha = hashlib.sha256() if self.digest else None
        error: str | None = None
        finished = False
        t0 = self._t0 = time.monotonic()
        cpu0 = time.process_time()
        if self.min_rate is not None:
            self._window_end = t0 + self.rate_window
        self._next_check = min(self._window_end,
                               t0 + self.deadline if self.deadline is not None else float("inf"))
        self._ctx = current_context()
        self._glet = gevent.getcurrent()
        try:
            if self._stop_reason is not None:
                raise _Stop(self._stop_reason)
            if dest is not None:
                dest.start(channel)
            source = _identity(channel)
            if self.save is not None:
                save = _open_save(self.save, source)
            if self.ram_dir is not None and ram is None:
                ram = RamDir(self.ram_dir, keep=source)
            if self.forward is not None:
                assert self.forward_context is not None
                fwd = self._fwd = Forwarder(self.forward, self.forward_context, chunk=self.chunk,
                                buffers=self.buffers, digest=self.digest,
                                idle_timeout=self.idle_timeout,
                                connect=dest.connect_forward if dest is not None else None)
            last = self._pump(channel, parser, summary, save, ram, fwd, sha)
            if not summary.complete:  # pragma: no cover - close() raises first
                raise ReceiveError(self.received, "stream incomplete")
            if not summary.described and not (self.allow_undescribed
                                              or (dest is not None and dest.postcopy)):
                summary.complete = False
                raise ReceiveError(self.received, "expected the VM description (0x06) after "
                                   "EOF, the stream ended (--allow-undescribed accepts that)")
            if fwd is not None:
                if last is not None:
                    fwd.submit(*last)
                try:
                    fwd.finish(self._left())
                except TimeoutError:
                    raise ReceiveError(self.received, f"not complete within the deadline of "
                                       f"{self.deadline:g} s (still forwarding)") from None
                finished = True
        except MigrationStreamError as exc:
            error = str(exc)
        except ReceiveError as exc:
            error = str(exc)
        except (ChannelError, OSError, TimeoutError) as exc:
            error = f"offset {self.received}: {describe(exc)}"
        except _Stop as exc:
            error = f"offset {self.received}: {exc}"
        finally:
            self._glet = None  # no stop is thrown into the clean-up
            if dest is not None and dest.error is not None:  # the relay failed it first
                error = f"offset {self.received}: {dest.error}"
            elif error is not None and dest is not None and dest.postcopy and not dest.done:
                at, _, what = error.partition(": ")
                error = (f"{at}: the source went away during postcopy, and postcopy recovery "
                         f"is not supported: {what}")
            if fwd is not None and not finished:
                fwd.abort()
            if isinstance(channel, CommandChannel):
                problem = self._end_command(channel)
                if problem is not None:
                    why = error.partition(": ")[2] if error is not None else None
                    error = f"offset {self.received}: {problem}" + (f"; {why}" if why else "")
            if dest is not None:
                dest.finish(error)
            channel.close()
            if save is not None:
                save.close()
            if ram is not None and ram is not self.ram:
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
        if dest is not None:
            d["return_path"] = dest.as_dict()
        if fwd is not None:
            d["forward"] = {"uri": str(fwd.endpoint), "bytes": fwd.bytes_out,
                            "buffers_high_water": fwd.high_water,
                            "buffer_bytes": self.buffers * self.chunk}
            if fwd.sha256 is not None:
                d["sha256_out"] = fwd.sha256
        return Outcome(d, error)

    def stop(self, reason: str = "stopped") -> None:
        """End the migration being received, or the next one, now: it fails with ``reason``.
        Thread-safe; never parks (the receiving greenlet does the clean-up)."""
        self._stop_reason = reason
        ctx = self._ctx
        if ctx is not None:
            try:
                ctx.schedule(self._throw_stop)
            except ContextStoppedError:
                pass  # that thread is ending: its greenlets are being woken anyway

    @property
    def forwarder(self) -> Forwarder | None:
        """The forwarder of the migration being received (None before or without one)."""
        return self._fwd

    def pass_on_parsed(self) -> None:
        """Forward all parsed, held-back chunk too, as a hook must before parking (reader side)."""
        fwd, parser, chunk = self._fwd, self.parser, self._chunk
        if fwd is None or parser is None or chunk is None:
            return
        if self._pending is not None:
            fwd.submit(*self._pending)
            self._pending = None
        end = min(parser.offset - self._chunk_base, chunk[1])
        if end > self._chunk_sent:
            fwd.submit(chunk[0], end, start=self._chunk_sent, release=False)
            self._chunk_sent = end

    def _throw_stop(self) -> None:
        """In the receiving thread's hub: raise _Stop where the receiving greenlet is parked."""
        g = self._glet
        if g is not None and not g.dead:
            g.throw(_Stop(self._stop_reason))

    def _pump(self, ch: Channel, parser: StreamParser, summary: Summary,
              save: FileChannel | None, ram: RamDir | None, fwd: Forwarder | None,
              sha: Any) -> tuple[bytearray, int, int] | None:
        """The hot loop: read a chunk, save it, parse it, apply its events, pass it on.

        Returns what is left of the last chunk, not yet forwarded: ``(buf, end, start)`` for
        Forwarder.submit (None when not forwarding).
        """
        own = memoryview(bytearray(self.chunk)) if fwd is None else None
        add = summary.add
        feed = parser.feed
        next_event = parser.next_event
        idle = self.idle_timeout
        wait = idle
        if self.low_water and set_rcvlowat(ch, self.chunk // 4):
            wait = LOWAT_WAIT if idle is None else min(idle, LOWAT_WAIT)
        progress = self.progress
        next_progress = time.monotonic() + 0.5 if progress is not None else float("inf")
        t0 = last = time.monotonic()
        paced = self._next_check != float("inf")
        timeout = wait
        on_event = self.on_event
        carry = self.prefix
        dest = self.destination
        flush = False
        while True:
            if paced:
                timeout = self._pace(wait)
            if fwd is not None:
                try:
                    buf = fwd.acquire(timeout if paced else None)
                except TimeoutError:
                    continue  # a slow destination: the deadline still applies
                view = memoryview(buf)
            else:
                assert own is not None
                buf = None
                view = own
            try:
                if carry:  # bytes read before this loop, as its first chunk
                    n = len(carry)
                    view[:n] = carry
                    carry = b""
                else:
                    n = ch.readinto(view, timeout=timeout)
            except BrokenChannelError as exc:  # the sender vanished: say what it was sending
                if dest is None or not dest.done:
                    why = early_close(ch, self.received)
                    raise ReceiveError(self.received, why or
                                       f"{describe(exc)}; {_what_was_cut(parser)}") from exc
                n = 0  # after SHUT: a TLS source hangs up without close_notify
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
                self._eof = True
                if buf is not None and fwd is not None:
                    fwd.release(buf)
                break
            data = view[:n]
            if save is not None:
                save.write_all(data)
            if sha is not None:
                sha.update(data)
            if fwd is not None:
                self._chunk = (buf, n)  # type: ignore[assignment]
                self._chunk_base = self.received
                self._chunk_sent = 0
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
                    else:
                        if isinstance(ev, SectionHeader):
                            self.section = ev.idstr
                        elif tev is RamBlocks and ram is not None:
                            ram.blocks(ev)  # type: ignore[arg-type]
                        elif dest is not None and tev in EVENTS and dest.event(ev):
                            flush = True
                        if on_event is not None:
                            on_event(ev)
                    add(ev)
            finally:
                self.received += n
            if fwd is not None:
                # Pass on the chunk before this one: it is held back until the next one has
                # parsed (or the stream has ended and been judged), so a stream we refuse at
                # its very end never reaches the destination whole.
                if self._pending is not None:
                    fwd.submit(*self._pending)
                self._pending = (buf, n, self._chunk_sent)  # type: ignore[assignment]
                self._chunk = None
                if flush or (dest is not None and dest.postcopy):
                    # the source waits for the destination (its SHUT; in postcopy, pages its
                    # guest faults on): hold nothing back
                    fwd.submit(*self._pending)  # type: ignore[misc]
                    self._pending = None
                    flush = False
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
            if dest is not None and type(ev) in EVENTS:
                dest.event(ev)
            if on_event is not None:
                on_event(ev)
            add(ev)
        pending, self._pending = self._pending, None
        return pending


    def _left(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return max(self._t0 + self.deadline - time.monotonic(), 0.0)

    def _pace(self, wait: float | None) -> float:
        """Check the deadline and the minimum rate; the longest a read may wait now."""
        now = time.monotonic()
        if now >= self._next_check:
            if self.deadline is not None and now >= self._t0 + self.deadline:
                raise ReceiveError(self.received, f"not complete within the deadline of "
                                                  f"{self.deadline:g} s")
            if self.min_rate is not None and now >= self._window_end:
                got = self.received - self._window_bytes
                if got < self.min_rate * self.rate_window:
                    raise ReceiveError(self.received, f"{got} bytes in the last "
                                       f"{self.rate_window:g} s, below the minimum rate of "
                                       f"{self.min_rate:g} bytes/s")
                self._window_bytes = self.received
                self._window_end = now + self.rate_window
            self._next_check = min(self._window_end, self._t0 + self.deadline
                                   if self.deadline is not None else float("inf"))
        left = max(self._next_check - now, 0.001)
        return left if wait is None else min(wait, left)

    def _end_command(self, ch: CommandChannel) -> str | None:
        """The source command is done with: why it failed, or None. Parks while it exits."""
        what = f"source {self.label or ch.name!r}"
        if self._eof:  # its output ended: let it finish by itself, then judge its status
            if ch.wait_exit(EXIT_WAIT):
                return failure(ch, what)
            end_command(ch)
            return f"{what} was still running {EXIT_WAIT:g} s after its output ended"
        end_command(ch)  # we stop reading: end it, and what it started
        return None


def _identity(ch: Channel) -> tuple[int, int] | None:
    """(device, inode) of what a file channel reads, so no output can be made of it."""
    fileno = getattr(ch, "fileno", None)
    if fileno is None:
        return None
    try:
        st = os.fstat(fileno())
    except (OSError, ChannelError):
        return None
    return st.st_dev, st.st_ino


def _open_save(path: str, source: tuple[int, int] | None) -> FileChannel:
    """Open ``path`` for the raw stream; truncate it only once it is known not to be the input
    (``file:X --save X`` used to empty X before reading it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == source:
            raise ReceiveError(0, f"the save file {path} is the input itself; not touching it")
        if stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
        return FileChannel.from_fd(fd, name="save")
    except BaseException:
        os.close(fd)
        raise


def set_rcvlowat(ch: Channel, lowat: int) -> bool:
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


def describe(exc: BaseException) -> str:
    """A channel or OS error as a short fragment for the one-line report."""
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
