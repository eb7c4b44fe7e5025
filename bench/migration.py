#!/usr/bin/env python3
"""Benchmark the migration stream receiver against a real QEMU 7.2 (never part of the tests).

A paused VM whose guest RAM is a file of random bytes (1 GiB by default, so every page is a
normal page) migrates from a real QEMU with max-bandwidth raised, in one run, interleaved,
``--rounds`` times (the order rotates each round), into:

* the receiver (``qioc-migration-receiver``), parsing on the fly (summary, no files);
* a plain Python sink: a blocking socket and ``recv_into`` a 1 MiB buffer until EOF;
* ``socat -u -b 1048576 TCP-LISTEN:... STDOUT`` with stdout on /dev/null;
* a destination QEMU directly, and through the receiver with ``--forward``;
* with ``--tls`` also over TLS (certificates made with openssl; the source gets a
  ``tls-creds-x509`` object): into the receiver with ``--tls-creds``, and into a destination
  QEMU with TLS, beside the plaintext runs of the same round;

and a saved stream of the same VM is parsed from a file by the receiver, beside a plain Python
read of that file. A fresh source QEMU serves each migration (7.2 will not migrate a VM twice).

With QEMU 10 beside 7.2 (``QIOC_QEMU10``; ``--qemu10 only`` skips the 7.2 part), the same RAM
migrates from a QEMU 10 source in the same rounds:

* in one stream, into the receiver and into the plain ``recv_into`` sink (today's baseline);
* with multifd, ``--channels`` (4) channels, into the receiver (``--multifd-channels``) parsing
  only (its pages dropped by the kernel unread; ``-copy``: read, as ``QIOC_MIGRATION_PAGES=copy``
  makes it), into the receiver with ``--ram-dir`` on ``--ram-dir-base`` (a tmpfs, /dev/shm: the
  pages stored as a destination stores them, in memory) and on ``--tmp``'s file system
  (``-disk``: the page cache) and with ``--ram-prealloc`` (``-prealloc``: pc.ram's file
  allocated and mapped before the migration), into a QEMU 10 destination (``-incoming defer``, multifd set;
  with ``-mem-prealloc`` as the 7.2 part's; without, its default: anonymous memory with
  transparent huge pages; and with its RAM a shared file on ``--ram-dir-base``, where the
  receiver's files go: the like-for-like of ``--ram-dir``) and through the receiver's
  ``--forward`` into one (``-mem-prealloc``). They run in a shuffled order each round.

CPU per GiB is the receiver's own (all its threads), a destination's from psutil.

Timing: a live migration runs from the ``migrate`` command to the ``completed`` event of the
QEMU that finishes last (the source for the sinks, the destination for direct/forward), using
the timestamps QEMU puts on its events; throughput is the stream's bytes over that time. The
file parse uses the receiver's own elapsed time (from its JSON), so interpreter start-up does
not count. Medians are reported, with each round's figure. Processes are killed by pid and the
big files (under ``--tmp``, /tmp by default) are deleted at the end.

    python bench/migration.py [--mem-mib 1024] [--rounds 3] [--tls] [--json bench/out/migration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from qioc_green.migration.qemu import Qemu, available, qemu10

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

RECEIVER = [sys.executable, "-m", "qioc_green.migration"]  # qioc-migration-receiver
TIMEOUT = 300.0

PLAIN_SINK = """
import socket, sys, time
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1)
print(f"listening on tcp:127.0.0.1:{l.getsockname()[1]}", flush=True)
c, _ = l.accept()
buf = bytearray(1 << 20)
n = 0
while k := c.recv_into(buf):
    n += k
print(n, time.process_time(), flush=True)
"""

PLAIN_READ = """
import sys, time
buf = bytearray(1 << 20)
n = 0
t0 = time.monotonic()
with open(sys.argv[1], "rb", buffering=0) as f:
    while k := f.readinto(buf):
        n += k
