"""RAM records: the part of the parser that sees nearly every byte of a migration.

One :class:`~._events.RamPages` event covers a run of consecutive ``PAGE|CONTINUE`` records of
one block (checked with one ``struct`` call over all their headers), one
:class:`~._events.ZeroPages` a run of zero-page records; see ``_parser`` for the decisions.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ._events import Event, RamBlock, RamBlocks, RamFlush, RamPages, ZeroPages
from ._format import (
    BE64,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    MigrationStreamError,
    NeedData,
)
from ._receivebuffer import SHORT, Cursor, ReceiveBuffer

MAX_RUN = 512  # records checked by one struct call (512 pages = 2 MiB of data)
# Target page sizes a stream may use, as bits: QEMU's targets have 1 KiB (ARMv5/v6 tiny pages,
# AVR) to 16 KiB pages (LoongArch, TriCore), and the record format itself needs at least 1 KiB
# (the flags take the low 10 bits of a record header: MULTIFD_FLUSH is 0x200). 64 KiB leaves
# room above QEMU's largest and bounds the one page the parser may have to copy whole.
MIN_PAGE_BITS = 10
MAX_PAGE_BITS = 16
# struct formats for runs of n records, compiled on first use and shared by all parsers
_RUN_STRUCTS: dict[tuple[int, int], struct.Struct] = {}
_ZERO_STRUCTS: dict[int, struct.Struct] = {}

Step = Callable[[], "Event | None | NeedData"]


def _size(bits: int) -> str:
    """2**bits bytes as a short size: 4 KiB, 1 GiB, 2^40 B."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if shift <= bits < shift + 10:
            return f"{1 << (bits - shift)} {unit}"
    return f"{1 << bits} B" if bits < 10 else f"2^{bits} B"


