#!/usr/bin/env python3
"""What a Channel costs over raw gevent sockets, and how fast a wake crosses IOThreads.

    python bench/channel_overhead.py [--rounds 3] [--pings 20000] [--bulk-mib 1024] [--json FILE]

(a) 64-byte ping-pong between two greenlets of one hub: Channel ``write_all``/``read_all`` against
    ``gevent.socket`` ``sendall``/``recv``, on a socketpair and over TCP loopback.
(b) Bulk receive (1 GiB by default) from a sender process: Channel ``readinto`` against gevent's
    ``recv_into``, 1 MiB buffers, on a socketpair and over TCP loopback.
(c) Wake latency across threads: a greenlet of an IOThread parked reading one byte, the main
    thread writing it; the time from the write to the reader running again, for a channel that
    follows (its own hub sees the fd) and one served by the iohandler thread.

Each pair of (a) and (b) runs interleaved in the same process, ``--rounds`` times; the table
gives medians (min-max) and the ratio of medians.  Loopback only.  Noisy machines: compare the
ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import gevent
import gevent.socket as gsocket

import qioc_green as q

SENDER = r"""
import os, socket, sys
fd, total = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(fileno=fd)
buf = memoryview(bytearray(1 << 20))
left = total
while left:
    n = s.send(buf[: min(left, len(buf))])
    left -= n
s.close()
"""


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def unix_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


# -- (a) ping-pong -------------------------------------------------------------------------------


def pingpong_channel(make, n: int) -> float:
    sa, sb = make()
    a, b = q.SocketChannel.from_socket(sa), q.SocketChannel.from_socket(sb)
    for ch in (a, b):
        ch.set_follow_coroutine_ctx(True)
    msg = b"x" * 64

    def echo() -> None:
        for _ in range(n):
            b.write_all(b.read_all(64))

    g = gevent.spawn(echo)
    t0 = time.perf_counter()
    for _ in range(n):
        a.write_all(msg)
        a.read_all(64)
    dt = time.perf_counter() - t0
    g.join()
    a.close()
    b.close()
    return n / dt


def _recv_exact(s, n: int) -> bytes:
    data = s.recv(n)
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def pingpong_gevent(make, n: int) -> float:
    sa, sb = make()
    a, b = gsocket.socket(fileno=sa.detach()), gsocket.socket(fileno=sb.detach())
    msg = b"x" * 64

    def echo() -> None:
        for _ in range(n):
            b.sendall(_recv_exact(b, 64))

    g = gevent.spawn(echo)
    t0 = time.perf_counter()
    for _ in range(n):
        a.sendall(msg)
        _recv_exact(a, 64)
    dt = time.perf_counter() - t0
    g.join()
    a.close()
    b.close()
    return n / dt


# -- (b) bulk receive ----------------------------------------------------------------------------


def _start_sender(sock: socket.socket, total: int) -> subprocess.Popen[bytes]:
    fd = sock.fileno()
    p = subprocess.Popen([sys.executable, "-c", SENDER, str(fd), str(total)], pass_fds=(fd,))
    sock.close()
    return p


def bulk_channel(make, total: int) -> float:
    sa, sb = make()
    sender = _start_sender(sa, total)
    ch = q.SocketChannel.from_socket(sb)
    ch.set_follow_coroutine_ctx(True)
    buf = bytearray(1 << 20)
    got = 0
    t0 = time.perf_counter()
    while got < total:
        n = ch.readinto(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    ch.close()
    sender.wait()
    assert got == total, (got, total)
    return total / dt / 1e9


def bulk_gevent(make, total: int) -> float:
    sa, sb = make()
    sender = _start_sender(sa, total)
    s = gsocket.socket(fileno=sb.detach())
    buf = bytearray(1 << 20)
    got = 0
    t0 = time.perf_counter()
    while got < total:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    s.close()
    sender.wait()
    assert got == total, (got, total)
    return total / dt / 1e9


# -- (c) wake latency across threads ---------------------------------------------------------------


def wake_latency(follow: bool, n: int) -> tuple[float, float]:
    a, b = q.SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(follow)
    lat: list[float] = []
    stamp = [0.0]
    parked = threading.Event()
    with q.IOThread("latency-reader") as t:
        def reader() -> None:
            for _ in range(n):
                parked.set()
                b.read_all(1)
                lat.append(time.perf_counter() - stamp[0])

        fut = t.context.spawn(reader)
        for _ in range(n):
            parked.wait()
            parked.clear()
            # Write only once the reader is parked and its hub sleeps in epoll_wait, so each
            # sample is one wake of a sleeping thread (a busy spin here would convoy on the GIL).
            time.sleep(0.0001)
            while not b.statistics().readers_waiting:
                time.sleep(0.0001)
            stamp[0] = time.perf_counter()
            a.write_all(b"!")
        fut.result(60)
    a.close()
    b.close()
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


# -- driver --------------------------------------------------------------------------------------


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.3g} ({min(xs):.3g}-{max(xs):.3g})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pings", type=int, default=20000)
    ap.add_argument("--bulk-mib", type=int, default=1024)
    ap.add_argument("--wakes", type=int, default=2000)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    print(f"# channel_overhead: rounds={args.rounds} pings={args.pings} bulk={args.bulk_mib} MiB "
          f"wakes={args.wakes} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    results: dict[str, dict[str, list[float]]] = {}
    total = args.bulk_mib << 20
    for rnd in range(args.rounds):
        for tname, make in (("socketpair", unix_pair), ("tcp", tcp_pair)):
            r = results.setdefault(f"pingpong {tname} (req/s)", {"qioc_green": [], "gevent": []})
            r["qioc_green"].append(pingpong_channel(make, args.pings))
            r["gevent"].append(pingpong_gevent(make, args.pings))
            r = results.setdefault(f"bulk {tname} (GB/s)", {"qioc_green": [], "gevent": []})
            # Alternate who goes first: the page cache and CPU frequency favour the second.
            pair = [("gevent", bulk_gevent), ("qioc_green", bulk_channel)]
            for who, fn in pair if rnd % 2 == 0 else pair[::-1]:
                r[who].append(fn(make, total))
        for follow in (True, False):
            p50, p99 = wake_latency(follow, args.wakes)
            r = results.setdefault(f"wake {'follow' if follow else 'iohandler'} (us)", {"p50": [], "p99": []})
            r["p50"].append(p50)
            r["p99"].append(p99)
        print(f"# round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'measure':32} {'qioc_green':>22} {'raw gevent':>22} {'ratio':>7}")
    for name, r in results.items():
        if "gevent" in r:
            ratio = statistics.median(r["qioc_green"]) / statistics.median(r["gevent"])
            print(f"{name:32} {med(r['qioc_green']):>22} {med(r['gevent']):>22} {ratio:7.2f}")
    print(f"{'wake across threads':32} {'p50 us':>22} {'p99 us':>22}")
    for name, r in results.items():
        if "p50" in r:
            print(f"{name:32} {med(r['p50']):>22} {med(r['p99']):>22}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
