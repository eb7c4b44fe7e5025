"""The migration receiver stays bounded whatever a sender sends: memory, disk and time.

Each hostile stream here cost the receiver hundreds of megabytes, gigabytes of disk, or an
unbounded wait before the limits existed (issue 13). The memory figure is the receiver's own
peak RSS (``VmHWM`` from ``/proc/PID/status``, read while it waits for the next migration with
``--keep-listening``), compared with the peak of the same program receiving a small real stream
in the same run; disk is the blocks a ``--ram-dir`` holds (``st_blocks``); time is how long
the program takes to exit.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qioc_green.migration import NEED_DATA, MigrationStreamError, StreamParser, Summary
from tests import migbuild as b
from tests.polling import poll_pause

pytestmark = pytest.mark.timeout(90)

PROGRAM = [sys.executable, "-m", "qioc_green.migration"]
DATA = Path(__file__).parent / "data"
MiB = 1 << 20
WAIT = 60.0


def load(name: str) -> bytes:
    return gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())


def status_bytes(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


@dataclass
class Judged:
    peak: int  # bytes: VmHWM once the migration was judged
    seconds: float  # from connect to the verdict
    stderr: str
    summary: dict


@contextlib.contextmanager
def short_dir() -> Iterator[str]:
    """A directory whose path is short enough for a UNIX socket in it."""
    with tempfile.TemporaryDirectory(prefix="qb", dir="/tmp") as d:
        yield d


@contextlib.contextmanager
def receiver_process(*argv: str, stdout: int = subprocess.PIPE) -> Iterator[subprocess.Popen[bytes]]:
    """The receiver run with ``argv``, its stderr piped; killed and reaped on the way out if it
    still runs."""
    proc = subprocess.Popen([*PROGRAM, *argv], stdout=stdout, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def judge(stream: bytes, *args: str) -> Judged:
    """Send ``stream`` to a receiver; its peak RSS once it has judged it, and its stderr."""
    with short_dir() as d:
        sock = f"{d}/s.sock"
        with receiver_process(f"unix:{sock}", "--keep-listening", "--json", f"{d}/j.json",
                              *args) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith(b"listening on ")
            t0 = time.monotonic()
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(WAIT)
                s.connect(sock)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(stream)  # a receiver that refuses early hangs up on us
            judged = Path(d, "j-1.json")
            while not judged.exists():
                assert time.monotonic() - t0 < WAIT, "the receiver never judged the stream"
                poll_pause(0.01)  # another process writes it: nothing to wait on
            seconds = time.monotonic() - t0
            peak = status_bytes(proc.pid, "VmHWM")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT)
            return Judged(peak, seconds, err.decode(), json.loads(judged.read_text()))


@pytest.fixture(scope="module")
def baseline() -> int:
    """The receiver's peak RSS for a small real stream (QEMU 7.2, -M none)."""
    j = judge(load("none"))
    assert j.summary["complete"], j.stderr
    return j.peak


CONFIG = b.header() + b.configuration()


def _commands(n: int) -> bytes:
    # SWITCHOVER_START: a command a destination takes any number of times and answers nothing
    # (PINGs would need an open return path, and then PONGs that this test does not read)
    return CONFIG + b.command(11) * n


