"""A hostile review of DESIGN.md sections 1-3 as a gevent user: each test is one place where the
library departs from the contract or from what a gevent (or concurrent.futures, queue) user
expects.  Each is marked ``xfail(strict=True)`` with the reason until it is fixed, so the suite
stays green and a fix shows as XPASS (then drop the mark).

What only a fresh process shows, or what would leave an fd behind while the defect is there (the
suite's leak check would turn an expected failure into an error), runs in a child.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import socket
import ssl
import subprocess
import sys
import textwrap
import threading

import gevent
import pytest

from qioc_green import (
    BrokenChannelError,
    ChannelBusyError,
    CommandChannel,
    Event,
    FileChannel,
    Future,
    IOCondition,
    IOThread,
    NetListener,
    NotSupportedError,
    Queue,
    SocketChannel,
    TLSChannel,
    current_context,
)
from tests.certs import client_context, make_certs, server_context
from tests.polling import wait_until


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


def _child(code: str, timeout: float = 20) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (its stderr on failure)."""
    try:
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def _tls_pair(certs) -> tuple[TLSChannel, TLSChannel]:
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs), "localhost")
    s = TLSChannel.server(b, server_context(certs))
    for ch in (c, s):
        ch.set_follow_coroutine_ctx(True)
    g = gevent.spawn(s.handshake, timeout=10)
    c.handshake(timeout=10)
    g.get(timeout=10)
    return c, s


# -- contexts and waiting (DESIGN 1, semantics 8 and 9) ------------------------------------------


def test_cancelling_a_running_task_logs_nothing(caplog):
    with caplog.at_level(logging.DEBUG, logger="concurrent.futures"):
        with IOThread("cancelled") as t:
            started = Event()
            fut = t.context.spawn(lambda: (started.set(), gevent.sleep(60)))
            assert started.wait(5)
            assert fut.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                fut.result(5)
            assert fut.cancel() and fut.cancelled()  # idempotent, as concurrent.futures' is
        # the IOThread has stopped: the killed task has unwound
    assert [r.getMessage() for r in caplog.records if r.name == "concurrent.futures"] == []


def test_a_future_wait_outlives_a_follow_read_of_the_same_thread():
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    fut: Future[int] = Future()
    outcome: list[object] = []
    read_done = threading.Event()

    def thread_main():
        def reader():
            b.read(1)
            read_done.set()

        g = gevent.spawn(reader)
        wait_until(lambda: b.statistics().readers_waiting)  # the reader parks on its kept watcher
        gevent.spawn(a.write_all, b"x")  # runs once this greenlet has parked below
        try:
            outcome.append(fut.result())  # a wake that only another thread can bring
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
            outcome.append(exc)
        g.join()

    th = threading.Thread(target=thread_main)
    with a, b:
        th.start()
        try:
            assert read_done.wait(5)
            # The future is still outstanding: its waiter must stay parked (give LoopExit a chance).
            wait_until(lambda: not th.is_alive(), 0.5)
        finally:
            fut.set_result(42)
            th.join(5)
    assert outcome == [42]


def test_gevent_wait_returns_after_a_future_wait_overlapped_a_follow_read():
    out = _child("""
        import gevent, qioc_green as q
        a, b = q.SocketChannel.socketpair()
        b.set_follow_coroutine_ctx(True)
        with q.IOThread("t") as t:
            g = gevent.spawn(b.read, 1)  # parks on its kept watcher once the main greenlet parks
            def until_parked():
                while not b.statistics().readers_waiting:
                    gevent.sleep(0.001)
            t.context.call(until_parked, timeout=10)  # the main greenlet parks on a future first
            a.write_all(b"x")
            g.get(timeout=10)
        a.close()
        b.close()
        print(gevent.wait(timeout=2))  # True: the loop ended, nothing left to wait for
    """)
    assert out == "True"


def test_iothread_stop_lets_the_callers_other_greenlets_run():
    current_context()
    ran = threading.Event()
    seen: list[bool] = []
    started = Event()

    def task():
        started.set()
        try:
            gevent.sleep(60)
        except gevent.GreenletExit:
            # Its clean-up waits (boundedly, within the stop's 1 s grace) for a greenlet of the
            # thread that is stopping it.
            seen.append(wait_until(ran.is_set, 0.5))
            raise

    t = IOThread("winding-down").start()
    t.context.spawn(task)
    assert started.wait(5)
    g = gevent.spawn(ran.set)  # runs as soon as the main hub gets to run
    t.stop()
    g.join(5)
    assert seen == [True]


