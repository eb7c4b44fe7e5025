"""Suite-wide guards: a hard timeout inside every test, and no leaked fd, thread or child process.

pytest-timeout (setup.cfg) bounds every test from outside; ``gevent.Timeout`` bounds it from
inside the main thread's hub, so a test parked on a channel fails with a traceback instead of
hanging.  After each test, the process must be back to the fds, threads and children it had
before (closes that finish asynchronously, in the iohandler thread, are waited for, boundedly).
"""

from __future__ import annotations

import os
import threading

import gevent
import psutil
import pytest

import qioc_green
from tests.polling import wait_until

INNER_TIMEOUT = 110  # below setup.cfg's pytest-timeout of 120 s


def _fds() -> set[int]:
    return set(int(x) for x in os.listdir("/proc/self/fd"))


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name != "qioc-iohandler"}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="session", autouse=True)
def _warm_contexts():
    # The main thread's hub and the iohandler thread live for the whole process: make them
    # before the first baseline so they do not count as leaks.
    qioc_green.main_context()
    qioc_green.iohandler_context()
    yield


@pytest.fixture(autouse=True)
def no_leaks(request):
    fds = _fds()
    threads = _threads()
    children = _children()
    timeout = request.node.get_closest_marker("timeout")
    inner = min(INNER_TIMEOUT, timeout.args[0] - 5) if timeout and timeout.args else INNER_TIMEOUT
    guard = gevent.Timeout(inner)
    guard.start()
    try:
        yield
    finally:
        guard.close()
    ok = wait_until(lambda: _fds() <= fds and _threads() <= threads and _children() <= children)
    if not ok:
        leaked = []
        extra_fds = _fds() - fds
        if extra_fds:
            leaked.append("fds " + ", ".join(f"{fd}->{_describe(fd)}" for fd in sorted(extra_fds)))
        extra_threads = _threads() - threads
        if extra_threads:
            leaked.append("threads " + ", ".join(t.name for t in extra_threads))
        extra_children = _children() - children
        if extra_children:
            leaked.append(f"child processes {sorted(extra_children)}")
        pytest.fail("test leaked " + "; ".join(leaked), pytrace=False)


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
