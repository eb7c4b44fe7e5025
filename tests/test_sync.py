"""Cross-thread Queue, Event and Lock: greenlets of different IOThreads and plain threads share them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import gevent
import pytest

from qioc_green import Event, IOThread, IOThreadPool, Lock, Queue, QueueClosed, current_context
from tests.polling import poll_pause


def test_queue_moves_items_between_iothreads_in_order_with_back_pressure():
    q: Queue[int] = Queue(maxsize=4)
    n = 5000
    high = {"max": 0}
    with IOThread("producer") as tp, IOThread("consumer") as tc:
        def produce():
            for i in range(n):
                q.put(i)
                high["max"] = max(high["max"], len(q))
            q.close()

        def consume():
            got = []
            try:
                while True:
                    got.append(q.get())
            except QueueClosed:
                return got

        fc = tc.context.spawn(consume)
        fp = tp.context.spawn(produce)
        fp.result(30)
        assert fc.result(30) == list(range(n))
    assert high["max"] <= 4


def test_queue_timeouts_and_plain_threads():
    q: Queue[str] = Queue(maxsize=1)
    with pytest.raises(TimeoutError):
        q.get(timeout=0.01)
    q.put("a")
    with pytest.raises(TimeoutError):
        q.put("b", timeout=0.01)
    out = []
    t = threading.Thread(target=lambda: out.append(q.get(timeout=5)))
    t.start()
    t.join(5)
    assert out == ["a"]
    q.close()
    with pytest.raises(QueueClosed):
        q.put("c")


def test_event_wakes_waiters_in_several_threads():
    ev = Event()
    with IOThread("w1") as t1, IOThread("w2") as t2:
        futs = [t.context.spawn(ev.wait, 10) for t in (t1, t2)]
        g = gevent.spawn(ev.wait, 10)
        gevent.sleep(0)
        assert not any(f.done() for f in futs)
        threading.Thread(target=ev.set).start()
        assert [f.result(5) for f in futs] == [True, True]
        assert g.get(timeout=5) is True
    ev.clear()
    assert ev.wait(0.01) is False


class Broken(Exception):
    pass


def test_queue_fail_wakes_every_getter_and_putter_and_sticks():
    empty: Queue[int] = Queue()
    full: Queue[int] = Queue(maxsize=1)
    full.put(0)
    err = Broken("writer gone")
    with IOThread("g1") as t1, IOThread("g2") as t2:
        parked = Event()
        started = []

        def get(q: Queue[int]) -> str:
            started.append(1)
            if len(started) == 4:
                parked.set()
            try:
                q.get(timeout=10)
            except Broken as exc:
                return str(exc)
            return "no error"

        def put(q: Queue[int]) -> str:
            started.append(1)
            if len(started) == 4:
                parked.set()
            try:
                q.put(1, timeout=10)
            except Broken as exc:
                return str(exc)
            return "no error"

        futs = [t1.context.spawn(get, empty), t2.context.spawn(get, empty),
                t2.context.spawn(put, full)]
        plain: list[str] = []
        th = threading.Thread(target=lambda: plain.append(get(empty)))
        th.start()
        assert parked.wait(10)
        # what nothing signals: that all four are parked (else they would see the error on
        # arrival, and the wake would go untested)
        deadline = time.monotonic() + 10
        while (len(empty._getters), len(full._putters)) != (3, 1):
            assert time.monotonic() < deadline, "callers did not park"
            poll_pause(0.005)
        threading.Thread(target=empty.fail, args=(err,)).start()
        full.fail(err)
        assert [f.result(10) for f in futs] == ["writer gone"] * 3
        th.join(10)
        assert plain == ["writer gone"]
    full2: Queue[int] = Queue()
    full2.put(1)
    full2.fail(err)
    full2.fail(Broken("second"))  # the first failure sticks
    for call in (full2.get, lambda: full2.put(2)):
        with pytest.raises(Broken, match="writer gone"):
            call()
    assert len(full2) == 0


def test_lock_excludes_greenlets_of_several_iothreads_and_plain_threads():
    lock = Lock()
    state = {"inside": 0, "max": 0, "count": 0}
    n = 300

    def work(pause) -> None:
        for _ in range(n):
            with lock:
                state["inside"] += 1
                state["max"] = max(state["max"], state["inside"])
                v = state["count"]
                pause(0)  # let the thread's other greenlets (or other threads) try meanwhile
                state["count"] = v + 1
                state["inside"] -= 1

    with IOThread("l1") as t1, IOThread("l2") as t2:
        futs = [ctx.spawn(work, gevent.sleep)
                for ctx in (t1.context, t1.context, t2.context, t2.context)]
        # plain threads: yield the CPU (and the GIL), as gevent.sleep would give them a hub of
        # gevent's own
        threads = [threading.Thread(target=work, args=(lambda _: os.sched_yield(),))
                   for _ in range(2)]
        for t in threads:
            t.start()
        greenlets = [gevent.spawn(work, gevent.sleep) for _ in range(2)]
        for f in futs:
            f.result(60)
        gevent.joinall(greenlets, timeout=60, raise_error=True)
        for t in threads:
            t.join(60)
    assert state == {"inside": 0, "max": 1, "count": 8 * n}
    assert not lock.locked()


def test_lock_is_fifo_across_threads():
    """Waiters from three threads get the lock in the order they queued; a timed-out waiter
    leaves the queue."""
    lock = Lock()
    queued = [Event() for _ in range(3)]

    class Recorder(deque):  # tells the test when each waiter has queued: no guessing with sleeps
        def append(self, item) -> None:
            super().append(item)
            queued[len(self) - 1].set()

    lock._waiters = Recorder()
    order: list[int] = []
    lock.acquire()
    with IOThreadPool(3, pin=False) as pool:
        def take(i: int) -> None:
            with lock:
                order.append(i)

        futs = []
        for i, ctx in enumerate(pool.contexts):
            futs.append(ctx.spawn(take, i))
            assert queued[i].wait(5)
        lock.release()
        for fut in futs:
            fut.result(5)
    assert order == [0, 1, 2]
    lock._waiters = deque()
    lock.acquire()
    try:
        assert current_context().spawn(lock.acquire, True, 0.01).result(5) is False
        assert not lock._waiters
    finally:
        lock.release()
    assert not lock.locked()


def test_lock_timeouts_and_non_blocking():
    lock = Lock()
    assert lock.acquire()
    assert lock.acquire(blocking=False) is False
    assert lock.acquire(timeout=0.01) is False
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(lock.acquire(timeout=0.01)))
    t.start()
    t.join(5)
    assert out == [False]
    with IOThread("lt") as it:
        assert it.context.spawn(lock.acquire, True, 0.01).result(5) is False
        fut = it.context.spawn(lock.acquire, True, 10)
        lock.release()  # handed to the waiter of the other thread
        assert fut.result(5) is True
        assert lock.locked()
        it.context.call(lock.release)
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


def test_lock_hand_off_to_a_waiter_that_is_leaving_is_passed_on():
    # Deterministic: the kill is scheduled before release() hands the lock over, so the waiter
    # leaves (GreenletExit-like Broken) after it was handed the lock: it must pass it on.
    lock = Lock()
    lock.acquire()
    g = gevent.spawn(lock.acquire, True, 10)
    gevent.sleep(0)  # g parks in acquire()
    g.kill(Broken, block=False)
    lock.release()
    g.join(5)
    assert isinstance(g.exception, Broken)
    assert not lock.locked()
    assert lock.acquire(blocking=False)
    lock.release()


def test_lock_hand_off_is_never_lost_when_a_waiter_times_out_at_once():
    # A waiter leaving by its timeout while release() hands it the lock must pass it on:
    # whatever the interleaving, the lock ends free and nobody is left waiting for ever.
    lock = Lock()
    got = 0
    with IOThread("race") as it:
        for i in range(400):
            lock.acquire()
            fut = it.context.spawn(lock.acquire, True, 0.0005 * (i % 4))
            lock.release()
            if fut.result(5):
                got += 1
                it.context.call(lock.release)
            assert lock.acquire(timeout=5), f"hand-off lost in round {i}"
            lock.release()
    assert not lock.locked()


def test_split_echo_demo_runs():
    demo = Path(__file__).resolve().parent.parent / "examples" / "split_echo_demo.py"
    out = subprocess.run([sys.executable, str(demo), "--seconds", "1", "--clients", "4"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("listening on tcp:127.0.0.1:")
    assert "every byte checked" in lines[1]
    assert any("reader-iothread reads" in x for x in lines) and any("writer-iothread writes" in x for x in lines)


def test_queue_keeps_the_earlier_positional_timeout_and_timeout_errors():
    # Before it spoke queue.Queue's API, get(timeout) and put(item, timeout) took the timeout
    # first, and TimeoutError was what a time-out raised: both still hold.
    q: Queue[int] = Queue(1)
    with gevent.Timeout(5):
        with pytest.raises(TimeoutError):
            q.get(0.01)
        q.put(1, 0.01)
        with pytest.raises(TimeoutError):
            q.put(2, 0.01)
        assert q.get(0.01) == 1
        g = gevent.spawn(q.get, None)  # None first was "no limit", not "do not block"
        gevent.sleep(0)
        q.put(3)
        assert g.get() == 3
        q.close()
        with pytest.raises(QueueClosed):
            q.get_nowait()  # closed and drained: closed, not empty
