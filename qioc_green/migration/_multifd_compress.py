"""Bounded decompression of multifd payloads: zlib (stdlib) and zstd (``zstandard``, optional).

QEMU 10's ``migration/multifd-zlib.c`` and ``multifd-zstd.c`` keep one compression stream per
channel for the whole migration: the zlib stream (``deflateInit``, with its 2-byte header at the
start of the channel's first payload) and the zstd frame are never ended, and each packet's
payload ends with a flush (``Z_SYNC_FLUSH``, ``ZSTD_e_flush``), so the payload of one packet
decompresses to exactly its normal pages, ``normal_pages * page_size`` bytes, and nothing is left
pending. The receiving side (``multifd_zlib_recv``, ``multifd_zstd_recv``) checks exactly that
size; so do we, and a decompressor is one per channel, fed the payloads in order.

A peer chooses what its bytes inflate to, so output is bounded *before* it is produced:

- zlib: ``decompressobj().decompress(data, max_length)`` stops at the bound by itself.
- zstd: ``zstandard``'s ``decompressobj`` has no output bound (and its ``stream_writer`` lags
  its input, measured: a 19-byte block of 100,000 bytes gave 16 KiB until the next write), so the
  payload is first walked block by block (RFC 8878: a 3-byte header per block gives its type and
  size; a raw or RLE block regenerates exactly its size, a compressed block at most 128 KiB) and
  handed to the decompressor in groups whose worst case fits the bytes still expected. A payload
  whose blocks could regenerate more than expected is refused without being inflated. The frame
  header's window is capped (``max_window_size``), so the decoder's own buffer is bounded too.

Errors are :class:`DecompressError` (a ``ValueError``) with a lower-case message; the parser adds
the channel and stream offset.
"""

from __future__ import annotations

import zlib
from typing import Any

__all__ = ["COMPRESSIONS", "DecompressError", "Decompressor", "ZlibDecompressor", "ZstdDecompressor",
           "decompressor_for"]

#: multifd-compression values this module decodes (QEMU 10 also has qpl, uadk, qatzip: hardware).
COMPRESSIONS = ("none", "zlib", "zstd")

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 * 1024  # Block_Maximum_Size: min(window, 128 KiB)
_ZSTD_MAX_WINDOW = 8 << 20  # QEMU's level-1 streams use a 512 KiB window; refuse past 8 MiB


class DecompressError(ValueError):
    """A payload that does not decompress to exactly the bytes its packet announces."""


class Decompressor:
    """One channel's decompression stream. ``decompress(payload, expected) -> bytes``."""

    name = "none"

    def decompress(self, payload: memoryview, expected: int) -> bytes | bytearray:
        """Exactly ``expected`` bytes from ``payload`` (non-empty), or DecompressError."""
        raise NotImplementedError


class ZlibDecompressor(Decompressor):
    """zlib with its header (QEMU's ``deflateInit``), one stream for the channel's life."""

    name = "zlib"

    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def decompress(self, payload: memoryview, expected: int) -> bytes:
        d = self._d
        try:
            out = d.decompress(payload, expected + 1)
            while len(out) <= expected and d.unconsumed_tail:
                # the flush marker (an empty stored block) may be left over: it yields nothing
                out += d.decompress(d.unconsumed_tail, 1)
        except zlib.error as exc:
            raise DecompressError(f"zlib: {exc}") from None
        if d.eof:
            raise DecompressError("zlib stream ended (QEMU never ends it)")
        if len(out) > expected:
            raise DecompressError(f"payload inflates to more than the {expected} bytes announced")
        if len(out) < expected:
            raise DecompressError(f"payload inflates to {len(out)} bytes, {expected} announced")
        return out


def _import_zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise DecompressError(
            "multifd-compression zstd needs the 'zstandard' package "
            "(pip install 'qioc_green[zstd]')") from None
    return zstandard


