"""Live: real QEMU 7.2 and 10.0 sources with multifd (and mapped-ram, xbzrle) into the receiver,
through it into real destinations, and what it refuses. RAM is compared byte for byte: the
source's RAM is a file of random bytes (``share=off``, paused, so the file is what the pages
hold) and a destination's RAM is a file too (``share=on``: the file follows guest RAM).

Every test runs against both QEMUs where both apply (``qemu`` fixture; 10.0 is found through
``QIOC_QEMU10``): multifd came in QEMU 4.0, so 7.2 sources exercise the older sync protocol
(a sync at every EOS, stale payload sizes in packets without pages).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests import test_migration_receiver as _rx

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]


WAIT = _rx.WAIT
receivers = _rx.receivers  # the fixture: a receiver process per call, killed at the end

MEM = "16M"


@pytest.fixture(params=["7.2", "10.0"])
def qemu(request) -> dict[str, Any]:
    """``{"version": "7.2" | "10.0", "args": Qemu keyword arguments}`` for each installed QEMU."""
    from tests.peers import qemu_args

    return {"version": request.param, "args": qemu_args("10" if request.param == "10.0" else request.param)}


def random_ram(path: Path, seed: object) -> bytes:
    ram = random.Random(str(seed)).randbytes(16 << 20)
    path.write_bytes(ram)
    return ram


def source(tmp_path: Path, qemu: dict[str, Any], *, machine: str = "q35", seed: object = 0,
           capabilities: tuple[str, ...] = ("multifd",), **kw: Any):
    """A paused source whose RAM is random; returns (Qemu, its RAM bytes)."""
    from qioc_green.migration.qemu import Qemu

    ram = random_ram(tmp_path / "src-ram.bin", seed)
    q = Qemu(machine=machine, mem=MEM, ram_file=str(tmp_path / "src-ram.bin"),
             capabilities=capabilities, name="source", **qemu["args"], **kw)
    return q, ram


def multifd(q, channels: int, compression: str = "none") -> None:
    q.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                       "multifd-compression": compression})


def one_line(rx) -> str:
    lines = [ln for ln in rx.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, rx.stderr
    return lines[0].removeprefix("qioc-migration-receiver: ")


# -- into the receiver ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels,compression", [(2, "none"), (4, "none"), (2, "zlib"),
                                                  (4, "zstd")])
def test_live_multifd_into_the_receiver_rebuilds_ram(receivers, tmp_path, qemu, channels,
                                                     compression):
    src, ram = source(tmp_path, qemu, seed=(channels, compression))
    with src:
        multifd(src, channels, compression)
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", str(channels),
                       "--ram-dir", str(tmp_path / "ram"), "--json", str(tmp_path / "s.json"))
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["complete"] and d["machine"] == f"pc-q35-{qemu['version']}"
    conns = d["multifd"]["connections"]
    assert sorted(c["channel_id"] for c in conns if c["kind"] == "multifd") == list(range(channels))
    assert len({c["iothread"] for c in conns}) == channels + 1
    assert {c["compression"] for c in conns if c["kind"] == "multifd"} == {compression}
    # the pages came on the channels, not on the main stream
    main = next(c for c in conns if c["kind"] == "main")
    assert main["bytes"] < 1 << 20 < sum(c["bytes"] for c in conns if c["kind"] == "multifd")


@pytest.mark.parametrize("channels", [0, 4], ids=["one-stream", "multifd-4"])
def test_live_migration_into_preallocated_ram_files(receivers, tmp_path, qemu, channels):
    """--ram-prealloc pc.ram=SIZE: the file is allocated and mapped before "listening on",
    the channels receive the pages straight into it (the main stream copies its own into
    it), and it ends byte for byte the source's RAM; the other blocks are files as always."""
    src, ram = source(tmp_path, qemu, seed=("prealloc", channels),
                      capabilities=("multifd",) if channels else ())
    with src:
        args = ["--multifd-channels", str(channels)] if channels else []
        if channels:
            multifd(src, channels, "none")
        rx = receivers("tcp:127.0.0.1:0", *args, "--ram-dir", str(tmp_path / "ram"),
                       "--ram-prealloc", f"pc.ram={len(ram) >> 20}M")
        assert (tmp_path / "ram" / "pc.ram").stat().st_size == len(ram)  # before the stream
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    index = json.loads((tmp_path / "ram" / "blocks.json").read_text())
    assert index["pc.ram"] == {"file": "pc.ram", "size": len(ram)} and len(index) > 1


