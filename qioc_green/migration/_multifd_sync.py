"""QEMU's sync between the main stream and the multifd channels, for readers in several threads.

A page dirtied again during a live migration is sent again, maybe on another channel, so the
pages of one round must be written before those of the next. QEMU orders them like this
(``multifd_send_sync_main`` and ``multifd_recv_sync_main`` in ``migration/multifd.c``; the
protocol is written up in ``docs/migration-formats.md``): the source ends a round with a SYNC
packet on every channel, then a sync point on the main stream. That point is a
``RAM_SAVE_FLAG_MULTIFD_FLUSH`` record (QEMU 8.0 and later, on machine types that do not set
``multifd-flush-after-each-section``), or else every EOS of the ram section (QEMU 7.2, and old
machine types on newer QEMUs). The destination's main thread, reaching its k-th sync point,
waits until every channel has read its k-th SYNC packet; a channel that has read its k-th SYNC
waits until the main stream has reached its k-th sync point. :class:`SyncPoints` is that
rendezvous, with what QEMU lacks: it never waits for ever on a channel that has ended, on a
main stream that has ended, or on a channel that never connected (``channel_timeout``).

Thread-safe; the waits park the calling greenlet (``qioc_green.Event``), and :meth:`fail`
wakes every one of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from qioc_green import Event

from ._format import MigrationStreamError
from ._multifd_events import MultifdError

_POLL = 0.5  # s between checks while the main stream waits for channels that may never come


class SyncFailed(Exception):
    """A wait at a sync point was ended by :meth:`SyncPoints.fail` (another reader failed)."""


class SyncPoints:
    """The rendezvous of ``channels`` multifd channels with the main stream (see the module).

    ``connected()`` says how many channels have connected so far (for the message when some
    never do); ``channel_timeout``: how long the main stream waits at a sync point for channels
    that have not connected.
    """

    def __init__(self, channels: int, *, connected: Callable[[], list[int]],
                 channel_timeout: float = 10.0) -> None:
        self.channels = channels
        self.channel_timeout = channel_timeout
        self._connected = connected
        self._lock = threading.Lock()
        self._arrived: dict[int, int] = {}  # sync point -> channels that read its SYNC
        self._events: dict[int, tuple[Event, Event]] = {}  # (all channels in, main there)
        self._ended: dict[str, tuple[int, int]] = {}  # channel -> (SYNCs read, where it ended)
        self._main_at = 0  # sync points the main stream has reached
        self._main_ended: int | None = None
        self._failed = False

    def _pair(self, k: int) -> tuple[Event, Event]:
        with self._lock:
            pair = self._events.get(k)
            if pair is None:
                pair = self._events[k] = (Event(), Event())
            return pair

    def channel(self, k: int, name: str, offset: int) -> None:
        """Channel ``name`` read its k-th SYNC packet (at ``offset``): wait for the main stream's
        k-th sync point. Raises MultifdError if the main stream ended before it."""
        all_in, released = self._pair(k)
        with self._lock:
            self._arrived[k] = self._arrived.get(k, 0) + 1
            everyone = self._arrived[k] >= self.channels
            ended = self._main_ended
        if everyone:
            all_in.set()
        if ended is not None and ended < k:
            raise MultifdError(name, offset, f"SYNC packet {k}, but the main stream ended after "
                                             f"{ended} sync points")
        released.wait()
        if self._failed:
            raise SyncFailed(name)
        with self._lock:
            ended = self._main_ended
        if ended is not None and ended < k:
            raise MultifdError(name, offset, f"SYNC packet {k}, but the main stream ended after "
                                             f"{ended} sync points")

    def main(self, k: int, offset: int, what: str) -> None:
        """The main stream reached its k-th sync point (``what``, at ``offset``): wait until
        every channel has read its k-th SYNC packet, then release them."""
        all_in, released = self._pair(k)
        with self._lock:
            self._main_at = k
        started = time.monotonic()
        while not all_in.wait(_POLL):
            if self._failed:
                raise SyncFailed("main")
            with self._lock:
                short = {n: e for n, e in self._ended.items() if e[0] < k}
            if short:
                name, (syncs, end) = next(iter(short.items()))
                raise MultifdError(name, end, f"channel ended after {syncs} SYNC packets, but the "
                                            f"main stream's {what} at offset {offset} is sync "
                                            f"point {k}")
            missing = [i for i in range(self.channels) if i not in self._connected()]
            if missing and time.monotonic() - started > self.channel_timeout:
                hint = ("none came: has the source the multifd capability on?"
                        if len(missing) == self.channels else
                        f"is the source's multifd-channels {self.channels}?")
                raise MigrationStreamError(
                    offset, f"{what} (sync point {k}) waits for multifd channels {missing}, "
                            f"which never connected in {self.channel_timeout:g} s ({hint})")
        if self._failed:
            raise SyncFailed("main")
        released.set()

    def channel_ended(self, name: str, syncs: int, offset: int) -> None:
        """Channel ``name`` ended cleanly at ``offset`` after ``syncs`` SYNC packets."""
        with self._lock:
            self._ended[name] = (syncs, offset)

    def main_ended(self) -> None:
        """The main stream ended: channels waiting past its last sync point fail."""
        with self._lock:
            self._main_ended = self._main_at
            pairs = [p for k, p in self._events.items() if k > self._main_at]
        for _, released in pairs:
            released.set()

    @property
    def main_points(self) -> int:
        return self._main_at

    def fail(self) -> None:
        """Wake every waiter with SyncFailed (another reader failed). Never blocks."""
        self._failed = True
        with self._lock:
            pairs = list(self._events.values())
        for a, b in pairs:
            a.set()
            b.set()