def test_a_task_whose_clean_up_outlasts_the_grace_does_not_wreck_the_stop():
    out = _child("""
        import json, gevent, qioc_green as q
        t = q.IOThread("slow-clean-up").start()
        started = q.Event()
        def task():
            started.set()
            try:
                gevent.sleep(60)
            except gevent.GreenletExit:
                gevent.sleep(1.5)  # longer than the stop's 1 s grace
                raise
        t.context.spawn(task)
        assert started.wait(5)
        t.stop()
        try:
            t.context.spawn(lambda: 1).result(1)
            after = "ran"
        except q.ContextStoppedError:
            after = "refused"
        except TimeoutError:
            after = "never completed"
        print(json.dumps(after))
    """)
    assert out == '"refused"'


def test_channel_wait_inside_a_hub_callback_raises():
    a, b = SocketChannel.socketpair()
    out: Future[object] = Future()

    def callback():
        try:
            b.wait(IOCondition.IN, timeout=0.3)
            out.set_result("blocked the hub")
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            out.set_result(exc)

    with a, b:
        current_context().schedule(callback)
        assert isinstance(out.result(5), RuntimeError)


def test_call_refused_inside_a_hub_callback_does_not_run_the_function():
    ran: list[str] = []
    errors: list[BaseException] = []
    with IOThread("callee") as t:
        def callback():
            try:
                t.context.call(lambda: ran.append("ran"), timeout=1)
            except RuntimeError as exc:
                errors.append(exc)

        current_context().schedule(callback)
        assert wait_until(lambda: errors)
        t.context.call(lambda: None, timeout=5)  # anything scheduled before has run by now
    assert ran == []


def test_main_context_from_an_iothread_the_main_thread_started():
    out = _child("""
        import qioc_green as q
        with q.IOThread("t") as t:
            ctx = t.context.call(q.main_context, timeout=10)
        print(ctx is q.main_context())
    """)
    assert out == "True"


# -- channels (DESIGN 2) ---------------------------------------------------------------------------


def test_read_with_timeout_0_returns_bytes_already_queued():
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    with a, b:
        g = gevent.spawn(a.write_all, b"1")
        assert b.read(10, timeout=5) == b"1"  # had to park, and brought fewer than asked
        g.join(5)
        b.write_all(b"q")  # a write since: the next read guesses that it must wait
        a.write_all(b"data")  # but the bytes are there before it reads
        assert b.read(10, timeout=0) == b"data"


@pytest.mark.parametrize("follow", [True, False])
def test_a_zero_timeout_wait_on_a_ready_channel_returns(follow):
    # A deadline already up always beats the watcher: the wait looks at the fd before it says so.
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(follow)
    with a, b:
        with pytest.raises(TimeoutError):
            b.yield_(IOCondition.IN, timeout=0)  # nothing there
        a.write_all(b"x")
        b.yield_(IOCondition.IN, timeout=0)
        b.wait(IOCondition.IN, timeout=0)
        assert b.read(10, timeout=0) == b"x"


def test_readv_full_all_takes_max_fds_as_the_contract_spells_it():
    a, b = SocketChannel.socketpair()
    r, w = os.pipe()
    fds: list[int] = []
    try:
        with a, b:
            a.writev_full_all([b"x"], [r])
            fds = b.readv_full_all([bytearray(1)], 1)
            assert len(fds) == 1
    finally:
        for fd in (r, w, *fds):
            os.close(fd)


def test_readv_full_returns_at_most_max_fds():
    a, b = SocketChannel.socketpair()
    pipes = [os.pipe(), os.pipe()]
    got: list[int] = []
    try:
        with a, b:
            a.writev_full_all([b"x"], [pipes[0][0], pipes[1][0]])
            n, got = b.readv_full([bytearray(1)], max_fds=1)
            assert n == 1
            assert len(got) <= 1
    finally:
        for fd in got + [fd for p in pipes for fd in p]:
            os.close(fd)



def test_readv_full_all_returns_at_most_max_fds_over_its_reads():
    # Two messages, each with an fd: the second read of the loop has no room left for one, and
    # the one it brings is closed (the suite's fd check sees a leak otherwise).
    a, b = SocketChannel.socketpair()
    r, w = os.pipe()
    fds: list[int] = []
    try:
        with a, b:
            a.writev_full_all([b"x"], [r])
            a.writev_full_all([b"y"], [w])
            fds = b.readv_full_all([bytearray(2)], 1)
            assert len(fds) == 1
            assert os.path.samestat(os.fstat(fds[0]), os.fstat(r))
    finally:
        for fd in (r, w, *fds):
            os.close(fd)