def test_live_preallocated_size_the_stream_does_not_declare_is_refused(receivers, tmp_path,
                                                                       qemu):
    src, ram = source(tmp_path, qemu, seed="prealloc-size")
    with src:
        multifd(src, 2, "none")
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--ram-dir",
                       str(tmp_path / "ram"), "--ram-prealloc", f"pc.ram={2 * len(ram)}")
        src.migrate(rx.address)
        assert rx.wait() == 1
    assert re.fullmatch(rf"offset \d+: RAM block 'pc.ram' is {len(ram)} bytes, not the "
                        rf"{2 * len(ram)} preallocated for it \(--ram-prealloc\)",
                        one_line(rx)), rx.stderr


def test_live_multifd_forward_into_a_destination_and_replay(receivers, tmp_path, qemu):
    """source -> receiver --forward (4 channels) -> destination (-incoming defer, multifd set):
    the destination's RAM equals the source's; then the --save files replayed from file: into a
    second destination give the same RAM again."""
    from qioc_green.migration.qemu import Qemu

    def destination(name: str) -> Qemu:
        dst = Qemu(machine="q35", mem=MEM, ram_file=str(tmp_path / f"{name}.bin"), ram_share=True,
                   incoming=True, capabilities=["multifd"], name=name, **qemu["args"])
        multifd(dst, 4)
        return dst

    src, ram = source(tmp_path, qemu, seed="forward")
    save = tmp_path / "fwd.mig"
    with src, destination("dest") as dst:
        multifd(src, 4)
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "4", "--forward", dst.listen(),
                       "--ram-dir", str(tmp_path / "ram"), "--save", str(save), "--digest",
                       "--json", str(tmp_path / "f.json"))
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert rx.wait() == 0, rx.stderr
        assert dst.status() == "prelaunch"
    assert (tmp_path / "dest.bin").read_bytes() == ram
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    d = json.loads((tmp_path / "f.json").read_text())
    for c in d["multifd"]["connections"]:
        assert c["sha256_in"] == c["sha256_out"] and c["forwarded"] == c["bytes"]
    assert len(list(tmp_path.glob("fwd.mig.multifd-*"))) == 4

    with destination("replay") as dst2:
        rx = receivers(f"file:{save}", "--forward", dst2.listen(), listens=False)
        assert rx.wait() == 0, rx.stderr
        assert dst2.wait_migration(WAIT)["status"] == "completed"
    assert (tmp_path / "replay.bin").read_bytes() == ram


def test_live_old_source_through_the_receiver_into_qemu_10_on_its_machine_type(receivers,
                                                                              tmp_path):
    """An upgrade: a QEMU 7.2 source (pc-i440fx-7.2) through the receiver into a QEMU 10.0
    destination on the same machine type; the destination's RAM equals the source's."""
    from qioc_green.migration.qemu import Qemu
    from tests.peers import need, qemu_args

    need("qemu-system-x86_64")
    q10 = qemu_args("10")
    src, ram = source(tmp_path, {"args": {}}, machine="pc-i440fx-7.2", seed="upgrade",
                      capabilities=())
    with src, Qemu(machine="pc-i440fx-7.2", mem=MEM, ram_file=str(tmp_path / "dst.bin"),
                   ram_share=True, incoming=True, name="dest-10.0", **q10) as dst:
        rx = receivers("tcp:127.0.0.1:0", "--forward", dst.listen(), "--json", "-")
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert rx.wait() == 0, rx.stderr
        assert dst.status() == "prelaunch"
    assert '"machine": "pc-i440fx-7.2"' in rx.stdout
    assert (tmp_path / "dst.bin").read_bytes() == ram


@pytest.mark.parametrize("with_multifd", [False, True], ids=["mapped-ram", "mapped-ram+multifd"])
def test_live_mapped_ram_file_into_the_receiver(receivers, tmp_path, with_multifd):
    from qioc_green.migration.qemu import capture_file
    from tests.peers import qemu_args

    q10 = qemu_args("10")
    ram = random_ram(tmp_path / "src-ram.bin", with_multifd)
    path = tmp_path / "vm.mig"
    caps = ["mapped-ram", "multifd"] if with_multifd else ["mapped-ram"]
    capture_file(str(path), "q35", MEM, uri_options=",offset=4096",
                 ram_file=str(tmp_path / "src-ram.bin"), capabilities=caps,
                 parameters={"multifd-channels": 2} if with_multifd else None,
                 **q10)  # type: ignore[arg-type]
    extra = ["--multifd-channels", "2"] if with_multifd else []
    rx = receivers(f"file:{path},offset=4096", "--ram-dir", str(tmp_path / "ram"),
                   "--json", str(tmp_path / "m.json"), *extra, listens=False)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["complete"] and d["machine"] == "pc-q35-10.0"
    assert d["mapped_ram"]["bytes_copied"] >= len(ram)


# -- refused, with one line naming what --------------------------------------------------------


