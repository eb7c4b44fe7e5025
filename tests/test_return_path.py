"""The return path, sans-IO (qioc_green/migration/_return_path.py): the destination's state and
the wire codec, with no sockets.

The expected bytes of the three whole sessions are what a real destination sent, captured once
with a relay between two QEMUs (10.0 to 10.0 and 7.2 to 7.2, return-path on): precopy, postcopy
(PONG 4 overtook PONG 3 there: the package loads beside the listen thread; here they come in
stream order) and switchover-ack. The reader is fed whole, one byte at a time and with trailing
bytes; hypothesis throws random bytes at the reader and random command sequences at the state.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qioc_green.migration import (
    MAX_MESSAGE_DATA,
    NEED_DATA,
    DestinationReturnPath,
    LocalProtocolError,
    MigCommand,
    Pong,
    PostcopyState,
    RecvBitmap,
    ReqPages,
    ResumeAck,
    ReturnPathError,
    ReturnPathReader,
    Shut,
    SwitchoverAck,
    decode_advise,
    decode_ram_discard,
    encode_pong,
    encode_req_pages,
    encode_resume_ack,
    encode_shut,
    encode_switchover_ack,
)

# seen from QEMU destinations (see the module docstring)
QEMU_PRECOPY = bytes.fromhex("00020004000000010001000400000000")
QEMU_SWITCHOVER_ACK = bytes.fromhex("0007000000020004000000010001000400000000")
QEMU_POSTCOPY_PONGS = [1, 2, 4, 3]  # then SHUT 0


def ping(n: int) -> tuple[int, bytes]:
    return MigCommand.PING, struct.pack(">I", n)


ADVISE = (MigCommand.POSTCOPY_ADVISE, struct.pack(">QQ", 4096, 4096))
DISCARD = (MigCommand.POSTCOPY_RAM_DISCARD,
           b"\x00\x06pc.ram\x00" + struct.pack(">QQQQ", 0, 4096, 1 << 20, 8192))


def postcopy_commands() -> list[tuple[int, bytes]]:
    """A postcopy stream's commands in stream order (package contents where they sit)."""
    return [(MigCommand.OPEN_RETURN_PATH, b""), ping(1), ADVISE,
            (MigCommand.SWITCHOVER_START, b""), DISCARD, ping(2),
            (MigCommand.PACKAGED, struct.pack(">I", 5000)),
            (MigCommand.POSTCOPY_LISTEN, b""), ping(3), (MigCommand.POSTCOPY_RUN, b""), ping(4)]


def feed(rp: DestinationReturnPath, cmds: list[tuple[int, bytes]]) -> bytes:
    return b"".join(rp.command(c, d) for c, d in cmds)


def read_all(data: bytes, piece: int | None = None) -> list[object]:
    reader = ReturnPathReader()
    out: list[object] = []
    step = piece or max(1, len(data))
    for i in range(0, len(data), step):
        reader.feed(data[i : i + step])
        while (m := reader.next_message()) is not NEED_DATA:
            out.append(m)
    reader.close()
    return out


# -- the destination's state ------------------------------------------------------------------------


def test_precopy_answers_as_qemu():
    rp = DestinationReturnPath()
    out = feed(rp, [(MigCommand.OPEN_RETURN_PATH, b""), ping(1),
                    (MigCommand.SWITCHOVER_START, b"")])
    out += rp.end_of_stream()
    assert out == QEMU_PRECOPY
    assert rp.status == "completed" and rp.shut


def test_switchover_ack_right_after_the_return_path_opens():
    rp = DestinationReturnPath(switchover_ack=True)
    out = feed(rp, [(MigCommand.OPEN_RETURN_PATH, b""), ping(1)]) + rp.end_of_stream()
    assert out == QEMU_SWITCHOVER_ACK


