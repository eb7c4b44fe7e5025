"""The commands of ``exec:`` sources and destinations: how they end, and what their end says.

QEMU runs ``exec:`` through ``/bin/sh -c`` and, when the migration stops, signals that child
(SIGTERM, then SIGKILL). A shell running ``cat x; exit 3`` or a pipeline is the child, and the
commands it started are its children: signalling the shell alone leaves them running, still
holding our stderr, so a caller reading that pipe waits for them. So the whole tree is
signalled: the child and its descendants as they are at that moment (found through /proc by
psutil; they stay in our process group, so a command that needs the terminal still works).
The child is reaped; descendants the shell left behind are re-parented and reaped by init.

A child that exits with a non-zero status, or is killed by a signal we did not send, failed:
the migration fails, naming the command.
"""

from __future__ import annotations

import contextlib
import signal
import time

import gevent
import psutil

from qioc_green import CommandChannel

GRACE = 2.0  # s between SIGTERM and SIGKILL, as CommandChannel.close() waits
EXIT_WAIT = 10.0  # s a command may take to exit once its output has ended


def _tree(pid: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> list[psutil.Process]:
    """Signal each process still running; return those."""
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.send_signal(sig)
                alive.append(p)
    return alive


def terminate(ch: CommandChannel) -> None:
    """SIGTERM to the command and its descendants, now. Never parks."""
    if ch.returncode is None:
        _signal_all(_tree(ch.pid), signal.SIGTERM)


def end_command(ch: CommandChannel, grace: float = GRACE) -> None:
    """End the command behind ``ch`` and everything it started: SIGTERM to the tree, ``grace``
    seconds, SIGKILL to what is left; reap the child; close the channel. May park (the child's
    exit is waited for on the caller's hub); interrupted while parked, it still kills the tree
    and closes. Never raises for a child already gone."""
    procs = _tree(ch.pid) if ch.returncode is None else []
    try:
        if procs and not ch.wait_exit(0):
            deadline = time.monotonic() + grace
            alive = _signal_all(procs, signal.SIGTERM)
            ch.wait_exit(grace)
            while alive and time.monotonic() < deadline:
                alive = [p for p in alive if _running(p)]
                if alive:
                    gevent.sleep(0.02)  # bounded by the grace: descendants have no fd to wait on
    finally:  # whatever is still running gets SIGKILL; close() reaps the child
        _signal_all(procs, signal.SIGKILL)
        ch.close()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def failure(ch: CommandChannel, what: str) -> str | None:
    """Why the (reaped) command failed, or None: ``exec:CMD exited with status 3``."""
    rc = ch.returncode
    if rc is None or rc == 0:
        return None
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"{what} was killed by {name}"
    return f"{what} exited with status {rc}"
