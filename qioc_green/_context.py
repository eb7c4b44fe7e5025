"""Contexts (QEMU's AioContext) and their lifecycle, and the Future that work started in a
context completes.

A ``Context`` is one thread's ``_hub.ThreadHub`` (its gevent hub plus an inbox) with what QEMU's
AioContext offers on top: ``spawn()`` and ``call()``, finding the context of the calling thread
or of a greenlet, the iohandler context, and stopping (``serve()`` until ``begin_stop()``).
The Future lives here because ``spawn()`` returns one and a Future's waiter parks in the
caller's context: one module, no import cycle.

Lifecycles
----------
* **The main thread and plain threads** get a context on first use (``current_context()``).
  Their inbox watcher is ref'd only while one of their greenlets is parked, so ``gevent.wait()``
  returns once nothing is outstanding.  A plain thread's context is destroyed, in that thread,
  when the thread ends (a guard in its thread-local storage), or its loop's fds would leak.
* **IOThreads and the iohandler** make theirs with ``new_thread_context()`` and ``serve()`` it:
  the inbox watcher stays ref'd (they wait only for other threads), and ``serve()`` parks until
  ``begin_stop()``.  Stopping is done in the context's own thread, in this order: mark it stopping
  (new waits fail at once); wake every greenlet parked in it with ContextStoppedError, whoever
  started it; let the woken greenlets run their handlers; kill the tasks ``spawn()`` started that
  are still alive; refuse new work; run what the inbox had accepted; destroy the hub.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, InvalidStateError
from concurrent.futures import Future as _StdFuture
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any, ParamSpec, TypeVar

from . import _hub
from .errors import ContextStoppedError

_T = TypeVar("_T")
_P = ParamSpec("_P")

this_thread: Any = _hub.ThreadLocal()  # .context (and .guard in plain threads), per OS thread
_registry_lock = _hub.OSLock()
_by_greenlet: dict[Any, Context] = {}  # hub and thread main greenlet -> context
_main_thread_context: Context | None = None
_iohandler: Context | None = None
_iohandler_lock = _hub.OSLock()
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_log = logging.getLogger("qioc_green")


class Context(_hub.ThreadHub):
    """One thread's gevent hub plus a thread-safe inbox: QEMU's AioContext.

    Made by ``current_context()`` (or an IOThread) in its own thread; never constructed by users.
    ``schedule()`` (inherited) runs a callback in it; ``spawn()`` and ``call()`` run a greenlet.
    """

    def __init__(self, name: str, *, keep_alive: bool = False) -> None:
        super().__init__(name, keep_alive=keep_alive)
        self.pinned = False
        self._task_futures: dict[Any, Future[Any]] = {}  # spawn()'s greenlets still running
        with _registry_lock:
            _by_greenlet[self.hub] = self
            _by_greenlet[self.root] = self

    def __repr__(self) -> str:
        state = "dead" if self.dead else ("stopping" if self.stopping else "running")
        return f"<Context {self.name} thread={self.thread_id} {state}>"

    def spawn(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Start ``fn(*args, **kwargs)`` as a greenlet in this context; return its Future.

        Thread-safe; never blocks.  The future can be waited from any thread or greenlet;
        ``cancel()`` kills the greenlet.  QEMU: ``aio_co_schedule()`` of a new coroutine.
        """
        fut: Future[_T] = Future()
        self.schedule(self._start_task, fut, fn, args, kwargs)
        return fut

    def call(self, fn: Callable[..., _T], *args: Any, timeout: float | None = None, **kwargs: Any) -> _T:
        """Run ``fn`` as a greenlet in this context and return its result (or raise its exception).

        Parks the calling greenlet (or blocks a plain thread) until done; TimeoutError after
        ``timeout`` seconds; RuntimeError inside a hub callback, before ``fn`` is started.
        QEMU: ``aio_wait_bh_oneshot()``.
        """
        if _hub.in_hub():  # refuse before spawning: an error must mean that fn did not run
            raise RuntimeError(f"cannot call into context {self.name} inside a hub callback (a callback must not block)")
        return self.spawn(fn, *args, **kwargs).result(timeout)

    def _start_task(self, fut: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        if fut.cancelled():
            return
        if self.stopping:
            fut._settle(None, ContextStoppedError(f"context {self.name} is stopping"))
            return
        g = _hub.spawn_here(run_into, fut, fn, args, kwargs, tasks=self.tasks,
                            on_exit=lambda g: self._task_ended(g, fut))
        fut._task = (self, g)
        self._task_futures[g] = fut

    def _task_ended(self, greenlet: Any, fut: Future[Any]) -> None:
        self._task_futures.pop(greenlet, None)
        # A task killed before its greenlet ran never reached run_into: settle its future here.
        if not fut.done():
            if self.stopping:
                fut._settle(None, ContextStoppedError(f"context {self.name} stopped; task killed"))
            else:
                fut._task = None
                fut.cancel()

    # -- stopping -----------------------------------------------------------------------------

    def wake_all_parked(self, make_exc: Callable[[], BaseException]) -> None:
        """Resume every greenlet parked in this context with an exception of its own
        (``make_exc()``; a shared instance would mix their tracebacks).  Any thread."""
        for waiter in list(self.parked):
            waiter.wake(make_exc())

    def begin_stop(self, make_exc: Callable[[], BaseException]) -> None:
        """Mark the context stopping and wake its parked greenlets with ``make_exc()``; ``serve()``
        then winds down.  Run it in the context (``schedule(ctx.begin_stop, ...)``)."""
        self.stopping = True
        self.wake_all_parked(make_exc)

    def serve(self, grace: float = 1.0) -> None:
        """Run this thread's hub until ``begin_stop()``, then wind down and destroy the context.

        Called by the thread that made the context with ``new_thread_context()``.
        """
        stop = _hub.Waiter(self)
        try:
            stop.park()
        except ContextStoppedError:
            pass
        # We were switched to from inside the hub (the stop request's callback): first let the
        # hub finish that batch of inbox work.  Then let the greenlets woken with
        # ContextStoppedError run their handlers (each sleep(0) is one loop iteration); tasks of
        # spawn() still alive once nothing is parked (busy in a sleep, say) are killed and their
        # futures fail with ContextStoppedError.  ``grace`` bounds the whole: a greenlet whose
        # clean-up outlasts it is abandoned with the hub (it never runs again), its future
        # failed, and the stop goes on.
        def stopped() -> ContextStoppedError:
            return ContextStoppedError(f"context {self.name} is stopping")

        _hub.sleep(0)
        deadline = time.monotonic() + grace
        while (self.parked or self.tasks) and time.monotonic() < deadline:
            self.wake_all_parked(stopped)
            _hub.sleep(0)
            if self.tasks and not self.parked:
                _hub.kill_all(list(self.tasks), max(deadline - time.monotonic(), 0.01))
        if self.tasks:
            _log.warning("context %s: %d greenlet(s) still running %.1f s after the stop; abandoned "
                         "with the hub", self.name, len(self.tasks), grace)
            for g in list(self.tasks):
                fut = self._task_futures.pop(g, None)
                if fut is not None:
                    fut._settle(None, ContextStoppedError(
                        f"context {self.name} stopped; task still running after the {grace} s grace"))
        # Refuse new work, then run what was accepted meanwhile before the hub goes.
        self.close_inbox()
        for _ in range(100):
            if not self.inbox_pending():
                break
            _hub.sleep(0)
        self.destroy()

    def destroy(self) -> None:
        """Close the inbox and destroy the hub.  Must run in the context's own thread, last.

        Work accepted before the inbox closed is not dropped: it runs here, outside the hub,
        after ``stopping`` is set (a task start fails its future; a watch start drops its hold;
        a delivery to a greenlet that can no longer run releases what it held).
        """
        assert self.in_own_thread()
        self.stopping = True
        self.destroying = True
        for watch in list(self.watches):
            watch.cancel()
        self.close_inbox()
        for fn, args in self.take_inbox():
            try:
                fn(*args)
            except Exception:
                self.report_error(fn)
        with _registry_lock:
            _by_greenlet.pop(self.hub, None)
            _by_greenlet.pop(self.root, None)
        if getattr(this_thread, "context", None) is self:
            del this_thread.context
            guard = getattr(this_thread, "guard", None)
            if guard is not None:
                guard.context = None
                del this_thread.guard
        self.destroy_hub()


def current_context() -> Context:
    """The calling thread's context, created (with its hub) on first use.

    QEMU: ``qemu_get_current_aio_context()``.
    """
    try:
        ctx: Context = this_thread.context
        return ctx
    except AttributeError:
        pass
    global _main_thread_context
    ctx = Context(_hub.thread_name())
    this_thread.context = ctx
    if _hub.is_main_thread():
        _main_thread_context = ctx
    else:
        # A plain thread that waited once has a hub now: destroy it when the thread ends (its
        # thread-local storage is cleared then, in that thread), or its loop's fds would leak.
        this_thread.guard = _ThreadExitGuard(ctx)
    return ctx


def new_thread_context(name: str) -> Context:
    """Make the calling thread's context, one that waits only for other threads (an IOThread,
    the iohandler): its inbox keeps the hub running until ``serve()`` ends.  Never switches."""
    if getattr(this_thread, "context", None) is not None:
        raise RuntimeError(f"thread {_hub.thread_name()} already has a context")
    ctx = Context(name, keep_alive=True)
    this_thread.context = ctx
    return ctx


class _ThreadExitGuard:
    __slots__ = ("context",)

    def __init__(self, context: Context) -> None:
        self.context: Context | None = context

    def __del__(self) -> None:
        ctx = self.context
        if ctx is not None and not ctx.dead and ctx.in_own_thread():
            try:
                ctx.destroy()
            except Exception:  # interpreter or thread teardown: nothing left to tell
                pass


def existing_context() -> Context | None:
    """The calling thread's context if it has one, without creating it."""
    return getattr(this_thread, "context", None)


def main_context() -> Context:
    """The main thread's context.  QEMU: ``qemu_get_aio_context()``.

    From the main thread it is created on first use; from another thread it exists only once
    the main thread has made it (a hub must be created in its own thread), else RuntimeError.
    """
    if _hub.is_main_thread():
        return current_context()
    if _main_thread_context is None:
        raise RuntimeError(
            "the main thread has no context yet: call current_context() or main_context() "
            "in the main thread first (a hub is created in its own thread)"
        )
    return _main_thread_context


def context_of(greenlet: Any) -> Context | None:
    """The context whose thread ``greenlet`` lives in, or None if that thread has none.

    QEMU: ``qemu_coroutine_get_aio_context()``.
    """
    g = greenlet
    while g is not None:
        ctx = _by_greenlet.get(g)
        if ctx is not None:
            return ctx
        g = g.parent
    return None


def iohandler_context() -> Context:
    """The context that serves channels that have not opted in to follow.

    A daemon thread named ``qioc-iohandler``, started on first use and kept for the life of the
    process (as QEMU's iohandler context is).  QEMU: ``iohandler_get_aio_context()``.
    """
    ctx = _iohandler
    if ctx is not None:
        return ctx
    with _iohandler_lock:
        if _iohandler is None:
            ready = _hub.OSEvent()
            _hub.OSThread(lambda: _run_iohandler(ready), "qioc-iohandler").start()
            ready.wait()
    assert _iohandler is not None
    return _iohandler


def _run_iohandler(ready: _hub.OSEvent) -> None:
    global _iohandler
    _iohandler = new_thread_context("qioc-iohandler")
    ready.set()
    _iohandler.serve()  # for the life of the process


# -- the future ---------------------------------------------------------------------------------


class Future(_StdFuture[_T]):
    """The outcome of work started in a context (``Context.spawn()``) or a worker thread
    (``run_in_thread()``): a ``concurrent.futures.Future`` that greenlets wait for by parking.

    ``result()`` and ``exception()`` park a calling greenlet on its own thread's hub (other
    greenlets of that thread keep running, a thread's main greenlet included); a plain thread that
    has no hub blocks.  Completion may come from any thread.  ``cancel()`` of a task started by
    ``spawn()`` kills its greenlet (it sees GreenletExit at its next switch, and the future is
    cancelled); a worker thread's task can be cancelled only before it starts.
    ``concurrent.futures.wait()`` and ``as_completed()`` accept it; they block the OS thread.
    """

    def __init__(self) -> None:
        super().__init__()
        # Reentrant (concurrent.futures.wait() holds it while it asks cancelled()); unpatched.
        self._condition = threading.Condition(_hub.OSRLock())
        self._parked: list[Any] = []  # _hub.Waiter, or a held OSLock of a plain thread
        self._task: tuple[Context, Any] | None = None  # (context, greenlet) of a spawn()

    def set_result(self, result: _T) -> None:
        """Complete with ``result``.  Any thread; never blocks."""
        super().set_result(result)
        self._wake_parked()

    def set_exception(self, exception: BaseException | None) -> None:
        """Complete with ``exception``.  Any thread; never blocks."""
        super().set_exception(exception)
        self._wake_parked()

    def _settle(self, value: Any, exc: BaseException | None) -> None:
        """Complete unless cancelled meanwhile (a cancelled task's outcome goes nowhere)."""
        try:
            if exc is None:
                self.set_result(value)
            else:
                self.set_exception(exc)
        except InvalidStateError:
            if not self.cancelled():
                raise

    def cancel(self) -> bool:
        """Cancel the task; True if it is (now) cancelled, False if it had finished or is a
        worker thread's task already running.  Any thread; never switches."""
        with self._condition:  # reentrant: the base class's methods take it too
            if self._state == CANCELLED_AND_NOTIFIED:
                return True  # cancelled already (a second cancel, or a killed task unwinding)
            if not super().cancel():
                return False  # finished, or a worker thread's task already running
            # CANCELLED -> CANCELLED_AND_NOTIFIED in the same hold of the lock, so that
            # concurrent.futures.wait() sees it and nobody ever finds the future half cancelled
            # (calling this on a notified future is what concurrent.futures logs as CRITICAL).
            self.set_running_or_notify_cancel()
        self._wake_parked()
        task = self._task
        if task is not None:
            ctx, greenlet = task
            try:
                ctx.schedule(_hub.kill_soon, greenlet)
            except ContextStoppedError:
                pass  # the context killed it already
        return True

    def _wake_parked(self) -> None:
        with self._condition:
            parked, self._parked = self._parked, []
        for w in parked:
            if isinstance(w, _hub.Waiter):
                w.wake(None)
            else:
                w.release()

    def _wait(self, timeout: float | None) -> None:
        if self._state in _DONE:
            return
        ctx = existing_context()
        if ctx is None and _hub.thread_has_hub():
            ctx = current_context()
        if ctx is not None:
            if _hub.in_hub():
                raise RuntimeError("cannot wait for a future inside a hub callback")
            waiter = _hub.Waiter(ctx)
            with self._condition:
                if self._state in _DONE:
                    return
                self._parked.append(waiter)
            try:
                waiter.park(timeout)
            except TimeoutError:
                raise TimeoutError(f"future not done after {timeout} s") from None
            finally:
                with self._condition:
                    if waiter in self._parked:
                        self._parked.remove(waiter)
            return
        lock = _hub.OSLock()
        lock.acquire()
        with self._condition:
            if self._state in _DONE:
                return
            self._parked.append(lock)
        if not lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            with self._condition:
                if lock in self._parked:
                    self._parked.remove(lock)
            if self._state not in _DONE:
                raise TimeoutError(f"future not done after {timeout} s")

    def result(self, timeout: float | None = None) -> _T:
        """Wait until done, then return the result or raise the exception.

        May park the calling greenlet (or block a plain thread).  Raises the builtin
        TimeoutError after ``timeout`` seconds, CancelledError if cancelled.
        """
        self._wait(timeout)
        if self._state != FINISHED:
            raise CancelledError()
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]  # FINISHED without an exception: a _T

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait until done, then return the exception (None on success).  May park.
        CancelledError if cancelled."""
        self._wait(timeout)
        if self._state != FINISHED:
            raise CancelledError()
        return self._exception


def run_into(fut: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             *, in_thread: bool = False) -> None:
    """Run ``fn`` in the calling greenlet (or worker thread) and complete ``fut`` with its outcome.

    A task killed (GreenletExit) does not hand GreenletExit to whoever waits for it, which would
    make a waiting greenlet exit quietly: the future fails with ContextStoppedError when its
    context is stopping, and is cancelled otherwise.
    """
    if in_thread:
        with fut._condition:
            if fut._state == CANCELLED_AND_NOTIFIED or not fut.set_running_or_notify_cancel():
                return  # cancelled before it started
    elif fut.cancelled():
        return
    try:
        value = fn(*args, **kwargs)
    except _hub.GreenletExit:
        ctx = existing_context()
        if ctx is not None and ctx.stopping:
            fut._settle(None, ContextStoppedError(f"context {ctx.name} stopped; task killed"))
        else:
            fut._task = None  # killed already: cancel without killing again
            fut.cancel()
        raise
    except BaseException as exc:  # every other outcome goes to the future
        fut._settle(None, exc)
        if not isinstance(exc, Exception):
            raise
    else:
        fut._settle(value, None)


__all__ = [
    "Context",
    "Future",
    "context_of",
    "current_context",
    "existing_context",
    "iohandler_context",
    "main_context",
    "new_thread_context",
    "run_into",
    "this_thread",
]
