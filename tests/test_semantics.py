"""DESIGN section 2's semantics: follow vs iohandler, split directions, exactly one waker,
close from anywhere, timeouts, stopping a context."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import gevent
import pytest

from qioc_green import (
    BrokenChannelError,
    ChannelBusyError,
    ChannelClosedError,
    ContextStoppedError,
    Future,
    IOCondition,
    IOThread,
    SocketChannel,
    context_of,
    current_context,
    iohandler_context,
    main_context,
)
from qioc_green.testing import trace_readiness
from tests.polling import wait_until


def _small_buffers(*chans, size=16384):
    for ch in chans:
        ch.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        ch.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# -- follow versus iohandler -------------------------------------------------------------------


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "iohandler"])
def test_readiness_seen_in_the_right_thread_and_resume_in_own_thread(follow):
    a, b = SocketChannel.socketpair()
    with a, b, IOThread("reader-thread") as t:
        b.set_follow_coroutine_ctx(follow)
        parked = threading.Event()

        def read():
            where_before = threading.current_thread().name
            parked.set()
            data = b.read_all(5)
            return where_before, threading.current_thread().name, data

        with trace_readiness() as seen:
            fut = t.context.spawn(read)
            parked.wait(5)
            # Give the reader no data until it is surely parked: its slot is taken.
            assert wait_until(lambda: b.statistics().readers_waiting)
            a.write_all(b"hello")
            before, after, data = fut.result(5)
        assert data == b"hello"
        assert before == after == "reader-thread"  # resumed in its own thread
        threads = {name for name, fd, _ in seen if fd == b.fileno()}
        assert threads == {"reader-thread" if follow else "qioc-iohandler"}


def test_follow_looks_up_the_context_at_each_wait():
    # One channel, read first from IOThread A, then from IOThread B: each wait is watched by the
    # hub of the thread the reader runs in at that moment (never stored on the channel).
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    with a, b, IOThread("A") as ta, IOThread("B") as tb, trace_readiness() as seen:
        for t, msg in ((ta, b"one"), (tb, b"two"), (ta, b"333")):
            fut = t.context.spawn(b.read_all, 3)
            assert wait_until(lambda: b.statistics().readers_waiting)
            a.write_all(msg)
            assert fut.result(5) == msg
        assert [name for name, fd, _ in seen if fd == b.fileno()] == ["A", "B", "A"]


def test_context_lookup_functions():
    main = main_context()
    assert current_context() is main
    assert context_of(gevent.getcurrent()) is main
    with IOThread("ctx-t") as t:
        g_ctx = t.context.call(lambda: context_of(gevent.getcurrent()))
        assert g_ctx is t.context
        assert t.context.call(current_context) is t.context
        assert t.context.call(main_context) is main
        assert t.context is not main
    assert iohandler_context().name == "qioc-iohandler"


# -- split directions --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("follow", [True, False], ids=["follow", "iohandler"])
def test_reader_and_writer_in_two_iothreads_64mib_each_way(follow):
    size = 64 * 1024 * 1024 if follow else 16 * 1024 * 1024
    x, y = SocketChannel.socketpair()
    _small_buffers(x, y)
    for ch in (x, y):
        ch.set_follow_coroutine_ctx(follow)
    parks = {"n": 0}
    with x, y, IOThread("A") as ta, IOThread("B") as tb, trace_readiness() as seen:
        def writer(ch, seed):
            rng = random.Random(seed)
            h = hashlib.sha256()
            left = size
            while left:
                chunk = rng.randbytes(min(left, 256 * 1024))
                h.update(chunk)
                ch.write_all(chunk)
                left -= len(chunk)
            return h.hexdigest()

        def reader(ch):
            h = hashlib.sha256()
            buf = bytearray(256 * 1024)
            left = size
            while left:
                n = ch.readinto(memoryview(buf)[: min(left, len(buf))])
                assert n, "early EOF"
                h.update(memoryview(buf)[:n])
                left -= n
            return h.hexdigest()

        # On each end, the reader runs in A and the writer in B.
        futs = [
            ta.context.spawn(reader, x), tb.context.spawn(writer, x, 1),
            ta.context.spawn(reader, y), tb.context.spawn(writer, y, 2),
        ]
        rx, wx, ry, wy = (f.result(100) for f in futs)
        parks["n"] = len(seen)
    assert rx == wy and ry == wx
    assert parks["n"] > 100  # both directions really had to park


def test_second_reader_is_busy():
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    with a, b:
        g1 = gevent.spawn(b.read_all, 1)
        gevent.sleep(0)
        assert b.statistics().readers_waiting
        with pytest.raises(ChannelBusyError, match="already waiting to read"):
            b.read_all(1)
        # A writer may park while the reader is parked: the directions are separate.
        a.write_all(b"z")
        assert g1.get(timeout=5) == b"z"


# -- exactly one waker -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_exactly_once_wake_under_races():
    """Readiness, wake_read() from another thread and a timeout race 10,000 times.

    After each park the reader waits for a Future the racer completes with the round number:
    a second resume of the same park would switch into that wait and make it return early
    (with the wrong round), and a lost wake would hang the round (caught by the timeout).
    """
    rounds = 10_000
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    with a, b, IOThread("reader") as t:
        ready = [threading.Event() for _ in range(2)]
        box: dict[str, Future] = {}
        outcomes = {"woken": 0, "timeout": 0}

        def reader():
            for i in range(rounds):
                fut = Future()
                box["fut"] = fut
                ready[i % 2].set()
                try:
                    b.yield_(IOCondition.IN, timeout=random.choice((0.0, 0.00005, 0.0002, 0.002)))
                    outcomes["woken"] += 1
                except TimeoutError:
                    outcomes["timeout"] += 1
                got = fut.result(10)
                assert got == i, f"round {i}: resumed by a stale wake ({got!r})"
                b.set_blocking(False)
                try:
                    while b.read(4096):
                        pass
                except Exception:
                    pass
                b.set_blocking(True)

        fut_reader = t.context.spawn(reader)
        rng = random.Random(7)
        for i in range(rounds):
            assert ready[i % 2].wait(10)
            ready[i % 2].clear()
            fut = box["fut"]
            action = rng.randrange(4)
            if action in (0, 2):
                a.write(b"x")
            if action in (1, 2):
                b.wake_read()
            fut.set_result(i)
        fut_reader.result(60)
    assert outcomes["woken"] + outcomes["timeout"] == rounds
    assert outcomes["woken"] > 0 and outcomes["timeout"] > 0


# -- close from anywhere -----------------------------------------------------------------------


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "iohandler"])
def test_close_from_another_thread_wakes_reader_and_writer(follow, capfd):
    a, b = SocketChannel.socketpair()
    _small_buffers(a, b, size=4096)
    a.set_follow_coroutine_ctx(follow)
    closed_while_held = []
    real_close = a._io_close

    def checked_close():
        # The fd may be closed only when no operation and no watcher holds it any more.
        closed_while_held.append(a.statistics().holds > 0 or a.statistics().readers_waiting or a.statistics().writers_waiting)
        real_close()

    a._io_close = checked_close
    with b, IOThread("R") as tr, IOThread("W") as tw:
        parked = threading.Event()

        def read():
            try:
                a.read_all(10)
            except ChannelClosedError:
                return time.monotonic()

        def write():
            try:
                a.write_all(b"y" * (8 * 1024 * 1024))
            except ChannelClosedError:
                return time.monotonic()

        fr = tr.context.spawn(read)
        fw = tw.context.spawn(write)
        assert wait_until(lambda: a.statistics().readers_waiting and a.statistics().writers_waiting)
        parked.set()
        t0 = time.monotonic()
        closer = threading.Thread(target=a.close)
        closer.start()
        closer.join(5)
        t_read, t_write = fr.result(5), fw.result(5)
        assert t_read - t0 < 0.1 and t_write - t0 < 0.1
    assert wait_until(lambda: closed_while_held == [False])
    out, err = capfd.readouterr()
    assert err == ""


def test_operations_after_close_raise_closed():
    a, b = SocketChannel.socketpair()
    a.close()
    a.close()  # idempotent
    for op in (lambda: a.read(1), lambda: a.write_all(b"x"), lambda: a.yield_(IOCondition.IN)):
        with pytest.raises(ChannelClosedError, match="closed"):
            op()
    b.close()


def test_peer_reset_is_broken_channel_with_cause():
    a, b = SocketChannel.socketpair()
    b.close()
    with pytest.raises(BrokenChannelError) as info:
        for _ in range(100):
            a.write_all(b"x" * 65536)
    assert isinstance(info.value.__cause__, OSError)
    assert a.name in str(info.value)
    a.close()


# -- timeouts ----------------------------------------------------------------------------------


def _active_watchers():
    return current_context().loop.activecnt


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "iohandler"])
def test_timeouts_leave_no_armed_watcher(follow):
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(follow)
    with a, b:
        base = _active_watchers()
        with pytest.raises(TimeoutError, match="timed out"):
            b.read_all(4, timeout=0.01)
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.01):
                b.read_all(4)
        g = gevent.spawn(b.read_all, 4)
        assert wait_until(lambda: b.statistics().readers_waiting)
        g.kill()
        assert _active_watchers() == base
        assert not b.statistics().readers_waiting
        # Exactly the channel's own hold remains: no watcher (here or in the iohandler) holds the fd.
        assert wait_until(lambda: b.statistics().holds == 1)
        a.write_all(b"abcd")
        assert b.read_all(4, timeout=5) == b"abcd"


def test_future_result_timeout_is_builtin_timeout():
    with IOThread("slow") as t:
        fut = t.context.spawn(gevent.sleep, 5)
        with pytest.raises(TimeoutError):
            fut.result(0.01)
        # A plain thread that has no hub blocks instead of parking.
        out = []
        th = threading.Thread(target=lambda: out.append(t.context.call(lambda: 42, timeout=5)))
        th.start()
        th.join(5)
        assert out == [42]


def test_waiting_inside_a_hub_callback_is_a_clear_error():
    a, b = SocketChannel.socketpair()
    errors = []
    done = gevent.event.Event()

    def in_hub():
        try:
            b.read(1)
        except RuntimeError as exc:
            errors.append(str(exc))
        done.set()

    with a, b:
        current_context().schedule(in_hub)
        done.wait(5)
    assert errors and "hub" in errors[0]


# -- stopping a context ------------------------------------------------------------------------


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "iohandler"])
def test_stopping_an_iothread_wakes_parked_greenlets(follow):
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(follow)
    c, d = SocketChannel.socketpair()
    d.set_follow_coroutine_ctx(follow)
    results = []
    t = IOThread("stopping").start()

    def park_on(ch):
        try:
            ch.read_all(1)
        except ContextStoppedError as exc:
            results.append(str(exc))

    fut = t.context.spawn(park_on, b)  # started with ctx.spawn
    t.context.schedule(lambda: gevent.spawn(park_on, d))  # plain gevent.spawn in the thread
    assert wait_until(lambda: b.statistics().readers_waiting and d.statistics().readers_waiting)
    t0 = time.monotonic()
    t.stop(timeout=5)
    assert time.monotonic() - t0 < 2
    assert not t.is_alive()
    fut.result(1)
    assert len(results) == 2 and all("stop" in r for r in results)
    for ch in (a, b, c, d):
        ch.close()


def test_a_plain_thread_that_waited_leaves_no_hub_behind():
    # A thread that is not an IOThread gets a hub on its first wait; when the thread ends its
    # hub is destroyed with it (the leak check around every test counts the loop's fds).
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    got = []
    with a, b:
        t = threading.Thread(target=lambda: got.append(b.read_all(2)))
        t.start()
        assert wait_until(lambda: b.statistics().readers_waiting)
        a.write_all(b"ok")
        t.join(5)
    assert got == [b"ok"]
