"""The VM description JSON as a ruler: where each described device section's data ends.

After EOF QEMU sends a JSON that lists, per FULL section, the bytes each field took; walking it
as ``scripts/analyze-migration.py`` does splits the device data exactly, and that split must
agree with the footers the parser framed the sections by.

*Device sections are framed by their footers and split exactly by the JSON.* A device section's
bytes are buffered (capped: ``max_device_bytes``, 64 MiB by default, then an error) and its end is
found online by its footer, 0x7e + be32 of *its* id, accepted only when what follows is a
plausible next item (a section header with a printable idstr, a PART/END of a live section, a
known command, EOF followed by 0x06 + a sane length + ``{``, or the end of the input). The events
of FULL sections (and everything after them) are *held* until the JSON arrives; the JSON is then
walked, as analyze-migration does, to find where each described section's fields and subsections
end, and that exact split must agree with the framing, byte for byte, subsection markers and
names included, or the stream is refused. Only then are the held events released, followed by
:class:`VmDescription`. Without a JSON (QEMU may omit it) the held events are released at
:meth:`close` as framed by the footers, and :class:`StreamEnd` says ``described=False``. If
anything but device state follows a held section (RAM records, a command), the held events are
released first, so events always come out in stream order; the JSON still checks them at the end.
Section footers are required (QEMU has sent them since machine types of 2.4).

What framing by footers cannot know, and the rules chosen:

- A footer pattern inside device data followed by a plausible next item would cut a section
  short. The next-item check makes that very unlikely (for the last section it needs the
  7 bytes ``7e <id> 00 06``), and with a JSON the exact split catches it.
- An iterable section other than ``ram`` (block migration, dirty bitmaps...) is framed by its
  footers and passed on as DeviceState; the JSON does not describe those, so nothing checks
  them. A ``ram`` whose header was damaged into another name becomes such a section; the
  summary then shows no RAM blocks.
- When no candidate footer fits, the error at close names the first one rejected and the byte
  that made it implausible (``expected a section type, EOF or a description after the footer
  of section 40 ('globalstate') at offset 251723, got 0x42``).
- A stream cut right after its EOF byte is a complete stream without a description: QEMU sends
  exactly that with ``suppress-vmdesc=on`` or postcopy, and nothing tells the two apart.
- On an error, held (unchecked) device events are dropped; events already returned stay valid.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from ._format import QEMU_VM_SUBSECTION, MigrationStreamError
from ._receivebuffer import Short

MAX_DEPTH = 64  # QEMU's descriptions nest 13-14 deep (pc, q35); walk_vmsd stops at 64 too


def load_description(raw: bytes | bytearray, max_values: int, at: int) -> Any:
    """Parse the description JSON within a budget: at most ``max_values`` values, counted on
    the raw bytes before anything is built (a parsed value costs 50-100 bytes: 6 MB of ``{}``
    took 160 MB), and at most MAX_DEPTH levels. ``at``: its stream offset, for errors."""
    # Every value but the first follows a ',' or opens a container (keys count as values
    # here): an upper bound, counted at C speed.
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[") + 1
    if values > max_values:
        raise MigrationStreamError(at, f"VM description has up to {values} values, over the "
                                       f"cap of {max_values}")
    try:
        desc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MigrationStreamError(at, f"VM description is not valid JSON: {exc}") from None
    stack: list[tuple[Any, int]] = [(desc, 0)]
    while stack:  # the depth, iteratively (the tree is bounded by the count above)
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if d >= MAX_DEPTH:
            raise MigrationStreamError(at, f"VM description nests deeper than {MAX_DEPTH}")
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return desc


class Retained(NamedTuple):
    """A FULL device section kept until the JSON can check it."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    data: bytes
    offset: int  # stream offset of its first data byte


class WalkError(Exception):
    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos


def walk_vmsd(desc: dict[str, Any], data: bytes, pos: int, depth: int) -> int:
    """Where the fields and subsections a vmstate description lists end, from data[pos:].

    Every field carries the bytes it took ("size", per element; "array_len" elements); a
    "struct" field nests a description. Subsections are checked: 0x05, the name, a be32 version.
    """
    if depth > MAX_DEPTH:
        raise WalkError(pos, "description nests too deep")
    for fld in desc.get("fields", ()):
        count = fld.get("array_len", 1)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"bad array_len {count!r}")
        sub = fld.get("struct")
        if isinstance(sub, dict):
            for _ in range(count):
                before = pos
                pos = walk_vmsd(sub, data, pos, depth + 1)
                if pos == before:  # an empty struct: all its elements are empty too
                    break
        elif fld.get("type") == "capability":
            for _ in range(count):
                if pos >= len(data):
                    raise Short(pos)
                pos += 1 + data[pos]
        else:
            size = fld["size"]
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"bad size {size!r}")
            pos += size * count
        if pos > len(data):
            raise Short(pos)
    for sub in desc.get("subsections", ()):
        name = str(sub["vmsd_name"]).encode()
        if pos + 2 > len(data):
            raise Short(pos)
        if data[pos] != QEMU_VM_SUBSECTION:
            raise WalkError(pos, f"expected subsection {sub['vmsd_name']!r} (0x05), "
                                  f"got 0x{data[pos]:02x}")
        n = data[pos + 1]
        if data[pos + 2 : pos + 2 + n] != name:
            raise WalkError(pos, f"expected subsection {sub['vmsd_name']!r}, got "
                                  f"{data[pos + 2 : pos + 2 + n]!r}")
        pos += 2 + n + 4
        if pos > len(data):
            raise Short(pos)
        pos = walk_vmsd(sub, data, pos, depth + 1)
    return pos


def check_described(desc: dict[str, Any], retained: list[Retained], at: int) -> None:
    """Split the retained FULL sections with the description ``desc`` (found at stream offset
    ``at``); raise MigrationStreamError at the first disagreement."""
    devices = desc["devices"]
    if len(devices) != len(retained):
        raise MigrationStreamError(at, f"VM description lists {len(devices)} devices, the "
                                       f"stream has {len(retained)} FULL sections")
    for dev, sec in zip(devices, retained):
        if not isinstance(dev, dict):
            raise MigrationStreamError(at, "VM description: a device entry is not an object")
        if dev.get("name") != sec.idstr or dev.get("instance_id") != sec.instance_id:
            raise MigrationStreamError(
                at, f"VM description names {dev.get('name')!r} instance "
                    f"{dev.get('instance_id')!r} where the stream has section "
                    f"{sec.section_id} {sec.idstr!r} instance {sec.instance_id}")
        version = dev.get("version")
        if version is not None and version != sec.version_id:
            raise MigrationStreamError(
                at, f"VM description gives {sec.idstr!r} version {version!r}, its section "
                    f"{sec.section_id} header says {sec.version_id}")
        try:
            end = walk_vmsd(dev, sec.data, 0, 0)
        except Short:
            end = -1
        except (KeyError, TypeError, ValueError, IndexError, RecursionError,
                AttributeError) as exc:
            raise MigrationStreamError(at, f"VM description of {sec.idstr!r} is malformed "
                                           f"({type(exc).__name__}: {exc})") from None
        except WalkError as exc:
            raise MigrationStreamError(sec.offset + exc.pos,
                                       f"section {sec.section_id} ({sec.idstr!r}): {exc}") from None
        if end != len(sec.data):
            said = "more than" if end < 0 else str(end)
            raise MigrationStreamError(
                sec.offset, f"section {sec.section_id} ({sec.idstr!r}): the VM description "
                            f"accounts for {said} bytes, the footer comes after {len(sec.data)}")
