"""Our NBD client against our NBD server, in one process: the case QEMU's change was made for.

Requesters in four IOThreads write requests on the same connection(s) while one reader greenlet
per connection (in yet another thread) reads the replies and wakes each requester in its own
thread. 64 requests are held in flight by a gate in the export, so the count is a fact, not a
hope; every byte is verified.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading

import pytest

import qioc_green
from qioc_green import nbd as p
from qioc_green import sync
from qioc_green.nbd import Client, FileExport, MemoryExport, NBDError, parse_uri
from tests.nbdutil import InProcessServer, pattern

MiB = 1 << 20
IN_FLIGHT = 64


class GatedMemory(MemoryExport):
    """Holds every READ until ``gate`` requests are being served at once, then lets all go."""

    def __init__(self, name: str, size: int, gate: int) -> None:
        super().__init__(name, size)
        self.gate = gate
        self.arrived = 0
        self.lock = threading.Lock()
        self.open = sync.Event()

    def read(self, offset: int, length: int) -> bytes | bytearray:
        with self.lock:
            self.arrived += 1
            if self.arrived >= self.gate:
                self.open.set()
        assert self.open.wait(30), f"only {self.arrived} reads arrived"
        return super().read(offset, length)


def test_uri_forms() -> None:
    assert parse_uri("nbd+unix:///disk?socket=/tmp/s").address == "unix:/tmp/s"
    u = parse_uri("nbd://127.0.0.1:1234/a%20b")
    assert (u.address, u.export, u.tls) == ("tcp:127.0.0.1:1234", "a b", False)
    assert parse_uri("nbds://h/x").address == "tcp:h:10809"
    assert parse_uri("nbds://h/x").tls
    with pytest.raises(ValueError):
        parse_uri("http://x/")
    with pytest.raises(ValueError):
        parse_uri("nbd+unix:///x")


@pytest.mark.parametrize("connections", [1, 4])
def test_requesters_in_four_iothreads_64_in_flight(tmp_path, connections: int) -> None:
    size = 32 * MiB
    export = GatedMemory("mem", size, IN_FLIGHT)
    block = 256 * 1024
    with InProcessServer([export], str(tmp_path / "s.sock"), iothreads=2,
                         max_requests=IN_FLIGHT) as srv, \
            qioc_green.IOThreadPool(4, name="req") as requesters, \
            qioc_green.IOThread("reader") as reader:
        client = Client(srv.uri("mem"), connections=connections, contexts=reader.context)
        try:
            assert client.connections == connections
            # Fill the export (no gate for writes), from all four threads at once.
            def write_part(k: int) -> None:
                for i in range(k, size // block, 4):
                    client.pwrite(pattern(i * block, block), i * block)

            for fut in [ctx.spawn(write_part, k) for k, ctx in enumerate(requesters.contexts)]:
                fut.result(60)
            # 64 reads at once: 16 greenlets in each of 4 threads; the export holds them all
            # until the 64th has arrived, so all 64 are in flight together.
            seen: list[tuple[int, int, int]] = []
            reader_ident = []

            def read_one(i: int) -> None:
                before = threading.get_ident()
                data = client.pread(block, i * block)
                assert threading.get_ident() == before  # resumed in its own thread
                assert data == pattern(i * block, block), f"block {i} differs"
                seen.append((i, before, 0))

            def read_part(k: int) -> None:
                import gevent

                gs = [gevent.spawn(read_one, k * 16 + j) for j in range(16)]
                gevent.joinall(gs, raise_error=True)

            futs = [ctx.spawn(read_part, k) for k, ctx in enumerate(requesters.contexts)]
            for fut in futs:
                fut.result(60)
            reader_ident.append(reader.context.thread_id)
            assert export.arrived == IN_FLIGHT
            assert sorted(i for i, _, _ in seen) == list(range(IN_FLIGHT))
            threads = {t for _, t, _ in seen}
            assert len(threads) == 4 and reader_ident[0] not in threads
            # Everything, read back in large requests split over the threads
            def verify(k: int) -> None:
                for i in range(k, size // (4 * MiB), 4):
                    off = i * 4 * MiB
                    assert client.pread(4 * MiB, off) == pattern(off, 4 * MiB)

            export.gate = 0
            for fut in [ctx.spawn(verify, k) for k, ctx in enumerate(requesters.contexts)]:
                fut.result(60)
            sent = client.requests_sent
            assert len(sent) == connections and min(sent) >= sum(sent) // connections - 1  # round-robin
        finally:
            client.close()


def test_file_export_commands(tmp_path) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"x" * MiB)
    exports = [FileExport("disk", str(path)), FileExport("ro", str(ro), readonly=True)]
    with InProcessServer(exports, str(tmp_path / "s.sock"), iothreads=1) as srv:
        with Client(srv.uri("disk")) as c:
            assert c.size == 8 * MiB and c.can_multi_conn and c.can_zero
            assert c.map() == [(0, 8 * MiB, 3)]
            c.pwrite(b"a" * MiB, MiB, fua=True)
            c.pwrite(b"b" * MiB, 3 * MiB)
            c.flush()
            assert c.map() == [(0, MiB, 3), (MiB, MiB, 0), (2 * MiB, MiB, 3), (3 * MiB, MiB, 0),
                               (4 * MiB, 4 * MiB, 3)]
            c.zero(MiB, 3 * MiB)  # punches a hole
            assert c.map() == [(0, MiB, 3), (MiB, MiB, 0), (2 * MiB, 6 * MiB, 3)]
            assert c.pread(MiB, 3 * MiB) == bytes(MiB)
            c.trim(MiB, 5 * MiB)
            c.zero(4096, 0, no_hole=True)
            assert c.pread(4096, 0) == bytes(4096)
            with pytest.raises(NBDError) as exc:
                c.pread(2, 8 * MiB - 1)
            assert exc.value.errno == p.Errno.EINVAL
            with pytest.raises(NBDError) as exc:
                c.pwrite(b"zz", 8 * MiB - 1)
            assert exc.value.errno == p.Errno.ENOSPC
        with open(path, "rb") as f:
            assert f.read()[MiB:2 * MiB] == b"a" * MiB
        with Client(srv.uri("ro")) as c:
            assert c.read_only
            assert c.pread(10, 0) == b"x" * 10
            with pytest.raises(NBDError) as exc:
                c.pwrite(b"y", 0)
            assert exc.value.errno == p.Errno.EPERM
            assert c.pread(10, 0) == b"x" * 10  # still served after the refusal
        with pytest.raises(ConnectionError, match="ERR_UNKNOWN"):
            Client(srv.uri("nope"))


def _raw(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _handshake_go(s: socket.socket, export: str = "mem") -> None:
    assert len(_recv_exact(s, 18)) == 18
    s.sendall(struct.pack(">I", 3))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, len(data)) + data)
    while True:
        hdr = _recv_exact(s, 20)
        _, _, rep, length = struct.unpack(">QIII", hdr)
        _recv_exact(s, length)
        if rep == p.Rep.ACK:
            return


BAD_INPUTS = {
    "wrong option magic": lambda s: (_recv_exact(s, 18), s.sendall(struct.pack(">I", 3) + b"X" * 16)),
    "option too long": lambda s: (_recv_exact(s, 18), s.sendall(
        struct.pack(">I", 3) + struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, 1 << 30))),
    "request before negotiation": lambda s: (_recv_exact(s, 18), s.sendall(
        struct.pack(">I", 3) + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, 0, 1, 0, 512))),
    "wrong request magic": lambda s: (_handshake_go(s), s.sendall(b"\xde\xad" * 14)),
    "write over the maximum": lambda s: (_handshake_go(s), s.sendall(
        struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 64 * MiB))),
    "gone mid-write": lambda s: (_handshake_go(s), s.sendall(
        struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, MiB, MiB) + b"q" * 1000),
        s.shutdown(socket.SHUT_WR)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_ends_only_that_connection(tmp_path, caplog, case: str) -> None:
    caplog.set_level(logging.WARNING, logger="nbd.server")
    with InProcessServer([MemoryExport("mem", 4 * MiB)], str(tmp_path / "s.sock"), iothreads=2) as srv:
        with Client(srv.uri("mem")) as good:
            good.pwrite(b"ok" * 512, 0)
            with _raw(srv.sock) as s:
                BAD_INPUTS[case](s)
                # the server hangs up: we see EOF (after any error reply)
                while s.recv(65536):
                    pass
            assert good.pread(1024, 0) == b"ok" * 512  # the other client never noticed
    lines = [r.getMessage() for r in caplog.records if r.name == "nbd.server"]
    assert len(lines) == 1, lines
    assert "nbd-server-" in lines[0]


def test_bad_requests_get_error_replies(tmp_path) -> None:
    with InProcessServer([MemoryExport("mem", 4 * MiB)], str(tmp_path / "s.sock"), iothreads=1) as srv:
        with _raw(srv.sock) as s:
            _handshake_go(s)
            # unknown command, offset past the end, unknown flag: EINVAL each, connection stays
            reqs = [(0, 99, 1, 0, 0), (0, p.Cmd.READ, 2, 8 * MiB, 512), (1 << 9, p.Cmd.READ, 3, 0, 512)]
            for flags, cmd, cookie, off, length in reqs:
                s.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, off, length))
                magic, err, got = struct.unpack(">IIQ", _recv_exact(s, 16))
                assert (magic, err, got) == (p.SIMPLE_REPLY_MAGIC, p.Errno.EINVAL, cookie)
            s.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, 4, 0, 512))
            magic, err, got = struct.unpack(">IIQ", _recv_exact(s, 16))
            assert (err, got) == (0, 4) and _recv_exact(s, 512) == bytes(512)


def test_connection_memory_is_bounded(tmp_path) -> None:
    """A client that sends reads and never reads replies: the server stops reading its requests
    once the reply budget is spent, instead of buffering without end."""
    with InProcessServer([MemoryExport("mem", 64 * MiB)], str(tmp_path / "s.sock"), iothreads=1,
                         reply_budget=4 * MiB) as srv:
        with _raw(srv.sock) as s:
            _handshake_go(s)
            s.setblocking(False)
            req = b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, i, 0, MiB)
                           for i in range(1, 100_001))
            sent = 0
            try:
                import gevent

                with gevent.Timeout(1, False):
                    while sent < len(req):
                        try:
                            sent += s.send(req[sent:])
                        except BlockingIOError:
                            gevent.sleep(0.01)
            finally:
                s.setblocking(True)
            # 100 000 MiB of replies were asked for; the socket buffers filled long before that,
            # because the server stopped reading at its budget
            assert sent < len(req)
            assert (os.getpid(), srv.server.connections) == (os.getpid(), 1)


def test_abandoned_request_does_not_disturb_the_next(tmp_path) -> None:
    """A caller that times out leaves its request in flight; the late reply is read and dropped,
    and the connection goes on serving."""
    export = GatedMemory("mem", 4 * MiB, gate=2)
    export.write(0, b"A" * 4096)
    with InProcessServer([export], str(tmp_path / "s.sock"), iothreads=1) as srv:
        with Client(srv.uri("mem"), timeout=0.2) as c:
            with pytest.raises(TimeoutError):
                c.pread(4096, 0)  # held by the gate: only one read has arrived
            assert c.pread(4096, 0) == b"A" * 4096  # the second opens the gate; both are answered
            assert c.pread(10, 0) == b"A" * 10
            assert not any(conn.pending for conn in c._conns)


class FlushWaitsForRead(MemoryExport):
    """FLUSH completes only once a later READ has been served: a server that handled one
    connection's requests one at a time would never answer either."""

    def __init__(self) -> None:
        super().__init__("mem", MiB)
        self.read_served = sync.Event()

    def flush(self) -> None:
        assert self.read_served.wait(10), "the READ behind the FLUSH was not served meanwhile"

    def read(self, offset: int, length: int) -> bytes | bytearray:
        data = super().read(offset, length)
        self.read_served.set()
        return data


def test_requests_of_one_connection_are_served_concurrently(tmp_path) -> None:
    import gevent

    export = FlushWaitsForRead()
    with InProcessServer([export], str(tmp_path / "s.sock"), iothreads=1) as srv, \
            Client(srv.uri("mem")) as c:
        order: list[str] = []

        def flush() -> None:
            c.flush()
            order.append("flush")

        def read() -> None:
            c.pread(512, 0)
            order.append("read")

        g1 = gevent.spawn(flush)
        g2 = gevent.spawn(read)
        gevent.joinall([g1, g2], raise_error=True, timeout=20)
        assert order == ["read", "flush"]  # the replies came out of order, as NBD allows
