"""What a hostile review of the compiled hot path (``qioc_green/_speedups.c``) found, each as a
test that runs on both paths where the behaviour is the channel's (``make test`` runs it with
the compiled module and with ``QIOC_PURE_PYTHON=1``: the two must agree), and on the module's
own calls where only the compiled path has the case.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from qioc_green import BrokenChannelError, SocketChannel, _native
from tests.polling import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sp = _native.speedups
needs_speedups = pytest.mark.skipif(sp is None, reason="the compiled hot path is not active here")


def _reset_after(size: int, kind: str) -> tuple[SocketChannel, socket.socket | None]:
    """A channel whose peer sent ``size`` bytes and then reset the connection (closed it with
    bytes of ours unread: ECONNRESET once the data is read).  Returns the channel."""
    if kind == "unix":
        a, b = SocketChannel.socketpair()
        a.write_all(b"never read")  # unread by b: its close resets a
        b.write_all(b"x" * size)
        b.close()
        return a, None
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.sendall(b"x" * size)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    # the data is in client's queue once it polls readable; the RST once it polls HUP/ERR
    assert wait_until(lambda: len(client.recv(size + 1, socket.MSG_PEEK)) == size if select.select(
        [client], [], [], 0)[0] else False)
    server.close()
    p = select.poll()
    p.register(client, select.POLLIN)
    assert wait_until(lambda: any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0)))
    return SocketChannel.from_socket(client), None


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("size", [8192, 8193, 65536])
def test_a_reset_right_after_data_gives_the_data_then_the_reset(kind, size):
    """The compiled read took 8 KiB, then tried for more, met the reset and raised it: the
    8 KiB were lost and the next read saw a clean EOF.  The pure path returns the data, then
    raises the reset; both must."""
    ch, _ = _reset_after(size, kind)
    try:
        got = ch.read(65536)
        while len(got) < size:  # TCP may hand the bytes over in more than one read
            more = ch.read(65536)
            assert more, f"EOF after {len(got)} of {size} bytes"
            got += more
        assert got == b"x" * size
        with pytest.raises(BrokenChannelError, match="reset"):
            ch.read(65536)
    finally:
        ch.close()


@needs_speedups
@pytest.mark.parametrize("n, size", [(65536, 8192), (73728, 8192), (200_000, 65536), (200_000, 65536 + 8192)])
def test_the_module_calls_never_trade_data_for_a_reset(n, size):
    for call in ("recv", "recv_into"):
        a, b = socket.socketpair()
        try:
            a.setblocking(False)
            a.send(b"never read")
            b.sendall(b"x" * size)
            b.close()
            got = bytearray()
            while len(got) < size:
                if call == "recv":
                    piece = sp.recv(a.fileno(), n, 0)
                else:
                    buf = bytearray(n)
                    k = sp.recv_into(a.fileno(), buf, 0)
                    piece = bytes(buf[:k])
                assert piece, f"{call}: EOF after {len(got)} of {size}"
                got += piece
            assert len(got) == size
            with pytest.raises(ConnectionResetError):
                sp.recv(a.fileno(), n, 0)
        finally:
            a.close()


@needs_speedups
def test_a_read_size_too_large_to_allocate_loses_no_bytes():
    """recv(fd, n) read 8 KiB into its stack buffer, then failed to allocate n bytes and
    raised MemoryError: the 8 KiB were gone.  socket.recv allocates before it reads."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.sendall(b"z" * 9000)
        got = b""
        try:
            got = sp.recv(a.fileno(), 1 << 50, 0)
        except MemoryError:
            pass
        while len(got) < 9000:
            piece = sp.recv(a.fileno(), 65536, 0)
            assert piece, f"{len(got)} of 9000 bytes came back"
            got += piece
        assert got == b"z" * 9000
    finally:
        a.close()
        b.close()


def test_read_only_buffers_are_a_type_error_and_consume_nothing():
    """The compiled path raised BufferError where the pure one raises TypeError."""
    a, b = SocketChannel.socketpair()
    try:
        b.write_all(b"hello")
        with pytest.raises(TypeError, match="writable"):
            a.readinto(b"xxxxx")
        with pytest.raises(TypeError, match="writable"):
            a.readv([bytearray(1), b"xxxx"])
        with pytest.raises(TypeError, match="writable"):
            a.readv_full([memoryview(bytearray(2)).toreadonly()], max_fds=1)
        with pytest.raises(TypeError, match="writable"):
            a.readinto_all(b"xxxxx")
        assert a.read(5) == b"hello"
    finally:
        a.close()
        b.close()


