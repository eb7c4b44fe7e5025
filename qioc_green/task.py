"""QIOTask: blocking work (DNS, a slow syscall) in a worker thread, its outcome as a Future.

The worker is a plain short-lived OS thread (an unpatched one, whatever gevent's monkey did): it
runs the function and ends.  The Future can be waited from any greenlet (it parks on its own hub)
or thread, and cancelled only before the worker starts the function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _hub
from ._context import Future, run_into


def run_in_thread(fn: Callable[..., Any], *args: Any, name: str = "qioc-task", **kwargs: Any) -> Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a new worker thread; return its Future.  Never blocks.

    QEMU: ``qio_task_run_in_thread()``.
    """
    fut: Future[Any] = Future()
    _hub.OSThread(lambda: run_into(fut, fn, args, kwargs, in_thread=True), name).start()
    return fut


Task = run_in_thread


__all__ = ["Task", "run_in_thread"]
