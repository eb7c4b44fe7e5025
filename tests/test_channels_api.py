"""The rest of the Channel API: fd passing, scripted error paths, watches, addresses, files."""

from __future__ import annotations

import os
import socket
import threading

import gevent
import pytest

from qioc_green import (
    BrokenChannelError,
    ChannelClosedError,
    ChannelError,
    Feature,
    FileChannel,
    IOCondition,
    IOThread,
    IOThreadPool,
    NotSupportedError,
    ReadFlag,
    SocketChannel,
    UnexpectedEOF,
    WouldBlock,
    WriteFlag,
    current_context,
    parse_address,
)
from qioc_green.channel_buffer import BufferChannel
from qioc_green.testing import ScriptedChannel
from tests.polling import wait_until

# -- fd passing ----------------------------------------------------------------------------------


def _tmpfiles(tmp_path, n):
    fds = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(f"file {i}".encode())
        fds.append(os.open(p, os.O_RDONLY))
    return fds


def test_three_fds_in_one_message_arrive_distinct_and_usable(tmp_path):
    a, b = SocketChannel.socketpair()
    sent = _tmpfiles(tmp_path, 3)
    try:
        with a, b:
            assert a.has_feature(Feature.FD_PASS)
            a.writev_full_all([b"hdr!"], fds=sent)
            buf = bytearray(4)
            fds = b.readv_full_all([buf], max_fds=16)
            assert buf == b"hdr!"
            assert len(fds) == 3
            assert not set(fds) & set(sent)
            for i, fd in enumerate(fds):
                assert os.pread(fd, 100, 0) == f"file {i}".encode()
                assert os.get_inheritable(fd) is False  # received with MSG_CMSG_CLOEXEC
                os.close(fd)
    finally:
        for fd in sent:
            os.close(fd)


def test_fds_received_by_a_split_all_read_are_kept(tmp_path):
    a, b = SocketChannel.socketpair()
    sent = _tmpfiles(tmp_path, 2)
    try:
        with a, b:
            b.set_follow_coroutine_ctx(True)
            out = {}

            def read():
                out["fds"] = b.readv_full_all([bytearray(8), bytearray(8)], max_fds=4)

            g = gevent.spawn(read)
            a.writev_full_all([b"12345"], fds=sent)  # the fds ride on the first part
            gevent.sleep(0)
            a.write_all(b"67890abcdef")
            g.get(timeout=5)
            assert len(out["fds"]) == 2
            for fd in out["fds"]:
                os.close(fd)
    finally:
        for fd in sent:
            os.close(fd)


def test_fds_without_fd_pass_is_not_supported():
    lst = SocketChannel.listen("tcp:127.0.0.1:0")
    with lst:
        assert not lst.has_feature(Feature.FD_PASS)
        with pytest.raises(NotSupportedError, match="file descriptor passing"):
            lst.readv_full_all([bytearray(1)], max_fds=1)
        with pytest.raises(NotSupportedError):
            lst.writev_full_all([b"x"], fds=[0])
    r, w = FileChannel.pipe()
    with r, w:
        with pytest.raises(NotSupportedError):
            r.readv_full([bytearray(1)], max_fds=1)


# -- scripted short reads and writes, EINTR, EOF mid-message -------------------------------------

ALL_READS = {
    "read_all": lambda ch: ch.read_all(10),
    "readinto_all": lambda ch: ch.readinto_all(bytearray(10)),
    "readv_all": lambda ch: ch.readv_all([bytearray(4), bytearray(6)]),
    "readv_full_all": lambda ch: ch.readv_full_all([bytearray(4), bytearray(6)]),
    "read_all_eof": lambda ch: ch.read_all_eof(10),
    "readv_all_eof": lambda ch: ch.readv_all_eof([bytearray(3), bytearray(7)]),
}


