"""The storage behind NBD exports: a file (or block device) and sparse memory.

An :class:`Export` is what a connection serves; its methods may be called from any IOThread at
once. ``FileExport`` does positional I/O (``os.pread``/``os.pwritev``: the GIL is released while
the kernel copies), FLUSH is ``fdatasync`` in a worker thread (the hub keeps serving), TRIM and
WRITE_ZEROES punch holes with ``fallocate``, block status comes from ``SEEK_DATA``/``SEEK_HOLE``.
``MemoryExport`` is sparse RAM, as ``nbdkit memory``. Nothing here knows about channels or the
protocol's framing: failures are ``OSError`` or :class:`ExportError` carrying an NBD errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterable

import qioc_green
from qioc_green import ChannelError

from . import protocol as p

__all__ = ["Export", "ExportError", "FileExport", "MemoryExport", "nbd_errno", "parse_size"]

_HOLE_ZERO = p.StateFlag.HOLE | p.StateFlag.ZERO

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class ExportError(Exception):
    """A request failed in the backend; ``errno`` is the NBD error to answer with."""

    def __init__(self, nbd_errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = nbd_errno


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for an OS failure (the spec's short list; EIO for anything else)."""
    if isinstance(exc, ChannelError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return p.Errno.ENOSPC
    if code in (errno.EPERM, errno.EACCES, errno.EROFS):
        return p.Errno.EPERM
    if code == errno.ENOMEM:
        return p.Errno.ENOMEM
    if code in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return p.Errno.ENOTSUP
    return p.Errno.EIO


def parse_size(text: str) -> int:
    """``"256M"``, ``"1G"``, ``"4096"``: a size in bytes (binary suffixes K, M, G, T)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for i, suffix in enumerate("KMGT", 1):
        if text.endswith(suffix):
            scale = 1024 ** i
            text = text[:-1]
            break
    size = int(text) * scale
    if size < 0:
        raise ValueError(f"negative size {size}")
    return size


class Export:
    """What a connection serves. Methods may be called from any IOThread at once; none parks
    except ``flush`` (and ``write`` with ``fua``), which park the calling greenlet only."""

    def __init__(self, name: str, size: int, *, readonly: bool = False, description: str = "") -> None:
        self.name = name
        self.size = size
        self.readonly = readonly
        self.description = description

    @property
    def flags(self) -> int:
        tf = p.TransmissionFlag
        flags = tf.HAS_FLAGS | tf.SEND_FLUSH | tf.SEND_FUA | tf.CAN_MULTI_CONN | tf.SEND_CACHE | tf.SEND_DF
        if self.readonly:
            flags |= tf.READ_ONLY
        else:
            flags |= tf.SEND_TRIM | tf.SEND_WRITE_ZEROES | tf.SEND_FAST_ZERO
        return int(flags)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        raise NotImplementedError

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int) -> None:
        pass

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        raise NotImplementedError

    def cache(self, offset: int, length: int) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` of base:allocation from ``offset``, covering at most ``length``."""
        return [(length, 0)]

    def close(self) -> None:
        pass


def _sync_in_thread(fd: int) -> None:
    """fdatasync without stalling the hub: a worker thread does it, the caller's greenlet parks."""
    qioc_green.run_in_thread(os.fdatasync, fd, name="nbd-fdatasync").result()


class FileExport(Export):
    """A regular file (or block device): positional I/O, fdatasync, holes by SEEK_DATA/SEEK_HOLE.
    No description unless given: the server's path is not told to clients (as qemu-nbd without -D)."""

    def __init__(self, name: str, path: str, *, readonly: bool = False, description: str = "") -> None:
        self.path = path
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        super().__init__(name, size, readonly=readonly, description=description)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        # os.pread allocates without zeroing and releases the GIL while the kernel copies.
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # the file shrank under us, or a short read: keep going
            buf = bytearray(data)
            while len(buf) < length:
                more = os.pread(self.fd, length - len(buf), offset + len(buf))
                if not more:
                    buf += bytes(length - len(buf))
                    break
                buf += more
            return buf
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwritev(self.fd, [view], offset)
            view = view[n:]
            offset += n

    def flush(self) -> None:
        _sync_in_thread(self.fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))

    def trim(self, offset: int, length: int) -> None:
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)  # advisory

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        if may_trim and self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if fast:
            raise ExportError(p.Errno.ENOTSUP, "no fast way to zero this range")
        zeroes = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.write(offset, memoryview(zeroes)[:n])
            offset += n

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < 1024:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: a hole to the end
                    data = end
                elif exc.errno == errno.EINVAL:  # the filesystem cannot tell: all data
                    out.append((end - pos, 0))
                    break
                else:
                    raise
            if data > pos:
                n = min(data, end) - pos
                out.append((n, _HOLE_ZERO))
                pos += n
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            out.append((n, 0))
            pos += n
        return out

    def close(self) -> None:
        os.close(self.fd)


class MemoryExport(Export):
    """RAM, sparse: 64 KiB pages made on first write; unwritten pages read as zeroes and are
    reported as holes (as ``nbdkit memory``). A lock guards the page table for copies."""

    PAGE = 64 * 1024

    def __init__(self, name: str, size: int, *, description: str = "") -> None:
        super().__init__(name, size, description=description or f"{size} bytes of memory")
        self._pages: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def _spans(self, offset: int, length: int) -> Iterable[tuple[int, int, int, int]]:
        """(page index, offset in page, bytes, position in the request)."""
        page = self.PAGE
        pos = 0
        while pos < length:
            idx, off = divmod(offset + pos, page)
            n = min(page - off, length - pos)
            yield idx, off, n, pos
            pos += n

    def read(self, offset: int, length: int) -> bytes | bytearray:
        out = bytearray(length)
        with self._lock:
            for idx, off, n, pos in self._spans(offset, length):
                pg = self._pages.get(idx)
                if pg is not None:
                    out[pos:pos + n] = pg[off:off + n]
        return out

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        with self._lock:
            for idx, off, n, pos in self._spans(offset, len(view)):
                pg = self._pages.get(idx)
                if pg is None:
                    if not any(view[pos:pos + n]):
                        continue  # zeroes onto a hole stay a hole
                    pg = self._pages[idx] = bytearray(self.PAGE)
                pg[off:off + n] = view[pos:pos + n]

    def _drop(self, offset: int, length: int) -> None:
        with self._lock:
            for idx, off, n, _pos in self._spans(offset, length):
                pg = self._pages.get(idx)
                if pg is None:
                    continue
                if n == self.PAGE:
                    del self._pages[idx]
                else:
                    pg[off:off + n] = bytes(n)

    def trim(self, offset: int, length: int) -> None:
        self._drop(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        self._drop(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        with self._lock:
            for idx, _off, n, _pos in self._spans(offset, length):
                flags = 0 if idx in self._pages else _HOLE_ZERO
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + n, flags)
                else:
                    if len(out) >= 1024:
                        break
                    out.append((n, flags))
        return out