def test_live_multifd_source_into_a_receiver_not_told(receivers, tmp_path, qemu):
    from qioc_green.migration.qemu import QemuError

    src, _ = source(tmp_path, qemu)
    with src:
        multifd(src, 2)
        rx = receivers("tcp:127.0.0.1:0", "--ram-dir", str(tmp_path / "ram"))
        src.migrate(rx.address)
        with pytest.raises(QemuError):
            src.wait_migration(WAIT)
        assert rx.wait() == 1
    # whichever it sees first: a multifd connection, or the main stream's first MULTIFD_FLUSH
    assert re.fullmatch(r"offset \d+: (connection \d is a multifd channel \(magic 0x11223344\), "
                        r"but the receiver was not told to expect any: start it with|"
                        r"MULTIFD_FLUSH: the source uses the multifd capability; start the "
                        r"receiver with) --multifd-channels N \(the source's multifd-channels\)",
                        one_line(rx))


def test_live_more_channels_than_the_receiver_was_told(receivers, tmp_path):
    from qioc_green.migration.qemu import QemuError
    from tests.peers import qemu_args

    src, _ = source(tmp_path, {"args": qemu_args("10")})
    with src:
        multifd(src, 4)
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2")
        src.migrate(rx.address)
        with pytest.raises(QemuError):
            src.wait_migration(WAIT)
        assert rx.wait() == 1
    line = one_line(rx)
    assert re.fullmatch(r"connection \d: offset (24: channel id [23]|0: multifd connection [34]), "
                        r"but the migration has 2 multifd channels .*", line), line


def test_live_compression_other_than_the_receiver_was_told(receivers, tmp_path):
    from qioc_green.migration.qemu import QemuError
    from tests.peers import qemu_args

    src, _ = source(tmp_path, {"args": qemu_args("10")})
    with src:
        multifd(src, 2, "zstd")
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2",
                       "--multifd-compression", "zlib")
        src.migrate(rx.address)
        with pytest.raises(QemuError):
            src.wait_migration(WAIT)
        assert rx.wait() == 1
    assert re.fullmatch(r"multifd channel [01]: offset \d+: packet compressed with zstd, the "
                        r"channel uses zlib", one_line(rx))


def test_live_mapped_ram_file_as_a_stream_is_refused(receivers, tmp_path):
    from qioc_green.migration.qemu import capture_file
    from tests.peers import qemu_args

    path = tmp_path / "vm.mig"
    capture_file(str(path), "q35", MEM, capabilities=["mapped-ram"], **qemu_args("10"))
    rx = receivers(f"exec:cat '{path}'", listens=False)
    assert rx.wait() == 1
    assert one_line(rx).endswith("capability mapped-ram: a mapped-ram migration is a file with "
                                 "RAM at fixed offsets; read it with file:PATH, not as a "
                                 "sequential stream")


def test_live_xbzrle_is_refused_at_its_first_encoded_page(receivers, tmp_path, qemu):
    """xbzrle is declared nowhere in the stream: it shows when a page is sent again. The source
    is paused; its guest RAM is written through QEMU's qtest protocol while it migrates slowly
    with a downtime it cannot meet, so pages are sent again, xbzrle-encoded."""
    from qioc_green.migration.qemu import Qemu, QemuError

    qt = tmp_path / "qtest.sock"
    with socket.socket(socket.AF_UNIX) as lst:
        lst.bind(str(qt))
        lst.listen(1)
        lst.settimeout(WAIT)
        with Qemu(machine="pc", mem=MEM, capabilities=["xbzrle"], name="source",
                  extra=["-qtest", f"unix:{qt}"], **qemu["args"]) as src:
            conn, _ = lst.accept()
            with conn, conn.makefile("rw") as f:
                def write_pages(value: int) -> None:
                    for i in range(256):  # 1 MiB from 1 MiB on
                        f.write(f"writeq 0x{0x100000 + i * 4096:x} 0x{value + i:x}\n")
                    f.flush()
                    for _ in range(256):
                        assert f.readline().startswith("OK"), "qtest write refused"

                write_pages(1)
                rx = receivers("tcp:127.0.0.1:0")
                src.cmd("migrate-set-parameters", **{"downtime-limit": 1})
                src.migrate(rx.address, max_bandwidth=4 << 20)
                for r in range(2, 400):  # bounded: the receiver refuses within a few rounds
                    write_pages(r << 16)
                    if rx.proc.poll() is not None:
                        break
                src.cmd("migrate-set-parameters", **{"downtime-limit": 300})
                # the source may have put everything into the socket before we refused it
                with contextlib.suppress(QemuError):
                    src.wait_migration(WAIT)
        assert rx.wait() == 1
    assert re.fullmatch(r"offset \d+: XBZRLE-encoded page \(RAM flag 0x40\) is not supported: "
                        r"switch the xbzrle capability off", one_line(rx))