def test_postcopy_answers_every_ping_and_requests_no_page():
    rp = DestinationReturnPath(target_page_size=4096)
    out = feed(rp, postcopy_commands())
    assert rp.status == "postcopy-active" and rp.postcopy is PostcopyState.RUNNING
    out += rp.end_of_stream()
    msgs = read_all(out)
    assert sorted(m.value for m in msgs if isinstance(m, Pong)) == sorted(QEMU_POSTCOPY_PONGS)
    assert msgs[-1] == Shut(0)
    assert not any(isinstance(m, ReqPages) for m in msgs)
    assert rp.pagesize_summary == 4096 and rp.discards == 1 and rp.packages == 1
    assert rp.postcopy is PostcopyState.END and rp.status == "completed"


def test_postcopy_status_turns_at_listen():
    rp = DestinationReturnPath()
    cmds = postcopy_commands()
    listen = cmds.index((MigCommand.POSTCOPY_LISTEN, b""))
    feed(rp, cmds[:listen])
    assert rp.status == "active"
    feed(rp, cmds[listen : listen + 1])
    assert rp.status == "postcopy-active"


def test_advised_but_finished_in_precopy():
    rp = DestinationReturnPath(postcopy_ram=True)
    out = feed(rp, [(MigCommand.OPEN_RETURN_PATH, b""), ping(1), ADVISE]) + rp.end_of_stream()
    assert read_all(out) == [Pong(1), Shut(0)]


def test_without_return_path_nothing_is_sent():
    rp = DestinationReturnPath()
    assert feed(rp, [(MigCommand.SWITCHOVER_START, b"")]) == b""
    assert rp.end_of_stream() == b""


def test_failure_sends_shut_1_once():
    rp = DestinationReturnPath()
    feed(rp, [(MigCommand.OPEN_RETURN_PATH, b"")])
    assert rp.fail() == encode_shut(1)
    assert rp.fail() == b""
    assert rp.status == "failed"
    with pytest.raises(LocalProtocolError):
        rp.command(*ping(5))
    with pytest.raises(LocalProtocolError):
        rp.end_of_stream()


def test_tolerated_like_qemu():
    rp = DestinationReturnPath()
    out = feed(rp, [(MigCommand.OPEN_RETURN_PATH, b""), (MigCommand.OPEN_RETURN_PATH, b""),
                    (MigCommand.POSTCOPY_RESUME, b""), (MigCommand.RECV_BITMAP, b"\x06pc.ram")])
    assert out == b"" and rp.ignored == 3


@pytest.mark.parametrize("cmds,message", [
    ([ping(1)], "PING (1) with no return path open"),
    ([(MigCommand.POSTCOPY_LISTEN, b"")], "POSTCOPY_LISTEN in postcopy state none"),
    ([ADVISE, (MigCommand.POSTCOPY_RUN, b"")], "POSTCOPY_RUN in postcopy state advise"),
    ([ADVISE, ADVISE], "POSTCOPY_ADVISE in postcopy state advise"),
    ([DISCARD], "POSTCOPY_RAM_DISCARD in postcopy state none"),
    ([ADVISE, (MigCommand.POSTCOPY_LISTEN, b""), DISCARD], "POSTCOPY_RAM_DISCARD in postcopy state listening"),
    ([(MigCommand.POSTCOPY_ADVISE, b"x" * 8)], "POSTCOPY_ADVISE with length 8, expected 0 or 16"),
    ([(MigCommand.POSTCOPY_ADVISE, struct.pack(">QQ", 4096, 16384))],
     "postcopy needs matching target page sizes (source 16384, here 4096)"),
    ([(MigCommand.ENABLE_COLO, b"")], "ENABLE_COLO: COLO is not supported"),
    ([(0, b"")], "unknown migration command 0 (length 0)"),
    ([(12, b"ab")], "unknown migration command 12 (length 2)"),
    ([(MigCommand.PING, b"\0\0")], "PING with length 2, expected 4"),
    ([(MigCommand.POSTCOPY_RUN, b"\0")], "POSTCOPY_RUN with length 1, expected 0"),
    ([(MigCommand.PACKAGED, struct.pack(">I", 1 << 30))], "PACKAGED of 1073741824 bytes (cap 67108864)"),
    ([(MigCommand.RECV_BITMAP, b"\x09pc.ram")], "RECV_BITMAP with length 7: malformed block name"),
])
def test_refused_like_qemu(cmds, message):
    rp = DestinationReturnPath(target_page_size=4096)
    with pytest.raises(ReturnPathError) as info:
        feed(rp, cmds)
    assert str(info.value) == message
    assert rp.status == "failed"
    assert rp.fail() == b""  # the return path was never opened


