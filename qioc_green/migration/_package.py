"""Postcopy's device-state package (``PACKAGED``): parsed in place, bounded by its length.

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

from ._format import MigrationStreamError
from ._receivebuffer import ReceiveBuffer


class PackageReader(ReceiveBuffer):
    """The package bounds, a base class of ``StreamParser`` (no state of its own but the end)."""

    _package_end: int | None = None  # stream offset where the open package ends

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
