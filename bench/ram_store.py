#!/usr/bin/env python3
"""What the kernel charges to store guest RAM, each way a receiver could (never part of the tests).

One thread, no network: 1 GiB (``--mib``) of random bytes, from a 64 MiB source cycled through
so the source is not cache-hot, stored in 512 KiB pieces (a multifd packet's pages) into a new
file under DIR, or into memory, by each method in turn (``--rounds`` interleaved rounds,
medians). This is the floor under ``qioc-migration-receiver --ram-dir DIR``: whatever Python
adds comes on top. Printed: wall and CPU seconds per GiB.

* ``pwrite``: ``pwritev`` into a new sparse file (what ``RamDir`` does);
* ``pwrite 4 MiB``: the same in 4 MiB pieces, eight packets' pages a call (what writing
  several packets at once would save: the per-call cost);
* ``fallocate+pwrite``: the file's size allocated first (``posix_fallocate``), then written;
  the fallocate's share is shown apart;
* ``mmap+populate``: the file mapped ``MAP_SHARED``, its pages faulted in by
  ``MADV_POPULATE_WRITE``, then copied into (what receiving straight into a mapped file costs
  beyond the receive's own copy);
* ``splice``: each piece through a pipe into the file at its offset (``vmsplice`` then
  ``splice``; the pipe-to-file half of splicing from a socket);
* ``anon``: into anonymous memory with ``MADV_HUGEPAGE``, as a QEMU destination keeps guest RAM
  (no file at all); ``anon+write``: then written to the file, the share shown apart.

The file is deleted after each method. ``python bench/ram_store.py /dev/shm /var/tmp``
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterator

PIECE = 512 << 10
MADV_POPULATE_WRITE = 23  # Linux 5.14
F_SETPIPE_SZ = 1031


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)


def _vmsplice(fd: int, view: memoryview) -> int:
    buf = (ctypes.c_char * len(view)).from_buffer(view)
    iov = _Iovec(ctypes.addressof(buf), len(view))
    n = int(_libc.vmsplice(fd, ctypes.byref(iov), 1, 0))
    if n < 0:
        raise OSError(ctypes.get_errno(), "vmsplice")
    return n


class Store:
    def __init__(self, size: int) -> None:
        self.size = size
        self.src = memoryview(bytearray(os.urandom(64 << 20)))

    def pieces(self, piece: int = PIECE) -> Iterator[tuple[int, memoryview]]:
        for off in range(0, self.size, piece):
            s = off % len(self.src)
            yield off, self.src[s : s + piece]

    def new_file(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, self.size)
        return fd

    def pwrite(self, path: str, fallocate: bool = False, piece: int = PIECE) -> float | None:
        fd = self.new_file(path)
        try:
            t = None
            if fallocate:
                t = time.process_time()
                os.posix_fallocate(fd, 0, self.size)
                t = time.process_time() - t
            for off, data in self.pieces(piece):
                os.pwritev(fd, [data], off)
        finally:
            os.close(fd)
        return t

    def mmap_populate(self, path: str) -> float:
        fd = self.new_file(path)
        try:
            with mmap.mmap(fd, self.size, mmap.MAP_SHARED) as m:
                t = time.process_time()
                m.madvise(MADV_POPULATE_WRITE)
                t = time.process_time() - t
                with memoryview(m) as v:
                    for off, piece in self.pieces():
                        v[off : off + PIECE] = piece
        finally:
            os.close(fd)
        return t

    def splice(self, path: str) -> None:
        fd = self.new_file(path)
        r, w = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
            for off, piece in self.pieces():
                done = 0
                while done < PIECE:
                    k = _vmsplice(w, piece[done:])
                    moved = 0
                    while moved < k:
                        moved += os.splice(r, fd, k - moved, offset_dst=off + done + moved)
                    done += k
        finally:
            for x in (fd, r, w):
                os.close(x)

    def anon(self, path: str, write: bool = False) -> float | None:
        with mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
            m.madvise(mmap.MADV_HUGEPAGE)
            with memoryview(m) as v:
                for off, piece in self.pieces():
                    v[off : off + PIECE] = piece
                if not write:
                    return None
                t = time.process_time()
                fd = self.new_file(path)
                try:
                    for off in range(0, self.size, 4 << 20):
                        os.pwritev(fd, [v[off : off + (4 << 20)]], off)
                finally:
                    os.close(fd)
                return time.process_time() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="where the RAM file goes (a tmpfs, a disk)")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    st = Store(args.mib << 20)
    gib = st.size / 2**30
    methods: dict[str, Callable[[str], float | None]] = {
        "pwrite": st.pwrite,
        "pwrite 4 MiB": lambda path: st.pwrite(path, piece=8 * PIECE),
        "fallocate+pwrite": lambda path: st.pwrite(path, fallocate=True),
        "mmap+populate": st.mmap_populate,
        "splice": st.splice,
        "anon": st.anon,
        "anon+write": lambda path: st.anon(path, write=True),
    }
    print(f"storing {args.mib} MiB in {PIECE >> 10} KiB pieces, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    for d in args.dirs:
        res: dict[str, list[tuple[float, float, float | None]]] = {k: [] for k in methods}
        for r in range(args.rounds):
            names = list(methods)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                path = os.path.join(d, f"ram_store-{os.getpid()}.bin")
                w, c = time.monotonic(), time.process_time()
                try:
                    part = methods[name](path)
                finally:
                    if os.path.exists(path):
                        os.unlink(path)
                res[name].append(((time.monotonic() - w) / gib, (time.process_time() - c) / gib,
                                  None if part is None else part / gib))
        print(f"\n{d}  (s per GiB: median [min-max] of the CPU; the part: fallocate, populate, "
              "or the final write)")
        for name, v in res.items():
            cpu = [x[1] for x in v]
            parts = [x[2] for x in v if x[2] is not None]
            print(f"  {name:<18} wall {statistics.median(x[0] for x in v):6.3f}  cpu "
                  f"{statistics.median(cpu):6.3f} [{min(cpu):.3f}-{max(cpu):.3f}]"
                  + (f"  of which {statistics.median(parts):.3f}" if parts else ""))
    print(f"\nload average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
