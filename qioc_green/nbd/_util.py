"""The protocol's errors (local: our misuse; remote: the peer broke the protocol) and the two
sentinels ``next_event()`` returns besides events."""

from __future__ import annotations


class ProtocolError(Exception):
    """The NBD conversation cannot go on; ``offset`` is the byte in the received stream (or None)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol state does not allow (a bug in the glue)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; hang up."""


class Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = Sentinel("NEED_DATA")
"""``next_event()``: feed more bytes with ``receive_data()``."""
PAUSED = Sentinel("PAUSED")
"""``next_event()``: nothing is parsed until we send a reply (or finish the TLS upgrade)."""

