"""``qioc-migration-receiver --qmp unix:PATH defer``, driven by qemu.qmp's blocking client (QEMU's
own Python library, as a user's tooling would drive it): capabilities and parameters,
``migrate-incoming``, ``MIGRATION`` events, ``query-migrate`` and ``query-status``, TLS objects,
``quit``. The migrations here are streams real QEMUs wrote, played by a test source that reads
its return path (fast, no QEMU); test_destination_live.py has the same with a live QEMU source.
Misbehaving clients (garbage, a 1 MiB line, one that never reads) share the monitor with a good
one during a migration.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from qioc_green.migration import Shut, encode_pong, encode_shut
from tests.destination_util import (
    WAIT,
    QmpClient,
    as_source,
    connect,
    load,
    messages,
    receivers,
    tls_dirs,
)
from tests.qmp_harness import event_loop

pytestmark = pytest.mark.timeout(60)
__all__ = ["receivers"]

pytest.importorskip("qemu.qmp.legacy")


@pytest.fixture
def loop() -> Iterator[Any]:
    with event_loop() as lp:
        yield lp


def start(receivers: Any, tmp_path: Any, *args: str) -> tuple[Any, QmpClient]:
    path = str(tmp_path / "rx.qmp")
    rx = receivers("--qmp", f"unix:{path}", "defer", *args)
    assert rx.said == [f"qmp on unix:{path}"]
    return rx, QmpClient(path)


def listen(rx: Any, qmp: QmpClient, uri: str = "tcp:127.0.0.1:0") -> str:
    assert qmp.ok("migrate-incoming", uri=uri) == {}
    line = rx.line()
    assert line.startswith("listening on "), line
    return line.removeprefix("listening on ")


def test_defer_then_a_migration_then_quit(receivers, tmp_path, loop):
    rx, qmp = start(receivers, tmp_path, "--ram-dir", str(tmp_path / "ram"))
    try:
        assert qmp.greeting["QMP"]["version"]["qemu"]["major"] == 10
        assert qmp.ok("query-migrate") == {}
        assert qmp.ok("query-status") == {"status": "inmigrate", "running": False}
        caps = [{"capability": c, "state": True} for c in ("events", "return-path")]
        assert qmp.ok("migrate-set-capabilities", capabilities=caps) == {}
        assert qmp.error("migrate-set-capabilities", capabilities=[
            {"capability": "xbzrle", "state": True}]) == (
            "Capability 'xbzrle': XBZRLE-encoded pages are not supported by this receiver")
        assert "does not accept value 'nope'" in qmp.error(
            "migrate-set-capabilities", capabilities=[{"capability": "nope", "state": True}])
        assert qmp.ok("migrate-set-parameters", **{"multifd-channels": 4,
                                                    "downtime-limit": 500}) == {}
        assert qmp.error("migrate-set-parameters", **{"tls-authz": "authz0"}) == (
            "tls-authz is not supported by this receiver")
        params = qmp.ok("query-migrate-parameters")
        assert params["multifd-channels"] == 4 and params["downtime-limit"] == 500
        states = {c["capability"]: c["state"] for c in qmp.ok("query-migrate-capabilities")}
        assert states["return-path"] and states["events"] and not states["xbzrle"]
        assert qmp("no-such-command")["error"] == {
            "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}

        address = listen(rx, qmp)
        info = qmp.ok("query-migrate")
        port = address.rsplit(":", 1)[1]
        assert info == {"status": "setup", "socket-address": [
            {"type": "inet", "host": "127.0.0.1", "port": port, "ipv4": True}]}
        assert qmp.error("migrate-incoming", uri="tcp:127.0.0.1:0") == (
            "The incoming migration has already been started")

        stream = load("cmd-return-path-7.2")
        assert as_source(address, stream) == encode_pong(1) + encode_shut(0)
        assert qmp.statuses("completed") == ["setup", "active", "completed"]
        info = qmp.ok("query-migrate")
        assert info["status"] == "completed" and "socket-address" not in info
        ram = info["ram"]
        assert ram["transferred"] == len(stream) and ram["total"] > 16 << 20
        assert ram["duplicate"] + ram["normal"] == ram["total"] // 4096
        # the run state the source had (it was paused, -S): what a destination would be in
        assert qmp.ok("query-status") == {"status": "prelaunch", "running": False}
        assert rx.proc.poll() is None  # the monitor stays up after the migration
        assert qmp.ok("quit") == {}
    finally:
        qmp.close()
    assert rx.wait() == 0, rx.stderr
    assert rx.stdout.startswith("complete: ")
    assert (tmp_path / "ram" / "pc.ram").stat().st_size == 16 << 20


def test_a_failed_migration_is_reported_and_the_monitor_stays(receivers, tmp_path, loop):
    rx, qmp = start(receivers, tmp_path)
    try:
        qmp.ok("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        address = listen(rx, qmp, f"unix:{tmp_path / 'in.sock'}")
        assert qmp.ok("query-migrate")["socket-address"] == [
            {"type": "unix", "path": str(tmp_path / "in.sock")}]
        data = load("cmd-return-path-7.2")
        got = as_source(address, data[:100_000], cut=True)
        assert messages(got)[-1] == Shut(1)
        assert qmp.statuses("completed") == ["setup", "active", "failed"]
        info = qmp.ok("query-migrate")
        assert info["status"] == "failed"
        assert info["error-desc"].startswith("offset 100000: ")
        assert qmp.ok("query-status")["status"] == "inmigrate"
        qmp.ok("quit")
    finally:
        qmp.close()
    assert rx.wait() == 1
    assert rx.error_line().startswith("offset 100000: ")


def test_quit_before_any_migration_and_during_one(receivers, tmp_path, loop):
    rx, qmp = start(receivers, tmp_path)
    try:
        qmp.ok("quit")
    finally:
        qmp.close()
    assert rx.wait() == 1  # no migration completed

    rx, qmp = start(receivers, tmp_path)
    try:
        address = listen(rx, qmp)
        with connect(address) as s:
            s.sendall(load("pc")[:50_000])  # and then nothing: the migration is under way
            deadline = time.monotonic() + WAIT
            while qmp.ok("query-migrate")["status"] != "active":
                assert time.monotonic() < deadline
            qmp.ok("quit")
            s.settimeout(WAIT)
            try:  # cut short: the receiver closed the source's connection (a FIN, or a reset)
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        qmp.close()
    assert rx.wait() == 1
    assert "stopped" in rx.error_line()


def test_tls_objects_over_qmp(receivers, tmp_path, loop):
    """object-add of tls-creds-x509 (as libvirt does), then migrate-set-parameters tls-creds:
    the source must then speak TLS; a plaintext one is refused with one line."""
    dirs = tls_dirs(tmp_path)
    rx, qmp = start(receivers, tmp_path)
    try:
        assert qmp.error("migrate-set-parameters", **{"tls-creds": "tls0"}) == (
            "No TLS credentials with id 'tls0'")
        assert "no such file" in qmp.error("object-add", **{
            "qom-type": "tls-creds-x509", "id": "bad", "dir": str(tmp_path), "endpoint": "server"})
        assert qmp.error("object-add", **{"qom-type": "secret", "id": "s0"}) == (
            "object type 'secret' is not supported by this receiver (only tls-creds-x509)")
        qmp.ok("object-add", **{"qom-type": "tls-creds-x509", "id": "cli", "dir": dirs["client"],
                                "endpoint": "client"})
        assert qmp.error("migrate-set-parameters", **{"tls-creds": "cli"}) == (
            "Expected TLS credentials for a server endpoint")
        qmp.ok("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": dirs["server"],
                                "endpoint": "server", "verify-peer": False})
        assert "duplicate" in qmp.error("object-add", **{
            "qom-type": "tls-creds-x509", "id": "tls0", "dir": dirs["server"]})
        qmp.ok("migrate-set-parameters", **{"tls-creds": "tls0"})
        assert qmp.ok("query-migrate-parameters")["tls-creds"] == "tls0"
        address = listen(rx, qmp)
        assert as_source(address, load("pc")) == b""  # refused: nothing answered
        deadline = time.monotonic() + WAIT
        while (info := qmp.ok("query-migrate"))["status"] != "failed":
            assert time.monotonic() < deadline
        assert "plaintext migration stream (QEVM)" in info["error-desc"]
        qmp.ok("quit")
    finally:
        qmp.close()
    assert rx.wait() == 1
    assert "plaintext migration stream (QEVM)" in rx.error_line()


def test_misbehaving_clients_leave_the_others_and_the_migration_alone(receivers, tmp_path, loop):
    """During a migration: one client sends garbage and a 1 MiB line (one error reply each, and
    it stays usable), one floods requests and never reads (it is dropped, not waited for), one
    hangs up mid-command. The good client's events and answers are unaffected, as is the
    migration."""
    rx, qmp = start(receivers, tmp_path)
    path = str(tmp_path / "rx.qmp")
    silent = connect(f"unix:{path}")
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        qmp.ok("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        address = listen(rx, qmp)
        data = load("cmd-return-path-7.2")
        with connect(address) as src:
            src.sendall(data[:150_000])
            # the rude ones, while the migration is under way
            with connect(f"unix:{path}") as rude:
                rude.settimeout(WAIT)
                reader = rude.makefile("rb")

                def reply() -> Any:  # the next reply (an event may come between: skip it)
                    while "event" in (msg := json.loads(reader.readline())):
                        pass
                    return msg

                assert b'"QMP"' in reader.readline()
                rude.sendall(b'{"execute": "qmp_capabilities"}\n')
                assert reply() == {"return": {}}
                # (garbage that opens brackets would leave the parser inside a value, as
                # QEMU's: a control byte is the client's way back, so it ends this garbage)
                rude.sendall(b"garbage }}} {{{ [ \x00\n" + b"A" * (1 << 20) + b"\n")
                errors = [reply() for _ in range(2)]
                assert all(e["error"]["class"] == "GenericError" for e in errors), errors
                rude.sendall(b'{"execute": "query-status", "id": 7}\n')
                assert reply() == {
                    "return": {"status": "inmigrate", "running": False}, "id": 7}
                reader.close()
            with connect(f"unix:{path}") as quitter:
                quitter.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-mi')
            # the silent one negotiated nothing and reads nothing; a flood of replies to it
            try:
                silent.sendall(b'{"execute": "query-version"}\n' * 20_000)
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped already
            # the receiver says "active" once it has taken the source's connection (in its own
            # IOThread, so not necessarily before the rude clients are done): wait for it
            deadline = time.monotonic() + WAIT
            while (status := qmp.ok("query-migrate")["status"]) == "setup":
                assert time.monotonic() < deadline
            assert status == "active"
            src.sendall(data[150_000:])
            got = bytearray()
            while not messages(bytes(got)) or messages(bytes(got))[-1] != Shut(0):
                chunk = src.recv(4096)
                assert chunk
                got += chunk
        assert qmp.statuses("completed") == ["setup", "active", "completed"]
        assert qmp.ok("query-migrate")["status"] == "completed"
        # the silent one was dropped once its outbox (64 replies) was full: it sees the end
        silent.settimeout(WAIT)
        try:
            while silent.recv(65536):
                pass
        except ConnectionResetError:
            pass
        qmp.ok("quit")
    finally:
        qmp.close()
        silent.close()
    assert rx.wait() == 0, rx.stderr


def test_migrate_incoming_refusals_and_a_tcp_monitor(receivers, tmp_path, loop):
    """A monitor on TCP (port 0: the line says the port); migrate-incoming's errors as QEMU's,
    and the receiver's own: nothing starts until one succeeds."""
    rx = receivers("--qmp", "tcp:127.0.0.1:0", "defer")
    host, port = rx.said[0].removeprefix("qmp on tcp:").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    qmp = QmpClient((host, int(port)))
    try:
        assert qmp.error("migrate-incoming", uri="ftp:x") == "unknown migration protocol: ftp:x"
        assert "expected" in qmp.error("migrate-incoming", uri="tcp:nohostport")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = taken.getsockname()[1]
            assert qmp.error("migrate-incoming", uri=f"tcp:127.0.0.1:{busy}").startswith(
                f"Failed to listen on tcp:127.0.0.1:{busy}: ")
        assert qmp.ok("query-migrate") == {}
        assert "need either 'uri' or 'channels'" in qmp.error("migrate-incoming")
        qmp.ok("quit")
    finally:
        qmp.close()
    assert rx.wait() == 1