def test_postcopy_capability_must_agree_when_given():
    with pytest.raises(ReturnPathError, match="postcopy-ram is off here"):
        DestinationReturnPath(postcopy_ram=False).command(*ADVISE)
    with pytest.raises(ReturnPathError, match="postcopy-ram is on here"):
        DestinationReturnPath(postcopy_ram=True).command(MigCommand.POSTCOPY_ADVISE, b"")
    DestinationReturnPath(postcopy_ram=False).command(MigCommand.POSTCOPY_ADVISE, b"")


def test_stream_ending_inside_postcopy_is_a_failure():
    rp = DestinationReturnPath()
    cmds = postcopy_commands()
    feed(rp, cmds[: cmds.index((MigCommand.POSTCOPY_LISTEN, b"")) + 1])
    with pytest.raises(ReturnPathError, match="stream ended in postcopy state listening"):
        rp.end_of_stream()
    assert rp.fail() == encode_shut(1)


@pytest.mark.parametrize("data,message", [
    (b"\x01\x06pc.ram\x00" + b"\0" * 16, "version 1, expected 0"),
    (b"\x00\x06pc.ram\x01" + b"\0" * 16, "malformed block name"),
    (b"\x00\x06pc.ram\x00" + b"\0" * 17, "17 bytes of ranges, not a multiple of 16"),
    (b"\x00\x00\x00" + b"\0" * 17, "malformed block name"),
    (b"\x00\x01a\x00", "too short"),
])
def test_ram_discard_malformed(data, message):
    with pytest.raises(ReturnPathError, match=message):
        decode_ram_discard(data)


def test_ram_discard_and_advise_decode():
    assert decode_ram_discard(DISCARD[1]) == ("pc.ram", [(0, 4096), (1 << 20, 8192)])
    assert decode_advise(b"") is None
    assert decode_advise(ADVISE[1]) == (4096, 4096)


# -- the codec --------------------------------------------------------------------------------------

ALL = (encode_switchover_ack() + encode_pong(7) + encode_req_pages(0x1000, 4096, "pc.ram")
       + encode_req_pages(0x3000, 4096) + b"\x00\x05\x00\x07\x06pc.ram"
       + struct.pack(">Q", 16) + bytes(range(16)) + struct.pack(">Q", 0x0123456789ABCDEF)
       + encode_resume_ack() + encode_shut(0))
ALL_MESSAGES = [SwitchoverAck(), Pong(7), ReqPages(0x1000, 4096, "pc.ram"), ReqPages(0x3000, 4096),
                RecvBitmap("pc.ram", bytes(range(16))), ResumeAck(1), Shut(0)]


def test_reader_whole():
    assert read_all(ALL) == ALL_MESSAGES


def test_reader_byte_by_byte():
    assert read_all(ALL, 1) == ALL_MESSAGES


def test_reader_trailing_bytes_wait_then_fail_at_close():
    reader = ReturnPathReader()
    reader.feed(QEMU_PRECOPY + b"\x00\x02\x00")
    assert [reader.next_message(), reader.next_message(), reader.next_message()] == [
        Pong(1), Shut(0), NEED_DATA]
    assert reader.buffered == 3 and reader.offset == 16
    with pytest.raises(ReturnPathError, match="return path offset 16: return path ends 3 bytes into a message"):
        reader.close()


