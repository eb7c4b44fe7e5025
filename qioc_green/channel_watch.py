"""Watches: a callback whenever a channel is ready, GSource-style.  QEMU: ``io/channel-watch.c``.

``Channel.add_watch(cond, callback, context)`` makes one.  The watch lives on one context's hub:
it is started, fired and stopped in that thread, whoever asked; ``cancel()`` from another thread
travels through the context's inbox.  Like every watcher, a watch holds the channel's fd until it
is gone (the channel's ``_leave``), so ``close()`` never frees an fd number a watch still uses.

What is watched is asked again after every callback (``ready_fd``): the channel's fd, or nothing
at all when the channel is ready without one (buffers, null channels, regular files, and bytes an
interrupted ``*_all`` read put back), as QEMU's sources for those are always ready.  Then an idle
watcher calls back at every loop turn until the callback returns a false value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _hub
from ._context import Context


class Watch:
    """A callback watch on a channel, living on one context's hub.  ``cancel()`` from anywhere.

    Made by ``Channel.add_watch()``: ``callback(channel, cond)`` runs inside ``context``'s hub
    (it must not wait) while it returns a true value.  ``ready_fd()`` says what to watch now;
    ``gone(watch)`` runs once, when the watch is over.
    """

    def __init__(self, channel: Any, cond: int, events: int, callback: Callable[[Any, Any], Any],
                 context: Context, ready_fd: Callable[[], int | None], gone: Callable[[Watch], None]) -> None:
        self.channel = channel
        self.cond = cond
        self.callback = callback
        self.context = context
        self._ready_fd = ready_fd
        self._gone_cb = gone
        self._events = events  # _hub.READ or _hub.WRITE
        self._source: _hub.Source | None = None
        self._fd: int | None = None
        self._gone = [None]
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<Watch {getattr(self.channel, 'name', self.channel)} {self.cond!r} in {self.context.name}>"

    def start(self) -> None:
        """Arm the watcher.  Runs in the context's thread (``add_watch`` schedules it)."""
        if self.cancelled:
            return
        self.context.watches.add(self)
        self._arm(self._ready_fd())

    def _arm(self, fd: int | None) -> None:
        if self._source is not None:
            self._source.close()
        self._fd = fd
        self._source = _hub.Source(self.context, fd, self._events, self._fire)

    def _fire(self) -> None:
        if self.cancelled:
            return
        try:
            keep = self.callback(self.channel, self.cond)
        except Exception:
            self.context.report_error(self.callback)
            keep = False
        if not keep:
            self._stop()
            return
        if self.cancelled:  # the callback cancelled it (or closed the channel) and said keep
            return
        try:
            fd = self._ready_fd()
        except Exception:
            self.context.report_error(self._ready_fd)
            self._stop()
            return
        if fd != self._fd:  # given-back bytes drained (or newly there): watch what is real now
            self._arm(fd)

    def cancel(self) -> None:
        """Remove the watch.  Thread-safe, idempotent; the callback is not called again."""
        self.cancelled = True
        ctx = self.context
        if ctx.in_own_thread():
            self._stop()
            return
        try:
            ctx.schedule(self._stop)
        except Exception:
            self._stop_unowned()

    def _stop(self) -> None:
        self.cancelled = True
        if self._source is not None:
            self._source.close()
            self._source = None
        self.context.watches.discard(self)
        self._stop_unowned()

    def _stop_unowned(self) -> None:
        try:
            self._gone.pop()
        except IndexError:
            return
        self._gone_cb(self)


__all__ = ["Watch"]
