"""Where the receiver puts what it parsed: RAM blocks rebuilt as files, and the forwarder.

Forwarding, the two greenlets and their buffers
-----------------------------------------------
A writer greenlet in another IOThread writes to the destination. Reader and writer share a
fixed pool of receive buffers (``buffers`` x ``chunk`` bytes) through two cross-thread
``qioc_green.Queue``s: the reader takes a free buffer, fills it, parses it and passes it to the
writer; the writer sends it and gives it back. When the destination is slow the pool runs dry,
the reader stops reading, the kernel's socket buffers fill and the source is held back by TCP
itself: back-pressure, with memory bounded by the pool. A failure on either side is
``Queue.fail(exc)``: it wakes the other side, parked or not, with that exception.

A destination that stops taking data (accepts and never reads) would hold the relay for ever:
with ``idle_timeout`` the writer gives up once a write has made no progress for that long. An
``exec:`` destination must exit with status 0 once its input is closed; when the stream is
refused it is ended with its descendants (``_children``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
from collections.abc import Callable
from typing import Any

from qioc_green import (
    BrokenChannelError,
    Channel,
    CommandChannel,
    Context,
    Event,
    FileChannel,
    Future,
    Queue,
    Shutdown,
    TLSChannel,
)

from ._children import EXIT_WAIT, GRACE, end_command, failure, terminate
from ._events import RamBlocks, RamPages, ZeroPages
from ._uri import Endpoint, open_outgoing

CHUNK = 4 << 20  # receive buffer size: the parser runs at ~20-24 GB/s on 1-4 MiB chunks
BUFFERS = 8  # buffers shared with the forwarding writer: the memory bound of a relay
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)  # Linux; Python 3.10+ has the name
_ZEROS = bytes(1 << 20)


def preallocated(specs: list[str], ram_dir: str | None, *, one: bool) -> RamDir:
    """``--ram-prealloc``'s RamDir: ``BLOCK=SIZE`` items (SIZE in bytes, or with K, M, G or T:
    binary units, as QEMU's ``-m``) allocated and mapped in ``ram_dir``. ValueError for a bad
    item, no ``ram_dir``, or not ``one`` migration on a socket; OSError if it cannot be."""
    if not ram_dir or not one:
        raise ValueError("needs --ram-dir and one migration on a tcp: or unix: URI")
    sizes: dict[str, int] = {}
    for spec in specs:
        m = re.fullmatch(r"(.+)=([0-9]+)([KMGTkmgt]?)", spec)
        if m is None:
            raise ValueError(f"expected BLOCK=SIZE (pc.ram=1G), not {spec!r}")
        unit = "KMGT".find(m[3].upper()) + 1 if m[3] else 0
        sizes[m[1]] = int(m[2]) << (10 * unit)
    return RamDir(ram_dir, prealloc=sizes)


class RamDir:
    """Each RAM block rebuilt as a sparse file in ``path`` (zero pages stay holes).

    Files are named after the block (``pc.ram``; characters outside ``[A-Za-z0-9._@-]`` become
    ``_``, so ``/rom@etc/acpi/tables`` is ``rom@etc_acpi_tables``); ``blocks.json`` maps block
    names to files and sizes. A page sent again (dirtied during a live migration) is written
    again; a zero page over a range that already holds data is written as zeros (the kernel's
    SEEK_DATA says whether it does, so no per-page state is kept, whatever sizes the stream
    announces), so each file ends as the guest's final RAM. Writes never park (regular files).

    Disk used is bounded by what arrived: only page data is ever written where there was none
    (zero pages with another fill byte are refused by the parser, as QEMU 8.2+ refuses them),
    every write lies inside a block the stream declared, and files are sparse. ``keep``: the
    (device, inode) of the input, which is never truncated (an error instead).

    ``prealloc`` (``--ram-prealloc``): block name -> size, files allocated whole and mapped now,
    before any stream, as a QEMU destination's ``-mem-prealloc`` allocates guest RAM before
    the migration: then the pages are copied into the mapping (``mapping()``: a multifd channel
    receives them straight into it) and no page of the file is allocated while they come. The
    caller's sizes bound it (a stream declaring another size for such a block is refused); a
    preallocated block the stream never declares has its file removed at ``close()``.
    """

    def __init__(self, path: str, *, keep: tuple[int, int] | None = None,
                 prealloc: dict[str, int] | None = None) -> None:
        self.path = path
        self._keep = keep
        os.makedirs(path, exist_ok=True)
        self._files: dict[str, FileChannel] = {}
        self._index: dict[str, dict[str, Any]] = {}
        self._pre: dict[str, int] = {}  # preallocated block -> size
        self._declared: set[str] = set()
        self._mm: dict[str, mmap.mmap] = {}
        self._maps: dict[str, memoryview] = {}
        try:
            for name, size in (prealloc or {}).items():
                self._open(name, size, self._taken())
                fd = self._files[name].fileno()
                try:
                    if size:
                        os.posix_fallocate(fd, 0, size)
                        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | _MAP_POPULATE)
                        self._mm[name] = mm
                        self._maps[name] = memoryview(mm)
                except OSError as exc:
                    raise OSError(exc.errno, f"preallocating RAM block {name!r} of {size} "
                                             f"bytes: {exc.strerror}") from None
                self._pre[name] = size
        except BaseException:
            self._unmap()
            for name in list(self._files):
                self._files.pop(name).close()
                self._remove(name)
            raise

    @property
    def preallocated(self) -> bool:
        """True if any block was preallocated (and so is mapped)."""
        return bool(self._maps)

    def mapping(self, name: str) -> memoryview | None:
        """The mapped file of preallocated block ``name`` (declared by the stream), or None."""
        return self._maps.get(name) if name in self._declared else None

    def _taken(self) -> set[str]:
        return {v["file"] for v in self._index.values()}

    def _open(self, name: str, size: int, taken: set[str]) -> None:
        """Create (truncate) block ``name``'s sparse file of ``size`` bytes."""
        fname = re.sub(r"[^A-Za-z0-9._@-]", "_", name).strip("_.") or "block"
        while fname in taken or fname == "blocks.json":
            fname += "_"
        taken.add(fname)
        path = os.path.join(self.path, fname)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == self._keep:
            os.close(fd)
            raise OSError(errno.EEXIST, f"RAM block {name!r}: {path} is the input itself; "
                                        "not touching it")
        ch = FileChannel.from_fd(fd, name=f"ram-{name}")
        self._files[name] = ch
        self._index[name] = {"file": fname, "size": size}
        try:
            os.ftruncate(ch.fileno(), 0)
            os.ftruncate(ch.fileno(), size)
        except OSError as exc:
            raise OSError(exc.errno, f"RAM block {name!r} of {size} bytes: "
                                     f"{exc.strerror}") from None

    def blocks(self, ev: RamBlocks) -> None:
        """MEM_SIZE: create (truncate) one sparse file per block, and the index."""
        taken = self._taken()
        for b in ev.blocks:
            pre = self._pre.get(b.name)
            if pre is not None and b.size != pre:
                raise OSError(errno.EINVAL, f"RAM block {b.name!r} is {b.size} bytes, not the "
                                            f"{pre} preallocated for it (--ram-prealloc)")
            self._declared.add(b.name)
            if b.name in self._files:
                continue
            self._open(b.name, b.size, taken)
        with open(os.path.join(self.path, "blocks.json"), "w") as f:
            json.dump({k: v for k, v in self._index.items()
                       if k in self._declared or k not in self._pre}, f, indent=1)

    def pages(self, ev: RamPages) -> None:
        m = self._maps.get(ev.block)
        size = ev.count * ev.page_size
        if m is not None:
            if ev.stride == ev.page_size:
                m[ev.offset : ev.offset + size] = ev.data[:size]
            else:
                at = ev.offset
                for page in ev.iov():
                    m[at : at + ev.page_size] = page
                    at += ev.page_size
            return
        # pages back to back (a multifd packet's run) go as one buffer, not one per page
        iov = [ev.data[:size]] if ev.stride == ev.page_size else ev.iov()
        n = self._files[ev.block].pwritev(iov, ev.offset)
        if n != size:
            raise OSError(f"short write to {self._index[ev.block]['file']}: {n} bytes")

    def zeros(self, ev: ZeroPages) -> None:
        ch = self._files[ev.block]
        start, size = ev.offset, ev.count * ev.page_size
        m = self._maps.get(ev.block)
        if m is not None:  # preallocated: clear only what is not zero already (as QEMU does)
            for off in range(start, start + size, 1 << 20):
                end = min(off + (1 << 20), start + size)
                if ev.fill or m[off:end] != _ZEROS[: end - off]:
                    m[off:end] = bytes([ev.fill]) * (end - off)
            return
        if ev.fill == 0:  # the only fill the parser gives (events made by hand may differ)
            try:
                data_at = os.lseek(ch.fileno(), start, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data from there to the end
                    raise
                return
            if data_at >= start + size:
                return  # a hole already
        fill = bytes([ev.fill]) * min(size, 1 << 20)
        for off in range(0, size, len(fill)):
            ch.pwritev([fill[: size - off]], start + off)

    def _unmap(self) -> None:
        for v in self._maps.values():
            v.release()
        for mm in self._mm.values():
            try:
                mm.close()
            except BufferError:  # a view is still held (a traceback's frame): unmapped with it
                pass
        self._maps.clear()
        self._mm.clear()

    def _remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.path, self._index.pop(name)["file"]))

    def close(self) -> None:
        self._unmap()
        for name, ch in self._files.items():
            ch.close()
            if name in self._pre and name not in self._declared:
                self._remove(name)  # preallocated for a block this stream did not have