class ZstdDecompressor(Decompressor):
    """zstd through ``zstandard``: one frame for the channel's life, bounded block by block."""

    name = "zstd"

    def __init__(self) -> None:
        zstandard = _import_zstandard()
        self._error: type[Exception] = zstandard.ZstdError
        self._d = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
        self._in_frame = False  # the frame header was seen (in the channel's first payload)

    @staticmethod
    def _frame_header_size(buf: memoryview) -> int:
        """Size of the frame header at buf[0:] (RFC 8878 3.1.1)."""
        if len(buf) < 5:
            raise DecompressError("zstd: payload ends inside the frame header")
        magic = int.from_bytes(buf[0:4], "little")
        if magic != _ZSTD_MAGIC:
            raise DecompressError(f"zstd: frame magic 0x{magic:08x}, expected 0x{_ZSTD_MAGIC:08x}")
        fhd = buf[4]
        if fhd & 0x08:
            raise DecompressError("zstd: reserved bit set in the frame header")
        single = fhd >> 5 & 1
        fcs = (0, 2, 4, 8)[fhd >> 6] or (1 if single else 0)
        size = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
        if size > len(buf):
            raise DecompressError("zstd: payload ends inside the frame header")
        return size

    @staticmethod
    def _blocks(payload: memoryview, pos: int) -> list[tuple[int, int]]:
        """The blocks of payload[pos:], as [(end, most bytes it can regenerate)]."""
        blocks = []
        n = len(payload)
        while pos < n:
            if pos + 3 > n:
                raise DecompressError("zstd: payload ends inside a block header")
            hdr = payload[pos] | payload[pos + 1] << 8 | payload[pos + 2] << 16
            last, btype, size = hdr & 1, hdr >> 1 & 3, hdr >> 3
            if last:
                raise DecompressError("zstd: last block of the frame (QEMU never ends it)")
            if btype == 3:
                raise DecompressError("zstd: reserved block type")
            if size > _ZSTD_BLOCK_MAX:
                raise DecompressError(f"zstd: block of {size} bytes is over 128 KiB")
            # raw: size bytes, regenerated as they are; RLE: one byte regenerated size times;
            # compressed: size bytes, at most Block_Maximum_Size out
            pos += 4 if btype == 1 else 3 + size
            if pos > n:
                raise DecompressError("zstd: payload ends inside a block (QEMU flushes whole blocks)")
            blocks.append((pos, _ZSTD_BLOCK_MAX if btype == 2 else size))
        return blocks

    def decompress(self, payload: memoryview, expected: int) -> bytearray:
        pos = 0
        out = bytearray()
        try:
            if not self._in_frame and len(payload):
                pos = self._frame_header_size(payload)
                out += self._d.decompress(payload[:pos])
                self._in_frame = True
            blocks = self._blocks(payload, pos)
            i = 0
            while i < len(blocks):
                # blocks whose worst case fits what is still expected, and at least one (so
                # the output never passes the bound by more than one block's 128 KiB)
                j, worst = i + 1, blocks[i][1]
                while j < len(blocks) and worst + blocks[j][1] <= expected - len(out):
                    worst += blocks[j][1]
                    j += 1
                end = blocks[j - 1][0]
                out += self._d.decompress(payload[pos:end])
                if len(out) > expected:
                    raise DecompressError(
                        f"payload inflates to more than the {expected} bytes announced")
                pos, i = end, j
        except self._error as exc:
            raise DecompressError(f"zstd: {exc}") from None
        if len(out) < expected:
            raise DecompressError(f"payload inflates to {len(out)} bytes, {expected} announced")
        return out


def decompressor_for(name: str) -> Decompressor | None:
    """A fresh decompressor for multifd-compression ``name`` (None for "none")."""
    if name == "none":
        return None
    if name == "zlib":
        return ZlibDecompressor()
    if name == "zstd":
        return ZstdDecompressor()
    raise DecompressError(f"multifd-compression {name!r} is not supported (none, zlib, zstd)")
