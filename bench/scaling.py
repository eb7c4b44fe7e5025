"""Thread-per-hub scaling: qioc_green on 1, 2, 4 IOThreads beside the usual Python servers.

    python bench/scaling.py            # the full run: 3 interleaved rounds, 3 s windows
    python bench/scaling.py --quick    # a short run: 1 round, 1 s windows, 256 MiB bulk

Workloads (loopback only):
  echo C=16/64/256   64-byte echo, one request in flight per connection
  bulk x1/x4         1 GiB received over 1 and 4 connections (1 MiB writes), server discards
  tls x1/x4          the same over TLS 1.3 with AES-128-GCM

Each server runs in its own process; the load generator in another (a small C program compiled
here with ``cc``, with a Python fallback), its CPU shown.  Per point: requests/s or GB/s, server CPU
per request (us) or per GB (s), server context switches per request, p50/p99 latency; medians over
the rounds with min and max.  Before each round it waits (boundedly) for a quiet machine and says
so when the machine was not.  Output: a table on stdout, JSON and a PNG (``--out DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
GiB = 1 << 30


@dataclass
class Server:
    label: str
    argv: list[str]
    procs: int = 1
    iothreads: int | None = None  # for the plot: qioc_green points against IOThreads
    family: str = "peer"
    env: dict[str, str] | None = None  # added to the server's environment
    tls: bool = True  # serves the TLS workloads


ECHO_EPOLL = "@echo_epoll"  # replaced by the C server built at run time
PURE = {"QIOC_PURE_PYTHON": "1"}


def servers(selected: list[str] | None, baseline: str | None = None) -> list[Server]:
    s = [PY, os.path.join(HERE, "servers.py")]
    out = [
        Server("qioc 1T", s + ["qioc", "--iothreads", "1"], iothreads=1, family="qioc"),
        Server("qioc 2T", s + ["qioc", "--iothreads", "2"], iothreads=2, family="qioc"),
        Server("qioc 4T", s + ["qioc", "--iothreads", "4"], iothreads=4, family="qioc"),
        Server("qioc 2T iohandler", s + ["qioc", "--iothreads", "2", "--no-follow"], iothreads=2,
               family="qioc-iohandler"),
        Server("gevent 1 hub", s + ["gevent"]),
        Server("asyncio", s + ["asyncio"]),
        Server("uvloop", s + ["uvloop"]),
        Server("threads", s + ["threads"]),
        Server("gevent 2 procs", s + ["gevent", "--reuse-port"], procs=2),
        Server("qioc 1T pin", s + ["qioc", "--iothreads", "1", "--pin", "on"], iothreads=1, family="qioc-pin"),
        Server("qioc 2T pin", s + ["qioc", "--iothreads", "2", "--pin", "on"], iothreads=2, family="qioc-pin"),
        Server("qioc 4T pin", s + ["qioc", "--iothreads", "4", "--pin", "on"], iothreads=4, family="qioc-pin"),
        Server("qioc 2T unpinned", s + ["qioc", "--iothreads", "2", "--pin", "off"], iothreads=2,
               family="qioc-unpinned"),
        Server("qioc 4T unpinned", s + ["qioc", "--iothreads", "4", "--pin", "off"], iothreads=4,
               family="qioc-unpinned"),
        Server("qioc 2T reuseport", s + ["qioc", "--iothreads", "2", "--reuse-port"], iothreads=2,
               family="qioc-reuseport"),
        # The pure-Python hot path (QIOC_PURE_PYTHON=1): what a machine without a compiler runs.
        Server("qioc 1T pure", s + ["qioc", "--iothreads", "1"], iothreads=1, family="qioc-pure", env=PURE),
        Server("qioc 2T pure", s + ["qioc", "--iothreads", "2"], iothreads=2, family="qioc-pure", env=PURE),
        Server("qioc 4T pure", s + ["qioc", "--iothreads", "4"], iothreads=4, family="qioc-pure", env=PURE),
        Server("qioc 2T pure pin", s + ["qioc", "--iothreads", "2", "--pin", "on"], iothreads=2,
               family="qioc-pure-pin", env=PURE),
        Server("uvloop Protocol", s + ["uvloop-protocol"]),
        Server("C epoll", [ECHO_EPOLL], tls=False),
    ]
    if baseline:  # another source tree of qioc_green (before a change), on the same servers.py
        out += [Server(f"qioc {n}T base", s + ["qioc", "--iothreads", str(n)], iothreads=n, family="qioc-base",
                       env={"PYTHONPATH": baseline}) for n in (1, 2, 4)]
    default = ["qioc 1T", "qioc 2T", "qioc 4T", "qioc 1T pure", "qioc 2T pure", "qioc 4T pure", "qioc 2T pure pin",
               "qioc 2T iohandler", "C epoll", "uvloop Protocol", "uvloop", "asyncio", "gevent 1 hub", "threads",
               "gevent 2 procs"]
    want = selected or default + ([f"qioc {n}T base" for n in (1, 2, 4)] if baseline else [])
    by_label = {x.label: x for x in out}
    # "LABEL+NAME=VALUE+...": that server with these environment variables (experiments).
    for w in want:
        base, *assigns = w.split("+")
        if assigns and base in by_label:
            b = by_label[base]
            env = dict(b.env or {}, **dict(a.split("=", 1) for a in assigns))
            by_label[w] = Server(w, b.argv, b.procs, b.iothreads, b.family + "+" + "+".join(assigns), env, b.tls)
    unknown = [w for w in want if w not in by_label]
    if unknown:
        raise SystemExit(f"scaling.py: unknown server(s) {unknown}; known: {list(by_label)}")
    return [by_label[w] for w in want]


@dataclass
class Workload:
    label: str
    kind: str  # echo | bulk | tls
    conns: int
    nbytes: int = 0


def workloads(quick: bool, selected: list[str] | None) -> list[Workload]:
    total = (256 << 20) if quick else GiB
    out = [
        Workload("echo C=16", "echo", 16),
        Workload("echo C=64", "echo", 64),
        Workload("echo C=256", "echo", 256),
        Workload("bulk x1", "bulk", 1, total),
        Workload("bulk x4", "bulk", 4, total),
        Workload("tls x1", "tls", 1, total),
        Workload("tls x4", "tls", 4, total),
    ]
    if selected:
        out = [w for w in out if w.label in selected]
        if not out:
            raise SystemExit("scaling.py: no workload matches --workloads")
    return out


# -- the load generator ------------------------------------------------------------------------


@dataclass
class LoadGen:
    argv: list[str]
    tls: bool
    kind: str  # "c" or "python"


def build_loadgen(tmp: str, force_python: bool) -> LoadGen:
    src = os.path.join(HERE, "loadgen.c")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and not force_python:
        exe = os.path.join(tmp, "loadgen")
        base = [cc, "-O2", "-o", exe, src, "-lpthread"]
        tls = subprocess.run(base[:-1] + ["-DWITH_TLS", "-lssl", "-lcrypto", "-lpthread"],
                             capture_output=True).returncode == 0
        if tls or subprocess.run(base, capture_output=True).returncode == 0:
            return LoadGen([exe], tls, "c")
    return LoadGen([PY, os.path.abspath(__file__), "--py-loadgen"], True, "python")


def py_loadgen(argv: list[str]) -> int:
    """The Python fallback: the same arguments and output as loadgen.c (slower; shows its CPU)."""
    import selectors
    import ssl
    import threading

    if argv[0] == "echo":
        host, port, nconn, seconds, size, warmup = argv[1], int(argv[2]), int(argv[3]), float(argv[4]), \
            int(argv[5]), float(argv[6])
        sel = selectors.DefaultSelector()
        msg = b"x" * size
        conns = []
        for _ in range(nconn):
            s = socket.create_connection((host, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(s)
        state = {s.fileno(): [s, 0, 0.0] for s in conns}
        for s in conns:
            sel.register(s, selectors.EVENT_READ)
            state[s.fileno()][2] = time.monotonic()
            s.sendall(msg)
        lat: list[float] = []
        start = time.monotonic()
        t_from, t_end = start + warmup, start + warmup + seconds
        cpu0 = 0.0
        measuring = False
        w0 = 0.0
        while True:
            now = time.monotonic()
            if not measuring and now >= t_from:
                measuring, cpu0, w0 = True, time.process_time(), now
            if now >= t_end:
                break
            for key, _ in sel.select(0.1):
                st = state[key.fd]
                data = st[0].recv(65536)
                if not data:
                    raise SystemExit("connection closed")
                st[1] += len(data)
                if st[1] >= size:
                    t1 = time.monotonic()
                    if measuring:
                        lat.append(t1 - st[2])
                    st[1], st[2] = 0, t1
                    st[0].sendall(msg)
        lat.sort()
        n = len(lat)
        print(json.dumps({"requests": n, "seconds": time.monotonic() - w0,
                          "p50_us": int(lat[n // 2] * 1e6) if n else 0,
                          "p99_us": int(lat[min(n - 1, n * 99 // 100)] * 1e6) if n else 0,
                          "client_cpu": time.process_time() - cpu0}))
        for s in conns:
            s.close()
        return 0
    host, port, nconn, total, tls = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5] == "1"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    chunk = b"b" * (1 << 20)

    def one() -> None:
        s = socket.create_connection((host, port))
        sock: Any = ctx.wrap_socket(s) if tls else s
        left = total // nconn
        while left > 0:
            sock.sendall(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        if tls:
            s = sock.unwrap()
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()

    t0, c0 = time.monotonic(), time.process_time()
    ths = [threading.Thread(target=one) for _ in range(nconn)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - t0, "client_cpu": time.process_time() - c0}))
    return 0


# -- measuring a server process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_counters(pids: list[int]) -> tuple[float, int]:
    """CPU seconds and context switches (voluntary + involuntary, every thread) of ``pids``."""
    cpu = 0.0
    switches = 0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            cpu += t.user + t.system
        except psutil.Error:
            continue
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
        except OSError:
            pass
    return cpu, switches


@contextlib.contextmanager
def running(server: Server, mode: str, tls: tuple[str, str] | None) -> Iterator[tuple[int, list[int]]]:
    port = free_port()
    argv = [ECHO_EPOLL_EXE if a == ECHO_EPOLL else a for a in server.argv] + ["--port", str(port), "--mode", mode]
    env = dict(os.environ, **server.env) if server.env else None
    if tls:
        argv += ["--tls", *tls]
    procs = []
    try:
        for _ in range(server.procs):
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("ready"):
                err = p.stderr.read() if p.stderr else ""
                raise RuntimeError(f"{server.label} did not start: {line!r} {err[-2000:]}")
        yield port, [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()


LOADGEN_CPUS: set[int] | None = None  # set by main(): where the load generator may run
ECHO_EPOLL_EXE = ""  # set by main(): the C server's executable


def build_echo_epoll(tmp: str) -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    exe = os.path.join(tmp, "echo_epoll")
    ok = subprocess.run([cc, "-O2", "-o", exe, os.path.join(HERE, "echo_epoll.c")], capture_output=True).returncode == 0
    return exe if ok else None


def _place_loadgen() -> None:
    if LOADGEN_CPUS:
        os.sched_setaffinity(0, LOADGEN_CPUS)


def run_point(lg: LoadGen, server: Server, wl: Workload, port: int, pids: list[int], window: float,
              warmup: float) -> dict[str, Any]:
    if wl.kind == "echo":
        argv = lg.argv + ["echo", "127.0.0.1", str(port), str(wl.conns), str(window), "64", str(warmup)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_place_loadgen)
        time.sleep(warmup)  # the generator connects and warms up meanwhile; then the window starts
        c0, s0 = proc_counters(pids)
        time.sleep(window)
        c1, s1 = proc_counters(pids)
        try:
            out, err = p.communicate(timeout=window + warmup + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        if p.returncode:
            raise RuntimeError(f"load generator failed on {server.label}/{wl.label}: {err[-1000:]}")
        r = json.loads(out)
        n = max(r["requests"], 1)
        # Threads that ended during the window take their switch counts with them (the
        # thread-per-connection server): clamp at 0 rather than report a negative figure.
        return {"rate": r["requests"] / r["seconds"], "cpu_per": (c1 - c0) / n * 1e6, "cs_per": max(s1 - s0, 0) / n,
                "p50_us": r["p50_us"], "p99_us": r["p99_us"], "client_cpu_per": r["client_cpu"] / n * 1e6}
    tls = "1" if wl.kind == "tls" else "0"
    argv = lg.argv + ["bulk", "127.0.0.1", str(port), str(wl.conns), str(wl.nbytes), tls]
    c0, s0 = proc_counters(pids)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=_place_loadgen)
    c1, s1 = proc_counters(pids)
    if p.returncode:
        raise RuntimeError(f"load generator failed on {server.label}/{wl.label}: {p.stderr[-1000:]}")
    r = json.loads(p.stdout)
    gb = r["bytes"] / 1e9
    return {"rate": gb / r["seconds"], "cpu_per": (c1 - c0) / gb, "cs_per": max(s1 - s0, 0) / (r["bytes"] / (1 << 20)),
            "client_cpu_per": r["client_cpu"] / gb}


# -- the machine -------------------------------------------------------------------------------


_BEST_SPEED: dict[int, float] = {}


def cpu_speed() -> dict[int, float]:
    """Seconds a fixed pure-Python loop takes on each CPU (best of 3), run pinned to that CPU.

    Other tenants of the host may be invisible from here (a sandbox shows neither their
    processes nor, always, their share of /proc/stat), but they slow this loop down.
    """
    out = {}
    allowed = os.sched_getaffinity(0)
    try:
        for cpu in sorted(allowed):
            os.sched_setaffinity(0, {cpu})
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                x = 0
                for i in range(200_000):
                    x += i
                best = min(best, time.perf_counter() - t0)
            out[cpu] = best
    finally:
        os.sched_setaffinity(0, allowed)
    return out


def wait_quiet(max_wait: float, busy_limit: float = 15.0, slow_limit: float = 1.25) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) for a quiet machine: other processes under ``busy_limit`` % of
    the CPUs, and every CPU runs a fixed loop within ``slow_limit`` of the fastest seen this run."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = psutil.cpu_percent(interval=0.5)
        load = os.getloadavg()[0]
        speed = cpu_speed()
        for cpu, t in speed.items():
            _BEST_SPEED[cpu] = min(_BEST_SPEED.get(cpu, t), t)
        slow = max(t / _BEST_SPEED[cpu] for cpu, t in speed.items())
        quiet = busy < busy_limit and slow < slow_limit
        if quiet or time.monotonic() >= deadline:
            return {"quiet": quiet, "busy_percent": busy, "loadavg1": load, "slowdown": round(slow, 3),
                    "loop_ms": {str(c): round(t * 1e3, 2) for c, t in speed.items()}}
        print(f"  machine busy ({busy:.0f}% CPU, slowdown {slow:.2f}x, load {load:.2f}); waiting", flush=True)
        time.sleep(2)


def make_cert(tmp: str) -> tuple[str, str]:
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


# -- summary -----------------------------------------------------------------------------------


def med(vals: list[float]) -> tuple[float, float, float]:
    return statistics.median(vals), min(vals), max(vals)


def summarize(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["server"], r["workload"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {m: med([r[m] for r in rs]) for m in rs[0] if isinstance(rs[0][m], (int, float))
                    and m not in ("round",)}
        out[key]["n"] = len(rs)
    return out


def print_table(summary: dict[tuple[str, str], dict[str, Any]], srvs: list[Server], wls: list[Workload]) -> str:
    lines = []
    for wl in wls:
        echo = wl.kind == "echo"
        unit = "k req/s" if echo else "GB/s"
        cpu = "CPU us/req" if echo else "CPU s/GB"
        cs = "cs/req" if echo else "cs/MiB"
        head = f"{wl.label:<11} {'server':<19} {unit + ' med [min-max]':>24} {cpu:>11} {cs:>7}"
        if echo:
            head += f" {'p50 us':>7} {'p99 us':>7}"
        head += f" {'client CPU':>10}"
        lines.append(head)
        for s in srvs:
            m = summary.get((s.label, wl.label))
            if not m:
                lines.append(f"{'':<11} {s.label:<19} {'(failed)':>24}")
                continue
            scale = 1e-3 if echo else 1.0
            rate, lo, hi = (x * scale for x in m["rate"])
            row = f"{'':<11} {s.label:<19} {rate:>8.{1 if echo else 2}f} [{lo:.{1 if echo else 2}f}-{hi:.{1 if echo else 2}f}]"
            row = f"{row:<56}"[:56]
            row = f"{'':<11} {s.label:<19} {(f'{rate:.1f}' if echo else f'{rate:.2f}'):>8} " \
                  f"{('[' + (f'{lo:.1f}-{hi:.1f}' if echo else f'{lo:.2f}-{hi:.2f}') + ']'):>15}"
            row += f" {m['cpu_per'][0]:>11.2f} {m['cs_per'][0]:>7.2f}"
            if echo:
                row += f" {m['p50_us'][0]:>7.0f} {m['p99_us'][0]:>7.0f}"
            row += f" {m['client_cpu_per'][0]:>10.2f}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


P99_SLACK = 1.10  # "p99 no worse than one hub's": within 10 %, the spread of p99 between rounds here


def targets(summary: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Issue 12's targets, each MET or MISSED, from the medians of this run."""
    def med_of(server: str, wl: str, metric: str = "rate") -> float | None:
        m = summary.get((server, wl))
        return m[metric][0] if m and metric in m else None

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    out = []
    q1, u = med_of("qioc 1T", "echo C=64"), med_of("uvloop Protocol", "echo C=64")
    if q1 and u:
        out.append(f"echo C=64: qioc 1T / uvloop Protocol = {q1 / u:.2f}x (target >= 1.0x): {verdict(q1 / u >= 1.0)}")
    for wl in ("echo C=64", "echo C=16"):
        base, base99 = med_of("qioc 1T", wl), med_of("qioc 1T", wl, "p99_us")
        for srv in ("qioc 2T", "qioc 4T"):
            r, p99 = med_of(srv, wl), med_of(srv, wl, "p99_us")
            if base and r and base99 and p99:
                ok = r / base >= 0.95 and p99 <= base99 * P99_SLACK
                out.append(f"{wl}: {srv} / qioc 1T = {r / base:.2f}x (target >= 0.95x), p99 {p99:.0f} us vs "
                           f"{base99:.0f} us = {p99 / base99:.2f}x (target <= {P99_SLACK:.2f}x): {verdict(ok)}")
    # No loss where the work releases the GIL: against the pure-Python path of the same pool
    # (today's hot path, no batching), in the same run.
    for wl in ("tls x1", "tls x4", "bulk x1", "bulk x4"):
        for srv in ("qioc 2T", "qioc 4T"):
            for before_label in (srv + " base", srv + " pure"):
                r, before = med_of(srv, wl), med_of(before_label, wl)
                if r and before:
                    out.append(f"{wl}: {srv} / {before_label} = {r / before:.2f}x (target: no loss, >= 0.95x): "
                               f"{verdict(r / before >= 0.95)}")
                    break
    for wl in ("echo C=16", "echo C=64", "echo C=256"):
        for n in (1, 2, 4):
            r, before = med_of(f"qioc {n}T", wl), med_of(f"qioc {n}T base", wl)
            if r and before:
                out.append(f"(info) {wl}: qioc {n}T / qioc {n}T base = {r / before:.2f}x")
    # For the record (no target): against the C floor, gevent, and the pure-Python path.
    c, g = med_of("C epoll", "echo C=64"), med_of("gevent 1 hub", "echo C=64")
    for srv in ("qioc 1T", "qioc 1T pure"):
        q = med_of(srv, "echo C=64")
        if q and c:
            out.append(f"(info) echo C=64: {srv} / C epoll = {q / c:.2f}x")
        if q and g:
            out.append(f"(info) echo C=64: {srv} / gevent 1 hub = {q / g:.2f}x")
    return out


