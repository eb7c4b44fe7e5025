"""One error tree for every channel, keeping the stdlib bases so ordinary ``except`` clauses work.

``OSError`` is translated into these once, at the boundary where the library calls the OS
(``from_os_error``: the channel hooks, and the constructors that open sockets, files and
processes); nothing raises a bare ``OSError`` at a user.  The ``OSError`` stays in ``__cause__``.
Messages are lower-case fragments that name the channel and the numbers, in QEMU's manner:
``"nbd-client-3: peer closed after 12 of 28 bytes"``.

Partial progress rides on the exception: ``done`` is how many bytes the failed call had moved,
``expected`` how many it was asked to move (None where that has no meaning).  ``partial`` holds
the bytes a ``*_all`` read had taken when no later read could return them (EOF, our own close);
see ``Channel`` for the rule.
"""

from __future__ import annotations

import errno
import io

_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN})


class ChannelError(Exception):
    """Base of every error a channel raises."""

    done: int = 0
    expected: int | None = None
    partial: bytes = b""

    def __init__(self, message: str = "", *, done: int = 0, expected: int | None = None,
                 partial: bytes = b"") -> None:
        super().__init__(message)
        self.done = done
        self.expected = expected
        self.partial = partial


class ChannelClosedError(ChannelError):
    """The channel was closed on our side (by any thread) before or while the call waited."""


class BrokenChannelError(ChannelError, ConnectionError):
    """The peer or the OS broke the channel; the ``OSError`` is in ``__cause__``."""


class UnexpectedEOF(BrokenChannelError, EOFError):
    """End of file after part of a message: ``partial`` holds the bytes that did arrive."""

    def __init__(self, message: str = "", *, partial: bytes = b"", expected: int | None = None) -> None:
        super().__init__(message, done=len(partial), expected=expected, partial=partial)


class ChannelBusyError(ChannelError, RuntimeError):
    """A second greenlet tried to park in a direction that already has one (QEMU asserts)."""


class WouldBlock(ChannelError, BlockingIOError):
    """The channel is in non-blocking mode and the call would have had to wait."""


class NotSupportedError(ChannelError, io.UnsupportedOperation):
    """The channel kind lacks the feature the call needs (``Feature.FD_PASS``, ``SEEKABLE``, ...)."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """A call's ``timeout=`` ran out; ``done`` says how far it got.  Also a builtin TimeoutError."""


class ContextStoppedError(ChannelError):
    """The context (IOThread) the caller was parked in is stopping; the wait was abandoned."""


def from_os_error(exc: OSError, name: str, what: str, *, done: int = 0,
                  expected: int | None = None) -> BrokenChannelError:
    """The one translation of an ``OSError``: ``"NAME: WHAT failed[ after D of E bytes]: REASON"``.

    Raise the result ``from exc``, so the ``OSError`` stays in ``__cause__``.
    """
    if exc.errno in _RESET_ERRNOS:
        reason = "connection reset by peer" if exc.errno != errno.EPIPE else "peer closed its end"
    else:
        reason = exc.strerror or str(exc)
    progress = f" after {done} of {expected} bytes" if expected is not None else ""
    return BrokenChannelError(f"{name}: {what} failed{progress}: {reason}", done=done, expected=expected)


def add_progress(exc: ChannelError, done: int, expected: int | None) -> ChannelError:
    """Record that the failed call had moved ``done`` of ``expected`` bytes, in the numbers and
    the message (for errors raised while a ``*_all`` call was parked)."""
    exc.done, exc.expected = done, expected
    if expected is not None and exc.args and isinstance(exc.args[0], str) and " bytes" not in exc.args[0]:
        exc.args = (f"{exc.args[0]} after {done} of {expected} bytes",)
    return exc


__all__ = [
    "BrokenChannelError",
    "ChannelBusyError",
    "ChannelClosedError",
    "ChannelError",
    "ChannelTimeoutError",
    "ContextStoppedError",
    "NotSupportedError",
    "UnexpectedEOF",
    "WouldBlock",
    "add_progress",
    "from_os_error",
]
