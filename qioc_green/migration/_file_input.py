"""``file:`` input beyond a plain saved stream: a saved multifd migration, and mapped-ram files.

What a ``file:PATH`` holds is told by its bytes and its neighbours, never by an option:

- ``PATH.multifd-0``, ``PATH.multifd-1``, ... beside it: a multifd migration that
  ``--save PATH`` wrote, one file per connection, each byte for byte as it arrived: ``PATH`` the
  main channel (a stream like any other), ``PATH.multifd-J`` the J-th multifd connection to
  arrive (its init packet says which channel it was). It is replayed as it came: every file is
  read by its own IOThread, through the multifd receiver, so ``--ram-dir`` rebuilds RAM and
  ``--forward`` sends the destination N + 1 connections again. One file per connection keeps
  each one a plain file (``cat``, ``cmp`` and ``exec:`` work on it) and lets every reader go at
  its own pace, which QEMU's sync points need (one reader of one interleaved file could not
  get past a sync point whose SYNC packets lie further on).
- a configuration that declares ``mapped-ram`` (QEMU 9.0+ ``migrate file:`` with that
  capability, with or without multifd, which writes the same file): RAM sits at fixed offsets;
  :class:`MappedRamReceiver` checks the file, parses the main stream without the RAM regions, and
  ``--ram-dir`` rebuilds each block with positional reads and writes, split over
  ``--multifd-channels`` IOThreads when given (as QEMU's multifd loads such a file).
- anything else is a sequential stream, read as before.
"""

from __future__ import annotations

import os
import time
from typing import Any

from qioc_green import Channel, FileChannel, IOThreadPool

from ._events import Configuration, RamBlocks, RamPages
from ._format import NEED_DATA, MigrationStreamError
from ._incoming import check_configuration
from ._mapped_ram import MappedRamBlock, MappedRamError, MappedRamFile, NotMappedRam
from ._multifd_channel import channel_path
from ._parser import StreamParser
from ._receiver import Outcome, describe
from ._sinks import RamDir
from ._summary import Summary
from ._uri import Endpoint

MAX_REPLAY_CHANNELS = 255
_PIECE = 16 << 20  # bytes of one block copied by one task of a parallel rebuild


def saved_channels(path: str) -> list[str]:
    """The ``PATH.multifd-J`` files beside ``path``, J = 0, 1, ... while they exist."""
    out: list[str] = []
    while len(out) < MAX_REPLAY_CHANNELS and os.path.exists(channel_path(path, len(out))):
        out.append(channel_path(path, len(out)))
    return out


def input_kind(endpoint: Endpoint) -> str:
    """What a ``file:`` endpoint holds: ``"multifd"``, ``"mapped-ram"`` or ``"stream"``.

    Raises OSError when the file cannot be read.
    """
    if saved_channels(endpoint.path):
        return "multifd"
    with open(endpoint.path, "rb") as f:
        try:
            MappedRamFile.from_fd(f.fileno(), offset=endpoint.offset)
        except NotMappedRam:
            return "stream"
        except MappedRamError:
            pass  # it declares mapped-ram and is broken: MappedRamReceiver says where
    return "mapped-ram"


def replay_channels(endpoint: Endpoint) -> list[Channel]:
    """The saved main channel and its multifd channels, opened (the caller closes them)."""
    out: list[Channel] = []
    try:
        main = FileChannel.open(endpoint.path, os.O_RDONLY, name="saved-main")
        out.append(main)
        if endpoint.offset:
            main.seek(endpoint.offset)
        for j, path in enumerate(saved_channels(endpoint.path)):
            out.append(FileChannel.open(path, os.O_RDONLY, name=f"saved-multifd-{j}"))
    except BaseException:
        for ch in out:
            ch.close()
        raise
    for ch in out:
        ch.set_follow_coroutine_ctx(True)
    return out


