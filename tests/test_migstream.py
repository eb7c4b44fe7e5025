"""The sans-IO migration stream parser (qioc_green.migration) against real QEMU streams.

The captures in tests/data (see make_streams.py there) make these run without QEMU; the tests at
the end that make fresh captures need QEMU (``peers.need``).
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import random
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qioc_green.migration as ms
from qioc_green.migration import (
    NEED_DATA,
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    MigrationStreamError,
    RamBlocks,
    RamFlush,
    RamPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionPart,
    SectionStart,
    StreamEnd,
    StreamHeader,
    StreamParser,
    Summary,
    VmDescription,
    ZeroPages,
    expand_pages,
)

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"
# the complete captures (cmd-postcopy-* are parsed by the command and package tests: RAM
# pages come twice in postcopy, and the resumed connection has no stream header)
CAPTURES = ["pc", "q35", "none", "pc-nodesc", "pc-ignore-shared", "cmd-return-path-7.2",
            "cmd-colo-7.2", "cmd-return-path-10.0"]
MACHINES = {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2", "none": "none",
            "pc-nodesc": "pc-i440fx-7.2", "pc-ignore-shared": "pc-i440fx-7.2",
            "cmd-return-path-7.2": "pc-i440fx-7.2", "cmd-colo-7.2": "pc-i440fx-7.2",
            "cmd-return-path-10.0": "pc-i440fx-10.0"}

_cache: dict[str, bytes] = {}


def load(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())
    return _cache[name]


def parse(chunks, parser: StreamParser | None = None) -> list:
    """Feed chunks, drain events after each, close, drain again; return the events."""
    p = parser or StreamParser()
    events = []
    for chunk in chunks:
        p.feed(chunk)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    p.close()
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def parse_error(chunks, parser: StreamParser | None = None) -> MigrationStreamError:
    with pytest.raises(MigrationStreamError) as info:
        parse(chunks, parser)
    err = info.value
    assert str(err).startswith(f"offset {err.offset}: ")
    assert "\n" not in str(err)
    return err


def random_chunks(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rnd.choice([1, 2, 3, 8, 9, 100, 4095, 4104, 4105, 65536, rnd.randrange(1, 300000)])
        out.append(data[i : i + n])
        i += n
    return out


def first(events, cls):
    return next(e for e in events if isinstance(e, cls))


def sections_offsets(events) -> list[SectionHeader]:
    return [e for e in events if isinstance(e, SectionHeader)]


# -- whole streams ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_whole_stream_events(name):
    data = load(name)
    events = parse([data])
    assert isinstance(events[0], StreamHeader) and events[0].version == 3
    assert isinstance(events[1], Configuration) and events[1].machine == MACHINES[name]
    assert isinstance(events[-1], StreamEnd) and events[-1].offset == len(data)
    described = name != "pc-nodesc"
    assert events[-1].described is described
    kinds = [type(e) for e in events if isinstance(e, SectionHeader) and e.idstr == "ram"]
    assert kinds == [SectionStart, SectionPart, SectionEnd]
    eof = first(events, EndOfState)
    # every section header is matched by its footer, in order
    open_ = None
    for ev in events:
        if isinstance(ev, SectionHeader):
            assert open_ is None
            open_ = ev
        elif isinstance(ev, SectionFooter):
            assert open_ is not None and ev.section_id == open_.section_id
            open_ = None
        elif isinstance(ev, DeviceState):
            assert open_ is not None and ev.section_id == open_.section_id
    assert open_ is None
    if described:
        desc = first(events, VmDescription)
        assert desc.offset == eof.offset + 1
        assert desc.offset + 5 + desc.length == len(data)
        fulls = [e for e in events if isinstance(e, SectionFull)]
        assert [(d["name"], d["instance_id"]) for d in desc.description["devices"]] == \
            [(f.idstr, f.instance_id) for f in fulls]
        assert desc.description["page_size"] == 4096
    else:
        assert eof.offset == len(data) - 1


@pytest.mark.parametrize("name", CAPTURES)
def test_chunking_does_not_change_events(name):
    data = load(name)
    ref = expand_pages(parse([data]))
    for seed in range(3):
        assert expand_pages(parse(random_chunks(data, seed))) == ref


@pytest.mark.parametrize("name", ["none", "pc"])
def test_one_byte_at_a_time(name):
    data = load(name)
    ref = expand_pages(parse([data]))
    assert expand_pages(parse(data[i : i + 1] for i in range(len(data)))) == ref


def test_non_page_events_identical_whatever_the_chunking():
    data = load("q35")

    def others(events):
        return [e for e in events if not isinstance(e, (RamPages, ZeroPages))]

    ref = others(parse([data]))
    assert others(parse(data[i : i + 7] for i in range(0, len(data), 7))) == ref
    assert others(parse(random_chunks(data, 42))) == ref


def test_pages_view_the_fed_buffer_and_are_whole():
    data = load("pc")
    events = parse([data])
    pages = [e for e in events if isinstance(e, RamPages)]
    assert pages
    for ev in pages:
        assert ev.data.obj is data  # not copied
        assert len(ev.data) == (ev.count - 1) * ev.stride + ev.page_size
        assert all(len(v) == 4096 for v in ev.iov())


def test_parser_lets_go_of_fed_buffers_at_need_data():
    data = load("pc")
    p = StreamParser()
    buf = bytearray(100_000)
    seen = 0
    for i in range(0, len(data), 100_000):
        chunk = data[i : i + 100_000]
        buf[: len(chunk)] = chunk
        p.feed(memoryview(buf)[: len(chunk)])
        events = []
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
        seen += len(events)
        del events, ev
        gc.collect()
        buf.extend(b"x")  # BufferError if the parser still exported a view of buf
        del buf[-1:]
    p.close()
    assert seen > 0


# -- summary ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_summary_matches_stream(name):
    data = load(name)
    events = parse([data])
    s = Summary()
    for ev in events:
        s.add(ev)
    d = s.as_dict(elapsed_s=1.5)
    assert json.loads(json.dumps(d)) == d
    assert d["machine"] == MACHINES[name]
    assert d["complete"] is True
    assert d["bytes_total"] == len(data)
    assert d["elapsed_s"] == 1.5
    blocks = first(events, RamBlocks).blocks
    assert [(b["name"], b["size"]) for b in d["ram_blocks"]] == [(b.name, b.size) for b in blocks]
    main = d["ram_blocks"][0]
    assert main["name"] in ("pc.ram", "ram") and main["size"] == 16 << 20
    # every page of every block was sent exactly once (zero RAM: mostly zero pages)
    for b in d["ram_blocks"]:
        assert b["zero_pages"] + b["normal_pages"] == b["size"] // 4096, b
    assert main["zero_pages"] == main["size"] // 4096
    ram = [sec for sec in d["sections"] if sec["idstr"] == "ram"]
    assert len(ram) == 1 and ram[0]["records"] == 3 and ram[0]["version_id"] == 4
    if name == "pc-nodesc":
        assert d["devices"] == [] and d["described"] is False
    else:
        desc = first(events, VmDescription).description
        assert d["devices"] == [dev["name"] for dev in desc["devices"]]
        assert set(d["devices"]) <= {sec["idstr"] for sec in d["sections"]}
    # the stream is the header, configuration (with the commands before the first section),
    # sections, later commands (SWITCHOVER_START), EOF and the description: nothing else
    config_len = sections_offsets(events)[0].offset - 8
    desc_len = (5 + first(events, VmDescription).length) if d["described"] else 0
    later = sum(5 + len(e.data) for e in events if isinstance(e, Command) and e.offset > 8 + config_len)
    assert 8 + config_len + sum(sec["bytes"] for sec in d["sections"]) + later + 1 + desc_len == len(data)


def test_undescribed_stream_has_the_same_sections():
    a = [(e.idstr, e.instance_id, e.version_id) for e in parse([load("pc")])
         if isinstance(e, SectionHeader)]
    b = [(e.idstr, e.instance_id, e.version_id) for e in parse([load("pc-nodesc")])
         if isinstance(e, SectionHeader)]
    assert a == b


def test_ignore_shared_configuration_and_block_addresses():
    events = parse([load("pc-ignore-shared")])
    assert first(events, Configuration).capabilities == ("x-ignore-shared",)
    blocks = {b.name: b for b in first(events, RamBlocks).blocks}
    assert blocks["pc.ram"].addr == 0
    assert blocks["pc.bios"].addr == 0xFFFC0000
    assert all(b.page_size is None for b in blocks.values())


# -- malformed streams ------------------------------------------------------------------------


def test_wrong_magic_and_version():
    data = load("none")
    err = parse_error([b"QEVN" + data[4:]])
    assert err.offset == 0 and "magic" in str(err)
    err = parse_error([data[:7] + b"\x02" + data[8:]])
    assert err.offset == 4 and "version 3, got 2" in str(err)


def _truncation_points(data: bytes, events) -> list[int]:
    points = set(range(40)) | {len(data) - 1}
    for ev in events:
        off = getattr(ev, "offset", None)
        if isinstance(off, int):
            points |= {off - 1, off, off + 1, off + 5, off + 9}
    rnd = random.Random(7)
    points |= {rnd.randrange(len(data)) for _ in range(150)}
    return sorted(p for p in points if 0 <= p < len(data))


@pytest.mark.parametrize("name", ["pc", "none", "pc-nodesc"])
def test_truncated_anywhere(name):
    data = load(name)
    events = parse([data])
    eof = first(events, EndOfState).offset
    for k in _truncation_points(data, events):
        if k == eof + 1:
            # cut right after EOF: a stream without description, which QEMU may send
            assert isinstance(parse([data[:k]])[-1], StreamEnd)
            continue
        err = parse_error([data[:k]])
        assert 0 <= err.offset <= k, (k, err)


def test_truncated_error_comes_from_close_not_earlier():
    data = load("pc")
    p = StreamParser()
    p.feed(data[:200_000])
    while p.next_event() is not NEED_DATA:
        pass
    with pytest.raises(MigrationStreamError, match="stream ends inside"):
        p.close()
    with pytest.raises(MigrationStreamError):  # and again, the same error
        p.next_event()


def _header_offsets(name: str):
    events = parse([load(name)])
    return events, [e for e in events if isinstance(e, SectionHeader)]


def test_flipped_section_header_bytes():
    data = load("pc")
    _, headers = _header_offsets("pc")
    for h in headers:
        # every byte of the header: type, section id, and for START/FULL idstr/instance/version
        span = 5 if isinstance(h, (SectionPart, SectionEnd)) else 5 + 1 + len(h.idstr) + 8
        for i in range(span):
            mutated = bytearray(data)
            mutated[h.offset + i] ^= 0x40
            if isinstance(h, SectionStart) and i >= 5:
                # "ram" renamed (or its instance changed) is an iterable section we do not
                # know: framed by its footers like device data, or refused; never RAM.
                try:
                    events = parse([bytes(mutated)])
                except MigrationStreamError:
                    continue
                assert not any(isinstance(e, (RamBlocks, RamPages, ZeroPages)) for e in events)
                continue
            parse_error([bytes(mutated)])


def test_ram_footer_for_another_section():
    data = load("none")
    events = parse([data])
    footer = next(e for e in events if isinstance(e, SectionFooter) and e.idstr == "ram")
    mutated = bytearray(data)
    mutated[footer.offset + 4] ^= 0x01
    err = parse_error([bytes(mutated)])
    assert err.offset == footer.offset
    assert "section footer names section 3, expected 2" in str(err)
    mutated = bytearray(data)
    mutated[footer.offset] = 0x12
    err = parse_error([bytes(mutated)])
    assert "expected section footer 0x7e for section 2, got 0x12" in str(err)


def test_device_footer_damaged():
    data = load("pc")
    events = parse([data])
    footer = [e for e in events if isinstance(e, SectionFooter) and e.idstr != "ram"][5]
    mutated = bytearray(data)
    mutated[footer.offset + 4] ^= 0x01
    err = parse_error([bytes(mutated)])
    assert f"section {footer.section_id}" in str(err) and "footer" in str(err)


def test_description_disagreeing_with_sections():
    data = load("none")
    events = parse([data])
    desc = first(events, VmDescription)
    body = json.loads(data[desc.offset + 5 :])
    body["devices"][0]["fields"][0]["size"] += 1
    text = json.dumps(body).encode()
    err = parse_error([data[: desc.offset + 1] + struct.pack(">I", len(text)) + text])
    assert "VM description accounts for" in str(err)
    body["devices"] = body["devices"][1:]
    text = json.dumps(body).encode()
    err = parse_error([data[: desc.offset + 1] + struct.pack(">I", len(text)) + text])
    assert "lists 1 devices, the stream has 2" in str(err)


def test_bytes_after_the_end():
    data = load("none")
    err = parse_error([data + b"\x00"])
    assert err.offset == len(data) and "1 bytes after the end" in str(err)
    # the error comes as soon as the byte is seen, before close()
    p = StreamParser()
    p.feed(data + b"junk")
    with pytest.raises(MigrationStreamError):
        while p.next_event() is not NEED_DATA:
            pass
    nodesc = load("pc-nodesc")
    err = parse_error([nodesc + b"x"])
    assert err.offset == len(nodesc)
    assert "expected the end or a VM description (0x06) after EOF" in str(err)
    assert str(err).endswith("got 0x78")


def test_absurd_lengths():
    data = load("none")
    events = parse([data])
    desc = first(events, VmDescription)
    # a JSON length over the cap is refused at once, before its bytes are buffered
    p = StreamParser()
    p.feed(data[: desc.offset + 1] + b"\xff\xff\xff\xff")
    with pytest.raises(MigrationStreamError, match=r"VM description length 4294967295 is absurd"):
        while p.next_event() is not NEED_DATA:
            pass
    # machine name length
    err = parse_error([data[:9] + b"\x7f\xff\xff\xff" + data[13:]])
    assert err.offset == 9 and "machine name length" in str(err)
    # a RAM block name of length 0 (MEM_SIZE record right after the START header)
    start = first(events, SectionStart)
    name_len_at = start.offset + 1 + 4 + 1 + 3 + 8 + 8
    assert data[name_len_at] == 3  # "ram"
    err = parse_error([data[:name_len_at] + b"\x00" + data[name_len_at + 1 :]])
    assert "RAM block name has length 0" in str(err)
    # block sizes beyond the announced total
    size_at = name_len_at + 1 + 3
    err = parse_error([data[:size_at] + b"\x7f" + data[size_at + 1 :]])
    assert "exceeds" in str(err)


def test_device_bytes_cap():
    err = parse_error([load("pc")], StreamParser(max_device_bytes=4096))
    assert "over the 4096-byte cap" in str(err)


def test_unknown_section_type_and_misplaced_markers():
    data = load("none")
    events = parse([data])
    # right after the RAM section's last footer, where a section type byte must come
    at = next(e for e in events if isinstance(e, SectionFooter) and e.idstr == "ram").offset + 5
    for byte, msg in [(0x42, "unknown section type 0x42"), (0x05, "subsection (0x05) outside"),
                      (0x06, "VM description (0x06) before the EOF"),
                      (0x7E, "footer (0x7e) outside"), (0x07, "configuration section after")]:
        err = parse_error([data[:at] + bytes([byte]) + data[at:]])
        assert err.offset == at and msg in str(err)
    # after a device section's footer, found by searching: the error names the footer
    last = [e for e in events if isinstance(e, SectionFooter)][-1]
    at = first(events, EndOfState).offset
    err = parse_error([data[:at] + b"\x42" + data[at:]])
    assert err.offset == at
    assert f"after the footer of section {last.section_id} ('{last.idstr}') at offset " \
        f"{last.offset}, got 0x42" in str(err)


def test_part_for_a_section_never_started():
    data = load("none")
    part = first(parse([data]), SectionPart)
    mutated = bytearray(data)
    mutated[part.offset + 4] = 9
    err = parse_error([bytes(mutated)])
    assert err.offset == part.offset and "PART for section 9, never started" in str(err)


def _first_zero_continue(data: bytes, events) -> int:
    part = first(events, SectionPart)
    pos = part.offset + 5
    # the first record names its block; find the first ZERO|CONTINUE header after it
    while True:
        (hdr,) = struct.unpack_from(">Q", data, pos)
        if hdr & 0xFFF == 0x22:
            return pos
        pos += 1


@pytest.mark.parametrize("flags,msg", [(0x60, "XBZRLE-encoded page"), (0x120, "compressed page"),
                                       (0xA0, "RDMA hook"), (0x400, "unknown RAM record flags")])
def test_encoded_pages_are_refused(flags, msg):
    data = load("none")
    at = _first_zero_continue(data, parse([data]))
    (hdr,) = struct.unpack_from(">Q", data, at)
    mutated = data[:at] + struct.pack(">Q", (hdr & ~0xFFF) | flags) + data[at + 8 :]
    err = parse_error([mutated])
    assert err.offset == at and msg in str(err)


def test_multifd_flush_record():
    data = load("none")
    events = parse([data])
    at = _first_zero_continue(data, events)
    mutated = data[:at] + struct.pack(">Q", 0x200) + data[at:]
    got = parse([mutated])
    assert sum(isinstance(e, RamFlush) for e in got) == 1

    def pages(evs):
        return [e for e in expand_pages(evs) if isinstance(e, tuple)]

    assert pages(got) == pages(events)


def commands_of(name):
    """The commands of a real capture, as (number, name, data length), and the parse error."""
    p = StreamParser()
    p.feed(load(name))
    got = []
    try:
        while (ev := p.next_event()) is not NEED_DATA:
            if isinstance(ev, Command):
                got.append((ev.command, ev.name, len(ev.data)))
        p.close()
    except MigrationStreamError as exc:
        return got, exc
    return got, None


def test_command_numbers_against_streams_qemu_wrote():
    """The command table, checked against what real QEMUs sent (tests/data/make_streams.py),
    never against a copy of it: QEMU 7.2 with return-path (relayed to a real destination),
    7.2 with x-colo, 7.2 with postcopy, and 10.0 with return-path on its own machine type."""
    got, err = commands_of("cmd-return-path-7.2")
    assert got == [(1, "OPEN_RETURN_PATH", 0), (2, "PING", 4)] and err is None
    got, err = commands_of("cmd-colo-7.2")
    assert got == [(8, "ENABLE_COLO", 0)] and err is None
    got, err = commands_of("cmd-return-path-10.0")
    assert got == [(1, "OPEN_RETURN_PATH", 0), (2, "PING", 4), (11, "SWITCHOVER_START", 0)]
    assert err is None
    got, err = commands_of("cmd-postcopy-7.2")
    assert err is None
    assert got[:3] == [(1, "OPEN_RETURN_PATH", 0), (2, "PING", 4), (3, "POSTCOPY_ADVISE", 16)]
    discards = [c for c in got[3:] if c[0] == 6]
    assert discards and all(c[1] == "POSTCOPY_RAM_DISCARD" for c in discards)
    # PACKAGED (7): a be32 size, then a stream of its own, which QEMU opens with
    # POSTCOPY_LISTEN (4) and closes with PING 3 and POSTCOPY_RUN (5); PING 4 follows it
    assert got[3 + len(discards):] == [(2, "PING", 4), (7, "PACKAGED", 4), (4, "POSTCOPY_LISTEN", 0),
                                       (2, "PING", 4), (5, "POSTCOPY_RUN", 0), (2, "PING", 4)]


def package_of(data: bytes) -> tuple[int, int]:
    """Where the PACKAGED command of a postcopy capture is, and its package's size."""
    p = StreamParser()
    p.feed(data)
    while (ev := p.next_event()) is not NEED_DATA:
        if isinstance(ev, Command) and ev.name == "PACKAGED":
            return ev.offset, struct.unpack(">I", ev.data)[0]
    raise AssertionError("no PACKAGED")