# name: (stream, bound over the baseline, what the one error line says)
HOSTILE = {
    # one PAGE of a 64 MiB target page: it was copied whole (bits 30: 1.08 GB)
    "page bits 26": (lambda: b.header() + b.configuration(page_bits=26)
                     + b.ram_start({"pc.ram": 128 * MiB}) + b.section_part(2)
                     + b.page(0, b"\xaa" * (64 * MiB), "pc.ram"),
                     16 * MiB, "target page bits 26 (64 MiB pages) is outside what QEMU uses"),
    # empty FULL sections of one id, all retained for the description (was ~490 B each)
    "300k FULL sections": (lambda: CONFIG + b.section_full(10, "dev") * 300_000,
                           80 * MiB, "device state held for the VM description is over"),
    # FULL sections of distinct ids: each also had a summary entry (was ~700 B each)
    "150k section ids": (lambda: CONFIG + b"".join(b.section_full(i, "dev")
                                                   for i in range(10, 150_010)),
                         40 * MiB, "more than 32768 sections"),
    # START/END pairs of a device section after a FULL one: all held (was ~720 B a pair)
    "300k START/END pairs": (lambda: CONFIG + b.section_full(3, "x")
                             + (b.section_start(5, "blk", version=1) + b.footer(5)
                                + b.section_end(5) + b.footer(5)) * 300_000,
                             80 * MiB, "device state held for the VM description is over"),
    # commands: every name was kept in the summary (was ~94 B each, with the JSON)
    "500k commands": (lambda: _commands(500_000), 16 * MiB,
                      "stream ends inside the next section"),
    # a description of 2M empty objects (6 MB): was parsed whole (~78 B each)
    "2M-object description": (lambda: CONFIG + b"\x00"
                              + b.vmdesc(b'{"devices":[' + b"{}," * 2_000_000 + b"{}]}"),
                              32 * MiB, "over the cap of 1000000"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_stream_memory_is_bounded(baseline, case):
    make, bound, says = HOSTILE[case]
    j = judge(make())
    lines = [ln for ln in j.stderr.splitlines() if ln.strip()]
    print(f"\n{case}: peak {j.peak / MiB:.1f} MiB (baseline {baseline / MiB:.1f}), "
          f"{j.seconds:.2f} s: {lines}")
    assert len(lines) == 1 and says in lines[0], j.stderr
    assert j.summary["complete"] is False
    assert j.peak < baseline + bound, f"peak {j.peak / MiB:.1f} MiB"


def disk_used(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("bits", [12, 24])
def test_zero_fill_is_no_amplifier(tmp_path, bits):
    """ZERO records with a non-zero fill byte made --ram-dir write a page each (bits 30: a
    220-byte stream wrote 2 GiB); now refused, as QEMU 8.2+ refuses them, and nothing is
    written. With 24 page bits it is the page size that is refused first."""
    page = 1 << bits
    block = 64 * MiB
    records = b"".join(b.zero_page(off, 0xAA) for off in range(page, block, page))
    stream = (b.header() + b.configuration(page_bits=None if bits == 12 else bits)
              + b.ram_start({"pc.ram": block}) + b.section_part(2)
              + b.zero_page(0, 0xAA, "pc.ram") + records)
    ram = tmp_path / "ram"
    src = tmp_path / "zero.mig"
    src.write_bytes(stream)
    r = subprocess.run([*PROGRAM, f"file:{src}", "--ram-dir", str(ram)],
                       capture_output=True, timeout=WAIT, check=False)
    used = disk_used(ram)
    print(f"\n{len(stream)}-byte stream, page bits {bits}: {used} bytes on disk")
    assert r.returncode == 1
    err = r.stderr.decode().strip()
    assert "\n" not in err and ("fill byte 0xaa" in err if bits == 12 else "page bits 24" in err), err
    assert used < MiB


# -- the parser's rules, without a process --------------------------------------------------


def parse(stream: bytes, parser: StreamParser | None = None) -> list:
    p = parser or StreamParser()
    p.feed(stream)
    events = []
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


@pytest.mark.parametrize("bits, ok", [(9, False), (10, True), (12, True), (16, True),
                                      (17, False), (30, False)])
def test_target_page_sizes_qemu_uses(bits, ok):
    stream = b.header() + b.configuration(page_bits=bits) + b.ram_start({"pc.ram": 1 << 20})
    if ok:
        assert parse(stream)[1].target_page_bits == bits
    else:
        with pytest.raises(MigrationStreamError, match=f"target page bits {bits} .* is outside"):
            parse(stream)
    with pytest.raises(ValueError, match="power of two from 1024 to 65536"):
        StreamParser(page_size=512)


def test_zero_fill_refused_in_runs_too():
    start = b.header() + b.configuration() + b.ram_start({"pc.ram": 1 << 20}) + b.section_part(2)
    good = start + b.zero_page(0, 0, "pc.ram") + b.zero_page(4096) + b.zero_page(8192)
    assert sum(ev.count for ev in parse(good) if type(ev).__name__ == "ZeroPages") == 3
    bad = good + b.zero_page(12288, 7)
    with pytest.raises(MigrationStreamError, match="zero page at offset 0x3000 with fill byte 0x07") as e:
        parse(bad)
    assert e.value.offset == len(good)


def test_ram_blocks_are_capped_over_every_mem_size():
    p = StreamParser(max_ram_blocks=8)
    stream = b.header() + b.configuration()
    for k in range(3):  # three block lists of 3 new names each: 9 in all
        stream += b.ram_start({f"b{k}-{i}": 1 << 20 for i in range(3)}, sid=2 + k)
    with pytest.raises(MigrationStreamError, match="more than 8 RAM blocks"):
        parse(stream, p)
    # the same names again do not count twice
    again = b.header() + b.configuration() + b.ram_start({"a": 4096})
    again += (b.section_part(2) + b.mem_size({"a": 4096}) + b.be64(b.EOS) + b.footer(2)) * 20
    parse(again, StreamParser(max_ram_blocks=1))


def test_description_depth_budget():
    deep = b"[" * 100 + b"]" * 100
    stream = CONFIG + b"\x00" + b.vmdesc(b'{"devices": [], "x": ' + deep + b"}")
    with pytest.raises(MigrationStreamError, match="nests deeper than 64"):
        parse(stream)
    fine = CONFIG + b"\x00" + b.vmdesc(b'{"devices": [], "x": ' + b"[" * 60 + b"]" * 60 + b"}")
    assert parse(fine)[-1].described


def test_summary_counts_commands_and_lists_the_first_256():
    s = Summary()
    for ev in parse(b.header() + b.configuration() + b.command(1) + b.command(2, b"\0\0\0\1") * 1000):
        s.add(ev)
    d = s.as_dict()
    assert d["command_counts"] == {"OPEN_RETURN_PATH": 1, "PING": 1000}
    assert d["commands"][:2] == ["OPEN_RETURN_PATH", "PING"] and len(d["commands"]) == 256


# -- exec: the command's end and its status ---------------------------------------------------


def run_receiver(*args: str, timeout: float = 30) -> tuple[int, str, float]:
    """Run the receiver to its end; (exit status, stderr, seconds until stderr closed)."""
    t0 = time.monotonic()
    r = subprocess.run([*PROGRAM, *args, "-q"], capture_output=True, text=True, timeout=timeout,
                       check=False)
    return r.returncode, r.stderr, time.monotonic() - t0


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie is already dead
    except FileNotFoundError:
        return True


def test_exec_source_exit_status_fails_the_run(tmp_path):
    src = tmp_path / "none.mig"
    src.write_bytes(load("none"))
    rc, err, _ = run_receiver(f"exec:cat '{src}'; exit 3", "--json", str(tmp_path / "s.json"))
    assert rc == 1
    assert err.strip() == (f"qioc-migration-receiver: offset {len(load('none'))}: source "
                           f"\"exec:cat '{src}'; exit 3\" exited with status 3")
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["complete"] is False and "exited with status 3" in d["error"]
    rc, err, _ = run_receiver(f"exec:cat '{src}'")
    assert (rc, err) == (0, "")


def test_exec_source_tree_ended_when_the_stream_is_refused(tmp_path):
    """A refused stream ends the command and what it started (here a sleep the shell waits
    for, which holds our stderr): before, the shell was signalled after 2 s and the sleep
    kept stderr open for its 30 s."""
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"garbage!" * 100)
    pid_file = tmp_path / "sleep.pid"
    rc, err, seconds = run_receiver(f"exec:sleep 30 & echo $! > '{pid_file}'; cat '{bad}'; wait")
    print(f"\nexited and closed stderr after {seconds:.2f} s")
    assert rc == 1 and "expected magic QEVM" in err and len(err.splitlines()) == 1, err
    assert seconds < 10
    assert gone(int(pid_file.read_text()))


def test_save_or_ram_dir_never_overwrites_the_input(tmp_path):
    """``file:X --save X`` truncated X to 0 bytes before reading it. The same file under
    another name (a hard link) is the same input."""
    data = load("none")
    src = tmp_path / "in.mig"
    src.write_bytes(data)
    os.link(src, tmp_path / "link.mig")
    for save in (src, tmp_path / "link.mig"):
        rc, err, _ = run_receiver(f"file:{src}", "--save", str(save))
        assert rc == 1
        assert err.strip() == (f"qioc-migration-receiver: offset 0: the save file {save} is the "
                               "input itself; not touching it")
        assert src.read_bytes() == data
    ram = tmp_path / "ram"
    ram.mkdir()
    (ram / "ram").write_bytes(data)  # the one RAM block of -M none is named "ram"
    rc, err, _ = run_receiver(f"file:{ram / 'ram'}", "--ram-dir", str(ram))
    assert rc == 1 and "is the input itself" in err, err
    assert (ram / "ram").read_bytes() == data
    # an ordinary save still replaces what the file held
    old = tmp_path / "old.mig"
    old.write_bytes(b"x" * (len(data) * 2))
    assert run_receiver(f"file:{src}", "--save", str(old))[0] == 0
    assert old.read_bytes() == data


@pytest.mark.parametrize("uri, says", [("file:/nonexistent/in.mig", "No such file or directory"),
                                       ("fd:987", "Bad file descriptor")])
def test_a_source_that_cannot_be_opened_is_one_line(uri, says):
    rc, err, _ = run_receiver(uri)
    assert rc == 1
    assert err.strip() == f"qioc-migration-receiver: cannot open {uri}: {says}"


def wait_for_pid_file(path: Path) -> int:
    deadline = time.monotonic() + WAIT
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, "the command never started"
        poll_pause(0.01)  # the child writes it: nothing to wait on
    return int(path.read_text())


@pytest.mark.parametrize("sig, ignores_term", [
    (signal.SIGTERM, False), (signal.SIGINT, False),
    pytest.param(signal.SIGTERM, True, marks=pytest.mark.slow)])
def test_signal_ends_the_exec_command_and_says_one_line(tmp_path, sig, ignores_term):
    """SIGTERM or SIGINT to the receiver: the command gets SIGTERM (SIGKILL 2 s later if it
    ignores it), is reaped, and one line says why. Before, the receiver exited at once without
    a word and the command ran on, holding its stderr."""
    pid_file = tmp_path / "cmd.pid"
    trap = "trap '' TERM; " if ignores_term else ""
    with receiver_process(f"exec:{trap}echo $$ > '{pid_file}'; exec sleep 30", "-q",
                          stdout=subprocess.DEVNULL) as proc:
        pid = wait_for_pid_file(pid_file)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=WAIT)
        seconds = time.monotonic() - t0
    print(f"\n{sig.name}: exited and closed stderr after {seconds:.2f} s")
    assert proc.returncode == 1
    assert err.decode().strip() == f"qioc-migration-receiver: offset 0: stopped by {sig.name}"
    assert gone(pid)
    assert seconds < (6 if ignores_term else 3)


def test_signal_before_any_migration_says_so():
    with receiver_process("tcp:127.0.0.1:0") as proc:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"listening on ")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1
    assert err.decode().strip() == ("qioc-migration-receiver: stopped by SIGTERM before any "
                                    "migration arrived")


