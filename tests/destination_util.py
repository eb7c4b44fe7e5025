"""What the destination tests share: running ``qioc-migration-receiver`` with its first stdout
lines read (``listening on ...``, ``qmp on ...``), a source that talks like one (sends a
stream, reads its return path), QEMUs of either version, and TLS credentials in QEMU's
``tls-creds-x509`` layout made with openssl.
"""

from __future__ import annotations

import gzip
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qioc_green.migration import NEED_DATA, ReturnPathReader, RpMessage
from tests.peers import need, qemu_args

PROGRAM = [sys.executable, "-m", "qioc_green.migration"]
DATA = Path(__file__).parent / "data"
WAIT = 30.0
MAX_BANDWIDTH = 107374182400


def load(name: str) -> bytes:
    return gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())


class Rx:
    """One receiver process. ``lines``: how many first stdout lines to read (``listening on``,
    ``qmp on``) into ``said``; ``address``: where it listens, if it said."""

    def __init__(self, *args: str, lines: int = 1) -> None:
        self.proc = subprocess.Popen([*PROGRAM, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._buf = b""
        self.said = [self.line() for _ in range(lines)]
        self.address = next((s.removeprefix("listening on ") for s in self.said
                             if s.startswith("listening on ")), "")
        self.qmp = next((s.removeprefix("qmp on unix:") for s in self.said
                         if s.startswith("qmp on ")), "")
        self.stdout = ""
        self.stderr = ""

    def line(self, timeout: float = WAIT) -> str:
        """The next stdout line (bounded)."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError("no line from the receiver in time")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("receiver exited: "
                                     + self.proc.stderr.read().decode())  # type: ignore[union-attr]
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def wait(self, timeout: float = WAIT) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout = self._buf.decode() + out.decode()
        self.stderr = err.decode()
        return self.proc.returncode

    def error_line(self) -> str:
        """The one error line (stderr must be exactly one line)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("qioc-migration-receiver: "), lines[0]
        return lines[0].removeprefix("qioc-migration-receiver: ")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def receivers() -> Iterator[Any]:
    started: list[Rx] = []

    def start(*args: str, lines: int = 1) -> Rx:
        rx = Rx(*args, lines=lines)
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
        return s
    host, _, port = rest.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=WAIT)


def messages(data: bytes) -> list[RpMessage]:
    """Return-path bytes decoded as a source decodes them (the reader refuses what it would)."""
    reader = ReturnPathReader()
    reader.feed(data)
    got = []
    while (m := reader.next_message()) is not NEED_DATA:
        got.append(m)
    reader.close()
    return got


def as_source(address: str, stream: bytes, *, cut: bool = False) -> bytes:
    """Send ``stream`` as a source does, keeping the connection open, and read the return path
    until SHUT (or the receiver closes); then close, as a source does after SHUT. ``cut``: end
    the stream (a FIN) right after the bytes, as a source that failed or vanished."""
    got = bytearray()
    with connect(address) as s:
        try:
            s.sendall(stream)
            if cut:
                s.shutdown(socket.SHUT_WR)
            while data := s.recv(65536):
                got += data
                if _has_shut(bytes(got)):
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass  # the receiver refused the stream and hung up on what it did not read
    return bytes(got)


def _has_shut(data: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(data):
        kind, length = int.from_bytes(data[pos : pos + 2], "big"), int.from_bytes(
            data[pos + 2 : pos + 4], "big")
        if kind == 1 and pos + 8 <= len(data):
            return True
        pos += 4 + length
    return False


class QmpClient:
    """qemu.qmp's QEMUMonitorProtocol, answering errors as values (``cmd_raw``)."""

    def __init__(self, path: str | tuple[str, int]) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.qmp = QEMUMonitorProtocol(path)
        self.qmp.settimeout(10)
        self.greeting = self.qmp.connect(negotiate=True)

    def __call__(self, name: str, **args: Any) -> Any:
        return self.qmp.cmd_raw(name, args or None)

    def ok(self, name: str, **args: Any) -> Any:
        reply = self(name, **args)
        assert "return" in reply, reply
        return reply["return"]

    def error(self, name: str, **args: Any) -> str:
        reply = self(name, **args)
        assert reply["error"]["class"] == "GenericError", reply
        return str(reply["error"]["desc"])

    def statuses(self, until: str, timeout: float = WAIT) -> list[str]:
        """MIGRATION statuses, as they come, up to ``until`` (failed ends it too)."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while not got or got[-1] not in (until, "failed"):
            left = deadline - time.monotonic()
            assert left > 0, f"no {until!r} event: {got}"
            ev = self.qmp.pull_event(wait=left)
            if ev is not None and ev["event"] == "MIGRATION":
                got.append(ev["data"]["status"])
        return got

    def close(self) -> None:
        try:
            self.qmp.close()
        except EOFError:  # the monitor hung up after quit, as QEMU's does
            pass


# -- QEMU ------------------------------------------------------------------------------------


def qemu(version: str, **kw: Any) -> Any:
    """A ``qioc_green.migration.qemu.Qemu`` of ``version`` ("10" or "7.2")."""
    from qioc_green.migration.qemu import Qemu

    return Qemu(**qemu_args(version), **kw)


def ram_bytes(tmp: Path, mib: int) -> tuple[str, bytes]:
    ram = os.urandom(mib << 20)
    path = tmp / "ram.bin"
    path.write_bytes(ram)
    return str(path), ram


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*argv: str, cwd: str) -> None:
    subprocess.run([need("openssl")["openssl"], *argv], cwd=cwd, check=True,
                   capture_output=True, timeout=60)


def _ca(d: str, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)


def _cert(d: str, name: str, ca: str, san: str | None) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = []
    if san:
        with open(os.path.join(d, f"{name}.cnf"), "w") as f:
            f.write(f"subjectAltName={san}\n")
        ext = ["-extfile", f"{name}.cnf"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)


def tls_dirs(base: Path) -> dict[str, str]:
    """``tls-creds-x509`` directories: ``server`` (for the receiver or a destination:
    ca-cert, server-cert for DNS:localhost and IP:127.0.0.1, server-key), ``client`` (ca-cert,
    client-cert, client-key), ``client-other-ca`` (a client that trusts another CA only) and
    ``client-other-cert`` (a client whose certificate another CA signed; it trusts both)."""
    d = str(base / "pki")
    os.makedirs(d)
    _ca(d, "ca")
    _ca(d, "otherca")
    _cert(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _cert(d, "client", "ca", None)
    _cert(d, "otherclient", "otherca", None)
    layout = {
        "server": {"ca-cert.pem": "ca.pem", "server-cert.pem": "server.pem",
                   "server-key.pem": "server.key"},
        "client": {"ca-cert.pem": "ca.pem", "client-cert.pem": "client.pem",
                   "client-key.pem": "client.key"},
        "client-other-ca": {"ca-cert.pem": "otherca.pem"},
        # QEMU checks its own certificate against its own CAs: it trusts both
        "client-other-cert": {"ca-cert.pem": "both-ca.pem", "client-cert.pem": "otherclient.pem",
                              "client-key.pem": "otherclient.key"},
    }
    with open(os.path.join(d, "both-ca.pem"), "w") as f:
        for name in ("ca.pem", "otherca.pem"):
            with open(os.path.join(d, name)) as ca:
                f.write(ca.read())
    out = {}
    for name, files in layout.items():
        path = base / name
        path.mkdir()
        for dst, src in files.items():
            shutil.copy(os.path.join(d, src), path / dst)
        out[name] = str(path)
    return out
