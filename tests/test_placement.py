"""Where an IOThreadPool's hub threads run: pinned, unpinned, or chosen by measurement (auto).

Auto needs the compiled hot path (it measures the hubs' GIL waits in the loop hook) and two
CPUs; without it a default pool is unpinned, as before.
"""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest

import qioc_green as q
from qioc_green import _hub

from .polling import wait_until

ALLOWED = os.sched_getaffinity(0)
needs_auto = pytest.mark.skipif(not _hub.can_batch_gil() or len(ALLOWED) < 2,
                                reason="auto placement needs the compiled hot path and two CPUs")


def _affinity() -> set[int]:
    return os.sched_getaffinity(0)


def _stats() -> dict:
    st = _hub.placement_stats()
    assert st is not None
    return st


def test_the_default_placement_is_said_in_the_repr():
    with q.IOThreadPool(2) as pool:
        if _hub.can_batch_gil():
            assert pool.placement == "auto"
            assert "placement auto (now " in repr(pool)
        else:
            assert pool.placement == "unpinned"
            assert repr(pool) == "<IOThreadPool 2 threads, placement unpinned>"
        for ctx in pool.contexts:
            assert ctx.call(_affinity, timeout=10) == ALLOWED  # nothing to measure yet: spread


def test_pin_true_pins_every_hub_to_one_cpu_and_false_never():
    with q.IOThreadPool(2, pin=True) as pool:
        assert pool.placement == "pinned"
        assert repr(pool) == f"<IOThreadPool 2 threads, placement pinned to CPU {min(ALLOWED)}>"
        assert {frozenset(ctx.call(_affinity, timeout=10)) for ctx in pool.contexts} == {frozenset({min(ALLOWED)})}
    with q.IOThreadPool(2, pin=False) as pool:
        assert pool.placement == "unpinned"
        assert all(ctx.call(_affinity, timeout=10) == ALLOWED for ctx in pool.contexts)


def _load(state: dict) -> None:
    """Python-bound ping-pong on a channel pair of this hub ("ping"), or hashing that releases
    the GIL ("hash"), until told to stop."""
    a, b = q.SocketChannel.socketpair()
    a.set_follow_coroutine_ctx(True)
    b.set_follow_coroutine_ctx(True)
    blob = os.urandom(1 << 22)

    def echo() -> None:
        while True:
            data = b.read(64)
            if not data:
                return
            b.write_all(data)

    g = gevent.spawn(echo)
    try:
        while not state["stop"]:
            if state["mode"] == "ping":
                for _ in range(50):
                    a.write_all(b"x" * 64)
                    a.read_all(64)
            else:
                hashlib.sha256(blob).digest()  # releases the GIL for the whole 4 MiB
                gevent.sleep(0)
    finally:
        a.close()
        g.join(5)
        b.close()


@needs_auto
@pytest.mark.timeout(60)
def test_auto_pins_python_bound_hubs_and_spreads_them_for_gil_releasing_work():
    state = {"stop": False, "mode": "ping"}
    with q.IOThreadPool(2) as pool:
        futures = [ctx.spawn(_load, state) for ctx in pool.contexts]
        try:
            # Two hubs doing Python-bound work wait for each other's GIL: pinned together.
            assert wait_until(lambda: _stats()["mode"] == "pinned", 15), _stats()
            cpu = _stats()["cpu"]
            assert cpu in ALLOWED
            assert wait_until(lambda: all(ctx.call(_affinity, timeout=10) == {cpu} for ctx in pool.contexts), 15)
            assert f"placement auto (now pinned to CPU {cpu})" in repr(pool) or _stats()["mode"] == "spread"
            # Work that releases the GIL: the next look while spread sees little waiting.
            spreads = _stats()["spreads"]
            state["mode"] = "hash"
            assert wait_until(lambda: _stats()["mode"] == "spread" and _stats()["spreads"] > spreads, 30), _stats()
            assert wait_until(lambda: all(ctx.call(_affinity, timeout=10) == ALLOWED for ctx in pool.contexts), 15)
        finally:
            state["stop"] = True
            for f in futures:
                f.result(15)
    # The last auto hub gone, the next pool starts afresh.
    st = _stats()
    assert st["auto_hubs"] == 0 and st["mode"] == "spread"
