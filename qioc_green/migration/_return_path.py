"""The migration return path, sans-IO: what a destination owes the source, and the wire codec.

Facts (QEMU 10.0's ``migration/migration.c``, ``savevm.c``, ``postcopy-ram.c``, ``ram.c``;
checked against a real 10.0 and 7.2 destination through a capturing relay)
----------------------------------------------------------------------------------------------

The return path is the same connection as the main stream, in the other direction
(``qemu_file_get_return_path()``). The source opens its end when ``return-path`` or
``postcopy-ram`` is on (``migration_connect()``), starts ``source_return_path_thread()``, and
writes ``OPEN_RETURN_PATH`` then ``PING 1`` right after the stream header
(``migration_thread()``). Every return-path message is ``be16 type, be16 length, data``
(``migrate_send_rp_message()``); the source refuses a type it does not know, a length that is
not the type's, and any length over 512 (its buffer), and fails the migration:

====  ==============  ==============================================================  =========
type  name            data                                                            sent by
====  ==============  ==============================================================  =========
1     SHUT            be32: 0 done, 1 error; the destination sends nothing after it    dst
2     PONG            be32: the PING's value                                           dst
3     REQ_PAGES_ID    be64 start, be32 length, byte n, n bytes of RAM block name       dst
4     REQ_PAGES       be64 start, be32 length (same block as the last request)         dst
5     RECV_BITMAP     byte n + block name; then, outside the framing, be64 size,       dst
                      that many bytes of little-endian bitmap, be64 0x0123456789abcdef
6     RESUME_ACK      be32 1                                                           dst
7     SWITCHOVER_ACK  nothing (QEMU 8.1+; a 7.2 source fails on type 7)                dst
====  ==============  ==============================================================  =========

What the source waits for:

- **SHUT** at the end, always: ``migration_completion()`` joins the return-path thread
  (``close_return_path_on_source()``), which only leaves on SHUT or a read error; a read error
  (the destination closed without SHUT) fails the migration. This is why a source with
  ``return-path`` hangs in ``device`` when nobody answers. A destination sends it from
  ``migration_incoming_state_destroy()``, after the whole stream, VM description included
  (``qemu_loadvm_state()`` reads it), with 1 when its input had an error.
- **PONG** for every PING, with its value (``loadvm_process_command()``; a PING before
  OPEN_RETURN_PATH fails the destination). 10.0 only counts them (postcopy-preempt waits for
  one); QEMU's tree after 10.1 adds a PING inside the postcopy package whose PONG moves the
  source from ``postcopy-device`` to ``postcopy-active``. Echoing every PING covers both.
- **SWITCHOVER_ACK** once, when ``switchover-ack`` is on (on both sides): a running source does
  not switch over without it (``migration_can_switchover()``). A destination whose devices need
  no ack sends it right after OPEN_RETURN_PATH.
- **REQ_PAGES(_ID)** never: in postcopy the destination asks for the pages its guest faults on
  (``migrate_send_rp_req_pages()`` from the fault thread); the source serves requests first and
  otherwise keeps sending every page still dirty in the background (``ram_save_iterate()`` goes
  on in ``postcopy-active``) until none is pending, then completes. So a destination that
  requests nothing still receives all of RAM. RECV_BITMAP and RESUME_ACK belong to postcopy
  recovery (``migrate-recover``), which needs a paused destination.

What the destination is sent (main stream commands, ``QEMU_VM_COMMAND``: be16 command, be16
length, data): 1 OPEN_RETURN_PATH, 2 PING (be32), 3 POSTCOPY_ADVISE (0 bytes, or 16: be64 page
size summary and be64 target page size, with ``postcopy-ram``), 4 POSTCOPY_LISTEN, 5
POSTCOPY_RUN, 6 POSTCOPY_RAM_DISCARD (byte 0, counted block name, byte 0, then be64 start and
be64 length pairs, in bytes), 7 PACKAGED (be32 length, then that many bytes of nested stream),
8 ENABLE_COLO, 9 POSTCOPY_RESUME, 10 RECV_BITMAP (counted block name), 11 SWITCHOVER_START
(10.0+, empty, sent at switchover when the machine type is 10.0's). A postcopy stream is:
ADVISE after the header; precopy RAM; at ``migrate-start-postcopy`` (``postcopy_start()``) the
discards, PING 2, PACKAGED holding LISTEN, the device state, PING 3 and RUN; PING 4; the
remaining RAM; EOF and no VM description. A destination reads the package whole, starts a
listen thread on the main stream at LISTEN (state ``postcopy-active``), and loads the package
in parallel, so PONG 4 may overtake PONG 3 (seen with 7.2 and 10.0).

QEMU 7.2 differs: no SWITCHOVER_ACK (8.1) and no SWITCHOVER_START (10.0); the destination emits
``MIGRATION setup`` without the ``events`` capability; otherwise the same messages, seen byte
for byte: precopy ``PONG 1, SHUT 0``; postcopy ``PONG 1, PONG 2, PONG 4, PONG 3, SHUT 0``.

Decisions
---------

- **No page is requested in postcopy.** A receiver has no guest that faults; the source's
  background pass sends every remaining page anyway, so requesting them would only duplicate
  traffic (and REQ_PAGES would need the exact host page size of each block).
- Commands QEMU's destination tolerates are tolerated the same way: a second OPEN_RETURN_PATH,
  POSTCOPY_RESUME and RECV_BITMAP outside a recovery (counted in ``ignored``). What it refuses
  is refused with :class:`ReturnPathError` naming the command: PING before OPEN_RETURN_PATH,
  postcopy commands out of order, a 16-byte ADVISE when postcopy was refused (or a target page
  size that differs), a malformed RAM_DISCARD, ENABLE_COLO (COLO is not supported), an unknown
  command or a wrong length. The caller then sends :meth:`DestinationReturnPath.fail`'s SHUT 1.
- **Bounds**: the state keeps counters only; the reader holds at most one message (512 bytes)
  plus a RECV_BITMAP bitmap up to ``max_bitmap_bytes`` (16 MiB: 512 GiB of 4 KiB pages), and
  refuses a larger one before buffering it; PACKAGED lengths over ``max_package_bytes`` are
  refused.
"""

