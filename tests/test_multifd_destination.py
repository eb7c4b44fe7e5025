"""Live: multifd where it meets the destination's other duties, with real QEMU 10.0 and 7.2
sources (and destinations): TLS on every channel (into the receiver with client
certificates, and through ``--forward`` into a TLS destination), the return path and
switchover-ack with multifd (answered, and relayed from a real destination), postcopy with
multifd (7.2 can be told to; 10.0 refuses it), the QMP monitor setting multifd for
``migrate-incoming`` (events, byte counts against the source's own), and libvirt's whole
flow: ``defer``, a ``tls-creds-x509`` object, multifd over QMP, a TLS multifd source.

RAM is compared byte for byte where the source is paused (its RAM is a file of random bytes);
a running source (switchover-ack only waits when it runs) is checked by completing.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.destination_util import WAIT, QmpClient, qemu, ram_bytes, receivers
from tests.test_destination_tls import failed, pki, tls_source

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]
__all__ = ["pki", "receivers"]
pytest.importorskip("qemu.qmp")

MEM = 16


def source(version: str, tmp_path: Path, *caps: str, channels: int = 2, paused: bool = True,
           **kw: Any) -> tuple[Any, bytes]:
    """A source with multifd (``channels``) and ``caps``; paused, its RAM random (returned)."""
    ram_file, ram = ram_bytes(tmp_path, MEM)
    src = qemu(version, mem=f"{MEM}M", ram_file=ram_file, name="source", paused=paused,
               capabilities=["multifd", *caps], **kw)
    src.cmd("migrate-set-parameters", **{"multifd-channels": channels})
    return src, ram


def destination(version: str, tmp_path: Path, *caps: str, channels: int = 2,
                paused: bool = True) -> Any:
    """An ``-incoming defer`` destination told of multifd, its RAM a file that follows it."""
    dst = qemu(version, mem=f"{MEM}M", ram_file=str(tmp_path / "dst.bin"), ram_share=True,
               incoming=True, paused=paused, name="destination",
               capabilities=["multifd", *caps])
    dst.cmd("migrate-set-parameters", **{"multifd-channels": channels})
    return dst


def summary(rx: Any) -> dict[str, Any]:
    d, _ = json.JSONDecoder().raw_decode(rx.stdout[rx.stdout.index("{"):])
    return dict(d)


def tls_server(dst: Any, creds: str) -> None:
    dst.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds,
                             "endpoint": "server"})
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})


# -- TLS on every channel ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_tls_multifd_into_the_receiver(receivers, tmp_path, pki, version):
    """Every connection (main and 3 channels) a TLS session with a client certificate checked
    (--tls-verify-peer), each read by an IOThread of its own; the return path answered inside
    the main one."""
    src, ram = source(version, tmp_path, "return-path", channels=3)
    with src:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "3", "--tls-creds",
                       pki["server"], "--tls-verify-peer", "--ram-dir", str(tmp_path / "ram"),
                       "--json", "-")
        tls_source(src, pki["client"])
        src.migrate(rx.address)
        info = src.wait_migration(WAIT)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    d = summary(rx)
    conns = d["multifd"]["connections"]
    assert sorted(c["channel_id"] for c in conns if c["kind"] == "multifd") == [0, 1, 2]
    assert len({c["iothread"] for c in conns}) == 4
    assert d["return_path"]["opened"] and d["return_path"]["pings"] == 1
    if version == "10":  # 10.0 counts every byte it wrote (7.2's count leaves some out)
        assert d["bytes_total"] == info["ram"]["transferred"]


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_tls_multifd_forward_into_a_tls_destination(receivers, tmp_path, pki, version):
    """TLS in, TLS out on every connection (the destination wants a client certificate),
    the destination's return path relayed inside both main sessions; the destination's RAM
    equals the source's, every connection passed on byte for byte."""
    src, ram = source(version, tmp_path, "return-path")
    with src, destination(version, tmp_path, "return-path") as dst:
        tls_server(dst, pki["server"])
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--tls-creds",
                       pki["server"], "--forward", dst.listen(), "--forward-tls-creds",
                       pki["client"], "--forward-tls-hostname", "localhost", "--digest",
                       "--json", "-")
        tls_source(src, pki["client"])
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert rx.wait() == 0, rx.stderr
        assert dst.status() == "prelaunch"
    assert (tmp_path / "dst.bin").read_bytes() == ram
    d = summary(rx)
    assert d["return_path"]["relayed"] == {"Pong": 1, "Shut": 1}
    for c in d["multifd"]["connections"]:
        assert c["sha256_in"] == c["sha256_out"] and c["forwarded"] == c["bytes"]