class MappedRamReceiver:
    """Read a mapped-ram ``file:`` migration: check it, parse its main stream, rebuild RAM.

    ``ram_dir``: where RAM blocks are rebuilt (sparse files, as ``RamDir``); ``threads``: how
    many IOThreads copy pages (1: the calling greenlet does). May park (the pool's waits);
    positional reads and writes never do.
    """

    def __init__(self, endpoint: Endpoint, *, ram_dir: str | None = None,
                 allow_undescribed: bool = False, threads: int = 1) -> None:
        self.endpoint = endpoint
        self.ram_dir = ram_dir
        self.allow_undescribed = allow_undescribed
        self.threads = max(1, threads)

    def receive(self) -> Outcome:
        """Never raises for a bad file: the Outcome carries the one-line error."""
        t0 = time.monotonic()
        cpu0 = time.process_time()
        summary = Summary()
        error: str | None = None
        copied = 0
        ch: FileChannel | None = None
        ram: RamDir | None = None
        m: MappedRamFile | None = None
        try:
            ch = FileChannel.open(self.endpoint.path, os.O_RDONLY, name="mapped-ram")
            src = ch

            def pread(offset: int, n: int) -> bytes:
                buf = bytearray(n)
                got = src.preadv([buf], offset)
                del buf[got:]
                return bytes(buf)

            m = MappedRamFile(pread, os.fstat(ch.fileno()).st_size, offset=self.endpoint.offset)
            if self.ram_dir is not None:
                ram = RamDir(self.ram_dir)
            self._parse(m, summary, ram)
            if ram is not None:
                copied = self._rebuild(m, ram)
            for b in m.blocks:
                entry = summary.ram_blocks.get(b.name)
                if entry is not None and ram is not None:
                    entry["normal_pages"] = sum(n for _, n in m.present_runs(b)) // b.page_size
                    entry["zero_pages"] = b.pages - entry["normal_pages"]
        except MigrationStreamError as exc:
            error = str(exc)
        except (OSError, ValueError) as exc:
            error = f"offset 0: {describe(exc) if isinstance(exc, OSError) else exc}"
        finally:
            if ram is not None:
                ram.close()
            if ch is not None:
                ch.close()
        d: dict[str, Any] = summary.as_dict(elapsed_s=round(time.monotonic() - t0, 6),
                                            bytes_total=m.size if m is not None else 0)
        d["cpu_s"] = round(time.process_time() - cpu0, 4)
        d["mapped_ram"] = {"blocks": [{"name": b.name, "size": b.size,
                                       "pages_offset": b.pages_offset} for b in m.blocks]
                           if m is not None else [], "bytes_copied": copied,
                           "threads": self.threads}
        if error is not None:
            d["complete"] = False
            d["error"] = error
        return Outcome(d, error)

    def _parse(self, m: MappedRamFile, summary: Summary, ram: RamDir | None) -> None:
        """The main stream, with the mapped-ram headers and regions left out."""
        parser = StreamParser()
        try:
            for chunk in m.stream_chunks():
                parser.feed(chunk)
                self._drain(parser, summary, ram)
            parser.close()
            self._drain(parser, summary, ram)
        except MappedRamError:
            raise
        except MigrationStreamError as exc:  # an offset in the stripped stream: the file's
            msg = str(exc).partition(": ")[2]
            raise MigrationStreamError(m.file_offset(min(exc.offset, m.stream_size - 1)),
                                       msg) from None
        if not summary.described and not self.allow_undescribed:
            summary.complete = False
            raise MigrationStreamError(m.size, "expected the VM description (0x06) after EOF, "
                                               "the stream ended (--allow-undescribed accepts that)")

    @staticmethod
    def _drain(parser: StreamParser, summary: Summary, ram: RamDir | None) -> None:
        while (ev := parser.next_event()) is not NEED_DATA:
            if isinstance(ev, Configuration):
                check_configuration(ev, parser.offset, mapped_ram_ok=True)
            elif isinstance(ev, RamBlocks) and ram is not None:
                ram.blocks(ev)
            summary.add(ev)

    def _rebuild(self, m: MappedRamFile, ram: RamDir) -> int:
        """Copy every block's present pages into ``ram``; return the bytes copied."""
        pieces = [(b, off, min(_PIECE, start + length - off))
                  for b in m.blocks for start, length in m.present_runs(b)
                  for off in range(start, start + length, _PIECE)]
        if self.threads == 1:
            return sum(_copy(m, ram, *p) for p in pieces)
        with IOThreadPool(self.threads, name="mig-mapped") as pool:
            futures = [pool.contexts[i % self.threads].spawn(_copy, m, ram, *p)
                       for i, p in enumerate(pieces)]
            return sum(f.result() for f in futures)


def _copy(m: MappedRamFile, ram: RamDir, block: MappedRamBlock, offset: int, length: int) -> int:
    """One piece of a block: bounded reads (1 MiB) straight into positional writes."""
    ps = block.page_size
    done = 0
    while done < length:
        n = min(1 << 20, length - done)
        data = m.read_pages(block, offset + done, n)
        ram.pages(RamPages(block.name, offset + done, n // ps, memoryview(data), ps, ps))
        done += n
    return done