def test_postcopy_package_parsed_in_place_whatever_the_chunking():
    """A real 7.2 postcopy stream: the package's device sections and commands come out in
    stream order after PACKAGED, framed by their footers and the package's end; the stream is
    complete without a VM description (postcopy sends none)."""
    data = load("cmd-postcopy-7.2")
    events = parse([data])
    at, size = package_of(data)
    end = at + 9 + size
    inside = [e for e in events if at < getattr(e, "offset", -1) < end]
    assert isinstance(inside[0], Command) and inside[0].name == "POSTCOPY_LISTEN"
    assert [e.name for e in inside if isinstance(e, Command)] == ["POSTCOPY_LISTEN", "PING",
                                                                   "POSTCOPY_RUN"]
    fulls = [e for e in inside if isinstance(e, SectionFull)]
    assert "globalstate" in {f.idstr for f in fulls}
    footers = [e for e in inside if isinstance(e, SectionFooter)]
    assert [f.section_id for f in footers] == [f.section_id for f in fulls]
    assert isinstance(events[-1], StreamEnd) and events[-1].described is False
    assert events[-1].offset == len(data)
    ref = expand_pages(events)
    for seed in range(3):
        assert expand_pages(parse(random_chunks(data, seed))) == ref
    assert expand_pages(parse(data[i : i + 1] for i in range(len(data)))) == ref


