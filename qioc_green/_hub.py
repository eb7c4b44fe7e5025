"""The hub boundary: with ``_context``, the only module that touches gevent, greenlet, hubs, loops
and watchers.  Everything else in qioc_green calls the names below (a test of the parsed source
holds every other module to it).

The facts
---------
* gevent gives each OS thread its own hub (a greenlet running a libev loop).  A hub and its loop
  belong to that thread: watchers are created, started, stopped and closed there, and only an
  async watcher's ``send()`` may be called from elsewhere.
* A greenlet never changes thread.  It "waits" by switching to its thread's hub; whoever wakes it
  must switch back into it *from that thread's hub*.
* A hub whose loop has nothing ref'd to wait for raises ``LoopExit`` (and ``gevent.wait()``
  returns).  A hub that only waits for other threads (an IOThread with nothing to do yet) must
  not, so an IOThread's inbox watcher is always ref'd; the main thread's is ref'd only while one
  of its greenlets is parked waiting for a wake that travels through the inbox (counted by
  ``inbox_waits``; a wait on a kept io watcher is kept alive by that watcher).
* ``gevent.monkey.patch_all()`` replaces ``threading``, ``_thread``, ``socket``, ``select`` and
  ``subprocess`` with greenlet-based versions.  Cross-thread code built on them turns into
  greenlets of one thread.  gevent keeps the originals (``monkey.get_original``); we take them
  here, once, and the rest of the library uses only these.

What that means for us
----------------------
* The **OS primitives** (``OSLock``, ``OSEvent``, ``OSThread``, ``ThreadLocal``,
  ``thread_ident``, the plain socket, poll and Popen) are the unpatched ones, whether the program
  patched before or after importing qioc_green.
* A **ThreadHub** is one thread's hub plus an inbox: a deque that any thread may append to, and
  the async watcher that tells the owning hub to drain it.  ``schedule()`` is the only thing that
  crosses threads.  ``_context.Context`` builds QEMU's AioContext on it.
* A **Waiter** is one park of one greenlet.  Several parties may race to resume it: readiness of
  an fd (seen by this thread's hub, or by the iohandler's), ``wake_read()`` from any thread,
  ``close()`` from any thread, a timer, a stopping context.  The right to resume is one token,
  claimed by ``Waiter.claim()`` (``list.pop()``, atomic: QEMU's ``qatomic_xchg`` on
  ``ioc->read_coroutine``).  The winner resumes the greenlet: directly when it runs in the
  greenlet's own hub, through the greenlet's inbox otherwise.  A greenlet that leaves its park by
  an exception it did not get from us (``gevent.Timeout``, ``kill()``) claims the token itself on
  the way out; if it loses, a delivery is already posted, so it marks itself abandoned and the
  delivery drops.  Exactly one resume, no lost wake.
* **Follow** waits watch the fd on the waiter's own hub (``wait_fd``, or a ``KeptWatcher`` reused
  between waits); **iohandler** waits watch it on the iohandler's hub (``IohandlerWatch``), and
  readiness resumes the greenlet through its own thread's inbox.  Both the start and the cancel of
  that watcher travel through the iohandler's inbox, in order, so a cancel can never overtake the
  start it cancels.
* **Sources** are ``add_watch()``'s watchers: an io watcher on an fd, or an idle watcher for
  channels that are always ready.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey
from gevent._hub_local import get_hub_if_exists  # public in that module's __all__; no public twin
from gevent.hub import Hub, get_hub
from greenlet import GreenletExit, getcurrent

from . import _native
from .errors import ContextStoppedError

# -- the OS's own primitives, whatever gevent's monkey patched ------------------------------------

_start_new_thread, OSLock, OSRLock, thread_ident, ThreadLocal = monkey.get_original(
    "_thread", ["start_new_thread", "allocate_lock", "RLock", "get_ident", "_local"]
)
PlainSocket, plain_socketpair, plain_getaddrinfo = monkey.get_original(
    "socket", ["socket", "socketpair", "getaddrinfo"]
)
plain_poll = monkey.get_original("select", "poll")
LockType = _thread.LockType
PlainPopen = monkey.get_original("subprocess", "Popen")


class OSEvent:
    """A one-shot flag one OS thread waits for and another sets (an unpatched lock)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = OSLock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass  # already set

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling OS thread (not just the greenlet) until set."""
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._lock.release()
            return True
        return False


def is_main_thread() -> bool:
    """True in the process's main OS thread (gevent's patching makes ``threading`` say so of
    greenlets; the native thread id does not lie)."""
    return threading.get_native_id() == threading.main_thread().native_id


def thread_name() -> str:
    return threading.current_thread().name


class OSThread:
    """A real OS thread running ``target()``, whatever gevent's monkey patched.

    With ``threading`` unpatched it is a ``threading.Thread`` (its name shows in
    ``threading.enumerate()`` and ``current_thread()``); patched, ``threading.Thread`` would start
    a greenlet, so the thread is started with the original ``_thread.start_new_thread``.
    """

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        self.name = name
        self.ident: int | None = None
        self._target = target
        self._thread: threading.Thread | None = None
        self._finished: Any = None

    def start(self) -> None:
        if not monkey.is_module_patched("threading"):
            self._thread = threading.Thread(target=self._target, name=self.name, daemon=True)
            self._thread.start()
            self.ident = self._thread.ident
            return
        self._finished = OSLock()
        self._finished.acquire()
        self.ident = _start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self._finished.release()

    def is_alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return self._finished is not None and self._finished.locked()

    def join(self, timeout: float | None = None) -> bool:
        """Block the calling OS thread until the thread has ended; False after ``timeout``."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        if self._finished is None:
            return True
        if self._finished.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._finished.release()
            return True
        return False


