"""examples/echo_server.py run as a program: its first lines, echoing, TLS, limits, signals, errors."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from tests.certs import make_certs
from tests.polling import poll_pause

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "echo_server.py")
ROOT = os.path.dirname(os.path.dirname(EXAMPLE))


class Server:
    """The example in a child process, bounded, killed by pid if it does not stop."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, EXAMPLE, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.addresses: list[str] = []

    def read_listening(self, n: int) -> list[str]:
        assert self.proc.stdout is not None
        for _ in range(n):
            line = self.proc.stdout.readline()  # the child prints these first, or dies
            assert line.startswith("listening on "), (line, self.proc.stderr.read() if line == "" else "")
            self.addresses.append(line.split("listening on ", 1)[1].strip())
        return self.addresses

    def port(self, i: int = 0) -> int:
        return int(self.addresses[i].rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=5)
            raise
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f and not f.closed:
                f.close()


@pytest.fixture
def server_factory():
    made: list[Server] = []

    def make(*args: str) -> Server:
        s = Server(*args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


def echo(sock: socket.socket, msg: bytes) -> bytes:
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        d = sock.recv(65536)
        if not d:
            break
        got += d
    return got


def test_help_and_bad_arguments():
    out = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--listen" in out.stdout and "--iothreads" in out.stdout
    bad = subprocess.run([sys.executable, EXAMPLE, "--listen", "tcp:127.0.0.1:0", "--iothreads", "0"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--iothreads must be at least 1" in bad.stderr
    half = subprocess.run([sys.executable, EXAMPLE, "--listen", "tcp:127.0.0.1:0", "--tls-cert", "x.pem"],
                          capture_output=True, text=True, timeout=30)
    assert half.returncode == 2 and "go together" in half.stderr


def test_cannot_listen_is_a_clear_error_with_status_1():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, EXAMPLE, "--listen", f"tcp:127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"cannot listen on tcp:127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_echoes_on_every_address_then_stops_with_a_summary(server_factory, tmp_path, sig):
    path = str(tmp_path / "echo.sock")
    srv = server_factory("--listen", "tcp:127.0.0.1:0", "--listen", f"unix:{path}", "--iothreads", "2")
    tcp, unix = srv.read_listening(2)
    assert tcp.startswith("tcp:127.0.0.1:") and unix == f"unix:{path}"
    total = 0
    for i in range(6):
        with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as s:
            msg = b"hello %d " % i * 50
            assert echo(s, msg) == msg
            total += len(msg)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        assert echo(s, b"over unix") == b"over unix"
        total += 9
    rc, out, err = srv.stop(sig)
    assert rc == 0, err
    assert f"stopping on {signal.Signals(sig).name}" in out
    assert f"summary: 7 connections, {total} bytes echoed" in out
    assert "iothread-0: " in out and "iothread-1: " in out
    per = [int(line.split(":")[1].split()[0]) for line in out.splitlines() if line.startswith("  iothread-")]
    assert sum(per) == 7 and all(n >= 3 for n in per)  # round-robin
    assert not os.path.exists(path)


def test_stop_with_a_client_still_connected_is_graceful(server_factory):
    srv = server_factory("--listen", "tcp:127.0.0.1:0", "--grace", "0.5")
    srv.read_listening(1)
    with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as s:
        assert echo(s, b"x") == b"x"
        t0 = time.monotonic()
        rc, out, err = srv.stop()
        assert time.monotonic() - t0 < 10
        assert rc == 0, err
        assert s.recv(10) == b""  # its connection was closed by the stop
    assert "summary: 1 connections, 1 bytes echoed" in out


def test_max_clients_and_idle_timeout(server_factory):
    srv = server_factory("--listen", "tcp:127.0.0.1:0", "--max-clients", "1", "--idle-timeout", "0.5")
    srv.read_listening(1)
    with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as first:
        assert echo(first, b"a") == b"a"
        with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as second:
            assert second.recv(10) == b""  # refused: EOF at once
        assert first.recv(10) == b""  # silent for 0.5 s: dropped
    # The first client's handler leaves just after its channel closes: until then the next
    # client is still refused (bounded retry).
    refused = 1
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as third:
            try:
                if echo(third, b"b") == b"b":
                    break
            except ConnectionResetError:
                pass
        refused += 1
        assert time.monotonic() < deadline, "never served again"
        poll_pause(0.01)
    rc, out, _ = srv.stop()
    assert rc == 0
    assert f"{refused} refused" in out and "1 idle closed" in out


@pytest.mark.peers
def test_tls(server_factory, tmp_path):
    certs = make_certs(str(tmp_path))
    srv = server_factory("--listen", "tcp:127.0.0.1:0", "--iothreads", "2",
                         "--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"])
    srv.read_listening(1)
    ctx = ssl.create_default_context(cafile=certs["ca.pem"])
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                assert echo(s, b"secret" * 1000) == b"secret" * 1000
                s.unwrap()  # close_notify both ways
    rc, out, err = srv.stop()
    assert rc == 0, err
    assert "summary: 2 connections, 12000 bytes echoed" in out


@pytest.mark.peers
def test_tls_client_that_closes_without_close_notify_is_a_normal_end(server_factory, tmp_path):
    # Python's ssl clients close() without close_notify unless told to unwrap(): that is how a
    # TLS client usually leaves, and the server must not log it as a connection error.
    certs = make_certs(str(tmp_path))
    srv = server_factory("--listen", "tcp:127.0.0.1:0", "-v",
                         "--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"])
    srv.read_listening(1)
    ctx = ssl.create_default_context(cafile=certs["ca.pem"])
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", srv.port()), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                assert echo(s, b"bye") == b"bye"
    rc, out, err = srv.stop()
    assert rc == 0, err
    assert "summary: 2 connections, 6 bytes echoed" in out and "0 handler errors" in out
    assert err == ""  # -v logs every connection error: there was none


def test_bad_certificate_file_is_status_1(tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    out = subprocess.run([sys.executable, EXAMPLE, "--listen", "tcp:127.0.0.1:0", "--tls-cert", str(bogus),
                          "--tls-key", str(bogus)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "cannot load the TLS certificate" in out.stderr
