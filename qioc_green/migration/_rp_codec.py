"""The return path's wire format: message types, the messages as values, the encoders, and
:class:`ReturnPathReader` (a destination's return path, parsed with the source's own checks).

Every message is ``be16 type, be16 length, data``; the facts behind the table below and what a
destination sends when are in ``_return_path``. Sans-IO: no sockets, never blocks.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Literal

from ._format import NEED_DATA, LocalProtocolError, NeedData

__all__ = [
    "MAX_MESSAGE_DATA",
    "Pong",
    "RecvBitmap",
    "ReqPages",
    "ResumeAck",
    "ReturnPathError",
    "ReturnPathReader",
    "RpMessage",
    "RpType",
    "Shut",
    "SwitchoverAck",
    "encode_message",
    "encode_pong",
    "encode_req_pages",
    "encode_resume_ack",
    "encode_shut",
    "encode_switchover_ack",
]

MAX_MESSAGE_DATA = 512  # the source's buffer in source_return_path_thread()
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
MIGRATION_RESUME_ACK_VALUE = 1

_HEADER = struct.Struct(">HH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_REQ = struct.Struct(">QI")


class RpType(enum.IntEnum):
    """Return-path message types (QEMU's ``enum mig_rp_message_type``)."""

    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


#: data length of each type; None: variable (checked per message)
_RP_LENGTHS: dict[int, int | None] = {
    RpType.SHUT: 4,
    RpType.PONG: 4,
    RpType.REQ_PAGES_ID: None,
    RpType.REQ_PAGES: 12,
    RpType.RECV_BITMAP: None,
    RpType.RESUME_ACK: 4,
    RpType.SWITCHOVER_ACK: 0,
}


class ReturnPathError(ValueError):
    """The peer broke the return-path protocol (a bad message, or a command out of place).

    ``offset``: for the reader, the return-path offset of the message the error is about.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"return path offset {offset}: {message}")
        self.offset = offset


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shut:
    """SHUT: the destination is done; ``status`` 0 is success."""

    status: int


@dataclass(frozen=True, slots=True)
class Pong:
    """PONG: the answer to PING ``value``."""

    value: int


@dataclass(frozen=True, slots=True)
class ReqPages:
    """REQ_PAGES(_ID): ``length`` bytes at ``start`` of ``block`` (None: the last block named)."""

    start: int
    length: int
    block: str | None = None


@dataclass(frozen=True, slots=True)
class RecvBitmap:
    """RECV_BITMAP: the received-pages bitmap of ``block`` (little-endian 64-bit words)."""

    block: str
    bitmap: bytes


@dataclass(frozen=True, slots=True)
class ResumeAck:
    """RESUME_ACK: the destination is ready to resume a recovered postcopy (``value`` 1)."""

    value: int


@dataclass(frozen=True, slots=True)
class SwitchoverAck:
    """SWITCHOVER_ACK: the source may switch over."""


RpMessage = Shut | Pong | ReqPages | RecvBitmap | ResumeAck | SwitchoverAck


# -- encoding ------------------------------------------------------------------------------------


def encode_message(msg_type: int, data: bytes = b"") -> bytes:
    """One return-path message: be16 type, be16 length, data. Never switches."""
    if len(data) > MAX_MESSAGE_DATA:
        raise ValueError(f"return-path message of {len(data)} bytes (the source takes at most "
                         f"{MAX_MESSAGE_DATA})")
    return _HEADER.pack(msg_type, len(data)) + data


def encode_shut(status: int) -> bytes:
    """SHUT ``status`` (0: the destination loaded everything)."""
    return encode_message(RpType.SHUT, _BE32.pack(status))


def encode_pong(value: int) -> bytes:
    """PONG echoing PING ``value``."""
    return encode_message(RpType.PONG, _BE32.pack(value))


def encode_req_pages(start: int, length: int, block: str | None = None) -> bytes:
    """REQ_PAGES_ID (``block`` named) or REQ_PAGES (same block as the previous request)."""
    head = _REQ.pack(start, length)
    if block is None:
        return encode_message(RpType.REQ_PAGES, head)
    name = block.encode()
    if not 0 < len(name) < 256:
        raise ValueError(f"RAM block name of {len(name)} bytes")
    return encode_message(RpType.REQ_PAGES_ID, head + bytes([len(name)]) + name)


def encode_resume_ack(value: int = MIGRATION_RESUME_ACK_VALUE) -> bytes:
    return encode_message(RpType.RESUME_ACK, _BE32.pack(value))


def encode_switchover_ack() -> bytes:
    return encode_message(RpType.SWITCHOVER_ACK)


# -- decoding what a destination sends (for a relay, and for tests) ------------------------------


class ReturnPathReader:
    """Parse a destination's return path, sans-IO, with the source's own checks.

    ``feed(data)``, then ``next_message()`` until :data:`NEED_DATA`; ``close()`` at EOF (raises
    if a message was cut). Never blocks or switches. Raises :class:`ReturnPathError` for what
    ``source_return_path_thread()`` refuses, and again on every later call. Memory: one message
    (at most 516 bytes) plus one RECV_BITMAP bitmap (``max_bitmap_bytes``).
    """

    def __init__(self, *, max_bitmap_bytes: int = 16 << 20) -> None:
        self.max_bitmap_bytes = max_bitmap_bytes
        self._buf = bytearray()
        self._offset = 0  # return-path offset of _buf[0]
        self._error: ReturnPathError | None = None
        self._closed = False
        self._bitmap_block: str | None = None  # RECV_BITMAP header seen, bitmap to follow
        self.messages = 0

    @property
    def offset(self) -> int:
        """Bytes of the return path consumed so far."""
        return self._offset

    @property
    def buffered(self) -> int:
        """Bytes held, waiting for the rest of a message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise LocalProtocolError("feed() after close()")
        if self._error is None:
            self._buf += data

    def close(self) -> None:
        """The return path ended. Raises ReturnPathError if it ended inside a message."""
        self._closed = True
        if self._error is None and self._buf:
            self._fail(f"return path ends {len(self._buf)} bytes into a message", self._offset)

    def _fail(self, message: str, at: int) -> None:
        self._error = ReturnPathError(message, at)
        self._buf = bytearray()
        raise self._error

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return data

    def next_message(self) -> RpMessage | Literal[NeedData.NEED_DATA]:
        """The next message, or NEED_DATA. Never blocks."""
        if self._error is not None:
            raise self._error
        if self._bitmap_block is not None:
            return self._bitmap()
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        msg_type, length = _HEADER.unpack_from(buf)
        at = self._offset
        want = _RP_LENGTHS.get(msg_type, -1)
        if want == -1:
            self._fail(f"invalid message type 0x{msg_type:04x} (length 0x{length:04x})", at)
        name = RpType(msg_type).name
        if (want is not None and length != want) or length > MAX_MESSAGE_DATA:
            self._fail(f"{name} message with length {length}, expected "
                       f"{want if want is not None else f'at most {MAX_MESSAGE_DATA}'}", at)
        if len(buf) < 4 + length:
            return NEED_DATA
        data = self._take(4 + length)[4:]
        self.messages += 1
        if msg_type == RpType.SHUT:
            return Shut(_BE32.unpack(data)[0])
        if msg_type == RpType.PONG:
            return Pong(_BE32.unpack(data)[0])
        if msg_type == RpType.RESUME_ACK:
            return ResumeAck(_BE32.unpack(data)[0])
        if msg_type == RpType.SWITCHOVER_ACK:
            return SwitchoverAck()
        if msg_type == RpType.REQ_PAGES:
            start, size = _REQ.unpack(data)
            return ReqPages(start, size)
        if msg_type == RpType.REQ_PAGES_ID:
            if length < 13 or length != 13 + data[12]:
                self._fail(f"REQ_PAGES_ID with length {length}, its block name says "
                           f"{13 + data[12] if length >= 13 else 'at least 13'}", at)
            start, size = _REQ.unpack_from(data)
            return ReqPages(start, size, data[13:].decode("utf-8", "backslashreplace"))
        # RECV_BITMAP: the name here, the bitmap after the message
        if length < 1 or length != 1 + data[0]:
            self._fail(f"RECV_BITMAP with length {length}, its block name says "
                       f"{1 + data[0] if length else 'at least 1'}", at)
        self._bitmap_block = data[1:].decode("utf-8", "backslashreplace")
        return self._bitmap()

    def _bitmap(self) -> RpMessage | Literal[NeedData.NEED_DATA]:
        buf = self._buf
        if len(buf) < 8:
            return NEED_DATA
        (size,) = _BE64.unpack_from(buf)
        if size > self.max_bitmap_bytes:
            self._fail(f"RECV_BITMAP for {self._bitmap_block!r}: bitmap of {size} bytes "
                       f"(cap {self.max_bitmap_bytes})", self._offset)
        if len(buf) < 16 + size:
            return NEED_DATA
        (mark,) = _BE64.unpack_from(buf, 8 + size)
        if mark != RECV_BITMAP_ENDING:
            self._fail(f"RECV_BITMAP for {self._bitmap_block!r}: end mark 0x{mark:016x}",
                       self._offset + 8 + size)
        bitmap = self._take(16 + size)[8 : 8 + size]
        block, self._bitmap_block = self._bitmap_block, None
        assert block is not None
        return RecvBitmap(block, bitmap)
