"""The one module that talks to gevent hubs: contexts, parking, and waiting on file descriptors.

Everything else in qioc_green calls this module; nothing else touches a hub, a loop or a watcher.

The facts
---------
* gevent gives each OS thread its own hub (a greenlet running a libev loop).  A hub and its
  loop belong to that thread: watchers are created, started, stopped and closed there, and only
  an async watcher's ``send()`` may be called from elsewhere.
* A greenlet never changes thread.  It "waits" by switching to its thread's hub; whoever wakes
  it must switch back into it *from that thread's hub*.
* A hub whose loop has nothing ref'd to wait for raises ``LoopExit``.  A hub that only waits for
  other threads (an IOThread with nothing to do yet) must not, so every context keeps one ref'd
  async watcher: its inbox.

What that means for us
----------------------
* A **Context** (QEMU's AioContext) is one thread's hub plus an inbox: a deque that any thread
  may append to, and the async watcher that tells the owning hub to drain it.  It is created in
  its own thread, on first use.  ``schedule()`` is the only thing that crosses threads.
* A **Waiter** is one park of one greenlet.  Several parties may race to resume it: readiness of
  an fd (seen by this thread's hub, or by the iohandler's), ``wake_read()`` from any thread,
  ``close()`` from any thread, a timer, a stopping context.  The right to resume is one token in
  a list, claimed by ``list.pop()``, which is atomic (QEMU's ``qatomic_xchg`` on
  ``ioc->read_coroutine``).  The winner resumes the greenlet: directly when it runs in the
  greenlet's own hub, through the greenlet's inbox otherwise.  A greenlet that leaves its park
  by an exception it did not get from us (``gevent.Timeout``, ``kill()``) claims the token
  itself on the way out; if it loses, a delivery is already posted, so it marks itself
  abandoned and the delivery drops.  Exactly one resume, no lost wake.
* **Follow** (``follow_coroutine_ctx`` true): the io watcher is made on the hub of the thread
  the greenlet runs in, at each wait; the hub's own callback resumes it with a direct switch.
* **Iohandler** (follow false): the watcher is made on the iohandler context's hub (a daemon
  thread), and readiness resumes the greenlet through its own thread's inbox.  Both the start and
  the cancel of that watcher travel through the iohandler's inbox, in order, so a cancel can
  never overtake the start it cancels.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent import get_hub
from greenlet import getcurrent

from .errors import ContextStoppedError

READ = 1  # libev EV_READ
WRITE = 2  # libev EV_WRITE

_local = threading.local()
_registry_lock = threading.Lock()
_by_greenlet: dict[Any, "Context"] = {}  # hub and thread main greenlet -> context
_main_thread_context: "Context | None" = None
_iohandler: "Context | None" = None
_iohandler_lock = threading.Lock()

# Set by tests (``qioc_green.testing.trace_readiness``) to see which thread saw an fd get ready.
trace: Callable[[int, int], None] | None = None


class _TimedOut:
    __slots__ = ()


TIMED_OUT: Any = _TimedOut()


class Context:
    """One thread's gevent hub plus a thread-safe inbox: QEMU's AioContext.

    Made by ``current_context()`` in its own thread; never constructed by users.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.hub = get_hub()
        self.loop = self.hub.loop
        self.thread_id = threading.get_ident()
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()  # guards _dead against a send() racing destroy()
        self._dead = False
        self.stopping = False
        self.parked: set[Waiter] = set()
        self.watches: set[Any] = set()  # add_watch() sources living on this hub
        self.tasks: set[Any] = set()  # greenlets started by spawn(), killed when the context stops
        self.pinned = False
        self._yield_watcher: Any = None
        self._async = self.loop.async_()  # ref'd: a hub that waits only for others never LoopExits
        self._async.start(self._drain)
        root = getcurrent()
        while root.parent is not None:
            root = root.parent
        self._root = root
        with _registry_lock:
            _by_greenlet[self.hub] = self
            _by_greenlet[root] = self

    def __repr__(self) -> str:
        state = "dead" if self._dead else ("stopping" if self.stopping else "running")
        return f"<Context {self.name} thread={self.thread_id} {state}>"

    # -- crossing threads ---------------------------------------------------------------------

    def schedule(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in this context's thread soon, from its hub.  Thread-safe; never blocks.

        ``fn`` runs inside the hub, so it must not wait.  Raises ContextStoppedError if the
        context has been destroyed.  QEMU: ``aio_bh_schedule_oneshot()``.
        """
        if threading.get_ident() == self.thread_id and not self._dead:
            self.loop.run_callback(fn, *args)
            return
        with self._lock:
            if self._dead:
                raise ContextStoppedError(f"context {self.name} is stopped")
            self._inbox.append((fn, args))
            self._async.send()

    def spawn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Start ``fn(*args, **kwargs)`` as a greenlet in this context; return its Future.

        Thread-safe; never blocks.  The future can be waited from any thread or greenlet.
        QEMU: ``aio_co_schedule()`` of a new coroutine.
        """
        from .future import Future

        fut: Future[Any] = Future()
        self.schedule(self._start_task, fut, fn, args, kwargs)
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``fn`` as a greenlet in this context and return its result (or raise its exception).

        Parks the calling greenlet (or blocks a plain thread) until done; TimeoutError after
        ``timeout`` seconds.  QEMU: ``aio_wait_bh_oneshot()``.
        """
        return self.spawn(fn, *args, **kwargs).result(timeout)

    def _start_task(self, fut: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from .future import run_into

        if self.stopping:
            fut.set_exception(ContextStoppedError(f"context {self.name} is stopping"))
            return
        g = gevent.spawn(run_into, fut, fn, args, kwargs)
        self.tasks.add(g)
        g.rawlink(self.tasks.discard)

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:
                self.hub.handle_error(fn, *sys.exc_info())

    def in_own_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    # -- hub options --------------------------------------------------------------------------

    def set_yield_each_iteration(self, enabled: bool) -> None:
        """Call ``os.sched_yield()`` once per loop iteration (see ``IOThreadPool(pin=...)``).

        Must be called in the context's own thread.
        """
        if enabled and self._yield_watcher is None:
            w = self.loop.prepare(ref=False)
            w.start(os.sched_yield)
            self._yield_watcher = w
        elif not enabled and self._yield_watcher is not None:
            self._yield_watcher.close()
            self._yield_watcher = None

    # -- stopping -----------------------------------------------------------------------------

    def wake_all_parked(self, make_exc: Callable[[], BaseException]) -> None:
        """Resume every greenlet parked in this context with an exception of its own
        (``make_exc()``; a shared instance would mix their tracebacks).  Any thread."""
        for waiter in list(self.parked):
            waiter.wake(make_exc())

    def close_inbox(self) -> None:
        """Refuse further ``schedule()`` calls (ContextStoppedError); what was accepted stays
        queued and still runs.  Any thread."""
        with self._lock:
            self._dead = True

    def destroy(self) -> None:
        """Close the inbox and destroy the hub.  Must run in the context's own thread, last.

        Work accepted before the inbox closed is not dropped: it runs here, outside the hub,
        after ``stopping`` is set (a task start fails its future; a watch start drops its hold;
        a delivery to a greenlet that can no longer run releases what it held).
        """
        assert self.in_own_thread()
        self.stopping = True
        for watch in list(self.watches):
            watch.cancel()
        self.close_inbox()
        leftovers = list(self._inbox)
        self._inbox.clear()
        for fn, args in leftovers:
            if getattr(fn, "__func__", None) is Waiter._deliver:
                getattr(fn, "__self__")._orphan()  # noqa: B009
                continue
            try:
                fn(*args)
            except Exception:
                self.hub.handle_error(fn, *sys.exc_info())
        self.set_yield_each_iteration(False)
        self._async.close()
        with _registry_lock:
            _by_greenlet.pop(self.hub, None)
            _by_greenlet.pop(self._root, None)
        if getattr(_local, "context", None) is self:
            del _local.context
            guard = getattr(_local, "guard", None)
            if guard is not None:
                guard.context = _DEAD
                del _local.guard
        self.hub.destroy(destroy_loop=not self.loop.default)


class _Dead:
    _dead = True


_DEAD: Any = _Dead()


def current_context() -> Context:
    """The calling thread's context, created (with its hub) on first use.

    QEMU: ``qemu_get_current_aio_context()``.
    """
    try:
        return _local.context
    except AttributeError:
        pass
    global _main_thread_context
    thread = threading.current_thread()
    ctx = Context(thread.name)
    _local.context = ctx
    if thread is threading.main_thread():
        _main_thread_context = ctx
    else:
        # A plain thread that waited once has a hub now: destroy it when the thread ends (its
        # thread-local storage is cleared then, in that thread), or its loop's fds would leak.
        _local.guard = _ThreadExitGuard(ctx)
    return ctx


class _ThreadExitGuard:
    __slots__ = ("context",)

    def __init__(self, context: Context) -> None:
        self.context = context

    def __del__(self) -> None:
        ctx = self.context
        if not ctx._dead and ctx.in_own_thread():
            try:
                ctx.destroy()
            except Exception:  # interpreter or thread teardown: nothing left to tell
                pass


def existing_context() -> Context | None:
    """The calling thread's context if it has one, without creating it."""
    return getattr(_local, "context", None)


def main_context() -> Context:
    """The main thread's context.  QEMU: ``qemu_get_aio_context()``.

    From the main thread it is created on first use; from another thread it exists only once
    the main thread has made it (a hub must be created in its own thread), else RuntimeError.
    """
    if threading.current_thread() is threading.main_thread():
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


def _run_iohandler(ready: threading.Event) -> None:
    global _iohandler
    ctx = current_context()
    ctx.name = "qioc-iohandler"
    _iohandler = ctx
    ready.set()
    # The inbox's ref'd async watcher keeps this hub running for the life of the process.
    ctx.hub.join()


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
            ready = threading.Event()
            t = threading.Thread(target=_run_iohandler, args=(ready,), name="qioc-iohandler", daemon=True)
            t.start()
            ready.wait()
    assert _iohandler is not None
    return _iohandler


class Waiter:
    """One park of one greenlet, resumed exactly once by whichever party claims it first."""

    __slots__ = ("context", "greenlet", "_token", "_abandoned", "orphan")

    def __init__(self, context: Context) -> None:
        self.context = context
        self.greenlet = getcurrent()
        self._token = [None]
        self._abandoned = False
        # Called (once, by the party that won the token) if the greenlet can never run again
        # because its context is gone: it releases what the park held (a slot, an fd hold).
        self.orphan: Callable[[], None] | None = None

    def withdraw(self) -> None:
        """Give up a park that never happened (an error raised before switching to the hub),
        after the waiter was already visible to wakers: no delivery may land later."""
        try:
            self._token.pop()
        except IndexError:
            self._abandoned = True

    def _orphan(self) -> None:
        fn, self.orphan = self.orphan, None
        if fn is not None:
            fn()

    @property
    def claimed(self) -> bool:
        return not self._token

    def wake(self, value: Any = None) -> bool:
        """Resume the parked greenlet with ``value`` (an exception instance is raised in it).

        Any thread, never blocks.  Returns False if another party already resumed it.
        """
        try:
            self._token.pop()
        except IndexError:
            return False
        ctx = self.context
        if ctx._dead:  # its thread has ended (its ident may even be reused): never switch
            self._orphan()
            return True
        if threading.get_ident() == ctx.thread_id:
            if getcurrent() is ctx.hub:
                self.greenlet.switch(value)
            else:
                ctx.loop.run_callback(self._deliver, value)
            return True
        try:
            ctx.schedule(self._deliver, value)
        except ContextStoppedError:
            self._orphan()  # its thread is gone, and the greenlet with it
        return True

    def fire(self, value: Any = None) -> None:
        """``wake()`` for callbacks known to run in the waiter's own hub (its io watchers)."""
        try:
            self._token.pop()
        except IndexError:
            return
        self.greenlet.switch(value)

    def _deliver(self, value: Any) -> None:
        if not self._abandoned:
            self.greenlet.switch(value)

    def park(self, timeout: float | None = None) -> Any:
        """Switch to the hub until woken; return the value or raise the exception woken with.

        Raises TimeoutError after ``timeout`` seconds, ContextStoppedError if the context is
        stopping, RuntimeError when called inside a hub.
        """
        ctx = self.context
        hub = ctx.hub
        if self.greenlet is hub:
            self.withdraw()
            raise RuntimeError(
                f"cannot wait inside the hub of context {ctx.name} (a callback must not block)"
            )
        if ctx.stopping:
            self.withdraw()
            raise ContextStoppedError(f"context {ctx.name} is stopping")
        timer = None
        if timeout is not None:
            timer = ctx.loop.timer(max(timeout, 0.0))
            timer.start(self.fire, TIMED_OUT)
        parked = ctx.parked
        parked.add(self)
        try:
            value = hub.switch()
        except BaseException:
            # Left by an exception nobody here sent (gevent.Timeout, kill): take the token so
            # no one resumes us later; if it is gone, a delivery is on its way: drop it.
            try:
                self._token.pop()
            except IndexError:
                self._abandoned = True
            raise
        finally:
            parked.discard(self)
            if timer is not None:
                timer.close()
        if value is TIMED_OUT:
            raise TimeoutError("timed out")
        if isinstance(value, BaseException):
            raise value
        return value


def hub_of_current_thread_is_running_us() -> bool:
    """True when the caller is a hub greenlet (a callback), where waiting is forbidden."""
    ctx = existing_context()
    return ctx is not None and getcurrent() is ctx.hub


# -- waiting on file descriptors ------------------------------------------------------------


def wait_fd_follow(ctx: Context, fd: int, events: int, waiter: Waiter, timeout: float | None) -> Any:
    """Park ``waiter`` until ``fd`` is ready, watched by the waiter's own hub."""
    watcher = ctx.loop.io(fd, events)
    tr = trace
    if tr is None:
        watcher.start(waiter.fire, None)
    else:
        watcher.start(_traced_fire, tr, fd, events, waiter)
    try:
        return waiter.park(timeout)
    finally:
        watcher.close()


def wait_watcher(watcher: Any, waiter: Waiter) -> Any:
    """Park ``waiter`` on an io watcher of its own hub that is kept between waits (no timeout).

    Starting and stopping a kept watcher costs a fraction of making and closing one; the channel
    keeps one per direction for the context that last waited (``Channel._park``).
    """
    # Waiter.park() without a timer, inlined: this is every wait of a busy server.
    ctx = waiter.context
    hub = ctx.hub
    if waiter.greenlet is hub:
        waiter.withdraw()
        raise RuntimeError(f"cannot wait inside the hub of context {ctx.name} (a callback must not block)")
    if ctx.stopping:
        waiter.withdraw()
        raise ContextStoppedError(f"context {ctx.name} is stopping")
    parked = ctx.parked
    parked.add(waiter)
    # Readiness switches straight into the greenlet (a C callable: no Python frame in the hub)
    # without claiming the token; the greenlet claims it on the way out.  If another party
    # (close, wake_read, a stopping context) claimed it first, its delivery is dropped: we are
    # awake already, and what it carried is seen by the next operation (a closed channel, a
    # stopping context refuse the next park).  Either way the greenlet resumes exactly once.
    watcher.start(waiter.greenlet.switch, _READY)
    try:
        value = hub.switch()
    except BaseException:
        try:
            waiter._token.pop()
        except IndexError:
            waiter._abandoned = True
        raise
    finally:
        watcher.stop()
        parked.discard(waiter)
    if value is _READY:
        try:
            waiter._token.pop()
        except IndexError:
            waiter._abandoned = True
        return None
    if value is not None and isinstance(value, BaseException):
        raise value
    return value


class _Ready:
    __slots__ = ()


_READY: Any = _Ready()


def release_watcher(ctx: Context, watcher: Any) -> None:
    """Free a kept (stopped) watcher in its own hub's thread; any thread, never blocks."""
    if threading.get_ident() == ctx.thread_id:
        watcher.close()
        return
    try:
        ctx.schedule(watcher.close)
    except ContextStoppedError:
        pass  # the hub and its loop are gone; the stopped watcher goes with them


def _traced_fire(tr: Callable[[int, int], None], fd: int, events: int, waiter: Waiter) -> None:
    tr(fd, events)
    waiter.fire(None)


class IohandlerWatch:
    """An fd watch that lives on the iohandler hub on behalf of a greenlet parked elsewhere.

    ``start`` and ``cancel`` both run in the iohandler thread, posted in that order; ``on_gone``
    runs there once the watcher is closed (the channel drops its hold on the fd).
    """

    __slots__ = ("fd", "events", "waiter", "on_gone", "_watcher", "_finished", "done")

    def __init__(self, fd: int, events: int, waiter: Waiter, on_gone: Callable[[], None]) -> None:
        self.fd = fd
        self.events = events
        self.waiter = waiter
        self.on_gone = on_gone
        self._watcher: Any = None
        self._finished = False
        self.done = False  # set (iohandler thread) once the watcher is gone; read by the waiter

    def start(self, ctx: Context) -> None:
        if self._finished:
            return
        try:
            w = ctx.loop.io(self.fd, self.events)
        except Exception as exc:  # an fd the loop refuses: wake the waiter with the reason
            self._finish()
            self.waiter.wake(exc)
            return
        self._watcher = w
        w.start(self._ready)

    def _ready(self) -> None:
        tr = trace
        if tr is not None:
            tr(self.fd, self.events)
        self._finish()
        self.waiter.wake(None)

    def cancel(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.done = True
        self.on_gone()


def wait_fd_iohandler(
    ctx: Context, fd: int, events: int, waiter: Waiter, timeout: float | None, on_gone: Callable[[], None]
) -> Any:
    """Park ``waiter`` until ``fd`` is ready, watched by the iohandler hub.

    ``on_gone`` is called (in the iohandler thread) once that hub has dropped its watcher.
    """
    ioh = iohandler_context()
    watch = IohandlerWatch(fd, events, waiter, on_gone)
    then = waiter.orphan

    def orphaned() -> None:
        ioh.schedule(watch.cancel)
        if then is not None:
            then()

    waiter.orphan = orphaned
    ioh.schedule(watch.start, ioh)
    try:
        return waiter.park(timeout)
    finally:
        if not watch.done:
            try:
                ioh.schedule(watch.cancel)
            except ContextStoppedError:
                on_gone()


def sleep(seconds: float) -> None:
    """Park the calling greenlet for ``seconds`` on its own thread's hub."""
    gevent.sleep(seconds)
