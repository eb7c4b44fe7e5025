"""The one pause for bounded polls.

Tests order events with events; a poll is for what nothing signals (another process writing a
file, a child's socket appearing, another thread's state). Every poll loop has a deadline and
pauses here between looks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import gevent

_never_set = threading.Event()


def poll_pause(seconds: float) -> None:
    """Block this thread for ``seconds`` between two looks of a bounded poll."""
    _never_set.wait(seconds)


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Poll ``predicate`` (bounded) while letting the main hub run; True once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(interval)
    return bool(predicate())