# -- a thread's hub and its inbox ---------------------------------------------------------------

READ = 1  # libev EV_READ
WRITE = 2  # libev EV_WRITE

# Experiments only (bench/scaling.py): QIOC_BATCH_GIL=0, QIOC_FAIR_GIL=0 turn the batching off.
BATCH_GIL = os.environ.get("QIOC_BATCH_GIL", "1") != "0"
FAIR_GIL = os.environ.get("QIOC_FAIR_GIL", "1") != "0"


def batch_gil(loop: Any, fair: bool, auto_placement: bool = False) -> bool:
    """Run each iteration's ready watchers of ``loop`` under one GIL acquisition, taking turns
    with the other batched hubs if ``fair`` (``_speedups.hook_loop``); with ``auto_placement``
    the calling thread joins the placement chosen by measurement (``IOThreadPool``).  The
    loop's own thread, before it runs.  False (nothing changed) without the compiled hot path
    or for a loop that is not gevent's libev extension."""
    sp = _native.speedups
    if sp is None:
        return False
    module = sys.modules.get(type(loop).__module__)
    path = getattr(module, "__file__", None)
    try:
        ptr = int(loop.ptr)
    except (AttributeError, TypeError, ValueError):
        return False
    if not path or not ptr:
        return False
    return bool(sp.hook_loop(ptr, path, fair, auto_placement))


def placement_stats() -> dict[str, Any] | None:
    """The compiled hot path's GIL and placement counters (``_speedups.gil_stats``), or None."""
    sp = _native.speedups
    return None if sp is None else dict(sp.gil_stats())


def can_batch_gil() -> bool:
    """True if hubs made now will batch their GIL (the compiled hot path, gevent's libev loop)."""
    if _native.speedups is None or not BATCH_GIL:
        return False
    loop_type = type(get_hub().loop) if get_hub_if_exists() is not None else None
    if loop_type is not None:
        return loop_type.__module__ == "gevent.libev.corecext"
    from gevent import config  # the loop a new hub would make, without making one
    return bool(getattr(config.loop, "__module__", "") == "gevent.libev.corecext")