@pytest.mark.parametrize("call", ALL_READS, ids=list(ALL_READS))
def test_all_reads_survive_short_reads_eagain_and_eintr(call):
    ch = ScriptedChannel(reads=[b"01", "eagain", b"2", "eintr", b"345", "eagain", "eintr", b"6789"])
    result = ALL_READS[call](ch)
    if call in ("read_all", "read_all_eof"):
        assert result == b"0123456789"
    assert ch.reads == []  # consumed exactly the ten bytes


@pytest.mark.parametrize("call", ALL_READS, ids=list(ALL_READS))
def test_all_reads_eof_mid_message_carries_partial_progress(call):
    ch = ScriptedChannel(reads=[b"abc", "eagain", b"de", "eof"])
    with pytest.raises(UnexpectedEOF) as info:
        ALL_READS[call](ch)
    exc = info.value
    assert exc.partial == b"abcde" and exc.done == 5 and exc.expected == 10
    assert "after 5 of 10 bytes" in str(exc)
    assert isinstance(exc, EOFError) and isinstance(exc, BrokenChannelError)


@pytest.mark.parametrize("call", ALL_READS, ids=list(ALL_READS))
def test_all_reads_clean_eof_before_any_byte(call):
    ch = ScriptedChannel(reads=["eagain", "eof"])
    if call in ("read_all_eof",):
        assert ALL_READS[call](ch) is None
    elif call == "readv_all_eof":
        assert ALL_READS[call](ch) is False
    else:
        with pytest.raises(UnexpectedEOF, match="before any of 10 bytes"):
            ALL_READS[call](ch)


ALL_WRITES = {
    "write_all": lambda ch: ch.write_all(b"0123456789"),
    "writev_all": lambda ch: ch.writev_all([b"0123", b"456789"]),
    "writev_full_all": lambda ch: ch.writev_full_all([b"01", b"23456", b"789"]),
}


@pytest.mark.parametrize("call", ALL_WRITES, ids=list(ALL_WRITES))
def test_all_writes_survive_short_writes_eagain_and_eintr(call):
    ch = ScriptedChannel(writes=[3, "eagain", 1, "eintr", 2, "eagain", 0, 100])
    ALL_WRITES[call](ch)
    assert bytes(ch.written) == b"0123456789"


@pytest.mark.parametrize("call", ALL_WRITES, ids=list(ALL_WRITES))
def test_all_writes_broken_midway_carry_partial_progress(call):
    ch = ScriptedChannel(writes=[4, "eagain", 2, ConnectionResetError(104, "reset")])
    with pytest.raises(BrokenChannelError) as info:
        ALL_WRITES[call](ch)
    exc = info.value
    assert exc.done == 6 and exc.expected == 10
    assert "after 6 of 10 bytes" in str(exc) and "reset" in str(exc)
    assert isinstance(exc.__cause__, ConnectionResetError)
    assert isinstance(exc, ConnectionError)


def test_nonblocking_mode_raises_would_block_with_progress():
    ch = ScriptedChannel(reads=[b"ab", "eagain"])
    ch.set_blocking(False)
    with pytest.raises(WouldBlock) as info:
        ch.read_all(5)
    assert info.value.done == 2 and isinstance(info.value, BlockingIOError)
    a, b = SocketChannel.socketpair()
    with a, b:
        b.set_blocking(False)
        with pytest.raises(WouldBlock, match="read would block"):
            b.read(1)


# -- peeking, waiting, watches ---------------------------------------------------------------------


def test_msg_peek_leaves_data_in_place():
    a, b = SocketChannel.socketpair()
    with a, b:
        a.write_all(b"peekaboo")
        buf = bytearray(4)
        assert b.readinto(buf, flags=ReadFlag.MSG_PEEK) == 4 and buf == b"peek"
        assert b.read_all(8) == b"peekaboo"


