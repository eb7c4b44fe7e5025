"""``qioc-nbd-copy``: copy between an NBD export and a file (either way, or NBD to NBD),
skipping holes.

    qioc-nbd-copy nbd+unix:///disk?socket=/tmp/nbd.sock disk-copy.img
    qioc-nbd-copy disk.img nbd://127.0.0.1:10809/disk --connections 4 --iothreads 2
    qioc-nbd-copy nbd://127.0.0.1/disk null:          # read everything, keep nothing

SRC and DST are NBD URIs (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``,
``nbds://`` with TLS) or file paths; DST may be ``null:``. The source's holes (block status for
NBD, SEEK_HOLE for files) are not read: a file destination is created sparse, an NBD destination
gets WRITE_ZEROES there. ``--requests`` requests are in flight at once, made by greenlets spread
over ``--iothreads`` IOThreads; each NBD side opens ``--connections`` connections (when the server
allows multi-conn), their reply readers spread over the same threads. A progress line is shown
when stderr is a terminal. With ``nbds://HOST`` the server's certificate must chain to
``--tls-ca`` (default: the system's CAs) and name HOST. Exit status: 0 copied, 1 failed (one
line naming the side), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import errno
import os
import ssl
import stat
import sys
import threading
import time
from typing import Any

import qioc_green

from ._client import Client
from ._constants import StateFlag

PROG = "qioc-nbd-copy"

ZERO = int(StateFlag.ZERO)


class CopyError(Exception):
    """A copy that failed: one line naming the side (its URI or path) and why."""


def _reason(exc: BaseException) -> str:
    """``exc`` without the file name or errno a side's name already says."""
    if isinstance(exc, OSError) and not isinstance(exc, qioc_green.ChannelError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _side(name: str, what: str, exc: BaseException) -> CopyError:
    return CopyError(f"{name}: {what}{_reason(exc)}")


def is_uri(text: str) -> bool:
    return text.split(":", 1)[0] in ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp")


class Endpoint:
    size = 0
    name = ""
    zeroed = True  # does a hole in the source need writing? (False: already reads as zero)

    def extents(self) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) covering the whole source."""
        return [(0, self.size, False)]

    def read_into(self, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    def write(self, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class NBDEndpoint(Endpoint):
    def __init__(self, uri: str, args: argparse.Namespace, contexts: list[qioc_green.Context]) -> None:
        self.name = uri
        self.client = Client(uri, connections=args.connections, contexts=contexts,
                             tls_context=tls_context(args, uri) if uri.startswith("nbds") else None)
        self.size = self.client.size
        self.zeroed = False

    def extents(self) -> list[tuple[int, int, bool]]:
        return [(o, n, bool(f & ZERO)) for o, n, f in self.client.map()]

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.client.pread_into(buf, offset)

    def write(self, buf: memoryview, offset: int) -> None:
        self.client.pwrite(buf, offset)

    def zero(self, offset: int, length: int) -> None:
        if self.client.can_zero:
            self.client.zero(length, offset)
        else:
            chunk = bytes(min(length, 1 << 20))
            for pos in range(0, length, len(chunk)):
                self.client.pwrite(chunk[:min(len(chunk), length - pos)], offset + pos)

    def flush(self) -> None:
        if self.client.can_flush:
            self.client.flush()

    def close(self) -> None:
        self.client.close()


class FileEndpoint(Endpoint):
    def __init__(self, path: str, *, write: bool, size: int = 0) -> None:
        self.name = path
        if not write:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            return
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = size
        if stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.ftruncate(self.fd, 0)  # a fresh, sparse file: holes already read as zero
            os.ftruncate(self.fd, size)
        else:
            self.zeroed = False

    def extents(self) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    data = self.size
                else:
                    return [(0, self.size, False)]
            if data > pos:
                out.append((pos, min(data, self.size) - pos, True))
                pos = data
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), self.size)
            out.append((pos, hole - pos, False))
            pos = hole
        return out

    def read_into(self, buf: memoryview, offset: int) -> None:
        while buf:
            n = os.preadv(self.fd, [buf], offset)
            if not n:
                raise EOFError(f"{self.name}: file ended at {offset}")
            buf = buf[n:]
            offset += n

    def write(self, buf: memoryview, offset: int) -> None:
        while buf:
            n = os.pwritev(self.fd, [buf], offset)
            buf = buf[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        for pos in range(0, length, len(chunk)):
            self.write(memoryview(chunk)[:min(len(chunk), length - pos)], offset + pos)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class NullEndpoint(Endpoint):
    name = "null:"

    def write(self, buf: memoryview, offset: int) -> None:
        pass


def load_tls_file(option: str, load: Any, *paths: str) -> None:
    """``load(*paths)`` (an SSLContext's loader), a failure a ValueError naming the option and
    its file: ``ssl`` names neither (``[Errno 2] No such file or directory``)."""
    try:
        load(*paths)
    except (OSError, ssl.SSLError) as exc:
        if isinstance(exc, ssl.SSLError):  # its text, e.g. "[SSL] PEM lib (_ssl.c:3905)"
            why = f"not a usable PEM file ({exc.reason or exc.args[-1]})"
        else:
            why = exc.strerror or str(exc)
        raise ValueError(f"{option} {' '.join(paths)}: {why}") from None


def tls_context(args: argparse.Namespace, uri: str) -> ssl.SSLContext:
    """The client side of ``nbds://`` (the certificate must name the URI's host, as libnbd and
    QEMU check) or ``nbds+unix://`` (no host to check: the CA alone vouches for the server)."""
    ctx = ssl.create_default_context()
    if args.tls_ca:
        load_tls_file("--tls-ca", ctx.load_verify_locations, args.tls_ca)
    ctx.check_hostname = not uri.startswith("nbds+unix:")
    if args.tls_cert:
        load_tls_file("--tls-cert/--tls-key", ctx.load_cert_chain, args.tls_cert,
                      args.tls_key or args.tls_cert)
    return ctx