def test_postcopy_package_errors():
    """The package length is a peer's number: it is capped, and it is a hard end."""
    data = load("cmd-postcopy-7.2")
    at, size = package_of(data)
    body = at + 9

    def resized(n: int, insert: bytes = b"", where: int = 5) -> bytes:
        return (data[: at + 5] + struct.pack(">I", n) + data[body : body + where] + insert
                + data[body + where :])

    err = parse_error([data], StreamParser(max_device_bytes=1000))
    assert str(err) == (f"offset {at}: PACKAGED of {size} bytes is over the 1000-byte device "
                        "data cap")
    # one byte short: the POSTCOPY_RUN that ends the package would cross its end
    err = parse_error([resized(size - 1)])
    assert err.offset == body + size - 1 and "crosses the end of the postcopy package" in str(err)
    # 16 short: the end cuts the footer of the last device section
    err = parse_error([resized(size - 16)])
    assert "the postcopy package ends inside section" in str(err) and "before its footer" in str(err)
    # 5 long: PING 4, after the package, would cross its end
    err = parse_error([resized(size + 5)])
    assert "crosses the end of the postcopy package" in str(err)
    err = parse_error([resized(size + 1, b"\x00")])  # EOF right after POSTCOPY_LISTEN
    assert str(err) == f"offset {body + 5}: EOF (0x00) inside the postcopy package"
    nested = b"\x08\x00\x07\x00\x04" + struct.pack(">I", 0)
    err = parse_error([resized(size + len(nested), nested)])
    assert str(err) == f"offset {body + 5}: PACKAGED inside the postcopy package"
    ram = b"\x01" + struct.pack(">I", 99) + b"\x03ram" + struct.pack(">II", 0, 4)
    err = parse_error([resized(size + len(ram), ram)])
    assert str(err) == f"offset {body + 5}: a ram section inside the postcopy package"


