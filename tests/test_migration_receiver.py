"""The migration receiver program (``qioc-migration-receiver``, ``python -m qioc_green.migration``),
end to end.

The first half needs no QEMU: captured streams (tests/data) are sent over loopback, UNIX
sockets, inherited fds, exec: and file:, whole, cut short, with the sender vanishing mid-page,
and as garbage. The second half migrates real QEMU 7.2 VMs (TCG, tiny, no disk) into the
receiver and through it into a real destination (``peers.need``). Every process is started by
the test, bounded by timeouts, and killed by its pid; sockets are on 127.0.0.1 or in tmp_path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qioc_green.migration import NEED_DATA, RamPages, StreamParser
from tests.destination_util import connect
from tests.polling import poll_pause

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = [sys.executable, "-m", "qioc_green.migration"]
DATA = Path(__file__).parent / "data"
ENV = dict(os.environ)
WAIT = 30.0  # bound on any one receiver run


def load(name: str) -> bytes:
    return gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())


class Rx:
    """One receiver process; ``address`` is what its first stdout line says it listens on."""

    def __init__(self, uri: str, *args: str, listens: bool = True, pass_fds: tuple[int, ...] = ()):
        self.proc = subprocess.Popen([*PROGRAM, uri, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                     pass_fds=pass_fds)
        self.address = ""
        if listens:
            line = self._first_line()
            assert line.startswith("listening on "), line
            self.address = line.removeprefix("listening on ")
        self.stdout = ""
        self.stderr = ""

    def _first_line(self) -> str:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + WAIT
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError("receiver did not say where it listens")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"receiver exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            buf += chunk
        line, _, self._rest = buf.partition(b"\n")
        return line.decode()

    def wait(self, timeout: float = WAIT) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout = getattr(self, "_rest", b"").decode() + out.decode()
        self.stderr = err.decode()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def receivers():
    started: list[Rx] = []

    def start(uri: str, *args: str, **kw) -> Rx:
        rx = Rx(uri, *args, **kw)
        started.append(rx)
        return rx

    yield start
    for rx in started:
        rx.kill()


def send(address: str, data: bytes, *, reset: bool = False) -> None:
    """Send ``data`` and close: a FIN, or with ``reset`` an RST (the sender vanishing)."""
    with connect(address) as s:
        s.sendall(data)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def one_error_line(rx: Rx) -> str:
    lines = [ln for ln in rx.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, rx.stderr
    assert lines[0].startswith("qioc-migration-receiver: offset "), lines[0]
    return lines[0]


# -- without QEMU: captured streams ------------------------------------------------------------


def test_tcp_stream_saved_byte_exact_and_summarised(receivers, tmp_path):
    data = load("pc")
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "s.mig"),
                   "--json", str(tmp_path / "s.json"), "--digest")
    assert rx.address.startswith("tcp:127.0.0.1:") and not rx.address.endswith(":0")
    send(rx.address, data)
    assert rx.wait() == 0, rx.stderr
    assert rx.stderr == ""
    assert (tmp_path / "s.mig").read_bytes() == data
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["complete"] is True and d["machine"] == "pc-i440fx-7.2"
    assert d["bytes_total"] == len(data) and d["elapsed_s"] >= 0
    assert d["sha256_in"] == hashlib.sha256(data).hexdigest()
    assert {"idstr", "instance_id", "version_id", "section_id", "bytes", "records"} <= \
        set(d["sections"][0])
    assert {b["name"] for b in d["ram_blocks"]} >= {"pc.ram", "pc.bios"}
    assert "ram" not in d["devices"] and "timer" in d["devices"]
    assert "complete: " in rx.stdout


def test_unix_keep_listening_names_each_migration(receivers, tmp_path):
    sock = tmp_path / "in.sock"
    rx = receivers(f"unix:{sock}", "--keep-listening", "--count", "2",
                   "--save", str(tmp_path / "m.mig"), "--json", str(tmp_path / "m-{n}.json"))
    assert rx.address == f"unix:{sock}"
    streams = [load("pc"), load("q35")]
    for data in streams:
        send(rx.address, data)
    assert rx.wait() == 0, rx.stderr
    for n, data in enumerate(streams, 1):
        assert (tmp_path / f"m-{n}.mig").read_bytes() == data
        assert json.loads((tmp_path / f"m-{n}.json").read_text())["complete"] is True
    assert not sock.exists()  # the listener's socket file is removed


def wait_for_file(path: Path, size: int | None = None) -> None:
    """Until another process has written ``path`` (to ``size`` bytes); bounded."""
    deadline = time.monotonic() + WAIT
    while not (path.exists() and (size is None or path.stat().st_size == size)):
        assert time.monotonic() < deadline, f"{path} never appeared"
        poll_pause(0.01)  # observing a file another process writes: nothing to wait on


def test_sigterm_keeps_what_was_received(receivers, tmp_path):
    """--keep-listening until SIGTERM: the finished migration stands, the one cut short is
    reported on one line, and both files are kept."""
    data = load("pc")
    rx = receivers("tcp:127.0.0.1:0", "--keep-listening", "--save", str(tmp_path / "s.mig"),
                   "--json", str(tmp_path / "s.json"))
    send(rx.address, data)
    wait_for_file(tmp_path / "s-1.json")
    with connect(rx.address) as s:
        s.sendall(data[:100000])
        wait_for_file(tmp_path / "s-2.mig", 100000)
        rx.proc.send_signal(signal.SIGTERM)
        assert rx.wait() == 1
    assert rx.stderr.strip() == "qioc-migration-receiver: migration 2: offset 100000: stopped by SIGTERM"
    assert (tmp_path / "s-1.mig").read_bytes() == data
    assert (tmp_path / "s-2.mig").read_bytes() == data[:100000]
    assert json.loads((tmp_path / "s-2.json").read_text())["error"] == "offset 100000: stopped by SIGTERM"


def test_exec_and_file_sources(receivers, tmp_path):
    data = load("q35")
    f = tmp_path / "q35.mig"
    f.write_bytes(data)
    rx = receivers(f"exec:cat '{f}'", "--json", str(tmp_path / "a.json"), listens=False)
    assert rx.wait() == 0, rx.stderr
    assert json.loads((tmp_path / "a.json").read_text())["bytes_total"] == len(data)
    # file:PATH,offset=N skips a prefix (QEMU 8.2's form; newer QEMUs write such files)
    g = tmp_path / "prefixed.mig"
    g.write_bytes(b"\xff" * 4096 + data)
    rx = receivers(f"file:{g},offset=4096", "--save", str(tmp_path / "b.mig"), listens=False)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "b.mig").read_bytes() == data


def test_a_summary_that_cannot_be_written_is_said(receivers, tmp_path):
    """--json where no file can be written: the migration is taken, then one line says the
    summary is lost and why, and the exit status is 1 (it was 1 with nothing said)."""
    f = tmp_path / "q35.mig"
    f.write_bytes(load("q35"))
    for target, why in ((tmp_path / "none" / "s.json", "No such file or directory"),
                        (tmp_path, "Is a directory")):
        rx = receivers(f"file:{f}", "--json", str(target), listens=False)
        assert rx.wait() == 1
        lines = [ln for ln in rx.stderr.splitlines() if ln.strip()]
        assert lines == [f"qioc-migration-receiver: cannot write the summary to {target}: {why}"]
        assert rx.stdout.startswith("complete: "), rx.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q35.mig"]


def test_inherited_fd_source(receivers, tmp_path):
    data = load("none")
    ours, theirs = socket.socketpair()
    with ours:
        try:
            rx = receivers(f"fd:{theirs.fileno()}", "--save", str(tmp_path / "c.mig"),
                           listens=False, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "c.mig").read_bytes() == data


def test_inherited_listening_socket(receivers, tmp_path):
    """fd:N naming a listening socket (as a supervisor would hand over) is accepted on."""
    data = load("none")
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        rx = receivers(f"fd:{lst.fileno()}", "--save", str(tmp_path / "d.mig"),
                       pass_fds=(lst.fileno(),))
        assert rx.address == f"tcp:127.0.0.1:{lst.getsockname()[1]}"
    send(rx.address, data)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "d.mig").read_bytes() == data


def first_page_offset(data: bytes) -> int:
    """Stream offset of the first normal page's data (found by its bytes)."""
    p = StreamParser()
    p.feed(data)
    while (ev := p.next_event()) is not NEED_DATA:
        if isinstance(ev, RamPages):
            page = bytes(ev.iov()[0])
            assert data.count(page) == 1
            return data.find(page)
    raise AssertionError("no page")


