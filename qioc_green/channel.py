"""The Channel base class: QEMU's QIOChannel, with its waits following the calling greenlet.

A channel kind implements a few non-blocking hooks (QEMU's ``QIOChannelClass`` vtable):

=========================  =====================================================================
``_io_readv``              read into a list of buffers; may take fds; ``BlockingIOError`` if it
                           would block; 0 bytes at EOF
``_io_readinto``           the same for one buffer (defaults to ``_io_readv``)
``_io_read``               read up to n bytes as bytes (defaults to ``_io_readinto``)
``_io_writev``             write a list of buffers, with fds; may be partial
``_io_write``              the same for one buffer (defaults to ``_io_writev``)
``_io_fd(cond)``           the fd to watch for ``IOCondition.IN`` or ``OUT``, or None for a
                           direction that never waits (regular files, memory)
``_io_close``              release the OS resources; called once, when nothing uses them any more
``_io_shutdown``, ``_io_seek``, ``_io_set_delay``, ``_io_set_cork``, ``_io_flush``: optional
=========================  =====================================================================

Everything that blocks has one shape (QEMU's ``qio_channel_readv_full_all_eof``): try the hook;
on ``BlockingIOError`` park the calling greenlet until the fd is ready (or raise WouldBlock in
non-blocking mode); retry on EINTR; translate any other OSError (a ``ChannelError`` a hook
raises is its own verdict and passes unchanged: NotSupportedError is an
``io.UnsupportedOperation``, hence an OSError too, and a TLS handshake's BrokenChannelError a
ConnectionError).  That loop is ``_retry``; the ``*_all`` calls loop over it, counting progress.
Two copies of it are unrolled by hand for speed, ``_read_some`` (every ``read``/``read_all``)
and the first try of ``write_all``: each is marked "change both", and kept identical to
``_retry``.  Where a direction waits (its slot, its kept
watcher, the busy/closed/orphan checks) is ``Direction``; watches are ``channel_watch``.

The file descriptor's lifetime
------------------------------
``close()`` may come from any thread while greenlets of other threads are parked on the channel,
or are in the middle of a syscall on it.  Closing the fd then would let the kernel hand its number
to the next ``open()`` while a watcher or a syscall still uses it: a read from the wrong file, or
libev's EBADF noise.  So every user of the fd holds it: each operation while it runs, each watcher
(on this thread's hub, or on the iohandler's) until it is closed, and the channel itself until
``close()``.  A hold is one element in a list (``append``/``pop`` are atomic), and whoever drops
the last one after ``close()`` runs ``_io_close`` (once, by a token).  ``close()`` therefore only
marks the channel closed, wakes every parked greenlet with ChannelClosedError, and drops the
channel's own hold; the fd is closed when the woken greenlets have left their watchers.

An interrupted ``*_all`` read
-----------------------------
A ``*_all`` read that ends early never loses the bytes it took, nor hands them over twice: they
go back to the channel, and the next read returns them first (as asyncio's ``readexactly`` leaves
them in its buffer when cancelled).  Only when no later read could return them do they ride on
the exception's ``partial`` instead: ``UnexpectedEOF`` (the peer closed) and
``ChannelClosedError`` (we closed).  See ``Channel``.
"""

from __future__ import annotations

import itertools
import os
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

from . import _hub, _native
from ._buffers import Buffer, advance, fill, head, nbytes, read_only, views, writable_views
from ._context import Context, current_context, iohandler_context, this_thread
from .channel_watch import Watch
from .errors import (
    ChannelBusyError,
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    NotSupportedError,
    UnexpectedEOF,
    WouldBlock,
    add_progress,
    from_os_error,
)


class IOCondition(IntFlag):
    """GLib's GIOCondition values, as QEMU uses them."""

    IN = 1
    PRI = 2
    OUT = 4
    ERR = 8
    HUP = 16


class ReadFlag(IntFlag):
    NONE = 0
    MSG_PEEK = 1


class WriteFlag(IntFlag):
    NONE = 0
    ZERO_COPY = 1


class Shutdown(IntFlag):
    READ = 1
    WRITE = 2
    BOTH = 3


class Feature(IntFlag):
    FD_PASS = 1
    SHUTDOWN = 2
    LISTEN = 4
    WRITE_ZERO_COPY = 8
    READ_MSG_PEEK = 16
    SEEKABLE = 32


_NO_READ_FLAGS: Any = 0  # read()'s default: a plain 0 costs nothing to test or pass on
_IN = IOCondition.IN
_OUT = IOCondition.OUT
# Plain ints for the hot paths: IntFlag arithmetic costs a Python call per operation.
_F_FD_PASS = int(Feature.FD_PASS)
_F_PEEK = int(Feature.READ_MSG_PEEK)
_F_ZERO_COPY = int(Feature.WRITE_ZERO_COPY)
_F_SEEKABLE = int(Feature.SEEKABLE)
_F_SHUTDOWN = int(Feature.SHUTDOWN)
# The compiled hot path's syscalls (None without it): they return a code for "would block"
# instead of raising, and keep the GIL (see _native and _speedups.c).
_sp = _native.speedups
_recv = _sp.recv if _sp is not None else None
_send = _sp.send if _sp is not None else None
_MSG_PEEK = 2  # Linux's MSG_PEEK, for ReadFlag.MSG_PEEK
# Larger transfers take the kind's hook (the socket module releases the GIL for the whole copy).
_SMALL = 65536
# The first read of a read_all(n) asks for at most this much; later reads grow with what arrived
# (at most doubling), so a length field from a peer never costs its full size up front.
_FIRST_READ = 1 << 20


