"""Capture a real QEMU live-migration stream into memory.

A source QEMU is started paused (``-S``), headless and without devices of its own
(``-nodefaults``); QMP runs over a UNIX socket in a private temporary directory; the stream goes
to a tiny sink (a plain socket on 127.0.0.1 with an ephemeral port, read in a thread until EOF).
Everything is bounded by a timeout, and the QEMU process is killed by its pid whatever happens.

Used by ``tests/data/make_streams.py`` (the committed captures) and by the tests that need a
fresh, large capture (random guest RAM) under /tmp.
"""

from __future__ import annotations

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
