"""FileChannel: files, pipes, character devices.  QEMU: ``io/channel-file.c``.

Regular files and block devices cannot be waited on (epoll refuses them with EPERM, and they are
always "ready"), so they never park: the channel keeps its own position and does positional
``os.preadv``/``os.pwritev``, which release the GIL while the kernel copies.  Concurrent users
should call ``preadv``/``pwritev`` with explicit offsets; the implicit position is one shared
number.  Pipes, FIFOs and character devices are put in non-blocking mode and parked on.

An ``O_APPEND`` file is the exception to positional writes: Linux appends a ``pwritev`` there
whatever its offset (pwrite(2), BUGS), so the channel's position would be wrong from the first
write.  Its writes are plain ``writev`` (the kernel appends atomically, as a log wants), and the
position is read back from the fd after each; ``pwritev`` with an offset is refused
(NotSupportedError) rather than writing somewhere else.  ``open(path, "a")`` starts at the end,
as Python's ``open(path, "a").tell()`` does.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Sequence

from ._buffers import Buffer, views
from .channel import Channel, Feature, IOCondition
from .errors import NotSupportedError, from_os_error

_MODES = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "r+": os.O_RDWR,
    "rw": os.O_RDWR | os.O_CREAT,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
}


class FileChannel(Channel):
    """A channel over a file descriptor.  Regular files are SEEKABLE and never park."""

    kind = "file"

    def __init__(self, fd: int, *, name: str | None = None) -> None:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise from_os_error(exc, name or f"file-fd{fd}", "fstat") from exc
        self._positional = stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
        super().__init__(name=name, features=Feature.SEEKABLE if self._positional else 0)
        self._fd = fd
        self._append = False
        if self._positional:
            self._append = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
            self._pos = os.lseek(fd, 0, os.SEEK_CUR)
        else:
            self._pos = 0
            os.set_blocking(fd, False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], flags: int | str = os.O_RDONLY, mode: int = 0o666,
             *, name: str | None = None) -> FileChannel:
        """Open ``path`` with os-level ``flags`` (or "r", "w", "a", "r+", "rw", "w+").

        Raises BrokenChannelError naming the path if it cannot be opened.
        QEMU: ``qio_channel_file_new_path()``.
        """
        if isinstance(flags, str):
            try:
                flags = _MODES[flags]
            except KeyError:
                raise ValueError(f"unknown file mode {flags!r}") from None
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise from_os_error(exc, os.fspath(path), "open") from exc
        try:
            if flags & os.O_APPEND:
                os.lseek(fd, 0, os.SEEK_END)  # where the writes go, as Python's open(path, "a")
            return cls(fd, name=name or f"file-{os.fspath(path)}")
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, *, name: str | None = None) -> FileChannel:
        """Wrap ``fd``; the channel owns it.  QEMU: ``qio_channel_file_new_fd()``."""
        return cls(fd, name=name)

    @classmethod
    def pipe(cls, *, name: str | None = None) -> tuple[FileChannel, FileChannel]:
        """A pipe as ``(read_end, write_end)``."""
        base = name or "pipe"
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            raise from_os_error(exc, base, "pipe") from exc
        return cls(r, name=f"{base}-r"), cls(w, name=f"{base}-w")

    def fileno(self) -> int:
        return self._fd

    @property
    def position(self) -> int:
        return self._pos

    # -- positional I/O (regular files) ----------------------------------------------------------

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Read at ``offset`` without moving the position; never parks.  Needs SEEKABLE."""
        self._need_positional()
        self._enter()
        try:
            return os.preadv(self._fd, views(buffers), offset)
        except OSError as exc:
            raise self._broken(exc, f"read at {offset}") from exc
        finally:
            self._leave()

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Write at ``offset`` without moving the position; never parks.  Needs SEEKABLE, and
        a file not opened for appending (NotSupportedError: Linux would append instead)."""
        self._need_positional()
        if self._append:
            raise NotSupportedError(f"{self.name}: positional writes to a file opened for appending "
                                    f"would append (write() appends)")
        self._enter()
        try:
            return os.pwritev(self._fd, views(buffers), offset)
        except OSError as exc:
            raise self._broken(exc, f"write at {offset}") from exc
        finally:
            self._leave()

    def _need_positional(self) -> None:
        if not self._positional:
            raise NotSupportedError(f"{self.name}: positional I/O needs a regular file")

    # -- hooks -----------------------------------------------------------------------------------

    def _io_fd(self, cond: IOCondition) -> int | None:
        return None if self._positional else self._fd

    def _io_readinto(self, buf: memoryview, flags: int) -> int:
        if self._positional:
            n = os.preadv(self._fd, [buf], self._pos)
            self._pos += n
            return n
        return os.readv(self._fd, [buf])

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        if self._positional:
            n = os.preadv(self._fd, buffers, self._pos)
            self._pos += n
            return n, []
        return os.readv(self._fd, buffers), []

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        if self._append:  # O_APPEND: the kernel writes at the end (module docstring)
            n = os.writev(self._fd, buffers)
            self._pos = os.lseek(self._fd, 0, os.SEEK_CUR)
            return n
        if self._positional:
            n = os.pwritev(self._fd, buffers, self._pos)
            self._pos += n
            return n
        return os.writev(self._fd, buffers)

    def _io_write(self, buf: memoryview) -> int:
        return self._io_writev([buf], (), 0)

    def _io_seek(self, offset: int, whence: int) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = os.fstat(self._fd).st_size + offset
        else:
            pos = os.lseek(self._fd, offset, whence)  # SEEK_DATA / SEEK_HOLE
        if pos < 0:
            raise ValueError(f"{self.name}: negative position {pos}")
        self._pos = pos
        return pos

    def _io_close(self) -> None:
        os.close(self._fd)


__all__ = ["FileChannel"]