@pytest.mark.parametrize("where", ["header", "mid-page", "device-json"])
def test_truncated_stream_over_the_network(receivers, tmp_path, where):
    data = load("pc")
    cut = {"header": 6, "mid-page": first_page_offset(data) + 2000,
           "device-json": len(data) - 50}[where]
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "t.mig"),
                   "--json", str(tmp_path / "t.json"))
    send(rx.address, data[:cut])
    assert rx.wait() == 1
    line = one_error_line(rx)
    assert "ends" in line or "expected" in line, line
    assert (tmp_path / "t.mig").read_bytes() == data[:cut]  # the prefix is kept
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["complete"] is False and d["error"] in line and d["bytes_total"] == cut


def test_sender_vanishing_mid_page(receivers, tmp_path):
    data = load("pc")
    cut = first_page_offset(data) + 1000
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "v.mig"))
    send(rx.address, data[:cut], reset=True)
    assert rx.wait() == 1
    line = one_error_line(rx)
    saved = (tmp_path / "v.mig").read_bytes()
    # an RST may discard bytes the receiver had not read yet: what was saved is a prefix
    assert data[:cut].startswith(saved)
    assert line.startswith(f"qioc-migration-receiver: offset {len(saved)}: "), line
    assert "connection reset by peer; stream ends inside" in line, line


