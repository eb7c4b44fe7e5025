"""Reading a mapped-ram ``file:`` migration (QEMU 9.0+), with positional reads.

With the ``mapped-ram`` capability, ``migrate file:PATH[,offset=N]`` writes the main stream at
``N`` as usual up to the RAM block list, then gives each RAM block a fixed region of the file:
after a block's name and size in the list (``ram_save_setup``) comes its ``MappedRamHeader``
(``mapped_ram_setup_ramblock`` in QEMU 10.0's ``migration/ram.c``; packed, big-endian, 28 bytes:
be32 version 1, be64 page size, be64 bitmap offset, be64 pages offset; offsets are absolute in
the file), its bitmap lies at the bitmap offset (one bit per page, host ``unsigned long`` words:
little-endian on x86-64 and aarch64 hosts), its pages at the pages offset, page ``i`` at
``pages_offset + i * page_size`` (aligned to 1 MiB, ``MAPPED_RAM_FILE_OFFSET_ALIGNMENT``), and
the stream goes on at ``pages_offset + block size``, where the next block's name starts. After the
last block the stream continues as any: the rest of the ram section (EOS, PART and END pieces with
no pages in them), the device sections, EOF and the VM description. Pages are written in place,
by the main thread or, with multifd, by each channel into the same file (no multifd packets, no
init packets in the file); the bitmaps are written last (``ram_save_file_bmap``). A page whose bit
is clear is zero (``save_zero_page`` clears the bit rather than write it). Details and the
layout drawn out: ``docs/migration-formats.md``.

Decisions
---------

*A small reader over a pread callable*, not a request/response sans-IO machine: every read is
positional and small (headers, bitmap chunks) or a bounded copy, so a caller gives
``pread(offset, length) -> bytes`` (``os.pread`` on an fd, or a ``FileChannel.preadv``) and the
file's size, and nothing here seeks, opens or closes. The reader parses what precedes RAM itself
(header, configuration, the ram section's START and block list): it is a few fixed records.

*The main stream is handed back without the mapped-ram parts*: :meth:`MappedRamFile.stream_chunks`
yields the main stream's bytes with every MappedRamHeader and every block's region left out, which
is exactly a non-mapped-ram stream whose RAM was sent elsewhere, so the sequential stream parser
parses it unchanged (offsets in its errors are offsets in that stream; :meth:`file_offset` maps
them back). :attr:`segments` lists the file ranges it is made of.

*Checked before anything is trusted*: the capability is declared in the configuration, versions,
page sizes (the stream parser's rule, and the stream's own), every region inside the file, in order and not
overlapping, pages regions page aligned, block sizes whole pages; counts capped. Bitmaps are read
in bounded chunks, so memory does not grow with RAM size. Errors are :class:`MappedRamError` (a
``ValueError``) whose message starts with the file offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ._format import (
    QEMU_VM_CONFIGURATION,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    RAM_SAVE_FLAG_MEM_SIZE,
    MigrationStreamError,
)
from ._ram import MAX_PAGE_BITS, MIN_PAGE_BITS, check_page_size

__all__ = ["MappedRamBlock", "MappedRamError", "MappedRamFile", "NotMappedRam"]

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HDR_SIZE = 28

_BITMAP_CHUNK = 64 * 1024  # bitmap bytes read at once (512 Ki pages)
_COPY_CHUNK = 1 << 20  # page bytes copied at once

Pread = Callable[[int, int], bytes]


class MappedRamError(MigrationStreamError):
    """The file is not a well-formed mapped-ram migration. The message starts with ``offset``
    (a file offset)."""


class NotMappedRam(MappedRamError):
    """Not a mapped-ram file: its configuration does not declare the capability, or the file
    is not well formed before that point (a sequential stream parser reports that better)."""


@dataclass(frozen=True, slots=True)
class MappedRamBlock:
    """One RAM block's region in the file. ``bitmap_offset``/``pages_offset`` are absolute file
    offsets (both 0: the block is not in the file, x-ignore-shared); ``addr`` only with
    x-ignore-shared."""

    name: str
    size: int
    page_size: int
    header_offset: int
    bitmap_offset: int
    pages_offset: int
    addr: int | None = None

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    @property
    def bitmap_size(self) -> int:
        """Bytes of bitmap: whole 64-bit words, as QEMU writes ``unsigned long`` on 64-bit hosts."""
        return (self.pages + 63) // 64 * 8

    @property
    def in_file(self) -> bool:
        return not (self.bitmap_offset == 0 and self.pages_offset == 0)


class _Reader:
    """Sequential reads of the main stream at file offsets, through pread, in small pieces."""

    def __init__(self, pread: Pread, size: int, pos: int) -> None:
        self.pread = pread
        self.size = size
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.size:
            raise MappedRamError(self.pos, f"file ends inside {what} ({self.size - self.pos} of "
                                           f"{n} bytes)")
        data = self.pread(self.pos, n)
        if len(data) != n:
            raise MappedRamError(self.pos, f"short read inside {what} ({len(data)} of {n} bytes)")
        self.pos += n
        return data

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u8(what)
        if n == 0:
            raise MappedRamError(at, f"{what} has length 0")
        return self.take(n, what).decode("utf-8", "backslashreplace")


class MappedRamFile:
    """A mapped-ram migration file, parsed up to its RAM regions (see the module notes).

    ``pread(offset, length)`` returns the file's bytes there (fewer only at its end); ``size`` is
    the file's size; ``offset`` is where the stream starts (``file:PATH,offset=N``). Parsing
    happens here, once; it raises MappedRamError. ``max_ram_blocks`` caps the block list.
    Nothing here switches greenlets unless ``pread`` does.
    """

    def __init__(self, pread: Pread, size: int, *, offset: int = 0,
                 max_ram_blocks: int = 4096) -> None:
        self._pread = pread
        self.size = size
        self.offset = offset
        self.machine = ""
        self.capabilities: tuple[str, ...] = ()
        self.page_size = 4096
        self.uuid: bytes | None = None
        self.blocks: tuple[MappedRamBlock, ...] = ()
        self.segments: tuple[tuple[int, int], ...] = ()
        self._parse(max_ram_blocks)

    @classmethod
    def from_fd(cls, fd: int, *, offset: int = 0, max_ram_blocks: int = 4096) -> MappedRamFile:
        """Read through ``os.pread`` on ``fd`` (a regular file; not closed here)."""
        return cls(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size, offset=offset,
                   max_ram_blocks=max_ram_blocks)

    # -- the stream up to the RAM regions ----------------------------------------------------

    def _parse(self, max_ram_blocks: int) -> None:
        r = _Reader(self._pread, self.size, self.offset)
        try:
            self._parse_head(r)
        except NotMappedRam:
            raise
        except MappedRamError as exc:  # before the capability is seen: not (known to be) ours
            raise NotMappedRam(exc.offset, str(exc).partition(": ")[2]) from None
        self._parse_blocks(r, max_ram_blocks)

    def _parse_head(self, r: _Reader) -> None:
        """The stream header and the configuration, up to the capability check."""
        magic, version = struct.unpack(">II", r.take(8, "the stream header"))
        if magic != QEMU_VM_FILE_MAGIC:
            raise MappedRamError(self.offset, f"expected magic QEVM (0x5145564d), got 0x{magic:08x}")
        if version != 3:
            raise MappedRamError(self.offset + 4, f"expected stream version 3, got {version}")
        at = r.pos
        if r.u8("the configuration section") != QEMU_VM_CONFIGURATION:
            raise NotMappedRam(at, "expected the configuration section (0x07): a mapped-ram "
                                   "stream declares its capability there")
        self._configuration(r)
        if "mapped-ram" not in self.capabilities:
            raise NotMappedRam(at, "the configuration does not declare the mapped-ram capability: "
                                   "not a mapped-ram file (parse it as a sequential stream)")

    def _parse_blocks(self, r: _Reader, max_ram_blocks: int) -> None:
        """The ram section's START and its block list, with each block's mapped-ram header."""
        at = r.pos
        t = r.u8("the ram section header")
        if t != QEMU_VM_SECTION_START:
            raise MappedRamError(at, f"expected the ram section's START (0x01), got 0x{t:02x}")
        r.be32("the ram section header")  # section id
        idstr = r.string("section idstr")
        r.be32("the ram section header")  # instance id
        ram_version = r.be32("the ram section header")
        if idstr != "ram" or ram_version != 4:
            raise MappedRamError(at, f"expected the ram section (version 4) first, got {idstr!r} "
                                     f"version {ram_version}")
        at = r.pos
        hdr = r.be64("the RAM block list (MEM_SIZE)")
        mask = self.page_size - 1
        if hdr & mask != RAM_SAVE_FLAG_MEM_SIZE:
            raise MappedRamError(at, f"expected MEM_SIZE (0x04) first in the ram section, got "
                                     f"flags 0x{hdr & mask:x}")
        total = left = hdr & ~mask
        ignore_shared = "x-ignore-shared" in self.capabilities
        blocks: list[MappedRamBlock] = []
        segments: list[tuple[int, int]] = []
        seg_start = self.offset
        while left > 0:
            if len(blocks) >= max_ram_blocks:
                raise MappedRamError(r.pos, f"more than {max_ram_blocks} RAM blocks")
            at = r.pos
            name = r.string("RAM block name")
            size = r.be64("a RAM block size")
            if size > left:
                raise MappedRamError(at, f"RAM block {name!r} of 0x{size:x} bytes exceeds the "
                                         f"0x{left:x} left of the announced total 0x{total:x}")
            left -= size
            addr = r.be64("a RAM block address") if ignore_shared else None
            h = r.pos
            segments.append((seg_start, h - seg_start))
            block = self._block(r, name, size, addr)
            blocks.append(block)
            if block.in_file:
                r.pos = block.pages_offset + block.size
            seg_start = r.pos
        segments.append((seg_start, self.size - seg_start))
        self.blocks = tuple(blocks)
        self.segments = tuple(segments)

    def _configuration(self, r: _Reader) -> None:
        at = r.pos
        n = r.be32("the configuration section")
        if not 0 < n <= 256:
            raise MappedRamError(at, f"machine name length {n} is absurd (expected 1..256)")
        self.machine = r.take(n, "the machine name").decode("utf-8", "backslashreplace")
        caps: list[str] = []
        while self._pread(r.pos, 1) == bytes([QEMU_VM_SUBSECTION]):
            r.pos += 1
            at = r.pos
            name = r.string("configuration subsection name")
            r.be32("a subsection version")
            if name == "configuration/target-page-bits":
                bits = r.be32("target-page-bits")
                if not MIN_PAGE_BITS <= bits <= MAX_PAGE_BITS:
                    raise MappedRamError(at, f"target page bits {bits} refused: QEMU uses "
                                             f"{MIN_PAGE_BITS} to {MAX_PAGE_BITS}")
                self.page_size = 1 << bits
            elif name == "configuration/capabilities":
                count = r.be32("the capability count")
                if count > 256:
                    raise MappedRamError(at, f"capability count {count} is absurd")
                caps.extend(r.string("capability name") for _ in range(count))
            elif name == "configuration/uuid":
                self.uuid = r.take(16, "the uuid")
            else:
                raise MappedRamError(at, f"unknown configuration subsection {name!r}")
        self.capabilities = tuple(caps)

    def _block(self, r: _Reader, name: str, size: int, addr: int | None) -> MappedRamBlock:
        h = r.pos
        raw = r.take(MAPPED_RAM_HDR_SIZE, f"the mapped-ram header of block {name!r}")
        version, page_size, bitmap_offset, pages_offset = struct.unpack(">IQQQ", raw)
        what = f"block {name!r}"
        if version != MAPPED_RAM_HDR_VERSION:
            raise MappedRamError(h, f"mapped-ram header version {version} of {what}, expected 1")
        try:
            check_page_size(page_size)
        except ValueError as exc:
            raise MappedRamError(h + 4, str(exc).replace("refused", f"of {what} refused", 1)) \
                from None
        if page_size != self.page_size:
            raise MappedRamError(h + 4, f"page size {page_size} of {what} differs from the "
                                        f"stream's {self.page_size}")
        if size % page_size:
            raise MappedRamError(h, f"{what} of 0x{size:x} bytes is not whole pages")
        block = MappedRamBlock(name, size, page_size, h, bitmap_offset, pages_offset, addr)
        if not block.in_file:
            return block
        end = h + MAPPED_RAM_HDR_SIZE
        if not (end <= bitmap_offset and bitmap_offset + block.bitmap_size <= pages_offset):
            raise MappedRamError(h + 12, f"bitmap of {what} at {bitmap_offset} (0x{block.bitmap_size:x} "
                                         f"bytes) is not between its header (ends at {end}) and "
                                         f"its pages (at {pages_offset})")
        if pages_offset % page_size:
            raise MappedRamError(h + 20, f"pages of {what} at {pages_offset} are not aligned to "
                                         f"the {page_size}-byte page size")
        if pages_offset + size > self.size:
            raise MappedRamError(h + 20, f"pages of {what} end at {pages_offset + size}, past the "
                                         f"end of the file ({self.size})")
        return block

    # -- the main stream without the mapped-ram regions --------------------------------------

    def stream_chunks(self, chunk: int = _COPY_CHUNK) -> Iterator[bytes]:
        """The main stream with the mapped-ram headers and regions left out, in bounded chunks."""
        for start, length in self.segments:
            pos, end = start, start + length
            while pos < end:
                n = min(chunk, end - pos)
                data = self._pread(pos, n)
                if len(data) != n:
                    raise MappedRamError(pos, f"short read of the main stream ({len(data)} of {n})")
                yield data
                pos += n

    @property
    def stream_size(self) -> int:
        """Bytes of the main stream (what stream_chunks() yields)."""
        return sum(n for _, n in self.segments)

    def file_offset(self, stream_offset: int) -> int:
        """The file offset of a byte of the stream stream_chunks() yields."""
        for start, length in self.segments:
            if stream_offset < length:
                return start + stream_offset
            stream_offset -= length
        raise ValueError("offset past the end of the main stream")

    # -- pages --------------------------------------------------------------------------------

    def block(self, name: str) -> MappedRamBlock:
        """The block named ``name`` (KeyError if none)."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def present_runs(self, block: MappedRamBlock) -> Iterator[tuple[int, int]]:
        """Yield ``(block_offset, length)`` for each run of pages whose bit is set, in order."""
        if not block.in_file:
            return
        ps = block.page_size
        npages = block.pages
        run_start = -1
        page = 0
        pos = block.bitmap_offset
        end = pos + block.bitmap_size
        while pos < end:
            n = min(_BITMAP_CHUNK, end - pos)
            data = self._pread(pos, n)
            if len(data) != n:
                raise MappedRamError(pos, f"file ends inside the bitmap of block {block.name!r}")
            for word in _words(data):
                if page + 64 > npages:  # bits past the last page mean nothing
                    word &= (1 << (npages - page)) - 1
                if word == 0:
                    if run_start >= 0:
                        yield run_start * ps, (page - run_start) * ps
                        run_start = -1
                elif word == 0xFFFFFFFFFFFFFFFF:
                    if run_start < 0:
                        run_start = page
                else:
                    for bit in range(64):
                        if word >> bit & 1:
                            if run_start < 0:
                                run_start = page + bit
                        elif run_start >= 0:
                            yield run_start * ps, (page + bit - run_start) * ps
                            run_start = -1
                page += 64
                if page >= npages:
                    break
            pos += n
        if run_start >= 0:
            yield run_start * ps, (min(page, npages) - run_start) * ps

    def read_pages(self, block: MappedRamBlock, offset: int, length: int) -> bytes:
        """``length`` bytes of ``block`` from ``offset`` as the file has them (present or not)."""
        if offset < 0 or offset + length > block.size or not block.in_file:
            raise ValueError(f"range 0x{offset:x}+0x{length:x} is outside block {block.name!r}")
        data = self._pread(block.pages_offset + offset, length)
        if len(data) != length:
            raise MappedRamError(block.pages_offset + offset,
                                 f"short read of the pages of block {block.name!r}")
        return data

    def rebuild_block(self, block: MappedRamBlock, pwrite: Callable[[bytes, int], object]) -> int:
        """Copy the block's present pages with ``pwrite(data, block_offset)``, in bounded chunks.

        Pages whose bit is clear are zero and are not written: write into a file truncated to
        ``block.size`` (sparse). Returns the bytes copied.
        """
        copied = 0
        for start, length in self.present_runs(block):
            pos = start
            while pos < start + length:
                n = min(_COPY_CHUNK, start + length - pos)
                pwrite(self.read_pages(block, pos, n), pos)
                pos += n
                copied += n
        return copied


def _words(data: bytes) -> Iterator[int]:
    """The bitmap's 64-bit little-endian words (``unsigned long`` of an x86-64 host)."""
    return iter(struct.unpack(f"<{len(data) // 8}Q", data))
