"""Drive real QEMU processes for migrations: start, talk QMP, wait for a migration, kill.

Used by the demo, the live tests and the benchmark; plain blocking stdlib code (it runs beside
the receiver, never inside it). Every wait is bounded by a deadline; a QEMU is always killed by
its pid (``close()``, or the ``with`` block). Migration progress is followed through QMP's
``MIGRATION`` events (the ``events`` capability), so nothing polls on a timer: the source is
started ``-S`` (paused) unless asked otherwise, and a destination with ``-incoming defer`` so its
capabilities can be set before ``migrate-incoming``.

Recipes (see also ``PEERS.md``): a tiny headless VM with no disk and no kernel,
``-M pc -accel tcg -m 32M -nodefaults -display none``; guest RAM backed by a file of random bytes
(``ram_file=``) makes every page a normal page.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Self

QEMU = "qemu-system-x86_64"
MAX_BANDWIDTH = 107374182400  # 100 GiB/s: QEMU 7.2's default cap is 128 MiB/s


class QemuError(RuntimeError):
    """A QEMU failed, refused a command, or did not get there in time."""


def available() -> bool:
    return shutil.which(QEMU) is not None


class Qemu:
    """One QEMU process with a QMP connection over a UNIX socket in a private directory.

    ``machine``/``mem``: ``-M``/``-m``; ``ram_file``: back guest RAM with this file
    (``share=off``); ``paused``: ``-S``; ``incoming``: True for ``-incoming defer`` (then
    :meth:`listen`); ``extra``: more arguments.
    """

    def __init__(self, *, machine: str = "pc", mem: str = "32M", ram_file: str | None = None,
                 paused: bool = True, incoming: bool = False, extra: tuple[str, ...] = (),
                 timeout: float = 30.0, name: str = "qemu") -> None:
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix="qmig-")
        self.qmp_path = os.path.join(self._tmp.name, "qmp.sock")
        self._stderr_path = os.path.join(self._tmp.name, "stderr")
        mopts = machine
        argv = [QEMU, "-accel", "tcg", "-m", mem, "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if ram_file is not None:
            ram_id = "ram" if machine == "none" else "pc.ram"
            argv += ["-object",
                     f"memory-backend-file,id={ram_id},size={mem},mem-path={ram_file},share=off"]
            mopts += f",memory-backend={ram_id}"
        argv += ["-machine", mopts]
        if paused:
            argv.append("-S")
        if incoming:
            argv += ["-incoming", "defer"]
        argv += list(extra)
        self.argv = argv
        self.events: list[dict[str, Any]] = []
        self._mark = 0
        self.completed_at = 0.0
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        try:
            self._connect(time.monotonic() + timeout)
            self.cmd("qmp_capabilities")
            self.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "events", "state": True}])
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    # -- QMP -------------------------------------------------------------------------------------

    def _connect(self, deadline: float) -> None:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.qmp_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self.proc.poll() is not None:
                    raise QemuError(f"{self.name} exited {self.proc.returncode}: "
                                    f"{self.stderr()}") from None
                if time.monotonic() > deadline:
                    raise QemuError(f"{self.name}: QMP socket never appeared") from None
                # waiting for a child to create its socket: nothing to wait on but time
                time.sleep(0.01)
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._deadline = deadline
        self._read(deadline)  # greeting

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise QemuError(f"{self.name}: timed out waiting for QMP")
        self._sock.settimeout(left)
        try:
            line = self._rfile.readline()
        except TimeoutError:
            raise QemuError(f"{self.name}: timed out waiting for QMP") from None
        if not line:
            self.proc.wait(5)
            raise QemuError(f"{self.name} exited {self.proc.returncode}: {self.stderr()}")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, timeout: float = 30.0, **args: Any) -> Any:
        """Run a QMP command; return its ``return`` value. Events that arrive meanwhile are kept."""
        assert self._sock is not None
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self._sock.settimeout(timeout)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QemuError(f"{self.name}: QMP {name}: {reply['error'].get('desc')}")
            self.events.append(reply)

    def wait_event(self, name: str, match: dict[str, Any] | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:
        """Wait for (or find among those already seen) event ``name`` whose data has ``match``."""
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                data = ev.get("data", {})
                if ev.get("event") == name and all(data.get(k) == v
                                                   for k, v in (match or {}).items()):
                    return ev
            self.events.append(self._read(deadline))

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the migration is over; return ``query-migrate``. Raises if it failed.

        ``completed_at`` is then the wall-clock time (``time.time()``) QEMU stamped on its
        ``completed`` event, so a caller waiting on two QEMUs still gets exact end times.
        """
        deadline = time.monotonic() + timeout
        i = self._mark
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                if ev.get("event") != "MIGRATION":
                    continue
                status = ev.get("data", {}).get("status")
                if status == "completed":
                    ts = ev.get("timestamp", {})
                    self.completed_at = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                    info: dict[str, Any] = self.cmd("query-migrate")
                    return info
                if status in ("failed", "cancelled"):
                    info = self.cmd("query-migrate")
                    raise QemuError(f"{self.name}: migration {status}: "
                                    f"{info.get('error-desc', '')} {self.stderr()}".strip())
            self.events.append(self._read(deadline))

    # -- migration ---------------------------------------------------------------------------------

    def migrate(self, uri: str, *, max_bandwidth: int = MAX_BANDWIDTH) -> None:
        """Start migrating to ``uri`` (returns at once; see :meth:`wait_migration`)."""
        self.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
        self._mark = len(self.events)  # wait_migration() looks at the events from here on
        self.cmd("migrate", uri=uri)

    def listen(self, uri: str = "tcp:127.0.0.1:0") -> str:
        """An ``-incoming defer`` destination starts listening; return the actual address."""
        self._mark = len(self.events)
        self.cmd("migrate-incoming", uri=uri)
        if not uri.startswith("tcp:"):
            return uri
        info = self.cmd("query-migrate")
        addr = info["socket-address"][0]
        return f"tcp:{addr['host']}:{addr['port']}"

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill the process (by its pid), reap it, remove its directory. Idempotent."""
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
