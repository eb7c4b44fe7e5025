#!/usr/bin/env python3
"""NBD throughput: our server and client against qemu-nbd, nbdkit and nbdcopy, in one run.

    python bench/nbd.py [--size 1G] [--rounds 3] [--json out.json] [--quick]

Servers (all serving the same file, started once and kept for the whole run):
  ours with 1, 2 and 4 IOThreads (``qioc-nbd-server``), ``qemu-nbd --shared=8``,
  ``nbdkit file``; each on a UNIX socket and on 127.0.0.1 TCP.
Clients: ``nbdcopy --connections=1`` and ``--connections=4`` to ``null:`` from each server;
  our ``qioc-nbd-copy`` to ``null:`` from qemu-nbd (1 connection / 1 IOThread and
  4 connections / 2 IOThreads) against nbdcopy doing the same.
Each configuration runs once per round, rounds interleaved, and the table shows the median
wall-clock rate (file bytes / seconds, MB/s = 10^6 B/s) and its ratio to the baseline named in
the last column. The file is made of random bytes (no holes to skip) under /tmp and deleted.
The machine has 2 cores and the figures move 20-30 % from run to run: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ)
SERVER = [sys.executable, "-m", "qioc_green.nbd", "server"]  # qioc-nbd-server
COPY = [sys.executable, "-m", "qioc_green.nbd", "copy"]  # qioc-nbd-copy


def parse_size(text: str) -> int:
    from qioc_green.nbd import parse_size as ps

    return ps(text)


class Proc:
    """A server process, stopped by its pid."""

    def __init__(self, argv: list[str], ready: str | None = None, pidfile: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env or ENV)
        self.lines: list[str] = []
        deadline = time.monotonic() + 20
        if ready is not None:  # our server: read its "listening on" lines
            assert self.proc.stdout is not None
            while len(self.lines) < int(ready):
                line = self.proc.stdout.readline().decode().strip()
                if not line:
                    raise RuntimeError(f"{argv[0]} exited before listening")
                self.lines.append(line.removeprefix("listening on "))
        if pidfile is not None:  # peers: ready once their pid file is written
            while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start")
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def timed(argv: list[str], timeout: float = 300) -> tuple[float, float | None]:
    """Wall-clock seconds of the command, and the copy's own seconds if it prints them (our
    qioc-nbd-copy --json: without the interpreter's start-up, about 0.2 s here)."""
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, timeout=timeout, env=ENV)
    t1 = time.perf_counter()
    if res.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.decode()[-500:]}")
    inner = None
    if res.stdout.startswith(b"{"):
        inner = float(json.loads(res.stdout)["seconds"])
    return t1 - t0, inner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="file size (1G)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="UNIX only, 1 and 2 IOThreads (a smoke run)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also serve from this source tree of qioc_green (PYTHONPATH; rows ours-Nt-base), "
                         "e.g. `git archive BASE | tar x -C DIR`, and print the ratios against it")
    args = ap.parse_args()
    for prog in ("qemu-nbd", "nbdkit", "nbdcopy"):
        if shutil.which(prog) is None:
            print(f"bench/nbd.py: {prog} is not installed", file=sys.stderr)
            return 1
    size = parse_size(args.size)
    tmp = tempfile.mkdtemp(prefix="nbd-bench-", dir="/tmp")
    img = os.path.join(tmp, "disk.img")
    procs: list[Proc] = []
    try:
        with open(img, "wb") as f:
            chunk = os.urandom(16 << 20)
            for pos in range(0, size, len(chunk)):
                f.write(chunk[:min(len(chunk), size - pos)])
        subprocess.run(["cat", img], stdout=subprocess.DEVNULL, check=True)  # into the page cache

        uris: dict[str, str] = {}
        iothreads = (1, 2) if args.quick else (1, 2, 4)
        transports = ("unix",) if args.quick else ("unix", "tcp")
        variants = [("", ENV)] + ([("-base", dict(ENV, PYTHONPATH=args.baseline))] if args.baseline else [])
        for suffix, env in variants:
            for n in iothreads:
                sock = os.path.join(tmp, f"ours{n}{suffix}.sock")
                listen = ["--listen", f"unix:{sock}"] + ([] if args.quick else ["--listen", "tcp:127.0.0.1:0"])
                p = Proc([*SERVER, *listen, "--export", f"disk={img},ro", "--iothreads", str(n)],
                         ready=str(len(transports)), env=env)
                procs.append(p)
                uris[f"ours-{n}t{suffix}/unix"] = f"nbd+unix:///disk?socket={sock}"
                if not args.quick:
                    host_port = p.lines[1].removeprefix("tcp:")
                    uris[f"ours-{n}t{suffix}/tcp"] = f"nbd://{host_port}/disk"
        qsock = os.path.join(tmp, "qemu.sock")
        procs.append(Proc(["qemu-nbd", "-r", "-f", "raw", "-t", "-x", "disk", "--shared=8", "-k", qsock,
                           "--pid-file", qsock + ".pid", img], pidfile=qsock + ".pid"))
        uris["qemu-nbd/unix"] = f"nbd+unix:///disk?socket={qsock}"
        ksock = os.path.join(tmp, "kit.sock")
        procs.append(Proc(["nbdkit", "-f", "--exit-with-parent", "-r", "-U", ksock, "-P", ksock + ".pid",
                           "file", f"file={img}"], pidfile=ksock + ".pid"))
        uris["nbdkit/unix"] = f"nbd+unix:///?socket={ksock}"
        if not args.quick:
            import socket

            ports = []
            for _ in range(2):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
                s.close()
            procs.append(Proc(["qemu-nbd", "-r", "-f", "raw", "-t", "-x", "disk", "--shared=8", "-b", "127.0.0.1",
                               "-p", str(ports[0]), "--pid-file", qsock + ".tcp.pid", img], pidfile=qsock + ".tcp.pid"))
            uris["qemu-nbd/tcp"] = f"nbd://127.0.0.1:{ports[0]}/disk"
            procs.append(Proc(["nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1", "-p", str(ports[1]),
                               "-P", ksock + ".tcp.pid", "file", f"file={img}"], pidfile=ksock + ".tcp.pid"))
            uris["nbdkit/tcp"] = f"nbd://127.0.0.1:{ports[1]}/"

        configs: list[tuple[str, str, list[str]]] = []  # (row, column, argv)
        for name, uri in uris.items():
            for conns in (1, 4):
                configs.append((name, f"nbdcopy -C{conns}", ["nbdcopy", f"--connections={conns}", uri, "null:"]))
        quri = uris["qemu-nbd/unix"]
        for label, extra in (("C1 T1", ["--connections", "1", "--iothreads", "1"]),
                             ("C4 T2", ["--connections", "4", "--iothreads", "2"])):
            configs.append((f"client {label}", "ours", [*COPY, "--json", quri, "null:", *extra]))
            conns = extra[1]
            configs.append((f"client {label}", "nbdcopy", ["nbdcopy", f"--connections={conns}", quri, "null:"]))

        print(f"bench/nbd.py: {size >> 20} MiB file, {args.rounds} rounds, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}; load {os.getloadavg()[0]:.2f}", flush=True)
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for row, col, argv in configs:
                t, inner = timed(argv)
                times.setdefault((row, col), []).append(t)
                if inner is not None:
                    times.setdefault((row, col + " in-process"), []).append(inner)
            print(f"  round {r + 1} done (load {os.getloadavg()[0]:.2f})", flush=True)

        rate = {k: size / statistics.median(v) / 1e6 for k, v in times.items()}
        results = {"size": size, "rounds": args.rounds, "load_after": os.getloadavg()[0],
                   "commands": {f"{r} | {c}": a for r, c, a in configs},
                   "times": {f"{r} | {c}": v for (r, c), v in times.items()},
                   "mb_per_s": {f"{r} | {c}": v for (r, c), v in rate.items()}}

        print()
        print("nbdcopy URI null: (median MB/s; ratio to qemu-nbd on the same transport and -C)")
        print(f"{'server':<16}{'-C1 MB/s':>10}{'x qemu':>8}{'-C4 MB/s':>10}{'x qemu':>8}")
        ratios = {}
        for name in uris:
            transport = name.split("/")[1]
            base1 = rate[(f"qemu-nbd/{transport}", "nbdcopy -C1")]
            base4 = rate[(f"qemu-nbd/{transport}", "nbdcopy -C4")]
            r1 = rate[(name, "nbdcopy -C1")]
            r4 = rate[(name, "nbdcopy -C4")]
            ratios[name] = (r1 / base1, r4 / base4)
            print(f"{name:<16}{r1:>10.0f}{r1 / base1:>8.2f}{r4:>10.0f}{r4 / base4:>8.2f}")
        print()
        print("copy out of qemu-nbd over UNIX to null: (median MB/s)")
        print(f"{'':<16}{'ours':>10}{'nbdcopy':>10}{'ratio':>8}   (ours without interpreter start-up: MB/s, ratio)")
        for label in ("C1 T1", "C4 T2"):
            ours = rate[(f"client {label}", "ours")]
            inner = rate[(f"client {label}", "ours in-process")]
            theirs = rate[(f"client {label}", "nbdcopy")]
            ratios[f"client {label}"] = (ours / theirs, inner / theirs)
            print(f"{label:<16}{ours:>10.0f}{theirs:>10.0f}{ours / theirs:>8.2f}   ({inner:.0f}, {inner / theirs:.2f})")
        results["ratios"] = ratios
        print()
        print("targets:")
        for t in transports:
            print(f"  ours-1t/{t} -C1 >= 0.5x qemu-nbd: {ratios[f'ours-1t/{t}'][0]:.2f}")
            print(f"  ours-2t/{t} -C4 >= 0.7x qemu-nbd: {ratios[f'ours-2t/{t}'][1]:.2f}")
        print(f"  our client >= 0.5x nbdcopy (wall clock): {ratios['client C1 T1'][0]:.2f} (C1 T1), "
              f"{ratios['client C4 T2'][0]:.2f} (C4 T2)")
        if args.baseline:
            for t in transports:
                for n in iothreads:
                    for c in ("-C1", "-C4"):
                        now, base = rate[(f"ours-{n}t/{t}", f"nbdcopy {c}")], rate[(f"ours-{n}t-base/{t}", f"nbdcopy {c}")]
                        print(f"  ours-{n}t/{t} nbdcopy {c} / baseline: {now / base:.2f}x ({now:.0f} / {base:.0f} MB/s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