def test_garbage_and_trailing_bytes(receivers, tmp_path):
    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "g.mig"))
    garbage = bytes(range(256)) * 64
    send(rx.address, garbage)
    assert rx.wait() == 1
    assert "offset 0: expected magic" in one_error_line(rx)
    assert (tmp_path / "g.mig").read_bytes() == garbage

    data = load("none")
    rx = receivers("tcp:127.0.0.1:0")
    send(rx.address, data + b"\0junk")
    assert rx.wait() == 1
    assert "after the end of the stream" in one_error_line(rx)


def test_quiet_sender_below_the_low_water_mark_is_still_read(receivers, tmp_path):
    """The receiver asks the kernel to wake it only at 1 MiB queued; a sender that sends less
    and then goes quiet (connection open) must still have its bytes read and saved."""
    data = load("none")
    assert len(data) < 1 << 20
    saved = tmp_path / "q.mig"
    rx = receivers("tcp:127.0.0.1:0", "--save", str(saved))

    with connect(rx.address) as s:
        # the first part is read and saved, so the receiver then parks on an empty socket;
        # the rest arrives while it is parked, less than the mark, and the sender goes quiet
        s.sendall(data[:1000])
        wait_for_file(saved, 1000)
        s.sendall(data[1000:])
        wait_for_file(saved, len(data))
    assert rx.wait() == 0, rx.stderr
    assert saved.read_bytes() == data


def test_idle_timeout(receivers, tmp_path):
    data = load("pc")
    rx = receivers("tcp:127.0.0.1:0", "--idle-timeout", "0.3", "--save", str(tmp_path / "i.mig"))
    with connect(rx.address) as s:
        s.sendall(data[:5000])
        assert rx.wait() == 1  # the connection is still open: only the timeout ends it
    assert one_error_line(rx) == "qioc-migration-receiver: offset 5000: no data for 0.3 s"
    assert (tmp_path / "i.mig").read_bytes() == data[:5000]


def test_undescribed_stream_needs_permission(receivers):
    data = load("pc-nodesc")
    rx = receivers("tcp:127.0.0.1:0")
    send(rx.address, data)
    assert rx.wait() == 1
    assert "VM description" in one_error_line(rx)
    rx = receivers("tcp:127.0.0.1:0", "--allow-undescribed")
    send(rx.address, data)
    assert rx.wait() == 0, rx.stderr


def test_forward_without_qemu_and_unreachable_destination(receivers, tmp_path):
    """Forward to our own sink (bytes out == bytes in); then to a port nobody listens on."""
    data = load("q35")
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        lst.settimeout(WAIT)
        port = lst.getsockname()[1]
        rx = receivers("tcp:127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{port}", "--digest",
                       "--json", str(tmp_path / "f.json"))
        sender = threading.Thread(target=send, args=(rx.address, data))
        sender.start()
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(WAIT)
            got = b"".join(iter(lambda: conn.recv(1 << 16), b""))
        sender.join(WAIT)
    assert rx.wait() == 0, rx.stderr
    assert got == data
    d = json.loads((tmp_path / "f.json").read_text())
    assert d["sha256_in"] == d["sha256_out"] == hashlib.sha256(data).hexdigest()

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rx = receivers("tcp:127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{dead}")
    with contextlib.suppress(OSError):  # the receiver may drop us before we are done
        send(rx.address, data)
    assert rx.wait() == 1
    assert "forward to tcp:127.0.0.1:" in one_error_line(rx)


