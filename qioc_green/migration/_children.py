"""The commands of ``exec:`` sources and destinations: how they end, and what their end says.

QEMU runs ``exec:`` through ``/bin/sh -c`` and, when the migration stops, signals that child
(SIGTERM, then SIGKILL). A shell running ``cat x; exit 3`` or a pipeline is the child, and the
commands it started are its children: signalling the shell alone leaves them running, still
holding our stderr, so a caller reading that pipe waits for them. So the whole tree is
signalled: the child and its descendants as they are at that moment (found through /proc;
they stay in our process group, so a command that needs the terminal still works). A process is
known by its pid and its start time (field 22 of ``/proc/PID/stat``), so a pid reused after
it exited is never signalled.
The child is reaped; descendants the shell left behind are re-parented and reaped by init.

A child that exits with a non-zero status, or is killed by a signal we did not send, failed:
the migration fails, naming the command.
"""

from __future__ import annotations

import os
import signal
import time

import gevent

from qioc_green import CommandChannel

GRACE = 2.0  # s between SIGTERM and SIGKILL, as CommandChannel.close() waits
EXIT_WAIT = 10.0  # s a command may take to exit once its output has ended

_Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _tree(pid: int) -> list[_Proc]:
    """The process and its descendants, as they are now."""
    top = _stat(pid)
    if top is None:
        return []
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[1], []).append(int(entry))
                starts[int(entry)] = st[2]
    procs = [(pid, top[2])]
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            if child in starts:
                procs.append((child, starts[child]))
                todo.append(child)
    return procs


def _running(proc: _Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[2] == proc[1] and st[0] not in ("Z", "X")


def _signal_all(procs: list[_Proc], sig: int) -> list[_Proc]:
    """Signal each process still running (the same process, not a reused pid); return those."""
    alive = []
    for proc in procs:
        if _running(proc):
            try:
                os.kill(proc[0], sig)
            except ProcessLookupError:
                continue
            alive.append(proc)
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
