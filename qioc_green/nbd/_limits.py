"""Limits of the NBD server: what a connection may hold, and for how long.

**Memory is bounded** per connection and server-wide. Every reply counts while it waits to
be sent: its buffers plus a fixed cost for the objects that carry it (``REPLY_COST``, about
what a queued reply was measured to take). A READ's payload is reserved before its greenlet
starts; any other reply (an error, a WRITE's, BLOCK_STATUS's extents) is charged when it is
queued. The charge is against the connection's ``reply_budget`` and the server's
``max_memory``, shared by all connections (a lock and a counter: connections live in
different IOThreads); the writer releases it once the reply is written. While either is
spent the reader stops reading requests (it checks before each one), so a client that does
not read its replies is held back by its own socket buffers: back-pressure. The overshoot is
bounded: the replies of requests already running (``max_requests``, each at most 1024
extents or one error) and one READ. The reader holds one receive buffer; the protocol at
most one option. The writer drops its last batch once it is sent, so an idle connection
holds no reply bytes (500 idle connections each held their last READ's data).

**Time is bounded** where a client could hold a connection for nothing: the handshake must
end within ``handshake_limit`` (10 s by default, as qemu-nbd 10's ``--handshake-limit``;
0 disables), TLS included; with ``idle_timeout``, a connection with nothing in flight that
receives no byte for that long is closed, and so is one whose replies make no progress for
that long (a client that stopped reading).

**Refusals fit the protocol**: an error reply's message is cut to the 4096 bytes a
protocol string may have (names in it are shortened), whatever the client sent.

Past ``max_clients`` (128 by default) a client is closed at once and counted, as
``NetListener(max_clients=)`` does (qemu-nbd instead stops accepting past ``--shared``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from qioc_green import Channel, Event

from ._constants import MAX_STRING

__all__ = ["REPLY_COST", "ROOM_POLL", "SharedBudget", "fit_string", "shown_name", "writev_progressing"]

# Memory a queued reply takes beside its buffers: the tuple and list that carry it, the header
# bytes object, the request's record (measured: pipelined zero-length WRITEs grew the server by
# about 210 bytes each).
REPLY_COST = 256
ROOM_POLL = 0.5  # s between looks at the shared budget while waiting for room in it


def fit_string(text: str, limit: int = MAX_STRING) -> str:
    """``text`` cut to ``limit`` bytes of UTF-8 (at a character boundary), as protocol strings
    must be."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def shown_name(name: str) -> str:
    """A client's export name as messages and logs show it: quoted, at most 64 characters."""
    if len(name) <= 64:
        return repr(name)
    return f"{name[:48]!r}... ({len(name.encode())} bytes)"


class _Ticket:
    __slots__ = ("event", "granted", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.granted = False
        self.event = Event()


class SharedBudget:
    """Reply bytes held by all connections together, at most ``limit``. Thread-safe: the
    connections live in different IOThreads, so a waiter parks on a ``qioc_green.Event`` of
    its own, which whoever releases sets (from any thread; never blocks). Waiters are served
    in arrival order, each taking its bytes as it is woken: with a free-for-all, one
    connection could lose every race for as long as others kept the budget busy (seen in a
    test: a client waited over 20 s while three others were served)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()
        self._queue: deque[_Ticket] = deque()

    def adjust(self, n: int) -> None:
        """Take ``n`` bytes without waiting (give back if negative). Never parks."""
        with self._lock:
            self.used += n
            woken = self._grant() if n < 0 else []
        for ev in woken:
            ev.set()

    def take(self, n: int, check: Callable[[], None]) -> None:
        """Take ``n`` bytes once they fit, after those who asked first (``n`` 0: wait until
        the budget is not spent). Parks; calls ``check()`` every ROOM_POLL s, which may raise
        to give up (nothing is then taken)."""
        with self._lock:
            if not self._queue and self.used + n <= self.limit:
                self.used += n
                return
            ticket = _Ticket(n)
            self._queue.append(ticket)
            woken = self._grant()  # it may fit now: nothing else would look until a release
        for ev in woken:
            ev.set()
        try:
            while not ticket.event.wait(ROOM_POLL):
                check()
        except BaseException:
            with self._lock:
                if ticket.granted:
                    self.used -= n
                else:
                    self._queue.remove(ticket)
                woken = self._grant()
            for ev in woken:
                ev.set()
            raise

    def _grant(self) -> list[Event]:
        """Under the lock: hand bytes to the waiters at the head that now fit."""
        woken = []
        while self._queue and self.used + self._queue[0].n <= self.limit:
            ticket = self._queue.popleft()
            self.used += ticket.n
            ticket.granted = True
            woken.append(ticket.event)
        return woken


def writev_progressing(ch: Channel, bufs: list[Any], idle: float) -> None:
    """writev_all(), failing (TimeoutError) once no byte could be sent for ``idle`` s."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = ch.writev(views, timeout=idle)
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