# -- forwarding: a destination that stops, fails or is dropped --------------------------------


def page_stream(mib: int) -> bytes:
    """A well-formed stream prefix of ``mib`` MiB of (non-zero) page data."""
    pages = mib * 256
    body = b.page(0, b"\x01" * 4096, "pc.ram") + b"".join(
        b.page(i * 4096, bytes([i % 255 + 1]) * 4096) for i in range(1, pages))
    return (b.header() + b.configuration() + b.ram_start({"pc.ram": pages * 4096})
            + b.section_part(2) + body)


def test_idle_timeout_covers_a_destination_that_never_reads(tmp_path):
    """Before, --idle-timeout only watched the sender: a destination that accepted and never
    read held the relay (and the source) for ever."""
    src = tmp_path / "big.mig"
    src.write_bytes(page_stream(8))
    with short_dir() as d, socket.socket(socket.AF_UNIX) as lst:
        lst.bind(f"{d}/dst.sock")
        lst.listen(1)
        with receiver_process(f"file:{src}", "--forward", f"unix:{d}/dst.sock",
                              "--idle-timeout", "0.5", "--buffers", "2", "--buffer-size", "65536",
                              "-q", stdout=subprocess.DEVNULL) as proc:
            lst.settimeout(WAIT)
            conn, _ = lst.accept()  # and never read from it
            with conn:
                t0 = time.monotonic()
                _, err = proc.communicate(timeout=20)
                seconds = time.monotonic() - t0
    print(f"\nexited {seconds:.2f} s after the destination stopped reading")
    assert proc.returncode == 1
    line = err.decode().strip()
    assert "\n" not in line and line.endswith(
        f"forward to unix:{d}/dst.sock: the destination took no data for 0.5 s"), line
    assert seconds < 10


