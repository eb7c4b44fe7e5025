"""What a migration leaves behind outside its stream: the summary as a file (``--json``), and
this process's peak memory, which the summary reports (the bound the modules promise).

Kept apart from ``_summary``, which is sans-IO.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: since its exec, unlike
    getrusage's ru_maxrss, which keeps the high-water mark of the process it was forked from)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_json(path: str, d: dict[str, Any]) -> None:
    """``d`` as JSON to ``path`` (whole or not at all: a temporary file renamed), or stdout for
    ``-``. Raises OSError."""
    text = json.dumps(d, indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk leaves no half summary behind
        raise