from __future__ import annotations

import enum
import struct

from ._format import COMMANDS, LocalProtocolError, MigCommand
from ._rp_codec import ReturnPathError, encode_pong, encode_shut, encode_switchover_ack

__all__ = [
    "DestinationReturnPath",
    "PostcopyState",
    "decode_advise",
    "decode_ram_discard",
]

_BE32 = struct.Struct(">I")


# -- what the destination is sent ----------------------------------------------------------------


def decode_advise(data: bytes) -> tuple[int, int] | None:
    """POSTCOPY_ADVISE data: (page size summary, target page size), or None for 0 bytes."""
    if not data:
        return None
    if len(data) != 16:
        raise ReturnPathError(f"POSTCOPY_ADVISE with length {len(data)}, expected 0 or 16")
    summary, tps = struct.unpack(">QQ", data)
    return summary, tps


def decode_ram_discard(data: bytes) -> tuple[str, list[tuple[int, int]]]:
    """POSTCOPY_RAM_DISCARD data: (block name, [(start, length) in bytes, ...])."""
    # version byte 0, counted name, a 0 byte, then at least one 16-byte range
    if len(data) < 1 + 1 + 1 + 1 + 16:
        raise ReturnPathError(f"POSTCOPY_RAM_DISCARD with length {len(data)}, too short")
    if data[0] != 0:
        raise ReturnPathError(f"POSTCOPY_RAM_DISCARD version {data[0]}, expected 0")
    n = data[1]
    end = 2 + n
    if n == 0 or end >= len(data) or data[end] != 0:
        raise ReturnPathError("POSTCOPY_RAM_DISCARD: malformed block name")
    block = data[2:end].decode("utf-8", "backslashreplace")
    body = data[end + 1 :]
    if not body or len(body) % 16:
        raise ReturnPathError(f"POSTCOPY_RAM_DISCARD for {block!r}: {len(body)} bytes of "
                              "ranges, not a multiple of 16")
    ranges = [struct.unpack_from(">QQ", body, i) for i in range(0, len(body), 16)]
    return block, ranges