def test_ram_dir_holes_rewrites_and_names(tmp_path):
    """RamDir in-process: zero pages stay holes, a zero page over data clears it, names."""
    from qioc_green.migration import RamBlock, RamBlocks, RamDir, ZeroPages

    rd = RamDir(str(tmp_path / "ram"))
    try:
        rd.blocks(RamBlocks((RamBlock("pc.ram", 1 << 20), RamBlock("/rom@etc/acpi/tables", 8192)),
                            (1 << 20) + 8192))
        page = memoryview(b"\xaa" * 4096)
        rd.pages(RamPages("pc.ram", 8192, 1, page, 4104, 4096))
        rd.zeros(ZeroPages("pc.ram", 0, 16, 0, 4096))  # a run over the written page
        rd.zeros(ZeroPages("pc.ram", 512 << 10, 4, 0, 4096))  # a hole stays a hole
        rd.pages(RamPages("/rom@etc/acpi/tables", 4096, 1, page, 4104, 4096))
        rd.zeros(ZeroPages("/rom@etc/acpi/tables", 0, 1, 0x11, 4096))  # fill byte
    finally:
        rd.close()
    ram = (tmp_path / "ram" / "pc.ram").read_bytes()
    assert ram == bytes(1 << 20)
    fd = os.open(tmp_path / "ram" / "pc.ram", os.O_RDONLY)
    try:
        with pytest.raises(OSError):  # ENXIO: no data from 64 KiB on, all holes
            os.lseek(fd, 64 << 10, os.SEEK_DATA)
    finally:
        os.close(fd)
    assert (tmp_path / "ram" / "rom@etc_acpi_tables").read_bytes() == \
        b"\x11" * 4096 + b"\xaa" * 4096
    index = json.loads((tmp_path / "ram" / "blocks.json").read_text())
    assert index["/rom@etc/acpi/tables"] == {"file": "rom@etc_acpi_tables", "size": 8192}

    huge = RamDir(str(tmp_path / "huge"))
    try:
        with pytest.raises(OSError, match="RAM block 'x'"):
            huge.blocks(RamBlocks((RamBlock("x", 1 << 62),), 1 << 62))
    finally:
        huge.close()


def test_ram_dir_preallocated(tmp_path):
    """RamDir(prealloc=...): the file whole before any stream, pages copied in (strided main
    stream records too), a zero page clears data and leaves zeros alone, another size refused,
    a block the stream never declared removed at close and left out of blocks.json."""
    from qioc_green.migration import RamBlock, RamBlocks, RamDir, ZeroPages

    path = tmp_path / "ram"
    rd = RamDir(str(path), prealloc={"pc.ram": 1 << 20, "unused": 64 << 10})
    try:
        assert rd.preallocated and rd.mapping("pc.ram") is None  # not declared yet
        assert (path / "pc.ram").stat().st_size == 1 << 20
        assert (path / "pc.ram").stat().st_blocks * 512 >= 1 << 20  # allocated, not sparse
        with pytest.raises(OSError, match=r"RAM block 'pc.ram' is 2097152 bytes, not the "
                                          r"1048576 preallocated for it \(--ram-prealloc\)"):
            rd.blocks(RamBlocks((RamBlock("pc.ram", 2 << 20),), 2 << 20))
        rd.blocks(RamBlocks((RamBlock("pc.ram", 1 << 20), RamBlock("vga.vram", 8192)),
                            (1 << 20) + 8192))
        assert rd.mapping("pc.ram") is not None and rd.mapping("vga.vram") is None
        records = b"".join(struct.pack(">Q", 0) + bytes([i]) * 4096 for i in (1, 2))
        rd.pages(RamPages("pc.ram", 8192, 2, memoryview(records)[8:], 4104, 4096))
        rd.pages(RamPages("pc.ram", 64 << 10, 1, memoryview(b"\xaa" * 4096), 4096, 4096))
        rd.zeros(ZeroPages("pc.ram", 64 << 10, 1, 0, 4096))  # over data: cleared
        rd.zeros(ZeroPages("pc.ram", 0, 2, 0, 4096))  # over zeros: nothing to do
        rd.pages(RamPages("vga.vram", 4096, 1, memoryview(b"\xbb" * 4096), 4096, 4096))
    finally:
        rd.close()
    want = bytearray(1 << 20)
    want[8192:16384] = b"\x01" * 4096 + b"\x02" * 4096
    assert (path / "pc.ram").read_bytes() == want
    assert (path / "vga.vram").read_bytes() == bytes(4096) + b"\xbb" * 4096
    assert not (path / "unused").exists()
    assert set(json.loads((path / "blocks.json").read_text())) == {"pc.ram", "vga.vram"}


