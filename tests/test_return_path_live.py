"""The return path against real sources: QEMU 10.0 and 7.2 migrate into a tiny destination that
reads the main stream with qioc_green channels (in its own IOThread) and answers with
DestinationReturnPath; the source must reach ``completed``.

- precopy with ``return-path``: the stream is read with the receiver's parser
  (``migration.stream.StreamParser``, read-only), which reports the commands;
- ``switchover-ack`` with a running source (it does not switch over without the ack);
- postcopy (``postcopy-ram``): precopy slowed with ``max-bandwidth``, ``migrate-start-postcopy``
  while it is active, then the bandwidth raised. The parser refuses PACKAGED, so this stream is
  walked here as far as a postcopy stream of a VM with no devices of its own needs: the header,
  the configuration, ``ram`` sections, commands, the package (its LISTEN first, its PINGs and
  RUN last; the device state between them is skipped), EOF. No page is requested; the test
  checks that every page of guest RAM arrived anyway, byte for byte (the source is paused, so
  RAM is the random file that backs it).

Sources are started by the test, driven with qemu.qmp (events, not polls), bounded by
timeouts, killed by pid; everything is on 127.0.0.1 and in tmp_path.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from qioc_green import Channel, IOThread, SocketChannel
from qioc_green.migration import (
    NEED_DATA,
    Command,
    DestinationReturnPath,
    MigCommand,
    Pong,
    RamPages,
    RamStats,
    ReturnPathError,
    ReturnPathReader,
    Shut,
    StreamEnd,
    StreamParser,
    SwitchoverAck,
)
from tests.peers import need, need_qemu10
from tests.polling import poll_pause
from tests.qmp_harness import event_loop

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

QMP = pytest.importorskip("qemu.qmp.legacy")
MEM = 32 << 20
PAGE = 4096
WAIT = 60.0


def qemu_argv(version: str) -> list[str]:
    if version == "10":
        return need_qemu10()
    return [need("qemu-system-x86_64")["qemu-system-x86_64"]]


@pytest.fixture(scope="module")
def ram_file(tmp_path_factory: Any) -> str:
    path = str(tmp_path_factory.mktemp("ram") / "ram.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(MEM))
    return path


class Source:
    """A paused (or running) source QEMU with guest RAM backed by ``ram_file``, QMP through
    qemu.qmp with the ``events`` capability on."""

    def __init__(self, argv0: list[str], tmp: str, ram_file: str, *, paused: bool = True) -> None:
        self.qmp_path = os.path.join(tmp, "src-qmp.sock")
        self.stderr_path = os.path.join(tmp, "src-stderr")
        argv = [*argv0, "-accel", "tcg", "-m", f"{MEM >> 20}M", "-nodefaults", "-display", "none",
                "-object", f"memory-backend-file,id=pc.ram,size={MEM >> 20}M,mem-path={ram_file},share=off",
                "-machine", "pc,memory-backend=pc.ram",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if paused:
            argv.append("-S")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        self.qmp: Any = None
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(self.qmp_path):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"source QEMU did not start: {self.stderr()}")
                poll_pause(0.01)  # waiting for a child to create its socket
            self.qmp = QMP.QEMUMonitorProtocol(self.qmp_path)
            self.qmp.settimeout(20)
            self.qmp.connect(negotiate=True)
            self.caps("events")
        except BaseException:
            self.close()
            raise

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace").strip()

    def caps(self, *names: str) -> None:
        self.qmp.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": n, "state": True} for n in names])

    def wait_status(self, *wanted: str, timeout: float = WAIT) -> str:
        """Wait for a MIGRATION event with one of ``wanted``; fail on failed/cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"source never reached {wanted}: {self.qmp.cmd('query-migrate')}")
            try:
                ev = self.qmp.pull_event(wait=float(left))
            except TimeoutError:
                continue
            if ev is None or ev.get("event") != "MIGRATION":
                continue
            status = ev["data"]["status"]
            if status in wanted:
                return status
            if status in ("failed", "cancelled"):
                info = self.qmp.cmd("query-migrate")
                raise AssertionError(f"source migration {status}: {info.get('error-desc')} "
                                     f"{self.stderr()}")

    def close(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:  # noqa: BLE001 - QEMU is killed next anyway
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@dataclass
class Outcome:
    commands: list[tuple[int, bytes]] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    stream_bytes: int = 0
    ram: dict[str, bytearray] = field(default_factory=dict)
    error: str | None = None


class Destination:
    """Accepts one migration on 127.0.0.1 and reads it in its own IOThread; ``walk`` reads the
    stream (``precopy`` or ``postcopy``), replying through ``rp``."""

    def __init__(self, walk: Callable[[_In, DestinationReturnPath, Outcome], None],
                 rp: DestinationReturnPath) -> None:
        self.rp = rp
        self.outcome = Outcome()
        self.thread = IOThread("rp-destination").start()
        self.listener = SocketChannel.listen("tcp:127.0.0.1:0")
        self.uri = f"tcp:127.0.0.1:{self.listener.local_port}"
        self.done = self.thread.context.spawn(self._run, walk)

    def _run(self, walk: Callable[[_In, DestinationReturnPath, Outcome], None]) -> None:
        ch = self.listener.accept(timeout=WAIT)
        ch.set_follow_coroutine_ctx(True)  # reads and writes wait on this IOThread's hub
        inp = _In(ch, self.outcome)
        try:
            walk(inp, self.rp, self.outcome)
            # the source closes once it has its SHUT; nothing may come before that
            assert ch.read(1, timeout=WAIT) == b"", "bytes after the end of the stream"
        except (ReturnPathError, AssertionError, ValueError) as exc:
            self.outcome.error = str(exc)
            inp.send(self.rp.fail())
            raise
        finally:
            ch.close()

    def result(self) -> Outcome:
        try:
            self.done.result(WAIT)
        finally:
            self.listener.close()
            self.thread.stop()
        return self.outcome


class _In:
    """Buffered exact reads from the channel (blocking style: parks this IOThread's greenlet)."""

    def __init__(self, ch: Channel, outcome: Outcome) -> None:
        self.ch = ch
        self.outcome = outcome
        self.buf = bytearray()
        self.pos = 0

    def send(self, data: bytes) -> None:
        if data:
            self.ch.write_all(data, timeout=WAIT)
            self.outcome.sent += data

    def chunk(self) -> bytes:
        """Whatever arrives next (b"" at EOF): for the parser."""
        data = self.ch.read(1 << 20, timeout=WAIT)
        self.outcome.stream_bytes += len(data)
        return data

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            data = self.chunk()
            if not data:
                raise AssertionError(f"stream ended {len(self.buf) - self.pos} of {n} bytes into an item")
            del self.buf[: self.pos]
            self.pos = 0
            self.buf += data
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def peek(self) -> int:
        b = self.read(1)
        self.pos -= 1
        return b[0]

    def u8(self) -> int:
        return self.read(1)[0]

    def be16(self) -> int:
        return int.from_bytes(self.read(2), "big")

    def be32(self) -> int:
        return int.from_bytes(self.read(4), "big")

    def be64(self) -> int:
        return int.from_bytes(self.read(8), "big")


def command(inp: _In, rp: DestinationReturnPath, out: Outcome, cmd: int, data: bytes) -> None:
    out.commands.append((cmd, data))
    inp.send(rp.command(cmd, data))


def precopy(inp: _In, rp: DestinationReturnPath, out: Outcome) -> None:
    """The whole stream through the receiver's parser; commands go to the return path."""
    parser = StreamParser()
    while True:
        data = inp.chunk()
        if data:
            parser.feed(data)
        else:
            parser.close()
        while (ev := parser.next_event()) is not NEED_DATA:
            if isinstance(ev, Command):
                command(inp, rp, out, ev.command, ev.data)
            elif isinstance(ev, RamPages) and ev.block == "pc.ram":
                ram = out.ram.setdefault("pc.ram", bytearray(MEM))
                for off, page in ev.pages():
                    ram[off : off + len(page)] = page
            elif isinstance(ev, StreamEnd):
                inp.send(rp.end_of_stream())
                return
        if not data:
            raise AssertionError("stream ended before its end")


def postcopy(inp: _In, rp: DestinationReturnPath, out: Outcome) -> None:
    """A postcopy stream of a VM with no devices of its own, walked item by item."""
    if inp.read(8) != b"QEVM\x00\x00\x00\x03":
        raise AssertionError("not a version 3 migration stream")
    if inp.u8() != 0x07:
        raise AssertionError("no configuration section")
    inp.read(inp.be32())  # the machine type
    page = PAGE
    while inp.peek() == 0x05:  # configuration subsections
        inp.u8()
        name = inp.read(inp.u8()).decode()
        inp.be32()
        if name == "configuration/target-page-bits":
            page = 1 << inp.be32()
        elif name == "configuration/capabilities":
            for _ in range(inp.be32()):
                inp.read(inp.u8())
        elif name == "configuration/uuid":
            inp.read(16)
        else:
            raise AssertionError(f"unknown configuration subsection {name!r}")
    sections: dict[int, str] = {}
    state: dict[str, Any] = {"block": None, "sizes": {}}
    while True:
        t = inp.u8()
        if t == 0x00:  # EOF: postcopy sends no VM description
            inp.send(rp.end_of_stream())
            return
        if t == 0x08:
            cmd, length = inp.be16(), inp.be16()
            data = inp.read(length)
            command(inp, rp, out, cmd, data)
            if cmd == MigCommand.PACKAGED:
                for c, d in package_commands(inp.read(struct.unpack(">I", data)[0])):
                    command(inp, rp, out, c, d)
            continue
        if t == 0x01:
            sid = inp.be32()
            sections[sid] = inp.read(inp.u8()).decode()
            inp.read(8)  # instance and version ids
        elif t in (0x02, 0x03):
            sid = inp.be32()
        else:
            raise AssertionError(f"section type 0x{t:02x} outside the package")
        if sections.get(sid) != "ram":
            raise AssertionError(f"iterable section {sections.get(sid)!r} is not ram")
        ram_records(inp, out, state, page)
        if inp.u8() != 0x7E or inp.be32() != sid:
            raise AssertionError(f"bad footer for section {sid}")


def ram_records(inp: _In, out: Outcome, state: dict[str, Any], page: int) -> None:
    while True:
        word = inp.be64()
        flags, addr = word & (page - 1), word & ~(page - 1)
        if flags & 0x10:  # EOS
            return
        if flags & 0x04:  # MEM_SIZE: the blocks and their sizes
            left = addr
            while left:
                name = inp.read(inp.u8()).decode()
                size = inp.be64()
                state["sizes"][name] = size
                out.ram[name] = bytearray(size)
                left -= size
            continue
        if flags & 0x200:  # MULTIFD_FLUSH
            continue
        if not flags & 0x20:  # not CONTINUE: the block is named
            state["block"] = inp.read(inp.u8()).decode()
        ram = out.ram[state["block"]]
        if flags & 0x02:  # ZERO
            ram[addr : addr + page] = bytes([inp.u8()]) * page
        elif flags & 0x08:  # PAGE
            ram[addr : addr + page] = inp.read(page)
        else:
            raise AssertionError(f"RAM record flags 0x{flags:x}")


def package_commands(package: bytes) -> Iterator[tuple[int, bytes]]:
    """The commands a postcopy package holds: LISTEN first, then (after the device state) the
    PINGs and RUN that end it."""
    listen = bytes([0x08]) + struct.pack(">HH", MigCommand.POSTCOPY_LISTEN, 0)
    run = bytes([0x08]) + struct.pack(">HH", MigCommand.POSTCOPY_RUN, 0)
    ping = bytes([0x08]) + struct.pack(">HH", MigCommand.PING, 4)
    if not package.startswith(listen) or not package.endswith(run):
        raise AssertionError("the package does not hold LISTEN ... RUN")
    yield MigCommand.POSTCOPY_LISTEN, b""
    end = len(package) - len(run)
    pings = []
    while end >= 9 + len(listen) and package[end - 9 : end - 4] == ping:
        pings.insert(0, package[end - 4 : end])
        end -= 9
    for value in pings:
        yield MigCommand.PING, value
    yield MigCommand.POSTCOPY_RUN, b""


def replies(sent: bytes) -> list[Any]:
    """What the destination sent, decoded as the source decodes it: PONG values, other messages."""
    reader = ReturnPathReader()
    reader.feed(sent)
    got: list[Any] = []
    while (m := reader.next_message()) is not NEED_DATA:
        got.append(m.value if isinstance(m, Pong) else m)
    reader.close()
    return got


@pytest.fixture
def migrate(tmp_path: Any, ram_file: str) -> Iterator[Callable[..., tuple[Source, Destination]]]:
    started: list[Any] = []

    def start(version: str, walk: Any, rp: DestinationReturnPath, *, paused: bool = True) -> tuple[Source, Destination]:
        src = Source(qemu_argv(version), str(tmp_path), ram_file, paused=paused)
        started.append(src)
        dst = Destination(walk, rp)
        started.append(dst)
        return src, dst

    with event_loop():
        try:
            yield start
        finally:
            for thing in reversed(started):
                if isinstance(thing, Source):
                    thing.close()
                else:
                    thing.listener.close()
                    thing.thread.stop()


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_precopy_with_return_path_completes(migrate, version):
    src, dst = migrate(version, precopy, DestinationReturnPath())
    src.caps("return-path")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 107374182400})
    src.qmp.cmd("migrate", uri=dst.uri)
    assert src.wait_status("completed") == "completed"
    out = dst.result()
    assert out.error is None
    assert [c for c, _ in out.commands][:2] == [MigCommand.OPEN_RETURN_PATH, MigCommand.PING]
    assert replies(out.sent) == [1, Shut(0)]
    info = src.qmp.cmd("query-migrate")
    assert info["status"] == "completed"
    # the monitor's RAM counters have the shape of this very QEMU's MigrationStats
    assert set(RamStats().to_qmp()) == set(info["ram"]) - {"skipped"}
    with open(src_ram_file(src), "rb") as f:
        assert out.ram["pc.ram"] == f.read()


