"""The multifd channel parser (qioc_green/migration/_multifd.py) against QEMU 10's own channels.

The captures in tests/data (tests/data/make_streams.py) are real QEMU 10.0.2 migrations of a
paused ``-M none`` VM whose 4 MiB of RAM is ``qemu.pattern_ram``: every test below that
rebuilds RAM compares it with that, byte for byte. Corruptions are made by changing fields of
the real packets (found by the parser's own events on the good capture). The receiver that
drives this parser is tested in tests/test_multifd_receiver.py (the captures over loopback)
and tests/test_multifd_live.py (live QEMU 7.2 and 10.0).
"""

from __future__ import annotations

import random
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qioc_green.migration import (
    NEED_BLOCKS,
    NEED_DATA,
    ChannelEnd,
    ChannelInit,
    DeviceStatePacket,
    MultifdChannels,
    MultifdError,
    MultifdParser,
    PagesAhead,
    RamBlocks,
    RamFlush,
    RamPacket,
    RamPages,
    StreamParser,
    SyncPacket,
    ZeroPages,
    packet_size,
    sniff_channel,
)
from qioc_green.migration.qemu import pattern_ram
from tests.migdata import load_connections

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"
COMPRESSIONS = ["none", "zlib", "zstd"]
PATTERN = pattern_ram(4 << 20)
BLOCKS = {"ram": 4 << 20}

_cache: dict[str, list[bytes]] = {}


def conns(compression: str) -> list[bytes]:
    """The connections of one capture, in accept order: [main, multifd, multifd]."""
    name = "none-multifd2" + ("" if compression == "none" else f"-{compression}")
    if name not in _cache:
        _cache[name] = load_connections(name)
    return _cache[name]


def multifd_channels(compression: str) -> list[bytes]:
    return [c for c in conns(compression) if sniff_channel(c) == "multifd"]


def main_channel(compression: str) -> bytes:
    (main,) = [c for c in conns(compression) if sniff_channel(c) == "main"]
    return main


def parse(chunks, parser: MultifdParser | None = None) -> list:
    """Feed chunks, drain after each, close, drain again; return the events."""
    p = parser or MultifdParser(blocks=BLOCKS)
    events = []
    for chunk in chunks:
        p.feed(chunk)
        while (ev := p.next_event()) is not NEED_DATA:
            assert ev is not NEED_BLOCKS
            events.append(ev)
    p.close()
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def parse_error(chunks, parser: MultifdParser | None = None) -> MultifdError:
    with pytest.raises(MultifdError) as info:
        parse(chunks, parser)
    err = info.value
    assert str(err).startswith(f"{err.channel}: offset {err.offset}: ")
    assert "\n" not in str(err)
    return err


