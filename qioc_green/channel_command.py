"""CommandChannel: a child process's stdout and stdin as the two directions.

QEMU: ``io/channel-command.c``.  Reads come from the child's stdout, writes go to its stdin;
each pipe is non-blocking and parked on like any fd.  ``shutdown(Shutdown.WRITE)`` closes the
child's stdin so it sees EOF (the usual way to tell ``cat`` you are done).

Reaping: ``close()`` closes both pipes, then waits for the child to exit, on a pidfd watched by
the caller's own hub (so it parks a greenlet, never the whole thread), ``grace`` seconds at a
time: then SIGTERM, then SIGKILL, as QEMU does.  ``returncode`` is the exit status afterwards
(negative: killed by that signal).  A close that runs inside a hub callback cannot wait, so it
hands the reaping to a greenlet of that hub.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

from . import _hub
from ._context import current_context
from .channel import Channel, Feature, IOCondition, Shutdown
from .errors import ChannelBusyError, NotSupportedError, from_os_error


class CommandChannel(Channel):
    """A channel to a child process.  ``spawn(argv, mode)`` starts it."""

    kind = "command"

    def __init__(self, proc: subprocess.Popen[bytes], *, name: str | None = None, grace: float = 2.0) -> None:
        super().__init__(name=name, features=Feature.SHUTDOWN)
        self._proc = proc
        self._rfd = proc.stdout.fileno() if proc.stdout is not None else None
        self._wfd = proc.stdin.fileno() if proc.stdin is not None else None
        for fd in (self._rfd, self._wfd):
            if fd is not None:
                os.set_blocking(fd, False)
        self._grace = grace

    @classmethod
    def spawn(cls, argv: Sequence[str], mode: str = "rw", *, name: str | None = None, stderr: Any = None,
              env: dict[str, str] | None = None, cwd: str | None = None, grace: float = 2.0) -> CommandChannel:
        """Start ``argv`` with its stdout readable ("r"), stdin writable ("w"), or both ("rw").

        Never switches.  ``stderr`` is passed to subprocess (None: inherited).
        QEMU: ``qio_channel_command_new_spawn()``.
        """
        if mode not in ("r", "w", "rw"):
            raise ValueError(f"mode must be 'r', 'w' or 'rw', not {mode!r}")
        try:
            proc = _hub.PlainPopen(  # the unpatched Popen, even under gevent's monkey patching
                list(argv),
                stdin=subprocess.PIPE if "w" in mode else subprocess.DEVNULL,
                stdout=subprocess.PIPE if "r" in mode else subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                cwd=cwd,
                close_fds=True,
            )
        except OSError as exc:  # no such program, not executable, no cwd
            raise from_os_error(exc, name or f"command-{os.path.basename(argv[0])}", f"start {argv[0]}") from exc
        return cls(proc, name=name or f"command-{os.path.basename(argv[0])}-{proc.pid}", grace=grace)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The child's exit status once reaped (negative: killed by that signal), else None."""
        return self._proc.returncode

    exit_status = returncode

    # -- hooks -----------------------------------------------------------------------------------

    def _io_fd(self, cond: IOCondition) -> int | None:
        fd = self._rfd if cond is IOCondition.IN else self._wfd
        if fd is None:
            raise NotSupportedError(f"{self.name}: that direction is not open")
        return fd

    def _io_readinto(self, buf: memoryview, flags: int) -> int:
        return self._io_readv([buf], 0, flags)[0]

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        if self._rfd is None:
            if self._proc.stdout is not None:
                return 0, []  # shut down for reading: EOF
            raise NotSupportedError(f"{self.name}: not open for reading")
        return os.readv(self._rfd, buffers), []

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        if self._wfd is None:
            if self._proc.stdin is None:  # spawned without a stdin ("r"): nothing was ever open
                raise NotSupportedError(f"{self.name}: not open for writing")
            raise BrokenPipeError(32, "write side is shut down")
        return os.writev(self._wfd, buffers)

    def _io_shutdown(self, how: Shutdown) -> None:
        # A pipe end can only be closed.  Closing its fd while a watcher or a syscall might
        # still use the number would let the kernel reuse it, so /dev/null is put in its place
        # with dup2(): the pipe end is released (the child sees EOF) and the number stays ours
        # until _io_close.  Refused while a greenlet is parked on that end.
        if how & Shutdown.WRITE and self._wfd is not None:
            if self._wr.slot:
                raise ChannelBusyError(f"{self.name}: cannot shut down writing while a greenlet writes")
            fd, self._wfd = self._wfd, None
            _release_pipe_end(fd)
        if how & Shutdown.READ and self._rfd is not None:
            if self._rd.slot:
                raise ChannelBusyError(f"{self.name}: cannot shut down reading while a greenlet reads")
            fd, self._rfd = self._rfd, None
            _release_pipe_end(fd)

    def _io_close(self) -> None:
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()
        self._rfd = self._wfd = None

    # -- the child ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close both pipes and reap the child: wait ``grace`` s, SIGTERM, wait, SIGKILL.

        Unlike the base class this may park the caller while the child exits.
        """
        super().close()
        if self._proc.returncode is not None:
            return
        if _hub.in_hub():
            current_context().spawn(self._reap)
            return
        self._reap()

    def _reap(self) -> None:
        proc = self._proc
        try:
            for action in (None, proc.terminate, proc.kill):
                if action is not None and proc.poll() is None:
                    try:
                        action()
                    except ProcessLookupError:
                        pass
                if self.wait_exit(self._grace if action is not proc.kill else None):
                    return
        except BaseException:
            # Interrupted while parked (a timeout, a kill, a stopping context): never leave the
            # child running.  SIGKILL is immediate, so the blocking wait is short.
            if proc.poll() is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
                proc.wait()
            raise

    def wait_exit(self, timeout: float | None = None) -> bool:
        """Park until the child exits (reaping it); False if still running after ``timeout``."""
        proc = self._proc
        if proc.poll() is not None:
            return True
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):
            try:
                proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        try:
            try:
                _hub.wait_fd(_hub.Waiter(current_context()), pidfd, _hub.READ, timeout)
            except TimeoutError:
                return proc.poll() is not None
            proc.wait()
            return True
        finally:
            os.close(pidfd)


def _release_pipe_end(fd: int) -> None:
    # /dev/null over the number: the pipe end is released, the number stays ours.
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


__all__ = ["CommandChannel"]
