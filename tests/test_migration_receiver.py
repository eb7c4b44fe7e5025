"""The migration receiver program (examples/migration_receiver.py), end to end.

The first half needs no QEMU: captured streams (tests/data) are sent over loopback, UNIX
sockets, inherited fds, exec: and file:, whole, cut short, with the sender vanishing mid-page,
and as garbage. The second half migrates real QEMU 7.2 VMs (TCG, tiny, no disk) into the
receiver and through it into a real destination (``peers.need``). Every process is started by
the test, bounded by timeouts, and killed by its pid; sockets are on 127.0.0.1 or in tmp_path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from migration.stream import NEED_DATA, RamPages, StreamParser

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "examples" / "migration_receiver.py"
DATA = Path(__file__).parent / "data"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
WAIT = 30.0  # bound on any one receiver run


def load(name: str) -> bytes:
    return gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())


class Rx:
    """One receiver process; ``address`` is what its first stdout line says it listens on."""

    def __init__(self, uri: str, *args: str, listens: bool = True, pass_fds: tuple[int, ...] = ()):
        self.proc = subprocess.Popen([sys.executable, str(PROGRAM), uri, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                     pass_fds=pass_fds)
        self.address = ""
        if listens:
            line = self._first_line()
            assert line.startswith("listening on "), line
            self.address = line.removeprefix("listening on ")
        self.stdout = ""
        self.stderr = ""

    def _first_line(self) -> str:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + WAIT
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError("receiver did not say where it listens")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"receiver exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            buf += chunk
        line, _, self._rest = buf.partition(b"\n")
        return line.decode()

    def wait(self, timeout: float = WAIT) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout = getattr(self, "_rest", b"").decode() + out.decode()
        self.stderr = err.decode()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def receivers():
    started: list[Rx] = []

    def start(uri: str, *args: str, **kw) -> Rx:
        rx = Rx(uri, *args, **kw)
        started.append(rx)
        return rx

    yield start
    for rx in started:
        rx.kill()


def connect(address: str) -> socket.socket:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(WAIT)
        s.connect(rest)
    else:
        host, _, port = rest.rpartition(":")
        s = socket.create_connection((host, int(port)), timeout=WAIT)
    return s


def send(address: str, data: bytes, *, reset: bool = False) -> None:
    """Send ``data`` and close: a FIN, or with ``reset`` an RST (the sender vanishing)."""
    with connect(address) as s:
        s.sendall(data)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def one_error_line(rx: Rx) -> str:
    lines = [ln for ln in rx.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, rx.stderr
    assert lines[0].startswith("migration_receiver: offset "), lines[0]
    return lines[0]


# -- without QEMU: captured streams ------------------------------------------------------------


def test_tcp_stream_saved_byte_exact_and_summarised(receivers, tmp_path):
    data = load("pc")
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "s.mig"),
                   "--json", str(tmp_path / "s.json"), "--digest")
    assert rx.address.startswith("tcp:127.0.0.1:") and not rx.address.endswith(":0")
    send(rx.address, data)
    assert rx.wait() == 0, rx.stderr
    assert rx.stderr == ""
    assert (tmp_path / "s.mig").read_bytes() == data
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["complete"] is True and d["machine"] == "pc-i440fx-7.2"
    assert d["bytes_total"] == len(data) and d["elapsed_s"] >= 0
    assert d["sha256_in"] == hashlib.sha256(data).hexdigest()
    assert {"idstr", "instance_id", "version_id", "section_id", "bytes", "records"} <= \
        set(d["sections"][0])
    assert {b["name"] for b in d["ram_blocks"]} >= {"pc.ram", "pc.bios"}
    assert "ram" not in d["devices"] and "timer" in d["devices"]
    assert "complete: " in rx.stdout


def test_unix_keep_listening_names_each_migration(receivers, tmp_path):
    sock = tmp_path / "in.sock"
    rx = receivers(f"unix:{sock}", "--keep-listening", "--count", "2",
                   "--save", str(tmp_path / "m.mig"), "--json", str(tmp_path / "m-{n}.json"))
    assert rx.address == f"unix:{sock}"
    streams = [load("pc"), load("q35")]
    for data in streams:
        send(rx.address, data)
    assert rx.wait() == 0, rx.stderr
    for n, data in enumerate(streams, 1):
        assert (tmp_path / f"m-{n}.mig").read_bytes() == data
        assert json.loads((tmp_path / f"m-{n}.json").read_text())["complete"] is True
    assert not sock.exists()  # the listener's socket file is removed


def test_exec_and_file_sources(receivers, tmp_path):
    data = load("q35")
    f = tmp_path / "q35.mig"
    f.write_bytes(data)
    rx = receivers(f"exec:cat '{f}'", "--json", str(tmp_path / "a.json"), listens=False)
    assert rx.wait() == 0, rx.stderr
    assert json.loads((tmp_path / "a.json").read_text())["bytes_total"] == len(data)
    # file:PATH,offset=N skips a prefix (QEMU 8.2's form; newer QEMUs write such files)
    g = tmp_path / "prefixed.mig"
    g.write_bytes(b"\xff" * 4096 + data)
    rx = receivers(f"file:{g},offset=4096", "--save", str(tmp_path / "b.mig"), listens=False)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "b.mig").read_bytes() == data


def test_inherited_fd_source(receivers, tmp_path):
    data = load("none")
    ours, theirs = socket.socketpair()
    with ours:
        try:
            rx = receivers(f"fd:{theirs.fileno()}", "--save", str(tmp_path / "c.mig"),
                           listens=False, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "c.mig").read_bytes() == data


def first_page_offset(data: bytes) -> int:
    """Stream offset of the first normal page's data (found by its bytes)."""
    p = StreamParser()
    p.feed(data)
    while (ev := p.next_event()) is not NEED_DATA:
        if isinstance(ev, RamPages):
            page = bytes(ev.iov()[0])
            assert data.count(page) == 1
            return data.find(page)
    raise AssertionError("no page")


