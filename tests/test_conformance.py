"""Every channel kind runs the one conformance routine, in three placements, blocking and not."""

from __future__ import annotations

import socket

import pytest

from qioc_green import BufferChannel, CommandChannel, FileChannel, NullChannel, Shutdown, SocketChannel
from qioc_green.testing import BUFLEN, NBUFFERS, pattern_buffers, run_pattern
from tests.peers import need

PLACEMENTS = ["one-hub", "two-iothreads", "iohandler"]
BLOCKING = [True, False]


def _tcp_pair():
    lst = SocketChannel.listen("tcp:127.0.0.1:0")
    try:
        port = lst.local_port
        raw = socket.create_connection(("127.0.0.1", port))
        client = SocketChannel.from_socket(raw)
        lst.set_follow_coroutine_ctx(True)
        server = lst.accept(timeout=5)
    finally:
        lst.close()
    return client, server


def _unix_pair():
    return SocketChannel.socketpair()


def _pipe_pair():
    r, w = FileChannel.pipe()
    return w, r


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("blocking", BLOCKING, ids=["blocking", "nonblocking"])
@pytest.mark.parametrize("make", [_unix_pair, _tcp_pair, _pipe_pair], ids=["unix", "tcp", "pipe"])
def test_pattern_through_pair(make, blocking, placement):
    writer, reader = make()
    with writer, reader:
        run_pattern(writer, reader, blocking=blocking, placement=placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("blocking", BLOCKING, ids=["blocking", "nonblocking"])
@pytest.mark.parametrize("argv", [["cat"], ["socat", "-", "-"]], ids=["cat", "socat"])
def test_pattern_through_command(argv, blocking, placement):
    need(argv[0])
    ch = CommandChannel.spawn(argv)
    with ch:
        # One channel, both directions: the writer and reader greenlets share it.
        run_pattern(ch, ch, blocking=blocking, placement=placement,
                    after_write=lambda c: c.shutdown(Shutdown.WRITE))
        ch.set_blocking(True)
        assert ch.read(1) == b""  # the child saw EOF on stdin and closed its stdout
    assert ch.returncode == 0


def test_command_close_reaps_a_child_that_ignores_eof():
    ch = CommandChannel.spawn(["sleep", "30"], mode="r", grace=0.2)
    ch.close()
    assert ch.returncode is not None and ch.returncode < 0  # terminated by a signal


@pytest.mark.parametrize("blocking", BLOCKING, ids=["blocking", "nonblocking"])
def test_pattern_through_regular_file(tmp_path, blocking):
    path = tmp_path / "f"
    with FileChannel.open(path, "w+") as ch:
        ch.set_blocking(blocking)
        ch.writev_all(pattern_buffers())
        assert ch.seek(0) == 0
        dst = [bytearray(BUFLEN) for _ in range(NBUFFERS)]
        ch.readv_all(dst)
        assert [bytes(d) for d in dst] == pattern_buffers()
        assert ch.read(10) == b""  # at the end
    assert path.stat().st_size == NBUFFERS * BUFLEN


def test_buffer_channel_as_in_qemu():
    # QEMU's test-io-channel-buffer: write the pattern, rewind, read it back, then EOF.
    ch = BufferChannel()
    ch.writev_all(pattern_buffers())
    assert len(ch) == NBUFFERS * BUFLEN
    ch.seek(0)
    dst = [bytearray(BUFLEN) for _ in range(NBUFFERS)]
    ch.readv_all(dst)
    assert [bytes(d) for d in dst] == pattern_buffers()
    assert ch.read_all_eof(1) is None
    ch.seek(2)
    ch.write_all(b"XY")
    assert ch.getvalue()[:5] == b"\x00\x00XY\x00"
    ch.seek(10, 2)  # past the end: the next write pads with zeros
    ch.write(b"!")
    assert len(ch) == NBUFFERS * BUFLEN + 11
    ch.close()


def test_null_channel_as_in_qemu():
    ch = NullChannel()
    ch.writev_all(pattern_buffers())
    assert ch.write(b"abc") == 3
    assert ch.read(10) == b""
    assert ch.read_all_eof(10) is None
    assert not ch.has_feature(ch.features.SEEKABLE)
    ch.close()
