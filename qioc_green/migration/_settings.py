"""What the receiver is told before a migration arrives, as a QEMU destination is told it, and
what it refuses in the stream's configuration (sans-IO).

A QEMU destination learns the multifd channel count and compression from QMP
(``migrate-set-capabilities``, ``migrate-set-parameters``) before it listens: a multifd stream
never says how many channels it has. :class:`IncomingSettings` holds those settings with QMP's
names and QMP's checks, so the command line (``--multifd-channels``, ``--multifd-compression``)
and a QMP monitor set them the same way; both refuse, with one line, what the receiver cannot do.

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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._events import Configuration, Event, RamFlush
from ._format import MigrationStreamError
from ._multifd_compress import COMPRESSIONS, DecompressError, decompressor_for
from ._parser import StreamParser

#: Capabilities the receiver can take (QMP names); ``migrate-set-capabilities`` refuses others.
SUPPORTED_CAPABILITIES = frozenset({
    "multifd",  # the channels, with --multifd-channels
    "x-ignore-shared",  # the parser reads the block addresses it adds
    "mapped-ram",  # from file: only (a mapped-ram migration is a file)
    "validate-uuid",  # the multifd channels are checked against the main stream's UUID
    "events", "auto-converge", "zero-blocks", "dirty-limit", "pause-before-switchover",
    "zero-copy-send", "late-block-activate",  # the source's business; nothing on the wire
})
#: Capabilities a stream's configuration may declare that this receiver understands.
_DECLARABLE = frozenset({"x-ignore-shared", "mapped-ram"})
MAX_MULTIFD_CHANNELS = 255  # QEMU's range for multifd-channels is 1..255


@dataclass
class IncomingSettings:
    """Capabilities and parameters of the incoming side, by their QMP names.

    ``capabilities``: those switched on. ``multifd_channels``: QMP's ``multifd-channels``
    (QEMU's default 2), used when ``multifd`` is on. ``multifd_compression``: QMP's
    ``multifd-compression``, or None (the default here, unlike QEMU's ``none``) to take what
    the packets say and hold every channel to it. Nothing here blocks or touches a socket.
    """

    capabilities: set[str] = field(default_factory=set)
    multifd_channels: int = 2
    multifd_compression: str | None = None

    @property
    def multifd(self) -> bool:
        return "multifd" in self.capabilities

    @property
    def channels(self) -> int:
        """How many multifd channels a migration brings (0 without multifd)."""
        return self.multifd_channels if self.multifd else 0

    def set_capability(self, name: str, state: bool = True) -> None:
        """``migrate-set-capabilities`` for one capability. ValueError names what is refused."""
        if state and name not in SUPPORTED_CAPABILITIES:
            raise ValueError(f"capability {name!r} is not supported by this receiver")
        if state:
            self.capabilities.add(name)
        else:
            self.capabilities.discard(name)

    def set_parameters(self, parameters: dict[str, Any]) -> None:
        """``migrate-set-parameters``: ``multifd-channels``, ``multifd-compression``.

        Checks everything before changing anything; ValueError names the parameter.
        """
        channels = self.multifd_channels
        compression = self.multifd_compression
        for key, value in parameters.items():
            if key == "multifd-channels":
                if isinstance(value, bool) or not isinstance(value, int) or \
                        not 1 <= value <= MAX_MULTIFD_CHANNELS:
                    raise ValueError(f"parameter 'multifd-channels' expects 1 to "
                                     f"{MAX_MULTIFD_CHANNELS}, not {value!r}")
                channels = value
            elif key == "multifd-compression":
                if value not in COMPRESSIONS:
                    raise ValueError(f"parameter 'multifd-compression' {value!r} is not supported "
                                     f"({', '.join(COMPRESSIONS)})")
                try:
                    decompressor_for(value)  # zstd: is zstandard there?
                except DecompressError as exc:
                    raise ValueError(str(exc)) from None
                compression = value
            else:
                raise ValueError(f"parameter {key!r} is not supported by this receiver")
        self.multifd_channels = channels
        self.multifd_compression = compression

    def as_dict(self) -> dict[str, Any]:
        return {"capabilities": sorted(self.capabilities),
                "multifd-channels": self.multifd_channels,
                "multifd-compression": self.multifd_compression}


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
