"""Where device data ends: at a footer followed by a plausible next item (the rules are in
``_vmdesc``), and at the end of an open postcopy package (PACKAGED), parsed in place.

A base class of ``StreamParser``: :meth:`DeviceFraming._plausible_next` judges a candidate
footer; the rest bounds the package.

The package
-----------

The facts (QEMU's ``postcopy_start()`` and ``loadvm_handle_cmd_packaged()``; seen in streams
QEMU 7.2 and 10.0 wrote): at the switch to postcopy the source wraps ``POSTCOPY_LISTEN``, the
FULL device sections (with their footers), ``PING 3`` and ``POSTCOPY_RUN`` into one command,
``PACKAGED``: a be32 length, then that many bytes of a nested stream with no header, no EOF and
no VM description. A destination reads the package into a buffer and loads it while its listen
thread goes on reading the main stream (RAM, after ``PING 4``). QEMU accepts packages of up to
4 GiB (``MAX_VM_CMD_PACKAGED_SIZE``, 16 MiB before 4.0).

The decisions: the package's items come out as events in stream order, right after the
PACKAGED ``Command`` itself, and nothing is buffered for the package as such (a device section's
data is, as everywhere, up to ``max_device_bytes``). The length is a peer's number, so it is
capped by ``max_device_bytes`` too (the package holds device state only), and it only sets a
hard end: no item may cross it (the parser checks at the start of every item), and a device
section's data is never scanned past it, so a footer that ends exactly at the package end
closes its section without looking further. What never occurs in a package is refused: a
nested PACKAGED, EOF, a ``ram`` section.
"""

from __future__ import annotations

import struct

from ._format import (
    BE32,
    COMMANDS,
    QEMU_VM_COMMAND,
    QEMU_VM_EOF,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_VMDESCRIPTION,
    MigrationStreamError,
)
from ._receivebuffer import ReceiveBuffer


def _printable(b: bytes | bytearray | memoryview) -> bool:
    return all(0x20 < c < 0x7F for c in b)


class DeviceFraming(ReceiveBuffer):
    """Footer plausibility and the package bounds (no state of its own but the package end)."""

    _package_end: int | None = None  # stream offset where the open package ends
    _live: set[int]  # the parser's: sections STARTed and not yet ENDed
    _body_start: int  # the parser's: stream offset of the current device data

    def _open_package(self, at: int, start: int, size: int, cap: int) -> None:
        """A PACKAGED command at ``at`` whose package starts at ``start``."""
        if self._package_end is not None:
            raise MigrationStreamError(at, "PACKAGED inside the postcopy package")
        if size > cap:
            raise MigrationStreamError(at, f"PACKAGED of {size} bytes is over the {cap}-byte "
                                           "device data cap")
        self._package_end = start + size

    def _leave_package(self) -> bool:
        """At the start of an item inside a package: True when the package has just ended."""
        end = self._package_end
        assert end is not None
        if self.offset < end:
            return False
        if self.offset > end:
            raise self._err(f"an item crosses the end of the postcopy package at offset {end}",
                            end)
        self._package_end = None
        return True

    def _package_room(self, start: int, have: int, what: str) -> int | None:
        """Device data from stream offset ``start``, ``have`` bytes of it copied: how many more
        bytes the package leaves (None: no package open). Raises when none is left."""
        end = self._package_end
        if end is None:
            return None
        room = end - start - have
        if room <= 0:
            raise self._err(f"the postcopy package ends inside {what} before its footer",
                            end if room < 0 else None)
        return room

    def _plausible_next(self, data: bytearray, i: int) -> bool | None:
        """Is data[i:] a plausible start of what follows a footer? None: cannot tell yet."""
        end = len(data)
        cut = None if not self._closed else True  # what running out of bytes means
        pkg = self._package_end
        if pkg is not None and self._body_start + end >= pkg:  # the package ends the data
            if self._body_start + i == pkg:
                return True
            cut = False  # what follows must fit before the package end

        def short(n: int) -> bool:
            return i + n > end

        if short(1):
            return cut
        t = data[i]
        if t == QEMU_VM_EOF:
            if short(2):
                return cut
            # EOF then the description marker: its length and JSON are checked after
            return data[i + 1] == QEMU_VM_VMDESCRIPTION
        if t in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            if short(6):
                return cut
            n = data[i + 5]
            if n == 0:
                return False
            if short(6 + n + 8):
                return cut
            (version,) = BE32.unpack_from(data, i + 6 + n + 4)
            return _printable(data[i + 6 : i + 6 + n]) and version < 0x10000
        if t in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            if short(5):
                return cut
            (sid,) = BE32.unpack_from(data, i + 1)
            return sid in self._live
        if t == QEMU_VM_COMMAND:
            if short(5):
                return cut
            cmd, length = struct.unpack_from(">HH", data, i + 1)
            known = COMMANDS.get(cmd)
            return known is not None and (known[1] is None or known[1] == length)
        return False
