"""The receiver as a destination for real QEMU 10.0 and 7.2 sources: return path, switchover-ack,
postcopy (``migrate-start-postcopy`` while precopy runs, slowed with ``max-bandwidth``), a
forward into a real destination that resumes, page requests through the relayed return path,
a source that vanishes during postcopy, and the QMP monitor driven by qemu.qmp.

Guest RAM is backed by a file of random bytes and the sources are paused unless the test needs
a running one, so the rebuilt RAM must equal that file byte for byte. Every QEMU is started by
the test (``qioc_green.migration.qemu``), driven through QMP events, killed by its pid.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.destination_util import MAX_BANDWIDTH, WAIT, QmpClient, qemu, ram_bytes, receivers

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]
__all__ = ["receivers"]
pytest.importorskip("qemu.qmp")

MEM = 16  # MiB of guest RAM


def summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_return_path_precopy(receivers, tmp_path, version):
    ram_file, ram = ram_bytes(tmp_path, MEM)
    rx = receivers("tcp:127.0.0.1:0", "--ram-dir", str(tmp_path / "ram"),
                   "--json", str(tmp_path / "s.json"))
    with qemu(version, mem=f"{MEM}M", ram_file=ram_file, name="source",
              capabilities=["return-path"]) as src:
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    rp = summary(tmp_path / "s.json")["return_path"]
    assert rp["opened"] and rp["pings"] == 1 and rp["mode"] == "answered"


def test_switchover_ack_lets_a_running_source_switch_over(receivers, tmp_path):
    """A running 10.0 source with switchover-ack does not switch over until it is acked."""
    rx = receivers("tcp:127.0.0.1:0", "--json", str(tmp_path / "s.json"))
    with qemu("10", mem=f"{MEM}M", paused=False, name="source",
              capabilities=["return-path", "switchover-ack"]) as src:
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
    assert rx.wait() == 0, rx.stderr
    assert summary(tmp_path / "s.json")["return_path"]["switchover_ack"] is True


def postcopy(src: Any, address: str, *, postcopy_bandwidth: int = 0) -> None:
    """Migrate with precopy slowed to 8 MiB/s, switch to postcopy while it is active."""
    if postcopy_bandwidth:
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": postcopy_bandwidth})
    src.migrate(address, max_bandwidth=8 << 20)
    src.wait_status("active")
    src.cmd("migrate-start-postcopy")
    src.wait_status("postcopy-active")


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_postcopy_into_the_receiver_rebuilds_ram_byte_for_byte(receivers, tmp_path, version):
    """No page is requested: the source's background pass sends every page after the switch,
    and the RAM file ends equal to the guest's."""
    ram_file, ram = ram_bytes(tmp_path, MEM)
    rx = receivers("tcp:127.0.0.1:0", "--ram-dir", str(tmp_path / "ram"),
                   "--json", str(tmp_path / "s.json"))
    with qemu(version, mem=f"{MEM}M", ram_file=ram_file, name="source",
              capabilities=["return-path", "postcopy-ram"]) as src:
        postcopy(src, rx.address)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        info = src.wait_migration(WAIT)
    assert info["status"] == "completed"
    assert info["ram"]["postcopy-requests"] == 0
    assert info["ram"]["postcopy-bytes"] > 0  # pages did come after the switch
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    d = summary(tmp_path / "s.json")
    assert d["complete"] and not d["described"] and d["return_path"]["postcopy"]
    assert d["return_path"]["pings"] == 4


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_forward_with_return_path_resumes_the_destination(receivers, tmp_path, version):
    """A running source, through the receiver, into a real destination: the destination's
    answers are relayed, the source completes, and the destination runs the VM."""
    caps = ["return-path"] + (["switchover-ack"] if version == "10" else [])
    with qemu(version, mem=f"{MEM}M", paused=False, name="source", capabilities=caps) as src, \
            qemu(version, mem=f"{MEM}M", incoming=True, paused=False, name="destination",
                 capabilities=caps) as dst:
        rx = receivers("tcp:127.0.0.1:0", "--forward", dst.listen(),
                       "--json", str(tmp_path / "f.json"))
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert dst.status() == "running"
        assert rx.wait() == 0, rx.stderr
    rp = summary(tmp_path / "f.json")["return_path"]
    assert rp["mode"] == "relayed" and rp["relayed"]["Shut"] == 1 and rp["relayed"]["Pong"] == 1
    assert rp["relayed"].get("SwitchoverAck", 0) == (1 if version == "10" else 0)


