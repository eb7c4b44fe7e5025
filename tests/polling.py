"""The one poll helper, and the one pause of a bounded poll.

Tests order events with events; a poll is for what nothing signals (another thread's state, a
count the library keeps, another process writing a file, a child's socket appearing). Every poll
has a deadline: ``wait_until`` for a predicate, or a hand-written loop that pauses with
``poll_pause`` when it must do more than test a predicate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import gevent

_never_set = threading.Event()


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.001) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` runs out; True once it holds.

    Between looks the calling greenlet sleeps on its thread's hub, so that thread's other
    greenlets (and the hub's callbacks) keep running.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        gevent.sleep(interval)
    return True


def poll_pause(seconds: float) -> None:
    """Block this thread for ``seconds`` between two looks of a bounded poll."""
    _never_set.wait(seconds)