def test_exec_destination_status_and_end(tmp_path):
    src = tmp_path / "none.mig"
    src.write_bytes(load("none"))
    rc, err, _ = run_receiver(f"file:{src}", "--forward", "exec:cat > /dev/null; exit 4")
    assert rc == 1
    assert err.strip().endswith("destination 'exec:cat > /dev/null; exit 4' exited with status 4"), err
    assert run_receiver(f"file:{src}", "--forward", "exec:cat > /dev/null")[:2] == (0, "")
    # a refused stream ends the destination command and what it started, at once
    pid_file = tmp_path / "sleep.pid"
    with short_dir() as d:
        with receiver_process(
                f"unix:{d}/s.sock", "-q", "--forward",
                f"exec:sleep 30 & echo $! > '{pid_file}'; cat > /dev/null; wait") as proc:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"listening")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(f"{d}/s.sock")
                pid = wait_for_pid_file(pid_file)  # the destination runs: now refuse the stream
                s.sendall(b"garbage!" * 100)
                t0 = time.monotonic()
                _, err = proc.communicate(timeout=20)
                seconds = time.monotonic() - t0
    assert proc.returncode == 1
    assert "expected magic QEVM" in err.decode() and len(err.splitlines()) == 1, err
    assert seconds < 5
    assert gone(pid)


