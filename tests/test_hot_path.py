"""The optional compiled hot path (``qioc_green._speedups``) and the pure-Python one.

The whole suite runs both ways (``make test``: once with the compiled module, once with
``QIOC_PURE_PYTHON=1``); these tests check the switch itself, the module's calls where it is
built (return codes for "would block", errors, fd passing, short and long transfers), and that
a machine without a compiler installs and runs pure Python, saying so in one line.
"""

from __future__ import annotations

import array
import errno
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig

import pytest

import qioc_green
from qioc_green import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sp = _native.speedups
needs_speedups = pytest.mark.skipif(sp is None, reason="the compiled hot path is not active here")


def test_which_path_is_active_follows_the_environment():
    pure = os.environ.get("QIOC_PURE_PYTHON", "") not in ("", "0")
    assert qioc_green.SPEEDUPS is (sp is not None)
    if pure:
        assert not qioc_green.SPEEDUPS
        assert qioc_green.hot_path() == "pure Python: QIOC_PURE_PYTHON is set"
    if os.environ.get("QIOC_REQUIRE_SPEEDUPS") == "1":  # make test's first pass: it must be built
        assert qioc_green.SPEEDUPS, (f"{qioc_green.hot_path()}: install gcc and the Python headers "
                                     "(Debian: python3-dev) and reinstall, or set QIOC_REQUIRE_SPEEDUPS=0")
    if qioc_green.SPEEDUPS:
        assert qioc_green.hot_path() == "compiled (qioc_green._speedups)"


