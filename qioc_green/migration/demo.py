"""Demo: a live QEMU migration through the migration stream receiver (``make demo``).

    python -m qioc_green.migration.demo [--no-qemu] [--no-multifd]

With QEMU 10 unpacked beside the system's QEMU (``.ci/install-qemu10``; ``QIOC_QEMU10`` says
where): a running VM with 64 MiB of random RAM (no disk, TCG) migrates with multifd, 4 channels,
into the installed ``qioc-migration-receiver``, which reads the main channel and each multifd
channel in an IOThread of its own, parses them on the fly and forwards every one to a
destination QEMU 10 (started ``-incoming defer``, multifd set); the destination resumes the VM.
The demo prints which IOThread read how many bytes of which channel. With only
``qemu-system-x86_64`` (or ``--no-multifd``): a small running VM (32 MiB) migrates through the
receiver in one stream. Without QEMU (or with ``--no-qemu``): a stream captured from QEMU 7.2
(shipped with the package, ``data/pc.mig.gz``) is sent over loopback into the receiver. Either
way the receiver's summary is printed. Every process is killed by its pid and every temporary
file removed at the end; it takes a few seconds. The live parts need ``qemu.qmp`` (the ``demo``
extra; ``make demo`` installs it).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

COMMAND = "qioc-migration-receiver"
TIMEOUT = 30.0


def receiver_argv() -> list[str]:
    """The installed command: beside this interpreter (a venv's bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), COMMAND)
    if os.access(here, os.X_OK):
        return [here]
    found = shutil.which(COMMAND)
    if found is not None:
        return [found]
    raise SystemExit(f"demo: {COMMAND} is not installed (pip install .)")


def start_receiver(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*receiver_argv(), "tcp:127.0.0.1:0", "--quiet", *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the receiver prints this first, or exits
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait(10)
        raise SystemExit("demo: the receiver did not start")
    return proc, line.removeprefix("listening on ")


def finish(proc: subprocess.Popen[str]) -> int:
    try:
        proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
    return proc.returncode


def live(tmp: str) -> dict[str, Any]:
    from . import qemu

    print(f"live migration: source QEMU -> {COMMAND} --forward -> destination QEMU")
    with qemu.Qemu(machine="pc", mem="32M", paused=False, name="source") as src, \
            qemu.Qemu(machine="pc", mem="32M", incoming=True, paused=False,
                      name="destination") as dst:
        dest = dst.listen()
        rx, addr = start_receiver("--forward", dest, "--digest",
                                  "--json", os.path.join(tmp, "summary.json"))
        try:
            print(f"  source {src.status()}, destination waiting on {dest}, "
                  f"receiver on {addr}")
            t0 = time.monotonic()
            src.migrate(addr)
            info = src.wait_migration(TIMEOUT)
            dst.wait_migration(TIMEOUT)
            took = time.monotonic() - t0
            status = dst.status()
            rc = finish(rx)
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait(10)
        print(f"  migrated in {took:.2f} s: source {src.status()}, destination {status}; "
              f"QEMU sent {info['ram']['transferred']} RAM bytes; receiver exit {rc}")
    with open(os.path.join(tmp, "summary.json")) as f:
        summary: dict[str, Any] = json.load(f)
    print(f"  sha256 in == out: {summary['sha256_in'] == summary['sha256_out']}")
    return summary


def live_multifd(tmp: str, binary: dict[str, Any], channels: int = 4) -> dict[str, Any]:
    from . import qemu

    ram_file = os.path.join(tmp, "ram.bin")
    with open(ram_file, "wb") as f:
        f.write(os.urandom(64 << 20))  # random: every page is a normal page, on a channel
    print(f"live multifd migration ({channels} channels): source QEMU 10 -> {COMMAND} "
          f"--forward -> destination QEMU 10")
    with qemu.Qemu(machine="q35", mem="64M", ram_file=ram_file, paused=False,
                   capabilities=["multifd"], name="source", **binary) as src, \
            qemu.Qemu(machine="q35", mem="64M", incoming=True, paused=False,
                      capabilities=["multifd"], name="destination", **binary) as dst:
        for q in (src, dst):  # a destination must be told, as the receiver is
            q.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        dest = dst.listen()
        rx, addr = start_receiver("--multifd-channels", str(channels), "--forward", dest,
                                  "--digest", "--json", os.path.join(tmp, "summary.json"))
        try:
            print(f"  source {src.status()}, destination waiting on {dest}, "
                  f"receiver on {addr}")
            t0 = time.monotonic()
            src.migrate(addr)
            info = src.wait_migration(TIMEOUT)
            dst.wait_migration(TIMEOUT)
            took = time.monotonic() - t0
            status = dst.status()
            rc = finish(rx)
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait(10)
        print(f"  migrated in {took:.2f} s: source {src.status()}, destination {status}; "
              f"QEMU sent {info['ram']['transferred']} RAM bytes; receiver exit {rc}")
    with open(os.path.join(tmp, "summary.json")) as f:
        summary: dict[str, Any] = json.load(f)
    print()
    print(f"  {'connection':<11}{'what':<20}{'read by IOThread':<18}{'bytes':>12}"
          f"{'forwarded':>12}  sha256 in == out")
    conns = summary["multifd"]["connections"]
    for c in conns:
        what = "main channel" if c["kind"] == "main" else f"multifd channel {c['channel_id']}"
        print(f"  {c['connection']:<11}{what:<20}{c['iothread']:<18}{c['bytes']:>12}"
              f"{c.get('forwarded', 0):>12}  {c.get('sha256_in') == c.get('sha256_out')}")
    same = all(c.get("sha256_in") == c.get("sha256_out") for c in conns)
    print(f"  sha256 in == out: {same}")
    return summary


def bundled(tmp: str) -> dict[str, Any]:
    capture = importlib.resources.files(__package__).joinpath("data", "pc.mig.gz")
    data = gzip.decompress(capture.read_bytes())
    print(f"no QEMU: sending a QEMU 7.2 capture (-M pc, {len(data)} bytes) over loopback "
          f"into {COMMAND}")
    rx, addr = start_receiver("--json", os.path.join(tmp, "summary.json"))
    try:
        host, _, port = addr.removeprefix("tcp:").rpartition(":")
        sender = threading.Thread(target=_send, args=((host, int(port)), data))
        sender.start()
        rc = finish(rx)
        sender.join(TIMEOUT)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait(10)
    print(f"  receiver exit {rc}")
    with open(os.path.join(tmp, "summary.json")) as f:
        summary: dict[str, Any] = json.load(f)
    return summary


def _send(addr: tuple[str, int], data: bytes) -> None:
    with socket.create_connection(addr, timeout=TIMEOUT) as s:
        s.sendall(data)


def show(d: dict[str, Any]) -> None:
    print()
    print(f"machine {d['machine']}, complete: {d['complete']}, {d['bytes_total']} bytes "
          f"in {d['elapsed_s']:.3f} s")
    print(f"{len(d['sections'])} sections; the largest:")
    for s in sorted(d["sections"], key=lambda s: -s["bytes"])[:5]:
        print(f"  {s['section_id']:>3} {s['idstr']:<24} v{s['version_id']:<3} "
              f"{s['bytes']:>10} bytes  {s['records']} record(s)")
    print("RAM blocks:")
    for b in d["ram_blocks"]:
        print(f"  {b['name']:<24} {b['size']:>10} bytes  {b['normal_pages']:>6} pages sent, "
              f"{b['zero_pages']:>6} zero")
    devs = d["devices"]
    print(f"{len(devs)} devices: {', '.join(devs[:8])}{', ...' if len(devs) > 8 else ''}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-qemu", action="store_true",
                   help="send the bundled capture even if QEMU is installed")
    p.add_argument("--no-multifd", action="store_true",
                   help="a single-stream migration even if QEMU 10 is there")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="migdemo-")
    try:
        q10 = None
        use_qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
        if not args.no_qemu:
            try:
                from .qemu import qemu10
            except ImportError as exc:  # no qemu.qmp: the live parts cannot run
                if use_qemu:
                    print(f"demo: {exc}; sending the bundled capture instead", file=sys.stderr)
                use_qemu = False
            else:
                q10 = qemu10() if not args.no_multifd else None
        if q10 is not None:
            summary = live_multifd(tmp, q10)
        else:
            summary = live(tmp) if use_qemu else bundled(tmp)
        show(summary)
        return 0 if summary["complete"] else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