def test_postcopy_recovery_commands_against_a_stream_qemu_wrote():
    """RECV_BITMAP (10) and POSTCOPY_RESUME (9): the connection a real QEMU 7.2 opened to resume
    a postcopy migration whose first connection was cut (tests/data/make_streams.py). It has no
    stream header: it opens with one RECV_BITMAP per RAM block (a length byte and the block's
    name), then POSTCOPY_RESUME, then the ram section goes on."""
    data = load("cmd-postcopy-resume-7.2")
    blocks = [b.name for b in first(parse([load("pc")]), RamBlocks).blocks]
    got = []
    pos = 0
    while data[pos] == 0x08:
        cmd, length = struct.unpack_from(">HH", data, pos + 1)
        got.append((cmd, data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    assert got == [(10, bytes([len(n)]) + n.encode()) for n in blocks] + [(9, b"")]
    assert [ms.COMMANDS[c][0] for c, _ in got] == ["RECV_BITMAP"] * len(blocks) + ["POSTCOPY_RESUME"]
    assert all(ms.COMMANDS[c][1] in (None, len(d)) for c, d in got)
    assert data[pos] == 0x02  # QEMU_VM_SECTION_PART: RAM goes on


def test_command_errors():
    data = load("none")
    start = first(parse([data]), SectionStart).offset
    err = parse_error([data[:start] + b"\x08\x00\x63\x00\x00" + data[start:]])
    assert "unknown command 99" in str(err)
    err = parse_error([data[:start] + b"\x08\x00\x02\x00\x00" + data[start:]])
    assert "command PING has length 0, expected 4" in str(err)


def test_feed_after_close_is_misuse():
    p = StreamParser()
    p.feed(load("none"))
    p.close()
    with pytest.raises(RuntimeError):
        p.feed(b"x")


# -- fuzz -------------------------------------------------------------------------------------

_FUZZ_BASES = ["none", "pc-nodesc"]


@st.composite
def mutated_stream(draw):
    data = bytearray(load(draw(st.sampled_from(_FUZZ_BASES))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "dup"]))
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
                                            0x7E, 0xFF, 0x20, 0x22, 0x28]))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "truncate":
            del data[i:]
        else:
            j = draw(st.integers(0, len(data) - 1))
            data[i:i] = data[j : j + draw(st.integers(1, 300))]
        if not data:
            data = bytearray(b"Q")
    split = draw(st.integers(0, len(data)))
    return bytes(data), split


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_stream())
def test_fuzz_only_stream_errors(case):
    data, split = case
    try:
        parse([data[:split], data[split:]])
    except MigrationStreamError as err:
        assert str(err).startswith(f"offset {err.offset}: ")
        assert 0 <= err.offset <= len(data)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, (1 << 32) - 1), split=st.integers(0, 300_000),
       inner=st.binary(max_size=40), where=st.integers(0, 12_000))
