"""Build migration streams by hand, for tests that need what no QEMU sends (hostile input).

Only the framing the parser reads: the stream header, the configuration section, the ``ram``
section's records, device sections, commands, EOF and the description JSON (the numbers are
QEMU's ``migration/savevm.c`` and ``ram.c``, as ``qioc_green.migration._format`` has them).
"""

from __future__ import annotations

import json
import struct
from typing import Any

ZERO, MEM_SIZE, PAGE, EOS, CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def string(s: str) -> bytes:
    raw = s.encode()
    return bytes([len(raw)]) + raw


def header() -> bytes:
    return b"QEVM" + be32(3)


def configuration(machine: str = "pc-i440fx-7.2", page_bits: int | None = None) -> bytes:
    out = b"\x07" + be32(len(machine)) + machine.encode()
    if page_bits is not None:
        out += b"\x05" + string("configuration/target-page-bits") + be32(1) + be32(page_bits)
    return out


def footer(sid: int) -> bytes:
    return b"\x7e" + be32(sid)


def section_start(sid: int, idstr: str, instance: int = 0, version: int = 4) -> bytes:
    return b"\x01" + be32(sid) + string(idstr) + be32(instance) + be32(version)


def section_full(sid: int, idstr: str, data: bytes = b"", instance: int = 0,
                 version: int = 1) -> bytes:
    return b"\x04" + be32(sid) + string(idstr) + be32(instance) + be32(version) + data + footer(sid)


def section_part(sid: int) -> bytes:
    return b"\x02" + be32(sid)


def section_end(sid: int) -> bytes:
    return b"\x03" + be32(sid)


def mem_size(blocks: dict[str, int]) -> bytes:
    out = be64(sum(blocks.values()) | MEM_SIZE)
    for name, size in blocks.items():
        out += string(name) + be64(size)
    return out


def ram_start(blocks: dict[str, int], sid: int = 2) -> bytes:
    """The ram section's START: the block list, then EOS and the footer."""
    return section_start(sid, "ram") + mem_size(blocks) + be64(EOS) + footer(sid)


def zero_page(offset: int, fill: int = 0, block: str | None = None) -> bytes:
    if block is None:
        return be64(offset | ZERO | CONTINUE) + bytes([fill])
    return be64(offset | ZERO) + string(block) + bytes([fill])


def page(offset: int, data: bytes, block: str | None = None) -> bytes:
    if block is None:
        return be64(offset | PAGE | CONTINUE) + data
    return be64(offset | PAGE) + string(block) + data


def command(cmd: int, data: bytes = b"") -> bytes:
    return b"\x08" + struct.pack(">HH", cmd, len(data)) + data


def vmdesc(desc: Any) -> bytes:
    raw = desc if isinstance(desc, bytes) else json.dumps(desc).encode()
    return b"\x06" + be32(len(raw)) + raw


def described(devices: list[dict[str, Any]]) -> bytes:
    """EOF and a description listing ``devices`` (``{"name", "instance_id", "fields"}``)."""
    return b"\x00" + vmdesc({"page_size": 4096, "devices": devices})