def test_wait_blocks_the_thread_and_close_wakes_it():
    a, b = SocketChannel.socketpair()
    with a:
        a.write_all(b"x")
        b.wait(IOCondition.IN, timeout=5)  # ready at once
        assert b.read(1) == b"x"
        with pytest.raises(TimeoutError):
            b.wait(IOCondition.IN, timeout=0.01)
        result = []

        def waiter():
            try:
                b.wait(IOCondition.IN, timeout=10)
            except ChannelClosedError as exc:
                result.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        assert wait_until(lambda: b.statistics().holds == 2)  # the channel's own and the wait's
        b.close()
        t.join(5)
        assert result and isinstance(result[0], ChannelClosedError)


def test_add_watch_runs_in_the_given_context_until_false():
    a, b = SocketChannel.socketpair()
    with a, b, IOThread("watcher") as t:
        calls = []
        done = threading.Event()

        def cb(ch, cond):
            calls.append((threading.current_thread().name, cond, ch.read(100)))
            if len(calls) == 2:
                done.set()
                return False
            return True

        b.add_watch(IOCondition.IN, cb, context=t.context)
        a.write_all(b"one")
        assert wait_until(lambda: len(calls) == 1)
        a.write_all(b"two")
        assert done.wait(5)
        assert [c[0] for c in calls] == ["watcher", "watcher"]
        assert [c[2] for c in calls] == [b"one", b"two"]
        assert wait_until(lambda: b.statistics().holds == 1)


def test_add_watch_cancel_from_another_thread_and_on_close():
    a, b = SocketChannel.socketpair()
    with a, IOThread("w") as t:
        w = b.add_watch(IOCondition.IN, lambda ch, c: True, context=t.context)
        th = threading.Thread(target=w.cancel)
        th.start()
        th.join(5)
        assert wait_until(lambda: b.statistics().holds == 1)
        b.add_watch(IOCondition.OUT, lambda ch, c: True, context=t.context)
        b.close()  # cancels it; the fd is closed once the watcher is gone


def test_buffer_channel_watch_is_always_ready():
    ch = BufferChannel(b"data")
    seen = []
    ev = gevent.event.Event()

    def cb(c, cond):
        seen.append(cond)
        if len(seen) == 3:
            ev.set()
            return False
        return True

    ch.add_watch(IOCondition.IN, cb)
    assert ev.wait(5)
    assert seen == [IOCondition.IN] * 3
    ch.close()


# -- sockets and addresses -------------------------------------------------------------------------


@pytest.mark.parametrize("text,kind", [
    ("tcp:127.0.0.1:80", "tcp"), ("tcp:[::1]:8080", "tcp"), ("tcp::0", "tcp"),
    ("unix:/tmp/x.sock", "unix"), ("fd:3", "fd"), ("vsock:2:1024", "vsock"),
])
def test_parse_address_forms(text, kind):
    sa = parse_address(text)
    assert sa.kind == kind
    assert parse_address(str(sa)) == sa


@pytest.mark.parametrize("bad", ["127.0.0.1:80", "tcp:host", "tcp:h:port", "tcp:h:70000", "unix:", "fd:x", "udp:1:2"])
def test_parse_address_rejects_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="address"):
        parse_address(bad)


def _roundtrip(listen_addr):
    lst = SocketChannel.listen(listen_addr)
    lst.set_follow_coroutine_ctx(True)
    with lst:
        g = gevent.spawn(lst.accept, timeout=5)
        client = SocketChannel.connect(lst.local_address, timeout=5)
        server = g.get(timeout=5)
        with client, server:
            client.write_all(b"ping")
            assert server.read_all(4) == b"ping"
            assert server.remote_address == client.local_address
            return client.remote_address


def test_tcp_ipv4_connect_listen_accept():
    assert _roundtrip("tcp:127.0.0.1:0").startswith("tcp:127.0.0.1:")


def test_tcp_ipv6_connect_listen_accept():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        socket.socket(socket.AF_INET6).close()
        assert _roundtrip("tcp:[::1]:0").startswith("tcp:[::1]:")
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")


def test_unix_listen_unlinks_its_path_on_close(tmp_path):
    path = tmp_path / "s.sock"
    assert _roundtrip(f"unix:{path}") == f"unix:{path}"
    assert not path.exists()


