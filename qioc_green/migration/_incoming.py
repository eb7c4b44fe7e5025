"""What a multifd migration is told before it arrives, and what the receiver refuses in a
stream's configuration (sans-IO).

A QEMU destination learns the multifd channel count and compression from QMP
(``migrate-set-capabilities multifd``, ``migrate-set-parameters multifd-channels``,
``multifd-compression``) before it listens: a multifd stream never says how many channels it
has. Those settings live in :class:`~._settings.DestinationSettings`, which the command line
(``--multifd-channels``, ``--multifd-compression``) and a QMP monitor set alike, with QMP's
names and checks; :class:`IncomingSettings` is what one migration takes from it.

The configuration section lists only the capabilities both ends must agree on
(``configuration/capabilities``: in QEMU 10, ``x-ignore-shared`` and ``mapped-ram``);
:func:`check_configuration` refuses a stream whose list names one the receiver cannot take here,
before any RAM has arrived. The others do not show in the stream until their effects do (see
``docs/migration-formats.md``): a multifd source opens more connections, and its main stream
carries MULTIFD_FLUSH records, which a receiver not told to expect multifd refuses at the first
one (before RAM: QEMU sends one right after the RAM block list); xbzrle shows only at its first
encoded page, which the parser refuses naming the capability.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._events import Configuration, Event, RamFlush
from ._format import MigrationStreamError
from ._parser import StreamParser

#: Capabilities a stream's configuration may declare that this receiver understands.
_DECLARABLE = frozenset({"x-ignore-shared", "mapped-ram"})


@dataclass(frozen=True)
class IncomingSettings:
    """One migration's multifd settings: ``multifd_channels`` (0: no multifd) and
    ``multifd_compression`` (``none``, ``zlib``, ``zstd``, or None: what the packets say, held
    to on every channel)."""

    multifd_channels: int = 0
    multifd_compression: str | None = None

    @property
    def multifd(self) -> bool:
        return self.multifd_channels > 0

    @property
    def channels(self) -> int:
        return self.multifd_channels

    @classmethod
    def from_destination(cls, capabilities: Mapping[str, bool], parameters: Mapping[str, Any],
                         *, strict_compression: bool = True) -> IncomingSettings:
        """From a destination's capabilities and parameters (QMP names). ``strict_compression``
        false: a ``multifd-compression`` left at its default is taken from the packets (the
        command line without ``--multifd-compression``); true, as a QMP-driven destination
        QEMU, it must be what the packets use."""
        if not capabilities.get("multifd"):
            return cls()
        method = parameters.get("multifd-compression", "none")
        return cls(int(parameters.get("multifd-channels", 2)),
                   method if strict_compression else None)


def check_configuration(cfg: Configuration, offset: int, *, mapped_ram_ok: bool = False) -> None:
    """Refuse a configuration that declares a capability we cannot take here.

    ``offset``: the stream offset to report. ``mapped_ram_ok``: the stream is read from a
    mapped-ram file by its reader. Raises MigrationStreamError with one line naming it.
    """
    for cap in cfg.capabilities:
        if cap == "mapped-ram" and not mapped_ram_ok:
            raise MigrationStreamError(
                offset, "capability mapped-ram: a mapped-ram migration is a file with RAM at "
                        "fixed offsets; read it with file:PATH, not as a sequential stream")
        if cap not in _DECLARABLE:
            raise MigrationStreamError(
                offset, f"capability {cap!r} in the configuration is not supported by this "
                        "receiver (switch it off on the source)")


class _Parsing(Protocol):
    parser: StreamParser | None


def plain_stream_checks(rx: _Parsing) -> Callable[[Event], None]:
    """A Receiver ``on_event`` hook for a migration without multifd: refuses, naming the
    capability, a configuration it cannot take and the first MULTIFD_FLUSH (the source uses
    multifd: its RAM would come on channels this receiver was not told to expect)."""

    def check(ev: Event) -> None:
        parser = rx.parser
        assert parser is not None
        if isinstance(ev, Configuration):
            check_configuration(ev, parser.offset)
        elif isinstance(ev, RamFlush):
            raise MigrationStreamError(
                parser.offset - 8, "MULTIFD_FLUSH: the source uses the multifd capability; "
                                   "start the receiver with --multifd-channels N (the source's "
                                   "multifd-channels)")

    return check
