"""The mapped-ram file reader (qioc_green/migration/_mapped_ram.py) against QEMU 10's own files.

tests/data/none-mapped-ram.file.gz is a real QEMU 10.0.2 ``migrate file:`` with the mapped-ram
capability of a paused ``-M none`` VM whose 4 MiB of RAM is ``qemu.pattern_ram``, so RAM
rebuilt from it is compared with that byte for byte. Corruptions change fields the reader itself
located on the good file. The live tests (``peers.qemu_args("10")``) migrate random RAM to a file,
with and without multifd, and rebuild it through ``qioc_green.FileChannel``'s positional reads.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qioc_green.migration import (
    NEED_DATA,
    Command,
    MappedRamBlock,
    MappedRamError,
    MappedRamFile,
    RamBlocks,
    RamPages,
    StreamEnd,
    StreamParser,
    ZeroPages,
)
from qioc_green.migration.qemu import pattern_ram

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"
PATTERN = pattern_ram(4 << 20)
_cache: dict[str, bytes] = {}


def capture() -> bytes:
    if "file" not in _cache:
        _cache["file"] = gzip.decompress((DATA / "none-mapped-ram.file.gz").read_bytes())
    return _cache["file"]


def reader(data: bytes, **kwargs) -> MappedRamFile:
    return MappedRamFile(lambda off, n: data[off : off + n], len(data), **kwargs)


def error(data: bytes, **kwargs) -> MappedRamError:
    with pytest.raises(MappedRamError) as info:
        reader(data, **kwargs)
    err = info.value
    assert str(err).startswith(f"offset {err.offset}: ") and "\n" not in str(err)
    return err


def rebuild(m: MappedRamFile, block: MappedRamBlock) -> bytearray:
    out = bytearray(block.size)

    def pwrite(data: bytes, offset: int) -> None:
        assert 0 <= offset and offset + len(data) <= block.size
        out[offset : offset + len(data)] = data

    m.rebuild_block(block, pwrite)
    return out


def stream_events(chunks) -> list:
    p = StreamParser()
    events = []
    for c in chunks:
        p.feed(c)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    p.close()
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def patched(data: bytes, at: int, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


# -- the capture ------------------------------------------------------------------------------


def test_capture_layout():
    data = capture()
    m = reader(data)
    assert (m.machine, m.capabilities, m.page_size) == ("none", ("mapped-ram",), 4096)
    (b,) = m.blocks
    assert (b.name, b.size, b.page_size, b.in_file) == ("ram", 4 << 20, 4096, True)
    # header, then bitmap, then the pages region, then the rest of the stream
    assert b.header_offset + 28 <= b.bitmap_offset
    assert b.bitmap_offset + b.bitmap_size <= b.pages_offset
    assert b.pages_offset % 4096 == 0 and b.pages_offset + b.size <= len(data)
    assert m.segments == ((0, b.header_offset), (b.pages_offset + b.size,
                                                 len(data) - b.pages_offset - b.size))


def test_capture_rebuilds_guest_ram_byte_exact():
    m = reader(capture())
    (b,) = m.blocks
    assert rebuild(m, b) == PATTERN
    # the bitmap leaves out exactly the zero pages (every 7th from the 4th)
    present = {off // 4096 + i for off, n in m.present_runs(b) for i in range(n // 4096)}
    assert present == {i for i in range(1024) if i % 7 != 3}


def test_main_stream_without_the_mapped_ram_parts_parses_as_any_stream():
    m = reader(capture())
    whole = b"".join(m.stream_chunks())
    assert len(whole) == m.stream_size
    events = stream_events([whole])
    (blocks,) = [e for e in events if isinstance(e, RamBlocks)]
    assert [(x.name, x.size) for x in blocks.blocks] == [("ram", 4 << 20)]
    assert not [e for e in events if isinstance(e, (RamPages, ZeroPages))]  # pages are in place
    assert any(isinstance(e, Command) and e.name == "SWITCHOVER_START" for e in events)
    assert events[-1] == StreamEnd(len(whole), True)
    # chunked by the reader (1 byte, odd sizes) and by the feeder: the same events
    assert stream_events(m.stream_chunks(1)) == events
    assert stream_events(m.stream_chunks(4097)) == events
    rnd = random.Random(7)
    cuts = sorted(rnd.sample(range(1, len(whole)), 40))
    assert stream_events(whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])) == events


def test_stream_offsets_map_back_to_file_offsets():
    data = capture()
    m = reader(data)
    whole = b"".join(m.stream_chunks())
    for pos in (0, 1, m.segments[0][1] - 1, m.segments[0][1], m.segments[0][1] + 5, len(whole) - 1):
        assert data[m.file_offset(pos)] == whole[pos]
    with pytest.raises(ValueError):
        m.file_offset(len(whole))


def test_from_fd_and_read_pages(tmp_path):
    path = tmp_path / "mig"
    path.write_bytes(capture())
    fd = os.open(path, os.O_RDONLY)
    try:
        m = MappedRamFile.from_fd(fd)
        b = m.block("ram")
        assert m.read_pages(b, 4096, 8192) == PATTERN[4096:12288]
        with pytest.raises(ValueError):
            m.read_pages(b, b.size - 4096, 8192)
        with pytest.raises(KeyError):
            m.block("pc.ram")
    finally:
        os.close(fd)


# -- truncation and corruption ----------------------------------------------------------------


def test_truncated_file_exact_errors():
    data = capture()
    b = reader(data).blocks[0]
    assert str(error(data[:6])) == "offset 0: file ends inside the stream header (6 of 8 bytes)"
    assert str(error(data[:20])) == ("offset 19: file ends inside configuration subsection name "
                                     "(1 of 26 bytes)")
    assert str(error(data[: b.header_offset + 10])) == (
        f"offset {b.header_offset}: file ends inside the mapped-ram header of block 'ram' "
        f"(10 of 28 bytes)")
    cut = b.pages_offset + 4096
    assert str(error(data[:cut])) == (
        f"offset {b.header_offset + 20}: pages of block 'ram' end at {b.pages_offset + b.size}, "
        f"past the end of the file ({cut})")


def test_a_plain_file_migration_is_not_mapped_ram():
    data = capture()
    at = data.index(b"mapped-ram")
    bad = data[:at] + b"mapped-raX" + data[at + 10 :]
    assert str(error(bad)) == (
        "offset 8: the configuration does not declare the mapped-ram capability: not a "
        "mapped-ram file (parse it as a sequential stream)")
    assert str(error(b"QEVN" + data[4:])) == "offset 0: expected magic QEVM (0x5145564d), got 0x5145564e"
    assert str(error(data, offset=1)) == "offset 1: expected magic QEVM (0x5145564d), got 0x45564d00"


def test_header_field_errors():
    data = capture()
    b = reader(data).blocks[0]
    h = b.header_offset
    cases = [
        (h, ">I", 2, f"offset {h}: mapped-ram header version 2 of block 'ram', expected 1"),
        (h + 4, ">Q", 512, f"offset {h + 4}: page size 512 of block 'ram' refused: QEMU's "
                           "target pages are powers of two from 1 KiB to 64 KiB"),
        (h + 4, ">Q", 12288, f"offset {h + 4}: page size 12288 of block 'ram' refused: QEMU's "
                             "target pages are powers of two from 1 KiB to 64 KiB"),
        (h + 4, ">Q", 65536, f"offset {h + 4}: page size 65536 of block 'ram' differs from the "
                             "stream's 4096"),
        (h + 12, ">Q", h + 4, f"offset {h + 12}: bitmap of block 'ram' at {h + 4} (0x80 bytes) is "
                              f"not between its header (ends at {h + 28}) and its pages (at "
                              f"{b.pages_offset})"),
        (h + 12, ">Q", b.pages_offset - 16, f"offset {h + 12}: bitmap of block 'ram' at "
                                            f"{b.pages_offset - 16} (0x80 bytes) is not between "
                                            f"its header (ends at {h + 28}) and its pages (at "
                                            f"{b.pages_offset})"),
        (h + 20, ">Q", b.pages_offset + 512, f"offset {h + 20}: pages of block 'ram' at "
                                             f"{b.pages_offset + 512} are not aligned to the "
                                             "4096-byte page size"),
        (h + 20, ">Q", 1 << 40, f"offset {h + 20}: pages of block 'ram' end at "
                                f"{(1 << 40) + b.size}, past the end of the file ({len(data)})"),
        (h - 8, ">Q", 8 << 20, f"offset {h - 8 - 4}: RAM block 'ram' of 0x800000 bytes exceeds "
                               "the 0x400000 left of the announced total 0x400000"),
        (h - 8, ">Q", (4 << 20) + 1, f"offset {h - 8 - 4}: RAM block 'ram' of 0x400001 bytes "
                                     "exceeds the 0x400000 left of the announced total 0x400000"),
    ]
    for at, fmt, value, msg in cases:
        assert str(error(patched(data, at, fmt, value))) == msg, msg
    assert str(error(data, max_ram_blocks=0)).endswith("more than 0 RAM blocks")


def test_bitmap_bits_past_the_last_page_mean_nothing():
    data = capture()
    b = reader(data).blocks[0]
    mem_size = b.header_offset - 8 - 4 - 8  # be64 total|flags, name ("ram"), be64 size
    smaller = (4 << 20) - 4096  # 1023 pages: the bitmap's last word is half used
    bad = patched(data, mem_size, ">Q", smaller | 0x04)
    bad = patched(bad, b.header_offset - 8, ">Q", smaller)
    words = bytearray(bad[b.bitmap_offset : b.bitmap_offset + b.bitmap_size])
    words[-8:] = b"\xff" * 8  # pages 960..1023: the last one is not in the block
    bad = bad[: b.bitmap_offset] + bytes(words) + bad[b.bitmap_offset + b.bitmap_size :]
    m = reader(bad)
    (small,) = m.blocks
    runs = list(m.present_runs(small))
    start, length = runs[-1]  # page 955 is a zero page: the last run starts at 956
    assert (start, start + length) == (956 * 4096, smaller)  # and stops at the block's end
    assert rebuild(m, small)[960 * 4096 :] == PATTERN[960 * 4096 : smaller]


# -- fuzz -------------------------------------------------------------------------------------


@st.composite
def mutated_file(draw):
    data = capture()
    b = reader(data).blocks[0]
    buf = bytearray(data)
    where = st.one_of(
        st.integers(0, b.header_offset + 28 + 8),
        st.integers(b.bitmap_offset, b.bitmap_offset + b.bitmap_size - 1),
        st.integers(b.pages_offset + b.size, len(buf) - 1))
    for _ in range(draw(st.integers(1, 5))):
        i = draw(where)
        kind = draw(st.sampled_from(["flip", "set64", "truncate"]))
        if i >= len(buf):
            continue
        if kind == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set64" and i + 8 <= len(buf):
            struct.pack_into(">Q", buf, i, draw(st.sampled_from(
                [0, 1, 4, 28, 4096, 65536, 1 << 20, 0xFFFFFFFFFFFFFFFF, len(buf), b.pages_offset])))
        elif kind == "truncate":
            del buf[i:]
    return bytes(buf)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_file())
def test_fuzz_only_mapped_ram_errors_and_bounded_memory(data):
    tracemalloc.start()
    try:
        try:
            m = reader(data)
            for b in m.blocks:
                copied = m.rebuild_block(b, lambda d, off, b=b: None if off + len(d) <= b.size
                                         else pytest.fail("write past the block"))
                assert copied <= b.size
            for _ in m.stream_chunks():
                pass
        except MappedRamError as err:
            assert 0 <= err.offset
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # chunks of 1 MiB at most, never the file or the block


# -- live: QEMU 10 to a file, rebuilt through FileChannel -------------------------------------


@pytest.mark.peers
@pytest.mark.timeout(120)
@pytest.mark.parametrize("multifd,offset", [(False, 0), (True, 0), (False, 4096), (True, 65536)])
def test_live_mapped_ram_file_rebuilds_ram(tmp_path, multifd, offset):
    import qioc_green as q
    from qioc_green.migration.qemu import capture_file
    from tests.peers import qemu_args

    qemu = qemu_args("10")
    ram = random.Random(f"{multifd}{offset}").randbytes(16 << 20)
    (tmp_path / "ram.bin").write_bytes(ram)
    path = tmp_path / "mig.file"
    caps = ["mapped-ram", "multifd"] if multifd else ["mapped-ram"]
    params = {"multifd-channels": 2} if multifd else {}
    capture_file(str(path), "q35", "16M", uri_options=f",offset={offset}" if offset else "",
                 ram_file=str(tmp_path / "ram.bin"), capabilities=caps, parameters=params,
                 **qemu)  # type: ignore[arg-type]
    src = q.FileChannel.open(path, os.O_RDONLY)
    out = q.FileChannel.open(tmp_path / "pc.ram", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        def pread(off: int, n: int) -> bytes:
            buf = bytearray(n)
            got = src.preadv([buf], off)
            return bytes(buf[:got])

        m = MappedRamFile(pread, os.fstat(src.fileno()).st_size, offset=offset)
        assert m.capabilities == ("mapped-ram",)  # multifd is not declared in the stream
        block = m.block("pc.ram")
        os.ftruncate(out.fileno(), block.size)
        copied = m.rebuild_block(block, lambda data, off: out.pwritev([data], off))
        assert copied == block.size  # random RAM: every page is a normal page
        events = stream_events(m.stream_chunks())
        assert events[-1].described
        assert m.segments[0][0] == offset
    finally:
        src.close()
        out.close()
    assert (tmp_path / "pc.ram").read_bytes() == ram