def test_connect_to_an_fd_that_is_not_a_socket_leaks_nothing():
    r, w = os.pipe()

    def same_pipe() -> list[int]:
        target = os.readlink(f"/proc/self/fd/{r}")
        out = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if fd not in (r, w) and os.readlink(f"/proc/self/fd/{fd}") == target:
                    out.append(fd)
            except OSError:
                pass  # the listing's own fd
        return out

    leaked: list[int] = []
    try:
        with pytest.raises(BrokenChannelError, match=f"fd:{r}"):
            SocketChannel.connect(f"fd:{r}")
        leaked = same_pipe()
        assert leaked == []
    finally:
        for fd in (r, w, *leaked):
            os.close(fd)



def test_connect_to_an_fd_takes_follow_and_refuses_a_datagram_socket_cleanly():
    s1, s2 = socket.socketpair()
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with SocketChannel.connect(f"fd:{s1.fileno()}", follow=True) as ch:
            assert ch.follow_coroutine_ctx  # as every other address kind
        with pytest.raises(ValueError, match="stream socket"):
            SocketChannel.connect(f"fd:{d.fileno()}")  # its dup closed (the suite's fd check)
    finally:
        for sock in (s1, s2, d):
            sock.close()

def test_writing_a_read_only_command_is_not_supported():
    ch = CommandChannel.spawn([sys.executable, "-c", "pass"], "r")
    with ch:
        with pytest.raises(NotSupportedError):
            ch.write(b"x")



def test_reading_a_write_only_command_is_not_supported():
    ch = CommandChannel.spawn([sys.executable, "-c", "import sys; sys.stdin.read()"], "w")
    with ch:
        with pytest.raises(NotSupportedError, match="not open for reading"):
            ch.read(1)
        with pytest.raises(NotSupportedError):
            ch.read_all(1)
        ch.write_all(b"still writable")

def test_an_append_mode_file_channel_knows_where_it_is(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"0123456789")
    with FileChannel.open(path, "a") as ch:
        ch.write_all(b"abc")
        assert path.read_bytes() == b"0123456789abc"
        assert ch.position == 13



def test_an_append_mode_file_channel_starts_at_the_end_and_refuses_positional_writes(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"0123456789")
    with FileChannel.open(path, "a") as ch:
        assert ch.position == 10  # as Python's open(path, "a").tell()
        with pytest.raises(NotSupportedError, match="append"):
            ch.pwritev([b"X"], 0)  # Linux would append it
    with FileChannel.from_fd(os.open(path, os.O_RDWR | os.O_APPEND)) as ch:
        assert ch.read(4) == b"0123"  # reads from the fd's offset; writes go to the end
        ch.write_all(b"!")
        assert ch.position == 11
    assert path.read_bytes() == b"0123456789!"

# -- TLS (semantics 6) ------------------------------------------------------------------------------


def test_tls_read_all_after_a_write_takes_bytes_already_decrypted(certs):
    c, s = _tls_pair(certs)
    with c, s:
        def server():
            s.read_all(5)
            s.write_all(b"A" * 10 + b"B" * 10)  # two replies in one record
            return s.read_all(3)

        g = gevent.spawn(server)
        c.write_all(b"hello")
        assert c.read_all(10, timeout=5) == b"A" * 10  # parks: nothing has come yet
        c.write_all(b"ack")
        with gevent.Timeout(0.5):  # no timeout=: a read that parks waits for the peer's next record
            assert c.read_all(10) == b"B" * 10  # decrypted already; the socket is empty
        assert g.get(timeout=5) == b"ack"


def test_tls_waits_and_watches_see_bytes_already_decrypted(certs):
    c, s = _tls_pair(certs)
    with c, s:
        s.write_all(b"x" * 100)
        assert c.read_all(10, timeout=5) == b"x" * 10  # 90 more are decrypted; the socket is empty
        c.yield_(IOCondition.IN, timeout=0.5)
        c.wait(IOCondition.IN, timeout=0.5)
        fired = Event()
        watch = c.add_watch(IOCondition.IN, lambda ch, cond: fired.set())
        try:
            assert fired.wait(0.5)
        finally:
            watch.cancel()
        assert c.read(1000, timeout=5) == b"x" * 90



def test_tls_waits_and_watches_see_whole_records_not_yet_decrypted(certs):
    c, s = _tls_pair(certs)
    with c, s:
        s.write_all(b"x" * 100)
        s.write_all(b"y" * 100)  # a second record, on the socket behind the first
        assert c.read_all(100, timeout=5) == b"x" * 100  # one pull takes both; one is decrypted
        assert c.inner.statistics().unread == 0
        c.yield_(IOCondition.IN, timeout=0.5)
        c.wait(IOCondition.IN, timeout=0.5)
        fired = Event()
        watch = c.add_watch(IOCondition.IN, lambda ch, cond: fired.set())
        try:
            assert fired.wait(0.5)
        finally:
            watch.cancel()
        c.write_all(b"q")  # the read prediction: it parks first, and must see the record too
        with gevent.Timeout(0.5):
            assert c.read(1000) == b"y" * 100
        assert s.read_all(1, timeout=5) == b"q"

