"""One error tree for every channel, keeping the stdlib bases so ordinary ``except`` clauses work.

``OSError`` is translated into these once, at the boundary where a channel calls its kind's
non-blocking hooks (``Channel._broken``); nothing deeper raises a bare ``OSError`` at a user.
Messages are lower-case fragments that name the channel and the numbers, in QEMU's manner:
``"nbd-client-3: peer closed after 12 of 28 bytes"``.

Partial progress rides on the exception: ``done`` is how many bytes the failed call had moved,
``expected`` how many it was asked to move (None where that has no meaning).
"""

from __future__ import annotations

import io


class ChannelError(Exception):
    """Base of every error a channel raises."""

    done: int = 0
    expected: int | None = None

    def __init__(self, message: str = "", *, done: int = 0, expected: int | None = None) -> None:
        super().__init__(message)
        self.done = done
        self.expected = expected


class ChannelClosedError(ChannelError):
    """The channel was closed on our side (by any thread) before or while the call waited."""


class BrokenChannelError(ChannelError, ConnectionError):
    """The peer or the OS broke the channel; the ``OSError`` is in ``__cause__``."""


class UnexpectedEOF(BrokenChannelError, EOFError):
    """End of file after part of a message: ``partial`` holds the bytes that did arrive."""

    def __init__(self, message: str = "", *, partial: bytes = b"", expected: int | None = None) -> None:
        super().__init__(message, done=len(partial), expected=expected)
        self.partial = partial


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


__all__ = [
    "ChannelError",
    "ChannelClosedError",
    "BrokenChannelError",
    "UnexpectedEOF",
    "ChannelBusyError",
    "WouldBlock",
    "NotSupportedError",
    "ChannelTimeoutError",
    "ContextStoppedError",
]
