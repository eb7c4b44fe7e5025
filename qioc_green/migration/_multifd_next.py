"""The next migration's connections, with ``--keep-listening``: telling them from this one's,
and handing them over.

A multifd migration takes connections on its listener until all N + 1 have come and its main
stream has met its first sync point (``_multifd_receiver``); then the listener is the next
migration's. But the next source may connect before that point: whoever drives it was told
to go once this one's connections were in, not once its main stream synced. Its connections
are then accepted here, and must not be read as this migration's extras (refused, failing
this one, or closed, so that the next waits for channels that never come).

What a connection says tells whose it is, once every connection accepted before it has said
what it is (:class:`Claims`): a second ``QEVM``, or a multifd init packet whose channel id is
taken, is the next source's. So is one that has said nothing yet (a TLS handshake under way)
when this migration completes. Each is handed over (:class:`Handover`) with the bytes read to
tell and its TLS session if it has one (:class:`Taken`), and the next migration starts from
them. Within the first N + 1 the same thing is two sources at once, refused as before; if
this migration fails, connections not yet told apart are closed with it (whose they are is
unknown then). Bounded: a migration stops taking connections at 2 (N + 1) + ``MAX_EXTRA``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qioc_green import BrokenChannelError, Channel, Event, UnexpectedEOF

from ._multifd import INIT_PACKET_SIZE, sniff_channel
from ._multifd_events import MultifdError
from ._multifd_tls import FIRST_BYTES_TIMEOUT
from ._receiver import describe

ACCEPT_TICK = 0.05  # s between looks at whether the migration is over, while taking connections
_INIT_ID = 24  # where an init packet has the channel id (after magic, version, UUID)


@dataclass
class Taken:
    """A connection accepted and read into before it was handed over: the bytes read from it
    (``prefix``), and whether ``channel`` is already the TLS session (its handshake done)."""

    channel: Channel
    prefix: bytes = b""
    tls_done: bool = False
    order: int = 0  # its place in the accept order of the migration that handed it over


class Handover:
    """The connections one migration found to be the next one's, for the next to take.
    Thread-safe; nothing here parks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Taken] = []

    def put(self, item: Taken) -> None:
        with self._lock:
            self._items.append(item)

    def take_all(self) -> list[Taken]:
        """Every connection handed over, in the order they were accepted."""
        with self._lock:
            items, self._items = self._items, []
        return sorted(items, key=lambda t: t.order)

    def close(self) -> None:
        """Close what nobody took (the run is over)."""
        for item in self.take_all():
            item.channel.close()


def read_first(ch: Channel, have: bytes, n: int, name: str,
               stopping: Callable[[], bool] | None) -> bytes | None:
    """``have`` and what follows on a new connection ``name``, up to ``n`` bytes (fewer at EOF),
    within ``FIRST_BYTES_TIMEOUT``. May park. None once ``stopping()`` says so (looked at
    every ``ACCEPT_TICK``; what was read is then given back to ``ch``, as a read that times
    out gives it). Raises MultifdError for a connection that says too little in time."""
    deadline = time.monotonic() + FIRST_BYTES_TIMEOUT
    tick = ACCEPT_TICK if stopping is not None else FIRST_BYTES_TIMEOUT
    while len(have) < n:
        try:
            more = ch.read_all_eof(n - len(have),
                                   timeout=min(tick, max(0.0, deadline - time.monotonic())))
        except UnexpectedEOF as exc:
            return have + bytes(exc.partial)
        except TimeoutError:
            if stopping is not None and stopping():
                return None
            if time.monotonic() < deadline:
                continue
            if not have:
                raise MultifdError(name, 0, f"sent nothing in {FIRST_BYTES_TIMEOUT:g} s") from None
            raise MultifdError(name, len(have), f"sent {len(have)} bytes, then nothing for "
                                                f"{FIRST_BYTES_TIMEOUT:g} s") from None
        except BrokenChannelError as exc:
            raise MultifdError(name, 0, describe(exc)) from None
        if more is None:
            break
        have += more
    return have


def tell(ch: Channel, given: bytes, name: str,
         over: Callable[[], bool] | None) -> tuple[bytes, bool]:
    """What new connection ``name`` says (after ``given``, read before): its first 4 bytes,
    and with ``over`` (``--keep-listening``) a multifd channel's whole init packet, which has
    its id. May park. Returns (the bytes read, True), none at EOF; or (those read, False)
    once ``over()`` says the migration is over first (the connection then goes to the next).
    Raises MultifdError as ``read_first``, or for 1 to 3 bytes and EOF."""
    prefix = read_first(ch, given, 4, name, over)
    if prefix is None:
        return given, False
    if 0 < len(prefix) < 4:
        raise MultifdError(name, len(prefix), f"closed after {len(prefix)} bytes, before its "
                           "first 4 bytes said what it is")
    if over is not None and len(prefix) == 4 and sniff_channel(prefix, name) == "multifd":
        init = read_first(ch, prefix, INIT_PACKET_SIZE, name, over)
        if init is None:
            return prefix, False
        prefix = init
    return prefix, True


class Claims:
    """What one migration's connections said they are, in accept order: whether each has said
    yet, and the main stream and channel ids claimed. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._said: list[Event] = []
        self._ids: set[int] = set()
        self._main = False

    def add(self) -> None:
        """A connection was accepted (the next index). Never parks."""
        with self._lock:
            self._said.append(Event())

    def said(self, index: int) -> None:
        """Connection ``index`` said what it is, or ended. Never parks."""
        self._said[index].set()

    def wait_before(self, index: int, over: Callable[[], bool]) -> bool:
        """Park until every connection accepted before ``index`` has said what it is (or
        ended); False once ``over()`` (looked at every ``ACCEPT_TICK``)."""
        for k in range(index):
            while not self._said[k].wait(ACCEPT_TICK):
                if over():
                    return False
        return True

    def claim(self, index: int, kind: str | None, prefix: bytes) -> bool:
        """Connection ``index`` is ``kind`` ("main" or "multifd", ``prefix`` its first bytes):
        False if what it claims is taken (a second main stream, a channel id seen). Never
        parks."""
        with self._lock:
            if kind == "main":
                ours = not self._main
                self._main = True
            else:
                cid = prefix[_INIT_ID] if len(prefix) >= INIT_PACKET_SIZE else None
                ours = cid is None or cid not in self._ids
                if cid is not None:
                    self._ids.add(cid)
        self.said(index)
        return ours
