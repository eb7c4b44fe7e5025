"""The receiver for multifd migrations: the main channel and N multifd channels, each read by a
greenlet of its own IOThread.

How it goes (QEMU's destination does the same in ``migration/migration.c`` and ``multifd.c``)
----------------------------------------------------------------------------------------------
A multifd source opens the main channel and N multifd channels to one address at once, in no
promised order, and says nowhere how many: the receiver is told (``IncomingSettings``, from
``--multifd-channels`` or a QMP monitor). Every connection gets an IOThread (``mig-connK``, K
the accept order) whose greenlet reads its first 4 bytes and tells what it is, as
``migration_ioc_process_incoming`` does: ``QEVM`` is the main stream, read by a
:class:`~._receiver.Receiver` exactly as a plain migration is (so ``--save``, ``--json``, the
checks, forwarding and the summary are the same); the multifd magic makes it a multifd channel,
read by a :class:`~._multifd.MultifdParser`: its init packet is checked (magic, version, the
UUID against the other channels and the main stream's, the id below the count and not seen
before), then its packets' pages go to ``--ram-dir`` with positional writes (``os.pwritev``,
which releases the GIL, so channels write in parallel). Anything else ends the migration with one
line naming the connection. The main stream and the channels meet at QEMU's sync points
(``_multifd_sync``), so a page of a later round never lands before one of an earlier round.

A multifd channel's packets cannot be parsed before the main stream's configuration (the page
size fixes the packet size) and its RAM blocks (to check offsets), so a channel that is ahead
waits for them, holding its input in the kernel's socket buffer: back-pressure, not memory.

With ``--forward``, every connection gets a Forwarder of its own (its writer greenlet in an
IOThread ``mig-fwdK``) that opens one connection to the destination, so the destination sees
what a source would send it: the main channel and N multifd channels. Before a reader parks at a
sync point it passes on everything it has parsed, the main stream's held-back chunk included:
the destination syncs too, and a byte held back here could hold it (and so the whole relay)
for ever. The main stream's last chunk is still held back until the stream has been judged.

While a one-shot migration runs (``extra``), the listener stays open: a connection beyond the
N + 1 (a source with more channels than announced, a second source) is read and refused with a
line naming it, instead of being refused at connect time, as QEMU does, which leaves the source
to fail without a reason on this side. With ``--keep-listening`` the listener is left to the
next migration once all N + 1 have arrived and the main stream has met its first sync point
(QEMU stops listening once all have arrived; a source's channels all connect before its main
stream starts, so extra ones are still seen). The next source's connections that come before
that are handed over to the next migration (``handover``, ``_multifd_next``).

With TLS (``tls``), each connection's handshake comes first, in its own IOThread, and its first
bytes are read after it (``_multifd_tls``); each ``--forward`` connection speaks TLS to the
destination too (``forward_tls``), the main one's handshake done before any channel's opens.
With a return path, the migration turns ``active`` once every connection is in, as QEMU's.

Nothing waits for ever: a connection that says nothing gets ``FIRST_BYTES_TIMEOUT``; channels
that never come, a main stream that never comes, and sync points that can never be reached
(a channel or the main stream ended first) fail with one line (``channel_timeout``); the first
error closes every connection, which wakes every reader. Memory: each connection has its own
receive buffer (``chunk``), or with ``--forward`` its own pool (``buffers`` x ``chunk``).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from qioc_green import (
    Channel,
    ChannelClosedError,
    ChannelError,
    ContextStoppedError,
    Event,
    IOThread,
    Queue,
    current_context,
)

from ._destination import Destination, open_destination
from ._events import Command, Configuration, RamBlocks, RamEos, RamFlush
from ._events import Event as StreamEvent
from ._format import MigrationStreamError
from ._incoming import IncomingSettings, check_configuration
from ._multifd import MultifdChannels, sniff_channel
from ._multifd_channel import ChannelReader, Connection, Stopped
from ._multifd_events import MultifdError
from ._multifd_next import ACCEPT_TICK, Claims, Handover, Taken, tell
from ._multifd_sync import SyncFailed, SyncPoints
from ._multifd_tls import FIRST_BYTES_TIMEOUT, MAX_EXTRA, accept_connection
from ._receiver import Outcome, ReceiveError, Receiver, describe
from ._report import peak_rss
from ._sinks import BUFFERS, CHUNK, RamDir
from ._summary import Summary
from ._tls import early_close
from ._uri import Endpoint

_TICK = 0.5  # s between the coordinator's checks (idle, missing channels, progress)



class MultifdReceiver:
    """Receive one multifd migration: the main channel and ``settings.multifd_channels``
    multifd channels, each read in its own IOThread (see the module notes).

    The options are :class:`~._receiver.Receiver`'s (``idle_timeout`` and ``deadline`` span
    every connection); ``channel_timeout``: how long to wait for connections that are missing
    once others have come. ``tls``: accept every connection over TLS with this context (its
    handshake within ``FIRST_BYTES_TIMEOUT``); ``forward_tls``: (context, hostname) to
    speak TLS on every forward connection. ``handover`` (``--keep-listening``): where the
    connections of the next migration go when they come while this one takes its own.
    ``stop(reason)``, from any thread, ends the migration at once.
    """

    def __init__(self, settings: IncomingSettings, *, save: str | None = None,
                 ram_dir: str | None = None, ram: RamDir | None = None,
                 forward: Endpoint | None = None,
                 chunk: int = CHUNK, buffers: int = BUFFERS, allow_undescribed: bool = False,
                 digest: bool = False, progress: IO[str] | None = None,
                 idle_timeout: float | None = None, deadline: float | None = None,
                 channel_timeout: float = 10.0, destination: Destination | None = None,
                 tls: ssl.SSLContext | None = None,
                 forward_tls: tuple[ssl.SSLContext, str | None] | None = None,
                 handover: Handover | None = None) -> None:
        if not settings.multifd:
            raise ValueError("a multifd receiver needs the multifd capability")
        self.settings = settings
        self.channels = settings.multifd_channels
        self.save = save
        self.ram_dir = ram_dir
        self.forward = forward
        self.chunk = chunk
        self.buffers = buffers
        self.allow_undescribed = allow_undescribed
        self.digest = digest
        self.progress = progress
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.channel_timeout = channel_timeout
        self.destination = destination
        if destination is not None:
            destination.multifd = True  # "active" once every connection is in
        self.tls = tls
        self.forward_tls = forward_tls
        self.handover = handover
        self._claims = Claims()  # what each connection said it is
        self._ended: set[int] = set()  # connections whose reader has ended
        self.connections: list[Connection] = []
        self.registry = MultifdChannels(self.channels)
        self.sync = SyncPoints(self.channels, connected=self._connected_ids,
                               channel_timeout=channel_timeout)
        self.config_ready = Event()
        self.blocks_ready = Event()
        self.page_size = 4096
        self.blocks: dict[str, int] = {}
        self.ram: RamDir | None = None
        self._given_ram = ram  # --ram-prealloc's, the caller's to close
        self._lock = threading.Lock()
        self._chans: list[Channel] = []
        self._threads: list[IOThread] = []
        self._done: Queue[tuple[int, BaseException | None]] = Queue()
        self._error: str | None = None
        self._main: Receiver | None = None
        self._main_out: Outcome | None = None
        self._main_seen = False
        self._multifd_seen = 0
        self._sync_mode: str | None = None  # "flush" or "eos", decided by the stream
        self._sync_points = 0
        self._stopping = False
        self._all_in = False
        self._last = time.monotonic()
        self._empty = Summary()

    @property
    def summary(self) -> Summary:
        """The main stream's summary so far (a QMP monitor reads it, from its own thread)."""
        rx = self._main
        return rx.summary if rx is not None else self._empty

    @property
    def received(self) -> int:
        """Bytes received on every connection so far (read by a QMP monitor while they come)."""
        rest = sum(c.bytes for c in list(self.connections) if c.kind != "main")
        return rest + self._main_bytes()

    @property
    def multifd_bytes(self) -> int:
        """Bytes received on the multifd channels so far (QEMU's ``multifd-bytes``)."""
        return sum(c.bytes for c in list(self.connections) if c.kind == "multifd")

    def channel_pages(self) -> tuple[int, int]:
        """(normal, zero) pages the multifd channels carried so far (the main stream's own are
        in :attr:`summary`)."""
        counts = [n for c in list(self.connections) for n in list(c.blocks.values())]
        return sum(n[0] for n in counts), sum(n[1] for n in counts)

    def stop(self, reason: str = "stopped") -> None:
        """End the migration now: it fails with ``reason``. Any thread; never parks (it closes
        every connection, which wakes every reader)."""
        self._fail(Stopped(f"offset {self._main_bytes()}: {reason}"))

    # -- what the readers share --------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """Another reader failed (or the migration is over): stop at the next wait."""
        return self._error is not None or self._stopping

    def touch(self) -> None:
        """Bytes arrived (for the idle timeout, which spans every connection)."""
        self._last = time.monotonic()

    def main_forward_open(self) -> bool:
        """Park until the main channel's forward connection is open (QEMU before 8.0 takes the
        first connection for the main channel); False when the migration failed meanwhile."""
        while not self.failed:
            rx = self._main
            fwd = rx.forwarder if rx is not None else None
            if fwd is not None and fwd.connected.wait(_TICK):
                return True
            if fwd is None:
                self.config_ready.wait(_TICK)  # the main stream not there yet: look again
        return False

    def forward_connect(self, endpoint: Endpoint, timeout: float | None) -> Channel:
        """A multifd channel's forward connection (TLS if asked). May park."""
        return open_destination(endpoint, self.forward_tls, timeout)

    def channel_in(self) -> None:
        """A connection said what it is (the main stream's magic, a channel's init packet):
        once all have, the migration is ``active``. Any reader's thread; never parks."""
        with self._lock:
            if self._all_in or self._error is not None or not self._main_seen \
                    or len(self._connected_ids()) < self.channels:
                return
            self._all_in = True
        if self.destination is not None:
            self.destination.all_channels_in()

    def forward_context(self, conn: Connection) -> IOThread:
        """A new IOThread for ``conn``'s forwarding writer (stopped with the others)."""
        t = IOThread(f"mig-fwd{conn.index}").start()
        with self._lock:
            self._threads.append(t)
        return t

    # -- the coordinator (the calling greenlet) -----------------------------------------------

    def receive(self, channels: Sequence[Channel | Taken],
                accept: Callable[[float], Channel] | None = None, *,
                extra: bool = False) -> Outcome:
        """Read the connections in ``channels`` (a :class:`Taken` one: as handed over by the
        migration before) and those ``accept(timeout)`` gives (until all N + 1 have come; with
        ``extra``, until the migration ends) to their ends; close them (but those handed over
        to the next). May park. Never raises for a bad stream or peer: the Outcome carries the
        error line."""
        t0 = time.monotonic()
        cpu0 = time.process_time()
        acceptor = None
        try:
            if self._given_ram is not None:
                self.ram = self._given_ram
            elif self.ram_dir is not None:
                self.ram = RamDir(self.ram_dir)
            for ch in channels:
                self._start(ch)
            if accept is not None:
                acceptor = current_context().spawn(self._accept_loop, accept, extra)
            self._wait(t0)
        except (OSError, ChannelError) as exc:  # our own files, a listener gone
            self._fail(Stopped(f"offset 0: {describe(exc)}"))
        finally:
            elapsed = time.monotonic() - t0
            with self._lock:
                self._stopping = True
            if self.handover is not None and self._error is None:
                # readers still telling what their connection is see _stopping within
                # ACCEPT_TICK and hand it over (a TLS handshake first ends, boundedly)
                self._drain_done(FIRST_BYTES_TIMEOUT + 1)
            self._fail(None)  # close what is still open (a no-op for the verdict if complete)
            if acceptor is not None:
                # it sees _stopping within ACCEPT_TICK; the listener is free again after that
                # (a next migration on it must not meet a greenlet still parked in accept)
                try:
                    acceptor.result(10)
                except BaseException:  # noqa: BLE001 - its end does not matter now
                    pass
            for t in self._threads:
                t.stop()
            if self.ram is not None and self.ram is not self._given_ram:
                self.ram.close()
            if self.progress is not None:
                self.progress.write("\n")
                self.progress.flush()
        out = self._outcome(elapsed, time.process_time() - cpu0)
        if self.destination is not None:
            self.destination.ended(out.error)  # completed once every connection has ended
        return out

    def _accept_loop(self, accept: Callable[[float], Channel], extra: bool) -> None:
        expected = self.channels + 1
        while not self._stopping:
            n = sum(c.kind != "next" for c in list(self.connections))
            # bounded: this migration's, a few extra, and (handed over) one next migration's
            if n >= expected + MAX_EXTRA or len(self.connections) >= 2 * expected + MAX_EXTRA:
                return
            # With --keep-listening, leave the listener to the next migration once all have
            # come and the main stream has met its first sync point: a source connects all its
            # channels before it sends the main stream, so by then one with more channels than
            # announced has shown them (judged below), and the next source cannot have come.
            if n >= expected and not extra and self._sync_points > 0:
                return
            try:
                ch = accept(ACCEPT_TICK)
            except TimeoutError:
                continue
            except (EOFError, ChannelClosedError, ContextStoppedError):
                return
            if not self._start(ch):
                return

    def _start(self, item: Channel | Taken) -> bool:
        """Read ``item`` in an IOThread of its own; False (and it closed) once stopping."""
        taken = item if isinstance(item, Taken) else Taken(item)
        with self._lock:
            if self._stopping:
                taken.channel.close()
                return False
            conn = Connection(len(self.connections))
            self.connections.append(conn)
            self._claims.add()
            self._chans.append(taken.channel)
            t = IOThread(f"mig-conn{conn.index}")
            self._threads.append(t)
            t.start()  # under the lock: stopping (which takes it) then sees every thread
        t.context.spawn(self._run, conn, taken)
        return True

    def _wait(self, t0: float) -> None:
        ok: set[int] = set()
        ended: set[int] = set()
        next_progress = time.monotonic() + _TICK
        main_done_at: float | None = None
        while True:
            try:
                k, exc = self._done.get(timeout=_TICK)
            except TimeoutError:
                pass
            else:
                ended.add(k)
                self._ended.add(k)
                conn = self.connections[k]
                if exc is not None:
                    self._fail(exc)
                elif conn.kind in ("main", "multifd"):
                    ok.add(k)
                    if conn.kind == "main":
                        main_done_at = time.monotonic()
            if self._error is not None:
                self._drain_done(10)
                return
            done = [self.connections[k] for k in ok]
            if any(c.kind == "main" for c in done) and \
                    sum(c.kind == "multifd" for c in done) == self.channels:
                return
            now = time.monotonic()
            if self.deadline is not None and now - t0 >= self.deadline:
                self._fail(Stopped(f"offset {self._main_bytes()}: not complete within the "
                                   f"deadline of {self.deadline:g} s"))
            elif self.idle_timeout is not None and now - self._last >= self.idle_timeout:
                self._fail(Stopped(f"offset {self._main_bytes()}: no data for "
                                   f"{self.idle_timeout:g} s on any connection"))
            elif not self._main_seen and self.connections and now - t0 > self.channel_timeout:
                self._fail(Stopped(f"offset 0: no main channel (QEVM) in "
                                   f"{self.channel_timeout:g} s; multifd channels "
                                   f"{self._connected_ids()} came"))
            elif main_done_at is not None and now - main_done_at > self.channel_timeout:
                missing = [i for i in range(self.channels) if i not in self._connected_ids()]
                what = (f"multifd channels {missing} never came" if missing
                        else "the multifd channels did not all end")
                self._fail(Stopped(f"offset {self._main_bytes()}: the main stream ended, but {what} "
                                   f"within {self.channel_timeout:g} s"))
            if self.progress is not None and now >= next_progress:
                next_progress = now + _TICK
                total = sum(c.bytes for c in self.connections)
                rate = total / max(now - t0, 1e-9) / 1e6
                self.progress.write(f"\r{total / 1e6:10.1f} MB  {rate:8.1f} MB/s  "
                                    f"{len(self.connections)} connections")
                self.progress.flush()

    def _drain_done(self, bound: float) -> None:
        """After a failure, or before handing over: wait (``bound`` s at most) for all to end."""
        deadline = time.monotonic() + bound
        while len(self._ended) < len(self.connections) and time.monotonic() < deadline:
            try:
                k, _ = self._done.get(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            self._ended.add(k)

    def _fail(self, exc: BaseException | None) -> None:
        """Record the first error (``None``: just stop) and wake every reader."""
        with self._lock:
            if exc is not None and self._error is None:
                self._error = _line(exc)
            chans = list(self._chans)
        if exc is None and self._error is None and not self._stopping:
            return
        self.sync.fail()
        self.config_ready.set()
        self.blocks_ready.set()
        for ch in chans:
            ch.close()

    def _connected_ids(self) -> list[int]:
        return sorted(c.channel_id for c in list(self.connections) if c.channel_id is not None)

    def _main_bytes(self) -> int:
        """How far the main stream got (the offset a line about the whole migration names): its
        parser's offset while it waits at a sync point inside a chunk, else the bytes taken."""
        rx = self._main
        if rx is not None:
            return max(rx.received, rx.parser.offset if rx.parser is not None else 0)
        return next((c.bytes for c in self.connections if c.kind == "main"), 0)

    def _outcome(self, elapsed: float, cpu: float) -> Outcome:
        if self._main_out is not None:
            d = dict(self._main_out.summary)
        else:
            d = Summary().as_dict()
        blocks = {b["name"]: b for b in d.get("ram_blocks", [])}
        for c in self.connections:
            for name, (normal, zero) in c.blocks.items():
                b = blocks.get(name)
                if b is not None:
                    b["normal_pages"] += normal
                    b["zero_pages"] += zero
        error = self._error
        if error is None and self._main_out is None:
            error = "offset 0: no main channel"
        d["bytes_total"] = sum(c.bytes for c in self.connections)
        d["elapsed_s"] = round(elapsed, 6)
        d["cpu_s"] = round(cpu, 4)
        compressions = {c.compression for c in self.connections if c.compression}
        d["multifd"] = {"channels": self.channels,
                        "compression": compressions.pop() if len(compressions) == 1 else None,
                        "sync_points": self._sync_points,
                        "connections": [c.as_dict() for c in self.connections
                                        if c.kind != "next"]}
        d["max_rss"] = peak_rss()  # the bound the module notes promise
        if error is not None:
            d["complete"] = False
            d["error"] = error
        return Outcome(d, error)

    # -- every connection, in its own IOThread -------------------------------------------------

    def _run(self, conn: Connection, taken: Taken) -> None:
        conn.iothread = threading.current_thread().name
        exc: BaseException | None = None
        ch = raw = taken.channel
        handed = False
        try:
            if self.tls is not None and not taken.tls_done:
                # the handshake is part of saying what it is: the same bound
                ch = accept_connection(ch, self.tls, conn.name, min(
                    self.idle_timeout or FIRST_BYTES_TIMEOUT, FIRST_BYTES_TIMEOUT))
            handed = self._serve(conn, ch, raw, taken.prefix)
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator
            exc = e
        finally:  # a failure is told before the close, which makes the source hang up the rest
            if exc is not None:
                self._done.put((conn.index, exc))
            if not handed:
                ch.close()
            self._claims.said(conn.index)
            if exc is None:
                self._done.put((conn.index, None))

    def _hand_over(self, conn: Connection, ch: Channel, raw: Channel, prefix: bytes) -> bool:
        """``ch`` is the next migration's: give it to the next (True), unless this one failed."""
        assert self.handover is not None
        with self._lock:
            if self._error is not None:
                return False
            conn.kind = "next"
            self._chans.remove(raw)  # no longer ours to close
        self.handover.put(Taken(ch, prefix, tls_done=ch is not raw, order=conn.index))
        return True

    def _serve(self, conn: Connection, ch: Channel, raw: Channel, given: bytes) -> bool:
        """Tell what ``ch`` is and read it to its end; True if it was handed over instead."""
        over = (lambda: self._stopping) if self.handover is not None else None
        prefix, told = tell(ch, given, conn.name, over)
        if not told:
            return self._hand_over(conn, ch, raw, prefix)
        if not prefix:
            if conn.index > self.channels:  # an extra connection that said nothing: harmless
                return False
            # a TLS source that refuses our certificate hangs up right after the handshake
            raise MultifdError(conn.name, 0, early_close(ch, 0) or "closed before sending a byte")
        kind = sniff_channel(prefix, conn.name)
        self._last = time.monotonic()
        # --keep-listening: after the first N + 1, a main stream or channel id taken is the
        # next source's (_multifd_next); within them, two sources at once: an error
        later = over is not None and conn.index > self.channels
        if later and not self._claims.wait_before(conn.index, lambda: self.failed):
            return self._hand_over(conn, ch, raw, prefix)
        ours = self._claims.claim(conn.index, kind, prefix)
        if kind == "main":
            self._main_seen = True
        if not ours and later:
            return self._hand_over(conn, ch, raw, prefix)
        if kind == "main":
            if not ours:
                raise MultifdError(conn.name, 0, "a second main stream (QEVM) in one migration" + (
                    " (two sources at once? the next must not connect before all of this "
                    "one's connections have)" if over is not None else ""))
            conn.kind = "main"
            self.channel_in()
            self._serve_main(conn, ch, prefix)
        else:
            with self._lock:
                j = self._multifd_seen
                self._multifd_seen += 1
            if j >= self.channels:
                raise MultifdError(conn.name, 0, f"multifd connection {j + 1}, but the migration "
                                                 f"has {self.channels} multifd channels (the "
                                                 "receiver's --multifd-channels)")
            conn.kind = "multifd"
            ChannelReader(self, conn, j).run(ch, prefix)
        return False

    # -- the main stream -------------------------------------------------------------------------

    def _serve_main(self, conn: Connection, ch: Channel, prefix: bytes) -> None:
        fwd_thread = self.forward_context(conn) if self.forward is not None else None
        rx = Receiver(save=self.save, forward=self.forward,
                      forward_context=fwd_thread.context if fwd_thread else None,
                      chunk=self.chunk, buffers=self.buffers,
                      allow_undescribed=self.allow_undescribed, digest=self.digest,
                      prefix=prefix, ram=self.ram, on_event=self._main_event,
                      low_water=False, destination=self.destination)
        self._main = rx
        try:
            out = rx.receive(ch)
        finally:
            conn.bytes = rx.received
        self._main_out = out
        conn.sha256_in = out.summary.get("sha256_in")
        conn.sha256_out = out.summary.get("sha256_out")
        conn.forwarded = out.summary.get("forward", {}).get("bytes", 0)
        self.sync.main_ended()
        if out.error is not None:
            raise Stopped(out.error)

    def _main_event(self, ev: StreamEvent) -> None:
        """Receiver's hook for the main stream's non-page events (in the main IOThread)."""
        rx = self._main
        assert rx is not None and rx.parser is not None
        self.touch()
        t = type(ev)
        if t is Configuration:
            assert isinstance(ev, Configuration)
            check_configuration(ev, rx.parser.offset)
            if ev.target_page_bits is not None:  # the parser checked them
                self.page_size = 1 << ev.target_page_bits
            if ev.uuid is not None:
                self.registry.set_uuid(ev.uuid)
            self.config_ready.set()
        elif t is RamBlocks:
            assert isinstance(ev, RamBlocks)
            self.blocks = {b.name: b.size for b in ev.blocks}
            self.blocks_ready.set()
        elif t is RamFlush:
            if self._sync_mode == "eos":
                raise MigrationStreamError(rx.parser.offset - 8, "MULTIFD_FLUSH in a stream that "
                                                                 "syncs at every EOS")
            self._sync_mode = "flush"
            self._sync_main("MULTIFD_FLUSH", rx.parser.offset - 8)
        elif t is Command and self.forward is not None:
            assert isinstance(ev, Command)
            if ev.name == "POSTCOPY_ADVISE" and len(ev.data) == 16:  # postcopy-ram is on
                raise MigrationStreamError(
                    ev.offset, "POSTCOPY_ADVISE: the source has postcopy-ram with multifd, which "
                    "cannot be forwarded (a QEMU 10 destination refuses the combination, 'Postcopy "
                    "is not yet compatible with multifd'; QEMU 7.2's aborts at its end): switch "
                    "postcopy-ram or multifd off on the source")
        elif t is RamEos and self._sync_mode != "flush":
            # no MULTIFD_FLUSH before the ram section's first EOS: QEMU 7.2, or a machine type
            # with multifd-flush-after-each-section; every EOS is a sync point
            self._sync_mode = "eos"
            self._sync_main("EOS", rx.parser.offset - 8)

    def _sync_main(self, what: str, at: int) -> None:
        rx = self._main
        assert rx is not None
        self._sync_points += 1
        rx.pass_on_parsed()
        try:
            self.sync.main(self._sync_points, at, what)
        except SyncFailed:
            raise ReceiveError(at, "stopped") from None

def _line(exc: BaseException) -> str:
    """An exception as the one-line report."""
    if isinstance(exc, (MigrationStreamError, ReceiveError, Stopped)):
        return str(exc)
    return f"offset 0: {describe(exc)}"