@pytest.mark.parametrize("where", ["header", "mid-page", "device-json"])
def test_truncated_stream_over_the_network(receivers, tmp_path, where):
    data = load("pc")
    cut = {"header": 6, "mid-page": first_page_offset(data) + 2000,
           "device-json": len(data) - 50}[where]
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "t.mig"),
                   "--json", str(tmp_path / "t.json"))
    send(rx.address, data[:cut])
    assert rx.wait() == 1
    line = one_error_line(rx)
    assert "ends" in line or "expected" in line, line
    assert (tmp_path / "t.mig").read_bytes() == data[:cut]  # the prefix is kept
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["complete"] is False and d["error"] in line and d["bytes_total"] == cut


def test_sender_vanishing_mid_page(receivers, tmp_path):
    data = load("pc")
    cut = first_page_offset(data) + 1000
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "v.mig"))
    send(rx.address, data[:cut], reset=True)
    assert rx.wait() == 1
    line = one_error_line(rx)
    saved = (tmp_path / "v.mig").read_bytes()
    # an RST may discard bytes the receiver had not read yet: what was saved is a prefix
    assert data[:cut].startswith(saved)
    assert line.startswith(f"migration_receiver: offset {len(saved)}: ") or \
        "page" in line, line


def test_garbage_and_trailing_bytes(receivers, tmp_path):
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "g.mig"))
    garbage = bytes(range(256)) * 64
    send(rx.address, garbage)
    assert rx.wait() == 1
    assert "offset 0: expected magic" in one_error_line(rx)
    assert (tmp_path / "g.mig").read_bytes() == garbage

    data = load("none")
    rx = receivers("tcp:127.0.0.1:0")
    send(rx.address, data + b"\0junk")
    assert rx.wait() == 1
    assert "after the end of the stream" in one_error_line(rx)


def test_undescribed_stream_needs_permission(receivers):
    data = load("pc-nodesc")
    rx = receivers("tcp:127.0.0.1:0")
    send(rx.address, data)
    assert rx.wait() == 1
    assert "VM description" in one_error_line(rx)
    rx = receivers("tcp:127.0.0.1:0", "--allow-undescribed")
    send(rx.address, data)
    assert rx.wait() == 0, rx.stderr


def test_forward_without_qemu_and_unreachable_destination(receivers, tmp_path):
    """Forward to our own sink (bytes out == bytes in); then to a port nobody listens on."""
    data = load("q35")
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        lst.settimeout(WAIT)
        port = lst.getsockname()[1]
        rx = receivers("tcp:127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{port}", "--digest",
                       "--json", str(tmp_path / "f.json"))
        sender = threading.Thread(target=send, args=(rx.address, data))
        sender.start()
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(WAIT)
            got = b"".join(iter(lambda: conn.recv(1 << 16), b""))
        sender.join(WAIT)
    assert rx.wait() == 0, rx.stderr
    assert got == data
    d = json.loads((tmp_path / "f.json").read_text())
    assert d["sha256_in"] == d["sha256_out"] == hashlib.sha256(data).hexdigest()

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rx = receivers("tcp:127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{dead}")
    with contextlib.suppress(OSError):  # the receiver may drop us before we are done
        send(rx.address, data)
    assert rx.wait() == 1
    assert "forward to tcp:127.0.0.1:" in one_error_line(rx)


def test_usage_errors():
    for argv in (["bogus:1"], ["tcp:127.0.0.1"], ["exec:cat x", "--keep-listening"],
                 ["file:x,size=3"]):
        r = subprocess.run([sys.executable, str(PROGRAM), *argv], capture_output=True,
                           text=True, env=ENV, timeout=WAIT)
        assert r.returncode == 2, (argv, r.stderr)
        assert "usage:" in r.stderr
    r = subprocess.run([sys.executable, str(PROGRAM), "--help"], capture_output=True,
                       text=True, env=ENV, timeout=WAIT)
    assert r.returncode == 0 and "--forward" in r.stdout and "--keep-listening" in r.stdout