class PostcopyState(enum.Enum):
    """QEMU's ``PostcopyState`` of an incoming migration."""

    NONE = "none"
    ADVISE = "advise"
    DISCARD = "discard"
    LISTENING = "listening"
    RUNNING = "running"
    END = "end"


class DestinationReturnPath:
    """What a destination sends back, driven by the commands of the main stream (sans-IO).

    Feed it each ``QEMU_VM_COMMAND`` the stream parser reports, package contents included, in
    stream order: :meth:`command` returns the bytes to write to the source now (often
    ``b""``). When the stream has been read to its end, :meth:`end_of_stream` returns the final
    SHUT 0; on any failure, :meth:`fail` returns SHUT 1 (``b""`` if the return path was never
    opened or is already shut). Never blocks or switches.

    ``switchover_ack``: the ``switchover-ack`` capability is on here (send SWITCHOVER_ACK when
    the return path opens). ``postcopy_ram``: True/False as the destination's ``postcopy-ram``
    capability (QEMU refuses an ADVISE that disagrees); None accepts what the source advises
    (a receiver started without a monitor). ``target_page_size``: refuse a postcopy whose
    target page size differs (None: accept any). ``max_package_bytes``: cap on PACKAGED.
    """

    def __init__(self, *, switchover_ack: bool = False, postcopy_ram: bool | None = None,
                 target_page_size: int | None = None, max_package_bytes: int = 64 << 20) -> None:
        self.switchover_ack = switchover_ack
        self.postcopy_ram = postcopy_ram
        self.target_page_size = target_page_size
        self.max_package_bytes = max_package_bytes
        self.opened = False
        self.shut = False
        self.postcopy = PostcopyState.NONE
        self.pings = 0
        self.ignored = 0
        self.discards = 0
        self.packages = 0
        self.pagesize_summary: int | None = None
        self._error: ReturnPathError | None = None
        self._outcome: str | None = None  # completed / failed

    @property
    def status(self) -> str:
        """The destination's MIGRATION status this state implies: active, postcopy-active,
        completed or failed."""
        if self._outcome is not None:
            return self._outcome
        if self.postcopy in (PostcopyState.LISTENING, PostcopyState.RUNNING):
            return "postcopy-active"
        return "active"

    def command(self, cmd: int, data: bytes = b"") -> bytes:
        """Take one main-stream command; return what to send to the source now.

        Raises ReturnPathError when QEMU's destination would fail on it (then send
        :meth:`fail`'s bytes), LocalProtocolError after the end or a failure.
        """
        if self._outcome is not None:
            raise LocalProtocolError(f"command {cmd} after the migration {self._outcome}")
        try:
            return self._command(cmd, bytes(data))
        except ReturnPathError as exc:
            self._error = exc
            self._outcome = "failed"
            raise

    def _command(self, cmd: int, data: bytes) -> bytes:
        known = COMMANDS.get(cmd)
        if known is None:
            raise ReturnPathError(f"unknown migration command {cmd} (length {len(data)})")
        name, want = known
        if want is not None and len(data) != want:
            raise ReturnPathError(f"{name} with length {len(data)}, expected {want}")
        if cmd == MigCommand.OPEN_RETURN_PATH:
            if self.opened:
                self.ignored += 1  # QEMU: "called when RP already open", not fatal
                return b""
            self.opened = True
            return encode_switchover_ack() if self.switchover_ack else b""
        if cmd == MigCommand.PING:
            (value,) = _BE32.unpack(data)
            if not self.opened:
                raise ReturnPathError(f"PING ({value}) with no return path open")
            self.pings += 1
            return encode_pong(value)
        if cmd == MigCommand.POSTCOPY_ADVISE:
            return self._advise(data)
        if cmd == MigCommand.POSTCOPY_RAM_DISCARD:
            if self.postcopy not in (PostcopyState.ADVISE, PostcopyState.DISCARD):
                raise ReturnPathError(f"POSTCOPY_RAM_DISCARD in postcopy state {self.postcopy.value}")
            decode_ram_discard(data)
            self.postcopy = PostcopyState.DISCARD
            self.discards += 1
            return b""
        if cmd == MigCommand.POSTCOPY_LISTEN:
            if self.postcopy not in (PostcopyState.ADVISE, PostcopyState.DISCARD):
                raise ReturnPathError(f"POSTCOPY_LISTEN in postcopy state {self.postcopy.value}")
            self.postcopy = PostcopyState.LISTENING
            return b""
        if cmd == MigCommand.POSTCOPY_RUN:
            if self.postcopy is not PostcopyState.LISTENING:
                raise ReturnPathError(f"POSTCOPY_RUN in postcopy state {self.postcopy.value}")
            self.postcopy = PostcopyState.RUNNING
            return b""
        if cmd == MigCommand.PACKAGED:
            (size,) = _BE32.unpack(data)
            if size > self.max_package_bytes:
                raise ReturnPathError(f"PACKAGED of {size} bytes (cap {self.max_package_bytes})")
            self.packages += 1
            return b""
        if cmd == MigCommand.ENABLE_COLO:
            raise ReturnPathError("ENABLE_COLO: COLO is not supported")
        if cmd == MigCommand.RECV_BITMAP:
            if not data or len(data) != 1 + data[0] or data[0] == 0:
                raise ReturnPathError(f"RECV_BITMAP with length {len(data)}: malformed block name")
            self.ignored += 1  # only answered during a postcopy recovery
            return b""
        if cmd == MigCommand.POSTCOPY_RESUME:
            self.ignored += 1  # QEMU: "illegal resume received" outside a recovery, not fatal
            return b""
        return b""  # SWITCHOVER_START: nothing owed to the source

    def _advise(self, data: bytes) -> bytes:
        if self.postcopy is not PostcopyState.NONE:
            raise ReturnPathError(f"POSTCOPY_ADVISE in postcopy state {self.postcopy.value}")
        advice = decode_advise(data)
        if advice is None:
            if self.postcopy_ram:
                raise ReturnPathError("POSTCOPY_ADVISE of 0 bytes: postcopy-ram is on here, the "
                                   "source advises no RAM postcopy")
        else:
            if self.postcopy_ram is False:
                raise ReturnPathError("POSTCOPY_ADVISE for RAM: postcopy-ram is off here")
            summary, tps = advice
            if self.target_page_size is not None and tps != self.target_page_size:
                raise ReturnPathError(f"postcopy needs matching target page sizes (source {tps}, "
                                   f"here {self.target_page_size})")
            self.pagesize_summary = summary
        self.postcopy = PostcopyState.ADVISE
        return b""

    def end_of_stream(self) -> bytes:
        """The stream was read to its end and loaded: return SHUT 0 (``b""`` without a return
        path). Raises ReturnPathError if a postcopy was left half done (LISTEN without RUN)."""
        if self._outcome is not None:
            raise LocalProtocolError(f"end_of_stream() after the migration {self._outcome}")
        if self.postcopy in (PostcopyState.DISCARD, PostcopyState.LISTENING):
            self._outcome = "failed"
            self._error = ReturnPathError(f"stream ended in postcopy state {self.postcopy.value}")
            raise self._error
        if self.postcopy is PostcopyState.RUNNING:
            self.postcopy = PostcopyState.END
        self._outcome = "completed"
        return self._shut(0)

    def fail(self) -> bytes:
        """The migration failed here: return SHUT 1 once (``b""`` if never opened or already
        shut). Idempotent; allowed after a ReturnPathError."""
        if self._outcome != "completed":
            self._outcome = "failed"
        return self._shut(1)

    def _shut(self, status: int) -> bytes:
        if not self.opened or self.shut:
            return b""
        self.shut = True
        return encode_shut(status)