def test_a_qmp_address_that_cannot_be_served_is_one_line(tmp_path):
    import subprocess

    from tests.destination_util import PROGRAM

    path = tmp_path / "no-such-dir" / "rx.qmp"
    r = subprocess.run([*PROGRAM, "--qmp", f"unix:{path}", "defer"], capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 1
    assert r.stderr.startswith(f"qioc-migration-receiver: cannot serve QMP on unix:{path}: ")
    assert r.stderr.count("\n") == 1


# -- multifd and file: over QMP, with captures of QEMU 10.0.2 (tests/data) ----------------------


def test_multifd_over_qmp_turns_active_once_every_channel_is_in(receivers, tmp_path, loop):
    """multifd set over QMP, then migrate-incoming; the main channel alone is not enough to be
    active (QEMU's destination waits for every channel); query-migrate counts every
    connection's bytes, the channels' as multifd-bytes."""
    from qioc_green.migration import sniff_channel
    from qioc_green.migration.qemu import pattern_ram
    from tests.migdata import load_connections
    from tests.polling import wait_until

    conns = load_connections("none-multifd2")
    main = next(c for c in conns if sniff_channel(c) == "main")
    channels = [c for c in conns if sniff_channel(c) == "multifd"]
    rx, qmp = start(receivers, tmp_path, "--ram-dir", str(tmp_path / "ram"))
    socks: list[socket.socket] = []
    try:
        qmp.ok("migrate-set-capabilities", capabilities=[
            {"capability": c, "state": True} for c in ("events", "multifd")])
        address = listen(rx, qmp)
        socks.append(connect(address))
        socks[0].sendall(main)  # it waits at its first sync point for the channels
        # "ram" appears with the first bytes counted (a QEMU destination leaves it out before)
        assert wait_until(lambda: qmp.ok("query-migrate").get("ram", {}).get("transferred", 0) > 0, WAIT)
        assert qmp.ok("query-migrate")["status"] == "setup"
        for data in channels:
            socks.append(connect(address))
            socks[-1].sendall(data)
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        assert qmp.statuses("completed") == ["setup", "active", "completed"]
        ram = qmp.ok("query-migrate")["ram"]
        assert ram["transferred"] == sum(map(len, conns))
        assert ram["multifd-bytes"] == sum(map(len, channels))
        assert ram["normal"] + ram["duplicate"] >= 1024  # the 4 MiB block's pages, and more
        qmp.ok("quit")
    finally:
        qmp.close()
        for s in socks:
            s.close()
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "ram").read_bytes() == pattern_ram(4 << 20)