def test_preallocated_sizes_and_refusals(tmp_path):
    from qioc_green.migration._sinks import preallocated

    rd = preallocated(["pc.ram=1M", "a=b=4096", "z=0"], str(tmp_path / "r"), one=True)
    try:
        assert [(tmp_path / "r" / n).stat().st_size for n in ("pc.ram", "a_b", "z")] == \
            [1 << 20, 4096, 0]
    finally:
        rd.close()
    for bad in ("pc.ram", "pc.ram=", "=1G", "pc.ram=1X", "pc.ram=-1", "pc.ram=1.5G"):
        with pytest.raises(ValueError, match="expected BLOCK=SIZE"):
            preallocated([bad], str(tmp_path / "r2"), one=True)
    with pytest.raises(ValueError, match="needs --ram-dir"):
        preallocated(["pc.ram=1M"], None, one=True)
    with pytest.raises(ValueError, match="one migration"):
        preallocated(["pc.ram=1M"], str(tmp_path / "r3"), one=False)
    with pytest.raises(OSError, match="RAM block 'x' of 1152921504606846976 bytes: "):
        preallocated(["x=1048576T"], str(tmp_path / "r4"), one=True)
    assert not (tmp_path / "r4" / "x").exists()


@pytest.mark.parametrize("argv,code,line", [
    (["--ram-prealloc", "pc.ram=1M"], 2, "--ram-prealloc: needs --ram-dir"),
    (["--ram-prealloc", "pc.ram", "--ram-dir", "{tmp}/r"], 2, "expected BLOCK=SIZE"),
    (["--ram-prealloc", "pc.ram=1M", "--ram-dir", "{tmp}/r", "--keep-listening"], 2,
     "one migration on a tcp: or unix: URI"),
    (["--ram-prealloc", "x=1048576T", "--ram-dir", "{tmp}/r"], 1,
     "--ram-prealloc: RAM block 'x' of 1152921504606846976 bytes: "),
])
def test_ram_prealloc_usage(tmp_path, argv, code, line):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run([*PROGRAM, "tcp:127.0.0.1:0", *argv], capture_output=True, text=True,
                       timeout=WAIT, env=ENV)
    assert p.returncode == code, p.stderr
    assert line in p.stderr and "listening on" not in p.stdout, p.stderr


def test_a_refused_stream_never_reaches_the_destination_whole(receivers):
    """Forwarding lags one chunk behind parsing: a stream refused only at its end (here: no VM
    description, not allowed) is cut short at the destination, which then fails too."""
    data = load("pc-nodesc")
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        lst.settimeout(WAIT)
        rx = receivers("tcp:127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{lst.getsockname()[1]}")
        sender = threading.Thread(target=send, args=(rx.address, data))
        sender.start()
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(WAIT)
            got = b"".join(iter(lambda: conn.recv(1 << 16), b""))
        sender.join(WAIT)
    assert rx.wait() == 1
    assert "VM description" in one_error_line(rx)
    assert len(got) < len(data) and data.startswith(got)


def test_usage_errors():
    for argv in (["bogus:1"], ["tcp:127.0.0.1"], ["exec:cat x", "--keep-listening"],
                 ["file:x,size=3"], ["tcp:127.0.0.1:0", "--count", "2"],
                 ["tcp:127.0.0.1:0", "--multifd-channels", "2", "--channel-timeout", "0"],
                 ["tcp:127.0.0.1:0", "--save", "-"], ["tcp:127.0.0.1:0", "--buffer-size", "lots"],
                 ["tcp:127.0.0.1:0", "--buffer-size", "1G", "--buffers", "8"],
                 ["tcp:127.0.0.1:0", "--buffers", "100000"]):
        r = subprocess.run([*PROGRAM, *argv], check=False, capture_output=True,
                           text=True, env=ENV, timeout=WAIT)
        assert r.returncode == 2, (argv, r.stderr)
        assert "usage:" in r.stderr
    r = subprocess.run([*PROGRAM, "--help"], check=False, capture_output=True,
                       text=True, env=ENV, timeout=WAIT)
    assert r.returncode == 0 and "--forward" in r.stdout and "--keep-listening" in r.stdout


# -- with a real QEMU ----------------------------------------------------------------------------


def need_qemu() -> None:
    from tests.peers import need

    need("qemu-system-x86_64")


@pytest.fixture(params=["7.2", "10.0"])
def qemu(request):
    """``(version, Qemu keyword arguments)``: each live test runs against QEMU 7.2 and 10.0."""
    from tests.peers import qemu_args

    return request.param, qemu_args("10" if request.param == "10.0" else request.param)


def random_ram(tmp_path: Path, mib: int) -> tuple[Path, bytes]:
    ram = os.urandom(mib << 20)
    path = tmp_path / "ram.bin"
    path.write_bytes(ram)
    return path, ram