def deadline(timeout: float | None) -> float | None:
    """The monotonic time at which ``timeout`` seconds from now are up (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


@dataclass(frozen=True)
class ChannelStatistics:
    """What a channel is doing at one instant (trio's ``statistics()``).  See ``Channel.statistics``."""

    readers_waiting: int  # greenlets parked to read (QEMU allows one)
    writers_waiting: int  # greenlets parked to write
    holds: int  # users of the fd: the channel itself until close(), each running call, each watcher
    watches: int  # add_watch() watches not yet gone
    unread: int  # bytes an interrupted *_all read gave back, returned by the next read
    closed: bool  # close() was called
    released: bool  # the fd (and whatever else the kind holds) has been released


def _ready_now(fd: int, events: int) -> bool:
    """Whether ``fd`` is ready for ``events`` (``_hub.READ``/``WRITE``) at this instant.  Never waits."""
    poller = _hub.plain_poll()
    poller.register(fd, select.POLLIN if events == _hub.READ else select.POLLOUT)
    return bool(poller.poll(0))


class Direction:
    """One direction of a channel: who is parked in it, its kept watcher, and how it parks.

    A kind whose waits are another channel's replaces ``park`` (``channel_tls``).

    At most one greenlet may be parked per direction (ChannelBusyError for a second).  The
    parked greenlet's Waiter sits in ``slot`` while it is parked, so that ``close()``,
    ``wake_read()`` and a stopping context can find it.
    """

    __slots__ = ("channel", "cond", "events", "verb", "slot", "kept", "_orphaned_cb")

    def __init__(self, channel: Channel, cond: IOCondition) -> None:
        self.channel = channel
        self.cond = cond
        self.events = _hub.READ if cond is _IN else _hub.WRITE
        self.verb = "read" if cond is _IN else "write"
        self.slot: list[_hub.Waiter] = []
        # A follow-mode watcher kept between waits, for the context that last waited here (only
        # that context's thread starts and stops it); released by the channel's _finalize.
        self.kept: _hub.KeptWatcher | None = None
        self._orphaned_cb = self._orphaned

    def park(self, deadline: float | None) -> None:
        """Park the calling greenlet until this direction may be ready, or it is woken.

        The caller holds the fd.  Raises ChannelBusyError, ChannelClosedError,
        ChannelTimeoutError, ContextStoppedError; RuntimeError inside a hub.
        """
        ch = self.channel
        kept = self.kept
        if kept is not None and deadline is None and ch._follow and _hub.trace is None:
            # The hot path (a server's handler): follow on, no deadline, and a watcher kept on
            # this very hub from the last wait in this direction.  Same steps as below, fewer.
            home = kept.home
            if home is getattr(this_thread, "context", None):
                waiter = _hub.Waiter(home)
                slot = self.slot
                slot.append(waiter)  # visible to wakers: every exit must leave or park
                try:
                    if slot[0] is not waiter or ch._closed:
                        self._check(waiter)  # raises ChannelBusyError or ChannelClosedError
                    waiter.orphan = self._orphaned_cb
                    kept.wait(waiter)
                    return
                finally:
                    waiter.orphan = None
                    try:
                        slot.remove(waiter)
                    except ValueError:
                        pass  # released by an orphaning wake
        fd = ch._io_fd(self.cond)
        if fd is None:
            return
        ctx = current_context()  # looked up at every wait, never stored (semantics 1)
        waiter = _hub.Waiter(ctx)
        slot = self.slot
        slot.append(waiter)  # from here on wakers can see it: every exit must leave or park
        try:
            self._check(waiter)
            # If this greenlet's thread ends while it is parked, whoever wins the wake releases
            # what this call holds: its slot and the operation's hold on the fd.
            waiter.orphan = self._orphaned_cb
            if ch._follow and deadline is None and _hub.trace is None and (kept is None or kept.home.dead):
                # First follow-mode wait in this direction (or its hub is gone): keep a watcher.
                kept = self.kept = _hub.KeptWatcher(ctx, fd, self.events)
                kept.wait(waiter)
                return
            timeout = None if deadline is None else deadline - time.monotonic()
            try:
                if ch._follow:
                    _hub.wait_fd(waiter, fd, self.events, timeout)
                else:
                    ch._holds.append(None)  # the iohandler's watcher holds the fd until it is gone
                    _hub.wait_fd_iohandler(iohandler_context(), waiter, fd, self.events, timeout, ch._leave)
            except TimeoutError:
                # The timer and readiness can come in the same loop turn, and a deadline already
                # up (timeout=0) always beats the watcher: if the fd is ready now, it has won.
                if _ready_now(fd, self.events):
                    return
                raise ChannelTimeoutError(f"{ch._name}: timed out waiting to {self.verb}") from None
        finally:
            waiter.orphan = None
            try:
                slot.remove(waiter)
            except ValueError:
                pass

    def _check(self, waiter: _hub.Waiter) -> None:
        ch = self.channel
        if self.slot[0] is not waiter:
            waiter.leave()
            raise ChannelBusyError(f"{ch._name}: another greenlet is already waiting to {self.verb}")
        if ch._closed:  # close() ran after the caller's _enter but before it could see us
            waiter.leave()
            raise ChannelClosedError(f"{ch._name}: channel is closed")

    def _orphaned(self, waiter: _hub.Waiter) -> None:
        try:
            self.slot.remove(waiter)
        except ValueError:
            return
        self.channel._leave()

    def wake_all(self, value: Any) -> None:
        """Resume whoever is parked here with ``value``.  Any thread; never switches."""
        for waiter in list(self.slot):
            waiter.wake(value)

    def release_kept(self) -> None:
        kept, self.kept = self.kept, None
        if kept is not None:
            kept.release()


class Channel:
    """A bidirectional byte channel whose blocking calls park the calling greenlet.

    Blocking calls (all reads, writes, ``yield_``, ``accept``...) park the calling greenlet on
    the hub of its own thread when the channel is not ready, so other greenlets of that thread
    run meanwhile; called from a thread's main greenlet they run that thread's hub until done.
    They never run inside a hub callback (RuntimeError).  With ``set_blocking(False)`` they
    raise WouldBlock instead of parking.

    Where the wait is watched (DESIGN semantics 1-2): with ``follow_coroutine_ctx`` true, by the
    hub of the calling greenlet's thread, looked up at every wait; with it false (the default,
    as in QEMU), by the iohandler context's hub, which resumes the greenlet through its own
    thread's inbox.  Either way the greenlet resumes in its own thread.

    At most one greenlet may be parked per direction (ChannelBusyError for a second); a reader
    and a writer may be parked at once, in different threads.

    **Interrupted ``*_all`` reads** (``read_all``, ``read_all_eof``, ``readinto_all``,
    ``readv_all``, ``readv_all_eof``, ``readv_full_all``, ``readv_full_all_eof``): whatever ends
    one early, the bytes it had taken reach the caller exactly once.  They are given back to the
    channel, and the next read returns them first, when it ends by ``timeout=``
    (ChannelTimeoutError), ``gevent.Timeout``, WouldBlock in non-blocking mode, ``kill()``, a
    stopping context, a broken connection, or any other exception; the exception's ``done``
    counts them, its ``partial`` is empty.  They ride on the exception's ``partial`` instead, and
    are not given back, when no later read could return them: UnexpectedEOF (the peer closed
    after some bytes) and ChannelClosedError (the channel was closed while the call waited).
    fds a ``readv_full_all`` had received are closed either way.
    """

    kind = "channel"
    _counter = itertools.count(1)
    # A kind whose fd is a stream socket that recv(2)/send(2) serve sets this to the fd when the
    # compiled hot path is present: read()/read_all() and write_all() then call it directly.
    _sock_fd = -1

    def __init__(self, *, name: str | None = None, features: int = 0) -> None:
        self._name = name or f"{self.kind}-{next(Channel._counter)}"
        self._features = int(features)
        self._follow = False
        self._blocking = True
        self._closed = False
        self._close_token = [None]
        self._io_close_token = [None]
        self._holds: list[None] = [None]  # the channel's own hold, dropped by close()
        self._rd = Direction(self, _IN)
        self._wr = Direction(self, _OUT)
        self._watches: set[Watch] = set()
        self._wait_efd: int | None = None
        self._wait_lock = _hub.OSLock()
        self._unread = b""  # given back by an interrupted *_all read; the next read takes it first
        # The read prediction (see _read_some): the last read parked, and a write came after it.
        self._rd_parked = False
        self._wrote = False

    # -- hooks for channel kinds ---------------------------------------------------------------

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        raise NotImplementedError

    def _io_readinto(self, buf: memoryview, flags: int) -> int:
        return self._io_readv([buf], 0, flags)[0]

    def _io_read(self, n: int, flags: int) -> bytes:
        buf = bytearray(n)
        got = self._io_readinto(memoryview(buf), flags)
        del buf[got:]
        return bytes(buf)

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        raise NotImplementedError

    def _io_write(self, buf: memoryview) -> int:
        return self._io_writev([buf], (), 0)

    def _io_fd(self, cond: IOCondition) -> int | None:
        return None

    def _io_close(self) -> None:
        pass

    def _io_shutdown(self, how: Shutdown) -> None:
        raise NotSupportedError(f"{self._name}: shutdown is not supported")

    def _io_seek(self, offset: int, whence: int) -> int:
        raise NotSupportedError(f"{self._name}: seek is not supported")

    def _io_set_delay(self, enabled: bool) -> None:
        pass

    def _io_set_cork(self, enabled: bool) -> None:
        pass

    def _io_flush(self) -> None:
        pass

    # -- names, features, flags ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    def set_name(self, name: str) -> None:
        """Name the channel; errors and ``repr`` use it.  QEMU: ``qio_channel_set_name()``."""
        self._name = name

    @property
    def features(self) -> Feature:
        return Feature(self._features)

    def has_feature(self, feature: Feature) -> bool:
        """QEMU: ``qio_channel_has_feature()``."""
        return bool(self._features & feature)

    def _set_feature(self, feature: Feature) -> None:
        self._features |= int(feature)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def follow_coroutine_ctx(self) -> bool:
        return self._follow

    def set_follow_coroutine_ctx(self, enabled: bool) -> None:
        """Watch waits on the calling greenlet's own hub (True) or the iohandler's (False).

        Takes effect at the next wait.  Never switches.  QEMU: ``qio_channel_set_follow_coroutine_ctx()``.
        """
        self._follow = bool(enabled)

    @property
    def blocking(self) -> bool:
        return self._blocking

    def set_blocking(self, enabled: bool) -> None:
        """In non-blocking mode a call that would wait raises WouldBlock.  QEMU: ``qio_channel_set_blocking()``."""
        self._blocking = bool(enabled)

    def statistics(self) -> ChannelStatistics:
        """A snapshot of what the channel is doing (who waits, who holds the fd).  Never switches."""
        return ChannelStatistics(
            readers_waiting=len(self._rd.slot),
            writers_waiting=len(self._wr.slot),
            holds=len(self._holds),
            watches=len(self._watches),
            unread=len(self._unread),
            closed=self._closed,
            released=not self._io_close_token,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        mode = "follow" if self.follow_coroutine_ctx else "iohandler"  # a wrapper's is its inner's
        return f"<{type(self).__name__} {self._name} {state} {mode}>"

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- holds on the fd (see the module docstring) ----------------------------------------------

    def _enter(self) -> None:
        self._holds.append(None)
        if self._closed:
            self._leave()
            raise ChannelClosedError(f"{self._name}: channel is closed")

    def _leave(self) -> None:
        holds = self._holds
        holds.pop()
        if not holds:
            self._finalize()

    def _finalize(self) -> None:
        try:
            self._io_close_token.pop()
        except IndexError:
            return
        efd, self._wait_efd = self._wait_efd, None
        if efd is not None:
            os.close(efd)
        self._io_close()
        # The kept watchers are stopped (nobody holds the channel, so nobody is parked); each
        # is freed by its own hub, or went with it.
        self._rd.release_kept()
        self._wr.release_kept()

    def _broken(self, exc: OSError, what: str, done: int = 0, expected: int | None = None) -> ChannelError:
        """The one translation of an OSError from a hook (ChannelClosedError if we closed meanwhile)."""
        if self._closed:
            return ChannelClosedError(f"{self._name}: closed during {what}", done=done, expected=expected)
        return from_os_error(exc, self._name, what, done=done, expected=expected)

    def _would_block(self, what: str) -> WouldBlock:
        return WouldBlock(f"{self._name}: {what} would block")

    def _negative(self, n: int) -> ValueError:
        return ValueError(f"{self._name}: negative size {n}")

    # -- the one retry loop ----------------------------------------------------------------------

    def _retry(self, d: Direction, deadline: float | None, hook: Callable[..., Any], *args: Any) -> Any:
        """Hold the fd, call ``hook(*args)``; on EAGAIN park in direction ``d`` (or raise
        WouldBlock) and retry; retry on EINTR; translate any other OSError.

        Hand-unrolled copies (change both): ``_read_some`` and ``write_all``'s first try.
        """
        self._enter()
        try:
            while True:
                try:
                    return hook(*args)
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block(d.verb) from None
                    d.park(deadline)
                except InterruptedError:
                    continue
                except ChannelError:
                    raise  # a hook's own verdict (NotSupportedError...), already named: not an OS error
                except OSError as exc:
                    raise self._broken(exc, d.verb) from exc
        finally:
            self._leave()

    # -- waiting ---------------------------------------------------------------------------------

    def yield_(self, cond: IOCondition, *, timeout: float | None = None) -> None:
        """Park the calling greenlet until ``cond`` (IN or OUT) may be ready, or until woken.

        Switches (returns at once for IN while bytes the fd cannot show wait to be read: given
        back by an interrupted read, or a TLS session's decrypted plaintext).  Returns early
        on ``wake_read()`` (callers retry their operation).  Raises ChannelBusyError if another
        greenlet waits in that direction, ChannelClosedError if the channel is closed meanwhile,
        TimeoutError after ``timeout``.  QEMU: ``qio_channel_yield()``.
        """
        cond = IOCondition(cond)
        if cond is not _IN and cond is not _OUT:
            raise ValueError("yield_() takes exactly one of IOCondition.IN and IOCondition.OUT")
        self._enter()
        try:
            if cond is _IN and self._ready_in():
                return
            (self._rd if cond is _IN else self._wr).park(deadline(timeout))
        finally:
            self._leave()

    def wake_read(self) -> None:
        """Resume the greenlet parked in ``yield_(IN)`` (or a read), if any, as if woken early.

        Thread-safe; never switches.  ``*_all`` reads simply retry.  QEMU: ``qio_channel_wake_read()``.
        """
        self._rd.wake_all(None)

    def wait(self, cond: IOCondition, *, timeout: float | None = None) -> None:
        """Block the calling OS thread until ``cond`` may be ready, without running other greenlets.

        Returns early if the channel is closed (then raises ChannelClosedError).  Raises
        TimeoutError after ``timeout``; RuntimeError inside a hub callback, unless ``timeout``
        is 0 (a poll that cannot block).  QEMU: ``qio_channel_wait()``.
        """
        cond = IOCondition(cond)
        self._enter()
        try:
            fd = self._io_fd(cond)
            if fd is None or (cond is _IN and self._ready_in()):
                return
            with self._wait_lock:
                if self._wait_efd is None:
                    try:
                        self._wait_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    except OSError as exc:
                        raise self._broken(exc, "wait") from exc
                efd = self._wait_efd
            # close() sets the flag, then signals the eventfd; we made the eventfd, then read
            # the flag: one of us sees the other.
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            ms = None if timeout is None else max(int(timeout * 1000), 0)
            if ms != 0 and _hub.in_hub():  # it would stop every greenlet and watcher of the hub
                raise RuntimeError(f"{self._name}: cannot wait inside a hub callback (a callback must not block)")
            poller = _hub.plain_poll()  # blocks the OS thread, even under gevent's monkey patching
            poller.register(fd, select.POLLIN if cond is _IN else select.POLLOUT)
            poller.register(efd, select.POLLIN)
            ready = poller.poll(ms)
            if self._closed:
                raise ChannelClosedError(f"{self._name}: closed while waiting")
            if not ready:
                raise ChannelTimeoutError(f"{self._name}: timed out waiting")
        finally:
            self._leave()

    # -- given-back bytes (see the class docstring) ----------------------------------------------

    def _ready_in(self) -> bool:
        """Whether a read would return without the fd: ``yield_(IN)``, ``wait(IN)`` and an IN
        watch then return or fire at once.  Given-back bytes here; a kind that holds bytes of
        its own that the fd cannot show (TLS: plaintext already decrypted) adds them."""
        return bool(self._unread)

    def _give_back(self, data: bytes) -> None:
        if data and not self._closed:
            self._unread = data + self._unread

    def _take_unread(self, n: int, peek: bool = False) -> bytes:
        if self._closed:
            raise ChannelClosedError(f"{self._name}: channel is closed")
        data = self._unread[:n]
        if not peek:
            self._unread = self._unread[n:]
        return data

    def _take_unread_into(self, bufs: list[memoryview], peek: bool = False) -> int:
        return fill(bufs, self._take_unread(nbytes(bufs), peek))

    def _all_failed(self, exc: BaseException, taken: Callable[[], bytes], done: int, expected: int) -> None:
        """Where the bytes of a ``*_all`` read that ended early go (the class docstring's rule)."""
        if isinstance(exc, ChannelError):
            add_progress(exc, done, expected)
        if isinstance(exc, UnexpectedEOF):
            return  # partial already set
        if isinstance(exc, ChannelClosedError):
            exc.partial = taken() if done else b""
        elif done:
            self._give_back(taken())

    # -- reading ---------------------------------------------------------------------------------

    def _check_read_flags(self, max_fds: int, flags: int) -> None:
        if max_fds and not self._features & _F_FD_PASS:
            raise NotSupportedError(f"{self._name}: channel does not support file descriptor passing")
        if flags and not self._features & _F_PEEK:
            raise NotSupportedError(f"{self._name}: channel does not support MSG_PEEK")

    def readv_full(self, buffers: Sequence[Buffer], *, max_fds: int = 0, flags: ReadFlag = ReadFlag.NONE,
                   timeout: float | None = None) -> tuple[int, list[int]]:
        """Read into ``buffers``, and up to ``max_fds`` passed fds; return ``(nbytes, fds)``.

        May park until some data is available.  0 bytes means EOF (or no room: empty buffers
        return 0 at once).  The caller owns the fds: at most ``max_fds``, and any more that came
        with the message are closed, never left open unreturned.  Raises NotSupportedError for
        fds without FD_PASS (or MSG_PEEK without READ_MSG_PEEK), WouldBlock in non-blocking
        mode, BrokenChannelError, ChannelClosedError, TimeoutError.
        QEMU: ``qio_channel_readv_full()``.
        """
        self._check_read_flags(max_fds, flags)
        bufs = writable_views(buffers, self._name)
        if not bufs:
            return 0, []
        if self._unread:
            return self._take_unread_into(bufs, bool(flags)), []
        result: tuple[int, list[int]] = self._retry(self._rd, deadline(timeout), self._io_readv, bufs,
                                                    max_fds, int(flags))
        return result

    def readv(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> int:
        """``readv_full`` without fds; returns the byte count (0 at EOF).  May park."""
        return self.readv_full(buffers, timeout=timeout)[0]

    def readinto(self, buf: Buffer, *, flags: ReadFlag = _NO_READ_FLAGS, timeout: float | None = None) -> int:
        """Read into one buffer; return the byte count (0 at EOF; 0 at once for an empty
        buffer).  May park."""
        if flags:
            self._check_read_flags(0, flags)
            flags = int(flags)  # type: ignore[assignment]
        view = memoryview(buf).cast("B")
        if not len(view):
            return 0
        if view.readonly:
            raise read_only(self._name, buf)
        if self._unread:
            return self._take_unread_into([view], bool(flags))
        n: int = self._retry(self._rd, None if timeout is None else time.monotonic() + timeout,
                             self._io_readinto, view, flags)
        return n

    def read(self, n: int, *, flags: ReadFlag = _NO_READ_FLAGS, timeout: float | None = None) -> bytes:
        """Read up to ``n`` bytes; ``b""`` at EOF (and for ``n`` 0).  May park."""
        if flags:
            self._check_read_flags(0, flags)
            flags = int(flags)  # type: ignore[assignment]
        if n <= 0:
            if n < 0:
                raise self._negative(n)
            return b""
        return self._read_some(n, flags, None if timeout is None else time.monotonic() + timeout, n)

    def _read_some(self, n: int, flags: int, deadline: float | None, full: int) -> bytes:
        """One read of up to ``n`` bytes: ``_retry`` around ``_io_read``, unrolled (change both).

        The read prediction: a request/response peer has nothing to say between our reply and
        its next request, so the read that follows a write nearly always meets EAGAIN, and
        raising and catching that costs more than the syscall.  So when the previous read on
        this channel had to park and a write came since, park first.  A stream that keeps data
        queued never parks, so it keeps trying first; a read that brings ``full`` bytes after
        parking (``read`` passes its ``n``: it filled the caller's buffer, more may be queued)
        ends the guess.  A wrong guess costs one loop iteration (the watcher fires at once).
        A park whose deadline comes with (or before) readiness returns rather than time out
        (``Direction.park``), so ``timeout=0`` after a wrong guess still returns queued bytes.
        """
        if self._unread:
            return self._take_unread(n, bool(flags))
        self._holds.append(None)  # _enter(), inlined: this is a server's every request
        try:
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            d = self._rd
            parked = False
            if self._wrote:
                self._wrote = False
                if self._rd_parked and self._blocking:
                    d.park(deadline)  # a deadline that is up loses to an fd that is ready
                    parked = True
            fd = self._sock_fd
            if fd >= 0 and _recv is not None and n <= _SMALL:  # the compiled path: None for "would block"
                sflags = _MSG_PEEK if flags else 0
                while True:
                    try:
                        data = _recv(fd, n, sflags)
                    except OSError as exc:
                        raise self._broken(exc, "read") from exc
                    if data is not None:
                        self._rd_parked = parked and len(data) < full
                        return data
                    if not self._blocking:
                        raise self._would_block("read")
                    parked = True
                    d.park(deadline)
            while True:
                try:
                    data = self._io_read(n, flags)
                    self._rd_parked = parked and len(data) < full
                    return data
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block("read") from None
                    parked = True
                    d.park(deadline)
                except InterruptedError:
                    continue
                except ChannelError:
                    raise  # as in _retry
                except OSError as exc:
                    raise self._broken(exc, "read") from exc
        finally:
            holds = self._holds  # _leave(), inlined
            holds.pop()
            if not holds:
                self._finalize()

    def _readv_all(self, buffers: Sequence[Buffer], max_fds: int, timeout: float | None) -> tuple[bool, list[int]]:
        """The ``*_all`` loop over caller's buffers (QEMU's ``qio_channel_readv_full_all_eof``).

        Returns ``(False, [])`` on EOF before any byte; raises UnexpectedEOF after some.  fds
        received by any of the partial reads are all returned; on error they are closed.
        """
        self._check_read_flags(max_fds, 0)
        bufs = writable_views(buffers, self._name)
        expected = nbytes(bufs)
        dl = deadline(timeout)
        fds: list[int] = []
        done = 0
        try:
            if self._unread and bufs:
                done = self._take_unread_into(bufs)
                bufs = advance(bufs, done)
            while bufs:
                # At most max_fds in all: once they have come, later reads take none (the
                # kernel closes any more that arrive, as it does past a read's room for them).
                n, got = self._retry(self._rd, dl, self._io_readv, bufs, max_fds - len(fds) if max_fds else 0, 0)
                if got:
                    fds.extend(got)
                if n == 0:
                    if done == 0 and not fds:
                        return False, fds
                    raise UnexpectedEOF(f"{self._name}: peer closed after {done} of {expected} bytes",
                                        partial=head(buffers, done), expected=expected)
                done += n
                bufs = advance(bufs, n)
            return True, fds
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            self._all_failed(exc, lambda: head(buffers, done), done, expected)
            raise

    def _read_rest(self, first: bytes, n: int, dl: float | None, eof_ok: bool) -> bytes | None:
        """The rest of ``read_all``/``read_all_eof`` after a first read brought ``first``.

        Each read asks for at most as much as has arrived so far (or the first read's cap), so
        memory grows with what the peer sends, not with what ``n`` claims.
        """
        if not first:
            if eof_ok:
                return None
            raise UnexpectedEOF(f"{self._name}: peer closed before any of {n} bytes", expected=n)
        chunks = [first]
        got = len(first)
        try:
            while got < n:
                chunk = self._retry(self._rd, dl, self._io_read, min(n - got, max(got, _FIRST_READ)), 0)
                if not chunk:
                    raise UnexpectedEOF(f"{self._name}: peer closed after {got} of {n} bytes",
                                        partial=b"".join(chunks), expected=n)
                chunks.append(chunk)
                got += len(chunk)
        except BaseException as exc:
            self._all_failed(exc, lambda: b"".join(chunks), got, n)
            raise
        return b"".join(chunks)

    def readv_full_all_eof(self, buffers: Sequence[Buffer], max_fds: int = 0, *,
                           timeout: float | None = None) -> tuple[bool, list[int]]:
        """Fill every buffer, or return ``(False, [])`` on a clean EOF before any byte.

        May park.  Raises UnexpectedEOF (with ``partial`` and ``expected``) on EOF after some
        bytes.  fds from every partial read are returned, ``max_fds`` at most in all (more that
        come are closed, as ``readv_full`` says).  Interrupted, it gives its bytes back (class
        docstring).  QEMU: ``qio_channel_readv_full_all_eof()``.
        """
        return self._readv_all(buffers, max_fds, timeout)

    def readv_full_all(self, buffers: Sequence[Buffer], max_fds: int = 0, *,
                       timeout: float | None = None) -> list[int]:
        """Fill every buffer; EOF anywhere raises UnexpectedEOF.  May park.  Returns the fds
        (``max_fds`` at most).  QEMU: ``qio_channel_readv_full_all()``."""
        ok, fds = self._readv_all(buffers, max_fds, timeout)
        if not ok:
            raise self._eof_before(buffers)
        return fds

    def _eof_before(self, buffers: Sequence[Buffer]) -> UnexpectedEOF:
        expected = sum(memoryview(b).nbytes for b in buffers)
        return UnexpectedEOF(f"{self._name}: peer closed before any of {expected} bytes", expected=expected)

    def readv_all_eof(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> bool:
        """Fill every buffer; False on a clean EOF before any byte.  May park."""
        return self._readv_all(buffers, 0, timeout)[0]

    def readv_all(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> None:
        """Fill every buffer; EOF anywhere raises UnexpectedEOF.  May park."""
        if not self._readv_all(buffers, 0, timeout)[0]:
            raise self._eof_before(buffers)

    def readinto_all(self, buf: Buffer, *, timeout: float | None = None) -> None:
        """Fill ``buf``; EOF anywhere raises UnexpectedEOF.  May park."""
        if not self._readv_all((buf,), 0, timeout)[0]:
            raise self._eof_before((buf,))

    def read_all_eof(self, n: int, *, timeout: float | None = None) -> bytes | None:
        """Read exactly ``n`` bytes; None on a clean EOF before any.  May park.

        Raises UnexpectedEOF after some bytes.  Interrupted, it gives its bytes back (class
        docstring).  QEMU: ``qio_channel_read_all_eof()``.
        """
        if n <= 0:
            if n < 0:
                raise self._negative(n)
            return b""
        dl = deadline(timeout)
        try:
            data = self._read_some(n if n <= _FIRST_READ else _FIRST_READ, 0, dl, n + 1)
        except ChannelError as exc:
            add_progress(exc, 0, n)
            raise
        if len(data) == n:
            return data
        return self._read_rest(data, n, dl, True)

    def read_all(self, n: int, *, timeout: float | None = None) -> bytes:
        """Read exactly ``n`` bytes; EOF anywhere raises UnexpectedEOF.  May park.

        Interrupted, it gives its bytes back (class docstring).  QEMU: ``qio_channel_read_all()``.
        """
        if n <= 0:
            if n < 0:
                raise self._negative(n)
            return b""
        dl = None if timeout is None else time.monotonic() + timeout
        try:  # one read usually brings the whole message
            data = self._read_some(n if n <= _FIRST_READ else _FIRST_READ, 0, dl, n + 1)
        except ChannelError as exc:
            add_progress(exc, 0, n)
            raise
        if len(data) == n:
            return data
        rest: bytes = self._read_rest(data, n, dl, False)  # type: ignore[assignment]
        return rest

    # -- writing ---------------------------------------------------------------------------------

    def _check_write(self, fds: Sequence[int], flags: int, bufs: list[memoryview]) -> None:
        if fds:
            if not self._features & _F_FD_PASS:
                raise NotSupportedError(f"{self._name}: channel does not support file descriptor passing")
            if not bufs:
                raise ValueError(f"{self._name}: fds must travel with at least one byte of data")
        if flags and not self._features & _F_ZERO_COPY:
            raise NotSupportedError(f"{self._name}: channel does not support zero-copy writes")

    def writev_full(self, buffers: Sequence[Buffer], fds: Sequence[int] = (), flags: WriteFlag = WriteFlag.NONE,
                    *, timeout: float | None = None) -> int:
        """Write from ``buffers`` (and pass ``fds``); return the bytes written, possibly fewer.

        May park until some can be written.  fds need at least one byte to travel with
        (ValueError otherwise).  Raises NotSupportedError, WouldBlock, BrokenChannelError,
        ChannelClosedError, TimeoutError.  QEMU: ``qio_channel_writev_full()``.
        """
        bufs = views(buffers)
        self._check_write(fds, flags, bufs)
        if not bufs:
            return 0
        self._wrote = True
        n: int = self._retry(self._wr, deadline(timeout), self._io_writev, bufs, fds, int(flags))
        return n

    def writev(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> int:
        """``writev_full`` without fds.  May park; may be partial."""
        return self.writev_full(buffers, timeout=timeout)

    def write(self, data: Buffer, *, timeout: float | None = None) -> int:
        """Write from one buffer; return the bytes written, possibly fewer.  May park."""
        return self.writev_full((data,), timeout=timeout)

    def writev_full_all(self, buffers: Sequence[Buffer], fds: Sequence[int] = (),
                        flags: WriteFlag = WriteFlag.NONE, *, timeout: float | None = None) -> None:
        """Write every byte of ``buffers``; ``fds`` go with the first chunk (and need at least
        one byte to travel with: ValueError otherwise).  May park.

        On error the exception's ``done`` says how many bytes were written.
        QEMU: ``qio_channel_writev_full_all()``.
        """
        self._writev_all(views(buffers), fds, int(flags), timeout)

    def _writev_all(self, bufs: list[memoryview], fds: Sequence[int], flags: int, timeout: float | None,
                    done: int = 0) -> None:
        """The ``*_all`` write loop over ``_retry``; the first ``done`` bytes are already written."""
        self._check_write(fds, flags, bufs)
        self._wrote = True
        expected = nbytes(bufs)
        dl = deadline(timeout)
        if done:
            bufs = advance(bufs, done)
        try:
            while bufs:
                if len(bufs) == 1 and not fds and not flags:
                    n = self._retry(self._wr, dl, self._io_write, bufs[0])
                else:
                    n = self._retry(self._wr, dl, self._io_writev, bufs, fds, flags)
                done += n
                fds = ()
                bufs = advance(bufs, n)
        except ChannelError as exc:
            add_progress(exc, done, expected)
            raise

    def writev_all(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> None:
        """Write every byte of ``buffers``.  May park."""
        self.writev_full_all(buffers, timeout=timeout)

    def write_all(self, data: Buffer, *, timeout: float | None = None) -> None:
        """Write every byte of ``data``.  May park.  QEMU: ``qio_channel_write_all()``."""
        # First try, unrolled from _retry (change both): one send usually takes it all.
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        self._wrote = True
        self._holds.append(None)
        try:
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            try:
                fd = self._sock_fd
                if fd >= 0 and _send is not None and len(data) <= _SMALL:  # compiled: -1 for "would block"
                    n = _send(fd, data)
                    if n < 0:
                        n = 0
                else:
                    n = self._io_write(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except ChannelError:
                raise  # as in _retry
            except OSError as exc:
                raise self._broken(exc, "write", 0, len(data)) from exc
        finally:
            holds = self._holds  # _leave(), inlined
            holds.pop()
            if not holds:
                self._finalize()
        if n < len(data):
            self._writev_all([memoryview(data).cast("B")], (), 0, timeout, done=n)

    def flush(self) -> None:
        """Wait until zero-copy writes are complete; a no-op without WRITE_ZERO_COPY.  May park."""
        if not self._features & _F_ZERO_COPY:
            return
        self._enter()
        try:
            self._io_flush()
        except ChannelError:
            raise
        except OSError as exc:
            raise self._broken(exc, "flush") from exc
        finally:
            self._leave()

    # -- control ---------------------------------------------------------------------------------

    def _control(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        self._enter()
        try:
            return fn(*args)
        except ChannelError:
            raise  # NotSupportedError, ChannelBusyError: a hook's own verdict
        except OSError as exc:
            raise self._broken(exc, what) from exc
        finally:
            self._leave()

    def shutdown(self, how: Shutdown = Shutdown.BOTH) -> None:
        """Shut down one or both directions (peer sees EOF).  Never switches.  Needs SHUTDOWN."""
        if not self._features & _F_SHUTDOWN:
            raise NotSupportedError(f"{self._name}: channel does not support shutdown")
        self._control("shutdown", self._io_shutdown, Shutdown(how))

    def set_delay(self, enabled: bool) -> None:
        """Allow (True) or disable (False) Nagle-style delays; a no-op where meaningless."""
        self._control("set_delay", self._io_set_delay, bool(enabled))

    def set_cork(self, enabled: bool) -> None:
        """Cork (hold back partial frames) or uncork; a no-op where meaningless."""
        self._control("set_cork", self._io_set_cork, bool(enabled))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position of a SEEKABLE channel; return the new position."""
        if not self._features & _F_SEEKABLE:
            raise NotSupportedError(f"{self._name}: channel is not seekable")
        pos: int = self._control("seek", self._io_seek, offset, whence)
        return pos

    def close(self) -> None:
        """Close the channel.  Any thread or greenlet; idempotent; never switches.

        Every greenlet parked on it, in whatever context, resumes with ChannelClosedError; the
        fd itself is released once every watcher on it is gone (module docstring).  Bytes given
        back by an interrupted ``*_all`` read are dropped.  QEMU: ``qio_channel_close()``.
        """
        try:
            self._close_token.pop()
        except IndexError:
            return
        self._closed = True
        self._unread = b""
        for watch in list(self._watches):
            watch.cancel()
        for d in (self._rd, self._wr):
            d.wake_all(ChannelClosedError(f"{self._name}: channel closed while waiting"))
        efd = self._wait_efd
        if efd is not None:
            try:
                os.eventfd_write(efd, 1)
            except OSError:
                pass
        self._leave()  # the channel's own hold

    # -- GSource-style watches (channel_watch) ---------------------------------------------------

    def add_watch(self, cond: IOCondition, callback: Callable[[Channel, IOCondition], bool],
                  context: Context | None = None) -> Watch:
        """Call ``callback(channel, cond)`` in ``context`` (default: the caller's) whenever
        ``cond`` is ready, until it returns a false value or the watch is cancelled.

        Never switches; thread-safe.  The callback runs inside the hub and must not wait.
        QEMU: ``qio_channel_add_watch_full()``.
        """
        cond = IOCondition(cond)
        if cond not in (_IN, _OUT):
            raise ValueError("add_watch() takes IOCondition.IN or IOCondition.OUT")
        ctx = context if context is not None else current_context()
        self._enter()  # released when the watch is gone
        d = self._rd if cond is _IN else self._wr
        watch = Watch(self, cond, d.events, callback, ctx, lambda: self._watch_fd(cond), self._watch_gone)
        self._watches.add(watch)
        try:
            ctx.schedule(watch.start)
        except BaseException:
            self._watches.discard(watch)
            self._leave()
            raise
        return watch

    def _watch_fd(self, cond: IOCondition) -> int | None:
        if cond is _IN and self._ready_in():
            return None  # ready without the fd (given-back bytes; TLS plaintext already decrypted)
        return self._io_fd(cond)

    def _watch_gone(self, watch: Watch) -> None:
        self._watches.discard(watch)
        self._leave()


__all__ = [
    "Channel",
    "ChannelStatistics",
    "Direction",
    "Feature",
    "IOCondition",
    "ReadFlag",
    "Shutdown",
    "WriteFlag",
    "deadline",
]