print(n, time.monotonic() - t0, flush=True)
"""


def make_certs(d: str) -> tuple[str, str]:
    """A CA, a server certificate for 127.0.0.1, and the tls-creds-x509 directories of a
    server (ca-cert, server-cert, server-key) and a client (ca-cert): (server dir, client dir)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=bench CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "san.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")
    server, client = os.path.join(d, "server"), os.path.join(d, "client")
    os.makedirs(server)
    os.makedirs(client)
    for src, dst in (("ca.pem", "server/ca-cert.pem"), ("server.pem", "server/server-cert.pem"),
                     ("server.key", "server/server-key.pem"), ("ca.pem", "client/ca-cert.pem")):
        shutil.copy(os.path.join(d, src), os.path.join(d, dst))
    return server, client


def tls_object(qemu: Qemu, creds: str, endpoint: str) -> None:
    """Give ``qemu`` a tls-creds-x509 object and point its migration at it."""
    qemu.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds,
                              "endpoint": endpoint, "verify-peer": False})
    params = {"tls-creds": "tls0"}
    if endpoint == "client":
        params["tls-hostname"] = "localhost"
    qemu.cmd("migrate-set-parameters", **params)


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"sink did not start: {line!r}")
    return line.removeprefix("listening on ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until a socket on 127.0.0.1:port is in LISTEN state (socat cannot tell us)."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            for line in f:
                cols = line.split()
                if len(cols) > 3 and cols[1] == want and cols[3] == "0A":
                    return
        time.sleep(0.005)  # nothing to wait on but the child's progress
    raise RuntimeError(f"nothing listens on port {port}")


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args = args
        self.tmp = tmp
        self.mem = f"{args.mem_mib}M"
        self.ram_file = os.path.join(tmp, "ram.bin")
        self.stream = os.path.join(tmp, "stream.mig")
        self.q10: dict[str, Any] = {}
        self.certs = make_certs(tmp) if args.tls else ("", "")

    def source(self, tls: bool = False) -> Qemu:
        src = Qemu(machine="pc", mem=self.mem, ram_file=self.ram_file, paused=True,
                   timeout=60, name="source")
        if tls:
            try:
                tls_object(src, self.certs[1], "client")
            except BaseException:
                src.close()
                raise
        return src

    # -- QEMU 10, one stream and multifd -----------------------------------------------------------

    def source10(self, channels: int = 0) -> Qemu:
        q = Qemu(machine="pc", mem=self.mem, ram_file=self.ram_file, paused=True, timeout=60,
                 capabilities=["multifd"] if channels else [], name="source-10.0",
                 **self.q10)
        if channels:
            q.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        return q

    def live10(self, kind: str) -> dict[str, Any]:
        """One QEMU 10 migration, one of KINDS10 (see LABELS)."""
        n = self.args.channels if kind.startswith("mfd") else 0
        dst = None
        proc = None
        ram_dir = None
        summary = os.path.join(self.tmp, "rx10.json")
        # "-copy": every page read through the receiver's buffers (as with --ram-dir), even
        # where the kernel could drop them unread
        # "KIND+VAR=VALUE;VAR=VALUE...": an experiment, KIND with those in the receiver's env
        plain, _, spec = kind.partition("+")
        base = plain.removesuffix("-copy")
        extra_env = dict(x.split("=", 1) for x in spec.split(";")) if spec else {}
        if plain.endswith("-copy"):
            extra_env.setdefault("QIOC_MIGRATION_PAGES", "copy")
        env = dict(os.environ, **extra_env) if extra_env else None
        try:
            if base in DIRECT10 or base == "mfd-forward":
                prealloc = self.args.prealloc and base in ("mfd-direct", "mfd-forward")
                extra = ("-mem-prealloc",) if prealloc else ()
                ram_file = None
                if base == "mfd-direct-file":  # guest RAM a file where --ram-dir's files go
                    ram_dir = tempfile.mkdtemp(prefix="migbench-ram-", dir=self.args.ram_dir_base)
                    ram_file = os.path.join(ram_dir, "pc.ram")
                dst = Qemu(machine="pc", mem=self.mem, incoming=True, paused=True, timeout=120,
                           capabilities=["multifd"], extra=extra, name="dest-10.0",
                           ram_file=ram_file, ram_share=True, **self.q10)
                dst.cmd("migrate-set-parameters", **{"multifd-channels": n})
                target = dst.listen()
            if base == "10-plain":
                proc = subprocess.Popen([sys.executable, "-c", PLAIN_SINK],
                                        stdout=subprocess.PIPE, text=True)
                target = first_line(proc)
            elif base not in DIRECT10:
                argv = [*RECEIVER, "tcp:127.0.0.1:0", "--quiet", "--json", summary]
                if n:
                    argv += ["--multifd-channels", str(n)]
                if base in ("mfd-ramdir", "mfd-ramdir-disk", "mfd-ramdir-prealloc"):
                    where = self.args.tmp if base == "mfd-ramdir-disk" else self.args.ram_dir_base
                    ram_dir = tempfile.mkdtemp(prefix="migbench-ram-", dir=where)
                    argv += ["--ram-dir", ram_dir]
                if base == "mfd-ramdir-prealloc":  # allocated before "listening on"
                    argv += ["--ram-prealloc", f"pc.ram={self.args.mem_mib}M"]
                if base == "mfd-forward":
                    argv += ["--forward", target]
                proc = subprocess.Popen([*argv, *self.args.receiver_args.split()],
                                        stdout=subprocess.PIPE, text=True, env=env)
                target = first_line(proc)
            dst_c0 = _cpu(dst.pid) if dst is not None else 0.0
            with self.source10(n) as src:
                c0 = _cpu(src.pid)
                t0 = time.time()
                src.migrate(target)
                info = src.wait_migration(TIMEOUT)
                end = src.completed_at
                if dst is not None:
                    dst.wait_migration(TIMEOUT)
                    end = max(end, dst.completed_at)
                src_cpu = _cpu(src.pid) - c0
            dst_cpu = _cpu(dst.pid) - dst_c0 if dst is not None else None
            sink_cpu = None
            seconds = end - t0
            nbytes = _stream_bytes(info)
            if proc is not None:
                out, _ = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    raise RuntimeError(f"{kind}: exited {proc.returncode}")
                if base == "10-plain":
                    sink_cpu = float(out.split()[-1])
                else:
                    with open(summary) as f:
                        d = json.load(f)
                    if not d["complete"]:
                        raise RuntimeError(f"{kind}: {d.get('error')}")
                    sink_cpu = d["cpu_s"]
                    nbytes = d["bytes_total"]
                    if base != "mfd-forward":  # the receiver may finish after the source
                        seconds = max(seconds, d["elapsed_s"])
        finally:
            for p_ in (proc,):
                if p_ is not None and p_.poll() is None:
                    p_.kill()
                    p_.wait(10)
            if dst is not None:
                dst.close()
            if ram_dir is not None:
                shutil.rmtree(ram_dir, ignore_errors=True)
        return {"s": seconds, "bytes": nbytes, "gbs": nbytes / seconds / 1e9,
                "qemu_total_ms": info.get("total-time"), "source_cpu_s": src_cpu,
                "dest_cpu_s": dst_cpu, "sink_cpu_s": sink_cpu}

    def make_ram(self) -> None:
        chunk = 64 << 20
        with open(self.ram_file, "wb") as f:
            f.writelines(os.urandom(chunk) for _ in range((self.args.mem_mib << 20) // chunk))

    # -- live into sinks ---------------------------------------------------------------------------

    def start_sink(self, kind: str) -> tuple[subprocess.Popen[str], str]:
        if kind in ("receiver", "receiver-tls"):
            tls = ["--tls-creds", self.certs[0]] if kind == "receiver-tls" else []
            proc = subprocess.Popen(
                [*RECEIVER, "tcp:127.0.0.1:0", "--quiet", *tls,
                 "--json", os.path.join(self.tmp, "rx.json"), *self.args.receiver_args.split()],
                stdout=subprocess.PIPE, text=True)
            return proc, first_line(proc)
        if kind == "plain":
            proc = subprocess.Popen([sys.executable, "-c", PLAIN_SINK], stdout=subprocess.PIPE,
                                    text=True)
            return proc, first_line(proc)
        if kind == "socat":
            port = free_port()
            proc = subprocess.Popen(
                ["socat", "-u", "-b", str(1 << 20), f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                 "STDOUT"],
                stdout=subprocess.DEVNULL, text=True)
            wait_listening(port)
            return proc, f"tcp:127.0.0.1:{port}"
        raise AssertionError(kind)

    def live_sink(self, kind: str) -> dict[str, Any]:
        proc, addr = self.start_sink(kind)
        try:
            with self.source(tls=kind.endswith("-tls")) as src:
                c0 = _cpu(src.pid)
                t0 = time.time()
                src.migrate(addr)
                info = src.wait_migration(TIMEOUT)
                seconds = src.completed_at - t0
                src_cpu = _cpu(src.pid) - c0
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} sink exited {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        nbytes = _stream_bytes(info)
        sink_cpu = None
        if kind.startswith("receiver"):
            with open(os.path.join(self.tmp, "rx.json")) as f:
                d = json.load(f)
            if not d["complete"]:
                raise RuntimeError(f"receiver: {d.get('error')}")
            nbytes = d["bytes_total"]
            sink_cpu = d["cpu_s"]
        elif kind == "plain":
            sink_cpu = float(out.split()[-1])
        return {"s": seconds, "bytes": nbytes, "gbs": nbytes / seconds / 1e9,
                "qemu_total_ms": info.get("total-time"), "source_cpu_s": src_cpu,
                "sink_cpu_s": sink_cpu}

    # -- live into a destination -------------------------------------------------------------------

    def live_dest(self, mode: str) -> dict[str, Any]:
        proc = None
        extra = ("-mem-prealloc",) if self.args.prealloc else ()
        with Qemu(machine="pc", mem=self.mem, incoming=True, paused=True, timeout=120,
                  extra=extra, name="dest") as dst:
            if mode == "direct-tls":
                tls_object(dst, self.certs[0], "server")
            target = dst.listen()
            dst_c0 = _cpu(dst.pid)
            try:
                if mode == "socat-forward":  # a C relay: what forwarding costs without Python
                    port = _free_port()
                    proc = subprocess.Popen(
                        ["socat", "-b", "1048576", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                         "TCP:" + target.removeprefix("tcp:")])
                    _wait_listening(proc.pid, port)
                    target = f"tcp:127.0.0.1:{port}"
                elif mode == "forward":
                    proc = subprocess.Popen(
                        [*RECEIVER, "tcp:127.0.0.1:0", "--quiet",
                         "--forward", target, "--json", os.path.join(self.tmp, "fwd.json")],
                        stdout=subprocess.PIPE, text=True)
                    target = first_line(proc)
                with self.source(tls=mode.endswith("-tls")) as src:
                    c0 = _cpu(src.pid)
                    t0 = time.time()
                    src.migrate(target)
                    info = src.wait_migration(TIMEOUT)
                    dst.wait_migration(TIMEOUT)
                    seconds = max(dst.completed_at, src.completed_at) - t0
                    src_cpu = _cpu(src.pid) - c0
                dst_cpu = _cpu(dst.pid) - dst_c0
                relay_cpu = None
                if proc is not None and mode == "socat-forward":
                    proc.wait(60)
                elif proc is not None:
                    proc.communicate(timeout=60)
                    if proc.returncode != 0:
                        raise RuntimeError(f"receiver --forward exited {proc.returncode}")
                    with open(os.path.join(self.tmp, "fwd.json")) as f:
                        relay_cpu = json.load(f)["cpu_s"]
            finally:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        nbytes = _stream_bytes(info)
        return {"s": seconds, "bytes": nbytes, "gbs": nbytes / seconds / 1e9,
                "qemu_total_ms": info.get("total-time"), "source_cpu_s": src_cpu,
                "dest_cpu_s": dst_cpu, "sink_cpu_s": relay_cpu}

    # -- from a file -------------------------------------------------------------------------------

    def capture(self) -> int:
        proc = subprocess.Popen([*RECEIVER, "tcp:127.0.0.1:0", "--quiet",
                                 "--save", self.stream], stdout=subprocess.PIPE, text=True)
        try:
            addr = first_line(proc)
            with self.source() as src:
                src.migrate(addr)
                src.wait_migration(TIMEOUT)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        return os.path.getsize(self.stream)

    def parse_file(self) -> dict[str, Any]:
        out = os.path.join(self.tmp, "file.json")
        subprocess.run([*RECEIVER, f"file:{self.stream}", "--quiet",
                        "--json", out], check=True, timeout=TIMEOUT)
        with open(out) as f:
            d = json.load(f)
        return {"s": d["elapsed_s"], "bytes": d["bytes_total"],
                "gbs": d["bytes_total"] / d["elapsed_s"] / 1e9}

    def read_file(self) -> dict[str, Any]:
        r = subprocess.run([sys.executable, "-c", PLAIN_READ, self.stream], check=True,
                           timeout=TIMEOUT, capture_output=True, text=True)
        n, s = r.stdout.split()
        return {"s": float(s), "bytes": int(n), "gbs": int(n) / float(s) / 1e9}


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(pid: int, port: int, timeout: float = 10.0) -> None:
    """Until process ``pid`` listens on ``port`` (asked of the kernel: a probe connection
    would become socat's one and only client)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections("tcp")):
            return
        time.sleep(0.005)
    raise RuntimeError(f"socat never listened on {port}")


def _stream_bytes(info: dict[str, Any]) -> int:
    return int(info["ram"]["transferred"])


LABELS = {
    "receiver": "live -> receiver (parsing)",
    "receiver-tls": "live TLS -> receiver --tls-creds",
    "plain": "live -> Python recv_into sink",
    "socat": "live -> socat -b 1M > /dev/null",
    "direct": "live -> destination QEMU",
    "forward": "live -> receiver --forward -> dest",
    "socat-forward": "live -> socat relay -> dest",
    "direct-tls": "live TLS -> destination QEMU",
    "parse-file": "file -> receiver (parsing)",
    "read-file": "file -> Python readinto",
    "10-receiver": "QEMU 10 -> receiver (one stream)",
    "10-plain": "QEMU 10 -> Python recv_into sink",
    "mfd-receiver": "QEMU 10 multifd -> receiver",
    "mfd-receiver-copy": "  ... pages read, not dropped unread",
    "mfd-ramdir": "QEMU 10 multifd -> receiver --ram-dir",
    "mfd-ramdir-disk": "  ... --ram-dir on --tmp's file system",
    "mfd-ramdir-prealloc": "  ... and --ram-prealloc pc.ram=SIZE",
    "mfd-direct": "QEMU 10 multifd -> destination QEMU 10",
    "mfd-direct-np": "  ... destination without -mem-prealloc",
    "mfd-direct-file": "  ... its RAM a file on --ram-dir-base",
    "mfd-forward": "QEMU 10 multifd -> receiver --forward -> d",
}
DIRECT10 = ("mfd-direct", "mfd-direct-np", "mfd-direct-file")
KINDS10 = ("10-receiver", "10-plain", "mfd-receiver", "mfd-receiver-copy", "mfd-ramdir",
           "mfd-ramdir-disk", "mfd-ramdir-prealloc", "mfd-direct", "mfd-direct-np", "mfd-direct-file", "mfd-forward")


def main() -> int:
    p = argparse.ArgumentParser(description="Benchmark the migration receiver against QEMU.")
    p.add_argument("--mem-mib", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tmp", default="/tmp", help="where the big files go (deleted at the end)")
    p.add_argument("--json", default=os.path.join(HERE, "out", "migration.json"))
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--no-prealloc", dest="prealloc", action="store_false",
                   help="do not start destinations with -mem-prealloc (then the first touch "
                        "of their RAM, which varies several-fold run to run on this VM, is "
                        "inside the timed window)")
    p.add_argument("--sinks", default="receiver,plain,socat",
                   help="live sinks to run, comma-separated (default: all three)")
    p.add_argument("--tls", action="store_true",
                   help="also over TLS: the receiver with --tls-creds, and a TLS destination QEMU")
    p.add_argument("--only-tls", action="store_true",
                   help="just the TLS comparison: receiver and direct, plaintext and TLS")
    p.add_argument("--receiver-args", default="",
                   help="extra receiver options for the 'receiver' sink (for experiments)")
    p.add_argument("--qemu10", choices=("yes", "no", "only"), default="yes",
                   help="the QEMU 10 part (one stream and multifd): with the 7.2 part (yes, "
                        "when QEMU 10 is there), not at all, or alone")
    p.add_argument("--channels", type=int, default=4, help="multifd channels (default 4)")
    p.add_argument("--ram-dir-base", default="/dev/shm",
                   help="where --ram-dir runs put their (deleted) RAM files (default /dev/shm)")
    p.add_argument("--kinds10", default=",".join(KINDS10),
                   help="QEMU 10 runs, comma-separated (default: all); KIND+VAR=VALUE;... runs "
                        "KIND's receiver with those environment variables (experiments)")
    args = p.parse_args()
    if args.only_tls:
        args.tls = True
        args.sinks = "receiver"
    if not available() or shutil.which("socat") is None:
        print("needs qemu-system-x86_64 and socat", file=sys.stderr)
        return 2
    if args.mem_mib % 64:
        p.error("--mem-mib must be a multiple of 64")

    load_before = os.getloadavg()
    print(f"migration benchmark: {args.mem_mib} MiB random guest RAM, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f}, python "
          f"{sys.version.split()[0]}")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in LABELS}
    for k in args.kinds10.split(","):
        if k and k.partition("+")[0] not in KINDS10:
            p.error(f"--kinds10: unknown kind {k!r} (one of {', '.join(KINDS10)})")
        results.setdefault(k, [])
    q10 = qemu10() if args.qemu10 != "no" else None
    if args.qemu10 == "only" and q10 is None:
        print("--qemu10 only: QEMU 10 not found (QIOC_QEMU10)", file=sys.stderr)
        return 2
    old = args.qemu10 != "only"
    kinds10 = [k for k in args.kinds10.split(",") if k] if q10 is not None else []
    size = 0
    tmp = tempfile.mkdtemp(prefix="migbench-", dir=args.tmp)  # removed at the end
    try:
        b = Bench(args, tmp)
        b.q10 = q10 or {}
        b.make_ram()
        if old:
            size = b.capture()
            print(f"stream size {size} bytes")
        sinks = ([k for k in args.sinks.split(",") if k] + (["receiver-tls"] if args.tls else [])
                 if old else [])
        dests = [] if args.skip_forward or not old else ["direct", "forward", "socat-forward"]
        if args.only_tls and old:
            dests = ["direct"]
        if args.tls and old:
            dests.append("direct-tls")
        for r in range(args.rounds):
            rot = r % len(sinks) if sinks else 0
            for kind in sinks[rot:] + sinks[:rot]:
                results[kind].append(b.live_sink(kind))
            for mode in (dests[r % len(dests):] + dests[: r % len(dests)]) if dests else []:
                results[mode].append(b.live_dest(mode))
            if old:
                for kind in (() if args.only_tls else ("parse-file", "read-file") if r % 2 == 0
                             else ("read-file", "parse-file")):
                    results[kind].append(b.parse_file() if kind == "parse-file"
                                         else b.read_file())
            # a shuffled order (seeded), so no kind always runs after the same one: a run
            # allocates what the one before freed, and here the first touch of memory costs
            # several-fold more or less run to run
            order = list(kinds10)
            random.Random(r).shuffle(order)
            for kind in order:
                results[kind].append(b.live10(kind))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1]['gbs']:.2f}" for k, v in results.items() if v), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(x["gbs"] for x in v) for k, v in results.items() if v}
    ratios = {}
    for a, b_ in (("receiver", "plain"), ("socat", "plain"), ("parse-file", "read-file"),
                  ("forward", "direct"), ("socat-forward", "direct"), ("forward", "socat-forward"),
                  ("receiver-tls", "receiver"), ("direct-tls", "direct"),
                  ("receiver-tls", "direct-tls"),
                  ("10-receiver", "10-plain"), ("mfd-receiver", "mfd-direct"),
                  ("mfd-receiver", "mfd-direct-np"), ("mfd-receiver", "mfd-receiver-copy"),
                  ("mfd-ramdir", "mfd-direct"), ("mfd-ramdir", "mfd-direct-np"),
                  ("mfd-ramdir", "mfd-direct-file"), ("mfd-ramdir-disk", "mfd-ramdir"),
                  ("mfd-ramdir-prealloc", "mfd-direct"), ("mfd-ramdir-prealloc", "mfd-ramdir"),
                  ("mfd-forward", "mfd-direct"), ("mfd-receiver", "10-receiver")):
        if a in med and b_ in med:
            ratios[f"{a}/{b_}"] = med[a] / med[b_]
    targets = {}
    if "receiver/plain" in ratios:
        targets["receiver >= 0.9x plain sink"] = ratios["receiver/plain"] >= 0.9
    if "forward/direct" in ratios:
        targets["forward >= 0.8x direct"] = ratios["forward/direct"] >= 0.8
    if "mfd-receiver/mfd-direct" in ratios:
        targets["multifd receiver (parsing) >= 1.0x the QEMU 10 destination"] = \
            ratios["mfd-receiver/mfd-direct"] >= 1.0
    if "mfd-ramdir/mfd-direct" in ratios:
        targets["multifd receiver (storing pages) >= 1.0x the QEMU 10 destination"] = \
            ratios["mfd-ramdir/mfd-direct"] >= 1.0
    if "mfd-ramdir-prealloc/mfd-direct" in ratios:
        targets["multifd receiver --ram-dir --ram-prealloc >= 1.0x the QEMU 10 destination "
                "(both preallocated)"] = ratios["mfd-ramdir-prealloc/mfd-direct"] >= 1.0
    if "mfd-ramdir/mfd-direct-file" in ratios:
        targets["multifd receiver --ram-dir >= 1.0x a QEMU 10 destination whose RAM is a "
                "file there"] = ratios["mfd-ramdir/mfd-direct-file"] >= 1.0
    load_after = os.getloadavg()

    print()
    print(f"{'what':<38} {'median GB/s':>11}  {'CPU s/GiB':>9}   rounds (GB/s)")
    for k, v in results.items():
        if v:
            runs = " ".join(f"{x['gbs']:.2f}" for x in v)
            # the receiver's or sink's own; for a destination QEMU run directly, the QEMU's
            own = [x["sink_cpu_s"] if x.get("sink_cpu_s") is not None else x.get("dest_cpu_s")
                   for x in v]
            cpus = [c / (x["bytes"] / 2**30) for c, x in zip(own, v) if c is not None]
            cpu = f"{statistics.median(cpus):.2f}" if cpus else "-"
            print(f"{LABELS.get(k, k):<38} {med[k]:>11.2f}  {cpu:>9}   {runs}")
    print()
    for name, value in ratios.items():
        print(f"{name:<24} {value:.2f}x")
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    for k in ("direct", "forward", "mfd-direct", "mfd-direct-np", "mfd-direct-file",
              "mfd-forward"):
        if results[k]:
            per = [(x["source_cpu_s"] + x["dest_cpu_s"] + (x["sink_cpu_s"] or 0))
                   / (x["bytes"] / 2**30) for x in results[k]]
            dest = [x["dest_cpu_s"] / (x["bytes"] / 2**30) for x in results[k]]
            print(f"CPU s/GiB, all processes, {k}: {statistics.median(per):.2f} "
                  f"(destination QEMU's own: {statistics.median(dest):.2f})")
    print("(CPU s/GiB: the receiver's or sink's own, a directly fed destination QEMU's own; "
          "socat's is not measured)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"params": {"mem_mib": args.mem_mib, "rounds": args.rounds,
                              "channels": args.channels, "qemu10": q10 is not None,
                              "dest_mem_prealloc": args.prealloc,
                              "stream_bytes": size, "cpus": os.cpu_count(),
                              "loadavg_before": load_before, "loadavg_after": load_after,
                              "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                   "results": results, "median_gbs": med, "ratios": ratios,
                   "targets": targets}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
