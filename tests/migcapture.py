"""Capture a real QEMU live-migration stream into memory.

A source QEMU is started paused (``-S``), headless and without devices of its own
(``-nodefaults``); QMP runs over a UNIX socket in a private temporary directory; the stream goes
to a tiny sink (a plain socket on 127.0.0.1 with an ephemeral port, read in a thread until EOF).
Everything is bounded by a timeout, and the QEMU process is killed by its pid whatever happens.

Used by ``tests/data/make_streams.py`` (the committed captures) and by the tests that need a
fresh, large capture (random guest RAM) under /tmp.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from polling import poll_pause

QEMU = "qemu-system-x86_64"


class CaptureError(RuntimeError):
    """The source QEMU did not complete the migration."""


class _Qmp:
    """One QMP connection: one JSON object per line; events may arrive between replies."""

    def __init__(self, path: str, deadline: float) -> None:
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise CaptureError("QMP socket never appeared") from None
                poll_pause(0.02)  # polling for a child's socket to exist, not ordering events
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting

    def _read(self) -> dict:
        self.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
        line = self.file.readline()
        if not line:
            raise CaptureError("QMP closed")
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        msg: dict[str, object] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise CaptureError(f"QMP {name}: {reply['error']}")
            # an event: ignore

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _sink(listener: socket.socket, out: list[bytes], errors: list[OSError]) -> None:
    try:
        conn, _ = listener.accept()
        with conn:
            parts = []
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                parts.append(data)
            out.append(b"".join(parts))
    except OSError as exc:  # reported by the caller
        errors.append(exc)


def capture(
    machine: str = "pc",
    mem: str = "16M",
    *,
    ram_file: str | None = None,
    machine_opts: str = "",
    capabilities: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> bytes:
    """Migrate a paused QEMU ``-M machine`` to a loopback sink and return the stream's bytes.

    ``ram_file``: back guest RAM with this file (``share=off``), so its pages are what it holds.
    ``machine_opts``: appended to ``-machine`` (e.g. ``suppress-vmdesc=on``).
    ``capabilities``: migration capabilities to switch on before ``migrate``.
    """
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="qmig-") as tmp:
        qmp_path = os.path.join(tmp, "qmp.sock")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(timeout)
        port = listener.getsockname()[1]
        out: list[bytes] = []
        errors: list[OSError] = []
        sink = threading.Thread(target=_sink, args=(listener, out, errors), daemon=True)
        sink.start()

        mopts = machine
        argv = [QEMU, "-accel", "tcg", "-m", mem, "-nodefaults", "-display", "none", "-S",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if ram_file is not None:
            ram_id = "ram" if machine == "none" else "pc.ram"
            argv += ["-object",
                     f"memory-backend-file,id={ram_id},size={mem},mem-path={ram_file},share=off"]
            mopts += f",memory-backend={ram_id}"
        if machine_opts:
            mopts += "," + machine_opts
        argv += ["-machine", mopts, *extra_args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            qmp = _Qmp(qmp_path, deadline)
            try:
                qmp.cmd("qmp_capabilities")
                if capabilities:
                    qmp.cmd("migrate-set-capabilities", capabilities=[
                        {"capability": c, "state": True} for c in capabilities])
                qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 107374182400})
                qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                while True:
                    info = qmp.cmd("query-migrate")
                    status = info.get("status") if isinstance(info, dict) else None
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled"):
                        raise CaptureError(f"migration {status}: {info}")
                    if time.monotonic() > deadline:
                        raise CaptureError(f"migration not completed in {timeout}s: {info}")
                    poll_pause(0.02)  # polling QEMU's status, as a QMP client does
            finally:
                qmp.close()
            sink.join(max(0.1, deadline - time.monotonic()))
            if sink.is_alive():
                raise CaptureError("sink did not see EOF")
            if errors:
                raise CaptureError(f"sink failed: {errors[0]!r}")
            return out[0]
        finally:
            proc.kill()
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                err = b""
            listener.close()
            if proc.returncode not in (0, -9) and err:
                raise CaptureError(f"qemu exited {proc.returncode}: {err.decode(errors='replace')}")


# -- QEMU 10: several connections, file: migrations, qemu.qmp ---------------------------------
#
# Kept apart from the 7.2 helpers above (which speak QMP by hand) so they carry over as they
# are: they drive QMP with qemu.qmp's blocking client and take the QEMU command to run.


def pattern_ram(size: int, page_size: int = 4096) -> bytes:
    """Guest RAM that compresses well but is not zero: page ``i`` repeats a line naming ``i``,
    except every 7th page (from the 4th) is zero, so a stream has normal and zero pages."""
    pages = []
    zero = bytes(page_size)
    for i in range(size // page_size):
        if i % 7 == 3:
            pages.append(zero)
        else:
            line = f"qioc_green test page {i:08d}\n".encode()
            pages.append((line * (page_size // len(line) + 1))[:page_size])
    return b"".join(pages)


class Source:
    """A paused QEMU source (``-S``, no devices of its own) with QMP over a private UNIX socket.

    ``qemu``: the argv prefix (``peers.need_qemu10()``). ``ram_file`` backs guest RAM
    (``share=off``), so its bytes are what the pages hold. ``capabilities`` and ``parameters``
    are set before ``migrate``. Bounded by ``timeout``; the process is killed by its pid on exit.
    """

    def __init__(self, qemu: Sequence[str], *, machine: str = "q35", mem: str = "16M",
                 ram_file: str | None = None, capabilities: Sequence[str] = (),
                 parameters: dict[str, object] | None = None, extra_args: Sequence[str] = (),
                 timeout: float = 60.0) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        # qemu.qmp's blocking client runs the calling thread's asyncio loop, making one if the
        # thread has none, and leaves it open: give it one of ours, closed in close().
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self.deadline = time.monotonic() + timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="qmig10-")
        qmp_path = os.path.join(self._tmp.name, "qmp.sock")
        argv = [*qemu, "-accel", "tcg", "-m", mem, "-nodefaults", "-display", "none", "-S",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        mopts = machine
        if ram_file is not None:
            ram_id = "ram" if machine == "none" else "pc.ram"
            argv += ["-object",
                     f"memory-backend-file,id={ram_id},size={mem},mem-path={ram_file},share=off"]
            mopts += f",memory-backend={ram_id}"
        argv += ["-machine", mopts, *extra_args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.qmp: QEMUMonitorProtocol | None = None
        try:
            while not os.path.exists(qmp_path):
                if self.proc.poll() is not None or time.monotonic() > self.deadline:
                    raise CaptureError(f"QEMU did not start: {self._stderr()}")
                poll_pause(0.02)  # polling for a child's socket to exist, not ordering events
            self.qmp = QEMUMonitorProtocol(qmp_path)
            self.qmp.connect()
            if capabilities:
                self.qmp.cmd("migrate-set-capabilities", capabilities=[
                    {"capability": c, "state": True} for c in capabilities])
            self.qmp.cmd("migrate-set-parameters",
                         **{"max-bandwidth": 107374182400, **(parameters or {})})
        except BaseException:
            self.close()
            raise

    def _stderr(self) -> str:
        self.proc.kill()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            err = b""
        return (err or b"").decode(errors="replace").strip()

    def migrate(self, uri: str) -> None:
        """Start the migration (QMP ``migrate`` returns at once)."""
        assert self.qmp is not None
        self.qmp.cmd("migrate", uri=uri)

    def wait_completed(self) -> dict:
        """Poll ``query-migrate`` until completed; raise CaptureError if it fails or times out."""
        assert self.qmp is not None
        while True:
            info = self.qmp.cmd("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return info  # type: ignore[return-value]
            if status in ("failed", "cancelled"):
                raise CaptureError(f"migration {status}: {info}")
            if time.monotonic() > self.deadline:
                raise CaptureError(f"migration not completed in time: {info}")
            poll_pause(0.02)  # polling QEMU's status, as a QMP client does

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._tmp.cleanup()
        if not self._loop.is_closed():
            asyncio.set_event_loop(None)
            self._loop.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _multi_sink(listener: socket.socket, count: int, out: list[bytes | None],
                errors: list[OSError]) -> None:
    """Accept ``count`` connections; read each in its own thread to EOF into out[k] (accept order)."""
    readers = []

    def read(conn: socket.socket, k: int) -> None:
        try:
            with conn:
                parts = []
                while data := conn.recv(1 << 20):
                    parts.append(data)
                out[k] = b"".join(parts)
        except OSError as exc:
            errors.append(exc)

    try:
        for k in range(count):
            conn, _ = listener.accept()
            t = threading.Thread(target=read, args=(conn, k), name=f"sink-{k}", daemon=True)
            t.start()
            readers.append(t)
    except OSError as exc:
        errors.append(exc)
    for t in readers:
        t.join()


def capture_connections(qemu: Sequence[str], connections: int, *, timeout: float = 60.0,
                        **source: object) -> list[bytes]:
    """Migrate a paused QEMU to a loopback sink that takes ``connections`` connections (the main
    channel and the multifd ones) and return each one's bytes, in the order they were accepted."""
    with Source(qemu, timeout=timeout, **source) as src:  # type: ignore[arg-type]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(connections)
            listener.settimeout(timeout)
            out: list[bytes | None] = [None] * connections
            errors: list[OSError] = []
            sink = threading.Thread(target=_multi_sink, args=(listener, connections, out, errors),
                                    name="sink", daemon=True)
            sink.start()
            src.migrate(f"tcp:127.0.0.1:{listener.getsockname()[1]}")
            src.wait_completed()
            sink.join(max(0.1, src.deadline - time.monotonic()))
            if sink.is_alive():
                raise CaptureError("sink did not see every connection end")
            if errors:
                raise CaptureError(f"sink failed: {errors[0]!r}")
            return [b or b"" for b in out]
        finally:
            listener.close()


