"""Races and leaks found in review, each shown first by a script and kept here as a test."""

from __future__ import annotations

import os
import socket
import tempfile
import threading

import gevent
import pytest

from qioc_green import (
    ChannelClosedError,
    ChannelTimeoutError,
    CommandChannel,
    ContextStoppedError,
    IOThread,
    Queue,
    Shutdown,
    SocketChannel,
    current_context,
)
from tests.polling import wait_until


def test_queue_wake_is_not_lost_when_the_woken_getter_is_killed():
    q: Queue[str] = Queue()
    got = []

    def getter(tag):
        got.append((tag, q.get()))

    current_context()
    g1, g2 = gevent.spawn(getter, "g1"), gevent.spawn(getter, "g2")
    assert wait_until(lambda: len(q._getters) == 2)
    t = threading.Thread(target=q.put, args=("item",))
    t.start()
    t.join()  # the wake for a getter is now posted through the inbox
    g1.kill(block=False)  # g1 leaves before its delivery runs
    g2.join(5)
    assert got == [("g2", "item")]


def test_errors_raised_while_parked_carry_progress():
    a, b = SocketChannel.socketpair(name="pp")
    a.set_follow_coroutine_ctx(True)
    with b:
        g = gevent.spawn(a.read_all, 10)
        b.write_all(b"1234")
        assert wait_until(lambda: a.statistics().readers_waiting)
        a.close()
        with pytest.raises(ChannelClosedError) as info:
            g.get(timeout=5)
        assert (info.value.done, info.value.expected) == (4, 10)
    c, d = SocketChannel.socketpair()
    with c, d:
        d.write_all(b"12")
        with pytest.raises(ChannelTimeoutError) as tinfo:
            c.read_all(5, timeout=0.02)
        assert tinfo.value.done == 2 and isinstance(tinfo.value, TimeoutError)


def test_close_releases_a_greenlet_orphaned_by_its_ended_thread():
    a, b = SocketChannel.socketpair(name="orphan")
    a.set_follow_coroutine_ctx(True)

    def plain():
        gevent.spawn(a.read, 1)
        gevent.sleep(0.01)  # the greenlet parks; then the thread ends with it parked

    th = threading.Thread(target=plain)
    th.start()
    th.join(5)
    a.close()  # its wake finds the context gone and releases the slot and the fd hold
    st = a.statistics()
    assert not st.readers_waiting and not st.holds and st.released
    b.close()


def test_stop_fails_the_futures_of_killed_tasks_clearly():
    t = IOThread("victim").start()
    fut = t.context.spawn(gevent.sleep, 30)
    g = gevent.spawn(t.context.call, gevent.sleep, 30)
    gevent.sleep(0.05)
    t.stop(timeout=5)
    with pytest.raises(ContextStoppedError, match="stopped; task killed"):
        fut.result(2)
    g.join(5)
    assert isinstance(g.exception, ContextStoppedError)


def test_command_shutdown_keeps_the_fd_number_until_close():
    ch = CommandChannel.spawn(["cat"])
    with ch:
        wfd = ch._wfd
        ch.write_all(b"abc")
        ch.shutdown(Shutdown.WRITE)
        r, w = os.pipe()  # the released number must not be handed out again yet
        try:
            assert wfd not in (r, w)
        finally:
            os.close(r)
            os.close(w)
        assert ch.read_all(3) == b"abc"
        assert ch.read(1) == b""
    assert ch.returncode == 0


def test_unix_connect_with_a_full_backlog_waits_instead_of_returning_unconnected():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s")
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(path)
        lst.listen(0)
        pending = []
        try:
            while True:  # fill the backlog
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                if s.connect_ex(path) != 0:
                    s.close()
                    break
                pending.append(s)
            with pytest.raises(TimeoutError, match="backlog full"):
                SocketChannel.connect(f"unix:{path}", timeout=0.05)
            accepted, _ = lst.accept()  # make room: now it connects
            accepted.close()
            ch = SocketChannel.connect(f"unix:{path}", timeout=5)
            assert ch.remote_address == f"unix:{path}"
            ch.close()
        finally:
            for s in pending:
                s.close()
            lst.close()