def test_tls_repr_shows_the_follow_flag_its_waits_use(certs):
    c, s = _tls_pair(certs)
    with c, s:
        assert c.follow_coroutine_ctx
        assert "follow" in repr(c)


def test_tls_timeout_names_the_tls_channel(certs):
    c, s = _tls_pair(certs)
    with c, s:
        c.set_name("tls-user")
        with pytest.raises(TimeoutError, match="^tls-user: "):
            c.read(10, timeout=0.05)



def test_tls_busy_names_the_tls_channel(certs):
    c, s = _tls_pair(certs)
    with c, s:
        c.set_name("tls-user")
        g = gevent.spawn(c.read, 10)
        assert wait_until(lambda: c.inner.statistics().readers_waiting)
        with pytest.raises(ChannelBusyError, match="^tls-user: "):
            c.read(10, timeout=5)
        s.write_all(b"x")
        assert g.get(timeout=5) == b"x"

# -- NetListener -----------------------------------------------------------------------------------


def test_wait_client_interrupted_by_gevent_timeout_loses_no_client():
    out = _child("""
        import gevent, qioc_green as q
        lst = q.NetListener()
        (addr,) = lst.open("tcp:127.0.0.1:0")
        with gevent.Timeout(0.05, False):
            lst.wait_client()
        got = q.Queue()
        lst.set_client_handler(lambda ch: got.put(ch.remote_address))
        c = q.SocketChannel.connect(addr, timeout=5)
        try:
            got.get(timeout=1)
            print("served")
        except TimeoutError:
            print("lost")
    """)
    assert out == "served"


def test_a_refused_client_that_spoke_first_sees_eof():
    with IOThread("busy") as t, NetListener(max_clients=1) as lst:
        (addr,) = lst.open("tcp:127.0.0.1:0")
        port = int(addr.rsplit(":", 1)[1])
        release = Event()
        c1 = socket.create_connection(("127.0.0.1", port), timeout=5)
        c2 = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            c2.sendall(b"hello")  # queued before the listener accepts: a request sent at once
            lst.set_client_handler(lambda ch: release.wait(10), contexts=t.context)
            assert c2.recv(10) == b""
        finally:
            release.set()
            c1.close()
            c2.close()


def test_set_client_handler_takes_an_iothread():
    # In a child: while the defect is there, the client is stuck in the listener until close(grace)
    # gives up on it.
    out = _child("""
        import os, qioc_green as q
        t = q.IOThread("handlers").start()
        lst = q.NetListener()
        (addr,) = lst.open("tcp:127.0.0.1:0")
        served = q.Queue()
        try:
            lst.set_client_handler(lambda ch: served.put(q.current_context().name), contexts=t)
        except TypeError:
            print("refused at once")  # a clear error straight away: fine too
        else:
            c = q.SocketChannel.connect(addr, timeout=5)
            try:
                print(served.get(timeout=1))
            except TimeoutError:
                print("never served")
        os._exit(0)
    """)
    assert out in ("handlers", "refused at once")


def test_a_failing_policy_does_not_stop_the_listener():
    out = _child("""
        import qioc_green as q
        calls = []
        def policy(ch, contexts):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("policy bug")
            return contexts[0]
        lst = q.NetListener()
        (addr,) = lst.open("tcp:127.0.0.1:0")
        served = q.Queue()
        lst.set_client_handler(lambda ch: served.put(1), policy=policy)
        first = q.SocketChannel.connect(addr, timeout=5)
        second = q.SocketChannel.connect(addr, timeout=5)
        try:
            served.get(timeout=1)
            print("served")
        except TimeoutError:
            print("listener dead")
    """)
    assert out == "served"


# -- cross-thread sync -----------------------------------------------------------------------------


def test_queue_speaks_the_stdlib_queue_api():
    q: Queue[int] = Queue(1)
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    q.put_nowait(1)
    assert (q.qsize(), q.empty(), q.full()) == (1, False, True)
    with pytest.raises(queue.Full):
        q.put(2, False)
    with pytest.raises(queue.Full):
        q.put_nowait(2)
    assert q.get(True, 1) == 1


def test_tls_helper_handshakes(certs):
    # The helper the TLS tests above build on works (so their failures are the defects').
    c, s = _tls_pair(certs)
    with c, s:
        assert c.version and isinstance(c.ssl_object, ssl.SSLObject)
        c.write_all(b"ping")
        assert s.read_all(4, timeout=5) == b"ping"