def ramblocks(qemu) -> dict[str, int]:
    """QEMU's own list of RAM blocks and their used sizes (HMP ``info ramblock``)."""
    text = qemu.cmd("human-monitor-command", **{"command-line": "info ramblock"})
    out = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5:
            # name, PSize (two words: "4 KiB"), Offset, Used, Total (QEMU 10 adds HVA, RO)
            out[cols[0]] = int(cols[4], 16)
    return out


@pytest.mark.peers
def test_live_tcp_summary_matches_what_qemu_reports(receivers, tmp_path, qemu):
    version, args = qemu
    from qioc_green.migration import VmDescription
    from qioc_green.migration.qemu import Qemu

    rx = receivers("tcp:127.0.0.1:0", "--save", str(tmp_path / "l.mig"),
                   "--json", str(tmp_path / "l.json"))
    with Qemu(machine="pc", mem="32M", name="source", **args) as src:
        blocks = ramblocks(src)
        src.migrate(rx.address)
        info = src.wait_migration(WAIT)
    assert rx.wait() == 0, rx.stderr
    d = json.loads((tmp_path / "l.json").read_text())
    assert d["complete"] and d["machine"] == f"pc-i440fx-{version}"
    assert {b["name"]: b["size"] for b in d["ram_blocks"]} == blocks
    ram = info["ram"]
    assert sum(b["size"] for b in d["ram_blocks"]) == ram["total"]
    assert sum(b["normal_pages"] for b in d["ram_blocks"]) == ram["normal"]
    assert sum(b["zero_pages"] for b in d["ram_blocks"]) == ram["duplicate"]
    # the device sections are exactly those QEMU's own description lists, in order
    data = (tmp_path / "l.mig").read_bytes()
    assert d["bytes_total"] == len(data)
    p = StreamParser()
    p.feed(data)
    p.close()
    desc = next(ev for ev in iter(p.next_event, NEED_DATA) if isinstance(ev, VmDescription))
    named = [(x["name"], x["instance_id"]) for x in desc.description["devices"]]
    fulls = [(s["idstr"], s["instance_id"]) for s in d["sections"] if s["idstr"] != "ram"]
    assert fulls == named and d["devices"] == [n for n, _ in named]
    (ram_sec,) = [s for s in d["sections"] if s["idstr"] == "ram"]
    assert ram_sec["version_id"] == 4 and ram_sec["records"] >= 3


@pytest.mark.peers
def test_live_unix_random_ram_rebuilt_byte_for_byte(receivers, tmp_path, qemu):
    _, args = qemu
    from qioc_green.migration.qemu import Qemu

    ram_file, ram = random_ram(tmp_path, 32)
    rx = receivers(f"unix:{tmp_path / 'in.sock'}", "--ram-dir", str(tmp_path / "ram"),
                   "--json", str(tmp_path / "u.json"))
    with Qemu(machine="pc", mem="32M", ram_file=str(ram_file), name="source", **args) as src:
        src.migrate(rx.address)
        src.wait_migration(WAIT)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
    d = json.loads((tmp_path / "u.json").read_text())
    main = next(b for b in d["ram_blocks"] if b["name"] == "pc.ram")
    assert main["normal_pages"] == (32 << 20) // 4096 and main["zero_pages"] == 0
    index = json.loads((tmp_path / "ram" / "blocks.json").read_text())
    assert index["pc.ram"] == {"file": "pc.ram", "size": 32 << 20}


@pytest.mark.peers
def test_live_exec_through_a_fifo(receivers, tmp_path, qemu):
    """QEMU migrates to ``exec:cat > FIFO``; the receiver reads ``exec:cat FIFO``."""
    from qioc_green.migration.qemu import Qemu

    fifo = tmp_path / "stream.fifo"
    os.mkfifo(fifo)
    rx = receivers(f"exec:cat '{fifo}'", "--json", str(tmp_path / "e.json"), listens=False)
    version, args = qemu
    with Qemu(machine="q35", mem="32M", name="source", **args) as src:
        src.migrate(f"exec:cat > '{fifo}'")
        src.wait_migration(WAIT)
    assert rx.wait() == 0, rx.stderr
    d = json.loads((tmp_path / "e.json").read_text())
    assert d["complete"] and d["machine"] == f"pc-q35-{version}"