def random_chunks(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rnd.choice([1, 2, 11, 12, 63, 64, 65, 1344, 4096, 65536, rnd.randrange(1, 600000)])
        out.append(data[i : i + n])
        i += n
    return out


def flat(events: list) -> list:
    """A chunking-independent view: page data as bytes."""
    out = []
    for ev in events:
        if isinstance(ev, RamPacket):
            out.append(("ram", ev.block, ev.normal, ev.zero, bytes(ev.data), ev.packet_num,
                        ev.compression, ev.offset))
        else:
            out.append(ev)
    return out


def rebuild(events_per_channel: list[list]) -> bytearray:
    ram = bytearray(4 << 20)
    for events in events_per_channel:
        for ev in events:
            if isinstance(ev, RamPacket):
                assert ev.block == "ram"
                for off, page in ev.pages():
                    ram[off : off + 4096] = page
                for off in ev.zero:
                    ram[off : off + 4096] = bytes(4096)
    return ram


def ram_packet_offsets(data: bytes) -> list[RamPacket]:
    return [e for e in parse([data]) if isinstance(e, RamPacket)]


# -- telling the channels apart ---------------------------------------------------------------


def test_sniff_tells_main_from_multifd_in_any_accept_order():
    kinds = [sniff_channel(c) for c in conns("none")]
    assert sorted(kinds) == ["main", "multifd", "multifd"]
    assert sniff_channel(b"QEV") is None
    with pytest.raises(MultifdError) as info:
        sniff_channel(b"GET / HTTP/1.1", "connection 3")
    assert str(info.value) == ("connection 3: offset 0: first bytes 0x47455420 are neither a main "
                               "stream (QEVM, 0x5145564d) nor a multifd channel (0x11223344)")


# -- whole captures ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_capture_rebuilds_guest_ram_byte_exact(compression):
    per_channel = [parse([c]) for c in multifd_channels(compression)]
    assert rebuild(per_channel) == PATTERN
    ids = set()
    for events in per_channel:
        init = events[0]
        assert isinstance(init, ChannelInit) and init.version == 1
        assert init.uuid == bytes(16)  # the source has no -uuid
        ids.add(init.channel_id)
        end = events[-1]
        assert isinstance(end, ChannelEnd)
        rams = [e for e in events if isinstance(e, RamPacket)]
        assert rams and all(e.compression == compression for e in rams)
        assert end.packets == sum(isinstance(e, (RamPacket, SyncPacket)) for e in events)
    assert ids == {0, 1}
    # zero pages travel as offsets only: every 7th page of the pattern, and only those
    zero = sorted(o for events in per_channel for e in events if isinstance(e, RamPacket)
                  for o in e.zero)
    assert zero == [i * 4096 for i in range(1024) if i % 7 == 3]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_each_channel_syncs_once_per_main_stream_flush(compression):
    p = StreamParser()
    p.feed(main_channel(compression))
    p.close()
    flushes = 0
    while (ev := p.next_event()) is not NEED_DATA:
        flushes += isinstance(ev, RamFlush)
        assert not isinstance(ev, (RamPages, ZeroPages))  # every page went to multifd
        if isinstance(ev, RamBlocks):
            assert {b.name: b.size for b in ev.blocks} == BLOCKS
    assert flushes >= 2
    for data in multifd_channels(compression):
        events = parse([data])
        assert sum(isinstance(e, SyncPacket) for e in events) == flushes == events[-1].syncs


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_chunking_does_not_change_events(compression):
    for data in multifd_channels(compression):
        ref = flat(parse([data]))
        for seed in range(3):
            assert flat(parse(random_chunks(data, seed))) == ref


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_one_byte_at_a_time(compression):
    data = multifd_channels(compression)[0]
    ref = flat(parse([data]))
    assert flat(parse(data[i : i + 1] for i in range(len(data)))) == ref


def test_uncompressed_pages_view_the_fed_buffer():
    data = multifd_channels("none")[0]
    rams = ram_packet_offsets(data)
    normal = [e for e in rams if e.normal]
    assert normal and all(e.data.obj is data for e in normal)


def test_parser_lets_go_of_fed_buffers_at_need_data():
    data = multifd_channels("none")[0]
    p = MultifdParser(blocks=BLOCKS)
    buf = bytearray(100_000)
    ram = bytearray(4 << 20)
    for i in range(0, len(data), 100_000):
        chunk = data[i : i + 100_000]
        buf[: len(chunk)] = chunk
        p.feed(memoryview(buf)[: len(chunk)])
        while (ev := p.next_event()) is not NEED_DATA:
            if isinstance(ev, RamPacket):
                for off, page in ev.pages():
                    ram[off : off + 4096] = page
        del ev
        buf.extend(b"x")  # BufferError if the parser still exported a view of buf
        del buf[-1:]
    p.close()
    assert isinstance(p.next_event(), ChannelEnd)


# -- pages left to the caller (take_pages): what the receiver's kernel path is built on ---------


def take_pages_reader(data: bytes, sizes) -> tuple[list, bytearray, list[int]]:
    """Read ``data`` as a receiver does with ``take_pages``: each read's size from ``sizes(p)``,
    and the pages of every PagesAhead taken from the input after what was fed (as a splice
    would take them). Returns the events (PagesAhead as the RamPacket they stand for), the RAM
    rebuilt, and the ``len(head)`` of each PagesAhead."""
    p = MultifdParser(blocks=BLOCKS, take_pages=True)
    ram = bytearray(4 << 20)
    events, heads = [], []
    pos = 0  # input consumed: fed, or taken as pages

    def drain() -> None:
        nonlocal pos
        while (ev := p.next_event()) is not NEED_DATA:
            assert ev is not NEED_BLOCKS
            if isinstance(ev, PagesAhead):
                assert ev.size == len(ev.normal) * 4096 == len(ev.head) + ev.remaining
                pages = bytes(ev.head) + data[pos : pos + ev.remaining]
                assert len(pages) == ev.size
                pos += ev.remaining
                # the skipped pages count as parsed; what was fed past the pages waits
                assert p.offset == pos if ev.remaining else p.offset <= pos
                heads.append(len(ev.head))
                for k, off in enumerate(ev.normal):
                    ram[off : off + 4096] = pages[k * 4096 : (k + 1) * 4096]
                for off in ev.zero:
                    ram[off : off + 4096] = bytes(4096)
                ev = ("ram", ev.block, ev.normal, ev.zero, pages, ev.packet_num, "none",
                      ev.offset)
            events.append(ev)

    while pos < len(data):
        n = sizes(p)
        assert n >= 1
        p.feed(data[pos : pos + n])
        pos += len(data[pos : pos + n])
        drain()
    p.close()
    drain()
    return events, ram, heads


@pytest.mark.parametrize("how", ["want", "random", "whole"])
def test_take_pages_leaves_the_pages_to_the_caller(how):
    """Read as want() says, the parser never gets a byte of the pages it leaves (head empty);
    fed more, it hands over what it got (head) and the rest is skipped: the same events and the
    same RAM, byte-exact, however the input was read."""
    rams = []
    for data in multifd_channels("none"):
        rnd = random.Random(len(data))
        sizes = {"want": lambda p: p.want(),
                 "random": lambda p, rnd=rnd: rnd.choice([1, 12, 1344, 5000, 600000]),
                 "whole": lambda p, d=data: len(d)}[how]
        events, ram, heads = take_pages_reader(data, sizes)
        assert events == flat(parse([data]))
        if how == "want":
            assert heads and set(heads) == {0}
        elif how == "whole":
            assert all(h > 0 for h in heads)
        rams.append(ram)
    merged = bytearray(4 << 20)
    for ram in rams:  # the two channels carry disjoint pages; zero pages are zeros anyway
        for i in range(0, len(ram), 4096):
            if any(ram[i : i + 4096]):
                merged[i : i + 4096] = ram[i : i + 4096]
    assert merged == PATTERN


def test_want_is_what_the_item_lacks():
    data = multifd_channels("none")[0]
    p = MultifdParser(blocks=BLOCKS, take_pages=True)
    assert p.want() == 64  # the init packet
    p.feed(data[:10])
    assert p.want() == 54
    p.feed(data[10:64])
    assert isinstance(p.next_event(), ChannelInit) and p.next_event() is NEED_DATA
    assert p.want() == packet_size(4096)  # a whole RAM packet header
    p.feed(data[64:100])
    assert p.next_event() is NEED_DATA and p.want() == packet_size(4096) - 36


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_take_pages_parses_compressed_packets_itself(compression):
    """Compressed pages must go through the decompressor: RamPacket as without take_pages, and
    want() then asks for the payload too."""
    for data in multifd_channels(compression):
        events, _, heads = take_pages_reader(data, lambda p: p.want())
        assert not heads
        assert flat(events) == flat(parse([data]))


def test_take_pages_with_sync_on_a_page_packet():
    """QEMU before 9.0 puts pages in its SYNC packets: the SyncPacket follows the PagesAhead."""
    data = bytearray(multifd_channels("none")[0])
    pk = next(e for e in ram_packet_offsets(bytes(data)) if e.normal)
    data[pk.offset + 11] |= 0x01  # MULTIFD_FLAG_SYNC, low byte of the big-endian flags
    p = MultifdParser(blocks=BLOCKS, take_pages=True)
    p.feed(bytes(data[: pk.offset + packet_size(4096)]))
    evs = []
    while (ev := p.next_event()) is not NEED_DATA:
        evs.append(ev)
    assert isinstance(evs[-2], PagesAhead) and evs[-2].offset == pk.offset
    assert isinstance(evs[-1], SyncPacket) and evs[-1].offset == pk.offset and p.syncs >= 1


def test_blocks_may_come_later_need_blocks():
    data = multifd_channels("none")[0]
    p = MultifdParser()
    p.feed(data)
    first = p.next_event()
    assert isinstance(first, ChannelInit)
    seen = []
    while (ev := p.next_event()) is not NEED_BLOCKS:
        assert ev is not NEED_DATA
        seen.append(ev)
    assert all(isinstance(e, SyncPacket) for e in seen)  # the setup sync needs no blocks
    assert p.next_event() is NEED_BLOCKS  # held until told
    p.set_blocks(BLOCKS)
    p.close()
    rest = []
    while (ev := p.next_event()) is not NEED_DATA:
        rest.append(ev)
    assert flat([first, *seen, *rest]) == flat(parse([data]))


# -- truncation: a channel that vanishes ------------------------------------------------------


def test_channel_that_sends_nothing():
    err = parse_error([], MultifdParser(name="connection 2", blocks=BLOCKS))
    assert str(err) == ("connection 2: offset 0: channel ends inside the init packet at offset 0 "
                        "(0 of 64 bytes)")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_truncated_anywhere_is_one_exact_error(compression):
    data = multifd_channels(compression)[0]
    pk = next(e for e in ram_packet_offsets(data) if e.normal)
    hdr = packet_size(4096)
    cases = {
        10: "connection 9: offset 10: channel ends inside the init packet at offset 0 (10 of 64 "
            "bytes)",
        70: "multifd channel 0: offset 70: channel ends inside a packet header at offset 64 (6 of "
            "12 bytes)",
        pk.offset + 100: f"multifd channel 0: offset {pk.offset + 100}: channel ends inside a RAM "
                         f"packet header at offset {pk.offset} (100 of {hdr} bytes)",
        pk.offset + hdr + 5: f"multifd channel 0: offset {pk.offset + hdr + 5}: channel ends "
                             f"inside the payload of the packet at offset {pk.offset} (5 of "
                             f"{struct.unpack_from('>I', data, pk.offset + 20)[0]} bytes)",
    }
    for cut, msg in cases.items():
        for chunks in ([data[:cut]], [data[i : i + 1] for i in range(cut)]):
            assert str(parse_error(chunks, MultifdParser(name="connection 9", blocks=BLOCKS))) == msg
    # cut exactly between packets: a clean end
    events = parse([data[: pk.offset]])
    assert events[-1] == ChannelEnd(pk.offset, len(events) - 2, sum(
        isinstance(e, SyncPacket) for e in events))


# -- corruption: exact errors -----------------------------------------------------------------


def patched(data: bytes, at: int, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


def first_normal(compression: str = "none") -> tuple[bytes, RamPacket]:
    data = multifd_channels(compression)[0]
    return data, next(e for e in ram_packet_offsets(data) if e.normal)


def test_init_packet_errors():
    data = multifd_channels("none")[0]
    assert str(parse_error([patched(data, 0, ">I", 0x11223345)])) == (
        "multifd channel: offset 0: init packet magic 0x11223345, expected 0x11223344")
    assert str(parse_error([patched(data, 4, ">I", 2)])) == (
        "multifd channel: offset 4: init packet version 2, expected 1")


def test_packet_header_errors():
    data, pk = first_normal()
    o = pk.offset
    cases = [
        (o, ">I", 0xDEADBEEF, f"offset {o}: packet magic 0xdeadbeef, expected 0x11223344"),
        (o + 4, ">I", 9, f"offset {o}: packet version 9, expected 1"),
        (o + 8, ">I", 0x100, f"offset {o}: unknown packet flags 0x100 (in 0x100)"),
        (o + 8, ">I", 0x08, f"offset {o}: multifd-compression qpl is not supported "
                            "(none, zlib, zstd)"),
        (o + 8, ">I", 0x02, f"offset {o}: packet compressed with zlib, the channel uses none"),
        (o + 12, ">I", 129, f"offset {o}: packet holds 129 pages, at most 128 fit in 512 KiB of "
                            "4096-byte pages"),
        (o + 16, ">I", 129, f"offset {o}: packet has 129 normal pages, more than the 128 it "
                            "holds"),
        (o + 20, ">I", 4096, f"offset {o}: packet announces a 4096-byte payload for "
                             f"{len(pk.normal)} normal pages of 4096 bytes "
                             f"({len(pk.normal) * 4096})"),
        (o + 32, ">I", 128, f"offset {o}: packet has 128 zero pages, at most "
                            f"{128 - len(pk.normal)} fit beside its {len(pk.normal)} normal pages"),
        (o + 64, ">5s", b"ram\0\0", None),  # the same name: no error
        (o + 64, ">4s", b"rom\0", f"offset {o + 64}: unknown RAM block 'rom'"),
        (o + 64, ">1s", b"\0", f"offset {o + 64}: RAM block name is empty"),
        (o + 64, ">256s", b"x" * 256, f"offset {o + 64}: RAM block name is not NUL-terminated in "
                                      "256 bytes"),
        (o + 320, ">Q", 4 << 20, f"offset {o}: normal page offset 0x400000 is past block 'ram' "
                                 "(size 0x400000)"),
        (o + 320, ">Q", (4 << 20) - 2048, f"offset {o}: normal page offset 0x3ff800 is past block "
                                          "'ram' (size 0x400000)"),
        (o + 320, ">Q", 0x1800, f"offset {o}: normal page offset 0x1800 in block 'ram' is not a "
                                "multiple of the 4096-byte page size"),
    ]
    for at, fmt, value, msg in cases:
        bad = patched(data, at, fmt, value)
        if msg is None:
            parse([bad])
            continue
        # a first RAM packet that tells the channel's method: the compression flag case
        # needs the channel to know it is "none" first
        parser = MultifdParser(blocks=BLOCKS, compression="none")
        assert str(parse_error([bad], parser)) == f"multifd channel 0: {msg}", msg


def test_zero_page_offset_past_the_block_names_channel_and_offset():
    data = multifd_channels("none")[0]
    pk = next(e for e in ram_packet_offsets(data) if e.zero)
    at = pk.offset + 320 + 8 * len(pk.normal)
    err = parse_error([patched(data, at, ">Q", 0x7FFF000)])
    assert str(err) == (f"multifd channel 0: offset {pk.offset}: zero page offset 0x7fff000 is "
                        "past block 'ram' (size 0x400000)")
    assert err.channel == "multifd channel 0" and err.offset == pk.offset


@pytest.mark.parametrize("how", ["one", "all"])
def test_a_page_offset_off_the_page_size(how):
    """One offset off a page boundary, or a whole run shifted (still consecutive: the cheap
    check of a run must catch it too), for the normal and the zero pages alike."""
    data = multifd_channels("none")[0]
    pk = next(e for e in ram_packet_offsets(data) if e.zero and e.normal)
    for kind, offs, at in (("normal", pk.normal, pk.offset + 320),
                           ("zero", pk.zero, pk.offset + 320 + 8 * len(pk.normal))):
        bad = bytearray(data)
        for k, off in enumerate(offs if how == "all" else offs[:1]):
            struct.pack_into(">Q", bad, at + 8 * k, off + 512)
        err = parse_error([bytes(bad)])
        assert str(err) == (f"multifd channel 0: offset {pk.offset}: {kind} page offset "
                            f"0x{offs[0] + 512:x} in block 'ram' is not a multiple of the "
                            "4096-byte page size")
    # a run of consecutive pages whose last lies past the block
    bad = bytearray(data)
    base = (4 << 20) - 4096
    for k in range(len(pk.normal)):
        struct.pack_into(">Q", bad, pk.offset + 320 + 8 * k, base + 4096 * k)
    err = parse_error([bytes(bad)])
    assert str(err) == (f"multifd channel 0: offset {pk.offset}: normal page offset "
                        f"0x{base + 4096 * (len(pk.normal) - 1):x} is past block 'ram' (size "
                        "0x400000)")


def test_smaller_block_than_the_source_has():
    data = multifd_channels("none")[0]
    err = parse_error([data], MultifdParser(blocks={"ram": 1 << 20}))
    assert "page offset" in str(err) and "is past block 'ram' (size 0x100000)" in str(err)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_corrupt_compressed_payload(compression):
    data, pk = first_normal(compression)
    size = struct.unpack_from(">I", data, pk.offset + 20)[0]
    start = pk.offset + packet_size(4096)
    # damage the payload: the first byte of the first payload is the zlib/zstd header
    bad = bytearray(data)
    for i in range(start, start + size):
        bad[i] ^= 0x5A
    err = parse_error([bytes(bad)])
    assert err.offset == pk.offset
    assert str(err).startswith(f"multifd channel 0: offset {pk.offset}: {compression} payload of "
                               f"the packet: {compression}: ")
    # announce more pages than the payload holds: caught by the exact size check
    more = patched(data, pk.offset + 16, ">I", len(pk.normal) + 1)
    more = patched(more, pk.offset + 32, ">I", 0)
    err = parse_error([more])
    assert f"payload inflates to {len(pk.normal) * 4096} bytes, {(len(pk.normal) + 1) * 4096} " \
           "announced" in str(err)


def _one_packet_channel(flags: int, payload: bytes, normal: int, offsets=None) -> bytes:
    """A channel whose init packet and first RAM packet header are a real capture's, with the
    compression flags, the page count and the payload replaced."""
    data, pk = first_normal("none")
    hdr = bytearray(data[pk.offset : pk.offset + packet_size(4096)])
    struct.pack_into(">I", hdr, 8, flags)
    struct.pack_into(">I", hdr, 16, normal)
    struct.pack_into(">I", hdr, 20, len(payload))
    struct.pack_into(">I", hdr, 32, 0)
    for i in range(normal):
        struct.pack_into(">Q", hdr, 320 + 8 * i, (offsets or range(0, normal * 4096, 4096))[i])
    return data[:64] + bytes(hdr) + payload


def test_zlib_bomb_is_refused_with_bounded_memory():
    # 1 MiB of compressed zeros inflates to about 1 GiB; the packet announces one page
    comp = zlib.compressobj(1)
    payload = comp.compress(bytes(64 << 20)) * 1  # ~64 KiB
    payload += comp.flush(zlib.Z_SYNC_FLUSH)
    tracemalloc.start()
    try:
        err = parse_error([_one_packet_channel(0x02, payload, 1)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "payload inflates to more than the 4096 bytes announced" in str(err)
    assert peak < 4 << 20, peak


def test_zstd_bomb_is_refused_without_inflating():
    pytest.importorskip("zstandard")
    # a real frame header (from the capture), then RLE blocks of 128 KiB each: 4 bytes apiece
    data, pk = first_normal("zstd")
    start = pk.offset + packet_size(4096)
    frame = data[start : start + 6]  # magic + descriptor + window byte (level-1 streams)
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    rle = (((128 * 1024) << 3) | (1 << 1)).to_bytes(3, "little") + b"\0"
    payload = frame + rle * 8192  # 32 KiB that would regenerate 1 GiB
    tracemalloc.start()
    try:
        err = parse_error([_one_packet_channel(0x04, payload, 2)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "payload inflates to more than the 8192 bytes announced" in str(err)
    assert peak < 4 << 20, peak


def test_zstd_missing_is_one_clear_line(monkeypatch):
    data, pk = first_normal("zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    err = parse_error([data])
    assert str(err) == (f"multifd channel 0: offset {pk.offset}: multifd-compression zstd needs "
                        "the 'zstandard' package (pip install 'qioc_green[zstd]')")


def test_compressed_payload_size_is_bounded_before_it_arrives():
    blob = _one_packet_channel(0x02, b"", 1)
    hdr_at = 64
    bad = patched(blob, hdr_at + 20, ">I", 0xFFFFFFFF)
    err = parse_error([bad])
    assert str(err) == (f"multifd channel 0: offset {hdr_at}: compressed payload of 4294967295 "
                        "bytes for 1 pages (QEMU sends 1 to 1048576)")


def test_device_state_packet():
    data, pk = first_normal()
    state = b"device bytes" * 10
    dev = struct.pack(">III256sII", 0x11223344, 1, 0x40, b"0000:00:02.0/vfio\0", 7, len(state))
    events = parse([data[: pk.offset] + dev + state])
    ev = [e for e in events if isinstance(e, DeviceStatePacket)]
    assert ev == [DeviceStatePacket("0000:00:02.0/vfio", 7, state, pk.offset)]
    for flags, size, name, msg in [
        (0x41, 5, b"x\0", "SYNC flag on a device-state packet"),
        (0x40, 0, b"x\0", "empty device-state packet"),
        (0x40, 5, b"x" * 256, "device-state idstr is not NUL-terminated in 256 bytes"),
        (0x40, 1 << 30, b"x\0", f"device-state payload of {1 << 30} bytes is over the "
                                f"{16 << 20}-byte cap"),
    ]:
        bad = struct.pack(">III256sII", 0x11223344, 1, flags, name, 0, size)
        err = parse_error([data[: pk.offset] + bad + b"12345"])
        assert str(err) == f"multifd channel 0: offset {pk.offset}: {msg}"


def test_page_size_rule():
    for bad in (512, 3000, 128 * 1024):
        with pytest.raises(ValueError) as info:
            MultifdParser(page_size=bad)
        assert str(info.value) == (f"page size {bad} refused: QEMU's target pages are powers of "
                                   "two from 1 KiB to 64 KiB")
    assert MultifdParser(page_size=1024).packet_size == 320 + 8 * 512
    # the packet header holds one offset per page of 512 KiB: fewer, bigger pages, smaller header
    assert MultifdParser(page_size=65536).packet_size < MultifdParser().packet_size


def test_feed_after_close_is_misuse():
    p = MultifdParser()
    p.close()
    with pytest.raises(RuntimeError):
        p.feed(b"x")


# -- across channels --------------------------------------------------------------------------


def test_channel_registry():
    inits = [parse([c])[0] for c in multifd_channels("none")]
    reg = MultifdChannels(2)
    assert reg.missing == [0, 1]
    for k, init in enumerate(inits):
        reg.register(init, f"connection {k + 1}")
    assert reg.missing == []
    with pytest.raises(MultifdError) as info:
        reg.register(inits[0], "connection 3")
    assert str(info.value) == "connection 3: offset 24: channel id 0 again (first on connection 1)"
    small = MultifdChannels(1)
    small.register(next(i for i in inits if i.channel_id == 0), "connection 1")
    with pytest.raises(MultifdError) as info:
        small.register(next(i for i in inits if i.channel_id == 1), "connection 2")
    assert str(info.value) == ("connection 2: offset 24: channel id 1, but the migration has 1 "
                               "multifd channels (0 to 0)")
    other = MultifdChannels(2, uuid=b"\x01" * 16)
    with pytest.raises(MultifdError) as info:
        other.register(inits[0], "connection 1")
    assert str(info.value) == (f"connection 1: offset 8: source UUID {'00' * 16} differs from "
                               f"{'01' * 16} (another source?)")
    with pytest.raises(MultifdError):
        reg.set_uuid(b"\x02" * 16)
    with pytest.raises(ValueError):
        MultifdChannels(0)


# -- fuzz -------------------------------------------------------------------------------------


_PACKETS: dict[tuple[str, int], list[int]] = {}


def packet_offsets(compression: str, k: int) -> list[int]:
    """Where the packets of a capture's channel start (from the parser, on the good capture)."""
    if (compression, k) not in _PACKETS:
        events = parse([multifd_channels(compression)[k]])
        _PACKETS[compression, k] = [e.offset for e in events if isinstance(e, (RamPacket, SyncPacket))]
    return _PACKETS[compression, k]


@st.composite
def mutated_channel(draw):
    compression = draw(st.sampled_from(COMPRESSIONS))
    k = draw(st.integers(0, 1))
    src = multifd_channels(compression)[k]
    starts = packet_offsets(compression, k)
    data = bytearray(src[: draw(st.one_of(st.just(len(src)), st.integers(64, len(src))))])
    # mutate where it matters: field offsets of real packets (or anywhere)
    where = st.one_of(
        st.integers(0, len(data) - 1),
        st.builds(lambda s, d: s + d, st.sampled_from(starts),
                  st.sampled_from([0, 4, 8, 11, 12, 16, 20, 24, 32, 64, 65, 319, 320, 328, 1344,
                                   1345, 1400])))
    for _ in range(draw(st.integers(1, 6))):
        i = min(draw(where), len(data) - 1)
        kind = draw(st.sampled_from(["flip", "set32", "delete", "insert", "truncate"]))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set32" and i + 4 <= len(data):
            struct.pack_into(">I", data, i, draw(st.sampled_from(
                [0, 1, 2, 4, 0x40, 0x41, 127, 128, 129, 4096, 0xFFFFFFFF, 0x11223344])))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "truncate":
            del data[i:]
        if not data:
            data = bytearray(b"\x11")
    return bytes(data), draw(st.integers(0, len(data)))


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_channel())
def test_fuzz_only_multifd_errors_and_bounded_memory(case):
    data, split = case
    tracemalloc.start()
    try:
        try:
            parse([data[:split], data[split:]])
        except MultifdError as err:
            assert str(err).startswith(f"{err.channel}: offset {err.offset}: ")
            assert 0 <= err.offset <= len(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # one 512 KiB packet, a decompressor, copies: never the input's claims


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(min_size=0, max_size=4000), st.integers(0, 4000))
def test_fuzz_random_bytes_after_a_real_init(tail, split):
    data = multifd_channels("none")[0][:64] + tail
    try:
        parse([data[:split], data[split:]])
    except MultifdError as err:
        assert 0 <= err.offset <= len(data)
