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
import os
from collections.abc import Iterator
from typing import Any

import pytest
from qmp_harness import QmpTestServer, RecordingTarget

from peers import REQUIRED

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
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    try:
        yield lp
    finally:
        asyncio.set_event_loop(None)
        lp.close()


@pytest.fixture
def monitor(tmp_path: Any) -> Iterator[tuple[QmpTestServer, RecordingTarget, str]]:
    path = os.path.join(tmp_path, "qmp.sock")
    target = RecordingTarget()
    server = QmpTestServer(path, target)
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
    finally:
        # the server hung up after its reply: the library reports that EOF on close, exactly as
        # with QEMU (QEMU's own python/qemu/machine expects it after 'quit')
        with pytest.raises(EOFError):
            qmp.close()
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