def test_migrate_incoming_reads_a_file_as_the_command_line_does(receivers, tmp_path, loop):
    """migrate-incoming file: looks at what the file holds, as the command line's file: does:
    a mapped-ram file is read with positional reads (it is no stream); and the command
    line's --save, which a mapped-ram file cannot take, is refused at migrate-incoming."""
    import gzip

    from qioc_green.migration.qemu import pattern_ram
    from tests.migdata import DATA

    path = tmp_path / "mapped.mig"
    path.write_bytes(gzip.decompress((DATA / "none-mapped-ram.file.gz").read_bytes()))
    rx, qmp = start(receivers, tmp_path, "--save", str(tmp_path / "out.mig"))
    try:
        assert qmp.error("migrate-incoming", uri=f"file:{path}").startswith(
            "--save does not apply to a mapped-ram file")
        qmp.ok("quit")
    finally:
        qmp.close()
    assert rx.wait() == 1
    (tmp_path / "rx.qmp").unlink(missing_ok=True)
    rx, qmp = start(receivers, tmp_path, "--ram-dir", str(tmp_path / "ram"))
    try:
        qmp.ok("migrate-set-capabilities", capabilities=[
            {"capability": c, "state": True} for c in ("events", "mapped-ram")])
        assert qmp.ok("migrate-incoming", uri=f"file:{path}") == {}
        assert qmp.statuses("completed") == ["setup", "active", "completed"]
        qmp.ok("quit")
    finally:
        qmp.close()
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "ram").read_bytes() == pattern_ram(4 << 20)
