"""Cross-thread synchronization for greenlets: a bounded Queue, an Event and a Lock.

gevent's own queue and event belong to one hub.  These may be used from any greenlet of any
thread (and from plain threads): a caller that must wait parks on its own thread's hub, and
whoever makes progress possible wakes it through its thread's inbox.  The state is guarded by a
lock (an unpatched OS lock) that is never held while parked.

A wake only says "look again": a woken getter re-checks the queue under the lock, so an item is
never handed to a waiter that meanwhile timed out.  Every waiter of the kind that may now make
progress is woken, not just one: one chosen waiter could be leaving at that moment (a
``gevent.Timeout``, a kill) and take the wake with it.

The Lock is the exception, because a lock has one next owner: ``release()`` hands ownership to
the oldest waiter (FIFO, so no thread starves another) and wakes that one only. Ownership is
state, not a wake: a waiter that leaves (timeout, kill) finds out under the guard whether it was
handed the lock meanwhile, and if so passes it on, so no hand-off is ever lost.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from typing import Generic, TypeVar

from . import _context, _hub

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed: ``put`` refused; ``get`` raises once it is empty."""


class QueueEmpty(queue.Empty, TimeoutError):
    """``get`` found nothing: not blocking, or not within ``timeout``.  Both a ``queue.Empty``
    (what a ``queue.Queue`` user catches) and a ``TimeoutError`` (what this Queue raised before)."""


class QueueFull(queue.Full, TimeoutError):
    """``put`` found no room: not blocking, or not within ``timeout``.  Both a ``queue.Full``
    and a ``TimeoutError``."""


def _timeout(block: bool, timeout: float | None) -> float | None:
    """The wait ``get``/``put`` may make: None for no limit, 0 for none at all."""
    if timeout is None and (block is None or (not isinstance(block, bool) and isinstance(block, (int, float)))):
        # The earlier signature, get(timeout) and put(item, timeout): None was "no limit".
        return None if block is None else max(float(block), 0.0)
    if not block:
        return 0.0
    return None if timeout is None else max(timeout, 0.0)


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
    """A FIFO that greenlets of any thread share; ``maxsize`` > 0 bounds it (back-pressure).

    It speaks ``queue.Queue``'s API (``get(block, timeout)``, ``put(item, block, timeout)``,
    the ``_nowait`` forms, ``qsize``/``empty``/``full``, QueueEmpty and QueueFull, which are
    ``queue.Empty`` and ``queue.Full``) plus ``close()`` and ``fail()``.  A number given for
    ``block`` (or None) is taken as the timeout (the earlier signature, ``get(timeout)``).
    """

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._lock = _hub.OSLock()
        self._getters: deque[_hub.Waiter] = deque()
        self._putters: deque[_hub.Waiter] = deque()
        self._closed = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; while the queue is full, parks (``block``; up to ``timeout``
        seconds).  QueueFull (a ``queue.Full`` and a TimeoutError) when there is no room in
        time, QueueClosed, or the exception given to :meth:`fail`."""
        wait = _timeout(block, timeout)
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            while True:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise QueueClosed("queue is closed")
                if self.maxsize <= 0 or len(self._items) < self.maxsize:
                    self._items.append(item)
                    getters = list(self._getters)
                    break
                if wait == 0:
                    raise QueueFull(f"queue is full ({self.maxsize} items)")
                try:
                    _park_until(self._lock, self._putters, deadline, "queue put")
                except TimeoutError:
                    raise QueueFull(f"queue put timed out: full ({self.maxsize} items)") from None
        _wake_all(getters)

    def put_nowait(self, item: T) -> None:
        """``put(item, block=False)``: QueueFull at once if there is no room.  Never switches."""
        self.put(item, False)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return the oldest item; while empty, parks (``block``; up to ``timeout``
        seconds).  QueueEmpty (a ``queue.Empty`` and a TimeoutError) when nothing comes in
        time; QueueClosed once closed and drained; the exception given to :meth:`fail` (at
        once, items or not)."""
        wait = _timeout(block, timeout)
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            while True:
                if self._error is not None:
                    raise self._error
                if self._items:
                    item = self._items.popleft()
                    putters = list(self._putters)
                    break
                if self._closed:
                    raise QueueClosed("queue is closed")
                if wait == 0:
                    raise QueueEmpty("queue is empty")
                try:
                    _park_until(self._lock, self._getters, deadline, "queue get")
                except TimeoutError:
                    raise QueueEmpty("queue get timed out") from None
        _wake_all(putters)
        return item

    def get_nowait(self) -> T:
        """``get(block=False)``: QueueEmpty at once if there is nothing.  Never switches."""
        return self.get(False)

    def close(self) -> None:
        """Refuse further puts; getters drain what is left, then get QueueClosed.  Never blocks."""
        with self._lock:
            self._closed = True
            waiters = list(self._getters) + list(self._putters)
        for w in waiters:
            w.wake(None)

    def fail(self, exc: BaseException) -> None:
        """Break the queue: every parked getter and putter, and every later ``get`` or ``put``,
        raises ``exc``; items still queued are dropped.  The first failure sticks.  Any thread;
        never blocks."""
        with self._lock:
            if self._error is None:
                self._error = exc
            self._items.clear()
            waiters = list(self._getters) + list(self._putters)
        _wake_all(waiters)


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


class Lock:
    """A mutex that greenlets of any thread (and plain threads) share; gevent's belongs to one hub.

    ``acquire`` parks the calling greenlet on its own thread's hub while another holder has it;
    ``release`` (any thread, never blocks) hands it to the oldest waiter.  Not reentrant: a
    holder that acquires again waits for itself (as ``threading.Lock``).  A context manager.
    """

    def __init__(self) -> None:
        self._lock = _hub.OSLock()
        self._held = False
        self._waiters: deque[_hub.Waiter] = deque()

    def locked(self) -> bool:
        return self._held

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; may park.  True once held; False if ``blocking`` is false and the lock
        is taken, or after ``timeout`` seconds (``threading.Lock``'s rules, with ``None`` for
        no limit).  Raises ContextStoppedError if the caller's context stops meanwhile."""
        with self._lock:
            if not self._held:
                self._held = True
                return True
            if not blocking:
                return False
            waiter = _hub.Waiter(_context.current_context())
            # A waiter whose thread has ended can never take the lock: hand it on instead.
            waiter.orphan = lambda _waiter: self.release()
            self._waiters.append(waiter)
        try:
            waiter.park(None if timeout is None else max(timeout, 0.0))
        except BaseException as exc:
            with self._lock:
                try:
                    self._waiters.remove(waiter)
                    handed = False
                except ValueError:
                    handed = True  # release() chose us as we left: we own it, pass it on
            if handed:
                self.release()
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True  # woken by release(): it handed the lock over, still held

    def release(self) -> None:
        """Hand the lock to the oldest waiter, or free it.  Any thread; never blocks.
        RuntimeError if it is not held."""
        with self._lock:
            if not self._held:
                raise RuntimeError("release of an unlocked Lock")
            if not self._waiters:
                self._held = False
                return
            waiter = self._waiters.popleft()
        waiter.wake(None)

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["Event", "Lock", "Queue", "QueueClosed", "QueueEmpty", "QueueFull"]
