"""Helpers for the NBD tests: our server in-process or as a program, and peer servers, each
started bounded and stopped by pid."""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil

import qioc_green
from qioc_green.nbd import Export, NBDServer
from tests.polling import poll_pause

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the programs as the installed package runs them (``qioc-nbd-server``, ``qioc-nbd-copy``)
SERVER = [sys.executable, "-m", "qioc_green.nbd", "server"]
COPY = [sys.executable, "-m", "qioc_green.nbd", "copy"]
ENV = dict(os.environ)


def unix_uri(sock: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def tcp_uri(addr: str, export: str = "") -> str:
    """``tcp:127.0.0.1:PORT`` (as our server prints it) to ``nbd://127.0.0.1:PORT/EXPORT``."""
    _, host, port = addr.rsplit(":", 2)
    return f"nbd://{host}:{port}/{export}"


def run(argv: list[str], timeout: float = 30, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if check and res.returncode:
        raise AssertionError(f"{argv[0]} exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    return res


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
    """Signal ``pid``, wait for it (KILL after ``timeout``); its exit status if it was our child."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(sig)
        return proc.wait(timeout)
    except psutil.NoSuchProcess:
        return None
    except psutil.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class ServerProc:
    """``qioc-nbd-server`` as a child process; ``addresses`` from its first stdout lines."""

    def __init__(self, args: list[str], n_addresses: int, timeout: float = 15) -> None:
        self.proc = subprocess.Popen([*SERVER, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=ENV)
        self.addresses: list[str] = []
        deadline = time.monotonic() + timeout
        buf = b""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self.addresses) < n_addresses:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise AssertionError("qioc-nbd-server did not print its addresses in time")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.finish()
                raise AssertionError(f"qioc-nbd-server exited: {err}")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode()
                assert text.startswith("listening on "), text
                self.addresses.append(text.removeprefix("listening on "))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("qioc-nbd-server did not stop in time") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.finish()

    def finish(self) -> str:
        """Wait (bounded), close the pipes, return stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        return err.decode(errors="replace")


@contextlib.contextmanager
def server_proc(args: list[str], n_addresses: int = 1) -> Iterator[ServerProc]:
    srv = ServerProc(args, n_addresses)
    try:
        yield srv
    finally:
        srv.kill()


@contextlib.contextmanager
def qemu_nbd(image: str, sock: str, *extra: str) -> Iterator[int]:
    """qemu-nbd on a UNIX socket, ready when this yields (``--fork`` returns once it listens)."""
    pidfile = sock + ".pid"
    run(["qemu-nbd", "-f", "raw", "-t", "-x", "exp", "--shared=8", "-k", sock, "--fork",
         "--pid-file", pidfile, *extra, image])
    pid = int(open(pidfile).read())
    try:
        yield pid
    finally:
        stop_pid(pid)


@contextlib.contextmanager
def nbdkit(sock: str, *plugin: str) -> Iterator[int]:
    """nbdkit on a UNIX socket, our child, ready once it has written its pid file (nbdkit writes
    it when it accepts connections); stopped by its pid."""
    pidfile = sock + ".pid"
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "-P", pidfile, *plugin],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 15
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("nbdkit did not start: " + proc.stderr.read().decode()[-500:])  # type: ignore[union-attr]
            poll_pause(0.01)  # polling for a file nbdkit writes when ready: no ordering guessed
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()  # type: ignore[union-attr]


class InProcessServer:
    """Our server in this process: exports, an IOThreadPool and a NetListener on a UNIX socket."""

    def __init__(self, exports: list[Export], sock: str, iothreads: int = 2, **kw: Any) -> None:
        self.server = NBDServer(exports, **kw)
        self.pool = qioc_green.IOThreadPool(iothreads, name="srv-iothread")
        self.acceptor = qioc_green.NetListener("nbd-test")
        self.sock = sock
        self.address = self.acceptor.open(f"unix:{sock}")[0]
        self.acceptor.set_client_handler(self.server.serve, contexts=self.pool)

    def uri(self, export: str = "") -> str:
        return unix_uri(self.sock, export)

    def close(self) -> None:
        self.server.close_all()
        self.acceptor.close(grace=5)
        self.pool.stop()
        self.server.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pattern(offset: int, length: int, seed: int = 0) -> bytes:
    """Bytes that say where they are: each 8-byte word is its own offset (plus ``seed``)."""
    first = offset - offset % 8
    raw = array.array("Q", range(first + seed, first + seed + length + 16, 8)).tobytes()
    skip = offset - first
    return raw[skip:skip + length]