def test_a_tls_multifd_source_that_does_not_trust_us(receivers, tmp_path, pki):
    """Its CA did not sign our certificate: it hangs up after the main channel's handshake
    and opens no other; one line naming the connection."""
    src, _ = source("10", tmp_path)
    with src:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--tls-creds",
                       pki["server"])
        tls_source(src, pki["client-other-ca"])
        src.migrate(rx.address)
        assert "known issuer" in failed(src)
    assert rx.wait() == 1
    assert re.fullmatch(r"connection 0: offset 0: the source closed its TLS session before "
                        r"the stream began: did it refuse our certificate\? .*", rx.error_line())


def test_a_plaintext_multifd_source_into_a_tls_receiver(receivers, tmp_path, pki):
    src, _ = source("10", tmp_path, "return-path")
    with src:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--tls-creds",
                       pki["server"])
        src.migrate(rx.address)
        failed(src)
    assert rx.wait() == 1
    assert re.fullmatch(r"connection \d: offset 0: the source sent a plaintext (migration "
                        r"stream \(QEVM\)|multifd channel \(magic 0x11223344\)) where a TLS "
                        r"handshake should begin: .*", rx.error_line())


def test_a_tls_multifd_source_into_a_tls_receiver_not_told_of_multifd(receivers, tmp_path, pki):
    """The channels' handshakes are taken too, or the source would wait for them for ever
    before its main stream, and the receiver for the main stream."""
    src, _ = source("10", tmp_path)
    with src:
        rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"])
        tls_source(src, pki["client"])
        src.migrate(rx.address)
        failed(src)
    assert rx.wait() == 1
    assert "start it with --multifd-channels N" in rx.error_line() or \
        "start the receiver with --multifd-channels N" in rx.error_line()


# -- the return path and switchover-ack with multifd ----------------------------------------------


def test_switchover_ack_with_multifd_into_the_receiver(receivers, tmp_path):
    """A running source with switchover-ack does not switch over until the destination acks:
    it completing is the receiver's SWITCHOVER_ACK arriving on the multifd main channel."""
    src, _ = source("10", tmp_path, "return-path", "switchover-ack", paused=False)
    with src:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--json", "-")
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
    assert rx.wait() == 0, rx.stderr
    assert summary(rx)["return_path"]["switchover_ack"]


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_multifd_forward_relays_the_destination_return_path(receivers, tmp_path, version):
    """10.0: running source and destination with switchover-ack, so the source completes only
    on the destination's SWITCHOVER_ACK relayed; 7.2 (no switchover-ack): paused, RAM
    compared."""
    caps = ("return-path", "switchover-ack") if version == "10" else ("return-path",)
    running = version == "10"
    src, ram = source(version, tmp_path, *caps, paused=not running)
    with src, destination(version, tmp_path, *caps, paused=not running) as dst:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--forward", dst.listen(),
                       "--json", "-")
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert rx.wait() == 0, rx.stderr
        assert dst.status() == ("running" if running else "prelaunch")
    relayed = summary(rx)["return_path"]["relayed"]
    if running:
        assert relayed == {"SwitchoverAck": 1, "Pong": 1, "Shut": 1}
    else:
        assert relayed == {"Pong": 1, "Shut": 1}
        assert (tmp_path / "dst.bin").read_bytes() == ram


# -- postcopy with multifd: QEMU 10.0 refuses it, 7.2 does not ------------------------------------


def postcopy(src: Any, address: str) -> None:
    """Migrate slowly, switch to postcopy while precopy runs, then let it run at full speed."""
    src.migrate(address, max_bandwidth=8 << 20)
    src.wait_status("active", timeout=WAIT)
    src.cmd("migrate-start-postcopy")
    if src.wait_status("postcopy-active", "failed", "completed", timeout=WAIT) != "failed":
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 36})


def test_postcopy_with_multifd_from_7_2_into_the_receiver(receivers, tmp_path):
    """7.2 lets a source have both (its own destination aborts at the end; 10.0 refuses the
    pair): precopy pages on the channels, the rest on the main stream after the switch. The
    receiver takes it, requesting no page; RAM byte for byte."""
    src, ram = source("7.2", tmp_path, "return-path", "postcopy-ram")
    with src:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--ram-dir",
                       str(tmp_path / "ram"), "--json", "-")
        postcopy(src, rx.address)
        info = src.wait_migration(WAIT)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    assert summary(rx)["return_path"]["postcopy"]
    assert info["ram"]["postcopy-requests"] == 0 and info["ram"]["postcopy-bytes"] > 0