def unbatch_gil(loop: Any) -> None:
    sp = _native.speedups
    if sp is not None:
        sp.unhook_loop(int(loop.ptr))


# Set by tests (``qioc_green.testing.trace_readiness``) to see which thread saw an fd get ready.
trace: Callable[[int, int], None] | None = None


class ThreadHub:
    """The calling thread's gevent hub plus a thread-safe inbox.  Made in its own thread.

    ``keep_alive``: keep the inbox watcher ref'd for good (a thread that waits only for others);
    otherwise it is ref'd only while a greenlet is parked here (``Waiter.park``).
    """

    def __init__(self, name: str, *, keep_alive: bool) -> None:
        self.name = name
        self.hub = get_hub()
        self.loop = self.hub.loop
        self.thread_id = thread_ident()
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = OSLock()  # guards _dead against a send() racing close_inbox()
        self._dead = False
        self.stopping = False
        self.destroying = False  # set once the hub is being destroyed: no greenlet of it runs again
        self.keep_alive = keep_alive
        self.parked: set[Waiter] = set()
        self.inbox_waits = 0  # Waiter.park()s outstanding here, which need the inbox ref'd
        self.watches: set[Any] = set()  # add_watch() watches started on this hub
        self.tasks: set[Any] = set()  # greenlets started by spawn(), killed when the context stops
        self._yield_watcher: Any = None
        # One GIL acquisition per loop iteration (compiled hot path only; see batch_gil()).
        self.gil_batched = keep_alive and BATCH_GIL and batch_gil(self.loop, FAIR_GIL)
        self._async = self.loop.async_(ref=keep_alive)
        self._async.start(self._drain)
        root = getcurrent()
        while root.parent is not None:
            root = root.parent
        self.root = root  # the thread's main greenlet

    @property
    def dead(self) -> bool:
        """True once the inbox is closed (the hub is being or has been destroyed)."""
        return self._dead

    def schedule(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in this thread soon, from its hub.  Thread-safe; never blocks.

        ``fn`` runs inside the hub, so it must not wait.  Raises ContextStoppedError once the
        inbox is closed.  QEMU: ``aio_bh_schedule_oneshot()``.
        """
        if thread_ident() == self.thread_id and not self._dead:
            self.loop.run_callback(fn, *args)
            return
        with self._lock:
            if self._dead:
                raise ContextStoppedError(f"context {self.name} is stopped")
            self._inbox.append((fn, args))
            self._async.send()

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:
                self.hub.handle_error(fn, *sys.exc_info())

    def inbox_pending(self) -> bool:
        return bool(self._inbox)

    def in_own_thread(self) -> bool:
        return thread_ident() == self.thread_id

    def report_error(self, where: Any) -> None:
        """Report the exception being handled the way the hub reports a callback's (stderr)."""
        self.hub.handle_error(where, *sys.exc_info())

    def join_auto_placement(self) -> bool:
        """Let measurement place this hub's thread (pinned with the pool's other hubs, or
        spread; see ``IOThreadPool``).  Its own thread.  False without the compiled hot path."""
        if not self.gil_batched:
            return False
        return batch_gil(self.loop, FAIR_GIL, True)

    def set_yield_each_iteration(self, enabled: bool) -> None:
        """Call ``os.sched_yield()`` once per loop iteration (see ``IOThreadPool(pin=...)``).

        Must be called in the hub's own thread.
        """
        if enabled and self._yield_watcher is None:
            w = self.loop.prepare(ref=False)
            w.start(os.sched_yield)
            self._yield_watcher = w
        elif not enabled and self._yield_watcher is not None:
            self._yield_watcher.close()
            self._yield_watcher = None

    def close_inbox(self) -> None:
        """Refuse further ``schedule()`` calls (ContextStoppedError); what was accepted stays
        queued.  Any thread."""
        with self._lock:
            self._dead = True

    def take_inbox(self) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """What the inbox had accepted and not run yet (after ``close_inbox``)."""
        items = list(self._inbox)
        self._inbox.clear()
        return items

    def destroy_hub(self) -> None:
        """Destroy the hub and, unless it is the default one, its loop.  Own thread, last."""
        assert self.in_own_thread()
        self.set_yield_each_iteration(False)
        if self.gil_batched:
            unbatch_gil(self.loop)
            self.gil_batched = False
        self._async.close()
        self.hub.destroy(destroy_loop=not self.loop.default)


def current_greenlet() -> Any:
    return getcurrent()


def thread_has_hub() -> bool:
    """True if the calling thread has a gevent hub already (without making one)."""
    return get_hub_if_exists() is not None


def in_hub() -> bool:
    """True when the caller runs inside its thread's hub (a callback), where waiting is forbidden."""
    return isinstance(getcurrent(), Hub)


# -- one park of one greenlet --------------------------------------------------------------------


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


TIMED_OUT: Any = _Marker("timed out")
_READY: Any = _Marker("ready")


class Waiter:
    """One park of one greenlet, resumed exactly once by whichever party claims it first."""

    __slots__ = ("home", "greenlet", "_token", "_abandoned", "orphan")

    def __init__(self, home: ThreadHub) -> None:
        self.home = home
        self.greenlet = getcurrent()
        self._token = [None]
        self._abandoned = False
        # Called (once, with this waiter, by the party that won the token) if the greenlet can
        # never run again because its thread is gone: it releases what the park held.
        self.orphan: Callable[[Waiter], None] | None = None

    def claim(self) -> bool:
        """Take the one right to resume this park.  Atomic; True for exactly one caller."""
        try:
            self._token.pop()
        except IndexError:
            return False
        return True

    def leave(self) -> None:
        """The greenlet gives up its park (an error before parking, or an exception nobody here
        sent): if a waker already won, its delivery is dropped when it arrives."""
        if not self.claim():
            self._abandoned = True

    def _orphan(self) -> None:
        fn, self.orphan = self.orphan, None
        if fn is not None:
            fn(self)

    @property
    def claimed(self) -> bool:
        return not self._token

    def wake(self, value: Any = None) -> bool:
        """Resume the parked greenlet with ``value`` (an exception instance is raised in it).

        Any thread, never blocks.  Returns False if another party already resumed it.
        """
        if not self.claim():
            return False
        home = self.home
        if home._dead:  # its thread has ended (its ident may even be reused): never switch
            self._orphan()
            return True
        if thread_ident() == home.thread_id:
            if getcurrent() is home.hub:
                self.greenlet.switch(value)
            else:
                home.loop.run_callback(self._deliver, value)
            return True
        try:
            home.schedule(self._deliver, value)
        except ContextStoppedError:
            self._orphan()  # its thread is gone, and the greenlet with it
        return True

    def fire(self, value: Any = None) -> None:
        """``wake()`` for callbacks known to run in the waiter's own hub (its io watchers)."""
        if self.claim():
            self.greenlet.switch(value)

    def _deliver(self, value: Any) -> None:
        if self.home.destroying:  # run by a hub being destroyed: the greenlet can never run again
            self._orphan()
        elif not self._abandoned:
            self.greenlet.switch(value)

    def _check_can_park(self) -> None:
        home = self.home
        if self.greenlet is home.hub:
            self.leave()
            raise RuntimeError(f"cannot wait inside the hub of context {home.name} (a callback must not block)")
        if home.stopping:
            self.leave()
            raise ContextStoppedError(f"context {home.name} is stopping")

    def park(self, timeout: float | None = None) -> Any:
        """Switch to the hub until woken; return the value or raise the exception woken with.

        Raises TimeoutError after ``timeout`` seconds, ContextStoppedError if the context is
        stopping, RuntimeError when called inside a hub.
        """
        self._check_can_park()
        home = self.home
        timer = None
        if timeout is not None:
            timer = home.loop.timer(max(timeout, 0.0))
            # From the clock's now, not the loop's cached one (which would end the wait early).
            timer.start(self.fire, TIMED_OUT, update=True)
        parked = home.parked
        # A wake may come only through the inbox: keep the loop alive while any park of this
        # kind is outstanding.  Counted on its own: ``parked`` also holds KeptWatcher waits,
        # which keep the loop alive by their io watcher and never touch the ref.
        counted = not home.keep_alive
        if counted:
            n = home.inbox_waits
            home.inbox_waits = n + 1
            if not n:
                home._async.ref = True
        parked.add(self)
        try:
            value = home.hub.switch()
        except BaseException:
            self.leave()
            raise
        finally:
            parked.discard(self)
            if counted:
                n = home.inbox_waits - 1
                home.inbox_waits = n
                if not n:
                    home._async.ref = False
            if timer is not None:
                timer.close()
        if value is TIMED_OUT:
            raise TimeoutError("timed out")
        if isinstance(value, BaseException):
            raise value
        return value


# -- waiting on file descriptors ------------------------------------------------------------------


def wait_fd(waiter: Waiter, fd: int, events: int, timeout: float | None) -> Any:
    """Park ``waiter`` until ``fd`` is ready, watched by the waiter's own hub."""
    watcher = waiter.home.loop.io(fd, events)
    tr = trace
    if tr is None:
        watcher.start(waiter.fire, None)
    else:
        watcher.start(_traced_fire, tr, fd, events, waiter)
    try:
        return waiter.park(timeout)
    finally:
        watcher.close()


def _traced_fire(tr: Callable[[int, int], None], fd: int, events: int, waiter: Waiter) -> None:
    tr(fd, events)
    waiter.fire(None)


class KeptWatcher:
    """An io watcher on one hub, kept between waits (no timeout): starting and stopping a kept
    watcher costs a fraction of making and closing one.  Only its hub's thread uses it."""

    __slots__ = ("home", "_watcher")

    def __init__(self, home: ThreadHub, fd: int, events: int) -> None:
        self.home = home
        self._watcher = home.loop.io(fd, events)

    def wait(self, waiter: Waiter) -> Any:
        """Park ``waiter`` (of this hub) until the fd is ready or it is woken."""
        # Waiter.park() without a timer, unrolled: this is every wait of a busy server.
        home = waiter.home
        if waiter.greenlet is home.hub or home.stopping:
            waiter._check_can_park()  # raises RuntimeError or ContextStoppedError
        parked = home.parked
        parked.add(waiter)
        # Readiness switches straight into the greenlet (a C callable: no Python frame in the
        # hub) without claiming the token; the greenlet claims it on the way out.  If another
        # party (close, wake_read, a stopping context) claimed it first, its delivery is
        # dropped: we are awake already, and what it carried is seen by the next operation (a
        # closed channel, a stopping context refuse the next park).  Either way the greenlet
        # resumes exactly once.
        watcher = self._watcher
        watcher.start(waiter.greenlet.switch, _READY)
        try:
            value = home.hub.switch()
        except BaseException:
            waiter.leave()
            raise
        finally:
            watcher.stop()
            parked.discard(waiter)
        if value is _READY:
            try:  # waiter.leave(), inlined
                waiter._token.pop()
            except IndexError:
                waiter._abandoned = True
            return None
        if isinstance(value, BaseException):
            raise value
        return value

    def release(self) -> None:
        """Free the (stopped) watcher in its own hub's thread.  Any thread, never blocks."""
        home = self.home
        if home._dead:
            return  # the hub and its loop are gone (or going); the watcher goes with them
        if thread_ident() == home.thread_id:
            self._watcher.close()
            return
        try:
            home.schedule(self._watcher.close)
        except ContextStoppedError:
            pass


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

    def start(self, ioh: ThreadHub) -> None:
        if self._finished:
            return
        try:
            w = ioh.loop.io(self.fd, self.events)
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


def wait_fd_iohandler(ioh: ThreadHub, waiter: Waiter, fd: int, events: int, timeout: float | None,
                      on_gone: Callable[[], None]) -> Any:
    """Park ``waiter`` until ``fd`` is ready, watched by the iohandler hub ``ioh``.

    ``on_gone`` is called (in the iohandler thread) once that hub has dropped its watcher.
    """
    watch = IohandlerWatch(fd, events, waiter, on_gone)
    then = waiter.orphan

    def orphaned(w: Waiter) -> None:
        ioh.schedule(watch.cancel)
        if then is not None:
            then(w)

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


# -- add_watch() sources ---------------------------------------------------------------------------


class Source:
    """The watcher behind one ``add_watch()``: an io watcher on ``fd``, or (``fd`` None, a channel
    that is always ready) an idle watcher.  Made, started and closed in ``home``'s thread."""

    __slots__ = ("_watcher",)

    def __init__(self, home: ThreadHub, fd: int | None, events: int, callback: Callable[[], Any]) -> None:
        self._watcher = home.loop.idle() if fd is None else home.loop.io(fd, events)
        self._watcher.start(callback)

    def close(self) -> None:
        self._watcher.close()


# -- greenlets -----------------------------------------------------------------------------------


def sleep(seconds: float) -> None:
    """Park the calling greenlet for ``seconds`` on its own thread's hub (0: one loop turn)."""
    gevent.sleep(seconds)


def spawn_here(fn: Callable[..., Any], *args: Any, tasks: set[Any] | None = None,
               on_exit: Callable[[Any], Any] | None = None) -> Any:
    """Start ``fn(*args)`` as a greenlet of the calling thread's hub; it is in ``tasks`` while it
    runs, and ``on_exit(greenlet)`` runs in the hub once it has ended (even killed before it
    started).  Never switches."""
    g = gevent.spawn(fn, *args)
    if tasks is not None:
        tasks.add(g)
        g.rawlink(tasks.discard)
    if on_exit is not None:
        g.rawlink(on_exit)
    return g


def kill_soon(greenlet: Any) -> None:
    """Raise GreenletExit in ``greenlet`` at its hub's next turn.  Its own thread; never switches."""
    greenlet.kill(block=False)


def kill_all(greenlets: list[Any], timeout: float) -> list[Any]:
    """Kill ``greenlets`` (of this thread) and wait for them up to ``timeout``; return those
    still alive then.  Parks.  (Not ``gevent.killall(timeout=)``, which raises Timeout when a
    greenlet's clean-up outlasts it.)"""
    for g in greenlets:
        g.kill(block=False)
    gevent.joinall(greenlets, timeout=timeout)
    return [g for g in greenlets if not g.dead]


__all__ = [
    "BATCH_GIL",
    "FAIR_GIL",
    "GreenletExit",
    "IohandlerWatch",
    "KeptWatcher",
    "LockType",
    "OSEvent",
    "OSLock",
    "OSRLock",
    "OSThread",
    "PlainPopen",
    "PlainSocket",
    "READ",
    "Source",
    "TIMED_OUT",
    "ThreadHub",
    "ThreadLocal",
    "WRITE",
    "Waiter",
    "batch_gil",
    "can_batch_gil",
    "current_greenlet",
    "in_hub",
    "is_main_thread",
    "kill_all",
    "kill_soon",
    "placement_stats",
    "plain_getaddrinfo",
    "plain_poll",
    "plain_socketpair",
    "sleep",
    "spawn_here",
    "thread_has_hub",
    "thread_ident",
    "thread_name",
    "trace",
    "unbatch_gil",
    "wait_fd",
    "wait_fd_iohandler",
]