def test_the_switch_is_read_at_import():
    code = "import qioc_green; print(qioc_green.SPEEDUPS, qioc_green.hot_path())"
    env = dict(os.environ, QIOC_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False pure Python: QIOC_PURE_PYTHON is set", out.stderr
    env["QIOC_PURE_PYTHON"] = "0"  # "0" means not set
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    built = importlib.util.find_spec("qioc_green._speedups") is not None
    assert out.stdout.split()[0] == str(built)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@needs_speedups
def test_would_block_is_a_return_code_not_an_exception(pair):
    a, b = pair
    assert sp.recv(a.fileno(), 100, 0) is None
    assert sp.recv_into(a.fileno(), bytearray(10), 0) == -1
    assert sp.recvmsg(a.fileno(), [bytearray(4), bytearray(4)], 2, 0) is None
    # Fill b's send buffer: send then reports -1, sendmsg too.
    chunk = b"x" * 65536
    while sp.send(b.fileno(), chunk) != -1:
        pass
    assert sp.sendmsg(b.fileno(), [b"y"], [], 0) == -1


@needs_speedups
@pytest.mark.parametrize("size", [1, 64, 8191, 8192, 8193, 65536, 65537, 300_000])
def test_recv_and_recv_into_take_what_is_there_up_to_n(pair, size):
    a, b = pair
    data = os.urandom(size)
    sent = 0
    got = bytearray()
    while len(got) < size:
        if sent < size:
            n = sp.send(b.fileno(), memoryview(data)[sent:])
            sent += max(n, 0)
        piece = sp.recv(a.fileno(), size - len(got), 0)
        if piece is not None:
            assert 0 < len(piece) <= size - len(got)
            got += piece
    assert bytes(got) == data
    # recv_into: the same bytes land in the caller's buffer
    buf = bytearray(size + 10)
    sent = 0
    while sent < size:
        sent += max(sp.send(b.fileno(), memoryview(data)[sent:]), 0)
        total = 0
        while True:
            n = sp.recv_into(a.fileno(), memoryview(buf)[total:], 0)
            if n <= 0:
                break
            total += n
        assert bytes(buf[:total]) == data[: total]
        data = data[total:]
        size -= total
        sent -= total


@needs_speedups
def test_peek_leaves_the_bytes(pair):
    a, b = pair
    sp.send(b.fileno(), b"hello")
    assert sp.recv(a.fileno(), 10, socket.MSG_PEEK) == b"hello"
    assert sp.recv(a.fileno(), 10, 0) == b"hello"


@needs_speedups
def test_eof_and_errors(pair):
    a, b = pair
    b.shutdown(socket.SHUT_WR)
    assert sp.recv(a.fileno(), 10, 0) == b""
    assert sp.recv_into(a.fileno(), bytearray(10), 0) == 0
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(OSError) as info:
            sp.recv(r, 10, 0)  # not a socket
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
    with pytest.raises(OSError) as info:
        sp.send(a.fileno() + 1000, b"x")
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        sp.recv(-1, 10, 0)
    with pytest.raises(ValueError):
        sp.recv(a.fileno(), -1, 0)
    with pytest.raises(BufferError):
        sp.recv_into(a.fileno(), b"read-only", 0)


@needs_speedups
def test_a_peer_gone_raises_its_errno(pair):
    a, b = pair
    a.close()
    with pytest.raises(BrokenPipeError):
        sp.send(b.fileno(), b"x")  # MSG_NOSIGNAL: an error, never SIGPIPE


@needs_speedups
def test_readv_writev_and_fds_travel(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        assert sp.sendmsg(b.fileno(), [b"ab", b"cd", b"ef"], [r, w], 0) == 6
        bufs = [bytearray(3), bytearray(5)]
        n, fds = sp.recvmsg(a.fileno(), bufs, 4, 0)
        assert n == 6 and bytes(bufs[0]) == b"abc" and bytes(bufs[1][:3]) == b"def"
        assert len(fds) == 2
        for fd in fds:
            assert os.get_inheritable(fd) is False  # close-on-exec, as QEMU asks
        os.write(fds[1], b"!")
        assert os.read(r, 1) == b"!"
        for fd in fds:
            os.close(fd)
        # more fds than there is room for: the kernel closes the rest, what fits is returned
        # (the room is CMSG_SPACE(4), rounded up to two ints), and nothing leaks
        sp.sendmsg(b.fileno(), [b"z"], [r, w, r], 0)
        n, fds = sp.recvmsg(a.fileno(), [bytearray(1)], 1, 0)
        assert n == 1 and 1 <= len(fds) < 3
        for fd in fds:
            os.close(fd)
        with pytest.raises(ValueError):
            sp.sendmsg(b.fileno(), [b"z"], [r] * 17, 0)
    finally:
        os.close(r)
        os.close(w)


@needs_speedups
def test_many_buffers_are_a_partial_transfer(pair):
    a, b = pair
    bufs = [bytes([i]) for i in range(100)]
    n = sp.sendmsg(b.fileno(), bufs, [], 0)
    assert 0 < n <= 100
    got = array.array("B", bytes(100))
    m, _ = sp.recvmsg(a.fileno(), [memoryview(got)[i:i + 1] for i in range(100)], 0, 0)
    assert m == n and list(got[:n]) == list(range(n))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_a_compiler_it_installs_pure_python_and_says_so(tmp_path):
    """``CC=false pip install .`` into a fresh venv: the install succeeds, prints one line saying
    the compiled hot path did not build, ships no extension, and runs on the pure path."""
    # A copy of the source without what a build here left (pip builds in the tree: an up-to-date
    # build/ would skip the compiler altogether).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".*_cache", ".hypothesis", "out"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "QIOC_PURE_PYTHON")}
    env["CC"] = "false"
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-v", "--no-deps", "--disable-pip-version-check",
                          str(src)], capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    said = [line for line in (pip.stdout + pip.stderr).splitlines()
            if "qioc_green: the compiled hot path (_speedups) did not build" in line]
    assert len(said) == 1, pip.stdout[-3000:] + pip.stderr[-3000:]
    assert said[0].rstrip().endswith("installing pure Python")
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert not [p for p in os.listdir(os.path.join(site, "qioc_green")) if p.startswith("_speedups")]
    # gevent and the rest from this interpreter's site-packages, after the venv's own
    with open(os.path.join(site, "zz-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import qioc_green as q; print(q.SPEEDUPS); print(q.hot_path()); "
            "a, b = q.SocketChannel.socketpair(); a.write_all(b'ping'); print(b.read_all(4))")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={k: v for k, v in env.items() if k != "CC"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "False"
    assert lines[1].startswith("pure Python: the compiled module is not built")
    assert lines[2] == "b'ping'"