@pytest.mark.parametrize("data,message", [
    (b"\x00\x00\x00\x00", "return path offset 8: invalid message type 0x0000 (length 0x0000)"),
    (b"\x00\x08\x00\x00", "invalid message type 0x0008"),
    (b"\x00\x02\x00\x05" + b"\0" * 5, "PONG message with length 5, expected 4"),
    (b"\x00\x07\x00\x01\x00", "SWITCHOVER_ACK message with length 1, expected 0"),
    (b"\x00\x03\x02\x01", "REQ_PAGES_ID message with length 513, expected at most 512"),
    (b"\x00\x03\x00\x0e" + b"\0" * 12 + b"\x05a", "REQ_PAGES_ID with length 14, its block name says 18"),
    (b"\x00\x05\x00\x03\x01ab", "RECV_BITMAP with length 3, its block name says 2"),
    (b"\x00\x05\x00\x02\x01a" + struct.pack(">Q", 8) + b"\0" * 8 + struct.pack(">Q", 1),
     "end mark 0x0000000000000001"),
    (b"\x00\x05\x00\x02\x01a" + struct.pack(">Q", 1 << 40), "bitmap of 1099511627776 bytes"),
])
def test_reader_refuses_what_the_source_refuses(data, message):
    reader = ReturnPathReader()
    reader.feed(encode_pong(1) + data)
    assert reader.next_message() == Pong(1)
    with pytest.raises(ReturnPathError, match=message.replace("(", r"\(").replace(")", r"\)")):
        reader.next_message()
    with pytest.raises(ReturnPathError):  # and again
        reader.next_message()


def test_encoders_refuse_what_the_source_could_not_take():
    with pytest.raises(ValueError):
        encode_req_pages(0, 4096, "x" * 256)
    assert len(encode_req_pages(0, 4096, "x" * 255)) == 4 + 13 + 255 <= 4 + MAX_MESSAGE_DATA


# -- hypothesis -------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=700), st.lists(st.sampled_from(
    [encode_pong(3), encode_shut(1), b"\x00\x05\x00\x02\x01a", struct.pack(">Q", 8), b"\x00",
     b"\x00\x03\x00\x10", b"\xff"]), max_size=20).map(b"".join)), piece=st.integers(1, 64))
def test_reader_fuzz_bounded_and_only_its_errors(data, piece):
    reader = ReturnPathReader(max_bitmap_bytes=64)
    try:
        for i in range(0, len(data), piece):
            reader.feed(data[i : i + piece])
            for _ in range(len(data) + 2):
                if reader.next_message() is NEED_DATA:
                    break
            else:
                raise AssertionError("next_message() did not settle")
            assert reader.buffered <= 4 + MAX_MESSAGE_DATA + 16 + 64 + piece
        reader.close()
    except ReturnPathError:
        pass


COMMAND_CHOICES = ([(c, b"") for c in MigCommand] + [ping(9), ADVISE, DISCARD,
                   (MigCommand.PACKAGED, struct.pack(">I", 10)), (MigCommand.RECV_BITMAP, b"\x01a"),
                   (MigCommand.POSTCOPY_ADVISE, b"\0" * 16), (99, b"")])


@settings(max_examples=400, deadline=None)
@given(cmds=st.lists(st.sampled_from(COMMAND_CHOICES), max_size=25), end=st.booleans(),
       swack=st.booleans())
def test_state_fuzz_output_is_always_well_formed(cmds, end, swack):
    rp = DestinationReturnPath(switchover_ack=swack, target_page_size=4096)
    out = b""
    failed = False
    for c, d in cmds:
        try:
            out += rp.command(c, d)
        except ReturnPathError:
            failed = True
            break
    if failed:
        out += rp.fail()
    elif end:
        try:
            out += rp.end_of_stream()
        except ReturnPathError:
            out += rp.fail()
    msgs = read_all(out)
    shuts = [m for m in msgs if isinstance(m, Shut)]
    assert len(shuts) <= 1 and (not shuts or msgs[-1] is shuts[0])
    if shuts:
        assert shuts[0].status == (1 if rp.status == "failed" else 0)
    assert sum(isinstance(m, SwitchoverAck) for m in msgs) <= (1 if swack else 0)
    assert all(isinstance(m, Pong | Shut | SwitchoverAck) for m in msgs)