class Work:
    """The chunks to copy, handed out to workers of every thread (a lock never held across a park)."""

    def __init__(self, extents: list[tuple[int, int, bool]], chunk: int) -> None:
        self.items: list[tuple[int, int, bool]] = []
        for off, length, zero in extents:
            step = 1 << 30 if zero else chunk
            for pos in range(0, length, step):
                self.items.append((off + pos, min(step, length - pos), zero))
        self._next = 0
        self._lock = threading.Lock()
        self.done_bytes = 0
        self.error: BaseException | None = None

    def take(self) -> tuple[int, int, bool] | None:
        with self._lock:
            if self.error is not None or self._next >= len(self.items):
                return None
            item = self.items[self._next]
            self._next += 1
            return item

    def finished(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n


def worker(src: Endpoint, dst: Endpoint, work: Work, chunk: int) -> None:
    buf = memoryview(bytearray(chunk))
    side, what = dst, ""
    try:
        while (item := work.take()) is not None:
            offset, length, zero = item
            if zero:
                side, what = dst, f"zeroing {length} bytes at {offset}: "
                if not dst.zeroed:
                    dst.zero(offset, length)
            else:
                view = buf[:length]
                side, what = src, f"reading {length} bytes at {offset}: "
                src.read_into(view, offset)
                side, what = dst, f"writing {length} bytes at {offset}: "
                dst.write(view, offset)
            work.finished(length)
    except (OSError, ValueError, EOFError, qioc_green.ChannelError) as exc:
        err = _side(side.name, what, exc)
        work.error = work.error or err
        raise err from exc
    except BaseException as exc:
        work.error = work.error or exc
        raise


def _progress(work: Work, total: int, start: float, final: bool = False) -> None:
    done = work.done_bytes
    pct = 100.0 * done / total if total else 100.0
    rate = done / max(time.monotonic() - start, 1e-6) / 1e6
    sys.stderr.write(f"\r{pct:5.1f}% {done >> 20} of {total >> 20} MiB, {rate:.0f} MB/s")
    if final:
        sys.stderr.write("\n")
    sys.stderr.flush()


def copy(args: argparse.Namespace) -> dict[str, Any]:
    qioc_green.main_context()
    pool = qioc_green.IOThreadPool(args.iothreads, name="copy-iothread")
    contexts = pool.contexts
    src: Endpoint | None = None
    dst: Endpoint | None = None
    try:
        try:
            src = NBDEndpoint(args.src, args, contexts) if is_uri(args.src) \
                else FileEndpoint(args.src, write=False)
        except (OSError, ValueError, EOFError, qioc_green.ChannelError) as exc:
            raise _side(args.src, "", exc) from exc
        try:
            if args.dst == "null:":
                dst = NullEndpoint()
            elif is_uri(args.dst):
                dst = NBDEndpoint(args.dst, args, contexts)
            else:
                dst = FileEndpoint(args.dst, write=True, size=src.size)
        except (OSError, ValueError, EOFError, qioc_green.ChannelError) as exc:
            raise _side(args.dst, "", exc) from exc
        if isinstance(dst, NBDEndpoint):
            if dst.client.read_only:
                raise CopyError(f"{args.dst}: the export is read-only")
            if dst.size < src.size:
                raise CopyError(f"{args.dst}: {dst.size} bytes, smaller than the source's "
                                f"{src.size}")
        start = time.monotonic()
        work = Work(src.extents(), args.request_size)
        futs = [contexts[i % len(contexts)].spawn(worker, src, dst, work, args.request_size)
                for i in range(args.requests)]
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        for fut in futs:
            while True:
                try:
                    fut.result(0.5)
                    break
                except TimeoutError:
                    if show:
                        _progress(work, src.size, start)
        if args.flush or isinstance(dst, NBDEndpoint):
            dst.flush()
        elapsed = time.monotonic() - start
        if show:
            _progress(work, src.size, start, final=True)
        data = sum(n for _, n, z in work.items if not z)
        return {"bytes": src.size, "data_bytes": data, "seconds": elapsed}
    finally:
        for end in (src, dst):
            if end is not None:
                try:
                    end.close()
                except Exception:  # noqa: BLE001 - closing after a failure
                    pass
        pool.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.replace("``", ""),  # no reST in --help
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="NBD URI or file")
    ap.add_argument("dst", help="NBD URI, file, or null:")
    ap.add_argument("--connections", "-C", type=int, default=1, metavar="N",
                    help="connections per NBD side, if the server allows multi-conn (1)")
    ap.add_argument("--requests", "-R", type=int, default=8, metavar="M", help="requests in flight (8)")
    ap.add_argument("--iothreads", "-T", type=int, default=1, metavar="K", help="IOThreads (1)")
    ap.add_argument("--request-size", type=int, default=256 << 10, metavar="BYTES",
                    help="bytes per request (256 KiB; larger was slower here: cache misses)")
    ap.add_argument("--flush", action="store_true", help="fdatasync a file destination at the end")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="show a progress line (default: when stderr is a terminal)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--tls-ca", metavar="PEM", help="CA for nbds:// servers")
    ap.add_argument("--tls-cert", metavar="PEM", help="client certificate for nbds://")
    ap.add_argument("--tls-key", metavar="PEM", help="client key for nbds://")
    args = ap.parse_args(argv)
    if min(args.connections, args.requests, args.iothreads) < 1:
        ap.error("--connections, --requests and --iothreads must be at least 1")
    if not 512 <= args.request_size <= 32 << 20:
        ap.error("--request-size must be between 512 and 32 MiB")
    if not is_uri(args.src) and not is_uri(args.dst):
        ap.error("one of SRC and DST must be an NBD URI")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = copy(args)
    except (CopyError, OSError, ValueError, EOFError, qioc_green.ChannelError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(result))
    return 0