# -- time: a sender that trickles -----------------------------------------------------------


@pytest.mark.parametrize("limit, says", [
    (["--deadline", "1.5"], "not complete within the deadline of 1.5 s"),
    (["--min-rate", "1K/0.5"], "bytes in the last 0.5 s, below the minimum rate of 1024 bytes/s"),
])
def test_a_trickling_sender_is_timed_out(limit, says):
    """One byte every 0.1 s is never idle for --idle-timeout 1; a deadline or a minimum rate
    ends it. Before, nothing did."""
    data = load("pc")
    with short_dir() as d:
        with receiver_process(f"unix:{d}/s.sock", "--idle-timeout", "1", *limit, "-q") as proc:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"listening")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(f"{d}/s.sock")
                t0 = time.monotonic()
                with contextlib.suppress(OSError):
                    for i in range(200):  # at most 20 s
                        s.sendall(data[i : i + 1])
                        if proc.poll() is not None:
                            break
                        poll_pause(0.1)  # the trickle itself: what the test is about
                _, err = proc.communicate(timeout=WAIT)
                seconds = time.monotonic() - t0
    print(f"\n{limit}: ended after {seconds:.2f} s: {err.decode().strip()}")
    assert proc.returncode == 1
    assert says in err.decode() and len(err.splitlines()) == 1, err
    assert seconds < 5


def test_limits_do_not_disturb_a_good_stream(tmp_path):
    src = tmp_path / "pc.mig"
    src.write_bytes(load("pc"))
    assert run_receiver(f"file:{src}", "--deadline", "30", "--min-rate", "1M/5",
                        "--idle-timeout", "5")[:2] == (0, "")