class HashRelay:
    """A TCP relay on 127.0.0.1 in front of ``target`` that hashes every byte it passes on."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(WAIT)
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn, connect(self.target) as out:
                conn.settimeout(WAIT)
                while data := conn.recv(1 << 20):
                    self.sha.update(data)
                    self.nbytes += len(data)
                    out.sendall(data)
        except Exception as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self) -> str:
        self.thread.join(WAIT)
        self.listener.close()
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.sha.hexdigest()


@pytest.mark.peers
@pytest.mark.timeout(90)
@pytest.mark.parametrize("paused", [True, False], ids=["paused", "running"])
def test_live_forward_into_a_real_destination_and_replay(receivers, tmp_path, paused, qemu):
    """source -> receiver --forward -> (hashing relay) -> destination; then the saved stream
    replayed from a file into a second destination."""
    from qioc_green.migration.qemu import Qemu

    ram_file, _ = random_ram(tmp_path, 32)
    saved = tmp_path / "fwd.mig"
    _, args = qemu
    with Qemu(machine="pc", mem="32M", ram_file=str(ram_file), paused=paused,
              name="source", **args) as src, \
            Qemu(machine="pc", mem="32M", incoming=True, paused=False, name="dest",
                 **args) as dst:
        relay = HashRelay(dst.listen())
        rx = receivers("tcp:127.0.0.1:0", "--forward", relay.address, "--digest",
                       "--save", str(saved), "--json", str(tmp_path / "f.json"))
        src.migrate(rx.address)
        src.wait_migration(WAIT)
        assert dst.wait_migration(WAIT)["status"] == "completed"
        want = "prelaunch" if paused else "running"
        assert src.status() == "postmigrate"
        assert dst.status() == want
        assert rx.wait() == 0, rx.stderr
        sha_out = relay.join()
    d = json.loads((tmp_path / "f.json").read_text())
    sha_in = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert d["sha256_in"] == sha_in == d["sha256_out"] == sha_out
    assert d["forward"]["bytes"] == d["bytes_total"] == relay.nbytes == saved.stat().st_size

    with Qemu(machine="pc", mem="32M", incoming=True, paused=False, name="replay",
              **args) as dst2:
        rx = receivers(f"file:{saved}", "--forward", dst2.listen(), listens=False)
        assert rx.wait() == 0, rx.stderr
        assert dst2.wait_migration(WAIT)["status"] == "completed"
        assert dst2.status() == want


@pytest.fixture(scope="module")
def big_stream(tmp_path_factory):
    """A 64 MiB random-RAM capture from a real QEMU (made once for the module)."""
    need_qemu()
    from qioc_green.migration.qemu import capture

    d = tmp_path_factory.mktemp("big")
    ram_file, _ = random_ram(d, 64)
    data = capture("pc", "64M", ram_file=str(ram_file), timeout=60)
    ram_file.unlink()
    return data


@pytest.mark.peers
def test_forward_back_pressure_keeps_memory_bounded(receivers, tmp_path, big_stream):
    """A destination that does not read stops the sender well before the end of the stream."""
    data = big_stream
    with socket.socket() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        lst.settimeout(WAIT)
        rx = receivers("tcp:127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{lst.getsockname()[1]}",
                       "--buffers", "4", "--buffer-size", "1M",
                       "--json", str(tmp_path / "b.json"))
        sent = [0]
        stalled = threading.Event()
        failed: list[BaseException] = []

        def sender() -> None:
            try:
                with connect(rx.address) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
                    view = memoryview(data)
                    # A send that makes no progress for a second while the destination reads
                    # nothing is the sender being held back; then it goes on to the end.
                    s.settimeout(1.0)
                    while sent[0] < len(data):
                        try:
                            sent[0] += s.send(view[sent[0] : sent[0] + (1 << 20)])
                        except TimeoutError:
                            stalled.set()
                            s.settimeout(WAIT)
            except Exception as exc:  # noqa: BLE001 - asserted by the test
                failed.append(exc)
            finally:
                stalled.set()

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        conn, _ = lst.accept()
        with conn:
            assert stalled.wait(WAIT)
            held_at = sent[0]
            rss = _rss(rx.proc.pid)
            conn.settimeout(WAIT)
            sha = hashlib.sha256()
            while chunk := conn.recv(1 << 20):
                sha.update(chunk)
        t.join(WAIT)
    assert not failed, failed
    assert rx.wait() == 0, rx.stderr
    assert sha.hexdigest() == hashlib.sha256(data).hexdigest()
    # held back with at most the pool (4 MiB) and the kernel's socket buffers in flight
    print(f"\nsender held back at {held_at >> 20} MiB of {len(data) >> 20}, receiver RSS "
          f"{rss >> 20} MiB")
    assert held_at < 32 << 20 < len(data), held_at
    assert rss < 120 << 20, rss
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["forward"]["buffers_high_water"] <= 4


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("mode", ["bundled", "live"])
def test_demo(mode):
    """``make demo``: prints a complete summary, exits 0, leaves no process behind."""
    args = ["--no-qemu"] if mode == "bundled" else []
    if mode == "live":
        need_qemu()
    r = subprocess.run([sys.executable, "-m", "qioc_green.migration.demo", *args],
                       check=False, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "complete: True" in r.stdout and "RAM blocks:" in r.stdout
    if mode == "live":
        assert "destination running" in r.stdout and "sha256 in == out: True" in r.stdout


def test_demo_without_qemu_qmp_says_so_and_replays():
    """A pip user with QEMU but without the demo extra (no qemu.qmp): one line says what to
    install and the bundled capture is replayed (it was a traceback)."""
    need_qemu()
    code = ("import sys; sys.modules['qemu.qmp'] = sys.modules['qemu.qmp.legacy'] = None; "
            "from qioc_green.migration.demo import main; sys.argv = ['demo']; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.splitlines() == ["demo: qioc_green.migration.qemu needs qemu.qmp (pip install "
                                     "'qioc_green[demo]', or the test or bench extra); sending "
                                     "the bundled capture instead"], r.stderr
    assert "complete: True" in r.stdout


def test_embedded_receiver_example():
    """examples/embedded_receiver.py: the package's public API in a program of one's own."""
    data = load("pc")
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "embedded_receiver.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on tcp:127.0.0.1:"), line
        host, port = line.removeprefix("listening on tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WAIT) as s:
            s.sendall(data)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.startswith(f"complete: {len(data)} bytes, machine pc-i440fx-7.2"), out
    assert "RamPages" in out and "VmDescription" in out


# -- the glue in-process (the suite's leak check covers its threads and fds) ----------------------


def test_parse_uri():
    from qioc_green.migration import parse_uri

    assert str(parse_uri("tcp:127.0.0.1:0")) == "tcp:127.0.0.1:0"
    assert parse_uri("tcp::4444").address == "tcp::4444"
    assert parse_uri("tcp:[::1]:5").address == "tcp:[::1]:5"
    assert parse_uri("unix:/tmp/x.sock").path == "/tmp/x.sock"
    assert parse_uri("fd:7").fd == 7
    assert parse_uri("exec:cat a b").command == "cat a b"
    f = parse_uri("file:/tmp/a.mig,offset=0x1000")
    assert (f.path, f.offset, str(f)) == ("/tmp/a.mig", 4096, "file:/tmp/a.mig,offset=4096")
    for bad in ("x", "ftp:a", "tcp:host", "tcp:h:99999", "unix:", "fd:x", "exec: ",
                "file:", "file:a,offset=-1", "file:a,mode=3", "unix:/" + "x" * 120):
        with pytest.raises(ValueError):
            parse_uri(bad)


@pytest.mark.parametrize("cut", [None, 200_000])
def test_receiver_in_process_forwards_through_two_iothreads(cut, tmp_path):
    """Receiver.receive() in one IOThread, its writer in another; source and destination are
    socket pairs driven by plain threads. A cut stream is refused and the destination cut."""
    from qioc_green import IOThread, SocketChannel
    from qioc_green.migration import Receiver, parse_uri

    data = load("q35")
    sent = data if cut is None else data[:cut]
    src_ours, src_theirs = socket.socketpair()
    with socket.socket(socket.AF_UNIX) as lst, IOThread("t-recv") as rt, IOThread("t-fwd") as ft:
        path = str(tmp_path / "dest.sock")
        lst.bind(path)
        lst.listen(1)
        lst.settimeout(WAIT)
        got: list[bytes] = []

        def destination() -> None:
            conn, _ = lst.accept()
            with conn:
                got.append(b"".join(iter(lambda: conn.recv(1 << 16), b"")))

        def source() -> None:
            with src_ours:
                src_ours.sendall(sent)

        threads = [threading.Thread(target=destination), threading.Thread(target=source)]
        for t in threads:
            t.start()
        try:
            ch = SocketChannel.from_socket(src_theirs)
            ch.set_follow_coroutine_ctx(True)
            rx = Receiver(forward=parse_uri(f"unix:{path}"), forward_context=ft.context,
                          chunk=64 << 10, buffers=2, digest=True)
            out = rt.context.spawn(rx.receive, ch).result(WAIT)
        finally:
            for t in threads:
                t.join(WAIT)
    if cut is None:
        assert out.ok, out.error
        assert got == [data]
        assert out.summary["sha256_in"] == out.summary["sha256_out"]
        assert out.summary["forward"]["buffers_high_water"] <= 2
    else:
        assert out.error is not None and out.error.startswith(f"offset {cut}: ")
        assert out.summary["complete"] is False
        assert len(got[0]) < cut and data.startswith(got[0])