def test_postcopy_with_multifd_is_not_forwarded(receivers, tmp_path):
    """No destination could take it: refused at POSTCOPY_ADVISE, before any RAM; the source
    hears SHUT 1 and fails."""
    src, _ = source("7.2", tmp_path, "return-path", "postcopy-ram")
    with src, socket.create_server(("127.0.0.1", 0), backlog=4) as sink:
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--forward",
                       f"tcp:127.0.0.1:{sink.getsockname()[1]}")
        postcopy(src, rx.address)
        failed(src)
    assert rx.wait() == 1
    m = re.fullmatch(r"offset (\d+): POSTCOPY_ADVISE: the source has postcopy-ram with "
                     r"multifd, which cannot be forwarded .*", rx.error_line())
    assert m is not None and int(m[1]) < 4096, rx.error_line()


# -- the QMP monitor ---------------------------------------------------------------------------


def test_qmp_sets_multifd_for_migrate_incoming(receivers, tmp_path):
    """Multifd set over QMP (qemu.qmp's legacy client) takes effect for migrate-incoming; the
    events are a QEMU destination's (setup, active once every channel is in, completed);
    query-migrate's byte counts are the source's own, the channels' included."""
    from tests.qmp_harness import event_loop

    path = str(tmp_path / "rx.qmp")
    rx = receivers("--qmp", f"unix:{path}", "defer", "--ram-dir", str(tmp_path / "ram"))
    src, ram = source("10", tmp_path, "return-path", channels=3)
    with event_loop(), src:
        qmp = QmpClient(path)
        try:
            qmp.ok("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": True} for c in ("events", "return-path", "multifd")])
            qmp.ok("migrate-set-parameters", **{"multifd-channels": 3})
            assert qmp.error("migrate-set-capabilities", capabilities=[
                {"capability": "postcopy-ram", "state": True}]) == (
                "Postcopy is not yet compatible with multifd")
            assert qmp.error("migrate-incoming", uri="exec:cat").startswith(
                "Migration requires multi-channel URIs (e.g. tcp): ")
            qmp.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
            address = rx.line().removeprefix("listening on ")
            src.migrate(address)
            theirs = src.wait_migration(WAIT)["ram"]
            assert qmp.statuses("completed") == ["setup", "active", "completed"]
            ours = qmp.ok("query-migrate")
            assert ours["status"] == "completed"
            for key in ("transferred", "multifd-bytes"):
                assert ours["ram"][key] == theirs[key], key
            assert ours["ram"]["normal"] >= MEM << 8  # every page of the random RAM
            assert ours["ram"]["normal"] + ours["ram"]["duplicate"] == \
                ours["ram"]["total"] // 4096
            assert qmp.ok("query-status") == {"status": "prelaunch", "running": False}
            qmp.ok("quit")
        finally:
            qmp.close()
    assert rx.wait() == 0, rx.stderr
    assert "3 multifd channels" in rx.stdout
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_libvirt_drives_a_tls_multifd_migration_over_qmp(receivers, tmp_path, pki, version):
    """libvirt's order: -incoming defer; object-add tls-creds-x509 (endpoint server,
    verify-peer on: client certificates required); migrate-set-parameters tls-creds,
    multifd-channels, multifd-compression; capabilities; migrate-incoming; then the TLS
    multifd source; MIGRATION events; query-migrate; quit."""
    from tests.qmp_harness import event_loop

    path = str(tmp_path / "rx.qmp")
    rx = receivers("--qmp", f"unix:{path}", "defer", "--ram-dir", str(tmp_path / "ram"))
    extra = ("return-path", "switchover-ack") if version == "10" else ("return-path",)
    caps = ("events", "multifd", *extra)
    src, ram = source(version, tmp_path, *extra)
    with event_loop(), src:
        qmp = QmpClient(path)
        try:
            qmp.ok("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                    "dir": pki["server"], "endpoint": "server"})
            qmp.ok("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 2,
                                                "multifd-compression": "zlib"})
            qmp.ok("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": True} for c in caps])
            qmp.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
            address = rx.line().removeprefix("listening on ")
            src.cmd("migrate-set-parameters", **{"multifd-compression": "zlib"})
            tls_source(src, pki["client"])
            src.migrate(address)
            theirs = src.wait_migration(WAIT)["ram"]
            assert qmp.statuses("completed") == ["setup", "active", "completed"]
            ours = qmp.ok("query-migrate")["ram"]
            if version == "10":  # (7.2's own count leaves some bytes out)
                assert ours["transferred"] == theirs["transferred"]
            assert ours["multifd-bytes"] > MEM << 20  # the pages came on the channels
            qmp.ok("quit")
        finally:
            qmp.close()
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
