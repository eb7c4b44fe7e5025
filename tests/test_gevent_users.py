"""What a gevent user hits in the first hour, each once a bug: monkey patching, gevent.wait(),
fds with no data, empty reads, a stopped IOThread's watchers, huge length fields, datagram
sockets, bare OSErrors, and a Future that concurrent.futures can use."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import gevent
import pytest

from qioc_green import (
    BrokenChannelError,
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    CommandChannel,
    FileChannel,
    IOThread,
    IOThreadPool,
    SocketChannel,
    UnexpectedEOF,
    current_context,
    run_in_thread,
)
from tests.polling import wait_until


def _run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


# -- monkey patching --------------------------------------------------------------------------

ECHO_UNDER_PATCHING = """
    import json, sys
    if sys.argv[1] == "before":
        from gevent import monkey; monkey.patch_all()
    import qioc_green as q
    if sys.argv[1] == "after":
        from gevent import monkey; monkey.patch_all()
    import socket, threading
    import gevent

    handlers = []  # (native thread id, context name) of every handler

    def echo(ch):
        handlers.append((threading.get_native_id(), q.current_context().name))
        while True:
            data = ch.read(65536)
            if not data:
                return
            ch.write_all(data)

    def client(addr, i):
        # A gevent user's client: the patched (green) socket module, in a main-thread greenlet.
        host, port = addr.removeprefix("tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            msg = b"ping %d " % i * 100
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(65536)
            assert got == msg

    with q.IOThreadPool(2) as pool:
        with q.NetListener("echo") as lst:
            (addr,) = lst.open("tcp:127.0.0.1:0")
            lst.set_client_handler(echo, pool)
            gevent.joinall([gevent.spawn(client, addr, i) for i in range(8)], raise_error=True)
            # Our own channels and futures too, from the main thread.
            ch = q.SocketChannel.connect(addr, timeout=10)
            ch.write_all(b"ours")
            assert ch.read_all(4, timeout=10) == b"ours"
            ch.close()
            assert pool.contexts[0].call(lambda: threading.get_native_id(), timeout=10) != threading.get_native_id()
            assert q.run_in_thread(threading.get_native_id).result(10) != threading.get_native_id()
    print(json.dumps({"main": threading.get_native_id(), "handlers": handlers,
                      "pool": [t.name for t in pool.threads]}))
"""


@pytest.mark.parametrize("when", ["before", "after"], ids=["patch-then-import", "import-then-patch"])
def test_echo_over_iothreads_after_monkey_patch_all(when):
    out = json.loads(_run_python(ECHO_UNDER_PATCHING, when).stdout)
    natives = {native for native, _ in out["handlers"]}
    assert len(out["handlers"]) == 9
    assert out["main"] not in natives  # handlers ran in real OS threads, not main-thread greenlets
    assert len(natives) == 2  # one per IOThread of the pool
    assert {name for _, name in out["handlers"]} == set(out["pool"])


# -- gevent.wait() --------------------------------------------------------------------------------


def test_gevent_wait_returns_once_nothing_is_outstanding():
    # In a child: the suite's own guard timer would keep this process's main hub alive.
    out = _run_python("""
        import gevent, qioc_green as q
        for follow in (True, False):
            a, b = q.SocketChannel.socketpair()
            b.set_follow_coroutine_ctx(follow)
            g = gevent.spawn(b.read_all, 3)  # parks a main-thread greenlet on the channel
            while not b.statistics().readers_waiting:
                gevent.sleep(0.001)
            a.write_all(b"abc")
            assert g.get(timeout=10) == b"abc"
            a.close()
            b.close()
        with q.IOThread("t") as t:
            assert t.context.call(lambda: 42, timeout=10) == 42  # a future waited for here
        gevent.wait()  # plain gevent returns when nothing is left to wait for
        print("returned")
    """, timeout=30)
    assert out.stdout.strip() == "returned"


def test_a_greenlet_parked_for_another_thread_keeps_the_main_hub_alive():
    # The other side of the same rule: while a main-thread greenlet waits for a wake that only
    # another thread can send, gevent.wait() waits for it too.
    out = _run_python("""
        import gevent, qioc_green as q
        with q.IOThread("t") as t:
            g = gevent.spawn(t.context.call, gevent.sleep, 0.2)
            gevent.wait()
            print(g.dead)
    """, timeout=30)
    assert out.stdout.strip() == "True"


# -- fds need data; empty reads return at once ------------------------------------------------------


def test_fds_with_no_byte_to_carry_them_are_refused():
    a, b = SocketChannel.socketpair()
    r, w = os.pipe()
    try:
        with a, b:
            with pytest.raises(ValueError, match="at least one byte"):
                a.writev_full_all([], fds=[r])
            with pytest.raises(ValueError, match="at least one byte"):
                a.writev_full([b""], fds=[r])
            with pytest.raises(ValueError, match="at least one byte"):
                a.writev_full_all([b"", bytearray()], fds=[r])
            a.writev_full_all([b"!"], fds=[r])  # one byte is enough
            fds = b.readv_full_all([bytearray(1)], max_fds=1)
            assert len(fds) == 1
            os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("buffers", [[], [bytearray(0)], [bytearray(0), b""]], ids=["none", "one-empty", "two-empty"])
def test_reading_into_no_room_returns_0_at_once(buffers):
    a, b = SocketChannel.socketpair()
    with a, b:  # nothing to read: a read that waited would time out
        assert b.readv(buffers, timeout=0.5) == 0
        assert b.readv_full(buffers, max_fds=1, timeout=0.5) == (0, [])
        assert b.readinto(bytearray(0), timeout=0.5) == 0
        a.write_all(b"x")
        assert b.read(1) == b"x"


# -- a stopped IOThread's kept watcher -------------------------------------------------------------


def test_close_after_the_iothread_it_parked_in_stopped_from_a_thread_with_its_ident():
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    t = IOThread("gone").start()
    ident = t.context.thread_id
    fut = t.context.spawn(b.read_all, 1)  # parks: the channel keeps a watcher on that hub
    assert wait_until(lambda: b.statistics().readers_waiting)
    a.write_all(b"x")
    assert fut.result(5) == b"x"
    t.stop()
    outcome: list[object] = []

    def closer() -> None:
        if threading.get_ident() == ident:
            try:
                b.close()
                outcome.append("closed")
            except Exception as exc:  # noqa: BLE001 - the bug was an error here
                outcome.append(exc)

    for _ in range(50):  # thread idents are reused (glibc hands the stack to the next thread)
        th = threading.Thread(target=closer)
        th.start()
        th.join()
        if outcome:
            break
    a.close()
    if not outcome:
        b.close()
        pytest.skip("no new thread got the stopped thread's ident")
    assert outcome == ["closed"]
    assert b.statistics().released


# -- length fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["read_all", "read_all_eof"])
@pytest.mark.parametrize("sent", [10, 3 * 1024 * 1024], ids=["10B", "3MiB"])
def test_a_huge_read_all_costs_what_arrives_not_what_it_asks(call, sent):
    a, b = SocketChannel.socketpair()
    with b:
        payload = os.urandom(sent)
        g = gevent.spawn(lambda: (a.write_all(payload), a.close()))
        tracemalloc.start()
        try:
            with pytest.raises(UnexpectedEOF) as info:
                getattr(b, call)(2**31, timeout=30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        g.get(timeout=10)
        assert info.value.partial == payload and info.value.expected == 2**31
        assert peak < 4 * sent + 4 * 1024 * 1024  # grows with what arrived (2 GiB asked)


# -- sockets, errors, messages -------------------------------------------------------------------------


def test_from_socket_refuses_a_datagram_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s, pytest.raises(ValueError, match="stream socket.*SOCK_DGRAM"):
        SocketChannel.from_socket(s)
    u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with u, pytest.raises(ValueError, match="stream socket"):
        SocketChannel.from_socket(u)


def _unused_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def test_os_errors_reach_the_user_translated_with_the_cause(tmp_path):
    lst = SocketChannel.listen("tcp:127.0.0.1:0")
    cases = [
        ("address in use", lambda: SocketChannel.listen(lst.local_address)),
        ("unix path too long", lambda: SocketChannel.listen(f"unix:{tmp_path}/{'x' * 200}")),
        ("connect to a path too long", lambda: SocketChannel.connect(f"unix:{tmp_path}/{'y' * 200}")),
        ("connect fd:N not open", lambda: SocketChannel.connect(f"fd:{_unused_fd()}")),
        ("listen fd:N not open", lambda: SocketChannel.listen(f"fd:{_unused_fd()}")),
        ("file fd not open", lambda: FileChannel.from_fd(_unused_fd())),
        ("no such program", lambda: CommandChannel.spawn([str(tmp_path / "no-such-program")])),
    ]
    with lst:
        for what, fn in cases:
            with pytest.raises(ChannelError) as info:
                fn()
            assert isinstance(info.value, BrokenChannelError), what
            assert isinstance(info.value.__cause__, OSError), what
            assert " failed: " in str(info.value), (what, str(info.value))
    with pytest.raises(ChannelClosedError):
        lst.local_address  # noqa: B018 - a property of a closed channel


def test_messages_refuse_negative_sizes_one_way_and_timeouts_count_bytes():
    a, b = SocketChannel.socketpair(name="sizes")
    with a, b:
        for call in (lambda: b.read(-1), lambda: b.read_all(-1), lambda: b.read_all_eof(-5)):
            with pytest.raises(ValueError, match=r"^sizes-b: negative size -\d$"):
                call()
        a.write_all(b"123")
        with pytest.raises(ChannelTimeoutError, match=r"^sizes-b: timed out waiting to read after 3 of 10 bytes$"):
            b.read_all(10, timeout=0.05)
        with pytest.raises(ChannelTimeoutError, match=r"after 0 of 4 bytes$"):
            a.read_all(4, timeout=0.01)


# -- Future follows concurrent.futures -------------------------------------------------------------


def test_future_cancel_kills_the_task_and_concurrent_futures_accepts_it():
    with IOThreadPool(2) as pool:
        ended = threading.Event()

        def task():
            try:
                gevent.sleep(30)
            finally:
                ended.set()  # GreenletExit went through it

        fut = pool.contexts[0].spawn(task)
        called = []
        fut.add_done_callback(called.append)
        assert wait_until(lambda: pool.contexts[0].tasks)  # it runs
        assert fut.cancel() and fut.cancelled() and fut.done() and not fut.running()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(5)
        with pytest.raises(concurrent.futures.CancelledError):
            fut.exception(5)
        assert ended.wait(5) and called == [fut]
        quick = pool.contexts[1].spawn(lambda: 7)
        slow = pool.contexts[1].spawn(gevent.sleep, 30)
        done, not_done = concurrent.futures.wait([quick, fut, slow], timeout=5,
                                                 return_when=concurrent.futures.FIRST_EXCEPTION)
        assert done == {quick, fut} and not_done == {slow}
        assert [f.result() for f in concurrent.futures.as_completed([quick], timeout=5)] == [7]
        assert quick.cancel() is False  # done already
        assert slow.cancel()


def test_a_task_killed_by_someone_else_is_cancelled_and_a_worker_thread_runs_once_started():
    ctx = current_context()
    ran = []
    fut = ctx.spawn(lambda: (ran.append(1), gevent.sleep(30)))
    assert wait_until(lambda: ran)
    (g,) = ctx.tasks
    g.kill()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(5)
    assert fut.cancelled()
    # Killed before its greenlet ever ran: the schedule() below runs after the task's start is
    # set up and before the greenlet's first turn.
    ran.clear()
    fut = ctx.spawn(ran.append, 1)
    ctx.schedule(lambda: [t.kill(block=False) for t in list(ctx.tasks)])
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(5)
    assert ran == []
    started = threading.Event()
    release = threading.Event()
    worker = run_in_thread(lambda: (started.set(), release.wait(10))[1])
    assert started.wait(5)
    assert worker.cancel() is False and worker.running()  # a thread cannot be cancelled once running
    release.set()
    assert worker.result(5) is True