def src_ram_file(src: Source) -> str:
    argv = src.proc.args
    spec = next(a for a in argv if a.startswith("memory-backend-file,"))
    return spec.split("mem-path=")[1].split(",")[0]


def test_switchover_ack_lets_a_running_source_switch_over(migrate):
    src, dst = migrate("10", precopy, DestinationReturnPath(switchover_ack=True), paused=False)
    src.caps("return-path", "switchover-ack")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 107374182400})
    src.qmp.cmd("migrate", uri=dst.uri)
    assert src.wait_status("completed") == "completed"
    out = dst.result()
    assert out.error is None
    assert replies(out.sent) == [SwitchoverAck(), 1, Shut(0)]


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_postcopy_requesting_no_page_completes_with_all_of_ram(migrate, version):
    src, dst = migrate(version, postcopy, DestinationReturnPath(target_page_size=PAGE))
    src.caps("return-path", "postcopy-ram")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # ~4 s of precopy
    src.qmp.cmd("migrate", uri=dst.uri)
    src.wait_status("active")
    src.qmp.cmd("migrate-start-postcopy")
    src.wait_status("postcopy-active")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 107374182400})
    assert src.wait_status("completed") == "completed"
    out = dst.result()
    assert out.error is None
    cmds = [c for c, _ in out.commands]
    for c in (MigCommand.POSTCOPY_ADVISE, MigCommand.PACKAGED, MigCommand.POSTCOPY_LISTEN,
              MigCommand.POSTCOPY_RUN):
        assert c in cmds
    assert cmds.index(MigCommand.POSTCOPY_LISTEN) < cmds.index(MigCommand.POSTCOPY_RUN)
    got = replies(out.sent)
    assert sorted(r for r in got if isinstance(r, int)) == [1, 2, 3, 4]  # and no page request
    assert got[-1] == Shut(0) and len(got) == 5
    assert dst.rp.status == "completed"
    with open(src_ram_file(src), "rb") as f:
        assert out.ram["pc.ram"] == f.read()  # every page came, though none was requested