def test_a_negative_fd_to_pass_fails_as_a_closed_one_does():
    """The compiled sendmsg raised a bare ValueError("bad file descriptor") for fd -1; the pure
    path (and the compiled one for a closed fd) fails the write with EBADF.  Nothing is sent."""
    a, b = SocketChannel.socketpair()
    try:
        for bad in (-1, 9999):
            with pytest.raises(BrokenChannelError, match="Bad file descriptor"):
                b.writev_full([b"x"], [bad])
        b.write_all(b"y")
        assert a.read(10) == b"y"
    finally:
        a.close()
        b.close()


_FORK_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import qioc_green as q
    from qioc_green import _native
    sp = _native.speedups
    pool = q.IOThreadPool(2, pin=False)
    ctxs = pool.contexts
    # Fork while a hub waits for the GIL in its loop hook: wake the idle hubs and keep the GIL
    # here (no switch for 1 s) until one waits.  A hub caught elsewhere (mid-batch) gets the
    # GIL back between tries, while this thread waits for each hub to run a callback.
    sys.setswitchinterval(1.0)
    for attempt in range(100):
        for ctx in ctxs:
            ctx.schedule(lambda: None)
        look_until = time.monotonic() + 0.2
        while sp.gil_stats()["hubs_waiting"] == 0 and time.monotonic() < look_until:
            pass
        if sp.gil_stats()["hubs_waiting"]:
            break
        for ctx in ctxs:
            ctx.spawn(lambda: None).result(5)
    waiting = sp.gil_stats()["hubs_waiting"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sys.setswitchinterval(0.005)
            before = sp.gil_stats()
            with q.IOThreadPool(1) as p1:
                for _ in range(50):
                    p1.contexts[0].call(lambda: None)
            after = sp.gil_stats()
            print(json.dumps({"waiting_at_fork": waiting, "handoffs": after["handoffs"] - before["handoffs"]}),
                  flush=True)
            code = 0
        finally:
            os._exit(code)
    sys.setswitchinterval(0.005)
    _, status = os.waitpid(pid, 0)
    pool.stop()
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@needs_speedups
@pytest.mark.timeout(100)
def test_a_forked_child_does_not_wait_for_the_hubs_of_its_parent():
    """A hub blocked taking the GIL at fork() stayed counted as waiting in the child: every loop
    iteration of the child's hubs then waited 2 ms for a hub that no longer exists (a one-hub
    pool in the child took ~4.5 ms per call instead of ~0.05)."""
    out = subprocess.run([sys.executable, "-c", _FORK_CHILD], capture_output=True, text=True, timeout=90,
                         cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "QIOC_PURE_PYTHON"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["waiting_at_fork"] > 0, got  # the case was set up
    assert got["handoffs"] == 0, got  # one hub in the child: nobody to hand the GIL to


@pytest.mark.skipif(shutil.which("gcc") is None or not os.path.exists(
    os.path.join(sysconfig.get_paths()["include"], "Python.h")), reason="gcc and the Python headers are needed")
def test_the_module_compiles_without_warnings(tmp_path):
    include = sysconfig.get_paths()["include"]
    cc = subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-fPIC", "-shared", f"-I{include}",
                         os.path.join(ROOT, "qioc_green", "_speedups.c"), "-o", str(tmp_path / "sp.so")],
                        capture_output=True, text=True, timeout=120)
    assert cc.returncode == 0, cc.stderr[-3000:]


@pytest.mark.parametrize("size", [8193, 20000, 65536])
def test_a_peek_sees_all_that_is_queued_up_to_n(size):
    """The compiled read peeked at most 8 KiB whatever n was and more was queued: a caller that
    peeks until a whole header is there (readable at once, every time) never saw it."""
    from qioc_green import ReadFlag
    a, b = SocketChannel.socketpair()
    try:
        b.write_all(os.urandom(size))
        assert wait_until(lambda: len(a.socket.recv(size + 1, socket.MSG_PEEK)) == size)
        peeked = a.read(65536, flags=ReadFlag.MSG_PEEK)
        assert len(peeked) == size
        assert a.read_all(size) == peeked
    finally:
        a.close()
        b.close()