def capture_file(qemu: Sequence[str], path: str, *, uri_options: str = "", timeout: float = 60.0,
                 **source: object) -> None:
    """Migrate a paused QEMU to ``file:path`` (``uri_options`` such as ``,offset=4096``)."""
    with Source(qemu, timeout=timeout, **source) as src:  # type: ignore[arg-type]
        src.migrate(f"file:{path}{uri_options}")
        src.wait_completed()


# A capture of several connections in one file (tests/data/*.conns.gz): gzip of b"QIOCMIG\x01",
# be32 count, then per connection (in accept order) be64 length and its bytes.
_CONNS_MAGIC = b"QIOCMIG\x01"


def pack_connections(conns: Sequence[bytes]) -> bytes:
    parts = [_CONNS_MAGIC, len(conns).to_bytes(4, "big")]
    for data in conns:
        parts += [len(data).to_bytes(8, "big"), data]
    return b"".join(parts)


def unpack_connections(blob: bytes) -> list[bytes]:
    if blob[:8] != _CONNS_MAGIC:
        raise ValueError("not a connections capture (magic)")
    count = int.from_bytes(blob[8:12], "big")
    out, pos = [], 12
    for _ in range(count):
        n = int.from_bytes(blob[pos : pos + 8], "big")
        out.append(blob[pos + 8 : pos + 8 + n])
        pos += 8 + n
    if pos != len(blob) or any(len(c) == 0 for c in out):
        raise ValueError("connections capture is cut or has trailing bytes")
    return out