class _Abort(Exception):
    """Tells the writer the stream was refused: drop the destination, send nothing more."""


class _Failed(BrokenChannelError):
    """The destination failed in a way that names itself (an exec: command's status)."""


class Forwarder:
    """A writer greenlet in another context, fed from a fixed pool of receive buffers.

    ``acquire()`` (reader side) parks until a buffer is free; ``submit(buf, n)`` passes its
    first ``n`` bytes to the writer (``submit(buf, n, start, release=False)`` a piece of it,
    keeping the buffer out of the pool until a later piece releases it); ``finish()`` says the stream ended (the writer then closes
    the destination, which sees EOF) and waits for the writer; ``abort(reason)`` drops the
    destination without sending what is queued. A writer failure surfaces in the reader's next
    ``acquire()`` as BrokenChannelError. ``high_water`` is the most buffers ever in flight.
    ``connect(endpoint, timeout)`` opens the destination in the writer's greenlet (default
    ``open_outgoing``; the receiver's adds TLS and the return-path relay).
    """

    def __init__(self, endpoint: Endpoint, context: Context, *, chunk: int = CHUNK,
                 buffers: int = BUFFERS, digest: bool = False,
                 connect_timeout: float | None = 30.0, idle_timeout: float | None = None,
                 connect: Callable[[Endpoint, float | None], Channel] | None = None) -> None:
        if buffers < 2:
            raise ValueError("forwarding needs at least 2 buffers")
        self.endpoint = endpoint
        # unbounded: the pool of buffers bounds what can be in either queue
        self._free: Queue[bytearray] = Queue()
        self._full: Queue[tuple[bytearray, int, int, bool] | None] = Queue()
        for _ in range(buffers):
            self._free.put(bytearray(chunk))
        self.buffers = buffers
        self._submitted = 0
        self._returned = 0
        self.high_water = 0
        self.bytes_out = 0
        self._sha = hashlib.sha256() if digest else None
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._connect = connect
        self._channel: Channel | None = None
        #: set once the destination's connection is open (or could not be): a multifd relay
        #: opens its channels' only after its main channel's, as QEMU before 8.0 requires
        self.connected = Event()
        self._done: Future[None] = context.spawn(self._run)

    @property
    def sha256(self) -> str | None:
        return self._sha.hexdigest() if self._sha is not None else None

    def acquire(self, timeout: float | None = None) -> bytearray:
        """A free buffer; parks while all are queued or being sent (TimeoutError after
        ``timeout``). Reader side."""
        return self._free.get(timeout=timeout)

    def submit(self, buf: bytearray, n: int, start: int = 0, release: bool = True) -> None:
        """Queue ``buf[start:n]`` for the destination; once sent, the buffer goes back to the
        pool unless ``release`` is false (more of it follows). Never parks."""
        if release:
            # each counter has one writer thread, so the difference is a safe (if stale) count
            self._submitted += 1
            in_flight = self._submitted - self._returned
            self.high_water = max(self.high_water, in_flight)
        self._full.put((buf, start, n, release))

    def release(self, buf: bytearray) -> None:
        """Give back a buffer that carries nothing to send (EOF read into it)."""
        self._free.put(buf)

    def finish(self, timeout: float | None = None) -> None:
        """The stream ended well: wait until the writer has sent everything and closed."""
        self._full.put(None)
        self._done.result(timeout)

    def abort(self, timeout: float | None = 10.0) -> None:
        """Drop the destination now (it must not load a stream we refused). Never raises."""
        self._full.fail(_Abort())
        ch = self._channel
        if isinstance(ch, CommandChannel):  # the writer ends it; a TERM wakes a parked write
            terminate(ch)
            with contextlib.suppress(BaseException):
                self._done.result(GRACE)
        if ch is not None:
            ch.close()  # wakes the writer if it is parked on the destination
        # the stream error is the one to report; the writer's own end does not matter now
        with contextlib.suppress(BaseException):
            self._done.result(timeout)

    def _run(self) -> None:
        """The writer greenlet. Any failure reaches the reader as one BrokenChannelError,
        through ``acquire()`` or ``finish()``, whichever it calls next."""
        try:
            self._write()
        except _Abort:
            pass
        except Exception as exc:
            msg = str(exc) if isinstance(exc, _Failed) else f"forward to {self.endpoint}: {exc}"
            err = BrokenChannelError(msg)
            self._free.fail(err)
            raise err from exc
        except BaseException as exc:  # stopped (GreenletExit...): tell the reader, go on
            self._free.fail(BrokenChannelError(f"forward to {self.endpoint}: {exc!r}"))
            raise

    def _write(self) -> None:
        try:
            if self._connect is not None:
                ch = self._connect(self.endpoint, self._connect_timeout)
            else:
                ch = open_outgoing(self.endpoint, timeout=self._connect_timeout)
        finally:
            self.connected.set()
        self._channel = ch
        sha = self._sha
        idle = self._idle_timeout
        done = False
        try:
            while True:
                item = self._full.get()  # raises _Abort when the stream was refused
                if item is None:
                    break
                buf, start, n, release = item
                view = memoryview(buf)[start:n]
                if len(view):
                    if idle is None:
                        ch.write_all(view)
                    else:
                        _write_progressing(ch, view, idle)
                    if sha is not None:
                        sha.update(view)
                    self.bytes_out += n - start
                if release:
                    self._returned += 1
                    self._free.put(buf)
            if isinstance(ch, CommandChannel):
                ch.shutdown(Shutdown.WRITE)
                what = f"destination {str(self.endpoint)!r}"
                if not ch.wait_exit(EXIT_WAIT):
                    raise _Failed(f"{what} was still running {EXIT_WAIT:g} s after "
                                  "its input ended")
                problem = failure(ch, what)
                if problem is not None:
                    raise _Failed(problem)
            elif isinstance(ch, TLSChannel):
                # close_notify, written for sure (close() only tries): a QEMU 10 destination on
                # a 10.0 machine type fails a multifd channel that ends without it (one that
                # has hung up already, as a destination does after SHUT, needs none)
                with contextlib.suppress(BrokenChannelError):
                    ch.shutdown(Shutdown.WRITE)
            done = True
        finally:
            if isinstance(ch, CommandChannel) and not done:
                end_command(ch)
            ch.close()


def _write_progressing(ch: Channel, view: memoryview, idle: float) -> None:
    """write_all(), failing once no byte could be written for ``idle`` seconds."""
    while len(view):
        try:
            n = ch.write(view, timeout=idle)
        except TimeoutError:
            raise BrokenChannelError(f"the destination took no data for {idle:g} s") from None
        view = view[n:]

