"""A sans-IO parser of QEMU's live-migration stream (as QEMU 7.2 sends it with ``migrate``).

Bytes go in with :meth:`StreamParser.feed`, events come out of :meth:`StreamParser.next_event`
(or :data:`NEED_DATA`), :meth:`StreamParser.close` says the input ended. No sockets, no clock, no
files: the receiver drives this with channels, the tests drive it with byte strings.

The format is described in ``_format``; the parser's parts, h11-style: ``_events`` (what comes
out), ``_receivebuffer`` (the input: fed chunks held as views), ``_ram`` (RAM records: the hot
path), ``_vmdesc`` (the description JSON as a ruler for device sections), and this module (the
state machine: header, configuration, sections, commands, device data, the description).

Decisions
---------

*Page data is never buffered.* A receiver parses a 1 GiB stream at ~1.9 GB/s, about 460,000
pages a second: a Python event per page would cost more than the receiving. So one
:class:`RamPages` event covers a *run* of consecutive page records of one block at consecutive
offsets (the common case: the bulk of a migration is ``PAGE|CONTINUE`` records in order), checked
with one ``struct`` call over all their headers, and it carries a memoryview of the fed buffer:
page ``i`` is ``data[i*stride : i*stride + page_size]``, its guest offset ``offset + i*page_size``
(so ``os.pwritev(fd, ev.iov(), ev.offset)`` writes a run in one call). Zero-page records are
folded into :class:`ZeroPages` runs the same way. A page cut by the end of a fed chunk is the one
thing copied (pages are 1 KiB to 64 KiB: ``_ram``), so every event holds whole pages. How records fall into
runs therefore depends on how the input was chunked; the pages, offsets and bytes do not
(:func:`expand_pages` gives the chunking-free view, and every other event is identical whatever
the chunking).

*Lifetime of the fed buffers.* ``RamPages.data`` views the buffer given to :meth:`feed`. Once
:meth:`next_event` has returned :data:`NEED_DATA`, the parser keeps no reference to any fed
buffer (a partial header or page left over is copied), so the caller may reuse its receive
buffer then, after it has consumed the events that view it.

*Device sections are framed by their footers and split exactly by the JSON*: see ``_vmdesc``
and ``_framing``, where postcopy's PACKAGED is parsed in place, bounded by its length.

*Memory is bounded whatever the input*: page data is not buffered; headers are a few hundred
bytes; held device state (data and events), the JSON (bytes and values), section ids and block
names have caps, each an error at once, not after buffering (measured: the migration README).

*Speed, measured* (2 shared cores, CPython 3.11, a 64 MiB random-RAM capture from QEMU 7.2 fed
as memoryview slices, events folded into the summary): 6 GB/s with 64 KiB chunks, 14.5 GB/s
with 256 KiB, 21 GB/s with 1 MiB, 24 GB/s with 4 MiB, so at the ~1.9 GB/s QEMU sends, parsing
costs about a tenth of a core with 1 MiB receives. Run structs are compiled once per run
length and shared by all parsers.

*Not supported, refused with a clear error*: XBZRLE and compressed pages (switch those
capabilities off), RDMA hooks, streams without section footers.

Errors are all :class:`MigrationStreamError` (a ``ValueError``), whose message starts with the
stream offset: ``offset 1234: expected section footer 0x7e for section 5, got 0x12``. Misuse of
the parser (feeding after close) is a ``RuntimeError``.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Literal, NamedTuple

from ._events import (
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    Event,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamEnd,
    StreamHeader,
    VmDescription,
)
from ._format import (
    BE32,
    COMMANDS,
    MIG_CMD_PACKAGED,
    NEED_DATA,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SECTION,
    RAM_VERSION,
    SECTION_KINDS,
    MigrationStreamError,
    NeedData,
)
from ._framing import DeviceFraming
from ._ram import RamReader, check_page_bits
from ._receivebuffer import SHORT, Cursor
from ._vmdesc import Retained, check_described, load_description

_SCAN_WINDOW = 64 * 1024  # device bytes copied per footer search step
_ITEM_COST = 160  # memory a held event or retained section takes beside its data (100-150 B)


class _Section(NamedTuple):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    is_ram: bool


class StreamParser(DeviceFraming, RamReader):
    """Parse one QEMU migration stream, sans-IO (h11-style).

    ``feed(data)`` adds input, ``next_event()`` returns the next event or :data:`NEED_DATA`,
    ``close()`` says the input has ended (and raises if the stream is incomplete), ``offset``
    is the number of stream bytes parsed so far. None of these ever blocks or switches greenlets.

    ``page_size``: the target page size (4096 on x86; a ``target-page-bits`` configuration
    subsection overrides it; 1 KiB to 64 KiB). Caps, an error once crossed: ``max_device_bytes``
    on device state held for the description (FULL data, and each event held meanwhile at a
    fixed cost), ``max_json_bytes`` and ``max_json_values`` on the description (see
    ``_vmdesc.load_description``), ``max_ram_blocks`` on block names, ``max_sections`` on ids.
    """

    def __init__(
        self,
        *,
        page_size: int = 4096,
        max_device_bytes: int = 64 << 20,
        max_json_bytes: int = 16 << 20,
        max_json_values: int = 1_000_000,
        max_ram_blocks: int = 4096,
        max_sections: int = 32768,
    ) -> None:
        super().__init__(page_size, max_ram_blocks)
        self.max_device_bytes = max_device_bytes
        self.max_json_bytes = max_json_bytes
        self.max_json_values = max_json_values
        self.max_sections = max_sections
        self._error: MigrationStreamError | None = None
        self._events: deque[Event] = deque()
        self._step = self._st_header

        self._sections: dict[int, _Section] = {}  # START/FULL seen, by id
        self._live: set[int] = set()  # STARTed and not yet ENDed
        self._cur: _Section | None = None  # section whose data is being parsed
        self._cur_offset = 0
        self._cur_kind = 0
        self._seen_section = False

        # device sections
        self._body = bytearray()
        self._body_start = 0
        self._scan = 0
        self._rejected: tuple[int, bytes] | None = None
        self._device_bytes = 0  # retained FULL data + _ITEM_COST per retained section
        self._held_bytes = 0  # _ITEM_COST per held event (+ data not counted as retained)
        self._retained: list[Retained] = []
        self._held: list[Event] | None = None

        # description
        self._json = bytearray()
        self._json_len = 0
        self._json_offset = 0
        self._done = False

    # -- public API ---------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once the stream has been seen to its end (StreamEnd produced)."""
        return self._done

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """Return the next event, or NEED_DATA when the input fed so far is used up.

        Never blocks. Raises MigrationStreamError when the stream is malformed (and again on
        every later call).
        """
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        try:
            while True:
                ev = self._step()
                if ev is None:
                    if self._events:
                        return self._events.popleft()
                    continue
                return ev
        except MigrationStreamError as exc:
            self._fail(exc)
            raise

    def close(self) -> None:
        """Say the input has ended: parse what is left and check the stream is complete.

        Events not yet taken stay available from next_event() (which then ends with
        StreamEnd and NEED_DATA). Raises MigrationStreamError if the stream is incomplete or
        malformed; events that came before the problem are still returned by next_event().
        """
        if self._closed:
            if self._error is not None:
                raise self._error
            return
        self._closed = True
        if self._error is not None:
            raise self._error
        try:
            while True:
                ev = self._step()
                if ev is NEED_DATA:
                    break
                if ev is not None:
                    self._events.append(ev)
        except MigrationStreamError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: MigrationStreamError) -> None:
        self._error = exc
        self._held = None
        self._more.clear()
        self._base += self._pos
        self._buf = memoryview(b"")
        self._pos = 0

    def _emit(self, ev: Event) -> Event | None:
        """Return ev, or hold it if device events are being held."""
        if self._held is not None:  # a FULL section's data is counted once, as retained
            data = type(ev) is DeviceState and self._cur_kind != QEMU_VM_SECTION_FULL
            self._held_bytes += _ITEM_COST + (len(ev.data) if data else 0)  # type: ignore[union-attr]
            self._check_held()
            self._held.append(ev)
            return None
        return ev

    def _check_held(self, more: int = 0) -> None:  # (``more`` alone over the cap: the caller's)
        if self._device_bytes + self._held_bytes + more > self.max_device_bytes >= more:
            raise self._err(f"device state held for the VM description is over the "
                            f"{self.max_device_bytes}-byte cap", self._cur_offset)

    def _release(self) -> None:
        if self._held:
            self._events.extend(self._held)
        self._held = None
        self._held_bytes = 0

    def _released_then(self, ev: Event) -> Event | None:
        """Release held events, then ev (queued behind them, so order is kept)."""
        if self._held is None:
            return ev
        self._release()
        self._events.append(ev)
        return None

    # -- states -------------------------------------------------------------------------------

    def _st_header(self) -> Event | None | NeedData:
        if not self._ensure(8):
            return self._starve("the stream header (QEVM, version)")
        magic, version = struct.unpack_from(">II", self._buf, self._pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._err(f"expected magic QEVM (0x5145564d), got 0x{magic:08x}")
        if version != QEMU_VM_FILE_VERSION:
            raise self._err(f"expected stream version 3, got {version}", self.offset + 4)
        self._pos += 8
        self._step = self._st_section
        return StreamHeader(version)

    def _st_section(self) -> Event | None | NeedData:
        if self._package_end is not None and self._leave_package():
            return None
        if not self._ensure(1):
            return self._starve("the next section (no EOF marker yet)")
        t = self._buf[self._pos]
        at = self.offset
        if t in SECTION_KINDS:
            res = self._item(lambda c: self._parse_section_header(c, t))
            if res is SHORT:
                return self._starve(f"a {SECTION_KINDS[t]} section header")
            return res  # type: ignore[return-value]
        if t == QEMU_VM_EOF:
            if self._package_end is not None:
                raise self._err("EOF (0x00) inside the postcopy package")
            self._pos += 1
            self._step = self._st_after_eof
            return self._emit(EndOfState(at))
        if t == QEMU_VM_COMMAND:
            res = self._item(self._parse_command)
            if res is SHORT:
                return self._starve("a command")
            return self._released_then(res)  # type: ignore[arg-type]
        if t == QEMU_VM_CONFIGURATION:
            if self._seen_section:
                raise self._err("configuration section after other sections")
            res = self._item(self._parse_configuration)
            if res is SHORT:
                return self._starve("the configuration section")
            self._seen_section = True
            return res  # type: ignore[return-value]
        if t == QEMU_VM_VMDESCRIPTION:
            raise self._err("VM description (0x06) before the EOF marker")
        if t == QEMU_VM_SUBSECTION:
            raise self._err("subsection (0x05) outside a section")
        if t == QEMU_VM_SECTION_FOOTER:
            raise self._err("section footer (0x7e) outside a section")
        raise self._err(f"unknown section type 0x{t:02x}")

    def _parse_configuration(self, c: Cursor) -> Event:
        c.u8()
        at = c.offset
        n = c.be32()
        if not 0 < n <= 256:
            raise MigrationStreamError(at, f"machine name length {n} is absurd (expected 1..256)")
        machine = c.take(n).decode("utf-8", "backslashreplace")
        page_bits: int | None = None
        caps: list[str] = []
        uuid: bytes | None = None
        while c.peek_u8() == QEMU_VM_SUBSECTION:
            c.u8()
            at = c.offset
            name = c.string("configuration subsection name")
            c.be32()  # version
            if name == "configuration/target-page-bits":
                page_bits = check_page_bits(c.be32(), at)
            elif name == "configuration/capabilities":
                count = c.be32()
                if count > 256:
                    raise MigrationStreamError(at, f"capability count {count} is absurd")
                caps.extend(c.string("capability name") for _ in range(count))
            elif name == "configuration/uuid":
                uuid = c.take(16)
            else:
                raise MigrationStreamError(at, f"unknown configuration subsection {name!r}")
        if page_bits is not None:
            self._set_page_size(1 << page_bits)
        self._ignore_shared = "x-ignore-shared" in caps
        return Configuration(machine, page_bits, tuple(caps), uuid)

    def _parse_command(self, c: Cursor) -> Event:
        at = c.offset
        c.u8()
        cmd = c.be16()
        length = c.be16()
        known = COMMANDS.get(cmd)
        if known is None:
            raise MigrationStreamError(at, f"unknown command {cmd}")
        name, want = known
        if want is not None and length != want:
            raise MigrationStreamError(at, f"command {name} has length {length}, expected {want}")
        data = c.take(length)
        if cmd == MIG_CMD_PACKAGED:
            self._open_package(at, c.offset, BE32.unpack(data)[0], self.max_device_bytes)
        return Command(cmd, name, data, at)

    def _parse_section_header(self, c: Cursor, t: int) -> Event | None:
        at = c.offset
        c.u8()
        sid = c.be32()
        sec: _Section | None
        if t in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            idstr_at = c.offset
            idstr = c.string("section idstr")
            instance_id = c.be32()
            version_id = c.be32()
            if not idstr.isprintable() or not idstr.isascii() or " " in idstr:
                raise MigrationStreamError(idstr_at, f"section idstr {idstr!r} is not printable")
            is_ram = idstr == RAM_SECTION
            if is_ram and self._package_end is not None:
                raise MigrationStreamError(at, "a ram section inside the postcopy package")
            if is_ram and instance_id != 0:
                raise MigrationStreamError(at, f"ram section with instance id {instance_id}")
            if sid in self._live:
                raise MigrationStreamError(at, f"section {sid} started again while still live")
            if is_ram and t == QEMU_VM_SECTION_FULL:
                raise MigrationStreamError(at, "ram sent as a FULL section")
            if is_ram and version_id != RAM_VERSION:
                raise MigrationStreamError(at, f"ram section version {version_id}, expected 4")
            sec = _Section(sid, idstr, instance_id, version_id, is_ram)
            if sid not in self._sections and len(self._sections) >= self.max_sections:
                raise MigrationStreamError(at, f"more than {self.max_sections} sections")
            self._sections[sid] = sec
            if t == QEMU_VM_SECTION_START:
                self._live.add(sid)
        else:
            if sid not in self._live:
                what = "PART" if t == QEMU_VM_SECTION_PART else "END"
                raise MigrationStreamError(at, f"{what} for section {sid}, never started")
            sec = self._sections[sid]
        self._seen_section = True
        self._cur = sec
        self._cur_offset = at
        cls = (SectionStart, SectionPart, SectionEnd, SectionFull)[t - 1]
        ev = cls(sid, sec.idstr, sec.instance_id, sec.version_id, at)
        self._cur_kind = t
        if sec.is_ram:
            self._step = self._st_ram
            return self._released_then(ev)
        if t == QEMU_VM_SECTION_FULL and self._held is None:
            self._held = []
        self._body = bytearray()
        self._body_start = c.offset
        self._scan = 0
        self._rejected = None
        self._step = self._st_device
        return self._emit(ev)

    def _st_footer(self) -> Event | None | NeedData:
        sec = self._cur
        assert sec is not None
        if not self._ensure(5):
            return self._starve(f"the footer of section {sec.section_id}")
        buf = self._buf
        pos = self._pos
        if buf[pos] != QEMU_VM_SECTION_FOOTER:
            raise self._err(f"expected section footer 0x7e for section {sec.section_id}, "
                            f"got 0x{buf[pos]:02x}")
        (sid,) = BE32.unpack_from(buf, pos + 1)
        if sid != sec.section_id:
            raise self._err(f"section footer names section {sid}, "
                            f"expected {sec.section_id} ({sec.idstr!r})")
        at = self.offset
        self._pos = pos + 5
        self._step = self._st_section
        self._cur = None
        if self._cur_kind == QEMU_VM_SECTION_END:
            self._live.discard(sid)
        ev = SectionFooter(sid, sec.idstr, at)
        return ev if sec.is_ram else self._emit(ev)

    # -- device sections ----------------------------------------------------------------------

    def _st_device(self) -> Event | None | NeedData:
        """Copy a device section's data until its footer (validated by what follows)."""
        sec = self._cur
        assert sec is not None
        footer = bytes([QEMU_VM_SECTION_FOOTER]) + BE32.pack(sec.section_id)
        body = self._body
        while True:
            q = body.find(footer, self._scan)
            while q != -1:
                verdict = self._plausible_next(body, q + 5)
                if verdict is None:
                    break
                if verdict:
                    return self._device_framed(sec, q)
                if self._rejected is None:
                    self._rejected = (self._body_start + q, bytes(body[q + 5 : q + 7]))
                q = body.find(footer, q + 1)
            self._scan = q if q != -1 else max(0, len(body) - 4)
            room = self._package_room(self._body_start, len(body),
                                      f"section {sec.section_id} ({sec.idstr!r})")
            if not self._next_chunk():
                if self._closed and self._rejected is not None:
                    at, after = self._rejected
                    where = f"the footer of section {sec.section_id} ({sec.idstr!r}) at offset {at}"
                    if after[0] == QEMU_VM_EOF:
                        raise self._err(f"expected the end or a VM description (0x06) after EOF "
                                        f"after {where}, got 0x{after[1]:02x}", at + 6)
                    raise self._err(f"expected a section type, EOF or a description after "
                                    f"{where}, got 0x{after[0]:02x}", at + 5)
                if self._closed:
                    raise self._err(f"stream ends inside section {sec.section_id} "
                                    f"({sec.idstr!r}) before its footer", self._cur_offset)
                return self._starve("device data")
            take = min(len(self._buf) - self._pos, _SCAN_WINDOW, room or _SCAN_WINDOW)
            self._check_held(len(body) + take)
            if len(body) + take > self.max_device_bytes:
                raise self._err(
                    f"device data over the {self.max_device_bytes}-byte cap in section "
                    f"{sec.section_id} ({sec.idstr!r}) (no footer found)", self._cur_offset)
            body += self._buf[self._pos : self._pos + take]
            self._pos += take

    def _device_framed(self, sec: _Section, q: int) -> Event | None:
        body = self._body
        # give back what follows the data (the footer onwards) as input to parse next
        rest = self._buf[self._pos :]
        if len(rest):
            self._more.appendleft(rest)
        self._buf = memoryview(bytes(body[q:]))
        self._base = self._body_start + q
        self._pos = 0
        data = bytes(body[:q])
        self._body = bytearray()
        if self._cur_kind == QEMU_VM_SECTION_FULL:
            self._device_bytes += len(data) + _ITEM_COST
            self._check_held()
            self._retained.append(
                Retained(sec.section_id, sec.idstr, sec.instance_id, sec.version_id, data,
                          self._body_start))
        self._step = self._st_footer
        return self._emit(
            DeviceState(sec.section_id, sec.idstr, sec.instance_id, data, self._body_start))

    # -- after EOF ----------------------------------------------------------------------------

    def _st_after_eof(self) -> Event | None | NeedData:
        if not self._ensure(1):
            if self._closed:
                self._check_described(None)
                self._done = True
                self._step = self._st_done
                return self._released_then(StreamEnd(self.offset, False))
            return self._starve("the VM description")
        t = self._buf[self._pos]
        if t != QEMU_VM_VMDESCRIPTION:
            raise self._err(f"expected VM description 0x06 or the end after EOF, got 0x{t:02x}")
        if not self._ensure(5):
            return self._starve("the VM description length")
        (length,) = BE32.unpack_from(self._buf, self._pos + 1)
        if not 0 < length <= self.max_json_bytes:
            raise self._err(f"VM description length {length} is absurd "
                            f"(cap {self.max_json_bytes})")
        self._json_offset = self.offset
        self._json_len = length
        self._json = bytearray()
        self._pos += 5
        self._step = self._st_json
        return None

    def _st_json(self) -> Event | None | NeedData:
        while len(self._json) < self._json_len:
            if not self._next_chunk():
                return self._starve(f"the VM description ({len(self._json)} of "
                                    f"{self._json_len} bytes)")
            take = min(self._json_len - len(self._json), len(self._buf) - self._pos)
            self._json += self._buf[self._pos : self._pos + take]
            self._pos += take
        at = self._json_offset
        desc = load_description(self._json, self.max_json_values, at + 5)
        self._json = bytearray()
        if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
            raise self._err("VM description has no device list", at + 5)
        self._check_described(desc)
        self._release()
        self._events.append(VmDescription(desc, at, self._json_len))
        self._events.append(StreamEnd(self.offset, True))
        self._done = True
        self._step = self._st_done
        return None

    def _check_described(self, desc: dict[str, Any] | None) -> None:
        """Split the retained FULL sections with the description; refuse any disagreement."""
        retained, self._retained = self._retained, []
        self._device_bytes = 0
        if desc is not None:
            check_described(desc, retained, self._json_offset)

    def _st_done(self) -> Event | None | NeedData:
        if self._next_chunk():
            extra = len(self._buf) - self._pos + sum(map(len, self._more))
            raise self._err(f"{extra} bytes after the end of the stream")
        self._base += self._pos  # let go of the caller's (used up) buffer
        self._buf = memoryview(b"")
        self._pos = 0
        return NEED_DATA

