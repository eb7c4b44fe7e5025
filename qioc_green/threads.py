"""IOThreads: OS threads that each run their own hub, QEMU's ``-object iothread``.

Stopping one (``stop()``) is done in its own thread, in this order: mark the context stopping
(new waits fail at once); wake every greenlet parked in it on a channel or a future with
ContextStoppedError, whoever started it; let the woken greenlets run their handlers; kill the
greenlets ``spawn()`` started that are still alive; destroy the hub in its own thread; exit.
``stop()`` joins the thread.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import gevent

from . import _hub
from .errors import ContextStoppedError

_names = itertools.count(1)


class IOThread:
    """An OS thread running its own hub until ``stop()``.  ``.context`` is its Context.

    ``start()`` returns self; using it as a context manager starts it (if needed) and stops it.
    ``pin_cpu``: pin the thread to that CPU; ``yield_each_iteration``: call ``os.sched_yield()``
    once per loop iteration (both used by ``IOThreadPool(pin=True)``; see the design notes).
    """

    def __init__(self, name: str | None = None, *, pin_cpu: int | None = None,
                 yield_each_iteration: bool = False) -> None:
        self.name = name or f"iothread-{next(_names)}"
        self._pin_cpu = pin_cpu
        self._yield = yield_each_iteration
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._context: _hub.Context | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = "new" if self._thread is None else ("running" if self._thread.is_alive() else "stopped")
        return f"<IOThread {self.name} {state}>"

    @property
    def context(self) -> _hub.Context:
        if self._context is None:
            raise RuntimeError(f"iothread {self.name} is not started")
        return self._context

    def start(self) -> IOThread:
        if self._thread is not None:
            raise RuntimeError(f"iothread {self.name} already started")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            if self._pin_cpu is not None:
                os.sched_setaffinity(0, {self._pin_cpu})
            ctx = _hub.current_context()
            ctx.name = self.name
            ctx.pinned = self._pin_cpu is not None
            if self._yield:
                ctx.set_yield_each_iteration(True)
        except BaseException as exc:  # report to start() rather than dying silently
            self._error = exc
            self._ready.set()
            return
        self._context = ctx
        stop = _hub.Waiter(ctx)
        self._ready.set()
        try:
            stop.park()
        except ContextStoppedError:
            pass
        self._wind_down(ctx)

    @staticmethod
    def _wind_down(ctx: _hub.Context, grace: float = 1.0) -> None:
        # We were switched to from inside the hub (the stop request's callback): first let the
        # hub finish that batch of inbox work.  Then let the greenlets woken with
        # ContextStoppedError run their handlers (each sleep(0) is one loop iteration); tasks
        # of spawn() still alive once nothing is parked (busy in gevent.sleep, say) are killed
        # and their futures fail with ContextStoppedError.  ``grace`` bounds the whole.
        def stopped() -> ContextStoppedError:
            return ContextStoppedError(f"context {ctx.name} is stopping")

        gevent.sleep(0)
        deadline = time.monotonic() + grace
        while (ctx.parked or ctx.tasks) and time.monotonic() < deadline:
            ctx.wake_all_parked(stopped)
            gevent.sleep(0)
            if ctx.tasks and not ctx.parked:
                gevent.killall(list(ctx.tasks), timeout=max(deadline - time.monotonic(), 0.01))
        # Refuse new work, then run what was accepted meanwhile before the hub goes.
        ctx.close_inbox()
        for _ in range(100):
            if not ctx._inbox:
                break
            gevent.sleep(0)
        ctx.destroy()

    def _begin_stop(self) -> None:
        ctx = self.context
        ctx.stopping = True
        ctx.wake_all_parked(lambda: ContextStoppedError(f"iothread {self.name} stopped"))

    def stop(self, timeout: float | None = 10.0) -> None:
        """Wake every greenlet parked in this thread with ContextStoppedError, then join it.

        Idempotent.  Called from the IOThread itself it only starts the stop.  Raises
        TimeoutError if the thread has not ended after ``timeout`` seconds.
        """
        t = self._thread
        if t is None or not t.is_alive():
            return
        try:
            self.context.schedule(self._begin_stop)
        except ContextStoppedError:
            pass
        if threading.current_thread() is t:
            return
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"iothread {self.name} did not stop within {timeout} s")

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> IOThread:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class IOThreadPool:
    """``n`` IOThreads, started on creation; ``.contexts``, ``next_context()`` (round-robin).

    ``pin``: pin every hub thread of the pool to one CPU and yield once per loop iteration, so
    hub threads take turns instead of convoying on the GIL (see the design notes).  Off by
    default: it also confines whatever those threads start (worker threads, child processes)
    and stops GIL-releasing work (TLS, file I/O) from overlapping on two CPUs.
    """

    def __init__(self, n: int, *, name: str = "iothread", pin: bool | None = None, cpu: int | None = None) -> None:
        if n < 1:
            raise ValueError("an IOThreadPool needs at least one thread")
        if pin is None:
            pin = False
        if pin and cpu is None:
            cpu = min(os.sched_getaffinity(0))
        self.pinned = bool(pin)
        self.threads = [
            IOThread(f"{name}-{i}", pin_cpu=cpu if pin else None, yield_each_iteration=bool(pin))
            for i in range(n)
        ]
        self._rr = itertools.cycle(range(n))
        self._lock = threading.Lock()
        try:
            for t in self.threads:
                t.start()
        except BaseException:
            self.stop()
            raise

    @property
    def contexts(self) -> list[_hub.Context]:
        return [t.context for t in self.threads]

    def next_context(self) -> _hub.Context:
        with self._lock:
            return self.threads[next(self._rr)].context

    def __len__(self) -> int:
        return len(self.threads)

    def __iter__(self) -> Iterator[IOThread]:
        return iter(self.threads)

    def stop(self, timeout: float | None = 10.0) -> None:
        for t in self.threads:
            if t.is_alive():
                try:
                    t.context.schedule(t._begin_stop)
                except (ContextStoppedError, RuntimeError):
                    pass
        for t in self.threads:
            t.stop(timeout)

    def __enter__(self) -> IOThreadPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
