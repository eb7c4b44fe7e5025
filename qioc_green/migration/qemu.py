"""Drive real QEMU processes for migrations: start, talk QMP, wait for a migration, kill.

For the demo, the tests and the benchmarks; plain blocking code that runs beside the receiver,
never inside it. QMP goes through ``qemu.qmp`` (QEMU's own Python library, PyPI ``qemu.qmp``:
the ``demo``, ``test`` and ``bench`` extras install it), whose ``legacy.QEMUMonitorProtocol`` is
a blocking client. We listen on the QMP socket and QEMU connects to it (as QEMU's own
``python/qemu/machine`` does), so nothing polls for a socket to appear. Every wait has a
deadline; a QEMU is always killed by its pid (``close()``, or the ``with`` block). Migration
progress is followed through QMP's ``MIGRATION`` events (the ``events`` capability): the source
is started ``-S`` (paused) unless asked otherwise, a destination with ``-incoming defer`` so its
capabilities can be set before ``migrate-incoming``.

Recipes (see also ``PEERS.md``): a tiny headless VM with no disk and no kernel,
``-M pc -accel tcg -m 32M -nodefaults -display none``; guest RAM backed by a file of random bytes
(``ram_file=``) makes every page a normal page.

:func:`capture` records a stream into memory: into a loopback sink, or (``destination=True``)
relayed to a real destination QEMU while the bytes going forward are recorded, which is what a
source with the ``return-path`` or ``postcopy-ram`` capability needs (it waits for the
destination's answers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, Self

try:
    from qemu.qmp import ExecuteError
    from qemu.qmp.legacy import QEMUMonitorProtocol
except ImportError as exc:  # an optional dependency: say which extra brings it
    raise ImportError("qioc_green.migration.qemu needs qemu.qmp (pip install "
                      "'qioc_green[demo]', or the test or bench extra)") from exc

QEMU = "qemu-system-x86_64"
MAX_BANDWIDTH = 107374182400  # 100 GiB/s: QEMU 7.2's default cap is 128 MiB/s


class QemuError(RuntimeError):
    """A QEMU failed, refused a command, or did not get there in time."""


def available(binary: str = QEMU) -> bool:
    return shutil.which(binary) is not None


class Qemu:
    """One QEMU process with a QMP connection over a UNIX socket in a private directory.

    ``machine``/``mem``: ``-M``/``-m``; ``ram_file``: back guest RAM with this file
    (``share=off``); ``paused``: ``-S``; ``incoming``: True for ``-incoming defer`` (then
    :meth:`listen`); ``capabilities``: migration capabilities switched on at start;
    ``extra``: more arguments; ``binary``/``data_dirs``: another QEMU (``-L`` for each dir).
    """

    def __init__(self, *, machine: str = "pc", mem: str = "32M", ram_file: str | None = None,
                 paused: bool = True, incoming: bool = False, capabilities: Sequence[str] = (),
                 extra: Sequence[str] = (), timeout: float = 30.0, name: str = "qemu",
                 binary: str = QEMU, data_dirs: Sequence[str] = ()) -> None:
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix="qmig-")
        self.qmp_path = os.path.join(self._tmp.name, "qmp.sock")
        self._stderr_path = os.path.join(self._tmp.name, "stderr")
        mopts = machine
        argv = [binary, *(a for d in data_dirs for a in ("-L", d)), "-accel", "tcg", "-m", mem,
                "-nodefaults", "-display", "none",
                "-chardev", f"socket,id=qmp,path={self.qmp_path}", "-mon", "chardev=qmp,mode=control"]
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
        self.proc: subprocess.Popen[bytes] | None = None
        # A loop of our own, closed with us: qemu.qmp would otherwise leave one (and its fds)
        # set on the calling thread for ever.
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._qmp: QEMUMonitorProtocol | None = QEMUMonitorProtocol(
                self.qmp_path, server=True, nickname=name)
        except BaseException:
            self._loop.close()
            raise
        finally:
            asyncio.set_event_loop(None)
        try:
            with open(self._stderr_path, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err)
            try:
                self._qmp.accept(timeout)
            except Exception as exc:  # qemu.qmp's ConnectError, TimeoutError
                raise QemuError(f"{name} never connected to QMP ({type(exc).__name__}); "
                                f"exit {self.proc.poll()}: {self.stderr()}") from None
            self._qmp.settimeout(timeout)
            self.set_capabilities("events", *capabilities)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    # -- QMP -------------------------------------------------------------------------------------

    def cmd(self, name: str, timeout: float = 30.0, **args: Any) -> Any:
        """Run a QMP command; return its ``return`` value. Events that arrive meanwhile are kept."""
        assert self._qmp is not None
        self._qmp.settimeout(timeout)
        try:
            return self._qmp.cmd(name, **args)
        except ExecuteError as exc:
            raise QemuError(f"{self.name}: QMP {name}: {exc}") from None
        except TimeoutError:
            raise QemuError(f"{self.name}: QMP {name} timed out") from None
        except Exception as exc:  # the connection went: QEMU has exited
            raise QemuError(f"{self.name}: QMP {name}: {type(exc).__name__} {exc}; "
                            f"exit {self.proc.poll() if self.proc else None}: "
                            f"{self.stderr()}") from None

    def set_capabilities(self, *names: str) -> None:
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": c, "state": True} for c in names])

    def _pull(self, deadline: float) -> None:
        """Wait for the next event (or those already arrived) into ``events``."""
        assert self._qmp is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise QemuError(f"{self.name}: timed out waiting for a QMP event")
        try:
            evs = self._qmp.get_events(wait=float(left))
        except TimeoutError:
            raise QemuError(f"{self.name}: timed out waiting for a QMP event") from None
        except Exception as exc:
            raise QemuError(f"{self.name}: QMP closed ({type(exc).__name__}); exit "
                            f"{self.proc.poll() if self.proc else None}: {self.stderr()}") from None
        self.events.extend(evs)

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
            self._pull(deadline)

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
            self._pull(deadline)

    def wait_status(self, *statuses: str, timeout: float = 60.0) -> str:
        """Wait for a ``MIGRATION`` event with one of ``statuses`` (since the last migrate)."""
        deadline = time.monotonic() + timeout
        i = self._mark
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                status = ev.get("data", {}).get("status")
                if ev.get("event") == "MIGRATION" and status in statuses:
                    return str(status)
            self._pull(deadline)

    # -- migration ---------------------------------------------------------------------------------

    def migrate(self, uri: str, *, max_bandwidth: int = MAX_BANDWIDTH, resume: bool = False) -> None:
        """Start migrating to ``uri`` (returns at once; see :meth:`wait_migration`).
        ``resume``: continue a paused postcopy migration there."""
        self.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
        self._mark = len(self.events)  # wait_migration() looks at the events from here on
        if resume:
            self.cmd("migrate", uri=uri, resume=True)
        else:
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            try:
                qmp.close()
            except Exception:  # noqa: BLE001 - closing a connection to a killed QEMU
                pass
        if not self._loop.is_closed():
            self._loop.close()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
                pass
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- capturing streams ----------------------------------------------------------------------------


class Recorder:
    """A loopback listener that takes one connection and records what arrives on it.

    With ``forward_to``, it is a relay: every byte is also sent on to that address, and what
    comes back (the return path) is passed back to the sender, unrecorded. :meth:`cut` breaks
    both connections at once (a network failure, as postcopy recovery is tested with).
    """

    def __init__(self, timeout: float, forward_to: tuple[str, int] | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(timeout)
        self.port = self.listener.getsockname()[1]
        self.forward_to = forward_to
        self.timeout = timeout
        self.data: list[bytes] = []
        self.errors: list[BaseException] = []
        self._socks: list[socket.socket] = []
        self._cut = False
        self.thread = threading.Thread(target=self._run, name="qemu-capture", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        parts: list[bytes] = []
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(self.timeout)
            with conn:
                dst = None
                back = None
                self._socks.append(conn)
                if self.forward_to is not None:
                    dst = socket.create_connection(self.forward_to, timeout=self.timeout)
                    self._socks.append(dst)
                    back = threading.Thread(target=self._back, args=(dst, conn), daemon=True)
                    back.start()
                while data := conn.recv(1 << 20):
                    parts.append(data)
                    if dst is not None:
                        dst.sendall(data)
                self.data.append(b"".join(parts))
                if dst is not None:
                    dst.shutdown(socket.SHUT_WR)
                    assert back is not None
                    back.join(self.timeout)
                    dst.close()
        except BaseException as exc:  # reported by the caller
            if self._cut:
                self.data.append(b"".join(parts))
            else:
                self.errors.append(exc)

    def cut(self) -> None:
        """Break both connections now (what was recorded so far stays the result)."""
        self._cut = True
        for s in list(self._socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _back(dst: socket.socket, src: socket.socket) -> None:
        try:
            while data := dst.recv(1 << 16):
                src.sendall(data)
        except OSError:
            pass  # either side gone: the forward direction reports what matters

    def result(self, timeout: float) -> bytes:
        self.thread.join(timeout)
        self.listener.close()
        if self.thread.is_alive():
            raise QemuError("the capture did not see the end of the stream")
        if self.errors:
            raise QemuError(f"the capture failed: {self.errors[0]!r}")
        return self.data[0]


def capture(machine: str = "pc", mem: str = "16M", *, ram_file: str | None = None,
            machine_opts: str = "", capabilities: Sequence[str] = (),
            parameters: dict[str, Any] | None = None, destination: bool = False,
            postcopy: bool = False, recover: bool = False, colo: bool = False,
            extra_args: Sequence[str] = (),
            timeout: float = 60.0, binary: str = QEMU, data_dirs: Sequence[str] = ()) -> bytes:
    """Migrate a paused QEMU ``-M machine`` over loopback and return the stream's bytes.

    ``ram_file``: back guest RAM with this file (``share=off``). ``machine_opts``: appended to
    ``-machine`` (e.g. ``suppress-vmdesc=on``). ``capabilities``/``parameters``: set on the
    source before ``migrate`` (and the capabilities on the destination too).
    ``destination``: relay to a real destination QEMU (started ``-incoming defer``) and check
    it completes; needed for ``return-path`` and postcopy. ``postcopy``: switch to postcopy
    (``migrate-start-postcopy``) while precopy runs (implies ``destination`` and the
    ``postcopy-ram`` capability; precopy is slowed to 1 MB/s until the switch).
    ``recover``: postcopy as above, slowed to 8 KB/s; once it runs the connection is cut (both
    QEMUs pause), the destination is told ``migrate-recover`` and the source ``migrate`` with
    ``resume``; the bytes returned are those of the *resumed* connection (it carries no stream
    header: it opens with RECV_BITMAP and POSTCOPY_RESUME).
    ``colo``: the ``x-colo`` capability, into the sink: the source sends ENABLE_COLO, the whole
    state, then waits in COLO state for checkpoints from a secondary that is not there; once it
    is in that state it is killed, and the stream recorded up to then is returned.
    """
    caps = list(capabilities)
    if colo and "x-colo" not in caps:
        caps.append("x-colo")
    if recover:
        postcopy = True
    if postcopy:
        destination = True
        if "postcopy-ram" not in caps:
            caps.append("postcopy-ram")
    mopts = machine + ("," + machine_opts if machine_opts else "")
    common = dict(machine=mopts, mem=mem, capabilities=caps, timeout=timeout, binary=binary,
                  data_dirs=data_dirs)
    deadline = time.monotonic() + timeout
    dst: Qemu | None = None
    with Qemu(ram_file=ram_file, extra=extra_args, name="source", **common) as src:  # type: ignore[arg-type]
        try:
            forward = None
            if destination:
                dst = Qemu(incoming=True, name="destination", **common)  # type: ignore[arg-type]
                host, _, port = dst.listen().removeprefix("tcp:").rpartition(":")
                forward = (host, int(port))
            rec = Recorder(timeout, forward)
            if parameters:
                src.cmd("migrate-set-parameters", **parameters)
            if recover:
                src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 8192})
            src.migrate(f"tcp:127.0.0.1:{rec.port}",
                        max_bandwidth=1 << 20 if postcopy else MAX_BANDWIDTH)
            if postcopy:
                src.cmd("migrate-start-postcopy")
                src.wait_status("postcopy-active", "completed",
                                timeout=max(deadline - time.monotonic(), 0.1))
                src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            if recover:
                assert dst is not None
                rec.cut()
                rec.result(max(deadline - time.monotonic(), 0.1))
                left = max(deadline - time.monotonic(), 0.1)
                src.wait_status("postcopy-paused", timeout=left)
                dst.wait_status("postcopy-paused", timeout=left)
                with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for it
                    port = probe.getsockname()[1]
                dst.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{port}")
                rec = Recorder(timeout, ("127.0.0.1", port))
                src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
                src.migrate(f"tcp:127.0.0.1:{rec.port}", resume=True)
            if colo:
                src.wait_status("colo", timeout=max(deadline - time.monotonic(), 0.1))
                src.close()  # everything sent is delivered before the kernel's FIN
            else:
                src.wait_migration(max(deadline - time.monotonic(), 0.1))
            data = rec.result(max(deadline - time.monotonic(), 0.1))
            if dst is not None:
                dst.wait_migration(max(deadline - time.monotonic(), 0.1))
            return data
        finally:
            if dst is not None:
                dst.close()
