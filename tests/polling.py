"""The one pause for bounded polls.

Tests order events with events; a poll is for what nothing signals (another process writing a
file, a child's socket appearing, another thread's state). Every poll loop has a deadline and
pauses here between looks.
"""

from __future__ import annotations

import threading

_never_set = threading.Event()


def poll_pause(seconds: float) -> None:
    """Block this thread for ``seconds`` between two looks of a bounded poll."""
    _never_set.wait(seconds)