def test_fuzz_postcopy_package_length_and_contents(size, split, inner, where):
    """Whatever length a peer writes in PACKAGED, and whatever it puts inside the package, the
    parser ends in a result or one stream error (the cap is 1 MiB here: bigger is refused)."""
    data = load("cmd-postcopy-7.2")
    at, real = package_of(data)
    body = at + 9
    where = min(where, real)
    mutated = (data[: at + 5] + struct.pack(">I", size) + data[body : body + where] + inner
               + data[body + where :])
    p = StreamParser(max_device_bytes=1 << 20)
    try:
        parse([mutated[:split], mutated[split:]], p)
    except MigrationStreamError as err:
        assert str(err).startswith(f"offset {err.offset}: ")
        assert 0 <= err.offset <= len(mutated)


# -- fresh captures from a real QEMU ----------------------------------------------------------


@pytest.mark.peers
@pytest.mark.timeout(180)
def test_fresh_random_ram_capture_rebuilds_guest_ram(tmp_path):
    """A 64 MiB random-RAM capture: every pc.ram page equals the backing file; parse speed."""
    from tests.peers import need

    need("qemu-system-x86_64")
    from qioc_green.migration.qemu import capture

    ram_file = tmp_path / "ram.bin"
    ram = os.urandom(64 << 20)
    ram_file.write_bytes(ram)
    data = capture("pc", "64M", ram_file=str(ram_file), timeout=120)
    (tmp_path / "stream.mig").write_bytes(data)  # kept under tmp while the test runs
    assert len(data) > 64 << 20

    rebuilt = bytearray(64 << 20)
    view = memoryview(data)
    chunk = 1 << 20
    summary = Summary()
    best = float("inf")
    for rnd in range(3):
        p = StreamParser()
        t0 = time.perf_counter()
        for i in range(0, len(data), chunk):
            p.feed(view[i : i + chunk])
            while (ev := p.next_event()) is not NEED_DATA:
                if rnd == 0:
                    summary.add(ev)
                    if isinstance(ev, RamPages) and ev.block == "pc.ram":
                        for off, page in ev.pages():
                            rebuilt[off : off + 4096] = page
        p.close()
        while (ev := p.next_event()) is not NEED_DATA:
            if rnd == 0:
                summary.add(ev)
        if rnd:
            best = min(best, time.perf_counter() - t0)
    assert rebuilt == ram
    d = summary.as_dict()
    assert d["complete"] and d["bytes_total"] == len(data)
    main = next(b for b in d["ram_blocks"] if b["name"] == "pc.ram")
    assert main["normal_pages"] == (64 << 20) // 4096
    print(f"\nparse {len(data) / best / 1e6:.0f} MB/s ({len(data) >> 20} MiB stream, "
          f"1 MiB chunks, no summary)")


@pytest.mark.peers
@pytest.mark.timeout(120)
@pytest.mark.parametrize("machine", ["q35", "none"])
def test_fresh_capture_parses(machine):
    from tests.peers import need

    need("qemu-system-x86_64")
    from qioc_green.migration.qemu import capture

    data = capture(machine, "16M", timeout=60)
    events = parse(random_chunks(data, 1))
    assert first(events, Configuration).machine == MACHINES[machine]
    assert events[-1] == StreamEnd(len(data), True)


def test_module_exports():
    assert set(ms.__all__) <= set(dir(ms))
