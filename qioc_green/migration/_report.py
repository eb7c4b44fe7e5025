"""What a migration leaves behind outside its stream: the summary as a file (``--json``) and
as the command's line, its error on stderr, and this process's peak memory, which the summary
reports (the bound the modules promise).

Kept apart from ``_summary``, which is sans-IO.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from ._receiver import Outcome

PROG = "qioc-migration-receiver"


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


def error(msg: str) -> int:
    """Say ``msg`` on stderr; 1, the exit status of a run that failed."""
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
    return 1


def report(n: int, out: Outcome, args: argparse.Namespace) -> None:
    d = out.summary
    label = f"migration {n}: " if args.keep_listening else ""
    if out.error is not None:
        error(f"{label}{out.error}")
    if not args.quiet:
        state = "complete" if d["complete"] else "INCOMPLETE"
        rate = d["bytes_total"] / max(d["elapsed_s"] or 0, 1e-9) / 1e6
        mfd = d.get("multifd")
        channels = f", {mfd['channels']} multifd channels" if mfd else ""
        print(f"{label}{state}: {d['bytes_total']} bytes in {d['elapsed_s']:.3f} s "
              f"({rate:.0f} MB/s), machine {d['machine'] or 'unknown'}, {len(d['sections'])} sections, "
              f"{len(d['ram_blocks'])} RAM blocks, {len(d['devices'])} devices{channels}",
              flush=True)


def finish(n: int, out: Outcome, args: argparse.Namespace,
            name: Callable[[str | None], str | None]) -> bool:
    """Write the summary and report; the verdict (False too if the summary asked for is lost)."""
    json_path = name(args.json)
    written = True
    if json_path is not None:
        try:
            write_json(json_path, out.summary)
        except OSError as exc:
            label = f"migration {n}: " if args.keep_listening else ""
            error(f"{label}cannot write the summary to {json_path}: {exc.strerror or exc}")
            written = False
    report(n, out, args)
    return out.ok and written
