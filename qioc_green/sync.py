"""Cross-thread synchronization for greenlets: a bounded Queue and an Event.

gevent's own queue and event belong to one hub.  These may be used from any greenlet of any
thread (and from plain threads): a caller that must wait parks on its own thread's hub, and
whoever makes progress possible wakes it through its thread's inbox.  The state is guarded by a
lock (an unpatched OS lock) that is never held while parked.

A wake only says "look again": a woken getter re-checks the queue under the lock, so an item is
never handed to a waiter that meanwhile timed out.  Every waiter of the kind that may now make
progress is woken, not just one: one chosen waiter could be leaving at that moment (a
``gevent.Timeout``, a kill) and take the wake with it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Generic, TypeVar

from . import _context, _hub

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed: ``put`` refused; ``get`` raises once it is empty."""


def _park_until(lock: _hub.LockType, waiters: deque[_hub.Waiter], deadline: float | None, what: str) -> None:
    """Called with ``lock`` held: register, release, park, re-acquire.  Raises TimeoutError."""
    ctx = _context.current_context()
    waiter = _hub.Waiter(ctx)
    waiters.append(waiter)
    lock.release()
    try:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            waiter.park(timeout)
        except TimeoutError:
            raise TimeoutError(f"{what} timed out") from None
    finally:
        lock.acquire()
        try:
            waiters.remove(waiter)
        except ValueError:
            pass


def _wake_all(waiters: list[_hub.Waiter]) -> None:
    """Call with no lock held: a wake made from inside a hub may switch into the woken
    greenlet at once."""
    for w in waiters:
        w.wake(None)


class Queue(Generic[T]):
    """A FIFO that greenlets of any thread share; ``maxsize`` > 0 bounds it (back-pressure)."""

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._lock = _hub.OSLock()
        self._getters: deque[_hub.Waiter] = deque()
        self._putters: deque[_hub.Waiter] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, timeout: float | None = None) -> None:
        """Append ``item``; parks while the queue is full.  TimeoutError, QueueClosed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise QueueClosed("queue is closed")
                if self.maxsize <= 0 or len(self._items) < self.maxsize:
                    self._items.append(item)
                    getters = list(self._getters)
                    break
                _park_until(self._lock, self._putters, deadline, "queue put")
        _wake_all(getters)

    def get(self, timeout: float | None = None) -> T:
        """Remove and return the oldest item; parks while empty.  TimeoutError; QueueClosed
        once closed and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._items:
                    item = self._items.popleft()
                    putters = list(self._putters)
                    break
                if self._closed:
                    raise QueueClosed("queue is closed")
                _park_until(self._lock, self._getters, deadline, "queue get")
        _wake_all(putters)
        return item

    def close(self) -> None:
        """Refuse further puts; getters drain what is left, then get QueueClosed.  Never blocks."""
        with self._lock:
            self._closed = True
            waiters = list(self._getters) + list(self._putters)
        for w in waiters:
            w.wake(None)


class Event:
    """A flag that greenlets of any thread can wait for."""

    def __init__(self) -> None:
        self._flag = False
        self._lock = _hub.OSLock()
        self._waiters: deque[_hub.Waiter] = deque()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter.  Never blocks."""
        with self._lock:
            self._flag = True
            waiters = list(self._waiters)
        for w in waiters:
            w.wake(None)

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """Park until set; return the flag (False after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._flag:
                try:
                    _park_until(self._lock, self._waiters, deadline, "event wait")
                except TimeoutError:
                    return self._flag
            return True


__all__ = ["Event", "Queue", "QueueClosed"]
