"""QIOTask: blocking work (DNS, a slow syscall) in a worker thread, its outcome as a Future.

The worker is a plain short-lived thread: it runs the function and ends.  The Future can be
waited from any greenlet (it parks on its own hub) or thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .future import Future, run_into


def run_in_thread(fn: Callable[..., Any], *args: Any, name: str = "qioc-task", **kwargs: Any) -> Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a new worker thread; return its Future.  Never blocks.

    QEMU: ``qio_task_run_in_thread()``.
    """
    fut: Future[Any] = Future()
    t = threading.Thread(target=run_into, args=(fut, fn, args, kwargs), name=name, daemon=True)
    t.start()
    return fut


Task = run_in_thread
