"""NetListener: addresses, handing clients to contexts, wait_client, errors, limits, closing."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import threading
import time

import gevent
import pytest

from qioc_green import (
    BrokenChannelError,
    ChannelClosedError,
    IOThread,
    IOThreadPool,
    NetListener,
    SocketChannel,
    current_context,
)
from qioc_green import channel_socket as cs
from tests.polling import wait_until


def echo_once(ch):
    data = ch.read(100, timeout=10)
    ch.write_all(data)


def talk(addr: str, msg: bytes = b"ping") -> bytes:
    with SocketChannel.connect(addr, timeout=5, follow=True) as c:
        c.write_all(msg)
        return c.read_all(len(msg), timeout=5)


def test_open_is_repeatable_and_reports_addresses(tmp_path):
    path = str(tmp_path / "l.sock")
    with NetListener("multi") as lst:
        a = lst.open("tcp:127.0.0.1:0")
        b = lst.open(f"unix:{path}")
        assert len(a) == 1 and a[0].startswith("tcp:127.0.0.1:") and not a[0].endswith(":0")
        assert b == [f"unix:{path}"]
        assert lst.addresses == a + b
        lst.set_client_handler(echo_once)
        assert talk(a[0]) == b"ping"
        assert talk(b[0], b"unix") == b"unix"
        assert os.path.exists(path)
    assert not os.path.exists(path), "the UNIX socket path is unlinked on close"


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with NetListener() as lst:
        try:
            (addr,) = lst.open("tcp:[::1]:0")
        except OSError:
            pytest.skip("no IPv6 loopback here")
        assert addr.startswith("tcp:[::1]:")
        lst.set_client_handler(echo_once)
        assert talk(addr) == b"ping"


def test_a_name_with_ipv4_and_ipv6_gives_one_socket_each_on_one_port(monkeypatch):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    # Resolution is the OS's business; what we own is one socket per family, same port.
    real = cs._resolve

    def both(sa, *, passive, deadline):
        if sa.host == "dual.test":
            return [(socket.AF_INET, ("127.0.0.1", sa.port)), (socket.AF_INET6, ("::1", sa.port, 0, 0))]
        return real(sa, passive=passive, deadline=deadline)

    monkeypatch.setattr(cs, "_resolve", both)
    with NetListener() as lst:
        addrs = lst.open("tcp:dual.test:0")
        assert len(addrs) == 2
        ports = {a.rsplit(":", 1)[1] for a in addrs}
        assert len(ports) == 1
        lst.set_client_handler(echo_once)
        for a in addrs:
            assert talk(a) == b"ping"


def test_fd_address_takes_an_inherited_listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    fd = sock.detach()
    with NetListener() as lst:
        assert lst.open(f"fd:{fd}") == [f"tcp:127.0.0.1:{port}"]
        lst.set_client_handler(echo_once)
        assert talk(f"tcp:127.0.0.1:{port}") == b"ping"


def test_clients_go_round_robin_to_the_pool_with_follow_on():
    seen = []
    lock = threading.Lock()

    def handler(ch):
        with lock:
            seen.append((threading.current_thread().name, ch.follow_coroutine_ctx))
        echo_once(ch)

    with IOThreadPool(3, name="rr") as pool, NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(handler, pool)
        for _ in range(6):
            assert talk(addr) == b"ping"
        lst.close()
        assert sorted(seen) == sorted([(f"rr-{i}", True) for i in range(3)] * 2)
        assert lst.stats["per_context"] == {"rr-0": 2, "rr-1": 2, "rr-2": 2}


def test_one_context_a_list_and_a_custom_policy():
    with IOThread("only") as t, IOThread("other") as u:
        with NetListener() as lst:
            (addr,) = lst.open("tcp:127.0.0.1:0")
            lst.set_client_handler(echo_once, t.context)
            talk(addr)
            lst.set_client_handler(echo_once, [t.context, u.context], policy=lambda ch, ctxs: ctxs[-1])
            talk(addr)
            talk(addr)
            lst.close()
            assert lst.stats["per_context"] == {"only": 1, "other": 2}


def test_least_busy_policy_avoids_the_context_with_a_long_client():
    release = threading.Event()
    where = []

    def handler(ch):
        data = ch.read(10, timeout=10)
        # Recorded by what the client sent: handlers of two threads may start in either order.
        where.append((threading.current_thread().name, data))
        if data == b"long":
            while not release.is_set():
                gevent.sleep(0.01)
        ch.write_all(data)

    with IOThreadPool(2, name="lb") as pool, NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(handler, pool, policy="least-busy")
        long = SocketChannel.connect(addr, follow=True)
        long.write_all(b"long")
        assert wait_until(lambda: lst.stats["active"] == 1)
        for _ in range(3):
            talk(addr, b"short")
            assert wait_until(lambda: lst.stats["active"] == 1)  # the short one has left
        release.set()
        assert long.read_all(4, timeout=5) == b"long"
        long.close()
        longs = {name for name, data in where if data == b"long"}
        shorts = {name for name, data in where if data == b"short"}
        assert len(where) == 4 and len(longs) == len(shorts) == 1 and longs != shorts


def test_default_context_is_the_callers_and_the_acceptor_is_not():
    with NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        where = []

        def handler(ch):
            where.append(threading.current_thread())
            echo_once(ch)

        lst.set_client_handler(handler)  # the calling (main) thread's context
        assert talk(addr) == b"ping"
        assert where == [threading.main_thread()]


def test_accept_context_runs_the_acceptor_where_asked():
    with IOThread("acceptor") as t, NetListener(accept_context=t.context) as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(echo_once)
        assert talk(addr) == b"ping"
        assert [f.done() for f in lst._acceptors] == [False]


def test_reuse_port_mode_accepts_in_every_context():
    with IOThreadPool(2, name="rp") as pool, NetListener(reuse_port=True) as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(echo_once, pool)
        assert len(lst._sockets) == 2
        for _ in range(40):  # the kernel hashes the 4-tuple: 40 clients all in one is 2**-39
            assert talk(addr) == b"ping"
        per = lst.stats["per_context"]
        assert set(per) == {"rp-0", "rp-1"} and sum(per.values()) == 40
        assert lst.addresses == [addr]


def test_wait_client_and_its_timeout():
    with NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            lst.wait_client(timeout=0.1)
        assert time.monotonic() - t0 < 2
        c = gevent.spawn(talk, addr, b"hi")
        ch = lst.wait_client(timeout=5)
        with ch:
            assert ch.follow_coroutine_ctx
            echo_once(ch)
        assert c.get(timeout=5) == b"hi"


def test_wait_client_is_woken_by_close():
    lst = NetListener()
    lst.open("tcp:127.0.0.1:0")
    g = gevent.spawn(lst.wait_client, 10)
    gevent.sleep(0.05)
    lst.close()
    with pytest.raises(ChannelClosedError):
        g.get(timeout=5)


def test_handler_return_closes_the_channel():
    with NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(lambda ch: ch.write_all(b"bye"))
        with SocketChannel.connect(addr, follow=True) as c:
            assert c.read_all(3, timeout=5) == b"bye"
            assert c.read(1, timeout=5) == b""


def test_handler_exception_is_logged_with_the_peer_and_ends_only_that_client(caplog):
    def handler(ch):
        data = ch.read(10, timeout=10)
        if data == b"boom":
            raise ValueError("handler blew up")
        ch.write_all(data)

    with IOThreadPool(2) as pool, NetListener("exc") as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(handler, pool)
        other = SocketChannel.connect(addr, follow=True)
        with caplog.at_level(logging.WARNING, logger="qioc_green.net_listener"):
            with SocketChannel.connect(addr, follow=True) as bad:
                peer = bad.local_address
                bad.write_all(b"boom")
                assert bad.read(1, timeout=5) == b""  # its connection is closed
            assert wait_until(lambda: lst.stats["handler_errors"] == 1)
        with other:
            other.write_all(b"still")
            assert other.read_all(5, timeout=5) == b"still"
        assert any(peer in r.getMessage() and "exc" in r.getMessage() and r.exc_info for r in caplog.records)


def test_max_clients_refuses_cleanly_and_serves_again_when_one_leaves():
    def handler(ch):
        while True:
            data = ch.read(100, timeout=10)
            if not data:
                return
            ch.write_all(data)

    with IOThreadPool(2) as pool, NetListener(max_clients=2) as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(handler, pool)
        a = SocketChannel.connect(addr, follow=True)
        b = SocketChannel.connect(addr, follow=True)
        for ch in (a, b):
            ch.write_all(b"x")
            assert ch.read_all(1, timeout=5) == b"x"
        with SocketChannel.connect(addr, follow=True) as refused:
            assert refused.read(1, timeout=5) == b""  # accepted and closed at once: EOF
        assert lst.stats["refused"] == 1
        a.close()
        assert wait_until(lambda: lst.stats["active"] == 1)
        with SocketChannel.connect(addr, follow=True) as c:
            c.write_all(b"again")
            assert c.read_all(5, timeout=5) == b"again"
        b.close()


def test_accept_errors_back_off_log_once_and_recover(caplog):
    calls = {"n": 0}

    with NetListener("flaky") as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lch = lst._sockets[0]
        real = lch.accept

        def flaky_accept(**kw):
            calls["n"] += 1
            if calls["n"] <= 3:
                err = OSError(errno.EMFILE, "Too many open files")
                raise BrokenChannelError("accept failed: too many open files") from err
            return real(**kw)

        lch.accept = flaky_accept
        with caplog.at_level(logging.WARNING, logger="qioc_green.net_listener"):
            lst.set_client_handler(echo_once)
            assert talk(addr) == b"ping"
        msgs = [r.getMessage() for r in caplog.records]
        assert sum("backing off" in m for m in msgs) == 1, msgs
        assert sum("accepting on" in m and "again" in m for m in msgs) == 1
        assert lst.stats["accept_errors"] == 3


def test_real_emfile_does_not_kill_the_listener():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with IOThread("served") as t, NetListener("emfile") as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        clients = [socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1]))) for _ in range(4)]
        try:
            # Clients are in the backlog; now leave room for one more fd only.
            nfds = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (nfds + 1, hard))
            try:
                lst.set_client_handler(echo_once, t.context)
                assert wait_until(lambda: lst.stats["accept_errors"] >= 1, timeout=10)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for c in clients:
                c.settimeout(10)
                c.sendall(b"ok")
                assert c.recv(10) == b"ok"
        finally:
            for c in clients:
                c.close()
        assert lst.stats["accepted"] == 4


def test_close_grace_lets_handlers_finish():
    done = []

    def handler(ch):
        ch.read(10, timeout=10)
        gevent.sleep(0.2)  # still working when close() starts
        ch.write_all(b"finished")
        done.append(True)

    with IOThread("g") as t:
        lst = NetListener()
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(handler, t.context)
        c = SocketChannel.connect(addr, follow=True)
        c.write_all(b"go")
        assert wait_until(lambda: lst.stats["active"] == 1)
        t0 = time.monotonic()
        lst.close(grace=5)
        assert time.monotonic() - t0 < 2
        assert done == [True]
        assert c.read_all(8, timeout=5) == b"finished"
        c.close()
        with pytest.raises(ChannelClosedError):
            lst.open("tcp:127.0.0.1:0")


def test_close_after_grace_closes_busy_handlers_channels():
    outcome = []

    def handler(ch):
        try:
            ch.read(10)  # parks forever: the client never speaks
        except ChannelClosedError as exc:
            outcome.append(exc)
            raise

    with IOThreadPool(2) as pool:
        lst = NetListener()
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(handler, pool)
        clients = [SocketChannel.connect(addr, follow=True) for _ in range(4)]
        assert wait_until(lambda: lst.stats["active"] == 4)
        t0 = time.monotonic()
        lst.close(grace=0.3)
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 1.5
        assert len(outcome) == 4
        assert lst.stats["handler_errors"] == 0  # closing them is not the handlers' fault
        for c in clients:
            assert c.read(1, timeout=5) == b""
            c.close()


def test_close_from_inside_a_handler_does_not_wait_for_itself():
    with IOThread("self") as t:
        lst = NetListener()
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(lambda ch: lst.close(grace=5), t.context)
        t0 = time.monotonic()
        with SocketChannel.connect(addr, follow=True) as c:
            assert c.read(1, timeout=5) == b""
        assert wait_until(lambda: lst.closed)
        assert time.monotonic() - t0 < 3


def test_clients_queue_until_a_handler_is_set():
    with NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        c = SocketChannel.connect(addr, follow=True)
        c.write_all(b"early")
        gevent.sleep(0.05)
        assert lst.stats["accepted"] == 0  # nobody accepts before a handler or wait_client
        lst.set_client_handler(lambda ch: ch.write_all(ch.read_all(5, timeout=5)), current_context())
        assert c.read_all(5, timeout=5) == b"early"
        c.close()
        lst.set_client_handler(None)
        d = SocketChannel.connect(addr, follow=True)
        assert wait_until(lambda: lst.stats["accepted"] == 2)  # held: no handler
        lst.set_client_handler(lambda ch: ch.write_all(b"late"), current_context())
        assert d.read_all(4, timeout=5) == b"late"
        d.close()
        assert lst.stats["accepted"] == 2  # counted once


def test_a_handler_set_to_none_leaves_clients_for_wait_client():
    with NetListener() as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        lst.set_client_handler(echo_once)
        assert talk(addr) == b"ping"
        lst.set_client_handler(None)
        c = SocketChannel.connect(addr, follow=True)
        assert wait_until(lambda: lst.stats["accepted"] == 2)  # accepted, held for wait_client
        with lst.wait_client(timeout=5) as ch:
            c.write_all(b"held")
            assert ch.read_all(4, timeout=5) == b"held"
        c.close()
