"""The NBD server stays bounded whatever a client sends: memory, connections and time.

Each case here cost the server without limit before (issue 13): replies a client never reads
(zero-length WRITEs, refused requests, block status) grew it by hundreds of megabytes, a
slow or silent client held a connection for ever, an unknown export with a long name ended
the connection with an internal error, and idle connections held their last reply's data.
Memory is the server's own count of reply bytes held (``NBDServer.memory_held``) and the RSS
of the process that runs it (``/proc/PID/statm``), before and after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from qioc_green import nbd as p
from qioc_green.nbd import MemoryExport, NBDServer
from tests.nbdutil import InProcessServer, server_proc, unix_uri
from tests.peers import need
from tests.polling import poll_pause, wait_until

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * PAGE


@contextlib.contextmanager
def short_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="qn", dir="/tmp") as d:
        yield d


# -- a raw client ---------------------------------------------------------------------------


def recv_exact(s: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the server closes first."""
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(n - len(out), 1 << 20))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def option(s: socket.socket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option; its replies up to the final one, as (reply type, data)."""
    s.sendall(struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data)
    out = []
    while True:
        hdr = recv_exact(s, 20)
        assert len(hdr) == 20, f"connection closed during option {opt}: {hdr!r}"
        _, got, rep, length = struct.unpack(">QIII", hdr)
        assert got == opt
        out.append((rep, recv_exact(s, length)))
        if rep == p.Rep.ACK or rep & (1 << 31):
            return out


def name_data(name: str, *tail: bytes) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + b"".join(tail)


def connect(sock: str, *, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(20)
    s.connect(sock)
    return s


def greet(s: socket.socket) -> None:
    assert len(recv_exact(s, 18)) == 18
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES


def go(s: socket.socket, export: str, *, meta: bool = False) -> None:
    greet(s)
    if meta:
        assert option(s, p.Opt.STRUCTURED_REPLY)[-1][0] == p.Rep.ACK
        query = p.BASE_ALLOCATION.encode()
        data = name_data(export, struct.pack(">II", 1, len(query)), query)
        assert option(s, p.Opt.SET_META_CONTEXT, data)[-1][0] == p.Rep.ACK
    assert option(s, p.Opt.GO, name_data(export, struct.pack(">H", 0)))[-1][0] == p.Rep.ACK


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, cmd, cookie, offset, length)


def pipeline(s: socket.socket, reqs: bytes, seconds: float, stall: float = 0.5) -> int:
    """Send ``reqs`` without reading a reply, for at most ``seconds``, until the server has
    taken nothing for ``stall`` seconds; the bytes sent."""
    s.settimeout(stall)
    sent = 0
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError, BlockingIOError):
        while sent < len(reqs) and time.monotonic() < deadline:
            sent += s.send(reqs[sent : sent + 65536])
    return sent


# -- replies nobody reads ------------------------------------------------------------------


CASES = {
    # name: (export kind, request, count): each was answered into an unbounded queue
    "zero-length WRITE": ("mem", lambda i: request(p.Cmd.WRITE, i), 300_000),
    "refused request": ("mem", lambda i: request(99, i), 300_000),
    "BLOCK_STATUS": ("sparse", lambda i: request(p.Cmd.BLOCK_STATUS, i, 0, 64 * MiB), 20_000),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_replies_a_client_never_reads_are_bounded(tmp_path, case):
    """Every queued reply counts against the connection's budget; once it is spent the server
    stops reading that client (before: 300k zero-length WRITEs, ~210 bytes each; 20k block
    status replies of 1024 extents, ~8 KiB each)."""
    kind, make, count = CASES[case]
    export = MemoryExport("x", 64 * MiB)
    if kind == "sparse":  # data in every other 64 KiB page: an extent a page
        for off in range(0, 64 * MiB, 2 * MemoryExport.PAGE):
            export.write(off, b"d")
    budget = 4 * MiB
    reqs = b"".join(make(i) for i in range(1, count + 1))
    with short_dir() as d, InProcessServer([export], f"{d}/s.sock", iothreads=1,
                                           reply_budget=budget, max_payload=MiB,
                                           unix_sndbuf=0) as srv:
        before = rss()
        with connect(srv.sock, rcvbuf=4096) as s:
            go(s, "x", meta=kind == "sparse")
            sent = pipeline(s, reqs, 20, stall=2)
            grown = rss() - before
            held = srv.server.memory_held
    print(f"\n{case}: {sent // 28} of {count} requests taken, {held} bytes held, "
          f"RSS +{grown / MiB:.1f} MiB")
    assert sent < len(reqs)  # the server stopped reading: back-pressure
    assert held <= budget + MiB
    assert grown < 16 * MiB


def test_all_connections_share_max_memory(tmp_path):
    """Four clients pipelining READs they never read: together they hold at most max_memory
    (8 MiB here), though each may hold 4 MiB... (before, each held its own budget)."""
    with short_dir() as d, InProcessServer([MemoryExport("x", 64 * MiB)], f"{d}/s.sock",
                                           iothreads=2, reply_budget=4 * MiB, max_payload=MiB,
                                           max_memory=6 * MiB, unix_sndbuf=0) as srv:
        clients = [connect(srv.sock, rcvbuf=4096) for _ in range(4)]
        try:
            for s in clients:
                go(s, "x")
            reqs = b"".join(request(p.Cmd.READ, i, i * 65536 % (60 * MiB), 512 << 10)
                            for i in range(1, 201))
            sent = [pipeline(s, reqs, 3) // 28 for s in clients]
            assert wait_until(lambda: srv.server.memory_held >= 5 * MiB, 10)
            held = srv.server.memory_held
            # the budget is shared: the reads that fit are served, none more
            assert held <= 6 * MiB + MiB, held
            # once the clients read, the held replies drain and the reads held back are served
            got: list[int] = []

            def drain(s: socket.socket, n: int) -> None:
                s.settimeout(20)
                got.append(len(recv_exact(s, n * (16 + (512 << 10)))) // (16 + (512 << 10)))

            readers = [threading.Thread(target=drain, args=a) for a in zip(clients, sent)]
            for t in readers:
                t.start()
            for t in readers:
                t.join(30)
            assert sorted(got) == sorted(sent)
            assert wait_until(lambda: srv.server.memory_held == 0, 10), srv.server.memory_held
        finally:
            for s in clients:
                s.close()
    print(f"\nfour clients held {held / MiB:.1f} MiB at most; max_memory 6 MiB")


# -- connections ---------------------------------------------------------------------------


def test_max_clients(tmp_path):
    with short_dir() as d, InProcessServer([MemoryExport("x", MiB)], f"{d}/s.sock",
                                           max_clients=2) as srv:
        a, b = connect(srv.sock), connect(srv.sock)
        with a, b:
            go(a, "x")
            go(b, "x")
            with connect(srv.sock) as c:  # the third: closed at once, no greeting
                assert recv_exact(c, 18) == b""
            assert srv.server.refused == 1
        assert wait_until(lambda: srv.server.connections == 0, 10)
        with connect(srv.sock) as c:
            go(c, "x")  # served again once the others left
    with server_proc(["--listen", f"unix:{tmp_path}/c.sock", "--memory", "x=1M",
                      "--max-clients", "1"]):
        with connect(f"{tmp_path}/c.sock") as a, connect(f"{tmp_path}/c.sock") as b:
            go(a, "x")
            assert recv_exact(b, 18) == b""


def closes_within(s: socket.socket, seconds: float) -> float:
    """Read until EOF (bounded); the time it took."""
    t0 = time.monotonic()
    s.settimeout(seconds + 5)
    while s.recv(65536):
        pass
    return time.monotonic() - t0


@pytest.mark.parametrize("client", ["silent", "a byte a second", "idle after the greeting"])
def test_handshake_limit(tmp_path, caplog, client):
    """qemu-nbd 10's --handshake-limit, default 10 s: here 1 s. Before, held for ever."""
    caplog.set_level(logging.WARNING, logger="nbd.server")
    with short_dir() as d, InProcessServer([MemoryExport("x", MiB)], f"{d}/s.sock",
                                           handshake_limit=1.0) as srv, connect(srv.sock) as s:
        t0 = time.monotonic()
        if client != "silent":
            assert len(recv_exact(s, 18)) == 18
        if client == "a byte a second":
            hdr = struct.pack(">I", 3) + struct.pack(">QII", p.IHAVEOPT, p.Opt.LIST, 0)
            with contextlib.suppress(OSError):
                for byte in hdr:
                    s.sendall(bytes([byte]))
                    poll_pause(0.3)  # the dribble is what is tested
        closes_within(s, 5)
        seconds = time.monotonic() - t0
        assert wait_until(lambda: srv.server.connections == 0, 5)
    lines = [r.getMessage() for r in caplog.records if r.name == "nbd.server"]
    print(f"\n{client}: closed after {seconds:.2f} s: {lines}")
    assert any("handshake not finished within 1 s" in ln for ln in lines), lines
    assert 0.9 < seconds < 4


def test_handshake_limit_zero_disables_and_a_finished_handshake_is_not_limited(tmp_path):
    with short_dir() as d, InProcessServer([MemoryExport("x", MiB)], f"{d}/s.sock",
                                           handshake_limit=0.3) as srv:
        with connect(srv.sock) as s:
            go(s, "x")
            poll_pause(0.6)  # past the limit, in transmission: the limit no longer applies
            s.sendall(request(p.Cmd.READ, 1, 0, 512))
            assert struct.unpack(">IIQ", recv_exact(s, 16))[1:] == (0, 1)
    with short_dir() as d, InProcessServer([MemoryExport("x", MiB)], f"{d}/s.sock",
                                           handshake_limit=0) as srv:
        with connect(srv.sock) as s:
            greet(s)
            poll_pause(0.5)
            assert option(s, p.Opt.LIST)[-1][0] == p.Rep.ACK  # still served


@pytest.mark.slow
def test_idle_timeout(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nbd.server")
    with short_dir() as d, InProcessServer([MemoryExport("x", 8 * MiB)], f"{d}/s.sock",
                                           idle_timeout=0.5, reply_budget=2 * MiB,
                                           max_payload=MiB, unix_sndbuf=0) as srv:
        # a client that asks now and then is not idle
        with connect(srv.sock) as s:
            go(s, "x")
            for i in range(4):
                s.sendall(request(p.Cmd.READ, i + 1, 0, 512))
                assert struct.unpack(">IIQ", recv_exact(s, 16))[1] == 0
                recv_exact(s, 512)
                poll_pause(0.3)
        # one that goes quiet is closed
        with connect(srv.sock) as s:
            go(s, "x")
            assert 0.4 < closes_within(s, 0.5) < 3
        # one that stops reading its replies is closed too
        with connect(srv.sock, rcvbuf=4096) as s:
            go(s, "x")
            pipeline(s, b"".join(request(p.Cmd.READ, i, 0, 256 << 10) for i in range(1, 64)), 2)
            t0 = time.monotonic()
            assert wait_until(lambda: srv.server.connections == 0, 5)  # we read nothing
            t = time.monotonic() - t0
        assert srv.server.memory_held == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "nbd.server"]
    assert any("idle for 0.5 s" in ln for ln in lines), lines
    assert any("took no reply bytes for 0.5 s" in ln for ln in lines), lines
    print(f"\nthe client that stopped reading was closed {t:.2f} s after its last request")


# -- refusals fit the protocol ---------------------------------------------------------------


@pytest.mark.parametrize("length", [4079, 4096])
@pytest.mark.parametrize("opt", ["GO", "INFO", "LIST_META_CONTEXT"])
def test_unknown_export_with_a_long_name_is_refused_in_protocol(tmp_path, opt, length):
    """ERR_UNKNOWN with a message within the 4096-byte limit; before, the message quoted the
    whole name, did not fit, and the connection ended with an internal error."""
    name = "N" * length
    with short_dir() as d, InProcessServer([MemoryExport("x", MiB)], f"{d}/s.sock") as srv:
        with connect(srv.sock) as s:
            greet(s)
            if opt == "LIST_META_CONTEXT":
                assert option(s, p.Opt.STRUCTURED_REPLY)[-1][0] == p.Rep.ACK
                data = name_data(name, struct.pack(">I", 0))
            else:
                data = name_data(name, struct.pack(">H", 0))
            rep, msg = option(s, getattr(p.Opt, opt), data)[-1]
            assert rep == p.Rep.ERR_UNKNOWN
            assert len(msg) <= 4096 and msg.startswith(b"no export named 'NNN")
            # the connection goes on: the right name works
            assert option(s, p.Opt.GO, name_data("x", struct.pack(">H", 0)))[-1][0] == p.Rep.ACK


@pytest.mark.peers
def test_nbdinfo_gets_the_refusal_as_qemu_nbd_gives_it(tmp_path):
    need("nbdinfo")
    name = "A" * 4079
    with server_proc(["--listen", f"unix:{tmp_path}/n.sock", "--memory", "x=1M"]):
        r = subprocess.run(["nbdinfo", unix_uri(f"{tmp_path}/n.sock", name)], capture_output=True,
                           text=True, timeout=30, check=False)
    assert r.returncode == 1
    assert "server replied with error to opt_go request" in r.stderr, r.stderr[:300]


# -- idle connections hold nothing ------------------------------------------------------------


def test_idle_connections_hold_no_reply_data(tmp_path):
    """120 clients each read 1 MiB, then idle: each kept its last reply's data (the writer's
    batch) for as long as it stayed, +120 MiB, and glibc kept that memory after they left."""
    n, size = 120, MiB
    with server_proc(["--listen", f"unix:{tmp_path}/i.sock", "--memory", "x=4M",
                      "--iothreads", "2"]) as proc:
        sock = f"{tmp_path}/i.sock"
        with connect(sock) as s:  # warm up: one connection, one read
            go(s, "x")
            s.sendall(request(p.Cmd.READ, 1, 0, size))
            assert len(recv_exact(s, 16 + size)) == 16 + size
        start = rss(proc.pid)
        clients = []
        try:
            for _ in range(n):
                s = connect(sock)
                clients.append(s)
                go(s, "x")
                s.sendall(request(p.Cmd.READ, 1, 0, size))
                assert len(recv_exact(s, 16 + size)) == 16 + size
            idle = rss(proc.pid)
        finally:
            for s in clients:
                s.close()
        deadline = time.monotonic() + 10
        after = rss(proc.pid)
        while after > start + 8 * MiB and time.monotonic() < deadline:
            poll_pause(0.1)  # the server closes them in its own time
            after = rss(proc.pid)
    print(f"\n{n} idle clients after a {size >> 20} MiB read: RSS {start / MiB:.1f} -> "
          f"{idle / MiB:.1f} MiB; after they closed {after / MiB:.1f} MiB")
    assert idle - start < 24 * MiB
    assert after - start < 16 * MiB


def test_limits_are_keyword_arguments_of_the_library():
    s = NBDServer([MemoryExport("x", MiB)], max_memory=8 * MiB, max_clients=3,
                  handshake_limit=2.5, idle_timeout=7)
    assert (s.max_clients, s.handshake_limit, s.idle_timeout) == (3, 2.5, 7)
    with pytest.raises(ValueError, match="max_clients"):
        NBDServer([MemoryExport("x", MiB)], max_clients=0)
    with pytest.raises(ValueError, match="max_requests"):
        NBDServer([MemoryExport("x", MiB)], max_requests=0)
    with pytest.raises(ValueError, match="export name"):
        NBDServer([MemoryExport("n" * 4097, MiB)])


def test_cli_limits(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qioc_green.nbd", "server", "--help"],
                       capture_output=True, text=True, timeout=30, check=True)
    for opt in ("--max-clients", "--max-memory", "--handshake-limit", "--idle-timeout"):
        assert opt in r.stdout
    with server_proc(["--listen", f"unix:{tmp_path}/h.sock", "--memory", "x=1M",
                      "--handshake-limit", "0.5", "--idle-timeout", "0.5",
                      "--max-memory", "256M"]):
        with connect(f"{tmp_path}/h.sock") as s:
            assert closes_within(s, 0.5) < 4  # silent: the handshake limit
        with connect(f"{tmp_path}/h.sock") as s:
            go(s, "x")
            assert closes_within(s, 0.5) < 4  # idle
    bad = subprocess.run([sys.executable, "-m", "qioc_green.nbd", "server", "--listen",
                          "unix:/tmp/x.sock", "--memory", "x=1M", "--max-memory", "lots"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "expected a size" in bad.stderr

