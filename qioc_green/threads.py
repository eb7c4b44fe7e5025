"""IOThreads: OS threads that each run their own hub, QEMU's ``-object iothread``.

An IOThread is a real OS thread even after ``gevent.monkey.patch_all()`` (its thread and locks
are the unpatched ones).  ``stop()`` asks the thread to stop itself, in its own thread (see
``Context.serve``: parked greenlets are woken with ContextStoppedError, leftover tasks killed,
the hub destroyed), and waits for it to end, parking the calling greenlet (semantics 8).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

from . import _hub
from ._context import Context, Future, current_context, new_thread_context
from .errors import ContextStoppedError

_names = itertools.count(1)


class IOThread:
    """An OS thread running its own hub until ``stop()``.  ``.context`` is its Context.

    ``start()`` returns self; using it as a context manager starts it (if needed) and stops it.
    ``pin_cpu``: pin the thread to that CPU; ``yield_each_iteration``: call ``os.sched_yield()``
    once per loop iteration (both used by ``IOThreadPool(pin=True)``); ``auto_placement``: let
    measurement place it (``IOThreadPool``'s default; see the design notes).
    """

    def __init__(self, name: str | None = None, *, pin_cpu: int | None = None,
                 yield_each_iteration: bool = False, auto_placement: bool = False) -> None:
        self.name = name or f"iothread-{next(_names)}"
        self._pin_cpu = pin_cpu
        self._yield = yield_each_iteration
        self._auto = auto_placement
        self._thread: _hub.OSThread | None = None
        self._ready = _hub.OSEvent()
        self._context: Context | None = None
        self._error: BaseException | None = None
        self._ended: Future[None] = Future()  # set by the thread as its very last act

    def __repr__(self) -> str:
        state = "new" if self._thread is None else ("running" if self._thread.is_alive() else "stopped")
        return f"<IOThread {self.name} {state}>"

    @property
    def context(self) -> Context:
        if self._context is None:
            raise RuntimeError(f"iothread {self.name} is not started")
        return self._context

    def start(self) -> IOThread:
        """Start the thread and wait (blocking this OS thread briefly) until its hub runs.

        Started from the main thread, it makes the main thread's context first (if it has none),
        so that ``main_context()`` works in the IOThread.
        """
        if self._thread is not None:
            raise RuntimeError(f"iothread {self.name} already started")
        if _hub.is_main_thread():
            current_context()
        self._thread = _hub.OSThread(self._run, self.name)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            self._main()
        finally:
            self._ended.set_result(None)  # wakes a stop() parked on it, in whatever thread

    def _main(self) -> None:
        try:
            if self._pin_cpu is not None:
                os.sched_setaffinity(0, {self._pin_cpu})
            ctx = new_thread_context(self.name)
            ctx.pinned = self._pin_cpu is not None
            if self._yield:
                ctx.set_yield_each_iteration(True)
            if self._auto:
                ctx.join_auto_placement()
        except BaseException as exc:  # report to start() rather than dying silently
            self._error = exc
            self._ready.set()
            return
        self._context = ctx
        self._ready.set()
        ctx.serve()

    def _stopped(self) -> ContextStoppedError:
        return ContextStoppedError(f"iothread {self.name} stopped")

    def _request_stop(self) -> None:
        try:
            self.context.schedule(self.context.begin_stop, self._stopped)
        except (ContextStoppedError, RuntimeError):
            pass  # stopped already, or it never got as far as a context

    def stop(self, timeout: float | None = 10.0) -> None:
        """Wake every greenlet parked in this thread with ContextStoppedError, then wait until
        the thread has ended.

        Parks the calling greenlet on its own thread's hub while the thread winds down (the
        caller's other greenlets keep running; a plain thread without a hub blocks).
        Idempotent.  Called from the IOThread itself it only starts the stop.  Raises
        TimeoutError if the thread has not ended after ``timeout`` seconds; RuntimeError inside
        a hub callback (before asking anything).
        """
        t = self._thread
        if t is None or not t.is_alive():
            return
        if self._context is not None and self._context.in_own_thread():
            self._request_stop()
            return
        if _hub.in_hub():
            raise RuntimeError(f"cannot stop iothread {self.name} inside a hub callback (a callback must not block)")
        self._request_stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._ended.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"iothread {self.name} did not stop within {timeout} s") from None
        except ContextStoppedError:
            pass  # the caller's own context is stopping (no park there): block in the join below
        # Its last act was to set _ended: what is left of the thread is its exit.
        if not t.join(None if deadline is None else max(deadline - time.monotonic(), 0.1)):
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

    Where the hub threads run (``placement``, also in the repr):

    * ``pin=None`` (the default): **auto**.  With the compiled hot path, each hub runs a loop
      iteration's ready watchers under one GIL acquisition, and the pool chooses by
      measurement: while its hubs mostly wait for each other's GIL (Python-bound work: two
      CPUs would only hand the GIL back and forth), they are pinned to the least busy CPU and
      take turns there, yielding it after each batch; every second or so (backing off to 8 s)
      they spread for 150 ms to look again, and stay spread where the work releases the GIL
      (TLS, file I/O, large copies) so it overlaps on several CPUs.  Without the compiled hot
      path, unpinned.
    * ``pin=True``: always pinned to one CPU (``cpu``, default the first allowed one), with one
      ``sched_yield()`` per loop iteration.
    * ``pin=False``: never pinned.

    A pinned hub thread's affinity is inherited by the threads and child processes it starts
    while pinned.  See the design notes and ``docs/servers.md`` for the measurements.
    """

    def __init__(self, n: int, *, name: str = "iothread", pin: bool | None = None, cpu: int | None = None) -> None:
        if n < 1:
            raise ValueError("an IOThreadPool needs at least one thread")
        auto = pin is None and _hub.can_batch_gil()
        if pin is None:
            pin = False
        if pin and cpu is None:
            cpu = min(os.sched_getaffinity(0))
        self.pinned = bool(pin)
        self.placement = "pinned" if pin else ("auto" if auto else "unpinned")
        self.threads = [
            IOThread(f"{name}-{i}", pin_cpu=cpu if pin else None, yield_each_iteration=bool(pin),
                     auto_placement=auto)
            for i in range(n)
        ]
        self._rr = itertools.cycle(range(n))
        self._lock = _hub.OSLock()
        try:
            for t in self.threads:
                t.start()
        except BaseException:
            self.stop()
            raise

    def __repr__(self) -> str:
        where = self.placement
        if where == "auto":
            st = _hub.placement_stats() or {}
            now = f"pinned to CPU {st.get('cpu')}" if st.get("mode") == "pinned" else "spread"
            where = f"auto (now {now})"
        elif where == "pinned":
            where = f"pinned to CPU {self.threads[0]._pin_cpu}"
        return f"<IOThreadPool {len(self.threads)} threads, placement {where}>"

    @property
    def contexts(self) -> list[Context]:
        return [t.context for t in self.threads]

    def next_context(self) -> Context:
        with self._lock:
            return self.threads[next(self._rr)].context

    def __len__(self) -> int:
        return len(self.threads)

    def __iter__(self) -> Iterator[IOThread]:
        return iter(self.threads)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop every thread (all asked at once, then joined)."""
        for t in self.threads:
            if t.is_alive():
                t._request_stop()
        for t in self.threads:
            t.stop(timeout)

    def __enter__(self) -> IOThreadPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["IOThread", "IOThreadPool"]
