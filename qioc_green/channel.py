"""The Channel base class: QEMU's QIOChannel, with its waits following the calling greenlet.

A channel kind implements a few non-blocking hooks (QEMU's ``QIOChannelClass`` vtable):

=========================  =====================================================================
``_io_readv``              read into a list of buffers; may take fds; ``BlockingIOError`` if it
                           would block; 0 bytes at EOF
``_io_readinto``           the same for one buffer (fast path; defaults to ``_io_readv``)
``_io_writev``             write a list of buffers, with fds; may be partial
``_io_write``              the same for one buffer (fast path; defaults to ``_io_writev``)
``_io_fd(cond)``           the fd to watch for ``IOCondition.IN`` or ``OUT``, or None for a
                           direction that never waits (regular files, memory)
``_io_close``              release the OS resources; called once, when nothing uses them any more
``_io_shutdown``, ``_io_seek``, ``_io_set_delay``, ``_io_set_cork``, ``_io_flush``: optional
=========================  =====================================================================

Everything that blocks lives here, in one shape (QEMU's ``qio_channel_readv_full_all_eof``):
try the hook; on ``BlockingIOError`` park the calling greenlet until the fd is ready; retry.

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
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from enum import IntFlag
from typing import Any

from . import _hub
from .errors import (
    BrokenChannelError,
    ChannelBusyError,
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    NotSupportedError,
    UnexpectedEOF,
    WouldBlock,
)

Buffer = Any  # bytes-like: bytes, bytearray, memoryview, array, mmap


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


_tls = _hub._local
_NO_READ_FLAGS: Any = 0  # read()'s default: a plain 0 costs nothing to test or pass on
_IN = IOCondition.IN
_OUT = IOCondition.OUT
# Plain ints for the hot paths: IntFlag arithmetic costs a Python call per operation.
_F_FD_PASS = int(Feature.FD_PASS)
_F_PEEK = int(Feature.READ_MSG_PEEK)
_F_ZERO_COPY = int(Feature.WRITE_ZERO_COPY)
_F_SEEKABLE = int(Feature.SEEKABLE)
_F_SHUTDOWN = int(Feature.SHUTDOWN)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN})


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _views(buffers: Iterable[Buffer]) -> list[memoryview]:
    return [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop ``n`` bytes from the front of a buffer list (QEMU's ``iov_discard_front``)."""
    i = 0
    while n:
        length = len(views[i])
        if n >= length:
            n -= length
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return views[i:]


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
    """

    kind = "channel"
    _counter = itertools.count(1)

    def __init__(self, *, name: str | None = None, features: int = 0) -> None:
        self._name = name or f"{self.kind}-{next(Channel._counter)}"
        self._features = int(features)
        self._follow = False
        self._blocking = True
        self._closed = False
        self._close_token = [None]
        self._io_close_token = [None]
        self._holds: list[None] = [None]  # the channel's own hold, dropped by close()
        self._slots: tuple[list[_hub.Waiter], list[_hub.Waiter]] = ([], [])
        self._watches: set[Watch] = set()
        self._wait_efd: int | None = None
        self._wait_lock = threading.Lock()
        # Follow-mode watcher kept between waits, per direction: (context, watcher) or None.
        # Only the context's own thread starts/stops it; it is released in _finalize.
        self._wcache: list[Any] = [None, None]
        # Read prediction (see _park_first): the last read parked, and a write came after it.
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

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        mode = "follow" if self._follow else "iohandler"
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
        # The cached watchers are stopped (nobody holds the channel, so nobody is parked);
        # each is freed by its own hub.
        for i, ent in enumerate(self._wcache):
            if ent is not None:
                self._wcache[i] = None
                _hub.release_watcher(ent[0], ent[1])

    def _broken(self, exc: OSError, what: str, done: int = 0, expected: int | None = None) -> Exception:
        if self._closed:
            return ChannelClosedError(f"{self._name}: closed during {what}", done=done, expected=expected)
        if exc.errno in _RESET_ERRNOS:
            reason = "connection reset by peer" if exc.errno != errno.EPIPE else "peer closed its end"
        else:
            reason = exc.strerror or str(exc)
        progress = f" after {done} of {expected} bytes" if expected is not None else ""
        return BrokenChannelError(f"{self._name}: {what} failed{progress}: {reason}", done=done, expected=expected)

    # -- waiting ---------------------------------------------------------------------------------

    def _park(self, cond: IOCondition, deadline: float | None) -> Any:
        """Park the calling greenlet until ``cond`` may be ready, or it is woken.  Holds taken."""
        if deadline is None and self._follow:
            # The hot path (a server's handler): follow on, no deadline, and a watcher kept on
            # this very hub from the last wait in this direction.  Same steps as below, fewer.
            i = 0 if cond is _IN else 1
            ent = self._wcache[i]
            if ent is not None and _hub.trace is None:
                try:
                    ctx = _tls.context  # current_context(), inlined (it exists: ent was made here)
                except AttributeError:
                    ctx = _hub.current_context()
                if ent[0] is ctx:
                    slot = self._slots[i]
                    waiter = _hub.Waiter(ctx)
                    slot.append(waiter)  # visible to wakers: every exit must withdraw or park
                    try:
                        if slot[0] is not waiter:
                            waiter.withdraw()
                            direction = "read" if i == 0 else "write"
                            raise ChannelBusyError(f"{self._name}: another greenlet is already waiting to {direction}")
                        if self._closed:
                            waiter.withdraw()
                            raise ChannelClosedError(f"{self._name}: channel is closed")
                        waiter.orphan = lambda: self._orphaned(slot, waiter)
                        return _hub.wait_watcher(ent[1], waiter)
                    finally:
                        waiter.orphan = None
                        try:
                            slot.remove(waiter)
                        except ValueError:
                            pass  # released by an orphaning wake
        fd = self._io_fd(cond)
        if fd is None:
            return None
        ctx = _hub.current_context()  # looked up at every wait, never stored (semantics 1)
        slot = self._slots[0 if cond is _IN else 1]
        waiter = _hub.Waiter(ctx)
        slot.append(waiter)  # from here on wakers can see it: every exit must withdraw or park
        try:
            if slot[0] is not waiter:
                waiter.withdraw()
                direction = "read" if cond is _IN else "write"
                raise ChannelBusyError(f"{self._name}: another greenlet is already waiting to {direction}")
            if self._closed:  # close() ran after our _enter but before it could see us
                waiter.withdraw()
                raise ChannelClosedError(f"{self._name}: channel is closed")
            # If this greenlet's thread ends while it is parked, whoever wins the wake releases
            # what this call holds: its slot and the operation's hold on the fd.
            waiter.orphan = lambda: self._orphaned(slot, waiter)
            events = _hub.READ if cond is _IN else _hub.WRITE
            if self._follow and deadline is None and _hub.trace is None:
                # First follow-mode wait in this direction: make the watcher to keep (above).
                i = 0 if cond is _IN else 1
                ent = self._wcache[i]
                if ent is None or ent[0]._dead:  # none yet, or its hub is gone (IOThread stopped)
                    watcher = ctx.loop.io(fd, events)
                    self._wcache[i] = (ctx, watcher)
                    return _hub.wait_watcher(watcher, waiter)
            timeout = None if deadline is None else deadline - time.monotonic()
            try:
                if self._follow:
                    return _hub.wait_fd_follow(ctx, fd, events, waiter, timeout)
                self._holds.append(None)  # the iohandler's watcher holds the fd until it is gone
                return _hub.wait_fd_iohandler(ctx, fd, events, waiter, timeout, self._leave)
            except TimeoutError:
                direction = "readable" if cond is _IN else "writable"
                raise ChannelTimeoutError(f"{self._name}: timed out waiting to be {direction}") from None
        finally:
            waiter.orphan = None
            try:
                slot.remove(waiter)
            except ValueError:
                pass

    def _orphaned(self, slot: list[_hub.Waiter], waiter: _hub.Waiter) -> None:
        try:
            slot.remove(waiter)
        except ValueError:
            return
        self._leave()

    def _park_counting(self, cond: IOCondition, deadline: float | None, done: int, expected: int | None) -> None:
        """``_park`` inside a loop that has moved ``done`` bytes: errors carry that progress."""
        try:
            self._park(cond, deadline)
        except ChannelError as exc:
            exc.done, exc.expected = done, expected
            raise

    # _park_first: wait for readability *before* trying a read that will most likely find nothing.

    # A request/response peer has nothing to say between our reply and its next request, so the
    # read that follows a write nearly always meets EAGAIN, and raising and catching that costs
    # more than the syscall (PERF-NOTES: the lean loop waits first, then reads once).  The
    # prediction, inlined in read(), readinto() and read_all(): the previous read on this channel
    # had to park, and a write came since.  A stream that keeps data queued never parks, so it
    # keeps trying first, and a read that fills the caller's whole buffer after parking ends the
    # guess.  A wrong guess costs one loop iteration (the watcher fires at once on a ready fd).

    def yield_(self, cond: IOCondition, *, timeout: float | None = None) -> None:
        """Park the calling greenlet until ``cond`` (IN or OUT) may be ready, or until woken.

        Switches.  Returns early on ``wake_read()`` (callers retry their operation).  Raises
        ChannelBusyError if another greenlet waits in that direction, ChannelClosedError if the
        channel is closed meanwhile, TimeoutError after ``timeout``.  QEMU: ``qio_channel_yield()``.
        """
        cond = IOCondition(cond)
        if cond is not _IN and cond is not _OUT:
            raise ValueError("yield_() takes exactly one of IOCondition.IN and IOCondition.OUT")
        self._enter()
        try:
            self._park(cond, _deadline(timeout))
        finally:
            self._leave()

    def wake_read(self) -> None:
        """Resume the greenlet parked in ``yield_(IN)`` (or a read), if any, as if woken early.

        Thread-safe; never switches.  ``*_all`` reads simply retry.  QEMU: ``qio_channel_wake_read()``.
        """
        for waiter in list(self._slots[0]):
            waiter.wake(None)

    def wait(self, cond: IOCondition, *, timeout: float | None = None) -> None:
        """Block the calling OS thread until ``cond`` may be ready, without running other greenlets.

        Returns early if the channel is closed (then raises ChannelClosedError).  Raises
        TimeoutError after ``timeout``.  QEMU: ``qio_channel_wait()``.
        """
        cond = IOCondition(cond)
        self._enter()
        try:
            fd = self._io_fd(cond)
            if fd is None:
                return
            with self._wait_lock:
                if self._wait_efd is None:
                    self._wait_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                efd = self._wait_efd
            # close() sets the flag, then signals the eventfd; we made the eventfd, then read
            # the flag: one of us sees the other.
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            poller = select.poll()
            poller.register(fd, select.POLLIN if cond is _IN else select.POLLOUT)
            poller.register(efd, select.POLLIN)
            ms = None if timeout is None else max(int(timeout * 1000), 0)
            ready = poller.poll(ms)
            if self._closed:
                raise ChannelClosedError(f"{self._name}: closed while waiting")
            if not ready:
                raise ChannelTimeoutError(f"{self._name}: timed out waiting")
        finally:
            self._leave()

    def _would_block(self, what: str, done: int = 0, expected: int | None = None) -> WouldBlock:
        return WouldBlock(f"{self._name}: {what} would block", done=done, expected=expected)

    # -- reading ---------------------------------------------------------------------------------

    def _check_read_flags(self, max_fds: int, flags: int) -> None:
        if max_fds and not self._features & _F_FD_PASS:
            raise NotSupportedError(f"{self._name}: channel does not support file descriptor passing")
        if flags and not self._features & _F_PEEK:
            raise NotSupportedError(f"{self._name}: channel does not support MSG_PEEK")

    def readv_full(self, buffers: Sequence[Buffer], *, max_fds: int = 0, flags: ReadFlag = ReadFlag.NONE,
                   timeout: float | None = None) -> tuple[int, list[int]]:
        """Read into ``buffers``, and up to ``max_fds`` passed fds; return ``(nbytes, fds)``.

        May park until some data is available.  0 bytes means EOF.  The caller owns the fds.
        Raises NotSupportedError for fds without FD_PASS (or MSG_PEEK without READ_MSG_PEEK),
        WouldBlock in non-blocking mode, BrokenChannelError, ChannelClosedError, TimeoutError.
        QEMU: ``qio_channel_readv_full()``.
        """
        self._check_read_flags(max_fds, flags)
        result: tuple[int, list[int]] = self._retry(_IN, "read", _deadline(timeout),
                                                    self._io_readv, _views(buffers), max_fds, int(flags))
        return result

    def _retry(self, cond: IOCondition, what: str, deadline: float | None, hook: Callable[..., Any],
               *args: Any) -> Any:
        """The one shape of a single operation: hold the fd, try the hook, park on EAGAIN (or
        raise WouldBlock), retry on EINTR, translate any other OSError."""
        self._enter()
        try:
            while True:
                try:
                    return hook(*args)
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block(what) from None
                    self._park(cond, deadline)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise self._broken(exc, what) from exc
        finally:
            self._leave()

    def readv(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> int:
        """``readv_full`` without fds; returns the byte count (0 at EOF).  May park."""
        return self.readv_full(buffers, timeout=timeout)[0]

    def readinto(self, buf: Buffer, *, flags: ReadFlag = ReadFlag.NONE, timeout: float | None = None) -> int:
        """Read into one buffer; return the byte count (0 at EOF).  May park."""
        self._check_read_flags(0, flags)
        view = memoryview(buf).cast("B")
        if not len(view):
            return 0
        deadline = _deadline(timeout)
        self._enter()
        try:
            parked = False
            if self._wrote:
                self._wrote = False
                if self._rd_parked and self._blocking:
                    self._park(_IN, deadline)  # see _park_first
                    parked = True
            while True:
                try:
                    got = self._io_readinto(view, int(flags))
                    self._rd_parked = parked and got < len(view)
                    return got
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block("read") from None
                    parked = True
                    self._park(_IN, deadline)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise self._broken(exc, "read") from exc
        finally:
            self._leave()

    def read(self, n: int, *, flags: ReadFlag = _NO_READ_FLAGS, timeout: float | None = None) -> bytes:
        """Read up to ``n`` bytes; ``b""`` at EOF.  May park."""
        if flags:
            self._check_read_flags(0, flags)
            flags = int(flags)  # type: ignore[assignment]
        if n <= 0:
            return b""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._holds.append(None)  # _enter(), inlined: this is a server's every request
        try:
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            parked = False
            if self._wrote:
                self._wrote = False
                if self._rd_parked and self._blocking:
                    self._park(_IN, deadline)  # see _park_first
                    parked = True
            while True:
                try:
                    data = self._io_read(n, flags)
                    self._rd_parked = parked and len(data) < n
                    return data
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block("read") from None
                    parked = True
                    self._park(_IN, deadline)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise self._broken(exc, "read") from exc
        finally:
            holds = self._holds  # _leave(), inlined
            holds.pop()
            if not holds:
                self._finalize()

    def _readv_all(self, buffers: Sequence[Buffer], max_fds: int, timeout: float | None,
                   done: int = 0) -> tuple[bool, list[int]]:
        """The one read loop (QEMU's ``qio_channel_readv_full_all_eof``).

        Returns ``(False, [])`` on EOF before any byte; raises UnexpectedEOF after some.  fds
        received by any of the partial reads are all returned; on error they are closed.
        """
        self._check_read_flags(max_fds, 0)
        views = _views(buffers)
        expected = sum(len(v) for v in views)
        deadline = _deadline(timeout)
        fds: list[int] = []
        if done:  # the caller already filled the first ``done`` bytes
            views = _advance(views, done)
        single = views[0] if len(views) == 1 and not max_fds else None
        start = done
        self._enter()
        try:
            while views:
                try:
                    if single is not None:
                        n = self._io_readinto(single[done - start:] if done > start else single, 0)
                    else:
                        n, got = self._io_readv(views, max_fds, 0)
                        if got:
                            fds.extend(got)
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block("read", done, expected) from None
                    self._park_counting(_IN, deadline, done, expected)
                    continue
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise self._broken(exc, "read", done, expected) from exc
                if n == 0:
                    if done == 0 and not fds:
                        return False, fds
                    partial = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:done]
                    raise UnexpectedEOF(
                        f"{self._name}: peer closed after {done} of {expected} bytes",
                        partial=partial,
                        expected=expected,
                    )
                done += n
                if single is not None:
                    if done == expected:
                        break
                else:
                    views = _advance(views, n)
            return True, fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            self._leave()

    def readv_full_all_eof(self, buffers: Sequence[Buffer], *, max_fds: int = 0,
                           timeout: float | None = None) -> tuple[bool, list[int]]:
        """Fill every buffer, or return ``(False, [])`` on a clean EOF before any byte.

        May park.  Raises UnexpectedEOF (with ``partial`` and ``expected``) on EOF after some
        bytes.  fds from every partial read are returned.  QEMU: ``qio_channel_readv_full_all_eof()``.
        """
        return self._readv_all(buffers, max_fds, timeout)

    def readv_full_all(self, buffers: Sequence[Buffer], *, max_fds: int = 0,
                       timeout: float | None = None) -> list[int]:
        """Fill every buffer; EOF anywhere raises UnexpectedEOF.  May park.  Returns the fds."""
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

        Raises UnexpectedEOF after some bytes.  QEMU: ``qio_channel_read_all_eof()``.
        """
        buf = bytearray(n)
        if n and not self._readv_all((buf,), 0, timeout)[0]:
            return None
        return bytes(buf)

    def read_all(self, n: int, *, timeout: float | None = None) -> bytes:
        """Read exactly ``n`` bytes; EOF anywhere raises UnexpectedEOF.  May park."""
        # Fast path: one read usually brings the whole message.
        deadline = None if timeout is None else time.monotonic() + timeout
        self._holds.append(None)
        try:
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            parked = False
            if self._wrote:
                self._wrote = False
                if self._rd_parked and self._blocking:
                    self._park(_IN, deadline)  # see _park_first
                    parked = True
            while True:
                try:
                    data = self._io_read(n, 0)
                    self._rd_parked = parked
                    break
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block("read", 0, n) from None
                    parked = True
                    self._park_counting(_IN, deadline, 0, n)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise self._broken(exc, "read", 0, n) from exc
        finally:
            self._leave()
        got = len(data)
        if got == n:
            return data
        if not got:
            raise UnexpectedEOF(f"{self._name}: peer closed before any of {n} bytes", expected=n)
        buf = bytearray(n)
        buf[:got] = data
        self._readv_all((buf,), 0, None if deadline is None else deadline - time.monotonic(), done=got)
        return bytes(buf)

    # -- writing ---------------------------------------------------------------------------------

    def _check_write(self, fds: Sequence[int], flags: int) -> None:
        if fds and not self._features & _F_FD_PASS:
            raise NotSupportedError(f"{self._name}: channel does not support file descriptor passing")
        if flags and not self._features & _F_ZERO_COPY:
            raise NotSupportedError(f"{self._name}: channel does not support zero-copy writes")

    def writev_full(self, buffers: Sequence[Buffer], fds: Sequence[int] = (), flags: WriteFlag = WriteFlag.NONE,
                    *, timeout: float | None = None) -> int:
        """Write from ``buffers`` (and pass ``fds``); return the bytes written, possibly fewer.

        May park until some can be written.  Raises NotSupportedError, WouldBlock,
        BrokenChannelError, ChannelClosedError, TimeoutError.  QEMU: ``qio_channel_writev_full()``.
        """
        self._check_write(fds, flags)
        self._wrote = True
        n: int = self._retry(_OUT, "write", _deadline(timeout), self._io_writev, _views(buffers), fds, int(flags))
        return n

    def writev(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> int:
        """``writev_full`` without fds.  May park; may be partial."""
        return self.writev_full(buffers, timeout=timeout)

    def write(self, data: Buffer, *, timeout: float | None = None) -> int:
        """Write from one buffer; return the bytes written, possibly fewer.  May park."""
        return self.writev_full((data,), timeout=timeout)

    def writev_full_all(self, buffers: Sequence[Buffer], fds: Sequence[int] = (),
                        flags: WriteFlag = WriteFlag.NONE, *, timeout: float | None = None) -> None:
        """Write every byte of ``buffers``; ``fds`` go with the first chunk.  May park.

        On error the exception's ``done`` says how many bytes were written.
        QEMU: ``qio_channel_writev_full_all()``.
        """
        self._check_write(fds, flags)
        self._writev_all(buffers, fds, int(flags), timeout)

    def _writev_all(self, buffers: Sequence[Buffer], fds: Sequence[int], flags: int, timeout: float | None,
                    done: int = 0) -> None:
        """The one write loop; the first ``done`` bytes are already written."""
        self._wrote = True
        views = _views(buffers)
        expected = sum(len(v) for v in views)
        deadline = _deadline(timeout)
        if done:
            views = _advance(views, done)
        single = views[0] if len(views) == 1 and not fds and not flags else None
        start = done
        self._enter()
        try:
            while views:
                try:
                    if single is not None:
                        n = self._io_write(single[done - start:] if done > start else single)
                    else:
                        n = self._io_writev(views, fds, flags)
                except BlockingIOError:
                    if not self._blocking:
                        raise self._would_block("write", done, expected) from None
                    self._park_counting(_OUT, deadline, done, expected)
                    continue
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise self._broken(exc, "write", done, expected) from exc
                done += n
                fds = ()
                if single is not None:
                    if done == expected:
                        break
                else:
                    views = _advance(views, n)
        finally:
            self._leave()

    def writev_all(self, buffers: Sequence[Buffer], *, timeout: float | None = None) -> None:
        """Write every byte of ``buffers``.  May park."""
        self.writev_full_all(buffers, timeout=timeout)

    def write_all(self, data: Buffer, *, timeout: float | None = None) -> None:
        """Write every byte of ``data``.  May park.  QEMU: ``qio_channel_write_all()``."""
        # Fast path: one send usually takes it all.
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        self._wrote = True
        self._holds.append(None)
        try:
            if self._closed:
                raise ChannelClosedError(f"{self._name}: channel is closed")
            try:
                n = self._io_write(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                raise self._broken(exc, "write", 0, len(data)) from exc
        finally:
            holds = self._holds  # _leave(), inlined
            holds.pop()
            if not holds:
                self._finalize()
        if n < len(data):
            self._writev_all((data,), (), 0, timeout, done=n)

    def flush(self) -> None:
        """Wait until zero-copy writes are complete; a no-op without WRITE_ZERO_COPY.  May park."""
        if not self._features & _F_ZERO_COPY:
            return
        self._enter()
        try:
            self._io_flush()
        finally:
            self._leave()

    # -- control ---------------------------------------------------------------------------------

    def shutdown(self, how: Shutdown = Shutdown.BOTH) -> None:
        """Shut down one or both directions (peer sees EOF).  Never switches.  Needs SHUTDOWN."""
        if not self._features & _F_SHUTDOWN:
            raise NotSupportedError(f"{self._name}: channel does not support shutdown")
        self._enter()
        try:
            self._io_shutdown(Shutdown(how))
        except OSError as exc:
            raise self._broken(exc, "shutdown") from exc
        finally:
            self._leave()

    def set_delay(self, enabled: bool) -> None:
        """Allow (True) or disable (False) Nagle-style delays; a no-op where meaningless."""
        self._enter()
        try:
            self._io_set_delay(bool(enabled))
        finally:
            self._leave()

    def set_cork(self, enabled: bool) -> None:
        """Cork (hold back partial frames) or uncork; a no-op where meaningless."""
        self._enter()
        try:
            self._io_set_cork(bool(enabled))
        finally:
            self._leave()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position of a SEEKABLE channel; return the new position."""
        if not self._features & _F_SEEKABLE:
            raise NotSupportedError(f"{self._name}: channel is not seekable")
        self._enter()
        try:
            return self._io_seek(offset, whence)
        except OSError as exc:
            raise self._broken(exc, "seek") from exc
        finally:
            self._leave()

    def close(self) -> None:
        """Close the channel.  Any thread or greenlet; idempotent; never switches.

        Every greenlet parked on it, in whatever context, resumes with ChannelClosedError; the
        fd itself is released once every watcher on it is gone (module docstring).
        QEMU: ``qio_channel_close()``.
        """
        try:
            self._close_token.pop()
        except IndexError:
            return
        self._closed = True
        for watch in list(self._watches):
            watch.cancel()
        for slot in self._slots:
            for waiter in list(slot):
                waiter.wake(ChannelClosedError(f"{self._name}: channel closed while waiting"))
        efd = self._wait_efd
        if efd is not None:
            try:
                os.eventfd_write(efd, 1)
            except OSError:
                pass
        self._leave()  # the channel's own hold

    # -- GSource-style watches -------------------------------------------------------------------

    def add_watch(self, cond: IOCondition, callback: Callable[[Channel, IOCondition], bool],
                  context: _hub.Context | None = None) -> Watch:
        """Call ``callback(channel, cond)`` in ``context`` (default: the caller's) whenever
        ``cond`` is ready, until it returns a false value or the watch is cancelled.

        Never switches; thread-safe.  The callback runs inside the hub and must not wait.
        QEMU: ``qio_channel_add_watch_full()``.
        """
        cond = IOCondition(cond)
        if cond not in (_IN, _OUT):
            raise ValueError("add_watch() takes IOCondition.IN or IOCondition.OUT")
        ctx = context if context is not None else _hub.current_context()
        self._enter()  # released when the watch is gone
        watch = Watch(self, cond, callback, ctx)
        self._watches.add(watch)
        try:
            ctx.schedule(watch._start)
        except BaseException:
            self._watches.discard(watch)
            self._leave()
            raise
        return watch


class Watch:
    """A callback watch on a channel, living on one context's hub.  ``cancel()`` from anywhere."""

    def __init__(self, channel: Channel, cond: IOCondition, callback: Callable[[Channel, IOCondition], bool],
                 context: _hub.Context) -> None:
        self.channel = channel
        self.cond = cond
        self.callback = callback
        self.context = context
        self._watcher: Any = None
        self._gone = [None]
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<Watch {self.channel.name} {self.cond!r} in {self.context.name}>"

    def _start(self) -> None:
        if self.cancelled:
            return
        ctx = self.context
        ctx.watches.add(self)
        fd = self.channel._io_fd(self.cond)
        if fd is None:  # always ready, as QEMU's buffer and null channel sources are
            self._watcher = ctx.loop.idle()
            self._watcher.start(self._fire)
        else:
            self._watcher = ctx.loop.io(fd, _hub.READ if self.cond is _IN else _hub.WRITE)
            self._watcher.start(self._fire)

    def _fire(self) -> None:
        if self.cancelled:
            return
        try:
            keep = self.callback(self.channel, self.cond)
        except Exception:
            import sys

            self.context.hub.handle_error(self.callback, *sys.exc_info())
            keep = False
        if not keep:
            self._stop()

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
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.context.watches.discard(self)
        self._stop_unowned()

    def _stop_unowned(self) -> None:
        try:
            self._gone.pop()
        except IndexError:
            return
        self.channel._watches.discard(self)
        self.channel._leave()