def check_page_bits(bits: int, at: int) -> int:
    """A configuration's ``target-page-bits``, or MigrationStreamError for sizes QEMU never
    uses (see MIN_PAGE_BITS)."""
    if not MIN_PAGE_BITS <= bits <= MAX_PAGE_BITS:
        raise MigrationStreamError(
            at, f"target page bits {bits} ({_size(bits)} pages) is outside what QEMU uses "
                f"({MIN_PAGE_BITS}..{MAX_PAGE_BITS}: {_size(MIN_PAGE_BITS)} to "
                f"{_size(MAX_PAGE_BITS)})")
    return bits


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of two equal-length tuples (a[0] == b[0]); C-speed compares."""
    lo, hi = 1, len(a)  # a[:lo] == b[:lo]; a[:hi+1] != b[:hi+1] or hi == len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RamReader(ReceiveBuffer):
    """The RAM record states of the parser (a base class of ``StreamParser``)."""

    def __init__(self, page_size: int, max_ram_blocks: int) -> None:
        super().__init__()
        if page_size & (page_size - 1) or not 1 << MIN_PAGE_BITS <= page_size <= 1 << MAX_PAGE_BITS:
            raise ValueError(f"page size {page_size} is not a power of two from "
                             f"{1 << MIN_PAGE_BITS} to {1 << MAX_PAGE_BITS}")
        self.max_ram_blocks = max_ram_blocks
        self._set_page_size(page_size)
        self._step: Step = self._st_ram
        self._blocks: dict[str, RamBlock] = {}
        self._block_names: set[str] = set()  # every name MEM_SIZE ever gave (for the cap)
        self._block: RamBlock | None = None  # CONTINUE's block
        self._ignore_shared = False
        self._page_left = 0  # bytes still missing from a page cut by a chunk end
        self._page_buf = bytearray()
        self._page_at = ("", 0)

    def _set_page_size(self, page_size: int) -> None:
        self.page_size = page_size
        self._mask = page_size - 1
        self._rec = page_size + 8

    def _st_footer(self) -> Event | None | NeedData:
        """The state after a section's data (the parser's)."""
        raise NotImplementedError

    def _st_ram(self) -> Event | None | NeedData:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 8:
            if not self._ensure(8):
                return self._starve("a RAM record")
            buf = self._buf
            pos = self._pos
        (hdr,) = BE64.unpack_from(buf, pos)
        flags = hdr & self._mask
        if flags == RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE:
            return self._page_run(hdr)
        if flags == RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE:
            return self._zero_run(hdr)
        return self._ram_record(hdr, flags)

    def _block_for(self, offset: int, count: int) -> RamBlock:
        block = self._block
        if block is None:
            raise self._err("RAM record with CONTINUE before any block was named")
        if offset + count * self.page_size > block.size:
            raise self._err(f"page at offset 0x{offset:x} is beyond block {block.name!r} "
                            f"(size 0x{block.size:x})")
        return block

    def _page_run(self, hdr: int) -> Event | None | NeedData:
        """One or more PAGE|CONTINUE records at consecutive offsets: one RamPages event."""
        buf = self._buf
        pos = self._pos
        ps = self.page_size
        rec = self._rec
        n = (len(buf) - pos) // rec
        if n == 0:
            block = self._block_for(hdr & ~self._mask, 1)
            self._pos = pos + 8
            return self._page_partial(block, hdr & ~self._mask)
        if n > 1:
            n = min(n, MAX_RUN)
            st = _RUN_STRUCTS.get((ps, n))
            if st is None:
                st = _RUN_STRUCTS[ps, n] = struct.Struct(">" + f"Q{ps}x" * n)
            hdrs = st.unpack_from(buf, pos)
            want = tuple(range(hdr, hdr + n * ps, ps))
            if hdrs != want:
                n = common_prefix(hdrs, want)
        offset = hdr & ~self._mask
        block = self._block_for(offset, n)
        self._pos = pos + n * rec
        return RamPages(block.name, offset, n, buf[pos + 8 : pos + n * rec], rec, ps)

    def _zero_run(self, hdr: int) -> Event | None | NeedData:
        """One or more ZERO|CONTINUE records at consecutive offsets with one fill byte."""
        buf = self._buf
        pos = self._pos
        ps = self.page_size
        n = (len(buf) - pos) // 9
        if n == 0:
            if not self._ensure(9):
                return self._starve("a zero-page record")
            buf = self._buf
            pos = self._pos
            n = 1
        if n > 1:
            n = min(n, MAX_RUN)
            st = _ZERO_STRUCTS.get(n)
            if st is None:
                st = _ZERO_STRUCTS[n] = struct.Struct(">" + "QB" * n)
            vals = st.unpack_from(buf, pos)
            hdrs = vals[0::2]
            fills = vals[1::2]
            want = tuple(range(hdr, hdr + n * ps, ps))
            if hdrs != want:
                n = common_prefix(hdrs, want)
            if fills.count(fills[0]) != len(fills):
                n = min(n, common_prefix(fills, (fills[0],) * len(fills)))
        fill = buf[pos + 8]
        if fill:
            raise self._zero_fill(fill, hdr & ~self._mask)
        offset = hdr & ~self._mask
        block = self._block_for(offset, n)
        self._pos = pos + n * 9
        return ZeroPages(block.name, offset, n, fill, ps)

    def _zero_fill(self, fill: int, offset: int, at: int | None = None) -> MigrationStreamError:
        # QEMU 7.2 filled the page with the byte; 8.2 and later refuse it ("Found a zero page
        # with value"), and no QEMU sends one. Refused here too: a 9-byte record would
        # otherwise make a page of data (and --ram-dir write it) out of nothing.
        return self._err(f"zero page at offset 0x{offset:x} with fill byte 0x{fill:02x} "
                         "(QEMU sends only 0)", at)

    def _page_partial(self, block: RamBlock, offset: int) -> Event | None | NeedData:
        """Copy a page whose data the current chunk cuts; continue in _st_page_rest."""
        self._page_buf = bytearray()
        self._page_left = self.page_size
        self._page_at = (block.name, offset)
        self._step = self._st_page_rest
        return None

    def _st_page_rest(self) -> Event | None | NeedData:
        while self._page_left:
            if not self._next_chunk():
                return self._starve(f"the data of a page at offset 0x{self._page_at[1]:x}")
            take = min(self._page_left, len(self._buf) - self._pos)
            self._page_buf += self._buf[self._pos : self._pos + take]
            self._pos += take
            self._page_left -= take
        self._step = self._st_ram
        name, offset = self._page_at
        ps = self.page_size
        return RamPages(name, offset, 1, memoryview(self._page_buf), ps, ps)

    def _ram_record(self, hdr: int, flags: int) -> Event | None | NeedData:
        at = self.offset
        base = flags & ~RAM_SAVE_FLAG_CONTINUE
        if base == RAM_SAVE_FLAG_EOS and flags == base:
            self._pos += 8
            self._step = self._st_footer
            return None
        if base == RAM_SAVE_FLAG_MULTIFD_FLUSH and flags == base:
            self._pos += 8
            return RamFlush()
        if base == RAM_SAVE_FLAG_MEM_SIZE and flags == base:
            res = self._item(self._parse_mem_size)
            if res is SHORT:
                return self._starve("the RAM block list (MEM_SIZE)")
            return res  # type: ignore[return-value]
        if base in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
            res = self._item(self._parse_named_page)
            if res is SHORT:
                return self._starve("a RAM page record header")
            if isinstance(res, ZeroPages):
                return res
            assert isinstance(res, tuple)
            block, offset = res
            ps = self.page_size
            if len(self._buf) - self._pos >= ps:
                p = self._pos
                self._pos = p + ps
                return RamPages(block.name, offset, 1, self._buf[p : p + ps], ps, ps)
            return self._page_partial(block, offset)
        if base == RAM_SAVE_FLAG_XBZRLE:
            raise self._err("XBZRLE-encoded page (RAM flag 0x40) is not supported: "
                            "switch the xbzrle capability off", at)
        if base == RAM_SAVE_FLAG_COMPRESS_PAGE:
            raise self._err("compressed page (RAM flag 0x100) is not supported: "
                            "switch the compress capability off", at)
        if base == RAM_SAVE_FLAG_HOOK:
            raise self._err("RDMA hook record (RAM flag 0x80) is not supported", at)
        raise self._err(f"unknown RAM record flags 0x{flags:x}", at)

    def _parse_named_page(self, c: Cursor) -> ZeroPages | tuple[RamBlock, int]:
        hdr = c.be64()
        flags = hdr & self._mask
        offset = hdr & ~self._mask
        if not flags & RAM_SAVE_FLAG_CONTINUE:
            at = c.offset
            name = c.string("RAM block name")
            block = self._blocks.get(name)
            if block is None:
                raise MigrationStreamError(at, f"unknown RAM block {name!r}")
            self._block = block
        if flags & RAM_SAVE_FLAG_ZERO:
            at = c.offset
            fill = c.u8()
            if fill:
                raise self._zero_fill(fill, offset, at)
            block = self._block_for(offset, 1)
            return ZeroPages(block.name, offset, 1, fill, self.page_size)
        return self._block_for(offset, 1), offset

    def _parse_mem_size(self, c: Cursor) -> Event:
        hdr = c.be64()
        total = left = hdr & ~self._mask
        blocks: list[RamBlock] = []
        fresh = 0  # names no earlier MEM_SIZE gave
        while left > 0:
            at = c.offset
            name = c.string("RAM block name")
            fresh += name not in self._block_names
            if len(blocks) >= self.max_ram_blocks or (
                    len(self._block_names) + fresh > self.max_ram_blocks):
                raise MigrationStreamError(at, f"more than {self.max_ram_blocks} RAM blocks")
            size = c.be64()
            if size > left:
                raise MigrationStreamError(
                    at, f"RAM block {name!r} of 0x{size:x} bytes exceeds the 0x{left:x} left "
                        f"of the announced total 0x{total:x}")
            left -= size
            page_size = addr = None
            # Postcopy adds the block's page size when it differs from the host's; nothing in
            # the stream says so, but the next item tells: another block starts with a
            # non-zero name length, a RAM record has flag bits, and a page size (or a region
            # address) is page aligned with a zero first byte.
            if self._ignore_shared:
                first = c.be64()
                if left > 0:
                    follows = c.peek_u8() == 0
                else:
                    follows = c.peek_be64() & self._mask == 0
                if follows:
                    page_size, addr = first, c.be64()
                else:
                    addr = first
            elif (c.peek_u8() == 0) if left > 0 else (c.peek_be64() & self._mask == 0):
                page_size = c.be64()
            if page_size is not None and (page_size & (page_size - 1) or page_size == 0):
                raise MigrationStreamError(at, f"RAM block {name!r}: page size {page_size} "
                                               "is not a power of two")
            blocks.append(RamBlock(name, size, page_size, addr))
        self._blocks = {b.name: b for b in blocks}
        self._block_names.update(self._blocks)
        self._block = None
        return RamBlocks(tuple(blocks), total)
