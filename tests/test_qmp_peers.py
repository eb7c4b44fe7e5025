"""The QMP monitor as QEMU's own client library sees it: ``qemu.qmp.legacy.QEMUMonitorProtocol``
(PyPI ``qemu.qmp``, what QEMU's scripts and a user's tooling use) against the sans-IO server,
served on a UNIX socket in tmp_path by tests/qmp_harness.py (qioc_green channels, own IOThread).

The library checks the greeting's shape, negotiates, matches replies by the ids it assigns,
turns error replies into ExecuteError with the class, and queues events; if the server got
any of that wrong, these calls fail. The library runs an asyncio loop in this thread: the test
makes its own and closes it, so it leaves no fd behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from qioc_green.migration import Monitor
from tests.peers import REQUIRED, need_qemu10
from tests.polling import poll_pause, wait_until
from tests.qmp_harness import RecordingTarget, event_loop

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]

try:
    from qemu.qmp import ExecuteError
    from qemu.qmp.legacy import QEMUMonitorProtocol
except ImportError:  # pragma: no cover - the test extra installs it
    if REQUIRED:
        raise
    pytest.skip("qemu.qmp is not installed (pip install qemu.qmp)", allow_module_level=True)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    with event_loop() as lp:
        yield lp


@pytest.fixture
def monitor(tmp_path: Any) -> Iterator[tuple[Monitor, RecordingTarget, str]]:
    path = os.path.join(tmp_path, "qmp.sock")
    target = RecordingTarget()
    server = Monitor(f"unix:{path}", target)
    try:
        yield server, target, path
    finally:
        server.close()


def client(path: str) -> QEMUMonitorProtocol:
    qmp = QEMUMonitorProtocol(path)
    qmp.settimeout(10)
    return qmp


def test_qemu_qmp_connects_negotiates_and_runs_commands(monitor, loop):
    server, target, path = monitor
    qmp = client(path)
    try:
        greeting = qmp.connect(negotiate=True)
        assert greeting is not None
        assert greeting["QMP"]["version"]["qemu"]["major"] == 10
        assert qmp.cmd("query-status") == {"status": "inmigrate", "running": False}
        assert qmp.cmd("query-migrate") == {}
        assert qmp.cmd("migrate-set-parameters", **{"multifd-channels": 4}) == {}
        assert qmp.cmd("query-migrate-parameters")["multifd-channels"] == 4
        raw = qmp.cmd_obj({"execute": "query-version", "id": "mine"})
        assert raw["id"] == "mine" and raw["return"]["qemu"]["major"] == 10
    finally:
        qmp.close()
    assert target.calls == [("params", {"multifd-channels": 4})]


def test_error_replies_become_execute_errors(monitor, loop):
    _, target, path = monitor
    qmp = client(path)
    try:
        qmp.connect(negotiate=True)
        with pytest.raises(ExecuteError) as info:
            qmp.cmd("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as info:
            qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "xbzrle", "state": True}])
        assert info.value.error_class == "GenericError"
        assert "xbzrle" in str(info.value)
        # the connection is still fine after errors (and after garbage on the wire)
        assert qmp.cmd("query-status")["status"] == "inmigrate"
    finally:
        qmp.close()
    assert target.caps == {}


def test_events_reach_every_negotiated_client(monitor, loop):
    server, target, path = monitor
    first, second = client(path), client(path)
    try:
        first.connect(negotiate=True)
        second.connect(negotiate=True)
        first.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True}, {"capability": "return-path", "state": True}])
        assert first.cmd("migrate-incoming", uri="tcp:127.0.0.1:0") == {}
        for qmp in (first, second):
            (ev,) = qmp.get_events(wait=5.0)
            assert ev["event"] == "MIGRATION" and ev["data"] == {"status": "setup"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        server.status("active")
        server.status("active")  # said once
        server.status("completed")
        for qmp in (first, second):
            got = [qmp.pull_event(wait=5.0)["data"]["status"] for _ in range(2)]
            assert got == ["active", "completed"]
            assert qmp.get_events() == []
        info = first.cmd("query-migrate")
        assert info["status"] == "setup" and info["socket-address"][0]["port"] == "4444"
    finally:
        first.close()
        second.close()
    assert target.calls[-1] == ("incoming", ("tcp:127.0.0.1:0", True))


def test_quit_sends_shutdown_then_closes(monitor, loop):
    server, target, path = monitor
    qmp = client(path)
    try:
        qmp.connect(negotiate=True)
        assert qmp.cmd("quit") == {}
        (ev,) = qmp.get_events(wait=5.0)
        assert ev["event"] == "SHUTDOWN" and ev["data"]["reason"] == "host-qmp-quit"
        assert wait_until(lambda: server.clients == 0)  # the monitor hung up
    finally:
        # The server hung up after its reply.  Whether the library reports that EOF on close
        # depends on whether its reader task ran after the EOF came and before close() cancelled
        # it (a race in the client, with QEMU too), so QEMU's own python/qemu/machine takes both.
        try:
            qmp.close()
        except EOFError:
            pass
    assert target.quitted


def test_garbage_from_another_client_leaves_this_one_alone(monitor, loop):
    import socket

    _, _, path = monitor
    qmp = client(path)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        qmp.connect(negotiate=True)
        raw.settimeout(10)
        raw.connect(path)
        f = raw.makefile("rb")
        assert b'"QMP"' in f.readline()
        raw.sendall(b"\xff garbage {{{ \x01\n" + b"x" * (1 << 20) + b"\n")
        replies = [f.readline(), f.readline()]
        assert all(b'"GenericError"' in r for r in replies)
        raw.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
        assert f.readline() == b'{"return": {}, "id": 1}\r\n'
        assert qmp.cmd("query-status")["status"] == "inmigrate"
        f.close()
    finally:
        raw.close()
        qmp.close()


# -- differential: the same bytes to QEMU 10.0's monitor and to ours ------------------------------

PROBES = [
    b'{"execute": "query-status", "id": 1}\n',  # before negotiation
    b"garbage\n",
    b'{"execute": }\n',
    b"[1, 2]\n",
    b"42\n",
    b'{"execute": "qmp_capabilities", "arguments": {"x": 1}, "id": 2}\n',
    b'{"execute": "qmp_capabilities", "id": "n"}\n',
    b'{"execute": "qmp_capabilities", "id": "again"}\n',
    b'{"execute": "no-such-command", "id": {"a": [1]}}\n',
    b'{"execute": "query-status", "foo": 1, "id": 3}\n',
    b'{"execute": "query-status", "arguments": 5, "id": 4}\n',
    b'{"execute": 5, "id": 5}\n',
    b'{"id": 6}\n',
    b'{"exec-oob": "query-status", "id": 7}\n',
    b"{'execute': 'query-status', 'id': 'it\\'s'}\n",
    b'{"execute": "query-status", "arguments": {"x": 1}, "id": 8}\n',
    b'{"execute": "query-status", "id": "\xc3\x28"}\n',
    b'{"execute": "query-status", "id": "half\x01{"execute": "query-status", "id": 9}\n',
    b'{"execute": "query-status", "id": 10}\xff{"execute": "query-status", "id": 11}\n',
    b'{"execute": "query-migrate", "id": 12}\n',
    b'{"execute": "query-migrate-capabilities", "id": 13}\n',
    b'{"execute": "query-migrate-parameters", "id": 14}\n',
    b'{"execute": "migrate-set-capabilities", "id": 15}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "nope", "state": true}]}, "id": 16}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": "yes"}]}, "id": 17}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events"}]}, "id": 18}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "switchover-ack", "state": true}]}, "id": 19}\n',
    # pairs migrate_caps_check() refuses, in its order (none leaves a capability set)
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "multifd", "state": true}, {"capability": "postcopy-ram", "state": true}]}, "id": "pm"}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "postcopy-ram", "state": true}, {"capability": "x-ignore-shared", "state": true}]}, "id": "pi"}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "zero-copy-send", "state": true}]}, "id": "zc"}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "multifd", "state": true}, {"capability": "xbzrle", "state": true}]}, "id": "mx"}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "mapped-ram", "state": true}, {"capability": "xbzrle", "state": true}]}, "id": "rx"}\n',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "mapped-ram", "state": true}, {"capability": "postcopy-ram", "state": true}]}, "id": "rp"}\n',
    b'{"execute": "migrate-set-parameters", "arguments": {"nope": 1}, "id": 20}\n',
    b'{"execute": "migrate-set-parameters", "arguments": {"multifd-channels": "4"}, "id": 21}\n',
    b'{"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 256}, "id": 22}\n',
    b'{"execute": "migrate-set-parameters", "arguments": {"multifd-compression": "lz9"}, "id": 23}\n',
    b'{"execute": "migrate-set-parameters", "arguments": {"tls-creds": 5}, "id": 24}\n',
    b'{"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 4, "tls-creds": null}, "id": 25}\n',
    b'{"execute": "migrate-incoming", "id": 26}\n',
    b'{"execute": "migrate-incoming", "arguments": {"uri": 5}, "id": 27}\n',
    b'{"execute": "migrate-incoming", "arguments": {"uri": "bogus:1"}, "id": 28}\n',
    b'{"execute": "query-migrate",\n "id": 29}\n',
    b'{"execute": "query-migrate", "id": 30}{"execute": "query-migrate", "id": 31}\n',
    b'  {"execute": "query-migrate", "id": 32}',
    b'{"execute": "query-migrate", "id": "A' + b"A" * (1 << 19) + b'"}\n',  # half a MiB: fine
]


class _Raw:
    def __init__(self, path: str) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                poll_pause(0.01)  # waiting for a child to create its socket
        self.file = self.sock.makefile("rb")
        self.greeting = json.loads(self.file.readline())

    def replies(self, probe: bytes) -> list[Any]:
        """Send ``probe``; read replies until a marker request is answered."""
        self.sock.sendall(probe + b'{"execute": "query-commands", "id": "marker"}\n')
        out = []
        while True:
            msg = json.loads(self.file.readline())
            if msg.get("id") == "marker":
                return out
            out.append(msg)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_same_replies_as_qemu_10(monitor, tmp_path):
    argv = need_qemu10()
    qpath = os.path.join(tmp_path, "qemu-qmp.sock")
    proc = subprocess.Popen([*argv, "-M", "pc", "-accel", "tcg", "-nodefaults", "-display", "none",
                             "-S", "-incoming", "defer", "-qmp", f"unix:{qpath},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qemu = ours = None
    try:
        qemu, ours = _Raw(qpath), _Raw(monitor[2])
        assert set(ours.greeting["QMP"]["version"]) == set(qemu.greeting["QMP"]["version"])
        for probe in PROBES:
            want = qemu.replies(probe)
            assert ours.replies(probe) == want, probe
    finally:
        for raw in (qemu, ours):
            if raw is not None:
                raw.close()
        proc.kill()
        proc.wait(10)