def test_fd_address_takes_an_inherited_listening_socket():
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen()
    port = raw.getsockname()[1]
    lst = SocketChannel.listen(f"fd:{raw.detach()}")
    with lst:
        assert lst.has_feature(Feature.LISTEN) and lst.local_port == port


def test_connect_refused_names_the_address():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(BrokenChannelError, match=f"127.0.0.1:{port}.*refused"):
        SocketChannel.connect(f"tcp:127.0.0.1:{port}", timeout=5)


def test_zero_copy_write_and_flush_over_tcp():
    lst = SocketChannel.listen("tcp:127.0.0.1:0")
    with lst:
        client = SocketChannel.connect(lst.local_address, timeout=5)
        server = lst.accept(timeout=5)
        with client, server:
            if not client.set_zero_copy(True):
                pytest.skip("the kernel refuses SO_ZEROCOPY")
            data = os.urandom(256 * 1024)
            g = gevent.spawn(server.read_all, len(data))
            client.writev_full_all([data], flags=WriteFlag.ZERO_COPY)
            client.flush()
            assert g.get(timeout=10) == data


# -- files -----------------------------------------------------------------------------------------


def test_file_channel_positional_io_and_errors(tmp_path):
    with pytest.raises(BrokenChannelError, match="nope.*open failed"):
        FileChannel.open(tmp_path / "nope")
    with FileChannel.open(tmp_path / "f", "w+") as ch:
        assert ch.has_feature(Feature.SEEKABLE)
        ch.pwritev([b"hello", b"world"], 100)
        buf = bytearray(10)
        assert ch.preadv([buf], 100) == 10 and buf == b"helloworld"
        assert ch.position == 0
        assert ch.seek(0, os.SEEK_END) == 110
    r, w = FileChannel.pipe()
    with r, w:
        with pytest.raises(NotSupportedError, match="not seekable"):
            r.seek(0)
        with pytest.raises(NotSupportedError):
            r.preadv([bytearray(1)], 0)


# -- contexts and errors ---------------------------------------------------------------------------


def test_spawn_and_call_propagate_results_and_exceptions():
    with IOThreadPool(2) as pool:
        ctxs = pool.contexts
        assert [pool.next_context() for _ in range(4)] == ctxs + ctxs
        assert ctxs[0].call(lambda x: x * 2, 21) == 42
        with pytest.raises(ZeroDivisionError):
            ctxs[1].call(lambda: 1 / 0)
        fut = ctxs[0].spawn(lambda: threading.current_thread().name)
        assert fut.result(5) == pool.threads[0].name and fut.done() and fut.exception() is None


def test_schedule_from_many_threads_keeps_each_senders_order():
    with IOThread("sink") as t:
        got: list[tuple[int, int]] = []
        senders = [threading.Thread(target=lambda k=k: [t.context.schedule(got.append, (k, i)) for i in range(500)])
                   for k in range(4)]
        for s in senders:
            s.start()
        for s in senders:
            s.join()
        t.context.call(lambda: None)  # everything scheduled before this has run
        assert len(got) == 2000
        for k in range(4):
            assert [i for kk, i in got if kk == k] == list(range(500))


def test_error_tree_keeps_stdlib_bases():
    from qioc_green import ChannelBusyError, ContextStoppedError

    assert issubclass(BrokenChannelError, ConnectionError)
    assert issubclass(UnexpectedEOF, EOFError)
    assert issubclass(WouldBlock, BlockingIOError)
    for cls in (ChannelClosedError, BrokenChannelError, UnexpectedEOF, WouldBlock, NotSupportedError,
                ChannelBusyError, ContextStoppedError):
        assert issubclass(cls, ChannelError)


def test_repr_shows_name_and_state():
    a, b = SocketChannel.socketpair(name="pair")
    a.set_follow_coroutine_ctx(True)
    assert repr(a) == "<SocketChannel pair-a open follow>"
    a.close()
    b.close()
    assert "closed" in repr(a)
    assert current_context().name