def plot(summary: dict[tuple[str, str], dict[str, Any]], srvs: list[Server], wls: list[Workload], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot; pip install '.[bench]')")
        return False
    echo = [w for w in wls if w.kind == "echo"]
    tls = [w for w in wls if w.kind != "echo"]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, wl in enumerate(echo):
        c = colors[i % len(colors)]
        for family, style in (("qioc", "-o"), ("qioc-pin", "--^"), ("qioc-unpinned", ":s"), ("qioc-pure", "-.v"),
                              ("qioc-base", ":D"), ("qioc-iohandler", "x"), ("qioc-reuseport", "+")):
            pts = [(s.iothreads, summary[(s.label, wl.label)]) for s in srvs
                   if s.family == family and (s.label, wl.label) in summary]
            if pts:
                pts.sort(key=lambda p: p[0] or 0)
                xs = [p[0] for p in pts]
                axes[0].plot(xs, [p[1]["rate"][0] / 1e3 for p in pts], style, color=c, label=f"qioc_green{'' if family == 'qioc' else ' ' + family[5:]} {wl.label}")
                axes[1].plot(xs, [p[1]["cpu_per"][0] for p in pts], style, color=c, label=f"qioc_green {wl.label}")
                if family in ("qioc", "qioc-pin", "qioc-unpinned", "qioc-base"):
                    axes[3].plot(xs, [p[1]["p99_us"][0] / 1e3 for p in pts], style, color=c,
                                 label=f"qioc_green{'' if family == 'qioc' else ' ' + family[5:]} {wl.label}")
        for j, s in enumerate(x for x in srvs if x.iothreads is None):
            m = summary.get((s.label, wl.label))
            if m and wl.label == "echo C=64":
                axes[0].axhline(m["rate"][0] / 1e3, color=colors[(j + 3) % len(colors)], ls="--", lw=1,
                                label=f"{s.label} (C=64)")
                axes[1].axhline(m["cpu_per"][0], color=colors[(j + 3) % len(colors)], ls="--", lw=1)
    axes[0].set(title="64 B echo: requests/s", xlabel="IOThreads", ylabel="k req/s", xticks=[1, 2, 4])
    axes[1].set(title="64 B echo: server CPU per request", xlabel="IOThreads", ylabel="us", xticks=[1, 2, 4])
    for i, wl in enumerate(tls):
        for family, style in (("qioc", "-o"), ("qioc-base", ":D"), ("qioc-pure", "-.v")):
            pts = [(s.iothreads, summary[(s.label, wl.label)]) for s in srvs
                   if s.family == family and (s.label, wl.label) in summary]
            if pts:
                pts.sort(key=lambda p: p[0] or 0)
                axes[2].plot([p[0] for p in pts], [p[1]["rate"][0] for p in pts], style, color=colors[i % len(colors)],
                             label=f"qioc_green{'' if family == 'qioc' else ' ' + family[5:]} {wl.label}")
    axes[2].set(title="bulk receive: GB/s", xlabel="IOThreads", ylabel="GB/s", xticks=[1, 2, 4])
    axes[3].set(title="64 B echo: p99 latency", xlabel="IOThreads", ylabel="ms", xticks=[1, 2, 4])
    for ax in axes:
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def report(results: list[dict[str, Any]], machine: list[dict[str, Any]], srvs: list[Server], wls: list[Workload],
           out: str, meta: dict[str, Any], *, final: bool = True) -> None:
    """Table, target checks, JSON and PNG from the results so far (``final=False``: JSON only)."""
    summary = summarize(results)
    checks = targets(summary)
    doc = {"when": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), **meta, "cpus": os.cpu_count(),
           "python": sys.version, "complete": final, "machine": machine, "results": results, "targets": checks,
           "summary": [{"server": k[0], "workload": k[1], **v} for k, v in summary.items()]}
    jpath = os.path.join(out, "scaling.json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=1)
    if not final:
        return
    print()
    print(print_table(summary, srvs, wls))
    for line in checks:
        print(line)
    if not all(m["quiet"] for m in machine):
        print("NOTE: the machine was not quiet for every round; compare ratios, not absolute figures.")
    ppath = os.path.join(out, "scaling.png")
    if plot(summary, srvs, wls, ppath):
        print(f"wrote {jpath} and {ppath}")
    else:
        print(f"wrote {jpath}")


def from_json(path: str, out: str) -> int:
    """Summarize a scaling.json again (a run stopped early keeps the rounds it finished)."""
    with open(path) as f:
        doc = json.load(f)
    labels = list(dict.fromkeys(r["server"] for r in doc["results"]))
    wl_labels = list(dict.fromkeys(r["workload"] for r in doc["results"] if "error" not in r))
    srvs = [s for s in servers(labels, doc.get("baseline"))]
    wls = [w for w in workloads(False, None) if w.label in wl_labels]
    meta = {k: doc[k] for k in ("rounds", "window_s", "loadgen", "loadgen_cpus", "baseline") if k in doc}
    os.makedirs(out, exist_ok=True)
    report(doc["results"], doc["machine"], srvs, wls, out, meta)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--py-loadgen":
        return py_loadgen(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 1 s windows, 256 MiB bulk")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--window", type=float, help="seconds measured per echo point (default 3; 1 with --quick)")
    ap.add_argument("--servers", nargs="+", metavar="LABEL", help="server labels to run (default: the standard set)")
    ap.add_argument("--workloads", nargs="+", metavar="LABEL", help='e.g. "echo C=64" "tls x4"')
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="directory for scaling.json and .png")
    ap.add_argument("--python-loadgen", action="store_true", help="use the Python load generator even with cc")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for a quiet machine per round")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run qioc 1T/2T/4T from this source tree of qioc_green (PYTHONPATH), e.g. "
                         "`git archive BASE | tar x -C DIR`: the ratios against it are printed")
    ap.add_argument("--from-json", metavar="FILE", help="only summarize a scaling.json again (table, checks, plot)")
    ap.add_argument("--loadgen-anywhere", action="store_true",
                    help="do not keep the load generator on the last CPU (away from pinned hub threads)")
    args = ap.parse_args()
    if args.from_json:
        return from_json(args.from_json, args.out)
    global LOADGEN_CPUS, ECHO_EPOLL_EXE
    cpus = sorted(os.sched_getaffinity(0))
    # The load generator stands in for another machine: keep it off the CPU that pinned hub
    # threads use (IOThreadPool pins to the first one), for every server alike.
    LOADGEN_CPUS = None if args.loadgen_anywhere or len(cpus) < 2 else {cpus[-1]}
    rounds = args.rounds or (1 if args.quick else 3)
    window = args.window or (1.0 if args.quick else 3.0)
    warmup = 0.5
    srvs = servers(args.servers, args.baseline)
    wls = workloads(args.quick, args.workloads)
    os.makedirs(args.out, exist_ok=True)
    results: list[dict[str, Any]] = []
    machine: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qioc-scaling-") as tmp:
        lg = build_loadgen(tmp, args.python_loadgen)
        ECHO_EPOLL_EXE = build_echo_epoll(tmp) or ""
        if not ECHO_EPOLL_EXE:
            srvs = [x for x in srvs if ECHO_EPOLL not in x.argv]
            print("(no C compiler: the C epoll server is skipped)")
        if not lg.tls:
            wls = [w for w in wls if w.kind != "tls"]
            print("(load generator built without TLS: TLS workloads skipped)")
        cert = make_cert(tmp) if any(w.kind == "tls" for w in wls) else None
        print(f"scaling: {len(srvs)} servers x {len(wls)} workloads, {rounds} rounds, {window} s windows, "
              f"load generator {lg.kind} on CPUs {sorted(LOADGEN_CPUS or cpus)}, {os.cpu_count()} CPUs, "
              f"python {sys.version.split()[0]}", flush=True)
        for rnd in range(rounds):
            q = wait_quiet(args.quiet_wait)
            q["round"] = rnd
            machine.append(q)
            print(f"round {rnd + 1}/{rounds}: machine {'quiet' if q['quiet'] else 'NOT QUIET'} "
                  f"({q['busy_percent']:.0f}% CPU busy, CPU loop {q['slowdown']:.2f}x its best, "
                  f"load {q['loadavg1']:.2f})", flush=True)
            order = srvs[rnd % len(srvs):] + srvs[: rnd % len(srvs)]  # interleave: rotate per round
            for srv in order:
                for kind in ("echo", "bulk", "tls"):
                    mine = [w for w in wls if w.kind == kind]
                    if not mine or (kind == "tls" and not srv.tls):
                        continue
                    mode = "echo" if kind == "echo" else "discard"
                    try:
                        with running(srv, mode, cert if kind == "tls" else None) as (port, pids):
                            for wl in mine:
                                r = run_point(lg, srv, wl, port, pids, window, warmup)
                                r.update(server=srv.label, workload=wl.label, round=rnd)
                                results.append(r)
                                unit = f"{r['rate'] / 1e3:.1f} k req/s" if kind == "echo" else f"{r['rate']:.2f} GB/s"
                                print(f"  {srv.label:<19} {wl.label:<11} {unit}", flush=True)
                    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                        print(f"  {srv.label:<19} {kind}: FAILED: {exc}", flush=True)
                        results.append({"server": srv.label, "workload": kind, "round": rnd, "error": str(exc)})
            report(results, machine, srvs, wls, args.out, {"rounds": rnd + 1, "window_s": window, "loadgen": lg.kind,
                                                            "loadgen_cpus": sorted(LOADGEN_CPUS or cpus),
                                                            "baseline": args.baseline}, final=False)
    report(results, machine, srvs, wls, args.out, {"rounds": rounds, "window_s": window, "loadgen": lg.kind,
                                                    "loadgen_cpus": sorted(LOADGEN_CPUS or cpus), "baseline": args.baseline})
    return 0


if __name__ == "__main__":
    sys.exit(main())
