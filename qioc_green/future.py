"""A future that any thread or greenlet may wait for, each in its own way.

The result of ``Context.spawn()``.  A greenlet that waits parks on its own thread's hub (other
greenlets of that thread keep running, a thread's main greenlet included); a plain thread that
has no hub blocks on a lock.  Completion may come from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any, Generic, TypeVar

from gevent._hub_local import get_hub_if_exists
from greenlet import GreenletExit

from . import _hub
from .errors import ContextStoppedError

T = TypeVar("T")


class Future(Generic[T]):
    """The outcome of work started in some context: ``result()``, ``exception()``, ``done()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []  # _hub.Waiter or a held threading.Lock
        self._callbacks: list[Callable[[Future[T]], Any]] = []

    def __repr__(self) -> str:
        if not self._done:
            return "<Future pending>"
        if self._exception is not None:
            return f"<Future raised {type(self._exception).__name__}>"
        return "<Future done>"

    def done(self) -> bool:
        """True once a result or an exception is set.  Never switches."""
        return self._done

    def set_result(self, value: T) -> None:
        """Complete with ``value``.  Any thread; never blocks."""
        self._complete(value, None)

    def set_exception(self, exc: BaseException) -> None:
        """Complete with ``exc``.  Any thread; never blocks."""
        self._complete(None, exc)

    def _complete(self, value: Any, exc: BaseException | None) -> None:
        with self._lock:
            if self._done:
                raise RuntimeError("future already completed")
            self._result = value
            self._exception = exc
            self._done = True
            waiters, self._waiters = self._waiters, []
            callbacks, self._callbacks = self._callbacks, []
        for w in waiters:
            if isinstance(w, _hub.Waiter):
                w.wake(None)
            else:
                w.release()
        for cb in callbacks:
            cb(self)

    def add_done_callback(self, fn: Callable[[Future[T]], Any]) -> None:
        """Call ``fn(future)`` on completion, in the completing thread (now, if done)."""
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        ctx = _hub.existing_context()
        if ctx is None and get_hub_if_exists() is not None:
            ctx = _hub.current_context()
        if ctx is not None:
            waiter = _hub.Waiter(ctx)
            if waiter.greenlet is ctx.hub:
                raise RuntimeError("cannot wait for a future inside a hub callback")
            with self._lock:
                if self._done:
                    return
                self._waiters.append(waiter)
            try:
                waiter.park(timeout)
            except TimeoutError:
                raise TimeoutError(f"future not done after {timeout} s") from None
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
            return
        lock = threading.Lock()
        lock.acquire()
        with self._lock:
            if self._done:
                return
            self._waiters.append(lock)
        if not lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            with self._lock:
                if lock in self._waiters:
                    self._waiters.remove(lock)
            if not self._done:
                raise TimeoutError(f"future not done after {timeout} s")

    def result(self, timeout: float | None = None) -> T:
        """Wait until done, then return the result or raise the exception.

        May park the calling greenlet (or block a plain thread).  Raises the builtin
        TimeoutError after ``timeout`` seconds.
        """
        self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait until done, then return the exception (None on success).  May park."""
        self._wait(timeout)
        return self._exception


def run_into(fut: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Run ``fn`` in the calling greenlet and complete ``fut`` with its outcome.

    A task killed (GreenletExit) does not hand GreenletExit to whoever waits for it, which would
    make a waiting greenlet exit quietly: the future fails with ContextStoppedError when its
    context is stopping, CancelledError otherwise.
    """
    try:
        value = fn(*args, **kwargs)
    except GreenletExit:
        ctx = _hub.existing_context()
        if ctx is not None and ctx.stopping:
            fut.set_exception(ContextStoppedError(f"context {ctx.name} stopped; task killed"))
        else:
            fut.set_exception(CancelledError("task killed"))
        raise
    except BaseException as exc:  # every outcome goes to the future
        fut.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
    else:
        fut.set_result(value)