def test_forward_postcopy_answers_page_requests_through_the_relay(receivers, tmp_path):
    """Postcopy through the receiver: reading a page the destination lacks (its monitor's
    ``xp``) makes it request the page on its return path; the request is relayed to the source,
    which sends the page first, through the receiver; the destination reads the guest's bytes."""
    ram_file, ram = ram_bytes(tmp_path, MEM)
    caps = ["return-path", "postcopy-ram"]
    with qemu("10", mem=f"{MEM}M", ram_file=ram_file, name="source", capabilities=caps) as src, \
            qemu("10", mem=f"{MEM}M", incoming=True, name="destination",
                 capabilities=caps) as dst:
        rx = receivers("tcp:127.0.0.1:0", "--forward", dst.listen(), "--ram-dir",
                       str(tmp_path / "ram"), "--json", str(tmp_path / "f.json"))
        postcopy(src, rx.address, postcopy_bandwidth=1 << 20)  # 16 s for the background pass
        dst.wait_status("postcopy-active")
        at = (MEM << 20) - 4096  # the last page: the background pass gets there last
        text = dst.cmd("human-monitor-command", **{"command-line": f"xp /2xg {at:#x}"})
        words = [int(w, 16) for w in text.split(":", 1)[1].split()]
        assert words == [int.from_bytes(ram[at + i : at + i + 8], "little") for i in (0, 8)]
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": MAX_BANDWIDTH})
        info = src.wait_migration(WAIT)
        assert info["ram"]["postcopy-requests"] >= 1
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert rx.wait() == 0, rx.stderr
    rp = summary(tmp_path / "f.json")["return_path"]
    assert rp["postcopy"] and rp["relayed"]["ReqPages"] >= 1
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram


def test_a_source_that_goes_away_during_postcopy(receivers, tmp_path):
    """Killed once postcopy runs: one line saying so, exit 1, no hang (no recovery here)."""
    ram_file, _ = ram_bytes(tmp_path, MEM)
    rx = receivers("tcp:127.0.0.1:0")
    with qemu("10", mem=f"{MEM}M", ram_file=ram_file, name="source",
              capabilities=["return-path", "postcopy-ram"]) as src:
        postcopy(src, rx.address, postcopy_bandwidth=256 << 10)  # a minute to go
        src.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert rx.wait() == 1
    assert time.monotonic() - t0 < 10
    line = rx.error_line()
    assert "the source went away during postcopy, and postcopy recovery is not supported" in line


# -- the QMP monitor with a live source -------------------------------------------------------


def test_qmp_monitor_drives_a_live_migration(receivers, tmp_path):
    """-incoming defer as libvirt drives it, with qemu.qmp: capabilities (events, return-path,
    switchover-ack, postcopy-ram), migrate-incoming, the MIGRATION events through postcopy,
    query-migrate's byte counts, query-status the running source's state, quit."""
    from tests.qmp_harness import event_loop

    ram_file, ram = ram_bytes(tmp_path, MEM)
    path = str(tmp_path / "rx.qmp")
    rx = receivers("--qmp", f"unix:{path}", "defer", "--ram-dir", str(tmp_path / "ram"))
    caps = ["return-path", "switchover-ack", "postcopy-ram"]
    with event_loop():
        qmp = QmpClient(path)
        try:
            qmp.ok("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": True} for c in ["events", *caps]])
            qmp.ok("migrate-set-parameters", **{"downtime-limit": 500})
            qmp.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
            address = rx.line().removeprefix("listening on ")
            with qemu("10", mem=f"{MEM}M", ram_file=ram_file, paused=False, name="source",
                      capabilities=caps) as src:
                postcopy(src, address)
                src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
                sent = src.wait_migration(WAIT)
            assert qmp.statuses("completed") == ["setup", "active", "postcopy-active",
                                                 "completed"]
            info = qmp.ok("query-migrate")
            assert info["status"] == "completed"
            got = info["ram"]
            assert got["total"] == sent["ram"]["total"]
            assert got["postcopy-bytes"] > 0 and got["precopy-bytes"] > 0
            assert got["transferred"] == got["precopy-bytes"] + got["postcopy-bytes"]
            assert qmp.ok("query-status") == {"status": "running", "running": True}
            qmp.ok("quit")
        finally:
            qmp.close()
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").stat().st_size == MEM << 20
