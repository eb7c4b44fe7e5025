"""Cross-thread Queue and Event: greenlets of different IOThreads and plain threads share them."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import gevent
import pytest

from qioc_green import Event, IOThread, Queue, QueueClosed


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


def test_split_echo_demo_runs():
    demo = Path(__file__).resolve().parent.parent / "examples" / "split_echo_demo.py"
    out = subprocess.run([sys.executable, str(demo), "--seconds", "1", "--clients", "4"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("listening on tcp:127.0.0.1:")
    assert "every byte checked" in lines[1]
    assert any("reader-iothread reads" in x for x in lines) and any("writer-iothread writes" in x for x in lines)
