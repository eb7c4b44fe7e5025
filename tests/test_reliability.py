"""Reliability of a NetListener server across IOThreads, on loopback, bounded in time.

* 1,000 concurrent connections echoing for 20 s across 2 IOThreads: no error, no lost byte;
* 10,000 connect-and-close cycles: the fd count comes back to its baseline;
* peers that reset mid-message, half-close, or say nothing (dropped by an idle timeout) do not
  disturb the others;
* ``close(grace)`` with busy handlers returns within the grace period (plus a bounded margin);
* ``max_clients`` under a crowd: refusals are clean and service resumes.

The first needs about 2,000 fds: the soft RLIMIT_NOFILE is raised to the hard limit inside this
process for the duration of the test (and restored).
"""

from __future__ import annotations

import os
import random
import resource
import socket
import struct
import threading
import time

import gevent
import pytest

from qioc_green import BrokenChannelError, IOThreadPool, NetListener, SocketChannel
from tests.examples import load_example
from tests.polling import wait_until

_echo = load_example("echo_server")
Stats, make_handler = _echo.Stats, _echo.make_handler

SECONDS = float(os.environ.get("QIOC_RELIABILITY_SECONDS", "20"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2600:
        pytest.skip(f"needs ~2,600 fds; the hard limit is {hard}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def message(client: int, seq: int, rng: random.Random) -> bytes:
    size = rng.choice((16, 64, 200, 1500, 4096, 9000))
    head = struct.pack("!IQ", client, seq)
    body = bytes((client + seq + i) & 0xFF for i in range(min(size, 256)))
    return (head + body * (size // len(body) + 1))[:size]


def run_clients(pool: IOThreadPool, addr: str, n: int, seconds: float) -> list[dict]:
    """n echo clients spread over the pool's contexts, each checking every byte it gets back."""
    deadline = time.monotonic() + seconds

    def client(i: int) -> dict:
        rng = random.Random(i)
        ch = SocketChannel.connect(addr, timeout=30, follow=True)
        sent = 0
        seq = 0
        with ch:
            while time.monotonic() < deadline:
                msg = message(i, seq, rng)
                ch.write_all(msg, timeout=30)
                back = ch.read_all(len(msg), timeout=30)
                if back != msg:
                    raise AssertionError(f"client {i}: echo {seq} differs")
                sent += len(msg)
                seq += 1
        return {"client": i, "bytes": sent, "messages": seq}

    ctxs = pool.contexts
    futs = [ctxs[i % len(ctxs)].spawn(client, i) for i in range(n)]
    return [f.result(seconds + 60) for f in futs]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_1000_connections_echo_for_20s_across_2_iothreads(many_fds):
    stats = Stats()
    with IOThreadPool(2, name="srv") as servers, IOThreadPool(2, name="cli") as clients:
        lst = NetListener("rel", backlog=2048)
        try:
            (addr,) = lst.open("tcp:127.0.0.1:0")
            lst.set_client_handler(make_handler(stats), servers)
            results = run_clients(clients, addr, 1000, SECONDS)
            assert wait_until(lambda: lst.stats["active"] == 0, timeout=30)
        finally:
            lst.close(grace=5)
    sent = sum(r["bytes"] for r in results)
    assert len(results) == 1000 and all(r["messages"] > 0 for r in results)
    assert stats.bytes == sent, "every byte sent came back, and the server counted the same"
    st = lst.stats
    assert st["accepted"] == 1000 and st["handler_errors"] == 0 and st["accept_errors"] == 0
    assert st["per_context"] == {"srv-0": 500, "srv-1": 500}


@pytest.mark.timeout(120)
def test_10000_connect_and_close_cycles_leave_no_fd():
    baseline = _fds()
    with IOThreadPool(2) as pool:
        lst = NetListener("cycles", backlog=2048)
        (addr,) = lst.open("tcp:127.0.0.1:0")
        port = int(addr.rsplit(":", 1)[1])
        with_listener = _fds()

        def handler(ch):
            ch.read(1, timeout=30)  # EOF at once: the client connected and closed

        lst.set_client_handler(handler, pool)
        errors = []

        def cycles(n: int) -> None:
            try:
                for _ in range(n):
                    s = socket.create_connection(("127.0.0.1", port), timeout=30)
                    s.close()
            except OSError as exc:
                errors.append(exc)

        # Plain threads: they block in connect() without holding the GIL.
        threads = [threading.Thread(target=cycles, args=(2500,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors
        assert wait_until(lambda: lst.stats["accepted"] == 10000 and lst.stats["active"] == 0, timeout=30)
        assert wait_until(lambda: _fds() == with_listener, timeout=10), (_fds(), with_listener)
        assert lst.stats["handler_errors"] == 0
        lst.close()
    assert wait_until(lambda: _fds() == baseline, timeout=10)


@pytest.mark.timeout(60)
def test_resets_half_closes_and_silent_peers_do_not_disturb_the_others():
    stats = Stats()
    with IOThreadPool(2, name="mix") as pool, IOThreadPool(1, name="good") as goodpool:
        lst = NetListener("mix")
        (addr,) = lst.open("tcp:127.0.0.1:0")
        port = int(addr.rsplit(":", 1)[1])
        lst.set_client_handler(make_handler(stats, idle_timeout=0.3), pool)
        good = [goodpool.contexts[0].spawn(run_one_good, addr, i, 3.0) for i in range(10)]

        # Resets mid-message: half a message, then RST (SO_LINGER 0).
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"partial-" * 1000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        # Half-closes: send, shut the write side, read the whole echo, then EOF.
        for i in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                msg = b"half-%d-" % i * 500
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    got += d
                assert got == msg
        # Silent peers: dropped by the idle timeout (they see EOF).
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        try:
            t0 = time.monotonic()
            for s in silent:
                assert s.recv(10) == b""
            assert time.monotonic() - t0 < 5
        finally:
            for s in silent:
                s.close()
        for f in good:
            r = f.result(30)
            assert r["messages"] > 0
        assert wait_until(lambda: stats.idle_closed == 20 and lst.stats["active"] == 0, timeout=10)
        lst.close()
    assert lst.stats["accepted"] == 70
    assert lst.stats["handler_errors"] == 0  # the handler ends broken peers itself


def run_one_good(addr: str, i: int, seconds: float) -> dict:
    rng = random.Random(1000 + i)
    deadline = time.monotonic() + seconds
    seq = 0
    with SocketChannel.connect(addr, timeout=10, follow=True) as ch:
        while time.monotonic() < deadline:
            msg = message(i, seq, rng)
            ch.write_all(msg, timeout=10)
            if ch.read_all(len(msg), timeout=10) != msg:
                raise AssertionError(f"good client {i}: echo {seq} differs")
            seq += 1
    return {"messages": seq}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("busy", [False, True], ids=["finishing", "busy"])
def test_close_grace_with_handlers_at_work(busy):
    grace = 1.0
    stats = Stats()
    with IOThreadPool(2, name="g") as pool, IOThreadPool(1, name="c") as cpool:
        lst = NetListener("grace")
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(make_handler(stats), pool)
        # Busy clients echo for longer than the grace; finishing ones stop 0.3 s into it.
        length = 30.0 if busy else 0.3
        futs = [cpool.contexts[0].spawn(run_one_good, addr, i, length) for i in range(20)]
        assert wait_until(lambda: lst.stats["active"] == 20, timeout=10)
        t0 = time.monotonic()
        lst.close(grace=grace)
        elapsed = time.monotonic() - t0
        if busy:
            assert grace <= elapsed < grace + 1.0
            for f in futs:  # the clients see their connection end, not a hang
                with pytest.raises(BrokenChannelError):
                    f.result(10)
        else:
            assert elapsed < grace
            for f in futs:
                assert f.result(10)["messages"] > 0
    assert lst.stats["active"] == 0


@pytest.mark.timeout(60)
def test_max_clients_under_a_crowd():
    with IOThreadPool(2) as pool:
        lst = NetListener("crowd", max_clients=10)
        (addr,) = lst.open("tcp:127.0.0.1:0")
        port = int(addr.rsplit(":", 1)[1])
        release = threading.Event()

        def handler(ch):
            ch.write_all(b"in")
            while not release.is_set():
                gevent.sleep(0.01)

        lst.set_client_handler(handler, pool)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
        try:
            answers = [s.recv(2) for s in socks]
            assert answers.count(b"in") == 10 and answers.count(b"") == 40
            assert lst.stats["refused"] == 40
            release.set()
            assert wait_until(lambda: lst.stats["active"] == 0, timeout=10)
            release.clear()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert s.recv(2) == b"in"
            release.set()
        finally:
            for s in socks:
                s.close()
            release.set()
            lst.close()
